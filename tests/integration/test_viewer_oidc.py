"""OIDC sign-in for /viewer and /ui against a real identity provider: panva's ``oidc-provider`` (npm, pinned in
tests/js/package.json, installed by scripts/setup.d/50-fhir-js-clients.sh) run by tests/js/oidc_idp.mjs, with
its own login form, a public client for fedgate (authorization code + PKCE) and RS256 JWT access tokens.

fedgate is configured with the issuer only (``viewer_oidc_authority``: discovery finds the endpoints and the
JWKS) and maps the token's ``groups`` claim onto roles (``oidc_roles_claim``/``oidc_role_map``); the purpose
comes from its ``purpose`` claim. In Chromium (Playwright): a clinician signs in at the IdP's form and lands in
/viewer with every study; an analyst (research purpose GRU) signs in from /ui, lands in /ui and sees one
study in /viewer and through DICOMweb. Neither the token nor the authorization code appears in a log record
of the gateway, nor in a URL the gateway was asked for. One engine (SQLite), like the other browser tests."""

from __future__ import annotations

import asyncio
import logging
import shutil

import aiohttp
import pytest

from gateway.app import create_app
from tests.conftest import REPO, Gateway, data_path, make_settings
from tests.integration.test_viewer_browser import (
    CHROMIUM,
    CT_PATIENT,
    LAUNCH_ARGS,
    _artefacts,
    _free_port,
    _load,
    _new_page,
    _publish,
    _require_browser_setup,
    _serve,
    _study_count,
)

JS = REPO / "tests" / "js"
RESOURCE = "urn:fedgate:test-site"


class _Records(logging.Handler):
    """Every log record of the process, with its structured extras, as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(f"{record.getMessage()} {record.__dict__!r}")


async def _start_idp(port: int, redirect: str) -> asyncio.subprocess.Process:
    if not (JS / "node_modules" / "oidc-provider").is_dir() or not shutil.which("node"):
        pytest.fail("oidc-provider (npm) or node missing: run scripts/setup (scripts/setup.d/50-fhir-js-clients.sh)")
    proc = await asyncio.create_subprocess_exec("node", str(JS / "oidc_idp.mjs"), str(port), redirect, RESOURCE,
                                                cwd=JS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.startswith(b"ready "), line + await proc.stderr.read()
    return proc


async def _idp_login(page, user: str) -> None:
    """The IdP's own login form (oidc-provider's interaction page)."""
    await page.wait_for_selector("input[name=login]", timeout=60_000)
    assert "/interaction/" in page.url
    await page.fill("input[name=login]", user)
    await page.fill("input[name=password]", "any-password")
    await page.click("button[type=submit]")


async def test_viewer_and_console_sign_in_through_oidc_provider(tmp_path):
    from playwright.async_api import async_playwright

    gw_port, idp_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{gw_port}"
    idp = await _start_idp(idp_port, f"{base}/viewer/login")
    records = _Records()
    gw = None
    try:
        settings = make_settings(
            tmp_path / "data", f"sqlite:///{tmp_path / 'fedgate.db'}", log_level="INFO",
            viewer_oidc_authority=f"http://127.0.0.1:{idp_port}", viewer_oidc_resource=RESOURCE,
            jwt_audience=RESOURCE, oidc_roles_claim="groups",
            oidc_role_map="fedgate-clinicians=clinician fedgate-analysts=analyst")
        _require_browser_setup(settings)
        out = _artefacts(tmp_path)
        gw = Gateway(await _serve(create_app(settings), gw_port), settings)
        logging.getLogger("gateway").addHandler(records)
        logging.getLogger("gateway").setLevel(logging.DEBUG)  # every record: the request log included
        await _load(gw, sorted(data_path("dicom").rglob("*.dcm")), consent_for=CT_PATIENT)
        every = await _study_count(gw, gw.headers("clinician"))
        assert every >= 5
        # the dev sign-in is off: only the issuer signs users in
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/viewer/dev-token", json={"role": "admin"}) as r:
                assert r.status == 404

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            asked: list[str] = []
            try:
                # a clinician: /viewer → the IdP's login form → back in /viewer with every study
                page = await _new_page(browser)
                page.on("request", lambda r: asked.append(r.url) if r.url.startswith(base) else None)
                unauthorized: list[str] = []
                page.on("response", lambda r: unauthorized.append(r.url) if r.status == 401 else None)
                await page.goto(f"{base}/viewer")
                await _idp_login(page, "dr-alice")
                await page.wait_for_selector(f"text=1-{every} of {every}", timeout=90_000)
                assert page.url.startswith(f"{base}/viewer") and "code=" not in page.url
                await page.screenshot(path=str(out / "oidc-study-list-clinician.png"), timeout=120_000)
                assert not unauthorized, unauthorized
                token = await page.evaluate("() => sessionStorage.getItem('fedgate.token')")
                assert token and token.count(".") == 2  # the issuer's JWT, not a fedgate-signed one
                tokens = [token]

                # an analyst (GRU research purpose from the token) starts at /ui: the console sends them to the
                # viewer's sign-in, the IdP's form, and back to /ui; then /viewer shows the permitted study only
                page = await _new_page(browser)
                page.on("request", lambda r: asked.append(r.url) if r.url.startswith(base) else None)
                fragments: list[int] = []
                page.on("response", lambda r: fragments.append(r.status) if "/ui/fragments/" in r.url else None)
                await page.goto(f"{base}/ui/models")
                await _idp_login(page, "ana-lyst")
                await page.wait_for_url(f"{base}/ui/models", timeout=90_000)
                await page.wait_for_selector("#whoami:has-text('ana-lyst')", timeout=60_000)
                for _ in range(120):
                    if fragments:
                        break
                    await asyncio.sleep(0.5)
                assert fragments and all(s == 200 for s in fragments), fragments
                assert "research DUO:0000042" in await page.inner_text("#whoami")
                await page.screenshot(path=str(out / "oidc-console-analyst.png"), timeout=120_000)
                token = await page.evaluate("() => sessionStorage.getItem('fedgate.token')")
                tokens.append(token)
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{base}/dicomweb/studies", headers={
                            "Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}) as r:
                        assert r.status == 200 and r.headers["X-Total-Count"] == "1"
                    # the analyst role from the groups claim: no writes
                    async with http.post(f"{base}/fhir/Patient", json={"resourceType": "Patient"}, headers={
                            "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}) as r:
                        assert r.status == 403
                await page.goto(f"{base}/viewer/")
                await page.wait_for_selector("text=1-1 of 1", timeout=90_000)
                await page.wait_for_selector("text=JANCT000")
                await page.screenshot(path=str(out / "oidc-study-list-analyst.png"), timeout=120_000)

                # a user the IdP knows but whose groups map to no fedgate role: signed in at the IdP, refused here
                page = await _new_page(browser)
                await page.goto(f"{base}/viewer")
                await _idp_login(page, "mallory")
                await page.wait_for_selector("text=the gateway refused the token of the identity provider",
                                             timeout=90_000)
                await asyncio.sleep(2)
                assert page.url.startswith(f"{base}/viewer/login")  # and stays there: no sign-in loop
                await page.screenshot(path=str(out / "oidc-refused.png"), timeout=120_000)
            finally:
                await browser.close()
        # no token or authorization code in the gateway's logs, nor in a URL it was asked for
        assert asked and not [u for u in asked if "code=" in u or "token" in u.split("?")[-1]], asked
        logged = "\n".join(records.texts)
        assert "/dicomweb/studies" in logged  # the request log was captured
        for t in tokens:
            assert t not in logged and t.split(".")[2] not in logged
    finally:
        logging.getLogger("gateway").removeHandler(records)
        logging.getLogger("gateway").setLevel(logging.NOTSET)
        if gw is not None:
            _publish(_artefacts(tmp_path), "oidc")
            await gw.server.close()
        idp.terminate()
        await idp.wait()


def test_role_map_setting_is_checked(tmp_path):
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError, match="oidc_role_map"):
        make_settings(tmp_path, "sqlite://", oidc_role_map="fedgate-analysts=superuser")


async def test_unreachable_issuer_stops_start_up(tmp_path):
    """An issuer whose discovery fails is a start-up error in words, never a gateway that accepts no one."""
    from gateway.settings import SettingsError
    from tests.conftest import start_gateway

    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'f.db'}",
                             viewer_oidc_authority=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(SettingsError, match="OIDC discovery"):
        gw = await start_gateway(settings)
        await gw.server.close()


def test_issuer_roles_claim_mapping(tmp_path):
    from gateway.auth import TokenVerifier

    settings = make_settings(tmp_path / "data", "sqlite://", oidc_roles_claim="realm_access.roles",
                             oidc_role_map="radiologists=clinician researchers=analyst")
    v = TokenVerifier(settings)
    assert v._issuer_roles({"realm_access": {"roles": ["researchers", "offline"]}})["roles"] == ["analyst"]
    assert v._issuer_roles({"realm_access": {"roles": ["admin"]}})["roles"] == []  # unmapped: no role
    assert v._issuer_roles({"roles": ["admin"]})["roles"] == []  # only the configured claim counts
