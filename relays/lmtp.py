"""`lmtp`: the static relay speaking LMTP (RFC 2033): LHLO, and one reply per recipient after the data."""

from relays.static import StaticRelay


class LmtpRelay(StaticRelay):
    lmtp = True
