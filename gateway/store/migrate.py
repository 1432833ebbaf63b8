"""Schema creation and migration at start-up.

Every component's tables live on :data:`gateway.store.schema.metadata`; importing the modules below
registers them.  ``create_all`` creates what is missing (idempotent, both engines); versioned steps
in :data:`MIGRATIONS` alter existing databases and are recorded in ``schema_version``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Awaitable, Callable

from sqlalchemy import inspect, select, text
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

SCHEMA_VERSION = 3

#: Indexes replaced by wider ones (the new ones are created on existing databases by :func:`_create`).
RETIRED_INDEXES = (
    *(f"ix_cm_{t}_code" for t in ("condition", "observation", "procedure", "encounter", "diagnostic_report")),
    "ix_dcm_series_modality",
    "ix_dcm_sr_item_concept",
    "ix_dcm_sr_item_sop",  # → ix_dcm_sr_item_sop_value
    "ix_fhir_resource_type_lu",  # → ix_fhir_resource_type_lu_rid
    "ix_idx_quantity_lookup",  # → ix_idx_quantity_value_rid
)


async def _v2_dicom_export_jobs(conn: AsyncConnection) -> None:
    from gateway.store.export_schema import add_job_columns

    await add_job_columns(conn)


async def _v3_training_run_queue(conn: AsyncConnection) -> None:
    from gateway.store.training_schema import add_queue_columns

    await add_queue_columns(conn)


#: (component, version) → coroutine applying that step to an existing database (steps are idempotent: a new
#: database runs them on the tables ``create_all`` just made).
MIGRATIONS: dict[tuple[str, int], Callable[[AsyncConnection], Awaitable[None]]] = {
    ("core", 2): _v2_dicom_export_jobs,
    ("core", 3): _v3_training_run_queue,
}


def load_table_modules() -> None:
    for name in TABLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def _create(sync_conn) -> None:
    """``create_all`` (missing tables, with their indexes), then the indexes missing on tables that
    already existed (``create_all`` checks tables only), and retired indexes dropped."""
    existing = set(inspect(sync_conn).get_table_names())
    schema.metadata.create_all(sync_conn)
    if not existing:
        return
    insp = inspect(sync_conn)
    for table in schema.metadata.sorted_tables:
        if table.name not in existing or not table.indexes:
            continue
        have = {ix["name"] for ix in insp.get_indexes(table.name)}
        for ix in table.indexes:
            if ix.name not in have:
                log.info("creating index", extra={"index": ix.name})
                ix.create(sync_conn)
        for name in RETIRED_INDEXES:
            if name in have:
                sync_conn.execute(text(f"DROP INDEX {name}"))


async def migrate(db: Database) -> None:
    """Create missing tables and apply pending migration steps, in one transaction."""
    load_table_modules()
    async with db.write() as conn:
        await conn.run_sync(_create)
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
