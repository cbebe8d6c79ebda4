"""Canaries: tests that fail, naming the internal, when another library's private part we rely on changes."""

import asyncio
from collections.abc import Callable

import uvloop

#: Both event loops a canary runs on: asyncio's, and uvloop (the service's loop when installed, app.cli).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
