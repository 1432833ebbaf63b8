"""Issue 22: the browser and deployment edge — CORS as configuration (preflight on every route, CORS headers
on every response to an allowed origin including 401/403/404/500, fail closed otherwise) and forwarded
headers believed only from ``trusted_proxies`` for every URL the gateway writes."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pydicom
import pytest

from dicomweb_client.api import DICOMwebClient

from gateway import keys
from tests.conftest import data_path, make_settings, start_gateway

ORIGIN = "http://viewer.example:3000"
EXPOSED = {"X-Total-Count", "Warning", "Location", "ETag", "Content-Location"}


@pytest.fixture
async def cors_gw(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, cors_origins=f"{ORIGIN}, https://other.example"))
    try:
        yield gw
    finally:
        await gw.server.close()


async def _preflight(http, url, origin=ORIGIN, method="GET"):
    headers = {"Origin": origin, "Access-Control-Request-Method": method,
               "Access-Control-Request-Headers": "authorization, x-purpose-of-use"}
    async with http.options(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def test_preflight_on_every_route(cors_gw):
    async with aiohttp.ClientSession() as http:
        seen = 0
        for res in cors_gw.app.router.resources():
            info = res.get_info()
            path = info.get("path") or info.get("formatter")
            if not path:
                continue
            # placeholders filled with a value their pattern accepts (a UID, or a hex job id, ...)
            for value in ("1.2.3", "abc123", "1"):
                filled = re.sub(r"\{(\w+)[^}]*\}", lambda m: "Patient" if m[1] == "type" else value, path)
                if res._match(filled) is not None:  # aiohttp resources expose no public matcher
                    break
            url = cors_gw.url + filled
            methods = {r.method for r in res if r.method != "HEAD"}
            status, headers, body = await _preflight(http, url, method=sorted(methods)[0])
            assert status == 204, (path, status, body)
            assert headers["Access-Control-Allow-Origin"] == ORIGIN
            allowed = {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
            assert methods <= allowed, (path, methods, allowed)
            assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
            assert "x-purpose-of-use" in headers["Access-Control-Allow-Headers"].lower()
            seen += 1
        assert seen > 20
        # a disallowed origin: refused, with no CORS header (fail closed)
        status, headers, _ = await _preflight(http, cors_gw.fhir + "/Patient", origin="http://evil.example")
        assert status == 403 and "Access-Control-Allow-Origin" not in headers


async def test_cors_headers_on_every_response(cors_gw):
    h = {"Origin": ORIGIN}
    async with aiohttp.ClientSession() as http:
        cases = [
            ("GET", cors_gw.fhir + "/metadata", {}, 200),
            ("GET", cors_gw.fhir + "/Patient", {}, 401),
            ("GET", cors_gw.fhir + "/AuditEvent", cors_gw.headers("clinician"), 403),
            ("GET", cors_gw.fhir + "/Patient/nope", cors_gw.headers("clinician"), 404),
            ("GET", cors_gw.url + "/no/such/route", {}, 404),
            ("GET", cors_gw.dicomweb + "/studies", cors_gw.headers("clinician"), 200),
            ("GET", cors_gw.dicomweb + "/studies/1.2.3/series", {}, 401),
            ("GET", cors_gw.url + "/boom", {}, 500),
        ]

        async def boom(request):
            raise RuntimeError("a planted bug")
        # a route raising an unexpected error: the 500 also carries the CORS headers
        cors_gw.app.router._frozen = False
        cors_gw.app.router.add_get("/boom", boom, name="boom")
        cors_gw.app[keys.PUBLIC_ROUTES].add("boom")
        cors_gw.app.router._frozen = True
        for method, url, extra, want in cases:
            async with http.request(method, url, headers={**h, **extra}) as r:
                await r.read()
                assert r.status == want, (url, r.status)
                assert r.headers.get("Access-Control-Allow-Origin") == ORIGIN, url
                assert {x.strip() for x in r.headers["Access-Control-Expose-Headers"].split(",")} == EXPOSED
                assert "Origin" in r.headers.get("Vary", "")
            async with http.request(method, url, headers={"Origin": "http://evil.example", **extra}) as r:
                await r.read()
                assert "Access-Control-Allow-Origin" not in r.headers, url
        async with http.get(cors_gw.fhir + "/metadata") as r:
            assert (await r.json())["rest"][0]["security"]["cors"] is True


async def test_no_cors_by_default(gateway, http):
    status, headers, _ = await _preflight(http, gateway.fhir + "/Patient")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    async with http.get(gateway.fhir + "/Patient", headers={"Origin": ORIGIN}) as r:
        assert r.status == 401 and "Access-Control-Allow-Origin" not in r.headers
    async with http.get(gateway.fhir + "/metadata") as r:
        assert (await r.json())["rest"][0]["security"]["cors"] is False
    # an OPTIONS that is no preflight stays what it was: no such method
    async with http.options(gateway.fhir + "/Patient") as r:
        assert r.status == 405


# ------------------------------------------------------------------------------- forwarded headers

CT = sorted(data_path("dicom", "dcmqi", "ct-3slice").glob("*.dcm"))
PUBLIC = "https://pacs.example.org/site-a"
PROXY_HEADERS = {
    "x-forwarded": {"X-Forwarded-Host": "pacs.example.org", "X-Forwarded-Proto": "https",
                    "X-Forwarded-Prefix": "/site-a", "X-Forwarded-For": "203.0.113.9"},
    "rfc7239": {"Forwarded": 'for=203.0.113.9;host=pacs.example.org;proto=https', "X-Forwarded-Prefix": "/site-a"},
    # two proxies, both trusted: the outer one's view wins
    "chain": {"Forwarded": 'for=203.0.113.9;host=pacs.example.org;proto=https, for=127.0.0.1;host=inner:8080;proto=http',
              "X-Forwarded-Prefix": "/site-a"},
}


async def _written_urls(gw, headers) -> list[str]:
    """Every URL the gateway writes for one FHIR create/search and one DICOMweb STOW/QIDO/metadata."""
    auth = gw.headers("admin")
    out: list[str] = []
    async with aiohttp.ClientSession() as http:
        pat = {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "fw1"}]}
        async with http.post(gw.fhir + "/Patient", json=pat,
                             headers={**auth, **headers, "Content-Type": "application/fhir+json"}) as r:
            assert r.status == 201, await r.text()
            out.append(r.headers["Location"])
        async with http.get(gw.fhir + "/Patient?_count=1", headers={**auth, **headers}) as r:
            b = await r.json()
            out += [link["url"] for link in b["link"]] + [e["fullUrl"] for e in b["entry"]]
        async with http.get(gw.fhir + "/metadata", headers=headers) as r:
            out.append((await r.json())["implementation"]["url"])
        async with http.get(gw.fhir + "/AuditEvent?_count=1", headers={**auth, **headers}) as r:
            b = await r.json()
            out += [link["url"] for link in b["link"]] + [e["fullUrl"] for e in b.get("entry", [])]
    client = DICOMwebClient(url=gw.dicomweb, headers={**auth, **headers})
    stow = await asyncio.to_thread(client.store_instances, [pydicom.dcmread(p) for p in CT[:1]])
    if "RetrieveURL" in stow:
        out.append(stow.RetrieveURL)
    out += [str(r.RetrieveURL) for r in stow.ReferencedSOPSequence]
    studies = await asyncio.to_thread(client.search_for_studies)
    out += [s["00081190"]["Value"][0] for s in studies]
    uid = studies[0]["0020000D"]["Value"][0]
    meta = await asyncio.to_thread(client.retrieve_study_metadata, uid)
    out += [m["7FE00010"]["BulkDataURI"] for m in meta if "BulkDataURI" in m.get("7FE00010", {})]
    assert len(out) >= 8
    return out


async def test_forwarded_from_a_trusted_proxy(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, trusted_proxies="127.0.0.0/8, ::1"))
    try:
        for style, headers in PROXY_HEADERS.items():
            urls = await _written_urls(gw, headers)
            bad = [u for u in urls
                   if not (u == PUBLIC + "/fhir" or u.startswith((PUBLIC + "/fhir/", PUBLIC + "/dicomweb/")))]
            assert not bad, (style, bad)
    finally:
        await gw.server.close()


async def test_forwarded_ignored_from_an_untrusted_peer(tmp_path, db_url):
    # the proxy list names another address: the loopback test client is not a trusted proxy
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, trusted_proxies="10.9.8.7"))
    try:
        headers = {**PROXY_HEADERS["x-forwarded"], "Forwarded": "host=evil.example;proto=https"}
        urls = await _written_urls(gw, headers)
        assert all(u.startswith(gw.url + "/") for u in urls), [u for u in urls if not u.startswith(gw.url)]
        assert not any("example" in u or "site-a" in u for u in urls)
    finally:
        await gw.server.close()


async def test_forwarded_garbage_is_ignored(tmp_path, db_url):
    gw = await start_gateway(make_settings(tmp_path / "data", db_url, trusted_proxies="127.0.0.1"))
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({"X-Forwarded-Host": "a/b@evil", "X-Forwarded-Proto": "gopher",
                             "X-Forwarded-Prefix": "//evil.example"},
                            {"Forwarded": "host=\"x y\";proto=javascript"}):
                async with http.get(gw.fhir + "/metadata", headers=headers) as r:
                    assert r.status == 200
                    assert (await r.json())["implementation"]["url"] == gw.fhir
    finally:
        await gw.server.close()


def test_settings_reject_bad_values(tmp_path):
    from gateway.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="trusted_proxies"):
        load_settings(env={}, overrides={"data_dir": tmp_path, "trusted_proxies": "not-an-ip"})
    with pytest.raises(SettingsError, match="cors_origins"):
        load_settings(env={}, overrides={"data_dir": tmp_path, "cors_origins": "viewer.example"})
    s = load_settings(env={"FEDGATE_CORS_ORIGINS": "http://a:1, http://b:2/"}, overrides={"data_dir": tmp_path})
    assert s.cors_origin_list == ("http://a:1", "http://b:2")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[fedgate]\ncors_origins = ["http://a:1", "https://b"]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    s = load_settings(config_file=cfg, env={})
    assert s.cors_origin_list == ("http://a:1", "https://b") and s.trusted_proxy_list == ("10.0.0.0/8",)





# ------------------------------------------------------------------------------------ viewer routes


async def test_viewer_config_and_dev_sign_in(tmp_path, db_url):
    """/viewer/app-config.js points OHIF at this gateway's /dicomweb; the dev sign-in exists only when enabled
    and validates its input; files outside the OHIF build are never served."""
    import jwt

    for dev in (False, True):
        gw = await start_gateway(make_settings(tmp_path / f"data{dev}", db_url, viewer_dev_login=dev))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(gw.url + "/viewer/app-config.js") as r:
                    assert r.status == 200 and r.content_type == "application/javascript"
                    js = await r.text()
                    assert "window.location.origin + '/dicomweb'" in js and '"routerBasename":"/viewer"' in js
                    assert ('"devLogin":true' in js) is dev
                async with http.get(gw.url + "/viewer/login") as r:
                    assert r.status == 200 and "fedgate viewer" in await r.text()
                async with http.post(gw.url + "/viewer/dev-token", json={"role": "analyst", "purpose": "DUO:0000042"}) as r:
                    if not dev:
                        assert r.status == 404
                        continue
                    assert r.status == 200, await r.text()
                    tok = (await r.json())["access_token"]
                claims = jwt.decode(tok, options={"verify_signature": False})
                assert claims["roles"] == ["analyst"] and claims["purpose"] == {"codes": ["DUO:0000042"], "diseases": []}
                async with http.get(gw.dicomweb + "/studies", headers={"Authorization": f"Bearer {tok}"}) as r:
                    assert r.status in (200, 204)
                for body in ({"role": "root"}, {"role": "clinician", "purpose": "nonsense"}, ["x"], {"role": "analyst", "purpose": 3}):
                    async with http.post(gw.url + "/viewer/dev-token", json=body) as r:
                        assert r.status == 400, body
                        assert r.content_type == "application/problem+json"
                for path in ("/viewer/../../etc/passwd", "/viewer/%2e%2e/%2e%2e/pyproject.toml", "/viewer/nope.js"):
                    async with http.get(gw.url + path) as r:
                        assert r.status in (404, 503), path  # 503: the OHIF build is not installed here
                        assert "[project]" not in await r.text()
        finally:
            await gw.server.close()
