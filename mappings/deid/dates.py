"""Date shifting and age aggregation shared by the FHIR and DICOM de-identifiers (pure; issue #24).

Dates move by whole days (the patient's offset, :meth:`ProjectKeys.date_offset_days`), so times of day,
weekdays modulo 7 aside, and every interval between two events of one patient are kept.  Ages over 89 are
aggregated as the HIPAA Privacy Rule's Safe Harbor method asks (45 CFR §164.514(b)(2)(i)(C)): "90 or older".
"""

from __future__ import annotations

import re
from datetime import date, timedelta

#: Ages strictly above this are aggregated (Safe Harbor: "all ages over 89").
MAX_AGE = 89

_FHIR_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2})(T.*)?)?$")
_DICOM_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DICOM_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(.*)$")


def shift_fhir_date(text: str, days: int) -> str | None:
    """A FHIR date/dateTime/instant moved by ``days``: ``YYYY-MM-DD[Thh:mm...]`` keeps its time and zone;
    ``YYYY-MM`` moves the first of the month and keeps month precision; ``YYYY`` (year precision) is kept
    as it is.  None when ``text`` is not such a value."""
    if re.fullmatch(r"\d{4}", text):
        return text
    m = _FHIR_DATE.match(text)
    if not m:
        return None
    try:
        if m[3] is None:
            d = date(int(m[1]), int(m[2]), 1) + timedelta(days=days)
            return f"{d.year:04d}-{d.month:02d}"
        d = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return d.isoformat() + (m[4] or "")


def shift_dicom_date(text: str, days: int) -> str | None:
    """A DICOM DA value (``YYYYMMDD``, PS3.5 §6.2) moved by ``days``; None when it is not one."""
    m = _DICOM_DA.match(text.strip())
    if not m:
        return None
    try:
        d = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return d.strftime("%Y%m%d")


def shift_dicom_datetime(text: str, days: int) -> str | None:
    """A DICOM DT value (``YYYYMMDD[HH[MM[SS[.F]]]][&ZZXX]``) with its date part moved by ``days`` (time and
    offset kept); DT values of year or month precision lose their precision beyond the year (kept: year)."""
    t = text.strip()
    m = _DICOM_DT.match(t)
    if not m:
        return t[:4] if re.fullmatch(r"\d{4}(\d{2})?", t) else None
    d = shift_dicom_date(m[1] + m[2] + m[3], days)
    return None if d is None else d + m[4]


def age_years(born: date, on: date) -> int:
    """Completed years between ``born`` and ``on``."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def safe_harbor_birth_year(born: date, as_of: date) -> tuple[str, bool]:
    """The birth *year* to release for a (shifted) birth date and whether it was aggregated: a patient who
    would be over 89 on ``as_of`` gets the year that makes them exactly 90 (the "90 or older" bucket), so
    no year indicative of an age over 89 is released."""
    if age_years(born, as_of) > MAX_AGE:
        return f"{as_of.year - (MAX_AGE + 1):04d}", True
    return f"{born.year:04d}", False


def safe_harbor_dicom_age(text: str) -> str:
    """A DICOM AS value (``nnnD|W|M|Y``) with ages over 89 years aggregated to ``090Y``."""
    t = text.strip()
    if re.fullmatch(r"\d{3}Y", t) and int(t[:3]) > MAX_AGE:
        return "090Y"
    return t


__all__ = [
    "MAX_AGE",
    "age_years",
    "safe_harbor_birth_year",
    "safe_harbor_dicom_age",
    "shift_dicom_date",
    "shift_dicom_datetime",
    "shift_fhir_date",
]
