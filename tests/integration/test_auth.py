"""Authentication (issue #4): bearer JWT on every route but the explicit public list; HS256 dev
tokens, RS256/ES256 against a JWKS file or URL; exp/nbf/iss/aud; roles.  Failures are rendered in
the protocol's own form (OperationOutcome under /fhir, problem+json elsewhere)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import keys
from gateway.app import create_app
from tests.conftest import Gateway, make_settings, start_gateway
from tests.procs import FEDGATE, REPO


def _claims(settings, **over):
    now = int(time.time())
    c = {"sub": "u1", "roles": ["clinician"], "iat": now, "exp": now + 600, "iss": settings.jwt_issuer,
         "aud": settings.jwt_audience}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _jwks(rsa_key, ec_key) -> dict:
    out = []
    for kid, key, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algo.to_jwk(key.public_key()))
        out.append(jwk | {"kid": kid, "alg": alg, "use": "sig"})
    return {"keys": out}


@pytest.fixture(scope="module")
def keypairs():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(ec.SECP256R1())


async def _status(http, url, token=None, method="GET", **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, headers=headers, **kw) as r:
        return r.status, r.content_type, (await r.read()), r.headers


async def test_failures_in_the_protocols_form(gateway, http):
    s = gateway.settings
    fhir = f"{gateway.fhir}/Patient"
    secret = s.dev_secret()
    good = jwt.encode(_claims(s), secret, algorithm="HS256")
    cases = {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": jwt.encode(_claims(s, exp=int(time.time()) - 10), secret, algorithm="HS256"),
        "not yet valid": jwt.encode(_claims(s, nbf=int(time.time()) + 600), secret, algorithm="HS256"),
        "bad signature": jwt.encode(_claims(s), "another-secret-" + "y" * 32, algorithm="HS256"),
        "wrong issuer": jwt.encode(_claims(s, iss="someone-else"), secret, algorithm="HS256"),
        "wrong audience": jwt.encode(_claims(s, aud="other-service"), secret, algorithm="HS256"),
        "no exp": jwt.encode(_claims(s, exp=None), secret, algorithm="HS256"),
        "unknown role only": jwt.encode(_claims(s, roles=["superuser"]), secret, algorithm="HS256"),
        "alg none": jwt.encode(_claims(s), None, algorithm="none"),
        "RS256 without JWKS": jwt.encode(_claims(s), rsa.generate_private_key(65537, 2048),
                                                    algorithm="RS256"),
    }
    for name, token in cases.items():
        status, ctype, body, headers = await _status(http, fhir, token)
        assert status == 401, name
        assert ctype == "application/fhir+json" and json.loads(body)["resourceType"] == "OperationOutcome", name
        assert "Bearer" in headers.get("WWW-Authenticate", ""), name
        # problem+json outside /fhir
        status, ctype, body, _ = await _status(http, f"{gateway.url}/omop/export", token, "POST", json={})
        assert (status, ctype) == (401, "application/problem+json"), name
    assert (await _status(http, fhir, good))[0] == 200
    # wrong role for the operation → 403 in the same forms
    analyst_treatment = gateway.token("analyst", purpose="treatment")
    status, ctype, body, _ = await _status(http, fhir, analyst_treatment)
    assert (status, ctype) == (403, "application/fhir+json")
    status, ctype, body, _ = await _status(http, f"{gateway.fhir}/AuditEvent", gateway.token("clinician"))
    assert (status, ctype) == (403, "application/fhir+json")
    async with http.post(f"{gateway.url}/omop/export", json={"format": "csv"},
                         headers=gateway.headers("clinician", purpose={"codes": ["DUO:0000042"]})) as r:
        assert (r.status, r.content_type) == (403, "application/problem+json")
    # public routes need nothing
    for path in ("/healthz", "/fhir/metadata", "/openapi.yaml"):
        assert (await _status(http, gateway.url + path))[0] == 200, path


OPEN = {"healthz", "readyz", "openapi", "fhir.metadata", "fhir.smart_configuration", "smart_configuration"}
# the OHIF viewer's static files and sign-in page (no patient data: that comes through /dicomweb with a token);
# viewer-dev-token signs tokens only with the development setting viewer_dev_login (404 otherwise)
OPEN |= {"viewer", "viewer-files", "viewer-config", "viewer-login", "viewer-dev-token"}
# the console's page shells and static assets (no data: every fragment is fetched with the viewer's token)
OPEN |= {"ui.root", "ui", "ui.static", "ui.page"}


def _sample_url(resource) -> str | None:
    """A concrete URL that the resource matches (placeholders filled with plausible values)."""
    info = resource.get_info()
    if "path" in info:
        return info["path"]
    formatter = info.get("formatter", "")
    names = re.findall(r"{(\w+)}", formatter)
    for candidates in (("Patient", "1", "1.2.3", "abc", "x")[i:] + ("Patient", "1", "1.2.3", "abc", "x")[:i]
                       for i in range(5)):
        parts = {n: candidates[0] if "type" in n else candidates[min(1 + k, 4)] for k, n in enumerate(names)}
        for fill in (parts, {n: c for n, c in zip(names, candidates * 3)}):
            path = formatter.format(**fill)
            if resource._match(path) is not None:  # aiohttp resources expose no public matcher
                return path
    return None


async def test_every_route_is_public_or_rejects_anonymous_requests(gateway, http):
    app = gateway.app
    public = app[keys.PUBLIC_ROUTES]
    checked = 0
    for route in app.router.routes():
        assert route.name, f"unnamed route {route.method} {route.resource.canonical}"
        if route.method in ("HEAD", "OPTIONS") or route.name in OPEN:
            continue
        # routes on the public list beyond the truly open ones authenticate themselves (e.g. the
        # federation site endpoint takes a hub token or an analyst token): they must still say 401
        url = _sample_url(route.resource)
        assert url is not None, f"cannot build a URL for {route.resource.canonical}"
        async with http.request(route.method, gateway.url + url, data=b"{}") as r:
            assert r.status == 401, (route.name, route.method, url, r.status)
        checked += 1
    assert checked >= 15
    assert public >= OPEN


async def test_rs256_es256_with_jwks_file_and_url(tmp_path, db_url, keypairs):
    rsa_key, ec_key = keypairs
    jwks = _jwks(rsa_key, ec_key)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    # a JWKS server (the URL form is fetched once at start-up)
    calls = []

    async def serve_jwks(request):
        calls.append(1)
        return web.json_response(jwks)

    idp = web.Application()
    idp.router.add_get("/jwks", serve_jwks)
    idp_server = TestServer(idp, host="127.0.0.1")
    await idp_server.start_server()
    try:
        for source in (str(jwks_file), str(idp_server.make_url("/jwks"))):
            settings = make_settings(tmp_path / f"d{len(calls)}{source[-4:]}", db_url, jwks=source,
                                     jwt_issuer="https://idp.example", jwt_audience="fedgate-prod")
            gw = await start_gateway(settings)
            try:
                async with aiohttp.ClientSession() as http:
                    url = f"{gw.fhir}/Patient"
                    c = _claims(settings)
                    ok_rs = jwt.encode(c, rsa_key, algorithm="RS256", headers={"kid": "r1"})
                    ok_es = jwt.encode(c, ec_key, algorithm="ES256", headers={"kid": "e1"})
                    assert (await _status(http, url, ok_rs))[0] == 200
                    assert (await _status(http, url, ok_es))[0] == 200
                    other = rsa.generate_private_key(65537, 2048)
                    bad = {
                        "foreign key": jwt.encode(c, other, algorithm="RS256", headers={"kid": "r1"}),
                        "unknown kid": jwt.encode(c, rsa_key, algorithm="RS256", headers={"kid": "zz"}),
                        "expired": jwt.encode(c | {"exp": int(time.time()) - 5}, rsa_key, algorithm="RS256",
                                              headers={"kid": "r1"}),
                        "wrong iss": jwt.encode(c | {"iss": "https://evil"}, ec_key, algorithm="ES256",
                                                headers={"kid": "e1"}),
                        "wrong aud": jwt.encode(c | {"aud": "x"}, ec_key, algorithm="ES256", headers={"kid": "e1"}),
                    }
                    for name, token in bad.items():
                        assert (await _status(http, url, token))[0] == 401, (source, name)
            finally:
                await gw.server.close()
        assert len(calls) == 1  # fetched once, cached for every request
    finally:
        await idp_server.close()


def test_fedgate_token_cli_is_accepted_by_the_gateway_for_that_data_dir(tmp_path):
    data = tmp_path / "d"
    done = subprocess.run([*FEDGATE, "token", "--data-dir", str(data), "--role", "analyst",
                           "--purpose", "DUO:0000040 MONDO:0005105", "--attr", "irb_approved=true",
                           "--attr", "location=DE"], cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from gateway.auth import TokenVerifier
    from gateway.settings import load_settings

    settings = load_settings(env={}, overrides={"data_dir": data})
    who = TokenVerifier(settings).verify(done.stdout.strip())
    assert who.roles == {"analyst"} and who.purpose.codes == ("DUO:0000040",)
    assert who.purpose.diseases == ("MONDO:0005105",)
    assert who.attributes == {"irb_approved": True, "location": "DE"}
    bad = subprocess.run([*FEDGATE, "token", "--data-dir", str(data), "--role", "root"], cwd=REPO, check=False,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown role" in bad.stderr
