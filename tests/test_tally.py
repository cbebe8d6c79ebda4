"""The metrics tally: hot-path counter and gauge changes, summed and applied together."""

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relays.instruments import Tally


def metrics() -> tuple[Counter, Gauge, CollectorRegistry]:
    registry = CollectorRegistry()
    return Counter("t_total", "t", registry=registry), Gauge("g", "g", registry=registry), registry


async def test_changes_are_applied_together_within_the_interval() -> None:
    counter, gauge, registry = metrics()
    tally = Tally()
    tally.FLUSH_INTERVAL = 0.05
    for _ in range(3):
        tally.add(counter)
        tally.add(gauge)
        tally.add(gauge, -1)
    tally.add(gauge, 2)
    assert registry.get_sample_value("t_total") == 0  # not yet applied
    await asyncio.sleep(0.15)
    assert registry.get_sample_value("t_total") == 3
    assert registry.get_sample_value("g") == 2


async def test_flush_applies_at_once() -> None:
    counter, _, registry = metrics()
    tally = Tally()
    tally.add(counter, 5)
    tally.flush()  # what /metrics does before it answers
    assert registry.get_sample_value("t_total") == 5
    tally.flush()
    assert registry.get_sample_value("t_total") == 5  # nothing applied twice


def test_without_an_event_loop_changes_apply_at_once() -> None:
    counter, _, registry = metrics()
    Tally().add(counter)
    assert registry.get_sample_value("t_total") == 1


def test_histograms_come_out_as_observe_would_make_them() -> None:
    values = [0.0, 0.0004, 0.001, 0.0011, 0.005, 0.3, 2.5, 7.0, 61.0, 1e9]
    buckets = (0.001, 0.005, 0.25, 2.5, 60)
    registries = []
    for batched in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ["relay"], buckets=buckets, registry=registry).labels("out")
        tally = Tally()
        for value in values:
            if batched:
                tally.observe(histogram, value)
            else:
                histogram.observe(value)
        tally.flush()
        registries.append(registry)
    direct, batched_registry = (
        {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in r.collect()
            for s in m.samples
            if s.name != "h_seconds_created"
        }
        for r in registries
    )
    assert direct == batched_registry
    assert direct[("h_seconds_count", (("relay", "out"),))] == len(values)
