"""`require_tls` (JSON) and `Require-TLS: yes` (the message/rfc822 form): RFC 8689's REQUIRETLS made
synchronous. Against aiosmtpd without TLS: refused with 550 5.7.10 before MAIL, nothing sent."""

import base64
import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.servers.smtp import Script, smtp_server

MESSAGE = "From: a@example.com\r\nSubject: secure\r\n\r\nhi\r\n"


def static(port: int) -> str:
    return f"relay:\n  out:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("form", ["json", "rfc822"])
def test_a_hop_without_tls_is_refused_and_nothing_is_sent(make_client: Callable[[str], TestClient], form: str) -> None:
    with smtp_server(Script()) as server:
        client = make_client(static(server.port))
        if form == "json":
            body = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE, "require_tls": True}
            response = client.post("/relays/out/deliver", json=body)
        else:
            headers = {
                "Content-Type": "message/rfc822",
                "X-Envelope-Sender": b64("a@example.com"),
                "X-Envelope-Recipient": b64("b@example.net"),
                "Require-TLS": "yes",
            }
            response = client.post("/relays/out/deliver", content=MESSAGE.encode(), headers=headers)
        received = list(server.received)
    assert response.status_code == 400, response.text
    (result,) = response.json()["recipients"]
    assert (result["reply"]["code"], result["reply"]["enhanced_status"]) == (550, "5.7.10")
    assert result["security"] == {
        "encrypted": False,
        "tls_version": None,
        "cipher": None,
        "authenticated": "none",
        "resumed": False,
    }
    assert received == []


def test_without_the_option_the_same_hop_delivers_and_says_it_was_not_encrypted(
    make_client: Callable[[str], TestClient],
) -> None:
    with smtp_server(Script()) as server:
        client = make_client(static(server.port))
        body = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE}
        response = client.post("/relays/out/deliver", json=body)
    assert response.status_code == 200
    assert response.json()["recipients"][0]["security"]["encrypted"] is False


def test_a_bad_require_tls_header_is_a_422(make_client: Callable[[str], TestClient]) -> None:
    client = make_client("relay:\n  out: {type: blackhole}\n")
    headers = {
        "Content-Type": "message/rfc822",
        "X-Envelope-Sender": b64("a@example.com"),
        "X-Envelope-Recipient": b64("b@example.net"),
        "Require-TLS": "please",
    }
    response = client.post("/relays/out/deliver", content=MESSAGE.encode(), headers=headers)
    assert response.status_code == 422
    assert "Require-TLS" in response.text


def test_a_batch_line_completed_by_add_missing_headers_still_requires_tls(
    make_client: Callable[[str], TestClient],
) -> None:
    """A line whose message gets Date and Message-ID from the relay's add_missing_headers keeps its
    require_tls (the completed envelope was rebuilt without it, and went out in clear text)."""
    with smtp_server(Script()) as server:
        client = make_client(static(server.port) + "    add_missing_headers: true\n")
        line = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE, "require_tls": True}
        response = client.post(
            "/relays/out/deliveries",
            content=json.dumps(line).encode() + b"\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        received = list(server.received)
    assert response.status_code == 200, response.text
    answer, done = (json.loads(text) for text in response.text.splitlines())
    assert done["done"] is True
    assert answer["status"] == 400, answer
    (result,) = answer["result"]["recipients"]
    assert (result["reply"]["code"], result["reply"]["enhanced_status"]) == (550, "5.7.10")
    assert received == []
