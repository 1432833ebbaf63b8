"""FHIR date/dateTime/instant values as closed instant ranges (FHIR R4 §3.1.1.4.3 "date").

A value with partial precision denotes the whole range it covers: ``2020`` is
[2020-01-01T00:00:00, 2020-12-31T23:59:59.999999].  Values without a time zone are taken as UTC
(documented in docs/fhir.md).  Ranges are epoch seconds (floats) so both engines compare numbers.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta, timezone

_EPS = 1e-6
_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class DateFormatError(ValueError):
    """The text is not a FHIR date, dateTime or instant."""


def parse_range(text: str) -> tuple[float, float]:
    """The [low, high] instant range (epoch seconds) a FHIR date/dateTime/instant covers."""
    m = _DATE_RE.match(text.strip())
    if not m:
        raise DateFormatError(f"{text!r} is not a FHIR date/dateTime (YYYY[-MM[-DD[Thh:mm[:ss[.f]][Z|±hh:mm]]]])")
    y = int(m["y"])
    try:
        if m["m"] is None:
            lo = datetime(y, 1, 1, tzinfo=UTC)
            hi = datetime(y + 1, 1, 1, tzinfo=UTC)
        elif m["d"] is None:
            mo = int(m["m"])
            lo = datetime(y, mo, 1, tzinfo=UTC)
            hi = lo + timedelta(days=calendar.monthrange(y, mo)[1])
        elif m["H"] is None:
            lo = datetime(y, int(m["m"]), int(m["d"]), tzinfo=UTC)
            hi = lo + timedelta(days=1)
        else:
            tz = UTC
            if m["tz"] and m["tz"] != "Z":
                sign = 1 if m["tz"][0] == "+" else -1
                hh, mm = m["tz"][1:].split(":")
                tz = timezone(sign * timedelta(hours=int(hh), minutes=int(mm)))
            sec = int(m["S"] or 0)
            frac = m["f"]
            micro = int((frac[1:] + "000000")[:6]) if frac else 0
            lo = datetime(y, int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"]), sec, micro, tzinfo=tz)
            if frac:
                hi = lo + timedelta(microseconds=1)
            elif m["S"] is not None:
                hi = lo + timedelta(seconds=1)
            else:
                hi = lo + timedelta(minutes=1)
    except ValueError as exc:
        raise DateFormatError(f"{text!r}: {exc}") from None
    return lo.timestamp(), hi.timestamp() - _EPS


def to_instant(text: str) -> float:
    return parse_range(text)[0]


def now_instant() -> tuple[str, float]:
    """The current time as a FHIR instant string (UTC, microseconds) and epoch seconds."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", now.timestamp()


def date_part(text: str | None) -> str | None:
    """``YYYY-MM-DD`` (or shorter if the source is partial) of a FHIR date/dateTime."""
    if not text:
        return None
    return text[:10]
