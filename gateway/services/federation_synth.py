"""Synthetic site populations for ``fedgate demo``, the federation tests and the benchmark.

``generate(profile, n, seed)`` is pure and deterministic: it returns rows for the common model
(``cm_patient``, ``cm_condition``, ``cm_observation``, ``cm_procedure``) and the DICOM index
(``dcm_study``, ``dcm_series``, ``dcm_seg_segment``, ``dcm_sr_item``), keyed by table name, so tests can
compute expected cohort counts independently from the same rows.  ``load(db, rows)`` writes them in one
transaction.  Sites differ by vendor mix, demographics, consent-profile mix and SR/SEG content.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert

from gateway.store.db import Database

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"

#: SNOMED CT codes used.  Their hierarchy (diabetes mellitus → type 1 / type 2, ...) is not here: it is
#: the vocabulary store's (``fedgate vocab load --demo`` loads demo/data/vocab, as ``fedgate demo`` does).
DIABETES, T1DM, T2DM = "73211009", "46635009", "44054006"
HEART_FAILURE = "84114007"
HYPERTENSION = "38341003"
HBA1C = "4548-4"  # LOINC, %
BMI = "39156-5"  # LOINC, kg/m2
CARDIAC_MRI = "241620005"  # SCT procedure
LV, RV, MYO = "87878005", "53085002", "74281007"  # SCT segmented property types
LVEF = "10230-1"  # LOINC, used as SR concept (scheme LN)
CONSENT_PROFILES = ("GRU", "HMB", "DS-CVD", "NRES")
#: label → (DUO permission, disease restrictions) of each synthetic consent profile.
CONSENT_DUO = {"GRU": ("DUO:0000042", ()), "HMB": ("DUO:0000006", ()),
               "DS-CVD": ("DUO:0000007", ("MONDO:0004995",)), "NRES": ("DUO:0000004", ())}


def _profile_docs() -> dict[str, dict]:
    from mappings.fhir.consent_duo import Entry, effective
    from ontologies.evaluator import ConsentProfile

    return {label: effective([Entry(ConsentProfile(perm, diseases=frozenset(dis)), source="synthetic")], False)
            for label, (perm, dis) in CONSENT_DUO.items()}


def profile_keys() -> dict[str, str]:
    """label → the consent gate's effective-profile key (``cm_patient.consent_profile``)."""
    from mappings.fhir.consent_duo import profile_key

    return {label: profile_key(doc) for label, doc in _profile_docs().items()}


@dataclass(frozen=True)
class SiteProfile:
    name: str
    vendors: tuple[tuple[str, str], ...]  # (manufacturer, model)
    female_share: float = 0.5
    birth_years: tuple[int, int] = (1940, 2000)
    consent_mix: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)  # weights for CONSENT_PROFILES
    imaging_share: float = 0.6
    seg_share: float = 0.4  # of cardiac MR studies
    sr_share: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


DEMO_SITES = (
    SiteProfile("site-a", (("SIEMENS", "Aera"), ("SIEMENS", "Skyra")), 0.55, (1940, 1990), (0.5, 0.3, 0.1, 0.1)),
    SiteProfile("site-b", (("GE MEDICAL SYSTEMS", "SIGNA Artist"), ("Philips", "Ingenia")), 0.45, (1950, 2000),
                (0.2, 0.4, 0.3, 0.1), imaging_share=0.7, seg_share=0.6),
    SiteProfile("site-c", (("Philips", "Achieva"), ("Canon Medical Systems", "Vantage Orian")), 0.5, (1935, 1985),
                (0.3, 0.2, 0.2, 0.3), imaging_share=0.5, sr_share=0.7),
)


def _date(rng: random.Random, y0: int, y1: int) -> str:
    return f"{rng.randint(y0, y1):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def generate(profile: SiteProfile, n: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(f"{profile.name}:{seed}:{n}")
    rows: dict[str, list[dict]] = {k: [] for k in (
        "cm_patient", "cm_condition", "cm_observation", "cm_procedure",
        "dcm_study", "dcm_series", "dcm_seg_segment", "dcm_sr_item")}
    tag = profile.name.replace("-", "")
    keys = profile_keys()
    for i in range(n):
        pid = f"{tag}-p{i:06d}"
        sex = "female" if rng.random() < profile.female_share else "male"
        if rng.random() < 0.02:
            sex = "other"
        birth = _date(rng, *profile.birth_years)
        consent = rng.choices(CONSENT_PROFILES, weights=profile.consent_mix)[0]
        rows["cm_patient"].append({"src_type": "synthetic", "src_id": f"Patient/{pid}", "patient_id": pid,
                                   "birth_date": birth, "birth_year": int(birth[:4]), "sex": sex,
                                   "consent_profile": keys[consent], "consent_label": consent})
        for code, p, display in ((T2DM, 0.2, "Type 2 diabetes mellitus"), (T1DM, 0.04, "Type 1 diabetes mellitus"),
                                 (HEART_FAILURE, 0.12, "Heart failure"), (HYPERTENSION, 0.3, "Hypertension")):
            if rng.random() < p:
                rows["cm_condition"].append({
                    "src_type": "synthetic", "src_id": f"Condition/{pid}-{code}", "patient_id": pid,
                    "system": SCT, "code": code, "display": display, "onset": _date(rng, 2005, 2022),
                    "clinical_status": "active"})
        for k in range(rng.randint(0, 2)):
            rows["cm_observation"].append({
                "src_type": "synthetic", "src_id": f"Observation/{pid}-a1c{k}", "patient_id": pid, "system": LOINC,
                "code": HBA1C, "display": "Hemoglobin A1c", "category": "laboratory",
                "value_num": round(rng.gauss(6.3, 1.1), 1), "unit": "%", "effective": _date(rng, 2010, 2023),
                "status": "final"})
        if rng.random() < 0.5:
            rows["cm_observation"].append({
                "src_type": "synthetic", "src_id": f"Observation/{pid}-bmi", "patient_id": pid, "system": LOINC,
                "code": BMI, "display": "Body mass index", "category": "vital-signs",
                "value_num": round(rng.gauss(27, 4.5), 1), "unit": "kg/m2", "effective": _date(rng, 2010, 2023),
                "status": "final"})
        if rng.random() >= profile.imaging_share:
            continue
        for s in range(rng.randint(1, 2)):
            study_uid = f"2.25.{zlib.crc32(profile.name.encode())}.{i}.{s}"
            manufacturer, model = rng.choice(profile.vendors)
            cardiac = rng.random() < 0.6
            modality = "MR" if cardiac or rng.random() < 0.3 else "CT"
            study_date = _date(rng, 2012, 2024).replace("-", "")
            body_part = "HEART" if cardiac else rng.choice(["CHEST", "ABDOMEN", "HEAD"])
            rows["dcm_study"].append({
                "study_uid": study_uid, "patient_id": pid, "dicom_patient_id": pid, "patient_sex": sex[0].upper(),
                "patient_birth_date": birth.replace("-", ""), "study_date": study_date,
                "study_description": "Cardiac MRI" if cardiac else f"{modality} {body_part.lower()}",
                "modalities": modality, "num_series": 1, "num_instances": 1, "updated_ts": 0.0})
            series_uid = study_uid + ".1"
            thickness = rng.choice([1.0, 1.25, 2.5, 5.0]) if modality == "CT" else rng.choice([6.0, 8.0, 10.0])
            rows["dcm_series"].append({
                "series_uid": series_uid, "study_uid": study_uid, "patient_id": pid, "modality": modality,
                "series_number": 1, "series_description": "cine sax" if cardiac else "axial",
                "body_part": body_part, "manufacturer": manufacturer, "model_name": model,
                "protocol_name": "CMR_cine" if cardiac else f"{body_part.title()} routine",
                "slice_thickness": thickness, "series_date": study_date, "num_instances": 1, "updated_ts": 0.0})
            if cardiac:
                rows["cm_procedure"].append({
                    "src_type": "synthetic", "src_id": f"Procedure/{pid}-{s}", "patient_id": pid, "system": SCT,
                    "code": CARDIAC_MRI, "display": "MRI of heart",
                    "performed": f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}", "status": "completed"})
            if cardiac and rng.random() < profile.seg_share:
                seg_uid = study_uid + ".9.1"
                labels = [(1, "Left Ventricle", LV), (2, "Myocardium", MYO)]
                if rng.random() < 0.7:
                    labels.append((3, "Right Ventricle", RV))
                for num, label, code in labels:
                    rows["dcm_seg_segment"].append({
                        "sop_uid": seg_uid, "segment_number": num, "series_uid": study_uid + ".9",
                        "study_uid": study_uid, "patient_id": pid, "label": label, "algorithm_type": "AUTOMATIC",
                        "category_scheme": "SCT", "category_code": "91723000", "category_meaning": "Anatomical Structure",
                        "type_scheme": "SCT", "type_code": code, "type_meaning": label, "ref_series_uid": series_uid})
            if cardiac and rng.random() < profile.sr_share:
                sr_uid = study_uid + ".8.1"
                for g in range(1, rng.randint(1, 2) + 1):
                    group = f"1.{g}"
                    finding = rng.choice([(LV, "Left Ventricle"), (RV, "Right Ventricle")])
                    ef = round(rng.gauss(55, 12), 1)
                    base = "DCM:126000/DCM:126010/DCM:125007"
                    for item_id, depth, vt, concept, extra in (
                        (group, 2, "CONTAINER", ("DCM", "125007", "Measurement Group"), {}),
                        (f"{group}.1", 3, "CODE", ("DCM", "121071", "Finding"),
                         {"code_scheme": "SCT", "code_value": finding[0], "code_meaning": finding[1]}),
                        (f"{group}.2", 3, "NUM", ("LN", LVEF, "Ejection fraction"), {"num_value": ef, "unit_code": "%"}),
                    ):
                        path = base if vt == "CONTAINER" else f"{base}/{concept[0]}:{concept[1]}"
                        rows["dcm_sr_item"].append({
                            "sop_uid": sr_uid, "patient_id": pid, "item_id": item_id, "parent_item_id": group.rsplit(".", 1)[0]
                            if vt == "CONTAINER" else group, "depth": depth, "group_item_id": group,
                            "relationship": "CONTAINS", "value_type": vt, "concept_scheme": concept[0],
                            "concept_code": concept[1], "concept_meaning": concept[2], "concept_path": path, **extra})
    return rows


async def load(db: Database, rows: dict[str, list[dict]], *, chunk: int = 5000) -> None:
    """Insert generated rows (one transaction)."""
    from gateway.store.migrate import load_table_modules
    from gateway.store.schema import metadata

    load_table_modules()
    async with db.write() as conn:
        if "consent_profile" in metadata.tables:  # the DUO profiles the consent gate evaluates
            import orjson
            from sqlalchemy import select

            cp = metadata.tables["consent_profile"]
            have = {r[0] for r in (await conn.execute(select(cp.c.key))).all()}
            docs, keys = _profile_docs(), profile_keys()
            new = [{"key": keys[label], "profile": orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()}
                   for label, doc in docs.items() if keys[label] not in have]
            if new:
                await conn.execute(insert(cp), new)
        if "consent_policy" in metadata.tables:
            # Record the (empty) site policy now: the gate recomputes every patient's profile from FHIR
            # Consent resources when the policy changes, which would erase these synthetic profiles.
            from gateway.store.consent_schema import load_policy_doc, store_policy_doc

            if not await load_policy_doc(conn):
                await store_policy_doc(conn, {})
        copy = conn.dialect.name == "postgresql"
        from sqlalchemy import func, select

        from gateway.store.schema import cm_patient

        fresh = not (await conn.execute(select(func.count()).select_from(cm_patient))).scalar_one()
        for name, items in rows.items():
            table = metadata.tables[name]
            cols = set(table.c.keys())
            used = sorted({k for r in items for k in r if k in cols})  # executemany takes the first row's keys
            if copy and items:  # PostgreSQL: COPY in the same transaction (the 500k-patient bench store)
                raw = (await conn.get_raw_connection()).driver_connection
                await raw.copy_records_to_table(name, columns=used, records=[tuple(r.get(k) for k in used) for r in items])
                continue
            for i in range(0, len(items), chunk):
                part = [{k: r.get(k) for k in used} for r in items[i:i + chunk]]
                if part:
                    await conn.execute(insert(table), part)
        if "consent_policy" in metadata.tables and rows.get("dcm_study"):
            from gateway.store.consent_schema import stamp_dicom

            # QIDO filters on the rows; a store that had no patient before: every row at once (a few statements
            # per table instead of one per 500 patients per profile per table — hours at 500k on PostgreSQL)
            await stamp_dicom(conn, None if fresh else {r["patient_id"] for r in rows["cm_patient"]})


__all__ = ["SiteProfile", "DEMO_SITES", "generate", "load", "CONSENT_PROFILES", "profile_keys"]
