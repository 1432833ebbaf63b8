"""Issue 28: the web console at /ui driven in a real browser (Debian's chromium through Playwright) on a demo
federation — a hub and the three ``fedgate demo`` sites (their synthetic populations, as ``fedgate demo`` loads
them) plus, at each site, CT patients loaded through FHIR and STOW-RS for inference and federated training.

Views: the cohort builder (three sites' counts, a histogram), the consent view (matrix, withdrawals, one
patient's decision with reasons), models and jobs (a model's drift chart), a training run, an audit search.
Checked against the JSON API: the console's counts equal ``/federation/query``'s for the same purpose, and an
analyst sees no refused patient's data anywhere (every page the analyst opened, compared with the ids the gate
refuses). axe-core (npm, scripts/setup.d/60-ui-assets.sh) finds no serious or critical violation on any view.
Screenshots (1280×800) go to the test's tmp_path, to ``$FEDGATE_TEST_ARTEFACTS/console`` when set, and to
docs/img/ui when ``FEDGATE_UI_DOC_SCREENSHOTS=1`` (how docs/ui.md's were made). One engine (SQLite) like the
viewer's browser test; the consent report's engine parity is test_console_services on both engines."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
from dicomweb_client.api import DICOMwebClient

from gateway.federation_cli import DEMO_BINS
from gateway.handlers.ui import ASSETS, STATIC
from gateway.services.federation_synth import DEMO_SITES, generate
from tests.conftest import REPO, Gateway, make_settings, start_gateway
from tests.dicom_synth import ct_series
from tests.integration.federation_fixtures import hub_key_pem, populate, site_federation
from tests.training_data import KINDS, LESION, site_population

CHROMIUM = os.environ.get("FEDGATE_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
               "--ignore-gpu-blocklist"]
AXE = ASSETS / "axe-core" / "axe.min.js"
N_SYNTH = 150  # synthetic demo patients per site (fedgate demo's generator)
N_CT = 10  # CT patients per site loaded through FHIR + STOW (inference, training)
PURPOSE = "DUO:0000006"
MODEL = "ct-lesion-classifier"


def _require_setup() -> None:
    missing = [str(p) for p in (*STATIC.values(), AXE) if not p.is_file()]
    if not Path(CHROMIUM).exists():
        missing.append(f"chromium ({CHROMIUM})")
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: run scripts/setup (scripts/setup.d/60-ui-assets.sh, 40-ohif.sh)")


async def _site(tmp: Path, profile, kind: str, pub: str, seed: int) -> tuple[Gateway, list[str]]:
    db = f"sqlite:///{tmp / (profile.name + '.db')}"
    await populate(db, generate(profile, N_SYNTH, seed=7))
    settings = make_settings(tmp / profile.name, db, site_id=profile.name, viewer_dev_login=True, extra={
        "federation": site_federation(pub, bins=DEMO_BINS), "consent": {"refresh_s": 0},
        "inference": {"poll_s": 0.2, "settle_s": 0.2, "cpu_watts": 12.0},
        "training": {"min_cohort": 4, "cpu_watts": 12.0, "carbon_g_per_kwh": 400.0}})
    gw = await start_gateway(settings)
    bundle, datasets, _ = site_population(profile.name, kind, N_CT, seed=seed)
    async with aiohttp.ClientSession() as http, http.post(
            gw.fhir, json=bundle, headers=gw.headers("ehr-system") | {"Content-Type": "application/fhir+json"}) as r:
        assert r.status == 200, await r.text()
    await asyncio.to_thread(DICOMwebClient(url=gw.dicomweb, headers=gw.headers("pacs")).store_instances, datasets)
    return gw, sorted({str(ds.StudyInstanceUID) for ds in datasets})


async def _json(http, method: str, url: str, headers: dict, **kw):
    async with http.request(method, url, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def _inference(http, gw: Gateway, studies: list[str]) -> list[dict]:
    jobs = []
    for study in studies:
        status, body = await _json(http, "POST", f"{gw.url}/inference/jobs", gw.headers("clinician"),
                                   json={"model": MODEL, "study": study})
        assert status == 202, body
        jobs += body["jobs"]
    deadline = time.monotonic() + 90
    done = []
    for job in jobs:
        while time.monotonic() < deadline:
            _, job = await _json(http, "GET", f"{gw.url}/inference/jobs/{job['id']}", gw.headers("admin"))
            if job["state"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.2)
        assert job["state"] == "succeeded", job
        done.append(job)
    return done


async def _training(http, hub: Gateway) -> str:
    headers = hub.headers("analyst", purpose={"codes": ["DUO:0000042"]}, subject="ana")
    body = {"architecture": "ct_lesion_classifier", "cohort": {"imaging": {"modality": "CT"}},
            "label": {"condition": {"code": f"{LESION['system']}|{LESION['code']}"}}, "rounds": 2, "local_epochs": 1,
            "min_sites": 3, "min_cohort": 4, "test_fraction": 0.3,
            "optimizer": {"name": "adam", "lr": 0.01, "batch_size": 8}}
    status, doc = await _json(http, "POST", f"{hub.url}/training/runs", headers, json=body)
    assert status == 201, doc
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, doc = await _json(http, "GET", f"{hub.url}/training/runs/{doc['id']}", headers)
        if doc["state"] in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.2)
    assert doc["state"] == "succeeded", doc
    return doc["id"]


class Shots:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "console-screenshots"
        self.dir.mkdir(exist_ok=True)

    async def take(self, page, name: str) -> None:
        await page.screenshot(path=str(self.dir / f"{name}.png"), full_page=True)

    def publish(self) -> None:
        target = os.environ.get("FEDGATE_TEST_ARTEFACTS")
        if target:
            dest = Path(target) / "console"
            dest.mkdir(parents=True, exist_ok=True)
            for f in self.dir.glob("*.png"):
                shutil.copy(f, dest / f.name)
        if os.environ.get("FEDGATE_UI_DOC_SCREENSHOTS") == "1":
            dest = REPO / "docs" / "img" / "ui"
            dest.mkdir(parents=True, exist_ok=True)
            for f in self.dir.glob("*.png"):
                doc_png(f, dest / f.name)


def doc_png(src: Path, dest: Path) -> None:
    """A screenshot for the docs: 256 colours (flat UI colours survive), optimised — a third of the size."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=256).save(dest, optimize=True)


async def _axe(page, view: str) -> None:
    """axe-core in the page: no serious or critical violation."""
    await page.add_script_tag(path=str(AXE))
    result = await page.evaluate("async () => { const r = await axe.run(document); return r.violations.map("
                                 "v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3)})); }")
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, f"axe-core on the {view} view: {bad}"


async def _sign_in(page, base: str, path: str, role: str, purpose: str) -> None:
    """The viewer's sign-in page (same login): /ui/... without a token goes there and comes back."""
    await page.goto(base + path)
    await page.wait_for_url("**/viewer/login**")
    await page.select_option("#role", role)
    await page.fill("#purpose", purpose)
    await page.click("#signin")
    await page.wait_for_url(f"**{path}")


async def _charts_drawn(page, selector: str = ".chart") -> int:
    await page.wait_for_function(f"() => [...document.querySelectorAll('{selector}')].every(e => e.dataset.drawn)",
                                 timeout=20_000)
    return await page.locator(f"{selector} svg").count()


async def test_console_views_in_chromium(tmp_path):
    from playwright.async_api import async_playwright

    _require_setup()
    priv, pub = hub_key_pem(tmp_path)
    sites: dict[str, tuple[Gateway, list[str]]] = {}
    for i, (profile, kind) in enumerate(zip(DEMO_SITES, KINDS)):
        sites[profile.name] = await _site(tmp_path, profile, kind, pub, seed=i)
    hub = await start_gateway(make_settings(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", site_id="hub",
                                            viewer_dev_login=True, extra={
        "federation": {"role": "hub", "hub_id": "hub", "hub_key": priv, "deadline_s": 10.0,
                       "sites": [{"id": n, "url": gw.url} for n, (gw, _) in sites.items()]},
        "training": {"round_deadline_s": 60}}))
    site_a, studies_a = sites["site-a"]
    shots = Shots(tmp_path)
    try:
        # two CT studies from another scanner, of patients without any consent (refused for research)
        unconsented = [f"site-a-x{i}" for i in range(2)]
        extra = [ct_series(patient_id=pid, patient_name=f"Noconsent^{pid}", n=2, manufacturer="Globex") for pid in unconsented]
        await asyncio.to_thread(DICOMwebClient(url=site_a.dicomweb, headers=site_a.headers("pacs")).store_instances,
                                [ds for series in extra for ds in series])
        async with aiohttp.ClientSession() as http:
            jobs = await _inference(http, site_a, studies_a[:3] + [str(series[0].StudyInstanceUID) for series in extra])
            run_id = await _training(http, hub)
            # a withdrawal at site-a: that patient is refused from now on (and shows in the withdrawals chart)
            refused = "site-a-p000"
            status, consent = await _json(http, "GET", f"{site_a.fhir}/Consent/c-{refused}", site_a.headers("admin"))
            assert status == 200, consent
            consent["status"] = "inactive"
            status, body = await _json(http, "PUT", f"{site_a.fhir}/Consent/c-{refused}", site_a.headers("admin")
                                       | {"Content-Type": "application/fhir+json"}, json=consent)
            assert status == 200, body
            analyst_api = site_a.headers("analyst", purpose={"codes": [PURPOSE]})
            status, _ = await _json(http, "GET", f"{site_a.fhir}/Patient/{refused}", analyst_api)
            assert status == 404  # the API refuses it: the console must not show it either
            # ids of patients the gate refuses the analyst at site-a: no consent, withdrawn, or a profile HMB
            # does not permit (DS-CVD) — read as admin for treatment, then asked as the analyst
            status, every = await _json(http, "GET", f"{site_a.fhir}/Patient?_count=1000&_elements=id",
                                        site_a.headers("admin"))
            all_ids = {e["resource"]["id"] for e in every.get("entry", [])}
            status, seen = await _json(http, "GET", f"{site_a.fhir}/Patient?_count=1000&_elements=id", analyst_api)
            permitted_ids = {e["resource"]["id"] for e in seen.get("entry", [])}
            refused_ids = (all_ids - permitted_ids) | set(unconsented)
            assert refused in refused_ids and refused not in permitted_ids

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                await _views(browser, hub, sites, shots, run_id, refused, refused_ids, jobs)
            finally:
                await browser.close()
    finally:
        shots.publish()
        await hub.server.close()
        for gw, _ in sites.values():
            await gw.server.close()


async def _new_page(browser):
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    return await ctx.new_page()


async def _views(browser, hub, sites, shots, run_id, refused, refused_ids, jobs) -> None:
    site_a = sites["site-a"][0]
    analyst_pages: list[str] = []

    # ---- (1) cohort builder on the hub, as an analyst with a research purpose
    page = await _new_page(browser)
    await _sign_in(page, hub.url, "/ui/cohort", "analyst", PURPOSE)
    await page.select_option("#modality", "MR")
    await page.check("[data-stat='age']")
    await page.click("#run")
    await page.wait_for_selector("#site-table tbody tr", timeout=30_000)
    rows = await page.locator("#site-table tbody tr").all()
    assert len(rows) == 3
    shown = {}
    for row in rows:
        site = await row.get_attribute("data-site")
        cells = await row.locator("td").all_inner_texts()
        assert cells[0] == "answered", (site, cells)
        shown[site] = cells[1]
    assert await page.locator(".histogram").count() >= 1
    assert await _charts_drawn(page) >= 5
    # the same query through the JSON API with the same purpose: the same figures
    body = await page.input_value("#cohort-json")
    async with aiohttp.ClientSession() as http:
        status, ans = await _json(http, "POST", f"{hub.url}/federation/query",
                                  hub.headers("analyst", purpose={"codes": [PURPOSE]}), data=body)
    assert status == 200, ans
    assert shown == {s["site"]: ("<5" if s.get("count") is None else str(s["count"])) for s in ans["sites"]}
    assert await page.inner_text("#pooled-count") == ("<5" if ans["count"] is None else str(ans["count"]))
    await shots.take(page, "cohort")
    await _axe(page, "cohort")
    # save, export and re-run
    await page.fill("#save-name", "mr-all")
    await page.click("#save")
    async with page.expect_download() as dl:
        await page.click("#export")
    exported = Path(await (await dl.value).path()).read_text()
    assert '"cohort"' in exported and '"MR"' in exported
    await page.click("button[aria-label='Re-run mr-all']")
    await page.wait_for_selector("#site-table")
    analyst_pages.append(await page.content())
    # errors in words: a purpose the gate refuses for a cohort query (treatment)
    await page.click("#json-details summary")
    await page.fill("#cohort-json", "{\"cohort\": {\"sex\": \"nobody\"}}")
    await page.click("#run")
    await page.wait_for_selector("#error:not([hidden])")
    assert "not accepted" in (await page.inner_text("#error"))

    # ---- the analyst on site-a's console: consent and audit refuse, jobs show nothing refused
    await page.goto(site_a.url + "/ui/consent")
    await page.wait_for_url("**/viewer/login**")
    await page.select_option("#role", "analyst")
    await page.fill("#purpose", PURPOSE)
    await page.click("#signin")
    await page.wait_for_url("**/ui/consent")
    await page.wait_for_selector("#error:not([hidden])")
    assert "not allowed" in await page.inner_text("#error")
    analyst_pages.append(await page.content())
    await page.fill("#patient", refused)
    await page.click("#decision-form button")
    await page.wait_for_timeout(500)
    assert "not allowed" in await page.inner_text("#error")
    analyst_pages.append(await page.content())
    for view in ("models", "audit"):
        await page.goto(site_a.url + f"/ui/{view}")
        await page.wait_for_load_state("networkidle")
        analyst_pages.append(await page.content())
    for html in analyst_pages:
        for pid in refused_ids:
            assert not re.search(rf"\b{re.escape(pid)}\b", html), f"refused patient {pid} shown to the analyst"
        for job in jobs:
            assert job["study"] not in html and job["id"][:8] not in html  # jobs are the clinician's and admins'
    await page.context.close()

    # ---- (2) consent view on site-a, as admin (data steward)
    page = await _new_page(browser)
    await _sign_in(page, site_a.url, "/ui/consent", "admin", "treatment")
    await page.wait_for_selector("#consent-matrix tbody tr", timeout=20_000)
    assert await page.locator("#withdrawals tbody tr").count() >= 1
    await _charts_drawn(page)
    await page.fill("#patient", refused)
    await page.fill("#d-purpose", PURPOSE)
    await page.press("#d-purpose", "Enter")  # keyboard: the form submits with Enter
    await page.wait_for_selector("#decision-result")
    text = await page.inner_text("#decision-result")
    assert "deny" in text and "withdrawn" in text, text
    await page.fill("#patient", "site-a-p001")
    await page.click("#decision-form button")
    await page.wait_for_function("() => document.querySelector('#decision-result').innerText.includes('site-a-p001')")
    text = await page.inner_text("#decision-result")
    assert "permit" in text and "DUO:0000042" in text, text
    await shots.take(page, "consent")
    await _axe(page, "consent")

    # ---- (3) models and jobs on site-a (admin): a model's drift chart
    await page.goto(site_a.url + "/ui/models")
    await page.wait_for_selector("#jobs tbody tr")
    assert await page.locator("#jobs tbody tr").count() == len(jobs)
    assert await page.locator("#jobs a[href*='/viewer/viewer?StudyInstanceUIDs=']").count() == len(jobs)
    await page.select_option("#mon-model", f"{MODEL}@1.0.0")
    await page.select_option("#mon-by", "manufacturer")
    await page.click("#monitoring-form button")
    await page.wait_for_selector("#drift-chart")
    await _charts_drawn(page, "#monitoring .chart")
    assert await page.locator("#drift-chart svg").count() == 1
    assert {"ACME", "Globex"} <= set(await page.locator("#drift-table tbody th").all_inner_texts())
    assert "g CO2e" in await page.inner_text("#monitoring")
    await shots.take(page, "models")
    await _axe(page, "models")

    # ---- (5) audit on site-a (admin): search by patient, chain verification
    await page.goto(site_a.url + "/ui/audit")
    await page.fill("#a-patient", refused)
    await page.click("#audit-form button")
    await page.wait_for_selector("#audit-total")
    assert await page.locator("#audit-table tbody tr").count() >= 1
    await page.click("#verify")
    await page.wait_for_selector("#verify-status")
    assert "Intact" in await page.inner_text("#verify-status")
    await shots.take(page, "audit")
    await _axe(page, "audit")
    await page.context.close()

    # ---- (4) training run on the hub
    page = await _new_page(browser)
    await _sign_in(page, hub.url, "/ui/training", "admin", "DUO:0000042")  # runs: their starter and admins
    await page.wait_for_selector("#runs-table")
    await page.click(f"#runs-table a:has-text('{run_id}')")
    await page.wait_for_selector("#rounds tbody tr")
    assert await page.locator("#rounds tbody tr").count() >= 3
    await _charts_drawn(page, "#run .chart")
    await shots.take(page, "training")
    await _axe(page, "training")
    # keyboard navigation: the skip link is the first stop and moves focus to the content
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    await page.context.close()
