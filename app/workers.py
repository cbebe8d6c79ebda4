"""`mailrelay serve --workers N`: one listening socket, N worker processes, one supervisor.

Each worker is a fresh `mailrelay serve` on the inherited socket, so each has its
own event loop, relays and pools, and none shares state with another by accident.
The supervisor forwards SIGTERM (each worker drains on its own timeline, app/cli.py
_Signals) and SIGHUP (each worker reloads), replaces a worker that dies, and gives up if
workers die at start-up. Once stopping it closes its copy of the listening socket.
Metrics: every worker writes to a private PROMETHEUS_MULTIPROC_DIR, set before it
starts, so whichever answers /metrics reports all of them. A dead worker's files are
folded into one file per metric type (`retire_worker_files`), so replacing workers
never grows the directory.
"""

import argparse
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

logger = logging.getLogger("mailrelay")
_STARTUP_WINDOW = 10.0  # a worker dying this soon after starting means the configuration cannot run
#: Metric types whose values outlive the process that counted them; a dead worker's gauges do not.
_CUMULATIVE = ("counter", "histogram", "summary")


def retire_worker_files(pid: int, directory: str) -> None:
    """Clean up after the worker `pid` died: its live gauges go (prometheus_client's
    mark_process_dead), its counts are added into one `<type>_retired.db` per type (totals
    never go backwards), and every file of its own is removed."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    for path in glob.glob(os.path.join(glob.escape(directory), f"*_{pid}.db")):
        kind = os.path.basename(path).split("_", 1)[0]
        if kind in _CUMULATIVE:
            # The files' keys are opaque to us: added value by value, as prometheus_client wrote them.
            archive = MmapedDict(os.path.join(directory, f"{kind}_retired.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                    total = archive.read_value(key)[0] + value  # type: ignore[no-untyped-call]
                    archive.write_value(key, total, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
        os.remove(path)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker_command(args: argparse.Namespace, fd: int) -> list[str]:
    command = [sys.executable, "-m", "app", "serve", "--worker-fd", str(fd), "--host", args.host]
    command += ["--log-level", args.log_level]
    if args.config:
        command += ["--config", args.config]
    if args.log_format:
        command += ["--log-format", args.log_format]
    if args.insecure_allow_unauthenticated:
        command.append("--insecure-allow-unauthenticated")
    return command


def supervise(args: argparse.Namespace, source: str) -> int:
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="mailrelay-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = _worker_command(args, sock.fileno())
    stopping = False
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def start() -> tuple[subprocess.Popen[bytes], float]:
        process = subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))  # noqa: S603
        return process, time.monotonic()

    workers = [start() for _ in range(args.workers)]
    logger.info(
        "supervisor %d: %d workers on %s:%d (configuration from %s)",
        os.getpid(),
        args.workers,
        args.host,
        args.port,
        source,
        extra={"event": "startup", "workers": [w.pid for w, _ in workers]},
    )
    status = 0
    try:
        while workers:
            while forwarded:
                signum = forwarded.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stopping = True
                    # No worker starts from now on. With this copy closed, the port closes when the
                    # last worker's drain_delay ends: new connections are refused (a balancer retries
                    # them elsewhere) instead of waiting in a backlog that no one accepts from.
                    sock.close()
                for process, _ in workers:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
            for i, (process, started) in enumerate(list(workers)):
                code = process.poll()
                if code is None:
                    continue
                retire_worker_files(process.pid, metrics_dir)
                if stopping:
                    # Killed by the SIGTERM passed on to it: it was still starting (no handlers yet).
                    status = status or (0 if code == -signal.SIGTERM else code)
                    workers.remove((process, started))
                    continue
                if time.monotonic() - started < _STARTUP_WINDOW:
                    logger.error("worker %d exited with %d at start-up; stopping", process.pid, code)
                    status = code or 1
                    stopping = True
                    forwarded.append(signal.SIGTERM)
                    workers.remove((process, started))
                    continue
                logger.error("worker %d exited with %d; starting another", process.pid, code)
                workers[i] = start()
            time.sleep(0.1)
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    logger.info("supervisor stopped", extra={"event": "shutdown", "status": status})
    return status
