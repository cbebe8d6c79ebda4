"""Python cost of one blackhole delivery, without sockets: the ASGI app called in a loop on uvloop.

Deterministic where bench/run is not (no scheduler, no wrk): compare two revisions with
`PYTHONPATH=<tree> taskset -c 0 .venv/bin/python bench/inprocess.py [N]` run from each tree.
Prints the best of 5 rounds of N requests (default 5,000), in microseconds per request.
"""

import gc
import json
import sys
import time
from typing import Any

import uvloop

from app.config import DEFAULT_CONFIG_YAML, parse_config
from app.logs import setup_logging
from app.main import create_app

BODY = json.dumps(
    {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\n" + "x" * 1000 + "\r\n"}
).encode()


def post_scope(path: str, length: int, state: Any) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to `path` with a body of `length` bytes; `state` is the
    lifespan's (what the service gets from uvicorn)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"x"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % length),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "state": dict(state or {}),
    }


async def main(count: int) -> None:
    app = create_app(parse_config(DEFAULT_CONFIG_YAML, "bench").config)
    async with app.router.lifespan_context(app) as state:
        scope = post_scope("/relays/blackhole/deliver", len(BODY), state)
        statuses: set[int] = set()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.add(message["status"])

        for _ in range(2000):  # warm-up
            await app(dict(scope), receive, send)
        gc.collect()
        gc.freeze()  # as the service does once serving
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(count):
                await app(dict(scope), receive, send)
            best = min(best, (time.perf_counter() - started) / count)
        if statuses != {200}:
            raise SystemExit(f"unexpected statuses {statuses}")
        print(f"{best * 1e6:.1f} us/request")


if __name__ == "__main__":
    with open("/dev/null", "w") as sink:  # the delivery line is written, as at the default log level
        setup_logging("info", "json", sink)
        uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
