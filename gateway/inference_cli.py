"""``fedgate model register CARD.json ...`` / ``fedgate model list``: the same service (and validation, and
backend availability check) as ``POST/GET /inference/models``; the app wiring is started without its HTTP
listener and without the job worker."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from gateway.context import SYSTEM
from gateway.errors import GatewayError
from gateway.settings import Settings


async def _run(settings: Settings, fn):
    from aiohttp import web

    from gateway import keys
    from gateway.app import create_app

    inf = dict(settings.extra.get("inference") or {})
    settings = dataclasses.replace(settings, extra={**settings.extra, "inference": {**inf, "worker": False}})
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        return await fn(app[keys.INFERENCE])
    finally:
        await runner.cleanup()


def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    docs = []
    for p in args.cards:
        try:
            docs.append((p, json.loads(Path(p).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            print(f"fedgate model register: {p}: {e}", file=sys.stderr)
            return 2

    async def go(svc):
        out = []
        for p, doc in docs:
            try:
                view, created = await svc.register(SYSTEM, doc)
            except GatewayError as e:
                print(f"fedgate model register: {p}: {e.message}", file=sys.stderr)
                return None
            card = view["card"]
            out.append(f"{'registered' if created else 'unchanged'} {card['name']}@{card['version']}")
        return out

    lines = asyncio.run(_run(settings, go))
    if lines is None:
        return 1
    print("\n".join(lines))
    return 0


async def _cards(settings: Settings) -> list[dict]:
    """The registered cards, read from the store without starting the app (no backend, consent gate,
    ontology or DICOM stack: issue 27) — after registering the shipped cards as the app's start-up does
    (``register_shipped``), so a fresh data dir lists what a running server lists."""
    from gateway.store import open_database
    from gateway.store.model_cards import registered_cards, store_card
    from inference.cards import shipped_cards

    db = await open_database(settings)
    try:
        inf = settings.extra.get("inference") or {}
        if not isinstance(inf, dict) or inf.get("register_shipped", True):
            async with db.write() as conn:
                for card in shipped_cards():
                    await store_card(conn, card.name, card.version, card.purpose, card.raw, SYSTEM.subject)
        async with db.read() as conn:
            return await registered_cards(conn)
    finally:
        await db.dispose()


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    cards = asyncio.run(_cards(settings))
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for c in cards:
        card = c["card"]
        print(f"{card['name']}\t{card['version']}\t{card['purpose']}\t{card['triton']['model']}\t"
              f"{','.join(card['encodings'])}\t{'enabled' if c['enabled'] else 'disabled'}")
    return 0
