"""Common-model objects → rows of the ``cm_*`` tables (and back, where needed)."""

from __future__ import annotations

import dataclasses

import orjson

from mappings import model as m
from gateway.store import schema as s


def _coded(c: m.Concept) -> dict:
    p = c.primary
    return {
        "system": p.system if p else None,
        "code": p.code if p else None,
        "display": (p.display if p else None) or c.text,
        "codes": orjson.dumps([x.token for x in c.codings]).decode() if c.codings else None,
    }


def row_for(obj: m.ModelObject) -> tuple[str, dict]:
    """(table name, row dict) for one common-model object."""
    base = {"src_type": obj.source.kind, "src_id": obj.source.id, "patient_id": obj.patient_id}
    if isinstance(obj, m.Patient):
        year = int(obj.birth_date[:4]) if obj.birth_date and obj.birth_date[:4].isdigit() else None
        return "cm_patient", base | {
            "identifiers": orjson.dumps(list(obj.identifiers)).decode(),
            "birth_date": obj.birth_date, "birth_year": year, "sex": obj.sex,
            "deceased_date": obj.deceased_date, "race": obj.race, "ethnicity": obj.ethnicity,
        }
    if isinstance(obj, m.Encounter):
        return "cm_encounter", base | _coded(obj.concept) | {"class_code": obj.class_code, "start": obj.start, "end": obj.end}
    if isinstance(obj, m.Condition):
        return "cm_condition", base | _coded(obj.concept) | {
            "onset": obj.onset, "abatement": obj.abatement, "clinical_status": obj.clinical_status,
            "encounter_id": obj.encounter_id,
        }
    if isinstance(obj, m.Observation):
        return "cm_observation", base | _coded(obj.concept) | {
            "category": obj.category, "value_num": obj.value_num, "unit": obj.unit,
            "value_system": obj.value_code.system if obj.value_code else None,
            "value_code": obj.value_code.code if obj.value_code else None,
            "value_text": obj.value_text, "effective": obj.effective, "status": obj.status,
            "encounter_id": obj.encounter_id, "parent_id": obj.parent_id,
        }
    if isinstance(obj, m.Procedure):
        return "cm_procedure", base | _coded(obj.concept) | {
            "performed": obj.performed, "performed_end": obj.performed_end, "status": obj.status,
            "encounter_id": obj.encounter_id,
        }
    if isinstance(obj, m.DiagnosticReport):
        return "cm_diagnostic_report", base | _coded(obj.concept) | {
            "effective": obj.effective, "status": obj.status,
            "study_uids": orjson.dumps(list(obj.study_refs)).decode(), "conclusion": obj.conclusion,
        }
    if isinstance(obj, m.ImagingStudy):
        return "cm_imaging_study", base | {
            "study_uid": obj.study_uid, "started": obj.started, "modalities": orjson.dumps(list(obj.modalities)).decode(),
            "description": obj.description, "n_series": obj.n_series, "n_instances": obj.n_instances,
        }
    if isinstance(obj, m.Consent):
        return "cm_consent", base | {
            "status": obj.status, "period_start": obj.period_start, "period_end": obj.period_end, "date": obj.date,
            "profile": orjson.dumps(obj.profile).decode() if obj.profile is not None else None,
        }
    raise TypeError(f"no common-model table for {type(obj).__name__}")  # pragma: no cover


CM_BY_NAME = {t.name: t for t in s.CM_TABLES.values()}

__all__ = ["row_for", "CM_BY_NAME", "dataclasses"]
