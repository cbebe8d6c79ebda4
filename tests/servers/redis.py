"""A real redis-server on loopback, with no persistence, started by the test."""

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from tests.servers.process import free_port, require_program, stop


@dataclass
class RedisInstance:
    url: str
    port: int
    process: subprocess.Popen[bytes]


@contextmanager
def redis_server(*extra: str) -> Iterator[str]:
    """Yields the server's URL (redis://127.0.0.1:PORT/0)."""
    with redis_instance(*extra) as instance:
        yield instance.url


@contextmanager
def redis_instance(*extra: str, port: int | None = None) -> Iterator[RedisInstance]:
    """redis-server on 127.0.0.1 and a free port (or `port`), without persistence; `extra` are more
    options, and override (e.g. `--appendonly yes --dir D` for a server restarted on its data)."""
    program = require_program("redis-server")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="mailrelay-redis-") as directory:
        process = subprocess.Popen(  # noqa: S603
            [
                program,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url, socket_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                        raise RuntimeError(f"redis-server did not start: {output[-2000:]}") from None
                    time.sleep(0.05)
            client.close()
            yield RedisInstance(url, port, process)
        finally:
            stop(process)
