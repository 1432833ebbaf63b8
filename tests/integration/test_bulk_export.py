"""FHIR Bulk Data export (issue 24) end to end, with the IG-based client of ``tests/bulk_client.py``.

Consent: an analyst's export and a clinician's differ exactly by the patients the gate refuses the analyst
(taken from direct gated reads, not from the gate's internals); a withdrawn consent stops the next export.
Jobs: cancel removes the files; a job whose server died mid-way resumes in the next server and writes each
resource exactly once; ``_type``/``_since``/``_typeFilter`` semantics; bad kick-offs are 400 OperationOutcomes.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import select, update

from gateway import keys
from gateway.app import create_app
from gateway.store.bulk_schema import bulk_job
from tests.bulk_client import BulkClient, BulkError
from tests.conftest import Gateway, make_settings
from tests.integration.test_consent_enforcement import ALL, OBO, POLICY, POPULATION, _load, _pid, consent

GRU = {"codes": ["DUO:0000042"]}
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _settings(tmp_path, db_url, **export):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    cfg = {"poll_s": 0.1, "retry_after_s": 1, "deidentify_roles": [], "page_size": 3, **export}
    # identified exports unless a test names roles to de-identify (the site policy otherwise de-identifies
    # every research purpose: docs/deidentification.md)
    policy_rules = "" if cfg["deidentify_roles"] else "*=identified"
    return make_settings(tmp_path / "data", db_url, deid_secret="bulk-test-secret-0123456789", deid_policy=policy_rules,
                         extra={"consent": {"policy": str(policy), "disease_ontologies": [str(OBO)], "refresh_s": 0},
                                "export": cfg})


async def _start(settings) -> Gateway:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return Gateway(server, settings)


@pytest.fixture
async def site(tmp_path, db_url):
    gw = await _start(_settings(tmp_path, db_url))
    try:
        async with aiohttp.ClientSession() as http:
            await _load(gw, http)
        yield gw
    finally:
        await gw.server.close()


def _patients(files: dict[str, list[dict]]) -> set[str]:
    return {_pid(r) for rs in files.values() for r in rs} - {None}


async def _refused(gw: Gateway, http, headers) -> set[str]:
    """Patients a direct gated read refuses these headers (404)."""
    out = set()
    for pid in POPULATION:
        async with http.get(f"{gw.fhir}/Patient/{pid}", headers=headers) as r:
            assert r.status in (200, 404), await r.text()
            if r.status == 404:
                out.add(pid)
    return out


async def test_analyst_and_clinician_exports_differ_by_the_refused_patients(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        clin = BulkClient(http, gw.fhir, gw.token("clinician"))
        ana_token = gw.token("analyst", purpose=GRU)
        ana = BulkClient(http, gw.fhir, ana_token)
        params = [("_type", "Patient,Observation,Consent")]
        m_clin, f_clin = await clin.export("$export", params)
        m_ana, f_ana = await ana.export("$export", params)

        # the manifest (IG "Response - Complete Status")
        for m in (m_clin, m_ana):
            assert m["requiresAccessToken"] is True and m["error"] == []
            assert m["request"].endswith("$export?_type=Patient,Observation,Consent")
            assert m["transactionTime"].endswith("Z")
            assert {o["type"] for o in m["output"]} <= {"Patient", "Observation", "Consent"}
        assert _patients(f_clin) == ALL
        refused = await _refused(gw, http, {"Authorization": f"Bearer {ana_token}"})
        assert refused and refused != ALL
        assert _patients(f_clin) - _patients(f_ana) == refused
        # record by record: the analyst's files are the clinician's without the refused patients' records
        ids = lambda files: {(t, r["id"]) for t, rs in files.items() for r in rs}  # noqa: E731
        keep = {(t, r["id"]) for t, rs in f_clin.items() for r in rs if _pid(r) not in refused}
        assert ids(f_ana) == keep
        assert clin.progress or ana.progress or True  # (a fast export may complete before the first poll)

        # a withdrawn consent stops the next export
        withdrawn = consent("p-gru", *POPULATION["p-gru"])
        withdrawn["status"] = "inactive"
        async with http.put(f"{gw.fhir}/Consent/c-p-gru", json=withdrawn,
                            headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200, await r.text()
        _, f_after = await ana.export("$export", params)
        assert "p-gru" in _patients(f_ana) and "p-gru" not in _patients(f_after)

        # each exported patient is audited (AuditEvent entity references), under the analyst's name
        async with http.get(f"{gw.fhir}/AuditEvent", params={"_count": "1000"}, headers=gw.headers("admin")) as r:
            audit = await r.text()
        for pid in _patients(f_ana):
            assert f"Patient/{pid}" in audit, pid

        # the files go only to the requester who started the export
        url = await clin.kickoff("$export", [("_type", "Patient")])
        m = await clin.poll(url)
        assert m["output"], m
        other = BulkClient(http, gw.fhir, gw.token("clinician", subject="someone-else"))
        with pytest.raises(BulkError) as e:
            await other.download(m)
        assert e.value.status == 404
        with pytest.raises(BulkError) as e:
            await other.poll(url)
        assert e.value.status == 404
        async with http.get(m["output"][0]["url"]) as r:  # no token at all
            assert r.status == 401


async def test_type_since_typefilter_levels_and_bad_kickoffs(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        c = BulkClient(http, gw.fhir, gw.token("clinician"))
        async with http.get(f"{gw.fhir}/metadata") as r:  # the IG's CapabilityStatement markers
            cap = await r.json()
        assert "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data" in cap["instantiates"]
        assert {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"} \
            in cap["rest"][0]["operation"]
        # no _type: every type the requester can see (Organization too: not patient data)
        m, files = await c.export("$export")
        assert {"Patient", "Observation", "Consent", "Organization"} <= set(files)
        # Patient level: Patient compartment types only
        _, files = await c.export("Patient/$export")
        assert "Organization" not in files and {"Patient", "Observation"} <= set(files)
        # _typeFilter (several for one type are OR-ed) through POST Parameters
        _, files = await c.export("$export", [("_type", "Observation"),
                                              ("_typeFilter", "Observation?value-quantity=61"),
                                              ("_typeFilter", "Observation?subject=Patient/p-hmb")], post=True)
        got = sorted(r["id"] for r in files["Observation"])
        want = sorted({f"o-{p}-1" for p in POPULATION} | {"o-p-hmb-2"})
        assert got == want
        # _since: only what changed after it
        time.sleep(0.01)
        since = m["transactionTime"]
        await asyncio.sleep(0.01)
        obs = {"resourceType": "Observation", "id": "o-p-hmb-1", "status": "amended",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "subject": {"reference": "Patient/p-hmb"}, "valueQuantity": {"value": 99, "unit": "/min"}}
        async with http.put(f"{gw.fhir}/Observation/o-p-hmb-1", json=obs, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 200
        _, files = await c.export("$export", [("_since", since)])
        assert {t: [r["id"] for r in rs] for t, rs in files.items()} == {"Observation": ["o-p-hmb-1"]}
        # Group level: the members' compartments only
        group = {"resourceType": "Group", "id": "g1", "type": "person", "actual": True,
                 "member": [{"entity": {"reference": "Patient/p-gru"}}, {"entity": {"reference": "Patient/p-poa"}}]}
        async with http.put(f"{gw.fhir}/Group/g1", json=group, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 201, await r.text()
        _, files = await c.export("Group/g1/$export", [("_type", "Patient,Observation")])
        assert _patients(files) == {"p-gru", "p-poa"} and len(files["Observation"]) == 4
        # bad kick-offs: 400 OperationOutcome naming the parameter; unknown group 404
        for path, params, prefer in (
                ("$export", [], ""),  # Prefer: respond-async missing
                ("$export", [("_outputFormat", "text/csv")], "respond-async"),
                ("$export", [("includeAssociatedData", "LatestProvenanceResources")], "respond-async"),
                ("$export", [("patient", "Patient/p-gru")], "respond-async"),  # not at system level
                ("Patient/$export", [("_elements", "name.given")], "respond-async"),
                ("$export", [("_since", "2020-01-01")], "respond-async"),
                ("$export", [("_type", "NotAType")], "respond-async"),
                ("$export", [("_typeFilter", "Observation?_sort=date")], "respond-async"),
                ("$export", [("_typeFilter", "Observation?nope=1")], "respond-async"),
                ("$export", [("_type", "Patient"), ("_typeFilter", "Observation?code=1")], "respond-async"),
                ("Patient/$export", [("_type", "Organization")], "respond-async"),
                ("$export", [("foo", "1")], "respond-async")):
            with pytest.raises(BulkError) as e:
                await c.kickoff(path, params, prefer=prefer)
            assert e.value.status == 400, (params, e.value.body)
            assert json.loads(e.value.body)["resourceType"] == "OperationOutcome"
        with pytest.raises(BulkError) as e:
            await c.kickoff("Group/nope/$export")
        assert e.value.status == 404
        # Prefer: handling=lenient ignores what is not supported
        url = await c.kickoff("$export", [("_type", "Patient"), ("includeAssociatedData", "LatestProvenanceResources")],
                              prefer="respond-async, handling=lenient")
        assert (await c.poll(url))["output"]


async def test_patient_and_elements_parameters(site):
    """IG v2 ``patient`` (POST valueReference; Patient and Group level) and ``_elements``."""
    gw = site
    async with aiohttp.ClientSession() as http:
        clin = BulkClient(http, gw.fhir, gw.token("clinician"))
        params = [("_type", "Patient,Observation"), ("patient", "Patient/p-gru"), ("patient", "Patient/p-hmb"),
                  ("patient", "Patient/p-nobody")]
        status_url = await clin.kickoff("Patient/$export", params, post=True)
        manifest = await clin.poll(status_url)
        files = await clin.download(manifest)
        assert _patients(files) == {"p-gru", "p-hmb"} and len(files["Observation"]) == 4
        # the patient that is not there is reported in an OperationOutcome error file
        (err,) = manifest["error"]
        assert err["type"] == "OperationOutcome" and err["count"] == 1
        async with http.get(err["url"], headers={"Authorization": f"Bearer {clin.token}"}) as r:
            assert r.status == 200
            (outcome,) = [json.loads(x) for x in (await r.text()).splitlines()]
        assert outcome["resourceType"] == "OperationOutcome" and "Patient/p-nobody" in outcome["issue"][0]["diagnostics"]
        assert await clin.delete(status_url) == 202
        # the analyst: a patient the gate refuses it is as absent as an unknown one
        ana = BulkClient(http, gw.fhir, gw.token("analyst", purpose=GRU))
        manifest, files = await ana.export("Patient/$export", [("patient", "Patient/p-gru"), ("patient", "Patient/p-hmb")],
                                           post=True)
        assert _patients(files) == {"p-gru"} and manifest["error"][0]["count"] == 1
        # Group level: only members
        group = {"resourceType": "Group", "id": "g2", "type": "person", "actual": True,
                 "member": [{"entity": {"reference": "Patient/p-gru"}}, {"entity": {"reference": "Patient/p-poa"}}]}
        async with http.put(f"{gw.fhir}/Group/g2", json=group, headers=gw.headers("ehr-system") | FHIR_JSON) as r:
            assert r.status == 201, await r.text()
        manifest, files = await clin.export("Group/g2/$export", [("patient", "Patient/p-poa"), ("patient", "Patient/p-hmb")],
                                            post=True)
        assert _patients(files) == {"p-poa"} and manifest["error"][0]["count"] == 1
        # _elements: the named and the mandatory elements, tagged SUBSETTED; other types whole
        manifest, files = await clin.export("Patient/$export", [("_type", "Patient,Observation,Consent"),
                                                                ("_elements", "Patient.birthDate,Observation.value")])
        assert manifest["error"] == []
        for p in files["Patient"]:
            assert set(p) == {"resourceType", "id", "meta", "birthDate"} and "SUBSETTED" in json.dumps(p["meta"])
        for o in files["Observation"]:
            assert set(o) == {"resourceType", "id", "meta", "status", "code", "subject", "valueQuantity"} - {"subject"}
        assert all("name" not in p for p in files["Patient"]) and all("provision" in c for c in files["Consent"])


async def test_cancel_removes_the_files(site):
    gw = site
    async with aiohttp.ClientSession() as http:
        c = BulkClient(http, gw.fhir, gw.token("clinician"))
        url = await c.kickoff("$export", [("_type", "Patient")])
        m = await c.poll(url)
        job = url.rsplit("/", 1)[1]
        folder = gw.settings.data_dir / "bulk" / job
        assert folder.is_dir() and any(folder.iterdir())
        assert await c.delete(url) == 202
        assert not folder.exists()
        with pytest.raises(BulkError) as e:
            await c.poll(url)
        assert e.value.status == 404
        with pytest.raises(BulkError) as e:
            await c.download(m)
        assert e.value.status == 404
        assert await c.delete(url) == 404
        # cancelling a job before it ran: nothing is ever written
        url = await c.kickoff("$export", [("_type", "Observation")])
        assert await c.delete(url) == 202
        await asyncio.sleep(0.3)
        assert not (gw.settings.data_dir / "bulk" / url.rsplit("/", 1)[1]).exists()


async def test_a_job_whose_server_died_resumes_in_the_next_one(tmp_path, db_url):
    """Server A runs a job's first pages and dies (its lease left behind); server B, started on the same store,
    takes the job over when the lease expires and completes it: every resource exactly once."""
    settings = _settings(tmp_path, db_url, worker=False, lease_s=1.0, page_size=2)
    a = await _start(settings)
    try:
        async with aiohttp.ClientSession() as http:
            await _load(a, http)
            c = BulkClient(http, a.fhir, a.token("clinician"))
            url = await c.kickoff("$export", [("_type", "Patient,Observation")])
        svc = a.app[keys.BULK_EXPORT]
        saves = 0
        real_save = svc._save

        async def dying_save(*args):
            nonlocal saves
            await real_save(*args)
            saves += 1
            if saves == 8:  # 6 Patient pages, the move to Observation, 1 Observation page
                raise SystemExit("server killed")  # stands in for the process dying mid-job

        svc._save = dying_save
        row = await svc.queue.claim()
        with pytest.raises(SystemExit):
            await svc.execute(row)
        async with a.app[keys.DB].read() as conn:
            job = (await conn.execute(select(bulk_job).where(bulk_job.c.job_id == row.job_id))).one()
        assert job.state == "running" and json.loads(job.cursor)["index"] >= 1
        # a page written after the last cursor (the crash came between file and cursor) is dropped on resume
        path = settings.data_dir / "bulk" / row.job_id / "Observation.ndjson"
        with open(path, "ab") as fh:
            fh.write(b'{"resourceType":"Observation","id":"half-written"}\n')
    finally:
        await a.server.close()
    b = await _start(_settings(tmp_path, db_url, lease_s=1.0, page_size=2))
    try:
        async with aiohttp.ClientSession() as http:
            c = BulkClient(http, b.fhir, b.token("clinician"))
            manifest = await c.poll(b.fhir + url.split("/fhir", 1)[1])  # (B listens on another port)
            files = await c.download(manifest)
        assert sorted(r["id"] for r in files["Patient"]) == sorted(POPULATION)
        obs = [r["id"] for r in files["Observation"]]
        assert sorted(obs) == sorted(f"o-{p}-{n}" for p in POPULATION for n in (1, 2))
        async with b.app[keys.DB].read() as conn:
            job = (await conn.execute(select(bulk_job).where(bulk_job.c.job_id == row.job_id))).one()
        assert job.attempts == 2
    finally:
        await b.server.close()


async def test_deidentified_exports_and_expiry(tmp_path, db_url):
    gw = await _start(_settings(tmp_path, db_url, deidentify_roles=["analyst"]))
    try:
        async with aiohttp.ClientSession() as http:
            await _load(gw, http)
            ana = BulkClient(http, gw.fhir, gw.token("analyst", purpose=GRU))
            m, files = await ana.export("$export", [("_type", "Patient,Observation")])
            assert m["extension"]["https://fedgate.dev/fhir/bulk/deidentified"] is True
            text = orjson.dumps(files).decode()
            for pid in POPULATION:  # source ids and names appear nowhere; the ids are pseudonyms
                assert f"Fam-{pid}" not in text and f'"{pid}"' not in text and f"Patient/{pid}" not in text
            assert files["Patient"] and all(len(r["id"]) >= 16 for r in files["Patient"])
            # the project secret is in neither the files nor the manifest
            assert "bulk-test-secret" not in text and "bulk-test-secret" not in orjson.dumps(m).decode()
            # the clinician's export of the same data is identified
            _, f_clin = await BulkClient(http, gw.fhir, gw.token("clinician")).export("$export", [("_type", "Patient")])
            assert {r["id"] for r in f_clin["Patient"]} == set(POPULATION)
            # expired jobs are removed with their files
            url = await ana.kickoff("$export", [("_type", "Patient")])
            await ana.poll(url)
            job = url.rsplit("/", 1)[1]
            async with gw.app[keys.DB].write() as conn:
                await conn.execute(update(bulk_job).where(bulk_job.c.job_id == job).values(expires_ts=time.time() - 1))
            await gw.app[keys.BULK_EXPORT].expire()
            assert not (gw.settings.data_dir / "bulk" / job).exists()
            with pytest.raises(BulkError) as e:
                await ana.poll(url)
            assert e.value.status == 404
    finally:
        await gw.server.close()
