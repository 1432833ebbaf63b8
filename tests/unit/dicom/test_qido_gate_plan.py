"""The consent gate in QIDO-RS totals (issue #4): SQLite answers a gated ``X-Total-Count`` by seeking the
level's ``consent_no`` index (like the ungated b-tree count), and the totals are exact — over the level's
own table when nothing is matched on a parent level, over the joined levels when something is.

Real schema (the gateway's DICOM tables and gate indexes) in an in-memory SQLite database; the plans
are SQLite's own ``EXPLAIN QUERY PLAN``."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.dialects import sqlite

from gateway.store.consent_schema import DICOM_CONSENT_INDEXES
from gateway.store.dicom_schema import dcm_instance, dcm_series, dcm_study
from gateway.store.scope import NO_PATIENT, AccessScope, profile_no
from gateway.store import qido as qido_sql
from mappings.dicom.qido import QidoQuery

KEYS = [f"profile-{i}" for i in range(12)]
ALLOWED = frozenset(KEYS[::2])
GATED = AccessScope(unrestricted=False, allowed_profiles=ALLOWED, summary="t")


@pytest.fixture(scope="module")
def store():
    """120 studies of one CT and one MR series (two instances each); study i belongs to a patient with
    profile KEYS[i % 12], except every 10th (no profile: NULL) and every 15th (no patient: NO_PATIENT)."""
    eng = create_engine("sqlite://")
    tables = (dcm_study, dcm_series, dcm_instance)
    dcm_study.metadata.create_all(eng, tables=list(tables))
    studies, series, instances = [], [], []
    for i in range(120):
        no = None if i % 10 == 0 else NO_PATIENT if i % 15 == 0 else profile_no(KEYS[i % 12])
        st = f"1.2.{i}"
        studies.append({"study_uid": st, "consent_no": no, "study_date": f"2020{1 + i % 12:02d}01",
                        "study_description": "HEAD" if i % 3 else "CHEST", "num_series": 2, "num_instances": 4,
                        "updated_ts": 0.0})
        for k, modality in enumerate(("CT", "MR")):
            se = f"{st}.{k}"
            series.append({"series_uid": se, "study_uid": st, "consent_no": no, "modality": modality,
                           "series_number": k, "num_instances": 2, "updated_ts": 0.0})
            instances += [{"sop_uid": f"{se}.{n}", "series_uid": se, "study_uid": st, "consent_no": no,
                           "instance_number": n, "blob_path": "x", "size": 1, "stored_ts": 0.0} for n in (1, 2)]
    with eng.begin() as conn:
        for table, rows in zip(tables, (studies, series, instances)):
            conn.execute(insert(table), rows)
        for ix in DICOM_CONSENT_INDEXES:
            ix.create(conn, checkfirst=True)  # (create_all made them: they are on the tables)
        conn.execute(text("ANALYZE"))
    visible = {r["study_uid"] for r in studies
               if r["consent_no"] == NO_PATIENT or r["consent_no"] in {profile_no(k) for k in ALLOWED}}
    yield eng, {r["study_uid"]: r for r in studies}, visible
    eng.dispose()


def _sql(stmt) -> str:
    return str(stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))


@pytest.mark.parametrize("level", ["studies", "series", "instances"])
def test_gated_total_seeks_the_levels_consent_index(store, level):
    eng, _, _ = store
    _, count = qido_sql.statements(QidoQuery.parse(level, [("limit", "5")], base="b"), level, GATED)
    with eng.connect() as conn:
        plan = [r[3] for r in conn.execute(text("EXPLAIN QUERY PLAN " + _sql(count)))]
    table = {"studies": "dcm_study", "series": "dcm_series", "instances": "dcm_instance"}[level]
    assert plan == [f"SEARCH {table} USING COVERING INDEX ix_{table}_consent_no (consent_no=?)"], plan


@pytest.mark.parametrize("level, pairs, study, series, want", [
    ("studies", [], None, None, lambda st, se: True),
    ("series", [], None, None, lambda st, se: True),
    ("instances", [], None, None, lambda st, se: True),
    ("series", [("Modality", "MR")], None, None, lambda st, se: se.endswith(".1")),
    # matches on a parent level's attribute: counted over the joined levels
    ("series", [("StudyDescription", "CHEST")], None, None, lambda st, se: st["study_description"] == "CHEST"),
    ("instances", [("Modality", "CT"), ("StudyDate", "20200301-20200630")], None, None,
     lambda st, se: se.endswith(".0") and "20200301" <= st["study_date"] <= "20200630"),
    ("studies", [("ModalitiesInStudy", "MR")], None, None, lambda st, se: True),
    # the path's UIDs
    ("series", [], "1.2.7", None, lambda st, se: st["study_uid"] == "1.2.7"),
    ("instances", [], "1.2.7", "1.2.7.1", lambda st, se: se == "1.2.7.1"),
])
@pytest.mark.parametrize("gated", [True, False])
def test_totals_are_exactly_the_visible_matches(store, level, pairs, study, series, want, gated):
    eng, studies, visible = store
    scope = GATED if gated else AccessScope()
    q = QidoQuery.parse(level, pairs + [("limit", "3")], base="b", study_uid=study, series_uid=series)
    page, count = qido_sql.statements(q, level, scope)
    per = {"studies": 1, "series": 1, "instances": 2}[level]
    expected = sum(per for uid, st in studies.items() for se in (f"{uid}.0", f"{uid}.1")[:1 if level == "studies" else 2]
                   if (uid in visible or not gated) and want(st, se))
    with eng.connect() as conn:
        total = conn.execute(count).scalar_one()
        unpaged = conn.execute(page.limit(None).offset(None)).all()
    assert total == expected == len(unpaged)
