"""`/relays`: the configured relays, and delivery through one of them."""

import math
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from app import idempotency, logs
from app.auth import Principal
from app.budget import Holding
from app.delivery import Deadline, Delivery, Refused
from app.deps import PrincipalDep, RelayName, RuntimeDep, check_scope, find_relay, get_services
from app.intake import JSON, RFC822, OutOfBudget, is_raw_form, read_envelope
from app.lifespan import Runtime, Services
from app.metrics import QUOTA_REFUSALS
from app.problems import PROBLEM_JSON, ProblemError, problem_doc, problem_for
from relays.instruments import child
from relays.rates import QuotaAnswer
from schemas.delivery import COMPOSE_EXAMPLE, DeliveryResult, Envelope
from schemas.problem import FieldError
from schemas.relay_options import public_options

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
            "description": (
                'the outcome in slimta\'s format: `<code>; message="<text>"` (no `command=`: slimta 5.0.5 '
                "cannot read it; the body has each reply's command)"
            ),
            "schema": {"type": "string"},
            "example": '250; message="2.0.0 Ok: queued as 4F1C"',
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
        JSON: {
            "schema": {"$ref": "#/components/schemas/DeliveryRequest"},
            "examples": {
                "message": {
                    "summary": "a finished message",
                    "value": {
                        "sender": "alice@example.com",
                        "recipients": ["bob@example.net"],
                        "message": "From: alice@example.com\r\nSubject: hi\r\n\r\nHello\r\n",
                    },
                },
                "compose": {
                    "summary": "a message built by the service: text, HTML, an inline image, an attachment, Bcc",
                    "value": COMPOSE_EXAMPLE,
                },
            },
        },
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
        429: {
            **problem_doc(
                "the API key is over its quota (`auth.keys[].quota`, shared by every instance); nothing was sent. "
                "RateLimit-Policy and RateLimit (IETF httpapi ratelimit-headers draft) say where it stands; every "
                "answer to a key with a quota carries them"
            ),
            "headers": {
                **_RETRY_AFTER,
                "RateLimit-Policy": {
                    "description": 'the key\'s quotas, e.g. `"messages-m";q=100;w=60, "recipients-d";q=5000;w=86400`',
                    "schema": {"type": "string"},
                },
                "RateLimit": {
                    "description": "what is left of each (r) and seconds until it is full again (t), e.g. "
                    '`"messages-m";r=0;t=60, "recipients-d";r=4990;t=173`',
                    "schema": {"type": "string"},
                },
            },
        },
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
    before anything is delivered. With `content` instead of `message`,
    the service builds the message (MIME parts, encoded words, Date and
    Message-ID; Bcc only in the envelope) and `message_id` in the answer
    is the one it wrote. In the message/rfc822 form a partial
    outcome is answered 503 (not 207), because slimta's `http` relay reads
    any 2xx as success for every recipient; the JSON body still has each
    recipient's outcome.
    """
    # The hot path does without FastAPI's dependency solving (MailrelayApp: 3,300 -> 6,100
    # blackhole msg/s); these lookups are what it would have done.
    services = await get_services(request)
    runtime = services.current
    # Counted before the first await: a reload or a drain waits for this request,
    # and closes these relays only after it.
    runtime.enter()
    # The body's bytes are held from the first one read until the answer is made.
    holding = Holding(runtime.limiter.bodies)
    principal = None
    quota_headers: dict[str, str] | None = None
    taken: QuotaAnswer | None = None
    try:
        principal = runtime.keyring.identify(request)
        relay = find_relay(name, runtime, principal)
        _refuse_if_draining(services, name)
        settings = runtime.config.mailrelay
        deadline = Deadline.within(_deadline(request, settings.delivery_deadline))
        key = _idempotency_key(request)
        try:
            # The relay's add_missing_headers option: Date and Message-ID for a message without them.
            complete = getattr(runtime.config.relay[name], "add_missing_headers", False)
            envelope = await read_envelope(request, settings, holding, deadline.at, add_missing_headers=complete)
        except OutOfBudget as exc:
            raise _problem(runtime.core.overloaded(name, str(exc))) from None
        _refuse_if_draining(services, name)  # the body may have taken a while
        if principal.quota is not None:  # before anything is sent: over the key's quota, 429
            taken = await quota_check(runtime, principal, len(envelope.recipients))
            quota_headers = taken.headers
        delivery = Delivery(name, relay, envelope, deadline, principal.name, key, is_raw_form(request))
        try:
            answer = await runtime.core.deliver(delivery)
        except Refused as refused:
            problem = _problem(refused)
            if taken is not None:  # nothing was sent: the message goes back to the quota
                back = await quota_give_back(runtime, principal, envelope, taken)
                problem.headers = {**(problem.headers or {}), **back}
            raise problem from None
        if taken is not None and not answer.attempted:
            quota_headers = await quota_give_back(runtime, principal, envelope, taken)
        # The delivery's log line is handed to the OS before its answer goes out: a crash
        # cannot lose the line of an acknowledged delivery (app/logs.py, group-committed).
        await logs.written()
        headers = answer.headers
        if answer.replayed:
            headers = {**headers, "Idempotent-Replayed": "true"}
        if quota_headers is not None:
            headers = {**headers, **quota_headers}
        return Response(answer.body, status_code=answer.status, media_type=JSON, headers=headers)
    except ProblemError as problem:
        if principal is not None and principal.quota is not None and quota_headers is None:
            await with_quota_state(problem, runtime, principal)
        raise
    finally:
        holding.release()
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


async def quota_check(runtime: Runtime, principal: Principal, recipients: int) -> QuotaAnswer:
    """Takes one message (to `recipients`) from the key's quotas and returns the answer (its
    RateLimit headers); over a quota raises the 429 problem (with Retry-After), nothing taken."""
    assert principal.quota is not None  # noqa: S101 - callers check
    quotas = runtime.keyring.quotas(runtime.config.mailrelay)
    if (spec := quotas.never_fits(principal.quota, recipients)) is not None:
        raise ProblemError(
            422,
            f"{recipients} recipients exceed the API key {principal.name!r}'s whole quota of {spec} recipients; "
            "send them in smaller messages. Nothing was sent",
        )
    answer = await quotas.take(principal.name, principal.quota, recipients)
    if not answer.allowed:
        child(QUOTA_REFUSALS, principal.name).inc()
        raise ProblemError(
            429,
            f"the API key {principal.name!r} is over its quota; retry after {answer.retry_after} s. Nothing was sent",
            headers={"Retry-After": str(answer.retry_after), **answer.headers},
        )
    return answer


async def quota_give_back(
    runtime: Runtime, principal: Principal, envelope: Envelope, taken: QuotaAnswer
) -> dict[str, str]:
    """Gives back what quota_check took (`taken`) for a message that was not sent after all (the
    core refused it, or answered a replay or a key in doubt); the RateLimit headers after it."""
    assert principal.quota is not None  # noqa: S101 - callers check
    quotas = runtime.keyring.quotas(runtime.config.mailrelay)
    count = len(envelope.recipients)
    return (await quotas.give_back(principal.name, principal.quota, count, shared=taken.shared)).headers


async def with_quota_state(problem: ProblemError, runtime: Runtime, principal: Principal) -> None:
    """Every answer to a key with a quota says where it stands, an error too (nothing taken)."""
    if problem.headers is not None and "RateLimit" in problem.headers:
        return
    assert principal.quota is not None  # noqa: S101 - callers check
    answer = await runtime.keyring.quotas(runtime.config.mailrelay).state(principal.name, principal.quota)
    problem.headers = {**(problem.headers or {}), **answer.headers}


def _refuse_if_draining(services: Services, relay: str) -> None:
    if services.draining:
        raise _problem(services.current.core.refuse(relay, "draining", "shutting down; not accepting deliveries", 5))


def _problem(refused: Refused) -> ProblemError:
    """The core's refusal as the problem document that answers it."""
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else None
    return ProblemError(refused.status, refused.detail, headers=headers)


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
