"""Inference tables: registered model cards and persisted inference jobs.

A job is claimed by a worker with a lease (``lease_owner``/``lease_until``); a worker that dies leaves the
lease to expire and another (or the restarted) worker takes the job over.  ``dedupe_key`` is unique, so the
same model never gets two jobs for the same series and trigger (auto-trigger re-fires, double submits).
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text, UniqueConstraint

from gateway.store import schema as s

inf_model_card = Table(
    "inf_model_card",
    s.metadata,
    Column("name", String(64), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("card", Text, nullable=False),  # the card JSON as registered
    Column("purpose", String(40), nullable=False),
    Column("enabled", Integer, nullable=False, default=1),
    Column("registered_by", String(255)),
    Column("registered_ts", Float, nullable=False),
)

inf_job = Table(
    "inf_job",
    s.metadata,
    Column("job_id", String(64), primary_key=True),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("trigger", String(16), nullable=False),  # "request" | "auto"
    Column("requester", Text, nullable=False),  # JSON: subject, roles, organization, attributes
    Column("purpose", Text, nullable=False),  # JSON: kind, codes, diseases
    Column("state", String(16), nullable=False),  # queued | running | succeeded | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("not_before", Float, nullable=False),
    Column("created_ts", Float, nullable=False),
    Column("updated_ts", Float, nullable=False),
    Column("error", Text),
    Column("result", Text),  # JSON summary: findings, SR/SEG UIDs, FHIR ids, instances sent
    Column("dedupe_key", String(255), nullable=False),
    UniqueConstraint("dedupe_key", name="uq_inf_job_dedupe"),
)
Index("ix_inf_job_state", inf_job.c.state, inf_job.c.not_before)
Index("ix_inf_job_series", inf_job.c.series_uid)

#: One row per successful inference (monitoring): the output score, input statistics, the
#: scanner that made the images, coarse subgroup attributes and the estimated energy. No patient ids.
inf_observation = Table(
    "inf_observation",
    s.metadata,
    Column("job_id", String(64), primary_key=True),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("site_id", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    Column("score", Float),  # the first finding's score
    Column("positive", Integer),
    Column("input_mean", Float),
    Column("input_std", Float),
    Column("manufacturer", String(128)),
    Column("scanner_model", String(128)),
    Column("protocol", String(128)),
    Column("sex", String(16)),
    Column("age_band", String(16)),
    Column("cpu_s", Float),
    Column("energy_j", Float),
)
Index("ix_inf_observation_model", inf_observation.c.model_name, inf_observation.c.model_version, inf_observation.c.ts)

async def job_counts(conn) -> dict[str, int]:
    """Inference jobs per state (for the metrics' queue depth)."""
    from sqlalchemy import func, select

    rows = await conn.execute(select(inf_job.c.state, func.count()).group_by(inf_job.c.state))
    return {state: n for state, n in rows.all()}


__all__ = ["inf_job", "inf_model_card", "inf_observation", "job_counts"]

