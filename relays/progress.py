"""Which recipients may already have the message, for a delivery cut off by its deadline.

A relay marks recipients the moment the next hop could act on the message
(the last of the SMTP data written, a delivery agent's stdin closed, an HTTP
request sent). When the service cancels a delivery at its deadline, those
recipients are answered "possibly delivered" instead of a plain transient
failure, so a client can tell a safe retry from a possible duplicate.
"""

from collections.abc import Iterable
from contextvars import ContextVar

# A mutable set per delivery: tasks a relay starts copy the context, and share the set.
_in_doubt: ContextVar[set[str] | None] = ContextVar("mailrelay_in_doubt", default=None)


def track() -> set[str]:
    """Start tracking for the current delivery; returns the set the relay fills."""
    marked: set[str] = set()
    _in_doubt.set(marked)
    return marked


def may_have_delivered(recipients: Iterable[str]) -> None:
    """The next hop may now deliver to these recipients, whatever happens next."""
    marked = _in_doubt.get()
    if marked is not None:
        marked.update(recipients)
