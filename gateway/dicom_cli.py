"""``fedgate import <dir>``: bulk-load a folder of DICOM files through the same store path as STOW-RS.

Starts the application's wiring (``create_app`` + cleanup contexts, no HTTP listener), so files go
through the service, blob store, index, ImagingStudy sync and audit exactly like a STOW-RS request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from tqdm import tqdm

from gateway.context import SYSTEM
from gateway.settings import Settings

BATCH = 32


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


async def _run(settings: Settings, files: list[Path], progress: bool) -> dict:
    from aiohttp import web

    from gateway import keys
    from gateway.app import create_app
    from gateway.handlers.dicomweb import SERVICE

    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    stored = failed = 0
    reasons: dict[str, int] = {}
    try:
        svc = app[keys.SERVICES][SERVICE]
        with tqdm(total=len(files), desc="importing", unit="file", disable=not progress) as bar:
            for i in range(0, len(files), BATCH):
                batch = files[i:i + BATCH]
                ok, bad, why = await svc.bulk_import(SYSTEM, batch)
                stored += ok
                failed += bad
                for w in why:
                    key = w.split(":")[0] or "unknown"
                    reasons[key] = reasons.get(key, 0) + 1
                bar.update(len(batch))
    finally:
        await runner.cleanup()
    return {"files": len(files), "stored": stored, "failed": failed, "failure_reasons": reasons}


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    root = Path(args.path)
    if not root.exists():
        print(f"{root}: no such file or folder")
        return 2
    summary = asyncio.run(_run(settings, _files(root), not args.quiet))
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] and args.strict else 0


async def _conflicts(settings: Settings) -> list[dict]:
    from gateway.store import dicom_views, open_database

    db = await open_database(settings)
    try:
        async with db.read() as conn:
            return await dicom_views.list_conflicts(conn)
    finally:
        await db.dispose()


def cmd_conflicts(args: argparse.Namespace, settings: Settings) -> int:
    """``fedgate dicom-conflicts``: studies holding instances of several patients (issue #19) — research
    answers show each patient's part separately; the study needs fixing at the source (split or delete)."""
    found = asyncio.run(_conflicts(settings))
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        for c in found:
            print(f"{c['study_uid']}: {c['patients']} patients, {c['instances']} instances  " +
                  "; ".join(f"{p['patient']} ({p['series']} series, {p['instances']} instances)" for p in c["parts"]))
        print(f"{len(found)} conflicting stud{'y' if len(found) == 1 else 'ies'}")
    return 1 if found and args.strict else 0
