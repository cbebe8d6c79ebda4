"""DKIM signing (RFC 6376; Ed25519-SHA256 from RFC 8463) around any relay.

Relaxed/relaxed canonicalisation is done here and the signature by OpenSSL (`cryptography`):
dkimpy's signer, measured first, cost 13.8 ms a message with RSA-2048 (its RSA is Python
integers; OpenSSL's signature is 0.65 ms) and 0.38 ms with Ed25519, mostly its parsing (bench/
signing.py). dkimpy and OpenDKIM verify what this makes, in the tests.
"""

import asyncio
import base64
import binascii
import dataclasses
import email.utils
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, cast

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import idna
import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relays.base import DeliveryContext, Relay
from schemas.config import ConfigError, ConfigProblem, ServiceConfig
from schemas.delivery import DkimSignature, Envelope, RecipientResult
from schemas.relay_options import DkimIdentity

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: Signed where present, besides an identity's extra headers: RFC 6376 5.4.1's list, the MIME and
#: Resent-* fields, and List-Unsubscribe-Post, which one-click unsubscription needs signed
#: (RFC 8058 4). From is listed once more than it appears (oversigned): a From: added later breaks it.
DEFAULT_HEADERS: Final = frozenset(
    b"from sender reply-to subject date message-id to cc mime-version content-type content-transfer-encoding "
    b"content-id content-description resent-date resent-from resent-sender resent-to resent-cc resent-message-id "
    b"in-reply-to references list-id list-help list-unsubscribe list-unsubscribe-post list-subscribe list-post "
    b"list-owner list-archive".split()
)
#: A key file or variable larger than this is not a key (an RSA-8192 PEM is under 7 KiB).
MAX_KEY_BYTES: Final = 64 * 1024
_PEM_LABEL: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
#: The first empty line. A line end is an LF with any CRs right before it: mailrelay's SMTP client
#: sends each as one CRLF (relays/smtp/session.py crlf_lines), and what is signed must be what goes out.
_HEADER_END: Final = re.compile(rb"\n\r*\n")
_FROM: Final = re.compile(rb"^from[ \t]*:((?:[^\r\n]|\r*\n[ \t])*)", re.IGNORECASE | re.MULTILINE)
_LINE_END: Final = re.compile(rb"\r*\n")
_BARE_CR: Final = re.compile(rb"\r+(?!\r*\n)")
_WSP: Final = re.compile(rb"[ \t]+")


_PKCS1: Final = padding.PKCS1v15()
_SHA256: Final = hashes.SHA256()


class KeyProblem(ValueError):
    """Why a private key cannot sign."""


class Unsignable(ValueError):
    """Why no signature over a message would verify at the receivers (the message goes unsigned)."""


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """A private key, and its public half as DNS publishes it."""

    algorithm: Algorithm
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    public: bytes  # the p= value decoded: DER SubjectPublicKeyInfo (RSA), the raw 32 bytes (Ed25519)
    bits: int

    def record(self) -> str:
        """The TXT record to publish at <selector>._domainkey.<domain>."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(self.public).decode()}"

    @functools.cached_property
    def _sodium_key(self) -> bytes:
        """The Ed25519 key as libsodium takes it (seed + public half)."""
        seed = cast(ed25519.Ed25519PrivateKey, self.private).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return nacl.bindings.crypto_sign_seed_keypair(seed)[1]

    def sign(self, data: bytes) -> bytes:
        # By the algorithm's name: isinstance() against cryptography's abstract classes goes
        # through ABCMeta (1,100 instructions, 0.2% of a signed delivery's CPU in py-spy).
        if self.algorithm == "ed25519-sha256":  # RFC 8463 3: Ed25519 over the SHA-256 hash
            # libsodium, not OpenSSL: the same signature (Ed25519 is deterministic) for 18 us
            # against 31 (OpenSSL 3.0 sets up its provider on every call); tests/relays/test_dkim.py
            # compares the two.
            return nacl.bindings.crypto_sign(hashlib.sha256(data).digest(), self._sodium_key)[:64]
        return cast(rsa.RSAPrivateKey, self.private).sign(data, _PKCS1, _SHA256)


def parse_key(data: bytes) -> SigningKey:
    """An RSA or Ed25519 private key: PEM (PKCS#8, or PKCS#1 for RSA), or the base64 32-byte seed
    dkimpy's dknewkey writes for Ed25519. Raises KeyProblem with the reason."""
    if len(data) > MAX_KEY_BYTES:
        raise KeyProblem(f"{len(data)} bytes: too large for a private key")
    label = _PEM_LABEL.search(data)
    if label is None:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) != 32:
            raise KeyProblem("not a PEM private key (-----BEGIN PRIVATE KEY----- ...)")
        return _ed25519(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    if not label[1].endswith(b"PRIVATE KEY"):
        raise KeyProblem(f"a {label[1].decode()}; DKIM signs with an RSA or Ed25519 private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise KeyProblem("the key is encrypted; give it unencrypted and protect the file instead") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyProblem(f"the private key cannot be read: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _ed25519(key)
    if not isinstance(key, rsa.RSAPrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise KeyProblem(f"{kind} key: neither an RSA nor an Ed25519 private key")
    if key.key_size < 1024:
        raise KeyProblem(f"an RSA key of {key.key_size} bits; DKIM needs at least 1024 (RFC 8301), 2048 is usual")
    if key.key_size > 4096:
        # RFC 8301 3.2 asks verifiers for 1024 to 4096 bits only; OpenDKIM cannot use a larger key
        # ("unable to apply public key"): every signature would fail there, silently.
        raise KeyProblem(
            f"an RSA key of {key.key_size} bits; verifiers are only required to take up to 4096 (RFC 8301), 2048 is usual"
        )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey("rsa-sha256", key, spki, key.key_size)


def _ed25519(key: ed25519.Ed25519PrivateKey) -> SigningKey:
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey("ed25519-sha256", key, public, 256)


@dataclasses.dataclass(frozen=True)
class Identity:
    """A signing identity ready to sign: its domain as an A-label, its key loaded."""

    domain: str
    selector: str
    key: SigningKey
    headers: frozenset[bytes]
    default: bool = False

    @functools.cached_property
    def tags(self) -> bytes:
        """The signature's first tags, the same in each."""
        return b"v=1; a=%s; c=relaxed/relaxed; d=%s; s=%s;" % (
            self.key.algorithm.encode(),
            self.domain.encode(),
            self.selector.encode(),
        )

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
    try:
        return _Parsed(message).from_domain()
    except ValueError:  # a header line that is not a field: the first From: is still read
        end = _HEADER_END.search(message)
        match = _FROM.search(message, 0, end.start() if end else len(message))
        return None if match is None else _address_domain(_LINE_END.sub(b"", match[1]))


def _address_domain(value: bytes) -> str | None:
    """The domain of the first address in a From: value (unfolded), as an A-label."""
    if (
        value.count(b"@") == 1
        and value.find(b",") < 0
        and value.find(b"(") < 0
        and value.find(b'"') < 0
        and value.find(b"\\") < 0
        and value.find(b":") < 0  # a group (`Team: a@b;`): its ";" is no part of the domain
    ):
        # `Name <local@domain>` or `local@domain`: the domain is what follows the one "@" (the
        # email package's parser costs 30 us more, for the general case below).
        address = value[value.rfind(b"<") + 1 :]  # the whole value without a "<" (rfind: -1)
        domain = address.partition(b"@")[2].partition(b">")[0].strip().decode("utf-8", "replace")
    else:
        text = value.decode("utf-8", "replace")
        addresses = [address for _, address in email.utils.getaddresses([text]) if "@" in address]
        if not addresses:
            return None
        domain = addresses[0].rpartition("@")[2].strip()
    if domain.split() != [domain]:  # empty, or blanks inside
        return None
    try:
        return a_label(domain)
    except (idna.IDNAError, UnicodeError):
        return None


# `x in some_bytes` tries x as an integer first and formats a TypeError before it searches: 1,800
# instructions more than `some_bytes.find(x)` (callgrind), a dozen times a message; hence find().

_NOT_A_FIELD: Final = "cannot sign: a header line is not a field (name: value)"
#: What a field name may hold (RFC 5322 2.2: printable ASCII but the colon), and the colon that
#: joins the names (_Parsed). Postfix ends the header at a line whose name holds anything else
#: and puts an empty line before it: the rest of the header arrives in the body.
_NAME_BYTES: Final = bytes(range(33, 127))

#: How a message's line ends are written, from three counts (see _Parsed): CRLF only, LF only,
#: or anything else (LF with several CRs before it, CRs outside line ends).
_CRLF, _LF, _MIXED = 0, 1, 2


class _Parsed:
    """A message's header read once, for choosing the identity and for signing.

    Line ends are read as mailrelay's SMTP client sends them (relays/smtp/session.py crlf_lines):
    an LF with any CRs right before it is one line end, so what is signed is what goes out.
    Raises ValueError when a header line is not a field.
    """

    __slots__ = ("body", "ends", "message", "names", "values")

    def __init__(self, message: bytes) -> None:
        # Three counts over the message (memchr speed) choose the line-end handling for the header,
        # the body and the bare-CR check at once; the usual message (CRLF only) then needs no
        # regular expression (with one, CRLF -> CRLF cost 4 us a KiB).
        crs, lfs = message.count(b"\r"), message.count(b"\n")
        self.ends = _LF if crs == 0 else _CRLF if crs == lfs == message.count(b"\r\n") else _MIXED
        if self.ends == _MIXED:
            end = _HEADER_END.search(message)
            start, stop = (end.start(), end.end()) if end else (-1, -1)
        else:
            blank = b"\r\n\r\n" if self.ends == _CRLF else b"\n\n"
            start = message.find(blank)
            stop = start + len(blank)
        if start < 0:  # no body: the header ends with the message (and its last line end)
            head, self.body = message.rstrip(b"\r\n"), b""
        else:
            head, self.body = message[:start], message[stop:]
        if self.ends == _CRLF:
            lines = head.split(b"\r\n")
        elif self.ends == _LF:
            lines = head.split(b"\n")
        else:
            lines = _LINE_END.split(head.rstrip(b"\r"))  # rstrip: the CRs of the last line's end
        self.message = message
        # Linear in the header's size, whatever a client puts in it: this runs on the event loop,
        # and a header of many fields (or one folded over many lines) cost its square
        # (tests/relays/test_dkim_scaling.py). Per field: its name, lower case, blanks before the
        # colon removed; its value unfolded (the line ends of its folds removed, all else kept).
        # The loop does the least per line; the names are checked and lowered in one piece after it.
        names: list[bytes] = []
        values: list[bytes] = []
        folds: dict[int, list[bytes]] = {}  # a folded field's lines, joined once at the end
        for line in lines:
            if line[:1] in (b" ", b"\t") and values:
                folds.setdefault(len(values) - 1, [values[-1]]).append(line)
                continue
            colon = line.find(b":")
            if colon <= 0:
                raise ValueError(_NOT_A_FIELD)
            names.append(line[:colon])
            values.append(line[colon + 1 :])
        for i, parts in folds.items():
            values[i] = b"".join(parts)
        joined = b":".join(names)  # no name holds a colon
        if joined.translate(None, _NAME_BYTES):  # blanks before a colon, or a byte no name may hold
            names = [name.rstrip(b" \t") for name in names]
            if any(not name or name.translate(None, _NAME_BYTES) for name in names):
                raise ValueError(_NOT_A_FIELD)
            joined = b":".join(names)
        self.names, self.values = joined.lower().split(b":"), values

    def refusal(self) -> str | None:
        """Why no signature over this message would verify at the receivers, or None (see also
        signature_field's Unsignable)."""
        if self.ends == _MIXED and _BARE_CR.search(self.message) is not None:
            # A CR that is not part of a line end (an LF with the CRs right before it): receivers
            # read it differently (OpenDKIM drops it, dkimpy keeps it, Postfix 3.7 stores a space).
            return "cannot sign: a CR outside a line end (receivers read it differently)"
        return None

    def from_domain(self) -> str | None:
        try:
            i = self.names.index(b"from")
        except ValueError:
            return None
        return _address_domain(self.values[i])

    def signature_field(self, identity: Identity, now: int | None) -> bytes:
        """The DKIM-Signature field (relaxed/relaxed) for this message, with its line end."""
        names, values, headers = self.names, self.values, identity.headers
        picked = [i for i, name in enumerate(names) if name in headers]
        signed = [names[i] for i in picked]
        if len(set(signed)) != len(signed):
            # Fields are taken from the bottom up (RFC 6376 5.4.2): the k-th listing of a name is
            # its k-th field from the bottom. Without a repeated name that is the header's order.
            stacks: dict[bytes, list[int]] = {}
            for i in picked:
                stacks.setdefault(names[i], []).append(i)
            picked = [stacks[name].pop() for name in signed]
        # From is listed once more than it appears (oversigned): that listing adds nothing to the
        # hash, and a verifier then refuses a message given one more From.
        signed.append(b"from")
        # Our own line ends: those of the message, so that a relay that keeps them (pipe, maildrop)
        # does not get a message with two kinds.
        if self.ends == _MIXED:
            first = self.message.find(b"\n")
            sep = b"\r\n" if first > 0 and self.message[first - 1] == 13 else b"\n"  # 13: CR
        else:
            sep = b"\r\n" if self.ends == _CRLF else b"\n"
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(self.body, self.ends)).digest())
        listed = b":".join(signed)
        if len(listed) > _FOLD_AT:
            listed = _folded(signed, sep)
        tags = identity.tags + b"%s\tt=%d; h=%s;%s\tbh=%s;%s\tb=" % (
            sep,
            int(time.time()) if now is None else now,
            listed,
            sep,
            body_hash,
            sep,
        )
        # Its relaxed form (RFC 6376 3.7: b= empty, no line end): the folds (a line end and a tab)
        # unfolded and made one space, which is what compressing the blanks makes of them.
        own = b"dkim-signature:" + tags.replace(sep + b"\t", b" ")
        # RFC 6376 3.4.2: the name in lower case, the value unfolded, runs of blanks made one space,
        # blanks around the colon and at the end removed. Blanks at the ends are stripped field by
        # field; then, if a tab or two blanks in a row are left anywhere, all is done again with
        # the regular expression (rare: one search over the lot, not two per field).
        data = b"\r\n".join([*(names[i] + b":" + values[i].strip(b" \t") for i in picked), own])
        if data.find(b"\t") >= 0 or data.find(b"  ") >= 0:
            data = b"\r\n".join([*(names[i] + b":" + _WSP.sub(b" ", values[i]).strip(b" ") for i in picked), own])
        # A vertical tab or form feed: OpenDKIM reads it as a blank (its DKIM_ISLWSP: compressed,
        # stripped), dkimpy at a value's ends only (bytes.strip()), RFC 6376 3.4.2 nowhere.
        if data.find(b"\x0b") >= 0 or data.find(b"\x0c") >= 0:
            raise Unsignable(
                "cannot sign: a vertical tab or form feed in a signed field (receivers read it differently)"
            )
        if data.find(b"\0") >= 0:  # Postfix cuts a header line at a NUL (`Subject: a\0b` arrives as `Subject: a`)
            raise Unsignable("cannot sign: a NUL byte in a signed field (receivers cut the line at it)")
        return b"DKIM-Signature: " + tags + base64.b64encode(identity.key.sign(data)) + sep


#: The longest h= value on one line: RFC 5322 2.1.1 allows 998 characters a line, and a receiver
#: may refuse or cut a longer one (330 signed fields made one). Folded (RFC 6376 3.5 allows FWS
#: around its colons) only past it. b= needs none: 684 characters with the largest key taken.
_FOLD_AT: Final = 900


def _folded(names: list[bytes], sep: bytes) -> bytes:
    """h=: the names joined by colons, in lines of at most _FOLD_AT characters."""
    lines: list[list[bytes]] = [[]]
    length = 0
    for name in names:
        if length and length + len(name) + 1 > _FOLD_AT:
            lines.append([])
            length = 0
        lines[-1].append(name)
        length += len(name) + 1
    return (b":" + sep + b"\t").join(b":".join(line) for line in lines)


def _signed(identity: Identity) -> DkimSignature:
    return DkimSignature(
        signed=True, domain=identity.domain, selector=identity.selector, algorithm=identity.key.algorithm
    )


class Signer:
    """Chooses the identity by the From: domain (exact, then the default) and signs."""

    def __init__(self, identities: Sequence[Identity]) -> None:
        self.identities = list(identities)
        # What the result says when one signs: made once (a frozen model), not per message.
        self._by_domain = {identity.domain: (identity, _signed(identity)) for identity in identities}
        self._default = next(((identity, _signed(identity)) for identity in identities if identity.default), None)

    def sign(self, message: bytes) -> tuple[bytes, DkimSignature]:
        """The message with a DKIM-Signature field on top, or as it was, and what was done."""
        try:
            parsed: _Parsed | None = _Parsed(message)
        except ValueError:
            parsed = None
        domain = parsed.from_domain() if parsed is not None else from_domain(message)
        chosen = self._by_domain.get(domain, self._default) if domain else self._default
        if chosen is None:
            reason = f"no signing identity for {domain}" if domain else "the message has no From: address"
            return message, DkimSignature(signed=False, reason=reason)
        identity, outcome = chosen
        refused = _NOT_A_FIELD if parsed is None else parsed.refusal()
        if parsed is not None and refused is None:
            try:
                return parsed.signature_field(identity, None) + message, outcome
            except Unsignable as exc:
                refused = str(exc)
        return message, DkimSignature(signed=False, domain=identity.domain, selector=identity.selector, reason=refused)


def signature_field(message: bytes, identity: Identity, now: int | None = None) -> bytes:
    """The DKIM-Signature field (relaxed/relaxed) to put on top of `message`, with its line end.
    Raises ValueError when the header cannot be read (Unsignable: when receivers could not verify
    a signature over a signed field; see also _Parsed.refusal)."""
    return _Parsed(message).signature_field(identity, now)


def _relaxed_body(body: bytes, ends: int = _MIXED) -> bytes:
    """RFC 6376 3.4.4 (CRLF line ends, as SMTP carries them): runs of blanks made one space, none at
    a line's end, no empty lines at the end, and a non-empty body ending in CRLF. `ends`: how the
    message writes its line ends (_Parsed), to skip what cannot change anything."""
    if ends == _LF:
        body = body.replace(b"\n", b"\r\n")
    elif ends == _MIXED:
        body = _LINE_END.sub(b"\r\n", body)
    if body.find(b"\t") >= 0 or body.find(b"  ") >= 0:
        body = _WSP.sub(b" ", body)
    body = body.replace(b" \r\n", b"\r\n")  # the body itself when there is none
    end = len(body.rstrip(b" "))
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == 0:
        return b""
    return body if end == len(body) - 2 else body[:end] + b"\r\n"


#: At most this many messages signed in one go (SigningRelay): a longer run of signatures would hold
#: the event loop for longer (32 x ~0.05 ms with Ed25519; RSA-2048 ~0.3-0.7 ms each).
MAX_BATCH: Final = 32
#: A message waits this many turns of the event loop to be signed, so that the deliveries arriving
#: meanwhile share its batch. Signed at the next turn, 8 deliveries at once made batches of 1.4 on
#: average; after three, of 8 (all of them), and a signed delivery cost 15 us more CPU than an
#: unsigned one instead of 57 (bench/app_cost.py static dkim, 2026-12-01). An idle loop's turns take
#: microseconds; a busy one's are what the batch saves.
GATHER_TURNS: Final = 3


def _after_turns(loop: asyncio.AbstractEventLoop, turns: int, callback: Callable[[], None]) -> None:
    """`callback()` at the `turns`-th turn of `loop` from now (1: the next, as call_soon)."""
    if turns <= 1:
        loop.call_soon(callback)
    else:
        loop.call_soon(_after_turns, loop, turns - 1, callback)


def _with_message(envelope: Envelope, message: bytes) -> Envelope:
    """`dataclasses.replace(envelope, message=message)` at 40% of its cost (9,400 instructions
    against 24,000, callgrind); a test checks that every other field is carried over."""
    return Envelope(
        sender=envelope.sender,
        recipients=envelope.recipients,
        message=message,
        client=envelope.client,
        origin=envelope.origin,
        require_tls=envelope.require_tls,
    )


class SigningRelay:
    """Signs each envelope's message once, then hands it to the relay it wraps.

    Every recipient's result carries what was done (`dkim`), which DeliveryResult shows once.

    The messages of deliveries that reach it within GATHER_TURNS turns of the event loop are signed
    one after the other, in one callback: a signature's cost is mostly its code and tables coming
    back into the CPU's caches after the rest of a request evicted them (an Ed25519 signature: 34 us
    in a loop, 122 us after a cache flush), which the second signature of a run does not pay again.
    """

    def __init__(self, inner: Relay, signer: Signer) -> None:
        self.inner = inner
        self.signer = signer
        # Waiting to be signed: at most one entry per delivery in flight, signed at the next turn.
        self._pending: list[tuple[bytes, asyncio.Future[tuple[bytes, DkimSignature]]]] = []

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        future: asyncio.Future[tuple[bytes, DkimSignature]] = asyncio.get_running_loop().create_future()
        if not self._pending:
            _after_turns(future.get_loop(), GATHER_TURNS, self._sign_pending)
        self._pending.append((envelope.message, future))
        message, outcome = await future
        if message is not envelope.message:
            envelope = _with_message(envelope, message)
        results = await self.inner.deliver(envelope, context)
        return [result.model_copy(update={"dkim": outcome}) for result in results]

    def _sign_pending(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if self._pending:  # the rest at the next turn, after what else is waiting
            batch[0][1].get_loop().call_soon(self._sign_pending)
        for message, future in batch:
            if future.done():  # its delivery was cancelled (deadline, client gone)
                continue
            try:
                future.set_result(self.signer.sign(message))
            except Exception as exc:  # a bug: the delivery's 500, not every delivery of the batch
                future.set_exception(exc)

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
        return f"the DKIM key at {identity.name} could not be checked ({exc}); it should be: {publish}"
    records = [_tags(b"".join(rdata.strings)) for rdata in answer]
    keys = [tags for tags in records if tags.get(b"v", b"DKIM1") == b"DKIM1" and b"p" in tags]
    if len(keys) != 1:
        return f"{len(keys)} DKIM key records at {identity.name}, where receivers need one; {publish}"
    tags = keys[0]
    if not tags[b"p"]:
        return f"the key at {identity.name} is revoked (empty p=); {publish}"
    kind = b"rsa" if identity.key.algorithm == "rsa-sha256" else b"ed25519"
    try:
        public = base64.b64decode(tags[b"p"], validate=True)
    except binascii.Error:
        public = b""
    if tags.get(b"k", b"rsa") != kind or not _same_public_key(identity.key, public):
        return f"the key published at {identity.name} is not this key's public half; {publish}"
    return None


def _tags(record: bytes) -> dict[bytes, bytes]:
    """A DKIM key record's tag=value list (RFC 6376 3.2), whitespace removed from the values."""
    tags = {}
    for part in record.split(b";"):
        name, equals, value = part.partition(b"=")
        if equals:
            tags[name.strip()] = b"".join(value.split())
    return tags


def _same_public_key(key: SigningKey, published: bytes) -> bool:
    if key.algorithm == "ed25519-sha256":
        return published == key.public
    # SubjectPublicKeyInfo, or a bare RSAPublicKey (RFC 6376's words): verifiers take either.
    bare = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(published) + b"-----END RSA PUBLIC KEY-----\n"
    try:
        theirs = serialization.load_der_public_key(published)
    except (ValueError, UnsupportedAlgorithm):
        try:
            theirs = serialization.load_pem_public_key(bare)
        except (ValueError, UnsupportedAlgorithm):
            return False
    spki = theirs.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki == key.public


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
