"""Per-project de-identification keys: pseudonyms, UIDs and date offsets (pure; issue #24).

Everything a de-identified export derives from an identifier is a keyed hash (HMAC-SHA-256, RFC 2104) of
the project's secret over ``project``, a *kind* and the value, so that

* the same source value gives the same output within one project (a study exported twice lines up, a
  patient's FHIR resources, DICOM instances and OMOP rows keep the same pseudonym and date offset);
* outputs of two projects are unrelated (different secret or project name);
* nothing can be inverted or guessed without the secret (it never leaves the site's settings).

The secret is the site's ``deid_secret`` (env ``FEDGATE_DEID_SECRET``); :class:`ProjectKeys` hides it from
``repr`` so it cannot reach a log line by accident.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

#: Date offsets lie in [-MAX_OFFSET_DAYS, -1]: dates move back by up to one year, never zero days.
MAX_OFFSET_DAYS = 365
_MEMO_MAX = 65536


@dataclass(frozen=True)
class ProjectKeys:
    """The key material of one research project (who receives the de-identified copy).

    ``project`` names the project (it is mixed into every hash, and may appear in exports as the pseudonym
    namespace); ``secret`` is the site's de-identification secret and never appears anywhere.
    """

    project: str
    secret: bytes = field(repr=False)

    #: the keyed HMAC state after ``project ␀`` (copied per digest) and a bounded memo of digests
    _mac: Any = field(init=False, repr=False, compare=False, default=None)
    _memo: dict[tuple[str, str], bytes] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project:
            raise ValueError("ProjectKeys.project must be a non-empty string")
        if not isinstance(self.secret, (bytes, bytearray)) or len(self.secret) < 16:
            raise ValueError("ProjectKeys.secret must be at least 16 bytes")
        object.__setattr__(self, "_mac", hmac.new(bytes(self.secret), self.project.encode() + b"\x00", hashlib.sha256))
        object.__setattr__(self, "_memo", {})

    def __reduce__(self) -> tuple[type[ProjectKeys], tuple[str, bytes]]:
        # pickled (to a worker process) as its two fields; the HMAC state and memo are rebuilt there
        return (ProjectKeys, (self.project, self.secret))

    def digest(self, kind: str, value: str) -> bytes:
        """HMAC-SHA-256(secret, project ␀ kind ␀ value): the root of every derived value."""
        key = (kind, value)
        out = self._memo.get(key)
        if out is None:
            mac = self._mac.copy()
            mac.update(kind.encode() + b"\x00" + str(value).encode())
            out = bytes(mac.digest())
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = out
        return out

    def pseudonym(self, kind: str, value: str) -> str:
        """A 32-hex-digit pseudonym of ``value`` in namespace ``kind`` (e.g. ``Patient`` and a resource id,
        ``identifier`` and ``system|value``); valid as a FHIR id and as a DICOM LO/SH value (≤ 64 / 16
        characters: use :meth:`short_pseudonym` for SH)."""
        return self.digest(kind, value)[:16].hex()

    def short_pseudonym(self, kind: str, value: str) -> str:
        """A 16-character pseudonym for DICOM SH elements (AccessionNumber, StudyID, ...)."""
        return self.digest(kind, value)[:8].hex()

    def uid_for(self, source_uid: str) -> str:
        """The project's replacement for a DICOM UID: ``2.25.<int>`` (PS3.5 §B.2, a UUID-derived UID) whose
        128-bit integer is a UUID version 8 (RFC 9562 §5.8) built from the keyed hash of ``source_uid``.
        At most 44 characters; the same source UID always maps to the same new UID within a project."""
        b = bytearray(self.digest("uid", source_uid.strip().rstrip("\x00"))[:16])
        b[6] = (b[6] & 0x0F) | 0x80  # version 8
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 9562 variant
        return "2.25." + str(int.from_bytes(b, "big"))

    def date_offset_days(self, patient_key: str) -> int:
        """The patient's date offset in days, in [-MAX_OFFSET_DAYS, -1]: the same for every FHIR resource,
        DICOM instance and OMOP row of the patient (``patient_key`` is the common-model patient id, i.e.
        the FHIR Patient id), so intervals between events are kept."""
        n = int.from_bytes(self.digest("date-offset", patient_key)[:8], "big")
        return -(1 + n % MAX_OFFSET_DAYS)


__all__ = ["MAX_OFFSET_DAYS", "ProjectKeys"]
