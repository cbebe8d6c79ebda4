"""A batch remembers the addresses check_address passed (common_line's `known`, at most
KNOWN_ADDRESSES): a later line must get the outcome the line model gives it alone, whatever the
earlier lines added, in whichever role (sender or recipient) and spelling."""

import json

import pytest

from app.routes import batches
from app.routes.batches import common_line
from tests.test_batch_lines import COMMON, SETTINGS, model_answer

#: Each address once as a recipient (added to `known`), then in another line's other role.
SPELLINGS = [
    "Bob@Example.NET",
    "bob@example.net.",
    "bob@b\u00fccher.example",
    "b\u00f6b@example.net",
    '"bob smith"@example.net',
    "postmaster",
    "bob@[192.0.2.1]",
    "bob+tag@example.net",
]


@pytest.mark.parametrize("address", SPELLINGS)
def test_an_address_known_as_a_recipient_is_read_as_the_model_reads_it_as_a_sender(address: str) -> None:
    known: set[str] = set()
    first = json.dumps({**COMMON, "recipients": [address]}).encode()
    assert common_line(first, SETTINGS, known) == model_answer(first)
    assert address in known
    for line in (
        json.dumps({**COMMON, "sender": address}).encode(),
        json.dumps({**COMMON, "sender": address, "recipients": [address, address]}).encode(),
        json.dumps({**COMMON, "sender": address}, ensure_ascii=False).encode(),
    ):
        common = common_line(line, SETTINGS, known)
        assert common is not None
        assert common == model_answer(line), line


def test_the_empty_sender_is_never_known_so_an_empty_recipient_is_still_refused() -> None:
    known: set[str] = set()
    bounce = json.dumps({**COMMON, "sender": ""}).encode()
    assert common_line(bounce, SETTINGS, known) == model_answer(bounce)
    assert "" not in known
    empty = json.dumps({**COMMON, "recipients": [""]}).encode()
    assert common_line(empty, SETTINGS, known) is None
    assert model_answer(empty).status == 422  # type: ignore[union-attr]


def test_near_spellings_of_a_known_address_are_checked_on_their_own() -> None:
    """What `known` holds is the exact string: a variant with a control, an angle bracket or a blank
    (which check_address refuses) is never taken for the valid one beside it."""
    known = {"bob@example.net", "a@example.com"}
    for variant in (
        "bob@example.net\u202e",
        "bob@example.net\u0007",
        "bob@example.net ",
        " bob@example.net",
        "<bob@example.net>",
        "bob@@example.net",
    ):
        for fields in ({"recipients": [variant]}, {"sender": variant}):
            line = json.dumps({**COMMON, **fields}).encode()
            assert common_line(line, SETTINGS, known) is None, line
            assert model_answer(line).status == 422  # type: ignore[union-attr]


def test_the_set_stays_at_its_bound_and_addresses_past_it_are_still_checked() -> None:
    known: set[str] = set()
    for n in range(batches.KNOWN_ADDRESSES + 50):
        line = json.dumps({**COMMON, "sender": f"s{n}@example.com", "recipients": [f"r{n}@example.net"]}).encode()
        assert common_line(line, SETTINGS, known) is not None
    assert len(known) == batches.KNOWN_ADDRESSES
    bad = json.dumps({**COMMON, "recipients": ["r999 @example.net"]}).encode()
    assert common_line(bad, SETTINGS, known) is None
