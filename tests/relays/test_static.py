"""`static` against real servers: aiosmtpd (scripted replies, TLS, AUTH) and Postfix's smtp-sink."""

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from relays.smtp.session import encode_data
from tests.conftest import context, envelope, opened, post_delivery
from tests.servers.mailrelay import start_server, wait_ready
from tests.servers.process import free_port
from tests.servers.raw import Conversation, RawServer, raw_server
from tests.servers.sink import smtp_sink
from tests.servers.smtp import Script, smtp_server, tls_material

#: The envelope stepwise (aiosmtpd offers no PIPELINING by default) and pipelined (RFC 2920).
PIPELINING = pytest.mark.parametrize("pipelining", [False, True], ids=["stepwise", "pipelined"])


def static(port: int, *extra: str, host: str = "127.0.0.1") -> str:
    lines = [f"    {e}" for e in extra]
    return "\n".join(["relay:", "  out:", "    type: static", f"    host: {host}", f"    port: {port}", *lines]) + "\n"


@PIPELINING
async def test_delivers_and_reports_each_recipient(pipelining: bool) -> None:
    message = b"Subject: dots\r\n\r\n.leading dot\r\nbare LF\nend"
    with smtp_server(pipelining=pipelining) as server:
        async with opened(static(server.port)) as relays:
            results = await relays["out"].deliver(
                envelope("bob@example.net", "carol@example.org", message=message), context()
            )
    assert [r.status for r in results] == ["delivered", "delivered"]
    assert results[0].reply.code == 250
    assert results[0].reply.command == "[SEND_DATA]"
    assert results[0].reply.message == "2.0.0 OK queued as TEST"
    assert results[0].host == f"127.0.0.1:{server.port}"
    (received,) = server.received
    assert received.sender == "alice@example.com"
    assert received.recipients == ["bob@example.net", "carol@example.org"]
    # CRLF line ends and dot-stuffing on the wire; the server un-stuffs it.
    assert received.content == b"Subject: dots\r\n\r\n.leading dot\r\nbare LF\r\nend\r\n"


@PIPELINING
def test_mixed_recipients_through_the_api_give_207(make_client: Callable[[str], TestClient], pipelining: bool) -> None:
    script = Script(
        rcpt={"later@example.net": "451 4.3.0 Try again later", "bad@example.net": "550 5.1.1 No such user"}
    )
    with smtp_server(script, pipelining=pipelining) as server:
        client = make_client(static(server.port))
        response = post_delivery(
            client,
            "out",
            ["ok@example.net", "later@example.net", "bad@example.net"],
            sender="a@example.com",
            message="Subject: x\r\n\r\nhi\r\n",
        )
    assert response.status_code == 207
    body = response.json()
    assert [r["status"] for r in body["recipients"]] == ["delivered", "transient_failure", "permanent_failure"]
    assert body["recipients"][2]["reply"] == {
        "code": 550,
        "enhanced_status": "5.1.1",
        "message": "5.1.1 No such user",
        "command": "RCPT",
    }
    assert response.headers["X-Smtp-Reply"] == '451; message="4.3.0 Try again later"'
    assert server.received[0].recipients == ["ok@example.net"]


@PIPELINING
@pytest.mark.parametrize(
    ("script", "code", "command"),
    [
        (Script(mail_reply="451 4.3.2 System not accepting messages"), 451, "MAIL"),
        (Script(mail_reply="553 5.7.1 Sender rejected"), 553, "MAIL"),
        (Script(data_reply="451 4.3.0 Queue full"), 451, "[SEND_DATA]"),
        (Script(data_reply="554 5.6.0 Message rejected"), 554, "[SEND_DATA]"),
    ],
)
async def test_mail_and_data_failures_apply_to_every_accepted_recipient(
    script: Script, code: int, command: str, pipelining: bool
) -> None:
    script.rcpt["refused@example.net"] = "550 5.1.1 No such user"
    with smtp_server(script, pipelining=pipelining) as server:
        async with opened(static(server.port)) as relays:
            results = await relays["out"].deliver(
                envelope("a@example.net", "refused@example.net", "b@example.net"), context()
            )
    codes = [(r.reply.code, r.reply.command) for r in results]
    if command == "MAIL":
        assert codes == [(code, "MAIL")] * 3
    else:
        assert codes == [(code, command), (550, "RCPT"), (code, command)]


@PIPELINING
async def test_a_stalled_server_is_a_bounded_transient_failure(pipelining: bool) -> None:
    with smtp_server(Script(rcpt_delay=5), pipelining=pipelining) as server:
        async with opened(static(server.port, "command_timeout: 0.5")) as relays:
            started = time.monotonic()
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
            elapsed = time.monotonic() - started
    assert result.status == "transient_failure"
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.4.2", "RCPT")
    assert elapsed < 4  # gave up at command_timeout, did not wait for the server
    assert server.received == []


@PIPELINING
async def test_a_connection_dropped_during_data_is_never_delivered(pipelining: bool) -> None:
    with smtp_server(Script(drop_in_data=True), pipelining=pipelining) as server:
        async with opened(static(server.port)) as relays:
            results = await relays["out"].deliver(envelope("bob@example.net", "carol@example.net"), context())
    assert [r.status for r in results] == ["transient_failure"] * 2
    assert results[0].reply.command == "[SEND_DATA]"
    assert "may have been delivered" in results[0].reply.message


async def test_connection_refused_is_transient() -> None:
    async with opened(static(free_port())) as relays:
        (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.4.1", "[CONNECT]")
    assert "refused" in result.reply.message.lower()


async def test_starttls_with_a_verified_certificate(tmp_path: Path) -> None:
    with tls_material(tmp_path) as tls, smtp_server(tls=tls) as server:
        async with opened(static(server.port, f"tls: {{ca_certs: '{tls.ca_file}'}}")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered"
    assert server.received[0].tls


async def test_starttls_failing_verification_is_transient(tmp_path: Path) -> None:
    with tls_material(tmp_path) as tls, smtp_server(tls=tls) as server:
        async with opened(static(server.port, "tls: {}")) as relays:  # system CAs: the test CA is unknown
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.7.5", "STARTTLS")
    assert "CERTIFICATE_VERIFY_FAILED" in result.reply.message
    assert server.received == []


async def test_starttls_required_but_not_offered() -> None:
    with smtp_server() as server:
        async with opened(static(server.port, "tls: {mode: starttls}")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.7.4", "STARTTLS")


async def test_opportunistic_tls(tmp_path: Path) -> None:
    with tls_material(tmp_path) as tls, smtp_server(tls=tls) as with_tls, smtp_server() as plain:
        for server, encrypted in ((with_tls, True), (plain, False)):
            async with opened(static(server.port, "tls: {mode: opportunistic}")) as relays:
                (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
            assert result.status == "delivered"
            assert server.received[0].tls is encrypted


async def test_implicit_tls(tmp_path: Path) -> None:
    with tls_material(tmp_path) as tls, smtp_server(tls=tls, implicit_tls=True) as server:
        async with opened(static(server.port, f"tls: {{mode: implicit, ca_certs: '{tls.ca_file}'}}")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered"
    assert server.received[0].tls


@pytest.mark.parametrize(("password", "status"), [("relay-pass", "delivered"), ("wrong", "transient_failure")])
async def test_auth(password: str, status: str) -> None:
    with smtp_server(auth=True) as server:
        config = static(server.port, f"credentials: {{username: relay-user, password: {password}}}")
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == status
    if status == "delivered":
        assert server.received[0].login == b"relay-user"
    else:  # auth_soft_bounce (the default): a refused login is transient (more in test_postfix_mta.py)
        assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (454, "4.7.8", "AUTH")
        assert server.received == []


async def test_auth_tries_the_next_mechanism_only_when_the_server_refuses_the_mechanism() -> None:
    """504 (mechanism not supported, RFC 4954) to PLAIN: LOGIN next. A 535 would end it (Postfix test)."""
    commands: list[str] = []

    def handler(talk: Conversation, server: RawServer) -> None:
        talk.send("220 raw.test ESMTP")
        talk.expect("EHLO", "250-raw.test\r\n250 AUTH PLAIN LOGIN")
        commands.append(talk.expect("AUTH PLAIN", "504 5.5.4 Unrecognized authentication type"))
        commands.append(talk.expect("AUTH LOGIN", "334 UGFzc3dvcmQ6"))
        commands.append(talk.expect("", "235 2.7.0 Authentication successful"))
        talk.expect("MAIL", "250 2.1.0 OK")
        talk.expect("RCPT", "250 2.1.5 OK")
        talk.expect("DATA", "354 go on")
        talk.read_data()
        talk.send("250 2.0.0 queued")
        talk.expect("QUIT", "221 bye")

    with raw_server(handler) as server:
        config = static(server.port, "credentials: {username: u, password: p}")
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered", result.reply
    assert [c.split()[:2] for c in commands[:2]] == [["AUTH", "PLAIN"], ["AUTH", "LOGIN"]]


def test_smtp_sink_through_the_api(make_client: Callable[[str], TestClient]) -> None:
    with smtp_sink() as sink:
        client = make_client(static(sink.port))
        response = post_delivery(
            client,
            "out",
            ["b@example.net", "c@example.net"],
            sender="a@example.com",
            message="Subject: sink\r\n\r\nhi\r\n",
        )
        assert response.status_code == 200
        assert response.json()["recipients"][0]["host"] == f"127.0.0.1:{sink.port}"
        (dump,) = sink.messages()
    assert "X-Rcpt-Args: <b@example.net>" in dump
    assert "X-Rcpt-Args: <c@example.net>" in dump
    assert "Subject: sink" in dump


async def test_helo_fallback_when_ehlo_is_refused() -> None:
    with smtp_sink("-e") as sink:
        async with opened(static(sink.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered"
    assert any(line.endswith(": HELO localhost\n") for line in sink.log)


async def test_eight_bit_message() -> None:
    message = "Subject: café\r\n\r\nnaïve\r\n".encode()
    with smtp_sink("-8") as without, smtp_sink() as with_8bit:
        async with opened(static(without.port)) as relays:
            (refused,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
        async with opened(static(with_8bit.port)) as relays:
            (sent,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
        dumps = with_8bit.messages()
        assert without.messages() == []
    assert (refused.reply.code, refused.reply.enhanced_status) == (554, "5.6.3")
    assert sent.status == "delivered"
    assert "BODY=8BITMIME" in dumps[0]


async def test_sequential_deliveries_reuse_one_connection() -> None:
    with smtp_sink() as sink:
        async with opened(static(sink.port)) as relays:
            for _ in range(5):
                (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
                assert result.status == "delivered"
        # closed at shutdown with QUIT
        await asyncio.sleep(0.2)
        assert sink.connects == 1
        assert sink.disconnects == 1
        assert any(line.rstrip().endswith(": QUIT") for line in sink.log)
        assert len(sink.messages()) == 5


async def test_concurrent_deliveries_stay_within_concurrent_connections() -> None:
    with smtp_sink() as sink:
        async with opened(static(sink.port, "concurrent_connections: 3")) as relays:
            results = await asyncio.gather(
                *(relays["out"].deliver(envelope(f"r{i}@example.net"), context()) for i in range(30))
            )
        assert all(r[0].status == "delivered" for r in results)
        assert sink.most_at_once <= 3
        assert sink.connects <= 3
        assert len(sink.messages()) == 30


async def test_past_max_waiting_a_delivery_fails_at_once_and_the_others_go_through() -> None:
    # Two connections, three waiting: of ten deliveries to a slow server, five are refused at once
    # (transient, naming the destination, nothing sent) and the other five are delivered in turn.
    with smtp_server(Script(rcpt_delay=0.3)) as server:
        async with opened(static(server.port, "concurrent_connections: 2", "max_waiting: 3")) as relays:
            results = [
                r
                for (r,) in await asyncio.gather(
                    *(relays["out"].deliver(envelope(f"r{i}@example.net"), context()) for i in range(10))
                )
            ]
    refused = [r for r in results if r.status != "delivered"]
    assert len(refused) == 5
    for result in refused:
        assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.4.5", "[CONNECT]")
        assert f"Too many deliveries waiting for 127.0.0.1:{server.port}" in result.reply.message
        assert not result.possibly_delivered
    assert sorted(r.recipients[0] for r in server.received) == sorted(
        r.recipient for r in results if r.status == "delivered"
    )
    assert len(server.received) == 5


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    with smtp_sink("-t", "1") as sink:  # the sink drops connections idle for 1 s
        async with opened(static(sink.port, "idle_timeout: 30")) as relays:
            (first,) = await relays["out"].deliver(envelope("bob@example.net"), context())
            await asyncio.sleep(1.6)
            (second,) = await relays["out"].deliver(envelope("bob@example.net"), context())
        assert (first.status, second.status) == ("delivered", "delivered")
        assert sink.connects == 2


async def test_idle_connections_are_closed_after_idle_timeout() -> None:
    with smtp_sink() as sink:
        async with opened(static(sink.port, "idle_timeout: 0.2")) as relays:
            await relays["out"].deliver(envelope("bob@example.net"), context())
            await asyncio.sleep(0.8)
            assert sink.disconnects == 1  # QUIT sent by the pool, not at shutdown
            await relays["out"].deliver(envelope("bob@example.net"), context())
        await asyncio.sleep(0.2)
        assert sink.connects == 2


async def test_each_idle_connection_expires_idle_timeout_after_its_own_last_use() -> None:
    with smtp_sink() as sink:
        async with opened(static(sink.port, "idle_timeout: 0.6", "concurrent_connections: 2")) as relays:
            out = relays["out"]
            await asyncio.gather(
                out.deliver(envelope("a@example.net"), context()), out.deliver(envelope("b@example.net"), context())
            )
            await asyncio.sleep(0.3)
            await out.deliver(envelope("c@example.net"), context())  # takes the last used; the other stays idle
            await asyncio.sleep(0.45)  # 0.75 s after the burst, 0.45 s after the last use
            assert (sink.connects, sink.disconnects) == (2, 1)
            await asyncio.sleep(0.4)  # 0.85 s after the last use
            assert (sink.connects, sink.disconnects) == (2, 2)


async def test_a_refusing_banner_is_the_reply() -> None:
    with smtp_sink("-r", "CONNECT") as sink:
        async with opened(static(sink.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert (result.reply.code, result.reply.command) == (450, "[BANNER]")
    assert result.status == "transient_failure"


def test_served_by_mailrelay_on_uvloop(tmp_path: Path) -> None:
    """The real service (uvloop underneath, unlike the tests' own loop) relays to smtp-sink."""
    with smtp_sink() as sink:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(static(sink.port))
        process, port = start_server(config)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            for _ in range(3):
                response = httpx.post(
                    f"{url}/relays/out/deliver",
                    json={
                        "sender": "a@example.com",
                        "recipients": ["b@example.net"],
                        "message": "Subject: uv\r\n\r\nhi\r\n",
                    },
                )
                assert response.status_code == 200, response.text
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=15)
        assert process.returncode == 0
        assert len(sink.messages()) == 3
        assert sink.connects == 1
        assert sink.disconnects == 1  # QUIT at shutdown


@pytest.mark.parametrize(
    ("message", "data"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\r\n", b"a\rb\r\n.\r\n"),  # a lone CR stays inside its line
        (b"X: a\r\r\nY: b\r\n\r\nc", b"X: a\r\nY: b\r\n\r\nc\r\n.\r\n"),  # CRs before LF: one line end
        (b"a\r.\r\nb\r.c\r\n", b"a\r..\r\nb\r..c\r\n.\r\n"),  # no CR . CR LF for CR-line-end servers
        (b".a\r\n..b\r\nc.\r\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
        (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
    ],
)
def test_message_data_is_crlf_and_dot_stuffed(message: bytes, data: bytes) -> None:
    assert b"".join(encode_data(message)) == data


async def test_a_cancelled_delivery_never_leaves_its_connection_in_the_pool() -> None:
    script = Script(rcpt_delay=1.0)
    with smtp_server(script) as server:
        async with opened(static(server.port)) as relays:
            task = asyncio.ensure_future(relays["out"].deliver(envelope("bob@example.net"), context()))
            await asyncio.sleep(0.3)  # stalled at RCPT
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            script.rcpt_delay = 0
            (result,) = await relays["out"].deliver(envelope("carol@example.net"), context())
    assert result.status == "delivered"
    assert server.connection_count == 2  # the interrupted connection was closed, not reused
    assert [r.recipients for r in server.received] == [["carol@example.net"]]


async def test_internationalised_addresses_need_smtputf8() -> None:
    recipients = ("ascii@example.net", "用户@例子.广告")
    with smtp_server(smtputf8=True) as utf8, smtp_sink() as sink:  # smtp-sink does not offer SMTPUTF8
        async with opened(static(utf8.port)) as relays:
            offered = await relays["out"].deliver(envelope(*recipients), context())
        async with opened(static(sink.port)) as relays:
            missing = await relays["out"].deliver(envelope(*recipients), context())
        dumps = sink.messages()
    assert [r.status for r in offered] == ["delivered", "delivered"]
    assert "SMTPUTF8" in utf8.received[0].mail_options
    assert utf8.received[0].recipients == list(recipients)
    assert [r.status for r in missing] == ["delivered", "permanent_failure"]
    assert (missing[1].reply.code, missing[1].reply.enhanced_status) == (553, "5.6.7")
    assert len(dumps) == 1
    assert "用户" not in dumps[0]


@pytest.mark.parametrize(
    "message", [b"Subject: s\r\n\r\nCRLF only\r\n", b"Subject: s\n\nbare LF\r\r\nlone\rCR\n"], ids=["crlf", "mixed"]
)
async def test_size_is_declared_when_offered(message: bytes) -> None:
    with smtp_server() as server:  # aiosmtpd offers SIZE 33554432
        async with opened(static(server.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
    assert result.status == "delivered"
    (received,) = server.received
    assert f"SIZE={len(received.content)}" in received.mail_options


async def test_too_many_recipients_with_none_accepted_ends_the_delivery() -> None:
    """452 4.5.3 to every RCPT: no recipient delivered, so no further transaction (each round must
    make progress); the recipients keep the transient 452."""
    mails: list[str] = []

    def handler(talk: Conversation, server: RawServer) -> None:
        talk.send("220 raw.test ESMTP")
        talk.expect("EHLO", "250 raw.test")
        while (line := talk.command()).upper().startswith("MAIL"):
            mails.append(line)
            talk.send("250 2.1.0 OK")
            talk.expect("RCPT", "452 4.5.3 Too many recipients")
            talk.expect("RCPT", "452 4.5.3 Too many recipients")
            talk.expect("RSET", "250 2.0.0 OK")
        talk.send("221 bye")

    with raw_server(handler) as server:
        async with opened(static(server.port)) as relays:
            results = await relays["out"].deliver(envelope("a@example.net", "b@example.net"), context())
    assert [(r.status, r.reply.code) for r in results] == [("transient_failure", 452)] * 2
    assert len(mails) == 1


async def test_bdat_without_pipelining_sends_the_message_as_it_is() -> None:
    """CHUNKING without PIPELINING: MAIL and RCPT one by one, then `BDAT <size> LAST` and exactly
    that many bytes: the message with CRLF line ends, its leading dots not doubled."""
    got: list[bytes] = []

    def handler(talk: Conversation, server: RawServer) -> None:
        talk.send("220 raw.test ESMTP")
        talk.expect("EHLO", "250-raw.test\r\n250 CHUNKING")
        talk.expect("MAIL", "250 2.1.0 OK")
        talk.expect("RCPT", "250 2.1.5 OK")
        command = talk.command()
        got.append(command.encode())
        got.append(talk.stream.read(int(command.split()[1])))
        talk.send("250 2.0.0 queued")
        talk.expect("QUIT", "221 bye")

    message = b"Subject: dots\n\n.leading dot\n..two\n.\nend"
    with raw_server(handler) as server:
        async with opened(static(server.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("a@example.net", message=message), context())
    assert result.status == "delivered", result.reply
    sent = message.replace(b"\n", b"\r\n") + b"\r\n"  # the last line ended, as DATA ends it
    assert got == [b"BDAT %d LAST" % len(sent), sent]


def _broken_starttls(talk: Conversation, server: RawServer) -> None:
    """Offers STARTTLS and answers 220 to it, then speaks no TLS: the handshake fails. The next
    connection (the plaintext fallback) delivers without STARTTLS."""
    talk.send("220 raw.test ESMTP")
    talk.expect("EHLO", "250-raw.test\r\n250 STARTTLS")
    line = talk.command()
    if line.upper() == "STARTTLS":
        talk.send("220 go ahead")
        talk.send("this is not a TLS record")
        return
    assert line.upper().startswith("MAIL"), line
    talk.send("250 2.1.0 OK")
    talk.expect("RCPT", "250 2.1.5 OK")
    talk.expect("DATA", "354 go on")
    talk.read_data()
    talk.send("250 2.0.0 queued in clear text")
    talk.expect("QUIT", "221 bye")


@pytest.mark.parametrize("fallback", [False, True])
async def test_a_failed_opportunistic_handshake_falls_back_to_clear_text_only_when_allowed(fallback: bool) -> None:
    with raw_server(_broken_starttls) as server:
        tls = f"tls: {{mode: opportunistic, plaintext_fallback: {str(fallback).lower()}}}"
        async with opened(static(server.port, tls)) as relays:
            (result,) = await relays["out"].deliver(envelope("a@example.net"), context())
    if fallback:
        assert result.status == "delivered", result.reply
        assert result.security is not None
        assert not result.security.encrypted
        assert server.connections == 2
    else:
        assert (result.reply.code, result.reply.enhanced_status) == (451, "4.7.5")
        assert server.connections == 1


async def test_require_tls_refuses_a_hop_without_tls_before_mail() -> None:
    with smtp_server(Script()) as server:
        async with opened(static(server.port)) as relays:
            env = envelope("a@example.net")
            (result,) = await relays["out"].deliver(dataclasses.replace(env, require_tls=True), context())
    assert (result.status, result.reply.code, result.reply.enhanced_status) == ("permanent_failure", 550, "5.7.10")
    assert server.received == []
