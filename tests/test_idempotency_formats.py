"""The idempotency records' formats stay what earlier versions wrote: a fingerprint, and the head
of a stored result, are built without json.dumps (its cost per delivery) but must be its bytes, or
a retry across an upgrade would be answered 422 (another request) or not replayed."""

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from app.idempotency import fingerprint, key_problem
from schemas.delivery import Envelope

_text = st.text(st.characters(codec="utf-8"), max_size=40)


def _fingerprint_before(relay: str, envelope: Envelope) -> str:
    """app/idempotency.py's fingerprint as released (json.dumps)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([relay, envelope.sender, list(envelope.recipients)]).encode("utf-8"))
    digest.update(b"\0")
    digest.update(envelope.message if envelope.origin is None else envelope.origin)
    return digest.hexdigest()


@given(_text, _text, st.lists(_text, max_size=5), st.binary(max_size=64), st.none() | st.binary(max_size=16))
def test_a_fingerprint_is_the_one_earlier_versions_computed(
    relay: str, sender: str, recipients: list[str], message: bytes, origin: bytes | None
) -> None:
    envelope = Envelope(sender=sender, recipients=recipients, message=message, origin=origin)
    assert fingerprint(relay, envelope) == _fingerprint_before(relay, envelope)


@given(st.text(max_size=300))
def test_a_key_is_1_to_255_printable_ascii_characters(value: str) -> None:
    valid = 1 <= len(value) <= 255 and all(" " <= c <= "~" for c in value)
    assert (key_problem(value) is None) == valid
