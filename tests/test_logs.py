"""The log writer: records and per-delivery events come out as the same lines, in JSON or text."""

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A buffer for setup_logging; the logging set-up of the test run is put back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._writer)
    stream = io.StringIO()
    yield stream
    if logs._writer is not None and logs._writer is not saved[2]:
        logs._writer.stop()
    root.handlers[:], root.level, logs._writer = saved[0], saved[1], saved[2]


def written(stream: io.StringIO) -> list[str]:
    assert logs._writer is not None
    logs._writer.stop()  # writes what is queued
    return stream.getvalue().splitlines()


def test_an_event_and_a_record_with_the_same_fields_are_the_same_json_line(captured: io.StringIO) -> None:
    logs.setup_logging("info", "json", captured)
    logger = logging.getLogger("mailrelay.delivery")
    fields = {"event": "delivery", "relay": "out", "codes": [250], "elapsed_ms": 1.5}
    logs.event(logger, "delivery via out: delivered", dict(fields))
    logger.info("delivery via out: delivered", extra=dict(fields))
    event, record = (json.loads(line) for line in written(captured))
    assert event.pop("ts")[:2] == record.pop("ts")[:2] == "20"
    assert (
        event
        == record
        == {
            "level": "info",
            "logger": "mailrelay.delivery",
            "event": "delivery",
            "message": "delivery via out: delivered",
            "relay": "out",
            "codes": [250],
            "elapsed_ms": 1.5,
        }
    )


def test_text_lines_carry_the_fields(captured: io.StringIO) -> None:
    logs.setup_logging("info", "text", captured)
    logs.event(logging.getLogger("mailrelay.delivery"), "delivery via out: delivered", {"event": "delivery", "n": 1})
    (line,) = written(captured)
    assert line.endswith(" INFO    mailrelay.delivery: delivery via out: delivered n=1")


def test_events_below_the_level_are_dropped(captured: io.StringIO) -> None:
    logs.setup_logging("warning", "json", captured)
    logs.event(logging.getLogger("mailrelay.delivery"), "not shown", {"event": "delivery"})
    assert written(captured) == []


def test_without_the_service_writer_an_event_is_an_ordinary_record(caplog: pytest.LogCaptureFixture) -> None:
    # In-process callers (tests, an embedding application) keep their own logging.
    with caplog.at_level(logging.INFO, logger="mailrelay.delivery"):
        logs.event(logging.getLogger("mailrelay.delivery"), "delivery via out: delivered", {"event": "delivery"})
    (record,) = caplog.records
    assert (record.getMessage(), getattr(record, "event", None)) == ("delivery via out: delivered", "delivery")


def test_text_no_json_encoder_takes_is_still_logged(captured: io.StringIO) -> None:
    logs.setup_logging("info", "json", captured)
    logging.getLogger("mailrelay").warning("reply %s", "bad \udcff byte", extra={"n": {1: "int key"}})
    (line,) = written(captured)
    entry = json.loads(line)
    assert entry["message"] == "reply bad \udcff byte"
    assert entry["n"] == {"1": "int key"}
