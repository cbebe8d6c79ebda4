"""The log writer: records and per-delivery events come out as the same lines, in JSON or text."""

import asyncio
import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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


def delivery_line(n: int) -> None:
    logs.event(logging.getLogger("mailrelay.delivery"), f"delivery {n}", {"event": "delivery", "n": n})


def write_calls() -> int:
    """write(2) calls made so far by this thread (the event loop's)."""
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/thread-self/io")


async def answer(n: int) -> None:
    """What a delivery's route does: the core logs its line, the route awaits it before answering."""
    delivery_line(n)
    await logs.written()


async def test_concurrent_deliveries_share_one_write_made_before_their_answers(
    captured: io.StringIO, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.setup_logging("info", "json", stream)
        try:
            await answer(0)  # the writer takes this loop
            before = write_calls()
            await asyncio.gather(*(answer(n) for n in range(1, 21)))
            calls = write_calls() - before
            lines = path.read_text().splitlines()  # before stop(): what the answers waited for
        finally:
            assert logs._writer is not None
            logs._writer.stop()
    assert [json.loads(line)["n"] for line in lines] == list(range(21))
    assert calls == 1


async def test_written_through_numbered_waits_for_the_lines_of_other_tasks(tmp_path: Path) -> None:
    # A batch answers the lines of many deliveries (each its own task) in one write, after this.
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.setup_logging("info", "json", stream)
        try:
            await answer(0)
            for n in range(1, 6):
                asyncio.get_running_loop().call_soon(delivery_line, n)
            await asyncio.sleep(0)  # the lines are made, in the loop's context, not this task's
            assert len(path.read_text().splitlines()) == 1  # theirs are not written yet
            await logs.written(logs.numbered())
            lines = path.read_text().splitlines()
        finally:
            assert logs._writer is not None
            logs._writer.stop()
    assert [json.loads(line)["n"] for line in lines] == list(range(6))


@pytest.fixture
def blocked_pipe(captured: io.StringIO) -> Iterator[tuple[int, int]]:
    """(read end, write end) of a pipe filled to the brim: a log destination that takes nothing."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"#" * 4096)
    os.set_blocking(write, True)
    yield read, write
    os.close(read)
    os.close(write)


def drain(read: int, until: bytes) -> bytes:
    """Reads the pipe (the filler first) until `until` has come."""
    data = b""
    while until not in data:
        data += os.read(read, 65536)
    return data


async def test_an_answer_waits_for_a_blocked_log_at_most_write_wait(
    blocked_pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    read, write = blocked_pipe
    monkeypatch.setattr(logs, "WRITE_WAIT", 0.3)
    logs.setup_logging("info", "json", os.fdopen(write, "w", closefd=False))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await answer(1)
    waited = loop.time() - started
    assert 0.25 < waited < 2  # the answer went out; its line stays queued for the thread
    assert os.get_blocking(write)  # O_NONBLOCK was set only for the loop's own write, and put back
    data = await asyncio.to_thread(drain, read, b'"n":1}\n')  # once read, the thread writes it
    assert data.lstrip(b"#").count(b'"event":"delivery"') == 1


async def test_past_max_queued_lines_are_dropped_and_counted(
    blocked_pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    read, write = blocked_pipe
    monkeypatch.setattr(logs, "WRITE_WAIT", 0.1)
    monkeypatch.setattr(logs, "MAX_QUEUED", 3)
    logs.setup_logging("info", "json", os.fdopen(write, "w", closefd=False))
    for n in range(1, 6):  # one line per loop iteration: the first 3 wait for the thread
        await answer(n)
    data = await asyncio.to_thread(drain, read, b"waited\n")
    lines = data.lstrip(b"#").decode().splitlines()
    assert [json.loads(line)["n"] for line in lines[:-1]] == [1, 2, 3]
    assert lines[-1] == "2 log line(s) dropped: more than 3 waited"


def test_a_delivery_line_says_how_each_hop_travelled_and_whether_it_was_signed() -> None:
    from app.logs import _dkim, _hop
    from schemas.delivery import DkimSignature, HopSecurity

    assert _hop(None) is None
    assert _hop(HopSecurity(encrypted=False)) == "plain"
    assert _hop(HopSecurity(encrypted=True, tls_version="TLSv1.3")) == "TLSv1.3"
    assert _hop(HopSecurity(encrypted=True, tls_version="TLSv1.2", authenticated="dane")) == "TLSv1.2+dane"
    assert _dkim(None) is None
    assert _dkim(DkimSignature(signed=True, domain="example.com", selector="s1", algorithm="ed25519-sha256")) == (
        "example.com/s1"
    )
    assert _dkim(DkimSignature(signed=False, reason="no signing identity for example.org")) == "unsigned"
