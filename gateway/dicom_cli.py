"""``fedgate import <dir>``: bulk-load a folder of DICOM files through the same store path as STOW-RS.

Starts the application's wiring (``create_app`` + cleanup contexts, no HTTP listener), so files go
through the service, blob store, index, ImagingStudy sync and audit exactly like a STOW-RS request.

Every file gets one result: ``stored``, ``duplicate`` (an identical instance is already stored: nothing
changed), ``skipped`` (not a DICOM file: a README, a LICENSE, a DICOMDIR) or ``failed`` with the reason
STOW-RS would give. The exit status is 1 only when a file failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gateway.context import SYSTEM
from gateway.services.dicomweb import ImportResult
from gateway.settings import Settings

BATCH = 32
STATUSES = ("stored", "duplicate", "skipped", "failed")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: an index of the files, not an instance


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def not_dicom(path: Path) -> str | None:
    """Why ``path`` is not a DICOM instance file to import (None: it is one, or looks like one).

    A Part 10 file has ``DICM`` after its 128-byte preamble; a file without it is still tried when pydicom
    can read a SOP Instance UID from it (a bare dataset, as some old modalities write)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    if head[128:132] == b"DICM":
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            cls = str(meta.file_meta.get("MediaStorageSOPClassUID", "") or meta.get("SOPClassUID", ""))
        except Exception:  # a damaged Part 10 file: STOW tells the reason
            return None
        return "a DICOMDIR (an index of files, not an instance)" if cls == DICOMDIR_CLASS else None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        if "SOPInstanceUID" in ds:
            return None
    except (InvalidDicomError, Exception):  # anything pydicom cannot read is not DICOM
        pass
    return "not a DICOM file (no DICM prefix and no SOP Instance UID)"


async def _run(settings: Settings, files: list[Path], progress: bool) -> list[ImportResult]:
    from aiohttp import web

    from gateway import keys
    from gateway.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    results: list[ImportResult] = []
    try:
        svc = app[keys.DICOMWEB]
        with tqdm(total=len(files), desc="importing", unit="file", disable=not progress) as bar:
            for i in range(0, len(files), BATCH):
                batch = files[i:i + BATCH]
                todo = []
                for f in batch:
                    why = await asyncio.to_thread(not_dicom, f)
                    if why:
                        results.append(ImportResult(str(f), "skipped", None, why))
                    else:
                        todo.append(f)
                if todo:
                    results.extend(await svc.bulk_import(SYSTEM, todo))
                bar.update(len(batch))
    finally:
        await runner.cleanup()
    order = {str(f): n for n, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r.file])


def summary(results: list[ImportResult]) -> dict:
    counts = Counter(r.status for r in results)
    return {"files": len(results), **{s: counts.get(s, 0) for s in STATUSES}}


def render_text(results: list[ImportResult]) -> str:
    """The human summary: counts, then every file that was not stored with its reason."""
    s = summary(results)
    lines = [f"{s['files']} files: {s['stored']} stored, {s['duplicate']} duplicate (identical instance already "
             f"stored), {s['skipped']} skipped (not DICOM), {s['failed']} failed"]
    for status in ("failed", "skipped"):
        for r in (r for r in results if r.status == status):
            lines.append(f"  {status:<8} {r.file}: {r.reason}")
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    root = Path(args.path)
    if not root.exists():
        print(f"{root}: no such file or folder")
        return 2
    results = asyncio.run(_run(settings, _files(root), not (args.quiet or args.json)))
    if args.json:
        print(json.dumps({**summary(results), "results": [
            {k: v for k, v in r.__dict__.items() if v not in (None, "")} for r in results]}, indent=2))
    else:
        print(render_text(results))
    return 1 if any(r.status == "failed" for r in results) else 0


async def _conflicts(settings: Settings) -> list[dict]:
    from gateway.store import dicom_views, open_database

    db = await open_database(settings)
    try:
        async with db.read() as conn:
            return await dicom_views.list_conflicts(conn)
    finally:
        await db.dispose()


def cmd_conflicts(args: argparse.Namespace, settings: Settings) -> int:
    """``fedgate dicom-conflicts``: studies holding instances of several patients — research
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
