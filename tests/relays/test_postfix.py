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
