"""Bulk Data export tables (issue 24): persisted ``$export`` jobs and the SMART Backend Services jti ledger.

An export job is claimed by a worker with a lease (``lease_owner``/``lease_until``, the same scheme as the
inference jobs: :mod:`gateway.store.leases`); a worker that dies leaves the lease to expire and another
server process (or the restarted one) resumes the job from its ``cursor`` — the resource type being
written, the last row exported and the length of the file at that point.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text

from gateway.store import schema as s

bulk_job = Table(
    "bulk_job",
    s.metadata,
    Column("job_id", String(64), primary_key=True),
    Column("owner", String(255), nullable=False),  # the requester's subject (its other jobs are counted)
    Column("level", String(16), nullable=False),  # system | patient | group
    Column("group_id", String(64)),
    Column("request", Text, nullable=False),  # the kick-off URL, as the manifest's ``request`` repeats it
    Column("params", Text, nullable=False),  # JSON: types, since, typeFilter, outputFormat
    Column("requester", Text, nullable=False),  # JSON: subject, roles, organization, attributes, resource types
    Column("purpose", Text, nullable=False),  # JSON: kind, codes, diseases
    Column("deidentify", Integer, nullable=False, default=0),
    Column("state", String(16), nullable=False),  # queued | running | completed | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("not_before", Float, nullable=False),
    Column("transaction_time", String(40), nullable=False),  # FHIR instant of the kick-off
    Column("transaction_ts", Float, nullable=False),
    Column("created_ts", Float, nullable=False),
    Column("updated_ts", Float, nullable=False),
    Column("expires_ts", Float),  # files and row removed after this (set on completion or failure)
    Column("cursor", Text),  # JSON: where a resumed run continues
    Column("progress", Text),  # JSON: resources written per type, withheld, current type
    Column("output", Text),  # JSON: the manifest's output[] (relative file names)
    Column("error", Text),
)
Index("ix_bulk_job_state", bulk_job.c.state, bulk_job.c.not_before)

#: ``jti`` of the client assertions already used at ``/auth/token`` (SMART Backend Services: a replayed
#: assertion is refused), kept until the assertion expires; shared by every server process.
smart_jti = Table(
    "smart_jti",
    s.metadata,
    Column("jti", String(255), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("exp", Float, nullable=False),
)

__all__ = ["bulk_job", "smart_jti"]
