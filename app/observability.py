"""Per request: an X-Request-ID (the client's, or a new one) and the HTTP metrics.

A plain ASGI wrapper: Starlette's BaseHTTPMiddleware would add a task hop per request.
"""

import contextvars
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import HTTP_DURATION, HTTP_REQUESTS
from relays.ids import unique_hex
from relays.instruments import child

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mailrelay_request_id", default="-")
_MAX_ID = 128


def _client_id(value: bytes) -> str | None:
    # Accepted only if it cannot smuggle anything into logs or headers.
    if 0 < len(value) <= _MAX_ID and all(0x21 <= b <= 0x7E for b in value):
        return value.decode("ascii")
    return None


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = _client_id(value)
                break
        request_id = request_id or unique_hex()
        REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            # The route's template (/relays/{name}/deliver), never the path: bounded labels.
            template = getattr(route, "path", None) or "unmatched"
            child(HTTP_REQUESTS, template, scope["method"], str(status)).inc()
            child(HTTP_DURATION, template).observe(time.perf_counter() - started)
