"""`pipe` with small scripts written by the tests: outcomes, macros, timeouts, hostile recipients."""

import asyncio
import os
import shutil
import stat
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from fastapi.testclient import TestClient

from app.config import parse_config
from schemas.config import ConfigError
from schemas.delivery import ClientInfo, Envelope
from tests.conftest import context, envelope, opened, post_delivery
from tests.servers.process import traversable_tmpdir


def script(tmp_path: Path, body: str, name: str = "deliver.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def pipe(*args: str, extra: str = "") -> str:
    quoted = ", ".join(f"'{a}'" for a in args)
    return f"relay:\n  p:\n    type: pipe\n    args: [{quoted}]\n{textwrap.indent(extra, '    ')}"


@pytest.mark.parametrize(
    ("body", "status", "code", "enhanced", "text"),
    [
        ("cat > /dev/null; exit 0", "delivered", 250, "2.0.0", "2.0.0 Delivered"),
        ("echo 'queue full'; exit 75", "transient_failure", 451, "4.3.0", "4.3.0 queue full"),
        ("exit 71", "transient_failure", 451, "4.3.0", "4.3.0 /"),
        ("echo nope >&2; exit 1", "permanent_failure", 554, "5.3.0", "5.3.0 nope"),
        ("exit 77", "permanent_failure", 554, "5.3.0", "(permission denied)"),
        ("echo '5.1.1 no such mailbox'; exit 75", "permanent_failure", 550, "5.1.1", "5.1.1 no such mailbox"),
        ("echo '4.2.2 mailbox full'; exit 1", "transient_failure", 451, "4.2.2", "4.2.2 mailbox full"),
        ("kill -TERM $$", "transient_failure", 451, "4.3.0", "killed by signal 15"),
    ],
)
async def test_exit_status_and_text_decide(
    tmp_path: Path, body: str, status: str, code: int, enhanced: str, text: str
) -> None:
    async with opened(pipe(str(script(tmp_path, body)))) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert (result.status, result.reply.code, result.reply.enhanced_status) == (status, code, enhanced)
    assert text in result.reply.message
    assert result.reply.command == "[PIPE]"


async def test_error_pattern_picks_the_text(tmp_path: Path) -> None:
    body = "echo 'noise before'; echo 'error: 5.7.1 relaying denied' >&2; exit 1"
    async with opened(pipe(str(script(tmp_path, body)), extra="error_pattern: 'error: (.*)'\n")) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert (result.reply.code, result.reply.enhanced_status, result.reply.message) == (
        550,
        "5.7.1",
        "5.7.1 relaying denied",
    )


async def test_every_macro_is_one_argument(tmp_path: Path) -> None:
    out = tmp_path / "args"
    record = script(tmp_path, f'for a in "$@"; do printf "%s\\n" "$a" >> {out}; done; cat > {tmp_path}/message')
    macros = [
        "{sender}",
        "{recipient}",
        "{message_id}",
        "{client_ip}",
        "{client_host}",
        "{client_ehlo}",
        "{client_protocol}",
        "{client_auth}",
    ]
    client = ClientInfo(
        ip="192.0.2.1", host="client.example.com", ehlo="helo.example.com", protocol="ESMTPA", auth="alice"
    )
    env = Envelope(
        sender="a@example.com",
        recipients=['"john doe; rm -rf /"@example.net'],
        message=b"Message-Id: <m1@example.com>\r\n\r\nbody\r\n",
        client=client,
    )
    async with opened(pipe(str(record), "--", *macros, "x{recipient}y")) as relays:
        (result,) = await relays["p"].deliver(env, context())
    assert result.status == "delivered"
    assert out.read_text().splitlines() == [
        "--",
        "a@example.com",
        '"john doe; rm -rf /"@example.net',
        "<m1@example.com>",
        "192.0.2.1",
        "client.example.com",
        "helo.example.com",
        "ESMTPA",
        "alice",
        'x"john doe; rm -rf /"@example.netY'.replace("Y", "y"),
    ]
    assert (tmp_path / "message").read_bytes() == env.message


async def test_a_recipient_starting_with_a_dash_is_never_an_option(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = f"touch {marker}"
    async with opened(pipe(str(script(tmp_path, body)), "{recipient}")) as relays:
        (refused,) = await relays["p"].deliver(envelope("-rf@example.net"), context())
    assert (refused.status, refused.reply.code, refused.reply.enhanced_status) == ("permanent_failure", 553, "5.1.3")
    assert not marker.exists()
    async with opened(pipe(str(script(tmp_path, body)), "--", "{recipient}")) as relays:
        (allowed,) = await relays["p"].deliver(envelope("-rf@example.net"), context())
    assert allowed.status == "delivered"  # after "--" it is an operand


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = f"sleep 30 & echo $! > {pids}; sleep 30"
    async with opened(pipe(str(script(tmp_path, body)), extra="timeout: 0.5\n")) as relays:
        started = time.monotonic()
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
        elapsed = time.monotonic() - started
    assert (result.status, result.reply.code, result.reply.enhanced_status) == ("transient_failure", 451, "4.4.2")
    assert elapsed < 10
    child = int(pids.read_text())
    await asyncio.sleep(0.2)
    assert not _running(child)  # the forked child is gone too (at most a zombie left for init to reap)


async def test_a_missing_or_unrunnable_command(tmp_path: Path) -> None:
    not_executable = tmp_path / "plain.txt"
    not_executable.write_text("x")
    for command, reason in ((str(tmp_path / "nope"), "No such file"), (str(not_executable), "Permission denied")):
        async with opened(pipe(command)) as relays:
            (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
        assert (result.status, result.reply.code, result.reply.enhanced_status) == ("transient_failure", 451, "4.3.5")
        assert reason in result.reply.message


async def test_output_is_capped(tmp_path: Path) -> None:
    body = "head -c 10000000 /dev/zero | tr '\\0' x; exit 1"
    async with opened(pipe(str(script(tmp_path, body)))) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert result.status == "permanent_failure"
    assert len(result.reply.message) < 1000


def test_mixed_outcomes_through_the_api(tmp_path: Path, make_client: Callable[..., TestClient]) -> None:
    body = 'case "$1" in good*) cat >/dev/null; exit 0;; later*) echo "4.2.1 busy"; exit 1;; *) echo "5.1.1 unknown"; exit 1;; esac'
    client = make_client(pipe(str(script(tmp_path, body)), "{recipient}"))
    response = post_delivery(
        client,
        "p",
        ["good@x.test", "later@x.test", "bad@x.test"],
        sender="a@example.com",
        message="Subject: p\r\n\r\nhi\r\n",
    )
    assert response.status_code == 207
    assert [(r["status"], r["reply"]["enhanced_status"]) for r in response.json()["recipients"]] == [
        ("delivered", "2.0.0"),
        ("transient_failure", "4.2.1"),
        ("permanent_failure", "5.1.1"),
    ]


async def test_concurrent_processes_are_bounded(tmp_path: Path) -> None:
    log = tmp_path / "log"
    body = f"echo start >> {log}; sleep 0.3; echo end >> {log}"
    async with opened(pipe(str(script(tmp_path, body)), extra="concurrent_processes: 2\n")) as relays:
        results = await relays["p"].deliver(envelope(*(f"r{i}@x.test" for i in range(6))), context())
    assert all(r.status == "delivered" for r in results)
    running = most = 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        most = max(most, running)
    assert most == 2


def test_unknown_macros_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match=r"relay.p.args\[1\]: unknown macro \{rcpt\}"):
        parse_config(pipe("/bin/cat", "{rcpt}"), "<test>")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _world_readable_script(body: str) -> tuple[Path, Path]:
    directory = traversable_tmpdir("pipe")  # pytest's tmp_path is 0700: nobody could not reach it
    out = directory / "out"
    out.touch()
    out.chmod(0o666)
    command = script(directory, body.replace("OUT", str(out)))
    command.chmod(0o755)
    return command, out


async def test_cwd_env_and_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a command as another user needs root (CI runs as root)")
    command, out = _world_readable_script('echo "$(pwd) $(id -u) $GREETING ${HOME:-nohome}" > OUT')
    extra = "cwd: /\nenv: {GREETING: hello}\nuser: nobody\n"
    async with opened(pipe(str(command), extra=extra)) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered", result.reply
    assert out.read_text().split() == ["/", "65534", "hello", "nohome"]  # exactly the configured environment
    shutil.rmtree(out.parent)


async def test_an_unknown_user_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"relay.p.user: no such user: no-such-user-here"):
        async with opened(pipe("/bin/cat", extra="user: no-such-user-here\n")):
            pass


async def test_a_hostile_message_id_stays_one_harmless_argument(tmp_path: Path) -> None:
    out = tmp_path / "args"
    record = script(tmp_path, f'for a in "$@"; do printf "[%s]\\n" "$a" >> {out}; done')
    message = b"Message-Id: <a\x00b;$(reboot)>\r\n folded\r\n\r\nbody\r\n"
    async with opened(pipe(str(record), "--", "{message_id}")) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net", message=message), context())
    assert result.status == "delivered"
    assert out.read_text().splitlines() == ["[--]", "[<ab;$(reboot)> folded]"]


async def test_a_dash_from_any_macro_is_caught(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = str(script(tmp_path, f"touch {marker}"))
    async with opened(pipe(command, "{client_ehlo}{recipient}")) as relays:
        (refused,) = await relays["p"].deliver(envelope("-oX@x.test"), context())
    assert (refused.reply.code, refused.reply.enhanced_status) == (553, "5.1.3")
    assert not marker.exists()


def test_no_macro_may_choose_the_program() -> None:
    with pytest.raises(ConfigError, match=r"relay.p.args: .*must not contain a macro"):
        parse_config(pipe("/usr/lib/handlers/{recipient}", "x"), "<test>")


@pytest.mark.parametrize(
    ("pattern", "output", "text"),
    [("fatal(: (.*))?", "fatal", "5.3.0 fatal"), ("fatal: (.*)", "fatal: disk gone", "5.3.0 disk gone")],
)
async def test_error_pattern_groups(tmp_path: Path, pattern: str, output: str, text: str) -> None:
    command = str(script(tmp_path, f"echo '{output}'; exit 1"))
    async with opened(pipe(command, extra=f"error_pattern: '{pattern}'\n")) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert result.reply.message == text


async def test_a_daemon_holding_the_output_open_does_not_hide_the_exit(tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    # The child leaves the process group and keeps stdout open; the command itself succeeded.
    body = f"cat > /dev/null; setsid sh -c 'echo $$ > {pids}; exec sleep 30' & exit 0"
    async with opened(pipe(str(script(tmp_path, body)), extra="timeout: 5\n")) as relays:
        started = time.monotonic()
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
        elapsed = time.monotonic() - started
    os.kill(int(pids.read_text()), 9)
    assert result.status == "delivered"
    assert elapsed < 4


async def test_the_wait_for_a_process_slot_is_bounded(tmp_path: Path) -> None:
    command = str(script(tmp_path, "cat > /dev/null; sleep 1"))
    async with opened(pipe(command, extra="timeout: 1.5\nconcurrent_processes: 1\n")) as relays:
        results = await relays["p"].deliver(envelope(*(f"r{i}@x.test" for i in range(4))), context())
    assert results[0].status == "delivered"
    waited = [r for r in results if r.reply.enhanced_status == "4.4.2"]
    assert waited
    assert "a free process slot" in waited[0].reply.message


async def test_the_service_environment_is_not_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_SECRET", "s3cr3t")
    out = tmp_path / "env"
    async with opened(pipe(str(script(tmp_path, f"env > {out}")))) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered"
    names = {line.split("=", 1)[0] for line in out.read_text().splitlines()}
    assert "SERVICE_SECRET" not in names
    assert {"PATH", "HOME", "USER"} <= names


async def test_control_characters_never_reach_the_reply(tmp_path: Path) -> None:
    command = str(script(tmp_path, "printf 'ok\\033[31m\\000x'; exit 1"))
    async with opened(pipe(command)) as relays:
        (result,) = await relays["p"].deliver(envelope("bob@example.net"), context())
    assert result.reply.message.isprintable()


async def test_a_cancelled_delivery_kills_its_command(tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    command = str(script(tmp_path, f"echo $$ > {pids}; exec sleep 30"))
    async with opened(pipe(command)) as relays:
        task = asyncio.ensure_future(relays["p"].deliver(envelope("bob@example.net"), context()))
        await asyncio.sleep(0.5)  # the command has started by then
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(0.2)
    assert not _running(int(pids.read_text()))


async def test_the_suite_runs_on_uvloop_like_the_service() -> None:
    # Subprocess options differ between loops; a relay tested on another loop can fail in production.
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
