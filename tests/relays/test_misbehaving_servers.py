"""Servers out of protocol or too slow, written line by line: nothing may count as delivered that was
not, and nothing mailrelay gave up on may still reach the server."""

import asyncio
import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from relays.smtp.pool import SmtpPool
from relays.smtp.session import Destination, SessionSettings, SmtpSession
from schemas.relay_options import StaticOptions
from tests.conftest import context, envelope, opened, post_delivery
from tests.servers.raw import Conversation, RawServer, raw_server


def relay(port: int, *extra: str, kind: str = "static") -> str:
    lines = [f"    {e}" for e in extra]
    return (
        "\n".join(["relay:", "  out:", f"    type: {kind}", "    host: 127.0.0.1", f"    port: {port}", *lines]) + "\n"
    )


async def test_data_that_outlasts_data_timeout_is_cut_off_not_delivered() -> None:
    def slow_reader(conv: Conversation, server: RawServer) -> None:
        conv.greet_and_take_envelope(1)
        conv.expect("DATA", "354 go ahead")
        server.data_received.append(conv.read_data(delay=0.05, chunk=16384))

    message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000  # 8 MB
    with raw_server(slow_reader) as server:
        async with opened(relay(server.port, "data_timeout: 0.5")) as relays:
            started = time.monotonic()
            (result,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
            elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
    assert not server.errors, server.errors
    assert result.status == "transient_failure"
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.4.2", "[SEND_DATA]")
    assert elapsed < 5
    ((received, complete),) = server.data_received
    assert not complete  # the connection was aborted: the rest of the message never went out
    assert received < len(message)


async def test_unexpected_2xx_replies_are_never_a_delivery() -> None:
    def data_250(conv: Conversation, server: RawServer) -> None:
        conv.greet_and_take_envelope(1)
        conv.expect("DATA", "250 2.0.0 ok but no 354")
        conv.command()

    def ehlo_220(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "220 hello?")
        conv.command()

    for handler, command in ((data_250, "DATA"), (ehlo_220, "EHLO")):
        with raw_server(handler) as server:
            async with opened(relay(server.port)) as relays:
                (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
        assert result.status == "transient_failure", (command, result)
        assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (451, "4.5.0", command)


async def test_mail_answered_with_any_2xx_goes_on() -> None:
    def mail_252(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250 raw.test")
        conv.expect("MAIL", "252 2.1.0 fine")
        conv.expect("RCPT", "250 2.1.5 OK")
        conv.expect("DATA", "354 go")
        server.data_received.append(conv.read_data())
        conv.send("250 2.0.0 queued")
        conv.expect("QUIT", "221 bye")

    with raw_server(mail_252) as server:
        async with opened(relay(server.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered"
    assert server.data_received[0][1]


async def test_lmtp_replies_before_a_lost_connection_stand() -> None:
    def one_reply_then_close(conv: Conversation, server: RawServer) -> None:
        conv.greet_and_take_envelope(3, lmtp=True)
        conv.expect("DATA", "354 go")
        server.data_received.append(conv.read_data())
        conv.send("250 2.0.0 <a@x.test> saved")

    with raw_server(one_reply_then_close) as server:
        async with opened(relay(server.port, kind="lmtp")) as relays:
            results = await relays["out"].deliver(envelope("a@x.test", "b@x.test", "c@x.test"), context())
    assert [r.status for r in results] == ["delivered", "transient_failure", "transient_failure"]
    assert "may have been delivered" in results[1].reply.message


def test_undecodable_reply_bytes_are_not_a_500(make_client: Callable[..., TestClient]) -> None:
    def latin1_refusal(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250 raw.test")
        conv.expect("MAIL", "250 OK")
        conv.expect("RCPT", "250 OK")
        conv.sock.sendall(b"550 5.1.1 utilisateur inconnu: caf\xe9\r\n")
        conv.command()  # RCPT answered; then DATA
        conv.send("354 go")
        server.data_received.append(conv.read_data())
        conv.send("250 2.0.0 queued")
        conv.command()

    with raw_server(latin1_refusal) as server:
        client = make_client(relay(server.port))
        response = post_delivery(
            client, "out", ["good@x.test", "bad@x.test"], sender="a@x.test", message="Subject: x\r\n\r\nhi\r\n"
        )
    assert response.status_code == 207, response.text
    assert response.json()["recipients"][1]["reply"]["message"] == "5.1.1 utilisateur inconnu: caf\ufffd"


async def test_connections_saying_quit_still_count_against_the_limit() -> None:
    def slow_quit(conv: Conversation, server: RawServer) -> None:
        conv.greet_and_take_envelope(1)
        conv.expect("DATA", "354 go")
        conv.read_data()
        conv.send("250 2.0.0 queued")
        if conv.command().upper() == "QUIT":
            time.sleep(0.5)
            conv.send("221 bye")

    # Counted on our side: the server's own count lags behind our closes.
    live, peak = 0, 0

    class Counted(SmtpSession):
        def __init__(self, destination: Destination, settings: SessionSettings) -> None:
            nonlocal live, peak
            super().__init__(destination, settings)
            live += 1
            peak = max(peak, live)
            self._counted = True

        def close(self) -> None:
            nonlocal live
            if self._counted:
                live, self._counted = live - 1, False
            super().close()

    with raw_server(slow_quit) as server:
        options = StaticOptions(type="static", host="127.0.0.1", port=server.port, ehlo_as="relay.example.com")
        settings = SessionSettings.from_options(options, "out", lmtp=False)
        pool = SmtpPool(Destination("127.0.0.1", server.port, "127.0.0.1"), settings, 2, 0, session_factory=Counted)
        transactions = await asyncio.gather(
            *(pool.deliver(envelope(f"r{i}@x.test"), [f"r{i}@x.test"], context()) for i in range(6))
        )
        await pool.aclose()
    assert all(t.replies[0].code == 250 for t in transactions)
    assert peak == 2
    assert live == 0
    assert server.connections == 6  # idle_timeout 0: one connection per delivery, each closed with QUIT


async def test_starttls_refused() -> None:
    def refuses_tls(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250-raw.test\r\n250 STARTTLS")
        conv.expect("STARTTLS", "502 5.5.1 not today")
        line = conv.command()
        if line.upper().startswith("MAIL"):
            conv.send("250 OK")
            conv.expect("RCPT", "250 OK")
            conv.expect("DATA", "354 go")
            server.data_received.append(conv.read_data())
            conv.send("250 2.0.0 queued")
            conv.command()

    with raw_server(refuses_tls) as server:
        async with opened(relay(server.port, "tls: {mode: opportunistic}")) as relays:
            (plain,) = await relays["out"].deliver(envelope("bob@example.net"), context())
        async with opened(relay(server.port, "tls: {mode: starttls}")) as relays:
            (required,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert plain.status == "delivered"  # opportunistic: carried on in plain text
    assert (required.status, required.reply.code, required.reply.enhanced_status) == ("transient_failure", 451, "4.7.4")
    assert "502 5.5.1 not today" in required.reply.message or "not today" in required.reply.message
