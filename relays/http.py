"""`http`: POST the message onward in slimta's wire format (to slimta's HTTP edge or another mailrelay)."""

import asyncio
import base64
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

from relays import replies
from relays.base import DeliveryContext, same_result
from relays.context import RelayContext
from relays.tls import client_context
from schemas.delivery import Envelope, RecipientResult, delivery_status
from schemas.relay_options import HttpOptions
from schemas.reply import Reply, Step

# httpx logs every request at info level with the whole URL, its password and query
# included; the delivery log line says what happened.
logging.getLogger("httpx").setLevel(logging.WARNING)

#: Largest response body read: a mailrelay result is about 300 bytes per recipient.
_BODY_CAP = 64 * 1024
_BODY_PER_RECIPIENT = 4096
_CODE = re.compile(r"^\s*(\d{3})\s*(?:;|$)")
#: `name="value"` with backslash escapes; a value may hold `;` and `=`.
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s"]+))')


def parse_smtp_reply(header: str) -> Reply | None:
    """`X-Smtp-Reply: <code>; message="<text>"[; command="<cmd>"]` from a slimta-style hop (mailrelay writes
    no command; its body has them); None when absent or malformed."""
    match = _CODE.match(header)
    if not match or int(match.group(1)) // 100 not in (2, 4, 5):
        return None
    params = {
        name.lower(): re.sub(r"\\(.)", r"\1", quoted) if quoted or not token else token
        for name, quoted, token in _PARAM.findall(header[match.end() :])
    }
    return Reply.parse(int(match.group(1)), params.get("message", ""), params.get("command"))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class HttpRelay:
    """One httpx client per relay, made at start-up and closed at shutdown."""

    def __init__(self, name: str, options: HttpOptions, context: RelayContext) -> None:
        self.options = options
        parts = urlsplit(options.url)
        self.host = parts.netloc.rpartition("@")[2]  # never the userinfo
        verify: ssl.SSLContext | bool = True  # https:// alone means default verification
        if options.tls is not None:
            verify = client_context(options.tls, f"relay.{name}.tls")
        # A require_tls delivery needs https with the server's certificate verified for its name.
        self._secure = parts.scheme == "https" and (
            verify is True or (isinstance(verify, ssl.SSLContext) and verify.check_hostname)
        )
        keep = options.concurrent_connections if options.idle_timeout else 0
        self.client = httpx.AsyncClient(
            verify=verify,
            trust_env=False,  # no proxy, CA or netrc from the service's environment redirects mail
            timeout=httpx.Timeout(options.timeout),
            limits=httpx.Limits(
                max_connections=options.concurrent_connections,
                max_keepalive_connections=keep,
                keepalive_expiry=options.idle_timeout or None,
            ),
        )

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        if envelope.require_tls and not self._secure:
            why = "it is not https with a verified certificate"
            return same_result(envelope, replies.tls_required(self.host, why), self.host)
        recipients = list(envelope.recipients)
        headers = [
            ("Content-Type", "message/rfc822"),
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),  # a compressed answer could expand far past our read limit
            ("X-Ehlo", self.options.ehlo_as),
            ("X-Envelope-Sender", _b64(envelope.sender)),
            *(("X-Envelope-Recipient", _b64(r)) for r in recipients),
        ]
        if envelope.require_tls:  # the next hop (a mailrelay reads it) keeps to it too: RFC 8689
            headers.append(("Require-TLS", "yes"))
        if not self.options.idle_timeout:
            headers.append(("Connection", "close"))
        # With Content-Length given, httpx sends the generator's bytes as they are (no chunking).
        headers.append(("Content-Length", str(len(envelope.message))))
        sent = False

        async def content() -> AsyncIterator[bytes]:
            nonlocal sent
            await context.sending(recipients)  # from here on the next hop may act on it
            yield envelope.message
            sent = True  # httpx asks for more only once the message is written

        try:
            async with (
                asyncio.timeout(self.options.timeout),  # the whole exchange, connection included
                self.client.stream("POST", self.options.url, content=content(), headers=headers) as response,
            ):
                # A next hop's body is read only as far as a result for these recipients can go.
                body = await _read_capped(response, _BODY_CAP + _BODY_PER_RECIPIENT * len(recipients))
        except TimeoutError:
            what = f"the response from {self.host}" + ("; the message may have been delivered" if sent else "")
            return self._same(recipients, replies.timed_out("[HTTP]", what), possibly_delivered=sent)
        except (httpx.HTTPError, OSError) as exc:  # ssl.SSLError (an OSError) can surface unwrapped with TLS 1.3
            return self._same(recipients, self._translate(exc, sent), possibly_delivered=sent)
        return self._results(recipients, response, body)

    def _results(self, recipients: list[str], response: httpx.Response, body: bytes | None) -> list[RecipientResult]:
        # A mailrelay next hop says what happened to each recipient: carry that through.
        carried = _carried_results(recipients, response, body)
        if carried is not None:
            if [r.recipient for r in carried] == recipients and _consistent(carried, response.status_code):
                return carried
            return self._same(
                recipients,
                replies.protocol_error(
                    "[HTTP]", f"{self.host} answered HTTP {response.status_code} with a result that contradicts it"
                ),
            )
        # The header's code decides (relays.md); the first header only, if there are several.
        header = parse_smtp_reply(next(iter(response.headers.get_list("X-Smtp-Reply")), ""))
        status = response.status_code
        if header is not None and (200 <= status < 300 or not header.is_success):
            reply = header  # a "250" on an HTTP error is not believed
        else:
            reply = replies.http_answer(self.host, status, response.reason_phrase)
        return self._same(recipients, reply)

    def _same(self, recipients: list[str], reply: Reply, *, possibly_delivered: bool = False) -> list[RecipientResult]:
        return [
            RecipientResult(recipient=r, reply=reply, host=self.host, possibly_delivered=possibly_delivered)
            for r in recipients
        ]

    def _translate(self, exc: httpx.HTTPError | OSError, sent: bool) -> Reply:
        """The one place where httpx errors become replies."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLError):
            return replies.tls_failed("[CONNECT]", f"{getattr(cause, 'reason', None) or cause} ({self.host})")
        if isinstance(exc, httpx.TimeoutException):
            command: Step = "[CONNECT]" if isinstance(exc, httpx.ConnectTimeout) else "[HTTP]"
            return replies.timed_out(
                command, f"{self.host}" if command == "[CONNECT]" else f"the response from {self.host}"
            )
        if isinstance(exc, httpx.ConnectError):
            return replies.connection_failed(self.host, str(exc) or type(exc).__name__)
        return replies.connection_lost("[HTTP]", maybe_delivered=sent)

    async def aclose(self) -> None:
        await self.client.aclose()


async def _read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None (read no further) once it passes `limit`."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _carried_results(
    recipients: list[str], response: httpx.Response, body: bytes | None
) -> list[RecipientResult] | None:
    """The per-recipient results of a mailrelay next hop, when its body is one (for any recipients)."""
    if body is None or not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        parsed = json.loads(body)
        results = [RecipientResult.model_validate(r) for r in parsed["recipients"]]
    except Exception:  # anything a body can throw at a parser (RecursionError too) means: not a result
        return None
    return results


#: The HTTP statuses a mailrelay gives each whole outcome (503 for a raw-form partial).
_STATUS_OF = {"delivered": {200}, "partial": {207, 503}, "transient_failure": {503}, "permanent_failure": {400}}


def _consistent(results: list[RecipientResult], http_status: int) -> bool:
    """A result is carried only when the HTTP status tells the same story (status is computed from the codes)."""
    return http_status in _STATUS_OF[delivery_status(r.status for r in results)]
