"""DKIM signing: signatures made by mailrelay (dkimpy) verified by OpenDKIM against keys in a real NSD."""

import asyncio
import base64
import dataclasses
import hashlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relays.dkim import DEFAULT_HEADERS, Identity, Signer, SigningRelay, _with_message, parse_key
from schemas.config import ConfigError
from schemas.delivery import DeliveryResult, DkimSignature, Envelope, RecipientResult
from tests.conftest import context, opened
from tests.servers.mailrelay import Service, service
from tests.servers.nsd import Nameserver, nsd_server, txt_record
from tests.servers.opendkim import OpenDkim, opendkim_verifier
from tests.servers.process import require_program, traversable_tmpdir
from tests.servers.smtp import SmtpServer, smtp_server

ZONE = "dkim.test"
PKCS8 = serialization.PrivateFormat.PKCS8
PEM = serialization.Encoding.PEM

#: 8-bit body, folded headers, a display name with a comma: what signing must get right.
MESSAGE = (
    'From: "Alice, Sales" <alice@dkim.test>\r\n'
    "To: Bob <bob@example.net>,\r\n Carol <carol@example.net>\r\n"
    "Subject: a subject folded\r\n\tover two lines\r\n"
    "Date: Mon, 30 Nov 2026 12:00:00 +0000\r\n"
    "Message-ID: <dkim-1@dkim.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße aus Köln: 8-bit text, signed as sent.\r\n"
    ".a line that SMTP dot-stuffs\r\n"
).encode()


@dataclass(frozen=True)
class Keys:
    directory: Path
    rsa: Path  # RSA-2048, PKCS#8 PEM (openssl genpkey / genrsa 3.x)
    ed: Path  # Ed25519, PKCS#8 PEM (openssl genpkey -algorithm ed25519)
    env_pem: str  # an RSA key in PKCS#1 PEM, given through the environment
    stale_record: str  # another key's record, published at a selector whose key was replaced


def _record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    directory = traversable_tmpdir("dkim-keys-")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    env_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stale = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "rsa.key").write_bytes(rsa_key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
    (directory / "ed.key").write_bytes(ed_key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
    env_pem = env_key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    (directory / "published").write_text(
        "".join(
            txt_record(f"{selector}._domainkey", _record(key))
            for selector, key in (("rsa", rsa_key), ("ed", ed_key), ("env", env_key))
        )
    )
    yield Keys(directory, directory / "rsa.key", directory / "ed.key", env_pem.decode(), _record(stale))
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def nameserver(keys: Keys) -> Iterator[Nameserver]:
    records = (keys.directory / "published").read_text() + txt_record("replaced._domainkey", keys.stale_record)
    with nsd_server(ZONE, records) as server:
        yield server


@pytest.fixture(scope="module")
def opendkim(nameserver: Nameserver) -> Iterator[OpenDkim]:
    with opendkim_verifier(nameserver.address) as verifier:
        yield verifier


@pytest.fixture(scope="module")
def receiver() -> Iterator[SmtpServer]:
    with smtp_server() as server:
        yield server


def relay_yaml(receiver: SmtpServer, identities: str, relay_type: str = "static") -> str:
    where = f"host: 127.0.0.1\n    port: {receiver.port}\n" if relay_type == "static" else ""
    return f"relay:\n  out:\n    type: {relay_type}\n    {where}    dkim:\n{identities}"


def identity(selector: str, source: str, domain: str = ZONE, extra: str = "") -> str:
    return f"      - {{domain: {domain}, selector: {selector}, {source}{extra}}}\n"


async def deliver_through(yaml: str, receiver: SmtpServer, message: bytes = MESSAGE) -> tuple[bytes, DeliveryResult]:
    """Delivers `message` through the relay of `yaml`; what the SMTP server got, and the result."""
    before = len(receiver.received)
    async with opened(yaml) as relays:
        relay = relays["out"]
        assert isinstance(relay, SigningRelay)
        results = await relay.deliver(Envelope("alice@dkim.test", ["bob@example.net"], message), context())
    assert [r.status for r in results] == ["delivered"]
    assert len(receiver.received) == before + 1
    result = DeliveryResult(relay="out", message_id=None, elapsed_ms=1.0, recipients=results)
    return receiver.received[-1].content, result


def signature_tags(message: bytes) -> dict[str, str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    field = re.match(r"DKIM-Signature:((?:[^\r\n]|\r\n[ \t])*)", head)
    assert field, "no DKIM-Signature field on top"
    value = re.sub(r"\s+", "", field[1])
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


@pytest.mark.parametrize(("selector", "algorithm"), [("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")])
async def test_opendkim_verifies_the_signature_and_sees_every_change(
    keys: Keys, opendkim: OpenDkim, receiver: SmtpServer, selector: str, algorithm: str
) -> None:
    key_file = keys.rsa if selector == "rsa" else keys.ed
    sent, result = await deliver_through(relay_yaml(receiver, identity(selector, f"key_file: {key_file}")), receiver)

    assert result.dkim == DkimSignature(signed=True, domain=ZONE, selector=selector, algorithm=algorithm)
    shown = result.model_dump(mode="json")
    assert shown["dkim"]["signed"] is True
    assert "dkim" not in shown["recipients"][0]  # once per delivery, not per recipient
    assert sent.endswith(MESSAGE)  # the field on top, the message untouched below it
    tags = signature_tags(sent)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (algorithm, "relaxed/relaxed", ZONE, selector)
    assert tags["h"].lower().split(":").count("from") == 2  # From oversigned

    verified = opendkim.verify(sent)
    assert verified.passed, verified.line
    assert f"s={selector}, d={ZONE}" in verified.line
    changed_body = sent.replace("Köln".encode(), b"Bonn")
    changed_header = sent.replace(b"Subject: a subject", b"Subject: A subject")
    second_from = sent.replace(b"\r\nFrom:", b"\r\nFrom: mallory@evil.test\r\nFrom:", 1)
    for changed in (changed_body, changed_header, second_from):
        assert changed != sent
        verdict = opendkim.verify(changed)
        assert not verdict.passed, verdict.line
        assert verdict.line.endswith("failed: signature verification failed") or "failed" in verdict.line


async def test_key_from_the_environment_and_the_default_identity(
    keys: Keys, opendkim: OpenDkim, receiver: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A From: domain without an identity of its own is signed with the default one (d= differs)."""
    monkeypatch.setenv("MAILRELAY_TEST_DKIM_KEY", keys.env_pem)
    yaml = relay_yaml(
        receiver,
        identity("ed", f"key_file: {keys.ed}", domain="other.test")
        + identity("env", "key_env: MAILRELAY_TEST_DKIM_KEY, default: true", extra=", extra_headers: [X-Campaign]"),
    )
    message = MESSAGE.replace(b"alice@dkim.test", b"alice@elsewhere.test").replace(
        b"MIME-Version", b"X-Campaign: spring\r\nMIME-Version"
    )
    sent, result = await deliver_through(yaml, receiver, message)
    assert result.dkim == DkimSignature(signed=True, domain=ZONE, selector="env", algorithm="rsa-sha256")
    assert "x-campaign" in signature_tags(sent)["h"].lower().split(":")
    verified = opendkim.verify(sent)
    assert verified.passed, verified.line
    assert not opendkim.verify(sent.replace(b"X-Campaign: spring", b"X-Campaign: summer")).passed


async def test_a_from_domain_without_identity_goes_unsigned_and_the_result_says_so(
    keys: Keys, receiver: SmtpServer
) -> None:
    yaml = relay_yaml(receiver, identity("ed", f"key_file: {keys.ed}"))
    message = MESSAGE.replace(b"alice@dkim.test", b"alice@example.org")
    sent, result = await deliver_through(yaml, receiver, message)
    assert sent == message
    assert result.dkim == DkimSignature(signed=False, reason="no signing identity for example.org")
    assert result.model_dump(mode="json")["dkim"] == {
        "signed": False,
        "domain": None,
        "selector": None,
        "algorithm": None,
        "reason": "no signing identity for example.org",
    }


async def test_a_local_delivery_relay_signs_a_message_with_lf_line_ends(keys: Keys, opendkim: OpenDkim) -> None:
    """Every relay type signs (here `pipe`, which keeps the message's own line ends)."""
    out = traversable_tmpdir("dkim-pipe-")
    yaml = f"relay:\n  out:\n    type: pipe\n    args: [/usr/bin/tee, {out}/message.eml]\n    dkim:\n" + identity(
        "ed", f"key_file: {keys.ed}"
    )
    message = MESSAGE.replace(b"\r\n", b"\n")
    async with opened(yaml) as relays:
        results = await relays["out"].deliver(Envelope("alice@dkim.test", ["bob@example.net"], message), context())
    assert [r.status for r in results] == ["delivered"], results
    written = (out / "message.eml").read_bytes()
    assert written.endswith(message)
    assert b"\r" not in written
    verified = opendkim.verify(written)
    assert verified.passed, verified.line


async def test_deliveries_signed_together_each_go_out_with_their_own_signature(
    keys: Keys, opendkim: OpenDkim, receiver: SmtpServer
) -> None:
    """Deliveries that reach the relay in one turn of the event loop are signed in one run
    (SigningRelay): each message still goes out with its own signature, and one cancelled while
    it waits leaves the others be."""
    yaml = relay_yaml(receiver, identity("ed", f"key_file: {keys.ed}"))
    messages = [MESSAGE.replace(b"signed as sent", b"message %d" % i) for i in range(6)]
    before = len(receiver.received)
    async with opened(yaml) as relays:
        relay = relays["out"]

        def deliver(message: bytes) -> asyncio.Task[list[RecipientResult]]:
            return asyncio.create_task(
                relay.deliver(Envelope("alice@dkim.test", ["bob@example.net"], message), context())
            )

        tasks = [deliver(message) for message in messages[:3]]
        dropped = deliver(MESSAGE.replace(b"signed as sent", b"never sent"))  # in the middle of the run
        tasks += [deliver(message) for message in messages[3:]]
        await asyncio.sleep(0)  # every task now waits for its signature, signed at the next turn
        dropped.cancel()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        with pytest.raises(asyncio.CancelledError):
            await dropped
    assert [[r.status for r in results] for results in answers] == [["delivered"]] * len(messages)
    sent = sorted((r.content for r in receiver.received[before:]), key=lambda c: c[-30:])
    assert len(sent) == len(messages)
    for message, content in zip(messages, sent, strict=True):
        assert content.endswith(message)
        verified = opendkim.verify(content)
        assert verified.passed, verified.line


#: Line ends as clients send them besides CRLF: a CR before CRLF is part of one line end, for
#: mailrelay's SMTP client as for Postfix, which sends and stores one CRLF.
CR_LINE_ENDS = [
    pytest.param(MESSAGE.replace(b"signed as sent.\r\n", b"signed as sent.\r\r\n"), id="cr-before-crlf-in-the-body"),
    pytest.param(MESSAGE.replace(b"over two lines\r\n", b"over two lines\r\r\n"), id="cr-before-crlf-in-a-header"),
    pytest.param(MESSAGE.replace(b"\r\n", b"\n").replace(b"lines\n", b"lines\r\r\n"), id="lf-and-cr-cr-lf"),
]


@pytest.mark.parametrize("message", CR_LINE_ENDS)
async def test_what_is_signed_is_what_smtp_sends_with_crs_before_line_ends(
    keys: Keys, opendkim: OpenDkim, receiver: SmtpServer, message: bytes
) -> None:
    """The SMTP client sends an LF with the CRs before it as one CRLF: the signature covers the
    message as it goes out, not as the client gave it (it covered the CRs, and failed)."""
    yaml = relay_yaml(receiver, identity("ed", f"key_file: {keys.ed}"))
    sent, result = await deliver_through(yaml, receiver, message)
    assert result.dkim is not None
    assert result.dkim.signed, result.dkim
    assert b"\r\r" not in sent
    verified = opendkim.verify(sent)
    assert verified.passed, (verified.line, sent)
    assert not opendkim.verify(sent.replace("Grüße".encode(), b"Hallo")).passed


#: A CR that ends no line: OpenDKIM drops it, dkimpy keeps it, Postfix 3.7 stores a space; the one
#: at the very end goes out as CR CR LF, which Postfix reads as one line end and others as a CR.
BARE_CRS = [
    pytest.param(MESSAGE.replace(b"8-bit text", b"8-bit\rtext"), id="in-a-body-line"),
    pytest.param(MESSAGE.replace(b"a subject", b"a\rsubject"), id="in-a-header"),
    pytest.param(MESSAGE.removesuffix(b"\r\n") + b"\r", id="at-the-end"),
]


@pytest.mark.parametrize("message", BARE_CRS)
async def test_a_message_with_a_bare_cr_goes_unsigned_and_the_result_says_why(
    keys: Keys, opendkim: OpenDkim, receiver: SmtpServer, message: bytes
) -> None:
    """Signed, a CR inside a line did not verify with OpenDKIM, and the CR at the end verifies or
    not depending on the receiver: the message goes out unsigned, which the result says."""
    yaml = relay_yaml(receiver, identity("ed", f"key_file: {keys.ed}"))
    sent, result = await deliver_through(yaml, receiver, message)
    assert result.dkim == DkimSignature(
        signed=False,
        domain=ZONE,
        selector="ed",
        reason="cannot sign: a CR outside a line end (receivers read it differently)",
    )
    assert not sent.startswith(b"DKIM-Signature:")


# --- configuration: keys checked at start-up and by check-config ----------------------------------


@pytest.fixture(scope="module")
def bad_keys() -> Iterator[Path]:
    directory = traversable_tmpdir("dkim-bad-")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (directory / "ec.key").write_bytes(ec_key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
    # cryptography refuses to make one this small; openssl does
    subprocess.run(  # noqa: S603
        [
            require_program("openssl"),
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:768",
            "-out",
            str(directory / "small.key"),
        ],
        check=True,
        capture_output=True,
    )
    encrypted = ed25519.Ed25519PrivateKey.generate()
    (directory / "encrypted.key").write_bytes(
        encrypted.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"pass"))
    )
    (directory / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


BAD = [
    ("missing.key", "cannot read"),
    ("ec.key", "neither an RSA nor an Ed25519 private key"),
    ("small.key", "an RSA key of 768 bits"),
    ("encrypted.key", "the key is encrypted"),
    ("cert.pem", "a CERTIFICATE; DKIM signs with an RSA or Ed25519 private key"),
]


async def test_bad_keys_are_configuration_errors_at_start_up(bad_keys: Path) -> None:
    identities = "".join(
        identity(f"s{i}", f"key_file: {bad_keys / name}", domain=f"d{i}.test") for i, (name, _) in enumerate(BAD)
    )
    identities += identity("e", "key_env: MAILRELAY_TEST_NO_SUCH_VARIABLE", domain="env.test")
    with pytest.raises(ConfigError) as info:
        async with opened(f"relay:\n  out:\n    type: blackhole\n    dkim:\n{identities}"):
            pass
    found = {p.path: p.message for p in info.value.problems}
    for i, (name, words) in enumerate(BAD):
        assert words in found.pop(f"relay.out.dkim[{i}].key_file"), name
    assert "MAILRELAY_TEST_NO_SUCH_VARIABLE is not set" in found.pop(f"relay.out.dkim[{len(BAD)}].key_env")
    assert found == {}


def test_the_options_refuse_an_inline_key_and_two_defaults() -> None:
    from app.config import parse_config

    text = (
        "relay:\n  out:\n    type: blackhole\n    dkim:\n"
        "      - {domain: a.test, selector: s, key: '-----BEGIN PRIVATE KEY-----'}\n"
        "      - {domain: b.test, selector: s, key_file: /k, key_env: K}\n"
        "      - {domain: c.test, selector: 'bad selector', key_file: /k, extra_headers: [Received]}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "<test>")
    shown = "\n".join(str(p) for p in info.value.problems)
    assert "relay.out.dkim[0].key: unknown key" in shown  # never the key itself
    assert "relay.out.dkim[1]: give exactly one of `key_file` and `key_env`" in shown
    assert "relay.out.dkim[2].selector" in shown
    assert "relay.out.dkim[2].extra_headers[0]" in shown
    with pytest.raises(ConfigError, match="at most one identity may be the `default`"):
        parse_config(
            "relay:\n  out:\n    type: blackhole\n    dkim:\n"
            "      - {domain: a.test, selector: s, key_env: K, default: true}\n"
            "      - {domain: b.test, selector: s, key_env: K, default: true}\n",
            "<test>",
        )


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_check_config_names_a_bad_key_and_warns_of_what_dns_publishes(
    keys: Keys, bad_keys: Path, nameserver: Nameserver, tmp_path: Path
) -> None:
    settings = f"mailrelay:\n  dns_nameservers: ['{nameserver.host}:{nameserver.port}']\n"
    good = (
        "relay:\n  out:\n    type: blackhole\n    dkim:\n"
        + identity("rsa", f"key_file: {keys.rsa}")  # published, the same key
        + identity("ed", f"key_file: {keys.ed}", domain="other.dkim.test")  # nothing published
        + "  two:\n    type: blackhole\n    dkim:\n"
        + identity("replaced", f"key_file: {keys.rsa}")  # another key published there
    )
    path = tmp_path / "mailrelay.yaml"
    path.write_text(good + settings)
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "dkim" in line]
    assert len(warnings) == 2, done.stderr
    assert warnings[0].startswith("warning: relay.out.dkim[1]: no DKIM key published at ed._domainkey.other.dkim.test")
    assert 'publish TXT "v=DKIM1; k=ed25519; p=' in warnings[0]
    assert warnings[1].startswith("warning: relay.two.dkim[0]: the key published at replaced._domainkey.dkim.test")
    assert "is not this key's public half; publish TXT \"v=DKIM1; k=rsa; p=" in warnings[1]

    path.write_text(
        "relay:\n  out:\n    type: blackhole\n    dkim:\n"
        + identity("s", f"key_file: {bad_keys / 'ec.key'}")
        + settings
    )
    done = check_config(path)
    assert done.returncode == 1
    assert "relay.out.dkim[0].key_file: EC key: neither an RSA nor an Ed25519 private key" in done.stderr


# --- a second verifier: dkimpy, over generated messages --------------------------------------------

_TEXT = st.text(st.sampled_from("abcXYZ012 \t<>@.,;:()=\"'-_"), max_size=40)
_FIELD = st.tuples(st.sampled_from(["To", "Subject", "Cc", "X-Other", "Date", "Reply-To", "Received"]), _TEXT)
_BODY_LINE = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _folded(value: str, folds: list[int]) -> str:
    for at in sorted({min(f, len(value)) for f in folds}, reverse=True):
        if at and value[at - 1 : at] not in (" ", "\t"):
            value = value[:at] + "\r\n " + value[at:]
    return value


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    sender = draw(st.sampled_from(["Alice <alice@dkim.test>", "Alice\r\n <alice@dkim.test>", "alice@dkim.test"]))
    others = [
        (name, _folded(value, draw(st.lists(st.integers(1, 40), max_size=2))))
        for name, value in draw(st.lists(_FIELD, max_size=6))
    ]
    fields = draw(st.permutations([("From", sender), *others]))
    head = "".join(f"{name}:{' ' if draw(st.booleans()) else ''}{value}\r\n" for name, value in fields)
    lines = draw(st.lists(_BODY_LINE, max_size=8))
    # Every line ends with CRLF, as SMTP delivers it (dkimpy keeps blanks at the end of a last line
    # without one, where RFC 6376 3.4.4 and we drop them; no SMTP hop sends such a line).
    body = b"".join(line + b"\r\n" for line in lines) + draw(st.sampled_from([b"", b"\r\n", b" \t\r\n"]))
    message = head.encode() + b"\r\n" + body
    return message.replace(b"\r\n", b"\n") if draw(st.booleans()) else message


@pytest.fixture(scope="module")
def dkimpy_signers() -> dict[str, tuple[Signer, bytes]]:
    import dkim  # the test extra's: an implementation other than ours

    assert dkim  # imported here so that a missing dkimpy fails this test only
    found = {}
    for name, key in (
        ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ed", ed25519.Ed25519PrivateKey.generate()),
    ):
        parsed = parse_key(key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
        found[name] = (Signer([Identity(ZONE, name, parsed, DEFAULT_HEADERS)]), parsed.record().encode())
    return found


@pytest.mark.parametrize("algorithm", ["rsa", "ed"])
def test_dkimpy_verifies_every_generated_message(
    dkimpy_signers: dict[str, tuple[Signer, bytes]], algorithm: str
) -> None:
    import dkim

    signer, record = dkimpy_signers[algorithm]

    def txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{algorithm}._domainkey.{ZONE}.".encode()
        return record

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(messages())
    def check(message: bytes) -> None:
        signed, outcome = signer.sign(message)
        assert outcome.signed, outcome
        assert dkim.verify(signed, dnsfunc=txt), signed
        if b"Subject:" in message:
            assert not dkim.verify(signed.replace(b"Subject:", b"Subject: x", 1), dnsfunc=txt)

    check()


def test_keys_are_read_again_on_sighup_and_a_bad_one_keeps_the_running_configuration(
    keys: Keys, tmp_path: Path
) -> None:
    config = tmp_path / "mailrelay.yaml"
    yaml = "relay:\n  out:\n    type: blackhole\n    dkim:\n" + identity("ed", "key_file: KEY")
    config.write_text(yaml.replace("KEY", str(keys.ed)))
    request = {"sender": "a@dkim.test", "recipients": ["b@example.net"], "message": MESSAGE.decode()}

    def signed_with(url: str) -> object:
        return httpx.post(f"{url}/relays/out/deliver", json=request, timeout=10).json()["dkim"]["algorithm"]

    def reloaded(running: Service, count: int) -> None:
        running.process.send_signal(signal.SIGHUP)
        for _ in range(200):
            if running.logs().count("configuration reload") >= count:
                return
            time.sleep(0.05)
        raise AssertionError(running.logs()[-2000:])

    with service(config) as running:
        assert signed_with(running.url) == "ed25519-sha256"
        config.write_text(yaml.replace("KEY", str(keys.directory / "missing.key")))
        reloaded(running, 1)
        assert "reload refused, keeping the running one: relay.out.dkim[0].key_file: cannot read" in running.logs()
        assert signed_with(running.url) == "ed25519-sha256"
        config.write_text(yaml.replace("KEY", str(keys.rsa)).replace("selector: ed", "selector: rsa"))
        reloaded(running, 2)
        assert signed_with(running.url) == "rsa-sha256"


def test_the_signed_envelope_carries_every_other_field_over() -> None:
    """SigningRelay builds the signed message's envelope field by field (dataclasses.replace cost
    2.5 times as much): a field Envelope gains must be carried over too, or this fails."""
    fields = [field.name for field in dataclasses.fields(Envelope) if field.init]
    values: dict[str, Any] = {name: object() for name in fields}  # each a value of its own
    original = Envelope(**values)
    signed = _with_message(original, b"signed")
    assert signed.message == b"signed"
    assert all(getattr(signed, name) is getattr(original, name) for name in fields if name != "message")


@given(st.binary(max_size=2048))
@settings(max_examples=50, deadline=None)
def test_ed25519_through_libsodium_is_openssl_s_signature(data: bytes) -> None:
    """SigningKey.sign takes Ed25519 through libsodium (faster): the very bytes OpenSSL signs,
    and a signature OpenSSL verifies."""
    private = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = parse_key(pem)
    digest = hashlib.sha256(data).digest()
    signature = key.sign(data)
    assert signature == private.sign(digest)
    private.public_key().verify(signature, digest)
