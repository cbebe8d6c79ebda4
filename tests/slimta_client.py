"""python-slimta's `HttpRelay` as a client of mailrelay: one `relay.attempt()` per case.

Runs in slimta's own virtual environment (gevent), never in the project's:
    .venv-slimta/bin/python -W ignore tests/slimta_client.py URL CASES_JSON SECONDS
CASES_JSON is a list of {"case": name, "path": "/relays/x/deliver", "recipients": [...]}.
Prints one JSON line per case: what `relay.attempt()` returned or raised, or "no answer"
when it had not come back within SECONDS (slimta's client greenlet died: the attempt would
wait for ever).
"""

import json
import sys

import gevent  # type: ignore[import-not-found,import-untyped,unused-ignore]
from slimta.envelope import Envelope  # type: ignore[import-not-found,import-untyped,unused-ignore]
from slimta.relay import PermanentRelayError, RelayError, TransientRelayError  # type: ignore[import-not-found,import-untyped,unused-ignore]
from slimta.relay.http import HttpRelay  # type: ignore[import-not-found,import-untyped,unused-ignore]

MESSAGE = b"From: alice@example.com\r\nSubject: slimta\r\nMessage-Id: <slimta@example.com>\r\n\r\nHello\r\n"


def reply_fields(reply: object) -> dict[str, object]:
    if reply is None:
        return {"code": None, "message": None}
    return {"code": reply.code, "message": reply.message}  # type: ignore[attr-defined]


def attempt(url: str, case: dict[str, object], seconds: float) -> dict[str, object]:
    relay = HttpRelay(url + str(case["path"]), ehlo_as="slimta.example.com", timeout=seconds)
    envelope = Envelope("alice@example.com", list(case["recipients"]))  # type: ignore[call-overload]
    envelope.parse(MESSAGE)
    out: dict[str, object] = {"case": case["case"]}
    try:
        with gevent.Timeout(seconds):
            returned = relay.attempt(envelope, 0)
    except gevent.Timeout:
        out["outcome"] = "no answer"
    except RelayError as exc:
        out.update(
            outcome="raised",
            type=type(exc).__name__,
            permanent=isinstance(exc, PermanentRelayError),
            transient=isinstance(exc, TransientRelayError),
            **reply_fields(exc.reply),
        )
    else:
        out.update(outcome="returned", **reply_fields(returned))
    finally:
        relay.kill()
    return out


def main() -> None:
    url, cases, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    for case in cases:
        print(json.dumps(attempt(url, case, seconds)), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
