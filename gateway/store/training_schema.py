"""Federated training tables (docs/training.md).

Hub side: ``trn_run`` (one row per training run: spec, state, lineage, final weights hash) is also the
hub's job queue: a hub process claims a run with a lease (``lease_owner``/``lease_until``,
:mod:`gateway.store.leases`, as inference jobs and exports), and ``trn_checkpoint`` holds the global
weights after the run's last completed round, committed with that round, so a run whose hub process
stopped or died is resumed at its next round by another process or the restarted one.  ``trn_round``
(one row per run × round × site: status, sample counts, metrics, consent-snapshot and cohort-manifest
hashes, local time and energy — never patient ids).  ``trn_model`` holds every model version a run
produced (TorchScript bytes + card), so any version can be (re)deployed or rolled back to.

Site side: ``trn_site_round`` is the site's own manifest of what it trained on in each round (the
patient ids and instance UIDs stay here, behind the site's admin role); only its hash leaves the site.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, LargeBinary, String, Table, Text, inspect, text, update

from gateway.store import schema as s

trn_run = Table(
    "trn_run",
    s.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("spec", Text, nullable=False),  # the validated request (JSON)
    Column("state", String(16), nullable=False),  # queued | running | succeeded | failed | cancelled
    Column("round", Integer, nullable=False, default=0),  # last completed round
    Column("requester", Text, nullable=False),  # JSON: subject, roles, organization, attributes, purpose
    Column("created_ts", Float, nullable=False),
    Column("updated_ts", Float, nullable=False),
    Column("error", Text),
    Column("model_name", String(64)),
    Column("model_version", String(64)),
    Column("weights_hash", String(64)),
    Column("lineage", Text),  # JSON (docs/training.md#lineage)
    # the run as a job of the hub's queue (gateway.store.leases)
    Column("attempts", Integer, nullable=False, server_default="0", default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("not_before", Float),
)
Index("ix_trn_run_state", trn_run.c.state)

#: The global weights after round ``round`` of a run in progress (``inference.fl`` encoding); written in
#: the transaction that records the round, deleted when the run ends.
trn_checkpoint = Table(
    "trn_checkpoint",
    s.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("round", Integer, nullable=False),
    Column("weights", LargeBinary, nullable=False),
    Column("ts", Float, nullable=False),
)

trn_round = Table(
    "trn_round",
    s.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("site_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # ok | refused | error | timeout | cancelled
    Column("detail", Text),
    Column("n_train", Integer),
    Column("n_test", Integer),
    Column("metrics", Text),  # JSON: held-out evaluation of the global weights sent this round
    Column("consent_hash", String(64)),
    Column("manifest_hash", String(64)),
    Column("train_s", Float),
    Column("cpu_s", Float),
    Column("gpu_s", Float),
    Column("energy_j", Float),
    Column("co2e_g", Float),
    Column("update_norm", Float),
    Column("ts", Float, nullable=False),
)

trn_model = Table(
    "trn_model",
    s.metadata,
    Column("name", String(64), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("architecture", String(64), nullable=False),
    Column("weights_hash", String(64), nullable=False),
    Column("torchscript", LargeBinary, nullable=False),
    Column("card", Text, nullable=False),
    Column("created_ts", Float, nullable=False),
)

trn_site_round = Table(
    "trn_site_round",
    s.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("hub_id", String(64), nullable=False),
    Column("started_ts", Float, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("manifest", Text, nullable=False),  # JSON: {"train": [[patient, sop], ...], "test": [...]}
    Column("manifest_hash", String(64), nullable=False),
    Column("consent_hash", String(64), nullable=False),
    Column("n_train", Integer, nullable=False),
    Column("n_test", Integer, nullable=False),
)

#: columns added to ``trn_run`` since it first shipped (migration step core/3 adds those an older database lacks)
_QUEUE_COLUMNS = ("attempts", "lease_owner", "lease_until", "not_before")


async def add_queue_columns(conn) -> None:
    """Migration: the job-queue columns on a ``trn_run`` made before them; the runs such a database left
    queued or running (run by a task of a hub process then, with no checkpoint to resume from) are marked
    failed."""
    have = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("trn_run")})
    added = False
    for name in _QUEUE_COLUMNS:
        if name not in have:
            ddl = trn_run.c[name].type.compile(dialect=conn.dialect)
            default = " NOT NULL DEFAULT 0" if name == "attempts" else ""
            await conn.execute(text(f"ALTER TABLE trn_run ADD COLUMN {name} {ddl}{default}"))
            added = True
    if added:
        await conn.execute(update(trn_run).where(trn_run.c.state.in_(("queued", "running"))).values(
            state="failed", error="interrupted: the hub stopped"))


__all__ = ["trn_run", "trn_round", "trn_model", "trn_site_round", "trn_checkpoint", "add_queue_columns"]
