"""python-slimta 5.0.5's `HttpRelay`, a real client of the `message/rfc822` form, against the
running service: it must read every outcome (issue 15, item 1).

slimta runs in its own virtual environment (gevent, Python 3.11 pins as in bench/run), made
here on first use and kept in `.venv-slimta/` (git-ignored) for later runs; a missing venv
that cannot be built skips locally and fails under CI=true. The client is a subprocess
(tests/slimta_client.py) bounded by a timeout: an attempt that never returns is a failure.
"""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.servers.mailrelay import ROOT, service

SLIMTA_VENV = ROOT / ".venv-slimta"
#: slimta 5.0.5 on Python 3.11: pycares < 5 (the 5.x API changed), setuptools >= 70 (older
#: pkg_resources misses zope.interface) but < 81 (pkg_resources removed); see bench/run.
SLIMTA_REQUIREMENTS = ["python-slimta==5.0.5", "pycares<5", "setuptools>=70,<81"]
CLIENT = ROOT / "tests" / "slimta_client.py"
#: How long one `relay.attempt()` may take before it counts as hung.
ATTEMPT_SECONDS = 5.0

CONFIG = """\
relay:
  scripted:
    type: custom
    factory: tests.scripted:factory
    replies:
      bad@example.net: "550 5.1.1 <bad@example.net> User unknown"
      later@example.net: "450 4.2.1 Mailbox busy, try again later"
"""


def _unusable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slimta_python() -> Path:
    """slimta's interpreter, installing python-slimta 5.0.5 into `.venv-slimta/` when missing."""
    python = SLIMTA_VENV / "bin" / "python"
    stamp = SLIMTA_VENV / ".tests-installed"
    wanted = " ".join(SLIMTA_REQUIREMENTS)
    SLIMTA_VENV.mkdir(exist_ok=True)
    with (SLIMTA_VENV / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions build it once
        if stamp.exists() and stamp.read_text(encoding="utf-8") == wanted and python.exists():
            return python
        steps = [
            [sys.executable, "-m", "venv", str(SLIMTA_VENV)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *SLIMTA_REQUIREMENTS],
            [str(python), "-W", "ignore", "-c", "import gevent, slimta.relay.http, slimta.envelope"],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
            except (OSError, subprocess.TimeoutExpired) as exc:
                _unusable(f"cannot build {SLIMTA_VENV} for python-slimta 5.0.5: {step[2:]}: {exc}")
            if done.returncode != 0:
                _unusable(f"cannot build {SLIMTA_VENV} for python-slimta 5.0.5: {step[2:]}: {done.stderr[-2000:]}")
        stamp.write_text(wanted, encoding="utf-8")
    return python


def test_slimta_http_relay_reads_every_outcome(slimta_python: Path, tmp_path: Path) -> None:
    config = tmp_path / "mailrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    path = "/relays/scripted/deliver"
    cases = [
        {"case": "delivered", "path": path, "recipients": ["ok@example.net"]},
        {"case": "550", "path": path, "recipients": ["bad@example.net"]},
        {"case": "450", "path": path, "recipients": ["later@example.net"]},
        {"case": "partial", "path": path, "recipients": ["ok@example.net", "bad@example.net"]},
    ]
    with service(config) as running:
        try:
            done = subprocess.run(  # noqa: S603
                [str(slimta_python), "-W", "ignore", str(CLIENT), running.url, json.dumps(cases), str(ATTEMPT_SECONDS)],
                capture_output=True,
                text=True,
                timeout=len(cases) * ATTEMPT_SECONDS + 20,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"slimta's client did not finish: {exc.stdout!r} {exc.stderr!r}")
        # The JSON body still names the command the failure answered.
        body = httpx.post(
            running.url + path,
            content=b"Subject: x\r\n\r\nx\r\n",
            headers={
                "Content-Type": "message/rfc822",
                "X-Envelope-Sender": "YWxpY2VAZXhhbXBsZS5jb20=",  # alice@example.com
                "X-Envelope-Recipient": "YmFkQGV4YW1wbGUubmV0",  # bad@example.net
            },
        ).json()
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = {o.pop("case"): o for o in map(json.loads, done.stdout.splitlines())}
    diagnosis = f"slimta said {outcomes}; its stderr: {done.stderr[-3000:]}"
    assert outcomes["delivered"] == {"outcome": "returned", "code": "250", "message": "2.0.0 Ok: queued"}, diagnosis
    assert outcomes["550"] == {
        "outcome": "raised",
        "type": "SmtpPermanentRelayError",
        "permanent": True,
        "transient": False,
        "code": "550",
        "message": "5.1.1 <bad@example.net> User unknown",
    }, diagnosis
    assert outcomes["450"] == {
        "outcome": "raised",
        "type": "SmtpTransientRelayError",
        "permanent": False,
        "transient": True,
        "code": "450",
        "message": "4.2.1 Mailbox busy, try again later",
    }, diagnosis
    partial = outcomes["partial"]
    assert partial.pop("message").startswith("4.5.0 Partial delivery: 1 of 2 recipients failed"), diagnosis
    assert partial == {
        "outcome": "raised",
        "type": "SmtpTransientRelayError",
        "permanent": False,
        "transient": True,
        "code": "451",
    }, diagnosis
    assert body["recipients"][0]["reply"]["command"] == "RCPT"
