"""Rates in KumoMTA's notation (`"50/s"`, `"1000/h"`, `"10/m"`, `"20000/d"`): parsed here, where the
configuration is validated; the limiter itself is relays/rates.py."""

import re
from typing import Annotated, NamedTuple

from pydantic import AfterValidator

#: The period words KumoMTA accepts, in seconds.
_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE = re.compile(r"^\s*([0-9]{1,12})\s*/\s*([a-z]+)\s*$")


class Rate(NamedTuple):
    """`limit` events per `period` seconds."""

    limit: int
    period: int

    @property
    def interval(self) -> float:
        """Seconds between two events at this rate (GCRA's emission interval)."""
        return self.period / self.limit

    def divided(self, instances: int) -> "Rate":
        """This rate shared by `instances` processes: each one's part, rounded up (never 0)."""
        return Rate(-(-self.limit // instances), self.period)

    def __str__(self) -> str:
        unit = {1: "s", 60: "m", 3600: "h", 86400: "d"}[self.period]
        return f"{self.limit}/{unit}"


def parse_rate(text: str) -> Rate:
    """`"50/s"` -> Rate(50, 1); ValueError says what is wrong."""
    match = _RATE.match(text.lower())
    if match is None:
        raise ValueError(f"a rate is `<count>/<period>` such as 50/s, 10/m, 1000/h, 20000/d, not {text!r}")
    count, unit = int(match[1]), match[2]
    if unit not in _PERIODS:
        raise ValueError(f"unknown period {unit!r} in {text!r}: use s, m, h or d")
    if count < 1:
        raise ValueError(f"a rate needs a count of at least 1, not {text!r}")
    return Rate(count, _PERIODS[unit])


def _checked(text: str) -> str:
    return str(parse_rate(text))


#: A rate in the configuration: checked when loaded, kept in its normal spelling (`50/s`).
RateSpec = Annotated[str, AfterValidator(_checked)]
