"""`/relays`: the configured relays, and delivery through one of them."""

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from app.deps import RelayName, RuntimeDep, find_relay, get_runtime, unknown_relay
from app.intake import JSON, RFC822, is_raw_form, read_envelope
from app.problems import problem_doc
from relays.base import check_results
from schemas.delivery import DeliveryResult
from schemas.relay_options import public_options
from schemas.reply import Reply

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


@router.get("", name="list_relays", response_model=RelayList)
async def list_relays(runtime: RuntimeDep) -> RelayList:
    """Every configured relay with its options, defaults filled in and secrets masked."""
    return RelayList(relays=[_info(name, opts) for name, opts in runtime.config.relay.items()])


@router.get(
    "/{name}",
    name="get_relay",
    response_model=RelayInfo,
    responses={404: problem_doc("no relay of that name"), 422: problem_doc("the request is invalid")},
)
async def get_relay(name: RelayName, runtime: RuntimeDep) -> RelayInfo:
    """One relay, in the same shape as in the list."""
    options = runtime.config.relay.get(name)
    if options is None:
        raise unknown_relay(name, runtime.config.relay)
    return _info(name, options)


def _info(name: str, options: Any) -> RelayInfo:
    shown = public_options(options)
    return RelayInfo(name=name, type=shown["type"], options=shown)


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
]


@router.post(
    "/{name}/deliver",
    name="deliver",
    response_model=DeliveryResult,
    status_code=200,
    openapi_extra={"requestBody": _DELIVER_BODY, "parameters": _RAW_HEADERS},
    responses={
        200: _result("every recipient delivered"),
        207: _result("partial: some recipients delivered, some not"),
        400: _result("permanent failure: no recipient delivered, and retrying will not help"),
        503: _result(
            "transient failure (no recipient delivered; retry later) — or a problem document when the service is not ready",
            {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            },
        ),
        404: problem_doc("no relay of that name"),
        413: problem_doc("the message is larger than the configured limit; nothing was delivered"),
        415: problem_doc("the Content-Type is neither application/json nor message/rfc822"),
        422: problem_doc(
            "the request is invalid (addresses, recipients, message, base64, unknown fields); nothing was delivered"
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
    # The hot path looks the relay up itself: FastAPI's dependency solving costs
    # more per request than the lookup (see bench/smtp_static.py).
    runtime = await get_runtime(request)
    relay = find_relay(name, runtime)
    settings = runtime.config.mailrelay
    envelope = await read_envelope(request, settings)
    started = time.perf_counter()
    results = await relay.deliver(envelope)
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    check_results(name, envelope, results)
    result = DeliveryResult(
        relay=name,
        message_id=envelope.message_id,
        elapsed_ms=elapsed_ms,
        recipients=results,
    )

    outcome = result.status  # computed from every recipient: evaluate it once
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
    return Response(result.model_dump_json(), status_code=status, media_type=JSON, headers=headers)


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
    printable = "".join(c if " " <= c <= "~" else (" " if c in "\r\n\t" else "?") for c in text)
    return printable.replace("\\", "\\\\").replace('"', "'")
