"""`static` against a private Postfix (tests/servers/postfix.py): SIZE (RFC 1870) and line ends, byte for byte."""

from collections.abc import Iterator

import pytest

from tests.conftest import context, envelope, opened
from tests.servers.postfix import Postfix, postfix, queue_id

LIMIT = 4096


@pytest.fixture(scope="module")
def server() -> Iterator[Postfix]:
    with postfix(message_size_limit=LIMIT) as pf:
        yield pf


def static(port: int) -> str:
    return f"relay:\n  out:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n"


def message(body_bytes: int) -> bytes:
    head = b"From: alice@example.com\r\nTo: bob@mail.test\r\nSubject: size\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * (body_bytes // len(line))


async def deliver(server: Postfix, body: bytes) -> tuple[str, int, str]:
    async with opened(static(server.port)) as relays:
        (result,) = await relays["out"].deliver(envelope("bob@mail.test", message=body), context())
    return result.status, result.reply.code, result.reply.message


async def test_under_the_size_limit_is_delivered_byte_for_byte(server: Postfix) -> None:
    body = message(LIMIT // 2)
    status, code, text = await deliver(server, body)
    assert (status, code) == ("delivered", 250), text
    assert server.received(queue_id(text)) == body.replace(b"\r\n", b"\n")


async def test_over_the_advertised_size_limit_is_refused_before_mail(server: Postfix) -> None:
    captured, logged = server.captured(), len(server.log)
    body = message(LIMIT * 2)
    status, code, text = await deliver(server, body)
    assert (status, code) == ("permanent_failure", 552)
    assert text == f"5.3.4 Message size exceeds the server's limit ({len(body)} bytes, the server takes {LIMIT})"
    # Refused before MAIL: the session's summary counts no MAIL, and nothing was queued or delivered.
    session = server.wait_log("disconnect from", since=logged)
    assert "ehlo=1" in session
    assert "mail=" not in session
    assert "queued as" not in session
    assert server.captured() == captured


async def test_cr_before_lf_is_one_line_end_and_the_headers_stay_headers(server: Postfix) -> None:
    sent = b"From: alice@example.com\r\nX-Test: a\r\r\nX-Cr: c\rd\r\nSubject: cr\r\n\r\nbody\r\n"
    status, code, text = await deliver(server, sent)
    assert (status, code) == ("delivered", 250), text
    received = server.received(queue_id(text))
    head, _, body = received.partition(b"\n\n")
    assert [h.split(b":")[0] for h in head.split(b"\n")] == [b"From", b"X-Test", b"X-Cr", b"Subject"]
    assert head.split(b"\n")[1:3] == [b"X-Test: a", b"X-Cr: c d"]  # Postfix stores the lone CR as a space
    assert body == b"body\n"
