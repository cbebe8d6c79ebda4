"""Prometheus metrics the relays keep themselves: connections, DNS, local processes.

Labels are bounded: relay names come from the configuration, results are a
fixed set, and `destination` is the configured host:port of a `static` or
`lmtp` relay, `*` for `mx`: its destinations are recipients' mail hosts, a
series each would grow without bound and name them in /metrics. Correct with several worker
processes: prometheus_client's multiprocess mode is switched on by the
environment before this module is imported (see app.cli).

Changes go straight to prometheus_client, here and in app.metrics: a tally that
summed them and applied them once a second saved about 1.5 us of a blackhole
delivery's ~150 us (4.4 us with --workers, where each change writes the shared
files), too little to keep figures up to a second late; it was removed.
"""

from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

SMTP_CONNECTIONS = Gauge(
    "mailrelay_smtp_connections",
    "SMTP/LMTP connections by state: open (in use, idle or closing) and idle; destination * for mx",
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
MTA_STS_CHECKS = Counter(
    "mailrelay_mta_sts_checks",
    "mx deliveries to a domain with an MTA-STS policy in enforce or testing mode, by result: ok, "
    "no_match (no MX host the policy names), tls_failed (no verified TLS with a host it names)",
    ["relay", "mode", "result"],
)
FLEET_LEASES = Gauge(
    "mailrelay_fleet_leases",
    "fleet-wide connection leases (fleet_connections) this instance holds in Redis; destination * for mx",
    ["relay", "destination"],
    multiprocess_mode="livesum",
)
FLEET_LEASE_WAIT = Histogram(
    "mailrelay_fleet_lease_wait_seconds",
    "deliveries that found every fleet-wide connection lease taken, and the seconds until they had a "
    "connection (a lease, or an idle one of this instance); destination * for mx",
    ["relay", "destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FLEET_FALLBACKS = Counter(
    "mailrelay_fleet_fallbacks",
    "switches to the local limits (concurrent_connections / expected_instances, rounded up) because the "
    "fleet's Redis did not answer",
)
FLEET_LOCAL_LIMITS = Gauge(
    "mailrelay_fleet_local_limits",
    "1 while the fleet's Redis does not answer and fleet-wide connection limits are local ones",
    multiprocess_mode="livemax",
)


# Fleet-wide rates and quotas (relays/rates.py). Bounded labels: relay names (from the configuration)
# and the two kinds of limit set ("rate", "quota"). A relay's message and connection rates share the
# rate series: the 451's text says which one refused.
RATE_WAITS = Counter(
    "mailrelay_rate_waits",
    "deliveries that waited for a relay's max_message_rate, or for a new connection's slot under its "
    "max_connection_rate, by relay",
    ["relay"],
)
RATE_WAIT_SECONDS = Counter(
    "mailrelay_rate_wait_seconds",
    "seconds deliveries waited for a relay's max_message_rate or max_connection_rate, by relay",
    ["relay"],
)
RATE_LIMITED = Counter(
    "mailrelay_rate_limited",
    "deliveries to a destination answered 451 4.4.5 because its max_message_rate or max_connection_rate would "
    "have made them wait past max_rate_wait or the deadline, by relay",
    ["relay"],
)
RATE_FALLBACKS = Counter(
    "mailrelay_rate_fallbacks",
    "times the fleet-wide limits fell back to local ones (Redis unreachable), by kind (rate, quota)",
    ["limit"],
)
RATE_FALLBACK_ACTIVE = Gauge(
    "mailrelay_rate_fallback_active",
    "1 while this process enforces local limits instead of the fleet-wide ones, by kind (rate, quota)",
    ["limit"],
    multiprocess_mode="max",
)

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
_children: dict[tuple[object, tuple[str, ...]], object] = {}


def child(metric: _Metric, *labels: str) -> _Metric:
    """`metric.labels(*labels)`, remembered: `labels()` validates and locks on every call, a
    cost per request on the hot path. Only for labels with a bounded set of values."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found  # type: ignore[return-value]
