"""Loaded by schemathesis (SCHEMATHESIS_HOOKS): how to send a generated message/rfc822 body."""

from typing import Any

import schemathesis


@schemathesis.serializer("message/rfc822")
def _rfc822(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")
