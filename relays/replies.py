"""Replies mailrelay synthesises when the next hop gave none: functions, never shared constants."""

from collections.abc import Sequence

from schemas.delivery import RecipientResult
from schemas.reply import Command, Reply, SmtpCommand, Step


def _reply(code: int, enhanced: str, text: str, command: Command | None) -> Reply:
    return Reply(code=code, enhanced_status=enhanced, message=f"{enhanced} {text}", command=command)


def timed_out(command: Command, what: str) -> Reply:
    return _reply(451, "4.4.2", f"Timed out waiting for {what}", command)


def connection_failed(target: str, reason: str) -> Reply:
    return _reply(451, "4.4.1", f"Connection to {target} failed: {reason}", "[CONNECT]")


def connection_lost(command: Command, maybe_delivered: bool = False) -> Reply:
    tail = "; the message may have been delivered" if maybe_delivered else ""
    return _reply(451, "4.4.2", f"Connection lost during {command}{tail}", command)


def reply_too_long(command: Command, detail: str, *, maybe_delivered: bool = False) -> Reply:
    """The server's reply went past the reader's bound (relays/smtp/reader.py): the connection was dropped."""
    tail = "; the message may have been delivered" if maybe_delivered else ""
    return _reply(451, "4.5.0", f"Unexpected reply from the server: {detail}; connection dropped{tail}", command)


def tls_failed(command: Command, reason: str) -> Reply:
    return _reply(451, "4.7.5", f"TLS with the server failed: {reason}", command)


def not_offered(command: SmtpCommand, extension: str) -> Reply:
    return _reply(
        451, "4.7.4", f"{extension} is required by the configuration but the server does not offer it", command
    )


def tls_required(target: str, why: str) -> Reply:
    """A require_tls delivery and a hop that is not encrypted and authenticated: nothing sent there."""
    return _reply(
        550, "5.7.10", f"REQUIRETLS: the connection to {target} cannot be secured ({why}); not sent", "STARTTLS"
    )


def dane_failed(target: str, reason: str) -> Reply:
    """The MX host has DNSSEC-validated TLSA records and could not be authenticated by them: deferred."""
    return _reply(451, "4.7.5", f"DANE: {target} could not be authenticated: {reason}", "STARTTLS")


def dane_lookup_failed(host: str, reason: str) -> Reply:
    """The TLSA lookup failed (SERVFAIL: bogus data, or a broken zone): the host is deferred, never used in clear text."""
    return _reply(451, "4.7.5", f"DANE: the TLSA lookup for {host} failed ({reason}); deferred", "[DNS]")


def mta_sts_no_match(domain: str, hosts: Sequence[str]) -> Reply:
    """Under the domain's MTA-STS policy (enforce) no MX host it names was there to try."""
    shown = ", ".join(hosts[:5])
    return _reply(451, "4.7.5", f"MTA-STS policy of {domain} (enforce) names none of its MX hosts ({shown})", "[DNS]")


def mta_sts_tls_failed(domain: str, detail: str) -> Reply:
    """Under the domain's MTA-STS policy (enforce) a host could not be secured: deferred, never clear text."""
    return _reply(451, "4.7.5", f"MTA-STS policy of {domain} (enforce) requires verified TLS: {detail}", "STARTTLS")


def no_auth_mechanism(offered: str) -> Reply:
    return _reply(
        451,
        "4.7.4",
        f"No AUTH mechanism in common with the server (it offers {offered}; we know PLAIN, LOGIN, CRAM-MD5)",
        "AUTH",
    )


def auth_refused(server: Reply) -> Reply:
    """The server refused our login (`auth_soft_bounce`): transient, so that clients keep the mail
    while the relay's credentials are put right; the server's words are kept."""
    return _reply(
        454,
        "4.7.8",
        f"Authentication to the next hop failed; check the relay's credentials (the server said: {server.code} {server.message})",
        "AUTH",
    )


def cannot_start(command: Step, program: str, reason: str) -> Reply:
    return _reply(451, "4.3.5", f"Cannot run {program}: {reason}", command)


def tls_refused(detail: str) -> Reply:
    return _reply(451, "4.7.4", f"The server refused STARTTLS, which the configuration requires: {detail}", "STARTTLS")


def protocol_error(command: Command, detail: str) -> Reply:
    return _reply(451, "4.5.0", f"Unexpected reply from the server: {detail}", command)


def invalid_characters(command: Command) -> Reply:
    """A command argument with CR, LF or NUL: never sent (validated addresses have none)."""
    return _reply(501, "5.5.4", "Invalid characters in command arguments", command)


def eight_bit_refused() -> Reply:
    return _reply(554, "5.6.3", "The message has 8-bit data and the server does not support 8BITMIME", "MAIL")


def utf8_refused() -> Reply:
    return _reply(553, "5.6.7", "Non-ASCII address and the server does not support SMTPUTF8", "MAIL")


def size_exceeded(size: int, limit: int) -> Reply:
    """The server declared a SIZE limit (RFC 1870) the message is over: refused before MAIL, nothing uploaded."""
    return _reply(
        552, "5.3.4", f"Message size exceeds the server's limit ({size} bytes, the server takes {limit})", "MAIL"
    )


def too_many_waiting(target: str) -> Reply:
    return _reply(451, "4.4.5", f"Too many deliveries waiting for {target}; try again later", "[CONNECT]")


def rate_limited(rate: str, target: str, wait: float) -> Reply:
    """The relay's max_message_rate to `target` would have made this delivery wait past its bound: nothing sent."""
    return _reply(
        451, "4.4.5", f"rate limit {rate} to {target} reached (next slot in {wait:.1f} s); not sent", "[CONNECT]"
    )


def connection_rate_limited(rate: str, target: str, wait: float) -> Reply:
    """The relay's max_connection_rate to `target` would have made this delivery wait past its bound
    for a new connection (none idle to reuse): nothing sent."""
    return _reply(
        451,
        "4.4.5",
        f"connection rate limit {rate} to {target} reached (next slot in {wait:.1f} s); not sent",
        "[CONNECT]",
    )


def dns_failure(domain: str, reason: str) -> Reply:
    return _reply(451, "4.4.3", f"DNS lookup for {domain} failed: {reason}", "[DNS]")


def no_such_domain(domain: str) -> Reply:
    return _reply(550, "5.1.2", f"Domain {domain} does not exist", "[DNS]")


def no_mail_host(domain: str, ipv4_only: bool) -> Reply:
    address = "no IPv4 address (ipv4_only is set)" if ipv4_only else "no address"
    return _reply(550, "5.1.2", f"Domain {domain} has no MX and {address}", "[DNS]")


def null_mx(domain: str) -> Reply:
    return _reply(556, "5.1.10", f"Domain {domain} accepts no mail (null MX)", "[DNS]")


def private_destination(destination: str) -> Reply:
    """An `mx` destination that is loopback, private or otherwise not global, refused
    (the relay's `allow_internal_destinations` is off)."""
    return _reply(
        550,
        "5.7.1",
        f"Delivery to {destination} refused: an internal address (loopback, private, link-local or not global)",
        "[ROUTE]",
    )


def no_domain() -> Reply:
    return _reply(550, "5.1.3", "Recipient address has no domain", "[ROUTE]")


def http_answer(host: str, status: int, reason: str) -> Reply:
    """An HTTP next hop's answer that carried no reply of its own: 2xx is a delivery, 4xx a
    refusal, anything else (5xx, a redirect not followed) a transient failure."""
    if 200 <= status < 300:
        return _reply(250, "2.0.0", f"Accepted by {host} (HTTP {status})", "[HTTP]")
    text = f"{host} answered HTTP {status} {reason}"
    if 400 <= status < 500:
        return _reply(554, "5.0.0", text, "[HTTP]")
    return _reply(451, "4.0.0", text, "[HTTP]")


def program_delivered(command: Step, text: str) -> Reply:
    """A delivery command exited 0; `text` is what it printed, if anything."""
    return _reply(250, "2.0.0", text or "Delivered", command)


def program_failed(command: Step, text: str, *, transient: bool) -> Reply:
    """A delivery command failed; `text` is its own words, or how it ended."""
    if transient:
        return _reply(451, "4.3.0", text, command)
    return _reply(554, "5.3.0", text, command)


def argument_is_an_option(command: Step, argument: str) -> Reply:
    """A request's value would have become an option of a delivery command."""
    return _reply(
        553,
        "5.1.3",
        f'The argument {argument[:64]!r} would be read as an option; put "--" before the macros in the relay\'s args',
        command,
    )


def blackholed(queue_id: str) -> Reply:
    """The blackhole relay's answer: accepted and discarded, like a queue that says its id."""
    # No command, and none passed: its validator would run for nothing (blackhole is the fastest path).
    return Reply(code=250, enhanced_status="2.0.0", message=f"2.0.0 Message Delivered; {queue_id}")


def deadline_reached(seconds: float, *, maybe_delivered: bool) -> Reply:
    outcome = "the message may have been delivered" if maybe_delivered else "not delivered"
    return _reply(451, "4.4.7", f"Delivery deadline ({seconds:g} s) reached; {outcome}", "[DEADLINE]")


def shutdown_cut(*, maybe_delivered: bool) -> Reply:
    """The service's shutdown grace ran out while the delivery was running (DeliveryCore.cut_running)."""
    outcome = "the message may have been delivered" if maybe_delivered else "not delivered"
    return _reply(451, "4.4.7", f"The service shut down during the delivery; {outcome}", "[DEADLINE]")


def partial_delivery(results: Sequence[RecipientResult], first_failure: Reply) -> Reply:
    """A partial outcome answered as a transient failure of the whole envelope."""
    failed = sum(r.status != "delivered" for r in results)
    return Reply.parse(
        451,
        f"4.5.0 Partial delivery: {failed} of {len(results)} recipients failed "
        f"(first: {first_failure.code} {first_failure.message}); the envelope may be retried as a whole",
        first_failure.command,
    )
