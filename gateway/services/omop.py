"""OMOP CDM v5.4 export and import (docs/omop.md).

Export: the consented common model (the patients the consent scope of the requester's research
purpose admits) → OMOP rows (:mod:`mappings.omop.export`, in a thread) → a PostgreSQL schema built with the
official DDL (asyncpg COPY, then primary keys, foreign-key constraints and indices, all in one
transaction so a failed export leaves nothing) or CSV files.  Import: an OMOP schema → ``cm_*`` rows
with ``src_type = "OMOP"``; a re-import inserts, updates and deletes only what changed at the source.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from gateway.context import Requester
from gateway.errors import BadRequest, Conflict, Forbidden, Unprocessable
from gateway.services.access import AccessRecord
from gateway.store import omop_reads
from gateway.store.omop_reads import EXPORT_COLUMNS  # noqa: F401 (API)
from gateway.store.scope import AccessScope
from mappings.deid.omop import deidentify_export
from mappings.omop import ddl
from mappings.omop import importer as imp
from mappings.omop.export import (
    CLINICAL_TABLES,
    VOCAB_TABLES,
    CmData,
    OmopExport,
    as_tuples,
    export_rows,
    vocabulary_rows,
)
from mappings.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

EXPORT_ROLES = ("analyst", "admin")
IMPORT_ROLES = ("admin",)


@dataclass(frozen=True)
class ExportTarget:
    """Where an export goes: a PostgreSQL schema (``pg_url`` + ``schema``) or a CSV directory."""

    pg_url: str | None = None
    schema: str | None = None
    csv_dir: Path | None = None
    replace: bool = False

    def validate(self) -> None:
        if self.csv_dir is None and not (self.pg_url and self.schema):
            raise BadRequest("target: give a CSV directory, or a PostgreSQL URL and schema", expression=["target"])
        if self.schema is not None:
            try:
                ddl.check_schema_name(self.schema)
            except ValueError as exc:
                raise BadRequest(str(exc), expression=["schema"]) from None


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class OmopService:
    def __init__(self, db, vocab: Vocabulary | None = None, vocab_path: str | None = None, policy=None) -> None:
        self.db = db
        self.policy = policy  # gateway.services.deid.DeidPolicy: who gets a de-identified export
        self._vocab = vocab
        self._vocab_path = vocab_path

    async def vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = await asyncio.to_thread(load_vocabulary, self._vocab_path)
        return self._vocab

    # ------------------------------------------------------------------------------------------
    # export
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def check_export(requester: Requester) -> None:
        if not requester.has_role(*EXPORT_ROLES):
            raise Forbidden("OMOP export needs the analyst or admin role")
        if requester.purpose.is_treatment or not requester.purpose.codes:
            raise Forbidden("purpose of use: OMOP export needs a research purpose (DUO codes)")

    async def export(self, requester: Requester, target: ExportTarget, *, gate, audit, path: str = "") -> dict:
        """Export what ``requester``'s purpose may see to ``target``; returns counts + coverage."""
        target.validate()
        try:
            self.check_export(requester)
        except Forbidden as exc:
            await audit.record(AccessRecord(requester=requester, action="E", interaction="omop-export", outcome="4",
                                            path=path, detail=f"refused: {exc.message}"))
            raise
        scope: AccessScope = await gate.scope_for(requester)
        t0 = time.perf_counter()
        data = await self.collect(scope)
        vocab = await self.vocabulary()
        result: OmopExport = await asyncio.to_thread(export_rows, data, vocab)
        if self.policy is not None and self.policy.deidentifies(requester):
            result = await asyncio.to_thread(deidentify_export, result, self.policy.keys_for(requester))
        vrows = vocabulary_rows(vocab, result.concept_ids, result.local_concepts, result.local_systems)
        t_map = time.perf_counter()
        if target.csv_dir is not None:
            await asyncio.to_thread(write_csv, target.csv_dir, result, vrows, target.replace)
            where = {"csv": str(target.csv_dir)}
        else:
            await write_postgres(target.pg_url or "", target.schema or "", result, vrows, replace=target.replace)
            where = {"schema": target.schema}
        elapsed = time.perf_counter() - t0
        counts = result.counts()
        report = {"target": where, "counts": counts, "rows": sum(counts.values()),
                  "vocabulary": vocab.origin, "coverage": result.coverage.report(),
                  "elapsed_s": round(elapsed, 3), "map_s": round(t_map - t0, 3),
                  "scope": scope.summary}
        await audit.record(AccessRecord(
            requester=requester, action="E", interaction="omop-export", outcome="0", scope_summary=scope.summary,
            path=path, detail=f"purpose={requester.purpose.describe()} persons={counts['person']} rows={report['rows']}"))
        log.info("omop export", extra={"rows": report["rows"], "elapsed_s": report["elapsed_s"]})
        return report

    async def collect(self, scope: AccessScope) -> CmData:
        """Common-model rows of the patients in ``scope`` (plus their imaging series and SR values)."""
        return await omop_reads.collect(self.db, scope)

    # ------------------------------------------------------------------------------------------
    # import
    # ------------------------------------------------------------------------------------------

    async def import_schema(self, requester: Requester, pg_url: str, schema: str, *, audit, path: str = "") -> dict:
        """Read OMOP schema ``schema`` at ``pg_url`` into the common model (incremental)."""
        if not requester.has_role(*IMPORT_ROLES):
            raise Forbidden("OMOP import needs the admin role")
        try:
            ddl.check_schema_name(schema)
        except ValueError as exc:
            raise BadRequest(str(exc), expression=["schema"]) from None
        t0 = time.perf_counter()
        vocab = await self.vocabulary()
        src = await read_omop(pg_url, schema)
        rows = await asyncio.to_thread(_to_cm, vocab, src)
        t_read = time.perf_counter()
        stats = await omop_reads.apply_import(self.db, rows)
        linked = await omop_reads.linked_studies(self.db, [r["study_uid"] for r in rows["cm_imaging_study"]])
        elapsed = time.perf_counter() - t0
        n = sum(len(v) for v in src.values())
        report = {"schema": schema, "source_rows": {k: len(v) for k, v in src.items()}, "changes": stats,
                  "studies_linked_to_dicom": linked, "elapsed_s": round(elapsed, 3), "read_s": round(t_read - t0, 3),
                  "rows_per_s": round(n / elapsed) if elapsed else None}
        await audit.record(AccessRecord(requester=requester, action="C", interaction="omop-import", outcome="0",
                                        path=path, detail=f"rows={n}"))
        return report


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------


async def write_postgres(pg_url: str, schema: str, result: OmopExport, vrows: dict[str, list[dict]], *,
                         replace: bool = False) -> None:
    """Create ``schema`` with the official DDL, COPY the rows, then add primary keys, constraints and
    indices — one transaction: a violation rolls everything back (422, nothing left behind)."""
    ddl.check_schema_name(schema)
    try:
        conn = await asyncpg.connect(_pg_dsn(pg_url))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BadRequest(f"pg_url: cannot connect ({type(exc).__name__})", expression=["pg_url"]) from None
    try:
        async with conn.transaction():
            exists = await conn.fetchval("SELECT count(*) FROM information_schema.schemata WHERE schema_name=$1", schema)
            if exists and not replace:
                raise Conflict(f"schema: {schema!r} already exists (use replace)", expression=["schema"])
            if exists:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            for stmt in ddl.statements("ddl", schema):
                await conn.execute(stmt)
            for table in VOCAB_TABLES:
                await conn.copy_records_to_table(table, records=as_tuples(table, vrows[table]), schema_name=schema,
                                                 columns=list(ddl.columns(table)))
            for table in CLINICAL_TABLES:
                rows = result.tables[table]
                for i in range(0, len(rows), 100_000):
                    await conn.copy_records_to_table(table, records=as_tuples(table, rows[i:i + 100_000]),
                                                     schema_name=schema, columns=list(ddl.columns(table)))
            for step in ("primary_keys", "constraints", "indices"):
                for stmt in ddl.statements(step, schema):
                    await conn.execute(stmt)
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        # the message names the constraint / column, never row values
        raise Unprocessable(f"OMOP export violates the CDM: {type(exc).__name__}: "
                            f"{getattr(exc, 'constraint_name', None) or getattr(exc, 'column_name', None) or ''}",
                            expression=[schema]) from None
    finally:
        await conn.close()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    return v


def _previous_export(directory: Path) -> bool:
    """``directory`` holds an earlier CSV export and nothing else (so ``replace`` may remove it)."""
    names = [p.name for p in directory.iterdir()]
    return "coverage.json" in names and all(
        (directory / n).is_file() and (n.endswith(".csv") or n == "coverage.json") for n in names)


def write_csv(directory: Path, result: OmopExport, vrows: dict[str, list[dict]], replace: bool = False) -> None:
    """One ``<table>.csv`` per OMOP table (header = DDL columns) + ``coverage.json``; written into a
    temporary directory that is renamed into place when complete. ``replace``: an earlier export in
    ``directory`` (only its CSV files and coverage.json) is replaced; any other non-empty folder is refused."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not replace:
            raise Conflict(f"csv: {directory.name} exists and is not empty (use replace for an earlier export)",
                           expression=["csv"])
        if not _previous_export(directory):
            raise Conflict(f"csv: {directory.name} holds files other than an earlier export's: not replaced",
                           expression=["csv"])
        for f in directory.iterdir():
            f.unlink()
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for table, rows in list(vrows.items()) + list(result.tables.items()):
        cols = ddl.columns(table)
        with (tmp / f"{table}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for t in as_tuples(table, rows):
                w.writerow([_csv_value(v) for v in t])
    (tmp / "coverage.json").write_bytes(orjson.dumps(result.coverage.report(), option=orjson.OPT_INDENT_2))
    if directory.exists():
        directory.rmdir()
    os.replace(tmp, directory)


IMPORT_TABLES = ("person", "death", "visit_occurrence", "condition_occurrence", "procedure_occurrence",
                 "measurement", "observation", "image_occurrence", "image_feature")


async def read_omop(pg_url: str, schema: str) -> dict[str, list[dict]]:
    """The clinical tables of an OMOP schema, as dicts (missing tables read as empty)."""
    try:
        conn = await asyncpg.connect(_pg_dsn(pg_url))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BadRequest(f"pg_url: cannot connect ({type(exc).__name__})", expression=["pg_url"]) from None
    try:
        have = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema=$1", schema)}
        if "person" not in have:
            raise BadRequest(f"schema: {schema!r} has no OMOP person table", expression=["schema"])
        out = {}
        for t in IMPORT_TABLES:  # in key order (the first column), so re-imports number rows alike
            out[t] = [dict(r) for r in await conn.fetch(f'SELECT * FROM "{schema}"."{t}" ORDER BY 1')] if t in have else []
        # site-local concepts (ids > 2,000,000,000) and their vocabularies: system|code of local codes
        out["concept"] = [dict(r) for r in await conn.fetch(
            f'SELECT concept_id, vocabulary_id, concept_code, concept_name, domain_id FROM "{schema}"."concept" '
            "WHERE concept_id > 2000000000")] if "concept" in have else []
        out["vocabulary"] = [dict(r) for r in await conn.fetch(
            f'SELECT vocabulary_id, vocabulary_reference FROM "{schema}"."vocabulary"')] if "vocabulary" in have else []
        return out
    finally:
        await conn.close()


def _to_cm(vocab: Vocabulary, src: dict[str, list[dict]]) -> dict[str, list[dict]]:
    vocab = imp.with_local_concepts(vocab, src.get("concept", ()), src.get("vocabulary", ()))
    imaging_procs = {r["procedure_occurrence_id"] for r in src["image_occurrence"]}
    feature_meas = {r["image_feature_event_id"] for r in src["image_feature"] if r.get("image_feature_event_id")}
    return {
        "cm_patient": imp.person_rows(vocab, src["person"], src["death"]),
        "cm_encounter": imp.visit_rows(vocab, src["visit_occurrence"]),
        "cm_condition": imp.condition_rows(vocab, src["condition_occurrence"]),
        "cm_procedure": imp.procedure_rows(vocab, src["procedure_occurrence"], imaging_procs),
        "cm_observation": imp.measurement_rows(vocab, src["measurement"], feature_meas)
        + imp.observation_rows(vocab, src["observation"]),
        "cm_imaging_study": imp.imaging_rows(vocab, src["image_occurrence"]),
        "cm_imaging_series": imp.imaging_series_rows(vocab, src["image_occurrence"]),
    }
