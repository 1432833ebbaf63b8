"""SMART Backend Services (issue 24): a client registered with a public key the test generates gets a token for
a signed assertion at ``/auth/token`` and runs a Bulk Data export with it; replays, wrong audiences, expired or
foreign-key assertions and unknown algorithms are refused; ``system/[type].read`` scopes narrow the export."""

from __future__ import annotations

import json
import time
import uuid

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.bulk_client import BulkClient, BulkError
from tests.integration.test_bulk_export import GRU, _patients, _refused, _settings, _start
from tests.integration.test_consent_enforcement import _load


def _keypair(kind: str, kid: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RSA" \
        else ec.generate_private_key(ec.SECP384R1())
    algo = jwt.algorithms.RSAAlgorithm if kind == "RSA" else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algo.to_jwk(key.public_key()))
    jwk |= {"kid": kid, "alg": "RS384" if kind == "RSA" else "ES384", "use": "sig"}
    return key, jwk


@pytest.fixture
async def site(tmp_path, db_url):
    rsa_key, rsa_jwk = _keypair("RSA", "k-rsa")
    ec_key, ec_jwk = _keypair("EC", "k-ec")
    jwks = tmp_path / "etl.jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    settings = _settings(tmp_path, db_url)
    extra = dict(settings.extra)
    extra["backend_clients"] = {
        "etl": {"jwks": str(jwks), "role": "analyst", "purpose": GRU, "scopes": ["system/*.read"]},
        "narrow": {"jwks": {"keys": [rsa_jwk]}, "role": "analyst", "purpose": GRU,
                   "scopes": ["system/Patient.read"]},
    }
    import dataclasses

    gw = await _start(dataclasses.replace(settings, extra=extra))
    try:
        async with aiohttp.ClientSession() as http:
            await _load(gw, http)
        yield gw, rsa_key, ec_key
    finally:
        await gw.server.close()


def _assertion(key, alg: str, kid: str, aud: str, client: str = "etl", **over) -> str:
    now = int(time.time())
    claims = {"iss": client, "sub": client, "aud": aud, "exp": now + 240, "jti": uuid.uuid4().hex} | over
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


async def _token(http, gw, assertion: str, scope: str = "system/*.read") -> tuple[int, dict]:
    form = {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    async with http.post(gw.url + "/auth/token", data=form) as r:
        return r.status, await r.json()


async def test_backend_services_token_flow_and_export(site):
    gw, rsa_key, ec_key = site
    aud = gw.url + "/auth/token"
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/.well-known/smart-configuration") as r:
            conf = await r.json()
        assert conf["token_endpoint"] == aud
        assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]
        assert "client_credentials" in conf["grant_types_supported"]
        assert {"RS384", "ES384"} <= set(conf["token_endpoint_auth_signing_alg_values_supported"])

        a = _assertion(rsa_key, "RS384", "k-rsa", aud)
        status, tok = await _token(http, gw, a)
        assert status == 200, tok
        assert tok["token_type"] == "bearer" and tok["expires_in"] <= 300 and tok["scope"] == "system/*.read"
        # a replayed assertion (same jti) is refused
        status, err = await _token(http, gw, a)
        assert status == 401 and err["error"] == "invalid_client" and "replay" in err["error_description"]
        # ES384 works as well
        status, tok2 = await _token(http, gw, _assertion(ec_key, "ES384", "k-ec", aud))
        assert status == 200, tok2
        # refusals: wrong audience, expired, exp too far ahead, sub != iss, unknown client, wrong algorithm,
        # a key the client never registered, no scope that can be granted, other grant types
        other_key, _ = _keypair("RSA", "k-rsa")
        for assertion in (_assertion(rsa_key, "RS384", "k-rsa", "https://elsewhere/token"),
                          _assertion(rsa_key, "RS384", "k-rsa", aud, exp=int(time.time()) - 60),
                          _assertion(rsa_key, "RS384", "k-rsa", aud, exp=int(time.time()) + 3600),
                          _assertion(rsa_key, "RS384", "k-rsa", aud, sub="someone"),
                          _assertion(rsa_key, "RS384", "k-rsa", aud, client="nobody"),
                          _assertion(rsa_key, "RS256", "k-rsa", aud),
                          _assertion(other_key, "RS384", "k-rsa", aud),
                          "not-a-jwt"):
            status, err = await _token(http, gw, assertion)
            assert status == 401 and err["error"] == "invalid_client", err
        status, err = await _token(http, gw, _assertion(rsa_key, "RS384", "k-rsa", aud), scope="system/*.write")
        assert status == 400 and err["error"] == "invalid_scope"
        async with http.post(aud, data={"grant_type": "password", "client_assertion": "x"}) as r:
            assert r.status == 400 and (await r.json())["error"] == "unsupported_grant_type"
        async with http.post(aud, data={"grant_type": "client_credentials"}) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"

        # the token runs an export as the client's role and purpose: exactly what the gate lets it read
        c = BulkClient(http, gw.fhir, tok["access_token"])
        _, files = await c.export("$export", [("_type", "Patient,Observation")])
        refused = await _refused(gw, http, {"Authorization": f"Bearer {tok['access_token']}"})
        _, f_clin = await BulkClient(http, gw.fhir, gw.token("clinician")).export(
            "$export", [("_type", "Patient,Observation")])
        assert _patients(f_clin) - _patients(files) == refused and refused

        # system/Patient.read: Patient only
        status, narrow = await _token(http, gw, _assertion(rsa_key, "RS384", "k-rsa", aud, client="narrow"),
                                      scope="system/Patient.read system/Observation.read")
        assert status == 200 and narrow["scope"] == "system/Patient.read"
        n = BulkClient(http, gw.fhir, narrow["access_token"])
        with pytest.raises(BulkError) as e:
            await n.kickoff("$export", [("_type", "Observation")])
        assert e.value.status == 403
        _, files = await n.export("$export")
        assert set(files) == {"Patient"}


async def test_cli_exports_into_a_folder_with_the_client_key(site, tmp_path):
    """``fedgate export fhir`` with SMART Backend Services credentials: kick-off, poll, download, delete."""
    import asyncio
    import sys

    from cryptography.hazmat.primitives import serialization

    from tests.conftest import REPO

    gw, rsa_key, _ = site
    pem = tmp_path / "etl.pem"
    pem.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "export", "fhir", "--url", gw.url, "--client-id", "etl", "--key", str(pem),
        "--kid", "k-rsa", "--type", "Patient,Observation", "--out", str(out), "--quiet", cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation"}
    for o in manifest["output"]:
        lines = (out / f"{o['type']}.ndjson").read_text().splitlines()
        assert len(lines) == o["count"] and all(json.loads(x)["resourceType"] == o["type"] for x in lines)
    assert b"exported" in stdout
    # the CLI released the export: its files are gone on the server
    assert not any((gw.settings.data_dir / "bulk").iterdir())
    # a refusal is a clear message and exit 1
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "export", "fhir", "--url", gw.url, "--token", "nope", "--out", str(out),
        "--quiet", cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"kick-off refused (401)" in stderr
