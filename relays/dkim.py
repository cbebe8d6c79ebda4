"""DKIM signing (RFC 6376; Ed25519-SHA256 from RFC 8463) around any relay, with dkimpy."""

import asyncio
import base64
import binascii
import dataclasses
import email.utils
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import dkim
import dkim.asn1
import dkim.crypto
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import idna
import nacl.exceptions
import nacl.signing

from relays.base import DeliveryContext, Relay
from schemas.config import ConfigError, ConfigProblem, ServiceConfig
from schemas.delivery import DkimSignature, Envelope, RecipientResult
from schemas.relay_options import DkimIdentity

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: Signed where present, besides an identity's extra headers: dkimpy's default set (RFC 6376
#: 5.4.1's list: From, Subject, Date, To, Cc, Message-ID, the MIME, List-*, Resent-* fields...) and
#: List-Unsubscribe-Post, which one-click unsubscription requires signed (RFC 8058 4). From is
#: signed once more than it appears (dkimpy's FROZEN), so a second From: added later breaks it.
DEFAULT_HEADERS: Final = frozenset(dkim.DKIM.SHOULD) | {b"list-unsubscribe-post"}
#: A key file or variable larger than this is not a key (an RSA-8192 PEM is under 7 KiB).
MAX_KEY_BYTES: Final = 64 * 1024
#: PKCS#8 (RFC 5958, version 1) of an Ed25519 key, before its 32-byte seed (RFC 8410 7), as
#: `openssl genpkey -algorithm ed25519` writes it.
_ED25519_PKCS8_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_RSA_ENCRYPTION_OID: Final = bytes.fromhex("06092a864886f70d010101")
_PEM: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_HEADER_END: Final = re.compile(rb"\r?\n\r?\n")
_FROM: Final = re.compile(rb"^from[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)
#: dkimpy logs each signature at debug level through its own logger; the service's logs need none.
_QUIET: Final = logging.getLogger("mailrelay.dkim.dkimpy")
_QUIET.disabled = True


class KeyProblem(ValueError):
    """Why a private key cannot sign."""


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """A private key as dkimpy takes it, and its public half as DNS publishes it."""

    algorithm: Algorithm
    private: bytes  # PEM for RSA; the base64 32-byte seed for Ed25519 (what dkimpy's sign() takes)
    public: bytes  # the p= value decoded: DER SubjectPublicKeyInfo (RSA), the raw 32 bytes (Ed25519)
    bits: int

    def record(self) -> str:
        """The TXT record to publish at <selector>._domainkey.<domain>."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(self.public).decode()}"


def parse_key(data: bytes) -> SigningKey:
    """An RSA (PKCS#1 or PKCS#8 PEM) or Ed25519 (PKCS#8 PEM, or dkimpy's base64 seed) private key.
    Raises KeyProblem with the reason."""
    if len(data) > MAX_KEY_BYTES:
        raise KeyProblem(f"{len(data)} bytes: too large for a private key")
    match = _PEM.search(data)
    if match is None:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) == 32:
            return _ed25519(seed)
        raise KeyProblem("not a PEM private key (-----BEGIN PRIVATE KEY----- ...)")
    label, body = match[1].decode(), match[2]
    if label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type:" in body:
        raise KeyProblem("the key is encrypted; give it unencrypted and protect the file instead")
    if label not in ("PRIVATE KEY", "RSA PRIVATE KEY"):
        raise KeyProblem(f"a {label}; DKIM signs with an RSA or Ed25519 private key")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise KeyProblem("the PEM body is not valid base64") from None
    if label == "PRIVATE KEY" and der.startswith(_ED25519_PKCS8_PREFIX) and len(der) == 48:
        return _ed25519(der[len(_ED25519_PKCS8_PREFIX) :])
    try:
        rsa = dkim.crypto.parse_private_key(der)
    except (dkim.crypto.UnparsableKeyError, dkim.asn1.ASN1FormatError, IndexError, ValueError):
        raise KeyProblem("neither an RSA nor an Ed25519 private key") from None
    bits = int(rsa["modulus"]).bit_length()
    if bits < 1024:
        raise KeyProblem(f"an RSA key of {bits} bits; DKIM needs at least 1024 (RFC 8301), 2048 is usual")
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"
    return SigningKey("rsa-sha256", pem, _rsa_spki(int(rsa["modulus"]), int(rsa["publicExponent"])), bits)


def _ed25519(seed: bytes) -> SigningKey:
    try:
        public = bytes(nacl.signing.SigningKey(seed).verify_key)
    except (nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise KeyProblem("not an Ed25519 private key") from None
    return SigningKey("ed25519-sha256", base64.b64encode(seed), public, 256)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # a leading 0 keeps it positive


def _rsa_spki(modulus: int, exponent: int) -> bytes:
    """SubjectPublicKeyInfo (RFC 5280) of an RSA public key: what `openssl pkey -pubout` writes."""
    public = _der(0x30, _der_int(modulus) + _der_int(exponent))
    algorithm = _der(0x30, _RSA_ENCRYPTION_OID + b"\x05\x00")
    return _der(0x30, algorithm + _der(0x03, b"\x00" + public))


@dataclasses.dataclass(frozen=True)
class Identity:
    """A signing identity ready to sign: its domain as an A-label, its key loaded."""

    domain: str
    selector: str
    key: SigningKey
    headers: frozenset[bytes]
    default: bool = False

    @property
    def name(self) -> str:
        """Where its public key is published."""
        return f"{self.selector}._domainkey.{self.domain}"


def a_label(domain: str) -> str:
    """A domain as DKIM's d= and DNS have it: lower case, A-labels (RFC 8616 4)."""
    domain = domain.lower().rstrip(".")
    return domain if domain.isascii() else idna.encode(domain, uts46=True).decode("ascii")


def load_identities(path: str, options: Sequence[DkimIdentity]) -> list[Identity]:
    """Every identity with its key read and checked; `path` is the list's key path
    (`relay.NAME.dkim`). Raises ConfigError naming each bad key's source."""
    identities: list[Identity] = []
    problems: list[ConfigProblem] = []
    for i, option in enumerate(options):
        where = f"{path}[{i}]"
        source = f"{where}.key_file" if option.key_file is not None else f"{where}.key_env"
        try:
            domain = a_label(option.domain)
        except idna.IDNAError as exc:
            problems.append(ConfigProblem(path=f"{where}.domain", message=f"not a valid domain name: {exc}"))
            continue
        try:
            key = parse_key(_read_key(option))
        except KeyProblem as exc:
            problems.append(ConfigProblem(path=source, message=str(exc)))
            continue
        headers = DEFAULT_HEADERS | {h.lower().encode("ascii") for h in option.extra_headers}
        identities.append(Identity(domain, option.selector, key, headers, option.default))
    if problems:
        raise ConfigError(problems)
    return identities


def _read_key(option: DkimIdentity) -> bytes:
    if option.key_file is not None:
        try:
            with open(option.key_file, "rb") as key_file:
                return key_file.read(MAX_KEY_BYTES + 1)
        except OSError as exc:
            raise KeyProblem(f"cannot read {option.key_file}: {exc.strerror}") from None
    assert option.key_env is not None  # noqa: S101 - the options model requires one of the two
    value = os.environ.get(option.key_env)
    if not value:
        raise KeyProblem(f"the environment variable {option.key_env} is not set")
    return value.encode("utf-8", "replace")


def from_domain(message: bytes) -> str | None:
    """The domain of the first address in the first From: header, as an A-label; None without one."""
    end = _HEADER_END.search(message)
    match = _FROM.search(message, 0, end.start() if end else len(message))
    if match is None:
        return None
    text = match[1].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    addresses = [address for _, address in email.utils.getaddresses([text]) if "@" in address]
    if not addresses:
        return None
    try:
        return a_label(addresses[0].rpartition("@")[2].strip())
    except (idna.IDNAError, UnicodeError):
        return None


class Signer:
    """Chooses the identity by the From: domain (exact, then the default) and signs."""

    def __init__(self, identities: Sequence[Identity]) -> None:
        self.identities = list(identities)
        self._by_domain = {identity.domain: identity for identity in identities}
        self._default = next((identity for identity in identities if identity.default), None)

    def sign(self, message: bytes) -> tuple[bytes, DkimSignature]:
        """The message with a DKIM-Signature field on top, or as it was, and what was done."""
        domain = from_domain(message)
        identity = self._by_domain.get(domain, self._default) if domain else self._default
        if identity is None:
            reason = f"no signing identity for {domain}" if domain else "the message has no From: address"
            return message, DkimSignature(signed=False, reason=reason)
        # The new field's line ends follow the message's, so a relay that keeps them as they are
        # (pipe, maildrop) does not get a mixed message.
        first_line = message.find(b"\n")
        linesep = b"\r\n" if first_line > 0 and message[first_line - 1] == 13 else b"\n"
        signer = dkim.DKIM(message, logger=_QUIET, signature_algorithm=identity.key.algorithm.encode(), linesep=linesep)
        signer.should_sign = set(identity.headers)
        try:
            field = signer.sign(
                identity.selector.encode(),
                identity.domain.encode(),
                identity.key.private,
                canonicalize=(b"relaxed", b"relaxed"),
            )
        except dkim.DKIMException as exc:
            return message, DkimSignature(
                signed=False, domain=identity.domain, selector=identity.selector, reason=f"cannot sign: {exc}"
            )
        return field + message, DkimSignature(
            signed=True, domain=identity.domain, selector=identity.selector, algorithm=identity.key.algorithm
        )


class SigningRelay:
    """Signs each envelope's message once, then hands it to the relay it wraps.

    Every recipient's result carries what was done (`dkim`), which DeliveryResult shows once.
    """

    def __init__(self, inner: Relay, signer: Signer) -> None:
        self.inner = inner
        self.signer = signer

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        # On the loop: Ed25519 over 1 KiB costs about 0.2 ms, mostly dkimpy's Python (bench/),
        # and the GIL would keep a thread from overlapping it anyway.
        message, outcome = self.signer.sign(envelope.message)
        if message is not envelope.message:
            envelope = dataclasses.replace(envelope, message=message)
        results = await self.inner.deliver(envelope, context)
        return [result.model_copy(update={"dkim": outcome}) for result in results]

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- check-config: is each key the one DNS publishes? -------------------------------------------


async def published_key_warnings(
    identities: Mapping[str, Sequence[Identity]], nameservers: Sequence[tuple[str, int]], lookup_seconds: float = 5.0
) -> list[ConfigProblem]:
    """A warning per identity whose selector record is missing, revoked, of another key, or
    could not be read (every lookup at once, each within `lookup_seconds`). `identities` are
    by the key path of their list (`relay.NAME.dkim`)."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return [ConfigProblem(path="mailrelay.dns_nameservers", message="no resolver: DKIM keys not checked")]
    resolver.lifetime = lookup_seconds
    checks = [(f"{path}[{i}]", identity) for path, listed in identities.items() for i, identity in enumerate(listed)]
    found = await asyncio.gather(*(_published_problem(resolver, identity) for _, identity in checks))
    return [ConfigProblem(path=path, message=text) for (path, _), text in zip(checks, found, strict=True) if text]


async def _published_problem(resolver: dns.asyncresolver.Resolver, identity: Identity) -> str | None:
    publish = f'publish TXT "{identity.key.record()}" at {identity.name}'
    try:
        answer = await resolver.resolve(identity.name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return f"no DKIM key published at {identity.name}: receivers cannot verify; {publish}"
    except dns.exception.DNSException as exc:
        return f"the DKIM key at {identity.name} could not be checked: {exc}"
    records = [b"".join(rdata.strings) for rdata in answer]
    keys = []
    for record in records:
        try:
            tags = dkim.util.parse_tag_value(record)
        except dkim.util.InvalidTagValueList:
            continue
        if tags.get(b"v", b"DKIM1") == b"DKIM1" and b"p" in tags:
            keys.append(tags)
    if len(keys) != 1:
        return f"{len(keys)} DKIM key records at {identity.name}, where receivers need one; {publish}"
    tags = keys[0]
    if not tags[b"p"]:
        return f"the key at {identity.name} is revoked (empty p=); {publish}"
    kind = b"rsa" if identity.key.algorithm == "rsa-sha256" else b"ed25519"
    try:
        public = base64.b64decode(b"".join(tags[b"p"].split()), validate=True)
    except binascii.Error:
        public = b""
    if tags.get(b"k", b"rsa") != kind or not _same_public_key(identity.key, public):
        return f"the key published at {identity.name} is not this key's public half; {publish}"
    return None


def _same_public_key(key: SigningKey, published: bytes) -> bool:
    if key.algorithm == "ed25519-sha256":
        return published == key.public
    try:  # SubjectPublicKeyInfo or a bare RSAPublicKey, as verifiers take either
        theirs, ours = dkim.crypto.parse_public_key(published), dkim.crypto.parse_public_key(key.public)
    except (dkim.crypto.UnparsableKeyError, dkim.asn1.ASN1FormatError, IndexError, ValueError):
        return False
    return bool(theirs == ours)


async def check_config(
    config: ServiceConfig, *, dns_timeout: float = 5.0
) -> tuple[list[ConfigProblem], list[ConfigProblem]]:
    """For `check-config`: (problems with the keys, warnings about what DNS publishes)."""
    problems: list[ConfigProblem] = []
    loaded: dict[str, list[Identity]] = {}
    for name, options in config.relay.items():
        if not options.dkim:
            continue
        path = f"relay.{name}.dkim"
        try:
            loaded[path] = load_identities(path, options.dkim)
        except ConfigError as exc:
            problems.extend(exc.problems)
    warnings = await published_key_warnings(loaded, config.mailrelay.nameservers(), dns_timeout) if loaded else []
    return problems, warnings
