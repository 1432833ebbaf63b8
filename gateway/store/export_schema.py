"""Imaging cohort export jobs: one row per ``POST /export/dicom``, so any server process can answer the
status poll and run it.  A worker claims a job with a lease (``lease_owner``/``lease_until``,
:mod:`gateway.store.leases`, as the bulk ``$export`` jobs); a worker that dies leaves the lease to expire and
another server process (or the restarted one) resumes the job from its ``cursor`` (the outcomes of the studies
done).  No patient data: the request (the study UIDs the requester named, project, target, options), the
requester's attested identity and purpose (to open the gate again when the job resumes) and the PHI-free
outcome report."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text, inspect, select, text, update

from gateway.store import schema as s

dicom_export_job = Table(
    "dicom_export_job",
    s.metadata,
    Column("job_id", String(64), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("state", String(16), nullable=False),  # queued | running | completed | failed
    Column("request", Text, nullable=False),  # JSON
    Column("done", Integer, nullable=False, default=0),  # studies finished
    Column("total", Integer, nullable=False),
    Column("report", Text),  # JSON, when completed
    Column("error", Text),
    Column("created_ts", Float, nullable=False),
    Column("updated_ts", Float, nullable=False),
    # the job itself (resumable by any process)
    Column("requester", Text),  # JSON: subject, roles, organization, attributes
    Column("purpose", Text),  # JSON: kind, codes, diseases
    Column("studies", Text),  # JSON: the Study Instance UIDs, in order
    Column("target", Text),  # JSON: {"folder": path} | {"stow_url": url, "stow_token_file": path}
    Column("project", String(255)),
    Column("options", Text),  # JSON: DeidOptions flags
    Column("cursor", Text),  # JSON: the outcomes of the studies done
    Column("attempts", Integer, nullable=False, server_default="0", default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("not_before", Float),
)
Index("ix_dicom_export_job_state", dicom_export_job.c.state, dicom_export_job.c.not_before)

#: columns added since the table first shipped (migration step core/2 adds those an older database lacks)
_ADDED = ("requester", "purpose", "studies", "target", "project", "options", "cursor", "attempts", "lease_owner",
          "lease_until", "not_before")


async def add_job_columns(conn) -> None:
    """Migration: the resumable-job columns on a ``dicom_export_job`` made before them; the jobs such a
    database left ``running`` (run in-process then, not resumable) are marked failed."""
    have = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("dicom_export_job")})
    for name in _ADDED:
        if name not in have:
            col = dicom_export_job.c[name]
            ddl = col.type.compile(dialect=conn.dialect)
            default = " NOT NULL DEFAULT 0" if name == "attempts" else ""
            await conn.execute(text(f"ALTER TABLE dicom_export_job ADD COLUMN {name} {ddl}{default}"))
    await conn.execute(update(dicom_export_job).where(dicom_export_job.c.state == "running",
                                                      dicom_export_job.c.studies.is_(None))
                       .values(state="failed", error="interrupted: the server stopped"))


async def create_job(db, row: dict) -> None:
    async with db.write() as conn:
        await conn.execute(dicom_export_job.insert().values(**row))


async def update_job(db, job_id: str, **values) -> None:
    async with db.write() as conn:
        await conn.execute(update(dicom_export_job).where(dicom_export_job.c.job_id == job_id).values(**values))


async def get_job(db, job_id: str) -> dict | None:
    async with db.read() as conn:
        row = (await conn.execute(select(dicom_export_job).where(dicom_export_job.c.job_id == job_id))).mappings().first()
    return dict(row) if row is not None else None

