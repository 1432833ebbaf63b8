"""``fedgate omop export|import``: the same service, gate and audit as the server's /omop routes.

The CLI starts the application's wiring (``create_app`` + its cleanup contexts, no HTTP listener) so
the consent gate and audit sink are exactly the ones the running server uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gateway.context import Requester
from gateway.errors import GatewayError
from gateway.settings import Settings


async def _run(settings: Settings, fn) -> dict:
    from aiohttp import web

    from gateway import keys
    from gateway.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        return await fn(app[keys.OMOP], app[keys.GATE], app[keys.AUDIT])
    finally:
        await runner.cleanup()


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import parse_purpose
    from gateway.services.omop import ExportTarget

    try:
        purpose = parse_purpose(args.purpose)
    except GatewayError as exc:
        print(f"--purpose: {exc.message}", file=sys.stderr)
        return 2
    if bool(args.csv) == bool(args.pg_url or args.schema) or (not args.csv and not (args.pg_url and args.schema)):
        print("give either --csv DIR or --pg-url URL --schema S", file=sys.stderr)
        return 2
    requester = Requester(args.subject, frozenset({"analyst"}), None, {}, purpose)
    target = ExportTarget(pg_url=args.pg_url, schema=args.schema,
                          csv_dir=Path(args.csv).resolve() if args.csv else None, replace=args.replace)

    async def go(svc, gate, audit):
        if args.vocabulary:
            svc._vocab_path = args.vocabulary
        return await svc.export(requester, target, gate=gate, audit=audit, path="cli:omop-export")

    return _report(settings, go)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.context import SYSTEM

    async def go(svc, gate, audit):
        if args.vocabulary:
            svc._vocab_path = args.vocabulary
        return await svc.import_schema(SYSTEM, args.pg_url, args.schema, audit=audit, path="cli:omop-import")

    return _report(settings, go)


def _report(settings: Settings, go) -> int:
    try:
        report = asyncio.run(_run(settings, go))
    except GatewayError as exc:
        print(f"fedgate omop: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, default=str))
    return 0
