"""TLS session resumption to the next hop: a client context that offers the last session of each
destination, so that a new connection to a server seen before skips the certificate exchange
and the key agreement's public-key work (measured in bench/tls.py).

asyncio's `loop.start_tls` and `create_connection(ssl=...)` (aiosmtplib's STARTTLS and implicit
TLS), on asyncio's loop and on uvloop, make the connection's SSLObject through
`SSLContext.wrap_bio()` and start the handshake at once, with no way to pass `session=`. So
`ResumingContext` overrides `wrap_bio` (documented as returning `sslobject_class`, with `session=`
a public parameter) and fills `session=` from its cache, for the destination that the calling
task named with `resuming_for()`: a context variable, which asyncio copies into the callback
that runs `wrap_bio`. A handshake made outside `resuming_for()` (the MTA-STS policy fetch, which
shares the verified context) is neither offered nor recorded.

What a resumed session may be used for:

- one cache per context, and a context is one trust policy (verification mode, CA file, client
  certificate, ciphers): resumption skips the certificate check, so a session from the
  opportunistic context (nothing verified) must never serve a verified connection. Python
  enforces it too: `SSLObject.session` refuses a session of another context;
- keyed by address, port and server name, and offered only under the name (SNI, and the name
  verified) it was made with;
- a DANE context does not resume at all (relays/smtp/session.py `with_dane` builds a plain
  context): the TLSA check reads the chain the server sends, which a resumed handshake has not;
- only the session of a full handshake is kept, and offered to every new connection until
  `MAX_AGE` seconds after that handshake (so the certificate is checked again at least that
  often) or the server's own lifetime for it (`SSLSession.timeout`), whichever comes first.
  Tickets that resumed connections bring are not read (reading one costs about what resumption
  saves: `remember`). A TLS 1.3 ticket may serve several connections: RFC 8446 (C.4) advises
  single use against the linking of a client's connections by an observer, which an MTA's own
  address allows anyway; a server that takes each ticket once answers the second with a full
  handshake, whose session is then kept;
- at most `CACHE_SIZE` destinations per context, the least recently stored dropped first; an
  expired session is dropped when it would be offered, or when a newer one is stored and it is
  the oldest.
"""

import contextvars
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: Most destinations whose session one context keeps (a session holds the server's certificate
#: and a ticket: a few KiB each).
CACHE_SIZE = 1000
#: Most seconds a session is resumed after the full handshake that checked the server
#: (Postfix's smtp_tls_session_cache_timeout default).
MAX_AGE = 3600.0

#: (address, port, name): the destination whose handshake the current task is about to start.
_destination: contextvars.ContextVar[tuple[str, int, str] | None] = contextvars.ContextVar(
    "mailrelay_tls_destination", default=None
)


@dataclass(slots=True)
class _Entry:
    session: ssl.SSLSession
    server_hostname: str | None  # the name it was made for (SNI, and the name verified): only for that
    expires: float  # time.time() after which it is not offered


class ResumingContext(ssl.SSLContext):
    """A client context that resumes each destination's last TLS session (module docstring)."""

    # The cache's attributes are set by `default()`; SSLContext's __new__ takes the protocol only.
    _sessions: "OrderedDict[tuple[str, int, str], _Entry]"

    @classmethod
    def default(cls) -> "ResumingContext":
        """What `ssl.create_default_context(Purpose.SERVER_AUTH)` makes, as this class."""
        reference = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context = cls(ssl.PROTOCOL_TLS_CLIENT)
        context.options = reference.options
        context.verify_flags = reference.verify_flags  # Python 3.13 added flags there
        context.keylog_filename = reference.keylog_filename  # SSLKEYLOGFILE
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context._sessions = OrderedDict()
        return context

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        key = _destination.get()
        if session is None and key is not None and not server_side:
            session = self._usable(key, server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def _usable(self, key: tuple[str, int, str], server_hostname: str | bytes | None) -> ssl.SSLSession | None:
        entry = self._sessions.get(key)
        if entry is None or entry.server_hostname != server_hostname:
            return None
        if time.time() >= entry.expires:
            del self._sessions[key]
            return None
        return entry.session

    def remember(self, key: tuple[str, int, str], tls: ssl.SSLObject) -> bool:
        """Keep the session of `tls`, a connection to `key` that made a full handshake; whether it
        could be kept (a TLS 1.3 server sends its ticket after the handshake: not yet, maybe).

        Reading a connection's session copies it, certificate and all (CPython's `_ssl_session_dup`:
        0.2 to 0.5 ms measured, more than a resumption saves the client), so it is read after a full
        handshake only: a resumed connection leaves the kept session in place, offered again
        until it expires."""
        session = tls.session
        if session is None or not (session.has_ticket or (tls.version() != "TLSv1.3" and session.id)):
            return False
        made = float(session.time)
        self._sessions[key] = _Entry(session, tls.server_hostname, min(made + MAX_AGE, made + session.timeout))
        self._sessions.move_to_end(key)
        # Oldest first: drop the expired ones there (most expire in the order they were made),
        # then any beyond the bound.
        now = time.time()
        while self._sessions and (
            len(self._sessions) > CACHE_SIZE or next(iter(self._sessions.values())).expires <= now
        ):
            self._sessions.popitem(last=False)
        return True

    def forget(self, key: tuple[str, int, str]) -> None:
        """Drop `key`'s session (its handshake failed: the next one starts afresh)."""
        self._sessions.pop(key, None)


@contextmanager
def resuming_for(address: str, port: int, name: str) -> Iterator[None]:
    """Handshakes started by this task inside the block are for (address, port, name)."""
    token = _destination.set((address, port, name))
    try:
        yield
    finally:
        _destination.reset(token)
