"""The gateway starts on both engines, answers health probes, and requires a token elsewhere."""

from __future__ import annotations


async def test_health_and_ready(gateway, http):
    async with http.get(gateway.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(gateway.url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["database"] in ("sqlite", "postgresql")


async def test_fhir_requires_token(gateway, http):
    async with http.get(gateway.fhir + "/Patient") as r:
        assert r.status == 401
        body = await r.json()
        assert body["resourceType"] == "OperationOutcome"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_create_read_roundtrip(gateway, http):
    h = gateway.headers("clinician") | {"Content-Type": "application/fhir+json"}
    async with http.post(gateway.fhir + "/Patient", json={"resourceType": "Patient", "gender": "female"}, headers=h) as r:
        assert r.status == 201, await r.text()
        created = await r.json()
    async with http.get(f"{gateway.fhir}/Patient/{created['id']}", headers=h) as r:
        assert r.status == 200
        assert (await r.json())["gender"] == "female"
        assert r.headers["ETag"] == 'W/"1"'


async def test_read_headers_are_http_conformant(gateway, http):
    from email.utils import parsedate_to_datetime

    h = gateway.headers("clinician") | {"Content-Type": "application/fhir+json"}
    async with http.put(gateway.fhir + "/Patient/hdr", json={"resourceType": "Patient", "id": "hdr"}, headers=h) as r:
        assert r.status == 201
        body = await r.json()
    async with http.get(gateway.fhir + "/Patient/hdr", headers=h) as r:
        modified = parsedate_to_datetime(r.headers["Last-Modified"])
        assert modified.isoformat()[:19] == body["meta"]["lastUpdated"][:19]
    async with http.get(gateway.fhir + "/Patient/hdr", headers=h | {"If-None-Match": r.headers["ETag"]}) as r2:
        assert r2.status == 304


async def test_searchset_bundles_are_valid_fhir(gateway, http):
    """Search results (empty, count-only and with entries) validate against the R4B Bundle model."""
    from fhir.resources.R4B.bundle import Bundle

    h = gateway.headers("clinician") | {"Content-Type": "application/fhir+json"}
    async with http.post(gateway.fhir + "/Patient", json={"resourceType": "Patient", "gender": "other"}, headers=h):
        pass
    for query in ("Patient?gender=other", "Patient?gender=male", "Patient?_summary=count", "Patient/_history"):
        async with http.get(f"{gateway.fhir}/{query}", headers=h) as r:
            assert r.status == 200
            body = await r.json()
            Bundle.model_validate(body)
            assert not _empty_arrays(body), f"{query}: FHIR JSON must not contain empty arrays"


def _empty_arrays(node) -> bool:
    if isinstance(node, list):
        return not node or any(_empty_arrays(v) for v in node)
    if isinstance(node, dict):
        return any(_empty_arrays(v) for v in node.values())
    return False
