"""Canaries for the uvicorn internals the drain uses (app/cli.py `_stop_accepting`,
`_close_after_each_response`, the cut's wait): each fails naming what changed."""

import asyncio
import socket

import uvicorn
from starlette.types import Receive, Scope, Send

WHERE = "app/cli.py's drain"


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # the server closes after the answer (Connection: close)
            data += chunk
        return data


async def test_default_headers_listeners_and_connections_are_what_the_drain_uses() -> None:
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", log_config=None, log_level="error")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, it has no event to wait on
                await asyncio.sleep(0.01)
        assert isinstance(server.servers, list), f"{WHERE}: Server.servers is no longer the list of listeners"
        (listener,) = server.servers
        assert hasattr(listener, "close"), f"{WHERE}: a listener has no close()"
        port = listener.sockets[0].getsockname()[1]
        assert isinstance(config.encoded_headers, list), f"{WHERE}: Config.encoded_headers is not a list"
        assert isinstance(server.server_state.default_headers, list), (
            f"{WHERE}: ServerState.default_headers is not a list"
        )
        close = (b"connection", b"close")
        config.encoded_headers = [*config.encoded_headers, close]
        server.server_state.default_headers = [*server.server_state.default_headers, close]
        answer = await asyncio.to_thread(_get, port)  # would hang if the header did not close the connection
        assert b"connection: close" in answer.lower(), f"{WHERE}: default_headers are no longer sent: {answer!r}"

        opened = socket.create_connection(("127.0.0.1", port), 5)  # an idle keep-alive connection
        try:
            async with asyncio.timeout(5):
                while not server.server_state.connections:  # noqa: ASYNC110 - a set uvicorn fills, no event
                    await asyncio.sleep(0.01)
            (connection,) = server.server_state.connections
            assert callable(getattr(connection, "shutdown", None)), f"{WHERE}: a connection has no shutdown()"
            assert getattr(connection, "transport", None) is not None, f"{WHERE}: a connection has no transport"
            connection.shutdown()  # idle: closed at once
            assert await asyncio.to_thread(opened.recv, 1) == b"", f"{WHERE}: shutdown() left an idle connection open"
        finally:
            opened.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
