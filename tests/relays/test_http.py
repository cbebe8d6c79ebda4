"""`http` against a second real mailrelay, a scripted HTTP server, and HTTPS with trustme certificates."""

import dataclasses
import json
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from app.delivery import format_smtp_reply
from relays.http import parse_smtp_reply
from schemas.reply import Reply
from tests.conftest import context, envelope, opened
from tests.servers.http import Answer, http_server
from tests.servers.mailrelay import start_server, wait_ready

NEXT_HOP = """\
relay:
  discard: {type: blackhole}
  mixed:
    type: custom
    factory: tests.scripted:factory
    replies:
      later@example.net: "451 4.3.0 Try again later"
      bad@example.net: "550 5.1.1 No such user"
"""


def http(url: str, *extra: str) -> str:
    lines = [f"    {e}" for e in extra]
    return (
        "\n".join(["relay:", "  hop:", "    type: http", f"    url: '{url}'", "    ehlo_as: edge.example.com", *lines])
        + "\n"
    )


@pytest.fixture(scope="module")
def next_hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second mailrelay, run as a subprocess."""
    config = tmp_path_factory.mktemp("hop") / "mailrelay.yaml"
    config.write_text(NEXT_HOP)
    process, port = start_server(config)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


async def test_chained_mailrelays_keep_per_recipient_outcomes(next_hop: str) -> None:
    async with opened(http(f"{next_hop}/relays/mixed/deliver")) as relays:
        results = await relays["hop"].deliver(
            envelope("ok@example.net", "later@example.net", "bad@example.net"), context()
        )
    async with opened(http(f"{next_hop}/relays/discard/deliver")) as relays:
        (discarded,) = await relays["hop"].deliver(envelope("x@example.net"), context())
    assert [(r.status, r.reply.code, r.reply.command) for r in results] == [
        ("delivered", 250, "[SEND_DATA]"),
        ("transient_failure", 451, "RCPT"),
        ("permanent_failure", 550, "RCPT"),
    ]
    assert results[2].reply.message == "5.1.1 No such user"
    assert results[0].host == "sink.test:25"  # the host the next hop reported
    assert discarded.status == "delivered"
    assert discarded.reply.message.startswith("2.0.0 Message Delivered; ")


async def test_unicode_addresses_survive_the_round_trip(next_hop: str) -> None:
    recipients = ("用户@例子.广告", "jörg@bücher.example")
    async with opened(http(f"{next_hop}/relays/discard/deliver")) as relays:
        results = await relays["hop"].deliver(envelope(*recipients, sender="ñandú@example.com"), context())
    assert [r.recipient for r in results] == list(recipients)
    assert all(r.status == "delivered" for r in results)


ANSWERS = {
    "/ok": Answer(200),
    "/nocontent": Answer(204),
    "/forbidden": Answer(403),
    "/broken": Answer(500),
    "/busy": Answer(503, '451; message="4.7.1 Greylisted; try again in 5 min=300 s"; command="RCPT"'),
    "/rejected": Answer(400, '550; message="5.7.1 Relaying denied"'),
    "/slow": Answer(200, delay=3),
    "/hangup": Answer(close_early=True),
}


@pytest.mark.parametrize(
    ("path", "status", "code", "enhanced", "command"),
    [
        ("/ok", "delivered", 250, "2.0.0", "[HTTP]"),
        ("/nocontent", "delivered", 250, "2.0.0", "[HTTP]"),
        ("/forbidden", "permanent_failure", 554, "5.0.0", "[HTTP]"),
        ("/broken", "transient_failure", 451, "4.0.0", "[HTTP]"),
        ("/busy", "transient_failure", 451, "4.7.1", "RCPT"),
        ("/rejected", "permanent_failure", 550, "5.7.1", None),
        ("/slow", "transient_failure", 451, "4.4.2", "[HTTP]"),
        ("/hangup", "transient_failure", 451, "4.4.2", "[HTTP]"),
    ],
)
async def test_responses_and_failures_are_classified(
    path: str, status: str, code: int, enhanced: str, command: str | None
) -> None:
    with http_server(ANSWERS) as server:
        async with opened(http(server.url(path), "timeout: 1")) as relays:
            (result,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
        request = server.requests[0] if server.requests else {}
    assert (result.status, result.reply.code, result.reply.enhanced_status, result.reply.command) == (
        status,
        code,
        enhanced,
        command,
    )
    if path == "/busy":
        assert result.reply.message == "4.7.1 Greylisted; try again in 5 min=300 s"
    if request:
        assert request["Content-Type"] == ["message/rfc822"]
        assert request["X-Ehlo"] == ["edge.example.com"]
        assert request["X-Envelope-Sender"] == ["YWxpY2VAZXhhbXBsZS5jb20="]
        assert request["X-Envelope-Recipient"] == ["Ym9iQGV4YW1wbGUubmV0"]


async def test_keep_alive_only_with_idle_timeout() -> None:
    for extra, connections in (("idle_timeout: 30", 1), ("timeout: 10", 3)):
        with http_server(ANSWERS) as server:
            async with opened(http(server.url("/ok"), extra)) as relays:
                for _ in range(3):
                    (result,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
                    assert result.status == "delivered"
            assert server.connections == connections, extra


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


async def test_https_verified_and_failing_verification(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with http_server(ANSWERS, tls=server_context(ca)) as server:
        async with opened(http(server.url("/ok"), f"tls: {{ca_certs: '{ca_file}'}}")) as relays:
            (verified,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
        async with opened(http(server.url("/ok"))) as relays:  # https:// alone: default verification
            (unverified,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
    assert verified.status == "delivered"
    assert (unverified.status, unverified.reply.code, unverified.reply.enhanced_status) == (
        "transient_failure",
        451,
        "4.7.5",
    )
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.reply.message


async def test_require_tls_needs_https_with_a_verified_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secured = dataclasses.replace(envelope("bob@example.net"), require_tls=True)
    with http_server(ANSWERS, tls=server_context(ca)) as server:
        async with opened(http(server.url("/ok"), f"tls: {{ca_certs: '{ca_file}'}}")) as relays:
            (verified,) = await relays["hop"].deliver(secured, context())
            (usual,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
        unchecked = f"tls: {{ca_certs: '{ca_file}', cert_reqs: CERT_NONE}}"
        async with opened(http(server.url("/ok"), unchecked)) as relays:
            (refused,) = await relays["hop"].deliver(secured, context())
        requests = list(server.requests)
    assert (verified.status, usual.status) == ("delivered", "delivered")
    assert (refused.status, refused.reply.code, refused.reply.enhanced_status) == ("permanent_failure", 550, "5.7.10")
    assert len(requests) == 2  # the refused delivery sent nothing
    # The next hop (a mailrelay's raw form reads it) must keep to verified TLS as well: the
    # requirement travels with the message (RFC 8689), only for the deliveries that have it.
    required = [{k.lower(): v for k, v in request.items()}.get("require-tls") for request in requests]
    assert required == [["yes"], None]


async def test_https_client_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file, client_pem = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("client.example.com").private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    with http_server(ANSWERS, tls=server_context(ca, require_client_cert=True)) as server:
        async with opened(
            http(server.url("/ok"), f"tls: {{ca_certs: '{ca_file}', certfile: '{client_pem}'}}")
        ) as relays:
            (with_cert,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
        async with opened(http(server.url("/ok"), f"tls: {{ca_certs: '{ca_file}'}}")) as relays:
            (without,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
    assert with_cert.status == "delivered"
    assert without.status == "transient_failure"


@pytest.mark.parametrize(
    ("code", "message", "command"),
    [
        (250, "2.0.0 Ok: queued as 4F1C", "[SEND_DATA]"),
        (451, 'said "later"; retry=300', "RCPT"),
        (550, "5.1.1 a\\b", None),
    ],
)
def test_x_smtp_reply_reads_back_in_both_parsers(code: int, message: str, command: str | None) -> None:
    header = format_smtp_reply(Reply.parse(code, message, command))
    ours = parse_smtp_reply(header)
    assert ours is not None
    # No command: python-slimta 5.0.5 cannot read one (tests/api/test_slimta.py).
    assert (ours.code, ours.message, ours.command) == (code, message.replace('"', "'"), None)
    # slimta's own parser (python-slimta relay/http.py): a code, then name="value" pairs, no escapes.
    assert re.match(r"^\s*(\d\d\d)\s*;", header)
    found = dict(re.findall(r'\s(\w+)\s*=\s*"(.*?)"', header))
    assert found == {"message": message.replace('"', "'").replace("\\", "\\\\")}


def _result_body(*pairs: tuple[str, int]) -> bytes:
    return json.dumps(
        {
            "relay": "x",
            "status": "ignored",
            "message_id": None,
            "elapsed_ms": 1.0,
            "recipients": [
                {
                    "recipient": r,
                    "status": "delivered",
                    "reply": {"code": c, "message": f"{c // 100}.0.0 x"},
                    "host": "h:25",
                }
                for r, c in pairs
            ],
        }
    ).encode()


LYING = {
    "/refused-200": Answer(200, '550; message="5.1.1 No such user"'),
    "/later-202": Answer(202, '451; message="4.3.0 later"'),
    "/json-500": Answer(500, body=_result_body(("bob@example.net", 250)), content_type="application/json"),
    "/json-other-recipient": Answer(200, body=_result_body(("eve@example.net", 250)), content_type="application/json"),
    "/deep": Answer(200, body=b"[" * 50000, content_type="application/json"),
    "/unquoted": Answer(503, "451; message=Busy"),
}


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/refused-200", "permanent_failure", 550),  # the header's code decides, even on a 2xx
        ("/later-202", "transient_failure", 451),
        ("/json-500", "transient_failure", 451),  # a body that contradicts the status is not believed
        ("/json-other-recipient", "transient_failure", 451),  # a result for another envelope: not believed
        ("/deep", "delivered", 250),  # no parser blow-up escapes
        ("/unquoted", "transient_failure", 451),
    ],
)
async def test_next_hops_that_contradict_themselves(path: str, status: str, code: int) -> None:
    with http_server(LYING) as server:
        async with opened(http(server.url(path))) as relays:
            (result,) = await relays["hop"].deliver(envelope("bob@example.net"), context())
        (request,) = server.requests
    assert (result.status, result.reply.code) == (status, code)
    assert request["Accept-Encoding"] == ["identity"]
    if path == "/unquoted":
        assert result.reply.message == "Busy"
