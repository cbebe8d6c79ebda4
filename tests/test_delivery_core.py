"""The delivery core without HTTP: slots, the deadline, idempotency keys, observers."""

import asyncio
import json
import logging
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app import idempotency
from app.delivery import Answer, Deadline, Delivery, DeliveryCore, KeyEvent, RefusalReason, Refused
from app.idempotency import IdempotencyStore, MemoryStore, RedisStore, StoredResponse
from app.lifespan import Runtime, Services
from app.limits import Limiter
from relays.base import DeliveryContext, Relay
from relays.custom import load_custom_relay
from relays.redis_link import REDIS_TIMEOUT
from relays.registry import open_relays
from schemas.config import IdempotencySettings, LimitSettings
from schemas.delivery import DeliveryResult, Envelope, RecipientResult
from schemas.relay_options import CustomOptions
from schemas.reply import Reply
from tests.conftest import config_from, envelope, opened
from tests.scripted import ScriptedRelay
from tests.servers.dns import dns_server
from tests.servers.process import free_port
from tests.servers.redis import redis_instance
from tests.servers.smtp import Script, smtp_server


@dataclass
class Recorder:
    """An observer that keeps what it was told."""

    events: list[tuple[str, str]] = field(default_factory=list)
    results: list[DeliveryResult] = field(default_factory=list)

    def started(self, delivery: Delivery) -> None:
        self.events.append(("started", delivery.relay_name))

    def ended(self, delivery: Delivery) -> None:
        self.events.append(("ended", delivery.relay_name))

    def finished(self, delivery: Delivery, result: DeliveryResult, seconds: float) -> None:
        self.events.append(("finished", result.status))
        self.results.append(result)

    def refused(self, relay_name: str, reason: RefusalReason) -> None:
        self.events.append(("refused", reason))

    def key_event(self, relay_name: str, event: KeyEvent) -> None:
        self.events.append(("key", event))

    def store_error(self, operation: idempotency.Operation) -> None:
        self.events.append(("store_error", operation))

    def claim_lost(self, operation: idempotency.Operation) -> None:
        self.events.append(("claim_lost", operation))


def make_core(
    recorder: Recorder,
    *,
    max_in_flight: int = 10,
    queue_timeout: float = 1.0,
    relay: str = "out",
    store: IdempotencyStore | None = None,
) -> DeliveryCore:
    limits = LimitSettings(max_in_flight=max_in_flight, queue_timeout=queue_timeout)
    return DeliveryCore(
        Limiter(limits, [relay]),
        store if store is not None else MemoryStore(IdempotencySettings()),
        [recorder],
        queue_timeout=queue_timeout,
        retry_after=30,
    )


def scripted(**options: object) -> ScriptedRelay:
    return ScriptedRelay(dict(options))


def delivery(relay: Relay, env: Envelope, *, seconds: float = 10.0, key: str | None = None) -> Delivery:
    return Delivery("out", relay, env, Deadline.within(seconds), "client-a", key)


def statuses(answer: Answer) -> list[str]:
    """The recipients' statuses as the client reads them from the body."""
    return [r["status"] for r in json.loads(answer.body)["recipients"]]


async def test_a_delivery_answers_with_every_recipient_and_tells_the_observers() -> None:
    recorder = Recorder()
    relay = scripted(replies={"bad@example.net": "550 5.1.1 no such user"})
    answer = await make_core(recorder).deliver(delivery(relay, envelope("bob@example.net", "bad@example.net")))
    assert answer.status == 207
    assert not answer.replayed
    assert answer.result is not None
    assert answer.result.status == "partial"
    assert answer.headers["X-Smtp-Reply"] == '550; message="5.1.1 no such user"'
    assert statuses(answer) == ["delivered", "permanent_failure"]
    assert recorder.events == [("started", "out"), ("ended", "out"), ("finished", "partial")]


async def test_a_partial_outcome_for_the_whole_envelope_is_a_transient_answer() -> None:
    relay = scripted(replies={"bad@example.net": "550 5.1.1 no such user"})
    job = delivery(relay, envelope("bob@example.net", "bad@example.net"))
    job.retry_whole_envelope = True
    answer = await make_core(Recorder()).deliver(job)
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "30"
    assert answer.headers["X-Smtp-Reply"].startswith('451; message="4.5.0 Partial delivery: 1 of 2 recipients failed')


async def test_a_relay_cut_off_after_it_said_data_sent_answers_possibly_delivered() -> None:
    relay = scripted(stall_after_data=30)
    answer = await make_core(Recorder()).deliver(delivery(relay, envelope("bob@example.net"), seconds=0.2))
    assert answer.status == 503
    assert answer.result is not None
    (result,) = answer.result.recipients
    assert result.possibly_delivered
    assert result.reply.code == 451
    assert result.reply.command == "[DEADLINE]"
    assert "may have been delivered" in result.reply.message


async def test_a_relay_cut_off_before_any_data_answers_not_delivered() -> None:
    relay = scripted(delay=30)
    answer = await make_core(Recorder()).deliver(delivery(relay, envelope("bob@example.net"), seconds=0.2))
    assert answer.result is not None
    (result,) = answer.result.recipients
    assert not result.possibly_delivered
    assert result.reply.message == "4.4.7 Delivery deadline (0.2 s) reached; not delivered"


async def test_a_one_argument_custom_relay_cut_off_is_possibly_delivered() -> None:
    # It cannot say when the message left: the honest answer is "maybe".
    relay = load_custom_relay(
        "old", CustomOptions(type="custom", factory="tests.scripted:one_argument_factory", delay=30)
    )
    answer = await make_core(Recorder()).deliver(delivery(relay, envelope("bob@example.net"), seconds=0.2))
    assert answer.result is not None
    assert [r.possibly_delivered for r in answer.result.recipients] == [True]
    relay = load_custom_relay("old", CustomOptions(type="custom", factory="tests.scripted:one_argument_factory"))
    answer = await make_core(Recorder()).deliver(delivery(relay, envelope("bob@example.net")))
    assert answer.status == 200


async def test_a_relay_that_raises_gives_its_slot_back() -> None:
    recorder = Recorder()
    core = make_core(recorder, max_in_flight=1)
    with pytest.raises(RuntimeError, match="scripted failure"):
        await core.deliver(delivery(scripted(misbehave="raise"), envelope("bob@example.net")))
    assert recorder.events == [("started", "out"), ("ended", "out")]
    answer = await core.deliver(delivery(scripted(), envelope("bob@example.net")))
    assert answer.status == 200


async def test_no_free_slot_within_the_queue_timeout_is_refused_and_counted() -> None:
    recorder = Recorder()
    core = make_core(recorder, max_in_flight=1, queue_timeout=0.1)
    running = asyncio.ensure_future(core.deliver(delivery(scripted(delay=5), envelope("a@example.net"))))
    await asyncio.sleep(0.05)
    with pytest.raises(Refused) as refused:
        await core.deliver(delivery(scripted(), envelope("b@example.net")))
    assert (refused.value.status, refused.value.reason, refused.value.retry_after) == (503, "overloaded", 1)
    assert "the service already has 1 deliveries in flight" in refused.value.detail
    assert ("refused", "overloaded") in recorder.events
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_key_replays_a_final_answer_and_refuses_a_different_request() -> None:
    core = make_core(Recorder())
    relay = scripted()
    first = await core.deliver(delivery(relay, envelope("bob@example.net"), key="k1"))
    again = await core.deliver(delivery(relay, envelope("bob@example.net"), key="k1"))
    assert (first.status, again.status, again.replayed) == (200, 200, True)
    assert again.body == first.body
    assert again.headers == first.headers
    assert len(relay.delivered) == 1
    with pytest.raises(Refused) as refused:
        await core.deliver(delivery(relay, envelope("carol@example.net"), key="k1"))
    assert (refused.value.status, refused.value.reason) == (422, "key_mismatch")


async def test_a_key_is_per_caller() -> None:
    core = make_core(Recorder())
    relay = scripted()
    await core.deliver(delivery(relay, envelope("bob@example.net"), key="k1"))
    other = delivery(relay, envelope("bob@example.net"), key="k1")
    other.caller = "client-b"
    assert not (await core.deliver(other)).replayed
    assert len(relay.delivered) == 2


async def test_a_key_in_use_is_refused_and_a_transient_outcome_frees_it() -> None:
    core = make_core(Recorder())
    slow = scripted(delay=0.3, replies={"bob@example.net": "451 4.3.0 later"})
    running = asyncio.ensure_future(core.deliver(delivery(slow, envelope("bob@example.net"), key="k2")))
    await asyncio.sleep(0.05)
    with pytest.raises(Refused) as refused:
        await core.deliver(delivery(slow, envelope("bob@example.net"), key="k2"))
    assert (refused.value.status, refused.value.reason, refused.value.retry_after) == (409, "key_in_use", 1)
    assert (await running).status == 503
    retried = await core.deliver(delivery(scripted(), envelope("bob@example.net"), key="k2"))
    assert (retried.status, retried.replayed) == (200, False)


async def test_a_relay_that_breaks_the_contract_is_a_bug() -> None:
    class Backwards:
        async def deliver(self, env: Envelope, context: DeliveryContext) -> list[RecipientResult]:
            reply = Reply.parse(250, "2.0.0 Ok")
            return [RecipientResult(recipient=r, reply=reply) for r in reversed(env.recipients)]

        async def aclose(self) -> None:
            pass

    with pytest.raises(RuntimeError, match="out of recipient order"):
        await make_core(Recorder()).deliver(delivery(Backwards(), envelope("a@example.net", "b@example.net")))


async def test_an_mx_recipient_with_a_trailing_dot_cut_off_after_the_data_is_possibly_delivered() -> None:
    # RCPT drops the dot (bob@forced.test); the answer must still find bob@forced.test. as handed over.
    with smtp_server(Script(data_delay=5)) as server:
        config = f"relay:\n  out: {{type: mx, force_mx: {{forced.test: '127.0.0.1:{server.port}'}}}}\n"
        async with opened(config) as relays:
            job = delivery(relays["out"], envelope("bob@forced.test.", "carol@forced.test"), seconds=1.0)
            answer = await make_core(Recorder()).deliver(job)
    assert answer.result is not None
    assert [r.possibly_delivered for r in answer.result.recipients] == [True, True]


async def test_a_result_stored_by_an_earlier_version_is_replayed_without_command() -> None:
    # Earlier versions wrote `; command=` into X-Smtp-Reply; slimta's HttpRelay hangs on it.
    core = make_core(Recorder())
    job = delivery(scripted(), envelope("bob@example.net"), key="old")
    key = idempotency.scoped_key(job.caller, "old")
    fingerprint = idempotency.fingerprint(job.relay_name, job.envelope)
    claim = await core.store.claim(key, fingerprint)
    assert isinstance(claim, idempotency.Claimed)
    header = '550; message="5.1.1 no such user"; command="RCPT"'
    await core.store.complete(key, claim, fingerprint, StoredResponse(400, {"x-smtp-reply": header}, b"{}"))
    answer = await core.deliver(job)
    assert answer.replayed
    assert answer.headers == {"x-smtp-reply": '550; message="5.1.1 no such user"'}


async def test_a_shutdown_cuts_running_deliveries_with_an_honest_answer() -> None:
    """cut_running (the end of shutdown_grace) answers like a deadline cut: 451 4.4.7, possibly
    delivered only where the data had left, and a text that names the shutdown; never an error."""
    core = make_core(Recorder())
    sent = asyncio.ensure_future(core.deliver(delivery(scripted(stall_after_data=30), envelope("a@example.net"))))
    waiting = asyncio.ensure_future(core.deliver(delivery(scripted(delay=30), envelope("b@example.net"))))
    await asyncio.sleep(0.05)
    assert core.cut_running() == 2
    for task, maybe in ((sent, True), (waiting, False)):
        answer = await asyncio.wait_for(task, 2)
        assert answer.status == 503
        body = json.loads(answer.body)["recipients"][0]
        assert body["possibly_delivered"] is maybe
        assert body["reply"]["code"] == 451
        assert body["reply"]["enhanced_status"] == "4.4.7"
        assert "shut down" in body["reply"]["message"]


async def test_a_deadline_cut_after_the_data_keeps_the_key_and_a_shutdown_cuts_the_background() -> None:
    recorder = Recorder()
    core = make_core(recorder)
    relay = scripted(stall_after_data=30)
    cut = await core.deliver(delivery(relay, envelope("bob@example.net"), seconds=0.2, key="k"))
    assert cut.status == 503
    assert len(core.finishing) == 1  # still waiting for the next hop, with the claim
    with pytest.raises(Refused) as refused:
        await core.deliver(delivery(relay, envelope("bob@example.net"), key="k"))
    assert refused.value.status == 409
    assert core.cut_running() == 1
    await asyncio.sleep(0.01)
    assert not core.finishing
    assert ("key", "background_started") in recorder.events
    assert ("key", "background_cut") in recorder.events
    assert len(relay.delivered) == 1


async def test_past_finish_limit_a_cut_answer_is_stored_never_sent_again() -> None:
    recorder = Recorder()
    core = make_core(recorder, store=MemoryStore(IdempotencySettings(finish_limit=0)))
    relay = scripted(stall_after_data=30)
    cut = await core.deliver(delivery(relay, envelope("bob@example.net"), seconds=0.2, key="k"))
    again = await core.deliver(delivery(relay, envelope("bob@example.net"), key="k"))
    assert (cut.status, again.status, again.replayed) == (503, 503, True)
    assert again.body == cut.body
    assert json.loads(again.body)["recipients"][0]["possibly_delivered"] is True
    assert len(relay.delivered) == 1
    assert ("key", "background_full") in recorder.events


async def test_a_store_that_stops_answering_neither_stops_the_delivery_nor_holds_it_long() -> None:
    """The step before the data leaves never raises and is bounded (REDIS_TIMEOUT): Redis stops
    answering after the claim (SIGSTOP), the delivery goes on, the failures are logged and counted."""
    recorder = Recorder()
    with redis_instance() as redis:
        store = RedisStore(IdempotencySettings(backend="redis", redis_url=redis.url))
        core = make_core(recorder, store=store)
        relay = scripted(delay=0.3, stall_after_data=0.1)
        running = asyncio.ensure_future(core.deliver(delivery(relay, envelope("bob@example.net"), key="k")))
        await asyncio.sleep(0.1)
        redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer = await asyncio.wait_for(running, 10)
            took = time.monotonic() - started
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await store.aclose()
    assert answer.status == 200
    assert len(relay.delivered) == 1
    assert ("store_error", "sending") in recorder.events
    assert ("store_error", "complete") in recorder.events
    # The relay's 0.3 s, at most 2 s for the progress record and 2 s for the result.
    assert took < 0.3 + 2 * REDIS_TIMEOUT + 1


async def test_a_relay_that_raises_after_sending_keeps_the_claim() -> None:
    # A bug after the data left: the key is not freed for a second copy; the claim lapses into doubt.
    store = MemoryStore(IdempotencySettings(lease=0.1))
    core = make_core(Recorder(), store=store)

    class Broken:
        async def deliver(self, env: Envelope, context: DeliveryContext) -> list[RecipientResult]:
            await context.sending(env.recipients)
            raise RuntimeError("broken after the data")

        async def aclose(self) -> None:
            pass

    with pytest.raises(RuntimeError):
        await core.deliver(delivery(Broken(), envelope("bob@example.net"), key="k"))
    await asyncio.sleep(0.15)
    answer = await core.deliver(delivery(scripted(), envelope("bob@example.net"), key="k"))
    assert answer.status == 503
    (result,) = json.loads(answer.body)["recipients"]
    assert result["possibly_delivered"] is True
    assert "not sent again" in result["reply"]["message"]


async def test_a_claim_lost_before_the_result_is_stored_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    store = MemoryStore(IdempotencySettings())
    core = make_core(recorder, store=store)

    class Forgetful:
        """The store loses the claim while the delivery runs (a restart without persistence)."""

        async def deliver(self, env: Envelope, context: DeliveryContext) -> list[RecipientResult]:
            await store.aclose()
            reply = Reply.parse(250, "2.0.0 Ok")
            return [RecipientResult(recipient=r, reply=reply) for r in env.recipients]

        async def aclose(self) -> None:
            pass

    answer = await core.deliver(delivery(Forgetful(), envelope("bob@example.net"), key="k"))
    assert answer.status == 200
    assert ("claim_lost", "complete") in recorder.events
    assert "idempotency claim lost before its result was stored" in caplog.text


class SlowToStop:
    """A relay that takes a while to unwind once cut (a session saying QUIT, a pool tidying up)."""

    async def deliver(self, env: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            raise
        raise AssertionError("never reached")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_shutdown_cut_repeated_while_cut_deliveries_unwind_cuts_the_others(keyed: bool) -> None:
    """The drain calls cut_running every 20 ms during CUT_MARGIN: a delivery already cut (by its
    deadline, or the previous call) and still unwinding must not make it raise (asyncio's Timeout
    refuses a reschedule once expired), which left the deliveries after it in the set uncut."""
    core = make_core(Recorder())
    key = "k" if keyed else None
    unwinding = asyncio.ensure_future(core.deliver(delivery(SlowToStop(), envelope("a@example.net"), seconds=0.05)))
    await asyncio.sleep(0.15)  # its deadline cut it; it is unwinding
    assert not unwinding.done()
    waiting = asyncio.ensure_future(core.deliver(delivery(scripted(delay=30), envelope("b@example.net"), key=key)))
    await asyncio.sleep(0.02)
    assert core.cut_running() == 2
    await asyncio.sleep(0.02)
    core.cut_running()  # again, as the drain's loop does
    answer = await asyncio.wait_for(waiting, 2)
    assert answer.status == 503
    assert "shut down" in json.loads(answer.body)["recipients"][0]["reply"]["message"]
    assert (await asyncio.wait_for(unwinding, 2)).status == 503


async def test_the_drain_waits_within_its_grace_for_deliveries_finishing_in_the_background() -> None:
    """Services.wait_idle (the drain, before the relays and the store are closed) counts a keyed
    delivery that goes on after its deadline cut: it stores its true result. It returned as soon as
    no request ran, and the relays were closed under such a delivery."""
    config = config_from(
        "relay:\n  out:\n    type: custom\n    factory: tests.scripted:factory\n    stall_after_data: 0.5\n"
    )
    services = Services(Runtime.build(config, await open_relays(config)))
    core, relay = services.current.core, services.current.relays["out"]
    try:
        job = Delivery("out", relay, envelope("bob@example.net"), Deadline.within(0.1), "client-a", "k")
        cut = await core.deliver(job)
        assert cut.status == 503
        assert core.finishing
        assert services.active == 0
        assert await services.wait_idle(5)
        assert not core.finishing
        again = await core.deliver(
            Delivery("out", relay, envelope("bob@example.net"), Deadline.within(5), "client-a", "k")
        )
        assert (again.status, again.replayed) == (200, True)
    finally:
        await services.aclose()


async def test_a_claim_lost_before_the_data_left_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The event loop stalls past the lease, and a repeat takes the lapsed key over and sends: the first
    delivery, reaching the step before its data leaves, finds the claim gone. It sent anyway (a second
    copy, only logged); now it stops there, nothing sent, answered 409 like a key in use."""
    recorder = Recorder()
    core = make_core(recorder, store=MemoryStore(IdempotencySettings(lease=0.05)))
    second = scripted()
    repeats: list[asyncio.Future[Answer]] = []

    class Stalled:
        def __init__(self) -> None:
            self.delivered: list[Envelope] = []

        async def deliver(self, env: Envelope, context: DeliveryContext) -> list[RecipientResult]:
            time.sleep(0.1)  # noqa: ASYNC251 - the loop stalls (no renewal) for longer than the lease
            repeats.append(asyncio.ensure_future(core.deliver(delivery(second, env, key="k"))))
            await asyncio.sleep(0.02)  # the repeat takes the lapsed claim over and delivers
            await context.sending(env.recipients)
            self.delivered.append(env)
            reply = Reply.parse(250, "2.0.0 Ok", "[SEND_DATA]")
            return [RecipientResult(recipient=r, reply=reply) for r in env.recipients]

        async def aclose(self) -> None:
            pass

    first = Stalled()
    with pytest.raises(Refused) as refused:
        await core.deliver(delivery(first, envelope("bob@example.net"), key="k"))
    assert refused.value.status == 409
    (repeat,) = repeats
    assert (await repeat).status == 200
    assert len(first.delivered) + len(second.delivered) == 1
    assert ("claim_lost", "sending") in recorder.events
    again = await core.deliver(delivery(scripted(), envelope("bob@example.net"), key="k"))
    assert (again.status, again.replayed) == (200, True)


class TakenOver(RedisStore):
    """Redis, with the process stalled past the lease right before the data leaves, and another
    instance's repeat taking the lapsed key over then."""

    async def sending(self, key: str, claim: idempotency.Claimed) -> bool:
        time.sleep(0.2)  # noqa: ASYNC251 - the stall (no renewal)
        repeat = await self.claim(key, claim.fingerprint)
        assert isinstance(repeat, idempotency.Claimed)
        assert repeat.taken_over
        return await super().sending(key, claim)


async def test_a_claim_lost_while_recipients_go_at_once_sends_to_none(tmp_path: Path) -> None:
    """`pipe` runs its recipients at once, each awaiting `sending` before its command starts. The
    first records the progress in Redis; the second went ahead while that round trip ran (the hook
    runs once), started its command, and the claim then found lost answered 409 "nothing was sent
    here" (the route gives the quota back on it). Every recipient waits for the record: none sends."""
    received = tmp_path / "received"
    received.mkdir()
    command = tmp_path / "deliver.sh"
    command.write_text(f'#!/bin/sh\ncat > "{received}/$1"\n')
    command.chmod(0o755)
    with redis_instance() as redis:
        store = TakenOver(IdempotencySettings(backend="redis", redis_url=redis.url, lease=0.05))
        recorder = Recorder()
        core = make_core(recorder, store=store)
        pipe = f"relay:\n  out:\n    type: pipe\n    args: ['{command}', '{{recipient}}']\n"
        try:
            async with opened(pipe) as relays:
                with pytest.raises(Refused) as refused:
                    await core.deliver(delivery(relays["out"], envelope("a@example.net", "b@example.net"), key="k"))
                # The relay's other tasks end (a command started goes on to its end).
                others = asyncio.all_tasks() - {asyncio.current_task()}
                await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 10)
        finally:
            await store.aclose()
    assert refused.value.status == 409
    assert ("claim_lost", "sending") in recorder.events
    assert sorted(p.name for p in received.iterdir()) == []


async def test_a_claim_lost_while_domains_go_at_once_is_409_not_a_relay_error() -> None:
    """`mx` sends to two domains at once in a task group, which swallows a task stopped by
    `sending`: the relay returned no result for those recipients and the answer was a 500 (a
    relay contract error) instead of the 409 of a claim lost before anything left."""
    recorder = Recorder()
    with ExitStack() as stack:
        redis = stack.enter_context(redis_instance())
        dns = stack.enter_context(dns_server())
        port = free_port()
        sinks = [stack.enter_context(smtp_server(host=host, port=port)) for host in ("127.0.0.4", "127.0.0.5")]
        store = TakenOver(IdempotencySettings(backend="redis", redis_url=redis.url, lease=0.05))
        core = make_core(recorder, store=store)
        config = (
            f"relay:\n  out:\n    type: mx\n    port: {port}\n    allow_internal_destinations: true\n"
            f"mailrelay:\n  dns_nameservers: ['{dns.nameserver}']\n"
        )
        try:
            async with opened(config) as relays:
                with pytest.raises(Refused) as refused:
                    await core.deliver(delivery(relays["out"], envelope("a@other.test", "b@third.test"), key="k"))
        finally:
            await store.aclose()
    assert refused.value.status == 409
    assert [sink.received for sink in sinks] == [[], []]


async def test_shutdown_closes_the_relays_only_after_deliveries_finishing_in_the_background(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn runs the lifespan's shutdown (Services.aclose) once no connection is left, which does
    not wait for the drain: a keyed delivery finishing in the background after its deadline cut
    had its relays and its store closed under it. Now they close once it has stored its outcome
    (within shutdown_grace, after which it is cut)."""
    config = config_from(
        "relay:\n  out:\n    type: custom\n    factory: tests.scripted:factory\n    stall_after_data: 0.5\n"
    )
    services = Services(Runtime.build(config, await open_relays(config)))
    core, relay = services.current.core, services.current.relays["out"]
    cut = await core.deliver(Delivery("out", relay, envelope("bob@example.net"), Deadline.within(0.1), "c", "k"))
    assert cut.status == 503
    assert core.finishing
    with caplog.at_level(logging.INFO, logger="app.delivery"):
        await services.aclose()
    assert not core.finishing
    assert "delivery finished after its deadline: delivered" in caplog.text
