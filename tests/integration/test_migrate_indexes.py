"""Start-up migration on an existing database: indexes added to the schema since the database was created
are built, and the indexes they replace are dropped (``create_all`` alone checks tables, not indexes)."""

from __future__ import annotations

from sqlalchemy import inspect, text

from gateway.store.db import Database
from gateway.store.migrate import RETIRED_INDEXES, migrate


async def _indexes(db: Database, table: str) -> set[str]:
    async with db.read() as conn:
        return await conn.run_sync(lambda c: {ix["name"] for ix in inspect(c).get_indexes(table)})


async def test_existing_database_gets_new_indexes_and_loses_retired_ones(db_url):
    db = Database(db_url)
    try:
        await migrate(db)
        assert "ix_cm_condition_code_patient" in await _indexes(db, "cm_condition")
        assert "ix_dcm_series_modality_patient" in await _indexes(db, "dcm_series")
        # the database as an older release left it: the narrow indexes, not the covering ones
        async with db.write() as conn:
            await conn.execute(text("DROP INDEX ix_cm_condition_code_patient"))
            await conn.execute(text("DROP INDEX ix_dcm_series_modality_patient"))
            await conn.execute(text("CREATE INDEX ix_cm_condition_code ON cm_condition (code)"))
            await conn.execute(text("CREATE INDEX ix_dcm_series_modality ON dcm_series (modality, body_part)"))
        assert "ix_cm_condition_code" in await _indexes(db, "cm_condition")
        await migrate(db)
        cond, series = await _indexes(db, "cm_condition"), await _indexes(db, "dcm_series")
        assert "ix_cm_condition_code_patient" in cond and "ix_dcm_series_modality_patient" in series
        assert not (cond | series) & set(RETIRED_INDEXES)
    finally:
        await db.dispose()


async def test_existing_database_gets_the_covering_sr_probe_index(db_url):
    """ix_dcm_sr_item_sop_value (issue 27: the per-group probe of an SR leaf's later items reads no table
    row) replaces ix_dcm_sr_item_sop on a database an older release left."""
    db = Database(db_url)
    try:
        await migrate(db)
        assert "ix_dcm_sr_item_sop_value" in await _indexes(db, "dcm_sr_item")
        async with db.write() as conn:
            await conn.execute(text("DROP INDEX ix_dcm_sr_item_sop_value"))
            await conn.execute(text("CREATE INDEX ix_dcm_sr_item_sop ON dcm_sr_item (sop_uid, group_item_id, concept_code)"))
        await migrate(db)
        have = await _indexes(db, "dcm_sr_item")
        assert "ix_dcm_sr_item_sop_value" in have and "ix_dcm_sr_item_sop" not in have
    finally:
        await db.dispose()


async def test_keyset_walk_indexes_replace_the_narrow_ones(db_url):
    """Issue 27: ``_lastUpdated`` and quantity ranges page in (value, rid) order; a store made before that has
    (res_type, lu_ts) and (res_type, param, value): start-up builds the rid-suffixed ones and drops those."""
    db = Database(db_url)
    try:
        await migrate(db)
        async with db.write() as conn:
            await conn.execute(text("DROP INDEX ix_fhir_resource_type_lu_rid"))
            await conn.execute(text("DROP INDEX ix_idx_quantity_value_rid"))
            await conn.execute(text("CREATE INDEX ix_fhir_resource_type_lu ON fhir_resource (res_type, lu_ts)"))
            await conn.execute(text("CREATE INDEX ix_idx_quantity_lookup ON idx_quantity (res_type, param, value)"))
        await migrate(db)
        res, qty = await _indexes(db, "fhir_resource"), await _indexes(db, "idx_quantity")
        assert "ix_fhir_resource_type_lu_rid" in res and "ix_fhir_resource_type_lu" not in res
        assert "ix_idx_quantity_value_rid" in qty and "ix_idx_quantity_lookup" not in qty
    finally:
        await db.dispose()
