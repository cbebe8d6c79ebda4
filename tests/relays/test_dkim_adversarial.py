"""DKIM signatures over awkward messages, verified as the receiver stores them: each message goes
through a signing `static` relay into a real Postfix (BDAT on one listener, DATA on another) and
what Postfix delivered is verified by OpenDKIM and by dkimpy, two implementations other than ours,
against keys published in a real NSD (the fixtures of test_dkim.py).

A signature that does not verify is a silent failure (the mail counts as unauthenticated), so
every message here that mailrelay signs must verify at both."""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relays.dkim import DEFAULT_HEADERS, Identity, KeyProblem, Signer, SigningKey, parse_key
from schemas.delivery import DkimSignature
from tests.conftest import context, envelope, opened
from tests.relays.test_dkim import ZONE, Keys, keys, nameserver, opendkim, signature_tags  # noqa: F401 - fixtures
from tests.servers.mailrelay import service
from tests.servers.nsd import nsd_server, txt_record
from tests.servers.opendkim import OpenDkim, opendkim_verifier
from tests.servers.postfix import Postfix, postfix, queue_id

PEM, PKCS8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8

HEAD = (
    b"From: Alice <alice@dkim.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <adv@dkim.test>\r\n"
)
BODY = b"Hello.\r\n"


def _with(old: bytes, new: bytes) -> bytes:
    """The usual message with one header line changed."""
    assert old in HEAD
    return HEAD.replace(old, new) + b"\r\n" + BODY


#: Messages that must be signed and verify wherever they arrive.
SIGNED: dict[str, bytes] = {
    "plain": HEAD + b"\r\n" + BODY,
    "fold-right-after-the-colon": _with(b"Subject: hello", b"Subject:\r\n hello\r\n\tagain"),
    "several-folds-with-tabs": _with(b"Subject: hello", b"Subject: a\r\n\t\tb \r\n   c\t"),
    "fold-line-of-blanks-only": _with(b"Subject: hello", b"Subject: hello\r\n \t"),
    "trailing-blanks-in-a-value": _with(b"Subject: hello", b"Subject: hello  \t"),
    "value-of-blanks-only": _with(b"Subject: hello", b"Subject: \t "),
    "empty-value": _with(b"Subject: hello", b"Subject:"),
    "tabs-inside-a-value": _with(b"Subject: hello", b"Subject:\thello\t\tthere"),
    "names-in-odd-case": _with(b"From:", b"fROM:").replace(b"Subject:", b"SUBJECT:"),
    "two-subjects": HEAD + b"Subject: second\r\n\r\n" + BODY,
    "two-froms-oversigned": HEAD + b"From: other@dkim.test\r\n\r\n" + BODY,
    "several-received": b"Received: by a\r\nReceived: by b\r\n" + HEAD + b"Received: by c\r\n\r\n" + BODY,
    "no-subject-at-all": _with(b"Subject: hello\r\n", b""),
    "lf-line-ends": (HEAD + b"\r\n" + BODY + b"second\r\n").replace(b"\r\n", b"\n"),
    "lf-header-crlf-body": HEAD.replace(b"\r\n", b"\n") + b"\n" + BODY + b"second\r\n",
    "crlf-header-lf-body": HEAD + b"\r\nfirst\nsecond\n",
    "lf-separator-after-crlf-header": HEAD + b"\n" + BODY,
    "empty-body": HEAD + b"\r\n",
    "no-separator": HEAD,
    "no-separator-no-final-line-end": HEAD.removesuffix(b"\r\n"),
    "body-of-blank-lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "body-of-blank-and-white-lines": HEAD + b"\r\n \r\n\t\r\n  \r\n",
    "body-without-final-line-end": HEAD + b"\r\nlast line",
    "body-ending-in-blanks-without-line-end": HEAD + b"\r\nlast line \t",
    "very-long-lines": HEAD + b"\r\n" + b"x" * 5000 + b"\r\n" + b"y " * 3000 + b"\r\n",
    "trailing-blanks-in-the-body": HEAD + b"\r\na \t\r\nb\t \r\n  c  d  \r\n",
    "8-bit-utf-8": _with(b"Subject: hello", "Subject: Grüße".encode()) + "Köln, Größe\r\n".encode(),
    "lines-starting-with-dots": HEAD + b"\r\n.\r\n..two\r\n.x\r\n",
    "from-domain-in-odd-case-with-a-dot": _with(b"alice@dkim.test", b"alice@DKIM.Test."),
    "from-with-a-comment": _with(b"Alice <alice@dkim.test>", b"alice@dkim.test (Alice)"),
    "from-comment-holding-an-address": _with(b"Alice <", b"Alice (x@evil.test) <"),
    "from-quoted-local-part": _with(b"Alice <alice@dkim.test>", b'"alice smith"@dkim.test'),
    "from-encoded-word": _with(b"Alice <", b"=?utf-8?q?Al=40ice?= <"),
    "from-two-addresses": _with(b"Alice <alice@dkim.test>", b"alice@dkim.test, bob@other.test"),
    "from-group": _with(b"Alice <alice@dkim.test>", b"Team: alice@dkim.test;"),
    "from-group-angle": _with(b"Alice <alice@dkim.test>", b"Team: Alice <alice@dkim.test>;"),
    "from-folded": _with(b"From: Alice <alice@dkim.test>", b"From:\r\n Alice\r\n\t<alice@dkim.test>"),
    "from-8-bit-local-part": _with(b"alice@dkim.test", "ålice@dkim.test".encode()),
    # Postfix stores it as `Subject:`; kept as sent, dkimpy and `opendkim -t` refuse the field.
    "blanks-before-a-colon": _with(b"Subject:", b"Subject \t:"),
    "long-header-lines": _with(b"Subject: hello", b"Subject: " + b"w" * 3000 + b"\r\nX-Long: " + b"v " * 2000),
    "control-characters-in-the-body": HEAD + b"\r\nform\x0cfeed \x0c\r\nvertical\x0btab \x0b\r\n",
    "vertical-tab-in-an-unsigned-field": HEAD + b"X-Other: a\x0b\r\n\r\n" + BODY,
    "a-line-of-blanks-before-the-separator": HEAD + b" \r\n\r\n" + BODY,
    "nul-in-an-unsigned-field": HEAD + b"X-Other: a\x00b\r\n\r\n" + BODY,
}

#: Messages that go out unsigned, with the reason: each one, signed, failed at a receiver.
UNSIGNED: dict[str, tuple[bytes, str]] = {
    # Postfix cuts a header line at a NUL: `Subject: h\0i` arrives as `Subject: h`. (A NUL in the
    # body arrives as it was sent; dkimpy verifies it, `opendkim -t` says "message not signed".)
    "nul-in-a-signed-field": (_with(b"Subject: hello", b"Subject: h\x00i"), "a NUL byte"),
    # Postfix ends the header at a line whose name is not printable ASCII and puts an empty line
    # before it: that line and the rest of the header arrive in the body, whose hash then differs.
    "8-bit-field-name": (HEAD + "Ü-X: y\r\n\r\n".encode() + BODY, "a header line is not a field"),
    "control-character-in-a-field-name": (HEAD + b"X-\x01: y\r\n\r\n" + BODY, "a header line is not a field"),
    # OpenDKIM takes a vertical tab or form feed in a field for a blank (it compresses and strips
    # them), dkimpy strips them at a value's ends only, RFC 6376 neither: no signature over them
    # verifies at both.
    "vertical-tab-ending-a-signed-value": (_with(b"Subject: hello", b"Subject: hello\x0b"), "vertical tab"),
    "form-feed-inside-a-signed-value": (_with(b"Subject: hello", b"Subject: a \x0c b"), "vertical tab"),
}


@dataclass(frozen=True)
class Arrived:
    """What the relay said of the signature, and the message as Postfix delivered it."""

    dkim: DkimSignature | None
    stored: bytes


@pytest.fixture(scope="module")
def server() -> Iterator[Postfix]:
    with postfix() as pf:
        yield pf


def _relay(port: int, key_file: str) -> str:
    return (
        f"relay:\n  out:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n"
        f"    dkim:\n      - {{domain: {ZONE}, selector: ed, key_file: {key_file}}}\n"
    )


@pytest.fixture(scope="module")
def arrived(server: Postfix, keys: Keys) -> dict[tuple[str, str], Arrived]:  # noqa: F811
    """Every message of SIGNED through BDAT (`main`) and DATA (`nochunking`), sent at once."""

    async def send_all() -> dict[tuple[str, str], Arrived]:
        found = {}
        for listener in ("main", "nochunking"):
            async with opened(_relay(server.ports[listener], str(keys.ed))) as relays:
                relay = relays["out"]
                results = await asyncio.gather(
                    *(relay.deliver(envelope("bob@example.net", message=m), context()) for m in SIGNED.values())
                )
            for name, (result,) in zip(SIGNED, results, strict=True):
                assert result.status == "delivered", (name, result.reply)
                found[name, listener] = Arrived(result.dkim, server.received(queue_id(result.reply.message)))
        return found

    return asyncio.run(send_all())


def _dkimpy_verifies(message: bytes, keys: Keys) -> bool:  # noqa: F811
    import dkim  # the test extra's

    record = parse_key(keys.ed.read_bytes()).record().encode()

    def txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"ed._domainkey.{ZONE}.".encode()
        return record

    return bool(dkim.verify(message, dnsfunc=txt))


@pytest.mark.parametrize("listener", ["main", "nochunking"], ids=["bdat", "data"])
@pytest.mark.parametrize("name", list(SIGNED))
def test_the_signature_verifies_as_postfix_delivers_the_message(
    arrived: dict[tuple[str, str], Arrived],
    opendkim: OpenDkim,  # noqa: F811
    keys: Keys,  # noqa: F811
    name: str,
    listener: str,
) -> None:
    got = arrived[name, listener]
    assert got.dkim == DkimSignature(signed=True, domain=ZONE, selector="ed", algorithm="ed25519-sha256")
    stored = got.stored  # LF line ends, as pipe(8) writes it
    assert stored.startswith(b"DKIM-Signature:"), stored[:300]
    verdict = opendkim.verify(stored)
    assert verdict.passed, (verdict.line, stored)
    assert _dkimpy_verifies(stored.replace(b"\n", b"\r\n"), keys), stored


@pytest.fixture(scope="module")
def unsigned(server: Postfix, keys: Keys) -> dict[str, tuple[bytes, DkimSignature | None]]:  # noqa: F811
    """Every message of UNSIGNED through `main`: what the SMTP server got and the result's dkim."""

    async def send_all() -> dict[str, tuple[bytes, DkimSignature | None]]:
        async with opened(_relay(server.ports["main"], str(keys.ed))) as relays:
            relay = relays["out"]
            results = await asyncio.gather(
                *(relay.deliver(envelope("bob@example.net", message=m), context()) for m, _ in UNSIGNED.values())
            )
        found = {}
        for name, (result,) in zip(UNSIGNED, results, strict=True):
            assert result.status == "delivered", (name, result.reply)
            found[name] = (server.received(queue_id(result.reply.message)), result.dkim)
        return found

    return asyncio.run(send_all())


@pytest.mark.parametrize("name", list(UNSIGNED))
def test_a_message_no_signature_would_verify_on_goes_unsigned_and_says_why(
    unsigned: dict[str, tuple[bytes, DkimSignature | None]], name: str
) -> None:
    stored, outcome = unsigned[name]
    assert outcome is not None
    assert not outcome.signed, outcome
    assert (outcome.domain, outcome.selector) == (ZONE, "ed")
    assert outcome.reason is not None
    assert outcome.reason.startswith("cannot sign: "), outcome.reason
    assert UNSIGNED[name][1] in outcome.reason, outcome.reason
    assert b"DKIM-Signature:" not in stored


def test_the_signer_refuses_nothing_it_can_sign() -> None:
    """Signer.sign signs each message of SIGNED (a cheap check that runs without any server)."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = Signer([Identity(ZONE, "ed", parse_key(pem), DEFAULT_HEADERS)])
    for name, message in SIGNED.items():
        assert signer.sign(message)[1].signed, name


@pytest.mark.parametrize("listener", ["main", "nochunking"], ids=["bdat", "data"])
def test_what_the_service_changes_before_sending_is_signed_too(
    listener: str,
    server: Postfix,
    keys: Keys,  # noqa: F811
    opendkim: OpenDkim,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Through `mailrelay serve` (HTTP in, BDAT or DATA out): add_missing_headers adds Date and Message-ID
    before signing, so both are signed; LF line ends go out as CRLF, a line starting with a dot and
    a last line without a line end as SMTP carries them, and the signature verifies as stored."""
    config = tmp_path / "mailrelay.yaml"
    config.write_text(_relay(server.ports[listener], str(keys.ed)) + "    add_missing_headers: true\n")
    message = "From: Alice <alice@dkim.test>\nTo: bob@example.net\nSubject: completed\n\n.dot\nGrüße\nno line end"
    request = {"sender": "alice@dkim.test", "recipients": ["bob@example.net"], "message": message}
    with service(config) as running:
        answer = httpx.post(f"{running.url}/relays/out/deliver", json=request, timeout=30).json()
    assert answer["dkim"]["signed"] is True, answer
    (recipient,) = answer["recipients"]
    assert recipient["status"] == "delivered", answer
    stored = server.received(queue_id(recipient["reply"]["message"]))
    signed = signature_tags(stored.replace(b"\n", b"\r\n"))["h"].lower().split(":")
    for name in (b"Date", b"Message-ID"):
        assert b"\n" + name + b": " in stored, stored
        assert name.decode().lower() in signed, signed
    assert stored.endswith("\n.dot\nGrüße\nno line end\n".encode()), stored
    verdict = opendkim.verify(stored)
    assert verdict.passed, (verdict.line, stored)
    assert _dkimpy_verifies(stored.replace(b"\n", b"\r\n"), keys), stored


# --- key size and line lengths ---------------------------------------------------------------------

WIDE_ZONE = "wide.test"


@pytest.fixture(scope="module")
def wide_key() -> Iterator[tuple[SigningKey, bytes, OpenDkim]]:
    """An RSA-6144 key published in an NSD of its own, with a verifier that looks it up there."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=6144)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = SigningKey("rsa-sha256", private, spki, 6144)  # as parse_key made it before it refused such keys
    record = key.record()
    with nsd_server(WIDE_ZONE, txt_record("wide._domainkey", record)) as server, opendkim_verifier(server.address) as v:
        yield key, private.private_bytes(PEM, PKCS8, serialization.NoEncryption()), v


def test_an_rsa_key_over_4096_bits_is_refused_as_opendkim_cannot_use_it(
    wide_key: tuple[SigningKey, bytes, OpenDkim],
) -> None:
    """RFC 8301 asks verifiers for keys of 1024 to 4096 bits; OpenDKIM fails a larger one's
    signatures, so the key is a configuration error (it was taken, and every signature failed)."""
    key, pem, verifier = wide_key
    signer = Signer([Identity(WIDE_ZONE, "wide", key, DEFAULT_HEADERS)])
    signed, outcome = signer.sign(HEAD.replace(b"alice@dkim.test", b"alice@wide.test") + b"\r\n" + BODY)
    assert outcome.signed, outcome
    verdict = verifier.verify(signed)
    assert verdict.line.endswith("failed: unable to apply public key"), verdict.line
    with pytest.raises(KeyProblem, match="an RSA key of 6144 bits; verifiers are only required to take up to 4096"):
        parse_key(pem)


def test_a_long_h_list_is_folded_within_998_characters(keys: Keys, opendkim: OpenDkim) -> None:  # noqa: F811
    """400 signed fields made an h= line of 1,254 characters (RFC 5322 2.1.1 allows 998 a line: a
    receiver may refuse or cut it). Folded, it verifies at OpenDKIM and dkimpy."""
    signer = Signer([Identity(ZONE, "ed", parse_key(keys.ed.read_bytes()), DEFAULT_HEADERS)])
    to = b"".join(b"To: r%d@example.net\r\n" % i for i in range(400))
    signed, outcome = signer.sign(HEAD + to + b"\r\n" + BODY)
    assert outcome.signed, outcome
    field = signed[: signed.index(b"From: ")]
    assert max(len(line) for line in field.split(b"\r\n")) <= 998, [len(line) for line in field.split(b"\r\n")]
    listed = ["from", "to", "subject", "date", "message-id", *["to"] * 400, "from"]
    assert signature_tags(signed)["h"].split(":") == listed  # no name lost or split by the folds
    verdict = opendkim.verify(signed)
    assert verdict.passed, verdict.line
    assert _dkimpy_verifies(signed, keys)
    assert not _dkimpy_verifies(signed.replace(b"r399@", b"r398@"), keys)
