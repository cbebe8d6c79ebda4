"""POST /relays/{name}/deliver through the in-process client: both forms, validation, status mapping."""

import asyncio
import base64
import json
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from app.budget import ByteBudget
from app.lifespan import Runtime, Services
from app.main import create_app
from relays.registry import open_relays
from tests.conftest import config_from
from tests.scripted import ScriptedRelay

MESSAGE = "From: alice@example.com\r\nMessage-ID: <m1@example.com>\r\nSubject: hi\r\n\r\nHello\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def scripted(client: TestClient, name: str = "scripted") -> ScriptedRelay:
    runtime = cast(Services, client.app_state["services"]).current
    return cast(ScriptedRelay, runtime.relays[name])


def post_json(client: TestClient, body: dict[str, Any], relay: str = "scripted") -> Any:
    return client.post(f"/relays/{relay}/deliver", json=body)


def post_raw(
    client: TestClient, headers: list[tuple[str, str]], body: bytes = MESSAGE.encode(), relay: str = "scripted"
) -> Any:
    return client.post(f"/relays/{relay}/deliver", content=body, headers=[("Content-Type", "message/rfc822"), *headers])


def problem_locs(response: Any) -> list[str]:
    assert response.headers["content-type"] == "application/problem+json"
    return [e["loc"] for e in response.json()["errors"]]


def test_json_form_delivers_and_reports_each_recipient(client: TestClient) -> None:
    response = post_json(
        client,
        {"sender": "alice@example.com", "recipients": ["bob@example.net", "eve@example.org"], "message": MESSAGE},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["relay"] == "scripted"
    assert body["status"] == "delivered"
    assert body["message_id"] == "<m1@example.com>"
    assert isinstance(body["elapsed_ms"], float)
    assert body["recipients"] == [
        {
            "recipient": rcpt,
            "status": "delivered",
            "reply": {"code": 250, "enhanced_status": "2.0.0", "message": "2.0.0 Ok: queued", "command": "[SEND_DATA]"},
            "host": "sink.test:25",
            "possibly_delivered": False,
            "security": None,  # a scripted relay: no connection
        }
        for rcpt in ("bob@example.net", "eve@example.org")
    ]
    assert response.headers["X-Smtp-Reply"] == '250; message="2.0.0 Ok: queued"'
    (envelope,) = scripted(client).delivered
    assert envelope.sender == "alice@example.com"
    assert list(envelope.recipients) == ["bob@example.net", "eve@example.org"]
    assert envelope.message == MESSAGE.encode()


def test_json_form_takes_base64_for_binary_messages(client: TestClient) -> None:
    raw = b"Subject: 8bit\r\n\r\ncaf\xe9 \x00\xff\r\n"
    response = post_json(
        client, {"sender": "", "recipients": ["bob@example.net"], "message_base64": base64.b64encode(raw).decode()}
    )
    assert response.status_code == 200
    (envelope,) = scripted(client).delivered
    assert envelope.message == raw
    assert envelope.sender == ""


def test_json_form_passes_client_facts(client: TestClient) -> None:
    facts = {
        "ip": "192.0.2.1",
        "host": "client.example.com",
        "ehlo": "client.example.com",
        "protocol": "ESMTPA",
        "auth": "alice",
    }
    response = post_json(
        client, {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE, "client": facts}
    )
    assert response.status_code == 200
    (envelope,) = scripted(client).delivered
    assert envelope.client is not None
    assert envelope.client.model_dump() == facts


def test_raw_form_repeated_and_comma_separated_recipients(client: TestClient) -> None:
    headers = [
        ("X-Envelope-Sender", b64("alice@example.com")),
        ("X-Envelope-Recipient", b64("one@example.net")),
        ("X-Envelope-Recipient", f"{b64('two@example.net')}, {b64('three@example.net')}"),
        ("X-Envelope-Recipient", f"{b64('four@example.net')};{b64('fünf@exämple.net')}"),
    ]
    response = post_raw(client, headers)
    assert response.status_code == 200
    assert [r["recipient"] for r in response.json()["recipients"]] == [
        "one@example.net",
        "two@example.net",
        "three@example.net",
        "four@example.net",
        "fünf@exämple.net",
    ]
    (envelope,) = scripted(client).delivered
    assert envelope.message == MESSAGE.encode()
    assert envelope.client is not None
    assert envelope.client.ehlo is None  # X-Ehlo absent, as slimta's relay may send it


def test_raw_form_empty_sender_and_ehlo(client: TestClient) -> None:
    response = post_raw(
        client,
        [("X-Envelope-Sender", ""), ("X-Envelope-Recipient", b64("b@example.net")), ("X-Ehlo", "edge.example.com")],
    )
    assert response.status_code == 200
    (envelope,) = scripted(client).delivered
    assert envelope.sender == ""
    assert envelope.client is not None
    assert envelope.client.ehlo == "edge.example.com"


def test_raw_form_recipients_are_counted_before_they_are_decoded(client: TestClient) -> None:
    # 1000 pieces against max_recipients 5: one error, not one per piece.
    response = post_raw(client, [("X-Envelope-Sender", b64("a@example.com")), ("X-Envelope-Recipient", "," * 999)])
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": "X-Envelope-Recipient", "message": "1000 recipients; the limit is 5"}]


@pytest.mark.parametrize(
    ("recipients", "http_status", "status", "smtp_reply"),
    [
        (["ok@example.net"], 200, "delivered", '250; message="2.0.0 Ok: queued"'),
        (
            ["ok@example.net", "bad@example.net"],
            207,
            "partial",
            '550; message="5.1.1 <bad@example.net> User unknown"',
        ),
        (["later@example.net"], 503, "transient_failure", '451; message="4.3.0 Try again later"'),
        (
            ["bad@example.net", "later@example.net"],
            503,
            "transient_failure",
            '451; message="4.3.0 Try again later"',
        ),
        (
            ["quota@example.net", "bad@example.net"],
            400,
            "permanent_failure",
            "552; message=\"5.2.2 Mailbox 'full'\"",
        ),
    ],
)
def test_status_mapping(
    client: TestClient, recipients: list[str], http_status: int, status: str, smtp_reply: str
) -> None:
    raw_headers = [("X-Envelope-Sender", b64("a@example.com")), *[("X-Envelope-Recipient", b64(r)) for r in recipients]]
    for form, response in (
        ("json", post_json(client, {"sender": "a@example.com", "recipients": recipients, "message": MESSAGE})),
        ("raw", post_raw(client, raw_headers)),
    ):
        if form == "raw" and status == "partial":
            # slimta's http relay would read a 207 as success for everyone: the raw form says "retry".
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "30"
            assert response.headers["X-Smtp-Reply"].startswith(
                '451; message="4.5.0 Partial delivery: 1 of 2 recipients failed'
            )
            assert response.json()["status"] == "partial"
            continue
        assert response.status_code == http_status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["status"] == status
        assert response.headers["X-Smtp-Reply"] == smtp_reply
        assert ("Retry-After" in response.headers) is (http_status == 503)
        if http_status == 503:
            assert response.headers["Retry-After"] == "30"
        assert [r["recipient"] for r in response.json()["recipients"]] == recipients


def test_per_recipient_results_keep_enhanced_codes(client: TestClient) -> None:
    response = post_json(
        client, {"sender": "a@x.test", "recipients": ["ok@example.net", "bad@example.net"], "message": MESSAGE}
    )
    ok, bad = response.json()["recipients"]
    assert (ok["status"], bad["status"]) == ("delivered", "permanent_failure")
    assert bad["reply"] == {
        "code": 550,
        "enhanced_status": "5.1.1",
        "message": "5.1.1 <bad@example.net> User unknown",
        "command": "RCPT",
    }


GOOD: dict[str, Any] = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE}


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"recipients": []}, "recipients"),
        ({"recipients": [f"r{i}@example.net" for i in range(6)]}, "recipients"),  # limit is 5
        ({"recipients": [""]}, "recipients[0]"),
        ({"sender": "a@example.com\r\nRCPT TO:<x@evil>"}, "sender"),
        ({"recipients": ["b@example.net\n"]}, "recipients[0]"),
        ({"recipients": ["ok@example.net", "b\x00@example.net"]}, "recipients[1]"),
        ({"recipients": ["b c@example.net"]}, "recipients[0]"),
        ({"recipients": ["<b@example.net>"]}, "recipients[0]"),
        ({"recipients": ["b@exa mple.net"]}, "recipients[0]"),
        ({"recipients": ['"unterminated@example.net']}, "recipients[0]"),
        ({"recipients": ["a@b@example.net"]}, "recipients[0]"),
        ({"recipients": ["b@"]}, "recipients[0]"),
        ({"recipients": ["x" * 250 + "@example.net"]}, "recipients[0]"),
        ({"message": ""}, "body"),
        ({"message_base64": "SGVsbG8="}, "body"),  # both message forms
        ({"message": None}, "body"),  # neither
        ({"message": None, "message_base64": "not base64!"}, "body"),
        ({"extra": 1}, "extra"),
        ({"client": {"ip": "not-an-ip"}}, "client.ip"),
        ({"client": {"ehlo": "a\r\nb"}}, "client.ehlo"),
        ({"client": {"host": "a\u2028b"}}, "client.host"),
        ({"client": {"ehlo": "a\u2029b"}}, "client.ehlo"),
        ({"client": {"auth": "\u00ad-x"}}, "client.auth"),
        ({"client": {"protocol": "ESMTP\u200b"}}, "client.protocol"),
    ],
)
def test_json_validation_refuses_before_delivery(client: TestClient, change: dict[str, Any], loc: str) -> None:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    response = post_json(client, body)
    assert response.status_code == 422, response.text
    assert loc in problem_locs(response)
    assert response.json()["detail"] == "the request is invalid; nothing was delivered"
    assert scripted(client).delivered == []


@pytest.mark.parametrize(
    "address",
    ["", '"john doe"@example.net', "用户@例子.广告", "postmaster", "a+tag@[192.0.2.1]", '"a\\"b"@example.net'],
)
def test_addresses_that_are_accepted(client: TestClient, address: str) -> None:
    body = {**GOOD, "sender": address, "recipients": [address or "b@example.net"]}
    assert post_json(client, body).status_code == 200


def test_invalid_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/relays/scripted/deliver", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("headers", "body", "loc"),
    [
        ([("X-Envelope-Recipient", b64("b@example.net"))], MESSAGE.encode(), "X-Envelope-Sender"),
        ([("X-Envelope-Sender", b64("a@example.com"))], MESSAGE.encode(), "X-Envelope-Recipient"),
        (
            [("X-Envelope-Sender", "%%%"), ("X-Envelope-Recipient", b64("b@example.net"))],
            MESSAGE.encode(),
            "X-Envelope-Sender",
        ),
        (
            [("X-Envelope-Sender", b64("a@example.com")), ("X-Envelope-Recipient", "YQ")],  # missing padding
            MESSAGE.encode(),
            "X-Envelope-Recipient[0]",
        ),
        (
            [("X-Envelope-Sender", base64.b64encode(b"\xff\xfe").decode()), ("X-Envelope-Recipient", b64("b@x.test"))],
            MESSAGE.encode(),
            "X-Envelope-Sender",
        ),
        (
            [("X-Envelope-Sender", b64("a@example.com")), ("X-Envelope-Recipient", b64("b@x.test\r\nDATA"))],
            MESSAGE.encode(),
            "X-Envelope-Recipient[0]",
        ),
        ([("X-Envelope-Sender", b64("a@example.com")), ("X-Envelope-Recipient", b64("b@x.test"))], b"", "body"),
        (
            [
                ("X-Envelope-Sender", b64("a@x.test")),
                *[("X-Envelope-Recipient", b64(f"r{i}@x.test")) for i in range(6)],
            ],
            MESSAGE.encode(),
            "X-Envelope-Recipient",
        ),
    ],
)
def test_raw_validation_refuses_before_delivery(
    client: TestClient, headers: list[tuple[str, str]], body: bytes, loc: str
) -> None:
    response = post_raw(client, headers, body)
    assert response.status_code == 422, response.text
    assert loc in problem_locs(response)
    assert scripted(client).delivered == []


def test_raw_validation_reports_every_problem(client: TestClient) -> None:
    response = post_raw(client, [("X-Envelope-Sender", "!!"), ("X-Envelope-Recipient", f"{b64('ok@x.test')},??")], b"")
    assert problem_locs(response) == ["X-Envelope-Sender", "X-Envelope-Recipient[1]", "body"]


def test_message_over_the_size_limit_is_413(client: TestClient) -> None:
    big = "Subject: big\r\n\r\n" + "x" * 1000
    for response in (
        post_json(client, {**GOOD, "message": big}),
        post_json(client, {**GOOD, "message": None, "message_base64": base64.b64encode(big.encode()).decode()}),
        post_raw(
            client, [("X-Envelope-Sender", b64("a@x.test")), ("X-Envelope-Recipient", b64("b@x.test"))], big.encode()
        ),
    ):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert "1000 bytes" in response.json()["detail"]
    assert scripted(client).delivered == []


def test_message_exactly_at_the_limit_is_accepted(client: TestClient) -> None:
    exact = "Subject: x\r\n\r\n" + "y" * (1000 - len("Subject: x\r\n\r\n"))
    headers = [("X-Envelope-Sender", b64("a@x.test")), ("X-Envelope-Recipient", b64("b@x.test"))]
    assert post_raw(client, headers, exact.encode()).status_code == 200
    assert post_json(client, {**GOOD, "message": exact}).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "multipart/form-data; boundary=x"])
def test_other_media_types_are_415(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/relays/scripted/deliver", content=b"x", headers=headers)
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["Accept-Post"] == "application/json, message/rfc822"


def test_content_type_parameters_are_accepted(client: TestClient) -> None:
    response = client.post(
        "/relays/scripted/deliver",
        content=json.dumps(GOOD).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 200


def test_unknown_relay_is_404_problem(client: TestClient) -> None:
    for response in (client.post("/relays/nope/deliver", json=GOOD), client.get("/relays/nope")):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["title"] == "Not Found"
        assert problem["status"] == 404
        assert "no relay named 'nope'" in problem["detail"]


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    assert client.get("/nowhere").headers["content-type"] == "application/problem+json"
    response = client.get("/relays/scripted/deliver")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


def test_only_one_path_segment_names_a_relay(client: TestClient) -> None:
    # The deliver route is dispatched ahead of FastAPI's router (app.main.MailrelayApp): it
    # must match exactly what the router would.
    for path in ("/relays/a%2Fscripted/deliver", "/relays//deliver", "/relays/scripted/deliver/x"):
        response = client.post(path, json=GOOD)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    assert post_json(client, GOOD).status_code == 200


def test_relay_breaking_its_contract_is_500_problem(client: TestClient) -> None:
    for relay in ("broken", "crashing"):
        response = post_json(client, {**GOOD, "recipients": ["a@x.test", "b@x.test"]}, relay=relay)
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert "outcome is unknown" in response.json()["detail"]


SECRET_YAML = """\
relay:
  smarthost:
    type: static
    host: smtp.example.com
    port: 587
    credentials: {username: relay-user, password: hunter2-secret}
  plugin:
    type: custom
    factory: tests.scripted:factory
    api_key: plugin-api-key
    nested: {password: nested-secret, keep: visible}
"""


def test_get_relays_masks_secrets(make_client: Callable[[str], TestClient]) -> None:
    client = make_client(SECRET_YAML)
    response = client.get("/relays")
    assert response.status_code == 200
    for secret in ("hunter2-secret", "plugin-api-key", "nested-secret"):
        assert secret not in response.text
    relays = {r["name"]: r for r in response.json()["relays"]}
    assert list(relays) == ["smarthost", "plugin"]
    smarthost = relays["smarthost"]
    assert smarthost["type"] == "static"
    assert smarthost["options"]["credentials"] == {"username": "relay-user", "password": "***"}
    assert smarthost["options"]["port"] == 587
    assert smarthost["options"]["connect_timeout"] == 30.0  # defaults filled in
    assert relays["plugin"]["options"]["api_key"] == "***"
    assert relays["plugin"]["options"]["nested"] == "***"  # not declared public by the factory
    one = client.get("/relays/smarthost")
    assert one.status_code == 200
    assert one.json() == smarthost


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_relays_are_closed_at_shutdown() -> None:
    app = create_app(config_from("relay:\n  s: {type: custom, factory: 'tests.scripted:factory'}\n"))
    with TestClient(app) as client:
        relay = scripted(client, "s")
        assert not relay.closed
    assert relay.closed


async def test_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    """No Content-Length (chunked): the service stops pulling the body at the limit."""
    config = config_from("relay:\n  b: {type: blackhole}\nmailrelay: {max_message_size: 1000}\n")
    relays = await open_relays(config)
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": pulled < 1000}

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/relays/b/deliver",
        "raw_path": b"/relays/b/deliver",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"message/rfc822"),
            (b"x-envelope-sender", b""),
            (b"x-envelope-recipient", b64("b@example.net").encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {"services": Services(Runtime.build(config, relays))},
    }
    await create_app(config)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert pulled == 11  # 1100 bytes: the first chunk past 1000


def test_json_escapes_do_not_count_against_the_size_limit(make_client: Callable[[str], TestClient]) -> None:
    client = make_client("relay:\n  b: {type: blackhole}\nmailrelay: {max_message_size: 10000}\n")
    message = "Subject: x\r\n\r\n" + "é" * 4990  # 9994 bytes as UTF-8, 30000 bytes as \u00e9 escapes
    body = json.dumps({"sender": "", "recipients": ["a@x.test"], "message": message})
    assert len(body) > 3 * 10000
    response = client.post("/relays/b/deliver", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 200


def test_too_many_recipients_are_counted_before_they_are_validated(client: TestClient) -> None:
    response = post_json(client, {**GOOD, "recipients": ["not an address"] * 9})
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": "recipients", "message": "9 recipients; the limit is 5"}]


def test_a_large_body_is_counted_before_it_is_parsed(make_client: Callable[[str], TestClient]) -> None:
    client = make_client("relay:\n  b: {type: blackhole}\nmailrelay: {max_recipients: 5, max_message_size: 400000}\n")
    # Over the size parsed without counting (128 KiB), full of commas, brackets and quotes: delivered.
    message = "Subject: x\r\n\r\n" + 'a, [b], {"c": d}, \\"e\\"\r\n' * 8000
    body = {"sender": "", "recipients": ["a@x.test"], "message": message}
    assert len(json.dumps(body)) > 128 * 1024
    assert client.post("/relays/b/deliver", json=body).status_code == 200
    # The same size of values: refused before the parser sees them.
    flood = {"sender": "", "recipients": [0] * 100_000, "message": "Subject: x\r\n\r\nhi\r\n"}
    response = client.post("/relays/b/deliver", json=flood)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"loc": "body", "message": "more JSON values than a request with at most 5 recipients holds"}
    ]


async def test_the_body_budget_is_first_come_first_served_and_bounded_in_time() -> None:
    loop = asyncio.get_running_loop()
    budget = ByteBudget(100)
    assert budget.try_take(60) == 60
    big = asyncio.create_task(budget.take(80, loop.time() + 5))
    await asyncio.sleep(0)
    small = asyncio.create_task(budget.take(10, loop.time() + 5))
    await asyncio.sleep(0)
    assert not big.done()
    assert not small.done()  # behind the larger waiter, though 40 are free
    assert budget.try_take(1) is None  # nobody jumps the queue
    budget.give(60)
    assert await big == 80
    assert await small == 10
    assert budget.free == 10
    assert await budget.take(50, loop.time() + 0.05) is None  # no room in time
    assert budget.free == 10  # the one that gave up took nothing
    assert budget.try_take(500) is None  # more than the whole budget: all of it, once free
    budget.give(90)
    assert budget.try_take(500) == 100


def test_a_chunked_body_takes_the_budget_as_it_grows(make_client: Callable[[str], TestClient]) -> None:
    client = make_client(
        "relay:\n  b: {type: blackhole}\nmailrelay: {max_message_size: 300000, limits: {body_budget: 65536}}\n"
    )
    runtime = cast(Services, client.app_state["services"]).current

    def chunks() -> Any:
        yield b"Subject: x\r\n\r\n"
        for _ in range(20):
            yield b"y" * 9998 + b"\r\n"

    headers = [("X-Envelope-Sender", b64("a@x.test")), ("X-Envelope-Recipient", b64("b@x.test"))]
    response = client.post(
        "/relays/b/deliver", content=chunks(), headers=[("Content-Type", "message/rfc822"), *headers]
    )
    assert response.status_code == 200  # 200 KB, more than the whole budget: it had all of it
    assert runtime.limiter.bodies.free == 65536  # and gave it back
