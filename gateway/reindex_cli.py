"""``fedgate reindex``: rebuild the FHIR search-index and common-model rows from the stored resources.

Updates write only the index rows that differ from the previous version's (gateway.store.fhir_repo
``apply_writes``), trusting that the stored rows are what the current code derives.  After an upgrade
that changes search parameters or the common-model mapping, run this once (the server may keep running:
each batch is one write transaction that locks its resources).  Then the patient links of every stored
version are recomputed and the consent stamps restamped from them (one write transaction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tqdm import tqdm

from gateway.settings import Settings

BATCH = 500


async def run(settings: Settings, progress: bool) -> dict:
    from sqlalchemy import func, select

    from gateway.store import open_database
    from gateway.store import schema as s
    from gateway.store.fhir_repo import reindex, relink

    db = await open_database(settings)
    t0 = time.perf_counter()
    done = 0
    try:
        async with db.read() as conn:
            total = (await conn.execute(select(func.count()).select_from(s.fhir_resource)
                                        .where(s.fhir_resource.c.deleted.is_(False)))).scalar_one()
        after = 0
        with tqdm(total=total, desc="reindexing", unit="resource", disable=not progress) as bar:
            while True:
                async with db.write() as conn:
                    n, after = await reindex(conn, after, BATCH)
                if not after:
                    break
                done += n
                bar.update(n)
        async with db.write() as conn:
            await relink(conn)
    finally:
        await db.dispose()
    return {"resources": done, "seconds": round(time.perf_counter() - t0, 2)}


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(run(settings, progress=not args.json))
    print(json.dumps(result) if args.json else f"reindexed {result['resources']} resources in {result['seconds']} s")
    return 0
