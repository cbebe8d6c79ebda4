"""Idempotency keys: a repeat replays the first result and sends nothing, in memory and across instances via Redis."""

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.idempotency import Claimed, InDoubt, MemoryStore, Mismatch, Replay, Running, StoredResponse
from schemas.config import IdempotencySettings
from tests.servers.mailrelay import service
from tests.servers.redis import redis_server
from tests.servers.smtp import Script, smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}


def static_yaml(port: int, extra: str = "") -> str:
    return f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {port}}}\n{extra}"


def test_a_repeat_replays_the_result_and_sends_nothing(make_client: Callable[[str], TestClient]) -> None:
    with smtp_server() as server:
        client = make_client(static_yaml(server.port))
        first = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "order-1"})
        second = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "order-1"})
        other = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "order-2"})
        assert len(server.received) == 2  # order-1 once, order-2 once
    assert first.status_code == second.status_code == other.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert second.headers["x-smtp-reply"] == first.headers["x-smtp-reply"]


def test_a_permanent_failure_is_final_and_replayed(make_client: Callable[[str], TestClient]) -> None:
    with smtp_server(Script(rcpt={"b@example.net": "550 5.1.1 No such user"})) as server:
        client = make_client(static_yaml(server.port))
        first = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
        second = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
    assert first.status_code == second.status_code == 400
    assert second.headers["idempotent-replayed"] == "true"


def test_a_transient_failure_is_not_stored_so_the_key_may_be_retried(
    make_client: Callable[[str], TestClient],
) -> None:
    script = Script(rcpt={"b@example.net": "451 4.3.0 Try later"})
    with smtp_server(script) as server:
        client = make_client(static_yaml(server.port))
        first = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
        script.rcpt.clear()  # the next hop recovers
        retry = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
        again = client.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
        assert len(server.received) == 1
    assert first.status_code == 503
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    assert again.headers["idempotent-replayed"] == "true"


def test_the_same_key_for_a_different_request_is_422(make_client: Callable[[str], TestClient]) -> None:
    client = make_client("relay:\n  a: {type: blackhole}\n  b: {type: blackhole}\n")
    assert client.post("/relays/a/deliver", json=BODY, headers={"Idempotency-Key": "k"}).status_code == 200
    for relay, body in (
        ("a", {**BODY, "message": "Subject: other\r\n\r\nhi\r\n"}),
        ("a", {**BODY, "recipients": ["c@example.net"]}),
        ("a", {**BODY, "sender": ""}),
        ("b", BODY),
    ):
        response = client.post(f"/relays/{relay}/deliver", json=body, headers={"Idempotency-Key": "k"})
        assert response.status_code == 422
        assert "used for a different request" in response.json()["detail"]


def test_keys_are_per_api_key(make_client: Callable[[str], TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILRELAY_API_KEYS", "first-client-key-0123,second-client-key-0123")
    client = make_client("relay:\n  a: {type: blackhole}\n")
    first = {"Authorization": "Bearer first-client-key-0123", "Idempotency-Key": "k"}
    second = {"Authorization": "Bearer second-client-key-0123", "Idempotency-Key": "k"}
    assert client.post("/relays/a/deliver", json=BODY, headers=first).status_code == 200
    other = {**BODY, "message": "Subject: theirs\r\n\r\nhi\r\n"}
    response = client.post("/relays/a/deliver", json=other, headers=second)
    assert response.status_code == 200  # not a 422: another client's key
    assert "idempotent-replayed" not in response.headers


@pytest.mark.parametrize("value", ["", "x" * 256, "caf\u00e9"])
def test_an_invalid_key_is_422(client: TestClient, value: str) -> None:
    response = client.post(
        "/relays/blackhole/deliver",
        content=json.dumps(BODY).encode(),
        headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", value.encode())],
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == "Idempotency-Key"


async def test_memory_store_claims_replays_and_expires() -> None:
    store = MemoryStore(IdempotencySettings(ttl=1, max_entries=2))
    claim = await store.claim("k", "fp")
    assert isinstance(claim, Claimed)
    assert isinstance(await store.claim("k", "fp"), Running)
    assert isinstance(await store.claim("k", "other"), Mismatch)
    response = StoredResponse(200, {"x-smtp-reply": "250"}, b"{}")
    assert await store.complete("k", claim, "fp", response)
    replay = await store.claim("k", "fp")
    assert isinstance(replay, Replay)
    assert replay.response == response
    # Bounded: a third key pushes out the oldest stored result, never a running claim.
    running = await store.claim("r", "fp")
    assert isinstance(running, Claimed)
    assert isinstance(await store.claim("n", "fp"), Claimed)
    assert len(store) == 2
    assert isinstance(await store.claim("r", "fp"), Running)
    # A released claim frees the key; a stored result expires after ttl.
    assert await store.release("r", running)
    assert not await store.release("r", running)
    assert isinstance(await store.claim("r", "fp"), Claimed)


async def test_memory_store_leases_lapse_into_a_takeover_or_doubt() -> None:
    store = MemoryStore(IdempotencySettings(lease=0.1))
    quiet = await store.claim("quiet", "fp")
    sent = await store.claim("sent", "fp")
    renewed = await store.claim("renewed", "fp")
    assert isinstance(quiet, Claimed)
    assert isinstance(sent, Claimed)
    assert isinstance(renewed, Claimed)
    assert await store.sending("sent", sent)
    for _ in range(3):
        await asyncio.sleep(0.05)
        assert await store.renew([("renewed", renewed)]) == [True]
    assert isinstance(await store.claim("renewed", "fp"), Running)
    # Lapsed before the data: taken over, and the old holder can no longer store anything.
    taken = await store.claim("quiet", "fp")
    assert isinstance(taken, Claimed)
    assert taken.taken_over
    assert not await store.complete("quiet", quiet, "fp", StoredResponse(200, {}, b"{}"))
    assert await store.renew([("quiet", quiet), ("quiet", taken)]) == [False, True]
    # Lapsed after it said the data was leaving: in doubt, for every repeat, never claimed again.
    assert isinstance(await store.claim("sent", "fp"), InDoubt)
    assert isinstance(await store.claim("sent", "fp"), InDoubt)
    assert isinstance(await store.claim("sent", "other"), Mismatch)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def test_two_instances_sharing_redis_replay_each_others_results(tmp_path: Path) -> None:
    with redis_server() as redis_url, smtp_server(Script(data_delay=0.8)) as server:
        config = write(
            tmp_path,
            "mailrelay.yaml",
            static_yaml(server.port, f"mailrelay:\n  idempotency: {{backend: redis, redis_url: '{redis_url}'}}\n"),
        )
        with service(config) as a, service(config) as b:
            async with httpx.AsyncClient(timeout=30) as http:
                key = {"Idempotency-Key": "shared-1"}
                # B asks while A's delivery still runs: 409, nothing sent twice.
                running = asyncio.create_task(http.post(f"{a.url}/relays/out/deliver", json=BODY, headers=key))
                await asyncio.sleep(0.4)
                busy = await http.post(f"{b.url}/relays/out/deliver", json=BODY, headers=key)
                first = await running
                replayed = await http.post(f"{b.url}/relays/out/deliver", json=BODY, headers=key)
                mismatch = await http.post(
                    f"{b.url}/relays/out/deliver", json={**BODY, "sender": "other@example.com"}, headers=key
                )
        assert len(server.received) == 1
    assert busy.status_code == 409
    assert busy.headers["retry-after"] == "1"
    assert first.status_code == 200
    assert replayed.status_code == 200
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == first.json()
    assert mismatch.status_code == 422


async def test_an_unreachable_redis_refuses_keyed_deliveries_and_sends_nothing(tmp_path: Path) -> None:
    with redis_server() as redis_url:
        pass  # started and stopped: the port is closed now
    with smtp_server() as server:
        config = write(
            tmp_path,
            "mailrelay.yaml",
            static_yaml(server.port, f"mailrelay:\n  idempotency: {{backend: redis, redis_url: '{redis_url}'}}\n"),
        )
        with service(config) as running:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                keyed = await http.post("/relays/out/deliver", json=BODY, headers={"Idempotency-Key": "k"})
                plain = await http.post("/relays/out/deliver", json=BODY)
                metrics = (await http.get("/metrics")).text
            logs = running.logs()
        assert len(server.received) == 1  # only the request without a key
    assert keyed.status_code == 503
    assert keyed.headers["content-type"] == "application/problem+json"
    assert "idempotency store is unavailable" in keyed.json()["detail"]
    assert plain.status_code == 200
    assert "idempotency store unavailable" in logs
    # Counted as a refusal, and as a store error of the claim.
    assert 'mailrelay_deliveries_refused_total{reason="store_unavailable",relay="out"} 1.0' in metrics
    assert 'mailrelay_idempotency_store_errors_total{operation="claim"} 1.0' in metrics


def test_the_redis_backend_needs_a_url() -> None:
    from schemas.config import ConfigError
    from tests.conftest import config_from

    with pytest.raises(ConfigError) as caught:
        config_from("relay:\n  a: {type: blackhole}\nmailrelay:\n  idempotency: {backend: redis}\n")
    assert [str(p) for p in caught.value.problems] == [
        "mailrelay.idempotency: the redis backend needs `redis_url` (or $MAILRELAY_REDIS_URL)"
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://127.0.0.1/mymaster", "needs host:port for each sentinel, not '127.0.0.1'"),
        ("redis+sentinel://127.0.0.1:26379", "needs the monitored master's name"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "database must be a number"),
        ("http://127.0.0.1:6379", "must start with redis://, rediss://, unix:// or redis+sentinel://"),
    ],
)
def test_a_redis_url_is_checked_when_the_configuration_loads(url: str, problem: str) -> None:
    from schemas.config import ConfigError, parse_sentinel_url
    from tests.conftest import config_from

    with pytest.raises(ConfigError) as caught:
        config_from(
            f"relay:\n  a: {{type: blackhole}}\nmailrelay:\n  idempotency: {{backend: redis, redis_url: '{url}'}}\n"
        )
    assert problem in str(caught.value.problems[0])
    good = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,[::1]:26380/cache/3")
    assert good.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (good.service, good.db, good.password) == ("cache", 3, "s@cret")


def test_a_raw_form_partial_answered_503_is_not_stored(make_client: Callable[[str], TestClient]) -> None:
    import base64

    client = make_client(
        "relay:\n  s: {type: custom, factory: 'tests.scripted:factory', replies: {bad@example.net: '550 5.1.1 no'}}\n"
    )
    headers = {
        "Content-Type": "message/rfc822",
        "Idempotency-Key": "raw-1",
        "X-Envelope-Sender": base64.b64encode(b"a@example.com").decode(),
        "X-Envelope-Recipient": ",".join(base64.b64encode(r).decode() for r in (b"b@example.net", b"bad@example.net")),
    }
    first = client.post("/relays/s/deliver", content=b"Subject: x\r\n\r\nhi\r\n", headers=headers)
    again = client.post("/relays/s/deliver", content=b"Subject: x\r\n\r\nhi\r\n", headers=headers)
    # "Retry the whole envelope" must not be replayed to the retry it asks for.
    assert first.status_code == again.status_code == 503
    assert "idempotent-replayed" not in again.headers


async def test_memory_store_is_bounded_in_bytes_and_keeps_running_claims() -> None:
    from app.idempotency import ENTRY_OVERHEAD

    store = MemoryStore(IdempotencySettings(max_bytes=64 * 1024))
    big = StoredResponse(
        200, {"X-Smtp-Reply": "250"}, json.dumps([f"r{i}@example.net delivered" for i in range(800)]).encode()
    )
    running = await store.claim("running", "fp")
    assert isinstance(running, Claimed)
    for i in range(200):
        claim = await store.claim(f"k{i}", "fp")
        assert isinstance(claim, Claimed)
        await store.complete(f"k{i}", claim, "fp", big)
        assert store.bytes <= store.max_bytes
    assert isinstance(await store.claim("running", "fp"), Running)  # never evicted
    assert isinstance(await store.claim("k0", "fp"), Claimed)  # the oldest result went first
    replay = await store.claim("k199", "fp")
    assert isinstance(replay, Replay)
    assert replay.response == big  # compressed, and given back as it was
    # Roughly what is counted: a compressed 23 KB answer takes far less than its size.
    assert len(store) > 20
    assert store.bytes / len(store) < len(big.body) / 4 + ENTRY_OVERHEAD


async def test_memory_store_keeps_a_result_larger_than_itself_alone() -> None:
    # Never a silent second copy: a repeat is replayed even then; the store holds that one result.
    store = MemoryStore(IdempotencySettings(max_bytes=64 * 1024))
    first = await store.claim("small", "fp")
    assert isinstance(first, Claimed)
    await store.complete("small", first, "fp", StoredResponse(200, {}, b"{}"))
    claim = await store.claim("k", "fp")
    assert isinstance(claim, Claimed)
    body = os.urandom(100_000)  # incompressible
    await store.complete("k", claim, "fp", StoredResponse(200, {}, body))
    assert len(store) == 1  # the older result made room
    replay = await store.claim("k", "fp")
    assert isinstance(replay, Replay)
    assert replay.response.body == body
