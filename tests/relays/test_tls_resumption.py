"""TLS session resumption to the next hop (issue 18, performance part; relays/smtp/resumption.py)
against a private Postfix (tests/servers/postfix.py): its `tlslog` and `tls12` listeners log
"Reusing old session" for each resumed handshake, so the server confirms what the client says.

`idle_timeout: 0` closes each connection after its delivery: every delivery is a new connection."""

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from relays.base import RelayError
from relays.dane import DaneHost
from relays.smtp import resumption
from relays.smtp.resumption import ResumingContext
from relays.smtp.session import Destination, SessionSettings, SmtpSession
from schemas.delivery import HopSecurity, RecipientResult
from schemas.relay_options import MxOptions, StaticOptions
from tests.canaries import LOOPS
from tests.conftest import context, envelope, opened
from tests.servers.postfix import Postfix, postfix
from tests.servers.smtp import smtp_server, tls_material

MESSAGE = b"From: alice@example.com\r\nTo: bob@mail.test\r\nSubject: resume\r\n\r\nHello\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[Postfix]:
    with postfix(sasl=True, keep=False) as pf:
        yield pf


def static(port: int, tls: str) -> str:
    return (
        "relay:\n  out:\n    type: static\n    host: 127.0.0.1\n"
        f"    port: {port}\n    idle_timeout: 0\n    tls: {tls}\n"
    )


def mx(server: Postfix, listener: str, tls: str) -> str:
    return (
        "relay:\n  out:\n    type: mx\n    idle_timeout: 0\n"
        f"    force_mx: {{elsewhere.example: '127.0.0.1:{server.ports[listener]}'}}\n    tls: {tls}\n"
    )


async def reused(server: Postfix, since: int, listener: str, expected: int) -> int:
    """Handshakes that resumed a session on `listener` since log offset `since`, once `expected`
    are logged or 10 s passed (smtpd logs through postlogd, a little after the session)."""
    pattern = re.compile(rf"postfix/{listener}/smtpd\[\d+\]: .*Reusing old session")
    for _ in range(200):
        if len(pattern.findall(server.log[since:])) >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # and no more than that
    return len(pattern.findall(server.log[since:]))


def hop(result: RecipientResult) -> HopSecurity:
    assert result.status == "delivered", result.reply
    assert result.security is not None
    return result.security


@pytest.mark.parametrize(("listener", "version"), [("tlslog", "TLSv1.3"), ("tls12", "TLSv1.2")])
async def test_a_new_connection_to_the_same_hop_resumes_the_last_session(
    server: Postfix, listener: str, version: str
) -> None:
    """TLS 1.3 (a ticket, which arrives after the handshake) and TLS 1.2 (Postfix's tickets)."""
    logged = len(server.log)
    async with opened(static(server.ports[listener], f"{{mode: starttls, ca_certs: '{server.ca_file}'}}")) as relays:
        hops = []
        for _ in range(3):
            (result,) = await relays["out"].deliver(envelope("bob@elsewhere.example", message=MESSAGE), context())
            hops.append(hop(result))
    assert [h.tls_version for h in hops] == [version] * 3
    assert [h.resumed for h in hops] == [False, True, True]
    assert [h.authenticated for h in hops] == ["ca"] * 3  # checked by the first handshake, for this name
    assert await reused(server, logged, listener, 2) == 2


async def test_a_session_never_serves_another_verification_policy(server: Postfix) -> None:
    """mx's opportunistic connections check nothing: their sessions must not spare a require_tls
    delivery (verified for the MX name) its certificate check, nor the reverse."""
    logged = len(server.log)
    async with opened(mx(server, "tlslog", f"{{mode: opportunistic, ca_certs: '{server.ca_file}'}}")) as relays:

        async def send(require_tls: bool) -> HopSecurity:
            env = dataclasses.replace(envelope("bob@elsewhere.example", message=MESSAGE), require_tls=require_tls)
            (result,) = await relays["out"].deliver(env, context())
            return hop(result)

        opportunistic = [await send(False), await send(False)]
        verified = [await send(True), await send(True)]
        after = await send(False)
    assert [(h.authenticated, h.resumed) for h in opportunistic] == [("none", False), ("none", True)]
    assert [(h.authenticated, h.resumed) for h in verified] == [("ca", False), ("ca", True)]
    assert (after.authenticated, after.resumed) == ("none", True)  # its own policy's session
    assert await reused(server, logged, "tlslog", 3) == 3


async def test_a_session_from_an_unverified_hop_never_lets_an_untrusted_certificate_pass(server: Postfix) -> None:
    """No `ca_certs`: the test CA is not trusted, so a require_tls delivery must fail its
    certificate check even right after an opportunistic connection made a session there."""
    async with opened(mx(server, "tlslog", "{mode: opportunistic}")) as relays:
        (first,) = await relays["out"].deliver(envelope("bob@elsewhere.example", message=MESSAGE), context())
        assert hop(first).authenticated == "none"
        env = dataclasses.replace(envelope("bob@elsewhere.example", message=MESSAGE), require_tls=True)
        (strict,) = await relays["out"].deliver(env, context())
    assert (strict.reply.code, strict.reply.enhanced_status) == (451, "4.7.5"), strict.reply
    assert strict.status == "transient_failure"


async def test_sessions_expire_after_max_age(server: Postfix, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resumption, "MAX_AGE", 0.0)
    async with opened(static(server.ports["tlslog"], f"{{mode: starttls, ca_certs: '{server.ca_file}'}}")) as relays:
        for _ in range(2):
            (result,) = await relays["out"].deliver(envelope("bob@elsewhere.example", message=MESSAGE), context())
            assert not hop(result).resumed


async def test_the_cache_keeps_at_most_cache_size_destinations(
    server: Postfix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One entry: a session for another port (another destination) pushes out the first."""
    monkeypatch.setattr(resumption, "CACHE_SIZE", 1)
    # Two destinations through one relay (one context): mx, opportunistic, two domains on two listeners.
    config = (
        "relay:\n  out:\n    type: mx\n    idle_timeout: 0\n"
        f"    force_mx: {{a.example: '127.0.0.1:{server.ports['tlslog']}', "
        f"b.example: '127.0.0.1:{server.ports['tls12']}'}}\n"
    )
    async with opened(config) as relays:
        resumed = []
        for domain in ("a", "a", "b", "a"):
            (result,) = await relays["out"].deliver(envelope(f"bob@{domain}.example", message=MESSAGE), context())
            resumed.append(hop(result).resumed)
    assert resumed == [False, True, False, False]


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_resumption_on_either_loop_and_either_tls_mode(tmp_path: Path, loop: str, mode: str) -> None:
    """The destination reaches wrap_bio through a context variable, which asyncio's loop and
    uvloop carry to the handshake differently (relays/smtp/resumption.py): both loops, STARTTLS
    and implicit TLS, against aiosmtpd on Python's ssl (which issues TLS 1.3 tickets)."""

    async def deliveries(port: int, ca_file: Path) -> list[bool]:
        config = static(port, f"{{mode: {mode}, ca_certs: '{ca_file}'}}")
        async with opened(config) as relays:
            resumed = []
            for _ in range(2):
                (result,) = await relays["out"].deliver(envelope("bob@example.net", message=MESSAGE), context())
                resumed.append(hop(result).resumed)
            return resumed

    with tls_material(tmp_path) as tls, smtp_server(tls=tls, implicit_tls=mode == "implicit") as server:
        runner = asyncio.Runner(loop_factory=LOOPS[loop])
        with runner:
            assert runner.run(deliveries(server.port, tls.ca_file)) == [False, True]
    assert [r.tls for r in server.received] == [True, True]


def test_dane_connections_never_resume() -> None:
    """The TLSA check reads the chain the server sends: a resumed handshake sends none."""
    settings = SessionSettings.from_options(MxOptions(type="mx"), "out", lmtp=False)
    assert isinstance(settings.tls_context, ResumingContext)
    dane = settings.with_dane(DaneHost("mx.dane.test", ()), None, "out")
    assert dane.tls_context is not None
    assert not isinstance(dane.tls_context, ResumingContext)
    assert isinstance(settings.verified(None, "out").tls_context, ResumingContext)


def test_a_failed_implicit_tls_connection_forgets_the_kept_session(tmp_path: Path) -> None:
    """As after a failed STARTTLS: a connection with implicit TLS that fails (its handshake
    included) drops the destination's kept session, so the next one starts afresh instead of
    offering it again for up to MAX_AGE."""
    with tls_material(tmp_path) as tls:
        options = StaticOptions.model_validate(
            {"type": "static", "host": "127.0.0.1", "tls": {"mode": "implicit", "ca_certs": str(tls.ca_file)}}
        )
        settings = SessionSettings.from_options(options, "out", lmtp=False)
        kept = settings.tls_context
        assert isinstance(kept, ResumingContext)

        async def open_and_quit(destination: Destination) -> None:
            session = SmtpSession(destination, settings)
            await session.open()
            await session.quit()

        with smtp_server(tls=tls, implicit_tls=True) as server:
            destination = Destination("127.0.0.1", server.port, "localhost")
            asyncio.run(open_and_quit(destination))
            assert destination in kept._sessions  # the cache itself is what is checked
        with pytest.raises(RelayError):  # the server is gone: the connection fails
            asyncio.run(open_and_quit(destination))
        assert destination not in kept._sessions
