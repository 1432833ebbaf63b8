"""Bulk loading of FHIR JSON (single resources and Bundles) through the FHIR service.

* ``transaction`` / ``batch`` Bundles are processed as such (server-assigned ids for POST entries).
* ``collection`` / ``searchset`` / ``document`` Bundles and single resources are stored with their own
  ids (update-as-create), so cross-references between example files resolve.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from gateway.context import SYSTEM
from gateway.errors import GatewayError
from gateway.ids import new_id
from gateway.services.access import NullAudit, OpenGate
from gateway.services.fhir import FhirService
from gateway.services.validation import ModelValidator
from gateway.settings import Settings
from gateway.store import open_database

log = logging.getLogger(__name__)


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(x for x in p.rglob("*.json") if x.is_file())
        elif p.suffix == ".json":
            out.append(p)
    return out


def as_transaction(doc: dict[str, Any]) -> dict[str, Any]:
    """A transaction Bundle that stores ``doc`` (a resource or a non-transaction Bundle) by its ids."""
    if doc.get("resourceType") == "Bundle" and doc.get("type") in ("transaction", "batch"):
        return doc
    resources = []
    if doc.get("resourceType") == "Bundle" and doc.get("type") in ("collection", "searchset", "document", "message",
                                                                   "history"):
        resources = [e["resource"] for e in doc.get("entry") or () if isinstance(e.get("resource"), dict)]
        if doc.get("type") in ("document", "message"):
            resources = [doc]
    else:
        resources = [doc]
    entries = []
    by_key = {(r["resourceType"], r.get("id")): r for r in resources}  # a repeated id: the last copy wins
    resources = list(by_key.values()) if all(k[1] for k in by_key) else resources
    for r in resources:
        rid = r.get("id") or new_id()
        r = dict(r, id=rid)
        entries.append({"fullUrl": f"{r['resourceType']}/{rid}", "resource": r,
                        "request": {"method": "PUT", "url": f"{r['resourceType']}/{rid}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def load_paths(settings: Settings, paths: list[Path], *, progress: bool = True) -> dict[str, Any]:
    db = await open_database(settings)
    validator = ModelValidator(settings.validation_processes)
    svc = FhirService(db, OpenGate(), NullAudit(), validator=validator)
    loaded, failed, resources = 0, [], 0
    files = _files(paths)
    try:
        for f in tqdm(files, desc="loading", unit="file", disable=not progress):
            try:
                doc = orjson.loads(f.read_bytes())
                out = await svc.bundle(SYSTEM, as_transaction(doc))
                resources += len(out.get("entry") or ())
                loaded += 1
            except (GatewayError, orjson.JSONDecodeError) as exc:
                failed.append({"file": f.name, "error": str(exc)[:300]})
                log.warning("file not loaded: %s", f.name)
        await db.analyze()
    finally:
        validator.close()
        await db.dispose()
    return {"files": len(files), "loaded": loaded, "resources": resources, "failed": failed}
