"""Replies mailrelay synthesises when the next hop gave none: functions, never shared constants."""

from collections.abc import Sequence

from schemas.delivery import RecipientResult
from schemas.reply import Reply


def _reply(code: int, enhanced: str, text: str, command: str | None) -> Reply:
    return Reply(code=code, enhanced_status=enhanced, message=f"{enhanced} {text}", command=command)


def timed_out(command: str, what: str) -> Reply:
    return _reply(451, "4.4.2", f"Timed out waiting for {what}", command)


def connection_failed(target: str, reason: str) -> Reply:
    return _reply(451, "4.4.1", f"Connection to {target} failed: {reason}", "[CONNECT]")


def connection_lost(command: str, maybe_delivered: bool = False) -> Reply:
    tail = "; the message may have been delivered" if maybe_delivered else ""
    return _reply(451, "4.4.2", f"Connection lost during {command}{tail}", command)


def tls_failed(command: str, reason: str) -> Reply:
    return _reply(451, "4.7.5", f"TLS with the server failed: {reason}", command)


def not_offered(command: str, extension: str) -> Reply:
    return _reply(
        451, "4.7.4", f"{extension} is required by the configuration but the server does not offer it", command
    )


def cannot_start(command: str, program: str, reason: str) -> Reply:
    return _reply(451, "4.3.5", f"Cannot run {program}: {reason}", command)


def tls_refused(detail: str) -> Reply:
    return _reply(451, "4.7.4", f"The server refused STARTTLS, which the configuration requires: {detail}", "STARTTLS")


def protocol_error(command: str, detail: str) -> Reply:
    return _reply(451, "4.5.0", f"Unexpected reply from the server: {detail}", command)


def eight_bit_refused() -> Reply:
    return _reply(554, "5.6.3", "The message has 8-bit data and the server does not support 8BITMIME", "MAIL")


def utf8_refused() -> Reply:
    return _reply(553, "5.6.7", "Non-ASCII address and the server does not support SMTPUTF8", "MAIL")


def dns_failure(domain: str, reason: str) -> Reply:
    return _reply(451, "4.4.3", f"DNS lookup for {domain} failed: {reason}", "[DNS]")


def no_such_domain(domain: str) -> Reply:
    return _reply(550, "5.1.2", f"Domain {domain} does not exist", "[DNS]")


def no_mail_host(domain: str, ipv4_only: bool) -> Reply:
    address = "no IPv4 address (ipv4_only is set)" if ipv4_only else "no address"
    return _reply(550, "5.1.2", f"Domain {domain} has no MX and {address}", "[DNS]")


def null_mx(domain: str) -> Reply:
    return Reply(
        code=556, enhanced_status="5.1.10", message=f"5.1.10 Domain {domain} accepts no mail (null MX)", command="[DNS]"
    )


def no_domain() -> Reply:
    return _reply(550, "5.1.3", "Recipient address has no domain", "[ROUTE]")


def deadline_reached(seconds: float, *, maybe_delivered: bool) -> Reply:
    outcome = "the message may have been delivered" if maybe_delivered else "not delivered"
    return _reply(451, "4.4.7", f"Delivery deadline ({seconds:g} s) reached; {outcome}", "[DEADLINE]")


def partial_delivery(results: Sequence[RecipientResult], first_failure: Reply) -> Reply:
    """A partial outcome answered as a transient failure of the whole envelope."""
    failed = sum(r.status != "delivered" for r in results)
    return Reply.parse(
        451,
        f"4.5.0 Partial delivery: {failed} of {len(results)} recipients failed "
        f"(first: {first_failure.code} {first_failure.message}); the envelope may be retried as a whole",
        first_failure.command,
    )
