"""The whole service configuration: slimta's `relay:` section plus our own settings."""

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    StringConstraints,
    model_validator,
)

from schemas.rate import RateSpec, parse_rate
from schemas.relay_options import HostPort, RelayOptions, split_host_port

#: Relay names appear in URLs (/relays/<name>/deliver): unreserved URL characters only.
RelayName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")]


#: A key shorter than this is guessable; the environment variable and files are held to it too.
MIN_KEY_LENGTH = 16
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def _one_per_period(rates: list[str]) -> list[str]:
    periods = [parse_rate(r).period for r in rates]
    if len(set(periods)) != len(periods):
        raise ValueError("one rate per period (s, m, h, d)")
    return rates


class KeyQuota(BaseModel):
    """`quota` of an API key: what it may send, fleet-wide (shared through `mailrelay.fleet`'s Redis)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: Annotated[list[RateSpec], AfterValidator(_one_per_period)] = Field(
        default_factory=list,
        description="messages (deliveries, and lines of a batch) per period, e.g. [`10/s`, `20000/d`]; each "
        "allows a burst of its whole count, refilled smoothly over its period",
    )
    recipients: Annotated[list[RateSpec], AfterValidator(_one_per_period)] = Field(
        default_factory=list,
        description="recipients per period, counted alike (a message to 5 recipients takes 5)",
    )


class ApiKey(BaseModel):
    """One bearer key: a name for logs and metrics, where its secret comes from, and what it may use.

    The file holds no plaintext key: `sha256` is the key's hex digest, or the key is
    read from an environment variable or a file (a mounted secret) at load time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        description="shown in logs and metrics; never the key itself",
    )
    sha256: str | None = Field(
        default=None,
        description="hex SHA-256 of the key (`printf %s KEY | sha256sum`)",
    )
    env: str | None = Field(default=None, description="name of an environment variable holding the key")
    file: str | None = Field(
        default=None, description="path of a file holding the key (surrounding whitespace ignored)"
    )
    relays: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="the relays this key may use; `*` for all",
    )
    quota: KeyQuota | None = Field(
        default=None,
        description="messages and recipients this key may send per period, fleet-wide; over it: 429 with "
        "Retry-After, nothing sent. Every answer to it carries RateLimit-Policy and RateLimit. Default: none",
    )
    _digest: bytes = PrivateAttr(default=b"")

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, data: Any) -> Any:
        if isinstance(data, dict) and "key" in data:
            raise ValueError(
                "a plaintext `key` is not accepted in the file: give `sha256` (the key's hex SHA-256), "
                "`env` (an environment variable) or `file` (a secret file)"
            )
        return data

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        given = [s for s in ("sha256", "env", "file") if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of `sha256`, `env` or `file` (found: {', '.join(given) or 'none'})")
        if self.sha256 is not None:
            if not _SHA256_HEX.match(self.sha256):
                raise ValueError("`sha256` must be 64 hexadecimal digits")
            self._digest = bytes.fromhex(self.sha256)
            return self
        if self.env is not None:
            secret = os.environ.get(self.env, "").strip()
            if not secret:
                raise ValueError(f"`env`: the environment variable {self.env} is not set or empty")
            where = f"the environment variable {self.env}"
        else:
            path = Path(os.path.expanduser(str(self.file)))
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"`file`: cannot read {path}: {reason}") from None
            where = f"the file {path}"
        self._digest = key_digest(check_key(secret, where))
        return self

    @property
    def digest(self) -> bytes:
        """SHA-256 of the key: the only form in which the service keeps it."""
        return self._digest


def check_key(secret: str, where: str) -> str:
    """A key fit for a bearer token; errors name where it came from, never its value."""
    if len(secret) < MIN_KEY_LENGTH:
        raise ValueError(f"the key in {where} is shorter than {MIN_KEY_LENGTH} characters")
    if not all("!" <= c <= "~" for c in secret):
        raise ValueError(f"the key in {where} must be printable ASCII without spaces")
    return secret


def key_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


class AuthSettings(BaseModel):
    """`mailrelay.auth`: bearer keys. With none, the service is open and listens on loopback only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[ApiKey] = Field(
        default_factory=list,
        description="bearer keys; $MAILRELAY_API_KEYS (comma-separated) adds keys allowed for every relay",
    )
    metrics_requires_key: bool = Field(
        default=False,
        description="put GET /metrics behind the keys too (any valid key may read it)",
    )
    insecure_allow_unauthenticated: bool = Field(
        default=False,
        description="allow listening on a non-loopback address with no key configured (anyone reaching the port "
        "can send mail); also --insecure-allow-unauthenticated",
    )


class LimitSettings(BaseModel):
    """`mailrelay.limits`: how many deliveries run at once, and how long one may wait to start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int = Field(default=256, ge=1, description="deliveries running at once, all relays together")
    max_in_flight_per_relay: int | None = Field(
        default=None,
        ge=1,
        description="deliveries running at once through any one relay; default: only the global bound",
    )
    per_relay: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="relay name -> its own bound, instead of max_in_flight_per_relay",
    )
    queue_timeout: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="seconds a delivery may wait for a free slot before it is refused with 503 (0: refuse at once)",
    )
    body_budget: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024,
        le=1 << 40,
        description="bytes of request bodies (and, in the JSON form, their decoded messages) held at once, from "
        "the first byte read until the answer; a request that does not fit waits up to queue_timeout, then gets "
        "503. A request needing more than the whole budget waits until it has all of it",
    )

    def relay_limit(self, name: str) -> int | None:
        return self.per_relay.get(name, self.max_in_flight_per_relay)


def check_redis_url(url: str) -> None:
    """ValueError unless `url` is a form the Redis client builder takes (relays/redis_link.py)."""
    if not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        raise ValueError("`redis_url` must start with redis://, rediss://, unix:// or redis+sentinel://")
    if url.startswith("redis+sentinel://"):
        parse_sentinel_url(url)


class FleetSettings(BaseModel):
    """`mailrelay.fleet`: limits shared by every instance that uses the same Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = Field(
        default=None,
        description="the Redis that holds the fleet's leases, rates and quotas (same forms as "
        "`idempotency.redis_url`, Sentinel included); default: `idempotency.redis_url`",
    )
    expected_instances: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="how many instances share the limits: while Redis is unreachable each one enforces "
        "its fleet-wide limits divided by this number (rounded up), so that nothing is sent without a limit",
    )

    @model_validator(mode="after")
    def _url_form(self) -> Self:
        if self.redis_url:
            check_redis_url(self.redis_url)
        return self


class BatchSettings(BaseModel):
    """`mailrelay.batch`: `POST /relays/{name}/deliveries`, many deliveries in one NDJSON request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="deliveries of one batch running at once (each also needs its slots under `limits`); the "
        "next line is read only when one of them has finished",
    )
    max_lines: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="most deliveries in one batch; the line past it is answered 413 and the rest is not read",
    )
    max_line_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="most bytes in one line (one delivery, its JSON escapes or base64 included); a longer line "
        "is answered 413 without being held, and the batch goes on. Larger messages go to /deliver",
    )


class SentinelUrl(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """`redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`; ValueError names what is wrong."""
    rest = url.removeprefix("redis+sentinel://")
    authority, _, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    password = unquote(credentials.partition(":")[2]) or None if at else None
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"redis+sentinel:// needs host:port for each sentinel, not {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("redis+sentinel:// needs the monitored master's name: redis+sentinel://host:port/mymaster")
    if db and not db.isdigit():
        raise ValueError(f"redis+sentinel:// database must be a number, not {db!r}")
    return SentinelUrl(sentinels, unquote(service), int(db or 0), password)


class IdempotencySettings(BaseModel):
    """`mailrelay.idempotency`: where results of requests with an Idempotency-Key are kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="`memory` (one instance) or `redis` (shared by every instance behind the load balancer)",
    )
    ttl: int = Field(default=86400, ge=1, description="seconds a stored result is replayed")
    max_entries: int = Field(default=100_000, ge=1, description="memory backend: most stored results")
    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=64 * 1024,
        le=1 << 40,
        description="memory backend: most bytes of stored results (compressed) and claims; past it the oldest "
        "finished results are forgotten first, running claims never",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis backend: `redis://[:password@]host:port/db` (or rediss://, unix://), or through "
        "Sentinel `redis+sentinel://[:password@]host:port[,host:port...]/service[/db]` (the sentinels, the "
        "monitored master's name; the password is the master's); $MAILRELAY_REDIS_URL overrides",
    )
    key_prefix: str = Field(default="mailrelay:idempotency:", description="redis backend: prefix of every key")
    lease: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="seconds a claim holds unless renewed; renewed every third of it while the delivery runs. "
        "After a crash, a repeat of a running request gets 409 for at most this long",
    )
    finish_limit: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description="most keyed deliveries finishing in the background at once, per process: a delivery cut by "
        "its deadline after its data left goes on waiting for the next hop's reply and stores the true result "
        "for repeats; past the limit (or 0) it is cut and its answer stored as given",
    )
    finish_timeout: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="seconds past the deadline a delivery finishing in the background may take at most (the "
        "relay's own data_timeout usually ends it first)",
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Self:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("the redis backend needs `redis_url` (or $MAILRELAY_REDIS_URL)")
        if self.redis_url:
            check_redis_url(self.redis_url)
        return self


class ServiceSettings(BaseModel):
    """The `mailrelay:` section: settings of the service itself (slimta has no such section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_recipients: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="most recipients in one delivery request",
    )
    max_message_size: int = Field(
        default=25 * 1024 * 1024,
        ge=1,
        description="largest message in bytes; larger requests get 413",
    )
    retry_after: int = Field(
        default=60,
        ge=0,
        description="seconds put in Retry-After on a transient failure (503)",
    )
    dns_nameservers: list[HostPort] | None = Field(
        default=None,
        description="`host` or `host:port` of the nameservers the `mx` relay asks; default: the system's "
        "(/etc/resolv.conf). $MAILRELAY_DNS_NAMESERVERS (comma-separated) overrides this.",
    )

    delivery_deadline: float = Field(
        default=50.0,
        gt=0,
        le=3600,
        description="seconds a delivery may take in all, every relay timeout included; keep it below the load "
        "balancer's timeout. The X-Delivery-Timeout request header can only lower it.",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds the service waits for the next piece of a request body before answering 408; also "
        "how long a request head may take from its first byte (the first request's: from the connection), "
        "after which the connection is closed (408 if it sent part of a head)",
    )
    send_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds a client may leave our answer unread (the connection's write buffer full) before "
        "the connection is dropped",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="most open client connections per process; past it the connection idle longest is closed "
        "to make room, or, when none is idle, the new one gets 503. Default: half the soft RLIMIT_NOFILE",
    )
    api_docs: bool = Field(
        default=True,
        description="serve the API pages /docs and /redoc (their scripts come from the installed package "
        "fastapi-offline, never a third-party host); /openapi.json is served either way",
    )
    drain_delay: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="seconds after SIGTERM during which /readyz answers 503 while deliveries are still served, "
        "so that load balancers and Kubernetes take the instance out of rotation before it stops accepting; "
        "then running deliveries get shutdown_grace. 5 s covers HAProxy checks every 1 s with fall 3 (or 2 s, fall 2) "
        "and Kubernetes endpoint updates; keep it above the balancer's check interval x fall",
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="seconds running deliveries get to finish after SIGTERM (and old relays after a reload)",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="`json` (one object per line), `text`, or `auto`: text on a terminal, else JSON; "
        "--log-format overrides",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="networks of load balancers and proxies whose X-Forwarded-For is believed; the client is "
        "the rightmost address not in them. Empty: X-Forwarded-For is ignored",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    def nameservers(self) -> list[tuple[str, int]]:
        return [split_host_port(ns, 53) for ns in self.dns_nameservers or []]


class ServiceConfig(BaseModel):
    """A loaded configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relay: dict[RelayName, RelayOptions] = Field(min_length=1)
    mailrelay: ServiceSettings = Field(default_factory=ServiceSettings)


class ConfigProblem(BaseModel):
    """One thing wrong with a configuration, at a key path such as `relay.outbound.port`."""

    model_config = ConfigDict(frozen=True)

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem], warnings: list[ConfigProblem] | None = None) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
        self.warnings = warnings or []

    @classmethod
    def at(cls, path: str, message: str) -> "ConfigError":
        return cls([ConfigProblem(path=path, message=message)])


def format_path(loc: list[int | str]) -> str:
    """slimta's key-path style: `relay.outbound.args[0]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
