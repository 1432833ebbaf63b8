"""Federated training end to end (issue 7): a hub and three site gateways on loopback.

Every site is loaded through its own APIs — FHIR transaction (Patients, DUO Consents, lesion
Conditions) and STOW-RS with dicomweb-client (labelled 64×64 CT slices) — and runs the real consent
gate.  The sites' lesions differ in kind (tests/training_data.py), so a model trained at one site alone
does not recognise the others'.  Expected values are computed in the test: AUROC on a pooled test set
generated independently, FedAvg from the sites' own answers, manifests from the site's own table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections import Counter

import aiohttp
import numpy as np
import orjson
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from gateway.services.federation import sign_hub_token
from gateway.store.db import Database
from gateway.store.training_runs import load_checkpoint
from gateway.store.training_schema import trn_run
from inference import fl
from tests.conftest import ENGINES, PG_ADMIN, create_pg_database, drop_pg_database, make_settings, start_gateway
from tests.integration.federation_fixtures import hub_key_pem, site_federation, start_gateway_process, start_hub
from tests.training_data import KINDS, LESION, auroc, pooled_test_set, site_population, slice_and_mask, window01

PURPOSE = {"codes": ["DUO:0000042"]}
N_PATIENTS = 40
SITES = ("site-a", "site-b", "site-c")
COHORT = {"imaging": {"modality": "CT"}}
LABEL = {"condition": {"code": f"{LESION['system']}|{LESION['code']}"}}
FAST = {"optimizer": {"name": "adam", "lr": 0.01, "batch_size": 16}, "min_cohort": 10, "test_fraction": 0.3}

# The network of a hub and three loaded sites is built once per engine and shared by the tests that only
# add runs to it (every test starts its own runs and reads only those); a test that changes the sites'
# data (a consent withdrawn) gets a network of its own.  All run in the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def _site(tmp_path, db_url, name, kind, pub, **training):
    settings = make_settings(tmp_path / name, db_url, site_id=name, extra={
        "federation": site_federation(pub), "consent": {"refresh_s": 0},
        "training": {"min_cohort": 10, "cpu_watts": 12.0, "carbon_g_per_kwh": 400.0, **training},
        "inference": {"worker": True, "poll_s": 0.2, "settle_s": 0.2}})
    gw = await start_gateway(settings)
    return gw, await _load(gw, name, kind)


async def _load(gw, name, kind):
    bundle, datasets, labels = site_population(name, kind, N_PATIENTS, seed=KINDS.index(kind), seg=True)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.fhir, json=bundle, headers=gw.headers("ehr-system")
                             | {"Content-Type": "application/fhir+json"}) as r:
            assert r.status == 200, await r.text()
    client = DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs"))
    await asyncio.to_thread(client.store_instances, datasets)
    return labels


async def _network(tmp_path, db_url):
    priv, pub = hub_key_pem(tmp_path)
    sites = {}
    for name, kind in zip(SITES, KINDS):
        url = db_url if name == "site-c" else f"sqlite:///{tmp_path / (name + '.db')}"
        sites[name] = await _site(tmp_path, url, name, kind, pub)
    hub = await start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", priv, [(n, gw.url) for n, (gw, _) in sites.items()],
                          extra={"training": {"round_deadline_s": 120}})
    async with aiohttp.ClientSession() as http:
        yield {"hub": hub, "sites": sites, "http": http, "priv": priv, "pub": pub, "tmp": tmp_path}
    await hub.server.close()
    for gw, _ in sites.values():
        await gw.server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def net(request, tmp_path_factory):
    """The shared network; site-c's store on the engine of this parameter (the other stores SQLite)."""
    tmp_path = tmp_path_factory.mktemp("net")
    if request.param == "sqlite":
        db_url, pg = f"sqlite:///{tmp_path / 'fedgate.db'}", None
    else:
        pg = await create_pg_database()
        db_url = f"{PG_ADMIN}/{pg}"
    try:
        async for network in _network(tmp_path, db_url):
            yield dict(network, engine=request.param)
    finally:
        if pg is not None:
            await drop_pg_database(pg)


@contextlib.asynccontextmanager
async def hub_store(net, tmp_path, name):
    """A store of its own for a hub the test starts, on the engine of the network's parameter."""
    if net["engine"] == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    pg = await create_pg_database()
    try:
        yield f"{PG_ADMIN}/{pg}"
    finally:
        await drop_pg_database(pg)


def hub_toml(net, training: str = "", sites: dict | None = None) -> str:
    """Settings of a hub in its own ``fedgate serve`` process fanning out to the network's sites."""
    urls = sites or {n: gw.url for n, (gw, _) in net["sites"].items()}
    listed = "".join(f'[[federation.sites]]\nid = "{n}"\nurl = "{u}"\n' for n, u in urls.items())
    return (f'[federation]\nrole = "hub"\nhub_id = "hub"\nhub_key = "{net["priv"]}"\n{listed}'
            f'[training]\nround_deadline_s = 120\n{training}')


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_net(tmp_path, db_url):
    """A network of its own, for a test that changes the sites' data."""
    async for network in _network(tmp_path, db_url):
        yield network


def analyst(gw, purpose=PURPOSE, role="analyst"):
    return gw.headers(role, purpose=purpose, subject="ana")


async def start(net, **spec) -> str:
    hub = net["hub"]
    body = {"architecture": "ct_lesion_classifier", "cohort": COHORT, "label": LABEL, **FAST, **spec}
    async with net["http"].post(hub.url + "/training/runs", json=body, headers=analyst(hub)) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["id"]


async def run_doc(net, run_id) -> dict:
    hub = net["hub"]
    async with net["http"].get(f"{hub.url}/training/runs/{run_id}", headers=analyst(hub)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait(net, run_id, *, until=("succeeded", "failed", "cancelled"), rounds_done=None, timeout=240) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        doc = await run_doc(net, run_id)
        if doc["state"] in until or (rounds_done is not None and doc["round"] >= rounds_done):
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} not done after {timeout}s: {doc['state']} round {doc['round']}")


async def model(net, name, version) -> torch.jit.ScriptModule:
    hub = net["hub"]
    async with net["http"].get(f"{hub.url}/training/models/{name}/{version}/model.pt", headers=analyst(hub)) as r:
        assert r.status == 200
        return torch.jit.load(io.BytesIO(await r.read()))


def pooled_scores(m, x, y) -> tuple[float, float]:
    """(AUROC, mean log loss) of model ``m`` on the pooled test set."""
    with torch.inference_mode():
        p = m(torch.from_numpy(x))[:, 1].numpy().astype(np.float64)
    q = np.clip(p, 1e-6, 1 - 1e-6)
    loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return auroc(list(y), p.tolist()), loss


async def test_federated_model_beats_every_local_only_model(net):
    rounds, epochs = 12, 2
    fed = await wait(net, await start(net, rounds=rounds, local_epochs=epochs, min_sites=3))
    assert fed["state"] == "succeeded", fed["error"]
    local = {}
    for s in SITES:  # the same training budget at one site alone
        doc = await wait(net, await start(net, rounds=rounds, local_epochs=epochs, min_sites=1, sites=[s],
                                          name=f"local-{s}"))
        assert doc["state"] == "succeeded", doc["error"]
        local[s] = doc
    x, y = pooled_test_set(60, seed=1234)
    fed_model = await model(net, fed["model"]["name"], fed["model"]["version"])
    fed_auc, fed_loss = pooled_scores(fed_model, x, y)
    local_scores = {s: pooled_scores(await model(net, d["model"]["name"], d["model"]["version"]), x, y)
                    for s, d in local.items()}
    # "beats": lower pooled log loss than every local-only model, AUROC at least as high (a local model can
    # rank one other kind of lesion right by chance, never all three), and a clear margin on average
    print(f"pooled AUROC / log loss: federated {fed_auc:.3f} / {fed_loss:.3f}; local-only "
          + ", ".join(f"{s} {a:.3f} / {lo:.3f}" for s, (a, lo) in local_scores.items()))
    assert fed_auc > 0.9, (fed_auc, fed_loss, local_scores)
    for s, (auc, loss) in local_scores.items():
        assert fed_loss < loss and fed_auc >= auc, (s, fed_auc, fed_loss, local_scores)
    assert fed_auc > np.mean([a for a, _ in local_scores.values()]) + 0.1, (fed_auc, local_scores)

    # the exported weights are the ones the lineage names
    state = {k: v.numpy() for k, v in fed_model.state_dict().items()}
    assert fl.state_hash(state) == fed["model"]["weights_hash"] == fed["lineage"]["weights_hash"]
    lin = fed["lineage"]
    assert [r["round"] for r in lin["rounds"]] == list(range(1, rounds + 1))
    assert all(r["participants"] == sorted(SITES) for r in lin["rounds"])
    for r in lin["rounds"]:
        for s in SITES:
            site = r["sites"][s]
            assert site["status"] == "ok" and site["n_train"] > 0 and len(site["manifest_hash"]) == 64
    # per round and site: held-out evaluation with subgroups; energy adds up with the configured intensity
    assert len(fed["rounds"]) == rounds + 1  # + the final evaluation
    final = fed["rounds"][-1]["sites"]
    for s in SITES:
        m = final[s]["metrics"]
        assert m["n"] > 0 and m["auroc"] is not None and set(m["subgroups"]) == {"sex", "age_band", "manufacturer"}
    e = sum(v["energy_j"] for r in fed["rounds"] for v in r["sites"].values() if v["energy_j"])
    assert lin["energy_j"] == pytest.approx(e, rel=1e-3, abs=1e-3) and e > 0
    assert lin["co2e_g"] == pytest.approx(lin["energy_j"] / 3.6e6 * 400.0, rel=1e-3)
    # the model card carries the lineage
    async with net["http"].get(net["hub"].url + "/training/models", headers=analyst(net["hub"])) as r:
        cards = {(m["name"], m["version"]): m["card"] for m in (await r.json())["models"]}
    card = cards[(fed["model"]["name"], fed["model"]["version"])]
    assert card["provenance"]["lineage"]["weights_hash"] == fed["model"]["weights_hash"]
    assert card["provenance"]["lineage_id"].endswith(fed["id"])


async def test_fedavg_equals_central_weighted_average_of_the_site_updates(net):
    """One round through the hub, then the same round asked of each site directly (deterministic local
    training): the hub's new global weights = initial + Σ n_i Δ_i / Σ n_i computed here with numpy."""
    run_id = await start(net, rounds=1, local_epochs=1, min_sites=3, seed=5)
    doc = await wait(net, run_id)
    assert doc["state"] == "succeeded", doc["error"]
    init = fl.state_from_module(_module(5))
    body = {"run_id": run_id, "round": 1, "architecture": "ct_lesion_classifier", "cohort": COHORT, "label": LABEL,
            "images": {"modality": ["CT"]}, "local_epochs": 1, "optimizer": FAST["optimizer"], "min_cohort": 10,
            "seed": 5, "test_fraction": FAST["test_fraction"], "weights": base64.b64encode(fl.encode_state(init)).decode(), "train": True}
    updates = []
    for name, (gw, _) in net["sites"].items():
        raw = orjson.dumps(body)
        tok = sign_hub_token(_hub_key(net), "hub", name, _requester(), raw)
        async with net["http"].post(gw.url + "/federation/train/round", data=raw,
                                    headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            a = await r.json()
        updates.append((fl.decode_state(base64.b64decode(a["update"])), a["n_train"]))
    flat = np.stack([np.concatenate([u[k].ravel() for k in init]) for u, _ in updates]).astype(np.float64)
    w = np.array([n for _, n in updates], np.float64)
    expected = np.concatenate([init[k].ravel() for k in init]) + (w[:, None] * flat).sum(0) / w.sum()
    got_model = await model(net, doc["model"]["name"], doc["model"]["version"])
    got = np.concatenate([got_model.state_dict()[k].numpy().ravel() for k in init])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _module(seed):
    from gateway.services.training import make_module

    return make_module("ct_lesion_classifier", seed)


def _hub_key(net):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(open(net["priv"], "rb").read(), password=None)


def _requester():
    from gateway.context import Purpose, Requester

    return Requester("ana", frozenset({"analyst"}), None, {}, Purpose("research", ("DUO:0000042",)))


async def test_a_site_killed_mid_run_leaves_a_quorum(net, tmp_path):
    """site-p is a real ``fedgate serve`` process, SIGKILLed after the first round."""
    pub = net["pub"]
    proc_site = await start_gateway_process(tmp_path, "site-p", (
        f'[federation]\nrole = "site"\ntrusted_hubs = [{{id = "hub", public_key = "{pub}"}}]\n'
        f'[consent]\nrefresh_s = 0\n[training]\nmin_cohort = 10\n[inference]\nworker = false\n'))
    try:
        await _load(proc_site, "site-p", "ring")
        sites = {"site-a": net["sites"]["site-a"][0].url, "site-c": net["sites"]["site-c"][0].url, "site-p": proc_site.url}
        hub = await start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub3.db'}", net["priv"], list(sites.items()), name="hub3")
        n3 = dict(net, hub=hub)
        try:
            run_id = await start(n3, rounds=4, local_epochs=1, min_sites=2)
            doc = await wait(n3, run_id, rounds_done=1)
            assert doc["state"] == "running"
            proc_site.proc.kill()  # SIGKILL: no goodbye
            proc_site.proc.wait(10)
            doc = await wait(n3, run_id)
        finally:
            await hub.server.close()
    finally:
        proc_site.stop()
    assert doc["state"] == "succeeded", doc["error"]
    rounds = doc["lineage"]["rounds"]
    assert rounds[0]["participants"] == sorted(sites)
    later = [r for r in rounds if "site-p" not in r["participants"]]
    assert later and all(r["participants"] == ["site-a", "site-c"] for r in later)
    assert all(r["sites"]["site-p"]["status"] in ("error", "timeout") for r in later)


async def test_consent_withdrawn_between_rounds_is_excluded_next_round(fresh_net):
    net = fresh_net
    gw, labels = net["sites"]["site-a"]
    withdrawn = sorted(labels)[3]
    run_id = await start(net, rounds=5, local_epochs=2, min_sites=3)
    await wait(net, run_id, rounds_done=1)
    async with net["http"].get(f"{gw.fhir}/Consent/c-{withdrawn}", headers=gw.headers("ehr-system")) as r:
        consent = await r.json()
    consent["status"] = "inactive"
    async with net["http"].put(f"{gw.fhir}/Consent/c-{withdrawn}", json=consent,
                               headers=gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
        assert r.status == 200, await r.text()
    t_withdrawn = time.time()
    doc = await wait(net, run_id)
    assert doc["state"] == "succeeded", doc["error"]
    async with net["http"].get(f"{gw.url}/training/site/runs/{run_id}", headers=gw.headers("admin")) as r:
        assert r.status == 200, await r.text()
        manifests = (await r.json())["rounds"]

    def patients(m):
        return {p for p, _ in m["manifest"]["train"] + m["manifest"]["test"]}

    assert withdrawn in patients(manifests[0])
    after = [m for m in manifests if m["started_ts"] > t_withdrawn]
    assert after, "no round started after the withdrawal"
    for m in after:
        assert withdrawn not in patients(m)
        assert patients(m) == patients(manifests[0]) - {withdrawn}
    # the manifest hash reported to the hub is the hash of the site's own manifest
    by_round = {r["round"]: r["sites"]["site-a"]["manifest_hash"] for r in doc["lineage"]["rounds"]}
    for m in manifests:
        if m["round"] in by_round:
            assert by_round[m["round"]] == m["manifest_hash"]
    # analysts cannot read a site's manifests (patient ids stay with the site's admins)
    async with net["http"].get(f"{gw.url}/training/site/runs/{run_id}", headers=analyst(gw)) as r:
        assert r.status == 403


async def test_secure_aggregation_and_dp_runs_and_accounts(net):
    run_id = await start(net, rounds=2, local_epochs=1, min_sites=3, secure_aggregation=True,
                         dp={"clip": 5.0, "noise_multiplier": 0.1, "delta": 1e-5})
    doc = await wait(net, run_id)
    assert doc["state"] == "succeeded", doc["error"]
    lin = doc["lineage"]
    assert lin["secure_aggregation"] is True and lin["dp"]["epsilon"] == pytest.approx(
        fl.dp_epsilon(0.1, 2, 1e-5), rel=1e-9)
    # with masking, what a site sent the hub is not its update: every site's norm was reported separately
    for r in doc["rounds"][:-1]:
        for s in SITES:
            assert r["sites"][s]["status"] == "ok" and r["sites"][s]["update_norm"] > 0


async def test_bad_requests_refusals_and_policy(net, tmp_path):
    hub, http = net["hub"], net["http"]
    base = {"architecture": "ct_lesion_classifier", "cohort": COHORT, "label": LABEL}
    cases = [
        ({**base, "architecture": "resnet9000"}, analyst(hub), 400, "architecture"),
        ({**base, "rounds": 0}, analyst(hub), 400, "rounds"),
        ({**base, "cohort": {"imaging": {"bogus": 1}}}, analyst(hub), 400, "cohort"),
        ({**base, "colour": "red"}, analyst(hub), 400, "colour"),
        ({**base, "sites": ["nowhere"]}, analyst(hub), 400, "sites"),
        ({**base, "architecture": "ct_lesion_segmenter"}, analyst(hub), 400, "segment"),
        (base, hub.headers("clinician"), 403, "analyst"),
        (base, analyst(hub, purpose="treatment"), 403, "research purpose"),
        (base, {}, 401, "token"),
    ]
    async with http.get(hub.url + "/training/runs", headers=analyst(hub)) as r:
        before = [run["id"] for run in (await r.json())["runs"]]  # the runs of the tests before this one (the network is shared)
    for body, headers, status, word in cases:
        async with http.post(hub.url + "/training/runs", json=body, headers=headers) as r:
            text = await r.text()
            assert r.status == status, (body, text)
            assert r.content_type == "application/problem+json" and word in text, text
    async with http.get(hub.url + "/training/runs", headers=analyst(hub)) as r:
        assert [run["id"] for run in (await r.json())["runs"]] == before  # nothing was started
    # a site refuses a forged hub token (401) before doing anything
    gw, _ = net["sites"]["site-a"]
    raw = orjson.dumps({"run_id": "x", "round": 1})
    from cryptography.hazmat.primitives.asymmetric import ec

    tok = sign_hub_token(ec.generate_private_key(ec.SECP256R1()), "hub", "site-a", _requester(), raw)
    async with http.post(gw.url + "/federation/train/round", data=raw,
                         headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}) as r:
        assert r.status == 401
    # the analyst's own token works directly at a site; malformed round requests are 400 problem+json, never 500
    good = {"run_id": "direct", "round": 1, "architecture": "ct_lesion_classifier", "cohort": COHORT, "label": LABEL,
            "weights": base64.b64encode(fl.encode_state(fl.state_from_module(_module(0)))).decode(), "train": False}
    wrong = fl.state_from_module(_module(0))
    wrong.pop(next(iter(wrong)))
    for patch, word in (({"weights": "not base64!"}, "weights"),
                        ({"weights": base64.b64encode(b"garbage").decode()}, "weights"),
                        ({"weights": base64.b64encode(fl.encode_state(wrong)).decode()}, "weights"),
                        ({"round": 0}, "round"), ({"architecture": "x"}, "architecture"),
                        ({"cohort": {"nope": 1}}, "cohort"), ({"optimizer": {"name": "rmsprop"}}, "optimizer"),
                        ({"train": "yes"}, "train"), ({"dp_clip": -1}, "dp_clip"),
                        ({"secure": {"participants": {"site-a": "x", "site-b": "AAAA"}}}, "secure"),
                        ({"secure": {"participants": {"site-a": "x", "site-b": "@@@"}}}, "secure")):
        async with http.post(gw.url + "/federation/train/round", json={**good, **patch}, headers=analyst(gw)) as r:
            text = await r.text()
            assert r.status == 400 and word in text, (patch, r.status, text)
    async with http.post(gw.url + "/federation/train/round", json=good, headers=analyst(gw)) as r:
        assert r.status == 200, await r.text()
        assert "update" not in await r.json()  # evaluation only
    # cohort below the minimum at every site → refused (422) → no quorum → run failed, not a 500
    doc = await wait(net, await start(net, rounds=2, min_sites=2, min_cohort=1000))
    assert doc["state"] == "failed" and "min_sites" in doc["error"]
    assert {v["status"] for v in doc["rounds"][0]["sites"].values()} == {"refused"}
    # a site whose policy vetoes the purpose is recorded as refused, the others train
    priv, pub = net["priv"], net["pub"]
    veto, _ = await _site(tmp_path, f"sqlite:///{tmp_path / 'veto.db'}", "site-veto", "bright", pub,
                          allowed_purposes=["DUO:0000007"])
    try:
        hub2 = await start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub2.db'}", priv,
                               [("site-veto", veto.url), ("site-a", gw.url)], name="hub2")
        try:
            n2 = dict(net, hub=hub2)
            doc = await wait(n2, await start(n2, rounds=1, min_sites=1))
            assert doc["state"] == "succeeded", doc["error"]
            sites = doc["rounds"][0]["sites"]
            assert sites["site-veto"]["status"] == "refused" and "policy" in sites["site-veto"]["detail"]
            assert sites["site-a"]["status"] == "ok"
        finally:
            await hub2.server.close()
    finally:
        await veto.server.close()


async def test_cancel(net):
    run_id = await start(net, rounds=50, local_epochs=1, min_sites=1)
    await wait(net, run_id, rounds_done=1)
    async with net["http"].post(f"{net['hub'].url}/training/runs/{run_id}/cancel", headers=analyst(net["hub"])) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "cancelled"
    n = (await run_doc(net, run_id))["round"]
    await asyncio.sleep(1.0)
    doc = await run_doc(net, run_id)
    assert doc["state"] == "cancelled" and doc["round"] == n < 50
    async with net["http"].post(f"{net['hub'].url}/training/runs/{run_id}/cancel", headers=analyst(net["hub"])) as r:
        assert r.status == 409


async def test_a_run_is_seen_and_cancelled_through_another_server_process(net, tmp_path):
    """processes > 1: the start, the status and the cancel of one run may reach different server processes.
    A second ``fedgate serve`` on the hub's store stands for the second process (the kernel would pick one
    at random): the run started through the first is listed and cancelled through the second, and the
    first stops its rounds and never overwrites the cancellation."""
    from gateway.handlers.training import HUB

    hub = net["hub"]
    sites = "".join(f'[[federation.sites]]\nid = "{n}"\nurl = "{gw.url}"\n' for n, (gw, _) in net["sites"].items())
    # the second process looks for queued runs only at its start and when a run is started through it, so
    # the run started through the first is run by the first
    other = await start_gateway_process(tmp_path, "hub", (
        f'[federation]\nrole = "hub"\nhub_id = "hub"\nhub_key = "{net["priv"]}"\n{sites}'
        '[training]\nround_deadline_s = 120\npoll_s = 3600\n'), db_url=str(hub.settings.effective_database_url))
    try:
        run_id = await start(net, rounds=50, local_epochs=1, min_sites=1)
        await wait(net, run_id, rounds_done=1)
        assert run_id in hub.app[HUB]._tasks
        async with net["http"].get(f"{other.url}/training/runs/{run_id}", headers=analyst(other)) as r:
            assert r.status == 200 and (await r.json())["state"] == "running"
        async with net["http"].post(f"{other.url}/training/runs/{run_id}/cancel", headers=analyst(other)) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["state"] == "cancelled"
        deadline = time.monotonic() + 10
        while run_id in hub.app[HUB]._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert run_id not in hub.app[HUB]._tasks, "the process running the rounds did not see the cancellation"
        n = (await run_doc(net, run_id))["round"]
        await asyncio.sleep(1.5)
        doc = await run_doc(net, run_id)
        assert doc["state"] == "cancelled" and doc["round"] == n < 50 and doc["model"] is None
        async with net["http"].post(f"{hub.url}/training/runs/{run_id}/cancel", headers=analyst(hub)) as r:
            assert r.status == 409
    finally:
        other.stop()


#: The run a hub stop or kill interrupts in the tests below, and its uninterrupted twin (one per network).
RESUMED = {"rounds": 4, "local_epochs": 1, "min_sites": 3, "seed": 11}
_UNINTERRUPTED: dict[str, dict] = {}


async def uninterrupted(net) -> dict:
    """The run ``RESUMED`` made by the network's hub without a stop (local training is deterministic: a run
    resumed at the right round, with every round counted once, ends with the very same weights)."""
    if net["engine"] not in _UNINTERRUPTED:
        doc = await wait(net, await start(net, **RESUMED))
        assert doc["state"] == "succeeded", doc["error"]
        _UNINTERRUPTED[net["engine"]] = doc
    return _UNINTERRUPTED[net["engine"]]


async def assert_completed_once(net, doc) -> None:
    """Every round of the resumed run counted once, and the weights of the uninterrupted run."""
    assert doc["state"] == "succeeded", doc["error"]
    n = RESUMED["rounds"]
    lin = doc["lineage"]
    assert doc["round"] == n and [r["round"] for r in lin["rounds"]] == list(range(1, n + 1))
    assert [r["round"] for r in doc["rounds"]] == list(range(1, n + 2))
    assert all(sorted(r["sites"]) == list(SITES) and {v["status"] for v in r["sites"].values()} == {"ok"}
               for r in doc["rounds"])
    ref = await uninterrupted(net)
    assert [r["weights_hash"] for r in lin["rounds"]] == [r["weights_hash"] for r in ref["lineage"]["rounds"]]
    assert doc["model"]["weights_hash"] == ref["model"]["weights_hash"]


async def _stored_run(store: str, run_id: str):
    db = Database(store)
    try:
        async with db.read() as conn:
            row = (await conn.execute(select(trn_run).where(trn_run.c.run_id == run_id))).one()
        return row, await load_checkpoint(db, run_id)
    finally:
        await db.dispose()


async def test_a_hub_restart_resumes_its_run_at_the_next_round(net, tmp_path):
    """A hub stopped during a run hands it back to the queue, its last completed round checkpointed; the hub
    started again on the store resumes it at the next round and finishes it."""
    sites = [(n, gw.url) for n, (gw, _) in net["sites"].items()]
    extra = {"training": {"round_deadline_s": 120}}
    async with hub_store(net, tmp_path, "hub-restart") as store:
        first = await start_hub(tmp_path, store, net["priv"], sites, name="hub-r1", extra=extra)
        try:
            n1 = dict(net, hub=first)
            run_id = await start(n1, **RESUMED)
            await wait(n1, run_id, rounds_done=2)
        finally:
            await first.server.close()  # a normal stop, mid-run
        row, checkpoint = await _stored_run(store, run_id)
        assert (row.state, row.lease_owner, row.attempts) == ("queued", None, 0), row
        assert 2 <= row.round < RESUMED["rounds"] and checkpoint is not None and checkpoint[0] == row.round
        second = await start_hub(tmp_path, store, net["priv"], sites, name="hub-r2", extra=extra)
        try:
            doc = await wait(dict(net, hub=second), run_id)
        finally:
            await second.server.close()
        assert (await _stored_run(store, run_id))[1] is None  # the checkpoint went with the run's end
    await assert_completed_once(net, doc)


async def test_a_run_of_a_killed_hub_process_is_resumed_by_another(net, tmp_path):
    """A hub process SIGKILLed during a run cannot hand it back: the run's lease expires (``lease_s``) and
    another hub process on the store — running beside it all along, unable to take the run while its lease
    was renewed — resumes it at the round after its last completed one and finishes it."""
    toml = hub_toml(net, "lease_s = 10\npoll_s = 0.2\n")
    async with hub_store(net, tmp_path, "hub-kill") as store:
        doomed = await start_gateway_process(tmp_path, "hub-doomed", toml, db_url=store)
        live = None
        try:
            run_id = await start(dict(net, hub=doomed), **RESUMED)  # the only hub process: doomed runs it
            live = await start_gateway_process(tmp_path, "hub-live", toml, db_url=store)
            nl = dict(net, hub=live)
            await wait(nl, run_id, rounds_done=1)
            doomed.proc.kill()  # SIGKILL: no goodbye — at once, before the rounds left can finish
            doomed.proc.wait(10)
            row, _ = await _stored_run(store, run_id)
            assert row.state == "running" and row.attempts == 1, row  # not taken over from the live holder
            assert 1 <= row.round < RESUMED["rounds"], row
            assert (await run_doc(nl, run_id))["state"] == "running"
            doc = await wait(nl, run_id)
            row, checkpoint = await _stored_run(store, run_id)
            assert row.attempts == 2 and checkpoint is None, row  # claimed twice: by doomed, then by live
        finally:
            for gw in (doomed, live):
                if gw is not None:
                    gw.stop()
    await assert_completed_once(net, doc)


class CountingProxy:
    """A reverse proxy in front of a site, counting the training rounds asked of it by (run, round)."""

    def __init__(self, target: str) -> None:
        self.target, self.seen = target, Counter()
        self.http: aiohttp.ClientSession | None = None
        self.server: TestServer | None = None

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path == "/federation/train/round":
            doc = orjson.loads(body)
            self.seen[(doc["run_id"], doc["round"])] += 1
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")}
        async with self.http.request(request.method, self.target + request.path_qs, data=body, headers=headers) as r:
            return web.Response(body=await r.read(), status=r.status,
                                headers={"Content-Type": r.headers.get("Content-Type", "application/octet-stream")})

    async def __aenter__(self) -> "CountingProxy":
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.http = aiohttp.ClientSession()
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()
        await self.http.close()


async def test_two_hub_processes_never_run_the_same_round_twice(net, tmp_path):
    """``--processes 2``: both serving processes run the run queue's worker on the hub's store (and look for
    runs every 0.2 s); runs started together are claimed by one process each, so every round of every run
    reaches a site exactly once (counted by a proxy in front of site-a), and every run completes."""
    gw_a, gw_b = net["sites"]["site-a"][0], net["sites"]["site-b"][0]
    async with CountingProxy(gw_a.url) as proxy, hub_store(net, tmp_path, "hub-2p") as store:
        toml = hub_toml(net, "poll_s = 0.2\n", sites={"site-a": proxy.url, "site-b": gw_b.url})
        hub = await start_gateway_process(tmp_path, "hub-2p", toml, db_url=store, args=("--processes", "2"))
        try:
            n2 = dict(net, hub=hub)
            ids = await asyncio.gather(*(start(n2, rounds=2, local_epochs=1, min_sites=2, sites=["site-a", "site-b"],
                                               seed=20 + i) for i in range(4)))
            docs = [await wait(n2, run_id) for run_id in ids]
        finally:
            hub.stop()
    for doc in docs:
        assert doc["state"] == "succeeded", doc["error"]
        assert doc["round"] == 2 and [r["round"] for r in doc["lineage"]["rounds"]] == [1, 2]
    assert dict(proxy.seen) == {(run_id, rnd): 1 for run_id in ids for rnd in (1, 2, 3)}


async def test_deploy_run_inference_and_roll_back(net):
    hub, http = net["hub"], net["http"]
    v1 = await wait(net, await start(net, rounds=1, local_epochs=1, min_sites=3, name="fl-lesion"))
    v2 = await wait(net, await start(net, rounds=2, local_epochs=1, min_sites=3, name="fl-lesion"))
    assert (v1["model"]["version"], v2["model"]["version"]) == ("1", "2")
    admin = hub.headers("admin", purpose=PURPOSE)
    for v in ("1", "2"):
        async with http.post(f"{hub.url}/training/models/fl-lesion/{v}/deploy", json={"sites": ["site-a", "site-c"]},
                             headers=admin) as r:
            assert r.status == 200, await r.text()
            res = await r.json()
        assert [s["status"] for s in res["sites"]] == ["ok", "ok"], res
    async with http.post(f"{hub.url}/training/models/fl-lesion/1/deploy", json={}, headers=analyst(hub)) as r:
        assert r.status == 403
    for body, status in ((b"{not json", 400), (b"[]", 400), (b'{"sites": ["nowhere"]}', 400), (b'{"sites": []}', 400)):
        async with http.post(f"{hub.url}/training/models/fl-lesion/1/deploy", data=body,
                             headers=admin | {"Content-Type": "application/json"}) as r:
            assert r.status == status and r.content_type == "application/problem+json", (body, await r.text())
    async with http.post(f"{hub.url}/training/models/fl-lesion/9/deploy", json={}, headers=admin) as r:
        assert r.status == 404
    gw, labels = net["sites"]["site-a"]
    async with http.get(gw.url + "/inference/models", headers=gw.headers("admin")) as r:
        versions = {m["card"]["version"] for m in (await r.json())["models"] if m["card"]["name"] == "fl-lesion"}
    assert versions == {"1", "2"}
    # the deployed model runs through the inference path (default = the most recently activated version)
    study = await _a_study(gw, http)
    job = await _job(gw, http, {"model": "fl-lesion", "study": study})
    assert job["state"] == "succeeded" and job["model"]["version"] == "2", job
    # roll back: re-activate version 1 at site-a
    async with http.post(f"{hub.url}/training/models/fl-lesion/1/deploy", json={"sites": ["site-a"]},
                         headers=admin) as r:
        assert r.status == 200
    job = await _job(gw, http, {"model": "fl-lesion", "study": study}, subject="ana2")
    assert job["state"] == "succeeded" and job["model"]["version"] == "1", job
    # site-b was not selected: it does not have the model
    gb, _ = net["sites"]["site-b"]
    async with http.get(gb.url + "/inference/models", headers=gb.headers("admin")) as r:
        assert "fl-lesion" not in {m["card"]["name"] for m in (await r.json())["models"]}


async def _a_study(gw, http) -> str:
    async with http.get(gw.dicomweb + "/studies", params={"limit": "1"}, headers=gw.headers("clinician")) as r:
        return (await r.json())[0]["0020000D"]["Value"][0]


async def _job(gw, http, body, subject="ana") -> dict:
    h = gw.headers("analyst", purpose=PURPOSE, subject=subject)
    async with http.post(gw.url + "/inference/jobs", json=body, headers=h) as r:
        assert r.status in (200, 201, 202), await r.text()
        job = (await r.json())["jobs"][0]
    for _ in range(300):
        async with http.get(f"{gw.url}/inference/jobs/{job['id']}", headers=h) as r:
            job = await r.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(job)


async def test_cli_start_wait_and_status(net, tmp_path):
    import json
    import sys

    hub = net["hub"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"architecture": "ct_lesion_classifier", "cohort": COHORT, "label": LABEL,
                                "rounds": 2, "min_sites": 3, **FAST}))
    token = hub.token("analyst", purpose=PURPOSE, subject="ana")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "train", "start", str(spec), "--hub", hub.url, "--token", token, "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "state succeeded" in text and "round   2" in text and "model fl-ct-lesion-classifier version" in text
    run_id = text.split()[1]
    doc = await run_doc(net, run_id)
    assert doc["state"] == "succeeded" and doc["round"] == 2
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "train", "cancel", run_id, "--hub", hub.url, "--token", token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 1 and "already succeeded" in out.decode()


async def test_federated_segmentation_learns_the_seg_masks(net):
    """The shipped segmenter trained on the sites' DICOM SEG outlines (label = one SEG segment) at the two sites
    with hyperdense lesions (nodules, rings): held-out Dice rises at both, and the exported model's Dice on
    masks generated here is computed with numpy.  (The toy 3-layer segmenter learns the large smooth dark
    areas of site-b far more slowly: not part of this run.)"""
    label = {"seg": {"segments": [{"label": "lesion"}]}}
    sites = ["site-a", "site-c"]
    doc = await wait(net, await start(net, architecture="ct_lesion_segmenter", label=label, rounds=8, local_epochs=3,
                                      min_sites=2, sites=sites, name="fl-seg"))
    assert doc["state"] == "succeeded", doc["error"]
    first, final = doc["rounds"][0]["sites"], doc["rounds"][-1]["sites"]
    for s in sites:
        m0, m = first[s]["metrics"], final[s]["metrics"]
        assert m["lesion_slices"] > 0 and set(m["subgroups"]) == {"sex", "age_band", "manufacturer"}
        assert m["dice"] > (m0["dice"] or 0.0) + 0.15, (s, m0, m)
    seg = await model(net, "fl-seg", doc["model"]["version"])
    rng = np.random.default_rng(99)
    inter = total = 0
    for kind in ("bright", "ring"):
        for _ in range(20):
            img, mask = slice_and_mask(rng, True, kind)
            with torch.inference_mode():
                pred = seg(torch.from_numpy(window01(img)[None, None]))[0, 0].numpy() >= 0.5
            inter += int((pred & mask).sum())
            total += int(pred.sum()) + int(mask.sum())
    dice = 2 * inter / total
    print(f"pooled Dice of the federated segmenter: {dice:.3f}; per site held-out "
          + ", ".join(f"{s} {first[s]['metrics']['dice']} -> {final[s]['metrics']['dice']}" for s in sites))
    assert dice > 0.3, dice
    bad = {"architecture": "ct_lesion_segmenter", "cohort": COHORT, "label": LABEL}  # a Condition is not a mask
    async with net["http"].post(net["hub"].url + "/training/runs", json=bad, headers=analyst(net["hub"])) as r:
        assert r.status == 400 and "segment" in await r.text()


async def test_model_versions_are_numbered_one_writer_at_a_time(db_url):
    """Two runs of one model finishing together in two server processes (two connections to one store):
    the second waits for the first's version to be committed and takes the next number (PostgreSQL: the
    advisory lock of next_model_version; SQLite: its write lock file) — never the same number twice."""
    from gateway.services.training import next_model_version
    from gateway.store.db import Database
    from gateway.store.migrate import migrate
    from gateway.store.training_schema import trn_model

    a, b = Database(db_url), Database(db_url)
    await migrate(a)

    def row(version: str) -> dict:
        return dict(name="m", version=version, run_id="r" + version, architecture="x", weights_hash="h",
                    torchscript=b"", card="{}", created_ts=time.time())

    async def second() -> str:
        async with b.write() as conn:
            version = await next_model_version(conn, "m")
            await conn.execute(trn_model.insert().values(row(version)))
        return version

    try:
        async with a.write() as conn:
            assert await next_model_version(conn, "m") == "1"
            other = asyncio.create_task(second())
            await asyncio.sleep(0.5)
            assert not other.done(), "the second writer numbered its version before the first committed"
            await conn.execute(trn_model.insert().values(row("1")))
        assert await asyncio.wait_for(other, 30) == "2"
    finally:
        await a.dispose()
        await b.dispose()
