"""Imaging cohort export jobs (issue #24): one row per ``POST /export/dicom``, so any server process can
answer the status poll.  The job runs in the process that accepted it; a job that process left running
(it stopped or died) is marked failed at the next start-up.  No patient data: the request (study UIDs the
requester named, project, target name, options) and the PHI-free outcome report."""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, String, Table, Text, select, update

from gateway.store import schema as s

dicom_export_job = Table(
    "dicom_export_job",
    s.metadata,
    Column("job_id", String(64), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("state", String(16), nullable=False),  # running | completed | failed
    Column("request", Text, nullable=False),  # JSON
    Column("done", Integer, nullable=False, default=0),  # studies finished
    Column("total", Integer, nullable=False),
    Column("report", Text),  # JSON, when completed
    Column("error", Text),
    Column("created_ts", Float, nullable=False),
    Column("updated_ts", Float, nullable=False),
)


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


async def fail_running_jobs(db, now: float) -> None:
    """Jobs left ``running`` by a stopped process: failed (their partial output is not complete)."""
    async with db.write() as conn:
        await conn.execute(update(dicom_export_job).where(dicom_export_job.c.state == "running")
                           .values(state="failed", error="interrupted: the server stopped", updated_ts=now))
