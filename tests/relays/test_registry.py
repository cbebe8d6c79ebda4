"""The registry, the relay contract, and the relays built in this version: blackhole and custom."""

from typing import Any

import pytest

from relays.base import (
    PermanentRelayError,
    RelayContractError,
    RelayError,
    TransientRelayError,
    check_results,
    is_relay,
)
from relays.blackhole import BlackholeRelay
from relays.registry import RELAY_TYPES, open_relays
from schemas.config import ConfigError
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import OPTIONS_BY_TYPE, BlackholeOptions
from schemas.reply import Reply
from tests.conftest import config_from, context
from tests.scripted import ScriptedRelay

ENVELOPE = Envelope(sender="a@x.test", recipients=["b@y.test", "c@z.test"], message=b"Subject: s\r\n\r\nbody\r\n")


def test_registry_and_options_union_name_the_same_types() -> None:
    assert set(RELAY_TYPES) == set(OPTIONS_BY_TYPE)


async def test_blackhole_delivers_every_recipient_with_one_id_per_message() -> None:
    relay = BlackholeRelay("b", BlackholeOptions(type="blackhole"))
    first, second = await relay.deliver(ENVELOPE, context()), await relay.deliver(ENVELOPE, context())
    assert [r.recipient for r in first] == ["b@y.test", "c@z.test"]
    assert all(r.status == "delivered" and r.reply.code == 250 and r.reply.enhanced_status == "2.0.0" for r in first)
    assert first[0].reply.message.startswith("2.0.0 Message Delivered; ")
    assert first[0].reply == first[1].reply
    assert first[0].reply.message != second[0].reply.message
    await relay.aclose()


async def test_custom_factory_gets_every_option() -> None:
    config = config_from(
        "relay:\n  s: {type: custom, factory: 'tests.scripted:factory', replies: {'b@y.test': '550 5.1.1 no'}}\n"
    )
    relays = await open_relays(config)
    relay = relays["s"]
    assert isinstance(relay, ScriptedRelay)
    results = await relay.deliver(ENVELOPE, context())
    assert [r.status for r in results] == ["permanent_failure", "delivered"]


def recording_factory(options: dict[str, Any]) -> ScriptedRelay:
    RECEIVED.append(options)
    return ScriptedRelay(options)


RECEIVED: list[dict[str, Any]] = []


async def test_custom_factory_gets_its_own_options_not_the_services() -> None:
    """dkim and add_missing_headers are applied around every relay: a factory written for slimta's
    options (which may refuse keys it does not know) never sees them."""
    config = config_from(
        "relay:\n  s: {type: custom, factory: 'tests.relays.test_registry:recording_factory', region: eu,"
        " add_missing_headers: true}\n"
    )
    RECEIVED.clear()
    relays = await open_relays(config)
    await relays["s"].aclose()
    assert RECEIVED == [{"type": "custom", "factory": "tests.relays.test_registry:recording_factory", "region": "eu"}]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests.scripted:not_a_relay", "returned object, which is not a relay"),
        ("tests.scripted:failing_factory", "raised ValueError: bad options for the scripted relay"),
    ],
)
async def test_custom_factory_failures_at_start_up_name_the_factory(factory: str, message: str) -> None:
    config = config_from(
        f"relay:\n  good: {{type: custom, factory: 'tests.scripted:factory'}}\n  bad: {{type: custom, factory: '{factory}'}}\n"
    )
    with pytest.raises(ConfigError) as info:
        await open_relays(config)
    (problem,) = info.value.problems
    assert problem.path == "relay.bad.factory"
    assert message in problem.message


def test_is_relay_wants_coroutine_methods() -> None:
    class SyncDeliver:
        def deliver(self, envelope: Envelope) -> list[RecipientResult]:
            return []

        async def aclose(self) -> None:
            return None

    assert is_relay(ScriptedRelay({}))
    assert not is_relay(SyncDeliver())
    assert not is_relay(object())


def test_check_results_enforces_one_result_per_recipient_in_order() -> None:
    reply = Reply.parse(250, "2.0.0 ok")
    ok = [RecipientResult(recipient=r, reply=reply) for r in ENVELOPE.recipients]
    check_results("r", ENVELOPE, ok)
    with pytest.raises(RelayContractError, match="returned 1 results for 2 recipients"):
        check_results("r", ENVELOPE, ok[:1])
    with pytest.raises(RelayContractError, match="out of recipient order"):
        check_results("r", ENVELOPE, ok[::-1])


def test_relay_error_class_follows_the_reply_code() -> None:
    assert isinstance(RelayError.from_reply(Reply.parse(451, "4.4.1 no answer")), TransientRelayError)
    assert isinstance(RelayError.from_reply(Reply.parse(550, "5.1.1 unknown")), PermanentRelayError)


@pytest.mark.parametrize(
    ("code", "text", "enhanced"),
    [
        (250, "2.0.0 Ok", "2.0.0"),
        (550, "5.1.1 <x@y> User unknown", "5.1.1"),
        (550, "4.1.1 class mismatch", None),
        (451, "Try later", None),
        (250, "2.0.0", "2.0.0"),
        (250, "2.0.0x no", None),
    ],
)
def test_reply_parses_the_enhanced_status_code(code: int, text: str, enhanced: str | None) -> None:
    reply = Reply.parse(code, text, "RCPT")
    assert (reply.enhanced_status, reply.message, reply.command) == (enhanced, text, "RCPT")


def test_reply_refuses_intermediate_codes() -> None:
    with pytest.raises(ValueError, match="2xx, 4xx or 5xx"):
        Reply.parse(354, "go ahead")
