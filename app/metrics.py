"""The service's Prometheus metrics, and the /metrics exposition.

Several worker processes: `mailrelay serve --workers N` sets
PROMETHEUS_MULTIPROC_DIR (a private directory) before any worker imports
prometheus_client; every worker writes its values there and the one that
answers /metrics adds them all up. Changes are applied as they happen, with
prometheus_client's own calls (see relays.instruments on the tally that was).
"""

import os
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from relays.instruments import child
from schemas.delivery import DeliveryResult

if TYPE_CHECKING:  # the core imports nothing of ours at run time, and we nothing of it
    from app.delivery import Delivery

#: From 1 ms (blackhole, a pooled SMTP hop) to a minute (the longest deadline worth waiting for).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

DELIVERIES = Counter("mailrelay_deliveries", "deliveries by relay and outcome", ["relay", "outcome"])
RECIPIENTS = Counter(
    "mailrelay_recipients", "recipient outcomes by relay and reply class (2xx, 4xx, 5xx)", ["relay", "reply_class"]
)
DURATION = Histogram(
    "mailrelay_delivery_duration_seconds",
    "time a relay took to deliver, by relay",
    ["relay"],
    buckets=SECONDS_BUCKETS,
)
IN_FLIGHT = Gauge(
    "mailrelay_deliveries_in_flight", "deliveries running now, by relay", ["relay"], multiprocess_mode="livesum"
)
POSSIBLY_DELIVERED = Counter(
    "mailrelay_possibly_delivered",
    "recipients whose outcome is transient although the next hop may have delivered (deadline, lost reply)",
    ["relay"],
)
REFUSED = Counter(
    "mailrelay_deliveries_refused",
    "deliveries refused before they started, by reason (overloaded, draining; store_unavailable, key_in_use, "
    "key_mismatch: the Idempotency-Key's store was down, its request still running, or it named another request)",
    ["relay", "reason"],
)
HTTP_REQUESTS = Counter(
    "mailrelay_http_requests", "HTTP requests by route template, method and status", ["route", "method", "status"]
)
HTTP_DURATION = Histogram(
    "mailrelay_http_request_duration_seconds",
    "HTTP request duration by route template",
    ["route"],
    buckets=SECONDS_BUCKETS,
)
RELOADS = Counter("mailrelay_config_reloads", "configuration reloads (SIGHUP) by result", ["result"])
CONNECTIONS_SHED = Counter(
    "mailrelay_connections_shed",
    "client connections closed to stay within bounds, by reason (idle_closed: the oldest idle one, to make room "
    "under max_connections; refused: none was idle; send_timeout: the client stopped reading)",
    ["reason"],
)

# Idempotency keys (app/idempotency.py, the core's KeyObserver). Bounded labels: relay names, and
# the fixed sets of outcomes and store operations.
IDEMPOTENCY_KEYS = Counter(
    "mailrelay_idempotency_keys",
    "keyed requests by relay and what the key's claim found (claimed; taken_over: a lapsed claim whose data "
    "had not left, sent now; replayed; in_doubt: a lapsed claim whose data may have left, not sent again; "
    "in_use: 409; mismatch: 422; store_unavailable: 503), and deliveries cut by their deadline after the data "
    "left (background_started, background_stored: the true outcome stored, background_cut: shutdown or "
    "finish_timeout, background_full: finish_limit reached, cut at once)",
    ["relay", "outcome"],
)
IDEMPOTENCY_STORE_ERRORS = Counter(
    "mailrelay_idempotency_store_errors",
    "idempotency store calls that failed (unreachable, timed out), by operation (claim, renew, sending, complete, "
    "release)",
    ["operation"],
)
IDEMPOTENCY_CLAIMS_LOST = Counter(
    "mailrelay_idempotency_claims_lost",
    "compare-and-sets that found the claim no longer held (it lapsed and a repeat took the key), by operation",
    ["operation"],
)

# Per-key quotas (relays/rates.py KeyQuotas; the rates' own metrics are in relays/instruments.py).
QUOTA_REFUSALS = Counter(
    "mailrelay_quota_refusals", "requests (or batch lines) answered 429 over an API key's quota, by key name", ["key"]
)


class DeliveryMetrics:
    """The delivery core's observer for the Prometheus metrics."""

    def started(self, delivery: "Delivery") -> None:
        child(IN_FLIGHT, delivery.relay_name).inc()

    def ended(self, delivery: "Delivery") -> None:
        child(IN_FLIGHT, delivery.relay_name).dec()

    def finished(self, delivery: "Delivery", result: DeliveryResult, seconds: float) -> None:
        relay = result.relay
        child(DELIVERIES, relay, result.status).inc()
        child(DURATION, relay).observe(seconds)
        classes: dict[str, int] = {}
        maybe = 0
        for r in result.recipients:
            key = f"{r.reply.code // 100}xx"
            classes[key] = classes.get(key, 0) + 1
            maybe += r.possibly_delivered
        for key, count in classes.items():
            child(RECIPIENTS, relay, key).inc(count)
        if maybe:
            child(POSSIBLY_DELIVERED, relay).inc(maybe)

    def refused(self, relay_name: str, reason: str) -> None:
        child(REFUSED, relay_name, reason).inc()

    def key_event(self, relay_name: str, event: str) -> None:
        child(IDEMPOTENCY_KEYS, relay_name, event).inc()

    def store_error(self, operation: str) -> None:
        child(IDEMPOTENCY_STORE_ERRORS, operation).inc()

    def claim_lost(self, operation: str) -> None:
        child(IDEMPOTENCY_CLAIMS_LOST, operation).inc()


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric (of every worker, in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
