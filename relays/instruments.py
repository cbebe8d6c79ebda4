"""Prometheus metrics the relays keep themselves: connections, DNS, local processes.

Labels are bounded: relay names come from the configuration, destinations are
next hops (host:port), results are a fixed set. Correct with several worker
processes: prometheus_client's multiprocess mode is switched on by the
environment before this module is imported (see app.cli).
"""

import asyncio
import bisect
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

SMTP_CONNECTIONS = Gauge(
    "mailrelay_smtp_connections",
    "SMTP/LMTP connections by state: open (in use, idle or closing) and idle",
    ["relay", "destination", "state"],
    multiprocess_mode="livesum",
)
SMTP_OPENED = Counter(
    "mailrelay_smtp_connections_opened",
    "SMTP/LMTP connections opened (connected, greeted, TLS and AUTH done)",
    ["relay", "destination"],
)
SMTP_REUSED = Counter(
    "mailrelay_smtp_connections_reused",
    "transactions that reused an idle pooled connection",
    ["relay", "destination"],
)
DNS_LOOKUPS = Counter("mailrelay_dns_lookups", "DNS queries sent (cache misses)")
DNS_CACHE_HITS = Counter("mailrelay_dns_cache_hits", "DNS answers served from the cache")
PROCESS_RUNS = Counter(
    "mailrelay_process_runs",
    "delivery commands run by pipe, maildrop and dovecot, by result",
    ["relay", "result"],
)


class _Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Tally:
    """Metric changes from the per-delivery path, gathered in plain dicts and applied to
    prometheus_client together.

    prometheus_client takes a lock and checks its labels on every inc(), and walks
    the buckets on every observe(); at several changes per delivery that was about
    a tenth of a blackhole delivery's cost (bench/). The changes are applied within
    FLUSH_INTERVAL seconds and before every /metrics answer, so a scrape of this
    process is exact; another worker's figures lag by at most that interval. Used
    from the event loop's thread only.
    """

    FLUSH_INTERVAL = 1.0

    def __init__(self) -> None:
        self._pending: dict[_Incrementable, float] = {}
        self._observed: dict[Histogram, list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, metric: _Incrementable, amount: float = 1.0) -> None:
        """`metric.inc(amount)`, soon. `metric` is a counter or gauge with its labels applied."""
        self._pending[metric] = self._pending.get(metric, 0.0) + amount
        if self._timer is None:
            self._schedule()

    def observe(self, histogram: Histogram, value: float) -> None:
        """`histogram.observe(value)`, soon. `histogram` has its labels applied."""
        values = self._observed.get(histogram)
        if values is None:
            values = self._observed[histogram] = []
        values.append(value)
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL, self.flush)
        except RuntimeError:  # no event loop (a synchronous caller): apply it now
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for metric, amount in pending.items():
            if amount:  # a gauge's +1 and -1 within the interval leave nothing to apply
                metric.inc(amount)
        observed, self._observed = self._observed, {}
        for histogram, values in observed.items():
            _observe_all(histogram, values)


def _observe_all(histogram: Histogram, values: list[float]) -> None:
    """`observe` for each value, with each bucket and the sum written once."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or any(v != v for v in values):  # not as known; NaN
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1  # the first bound >= value, as observe() picks
    total.inc(sum(values))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


#: The service's one tally (one per process).
TALLY = Tally()
