"""A batch line of the common shape is read without the line model (app.routes.batches.common_line):
it must accept only what the model accepts, into the same envelope and key. Any other line goes to the
model, which words the 422 exactly as /deliver does."""

import json
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import idempotency
from app.config import DEFAULT_CONFIG_YAML, parse_config
from app.problems import ProblemError
from app.routes import batches
from app.routes.batches import _line_model, common_line, model_line, parse_line
from schemas.config import ServiceSettings
from schemas.delivery import Envelope, _check_recipient, _check_sender

SETTINGS: ServiceSettings = parse_config(DEFAULT_CONFIG_YAML, "<test>").config.mailrelay.model_copy(
    update={"max_recipients": 3, "max_message_size": 200}
)
MESSAGE = "From: a@example.com\r\nSubject: hi\r\n\r\nHello\r\n"
COMMON = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE}


def model_answer(line: bytes) -> tuple[Envelope, str | None] | ProblemError:
    try:
        envelope, key, composed = model_line(line, SETTINGS)
    except ProblemError as problem:
        return problem
    assert not composed
    return envelope, key


#: The addresses remembered as checked across every line these tests read, as a batch's (_Batch.known).
KNOWN: set[str] = set()


def check_same(line: bytes) -> tuple[Envelope, str | None] | None:
    """common_line's answer, which when given must be the model's; the same with the addresses
    remembered from earlier lines."""
    common = common_line(line, SETTINGS)
    if common is not None:
        assert model_answer(line) == common, line
    assert common_line(line, SETTINGS, KNOWN) == common, line
    assert len(KNOWN) <= batches.KNOWN_ADDRESSES
    return common


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"idempotency_key": "order-4711"},
        {"idempotency_key": None},
        {"require_tls": True},
        {"require_tls": False, "idempotency_key": "k" * 255},
        {"sender": ""},
        {"sender": '"a b"@example.com', "recipients": ["postmaster", "b@example.net", "c@bücher.example"]},
        {"message": "Subject: \u00e9t\u00e9\r\n\r\n\u2603\r\n"},
        {"message": "x" * 200},
    ],
)
def test_common_lines_are_read_as_the_model_reads_them(fields: dict[str, Any]) -> None:
    line = json.dumps({**COMMON, **fields}).encode()
    assert check_same(line) is not None  # the common shape does take the cheaper path
    assert check_same(json.dumps({**COMMON, **fields}, ensure_ascii=False).encode()) is not None


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({**COMMON, "sender": "a <b@example.com>"}).encode(),
        json.dumps({**COMMON, "recipients": []}).encode(),
        json.dumps({**COMMON, "recipients": ["b@example.net"] * 4}).encode(),  # over max_recipients
        json.dumps({**COMMON, "recipients": ["b@example.net", 5]}).encode(),
        json.dumps({**COMMON, "recipients": "b@example.net"}).encode(),
        json.dumps({**COMMON, "message": ""}).encode(),
        json.dumps({**COMMON, "message": "x" * 201}).encode(),  # over max_message_size: 413
        json.dumps({**COMMON, "message": None}).encode(),
        json.dumps({**COMMON, "message_base64": "eA=="}).encode(),
        json.dumps({**COMMON, "require_tls": None}).encode(),
        json.dumps({**COMMON, "idempotency_key": ""}).encode(),
        json.dumps({**COMMON, "idempotency_key": "k" * 256}).encode(),
        json.dumps({**COMMON, "idempotency_key": "caf\u00e9"}).encode(),
        json.dumps({**COMMON, "idempotency_key": 7}).encode(),
        json.dumps({**COMMON, "extra": 1}).encode(),
        json.dumps({k: v for k, v in COMMON.items() if k != "sender"}).encode(),
        json.dumps([COMMON]).encode(),
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "\\ud800"}',
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "\xff"}',
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "a\tb"}',
        b'\xef\xbb\xbf{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "x"}',
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "x"} x',
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "x",}',
        b'{"sender": "a@example.com", "recipients": ["b@example.net"], "message": "x"',
    ],
)
def test_invalid_lines_go_to_the_model(line: bytes) -> None:
    assert common_line(line, SETTINGS) is None
    assert common_line(line, SETTINGS, {"a@example.com", "b@example.net"}) is None
    with pytest.raises(ProblemError) as raised:
        parse_line(line, SETTINGS, add_missing_headers=False)
    assert raised.value.status in (413, 422)


@pytest.mark.parametrize(
    "fields",
    [
        {"require_tls": "yes"},  # the model's lax bool: read by it, not here
        {"require_tls": 1},
        {"client": {"ehlo": "client.example.com"}},
        {"message": None, "message_base64": "eA=="},
    ],
)
def test_other_valid_lines_go_to_the_model(fields: dict[str, Any]) -> None:
    line = json.dumps({**COMMON, **fields}).encode()
    assert common_line(line, SETTINGS) is None
    assert parse_line(line, SETTINGS, add_missing_headers=False) == model_answer(line)


def test_a_null_key_is_no_key() -> None:
    # It was a TypeError in the model (the key's max_length applied to None): a 500 line.
    line = json.dumps({**COMMON, "message": None, "message_base64": "eA==", "idempotency_key": None}).encode()
    envelope, key, _ = model_line(line, SETTINGS)
    assert (envelope.message, key) == (b"x", None)


def test_a_repeated_key_is_read_as_the_model_reads_it() -> None:
    # Both parsers keep the last value of a repeated key; a line with one must not differ between them.
    line = b'{"sender": "x <y>", "recipients": ["b@example.net"], "message": "x", "sender": "a@example.com"}'
    assert check_same(line) is not None


def test_the_line_model_is_the_one_common_line_was_written_for() -> None:
    """common_line repeats the line model's checks of the common shape: a change to the model (a field, a
    validator, a constraint) must be made to common_line too, or the two would read a line differently."""
    model = _line_model(SETTINGS.max_recipients)
    fields = model.model_fields
    assert set(fields) == {
        "sender",
        "recipients",
        "message",
        "message_base64",
        "content",
        "client",
        "require_tls",
        "idempotency_key",
    }
    assert model.model_config.get("extra") == "forbid"
    decorators = model.__pydantic_decorators__
    assert set(decorators.model_validators) == {"_decode_message"}
    assert not decorators.field_validators
    assert not decorators.validators
    assert [v.func for v in fields["sender"].metadata] == [_check_sender]
    assert fields["sender"].annotation is str
    (item,) = typing.get_args(fields["recipients"].annotation)
    assert typing.get_origin(fields["recipients"].annotation) is list
    assert [m.func for m in item.__metadata__ if hasattr(m, "func")] == [_check_recipient]
    assert [type(m).__name__ for m in fields["recipients"].metadata] == ["MinLen", "MaxLen"]
    assert fields["message"].annotation == str | None
    assert not fields["message"].metadata
    assert fields["require_tls"].annotation is bool
    assert not fields["require_tls"].metadata
    assert [v.func for v in fields["idempotency_key"].metadata] == [batches._check_key]
    key, none = typing.get_args(fields["idempotency_key"].annotation)
    assert none is type(None)
    assert typing.get_args(key)[0] is str
    assert [m.max_length for m in key.__metadata__[0].metadata] == [idempotency.MAX_KEY_LENGTH]


ADDRESS = st.sampled_from(
    ["a@example.com", "", "postmaster", '"q r"@x.y', "a@b@c", "a <b>", "a@", "\u202ea@b"]
) | st.text(max_size=12)
VALUE = st.none() | st.booleans() | st.integers() | ADDRESS | st.lists(ADDRESS, max_size=4)
KEY = st.sampled_from(["sender", "recipients", "message", "idempotency_key", "require_tls", "message_base64", "x"])


@given(
    st.dictionaries(KEY, VALUE, max_size=6),
    st.fixed_dictionaries(
        {},
        optional={
            "sender": ADDRESS,
            "recipients": st.lists(ADDRESS, max_size=4),
            "message": st.text(max_size=210),
            "idempotency_key": st.none() | st.text(max_size=8),
            "require_tls": st.booleans(),
        },
    ),
    st.booleans(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_line_is_read_as_the_model_reads_it(noise: dict[str, Any], shaped: dict[str, Any], ascii: bool) -> None:
    check_same(json.dumps({**noise, **shaped}, ensure_ascii=ascii).encode())
    check_same(json.dumps({**shaped, **noise}, ensure_ascii=ascii).encode())


@given(st.binary(max_size=6), st.integers(min_value=0, max_value=200), st.booleans())
@settings(max_examples=400, deadline=None)
def test_any_bytes_in_a_line_are_read_as_the_model_reads_them(noise: bytes, at: int, replace: bool) -> None:
    line = json.dumps({**COMMON, "idempotency_key": "k1"}).encode()
    at %= len(line)
    check_same(line[:at] + noise + line[at + (len(noise) if replace else 0) :])


def reference_lines(body: bytes, limit: int) -> list[tuple[int, bytes | None]]:
    """What LineSplitter must give, from the whole body at once (None: too long)."""
    pieces = body.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    return [
        (i, None if len(piece) > limit else piece.strip())
        for i, piece in enumerate(pieces)
        if len(piece) > limit or piece.strip()
    ]


def plain(fed: list[tuple[int, bytes | batches._TooLong]]) -> list[tuple[int, bytes | None]]:
    return [(i, line if isinstance(line, bytes) else None) for i, line in fed]


@given(
    st.lists(st.sampled_from([b"", b" ", b"\r", b"ab", b"x" * 30, b"{}", b"y" * 70]), max_size=12),
    st.lists(st.integers(min_value=1, max_value=90), min_size=1, max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_a_body_fed_in_any_pieces_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    limit = 64
    body = b"\n".join(lines)
    splitter = batches.LineSplitter(limit)
    got: list[tuple[int, bytes | None]] = []
    start = 0
    for cut in cuts:
        piece, start = body[start : start + cut], start + cut
        last = start >= len(body)
        got += plain(splitter.feed(piece, last=last))
        if last:
            break
    else:
        got += plain(splitter.feed(body[start:], last=True))
    assert got == reference_lines(body, limit)


def test_remembered_addresses_are_only_those_checked() -> None:
    """A batch remembers the addresses its lines passed (most repeat one sender); the empty sender is
    never one of them, since a recipient may not be empty, and at most KNOWN_ADDRESSES are kept."""
    known: set[str] = set()
    assert common_line(json.dumps({**COMMON, "sender": ""}).encode(), SETTINGS, known) is not None
    assert known == {"b@example.net"}
    assert common_line(json.dumps({**COMMON, "recipients": [""]}).encode(), SETTINGS, known) is None
    assert common_line(json.dumps({**COMMON, "recipients": ["c <d>"]}).encode(), SETTINGS, known) is None
    assert known == {"b@example.net"}
    for n in range(batches.KNOWN_ADDRESSES + 10):
        line = json.dumps({**COMMON, "recipients": [f"r{n}@example.net"]}).encode()
        assert check_same(line) == common_line(line, SETTINGS, known)
    assert len(known) == batches.KNOWN_ADDRESSES
