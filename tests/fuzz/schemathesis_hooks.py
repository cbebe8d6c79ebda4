"""Loaded by schemathesis (SCHEMATHESIS_HOOKS): how to send a generated message/rfc822 or NDJSON body,
and how to read an NDJSON answer."""

import json
from typing import Any

import schemathesis


@schemathesis.serializer("message/rfc822")
def _rfc822(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A batch of one: the generated delivery as its only line."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


@schemathesis.deserializer("application/x-ndjson")
def _ndjson_answer(ctx: schemathesis.DeserializationContext, response: Any) -> Any:
    """The batch's first answer line, the one the schema describes (the last is the `done` line)."""
    lines = [line for line in response.content.splitlines() if line.strip()]
    return json.loads(lines[0]) if lines else None
