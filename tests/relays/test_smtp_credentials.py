"""Where the relay's SMTP password may go: never in clear text after an opportunistic downgrade,
never to a server DANE has not authenticated yet. Real sockets: servers written line by line,
TLS from a trustme CA."""

import base64
import contextlib
import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

import pytest

from relays.base import RelayError
from relays.dane import DaneHost
from relays.dns import Tlsa
from relays.smtp.session import Destination, SessionSettings, SmtpSession
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.raw import Conversation, RawServer, raw_server
from tests.servers.smtp import tls_material

CREDENTIALS = "credentials: {username: relay-user, password: relay-pass}"
CHALLENGE = b"<1896.697170952@raw.test>"


def _serve(talk: Conversation, seen: list[str], ehlo: str) -> None:
    """The rest of a session: records each command; AUTH PLAIN/LOGIN/CRAM-MD5 accepted, mail taken.
    A client that gives up resets the connection (SO_LINGER 0): that ends it too."""
    with contextlib.suppress(ConnectionResetError):
        _converse(talk, seen, ehlo)


def _converse(talk: Conversation, seen: list[str], ehlo: str) -> None:
    while line := talk.command():
        seen.append(line)
        verb = line.split()[0].upper()
        if verb == "EHLO":
            talk.send(ehlo)
        elif verb == "AUTH" and line.upper().startswith("AUTH CRAM-MD5"):
            talk.send("334 " + base64.b64encode(CHALLENGE).decode())
            seen.append(talk.command())
            talk.send("235 2.7.0 Authentication successful")
        elif verb == "AUTH" and line.upper().startswith("AUTH LOGIN"):
            talk.send("334 UGFzc3dvcmQ6")  # the username came with the command; now the password
            seen.append(talk.command())
            talk.send("235 2.7.0 Authentication successful")
        elif verb == "AUTH":
            talk.send("235 2.7.0 Authentication successful")
        elif verb in ("MAIL", "RCPT"):
            talk.send("250 2.1.0 OK")
        elif verb == "DATA":
            talk.send("354 go on")
            talk.read_data()
            talk.send("250 2.0.0 queued")
        elif verb == "QUIT":
            talk.send("221 bye")
            return
        else:
            talk.send("502 5.5.2 not here")


def plain_server(mechanisms: str, seen: list[str]) -> Callable[[Conversation, RawServer], None]:
    """Offers AUTH with `mechanisms` and no STARTTLS (or a STARTTLS stripped on the way)."""
    ehlo = f"250-raw.test\r\n250 AUTH {mechanisms}"

    def handler(talk: Conversation, server: RawServer) -> None:
        talk.send("220 raw.test ESMTP")
        _serve(talk, seen, ehlo)

    return handler


def sent_in_clear(seen: list[str]) -> bool:
    """Whether the password went over the wire readable (AUTH PLAIN's or LOGIN's base64)."""
    secret = base64.b64encode(b"relay-pass").decode()
    plain = base64.b64encode(b"\0relay-user\0relay-pass").decode()
    return any(secret in line or plain in line for line in seen)


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_opportunistic_tls_without_starttls_never_sends_the_password_in_clear(mechanisms: str) -> None:
    seen: list[str] = []
    with raw_server(plain_server(mechanisms, seen)) as server:
        config = relay(server.port, "tls: {mode: opportunistic}", CREDENTIALS)
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert not sent_in_clear(seen), seen
    assert not any(line.upper().startswith("AUTH") for line in seen), seen
    assert (result.status, result.reply.code, result.reply.command) == ("transient_failure", 451, "AUTH")
    assert "not encrypted" in result.reply.message, result.reply.message
    assert not server.errors, server.errors


async def test_opportunistic_tls_without_starttls_still_logs_in_with_cram_md5() -> None:
    """CRAM-MD5 sends a keyed digest, not the password: it may go over clear text (Postfix's
    default `noplaintext` allows it too)."""
    seen: list[str] = []
    with raw_server(plain_server("PLAIN LOGIN CRAM-MD5", seen)) as server:
        config = relay(server.port, "tls: {mode: opportunistic}", CREDENTIALS)
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered", result.reply
    digest = hmac.new(b"relay-pass", CHALLENGE, hashlib.md5).hexdigest()
    assert base64.b64encode(f"relay-user {digest}".encode()).decode() in seen
    assert not sent_in_clear(seen), seen


async def test_a_plaintext_fallback_never_sends_the_password_in_clear() -> None:
    """The handshake fails (an attacker can make it fail) and plaintext_fallback carries on in
    clear text: the mail may go, the password may not."""
    seen: list[str] = []

    def handler(talk: Conversation, server: RawServer) -> None:
        talk.send("220 raw.test ESMTP")
        if server.connections == 1:
            talk.expect("EHLO", "250-raw.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN")
            talk.expect("STARTTLS", "220 go ahead")
            talk.send("this is not a TLS record")
            return
        _serve(talk, seen, "250-raw.test\r\n250 AUTH PLAIN LOGIN")

    with raw_server(handler) as server:
        config = relay(server.port, "tls: {mode: opportunistic, plaintext_fallback: true}", CREDENTIALS)
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert server.connections == 2
    assert not sent_in_clear(seen), seen
    assert (result.status, result.reply.code, result.reply.command) == ("transient_failure", 451, "AUTH")


async def test_tls_mode_none_is_the_operators_choice_of_clear_text() -> None:
    seen: list[str] = []
    with raw_server(plain_server("PLAIN LOGIN", seen)) as server:
        async with opened(relay(server.port, "tls: {mode: none}", CREDENTIALS)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert result.status == "delivered", result.reply
    assert sent_in_clear(seen)


async def test_dane_refuses_the_server_before_auth_gives_it_the_password(tmp_path: Path) -> None:
    """The MX host's certificate does not match its TLSA records: the session ends after the
    handshake, before AUTH (a man in the middle with any certificate got the password)."""
    seen: list[str] = []

    with tls_material(tmp_path) as tls:

        def handler(talk: Conversation, server: RawServer) -> None:
            talk.send("220 raw.test ESMTP")
            talk.expect("EHLO", "250-raw.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN")
            talk.expect("STARTTLS", "220 go ahead")
            secured = tls.server_context.wrap_socket(talk.sock, server_side=True)
            inner = Conversation(secured)
            try:
                _serve(inner, seen, "250-raw.test\r\n250 AUTH PLAIN LOGIN")
            except OSError:  # ssl.SSLError too: the client dropped the connection
                pass
            finally:
                inner.stream.close()
                secured.close()

        with raw_server(handler) as server:
            settings = SessionSettings(
                ehlo_as="client.test",
                connect_timeout=5,
                command_timeout=5,
                data_timeout=5,
                tls_mode="none",
                tls_context=None,
                credentials=("relay-user", "relay-pass"),
                ipv4_only=False,
                lmtp=False,
                relay="out",
            )
            host = DaneHost("mx.example.test", (Tlsa(3, 1, 1, b"\0" * 32),))
            dane = settings.with_dane(host, None, "out")
            session = SmtpSession(Destination("127.0.0.1", server.port, "mx.example.test"), dane)
            with pytest.raises(RelayError) as caught:
                await session.open()
            session.close()
    assert caught.value.reply.enhanced_status == "4.7.5", caught.value.reply
    assert "DANE" in caught.value.reply.message
    assert not any(line.upper().startswith("AUTH") for line in seen), seen
    assert not sent_in_clear(seen)
