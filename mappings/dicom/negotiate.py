"""WADO-RS content negotiation (DICOM PS3.18 §8.7): the Accept header as an ordered list of wants (pure).

An Accept header names media types, each either single part (``image/jpeg``) or a multipart/related
payload (``multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50``), with optional
q-values (RFC 9110 §12.5.1).  :func:`parse_accept` turns it into :class:`Want` s, best first; the WADO-RS
handlers pick the first want they can produce for the resource (and answer 406 when there is none).
"""

from __future__ import annotations

from dataclasses import dataclass

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
OCTET = "application/octet-stream"
DICOM = "application/dicom"

#: PS3.18 Table 8.7.3-5: the transfer syntaxes of each frame / bulk pixel media type; the first is the
#: default when Accept names the media type without a transfer-syntax parameter
FRAME_MEDIA: dict[str, tuple[str, ...]] = {
    OCTET: (EXPLICIT_LE,),
    "image/jpeg": (
        JPEG_BASELINE,
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.14",
    ),
    "image/dicom-rle": (RLE,),
    "image/x-dicom-rle": (RLE,),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/x-jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": (J2K_LOSSLESS, "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
}


def frame_media_of(ts: str) -> str:
    """The media type that carries a frame stored in transfer syntax ``ts`` (octet-stream: uncompressed)."""
    for media, syntaxes in FRAME_MEDIA.items():
        if ts in syntaxes and not media.startswith("image/x-"):
            return media
    return OCTET


@dataclass(frozen=True, slots=True)
class Want:
    """One acceptable representation. ``media`` is the (part) media type, lower case, possibly a wildcard
    (``*/*``, ``image/*``); ``ts`` the transfer syntax asked for, ``*`` for "as stored", None when not
    given (the media type's default applies); ``multipart`` False for a single-part response."""

    media: str
    ts: str | None
    multipart: bool
    q: float = 1.0


class AcceptError(ValueError):
    pass


def _params(fields: list[str]) -> dict[str, str]:
    out = {}
    for f in fields:
        k, _, v = f.partition("=")
        if k.strip():
            out[k.strip().lower()] = v.strip().strip('"')
    return out


def parse_accept(header: str | None, default_part: str) -> list[Want]:
    """Wants in preference order (q descending, then header order), q=0 dropped.  No header, ``*/*``,
    ``multipart/*`` and ``multipart/related`` without ``type`` mean a multipart payload of ``default_part``."""
    if not header or not header.strip():
        return [Want(default_part, None, True)]
    wants: list[Want] = []
    for item in header.split(","):
        fields = [f.strip() for f in item.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        params = _params(fields[1:])
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            raise AcceptError(f"Accept: q-value {params.get('q')!r} is not a number") from None
        if q <= 0:
            continue
        ts = params.get("transfer-syntax") or None
        if media in ("*/*", "multipart/*"):
            wants.append(Want(default_part, ts, True, q))
        elif media == "multipart/related":
            part = (params.get("type") or default_part).lower()
            wants.append(Want(default_part if part in ("*/*", "application/*") else part, ts, True, q))
        else:
            wants.append(Want(media, ts, False, q))
    return sorted(wants, key=lambda w: -w.q)  # sorted() is stable: header order among equal q-values
