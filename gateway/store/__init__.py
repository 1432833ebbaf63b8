"""Persistence: one schema for SQLite (embedded default) and PostgreSQL, plus the on-disk blob store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.store.db import Database

if TYPE_CHECKING:  # pragma: no cover
    from gateway.settings import Settings


async def open_database(settings: "Settings", *, migrate: bool = True) -> Database:
    """Create the data dir, connect, and bring the schema up to date (used by server and CLI alike).
    ``migrate=False``: another process (``fedgate serve``'s parent) has done that already."""
    from gateway.store.migrate import migrate as run_migrations

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url)
    if not migrate:
        from gateway.store.migrate import load_table_modules

        load_table_modules()  # the tables' metadata, as migrate() would have registered them
        return db
    try:
        await run_migrations(db)
    except BaseException:
        await db.dispose()
        raise
    return db


__all__ = ["Database", "open_database"]
