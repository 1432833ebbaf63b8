"""DICOM de-identification per PS3.15 Annex E (pure; issue #24).

The Basic Application Level Confidentiality Profile (PS3.15 §E.2) applied from
:data:`mappings.deid.table_e11.TABLE_E1_1` (Table E.1-1, edition :data:`EDITION`), with the options
(PS3.15 §E.3) Retain Longitudinal Temporal Information with Modified Dates, Retain Patient
Characteristics, Retain Device Identity, Clean Descriptors and Clean Structured Content, and a Retain Safe
Private list (§E.3.10).  The action codes (PS3.15 §E.1.1, Table E.1-1a) are applied as follows:

* **X** remove; **Z** zero-length value (an empty sequence for SQ); **K** keep (sequences are cleaned
  item by item); **U** the project's UID for the source UID (:meth:`ProjectKeys.uid_for`: deterministic
  per project, so references between instances — ReferencedSOPSequence, SourceImageSequence,
  ReferencedSeriesSequence, FrameOfReferenceUID, ... — keep resolving);
* **D** a dummy consistent with the VR: a keyed pseudonym of the value for PN/LO/SH/AE/CS (so e.g. the
  PatientID becomes the project's pseudonym of the patient, the one the FHIR export uses as Patient.id),
  ``19000101``/``000000``/``19000101000000`` for DA/TM/DT, ``0`` for numbers, ``ANONYMIZED`` for texts;
  an SQ is cleaned item by item;
* **C** clean: dates move by the patient's offset (:meth:`ProjectKeys.date_offset_days`, whole days, so
  TM values are kept); texts lose every identifying value found in the dataset (names, IDs, dates of
  birth, addresses, ...) and every run of five or more digits; sequences are cleaned item by item; binary
  values (OB, UN, ...: maker notes, certified timestamps) cannot be cleaned and are removed;
* compound codes keep the element whenever the profile allows it, since the IOD type of the element is
  not known here: X/D, X/Z/D and Z/D → D; X/Z → Z; X/Z/U* → the sequence is cleaned (its UIDs replaced).

Attributes not in the table are kept (PS3.15 §E.2: the table lists every standard attribute that may
identify), and their sequences cleaned; private attributes are removed unless on :data:`SAFE_PRIVATE`
(PS3.15 Table E.3.10-1 examples), curves and overlays (groups 50xx, 60xx) removed (Clean Graphics is not
offered).  Text Value (0040,A160) of SR content items is cleaned, and a person name the table does not
list (SecondaryReviewerName, EvaluatorName) gets a dummy.  The dataset then gets
PatientIdentityRemoved ``YES``, DeidentificationMethod naming the edition and options,
DeidentificationMethodCodeSequence (CID 7050) and LongitudinalTemporalInformationModified.

Burned-in annotation (PS3.15 §E.3.1 Clean Pixel Data is not offered): an instance is withheld when its
BurnedInAnnotation is ``YES``, or when it is of a SOP class that typically carries text in its pixels
(Secondary Capture, Ultrasound, encapsulated documents; :data:`BURNED_IN_SOP_CLASSES`) unless it says
``NO`` explicitly.  Pixel data is never changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom.datadict import DicomDictionary  # type: ignore[attr-defined]
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from mappings.deid.dates import safe_harbor_dicom_age, shift_dicom_date, shift_dicom_datetime
from mappings.deid.keys import ProjectKeys
from mappings.deid.table_e11 import EDITION, TABLE_E1_1

#: Retain Safe Private (PS3.15 §E.3.10, Table E.3.10-1 examples): (private creator, element byte) pairs kept.
SAFE_PRIVATE: frozenset[tuple[str, int, int]] = frozenset(
    {
        ("GEMS_PARM_01", 0x0043, 0x27),  # Scan pitch ratio
        ("GEMS_ACQU_01", 0x0019, 0x9E),  # Internal pulse sequence name
        ("Philips MR Imaging DD 001", 0x2005, 0x0E),  # Scale Slope
        ("Philips MR Imaging DD 001", 0x2005, 0x0D),  # Scale Intercept
        ("SIEMENS MR HEADER", 0x0019, 0x0C),  # B value
    }
)
#: SOP classes withheld unless BurnedInAnnotation is explicitly NO (text is commonly burned into them).
BURNED_IN_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA
    }
)
_OPTION_CODES = {
    "long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "device_identity": ("113109", "Retain Device Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
}
_TEXT_VALUE = 0x0040A160
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
#: standard attributes by VR (pydicom's data dictionary): sequences are walked, person names collected
_SQ_TAGS = frozenset(t for t, entry in DicomDictionary.items() if entry[0] == "SQ")
_PN_TAGS = frozenset(t for t, entry in DicomDictionary.items() if entry[0] == "PN")
#: table rows whose values identify (removed or replaced, no option keeps them), of text VRs
_IDENTIFYING_TAGS = frozenset(
    t
    for t, (_n, basic, opts) in TABLE_E1_1.items()
    if basic != "U" and not opts and DicomDictionary.get(t, ("",))[0] in ("LO", "SH", "ST", "LT", "DA", "UC", "CS")
)
_PATIENT_ID = 0x00100020
_DIGIT_RUN = re.compile(r"\d{5,}")
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT", "UR", "UI"}
)


@dataclass(frozen=True)
class DeidOptions:
    """Which PS3.15 §E.3 options apply (Basic Profile always does)."""

    long_modified_dates: bool = True
    patient_characteristics: bool = False
    device_identity: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = True
    safe_private: frozenset[tuple[str, int, int]] = field(default=SAFE_PRIVATE)

    def enabled(self) -> tuple[str, ...]:
        return tuple(k for k in _OPTION_CODES if getattr(self, k))


@dataclass(frozen=True)
class Withheld:
    """An instance that must not be released, and why (counted by the caller, never logged with PHI)."""

    reason: str


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in annotation (see the module docstring), or None."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation YES"
    if str(ds.get("SOPClassUID", "")) in BURNED_IN_SOP_CLASSES and flag != "NO":
        return "SOP class may carry burned-in text"
    return None


def action_for(tag: int, options: DeidOptions) -> str | None:
    """The effective action code for a standard attribute, options applied; None when not in the table."""
    row = TABLE_E1_1.get(tag)
    if row is None:
        return None
    _name, basic, opts = row
    for opt, code in opts.items():
        if getattr(options, opt, False) is True:
            return code
    return basic


def _resolve(code: str) -> str:
    if code in ("K", "C", "U", "D", "Z", "X"):
        return code
    if code == "X/Z/U*":
        return "U*"
    if "D" in code:
        return "D"
    return "Z"


@lru_cache(maxsize=32)
def _actions(options: DeidOptions) -> dict[int, str]:
    """Every Table E.1-1 tag's resolved action under ``options`` (:func:`action_for`, then :func:`_resolve`)."""
    return {tag: _resolve(code) for tag in TABLE_E1_1 if (code := action_for(tag, options)) is not None}


@lru_cache(maxsize=32)
def _safe_private_groups(safe_private: frozenset[tuple[str, int, int]]) -> frozenset[int]:
    return frozenset(group for _creator, group, _element in safe_private)


class _Deidentifier:
    def __init__(self, keys: ProjectKeys, options: DeidOptions, patient_key: str, offset: int, phi: list[str]):
        self.keys = keys
        self.options = options
        self.patient_key = patient_key
        self.offset = offset
        self.phi_re = (
            re.compile("|".join(re.escape(p) for p in sorted(set(phi), key=len, reverse=True)), re.I) if phi else None
        )
        self.kept_private = False
        self.actions = _actions(options)
        self.safe_groups = _safe_private_groups(options.safe_private)

    def clean_text(self, text: str) -> str:
        if self.phi_re is not None:
            text = self.phi_re.sub("", text)
        return _DIGIT_RUN.sub("", text).strip()

    def dummy(self, elem: Any) -> object:
        vr, value = elem.VR, elem.value
        if elem.tag == _PATIENT_ID:
            return self.keys.pseudonym("Patient", self.patient_key)
        if vr == "DA":
            return "19000101"
        if vr == "TM":
            return "000000"
        if vr == "DT":
            return "19000101000000"
        if vr in ("PN", "LO", "UC"):
            return self.keys.pseudonym(f"dcm:{elem.tag:08X}", str(value))
        if vr in ("SH", "AE", "CS"):
            return self.keys.short_pseudonym(f"dcm:{elem.tag:08X}", str(value)).upper()
        if vr in ("IS", "DS"):
            return "0"
        if vr == "AS":
            return "000Y"
        if vr == "UI":
            return self.keys.uid_for(str(value))
        if vr in ("LT", "ST", "UT", "UR"):
            return "ANONYMIZED"
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
            return 0
        return None

    def clean(self, elem: Any) -> object:
        vr, value = elem.VR, elem.value
        if value is None or value == "":
            return value
        if vr == "DA":
            return _multi(value, lambda v: shift_dicom_date(v, self.offset) or "")
        if vr == "DT":
            return _multi(value, lambda v: shift_dicom_datetime(v, self.offset) or "")
        if vr == "TM":
            return value
        if vr == "AS":
            return safe_harbor_dicom_age(str(value))
        if vr == "PN":
            return self.dummy(elem)
        if vr in _STRING_VRS:
            return _multi(value, lambda v: self.clean_text(str(v)))
        return value

    def uid(self, value: Any) -> Any:
        return _multi(value, lambda v: self.keys.uid_for(str(v)) if str(v).strip() else v)

    def dataset(self, ds: Dataset) -> None:
        # by tag first: an element is decoded (pydicom converts raw elements on access) only when its
        # action needs its value
        creators: dict[tuple[int, int], str] = {}
        actions = self.actions
        safe_groups = self.safe_groups
        for tag in list(ds.keys()):
            group, element = tag >> 16, tag & 0xFFFF
            if group == 0x0002:
                continue
            if group % 2 == 1:
                if 0x10 <= element <= 0xFF:
                    # a block's creator is read only where the safe-private list names its group
                    creators[(group, element)] = str(ds[tag].value) if group in safe_groups else ""
                    continue
                creator = creators.get((group, element >> 8))
                if creator is None or (creator, group, element & 0xFF) not in self.options.safe_private:
                    del ds[tag]
                else:
                    self.kept_private = True
                continue
            if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
                del ds[tag]
                continue
            act = actions.get(tag)
            if act is None:
                if tag in _SQ_TAGS:
                    self.sequence(ds[tag].value)
                elif tag == _TEXT_VALUE:
                    elem = ds[tag]
                    elem.value = self.clean(elem)
                elif tag in _PN_TAGS:  # a person name the table does not list (e.g. DICONDE reviewers): D
                    elem = ds[tag]
                    if elem.value not in (None, ""):
                        elem.value = self.dummy(elem)
                continue
            if act == "X":
                del ds[tag]
                continue
            elem = ds[tag]
            if act == "Z":
                elem.value = (
                    Sequence()
                    if elem.VR == "SQ"
                    else ("" if elem.VR in _STRING_VRS else (b"" if elem.VR in ("OB", "OW", "UN") else None))
                )
            elif elem.VR == "SQ":
                self.sequence(elem.value)
            elif act == "K":
                if elem.VR == "AS":
                    elem.value = safe_harbor_dicom_age(str(elem.value or ""))
            elif act in ("U", "U*"):
                if elem.VR == "UI":
                    elem.value = self.uid(elem.value)
                else:
                    elem.value = self.dummy(elem)
            elif act == "D":
                if elem.VR == "UI":
                    elem.value = self.uid(elem.value)
                elif elem.value not in (None, "", b""):
                    elem.value = self.dummy(elem)
                else:
                    elem.value = self.dummy(elem) if elem.tag == _PATIENT_ID else elem.value
            elif act == "C":
                if elem.VR in _BINARY_VRS:
                    del ds[tag]  # binary values (maker notes, timestamps) cannot be cleaned: removed
                else:
                    elem.value = self.clean(elem)
        # private creators with no element left go too
        if creators:
            left = {(t.group, t.element >> 8) for t in ds.keys() if t.group % 2 == 1 and t.element > 0xFF}
            for block in creators:
                if block not in left:
                    del ds[Tag(*block)]

    def sequence(self, seq: Any) -> None:
        for item in seq or ():
            self.dataset(item)


def _multi(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [fn(v) for v in value]
    return fn(value)


def _identifying_values(ds: Dataset) -> list[str]:
    """Strings in ``ds`` that identify the patient or staff, to be cleaned out of free texts: every person
    name's components and the values of the table's identifying attributes (no option keeps them)."""
    out: list[str] = []

    def visit(d: Dataset) -> None:
        for tag in d.keys():
            if tag in _SQ_TAGS:
                for item in d[tag].value or ():
                    visit(item)
            elif tag in _PN_TAGS:
                for part in re.split(r"[\^=]", str(d[tag].value or "")):
                    if len(part.strip()) >= 2:
                        out.append(part.strip())
            elif tag in _IDENTIFYING_TAGS:
                v = str(d[tag].value or "").strip()
                if len(v) >= 3:
                    out.append(v)

    visit(ds)
    return out


def deidentify_dataset(
    ds: Dataset, keys: ProjectKeys, options: DeidOptions | None = None, *, patient_key: str | None = None
) -> Dataset | Withheld:
    """``ds`` de-identified in place for ``keys``' project (and returned), or :class:`Withheld`.

    ``patient_key`` is the common-model patient id of the instance (the FHIR Patient id the gateway linked
    it to): it picks the date offset and the PatientID pseudonym, so both match the FHIR export; without it
    the dataset's own PatientID is used."""
    options = options or DeidOptions()
    reason = burned_in_reason(ds)
    if reason is not None:
        return Withheld(reason)
    key = patient_key or str(ds.get("PatientID", "") or "")
    offset = keys.date_offset_days(key)
    worker = _Deidentifier(keys, options, key, offset, _identifying_values(ds))
    if "PatientID" not in ds:
        ds.PatientID = ""
    worker.dataset(ds)
    enabled = options.enabled()
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.long_modified_dates else "REMOVED"
    names = ["Basic Application Confidentiality Profile"] + [_OPTION_CODES[o][1] for o in enabled]
    if worker.kept_private:
        names.append("Retain Safe Private Option")
    ds.DeidentificationMethod = f"fedgate; DICOM PS3.15 {EDITION} Table E.1-1"[:64]
    seq = []
    for code, meaning in (
        [("113100", "Basic Application Confidentiality Profile")]
        + [_OPTION_CODES[o] for o in enabled]
        + ([("113111", "Retain Safe Private Option")] if worker.kept_private else [])
    ):
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(seq)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


__all__ = [
    "BURNED_IN_SOP_CLASSES",
    "DeidOptions",
    "EDITION",
    "SAFE_PRIVATE",
    "Withheld",
    "action_for",
    "burned_in_reason",
    "deidentify_dataset",
]
