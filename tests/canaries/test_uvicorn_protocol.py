"""Canaries for the uvicorn internals app/http_protocol.py builds on: each failure names one.

uvicorn has no public hook for limits on the request head and timeouts on the head
and the body, so app/http_protocol.py subclasses uvicorn's httptools protocol.
pyproject.toml bounds uvicorn at the version these pass with.
"""

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

HERE = "app/http_protocol.py"
try:
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as exc:  # the message says whose import broke
    raise ImportError(
        f"{HERE} subclasses uvicorn.protocols.http.httptools_impl.HttpToolsProtocol and "
        f"uvicorn.protocols.http.flow_control.FlowControl: {exc}"
    ) from exc

#: The methods app/http_protocol.py overrides, each calling uvicorn's, with their parameters.
OVERRIDDEN = {
    "connection_made": ["self", "transport"],
    "data_received": ["self", "data"],
    "on_message_begin": ["self"],  # an httptools parser callback
    "on_headers_complete": ["self"],  # an httptools parser callback
    "on_header": ["self", "name", "value"],  # an httptools parser callback (also for trailers)
    "on_message_complete": ["self"],  # an httptools parser callback
    "on_response_complete": ["self"],  # each cycle's on_response
    "pause_writing": ["self"],  # the transport's write flow control
    "resume_writing": ["self"],
    "connection_lost": ["self", "exc"],
}
#: The FlowControl methods uvicorn stops and resumes reading through, and the one overridden.
FLOW_METHODS = {"pause_reading": ["self"], "resume_reading": ["self"], "__init__": ["self", "transport"]}


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "expected"), OVERRIDDEN.items(), ids=OVERRIDDEN.keys())
def test_the_methods_overridden_are_uvicorns_own(name: str, expected: list[str]) -> None:
    internal = f"uvicorn's HttpToolsProtocol.{name} (overridden in {HERE})"
    assert name in vars(HttpToolsProtocol), f"{internal} is no longer defined by uvicorn"
    found = parameters(getattr(HttpToolsProtocol, name))
    assert found == expected, f"{internal} now takes {found}, not {expected}"


@pytest.mark.parametrize(("name", "expected"), FLOW_METHODS.items(), ids=FLOW_METHODS.keys())
def test_flow_control_has_the_methods_used(name: str, expected: list[str]) -> None:
    internal = f"uvicorn's FlowControl.{name} (used in {HERE})"
    assert name in vars(FlowControl), f"{internal} is no longer defined by uvicorn"
    found = parameters(getattr(FlowControl, name))
    assert found == expected, f"{internal} now takes {found}, not {expected}"


class _CountingFlow(FlowControl):
    """uvicorn's flow control, counting what uvicorn asks of it (as _WatchedFlow listens)."""

    def __init__(self, transport: asyncio.Transport, calls: list[str]) -> None:
        super().__init__(transport)
        self.calls = calls

    def pause_reading(self) -> None:
        super().pause_reading()
        self.calls.append(f"pause_reading, read_paused={self.read_paused}")

    def resume_reading(self) -> None:
        super().resume_reading()
        self.calls.append(f"resume_reading, read_paused={self.read_paused}")


class _Probe(HttpToolsProtocol):
    """uvicorn's protocol, checking as a connection goes what app/http_protocol.py relies on."""

    problems: ClassVar[list[str]] = []
    calls: ClassVar[list[str]] = []
    requests = 0

    def expect(self, holds: bool, internal: str) -> None:
        if not holds:
            self.problems.append(f"{internal} (relied on in {HERE})")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.calls.append("connection_made")
        self.expect(self.loop is asyncio.get_running_loop(), "HttpToolsProtocol.loop is not the running loop")
        self.expect(self.transport is transport, "HttpToolsProtocol.connection_made no longer sets .transport")
        self.expect(
            type(self.flow) is FlowControl, "HttpToolsProtocol.connection_made no longer sets .flow to a FlowControl"
        )
        self.expect(getattr(self.flow, "read_paused", None) is False, "FlowControl.read_paused is not False at first")
        self.expect(self.cycle is None, "HttpToolsProtocol.cycle is not None before the first request")
        self.expect(
            self.client == transport.get_extra_info("peername"), "HttpToolsProtocol.client is not the peer's address"
        )
        self.expect(
            self.logger is logging.getLogger("uvicorn.error"), "HttpToolsProtocol.logger is not uvicorn.error's logger"
        )
        self.expect(isinstance(self.pipeline, deque), "HttpToolsProtocol.pipeline is not a deque")
        self.flow = _CountingFlow(self.transport, self.calls)  # as app/http_protocol.py replaces it

    def data_received(self, data: bytes) -> None:
        if self.requests == 1 and self.cycle is not None and self.cycle.response_complete:
            # The second request on a kept-alive connection: the first was answered in full.
            self.calls.append("data after a response")
            self.expect(self.cycle.response_started, "RequestResponseCycle.response_started is not True once answered")
        super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.requests += 1
        self.calls.append("on_headers_complete")
        cycle = self.cycle
        self.expect(cycle is not None, "HttpToolsProtocol.cycle is not set by on_headers_complete")
        if cycle is not None:
            self.expect(cycle.response_started is False, "RequestResponseCycle.response_started is not False at first")
            self.expect(
                cycle.response_complete is False, "RequestResponseCycle.response_complete is not False at first"
            )
            self.expect(
                cycle.on_response == self.on_response_complete,
                "RequestResponseCycle.on_response is not the protocol's on_response_complete",
            )
            self.expect(cycle.disconnected is False, "RequestResponseCycle.disconnected is not False at first")
            self.expect(
                isinstance(cycle.message_event, asyncio.Event), "RequestResponseCycle.message_event is not an Event"
            )
            cycle.scope["canary.request"] = self.requests  # type: ignore[typeddict-unknown-key]  # our own key

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.calls.append("on_message_begin")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.calls.append("on_message_complete")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.calls.append("on_response_complete")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.calls.append("connection_lost")


_seen_by_app: list[object] = []


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    _seen_by_app.append(scope.get("canary.request"))
    while (await receive()).get("more_body"):
        pass
    body = b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(protocol: type[asyncio.Protocol]) -> Iterator[int]:
    """uvicorn (on its default loop, uvloop) in a thread, on a free port of 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    config = uvicorn.Config(_app, http=protocol, ws="none", lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def read_answers(sock: socket.socket, count: int) -> bytes:
    answer = b""
    while answer.count(b"\r\n\r\nok") < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed after {answer!r}"
        answer += chunk
    return answer


def test_a_connection_goes_as_app_http_protocol_expects() -> None:
    _Probe.problems, _Probe.calls = [], []
    _seen_by_app.clear()
    get = b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n"
    with serving(_Probe) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get % 1)
        read_answers(sock, 1)
        sock.sendall(b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        read_answers(sock, 1)
        sock.sendall(get % 3 + get % 4)  # pipelined: uvicorn holds the second until the first is answered
        read_answers(sock, 2)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert _Probe.problems == []
    calls = _Probe.calls
    assert calls[0] == "connection_made", "HttpToolsProtocol.connection_made was not called first"
    assert calls.count("on_message_begin") == 4, f"httptools did not call on_message_begin per request: {calls}"
    assert calls.count("on_response_complete") == 4, f"uvicorn did not call on_response per response: {calls}"
    assert calls.count("on_headers_complete") == 4, f"httptools did not call on_headers_complete per request: {calls}"
    assert calls.count("on_message_complete") == 4, f"httptools did not call on_message_complete per request: {calls}"
    assert "data after a response" in calls, f"RequestResponseCycle.response_complete was never True: {calls}"
    assert "pause_reading, read_paused=True" in calls, f"uvicorn no longer pauses reading through .flow: {calls}"
    assert "resume_reading, read_paused=False" in calls, f"uvicorn no longer resumes reading through .flow: {calls}"
    assert calls[-1] == "connection_lost", f"HttpToolsProtocol.connection_lost was not called last: {calls}"
    assert _seen_by_app == [1, 2, 3, 4], f"RequestResponseCycle.scope is not the dict the application gets: {calls}"


class _Warnings(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Records what uvicorn's protocol logs through its `logger` (as app/http_protocol.py's _PeerLog)."""

    seen: ClassVar[list[tuple[int, object, tuple[object, ...]]]] = []

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        self.seen.append((level, msg, args))


class _LoggerProbe(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.logger = _Warnings(self.logger, {})  # type: ignore[assignment]


def test_a_malformed_request_is_a_warning_through_the_protocols_logger() -> None:
    _Warnings.seen.clear()
    with serving(_LoggerProbe) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\x01 / HTTP/9\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert (logging.WARNING, "Invalid HTTP request received.", ()) in _Warnings.seen, (
        f"uvicorn no longer logs a malformed request as a warning without arguments through "
        f"HttpToolsProtocol.logger (relied on in {HERE}): {_Warnings.seen}"
    )
