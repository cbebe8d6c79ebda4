"""Shared fixtures: configurations, in-process clients, free ports."""

import asyncio
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
import uvloop
from fastapi.testclient import TestClient

from app.config import parse_config
from app.main import create_app
from relays.base import DeliveryContext, Relay
from relays.registry import close_relays, open_relays
from schemas.config import ServiceConfig
from schemas.delivery import Envelope

#: A configuration with a scripted relay (mixed outcomes) beside the blackhole.
SCRIPTED_YAML = """\
relay:
  blackhole:
    type: blackhole
  scripted:
    type: custom
    factory: tests.scripted:factory
    replies:
      bad@example.net: "550 5.1.1 <bad@example.net> User unknown"
      later@example.net: "451 4.3.0 Try again later"
      quota@example.net: "552 5.2.2 Mailbox \\"full\\""
  broken:
    type: custom
    factory: tests.scripted:factory
    misbehave: drop_one
  crashing:
    type: custom
    factory: tests.scripted:factory
    misbehave: raise
mailrelay:
  max_recipients: 5
  max_message_size: 1000
  retry_after: 30
"""


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    """Tests run on the loop the service runs on in production: uvloop differs from
    asyncio's (subprocess arguments, transports)."""
    return {"uvloop": uvloop.new_event_loop}


def config_from(text: str) -> ServiceConfig:
    return parse_config(textwrap.dedent(text), "<test>").config


@pytest.fixture
def make_client() -> Iterator[Callable[[str], TestClient]]:
    """Clients that run the app's lifespan (a bare ASGI transport would skip it)."""
    clients: list[TestClient] = []

    def make(text: str = SCRIPTED_YAML, raise_server_exceptions: bool = True) -> TestClient:
        client = TestClient(create_app(config_from(text)), raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(SCRIPTED_YAML, raise_server_exceptions=False)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str, name: str = "mailrelay.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@asynccontextmanager
async def opened(text: str) -> AsyncIterator[dict[str, Relay]]:
    """The relays of a configuration, built as at start-up and closed afterwards."""
    relays = await open_relays(config_from(text))
    try:
        yield relays
    finally:
        await close_relays(relays)


def envelope(*recipients: str, sender: str = "alice@example.com", message: bytes | None = None) -> Envelope:
    body = message or b"From: alice@example.com\r\nSubject: test\r\nMessage-Id: <t1@example.com>\r\n\r\nHello\r\n"
    return Envelope(sender=sender, recipients=list(recipients), message=body)


def context(seconds: float = 60.0) -> DeliveryContext:
    """A delivery context with its deadline `seconds` from now, as the service makes one."""
    return DeliveryContext(asyncio.get_running_loop().time() + seconds)


def post_delivery(
    client: TestClient,
    relay: str,
    recipients: list[str],
    *,
    sender: str = "a@example.com",
    message: str = "Subject: x\r\n\r\nhi\r\n",
) -> httpx2.Response:
    """POST a JSON-form delivery to `relay` through the in-process client."""
    return client.post(
        f"/relays/{relay}/deliver", json={"sender": sender, "recipients": recipients, "message": message}
    )
