"""DKIM signing's cost: `static` to smtp-sink unsigned, signed with Ed25519, signed with RSA-2048.

One `mailrelay serve` (CPU 0) with the three relays, loaded by wrk (CPU 1, with smtp-sink) in
alternating rounds, so the three rows share the machine's noise; each ratio is taken against the
unsigned run of the same round. Then the raw cost of the signatures, in-process:

    taskset -c 0 .venv/bin/python bench/signing.py [--rounds 5] [--seconds 3] [--conc 8] [--baseline REV]

With `--baseline REV` a second server runs REV's code (a `git archive` of it) and measures each row
right after this tree's: before/after in one run, compared by CPU per message.

`--inprocess` measures instead what signing adds to one delivery without sockets, wrk or smtp-sink
(the ASGI app called in a loop, as bench/inprocess.py does): a `blackhole` relay unsigned, signed
with Ed25519 and with RSA-2048, in alternating rounds, in CPU microseconds per request (the
thread's CPU time: what others run on the machine moves it far less than wall-clock time). Run
it from each revision's tree, in the same minute, to compare them:

    PYTHONPATH=. taskset -c 0 .venv/bin/python bench/signing.py --inprocess [--rounds 7] [--count 3000] [--conc 1]
"""

import argparse
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relays.dkim import DEFAULT_HEADERS, Identity, Signer, parse_key  # noqa: E402

TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_LINE = re.compile(r"BENCH (.*)")
ROWS = ("plain", "ed25519", "rsa")


def message(size: int) -> bytes:
    head = (
        b"From: Bench <bench@bench.test>\r\nTo: sink@example.net\r\nSubject: dkim bench\r\n"
        b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <bench@bench.test>\r\n\r\n"
    )
    line = b"x" * 74 + b"\r\n"
    body = line * ((size - len(head)) // len(line))
    return head + body + b"y" * (size - len(head) - len(body))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def keys(directory: Path) -> dict[str, bytes]:
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    found = {
        "rsa": rsa_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
        "ed25519": ed_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
    }
    for name, data in found.items():
        (directory / f"{name}.key").write_bytes(data)
    return found


def wrk(port: int, path: str, body: Path, headers: Path, conc: int, seconds: int) -> dict[str, int]:
    env = {**os.environ, "BENCH_PATH": path, "BENCH_BODY": str(body), "BENCH_HEADERS": str(headers)}
    cmd = [TASKSET, "-c", "1", WRK, "-t1", f"-c{conc}", f"-d{seconds}s", "-s", str(ROOT / "bench/post.lua")]
    done = subprocess.run(  # noqa: S603 - our own command line
        [*cmd, f"http://127.0.0.1:{port}"], env=env, capture_output=True, text=True, check=True
    )
    found = WRK_LINE.search(done.stdout)
    if not found:
        raise SystemExit(f"wrk: {done.stdout}{done.stderr}")
    return {k: int(float(v)) for k, v in (item.split("=") for item in found[1].split())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def best_us(function: Callable[[], object], count: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            function()
        best = min(best, (time.perf_counter() - started) / count)
    return best * 1e6


def raw_costs(found: dict[str, bytes], msg: bytes) -> list[str]:
    """In-process: the raw signatures, our signer, and dkimpy's whole sign() (the test extra's; the
    signer it replaced) on the same message."""
    import hashlib

    import dkim

    rsa_key = serialization.load_pem_private_key(found["rsa"], None)
    ed_key = serialization.load_pem_private_key(found["ed25519"], None)
    if not isinstance(rsa_key, rsa.RSAPrivateKey) or not isinstance(ed_key, ed25519.Ed25519PrivateKey):
        raise SystemExit("the generated keys did not load back")
    digest = hashlib.sha256(msg).digest()
    seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    signers = {name: Signer([Identity("bench.test", "s", parse_key(found[name]), DEFAULT_HEADERS)]) for name in found}
    relaxed = (b"relaxed", b"relaxed")
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("RSA-2048 signature alone (OpenSSL)", lambda: rsa_key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), 300),
        ("Ed25519 signature alone (OpenSSL)", lambda: ed_key.sign(digest), 3000),
        ("mailrelay Signer.sign, RSA-2048", lambda: signers["rsa"].sign(msg), 300),
        ("mailrelay Signer.sign, Ed25519", lambda: signers["ed25519"].sign(msg), 3000),
        (
            "dkimpy dkim.sign, RSA-2048",
            lambda: dkim.sign(msg, b"s", b"bench.test", found["rsa"], canonicalize=relaxed),
            20,
        ),
        (
            "dkimpy dkim.sign, Ed25519",
            lambda: dkim.sign(
                msg,
                b"s",
                b"bench.test",
                base64.b64encode(seed),
                canonicalize=relaxed,
                signature_algorithm=b"ed25519-sha256",
            ),
            500,
        ),
    ]
    return [f"  {name:<40} {best_us(function, count):9.1f} us" for name, function, count in rows]


def inprocess(found: dict[str, bytes], directory: Path, msg: bytes, rounds: int, count: int, conc: int) -> None:
    """What signing adds to a delivery in-process (see the module's doc), `conc` requests at a time."""
    import asyncio
    import gc
    from typing import Any

    import uvloop
    from inprocess import post_scope  # bench/ is on sys.path (run as a script, or imported by bench.py)

    from app.config import parse_config
    from app.logs import setup_logging
    from app.main import create_app

    relays = "".join(
        f"  {row}:\n    type: blackhole\n"
        + (
            f"    dkim:\n      - {{domain: bench.test, selector: s, key_file: {directory / row}.key}}\n"
            if row != "plain"
            else ""
        )
        for row in ROWS
    )
    body = json.dumps({"sender": "bench@bench.test", "recipients": ["sink@example.net"], "message": msg.decode()})
    request = body.encode()

    async def run() -> dict[str, float]:
        app = create_app(parse_config(f"relay:\n{relays}", "bench").config)
        async with app.router.lifespan_context(app) as state:
            statuses: set[int] = set()

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": request, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.add(message["status"])

            scopes = {row: post_scope(f"/relays/{row}/deliver", len(request), state) for row in ROWS}
            for row in ROWS:  # warm-up
                for _ in range(count // 2):
                    await app(dict(scopes[row]), receive, send)
            gc.collect()
            gc.freeze()  # as the service does once serving
            used: dict[str, list[float]] = {row: [] for row in ROWS}
            for _ in range(rounds):
                for row in ROWS:
                    requests = count if row != "rsa" else max(1, count // 5)  # RSA: 5x fewer, as slow
                    started = time.thread_time()
                    for _ in range(requests // conc):  # conc at once: they reach the relay in one turn
                        await asyncio.gather(*(app(dict(scopes[row]), receive, send) for _ in range(conc)))
                    used[row].append((time.thread_time() - started) / (requests // conc * conc))
            if statuses != {200}:
                raise SystemExit(f"unexpected statuses {statuses}")
            return used

    with open(os.devnull, "w") as sink:  # the delivery line is written, as at the default log level
        setup_logging("info", "json", sink)
        used = uvloop.run(run())
    print(f"# bench/signing.py --inprocess: {len(msg)} B messages, blackhole, c{conc}, {rounds} rounds, CPU us/request")
    for row in ROWS:
        # Each round's row against the unsigned run of the same round: the machine's noise is shared.
        added = [(u - p) * 1e6 for u, p in zip(used[row], used["plain"], strict=True)]
        print(
            f"  {row:<8} best {min(used[row]) * 1e6:7.1f} us, median {statistics.median(used[row]) * 1e6:7.1f} us"
            f"   signing adds: median {statistics.median(added):6.1f} us, best-to-best"
            f" {(min(used[row]) - min(used['plain'])) * 1e6:6.1f} us"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--conc", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--inprocess", action="store_true", help="signing's added CPU per delivery, no sockets")
    parser.add_argument("--count", type=int, default=3000, help="--inprocess: requests per row and round")
    parser.add_argument("--baseline", metavar="REV", help="also each row on REV's code (git archive), right after it")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-dkim-"))
    found = keys(directory)
    msg = message(args.size)
    if args.inprocess:
        try:
            inprocess(found, directory, msg, args.rounds, args.count, args.conc)
            print("# raw costs, in-process (best of 5):")
            print("\n".join(raw_costs(found, msg)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    body = directory / "body.json"
    body.write_text(
        json.dumps({"sender": "bench@bench.test", "recipients": ["sink@example.net"], "message": msg.decode()})
    )
    headers = directory / "headers"
    headers.write_text("Content-Type: application/json\n")
    sink_port = free_port()
    relays = "".join(
        f"  {row}:\n    type: static\n    host: 127.0.0.1\n    port: {sink_port}\n    concurrent_connections: 8\n"
        + (
            f"    dkim:\n      - {{domain: bench.test, selector: s, key_file: {directory / row}.key}}\n"
            if row != "plain"
            else ""
        )
        for row in ROWS
    )
    (directory / "mailrelay.yaml").write_text(f"relay:\n{relays}")
    user = ["-u", "root"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root otherwise
    smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    sink = subprocess.Popen(  # noqa: S603 - our own command line
        [TASKSET, "-c", "1", smtp_sink, *user, "-c", "-h", "sink.bench.test", f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trees = {"": ROOT}
    if args.baseline:
        trees["@base"] = directory / "base"
        trees["@base"].mkdir()
        git, tar = shutil.which("git") or "/usr/bin/git", shutil.which("tar") or "/usr/bin/tar"
        archive = subprocess.run(  # noqa: S603 - our own command line
            [git, "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
        ).stdout
        subprocess.run([tar, "-x", "-C", str(trees["@base"])], input=archive, check=True)  # noqa: S603
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    logs = []
    try:
        for name, tree in trees.items():
            port = free_port()
            logs.append((directory / f"mailrelay{name}.log").open("wb"))
            # `python -m app` from the tree: the installed `mailrelay` script runs the code the
            # editable install points at (the main tree), not this one's.
            command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--config"]
            command += [str(directory / "mailrelay.yaml"), "--log-level", "info", "--log-format", "json"]
            process = subprocess.Popen(  # noqa: S603 - our own command line
                [TASKSET, "-c", "0", *command], cwd=tree, stdout=logs[-1], stderr=subprocess.STDOUT
            )
            servers[name] = (process, port)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", sink_port), 1).close()
                break
            except OSError:
                time.sleep(0.1)
        for _, port in servers.values():
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/readyz").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            answer = httpx.post(
                f"http://127.0.0.1:{port}/relays/ed25519/deliver",
                content=body.read_bytes(),
                headers={"Content-Type": "application/json"},
            ).json()
            if answer["status"] != "delivered" or not answer["dkim"]["signed"]:
                raise SystemExit(f"a signed delivery failed: {answer}")
        keys_ = [row + name for row in ROWS for name in servers]
        rates: dict[str, list[float]] = {key: [] for key in keys_}
        cpu: dict[str, list[float]] = {key: [] for key in keys_}  # the server's CPU us per message
        for row in ROWS:  # warm-up
            for _, port in servers.values():
                wrk(port, f"/relays/{row}/deliver", body, headers, args.conc, 1)
        for _ in range(args.rounds):
            for row in ROWS:
                for name, (process, port) in servers.items():  # the baseline right after: the same load
                    before = cpu_seconds(process.pid)
                    result = wrk(port, f"/relays/{row}/deliver", body, headers, args.conc, args.seconds)
                    used = cpu_seconds(process.pid) - before
                    if result["non2xx"] or result["connect"] + result["read"] + result["timeout"]:
                        raise SystemExit(f"{row}{name}: errors: {result}")
                    rates[row + name].append(result["requests"] / (result["duration_us"] / 1e6))
                    cpu[row + name].append(used / result["requests"] * 1e6)
        print(
            f"# bench/signing.py: {args.size} B messages, static to smtp-sink, c{args.conc}, {args.rounds} rounds x {args.seconds} s"
            + (f", baseline {args.baseline} (@base)" if args.baseline else "")
        )
        print(f"# load average {os.getloadavg()[0]:.2f} (shared machine: msg/s is noisy; CPU per message less so)")
        for row in ROWS:
            for name in servers:
                key, plain = row + name, "plain" + name
                ratios = [r / p for r, p in zip(rates[key], rates[plain], strict=True)]
                cpu_ratios = [p / c for c, p in zip(cpu[key], cpu[plain], strict=True)]
                print(
                    f"  {key:<13} {statistics.median(rates[key]):6.0f} msg/s x{statistics.median(ratios):.2f}"
                    f"   server CPU {statistics.median(cpu[key]):6.0f} us/msg, unsigned/this x{statistics.median(cpu_ratios):.2f}"
                    f"   (msg/s rounds: {', '.join(f'{r:.0f}' for r in rates[key])})"
                )
        if args.baseline:
            print("# CPU us/msg of each row / its baseline twin, per round (median, lowest, highest):")
            for row in ROWS:
                shares = [c / b for c, b in zip(cpu[row], cpu[row + "@base"], strict=True)]
                print(f"  {row:<8} x{statistics.median(shares):.3f} ({min(shares):.3f}-{max(shares):.3f})")
        print("# raw costs, in-process (best of 5):")
        print("\n".join(raw_costs(found, msg)))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)
        sink.terminate()
        sink.wait(10)
        for log in logs:
            log.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
