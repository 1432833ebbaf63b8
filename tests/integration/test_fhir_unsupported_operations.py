"""An operation this server does not implement answers 400 OperationOutcome ``not-supported`` naming it —
over REST as inside a Bundle (docs/fhir.md) — never a bare 404 "no such route" or "not a FHIR id"."""

from __future__ import annotations

import pytest

FHIR_JSON = "application/fhir+json"


@pytest.mark.parametrize("path", ["Patient/$validate", "$meta", "Patient/p1/$validate", "Observation/o1/$everything"])
async def test_unsupported_operation_is_400_not_supported(gateway, http, path):
    async with http.get(f"{gateway.fhir}/{path}", headers=gateway.headers("clinician")) as r:
        assert r.status == 400, await r.text()
        assert r.headers["Content-Type"].startswith(FHIR_JSON)
        issue = (await r.json())["issue"][0]
    assert issue["code"] == "not-supported"
    assert "$" + path.split("$")[1] in issue["diagnostics"] and "$everything" in issue["diagnostics"]


async def test_implemented_operations_are_not_caught(gateway, http):
    async with http.get(f"{gateway.fhir}/Patient/nobody/$everything", headers=gateway.headers("clinician")) as r:
        assert r.status == 404  # implemented: the Patient is not known
