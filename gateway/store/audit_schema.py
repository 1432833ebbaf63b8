"""Audit trail table: FHIR AuditEvents, hash-chained ("Audit").

Each row stores the canonical JSON of one AuditEvent (without ``id``), the previous row's hash and
``hash = sha256(prev_hash + content)``.  Search columns are derived from ``content`` and checked
against it by :func:`gateway.services.audit.verify`.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text

from gateway.store import schema as s

_PK = BigInteger().with_variant(Integer, "sqlite")

audit_event = Table(
    "audit_event",
    s.metadata,
    Column("seq", _PK, primary_key=True, autoincrement=True),
    Column("recorded", String(40), nullable=False),
    Column("subject", String(255)),
    Column("action", String(1)),
    Column("interaction", String(40)),
    Column("outcome", String(2)),
    Column("patients", Text),  # " id1 id2 " for LIKE search
    Column("content", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_audit_event_recorded", audit_event.c.recorded)
Index("ix_audit_event_subject", audit_event.c.subject)

GENESIS = "0" * 64

__all__ = ["GENESIS", "audit_event"]

#: Hub-token ids (``jti``) already accepted by this site, until they expire: replay protection shared by
#: every server process (``processes`` > 1 — an in-memory set would only cover one of them).
fed_token_seen = Table(
    "fed_token_seen",
    s.metadata,
    Column("jti", String(128), primary_key=True),
    Column("expires_ts", Float, nullable=False),
)
