"""OMOP CDM v5.4 rows → common-model rows (``cm_*`` dicts); pure.

Every row keeps its OMOP key as ``src_type = "OMOP"``, ``src_id = "<table>/<id>"`` so a re-import
updates, inserts and deletes exactly the rows that changed at the source.  Patients get the id
``omop-<person_id>`` (the OMOP ``person_source_value`` is kept as an identifier).  Codes come from
the standard concept when the vocabulary knows it (FHIR system URI + code), else from the source
concept, else the ``*_source_value`` with no system.

Rows an export of ours added for the imaging extension are not clinical facts of their own and are
left out: the imaging ``procedure_occurrence`` (source value ``DICOM:...``) that MI-CDM requires
under every ``image_occurrence``, and the ``measurement`` rows that hold ``image_feature`` values
(they stay SR content of the DICOM store).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import orjson

from mappings.vocab import Vocabulary

SRC = "OMOP"


def with_local_concepts(
    vocab: Vocabulary, concepts: Iterable[dict[Any, Any]], vocabularies: Iterable[dict[Any, Any]]
) -> Vocabulary:
    """``vocab`` plus the source schema's site-local concepts (ids > 2,000,000,000), each keyed to
    the code system its VOCABULARY row names in ``vocabulary_reference`` (how fedgate exports codes
    its vocabulary does not know), so that ``system_of`` restores system and code exactly.  Local
    concepts whose vocabulary names no URI keep the vocabulary id as their system."""
    from mappings.vocab import Concept

    concepts = list(concepts)
    if not concepts:
        return vocab
    ref = {v["vocabulary_id"]: v.get("vocabulary_reference") for v in vocabularies}
    out = Vocabulary(
        by_id=dict(vocab.by_id),
        by_code=vocab.by_code,
        maps_to=vocab.maps_to,
        source_map=vocab.source_map,
        origin=vocab.origin,
    )
    for c in concepts:
        cid = int(c["concept_id"])
        if cid <= 2_000_000_000 or cid in vocab.by_id:
            continue
        system = ref.get(c["vocabulary_id"]) or c["vocabulary_id"]
        out.by_id[cid] = Concept(
            cid,
            system,
            c["concept_code"],
            c.get("concept_name") or c["concept_code"],
            c.get("domain_id") or "Metadata",
            None,
        )
    return out


def patient_id_of(person_id: Any) -> str:
    return f"omop-{person_id}"


def _iso(d: Any, t: Any = None) -> str | None:
    if isinstance(t, dt.datetime):
        return t.isoformat()
    if isinstance(d, dt.datetime):
        return d.isoformat()
    if isinstance(d, dt.date):
        return d.isoformat()
    return str(d) if d else None


def _num(v: Any) -> float | None:
    return float(v) if v is not None else None


def _coded(vocab: Vocabulary, concept_id: Any, source_concept_id: Any, source_value: Any) -> dict[Any, Any]:
    system, code, name = vocab.system_of(concept_id)
    if code is None:
        system, code, name = vocab.system_of(source_concept_id)
    if code is None and source_value:
        system, code, name = None, str(source_value), None
    return {
        "system": system,
        "code": code,
        "display": name,
        "codes": orjson.dumps([f"{system or ''}|{code}"]).decode() if code else None,
    }


def _base(table: str, key: Any, person_id: Any) -> dict[Any, Any]:
    return {"src_type": SRC, "src_id": f"{table}/{key}", "patient_id": patient_id_of(person_id)}


def person_rows(
    vocab: Vocabulary, persons: Iterable[dict[Any, Any]], deaths: Iterable[dict[Any, Any]]
) -> list[dict[Any, Any]]:
    died = {d["person_id"]: d for d in deaths}
    out = []
    for p in persons:
        y, m, d = p.get("year_of_birth"), p.get("month_of_birth"), p.get("day_of_birth")
        if isinstance(p.get("birth_datetime"), dt.datetime):
            birth = p["birth_datetime"].date().isoformat()
        elif y and m and d:
            birth = f"{y:04d}-{m:02d}-{d:02d}"
        elif y and m:
            birth = f"{y:04d}-{m:02d}"
        else:
            birth = f"{y:04d}" if y else None
        sex = vocab.reverse_source("fhir-gender", p.get("gender_concept_id"))
        if sex is None:
            src = (p.get("gender_source_value") or "").lower()
            sex = src if src in ("male", "female", "other", "unknown") else ("unknown" if src else None)
        death = died.get(p["person_id"])
        ident = [f"urn:omop:person_source_value|{p['person_source_value']}"] if p.get("person_source_value") else []
        out.append(
            _base("person", p["person_id"], p["person_id"])
            | {
                "identifiers": orjson.dumps(ident).decode(),
                "birth_date": birth,
                "birth_year": y,
                "sex": sex,
                "deceased_date": _iso(death["death_date"], death.get("death_datetime")) if death else None,
                "race": vocab.reverse_source("cdc-race", p.get("race_concept_id")) or p.get("race_source_value"),
                "ethnicity": vocab.reverse_source("cdc-ethnicity", p.get("ethnicity_concept_id"))
                or p.get("ethnicity_source_value"),
            }
        )
    return out


def visit_rows(vocab: Vocabulary, visits: Iterable[dict[Any, Any]]) -> list[dict[Any, Any]]:
    out = []
    for v in visits:
        cls = vocab.reverse_source("v3-ActCode", v.get("visit_concept_id"))
        out.append(
            _base("visit_occurrence", v["visit_occurrence_id"], v["person_id"])
            | {
                "class_code": cls,
                **_coded(vocab, 0, v.get("visit_source_concept_id"), v.get("visit_source_value")),
                "start": _iso(v["visit_start_date"], v.get("visit_start_datetime")),
                "end": _iso(v.get("visit_end_date"), v.get("visit_end_datetime")),
            }
        )
    return out


def condition_rows(vocab: Vocabulary, rows: Iterable[dict[Any, Any]]) -> list[dict[Any, Any]]:
    return [
        _base("condition_occurrence", c["condition_occurrence_id"], c["person_id"])
        | _coded(
            vocab, c.get("condition_concept_id"), c.get("condition_source_concept_id"), c.get("condition_source_value")
        )
        | {
            "onset": _iso(c["condition_start_date"], c.get("condition_start_datetime")),
            "abatement": _iso(c.get("condition_end_date"), c.get("condition_end_datetime")),
            "clinical_status": c.get("condition_status_source_value"),
            "encounter_id": str(c["visit_occurrence_id"]) if c.get("visit_occurrence_id") else None,
        }
        for c in rows
    ]


def procedure_rows(
    vocab: Vocabulary, rows: Iterable[dict[Any, Any]], imaging_procedures: set[Any]
) -> list[dict[Any, Any]]:
    out = []
    for p in rows:
        if p["procedure_occurrence_id"] in imaging_procedures and str(p.get("procedure_source_value") or "").startswith(
            "DICOM:"
        ):
            continue
        out.append(
            _base("procedure_occurrence", p["procedure_occurrence_id"], p["person_id"])
            | _coded(
                vocab,
                p.get("procedure_concept_id"),
                p.get("procedure_source_concept_id"),
                p.get("procedure_source_value"),
            )
            | {
                "performed": _iso(p["procedure_date"], p.get("procedure_datetime")),
                "performed_end": _iso(p.get("procedure_end_date"), p.get("procedure_end_datetime")),
                "status": "completed",
                "encounter_id": str(p["visit_occurrence_id"]) if p.get("visit_occurrence_id") else None,
            }
        )
    return out


def _value_code(vocab: Vocabulary, concept_id: Any) -> tuple[str | None, str | None]:
    system, code, _ = vocab.system_of(concept_id)
    return system, code


def measurement_rows(
    vocab: Vocabulary, rows: Iterable[dict[Any, Any]], feature_measurements: set[Any]
) -> list[dict[Any, Any]]:
    out = []
    for r in rows:
        if r["measurement_id"] in feature_measurements:
            continue
        vs, vc = _value_code(vocab, r.get("value_as_concept_id"))
        out.append(
            _base("measurement", r["measurement_id"], r["person_id"])
            | _coded(
                vocab,
                r.get("measurement_concept_id"),
                r.get("measurement_source_concept_id"),
                r.get("measurement_source_value"),
            )
            | {
                "category": None,
                "value_num": _num(r.get("value_as_number")),
                "unit": r.get("unit_source_value") or vocab.system_of(r.get("unit_concept_id"))[1],
                "value_system": vs,
                "value_code": vc or (r.get("value_source_value") if r.get("value_as_concept_id") else None),
                "value_text": None,
                "effective": _iso(r["measurement_date"], r.get("measurement_datetime")),
                "status": "final",
                "encounter_id": str(r["visit_occurrence_id"]) if r.get("visit_occurrence_id") else None,
                "parent_id": None,
            }
        )
    return out


def observation_rows(vocab: Vocabulary, rows: Iterable[dict[Any, Any]]) -> list[dict[Any, Any]]:
    out = []
    for r in rows:
        vs, vc = _value_code(vocab, r.get("value_as_concept_id"))
        if vc is None and r.get("value_as_concept_id") is not None and r.get("value_source_value"):
            vc = r["value_source_value"]
        out.append(
            _base("observation", r["observation_id"], r["person_id"])
            | _coded(
                vocab,
                r.get("observation_concept_id"),
                r.get("observation_source_concept_id"),
                r.get("observation_source_value"),
            )
            | {
                "category": None,
                "value_num": _num(r.get("value_as_number")),
                "unit": r.get("unit_source_value") or vocab.system_of(r.get("unit_concept_id"))[1],
                "value_system": vs,
                "value_code": vc,
                "value_text": r.get("value_as_string"),
                "effective": _iso(r["observation_date"], r.get("observation_datetime")),
                "status": "final",
                "encounter_id": str(r["visit_occurrence_id"]) if r.get("visit_occurrence_id") else None,
                "parent_id": None,
            }
        )
    return out


def imaging_rows(vocab: Vocabulary, rows: Iterable[dict[Any, Any]]) -> list[dict[Any, Any]]:
    """One ``cm_imaging_study`` per study UID (MI-CDM has one image_occurrence per series)."""
    by_study: dict[str, list[dict[Any, Any]]] = {}
    for r in rows:
        by_study.setdefault(r["image_study_uid"], []).append(r)
    out = []
    for uid, series in sorted(by_study.items()):
        first = min(series, key=lambda r: r["image_occurrence_id"])
        mods = sorted({c for c in (vocab.system_of(r.get("modality_concept_id"))[1] for r in series) if c})
        out.append(
            {
                "src_type": SRC,
                "src_id": f"image_occurrence/study/{uid}",
                "patient_id": patient_id_of(first["person_id"]),
                "study_uid": uid,
                "started": _iso(first["image_occurrence_date"]),
                "modalities": orjson.dumps(mods).decode(),
                "description": None,
                "n_series": len({r["image_series_uid"] for r in series}),
                "n_instances": None,
            }
        )
    return out


def imaging_series_rows(vocab: Vocabulary, rows: Iterable[dict[Any, Any]]) -> list[dict[Any, Any]]:
    """One ``cm_imaging_series`` per image_occurrence (MI-CDM: one per series): modality and body part
    as their DICOM terms, so cohorts and a re-export see the series as they were exported."""
    out = []
    for r in rows:
        out.append(
            {
                "src_type": SRC,
                "src_id": f"image_occurrence/{r['image_occurrence_id']}",
                "patient_id": patient_id_of(r["person_id"]),
                "study_uid": r["image_study_uid"],
                "series_uid": r.get("image_series_uid") or "",
                "modality": vocab.system_of(r.get("modality_concept_id"))[1],
                "body_part": vocab.system_of(r.get("anatomic_site_concept_id"))[1],
                "started": _iso(r["image_occurrence_date"]),
            }
        )
    return out
