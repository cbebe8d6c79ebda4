"""`mailrelay send` and `sendmail`, run as real commands against a running `mailrelay serve` and an SMTP
sink that answers per recipient: what arrives, and the exit statuses scripts and cron rely on."""

import email
import email.policy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.mailrelay import ROOT, Service, service
from tests.servers.smtp import Script, SmtpServer, smtp_server

SCRIPT = Script(
    rcpt={
        "temp@example.net": "451 4.3.0 mailbox busy, try later",
        "perm@example.net": "550 5.1.1 no such user",
        "policy@example.net": "554 5.7.1 refused by policy",
    }
)
KEY = "send-cli-test-key-0001"


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpServer]:
    with smtp_server(SCRIPT) as server:
        yield server


@pytest.fixture(scope="module")
def relay(sink: SmtpServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    config = tmp_path_factory.mktemp("send") / "mailrelay.yaml"
    config.write_text(f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {sink.port}}}\n", encoding="utf-8")
    with service(config, {"MAILRELAY_API_KEYS": KEY}) as running:
        yield running


def client_env(relay: Service, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    return {**env, "MAILRELAY_URL": relay.url, "MAILRELAY_RELAY": "out", "MAILRELAY_API_KEY": KEY, **extra}


def mailrelay(args: list[str], env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", *args], cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=60
    )


def received_by(sink: SmtpServer, recipient: str) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(r.content, policy=email.policy.default)
        for r in sink.received
        if recipient in r.recipients
    ]


def test_send_builds_the_message_and_reports_delivered(relay: Service, sink: SmtpServer, tmp_path: Path) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Grüße, <b>Bob</b></p>", encoding="utf-8")
    attachment = tmp_path / "data.bin"
    attachment.write_bytes(bytes(range(256)) * 4)
    done = mailrelay(
        [
            "send",
            "--from",
            "Änne Example <anne@example.com>",
            "--to",
            "bob@example.net",
            "--bcc",
            "carol@example.net",
            "--subject",
            "Grüße aus Köln",
            "--body",
            "Hallo Bob",
            "--html-file",
            str(html),
            "--attach",
            str(attachment),
        ],
        client_env(relay),
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout.decode()
    assert "bob@example.net" in table
    assert "carol@example.net" in table
    assert table.count("delivered") == 3  # two recipients and the summary
    [message] = received_by(sink, "carol@example.net")
    assert message["Subject"] == "Grüße aus Köln"
    assert message["From"].addresses[0].display_name == "Änne Example"
    assert message["Bcc"] is None
    assert message["Message-ID"]
    assert message["Date"]
    assert message.get_body(("plain",)).get_content().strip() == "Hallo Bob"  # type: ignore[union-attr]
    assert "Grüße" in message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "data.bin"
    assert part.get_content() == attachment.read_bytes()


@pytest.mark.parametrize(
    ("recipients", "status"),
    [
        (["temp@example.net"], 75),
        (["ok@example.net", "temp@example.net"], 75),
        (["perm@example.net"], 67),
        (["perm@example.net", "policy@example.net"], 69),
        (["ok@example.net", "perm@example.net"], 67),
    ],
)
def test_send_exit_status_says_transient_or_permanent(relay: Service, recipients: list[str], status: int) -> None:
    to = [arg for r in recipients for arg in ("--to", r)]
    done = mailrelay(["send", "--json", "--from", "a@example.com", *to, "--body", "x"], client_env(relay))
    assert done.returncode == status, done.stderr
    answer = json.loads(done.stdout)
    assert [r["recipient"] for r in answer["recipients"]] == recipients


def test_send_raw_from_standard_input(relay: Service, sink: SmtpServer) -> None:
    raw = b"From: Raw <raw@example.com>\r\nTo: raw@example.net\r\nSubject: raw one\r\n\r\n\xe2\x9c\x93 8-bit\r\n"
    done = mailrelay(["send", "--raw", "-", "--to", "raw@example.net"], client_env(relay), stdin=raw)
    assert done.returncode == 0, done.stderr
    [received] = [r for r in sink.received if "raw@example.net" in r.recipients]
    assert received.sender == "raw@example.com"
    assert received.content.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


def test_send_refusals_before_delivery(relay: Service) -> None:
    body = ["--from", "a@example.com", "--to", "ok@example.net", "--body", "x"]
    wrong_key = mailrelay(["send", *body], client_env(relay, MAILRELAY_API_KEY="not-the-key-at-all"))
    assert wrong_key.returncode == 77
    assert b"401" in wrong_key.stdout
    assert mailrelay(["send", "--relay", "nope", *body], client_env(relay)).returncode == 78
    assert mailrelay(["send", "--to", "ok@example.net", "--body", "x"], client_env(relay)).returncode == 64
    down = mailrelay(["send", *body], client_env(relay, MAILRELAY_URL="http://127.0.0.1:9"))
    assert down.returncode == 75
    assert b"nothing was sent" in down.stderr


HEREDOC = """\
set -eu
sendmail -t <<'EOF'
From: cron@example.com
To: Ops <ops@example.net>
Cc: temp-ok@example.net
Bcc: audit@example.net
Subject: nightly report

all good
.
this line stays: -t alone still stops at a lone dot, so it is not sent
EOF
echo body | sendmail -FCronDaemon -i -B8BITMIME -oem root@example.net
"""


@pytest.fixture
def sendmail_on_path(tmp_path: Path) -> Path:
    """A `sendmail` program as the console script makes it (argv[0] is `sendmail`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "sendmail"
    program.write_text(
        f"#!{sys.executable}\nimport sys\nfrom app.sendmail import main\nsys.exit(main())\n", encoding="utf-8"
    )
    program.chmod(0o755)
    return bin_dir


def bash(script: str, env: dict[str, str], bin_dir: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, timeout=60)  # noqa: S603, S607


def test_sendmail_cron_style(relay: Service, sink: SmtpServer, sendmail_on_path: Path) -> None:
    done = bash(HEREDOC, client_env(relay), sendmail_on_path)
    assert done.returncode == 0, done.stderr
    [report] = received_by(sink, "audit@example.net")
    [envelope] = [r for r in sink.received if "audit@example.net" in r.recipients]
    assert envelope.recipients == ["ops@example.net", "temp-ok@example.net", "audit@example.net"]
    assert envelope.sender == "cron@example.com"
    assert report["Bcc"] is None
    assert report["Subject"] == "nightly report"
    assert report.get_content().strip() == "all good"
    [cron] = received_by(sink, "root@example.net")
    assert cron["From"].addresses[0].display_name == "CronDaemon"
    assert cron["Message-ID"]
    assert cron["Date"]
    assert cron.get_content().strip() == "body"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("To: ok@example.net\n", 0),
        ("To: temp@example.net, ok@example.net\n", 75),
        ("To: perm@example.net\n", 67),
        ("To: policy@example.net\n", 69),
        ("Subject: nobody\n", 64),
    ],
)
def test_sendmail_exit_codes(relay: Service, headers: str, status: int) -> None:
    message = f"From: app@example.com\n{headers}\nbody\n".encode()
    done = mailrelay(["sendmail", "-t", "-oi"], client_env(relay), stdin=message)
    assert done.returncode == status, done.stderr
    if status in (75, 67, 69):
        assert b"sendmail: " in done.stderr


def test_sendmail_configuration(relay: Service, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(KEY + "\n", encoding="utf-8")
    config = tmp_path / "sendmail.conf"
    config.write_text(
        f"# mailrelay's sendmail\nurl {relay.url}\nrelay = out\napi_key_file {key}\nsender app@example.com\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    message = b"Subject: configured\n\nbody\n"
    done = mailrelay(["sendmail", "-C", str(config), "ok@example.net"], env, stdin=message)
    assert done.returncode == 0, done.stderr
    via_env = mailrelay(["sendmail", "ok@example.net"], {**env, "MAILRELAY_SENDMAIL_CONFIG": str(config)}, message)
    assert via_env.returncode == 0, via_env.stderr
    # Nothing configured: EX_CONFIG; a configuration file that is not there: EX_CONFIG.
    assert (
        mailrelay(
            ["sendmail", "ok@example.net"], {**env, "MAILRELAY_SENDMAIL_CONFIG": "/nonexistent"}, message
        ).returncode
        == 78
    )
    config.write_text("url\n", encoding="utf-8")
    assert mailrelay(["sendmail", "-C", str(config), "ok@example.net"], env, stdin=message).returncode == 78
    assert mailrelay(["sendmail", "-bs"], env, stdin=b"").returncode == 64


def test_sendmail_null_sender(relay: Service, sink: SmtpServer) -> None:
    message = b"From: MAILER-DAEMON@example.com\nSubject: bounce\n\nundeliverable\n"
    done = mailrelay(["sendmail", "-f", "<>", "-i", "bounce@example.net"], client_env(relay), stdin=message)
    assert done.returncode == 0, done.stderr
    [received] = [r for r in sink.received if "bounce@example.net" in r.recipients]
    assert received.sender == "<>"  # the null reverse-path, as aiosmtpd records it


def test_sendmail_configuration_values_keep_their_equals_and_hash_signs(tmp_path: Path) -> None:
    """`key value` lines: a value's own `=` (base64 keys end with it, URLs carry it) and a `#` inside it
    are kept; `key = value` and `#` comments still work. The first `=` anywhere on the line was taken
    for the separator (`api_key c2VjcmV0==` became `c2VjcmV0`, a 401) and `#` cut any value."""
    from app.sendmail import load_config

    config = tmp_path / "sendmail.conf"
    config.write_text(
        "# comment\n"
        "api_key c2VjcmV0#x/+==   # the key\n"
        "url http://relay.test:8080/base?a=b\n"
        "relay = out\n"
        "sender=app@example.com\n",
        encoding="utf-8",
    )
    assert load_config(config, {}) == {
        "api_key": "c2VjcmV0#x/+==",
        "url": "http://relay.test:8080/base?a=b",
        "relay": "out",
        "sender": "app@example.com",
    }
