"""``fedgate vocab load|list|prune``: the vocabulary store (docs/vocab.md).

``load`` reads an Athena folder (CONCEPT / CONCEPT_RELATIONSHIP / CONCEPT_ANCESTOR, tab separated),
an OBO or OWL ontology, or a FHIR CodeSystem JSON, writes it as a new version with a progress bar, and
switches its systems to it in one transaction: a running server keeps answering from the previous
version until the switch (it may keep running; no restart needed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gateway.settings import Settings

#: The vocabulary subsets shipped with fedgate (demo data, tests): ``fedgate vocab load --demo``.
DEMO_VOCAB = Path(__file__).resolve().parents[1] / "demo" / "data" / "vocab"
DEMO_SOURCES = ("snomed-athena", "mondo-subset.obo", "doid-subset.obo", "hpo-subset.obo")


def demo_paths() -> list[Path]:
    return [DEMO_VOCAB / p for p in DEMO_SOURCES if (DEMO_VOCAB / p).exists()]


async def load_demo(db) -> list[dict]:
    """Load the shipped subsets into ``db`` (what ``fedgate demo`` and the tests do)."""
    from gateway.services.vocab import load_path

    return [await load_path(db, p) for p in demo_paths()]


async def _load(settings: Settings, args) -> list[dict]:
    from tqdm import tqdm

    from gateway.services.vocab import load_path
    from gateway.store import open_database

    db = await open_database(settings)
    out = []
    vocabularies = frozenset(v.strip() for v in args.vocabularies.split(",")) if args.vocabularies else None
    paths = [Path(p) for p in args.paths] + (demo_paths() if args.demo else [])
    try:
        for path in paths:
            bars: dict[str, tqdm] = {}

            def progress(stage: str, n: int) -> None:
                if stage not in bars:
                    bars[stage] = tqdm(desc=f"{path.name}: {stage}", unit=" rows", unit_scale=True,
                                       disable=args.quiet, file=sys.stderr)
                bars[stage].update(n)

            try:
                out.append(await load_path(db, path, fmt=args.format, release=args.release, name=args.name,
                                           progress=progress, vocabularies=vocabularies))
            finally:
                for b in bars.values():
                    b.close()
    finally:
        await db.dispose()
    return out


async def _with_db(settings: Settings, fn, *, write: bool = False):
    """``fn(conn)`` on the settings' store (a write transaction with ``write``)."""
    from gateway.store import open_database

    db = await open_database(settings)
    try:
        async with (db.write() if write else db.read()) as conn:
            return await fn(conn)
    finally:
        await db.dispose()


def cmd_vocab(args: argparse.Namespace, settings: Settings) -> int:
    from mappings.vocab.sources import VocabFormatError

    try:
        if args.vocab_command == "load":
            if not args.paths and not args.demo:
                print("fedgate vocab load: give PATH(s) or --demo", file=sys.stderr)
                return 2
            result: object = asyncio.run(_load(settings, args))
        elif args.vocab_command == "list":
            from gateway.store.vocab_schema import list_releases

            result = asyncio.run(_with_db(settings, list_releases))
        else:
            from gateway.store.vocab_schema import prune

            result = {"pruned": asyncio.run(_with_db(settings, prune, write=True))}
    except (VocabFormatError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"fedgate vocab: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def add_parser(sub, common, func) -> None:
    p = sub.add_parser("vocab", help="vocabulary store: load code systems and hierarchies (docs/vocab.md)")
    p.set_defaults(func=func)
    vsub = p.add_subparsers(dest="vocab_command", required=True)
    ld = vsub.add_parser("load", help="load an Athena folder, .obo/.owl ontology or CodeSystem .json as a new version")
    common(ld)
    ld.add_argument("paths", nargs="*", help="Athena folder (CONCEPT*.csv), .obo, .owl/.ttl, CodeSystem .json")
    ld.add_argument("--demo", action="store_true", help="also load the subsets shipped in demo/data/vocab")
    ld.add_argument("--format", choices=["athena", "obo", "owl", "fhir-codesystem"], help="default: by extension")
    ld.add_argument("--release", help="release label (default: the file's own: OBO data-version, CodeSystem.version)")
    ld.add_argument("--name", help="name of the load (default: the ontology / folder name)")
    ld.add_argument("--vocabularies", help="Athena: keep only these vocabulary ids (comma separated)")
    ld.add_argument("--quiet", action="store_true", help="no progress bar")
    ls = vsub.add_parser("list", help="loaded releases (what, which release, when, state)")
    common(ls)
    pr = vsub.add_parser("prune", help="delete releases no system uses any more")
    common(pr)


__all__ = ["cmd_vocab", "add_parser", "load_demo", "demo_paths", "DEMO_VOCAB"]
