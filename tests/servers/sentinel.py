"""Redis behind Sentinel, real: a master, a replica and three sentinels (`redis-server --sentinel`,
the same program as redis-server), on 127.0.0.1 and free ports, without persistence."""

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from tests.servers.process import free_port, require_program, stop, traversable_tmpdir

IP = "127.0.0.1"
SERVICE = "mymaster"


@dataclass
class SentinelSet:
    master: int
    replica: int
    sentinels: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The idempotency store's URL for it."""
        return "redis+sentinel://" + ",".join(f"{IP}:{p}" for p in self.sentinels) + f"/{SERVICE}/0"

    def current_master(self) -> int:
        """The master's port as the first sentinel that answers sees it."""
        for port in self.sentinels:
            try:
                client = redis.Redis(IP, port, socket_timeout=1)
                _host, master = cast(tuple[str, int], client.sentinel_get_master_addr_by_name(SERVICE))
                return int(master)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answered")


def _redis(program: str, directory: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    args = [program, "--bind", IP, "--port", str(port), "--dir", str(directory), "--save", "", "--appendonly", "no"]
    # No 5 s wait before a replica's first sync.
    args += ["--repl-diskless-sync-delay", "0", "--daemonize", "no", *extra]
    with (directory / f"redis-{port}.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603


def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {seconds} s")
        time.sleep(0.1)


def _ready(ports: list[int]) -> bool:
    """Each sentinel sees the two others and a healthy replica (a quicker check passes too early:
    a failover then finds no replica to promote)."""
    for port in ports:
        sentinel = redis.Redis(IP, port, decode_responses=True, socket_timeout=1)
        replicas = sentinel.sentinel_slaves(SERVICE)
        master = cast(dict[str, Any], sentinel.sentinel_master(SERVICE))
        if (
            master["num-other-sentinels"] != 2
            or len(replicas) != 1
            or replicas[0]["flags"] != "slave"
            or replicas[0]["master-link-status"] != "ok"
        ):
            return False
    return True


@contextmanager
def redis_sentinel() -> Iterator[SentinelSet]:
    """Ready when the replica is in sync and every sentinel knows the others and the replica
    (about 3 s); `down-after-milliseconds` 1000, so a killed master is replaced in 2-3 s."""
    program = require_program("redis-server")
    directory = traversable_tmpdir("sentinel")
    found = SentinelSet(free_port(), free_port(), [free_port() for _ in range(3)])
    processes = found.processes
    try:
        processes[found.master] = _redis(program, directory, found.master)
        processes[found.replica] = _redis(program, directory, found.replica, "--replicaof", IP, str(found.master))
        # The replica first: sentinels learn replicas from the master's INFO, then only every 10 s.
        _until(
            lambda: redis.Redis(IP, found.replica).info("replication")["master_link_status"] == "up",
            15,
            "the replica in sync",
        )
        for port in found.sentinels:
            config = directory / f"sentinel-{port}.conf"  # a sentinel rewrites its own: one each
            config.write_text(
                f"bind {IP}\nport {port}\ndir {directory}\n"
                f"sentinel monitor {SERVICE} {IP} {found.master} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n",
                encoding="utf-8",
            )
            with (directory / f"sentinel-{port}.log").open("wb") as log:
                processes[port] = subprocess.Popen(  # noqa: S603
                    [program, str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                )
        _until(lambda: _ready(found.sentinels), 30, "the sentinels ready")
        yield found
    finally:
        for process in processes.values():
            stop(process)
        shutil.rmtree(directory, ignore_errors=True)
