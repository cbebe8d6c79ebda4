"""The compose form of POST /relays/{name}/deliver, delivered to a real SMTP server and taken apart by
two parsers (Python's email in its default policy, and ripmime); the add_missing_headers option."""

import base64
import email
import email.policy
import re
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from app.lifespan import Services
from app.main import create_app
from tests.conftest import config_from
from tests.servers.process import require_program
from tests.servers.smtp import Received, SmtpServer, smtp_server

MAX_SIZE = 100_000
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwAEAQH/Aw0LOAAAAABJRU5ErkJggg=="
)
#: Every byte value, NULs and CRs and a lone LF included: the attachment must come back identical.
BINARY = bytes(range(256)) * 8 + b"\r\n.\r\n\x00\n\r"
TEXT = "Hallo Bob,\n\nder Bericht für Q3 ist da: 12 € \u2013 café.\n.\nA line that starts with a dot, above.\n"
HTML = '<p>Hallo Bob,</p><p>der Bericht für Q3 \u2013 <b>café</b></p><img src="cid:logo@example.com">'


@pytest.fixture(scope="module")
def server() -> Iterator[SmtpServer]:
    with smtp_server() as server:
        yield server


@pytest.fixture(scope="module")
def client(server: SmtpServer) -> Iterator[TestClient]:
    config = config_from(f"""\
        relay:
          out: {{type: static, host: 127.0.0.1, port: {server.port}}}
          completing: {{type: static, host: 127.0.0.1, port: {server.port}, add_missing_headers: true}}
          discard: {{type: blackhole, add_missing_headers: true}}
        mailrelay:
          max_recipients: 5
          max_message_size: {MAX_SIZE}
        """)
    with TestClient(create_app(config)) as client:
        yield client


def content(**change: Any) -> dict[str, Any]:
    """A message with everything: names and a subject in UTF-8, text, HTML with an inline image, an attachment."""
    base: dict[str, Any] = {
        "from": {"address": "alice@example.com", "name": "Älice Exämple"},
        "to": [{"address": "bob@example.net", "name": "Müller, Bob"}, "carol@example.org"],
        "cc": ["dave@example.org"],
        "bcc": ["audit@example.com"],
        "reply_to": {"address": "replies@example.com", "name": "Ответы"},
        "subject": "Grüße \u2013 der Bericht für Q3 ✓",
        "text": TEXT,
        "html": HTML,
        "headers": {"X-Campaign": "q3-reports", "List-Unsubscribe": "<mailto:unsub@example.com>"},
        "attachments": [
            {"filename": "bericht-ü.bin", "content_type": "application/octet-stream", "data": b64(BINARY)},
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "data": b64(PNG),
                "inline": True,
                "content_id": "logo@example.com",
            },
        ],
    }
    return {**base, **change}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def deliver(client: TestClient, body: dict[str, Any], relay: str = "out") -> Any:
    return client.post(f"/relays/{relay}/deliver", json=body)


def delivered(server: SmtpServer, response: Any) -> Received:
    assert response.status_code == 200, response.text
    return server.received[-1]


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def header_section(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_a_composed_message_reads_back_in_pythons_parser(client: TestClient, server: SmtpServer) -> None:
    response = deliver(client, {"content": content()})
    received = delivered(server, response)
    assert received.sender == "alice@example.com"
    assert received.recipients == ["bob@example.net", "carol@example.org", "dave@example.org", "audit@example.com"]

    raw = received.content
    head = header_section(raw)
    # No address needs SMTPUTF8: names and subject go as RFC 2047 words, text as quoted-printable or
    # base64: the message is 7-bit, so no hop needs 8BITMIME.
    assert raw.isascii()
    assert "8BITMIME" not in [o.split("=")[-1].upper() for o in received.mail_options]
    assert b"=?utf-8?" in head
    assert all(len(line) <= 78 for line in raw.split(b"\r\n")), "folded and encoded to short lines"
    assert b"\nbcc:" not in head.lower()
    assert b"audit@" not in raw

    msg = parse(raw)
    assert not msg.defects
    assert msg["From"].addresses[0].display_name == "Älice Exämple"
    assert msg["From"].addresses[0].addr_spec == "alice@example.com"
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Müller, Bob", "bob@example.net"),
        ("", "carol@example.org"),
    ]
    assert msg["Cc"] == "dave@example.org"
    assert msg["Reply-To"].addresses[0].display_name == "Ответы"
    assert msg["Subject"] == "Grüße \u2013 der Bericht für Q3 ✓"
    assert msg["Bcc"] is None
    assert msg["X-Campaign"] == "q3-reports"
    assert msg["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(str(msg["Date"])).tzinfo is not None
    message_id = str(msg["Message-ID"])
    assert re.fullmatch(r"<[^@<>\s]+@example\.com>", message_id)
    assert response.json()["message_id"] == message_id  # the answer names the Message-ID that was written

    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content().replace("\r\n", "\n") == TEXT
    assert related.get_content_type() == "multipart/related"
    html, image = related.iter_parts()
    assert html.get_content().replace("\r\n", "\n").rstrip("\n") == HTML
    assert image.get_content_type() == "image/png"
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG
    assert attachment.get_filename() == "bericht-ü.bin"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_content() == BINARY
    # Only the top has MIME-Version: the parts are MIME parts, not messages.
    assert sum(1 for part in msg.walk() if part["MIME-Version"]) == 1


def test_a_composed_message_reads_back_in_ripmime(client: TestClient, server: SmtpServer, tmp_path: Path) -> None:
    ripmime = require_program("ripmime")
    received = delivered(server, deliver(client, {"content": content()}))
    (tmp_path / "message.eml").write_bytes(received.content)
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(  # noqa: S603 - a fixed program and our own temporary files
        [ripmime, "-i", str(tmp_path / "message.eml"), "-d", str(out), "-v", "--verbose-contenttype"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    decoded = re.findall(r"content-type=(\S+) filename=(\S+)", run.stdout)
    types = [t for t, _ in decoded]
    assert types == ["multipart/mixed", "text/plain", "text/html", "image/png", "application/octet-stream"], run.stdout
    names = dict(decoded)
    assert (out / names["image/png"]).read_bytes() == PNG
    assert (out / names["application/octet-stream"]).read_bytes() == BINARY
    # ripmime keeps the line break before a boundary (RFC 2046 gives it to the boundary): compared without it.
    assert (out / names["text/plain"]).read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n") == TEXT.rstrip().encode()
    assert (out / names["text/html"]).read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n") == HTML.encode("utf-8")


@pytest.mark.parametrize(
    ("change", "shape"),
    [
        ({"html": None, "attachments": []}, ["text/plain"]),
        ({"text": None, "attachments": []}, ["text/html"]),
        ({"attachments": []}, ["multipart/alternative", "text/plain", "text/html"]),
        (
            {"html": None, "attachments": [{"filename": "a.bin", "data": b64(b"\x00")}]},
            ["multipart/mixed", "text/plain", "application/octet-stream"],
        ),
        (
            {"text": None, "html": None, "attachments": [{"filename": "a.bin", "data": b64(b"\x00")}]},
            ["multipart/mixed", "application/octet-stream"],
        ),
    ],
    ids=["text", "html", "text+html", "text+attachment", "attachment-only"],
)
def test_the_mime_tree_has_only_the_parts_given(
    client: TestClient, server: SmtpServer, change: dict[str, Any], shape: list[str]
) -> None:
    msg = parse(delivered(server, deliver(client, {"content": content(**change)})).content)
    assert [part.get_content_type() for part in msg.walk()] == shape


def test_an_explicit_envelope_overrides_the_headers_and_repeated_addresses_go_once(
    client: TestClient, server: SmtpServer
) -> None:
    body = {"sender": "bounces@example.com", "content": content(cc=["bob@example.net"], bcc=["BOB@example.NET"])}
    received = delivered(server, deliver(client, body))
    assert received.sender == "bounces@example.com"
    # bob@example.net once (To and Cc; the domain's case does not count); BOB@ is another local part.
    assert received.recipients == ["bob@example.net", "carol@example.org", "BOB@example.NET"]
    received = delivered(server, deliver(client, {"recipients": ["only@example.net"], "content": content()}))
    assert received.recipients == ["only@example.net"]
    assert parse(received.content)["To"].addresses[0].addr_spec == "bob@example.net"


def test_a_non_ascii_address_makes_an_smtputf8_message(make_client: Any) -> None:
    with smtp_server(smtputf8=True) as server:
        client = make_client(f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {server.port}}}\n")
        body = {
            "content": {"from": "jörg@bücher.example", "to": ["anna@example.net"], "subject": "Grüße", "text": "é\n"}
        }
        response = deliver(client, body)
        assert response.status_code == 200, response.text
        received = server.received[-1]
    assert "SMTPUTF8" in [o.upper() for o in received.mail_options]
    # RFC 6532 headers are UTF-8: parsed as text (the bytes parser reads headers as ASCII).
    msg = email.message_from_string(received.content.decode("utf-8"), policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "jörg@bücher.example"
    assert msg["Subject"] == "Grüße"
    assert str(msg["Message-ID"]).endswith("@xn--bcher-kva.example>")  # the domain as an A-label


def invalid(response: Any) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [(e["loc"], e["message"]) for e in response.json()["errors"]]


@pytest.mark.parametrize(
    ("body", "loc", "says"),
    [
        ({"content": content(to=["bob@@example.net"])}, "content.to[0].address", "more than one '@'"),
        ({"content": content(to=[{"address": "bob <x>@example.net"}])}, "content.to[0].address", "angle brackets"),
        ({"content": content(cc=["a(comment)@example.net"])}, "content.cc[0].address", "not an RFC 5322 address"),
        ({"content": content(bcc=["postmaster"])}, "content.bcc[0].address", "no domain"),
        # An unterminated domain literal: Python's address parser fails on it with an AttributeError.
        ({"content": content(to=["a@[1.2"])}, "content.to[0].address", "not an RFC 5322 address"),
        (
            {"content": content(**{"from": {"address": "alice@example.com", "name": "A\r\nBcc: x@evil"}})},
            "content.from.name",
            "control character",
        ),
        ({"content": content(subject="hi\r\nBcc: victim@example.net")}, "content.subject", "control character"),
        (
            {"content": content(headers={"X-Ok": "a\nBcc: victim@example.net"})},
            "content.headers.X-Ok",
            "control character",
        ),
        ({"content": content(headers={"X-Nul": "a\x00b"})}, "content.headers.X-Nul", "control character"),
        ({"content": content(headers={"X-Ls": "a\u2028Bcc: x@example.net"})}, "content.headers.X-Ls", "separator"),
        ({"content": content(subject="a\u2029b")}, "content.subject", "separator"),
        ({"content": content(headers={"Orig-Date": "junk"})}, "content.headers.Orig-Date", "set by the service"),
        ({"content": content(headers={"X Bad": "v"})}, "content.headers.X Bad", "header name"),
        ({"content": content(headers={"X-Long": "v" * 1000})}, "content.headers.X-Long", "longer than 998"),
        ({"content": content(headers={"bcc": "x@example.net"})}, "content.headers.bcc", "set by the service"),
        ({"content": content(headers={"Message-ID": "<x@y>"})}, "content.headers.Message-ID", "set by the service"),
        (
            {"content": content(headers={"Content-Type": "text/plain"})},
            "content.headers.Content-Type",
            "set by the service",
        ),
        ({"content": content(headers={"MIME-Version": "2.0"})}, "content.headers.MIME-Version", "set by the service"),
        ({"content": content(headers={"Date": "yesterday"})}, "content.headers.Date", "set by the service"),
        (
            {"content": content(attachments=[{"filename": "a.bin", "data": "not base64!"}])},
            "content.attachments[0].data",
            "base64",
        ),
        (
            {"content": content(attachments=[{"filename": "a.bin", "data": "QQ"}])},
            "content.attachments[0].data",
            "base64",
        ),
        (
            {"content": content(attachments=[{"filename": "../etc/passwd", "data": ""}])},
            "content.attachments[0].filename",
            "without a path",
        ),
        (
            {"content": content(attachments=[{"filename": "m.eml", "content_type": "message/rfc822", "data": ""}])},
            "content.attachments[0].content_type",
            "message/*",
        ),
        (
            {"content": content(attachments=[{"filename": "i.png", "data": "", "inline": True}])},
            "content.attachments[0]",
            "content_id",
        ),
        ({"content": content(html=None)}, "content.attachments[1]", "needs `html`"),
        ({"content": content(text="a\x00b")}, "content.text", "NUL"),
        ({"content": content(text=None, html=None, attachments=[])}, "content", "needs a body"),
        ({"content": content(to=[], cc=[], bcc=[])}, "content.to", "no recipients"),
        ({"content": content(to=[f"r{i}@example.net" for i in range(6)])}, "content", "8 recipients; the limit is 5"),
        ({"content": content(), "message": "Subject: x\r\n\r\nx\r\n"}, "content", "not both"),
        ({"content": content(), "message_base64": b64(b"Subject: x\r\n\r\nx\r\n")}, "content", "not both"),
        (
            {"sender": "a@example.com", "recipients": ["b@example.net"]},
            "body",
            "give `message`, `message_base64` or `content`",
        ),
        ({"content": {**content(), "from_": "x@example.com"}}, "content.from_", "Extra inputs"),
    ],
    ids=lambda value: None if isinstance(value, dict) else str(value).replace(" ", "_")[:40],
)
def test_each_invalid_field_is_refused_with_its_location_and_nothing_is_sent(
    client: TestClient, server: SmtpServer, body: dict[str, Any], loc: str, says: str
) -> None:
    before = len(server.received)
    errors = invalid(deliver(client, body))
    assert any(where == loc and says in message for where, message in errors), errors
    assert len(server.received) == before


def test_a_message_too_large_after_building_is_refused_and_not_sent(client: TestClient, server: SmtpServer) -> None:
    before = len(server.received)
    # 40,000 characters of 2 octets each: under the limit as text, over it once encoded (base64 of 80,000 octets).
    response = deliver(client, {"content": content(text="é" * 40_000, html=None, attachments=[])})
    assert response.status_code == 413, response.text
    assert "built from `content`" in response.json()["detail"]
    # Over the limit as given: refused before anything is built.
    response = deliver(client, {"content": content(text="x" * (MAX_SIZE + 1), html=None, attachments=[])})
    assert response.status_code == 413, response.text
    assert len(server.received) == before


RAW = b"From: alice@example.com\r\nSubject: no date, no id\r\n\r\nbody\r\n"


def raw_form(client: TestClient, relay: str, message: bytes) -> Any:
    headers = {
        "Content-Type": "message/rfc822",
        "X-Envelope-Sender": b64(b"alice@example.com"),
        "X-Envelope-Recipient": b64(b"bob@example.net"),
    }
    return client.post(f"/relays/{relay}/deliver", content=message, headers=headers)


def test_without_the_option_a_message_passes_through_untouched(client: TestClient, server: SmtpServer) -> None:
    response = raw_form(client, "out", RAW)
    assert delivered(server, response).content == RAW
    assert response.json()["message_id"] is None


@pytest.mark.parametrize("form", ["raw", "json"])
def test_add_missing_headers_adds_date_and_message_id(client: TestClient, server: SmtpServer, form: str) -> None:
    if form == "raw":
        response = raw_form(client, "completing", RAW)
    else:
        body = {"sender": "alice@example.com", "recipients": ["bob@example.net"], "message": RAW.decode()}
        response = deliver(client, body, relay="completing")
    raw = delivered(server, response).content
    assert raw.endswith(RAW)  # the message itself is unchanged; the two headers come first
    msg = parse(raw)
    assert parsedate_to_datetime(str(msg["Date"])).tzinfo is not None
    assert re.fullmatch(r"<[^@<>\s]+@example\.com>", str(msg["Message-ID"]))
    assert response.json()["message_id"] == str(msg["Message-ID"])


@pytest.mark.parametrize(
    "message",
    [
        b"Message-Id: <kept@example.com>\r\nDATE: Mon, 30 Nov 2026 12:00:00 +0000\r\n\r\nbody\r\n",
        b"Subject: x\r\nmessage-id :\r\n <folded@example.com>\r\ndate: Mon, 30 Nov 2026 12:00:00 +0000\r\n\r\nbody\r\n",
    ],
    ids=["both", "folded-and-spaced"],
)
def test_add_missing_headers_keeps_a_message_that_has_both(
    client: TestClient, server: SmtpServer, message: bytes
) -> None:
    assert delivered(server, raw_form(client, "completing", message)).content == message


def test_add_missing_headers_scans_only_the_header_section(client: TestClient, server: SmtpServer) -> None:
    # Headers in the body (a quoted message) do not count; the line ends follow the message's.
    message = b"Subject: forward\n\nDate: Mon, 30 Nov 2026 12:00:00 +0000\nMessage-ID: <inner@example.com>\n"
    raw = delivered(server, raw_form(client, "completing", message)).content
    head = header_section(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert head.lower().count(b"message-id:") == 1
    assert b"inner@" not in head
    assert head.lower().count(b"date:") == 1
    only_date = b"Message-ID: <have@example.com>\r\n\r\nbody\r\n"
    raw = delivered(server, raw_form(client, "completing", only_date)).content
    assert raw.endswith(only_date)
    assert raw.startswith(b"Date: ")
    assert raw.count(b"Message-ID") == 1


def test_add_missing_headers_applies_to_every_relay_type(client: TestClient) -> None:
    response = raw_form(client, "discard", RAW)
    assert response.status_code == 200
    assert re.fullmatch(r"<[^@<>\s]+@example\.com>", response.json()["message_id"])


def test_the_openapi_document_shows_the_compose_form_with_an_example(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    body = document["paths"]["/relays/{name}/deliver"]["post"]["requestBody"]["content"]["application/json"]
    example = body["examples"]["compose"]["value"]
    assert set(example["content"]) >= {"from", "to", "bcc", "subject", "text", "html", "attachments"}
    schemas = document["components"]["schemas"]
    assert "content" in schemas["DeliveryRequest"]["properties"]
    assert "from" in schemas["Content"]["properties"]
    # The example is valid: delivered as it is (to the blackhole).
    assert client.post("/relays/discard/deliver", json=example).status_code == 200


# The same request builds a new Date and Message-ID each time: the idempotency fingerprint is made
# from what the client sent (Envelope.origin), so a retry with the same key is replayed, not refused.
@pytest.mark.parametrize("form", ["compose", "completed"])
def test_a_repeat_with_the_same_key_replays(client: TestClient, server: SmtpServer, form: str) -> None:
    before = len(server.received)
    key = {"Idempotency-Key": f"repeat-{form}"}
    answers = []
    for _ in range(2):
        if form == "compose":
            answers.append(client.post("/relays/out/deliver", json={"content": content()}, headers=key))
        else:
            headers = {
                **key,
                "Content-Type": "message/rfc822",
                "X-Envelope-Sender": b64(b"alice@example.com"),
                "X-Envelope-Recipient": b64(b"bob@example.net"),
            }
            answers.append(client.post("/relays/completing/deliver", content=RAW, headers=headers))
    first, second = answers
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["message_id"] == first.json()["message_id"]
    assert len(server.received) == before + 1


def test_building_holds_the_body_budget_and_gives_it_back(make_client: Any) -> None:
    client = make_client(
        "relay:\n  b: {type: blackhole}\n"
        "mailrelay: {max_message_size: 100000, limits: {body_budget: 1000000, queue_timeout: 0.2}}\n"
    )
    budget = cast(Services, client.app_state["services"]).current.limiter.bodies
    # 40,000 characters: a body of 40 KB (80 KB with its decoded share), several times that while built,
    # which is also past the size that is built in a worker thread.
    body = {"content": {"from": "a@example.com", "to": "b@example.net", "text": "x" * 40_000 + "\n"}}
    others = budget.try_take(800_000)  # other requests hold most of it: the body fits, its building does not
    assert others == 800_000
    response = client.post("/relays/b/deliver", json=body)
    assert response.status_code == 503, response.text
    assert "overloaded" in response.json()["detail"]
    assert budget.free == 200_000  # the refused request gave back what it held
    budget.give(others)
    response = client.post("/relays/b/deliver", json=body)
    assert response.status_code == 200, response.text
    assert budget.free == 1_000_000
