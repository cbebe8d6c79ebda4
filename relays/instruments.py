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

from prometheus_client import Counter, Gauge

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
