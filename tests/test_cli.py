"""The `mailrelay` command run for real: check-config, openapi, serve as a subprocess."""

import argparse
import base64
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import main, network_exposure, reload_configuration
from app.config import parse_config
from app.lifespan import Runtime, Services
from app.logs import chosen_format
from app.main import openapi_document
from relays.registry import open_relays
from tests.servers.mailrelay import Server, start_server, wait_ready
from tests.servers.process import free_port

ROOT = Path(__file__).resolve().parent.parent
GOOD_YAML = """\
relay:
  outbound:
    type: static
    host: smtp.example.com
    credentials: {username: u, password: do-not-print}
  discard:
    type: blackhole
  scripted:
    type: custom
    factory: tests.scripted:factory
    replies: {"bad@example.net": "550 5.1.1 User unknown"}
mailrelay:
  max_message_size: 2000
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own CLI with test arguments
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_valid(write_config: Callable[..., Path]) -> None:
    path = write_config(GOOD_YAML)
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: valid, 3 relay(s)",
        "outbound: static: SMTP to smtp.example.com:25 (tls: no, auth: yes, 5 connections, 100 waiting)",
        "discard: blackhole: accepts every message and discards it",
        "scripted: custom: custom relay from tests.scripted:factory",
    ]
    assert "do-not-print" not in result.stdout + result.stderr


def test_check_config_masks_as_get_relays_does(write_config: Callable[..., Path]) -> None:
    path = write_config(
        "relay:\n"
        "  hop: {type: http, url: 'https://hop:pw@with-at@relay.example/deliver?token=tok-1'}\n"
        "  archive: {type: pipe, args: [/bin/deliver, --password=pw-2, -p, pw-3, '{recipient}']}\n"
        "  local: {type: maildrop, extra_args: [--token, tok-4]}\n"
        "  broken: {type: http, url: 'https://hop:pw/5@relay.example/'}\n"
    )
    result = run("check-config", str(path))
    assert result.returncode == 1
    broken = write_config(path.read_text().replace("  broken:", "  # broken:"), name="fixed.yaml")
    fixed = run("check-config", str(broken))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.splitlines()[1:] == [
        "hop: http: HTTP POST to https://***@relay.example/deliver?token=***",
        "archive: pipe: runs /bin/deliver --password=*** -p *** {recipient} per recipient",
        "local: maildrop: maildrop delivery with maildrop --token ***",
    ]
    for output in (result.stdout + result.stderr, fixed.stdout + fixed.stderr):
        for secret in ("pw@with-at", "with-at", "tok-1", "pw-2", "pw-3", "tok-4", "pw/5", "'pw'"):
            assert secret not in output, output
    assert "relay.broken.url: not a valid URL: its host or port cannot be read" in result.stderr


def test_check_config_invalid_lists_every_problem(write_config: Callable[..., Path]) -> None:
    path = write_config("edge: {}\nrelay:\n  outbound: {type: static, host: h, port: abc}\n  x: {type: nope}\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "warning: edge: section not used by mailrelay; ignored"
    assert lines[1].startswith("relay.outbound.port: Input should be a valid integer")
    assert lines[2].startswith("relay.x.type: unknown relay type 'nope'; valid types: blackhole, custom")
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("relay: [\n", "invalid YAML"), ("relay: {}\n", "relay: missing or empty")],
)
def test_check_config_file_problems_are_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_uses_the_environment_then_the_default(write_config: Callable[..., Path]) -> None:
    path = write_config("relay:\n  env_relay: {type: blackhole}\n")
    assert "env_relay: blackhole" in run("check-config", env={"MAILRELAY_CONFIG": str(path)}).stdout
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "app", "check-config"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.stdout.splitlines()[0] == "<embedded default>: valid, 1 relay(s)"


@pytest.mark.parametrize("command", [[], ["serve"], ["check-config"], ["openapi"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: mailrelay" in capsys.readouterr().out


def test_committed_openapi_document_is_current() -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert openapi_document() == committed, (
        "openapi/openapi.json is stale: run `mailrelay openapi --output openapi/openapi.json`"
    )


def test_openapi_command_prints_the_document(tmp_path: Path) -> None:
    # The document does not depend on the configuration, even a broken one.
    result = run("openapi", env={"MAILRELAY_CONFIG": str(tmp_path / "missing.yaml")})
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["paths"]["/relays/{name}/deliver"]["post"]["operationId"] == "deliver"
    assert set(document["paths"]["/relays/{name}/deliver"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "message/rfc822",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("serve") / "mailrelay.yaml"
    config.write_text(GOOD_YAML)
    process, port = start_server(config)
    served = Server(process, port)
    try:
        wait_ready(served.url, process)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert process.returncode == 0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_served_json_and_raw_forms(server: Server) -> None:
    message = "Subject: e2e\r\n\r\nhello\r\n"
    response = httpx.post(
        f"{server.url}/relays/scripted/deliver",
        json={"sender": "a@example.com", "recipients": ["ok@example.net", "bad@example.net"], "message": message},
    )
    assert response.status_code == 207
    assert [r["status"] for r in response.json()["recipients"]] == ["delivered", "permanent_failure"]
    assert response.headers["x-smtp-reply"] == '550; message="5.1.1 User unknown"'
    response = httpx.post(
        f"{server.url}/relays/discard/deliver",
        content=message.encode(),
        headers={
            "Content-Type": "message/rfc822",
            "X-Envelope-Sender": b64("a@example.com"),
            "X-Envelope-Recipient": b64("b@example.net"),
        },
    )
    assert response.status_code == 200
    assert response.json()["status"] == "delivered"


def test_served_relays_hide_secrets(server: Server) -> None:
    response = httpx.get(f"{server.url}/relays")
    assert response.status_code == 200
    assert "do-not-print" not in response.text
    assert [r["name"] for r in response.json()["relays"]] == ["outbound", "discard", "scripted"]


def test_served_size_limit_with_a_chunked_body(server: Server) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(
        f"{server.url}/relays/discard/deliver",
        content=body(),
        headers={
            "Content-Type": "message/rfc822",
            "X-Envelope-Sender": b64("a@example.com"),
            "X-Envelope-Recipient": b64("b@example.net"),
        },
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


def test_serve_refuses_a_bad_custom_factory_in_one_line(write_config: Callable[..., Path]) -> None:
    path = write_config("relay:\n  plugin: {type: custom, factory: 'tests.scripted:not_a_relay'}\n")
    process, _ = start_server(path)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert 'relay.plugin.factory: factory "tests.scripted:not_a_relay" returned object, which is not a relay' in stderr
    assert "Traceback" not in stderr


def test_serve_refuses_an_invalid_config(write_config: Callable[..., Path]) -> None:
    process, _ = start_server(write_config("relay:\n  o: {type: static}\n"))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert stderr.strip() == "relay.o.host: Field required"


def test_serve_without_config_runs_the_embedded_blackhole() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    port = free_port()
    # The installed console script, as a user runs it.
    process = subprocess.Popen(  # noqa: S603
        [str(Path(sys.executable).parent / "mailrelay"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        assert [r["name"] for r in httpx.get(f"{url}/relays").json()["relays"]] == ["blackhole"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    assert process.returncode == 0


def test_openapi_output_that_cannot_be_written(tmp_path: Path) -> None:
    result = run("openapi", "--output", str(tmp_path / "no" / "such" / "dir.json"))
    assert result.returncode == 1
    assert "cannot write" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_port_out_of_range() -> None:
    result = run("serve", "--port", "70000")
    assert result.returncode == 2
    assert "'70000' is not a port number from 1 to 65535" in result.stderr


def test_auto_log_format_is_text_on_a_terminal_only() -> None:
    controller, terminal_fd = os.openpty()
    with open(terminal_fd, "w") as terminal, open(os.devnull, "w") as file:
        assert chosen_format("auto", terminal) == "text"
        assert chosen_format("auto", file) == "json"
        assert chosen_format("json", terminal) == "json"
        assert chosen_format("text", file) == "text"
    os.close(controller)


@pytest.mark.parametrize(
    ("host", "keys", "flag", "setting", "expected"),
    [
        ("127.0.0.1", False, False, False, "safe"),
        ("::1", False, False, False, "safe"),
        ("0.0.0.0", True, False, False, "safe"),  # noqa: S104
        ("0.0.0.0", False, True, False, "insecure"),  # noqa: S104
        ("0.0.0.0", False, False, True, "insecure"),  # noqa: S104
        ("0.0.0.0", False, False, False, "refused"),  # noqa: S104
        ("mail.example.com", False, False, False, "refused"),
    ],
)
def test_the_loopback_rule(host: str, keys: bool, flag: bool, setting: bool, expected: str) -> None:
    auth: dict[str, object] = {"insecure_allow_unauthenticated": setting}
    if keys:
        auth["keys"] = [{"name": "k", "sha256": "a" * 64}]
    text = f"relay:\n  a: {{type: blackhole}}\nmailrelay:\n  auth: {json.dumps(auth)}\n"
    assert network_exposure(parse_config(text, "<t>").config, host, flag) == expected


async def test_a_reload_follows_the_loopback_rule(
    write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    first = parse_config("relay:\n  first: {type: blackhole}\n", "<t>").config
    services = Services(Runtime.build(first, await open_relays(first)))
    path = write_config("relay:\n  second: {type: blackhole}\n")
    public = argparse.Namespace(config=str(path), host="0.0.0.0", insecure_allow_unauthenticated=False)  # noqa: S104
    try:
        with caplog.at_level(logging.ERROR, logger="mailrelay"):
            await reload_configuration(services, public)
        assert list(services.current.relays) == ["first"]
        assert "mailrelay.auth.keys: no API key, and the service listens on 0.0.0.0" in caplog.text
        await reload_configuration(services, argparse.Namespace(**{**vars(public), "host": "127.0.0.1"}))
        assert list(services.current.relays) == ["second"]
        path.write_text("relay:\n  third: {type: blackhole}\n")
        await reload_configuration(
            services, argparse.Namespace(**{**vars(public), "insecure_allow_unauthenticated": True})
        )
        assert list(services.current.relays) == ["third"]
    finally:
        await services.aclose()
        gc.unfreeze()  # a reload freezes the heap, as in the service; not this test process's


def _serve_slow_start(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """mailrelay serving a relay that takes a second to build, once its factory has been called."""
    marker = tmp_path / "factory-called"
    config = tmp_path / "mailrelay.yaml"
    config.write_text(
        "relay:\n  slow:\n    type: custom\n    factory: tests.slow_start:factory\n"
        f"    marker: {json.dumps(str(marker))}\n    seconds: 1\n"
    )
    process, port = start_server(config, {})
    for _ in range(300):
        if marker.exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1]
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_relays_are_built_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    process, _ = _serve_slow_start(tmp_path)
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_a_sighup_while_relays_are_built_reloads_once_started(tmp_path: Path) -> None:
    process, url = _serve_slow_start(tmp_path)
    try:
        process.send_signal(signal.SIGHUP)
        wait_ready(url, process)
        for _ in range(100):
            if 'mailrelay_config_reloads_total{result="success"} 1.0' in httpx.get(f"{url}/metrics").text:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no reload within 10 s of start-up")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
