"""An SMTP sink that records when each message arrived (the end of its data), in its own thread."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP

from tests.servers.smtp import serving


@dataclass
class ArrivalSink:
    host: str
    port: int
    #: time.monotonic() of each message's final ".", in arrival order (appended by the sink's thread).
    arrivals: list[float] = field(default_factory=list)

    def rate(self, start: float, seconds: float) -> float:
        """Messages per second that arrived in [start, start + seconds)."""
        return sum(1 for t in list(self.arrivals) if start <= t < start + seconds) / seconds


class _Recorder:
    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = arrivals

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrivals.append(time.monotonic())
        return "250 2.0.0 Ok: queued"


@contextmanager
def arrival_sink() -> Iterator[ArrivalSink]:
    """aiosmtpd on 127.0.0.1 and a free port (read from the bound socket: no race), accepting everything."""
    arrivals: list[float] = []
    handler = _Recorder(arrivals)

    def protocol() -> SMTP:
        return SMTP(handler, hostname="sink.example", ident="arrivals ESMTP")

    with serving(protocol, "127.0.0.1", 0, "arrival-sink") as port:
        yield ArrivalSink("127.0.0.1", port, arrivals)
