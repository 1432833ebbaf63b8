"""De-identification of FHIR R4 resources for research exports (pure; issue #24).

Follows the HIPAA Privacy Rule's Safe Harbor list (45 CFR §164.514(b)(2)) for what is removed, with the
dates *shifted* per patient (as RSNA CTP and Google Cloud Healthcare's ``DateShiftConfig`` do) instead of
truncated to the year, so that timelines stay intact.  :func:`deidentify_resource` walks the whole resource
(``contained`` resources included) and

* removes names (every HumanName: a ``name`` whose value has ``family``/``given``/``text``), ``telecom``,
  ``photo``, narrative (``text.div``), ``note``, free-text strings (:data:`FREE_TEXT_KEYS`), the ``text``
  of a CodeableConcept without ``coding`` (an emptied element gets the ``data-absent-reason`` extension
  ``masked``), ``display`` of References, attachment ``data``/``url``/``title``, ``meta.source``;
* keeps of an ``address`` only ``use``, ``type``, ``state`` and ``country`` (Safe Harbor: no geographic
  subdivision smaller than a state, postal codes included);
* replaces every ``identifier`` by ``{"system": "urn:fedgate:pseudonym:<project>", "value": <pseudonym of
  system|value>}`` (so an identifier reference still matches the pseudonymous Patient), resource ids by
  ``pseudonym(<type>, <id>)`` and literal references ``Type/id`` by ``Type/<pseudonym>`` (absolute ones
  lose their base; ``#contained`` stay; ``urn:uuid:`` are remapped the same way);
* shifts every date/dateTime/instant with at least month precision by the patient's offset
  (:meth:`ProjectKeys.date_offset_days` of the patient's FHIR id: the offset DICOM and OMOP exports use);
* releases of ``Patient.birthDate`` only the (shifted) year, aggregated to "90 or older" (the year making
  the patient 90 on ``as_of``, plus the extension :data:`AGE_90_PLUS_URL`) for patients over 89.

The patient is the resource's compartment patient (the Patient itself, else its only linked patient, else
the patient of its compartment element); a resource linked to several patients with none of them its
compartment patient, and ``Binary`` (opaque content), are withheld (None).  Resources without a patient
link (Organization, Medication, ...) are not patient data: their dates are kept.
"""

from __future__ import annotations

import re
import uuid
from datetime import date
from typing import Any

from mappings.deid.dates import safe_harbor_birth_year, shift_fhir_date
from mappings.deid.keys import ProjectKeys
from mappings.fhir.links import COMPARTMENT_ELEMENTS, UNKNOWN, patient_links
from mappings.fhir.references import parse_reference

#: Extension marking a birth year aggregated into the Safe Harbor "90 or older" bucket.
AGE_90_PLUS_URL = "urn:fedgate:deid:age-90-or-older"
#: HL7 data-absent-reason extension (R4) put on elements whose only content was removed free text.
DATA_ABSENT_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
MASKED = [{"url": DATA_ABSENT_URL, "valueCode": "masked"}]

#: Strings removed wherever they occur: free text that may name or describe a person.
FREE_TEXT_KEYS = frozenset(
    {
        "comment",
        "comments",
        "description",
        "conclusion",
        "patientInstruction",
        "valueString",
        "valueMarkdown",
        "summary",
        "note",
        "photo",
        "telecom",
        "alias",
        "contact",
    }
)
#: Resource types withheld altogether.
WITHHELD_TYPES = frozenset({"Binary"})
#: Keys whose string values are never dates (and are not shifted).
_NOT_DATES = frozenset(
    {
        "id",
        "code",
        "system",
        "version",
        "reference",
        "url",
        "unit",
        "value",
        "div",
        "valueCode",
        "valueId",
        "valueUri",
        "valueString",
        "contentType",
        "language",
    }
)
_ADDRESS_KEEP = ("use", "type", "state", "country")
_ATTACHMENT_DROP = ("data", "url", "title", "hash")
_REFERENCE_KEYS = frozenset({"reference", "type", "identifier", "display", "id", "extension"})


def _compartment_patient(resource: dict[str, Any]) -> str | None:
    for element in COMPARTMENT_ELEMENTS.get(str(resource.get("resourceType")), ()):
        value = resource.get(element)
        for v in value if isinstance(value, list) else [value]:
            ref = v.get("reference") if isinstance(v, dict) else None
            parsed = parse_reference(ref) if isinstance(ref, str) else None
            if parsed is not None and parsed.type == "Patient":
                return parsed.id
    return None


def patient_of(resource: dict[str, Any]) -> tuple[str | None, bool]:
    """(the patient whose offset applies, whether the resource is patient data at all): the Patient itself,
    else the patient its compartment element references, else its only linked patient."""
    if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
        return resource["id"], True
    first = _compartment_patient(resource)
    if first is not None:
        return first, True
    links = patient_links(resource)
    ids = set(links.ids) - {UNKNOWN}
    if len(ids) == 1:
        return next(iter(ids)), True
    if not ids:
        return None, bool(links.identifiers) or links.unknown
    return None, True


class _Walker:
    def __init__(self, keys: ProjectKeys, offset: int | None):
        self.keys = keys
        self.offset = offset
        self.system = f"urn:fedgate:pseudonym:{keys.project}"

    def reference(self, text: str) -> str:
        if text.startswith("#"):
            return text
        if text.startswith("urn:uuid:"):
            return "urn:uuid:" + str(uuid.UUID(bytes=self.keys.digest("urn", text)[:16]))
        parsed = parse_reference(text)
        if parsed is None:
            return "urn:fedgate:withheld"
        return f"{parsed.type}/{self.keys.pseudonym(parsed.type, parsed.id)}"

    def identifier(self, ident: Any) -> Any:
        if not isinstance(ident, dict):
            return None
        system = ident.get("system") if isinstance(ident.get("system"), str) else ""
        value = ident.get("value") if isinstance(ident.get("value"), str) else ""
        out: dict[str, Any] = {"system": self.system, "value": self.keys.pseudonym("identifier", f"{system}|{value}")}
        if isinstance(ident.get("use"), str):
            out["use"] = ident["use"]
        return out

    def walk(self, node: Any, key: str | None) -> Any:
        if isinstance(node, list):
            out = [self.walk(v, key) for v in node]
            return [v for v in out if v is not None and v != {}]
        if isinstance(node, dict):
            return self.walk_dict(node, key)
        if isinstance(node, str):
            if self.offset is not None and key not in _NOT_DATES and node[:1].isdigit():
                shifted = shift_fhir_date(node, self.offset)
                if shifted is not None:
                    return shifted
            return node
        return node

    def walk_dict(self, node: dict[str, Any], key: str | None) -> dict[str, Any] | None:
        if node.get("resourceType"):
            return self.resource(node)
        if key in ("address",):
            return {k: node[k] for k in _ADDRESS_KEEP if isinstance(node.get(k), str)} or None
        if key == "name" and ({"family", "given", "text", "prefix"} & node.keys()) and "coding" not in node:
            return None  # a HumanName
        is_reference = "reference" in node or ("identifier" in node and node.keys() <= _REFERENCE_KEYS)
        out: dict[str, Any] = {}
        had_text = False
        for k, v in node.items():
            if k in FREE_TEXT_KEYS:
                continue
            if k == "display" and is_reference:
                continue
            if k == "text" and isinstance(v, str):
                if "coding" not in node or not node.get("coding"):
                    had_text = True
                continue_text = "coding" in node and node.get("coding")
                if continue_text:
                    out[k] = v
                continue
            if k in _ATTACHMENT_DROP and "contentType" in node:
                continue
            if k == "reference" and isinstance(v, str):
                out[k] = self.reference(v)
            elif k == "identifier":
                if isinstance(v, list):
                    out[k] = [i for i in (self.identifier(x) for x in v) if i]
                else:
                    out[k] = self.identifier(v)
            else:
                w = self.walk(v, k)
                if w is not None and w != {} and w != []:
                    out[k] = w
        if had_text and not out:
            return {"extension": [{"url": DATA_ABSENT_URL, "valueCode": "masked"}]}
        return out or None

    def resource(self, res: dict[str, Any]) -> dict[str, Any]:
        rtype = res.get("resourceType")
        out: dict[str, Any] = {"resourceType": rtype}
        for k, v in res.items():
            if k == "resourceType" or k in FREE_TEXT_KEYS:
                continue
            if k == "id" and isinstance(v, str):
                # contained ids are local (#x references keep pointing at them)
                out[k] = v if self.contained else self.keys.pseudonym(str(rtype), v)
            elif k == "text" and isinstance(v, dict):
                continue  # narrative
            elif k == "meta" and isinstance(v, dict):
                meta = {m: v[m] for m in ("profile", "security", "tag") if m in v}
                if meta:
                    out[k] = meta
            elif k == "contained" and isinstance(v, list):
                saved, self.contained = self.contained, True
                out[k] = [
                    self.resource(c) for c in v if isinstance(c, dict) and c.get("resourceType") not in WITHHELD_TYPES
                ]
                self.contained = saved
            elif k == "birthDate" and isinstance(v, str):
                continue  # handled by deidentify_resource (Patient) / dropped elsewhere
            else:
                w = self.walk(v, k) if k not in ("identifier",) else None
                if k == "identifier":
                    w = [i for i in (self.identifier(x) for x in (v if isinstance(v, list) else [v])) if i]
                if w is not None and w != {} and w != []:
                    out[k] = w
        return out

    contained = False


def deidentify_resource(
    resource: dict[str, Any], keys: ProjectKeys, *, as_of: date | None = None
) -> dict[str, Any] | None:
    """The de-identified copy of a FHIR R4 resource for ``keys``' project, or None when it is withheld.

    ``as_of`` is the date ages are computed on for the "90 or older" rule (default: today)."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype in WITHHELD_TYPES:
        return None
    patient, is_patient_data = patient_of(resource)
    if is_patient_data and patient is None:
        return None  # several patients and none of them the compartment patient: no single timeline
    offset = keys.date_offset_days(patient) if patient is not None else None
    out = _Walker(keys, offset).resource(resource)
    birth = resource.get("birthDate")
    if rtype == "Patient" and isinstance(birth, str) and re.match(r"^\d{4}", birth):
        shifted = shift_fhir_date(birth, offset or 0) if len(birth) > 4 else birth
        try:
            y, m, d = (shifted.split("-") + ["07", "01"])[:3] if shifted else (birth[:4], "07", "01")
            born = date(int(y), int(m), int(d))
        except ValueError:
            born = None
        if born is not None:
            year, aggregated = safe_harbor_birth_year(born, as_of or date.today())
            out["birthDate"] = year
            if aggregated:
                out.setdefault("extension", []).append({"url": AGE_90_PLUS_URL, "valueBoolean": True})
    return out


__all__ = ["AGE_90_PLUS_URL", "FREE_TEXT_KEYS", "deidentify_resource", "patient_of"]
