"""OMOP CDM v5.4 export/import end to end, through the running gateway, both store engines.

Synthea bundles → FHIR API → POST /omop/export into a scratch PostgreSQL database whose schema is built
from the official DDL with primary keys, foreign keys and indices → row counts per table equal counts
computed here from the bundle JSON (and the shipped vocabulary CSV, read independently) → the same
export as CSV → POST /omop/import into a fresh site → its common model equals the original's.

The CT study: one test STOWs a real CT instance through DICOMweb and finds its series in image_occurrence;
the round-trip test also PUTs a FHIR ImagingStudy with a CT series (FHIR-born imaging), and another test
writes DICOM index rows with SR content items (dcm_study/series/instance/sr_item, the team contract) to
cover MI-CDM image_feature linked to measurement.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select, update

from gateway import keys
from gateway.app import create_app
from gateway.store import schema as s
from gateway.store.scope import AccessScope
from tests.conftest import (
    PG_ADMIN,
    REPO,
    Gateway,
    create_pg_database,
    data_path,
    drop_pg_database,
    make_settings,
)

SYNTHEA = sorted(data_path("synthea").glob("*.json"))
PURPOSE = {"codes": ["DUO:0000042"], "diseases": []}
CM = ("cm_patient", "cm_encounter", "cm_condition", "cm_observation", "cm_procedure", "cm_imaging_study")
FEDERATED_COHORTS = [
    {"sex": "male"},
    {"condition": {"code": "http://snomed.info/sct|444814009"}},
    {"all": [{"observation": {"code": "http://loinc.org|8302-2", "value": {"min": 150}}}, {"age": {"min": 18, "at": "2020-01-01"}}]},
    {"procedure": {"code": "http://snomed.info/sct|288086009"}},
]
CT_STUDY = "1.2.826.0.1.3680043.8.498.1"
CT_SERIES = "1.2.826.0.1.3680043.8.498.1.1"


# ------------------------------------------------------------------------------------------------
# independent expectations from the bundle JSON
# ------------------------------------------------------------------------------------------------


def _vocab_domains() -> dict[tuple[str, str], str]:
    with (REPO / "mappings" / "vocab" / "concepts.csv").open(newline="") as f:
        return {(r["vocabulary"], r["code"]): r["domain"] for r in csv.DictReader(f)}


def _resources(bundles: list[dict]) -> list[dict]:
    return [e["resource"] for b in bundles for e in b["entry"]]


def expected_counts(resources: list[dict]) -> dict[str, int]:
    domains = _vocab_domains()
    vocab = {"http://loinc.org": "LOINC", "http://snomed.info/sct": "SNOMED"}
    n: Counter = Counter()
    persons = set()
    for r in resources:
        t = r["resourceType"]
        if t == "Patient" and r.get("birthDate"):
            n["person"] += 1
            persons.add(r["id"])
            n["death"] += "deceasedDateTime" in r
        elif t == "Encounter" and (r.get("period") or {}).get("start"):
            n["visit_occurrence"] += 1
        elif t == "Condition" and (r.get("onsetDateTime") or (r.get("onsetPeriod") or {}).get("start")):
            n["condition_occurrence"] += 1
        elif t == "Procedure" and (r.get("performedDateTime") or (r.get("performedPeriod") or {}).get("start")):
            n["procedure_occurrence"] += 1
        elif t == "ImagingStudy" and r.get("started"):
            n["procedure_occurrence"] += 1  # MI-CDM: one imaging procedure per study
            n["image_occurrence"] += max(1, len(r.get("series") or ()))
        elif t == "Observation" and r.get("effectiveDateTime"):
            cats = {c.get("code") for cc in r.get("category") or () for c in cc.get("coding") or ()}
            for node in [r] + list(r.get("component") or ()):
                coding = (node["code"].get("coding") or [{}])[0]
                domain = domains.get((vocab.get(coding.get("system"), ""), coding.get("code")))
                numeric = isinstance((node.get("valueQuantity") or {}).get("value"), (int, float)) or \
                    isinstance(node.get("valueInteger"), int)
                if domain == "Measurement" or (domain is None and (numeric or cats & {"vital-signs", "laboratory"})):
                    n["measurement"] += 1
                else:
                    n["observation"] += 1
    n["observation_period"] = len(persons)
    n["image_feature"] += 0
    return dict(n)


def ct_imaging_study(patient_id: str) -> dict:
    return {"resourceType": "ImagingStudy", "id": "ct-omop-test", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{CT_STUDY}"}],
            "subject": {"reference": f"Patient/{patient_id}"}, "started": "2020-05-01T10:00:00Z",
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
            "numberOfSeries": 1, "numberOfInstances": 1,
            "series": [{"uid": CT_SERIES, "number": 1,
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                        "bodySite": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CHEST"},
                        "instance": [{"uid": CT_SERIES + ".1", "number": 1,
                                      "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}]}]}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
async def omop_pg():
    """A scratch PostgreSQL database for OMOP schemas (export target / import source)."""
    name = await create_pg_database()
    try:
        yield f"{PG_ADMIN}/{name}"
    finally:
        await drop_pg_database(name)


ALL_SEXES = ["male", "female", "other", "unknown"]


def consent_policy(path: Path, sexes=ALL_SEXES) -> Path:
    """A site consent policy granting general research use (DUO:0000042) to the patients of ``sexes``
    (the Synthea bundles carry no Consent resources)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"collections": [{"name": "omop-test-gru", "match": {"sex": list(sexes)},
                                                 "consent": {"permission": "DUO:0000042"}}]}))
    return path


async def _site(data_dir: Path, db_url: str, omop_url: str, gate=None, sexes=ALL_SEXES) -> Gateway:
    # disclosure control off (cell size 1, no rounding) so federated counts of two sites compare exactly
    policy = consent_policy(data_dir.parent / f"{data_dir.name}-policy.json", sexes)
    # identified exports: these tests compare rows with the source (tests/integration/test_deid_timelines.py
    # covers the de-identified export)
    settings = make_settings(data_dir, db_url, deid_policy="*=identified", extra={"omop": {"pg_url": omop_url},
                                                      "federation": {"min_cell": 1, "round_base": 1},
                                                      "consent": {"policy": str(policy), "refresh_s": 0}})
    app = create_app(settings)
    if gate is not None:
        app[keys.GATE] = gate
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Gateway(server, settings)


async def _second_store(db_url: str, tmp_path: Path) -> tuple[str, str | None]:
    """A fresh store of the same engine as ``db_url`` (for the importing site)."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'site-b.db'}", None
    name = await create_pg_database()
    return f"{PG_ADMIN}/{name}", name


async def _load_synthea(gw: Gateway, http: aiohttp.ClientSession) -> list[dict]:
    h = gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}
    bundles = []
    for path in SYNTHEA:
        bundle = json.loads(path.read_text())
        bundles.append(bundle)
        async with http.post(gw.fhir, data=path.read_bytes(), headers=h) as r:
            assert r.status == 200, await r.text()
    return bundles


async def _cm_counts(gw: Gateway) -> dict[str, int]:
    out = {}
    async with gw.app[keys.DB].read() as conn:
        for name in CM:
            out[name] = (await conn.execute(select(func.count()).select_from(s.metadata.tables[name]))).scalar()
    return out


async def _cm_codes(gw: Gateway, name: str) -> Counter:
    t = s.metadata.tables[name]
    async with gw.app[keys.DB].read() as conn:
        rows = (await conn.execute(select(t.c.code, func.count()).group_by(t.c.code))).all()
    return Counter({r[0]: r[1] for r in rows})


async def _pg_counts(url: str, schema: str, tables) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{t}"') for t in tables}
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


async def test_synthea_export_to_official_ddl_then_import_into_fresh_site(tmp_path, db_url, omop_pg):
    async with aiohttp.ClientSession() as http:
        a = await _site(tmp_path / "a", db_url, omop_pg)
        b_url, b_name = await _second_store(db_url, tmp_path)
        b = None
        try:
            bundles = await _load_synthea(a, http)
            resources = _resources(bundles)
            patient = next(r for r in resources if r["resourceType"] == "Patient")
            # the stored patient id: transaction POSTs got server ids, find it by identifier
            ident = patient["identifier"][0]
            async with http.get(f"{a.fhir}/Patient", params={"identifier": f"{ident['system']}|{ident['value']}"},
                                headers=a.headers("clinician")) as r:
                pid = (await r.json())["entry"][0]["resource"]["id"]
            ct = ct_imaging_study(pid)
            async with http.put(f"{a.fhir}/ImagingStudy/{ct['id']}", json=ct,
                                headers=a.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
                assert r.status == 201, await r.text()
            expected = expected_counts(resources + [ct])

            # -- API: purpose and role are required -------------------------------------------------
            body = {"format": "postgresql", "schema": "cdm"}
            async with http.post(a.url + "/omop/export", json=body, headers=a.headers("analyst", purpose="treatment")) as r:
                assert r.status == 403 and r.content_type == "application/problem+json"
            async with http.post(a.url + "/omop/export", json=body, headers=a.headers("clinician", purpose=PURPOSE)) as r:
                assert r.status == 403
            async with http.post(a.url + "/omop/export", json={"format": "postgresql", "schema": "Bad Name"},
                                 headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 400 and (await r.json())["fields"] == ["schema"]

            # -- export into PostgreSQL with the official DDL + constraints --------------------------------
            t0 = time.perf_counter()
            async with http.post(a.url + "/omop/export", json=body, headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
                report = await r.json()
            assert time.perf_counter() - t0 < 60
            for table, n in expected.items():
                assert report["counts"][table] == n, (table, report["counts"][table], n)
            actual = await _pg_counts(omop_pg, "cdm", expected)
            assert actual == {t: expected[t] for t in expected}
            conn = await asyncpg.connect(omop_pg)
            try:
                fks = await conn.fetch("SELECT c.convalidated FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                                       "WHERE n.nspname = 'cdm' AND c.contype = 'f'")
                assert len(fks) > 150 and all(r["convalidated"] for r in fks)
                pks = await conn.fetchval("SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                                          "WHERE n.nspname = 'cdm' AND c.contype = 'p'")
                assert pks >= 29
                ct_row = await conn.fetchrow("SELECT io.*, p.person_source_value FROM cdm.image_occurrence io "
                                             "JOIN cdm.person p USING (person_id) WHERE image_study_uid = $1", CT_STUDY)
                assert ct_row["image_series_uid"] == CT_SERIES
                assert ct_row["modality_concept_id"] == 2128009190  # MI-CDM DICOM vocabulary: CT
                assert ct_row["anatomic_site_concept_id"] == 2128021433  # CHEST
                assert ct_row["person_source_value"] == pid
                males = sum(1 for r in resources if r["resourceType"] == "Patient" and r.get("gender") == "male")
                assert await conn.fetchval("SELECT count(*) FROM cdm.person WHERE gender_concept_id = 8507") == males
                # unmapped codes keep their source value; concept 0 exists in CONCEPT (FK)
                unm = await conn.fetchval("SELECT count(*) FROM cdm.measurement WHERE measurement_concept_id = 0 "
                                          "AND measurement_source_value IS NOT NULL")
                assert unm == sum(r["unmapped"] for r in report["coverage"]["by_table_vocabulary"]
                                  if r["table"] == "measurement")
            finally:
                await conn.close()
            # an existing schema is a conflict unless replace
            async with http.post(a.url + "/omop/export", json=body, headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 409

            # -- CSV target ------------------------------------------------------------------------------
            async with http.post(a.url + "/omop/export", json={"format": "csv", "name": "t1"},
                                 headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["target"] == {"csv": "exports/t1"}
            out = a.settings.data_dir / "exports" / "t1"
            for table, n in expected.items():
                with (out / f"{table}.csv").open(newline="") as f:
                    assert sum(1 for _ in csv.reader(f)) - 1 == n, table
            assert json.loads((out / "coverage.json").read_text())["mapped"] == report["coverage"]["mapped"]
            async with http.post(a.url + "/omop/export", json={"format": "csv", "name": "t1"},
                                 headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 409  # an export never overwrites another
            async with http.post(a.url + "/omop/export", json={"format": "csv", "name": "../up"},
                                 headers=a.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 400 and (await r.json())["fields"] == ["name"]

            # -- import into a fresh site --------------------------------------------------------------------
            b = await _site(tmp_path / "b", b_url, omop_pg)
            async with http.post(b.url + "/omop/import", json={"schema": "cdm"}, headers=b.headers("analyst")) as r:
                assert r.status == 403
            async with http.post(b.url + "/omop/import", json={"schema": "nope"}, headers=b.headers("admin")) as r:
                assert r.status == 400
            async with http.post(b.url + "/omop/import", json={"schema": "cdm"}, headers=b.headers("admin")) as r:
                assert r.status == 200, await r.text()
                first = await r.json()
            assert await _cm_counts(b) == await _cm_counts(a)
            for name in ("cm_condition", "cm_procedure"):
                assert await _cm_codes(b, name) == await _cm_codes(a, name)
            async with http.get(f"{b.fhir}/Patient", headers=b.headers("clinician")) as r:
                assert r.status == 200  # imported rows live beside FHIR; the cohort engine reads cm_*
            assert first["changes"]["cm_patient"]["inserted"] == expected["person"]
            # federated cohort counts: the importing site answers like the original
            for cohort in FEDERATED_COHORTS:
                answers = []
                for site in (a, b):
                    async with http.post(site.url + "/federation/cohort/count", json={"cohort": cohort, "age_at": "2020-01-01"},
                                         headers=site.headers("analyst", purpose=PURPOSE)) as r:
                        assert r.status == 200, await r.text()
                        res = await r.json()
                        answers.append((res["count"], res["breakdowns"]["sex"], res["breakdowns"]["age_band"]))
                assert answers[0] == answers[1], cohort
                assert answers[0][0] > 0, cohort

            # -- incremental re-import: one row removed, one changed at the source -------------------------
            conn = await asyncpg.connect(omop_pg)
            try:
                await conn.execute("DELETE FROM cdm.condition_occurrence WHERE condition_occurrence_id = 1")
                await conn.execute("UPDATE cdm.measurement SET value_as_number = 999 WHERE measurement_id = 1")
            finally:
                await conn.close()
            async with http.post(b.url + "/omop/import", json={"schema": "cdm"}, headers=b.headers("admin")) as r:
                assert r.status == 200, await r.text()
                again = (await r.json())["changes"]
            assert again["cm_condition"] == {"inserted": 0, "updated": 0, "deleted": 1,
                                             "unchanged": expected["condition_occurrence"] - 1}
            assert again["cm_observation"]["updated"] == 1 and again["cm_observation"]["inserted"] == 0
            assert again["cm_patient"]["unchanged"] == expected["person"]
            counts_b = await _cm_counts(b)
            assert counts_b["cm_condition"] == (await _cm_counts(a))["cm_condition"] - 1
            async with b.app[keys.DB].read() as c:
                v = (await c.execute(select(s.cm_observation.c.value_num).where(
                    s.cm_observation.c.src_id == "measurement/1"))).scalar()
            assert v == 999
        finally:
            await a.server.close()
            if b is not None:
                await b.server.close()
            if b_name:
                await drop_pg_database(b_name)


class ProfileGate:
    """A gate whose scope admits one ConsentProfile (the shape the consent gate produces)."""

    def __init__(self, profile: str) -> None:
        self.scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({profile}), summary="test")

    async def scope_for(self, requester):
        return self.scope


async def test_export_only_patients_in_consent_scope(tmp_path, db_url, omop_pg):
    """The site policy grants research use to female patients only: the export holds them and their
    rows, nobody else.  With the real ConsentGate wired into the app this runs through it; while the
    app still runs the OpenGate placeholder, a test gate returns the restricted AccessScope the consent
    gate would (profile keys on cm_patient)."""
    async with aiohttp.ClientSession() as http:
        gw = await _site(tmp_path / "a", db_url, omop_pg, sexes=["female"])
        real_gate = type(gw.app[keys.GATE]).__name__ != "OpenGate"
        if not real_gate:
            await gw.server.close()
            gw = await _site(tmp_path / "b", db_url, omop_pg, gate=ProfileGate("research-ok"), sexes=["female"])
        try:
            await _load_synthea(gw, http)
            async with gw.app[keys.DB].write() as conn:
                ok = set((await conn.execute(select(s.cm_patient.c.patient_id)
                                             .where(s.cm_patient.c.sex == "female"))).scalars())
                if not real_gate:
                    await conn.execute(update(s.cm_patient).where(s.cm_patient.c.patient_id.in_(ok))
                                       .values(consent_profile="research-ok"))
                    await conn.execute(update(s.cm_patient).where(s.cm_patient.c.patient_id.not_in(ok))
                                       .values(consent_profile="withdrawn"))
                n_cond = (await conn.execute(select(func.count()).select_from(s.cm_condition)
                                             .where(s.cm_condition.c.patient_id.in_(ok)))).scalar()
                total = (await conn.execute(select(func.count()).select_from(s.cm_patient))).scalar()
            assert 0 < len(ok) < total
            async with http.post(gw.url + "/omop/export", json={"format": "postgresql", "schema": "scoped"},
                                 headers=gw.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
            conn = await asyncpg.connect(omop_pg)
            try:
                exported = {r[0] for r in await conn.fetch("SELECT person_source_value FROM scoped.person")}
                assert exported == ok
                assert await conn.fetchval("SELECT count(*) FROM scoped.condition_occurrence") == n_cond
                for t in ("visit_occurrence", "measurement", "observation", "procedure_occurrence", "image_occurrence"):
                    stray = await conn.fetchval(f"SELECT count(*) FROM scoped.{t} x WHERE NOT EXISTS "
                                                f"(SELECT 1 FROM scoped.person p WHERE p.person_id = x.person_id)")
                    assert stray == 0
            finally:
                await conn.close()
        finally:
            await gw.server.close()


async def test_dicom_series_and_sr_measurements_become_image_occurrence_and_feature(tmp_path, db_url, omop_pg):
    """DICOM index rows (as STOW-RS indexing writes them) → one image_occurrence per series and an
    image_feature per numeric SR item, linked to the measurement row holding the value."""
    async with aiohttp.ClientSession() as http:
        gw = await _site(tmp_path / "a", db_url, omop_pg)
        try:
            pid = "omop-dicom-pt"
            h = gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}
            async with http.put(f"{gw.fhir}/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female",
                                                                  "birthDate": "1960-02-03"}, headers=h) as r:
                assert r.status == 201
            st = s.metadata.tables["dcm_study"]
            se = s.metadata.tables["dcm_series"]
            inst = s.metadata.tables["dcm_instance"]
            item = s.metadata.tables["dcm_sr_item"]
            now = time.time()
            study = "1.2.3.4.5." + str(uuid.uuid4().int)[:12]
            ct, sr = study + ".1", study + ".2"
            async with gw.app[keys.DB].write() as conn:
                await conn.execute(st.insert().values(study_uid=study, patient_id=pid, study_date="20210304",
                                                      modalities="CT\\SR", num_series=2, num_instances=2, updated_ts=now))
                await conn.execute(se.insert(), [
                    {"series_uid": ct, "study_uid": study, "patient_id": pid, "modality": "CT", "body_part": "chest",
                         "series_date": "20210304", "num_instances": 1, "updated_ts": now},
                    {"series_uid": sr, "study_uid": study, "patient_id": pid, "modality": "SR", "body_part": None,
                         "series_date": "20210304", "num_instances": 1, "updated_ts": now}])
                await conn.execute(inst.insert(), [
                    {"sop_uid": ct + ".1", "series_uid": ct, "study_uid": study, "patient_id": pid, "blob_path": "x", "size": 1, "stored_ts": now},
                    {"sop_uid": sr + ".1", "series_uid": sr, "study_uid": study, "patient_id": pid, "blob_path": "y", "size": 1, "stored_ts": now}])
                base = {"sop_uid": sr + ".1", "patient_id": pid, "depth": 2, "group_item_id": "1.5", "num_value": None,
                        "unit_code": None, "ref_sop_uid": None, "text_value": None, "code_scheme": None, "code_value": None}
                await conn.execute(item.insert(), [
                    base | {"item_id": "1.5.1", "value_type": "NUM", "concept_scheme": "SCT", "concept_code": "81827009",
                            "concept_meaning": "Diameter", "num_value": 12.5, "unit_code": "mm", "ref_sop_uid": ct + ".1"},
                    base | {"item_id": "1.5.2", "value_type": "CODE", "concept_scheme": "DCM", "concept_code": "121071",
                            "concept_meaning": "Finding", "code_scheme": "SCT", "code_value": "52988006"},
                    base | {"item_id": "1.2", "group_item_id": None, "depth": 1, "value_type": "TEXT",
                            "concept_scheme": "DCM", "concept_code": "111001", "concept_meaning": "Algorithm Name",
                            "text_value": "fedgate-test-algo"}])
            async with http.post(gw.url + "/omop/export", json={"format": "postgresql", "schema": "img"},
                                 headers=gw.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
                report = await r.json()
            assert report["counts"]["image_occurrence"] == 2
            assert report["counts"]["image_feature"] == 1
            conn = await asyncpg.connect(omop_pg)
            try:
                rows = {r["image_series_uid"]: r for r in await conn.fetch("SELECT * FROM img.image_occurrence")}
                assert rows[ct]["modality_concept_id"] == 2128009190 and rows[ct]["anatomic_site_concept_id"] == 2128021433
                assert rows[ct]["wadors_uri"] == f"/dicomweb/studies/{study}/series/{ct}"
                assert str(rows[ct]["image_occurrence_date"]) == "2021-03-04"
                f = await conn.fetchrow("SELECT f.*, m.value_as_number, m.measurement_source_value, m.unit_source_value "
                                        "FROM img.image_feature f JOIN img.measurement m ON m.measurement_id = f.image_feature_event_id")
                assert f["image_occurrence_id"] == rows[ct]["image_occurrence_id"]  # the referenced CT series
                assert float(f["value_as_number"]) == 12.5 and f["measurement_source_value"] == "81827009"
                assert f["unit_source_value"] == "mm"
                assert f["alg_system"] == "fedgate-test-algo"  # TID 4019 algorithm name of the SR
                assert f["image_finding_concept_id"] == 0  # the group's finding (SCT 52988006: not in the subset)
                procs = await conn.fetchval("SELECT count(DISTINCT procedure_occurrence_id) FROM img.image_occurrence")
                assert procs == 1  # one imaging procedure per study
            finally:
                await conn.close()
        finally:
            await gw.server.close()


async def test_cli_export_csv_and_postgres_then_import(tmp_path, db_url, omop_pg):
    """``fedgate load`` → ``fedgate omop export`` (CSV and PostgreSQL) → ``fedgate omop import``."""
    import asyncio
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    b_url, b_name = await _second_store(db_url, tmp_path)
    try:
        config = tmp_path / "fedgate.toml"
        config.write_text(f'deid_policy = "*=identified"\n[consent]\npolicy = "{consent_policy(tmp_path / "policy.json")}"\n'
                          'refresh_s = 0\n')
        store = ["--config", str(config), "--data-dir", str(tmp_path / "a"), "--database-url", db_url,
                 "--log-level", "WARNING"]
        files = [str(p) for p in SYNTHEA[:3]]
        r = await asyncio.to_thread(cli, "load", *store, "--quiet", "--strict", *files)
        assert r.returncode == 0, r.stderr
        expected = expected_counts(_resources([json.loads(Path(f).read_text()) for f in files]))
        r = await asyncio.to_thread(cli, "omop", "export", *store, "--csv", str(tmp_path / "csv"))
        assert r.returncode == 2 and "--purpose" in r.stderr  # research purpose required
        r = await asyncio.to_thread(cli, "omop", "export", *store, "--purpose", "DUO:0000042",
                                    "--csv", str(tmp_path / "csv"))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["counts"] == {t: expected.get(t, 0) for t in json.loads(r.stdout)["counts"]}
        r = await asyncio.to_thread(cli, "omop", "export", *store, "--purpose", "DUO:0000042",
                                    "--pg-url", omop_pg, "--schema", "cli")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(cli, "omop", "import", "--data-dir", str(tmp_path / "b"), "--database-url", b_url,
                                    "--pg-url", omop_pg, "--schema", "cli")
        assert r.returncode == 0, r.stderr
        changes = json.loads(r.stdout)["changes"]
        assert changes["cm_patient"]["inserted"] == expected["person"]
        assert changes["cm_condition"]["inserted"] == expected["condition_occurrence"]
    finally:
        if b_name:
            await drop_pg_database(b_name)


def ct_instance(patient_key: str, study_uid: str, series_uid: str) -> bytes:
    """A small, valid CT Image Storage instance (pydicom), PatientID = a stored FHIR Patient identifier."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_key, "Test^Omop", "19700101", "M"
    ds.StudyDate, ds.SeriesDate, ds.StudyTime = "20220315", "20220315", "101500"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 1, 1
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "A1", "1", ""
    ds.Manufacturer, ds.SliceThickness, ds.KVP = "TestCo", 1.0, 120
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelSpacing, ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.5, 0.5], [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def test_stow_ct_study_appears_in_image_occurrence(tmp_path, db_url, omop_pg):
    """STOW-RS a CT instance for a Synthea patient → the export's image_occurrence has its series,
    under the patient the DICOM index assigned, with the DICOMweb URI, once (the DICOM index wins over the
    FHIR ImagingStudy that STOW also writes)."""
    async with aiohttp.ClientSession() as http:
        gw = await _site(tmp_path / "a", db_url, omop_pg)
        try:
            bundles = await _load_synthea(gw, http)
            patient = next(e["resource"] for e in bundles[0]["entry"] if e["resource"]["resourceType"] == "Patient")
            ident = patient["identifier"][0]
            async with http.get(f"{gw.fhir}/Patient", params={"identifier": f"{ident['system']}|{ident['value']}"},
                                headers=gw.headers("clinician")) as r:
                pid = (await r.json())["entry"][0]["resource"]["id"]
            study, series = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"
            body = ct_instance(ident["value"], study, series)
            boundary = "omop-test-boundary"
            payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
                       + f"\r\n--{boundary}--\r\n".encode())
            h = gw.headers("pacs") | {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                      "Accept": "application/dicom+json"}
            async with http.post(gw.dicomweb + "/studies", data=payload, headers=h) as r:
                assert r.status == 200, await r.text()
            async with http.post(gw.url + "/omop/export", json={"format": "postgresql", "schema": "stow"},
                                 headers=gw.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
            conn = await asyncpg.connect(omop_pg)
            try:
                rows = await conn.fetch("SELECT io.*, p.person_source_value FROM stow.image_occurrence io "
                                        "JOIN stow.person p USING (person_id) WHERE image_study_uid = $1", study)
                assert len(rows) == 1
                row = rows[0]
                async with gw.app[keys.DB].read() as c:
                    owner = (await c.execute(select(s.metadata.tables["dcm_study"].c.patient_id).where(
                        s.metadata.tables["dcm_study"].c.study_uid == study))).scalar()
                assert owner in (pid, f"dicom-{owner[6:]}")  # the FHIR patient or the DICOM-born one STOW made
                assert row["image_series_uid"] == series and row["person_source_value"] == owner
                assert row["modality_concept_id"] == 2128009190 and row["anatomic_site_concept_id"] == 2128021433
                assert row["wadors_uri"] == f"/dicomweb/studies/{study}/series/{series}"
                assert str(row["image_occurrence_date"]) == "2022-03-15"
            finally:
                await conn.close()
        finally:
            await gw.server.close()


def _num_items(ds) -> list:
    out = []
    for child in ds.get("ContentSequence") or ():
        if child.get("ValueType") == "NUM" and child.get("MeasuredValueSequence"):
            out.append(child)
        out += _num_items(child)
    return out


async def test_stow_tid1500_sr_becomes_image_feature(tmp_path, db_url, omop_pg):
    """STOW-RS the highdicom demo CT + TID 1500 SR of a patient known to FHIR → one image_feature per
    numeric SR measurement (counted here with pydicom), linked to the CT series the measurement group
    points at and to the measurement row holding the value."""
    import asyncio

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    ct_file, sr_file = data_path("dicom", "highdicom", "ct_image.dcm"), data_path("dicom", "highdicom", "sr_document.dcm")
    ct, sr = pydicom.dcmread(ct_file), pydicom.dcmread(sr_file)
    nums = _num_items(sr)
    assert nums
    async with aiohttp.ClientSession() as http:
        gw = await _site(tmp_path / "a", db_url, omop_pg)
        try:
            # the FHIR patient the DICOM PatientID matches (the demo files carry no birth date; OMOP needs one)
            patient = {"resourceType": "Patient", "id": "sr-pt", "gender": "female", "birthDate": "1950-06-01",
                       "identifier": [{"system": "urn:test:mrn", "value": str(sr.PatientID)}]}
            async with http.put(f"{gw.fhir}/Patient/sr-pt", json=patient,
                                headers=gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
                assert r.status == 201, await r.text()
            client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs"))
            res = await asyncio.to_thread(client.store_instances, [ct, sr])
            assert "FailedSOPSequence" not in res
            async with http.post(gw.url + "/omop/export", json={"format": "postgresql", "schema": "sr"},
                                 headers=gw.headers("analyst", purpose=PURPOSE)) as r:
                assert r.status == 200, await r.text()
                report = await r.json()
            assert report["counts"]["image_feature"] == len(nums)
            conn = await asyncpg.connect(omop_pg)
            try:
                rows = await conn.fetch(
                    "SELECT f.*, m.value_as_number, m.measurement_source_value, io.image_series_uid, p.person_source_value "
                    "FROM sr.image_feature f JOIN sr.measurement m ON m.measurement_id = f.image_feature_event_id "
                    "JOIN sr.image_occurrence io USING (image_occurrence_id) JOIN sr.person p ON p.person_id = f.person_id")
                assert sorted(float(r["value_as_number"]) for r in rows) == sorted(
                    float(n.MeasuredValueSequence[0].NumericValue) for n in nums)
                assert sorted(r["measurement_source_value"] for r in rows) == sorted(
                    n.ConceptNameCodeSequence[0].CodeValue for n in nums)
                assert {r["person_source_value"] for r in rows} == {"sr-pt"}
                assert {r["image_series_uid"] for r in rows} == {str(ct.SeriesInstanceUID)}  # the measured image
                assert all(r["image_finding_concept_id"] is not None for r in rows)  # the group's Finding
            finally:
                await conn.close()
        finally:
            await gw.server.close()
