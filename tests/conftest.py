"""Shared fixtures: configurations, in-process clients, free ports."""

import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import parse_config
from app.main import create_app
from schemas.config import ServiceConfig

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str, name: str = "mailrelay.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
