"""One options model per relay type, combined in a union on `type`.

Field names, types and defaults follow the `relay:` section of a slimta
configuration file; what slimta lacked is marked "beyond slimta".
"""

import ipaddress
import itertools
import os
import re
import socket
import string
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    field_validator,
    model_validator,
)

from schemas.rate import RateSpec


def _not_bool(value: Any) -> Any:
    # YAML `yes`/`true` is a bool, and pydantic would take it as 1: refuse it for numbers.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


NotBool = BeforeValidator(_not_bool)
Port = Annotated[int, NotBool, Field(ge=1, le=65535)]
Seconds = Annotated[float, NotBool, Field(gt=0, le=86400)]
NonNegativeSeconds = Annotated[float, NotBool, Field(ge=0, le=86400)]
#: A bound on simultaneous connections or processes.
Concurrency = Annotated[int, NotBool, Field(ge=1, le=10000)]
#: A secret: masked in repr, dumped as "***" by GET /relays and logs.
Secret = Annotated[SecretStr, PlainSerializer(lambda _: "***", return_type=str)]

_NO_SPACE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


def normal_domain(domain: str) -> str:
    """A domain as `mx` compares it, in force_mx and before DNS: lower case, no trailing dot."""
    return domain.lower().rstrip(".")


@cache
def machine_fqdn() -> str:
    """The default EHLO name, looked up once per process."""
    return socket.getfqdn()


def fill_hostname_template(value: str) -> str:
    """Substitute `{fqdn}` and `{hostname}`, as slimta did."""
    filled = value.replace("{fqdn}", machine_fqdn()).replace("{hostname}", socket.gethostname())
    if "{" in filled or "}" in filled:
        raise ValueError("unknown placeholder; only {fqdn} and {hostname} are substituted")
    if not _NO_SPACE.match(filled) or len(filled) > 255:
        raise ValueError("must be one host name of at most 255 characters, without whitespace")
    return filled


def ehlo_warning(ehlo: str) -> str | None:
    """Why mail services would refuse this EHLO name, or None when it looks fine."""
    bare = ehlo.strip("[]")
    if bare.lower().startswith("ipv6:"):
        bare = bare[5:]
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return f"ehlo_as {ehlo!r} is an IP literal; receiving servers often refuse it, give a host name"
    labels = ehlo.lower().rstrip(".").split(".")
    if labels[0] == "localhost" or labels[-1] in ("localhost", "localdomain"):
        return f"ehlo_as {ehlo!r} is a local name; receiving servers often refuse it, give the public host name"
    return None


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """Parse `host`, `host:port`, `[v6]` or `[v6]:port`. Raises ValueError."""
    host, port_text = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("unterminated '[' in host")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    if not host or not _NO_SPACE.match(host):
        raise ValueError("host must be a non-empty name or address without whitespace")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _expand_path(value: str) -> str:
    path = os.path.expanduser(os.path.expandvars(value))
    if not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file is not readable: {path}")
    return path


def _existing_directory(value: str) -> str:
    path = os.path.expanduser(os.path.expandvars(value))
    if not os.path.isdir(path):
        raise ValueError(f"no such directory: {path}")
    return path


def _check_host(value: str) -> str:
    split_host_port(value, 25)
    if value.count(":") == 1 and not value.startswith("["):
        raise ValueError("give the port in the `port` option, not in `host`")
    return value


def _check_host_port(value: str) -> str:
    split_host_port(value, 25)
    return value


def _cert_reqs_name(value: Any) -> Any:
    # ssl.wrap_socket took the ssl.CERT_* integers; YAML files may hold either.
    names = {0: "CERT_NONE", 1: "CERT_OPTIONAL", 2: "CERT_REQUIRED"}
    if isinstance(value, int) and not isinstance(value, bool):
        return names.get(value, value)
    return value


EhloName = Annotated[str, AfterValidator(fill_hostname_template)]
HostName = Annotated[str, AfterValidator(_check_host)]
HostPort = Annotated[str, AfterValidator(_check_host_port)]
TlsPath = Annotated[str, AfterValidator(_expand_path)]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Header fields a DKIM signature must not cover (RFC 6376 5.4.1): relays and receivers change them.
DKIM_UNSIGNABLE = frozenset(["bcc", "comments", "dkim-signature", "keywords", "received", "resent-bcc", "return-path"])
_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*$")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII but ":"


def _check_signing_domain(value: str) -> str:
    domain = normal_domain(value)
    if not domain or not _NO_SPACE.match(domain) or "@" in domain:
        raise ValueError("must be a domain name, without whitespace or '@'")
    return domain


def _check_selector(value: str) -> str:
    if not _SELECTOR.match(value):
        raise ValueError("must be one or more DNS labels of letters, digits, '-' and '_' separated by dots")
    return value


def _check_field_name(value: str) -> str:
    if not _FIELD_NAME.match(value):
        raise ValueError(f"{value!r} is not a header field name")
    if value.lower() in DKIM_UNSIGNABLE:
        raise ValueError(f"{value} must not be signed: relays and receivers change it (RFC 6376 5.4.1)")
    return value


class DkimIdentity(_Options):
    """Beyond slimta: a DKIM signing identity (RFC 6376); the key's type sets the algorithm."""

    domain: Annotated[str, AfterValidator(_check_signing_domain)] = Field(
        description="the signing domain (d=); messages whose From: domain is this one are signed with it",
        examples=["example.com"],
    )
    selector: Annotated[str, AfterValidator(_check_selector)] = Field(
        description="the selector (s=): the public key is published at <selector>._domainkey.<domain>",
        examples=["mail2026"],
    )
    key_file: str | None = Field(
        default=None,
        description="PEM private key file (RSA, or Ed25519 as `openssl genpkey` writes it), or a mounted secret; "
        "`~` and `$VARS` expand. Read when the relay is built (start-up, reload)",
    )
    key_env: str | None = Field(
        default=None,
        description="name of an environment variable that holds the private key instead (PEM text)",
    )
    default: bool = Field(
        default=False,
        description="sign messages whose From: domain has no identity of its own with this one (one at most)",
    )
    extra_headers: list[Annotated[str, AfterValidator(_check_field_name)]] = Field(
        default_factory=list,
        description="header fields signed besides the default set (From, twice, Subject, Date, To, Cc, "
        "Message-ID, MIME and List-* fields, ...), where present",
    )

    @field_validator("key_file")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return os.path.expanduser(os.path.expandvars(value)) if value else value

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if (self.key_file is None) == (self.key_env is None):
            raise ValueError("give exactly one of `key_file` and `key_env` (never the key itself)")
        return self


def _check_identities(value: list[DkimIdentity]) -> list[DkimIdentity]:
    domains = [identity.domain for identity in value]
    if len(set(domains)) != len(domains):
        raise ValueError("one identity per domain")
    if sum(identity.default for identity in value) > 1:
        raise ValueError("at most one identity may be the `default`")
    return value


#: The add_missing_headers option, the same for every relay type.
_ADD_MISSING_HEADERS_DESCRIPTION = (
    "beyond slimta: add Date and Message-ID to a finished message that lacks them, as a submission server does "
    "(RFC 6409 8.2, 8.3); false (the default): messages pass through untouched. A composed message always has both"
)


class _RelayOptions(_Options):
    """What every relay type accepts."""

    dkim: Annotated[list[DkimIdentity], AfterValidator(_check_identities)] = Field(
        default_factory=list,
        description="beyond slimta: DKIM signing identities; the From: header's domain chooses one (else the "
        "`default` one); a message with none goes unsigned",
    )
    add_missing_headers: bool = Field(default=False, description=_ADD_MISSING_HEADERS_DESCRIPTION)


class TlsOptions(_Options):
    """TLS settings: the keyword arguments of the old `ssl.wrap_socket`, made into an SSLContext."""

    certfile: TlsPath | None = Field(default=None, description="client certificate (PEM); `~` and `$VARS` expand")
    keyfile: TlsPath | None = Field(default=None, description="private key of `certfile` (PEM)")
    ca_certs: TlsPath | None = Field(
        default=None,
        description="CA bundle to verify the server with; default: the system's",
    )
    cert_reqs: (
        Annotated[Literal["CERT_NONE", "CERT_OPTIONAL", "CERT_REQUIRED"], BeforeValidator(_cert_reqs_name)] | None
    ) = Field(
        default=None,
        description="server certificate verification; default: CERT_REQUIRED, except CERT_NONE in opportunistic mode",
    )
    ciphers: str | None = Field(default=None, description="OpenSSL cipher list")
    ssl_version: (
        Literal[
            "PROTOCOL_TLS",
            "PROTOCOL_TLS_CLIENT",
            "PROTOCOL_SSLv23",
            "PROTOCOL_TLSv1",
            "PROTOCOL_TLSv1_1",
            "PROTOCOL_TLSv1_2",
        ]
        | None
    ) = Field(
        default=None,
        description="lowest protocol version, by its old `ssl.PROTOCOL_*` name; default: the library's",
    )
    # Accepted so that old slimta files load; they have no effect on a client context.
    server_side: Literal[False] | None = Field(
        default=None, description="accepted for slimta compatibility; must be false"
    )
    do_handshake_on_connect: bool | None = Field(
        default=None, description="accepted for slimta compatibility; no effect"
    )
    suppress_ragged_eofs: bool | None = Field(default=None, description="accepted for slimta compatibility; no effect")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Self:
        if self.keyfile and not self.certfile:
            raise ValueError("`keyfile` is given without `certfile`")
        return self


class SmtpTlsOptions(TlsOptions):
    mode: Literal["starttls", "implicit", "opportunistic", "none"] = Field(
        default="starttls",
        description="beyond slimta: `starttls` (required), `implicit` (SMTPS, port 465), `opportunistic` (STARTTLS "
        "when offered), `none` (never TLS)",
    )
    plaintext_fallback: bool = Field(
        default=False,
        description="beyond slimta, `opportunistic` only: when the TLS handshake with a server that offered STARTTLS "
        "fails, deliver to that server again in clear text (Postfix's `may` level does); false: the host is "
        "deferred with 451 4.7.5 (`mx` tries the next MX host), so a broken handshake never downgrades the hop",
    )

    @model_validator(mode="after")
    def _fallback_needs_opportunistic(self) -> Self:
        if self.plaintext_fallback and self.mode != "opportunistic":
            raise ValueError(f"`plaintext_fallback` applies to mode `opportunistic` only, not `{self.mode}`")
        return self


class Credentials(_Options):
    """SMTP AUTH credentials; the password is never shown back."""

    username: str = Field(min_length=1)
    password: Secret


class SmtpOptions(_RelayOptions):
    """Options shared by the SMTP relays (`mx`, `static`, `lmtp`)."""

    connect_timeout: Seconds = Field(
        default=30,
        description="TCP connect (and TLS handshake for implicit TLS), seconds",
    )
    command_timeout: Seconds = Field(default=30, description="each SMTP command's reply, seconds")
    data_timeout: Seconds = Field(default=60, description="reply to the end of message data, seconds")
    idle_timeout: NonNegativeSeconds = Field(
        default=10,
        description="keep an idle connection for reuse this long; 0 = QUIT at once",
    )
    concurrent_connections: Concurrency = Field(
        default=5,
        description="most simultaneous connections to one destination",
    )
    fleet_connections: bool = Field(
        default=False,
        description="beyond slimta: `concurrent_connections` is a limit for the whole fleet sharing "
        "`mailrelay.fleet.redis_url`, not per process: each open connection holds a lease in Redis, renewed "
        "while it lives; while Redis is unreachable each instance keeps to concurrent_connections / "
        "`mailrelay.fleet.expected_instances` (rounded up)",
    )
    max_waiting: Annotated[int, NotBool, Field(ge=0, le=10000)] = Field(
        default=100,
        description="beyond slimta: most deliveries waiting for a connection to one destination while all "
        "`concurrent_connections` are busy; past it a delivery fails at once with 451 4.4.5, so one slow "
        "destination cannot hold every in-flight slot",
    )
    max_message_rate: RateSpec | None = Field(
        default=None,
        description="most messages (transactions) per period to one destination, in KumoMTA's notation (`50/s`, "
        "`10/m`, `1000/h`, `20000/d`): for `mx` per MX host, for `static`/`lmtp` the relay's host. Shared by every "
        "instance using `mailrelay.fleet`'s Redis (smoothly: one message every period/count); without Redis, or "
        "while it is unreachable, each instance keeps to the rate / `fleet.expected_instances`. Default: no limit",
    )
    max_connection_rate: RateSpec | None = Field(
        default=None,
        description="most new connections per period to one destination (same notation and destinations as "
        "`max_message_rate`), fleet-wide like it; a reused pooled connection needs no slot, so with "
        "`idle_timeout` > 0 this bounds the connections opened, not the messages. Default: no limit",
    )
    max_rate_wait: NonNegativeSeconds = Field(
        default=5,
        description="most seconds a delivery waits for its slot under `max_message_rate`, and again for a new "
        "connection's under `max_connection_rate` (never past its deadline); one that would wait longer fails at "
        "once with 451 4.4.5 naming the limit, nothing sent",
    )
    ehlo_as: EhloName = Field(
        default_factory=machine_fqdn,
        description="EHLO/HELO name; `{fqdn}` and `{hostname}` are filled in",
    )
    tls: SmtpTlsOptions | None = Field(default=None, description="present = STARTTLS is used")
    credentials: Credentials | None = Field(default=None, description="SMTP AUTH after EHLO (and STARTTLS)")
    ipv4_only: bool = Field(default=False, description="connect over IPv4 only")
    auth_soft_bounce: bool = Field(
        default=True,
        description="beyond slimta: a login the server refuses (5xx to AUTH) answers 454 4.7.8, a transient "
        "failure, so that clients keep the mail while the credentials are put right (Postfix's "
        "smtp_sasl_auth_soft_bounce); false: the server's 5xx as it is. AUTH is tried once per connection",
    )
    max_recipients_per_batch: Annotated[int, NotBool, Field(ge=1, le=10000)] = Field(
        default=100,
        description="beyond slimta: most recipients in one transaction (KumoMTA's max_recipients_per_batch); a "
        "bigger envelope goes in several transactions on the same connection. Recipients a server refuses with "
        "452 4.5.3 (too many recipients) go in a further transaction too",
    )
    chunking: bool = Field(
        default=True,
        description="beyond slimta: send the message with BDAT (RFC 3030) when the server offers CHUNKING; "
        "false: always DATA",
    )


def _smtp_extras(options: SmtpOptions) -> str:
    tls = options.tls.mode if options.tls else "no"
    auth = "yes" if options.credentials else "no"
    return f" (tls: {tls}, auth: {auth}, {options.concurrent_connections} connections, {options.max_waiting} waiting)"


class MxOptions(SmtpOptions):
    """SMTP to each recipient domain's MX hosts."""

    type: Literal["mx"]
    tls: SmtpTlsOptions | None = Field(
        default_factory=lambda: SmtpTlsOptions(mode="opportunistic"),
        description="STARTTLS whenever the receiver offers it, without a certificate check (Postfix's `may`) unless "
        "`cert_reqs` says so; `{mode: none}` turns encryption off; `{mode: starttls}` requires it (verified)",
    )
    mta_sts: bool = Field(
        default=True,
        description="beyond slimta: follow recipient domains' MTA-STS policies (RFC 8461): in enforce mode only "
        "the MX hosts the policy names, over TLS verified for the MX name (`tls.ca_certs`, else the system's CAs; "
        "the policy fetch trusts the same), else 451 4.7.5; testing mode is logged and counted",
    )
    dane: bool = Field(
        default=False,
        description="beyond slimta: DANE (RFC 7672): an MX host with DNSSEC-validated TLSA records gets TLS "
        "authenticated by them (DANE-EE, DANE-TA), else 451 4.7.5; a failed TLSA lookup defers the host. Needs a "
        "DNSSEC-validating resolver that you trust in `mailrelay.dns_nameservers` (it is the AD bit that counts)",
    )
    force_mx: dict[Annotated[str, AfterValidator(normal_domain)], HostPort] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("force_mx", "override_mx"),
        description="domain -> `host` or `host:port` used instead of DNS (slimta's validator spelled it `override_mx`); "
        "domains are compared lower-cased, without a trailing dot",
    )
    port: Port = Field(default=25, description="beyond slimta: port of every MX host")
    mx_address_limit: Annotated[int, NotBool, Field(ge=1, le=100)] = Field(
        default=5,
        description="beyond slimta: most MX hosts looked up, and most addresses tried, for one recipient domain in "
        "one delivery (Postfix's smtp_mx_address_limit); a host whose lookup failed counts",
    )
    allow_internal_destinations: bool = Field(
        default=False,
        description="beyond slimta: deliver to address literals and MX addresses that are loopback, private, "
        "link-local, unique-local, unspecified or otherwise not global (IPv4-mapped forms included); when false "
        "they are refused with 550 5.7.1. `force_mx` destinations are always allowed",
    )

    def describe(self) -> str:
        forced = f", {len(self.force_mx)} forced domain(s)" if self.force_mx else ""
        return f"SMTP to each domain's MX hosts, port {self.port}{forced}{_smtp_extras(self)}"

    @model_validator(mode="after")
    def _no_implicit_tls(self) -> Self:
        # MX hosts speak STARTTLS on port 25; implicit TLS is for a submission host (`static`).
        if self.tls and self.tls.mode == "implicit":
            raise ValueError("tls.mode `implicit` is for `static` and `lmtp` relays; MX hosts use STARTTLS")
        return self

    @field_validator("force_mx")
    @classmethod
    def _domains(cls, value: dict[str, str]) -> dict[str, str]:
        for domain in value:
            if not _NO_SPACE.match(domain):
                raise ValueError(f"domain {domain!r} must be non-empty, without whitespace")
        return value


class StaticOptions(SmtpOptions):
    """SMTP to one host."""

    type: Literal["static"]
    host: HostName
    port: Port = 25

    def describe(self) -> str:
        return f"SMTP to {self.host}:{self.port}{_smtp_extras(self)}"


class LmtpOptions(SmtpOptions):
    """LMTP (RFC 2033) to one host: one reply per recipient after the data."""

    type: Literal["lmtp"]
    host: HostName = "localhost"
    port: Port = 24

    def describe(self) -> str:
        return f"LMTP to {self.host}:{self.port}{_smtp_extras(self)}"


class ProcessOptions(_RelayOptions):
    """Beyond slimta: how the local delivery relays run their command."""

    timeout: Seconds = Field(
        default=300,
        description="kill the process group after this many seconds (transient 4.4.2)",
    )
    concurrent_processes: Concurrency = Field(
        default=10,
        description="most processes of this relay at once; others wait",
    )
    cwd: Annotated[str, AfterValidator(_existing_directory)] | None = Field(
        default=None, description="working directory of the command"
    )
    env: dict[str, str] | None = Field(
        default=None,
        description="the command's whole environment; default, as Postfix pipe(8): PATH, HOME, USER, LOGNAME and SHELL only",
    )
    user: str | None = Field(
        default=None,
        description="run the command as this user (the service must run as root)",
    )


#: The macros a `pipe` argument may contain.
PIPE_MACROS = frozenset(
    [
        "sender",
        "recipient",
        "message_id",
        "client_ip",
        "client_host",
        "client_ehlo",
        "client_protocol",
        "client_auth",
    ]
)


def _check_pipe_arg(arg: str) -> str:
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as exc:
        raise ValueError(f"bad macro syntax in {arg!r}: {exc}; write {{{{ and }}}} for literal braces") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PIPE_MACROS or spec or conversion:
            valid = ", ".join(f"{{{m}}}" for m in sorted(PIPE_MACROS))
            raise ValueError(f"unknown macro {{{name}}} in {arg!r}; valid macros: {valid}")
    return arg


class PipeOptions(ProcessOptions):
    """The message on a command's standard input, like Postfix pipe(8)."""

    type: Literal["pipe"]
    args: list[Annotated[str, AfterValidator(_check_pipe_arg)]] = Field(
        min_length=1,
        description="command and arguments, run without a shell; macros such as {recipient} are one argument each",
    )
    error_pattern: str | None = Field(
        default=None,
        description="regular expression that picks the error text out of the output",
    )

    def describe(self) -> str:
        return f"runs {' '.join(mask_args(self.args))} per recipient"

    @field_validator("args")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the command (first argument) must not be empty")
        if any(name for _, name, _, _ in string.Formatter().parse(value[0])):
            raise ValueError(
                "the command (first argument) must not contain a macro: a request must never choose the program"
            )
        return value

    @field_validator("error_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class DeliveryAgentOptions(ProcessOptions):
    """A local delivery agent run once per delivery: its binary and extra arguments."""

    path: str = Field(min_length=1)
    extra_args: list[str] = Field(
        default_factory=list, description="beyond slimta: more arguments, such as a filter file"
    )

    label: ClassVar[str]

    def describe(self) -> str:
        return f"{self.label} with {' '.join(mask_args([self.path, *self.extra_args]))}"


class MaildropOptions(DeliveryAgentOptions):
    """Local delivery with courier maildrop."""

    type: Literal["maildrop"]
    label = "maildrop delivery"
    path: str = Field(default="maildrop", min_length=1, description="the maildrop binary; default: found on $PATH")


class DovecotOptions(DeliveryAgentOptions):
    """Local delivery with dovecot's LDA."""

    type: Literal["dovecot"]
    label = "dovecot LDA delivery"
    path: str = Field(
        default="dovecot-lda",
        min_length=1,
        description="the dovecot-lda binary; default: $PATH, then /usr/lib/dovecot/dovecot-lda",
    )


def _check_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        # Not the parser's words: they quote the bad part, which may be a piece of the password.
        raise ValueError("not a valid URL: its host or port cannot be read") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value


class HttpOptions(_RelayOptions):
    """POST to another HTTP endpoint in slimta's wire format."""

    type: Literal["http"]
    url: Annotated[str, AfterValidator(_check_url)] = Field(description="where to POST the message")
    ehlo_as: EhloName = Field(default_factory=machine_fqdn, description="sent as the X-Ehlo header")
    timeout: Seconds = Field(default=60, description="whole request and response, seconds")
    idle_timeout: NonNegativeSeconds | None = Field(
        default=None,
        description="keep connections for reuse this long; none = close after each",
    )
    tls: TlsOptions | None = Field(
        default=None,
        description="present = HTTPS; an https:// URL alone means default verification",
    )
    concurrent_connections: Concurrency = Field(
        default=100,
        description="beyond slimta: most simultaneous connections",
    )

    def describe(self) -> str:
        return f"HTTP POST to {mask_text(self.url)}"


class BlackholeOptions(_RelayOptions):
    """Accepts every message and does nothing with it."""

    type: Literal["blackhole"]

    def describe(self) -> str:
        return "accepts every message and discards it"


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

# Masking: GET /relays (public_options) and check-config (describe) show options through these.
MASK = "***"
#: Names that look secret: keys inside a custom relay's public options, and command-line options.
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|credential|private|auth|dsn|cookie|session|signature", re.I)
#: A URL anywhere in a text. The authority ends at the first "/", "?" or "#", and its userinfo
#: at the last "@" in it: as httpx reads a URL, so what is masked is what httpx would send.
_URL = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#\s]*)(?P<path>[^?#\s]*)(?:\?(?P<query>[^#\s]*))?"
)
#: `--name=value` or `-n=value`.
_OPTION_WITH_VALUE = re.compile(r"^(-{1,2}[^=\s]+)=")
#: Options whose next argument is masked: a secret-looking long option, or `-p` (a password by convention).
_SECRET_OPTION = re.compile(r"^(--?[^=\s]*(" + _SECRET_NAME.pattern + r")[^=\s]*|(?-i:-p))$", re.I)
#: Options that each custom relay's factory declared safe to show (`PUBLIC_OPTIONS`), by its
#: "package.module:symbol"; filled in when the factory is imported (relays.custom).
_PUBLIC_CUSTOM_OPTIONS: dict[str, frozenset[str]] = {}


def _mask_url(match: re.Match[str]) -> str:
    authority = match["authority"]
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    url = match["head"] + authority + match["path"]
    if match["query"] is not None:
        url += "?" + "&".join(_mask_query_field(field) for field in match["query"].split("&"))
    return url


def _mask_query_field(field: str) -> str:
    name, sep, _ = field.partition("=")
    if sep:
        return f"{name}={MASK}"
    return MASK if field else field


def mask_text(text: str) -> str:
    """`text` with every URL's userinfo and query values masked."""
    return _URL.sub(_mask_url, text) if "://" in text else text


def mask_args(args: list[str]) -> list[str]:
    """A command line as it may be shown: the value of `--name=value` and the argument after
    `--name` masked when the name looks secret (password, token, key, ...), the argument after
    `-p` (and what follows `-p` in one argument) too, and URLs masked as by mask_text."""
    shown = [mask_text(args[0])] if args else []
    for previous, arg in itertools.pairwise(args):
        if _SECRET_OPTION.match(previous):
            arg = MASK
        elif (option := _OPTION_WITH_VALUE.match(arg)) and _SECRET_NAME.search(option[1]):
            arg = f"{option[1]}={MASK}"
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            arg = f"-p{MASK}"
        shown.append(mask_text(arg))
    return shown


def _mask_values(value: Any, key: str = "") -> Any:
    """Values of secret-looking keys masked at any depth, and URLs in every text."""
    if isinstance(value, dict):
        return {k: _mask_values(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_values(v, key) for v in value]
    if value is not None and _SECRET_NAME.search(key):
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    return value


def declare_public_options(factory: str, names: frozenset[str]) -> None:
    """The options of relays made by `factory` that GET /relays may show; every other one is masked."""
    _PUBLIC_CUSTOM_OPTIONS[factory] = names


class CustomOptions(BaseModel):
    """A relay built by an importable factory, called with all these options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["custom"]
    factory: str = Field(description='"package.module:symbol" of a callable that returns the relay')
    dkim: Annotated[list[DkimIdentity], AfterValidator(_check_identities)] = Field(
        default_factory=list, description="beyond slimta: DKIM signing identities, as for every relay type"
    )
    add_missing_headers: bool = Field(default=False, description=_ADD_MISSING_HEADERS_DESCRIPTION)

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str) -> str:
        if not _FACTORY.match(value):
            raise ValueError(f'{value!r} is not of the form "package.module:symbol"')
        return value

    def describe(self) -> str:
        return f"custom relay from {self.factory}"


RelayOptions = Annotated[
    MxOptions
    | StaticOptions
    | LmtpOptions
    | PipeOptions
    | MaildropOptions
    | DovecotOptions
    | HttpOptions
    | BlackholeOptions
    | CustomOptions,
    Field(discriminator="type"),
]

#: Every relay options model by its `type`, read off the union so the two never disagree.
OPTIONS_BY_TYPE: dict[str, type[BaseModel]] = {
    get_args(model.model_fields["type"].annotation)[0]: model for model in get_args(get_args(RelayOptions)[0])
}


#: Options of every relay that the service itself reads (not the custom factory): never masked.
_SERVICE_OPTIONS = frozenset({"type", "factory", "dkim", "add_missing_headers"})


def public_options(options: BaseModel) -> dict[str, Any]:
    """Options as `GET /relays` shows them: every default filled in, secrets masked.

    Typed secrets (passwords) and every `env` value are masked, URLs lose their userinfo
    and query values, commands their secret-looking arguments (mask_args); a custom
    relay shows only the options its factory declared public, and those masked as text."""
    dumped = options.model_dump(mode="json")
    if isinstance(options, CustomOptions):
        public = _PUBLIC_CUSTOM_OPTIONS.get(options.factory, frozenset())
        shown = {
            key: _mask_values(value) if key in public or key in _SERVICE_OPTIONS or value is None else MASK
            for key, value in dumped.items()
        }
        return {"type": shown.pop("type"), **shown}
    if isinstance(dumped.get("env"), dict):  # a command's environment often carries secrets under any name
        dumped["env"] = dict.fromkeys(dumped["env"], MASK)
    if isinstance(dumped.get("args"), list):
        dumped["args"] = mask_args(dumped["args"])
    if isinstance(dumped.get("extra_args"), list):  # they follow the program, as in describe()
        dumped["extra_args"] = mask_args([dumped.get("path", ""), *dumped["extra_args"]])[1:]
    shown = _mask_texts(dumped)
    return {"type": shown.pop("type"), **shown}


def _mask_texts(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_texts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_texts(v) for v in value]
    return mask_text(value) if isinstance(value, str) else value
