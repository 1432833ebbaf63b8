"""DICOM index rows → FHIR R4 ImagingStudy (+ the DICOMweb Endpoint it points to). Pure.

The ImagingStudy id is the Study Instance UID itself (digits and dots, ≤ 64 characters: a valid FHIR
id), so the FHIR and DICOM views of a study share one key.  The Endpoint (``Endpoint/dicomweb``) carries
the WADO-RS base as a relative address (``dicomweb``), resolved against the gateway's base URL.
"""

from __future__ import annotations

from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"


def _date(da: str | None, tm: str | None) -> str | None:
    if not da or len(da) != 8 or not da.isdigit():
        return None
    date = f"{da[:4]}-{da[4:6]}-{da[6:8]}"
    t = (tm or "").split(".")[0]
    if len(t) >= 4 and t[:4].isdigit():
        ss = t[4:6] if len(t) >= 6 and t[4:6].isdigit() else "00"
        return f"{date}T{t[:2]}:{t[2:4]}:{ss}Z"
    return date


def imaging_study_resource(
    study: dict[Any, Any], series: list[dict[Any, Any]], instances: list[dict[Any, Any]]
) -> dict[str, Any]:
    by_series: dict[str, list[dict[Any, Any]]] = {}
    for inst in instances:
        by_series.setdefault(inst["series_uid"], []).append(inst)
    res: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study["study_uid"],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study['study_uid']}"}],
        "status": "available",
        "subject": (
            {"reference": f"Patient/{study['patient_id']}"}
            if study.get("patient_id") and not study["patient_id"].startswith("dicom-")
            else {
                "display": "patient known from DICOM only",
                "identifier": {
                    "system": f"urn:oid:{study['issuer_of_patient_id']}"
                    if study.get("issuer_of_patient_id")
                    else "urn:dicom:patient-id",
                    "value": study.get("dicom_patient_id") or "unknown",
                },
            }
        ),
        "endpoint": [{"reference": "Endpoint/dicomweb"}],
        "numberOfSeries": len(series),
        "numberOfInstances": len(instances),
    }
    if study.get("accession_number"):
        res["identifier"].append(
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "value": study["accession_number"],
            }
        )
    started = _date(study.get("study_date"), study.get("study_time"))
    if started:
        res["started"] = started
    mods = sorted({s["modality"] for s in series if s.get("modality")})
    if mods:
        res["modality"] = [{"system": DCM, "code": m} for m in mods]
    if study.get("study_description"):
        res["description"] = study["study_description"]
    out_series = []
    for s in series:
        item: dict[str, Any] = {"uid": s["series_uid"], "modality": {"system": DCM, "code": s.get("modality") or "OT"}}
        if s.get("series_number") is not None:
            item["number"] = s["series_number"]
        if s.get("series_description"):
            item["description"] = s["series_description"]
        insts = by_series.get(s["series_uid"], [])
        item["numberOfInstances"] = len(insts)
        if s.get("body_part"):
            item["bodySite"] = {"system": DCM, "code": s["body_part"], "display": s["body_part"]}
        item["endpoint"] = [{"reference": "Endpoint/dicomweb"}]
        if insts:
            item["instance"] = []
            for i in insts:
                entry: dict[str, Any] = {
                    "uid": i["sop_uid"],
                    "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{i['sop_class_uid']}"},
                }
                if i.get("instance_number") is not None:
                    entry["number"] = i["instance_number"]
                item["instance"].append(entry)
        out_series.append(item)
    if out_series:
        res["series"] = out_series
    return res


def endpoint_resource() -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": "dicomweb",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "name": "fedgate DICOMweb (WADO-RS / QIDO-RS / STOW-RS)",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": "dicomweb",
    }
