"""Canaries for what app/cli.py relies on in uvicorn's Server beyond running it: each fails naming it."""

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import Receive, Scope, Send

CAPTURE_SIGNALS = (
    "app/cli.py _Server overrides uvicorn.Server.capture_signals so that uvicorn installs no signal "
    "handlers (mailrelay's are loop callbacks, app/cli.py _Signals)"
)
HANDLE_EXIT = "app/cli.py _Signals passes SIGINT (and a second SIGTERM) to uvicorn.Server.handle_exit"


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("no request is made")


def _config() -> uvicorn.Config:
    return uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", log_config=None, log_level="error")


async def test_serve_installs_signal_handlers_only_through_capture_signals() -> None:
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in handled}
    entered: list[bool] = []
    during: dict[signal.Signals, object] = {}

    class Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            entered.append(True)
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            during.update({sig: signal.getsignal(sig) for sig in handled})
            self.should_exit = True  # serving, listening: seen enough

    server = Quiet(_config())
    async with asyncio.timeout(10):
        await server.serve()
    assert server.started
    assert entered, f"{CAPTURE_SIGNALS}: Server.serve() no longer enters capture_signals()"
    assert during == before, f"{CAPTURE_SIGNALS}: Server.serve() installs handlers elsewhere now: {during}"
    assert {sig: signal.getsignal(sig) for sig in handled} == before, (
        f"{CAPTURE_SIGNALS}: handlers changed after serve()"
    )


def test_handle_exit_stops_then_forces() -> None:
    server = uvicorn.Server(_config())
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit, f"{HANDLE_EXIT}: it no longer sets should_exit"
    assert not server.force_exit, f"{HANDLE_EXIT}: one signal now forces the exit"
    server = uvicorn.Server(_config())
    server.handle_exit(signal.SIGINT, None)
    assert (server.should_exit, server.force_exit) == (True, False), f"{HANDLE_EXIT}: a first SIGINT changed"
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit, f"{HANDLE_EXIT}: a second SIGINT no longer forces the exit"
