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
from sqlalchemy import and_, bindparam, delete, select, update

from gateway.context import Requester
from gateway.errors import BadRequest, Conflict, Forbidden, Unprocessable
from gateway.services.access import AccessRecord
from gateway.store import schema as s
from gateway.store.access import where as gated_where
from gateway.store.consent_schema import recompute as recompute_consent
from gateway.store.migrate import load_table_modules
from gateway.store.scope import AccessScope
from mappings.deid.omop import deidentify_export
from mappings.omop import ddl
from mappings.omop import importer as imp
from mappings.omop.export import (
    CLINICAL_TABLES,
    VOCAB_TABLES,
    CmData,
    ImagingSeries,
    OmopExport,
    SrMeasurement,
    as_tuples,
    export_rows,
    vocabulary_rows,
)
from mappings.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

EXPORT_ROLES = ("analyst", "admin")
IMPORT_ROLES = ("admin",)
CHUNK = 5_000
_EVENT = ("pk", "src_type", "src_id", "patient_id", "system", "code", "encounter_id")
#: The common-model columns the OMOP mapping reads (mappings/omop/export.py).
EXPORT_COLUMNS = {
    "cm_patient": ("pk", "src_type", "src_id", "patient_id", "birth_date", "sex", "race", "ethnicity", "deceased_date",
                   "identifiers"),
    "cm_encounter": ("pk", "src_type", "src_id", "patient_id", "class_code", "code", "start", "end"),
    "cm_condition": _EVENT + ("onset", "abatement", "clinical_status"),
    "cm_observation": _EVENT + ("category", "value_num", "unit", "value_system", "value_code", "value_text", "effective"),
    "cm_procedure": _EVENT + ("performed", "performed_end"),
}


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
        load_table_modules()
        # the patients the gate admits (a SELECT of cm_patient ids; None = every patient); an empty
        # restricted scope selects nothing
        visible = None if scope.unrestricted else (
            select(s.cm_patient.c.patient_id).where(gated_where(scope, s.cm_patient),
                                                    s.cm_patient.c.patient_id.is_not(None)))  # (access layer)

        def gated(table, cols=None):
            stmt = (select(*(table.c[c] for c in cols)) if cols else select(table)).where(table.c.patient_id.is_not(None))
            return stmt if visible is None else stmt.where(table.c.patient_id.in_(visible))

        data = CmData()
        async with self.db.read() as conn:
            if not self.db.is_sqlite:  # one snapshot for every table (SQLite's read transaction is one already)
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            for attr, table in (("patients", s.cm_patient), ("encounters", s.cm_encounter),
                                ("conditions", s.cm_condition), ("observations", s.cm_observation),
                                ("procedures", s.cm_procedure)):
                res = await conn.execute(gated(table, EXPORT_COLUMNS[table.name]))
                setattr(data, attr, [dict(r._mapping) for r in res])
            dicom = await self._dicom_series(conn, visible)
            have = {x.study_uid for x in dicom}
            data.series = dicom + await self._fhir_series(conn, gated(s.cm_imaging_study), have)
            data.sr_items = await self._sr_items(conn, visible)
        return data

    @staticmethod
    async def _dicom_series(conn, visible) -> list[ImagingSeries]:
        st, se = s.metadata.tables.get("dcm_study"), s.metadata.tables.get("dcm_series")
        if st is None or se is None:
            return []
        # per-patient rows: a study or series holding instances of several patients gives one
        # row per patient, built from that patient's instances, gated by that patient
        from gateway.store import dicom_views

        st, se = dicom_views.study_view(), dicom_views.series_view()
        stmt = (select(se.c.series_uid, se.c.study_uid, se.c.modality, se.c.body_part, se.c.series_date,
                       st.c.study_date, se.c.patient_id)
                .join(st, and_(st.c.study_uid == se.c.study_uid, st.c.patient_id == se.c.patient_id))
                .where(se.c.patient_id.is_not(None)))
        if visible is not None:
            stmt = stmt.where(se.c.patient_id.in_(visible))
        return [ImagingSeries(r.patient_id, r.study_uid, r.series_uid, r.series_date or r.study_date, r.modality,
                              (r.body_part or "").upper() or None,
                              f"/dicomweb/studies/{r.study_uid}/series/{r.series_uid}")
                for r in await conn.execute(stmt)]

    @staticmethod
    async def _fhir_series(conn, stmt, skip: set[str]) -> list[ImagingSeries]:
        """FHIR-born imaging studies: their series from the stored ImagingStudy JSON."""
        out: list[ImagingSeries] = []
        rows = [r for r in await conn.execute(stmt) if r.study_uid and r.study_uid not in skip]
        ids = [r.src_id.split("/", 1)[1] for r in rows if r.src_type == "fhir" and "/" in r.src_id]
        content: dict[str, dict] = {}
        for i in range(0, len(ids), 500):
            res = await conn.execute(select(s.fhir_resource.c.res_id, s.fhir_resource.c.content).where(
                s.fhir_resource.c.res_type == "ImagingStudy", s.fhir_resource.c.res_id.in_(ids[i:i + 500]),
                s.fhir_resource.c.deleted.is_(False)))
            content.update({r.res_id: orjson.loads(r.content) for r in res if r.content})
        # studies imported from OMOP: their series as imported (cm_imaging_series)
        omop = {r.study_uid for r in rows if r.src_type == "OMOP"}
        omop_series: dict[str, list] = {}
        if omop:
            ims = s.cm_imaging_series
            uids = sorted(omop)
            for i in range(0, len(uids), 500):
                res = await conn.execute(select(ims).where(ims.c.src_type == "OMOP", ims.c.study_uid.in_(uids[i:i + 500])))
                for x in res:
                    omop_series.setdefault(x.study_uid, []).append(x)
        for r in rows:
            if r.study_uid in omop_series:
                for x in omop_series[r.study_uid]:
                    if x.patient_id == r.patient_id:
                        out.append(ImagingSeries(r.patient_id, r.study_uid, x.series_uid or "", x.started or r.started,
                                                 x.modality, x.body_part))
                continue
            res = content.get(r.src_id.split("/", 1)[-1]) or {}
            series = res.get("series") or []
            mods = orjson.loads(r.modalities) if r.modalities else []
            if not series:
                out.append(ImagingSeries(r.patient_id, r.study_uid, "", r.started, mods[0] if mods else None))
                continue
            for se in series:
                body = se.get("bodySite") or {}
                out.append(ImagingSeries(
                    r.patient_id, r.study_uid, str(se.get("uid") or ""), se.get("started") or r.started,
                    (se.get("modality") or {}).get("code"),
                    None if body.get("system") == "http://snomed.info/sct" else body.get("code")))
        return out

    @staticmethod
    async def _sr_items(conn, visible) -> list[SrMeasurement]:
        item, inst = s.metadata.tables.get("dcm_sr_item"), s.metadata.tables.get("dcm_instance")
        st = s.metadata.tables.get("dcm_study")
        if item is None or inst is None or st is None:
            return []
        ref = inst.alias("ref")
        # TID 1500 context: the algorithm name (DCM 111001, TID 4019) per SR, the finding (DCM 121071)
        # per measurement group
        algo: dict[str, str] = {}
        finding: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        ctx = select(item.c.sop_uid, item.c.group_item_id, item.c.concept_code, item.c.text_value,
                     item.c.code_scheme, item.c.code_value).where(
            item.c.concept_scheme == "DCM", item.c.concept_code.in_(("111001", "121071")))
        if visible is not None:
            ctx = ctx.where(item.c.patient_id.in_(visible))
        for r in await conn.execute(ctx):
            if r.concept_code == "111001" and r.text_value:
                algo.setdefault(r.sop_uid, r.text_value)
            elif r.concept_code == "121071" and r.code_value:
                finding.setdefault((r.sop_uid, r.group_item_id or ""), (r.code_scheme, r.code_value))
        # the image a measurement group refers to (SCOORD > IMAGE, or an IMAGE item of the group)
        group_series: dict[tuple[str, str], str] = {}
        gref = (select(item.c.sop_uid, item.c.group_item_id, inst.c.series_uid)
                .join(inst, inst.c.sop_uid == item.c.ref_sop_uid).where(item.c.ref_sop_uid.is_not(None))
                .order_by(item.c.id))
        if visible is not None:
            gref = gref.where(item.c.patient_id.in_(visible))
        for r in await conn.execute(gref):
            group_series.setdefault((r.sop_uid, r.group_item_id or ""), r.series_uid)
        stmt = (select(item.c.patient_id, item.c.concept_scheme, item.c.concept_code, item.c.concept_meaning,
                       item.c.sop_uid, item.c.group_item_id,
                       item.c.num_value, item.c.unit_code, inst.c.study_uid, inst.c.series_uid,
                       ref.c.series_uid.label("ref_series"), st.c.study_date)
                .join(inst, inst.c.sop_uid == item.c.sop_uid)
                .join(st, st.c.study_uid == inst.c.study_uid)
                .outerjoin(ref, ref.c.sop_uid == item.c.ref_sop_uid)
                .where(item.c.num_value.is_not(None), item.c.patient_id.is_not(None))
                .order_by(item.c.id))
        if visible is not None:
            stmt = stmt.where(item.c.patient_id.in_(visible))
        out = []
        for r in await conn.execute(stmt):
            f_scheme, f_code = finding.get((r.sop_uid, r.group_item_id or ""), (None, None))
            series = r.ref_series or group_series.get((r.sop_uid, r.group_item_id or "")) or r.series_uid
            out.append(SrMeasurement(r.patient_id, r.study_uid, series, r.study_date,
                                     r.concept_scheme, r.concept_code, r.concept_meaning, r.num_value, r.unit_code,
                                     f_scheme, f_code, algo.get(r.sop_uid)))
        return out

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
        stats = await self._apply(rows)
        linked = await self._linked_studies([r["study_uid"] for r in rows["cm_imaging_study"]])
        elapsed = time.perf_counter() - t0
        n = sum(len(v) for v in src.values())
        report = {"schema": schema, "source_rows": {k: len(v) for k, v in src.items()}, "changes": stats,
                  "studies_linked_to_dicom": linked, "elapsed_s": round(elapsed, 3), "read_s": round(t_read - t0, 3),
                  "rows_per_s": round(n / elapsed) if elapsed else None}
        await audit.record(AccessRecord(requester=requester, action="C", interaction="omop-import", outcome="0",
                                        path=path, detail=f"rows={n}"))
        return report

    async def _apply(self, rows: dict[str, list[dict]]) -> dict:
        stats: dict[str, dict[str, int]] = {}
        async with self.db.write() as conn:
            for name, new_rows in rows.items():
                table = s.metadata.tables[name]
                cols = [c for c in new_rows[0]] if new_rows else []
                content = [c for c in cols if c not in ("src_type", "src_id")]
                existing: dict[str, tuple] = {}
                res = await conn.execute(select(table.c.pk, table.c.src_id, *[table.c[c] for c in content])
                                         .where(table.c.src_type == imp.SRC))
                for r in res:
                    existing[r.src_id] = tuple(r)
                inserts, updates, seen = [], [], set()
                for row in new_rows:
                    seen.add(row["src_id"])
                    old = existing.get(row["src_id"])
                    if old is None:
                        inserts.append(row)
                    elif tuple(old[2:]) != tuple(row[c] for c in content):
                        updates.append({"_pk": old[0], **{f"v_{c}": row[c] for c in content}})
                removed = [old[0] for sid, old in existing.items() if sid not in seen]
                for i in range(0, len(removed), CHUNK):
                    await conn.execute(delete(table).where(table.c.pk.in_(removed[i:i + CHUNK])))
                if updates:
                    stmt = update(table).where(table.c.pk == bindparam("_pk")).values(
                        {c: bindparam(f"v_{c}") for c in content})
                    for i in range(0, len(updates), CHUNK):
                        await conn.execute(stmt, updates[i:i + CHUNK])
                await _insert(conn, table, inserts)
                stats[name] = {"inserted": len(inserts), "updated": len(updates), "deleted": len(removed),
                               "unchanged": len(new_rows) - len(inserts) - len(updates)}
            # imported patients get their effective consent profile (site policy) like FHIR-born ones
            changed = stats.get("cm_patient", {})
            if changed.get("inserted") or changed.get("updated"):
                await recompute_consent(conn, [r["patient_id"] for r in rows.get("cm_patient", ())])
        self.db.note_writes(sum(v["inserted"] + v["updated"] for v in stats.values()))
        return stats

    async def _linked_studies(self, uids: list[str]) -> int:
        st = s.metadata.tables.get("dcm_study")
        if st is None or not uids:
            return 0
        n = 0
        async with self.db.read() as conn:
            for i in range(0, len(uids), 500):
                res = await conn.execute(select(st.c.study_uid).where(st.c.study_uid.in_(uids[i:i + 500])))
                n += len(res.all())
        return n


async def _insert(conn, table, rows: list[dict]) -> None:
    """Bulk insert in the caller's transaction: COPY on PostgreSQL (asyncpg, same connection and
    transaction), executemany batches on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "postgresql" and len(rows) >= 1000:
        cols = list(rows[0])
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(
            table.name, records=[tuple(r[c] for c in cols) for r in rows], columns=cols)
        return
    for i in range(0, len(rows), CHUNK):
        await conn.execute(table.insert(), rows[i:i + CHUNK])


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
