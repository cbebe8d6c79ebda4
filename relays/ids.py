"""Unique ids that are cheap to make: the per-request hot path cannot afford a urandom call each."""

import itertools
import secrets

# Unique, not secret: a random per-process prefix and a counter. Workers are fresh
# processes (not forks of one another), so each has its own prefix.
_PREFIX = secrets.token_hex(8)
_SEQUENCE = itertools.count(1)


def unique_hex() -> str:
    """32 hex digits, unique across processes and time (the shape of a uuid4's hex)."""
    return f"{_PREFIX}{next(_SEQUENCE):016x}"
