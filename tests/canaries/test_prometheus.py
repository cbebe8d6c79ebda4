"""prometheus_client internals: app/workers.py folds a dead worker's metric files with MmapedDict."""

import inspect
from importlib.metadata import version
from pathlib import Path

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

VERSION = f"prometheus_client {version('prometheus-client')}"
WHERE = "app/workers.py retire_worker_files"


def test_canary_mmaped_dict_reads_adds_and_writes_values(tmp_path: Path) -> None:
    for name in ("read_value", "write_value", "close", "read_all_values_from_file"):
        assert hasattr(MmapedDict, name), f"{VERSION}: MmapedDict.{name} is gone ({WHERE})"
    path = str(tmp_path / "counter_1.db")
    written = MmapedDict(path)  # type: ignore[no-untyped-call]
    written.write_value("key-a", 2.0, 0.0)  # type: ignore[no-untyped-call]
    written.close()  # type: ignore[no-untyped-call]
    rows = list(MmapedDict.read_all_values_from_file(path))  # type: ignore[no-untyped-call]
    assert [(r[0], r[1]) for r in rows] == [("key-a", 2.0)], (
        f"{VERSION}: MmapedDict.read_all_values_from_file no longer yields (key, value, timestamp, pos) ({WHERE})"
    )
    archive = MmapedDict(str(tmp_path / "counter_retired.db"))  # type: ignore[no-untyped-call]
    try:
        value = archive.read_value("key-a")  # type: ignore[no-untyped-call]
        assert value[0] == 0.0, f"{VERSION}: MmapedDict.read_value no longer returns (value, timestamp) ({WHERE})"
    finally:
        archive.close()  # type: ignore[no-untyped-call]


def test_canary_mark_process_dead_takes_a_pid_and_a_directory() -> None:
    parameters = list(inspect.signature(multiprocess.mark_process_dead).parameters)
    assert parameters[:2] == ["pid", "path"], f"{VERSION}: multiprocess.mark_process_dead({parameters}) ({WHERE})"
