"""Vocabulary service: load releases into the store (versioned, switched atomically) and answer the
terminology questions of the FHIR operations, the cohort compiler and the consent gate (docs/vocab.md).

Vocabularies are not patient data: the terminology operations need an authenticated caller but no
consent scope.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import islice
from pathlib import Path

from gateway.store import vocab_schema as vs
from mappings.vocab.sources import (
    Parsed,
    VocabFormatError,
    athena_release,
    closure_rows,
    codesystem_release,
    obo_release,
    owl_release,
)

log = logging.getLogger(__name__)

CHUNK = 50_000


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "CONCEPT.csv").exists():
            return "athena"
        raise VocabFormatError(f"{path}: a folder must hold Athena files (CONCEPT.csv, CONCEPT_ANCESTOR.csv)")
    suffix = path.suffix.lower()
    if suffix == ".obo":
        return "obo"
    if suffix in (".owl", ".ttl", ".rdf"):
        return "owl"
    if suffix == ".json":
        return "fhir-codesystem"
    raise VocabFormatError(f"{path}: unknown vocabulary format (folder of Athena CSVs, .obo, .owl/.ttl, CodeSystem .json)")


def parse_path(path: Path, *, fmt: str | None = None, release: str | None = None, name: str | None = None,
               vocabularies: frozenset[str] | None = None) -> tuple[Parsed, list]:
    """Parse a vocabulary source (blocking; run in a thread).  Returns the release and the files to
    close once its lazy closure rows are consumed."""
    fmt = fmt or detect_format(path)
    opened: list = []
    if fmt == "athena":
        def opt(fname: str):
            p = path / fname
            if not p.exists():
                return None
            f = p.open(newline="", encoding="utf-8")
            opened.append(f)
            return f
        concept = opt("CONCEPT.csv")
        if concept is None:
            raise VocabFormatError(f"{path}: CONCEPT.csv not found")
        ancestors = opt("CONCEPT_ANCESTOR.csv")
        rel = None if ancestors is not None else opt("CONCEPT_RELATIONSHIP.csv")
        parsed = athena_release(concept, rel, ancestors, release=release or "", name=name or path.name,
                                vocabularies=vocabularies)
        concept.close()
        if rel is not None:
            rel.close()
        return parsed, opened
    if fmt == "obo":
        with path.open(encoding="utf-8") as f:
            return obo_release(f, source=str(path), name=name, release=release), opened
    if fmt == "owl":
        import rdflib

        graph = rdflib.Graph()
        try:
            graph.parse(str(path), format="turtle" if path.suffix.lower() == ".ttl" else "xml")
        except Exception as exc:  # rdflib raises many parser types
            raise VocabFormatError(f"{path}: not readable as OWL ({type(exc).__name__})") from exc
        return owl_release(graph, source=str(path), name=name, release=release), opened
    if fmt == "fhir-codesystem":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise VocabFormatError(f"{path}: not JSON ({exc})") from exc
        parsed = codesystem_release(doc, source=str(path))
        if release:
            parsed.release = release
        if name:
            parsed.name = name
        return parsed, opened
    raise VocabFormatError(f"unknown format {fmt!r} (athena, obo, owl, fhir-codesystem)")


def _chunks(it, n: int) -> Iterator[list]:
    it = iter(it)
    while part := list(islice(it, n)):
        yield part


async def load_release(db, parsed: Parsed, *, source: str | None = None,
                       progress: Callable[[str, int], None] | None = None) -> dict:
    """Write ``parsed`` as a new version (chunked transactions, invisible until switched), then switch
    its systems to it in one transaction.  Returns a summary."""
    started = time.perf_counter()
    if not parsed.concepts:
        raise VocabFormatError(f"{parsed.name}: no concepts")
    async with db.write() as conn:
        version = await vs.begin_release(conn, name=parsed.name, release=parsed.release, fmt=parsed.fmt, source=source)
    seen: set[tuple[str, str]] = set()
    concepts = []
    for system, code, display, cid, voc in parsed.concepts:
        if (system, code) in seen:
            continue
        seen.add((system, code))
        concepts.append((version, system[:255], code[:255], display, cid, voc))
    for part in _chunks(concepts, CHUNK):
        async with db.write() as conn:
            await vs.insert_rows(conn, vs.vocab_concept, vs.CONCEPT_COLS, part)
        if progress:
            progress("concepts", len(part))
    rows = parsed.closure if parsed.closure is not None else closure_rows(parsed.parents)
    closure = 0
    for part in _chunks(rows, CHUNK):  # CONCEPT_ANCESTOR's key is (ancestor, descendant): no duplicates
        batch = [(version, system[:255], anc[:255], desc[:255], levels) for system, anc, desc, levels in part]
        async with db.write() as conn:
            await vs.insert_rows(conn, vs.vocab_ancestor, vs.ANCESTOR_COLS, batch)
        closure += len(batch)
        if progress:
            progress("closure", len(part))
    async with db.write() as conn:
        retired = await vs.activate(conn, version, parsed.systems, concepts=len(concepts), closure=closure)
    if db.dialect == "postgresql":
        async with db.write() as conn:
            from sqlalchemy import text

            await conn.execute(text("ANALYZE vocab_ancestor"))
            await conn.execute(text("ANALYZE vocab_concept"))
    summary = {"version_id": version, "name": parsed.name, "release": parsed.release, "format": parsed.fmt,
               "systems": parsed.systems, "concepts": len(concepts), "closure_rows": closure,
               "replaced": retired, "seconds": round(time.perf_counter() - started, 2)}
    log.info("vocabulary loaded", extra={k: v for k, v in summary.items() if k != "systems"})
    return summary


async def load_path(db, path: Path, *, fmt: str | None = None, release: str | None = None, name: str | None = None,
                    progress: Callable[[str, int], None] | None = None,
                    vocabularies: frozenset[str] | None = None) -> dict:
    parsed, opened = await asyncio.to_thread(parse_path, path, fmt=fmt, release=release, name=name,
                                             vocabularies=vocabularies)
    try:
        return await load_release(db, parsed, source=path.name, progress=progress)
    finally:
        for f in opened:
            f.close()


class VocabService:
    """Read side: $lookup / $subsumes / $expand, and the disease closure for the consent gate."""

    def __init__(self, db) -> None:
        self.db = db

    async def lookup(self, system: str, code: str) -> dict | None:
        async with self.db.read() as conn:
            return await vs.lookup(conn, system, code)

    async def subsumes(self, system: str, a: str, b: str) -> str | None:
        async with self.db.read() as conn:
            return await vs.subsumes(conn, system, a, b)

    async def expand(self, system: str, **kw) -> tuple[int, list[dict]] | None:
        async with self.db.read() as conn:
            return await vs.expand(conn, system, **kw)

    async def systems(self) -> list[str]:
        async with self.db.read() as conn:
            return [s for s, _ in await vs.generation(conn)]




async def startup_load(db, entries) -> list[dict]:
    """The ``[vocab] load`` setting: paths (or ``"demo"`` for the shipped subsets) loaded at start-up
    unless a release of the same name, release label and format is already active (so a restart or a
    second process loads nothing).  The hook ``fedgate demo``, docker-compose sites and scripts use."""
    from sqlalchemy import select

    paths: list[Path] = []
    for entry in entries or ():
        if entry == "demo":
            from gateway.vocab_cli import demo_paths

            paths += demo_paths()
        else:
            paths.append(Path(entry))
    done = []
    for path in paths:
        parsed, opened = await asyncio.to_thread(parse_path, path)
        try:
            r = vs.vocab_release
            async with db.read() as conn:
                have = (await conn.execute(select(r.c.version_id).where(
                    r.c.name == parsed.name[:200], r.c.release == (parsed.release or "")[:200],
                    r.c.format == parsed.fmt, r.c.state == "active"))).first()
            if have is None:
                done.append(await load_release(db, parsed, source=path.name))
        finally:
            for f in opened:
                f.close()
    return done


async def vocab_ctx(app) -> AsyncIterator[None]:
    """cleanup_ctx: ``[vocab] load = ["demo", "/path/to/mondo.obo", ...]`` at start-up (once, not in the
    serving children of ``fedgate serve --processes N``)."""
    from gateway import keys

    cfg = app[keys.SETTINGS].extra.get("vocab") or {}
    entries = cfg.get("load") or ()
    if entries and app[keys.STARTUP] != "serve":
        await startup_load(app[keys.DB], entries)
    yield


__all__ = ["load_path", "load_release", "parse_path", "detect_format", "VocabService", "startup_load", "vocab_ctx"]
