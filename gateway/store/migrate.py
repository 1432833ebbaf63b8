"""Schema creation and migration at start-up.

Every component's tables live on :data:`gateway.store.schema.metadata`; importing the modules below
registers them.  ``create_all`` creates what is missing (idempotent, both engines); versioned steps
in :data:`MIGRATIONS` alter existing databases and are recorded in ``schema_version``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store import schema
from gateway.store.db import Database

log = logging.getLogger(__name__)

#: Modules that add tables to ``schema.metadata``; optional ones may not exist yet in a checkout.
TABLE_MODULES = (
    "gateway.store.schema",
    "gateway.store.dicom_schema",
    "gateway.store.consent_schema",
    "gateway.store.audit_schema",
    "gateway.store.jobs_schema",
    "gateway.store.training_schema",
    "gateway.store.vocab_schema",
    "gateway.store.export_schema",
    "gateway.store.bulk_schema",
)

SCHEMA_VERSION = 2


async def _v2_dicom_export_jobs(conn: AsyncConnection) -> None:
    from gateway.store.export_schema import add_job_columns

    await add_job_columns(conn)


#: (component, version) → coroutine applying that step to an existing database (steps are idempotent: a new
#: database runs them on the tables ``create_all`` just made).
MIGRATIONS: dict[tuple[str, int], Callable[[AsyncConnection], Awaitable[None]]] = {
    ("core", 2): _v2_dicom_export_jobs,
}


def load_table_modules() -> None:
    for name in TABLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


async def migrate(db: Database) -> None:
    """Create missing tables and apply pending migration steps, in one transaction."""
    load_table_modules()
    async with db.write() as conn:
        await conn.run_sync(schema.metadata.create_all)
        rows = (await conn.execute(select(schema.schema_version))).all()
        have = {r.component: r.version for r in rows}
        current = have.get("core", 0)
        for (component, version), step in sorted(MIGRATIONS.items()):
            if component == "core" and current < version:
                log.info("applying migration", extra={"component": component, "version": version})
                await step(conn)
        if current == 0:
            await conn.execute(schema.schema_version.insert().values(component="core", version=SCHEMA_VERSION))
        elif current < SCHEMA_VERSION:
            await conn.execute(
                schema.schema_version.update()
                .where(schema.schema_version.c.component == "core")
                .values(version=SCHEMA_VERSION)
            )
