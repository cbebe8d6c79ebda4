"""Property-based tests: address validation and the base64 envelope headers never answer 500."""

import base64
import json

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from schemas.delivery import check_address, decode_base64
from tests.conftest import config_from

MESSAGE = b"Subject: p\r\n\r\nbody\r\n"
FORBIDDEN = "\r\n\x00<>\x85\x9b\u202e\u2066\ufeff"
ANY_TEXT = st.text(alphabet=st.characters(codec=None), max_size=80)

# Addresses any mail system would take: letters (any script), digits, dots in atoms, a domain.
ATOM = st.text(
    alphabet=st.characters(categories=["L", "Nd"]) | st.sampled_from("!#$%&'*+-/=?^_`{|}~"), min_size=1, max_size=12
)
LABEL = st.text(alphabet=st.characters(categories=["L", "Nd"]), min_size=1, max_size=12)
VALID = st.builds(
    lambda local, labels: f"{'.'.join(local)}@{'.'.join(labels)}",
    st.lists(ATOM, min_size=1, max_size=3),
    st.lists(LABEL, min_size=1, max_size=3),
).filter(lambda a: len(a.encode()) <= 254)


@given(ANY_TEXT)
@settings(deadline=None)  # one slow example on a loaded machine is not a failure of the rule
def test_check_address_accepts_or_explains(value: str) -> None:
    try:
        accepted, error = check_address(value, allow_empty=True), ""
    except ValueError as exc:
        accepted, error = None, str(exc)
    if accepted is None:
        assert error
    else:
        assert accepted == value
        assert not any(c in value for c in FORBIDDEN)


@given(ANY_TEXT, st.sampled_from(FORBIDDEN), ANY_TEXT)
def test_injection_characters_are_always_refused(before: str, bad: str, after: str) -> None:
    try:
        check_address(before + bad + after)
    except ValueError:
        return
    raise AssertionError("accepted an address with CR, LF, NUL or an angle bracket")


@given(VALID)
def test_ordinary_addresses_are_accepted(address: str) -> None:
    assert check_address(address) == address


@given(st.text(max_size=40))
def test_base64_decoding_accepts_or_explains(value: str) -> None:
    try:
        decoded, error = decode_base64(value, what="header"), ""
    except ValueError as exc:
        decoded, error = None, str(exc)
    if decoded is None:
        assert "not valid base64" in error
    else:
        assert base64.b64encode(decoded).decode() == value


HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
B64_OF_ANY = st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode())


def _client() -> TestClient:
    return TestClient(create_app(config_from("relay:\n  b: {type: blackhole}\n")))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=HEADER_TEXT | B64_OF_ANY, recipients=st.lists(HEADER_TEXT | B64_OF_ANY, max_size=4))
def test_raw_form_headers_never_answer_500(sender: str, recipients: list[str]) -> None:
    headers = [("Content-Type", "message/rfc822"), ("X-Envelope-Sender", sender)]
    headers += [("X-Envelope-Recipient", r) for r in recipients]
    with _client() as client:
        response = client.post(
            "/relays/b/deliver", content=MESSAGE, headers=[(k.encode(), v.encode("latin-1")) for k, v in headers]
        )
    assert response.status_code in (200, 422), response.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=ANY_TEXT, recipients=st.lists(ANY_TEXT | VALID, max_size=4), message=ANY_TEXT)
def test_json_form_never_answers_500(sender: str, recipients: list[str], message: str) -> None:
    # ASCII-escaped JSON, so lone surrogates reach the service as `\ud800` escapes.
    body = json.dumps({"sender": sender, "recipients": recipients, "message": message}).encode()
    with _client() as client:
        response = client.post("/relays/b/deliver", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert all(c not in a for a in [sender, *recipients] for c in FORBIDDEN)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=60))
def test_arbitrary_json_bodies_never_answer_500(body: bytes) -> None:
    with _client() as client:
        response = client.post("/relays/b/deliver", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
