"""`static` against a private Postfix (tests/servers/postfix.py) with STARTTLS and SASL through dovecot:
AUTH tried once, recipients past the server's limit in further transactions, IDN domains as
A-labels, and CHUNKING (BDAT). Postfix's per-session summary (`disconnect from ... mail=2 rcpt=4
data=2`) says what the client really sent."""

import asyncio
import dataclasses
import re
from collections.abc import Iterator

import pytest

from schemas.delivery import RecipientResult
from tests.conftest import context, envelope, opened
from tests.servers.postfix import SASL_PASSWORD, SASL_USER, Postfix, postfix, queue_id

MESSAGE = (
    b"From: alice@example.com\r\nTo: bob@mail.test\r\nSubject: mta\r\nMessage-Id: <m@example.com>\r\n\r\nHello\r\n"
)


@pytest.fixture(scope="module")
def server() -> Iterator[Postfix]:
    with postfix(sasl=True) as pf:
        yield pf


def static(port: int, extra: str = "") -> str:
    return f"relay:\n  out:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n{extra}"


def with_auth(server: Postfix, password: str = SASL_PASSWORD, extra: str = "") -> str:
    return static(
        server.ports["sub"],
        f"    tls:\n      ca_certs: {server.ca_file}\n"
        f"    credentials:\n      username: {SASL_USER}\n      password: {password}\n" + extra,
    )


async def send(
    config: str, *recipients: str, sender: str = "alice@example.com", message: bytes = MESSAGE
) -> list[RecipientResult]:
    async with opened(config) as relays:
        return await relays["out"].deliver(envelope(*recipients, sender=sender, message=message), context())


async def session_summary(server: Postfix, since: int, listener: str = "main") -> str:
    """Postfix's counts of the next client session to end on `listener`: `ehlo=1 mail=1 rcpt=1 ...`.
    Polled without blocking the loop: an aborted connection closes in a callback of the loop."""
    name = "postfix/smtpd" if listener == "main" else f"postfix/{listener}/smtpd"
    pattern = re.compile(re.escape(name) + r"\[\d+\]: disconnect from \S+ (.*)")
    for _ in range(200):
        if match := pattern.search(server.log[since:]):
            return match.group(1)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no session ended on {listener}:\n{server.log[since:][-2000:]}")


# AUTH (issue 15 item 2)


async def test_the_right_password_delivers_over_tls(server: Postfix) -> None:
    (result,) = await send(with_auth(server), "bob@elsewhere.example")
    assert result.status == "delivered", result.reply
    queued = queue_id(result.reply.message)
    assert server.received(queued) == MESSAGE.replace(b"\r\n", b"\n")
    (stored,) = (server.directory / "capture").glob(f"{queued}.*.eml")
    assert b"with ESMTPSA" in stored.read_bytes()  # authenticated, over TLS (Postfix's Received: header)


async def test_a_wrong_password_is_tried_once_and_is_a_transient_failure(server: Postfix) -> None:
    """PLAIN and LOGIN are offered: aiosmtplib's login() tried both, two failed logins per delivery
    that fail2ban and dovecot's auth penalty both count. One attempt; a 535 is never retried with
    another mechanism. Postfix's smtp_sasl_auth_soft_bounce (default yes): a configuration error
    answers 4xx, so clients keep the mail."""
    failures, logged = server.sasl_failures(), len(server.log)
    (result,) = await send(with_auth(server, password="wrong"), "bob@elsewhere.example")
    assert "auth=0/1" in await session_summary(server, logged, "sub")
    assert server.sasl_failures() - failures == 1
    assert result.status == "transient_failure"
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (454, "4.7.8", "AUTH")
    assert "535 5.7.8" in result.reply.message  # what the server said stays in the reply


async def test_a_refused_login_is_permanent_when_soft_bounce_is_off(server: Postfix) -> None:
    (result,) = await send(
        with_auth(server, password="wrong", extra="    auth_soft_bounce: false\n"), "bob@elsewhere.example"
    )
    assert result.status == "permanent_failure"
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (535, "5.7.8", "AUTH")


# 452 too many recipients (issue 15 item 3)


async def test_recipients_past_the_server_limit_go_in_further_transactions(server: Postfix) -> None:
    """smtpd_recipient_limit = 2: the 3rd RCPT gets 452 4.5.3. RFC 5321 4.5.3.1.10: send the rest
    in another transaction, here on the same connection."""
    rcpts = [f"r{i}@elsewhere.example" for i in range(5)]
    logged = len(server.log)
    results = await send(static(server.ports["rcptlim"]), *rcpts)
    assert [r.status for r in results] == ["delivered"] * 5, [r.reply for r in results]
    summary = await session_summary(server, logged, "rcptlim")
    assert "mail=3 " in summary, summary
    assert "bdat=3 " in summary, summary
    connects = re.findall(r"postfix/rcptlim/smtpd\[\d+\]: connect from", server.log[logged:])
    assert len(connects) == 1  # the three transactions on one connection
    queued = {queue_id(r.reply.message) for r in results}
    assert len(queued) == 3
    assert sorted(rcpt for q in queued for rcpt in server.envelope(q)[1:]) == sorted(rcpts)  # each once


async def test_max_recipients_per_batch_splits_a_big_envelope_up_front(server: Postfix) -> None:
    rcpts = [f"b{i}@elsewhere.example" for i in range(5)]
    logged = len(server.log)
    results = await send(static(server.port, "    max_recipients_per_batch: 2\n"), *rcpts)
    assert [r.status for r in results] == ["delivered"] * 5
    summary = await session_summary(server, logged)
    assert "mail=3 rcpt=5 bdat=3" in summary, summary  # no RCPT refused: split before sending
    queued = {queue_id(r.reply.message) for r in results}
    assert len(queued) == 3
    assert sorted(rcpt for q in queued for rcpt in server.envelope(q)[1:]) == sorted(rcpts)


# IDN domains (issue 15 item 4)


async def test_an_idn_domain_goes_as_its_a_label_to_a_server_without_smtputf8(server: Postfix) -> None:
    results = await send(static(server.ports["noutf8"]), "ok@bücher.example", sender="alice@Bücher.example")
    (result,) = results
    assert result.status == "delivered", result.reply
    assert result.recipient == "ok@bücher.example"  # the result names the address as given
    assert server.envelope(queue_id(result.reply.message)) == [
        "alice@xn--bcher-kva.example",
        "ok@xn--bcher-kva.example",
    ]


async def test_a_non_ascii_local_part_still_needs_smtputf8(server: Postfix) -> None:
    results = await send(static(server.ports["noutf8"]), "üser@bücher.example", "ok@bücher.example")
    assert [(r.status, r.reply.code) for r in results] == [("permanent_failure", 553), ("delivered", 250)]
    assert results[0].reply.enhanced_status == "5.6.7"


async def test_a_server_with_smtputf8_gets_the_u_label(server: Postfix) -> None:
    (result,) = await send(static(server.port), "üser@bücher.example")
    assert result.status == "delivered", result.reply
    assert server.envelope(queue_id(result.reply.message))[1] == "üser@bücher.example"


# CHUNKING / BDAT (issue 15 item 7)


def dotted_message(size: int) -> bytes:
    """A message whose lines start with dots (DATA must stuff them; BDAT sends them as they are)."""
    head = b"From: alice@example.com\r\nTo: bob@mail.test\r\nSubject: bdat\r\n\r\n"
    line = b".x" + b"y" * 74 + b"\r\n"
    return head + line * (size // len(line)) + b".\r\n"


@pytest.mark.parametrize(
    ("listener", "extra", "command"),
    [("main", "", "bdat=1"), ("nochunking", "", "data=1"), ("main", "    chunking: false\n", "data=1")],
)
async def test_chunking_sends_bdat_when_offered_byte_for_byte(
    server: Postfix, listener: str, extra: str, command: str
) -> None:
    body = dotted_message(1024 * 1024)
    logged = len(server.log)
    (result,) = await send(static(server.ports[listener], extra), "bob@elsewhere.example", message=body)
    assert result.status == "delivered", result.reply
    assert command in await session_summary(server, logged, listener)
    assert server.received(queue_id(result.reply.message)) == body.replace(b"\r\n", b"\n")


# How mx secures each hop (issue 18 items 1 and 4)


def mx(server: Postfix, listener: str = "main", extra: str = "") -> str:
    return (
        "relay:\n  out:\n    type: mx\n"
        f"    force_mx: {{elsewhere.example: '127.0.0.1:{server.ports[listener]}'}}\n" + extra
    )


async def test_mx_encrypts_whenever_the_receiver_offers_starttls(server: Postfix) -> None:
    (result,) = await send(mx(server), "bob@elsewhere.example")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert result.security.encrypted
    assert result.security.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.security.authenticated == "none"  # opportunistic: no certificate check, as Postfix's `may`
    queued = queue_id(result.reply.message)
    server.received(queued)  # waits for the delivery to the capture file
    (stored,) = (server.directory / "capture").glob(f"{queued}.*.eml")
    assert b" with ESMTPS id " in stored.read_bytes()  # Postfix's Received: header: over TLS


async def test_mx_sends_in_clear_text_only_when_starttls_is_not_offered(server: Postfix) -> None:
    (result,) = await send(mx(server, "notls"), "bob@elsewhere.example")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert not result.security.encrypted


async def test_mx_encryption_can_be_turned_off(server: Postfix) -> None:
    (result,) = await send(mx(server, extra="    tls: {mode: none}\n"), "bob@elsewhere.example")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert not result.security.encrypted


async def test_require_tls_delivers_over_a_verified_hop(server: Postfix) -> None:
    config = mx(server, extra=f"    tls: {{ca_certs: '{server.ca_file}'}}\n")
    async with opened(config) as relays:
        env = envelope("bob@elsewhere.example", message=MESSAGE)
        (result,) = await relays["out"].deliver(dataclasses.replace(env, require_tls=True), context())
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "ca")


@pytest.mark.parametrize(
    ("listener", "trust", "expected"),
    [
        ("notls", True, (550, "5.7.10")),  # no STARTTLS: cannot be secured at all
        ("main", False, (451, "4.7.5")),  # a certificate no trusted CA signed: deferred, never sent in clear
    ],
)
async def test_require_tls_never_sends_over_a_hop_it_cannot_secure(
    server: Postfix, listener: str, trust: bool, expected: tuple[int, str]
) -> None:
    logged = len(server.log)
    extra = f"    tls: {{ca_certs: '{server.ca_file}'}}\n" if trust else ""
    async with opened(mx(server, listener, extra)) as relays:
        env = envelope("bob@elsewhere.example", message=MESSAGE)
        (result,) = await relays["out"].deliver(dataclasses.replace(env, require_tls=True), context())
    assert (result.reply.code, result.reply.enhanced_status) == expected, result.reply
    assert "mail=" not in await session_summary(server, logged, listener)  # not even MAIL
