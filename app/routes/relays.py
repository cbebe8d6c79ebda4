"""`/relays`: the configured relays, and delivery through one of them."""

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from app import idempotency, logs
from app.auth import Principal
from app.deps import PrincipalDep, RelayName, RuntimeDep, check_scope, find_relay, get_services
from app.intake import JSON, RFC822, is_raw_form, read_envelope
from app.lifespan import Runtime, Services
from app.metrics import IN_FLIGHT, REFUSED, child, record_delivery
from app.problems import PROBLEM_JSON, ProblemError, problem_doc, problem_for
from relays import progress
from relays.base import Relay, check_results
from relays.instruments import TALLY
from schemas.delivery import DeliveryResult, Envelope, RecipientResult, domain_of
from schemas.problem import FieldError
from schemas.relay_options import public_options
from schemas.reply import Reply

logger = logging.getLogger(__name__)
delivery_log = logging.getLogger("mailrelay.delivery")
router = APIRouter(prefix="/relays", tags=["relays"])


class RelayInfo(BaseModel):
    name: str = Field(examples=["outbound"])
    type: str = Field(examples=["static"])
    options: dict[str, Any] = Field(description="every option with its default filled in; secrets shown as ***")


class RelayList(BaseModel):
    relays: list[RelayInfo]


def _result(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    smtp_reply = {
        "X-Smtp-Reply": {
            "description": 'the outcome in slimta\'s format: `<code>; message="<text>"[; command="<cmd>"]`',
            "schema": {"type": "string"},
            "example": '250; message="2.0.0 Ok: queued as 4F1C"; command="[SEND_DATA]"',
        }
    }
    return {
        "description": description,
        "model": DeliveryResult,
        "headers": {**smtp_reply, **(headers or {})},
    }


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem_doc("no API key, or not a valid one (only when keys are configured)"),
    403: problem_doc("the API key may not use this relay"),
}


@router.get("", name="list_relays", response_model=RelayList, responses={401: _AUTH_ERRORS[401]})
async def list_relays(runtime: RuntimeDep, principal: PrincipalDep) -> RelayList:
    """Every configured relay the caller's key may use, with its options: defaults filled in, secrets masked."""
    return RelayList(
        relays=[_info(name, opts) for name, opts in runtime.config.relay.items() if principal.may_use(name)]
    )


@router.get(
    "/{name}",
    name="get_relay",
    response_model=RelayInfo,
    responses={
        **_AUTH_ERRORS,
        404: problem_doc("no relay of that name"),
        422: problem_doc("the request is invalid"),
    },
)
async def get_relay(name: RelayName, runtime: RuntimeDep, principal: PrincipalDep) -> RelayInfo:
    """One relay, in the same shape as in the list."""
    check_scope(name, runtime.config.relay, principal)
    return _info(name, runtime.config.relay[name])


def _info(name: str, options: Any) -> RelayInfo:
    shown = public_options(options)
    return RelayInfo(name=name, type=shown["type"], options=shown)


DEADLINE_HEADER = "X-Delivery-Timeout"
_DELIVER_BODY = {
    "required": True,
    "content": {
        JSON: {"schema": {"$ref": "#/components/schemas/DeliveryRequest"}},
        RFC822: {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "the raw message; the envelope is in X-Envelope-* headers",
            },
            "example": "From: alice@example.com\r\nSubject: hi\r\n\r\nHello\r\n",
        },
    },
}
_RAW_HEADERS = [
    {
        "name": "X-Envelope-Sender",
        "in": "header",
        "required": False,
        "description": "message/rfc822 form only, required there: base64 of the UTF-8 sender (empty for the null sender)",
        "schema": {"type": "string"},
        "example": "YWxpY2VAZXhhbXBsZS5jb20=",
    },
    {
        "name": "X-Envelope-Recipient",
        "in": "header",
        "required": False,
        "description": "message/rfc822 form only, required there: base64 of a UTF-8 recipient; repeat the header "
        "or separate values with commas",
        "schema": {"type": "string"},
        "example": "Ym9iQGV4YW1wbGUubmV0",
    },
    {
        "name": "X-Ehlo",
        "in": "header",
        "required": False,
        "description": "message/rfc822 form only: the original client's EHLO name",
        "schema": {"type": "string"},
    },
    {
        "name": DEADLINE_HEADER,
        "in": "header",
        "required": False,
        "description": "seconds this delivery may take in all; it can only lower the service's delivery_deadline. "
        "Past it, the result is a transient failure (4.4.7), with possibly_delivered set for recipients the next "
        "hop may already have.",
        "schema": {"type": "number", "exclusiveMinimum": 0},
        "example": 20,
    },
    {
        "name": idempotency.HEADER,
        "in": "header",
        "required": False,
        "description": "a key unique to this message, chosen by the client (printable ASCII, at most "
        f"{idempotency.MAX_KEY_LENGTH} characters). A repeat with the same key and the same request replays the "
        "first result (with Idempotent-Replayed: true) instead of sending again; 409 while the first still runs; "
        "422 for the same key with a different request. Only final outcomes are kept: after a transient failure "
        "the same key may be retried.",
        "schema": {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH},
        "example": "order-4711-confirmation",
    },
]


_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored result of an earlier request with the same Idempotency-Key",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}


@router.post(
    "/{name}/deliver",
    name="deliver",
    response_model=DeliveryResult,
    status_code=200,
    openapi_extra={"requestBody": _DELIVER_BODY, "parameters": _RAW_HEADERS},
    responses={
        200: _result("every recipient delivered", _REPLAYED),
        207: _result("partial: some recipients delivered, some not", _REPLAYED),
        400: _result("permanent failure: no recipient delivered, and retrying will not help", _REPLAYED),
        503: {
            **_result(
                "transient failure: no recipient delivered, retry later (a delivery result); or, as a problem "
                "document, nothing was tried: the service is overloaded, draining, or its idempotency store is "
                "unreachable",
                _RETRY_AFTER,
            ),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
        **_AUTH_ERRORS,
        404: problem_doc("no relay of that name"),
        408: problem_doc("the request body stopped arriving; nothing was delivered"),
        409: {
            **problem_doc("a request with this Idempotency-Key is still running; retry after it"),
            "headers": _RETRY_AFTER,
        },
        413: problem_doc("the message is larger than the configured limit; nothing was delivered"),
        415: problem_doc("the Content-Type is neither application/json nor message/rfc822"),
        422: problem_doc(
            "the request is invalid (addresses, recipients, message, base64, unknown fields, headers), or its "
            "Idempotency-Key was used for a different request; nothing was delivered"
        ),
    },
)
async def deliver(name: RelayName, request: Request) -> Response:
    """Deliver one message through the relay, synchronously.

    The answer holds one result per recipient, in request order, each with
    the next hop's reply. The HTTP status summarises the whole: 200 all
    delivered, 207 partial, 503 transient failure (retry later; see
    Retry-After), 400 permanent failure. The whole request is validated
    before anything is delivered. In the message/rfc822 form a partial
    outcome is answered 503 (not 207), because slimta's `http` relay reads
    any 2xx as success for every recipient; the JSON body still has each
    recipient's outcome.
    """
    # The hot path does without FastAPI's dependency solving, which costs more
    # per request than these lookups (see bench/).
    loop = asyncio.get_running_loop()
    services = await get_services(request)
    runtime = services.current
    # Counted before the first await: a reload or a drain waits for this request,
    # and closes these relays only after it.
    runtime.enter()
    try:
        principal = runtime.keyring.identify(request)
        relay = find_relay(name, runtime, principal)
        _refuse_if_draining(services, name)
        settings = runtime.config.mailrelay
        seconds = _deadline(request, settings.delivery_deadline)
        deadline = loop.time() + seconds
        key = _idempotency_key(request)
        envelope = await read_envelope(request, settings)
        _refuse_if_draining(services, name)  # the body may have taken a while
        return await _deliver_once(request, runtime, principal, name, relay, envelope, (deadline, seconds), key)
    finally:
        runtime.leave()


DELIVER_ROUTE = next(r for r in router.routes if isinstance(r, APIRoute) and r.name == "deliver")
_PREFIX, _SUFFIX = "/relays/", "/deliver"


def deliver_target(scope: Scope) -> str | None:
    """The relay name when `scope` is a `POST /relays/{name}/deliver`, else None."""
    if scope["method"] != "POST":
        return None
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    name = path[len(_PREFIX) : -len(_SUFFIX)]
    # As the router would match it: one non-empty path segment.
    return name if name and "/" not in name else None


async def serve_deliver(name: str, scope: Scope, receive: Receive, send: Send) -> None:
    """`deliver` as an ASGI app, with the problem handlers the framework would apply."""
    request = Request(scope, receive)
    try:
        response = await deliver(name, request)
    except Exception as exc:  # as the framework's handlers would answer (a bug: logged, 500)
        response = problem_for(request, exc)
    await response(scope, receive, send)


def _refuse_if_draining(services: Services, relay: str) -> None:
    if services.draining:
        child(REFUSED, relay, "draining").inc()
        raise ProblemError(503, "shutting down; not accepting deliveries", headers={"Retry-After": "5"})


async def _deliver_once(
    request: Request,
    runtime: Runtime,
    principal: Principal,
    name: str,
    relay: Relay,
    envelope: Envelope,
    deadline: tuple[float, float],
    key: str | None,
) -> Response:
    """Deliver, or replay what an earlier request with the same Idempotency-Key got.
    `deadline` is (loop time, its length in seconds)."""
    loop = asyncio.get_running_loop()
    settings = runtime.config.mailrelay
    if key is None:
        return await _deliver(request, runtime, name, relay, envelope, deadline, principal)

    store = runtime.idempotency
    key = idempotency.scoped_key(principal.name, key)
    fingerprint = idempotency.fingerprint(name, envelope)
    try:
        # The claim outlives any delivery (deadline), so it cannot lapse while one runs.
        claim = await store.claim(key, fingerprint, hold=deadline[0] - loop.time() + _CLAIM_MARGIN)
    except idempotency.StoreUnavailable as exc:
        logger.error("idempotency store unavailable: %s", exc)
        raise ProblemError(
            503,
            "the idempotency store is unavailable, so a repeat could not be recognised; nothing was delivered",
            headers={"Retry-After": str(settings.retry_after)},
        ) from None
    if isinstance(claim, idempotency.Replay):
        stored = claim.response
        return Response(
            stored.body,
            status_code=stored.status,
            media_type=JSON,
            headers={**stored.headers, "Idempotent-Replayed": "true"},
        )
    if isinstance(claim, idempotency.Running):
        raise ProblemError(
            409,
            "a request with this Idempotency-Key is still running; retry when it has finished",
            headers={"Retry-After": "1"},
        )
    if isinstance(claim, idempotency.Mismatch):
        raise ProblemError(
            422,
            "this Idempotency-Key was used for a different request (relay, envelope or message); "
            "use a new key for a new message",
        )

    try:
        response = await _deliver(request, runtime, name, relay, envelope, deadline, principal)
    except BaseException:
        with contextlib.suppress(idempotency.StoreUnavailable):
            await asyncio.shield(store.release(key, claim))
        raise
    try:
        if response.status_code == 503:  # not final (a raw-form partial too): the same key may be retried
            await store.release(key, claim)
        else:
            headers = {k: v for k, v in response.headers.items() if k.lower() in _STORED_HEADERS}
            await store.complete(
                key, claim, fingerprint, idempotency.StoredResponse(response.status_code, headers, bytes(response.body))
            )
    except idempotency.StoreUnavailable as exc:
        # The delivery happened; the client gets its result. A repeat may not be recognised.
        logger.error("idempotency store unavailable after delivery; the result was not stored: %s", exc)
    return response


#: The claim's margin over the deadline, for writing the result back.
_CLAIM_MARGIN = 30.0
_STORED_HEADERS = {"x-smtp-reply", "retry-after"}


async def _deliver(
    request: Request,
    runtime: Runtime,
    name: str,
    relay: Relay,
    envelope: Envelope,
    deadline_at: tuple[float, float],
    principal: Principal,
) -> Response:
    """Wait for a slot, deliver within the deadline, and build the response."""
    loop = asyncio.get_running_loop()
    settings = runtime.config.mailrelay
    deadline, limit = deadline_at
    in_flight = child(IN_FLIGHT, name)
    held = await runtime.limiter.acquire(name, min(settings.limits.queue_timeout, deadline - loop.time()))
    TALLY.add(in_flight)
    in_doubt = progress.track()
    started = time.perf_counter()
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            results = await relay.deliver(envelope)
    except TimeoutError:
        if not timer.expired():
            raise
        results = _deadline_results(envelope, in_doubt, limit)
    finally:
        TALLY.add(in_flight, -1)
        runtime.limiter.release(held)
    seconds = time.perf_counter() - started
    elapsed_ms = round(seconds * 1000, 3)
    check_results(name, envelope, results)
    result = DeliveryResult(
        relay=name,
        message_id=envelope.message_id,
        elapsed_ms=elapsed_ms,
        recipients=results,
    )

    outcome = result.status
    status = _HTTP_STATUS[outcome]
    summary = summary_reply(result)
    if outcome == "partial" and is_raw_form(request):
        # slimta's http relay reads any 2xx as success for every recipient, so a 207
        # would lose the failed ones. Mail systems prefer a duplicate to a loss: say
        # "try again" for the whole envelope (the JSON body still has every outcome).
        status = 503
        failed = sum(r.status != "delivered" for r in result.recipients)
        summary = Reply.parse(
            451,
            f"4.5.0 Partial delivery: {failed} of {len(result.recipients)} recipients failed "
            f"(first: {summary.code} {summary.message}); the envelope may be retried as a whole",
            summary.command,
        )
    headers = {"X-Smtp-Reply": format_smtp_reply(summary)}
    if status == 503:
        headers["Retry-After"] = str(settings.retry_after)
    record_delivery(result, outcome, seconds)
    _log_delivery(result, outcome, principal, envelope, elapsed_ms)
    return Response(result.model_dump_json(), status_code=status, media_type=JSON, headers=headers)


def _log_delivery(
    result: DeliveryResult, outcome: str, principal: Principal, envelope: Envelope, elapsed_ms: float
) -> None:
    """One line per delivery: who, which relay, how many, what came back; never addresses or content."""
    logs.event(
        delivery_log,
        f"delivery via {result.relay}: {outcome}",
        {
            "event": "delivery",
            "relay": result.relay,
            "key": principal.name,
            "sender_domain": domain_of(envelope.sender) if envelope.sender else "",
            "recipients": len(result.recipients),
            "codes": [r.reply.code for r in result.recipients],
            "outcome": outcome,
            "elapsed_ms": elapsed_ms,
            "possibly_delivered": sum(r.possibly_delivered for r in result.recipients),
        },
    )


def _deadline_results(envelope: Envelope, in_doubt: set[str], limit: float) -> list[RecipientResult]:
    """Every recipient's result when the deadline cut the delivery off."""
    maybe = Reply.parse(
        451, f"4.4.7 Delivery deadline ({limit:g} s) reached; the message may have been delivered", "[DEADLINE]"
    )
    not_sent = Reply.parse(451, f"4.4.7 Delivery deadline ({limit:g} s) reached; not delivered", "[DEADLINE]")
    return [
        RecipientResult(recipient=r, reply=maybe, possibly_delivered=True)
        if r in in_doubt
        else RecipientResult(recipient=r, reply=not_sent)
        for r in envelope.recipients
    ]


def _deadline(request: Request, limit: float) -> float:
    """The delivery deadline in seconds: the service's, or lower if the request asks."""
    value = request.headers.get(DEADLINE_HEADER)
    if value is None:
        return limit
    try:
        asked = float(value)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked <= 0:
        raise ProblemError(
            422,
            "the request is invalid; nothing was delivered",
            errors=[FieldError(loc=DEADLINE_HEADER, message="must be a number of seconds greater than 0")],
        )
    return min(asked, limit)


def _idempotency_key(request: Request) -> str | None:
    values = request.headers.getlist(idempotency.HEADER)
    if not values:
        return None
    problem = "give it once" if len(values) > 1 else idempotency.key_problem(values[0])
    if problem:
        raise ProblemError(
            422,
            "the request is invalid; nothing was delivered",
            errors=[FieldError(loc=idempotency.HEADER, message=problem)],
        )
    return values[0]


_HTTP_STATUS = {
    "delivered": 200,
    "partial": 207,
    "transient_failure": 503,
    "permanent_failure": 400,
}


def summary_reply(result: DeliveryResult) -> Reply:
    """The reply that speaks for the whole delivery: the first one of the outcome's class.

    For a partial outcome that is the first failed recipient's reply.
    """
    wanted = {"partial": ("transient_failure", "permanent_failure")}.get(result.status, (result.status,))
    return next(r.reply for r in result.recipients if r.status in wanted)


def format_smtp_reply(reply: Reply) -> str:
    """slimta's `X-Smtp-Reply` header: `<code>; message="<text>"[; command="<cmd>"]`.

    slimta's parser reads a quoted value up to the next `"` and knows no
    escapes, so quotes inside become `'`; the value is kept to printable ASCII.
    """
    value = f'{reply.code}; message="{_header_text(reply.message)}"'
    if reply.command:
        value += f'; command="{_header_text(reply.command)}"'
    return value


def _header_text(text: str) -> str:
    # Printable ASCII; `"` becomes `'` (slimta's parser stops at the next quote) and `\`
    # is escaped as in a quoted-string, so our own parser reads the text back exactly.
    if not (text.isascii() and text.isprintable()):  # the usual case needs no pass per character
        text = "".join(c if " " <= c <= "~" else (" " if c in "\r\n\t" else "?") for c in text)
    return text.replace("\\", "\\\\").replace('"', "'")
