"""Federation with a site in its own ``fedgate serve`` process: killed → error + partial answer within
the deadline; frozen (SIGSTOP) → timeout; the other sites' answers are unaffected."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time

import aiohttp
import pytest

from gateway.auth import issue_dev_token
from gateway.services.federation_synth import DEMO_SITES, profile_keys
from tests.vocab_ref import expand_codes
from mappings.cohort.disclosure import Disclosure
from tests.integration.federation_fixtures import (
    hub_key_pem,
    start_hub,
    start_site,
    start_site_process,
)
from tests.integration.federation_ref import COHORTS, Oracle

PURPOSE = {"codes": ["DUO:0000042"]}  # GRU only


@pytest.fixture
async def mixed(tmp_path, db_url):
    priv, pub = hub_key_pem(tmp_path)
    a = await start_site(tmp_path, DEMO_SITES[0], 150, db_url, pub)
    b = await start_site(tmp_path, DEMO_SITES[1], 120, f"sqlite:///{tmp_path / 'b.db'}", pub)
    c = await start_site_process(tmp_path, DEMO_SITES[2], 130, pub)
    hub = await start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", priv,
                          [(a.id, a.url), (b.id, b.url), (c.id, c.url)], deadline_s=3.0)
    try:
        async with aiohttp.ClientSession() as http:
            yield {"hub": hub, "a": a, "b": b, "c": c, "http": http}
    finally:
        if c.proc.poll() is None:
            os.kill(c.proc.pid, signal.SIGCONT)
            c.proc.kill()
        c.proc.wait(10)
        await hub.server.close()
        await a.gateway.server.close()
        await b.gateway.server.close()


async def _query(fed, doc):
    hub = fed["hub"]
    tok = issue_dev_token(hub.settings, subject="ana", roles=["analyst"], purpose=PURPOSE)
    t0 = time.perf_counter()
    async with fed["http"].post(hub.url + "/federation/query", json={"cohort": doc, "age_at": "2025-01-01"},
                                headers={"Authorization": f"Bearer {tok}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json(), time.perf_counter() - t0


async def test_process_site_answers_then_killed_site_gives_partial_answer(mixed):
    doc = {"any": [COHORTS["seg_lv_rv"], COHORTS["born_50s"]]}
    ans, _ = await _query(mixed, doc)
    assert ans["status"] == {"ok": 3}
    # the process site's count equals the independent computation under its cell-key secret
    from gateway.services.federation import FederationConfig, SiteService
    from tests.conftest import make_settings

    c = mixed["c"]
    settings = make_settings(mixed["hub"].settings.data_dir, "sqlite://", site_id=c.id)
    keys = SiteService(settings, FederationConfig(), None).keys  # same jwt secret → same cell keys
    # nothing is released over patients the gate refuses (issue #19): no count of all matching patients
    assert set(ans["per_site"]["site-c"]["consent"]) == {"eligible"}
    # under the gateway's real DUO consent gate, a general-research purpose (DUO:0000042) may use
    # the GRU and no-restriction (NRES) profiles, not HMB or disease-specific ones
    pk = profile_keys()
    eligible = Oracle(c.rows, expand_codes, dt.date(2025, 1, 1)).cohort(doc, {pk["GRU"], pk["NRES"]})
    assert ans["per_site"]["site-c"]["count"] == Disclosure().release(len(eligible), keys.cell_key(eligible))
    before = {s: ans["per_site"][s]["count"] for s in ("site-a", "site-b")}

    c.proc.kill()
    c.proc.wait(10)
    ans, elapsed = await _query(mixed, doc)
    status = {s["site"]: s["status"] for s in ans["sites"]}
    assert status == {"site-a": "ok", "site-b": "ok", "site-c": "error"}
    assert ans["partial"] is True
    assert {s: ans["per_site"][s]["count"] for s in ("site-a", "site-b")} == before
    assert elapsed < 3.0


async def test_frozen_process_site_times_out(mixed):
    c = mixed["c"]
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        ans, elapsed = await _query(mixed, COHORTS["born_50s"])
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    status = {s["site"]: s["status"] for s in ans["sites"]}
    assert status == {"site-a": "ok", "site-b": "ok", "site-c": "timeout"}
    assert ans["partial"] is True and 2.9 < elapsed < 3.0 + 1.5
