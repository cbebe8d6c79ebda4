"""Turn a deliver request, in either form, into a validated Envelope, or refuse it."""

import asyncio
import dataclasses
import ipaddress
import re

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from app.budget import Holding
from app.compose import Built, build, size_estimate, size_floor
from app.compose import add_missing_headers as complete_headers
from app.http_protocol import BODY_TIMED_OUT, body_timeout_detail
from app.problems import ProblemError
from schemas.config import ServiceSettings, format_path
from schemas.delivery import (
    ClientInfo,
    ClientText,
    Content,
    DeliveryRequest,
    Envelope,
    check_address,
    decode_base64,
    request_model,
)
from schemas.problem import FieldError

JSON = "application/json"
RFC822 = "message/rfc822"
#: JSON escapes make the body up to 6 times the message it carries (`\u00e9` for a
#: byte of `é`); the decoded message is then held to the exact limit.
_JSON_OVERHEAD_FACTOR = 6
_JSON_OVERHEAD_BYTES = 64 * 1024
#: A recipient of up to 254 octets, every one escaped, plus quotes and a comma.
_JSON_BYTES_PER_RECIPIENT = 254 * _JSON_OVERHEAD_FACTOR + 4
#: Bodies up to this size are parsed without counting their values first: at most about 40,000
#: values, whose parse (and the 422 that the recipients' max_length gives) takes a few milliseconds.
_CHECKED_JSON_BYTES = 128 * 1024
#: A JSON string as the parser reads it (possessive: no backtracking on a long message).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
#: A chunked body's share of the budget grows by at least this much at a time.
_BUDGET_STEP = 256 * 1024
_EHLO: TypeAdapter[str] = TypeAdapter(ClientText)
#: A composed message whose building may hold more than this is built in a worker thread: a few MB
#: of MIME encoding would hold the event loop (and every other request) for tens of milliseconds.
_BUILD_IN_THREAD = 256 * 1024
#: slimta's HTTP edge split recipient headers on commas and semicolons.
_RECIPIENT_SEPARATORS = str.maketrans(";", ",")


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_raw_form(request: Request) -> bool:
    return media_type(request) == RFC822


class OutOfBudget(Exception):
    """The body did not fit in the body budget within queue_timeout: nothing was read or delivered."""

    def __init__(self, budget: int) -> None:
        super().__init__(f"request bodies being handled already hold the body budget of {budget} bytes")
        self.budget = budget


def json_body_limit(settings: ServiceSettings) -> int:
    return (
        settings.max_message_size * _JSON_OVERHEAD_FACTOR
        + _JSON_OVERHEAD_BYTES
        + settings.max_recipients * _JSON_BYTES_PER_RECIPIENT
    )


def json_value_limit(max_recipients: int) -> int:
    """Most values (and separators) a large JSON body may hold before it is parsed: a valid request
    has fewer than 3 per recipient plus 40. The 40,000 more are what a body of _CHECKED_JSON_BYTES
    may hold anyway: a list somewhat over the limit is parsed (a few ms) and its recipients counted
    exactly, and nothing larger ever is."""
    return 3 * max_recipients + 40_000


async def read_envelope(
    request: Request,
    settings: ServiceSettings,
    holding: Holding | None = None,
    until: float | None = None,
    *,
    add_missing_headers: bool = False,
) -> Envelope:
    """Read and validate the whole request before anything is delivered.

    With `holding`, the body's bytes (and a JSON body's decoded message) are taken from its
    budget as they are read, waiting up to `limits.queue_timeout` (else OutOfBudget); the
    caller releases them when the request ends. `until` (loop time, the delivery deadline):
    a body still arriving then is refused with 408, so a client trickling a large body
    holds its share of the budget for at most that long (plus one `body_timeout`).
    A composed message (the `content` form) is built here, its size held from the budget too.
    `add_missing_headers` (the relay's option): a finished message without Date or Message-ID
    gets them (app.compose.add_missing_headers)."""
    form = media_type(request)
    if form == JSON:
        body = await _read_body(request, json_body_limit(settings), settings, holding, until, decoded=True)
        parsed = _from_json(body, settings.max_recipients)
        if parsed.content is not None:
            return await _composed(parsed, parsed.content, settings, holding, body)
        envelope = Envelope(
            sender=parsed.sender,
            recipients=parsed.recipients,
            message=parsed.raw_message,
            client=parsed.client,
            require_tls=parsed.require_tls,
        )
    elif form == RFC822:
        body = await _read_body(request, settings.max_message_size, settings, holding, until, decoded=False)
        envelope = _from_raw(request, body, settings)
    else:
        raise ProblemError(
            415,
            f"Content-Type must be {JSON} or {RFC822}, not {form or 'absent'}",
            headers={"Accept-Post": f"{JSON}, {RFC822}"},
        )
    # Recipients were counted before they were validated, in each form (_from_json, _from_raw).
    if len(envelope.message) > settings.max_message_size:
        raise _too_large(settings)
    if add_missing_headers:
        # The client's message is held to the limit; the two headers added are not counted against it.
        message = complete_headers(envelope.message, envelope.sender)
        if message is not envelope.message:
            envelope = dataclasses.replace(envelope, message=message, origin=envelope.message)
    return envelope


def envelope_of(parsed: DeliveryRequest, settings: ServiceSettings, body: bytes | None = None) -> Envelope:
    """The envelope of a parsed JSON request, its message built here in the compose form (on the
    calling thread, without the body budget: read_envelope is the budgeted path). ProblemError
    (422, 413) when the built message breaks a limit. `body`: the request as sent (Envelope.origin)."""
    content = parsed.content
    if content is None:
        if len(parsed.raw_message) > settings.max_message_size:
            raise _too_large(settings)
        return Envelope(
            sender=parsed.sender,
            recipients=parsed.recipients,
            message=parsed.raw_message,
            client=parsed.client,
            require_tls=parsed.require_tls,
        )
    _check_content(parsed, content, settings)
    return _built(parsed, build(content), settings, body)


async def _composed(
    parsed: DeliveryRequest, content: Content, settings: ServiceSettings, holding: Holding | None, body: bytes
) -> Envelope:
    """The envelope of a composed message: built from `content`, held to the size limit and the body budget."""
    _check_content(parsed, content, settings)
    estimate = size_estimate(content)
    extra = await _hold_more(holding, settings, estimate) if holding is not None else 0
    built = await asyncio.to_thread(build, content) if estimate > _BUILD_IN_THREAD else build(content)
    size = len(built.message)
    if holding is not None and extra > size:  # the parts are gone: the message alone is held from now on
        holding.budget.give(extra - size)
        holding.held -= extra - size
    return _built(parsed, built, settings, body)


def _check_content(parsed: DeliveryRequest, content: Content, settings: ServiceSettings) -> None:
    # Recipients taken from to, cc and bcc were not counted by the model (request_model counts `recipients`).
    if len(parsed.recipients) > settings.max_recipients:
        loc = "content" if parsed.recipients_from_content else "recipients"
        raise _invalid([FieldError(loc=loc, message=_too_many(len(parsed.recipients), settings.max_recipients))])
    if size_floor(content) > settings.max_message_size:  # too large whatever the encoding: not built at all
        raise _too_large(settings)


def _built(parsed: DeliveryRequest, built: Built, settings: ServiceSettings, body: bytes | None) -> Envelope:
    limit = settings.max_message_size
    if len(built.message) > limit:
        raise ProblemError(
            413,
            f"the message built from `content` is {len(built.message)} bytes, larger than the limit of {limit} "
            "bytes; nothing was delivered",
        )
    return Envelope(
        sender=parsed.sender,
        recipients=parsed.recipients,
        message=built.message,
        client=parsed.client,
        origin=body,
        require_tls=parsed.require_tls,
    )


async def _hold_more(holding: Holding, settings: ServiceSettings, size: int) -> int:
    """Take `size` more bytes of the budget (at most what it has beside this request's own share),
    waiting up to `limits.queue_timeout` (else OutOfBudget). Returns the bytes taken."""
    budget = holding.budget
    size = min(size, budget.capacity - holding.held)
    if size <= 0:
        return 0
    taken = budget.try_take(size)
    if taken is None:
        give_up_at = asyncio.get_running_loop().time() + settings.limits.queue_timeout
        taken = await budget.take(size, give_up_at)
        if taken is None:
            raise OutOfBudget(budget.capacity)
    holding.held += taken
    return taken


def _too_many(count: int, limit: int) -> str:
    return f"{count} recipients; the limit is {limit}"


def _too_large(settings: ServiceSettings, body_limit: int | None = None) -> ProblemError:
    what = f"the message is larger than the limit of {settings.max_message_size} bytes"
    if body_limit is not None and body_limit != settings.max_message_size:
        what = (
            f"the request body is larger than {body_limit} bytes, the most a message of up to "
            f"{settings.max_message_size} bytes and {settings.max_recipients} recipients can take"
        )
    return ProblemError(413, f"{what}; nothing was delivered")


def _invalid(errors: list[FieldError]) -> ProblemError:
    return ProblemError(422, "the request is invalid; nothing was delivered", errors=errors)


async def _read_body(
    request: Request,
    limit: int,
    settings: ServiceSettings,
    holding: Holding | None,
    until: float | None,
    *,
    decoded: bool,
) -> bytes:
    """The body, refused with 413 as soon as it passes `limit`, not after reading it all.

    A client that stops sending is cut off by the HTTP protocol after `body_timeout`
    (app.http_protocol: 408); here that arrives as a disconnect. `decoded`: the body
    is JSON, whose message is decoded beside it (at most the body, at most the message limit)."""
    declared = request.headers.get("content-length", "")
    expected = int(declared) if declared.isdigit() else None
    if expected is not None and expected > limit:
        raise _too_large(settings, limit)
    give_up_at: float | None = None
    if holding is not None and expected is not None:
        # A declared length: the whole share at once; the usual case, free with nobody waiting, without a wait.
        taken = holding.budget.try_take(_share(expected, settings, decoded))
        if taken is not None:
            holding.held = taken
        else:
            give_up_at = await _hold(holding, settings, expected, decoded, give_up_at)
    chunks: list[bytes] = []
    size = 0
    receive = request.receive  # the ASGI messages themselves: Request.stream() adds a generator per request
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if request.scope.get(BODY_TIMED_OUT):  # the protocol answered 408 already; counted as such
                raise ProblemError(408, body_timeout_detail(settings.body_timeout))
            # The client left mid-body (a timeout on its side): nothing to deliver, nothing to answer.
            raise ProblemError(400, "the client closed the connection before the body was complete")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(settings, limit)
        if holding is not None and expected is None and _share(size, settings, decoded) > holding.held:
            # A chunked body: its share grows ahead of it, doubling, so a large one waits a few times at most.
            ahead = min(limit, max(2 * size, size + _BUDGET_STEP))
            give_up_at = await _hold(holding, settings, ahead, decoded, give_up_at)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
        if until is not None and asyncio.get_running_loop().time() > until:
            raise ProblemError(
                408, "the request body did not arrive within the delivery deadline; nothing was delivered"
            )
    # One chunk (a small message) is used as it came: no copy.
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _share(size: int, settings: ServiceSettings, decoded: bool) -> int:
    """The budget a body of `size` bytes needs: itself, and in the JSON form its decoded message."""
    return size + min(size, settings.max_message_size) if decoded else size


async def _hold(
    holding: Holding, settings: ServiceSettings, size: int, decoded: bool, give_up_at: float | None
) -> float | None:
    """Hold the budget for a body of `size` bytes; returns when waiting for it gives up (None: not yet known)."""
    budget = holding.budget
    more = min(_share(size, settings, decoded), budget.capacity) - holding.held
    if more <= 0:
        return give_up_at
    taken = budget.try_take(more)
    if taken is None:
        loop = asyncio.get_running_loop()
        if give_up_at is None:  # one wait of at most queue_timeout for the whole body, as for a slot
            give_up_at = loop.time() + settings.limits.queue_timeout
        taken = await budget.take(more, give_up_at)
        if taken is None:
            raise OutOfBudget(budget.capacity)
    holding.held += taken
    return give_up_at


def _from_json(body: bytes, max_recipients: int) -> DeliveryRequest:
    if len(body) > _CHECKED_JSON_BYTES:
        _check_json_values(body, max_recipients)
    try:
        # Recipients are counted before each is validated (max_length stops at the first one too many).
        return request_model(max_recipients).model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(
            [
                FieldError(loc=_loc(e), message=_message(e, max_recipients))
                # Without the input: for a long list, converting it is most of the cost of the 422.
                for e in exc.errors(include_input=False, include_url=False)
            ]
        ) from None


def _loc(error: object) -> str:
    """The key path of a field error; a check of a whole object names the field it is about in its
    context (schemas.delivery: `loc`), and a dict key's error drops pydantic's `[key]` marker."""
    e = dict(error)  # type: ignore[call-overload]  # pydantic's ErrorDetails
    loc = [part for part in e["loc"] if part != "[key]"]
    ctx = e.get("ctx")
    if ctx and isinstance(ctx.get("loc"), str):
        loc.append(ctx["loc"])
    return format_path(loc) or "body"


def _message(error: object, max_recipients: int) -> str:
    e = dict(error)  # type: ignore[call-overload]  # pydantic's ErrorDetails
    if e["type"] == "too_long" and tuple(e["loc"]) == ("recipients",):
        return _too_many(e["ctx"]["actual_length"], max_recipients)
    return str(e["msg"]).removeprefix("Value error, ")


#: Above the parser's nesting limit (jiter refuses a body nested deeper than about 200 levels).
#: With c commas a body is a tree of at most c + 1 leaves, each under at most this many containers.
_JSON_DEPTH = 256


def _check_json_values(body: bytes, max_recipients: int) -> None:
    """Refuse a JSON body with more values than a valid request can hold, before it is parsed:
    the parser would hold every value of a flood of recipients (15 M of them: seconds, and GBs).

    Every value but the first follows a `,`, `:` or `[`, and a key follows `{` or `,`, so the
    separators outside strings (plus the strings, which bound this walk) bound what the parser
    makes. Counted in C first: the commas alone (without any, nesting is all a body can add, and
    the parser stops that at _JSON_DEPTH levels); then the commas, braces and brackets of the whole
    body; only when those are too many, as with a long message full of commas, once more skipping
    the strings (a regular expression: about 5 ns a byte)."""
    limit = json_value_limit(max_recipients)
    commas = body.count(b",")
    if (commas + 1) * (2 * _JSON_DEPTH + 2) <= limit:  # a base64 message: one pass, about 0.3 ns a byte
        return
    if 2 * (commas + body.count(b"{")) + body.count(b"[") <= limit:
        return
    seen, pos = 1, 0
    while seen <= limit:
        start = body.find(b'"', pos)
        if start < 0:
            seen += _separators(body, pos, len(body))
            break
        seen += 1 + _separators(body, pos, start)
        string = _JSON_STRING.match(body, start)
        if string is None:
            break  # an unterminated string: the parser stops there
        pos = string.end()
    if seen > limit:
        raise _invalid(
            [
                FieldError(
                    loc="body",
                    message=f"more JSON values than a request with at most {max_recipients} recipients holds",
                )
            ]
        )


def _separators(body: bytes, start: int, end: int) -> int:
    """Twice the `,` and `{` and once the `[` in body[start:end]: the values and keys they can introduce."""
    return 2 * (body.count(b",", start, end) + body.count(b"{", start, end)) + body.count(b"[", start, end)


#: Peer address -> parsed: the same few peers (load balancers) send every request, and
#: ipaddress.ip_address costs about 3 us a parse against 0.1 us a hit (timeit, 2026-11-30).
_PEERS: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
_MAX_PEERS = 4096


def _peer(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host not in _PEERS:
        if len(_PEERS) >= _MAX_PEERS:
            _PEERS.clear()
        try:
            _PEERS[host] = ipaddress.ip_address(host)
        except ValueError:
            _PEERS[host] = None  # not an IP (a unix socket, or a test client)
    return _PEERS[host]


def client_ip(request: Request, settings: ServiceSettings) -> str | None:
    """The client's address: the HTTP peer (as slimta's edge recorded it), or, when the peer
    is a trusted proxy, the rightmost X-Forwarded-For address that is not one."""
    address = _peer(request.client.host) if request.client and request.client.host else None
    if address is not None and settings.trusted_proxies:

        def trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
            return any(ip in net for net in settings.trusted_proxies)

        if trusted(address):
            hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
            for hop in reversed(hops):
                try:
                    address = ipaddress.ip_address(hop)
                except ValueError:
                    break  # a garbled entry: trust nothing to its left
                if not trusted(address):
                    break
    if address is None or getattr(address, "scope_id", None):
        return None  # an IPv6 zone (%eth0) is no client's public address
    return str(address)


def _from_raw(request: Request, body: bytes, settings: ServiceSettings) -> Envelope:
    """slimta's wire format: base64 envelope headers, the message as the body."""
    errors: list[FieldError] = []

    def address(header: str, value: str, *, allow_empty: bool) -> str:
        try:
            return check_address(
                decode_base64(value.strip(), what="value").decode("utf-8"),
                allow_empty=allow_empty,
            )
        except UnicodeDecodeError:
            errors.append(FieldError(loc=header, message="decoded value is not UTF-8"))
        except ValueError as exc:
            errors.append(FieldError(loc=header, message=str(exc)))
        return ""

    sender = ""
    sender_values = request.headers.getlist("x-envelope-sender")
    if len(sender_values) != 1:
        errors.append(
            FieldError(
                loc="X-Envelope-Sender",
                message="exactly one header is required: base64 of the sender, empty for <>",
            )
        )
    else:
        sender = address("X-Envelope-Sender", sender_values[0], allow_empty=True)

    pieces = [
        p
        for v in request.headers.getlist("x-envelope-recipient")
        for p in v.translate(_RECIPIENT_SEPARATORS).split(",")
    ]
    if len(pieces) > settings.max_recipients:  # counted before any is decoded: one error, not one per piece
        raise _invalid(
            [
                FieldError(
                    loc="X-Envelope-Recipient",
                    message=_too_many(len(pieces), settings.max_recipients),
                )
            ]
        )
    recipients = [address(f"X-Envelope-Recipient[{i}]", p, allow_empty=False) for i, p in enumerate(pieces)]
    if not recipients:
        errors.append(
            FieldError(
                loc="X-Envelope-Recipient",
                message="at least one header is required: base64 of a recipient",
            )
        )

    client = None
    ehlo = request.headers.get("x-ehlo")
    try:
        if ehlo is not None:
            _EHLO.validate_python(ehlo)
        # Both values are checked (the address came from ip_address): no second validation per request.
        client = ClientInfo.model_construct(ehlo=ehlo, ip=client_ip(request, settings))
    except ValidationError:
        errors.append(
            FieldError(
                loc="X-Ehlo",
                message="must be one line of at most 255 characters, without control, line separator or "
                "invisible formatting characters",
            )
        )
    require_tls = request.headers.get("require-tls")  # RFC 8689's header name, as a request option
    if require_tls is not None and require_tls.strip().lower() not in ("yes", "no"):
        errors.append(FieldError(loc="Require-TLS", message="must be `yes` or `no`"))
    if not body:
        errors.append(FieldError(loc="body", message="the message is empty"))
    if errors:
        raise _invalid(errors)
    secure = require_tls is not None and require_tls.strip().lower() == "yes"
    return Envelope(sender=sender, recipients=recipients, message=body, client=client, require_tls=secure)
