"""schemathesis against the committed OpenAPI document, with the service running as in production.

Checked: no server error, and every response (status, content type, headers,
body) as documented; endpoints declared as needing a key refuse requests
without one. Not checked: whether schemathesis' idea of a valid address
matches ours (an address's rules do not fit in JSON Schema; they have their
own tests) and unknown header "properties" (HTTP allows any header).
"""

import os
import subprocess
import sys
from pathlib import Path

from tests.servers.mailrelay import ROOT, start_server, wait_ready
from tests.servers.process import stop

KEY = "schemathesis-key-0123456789"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
]
CONFIG = """\
relay:
  blackhole:
    type: blackhole
  refused:
    type: custom
    factory: tests.scripted:factory
    replies:
      bob@example.net: "550 5.1.1 No such user"
mailrelay:
  max_recipients: 20
  max_message_size: 100000
"""


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(tmp_path: Path) -> None:
    config = tmp_path / "mailrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    process, port = start_server(config, env={"MAILRELAY_API_KEYS": KEY})
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        run = subprocess.run(  # noqa: S603
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                str(ROOT / "openapi" / "openapi.json"),
                "--url",
                f"http://127.0.0.1:{port}",
                "--checks",
                ",".join(CHECKS),
                "--max-examples",
                "40",
                "--seed",
                "20261124",
                "--header",
                f"Authorization: Bearer {KEY}",
                "--no-color",
            ],
            cwd=tmp_path,  # schemathesis keeps state in .schemathesis/ under its working directory
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        stop(process)  # type: ignore[arg-type]
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    generated = [line for line in output.splitlines() if "generated" in line]
    assert generated, output[-2000:]
