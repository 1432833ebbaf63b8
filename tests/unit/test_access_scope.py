"""AccessScope.row_clause against a real SQLite table (issue #4): rows stamped with consent_no are
visible exactly when their number is NO_PATIENT or an allowed profile's number; NULL (no profile) and
numbers of other or unknown profiles never are."""

from __future__ import annotations

import hashlib

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, create_engine, insert, select

from gateway.store.scope import NO_PATIENT, AccessScope, profile_no


def _table():
    md = MetaData()
    t = Table("rows", md, Column("id", Integer, primary_key=True), Column("consent_no", BigInteger))
    eng = create_engine("sqlite://")
    md.create_all(eng)
    return eng, t


def test_profile_no_is_56_bits_of_the_keys_sha256_plus_one():
    key = "a" * 64
    expected = int(hashlib.sha256(key.encode()).hexdigest()[:14], 16) + 1
    assert profile_no(key) == expected
    assert profile_no(None) is None
    assert 0 < profile_no("x") <= 2 ** 56  # never NO_PATIENT, fits a signed BIGINT


def test_row_clause_filters_exactly_the_allowed_numbers():
    eng, t = _table()
    keys = [f"profile-{i}" for i in range(40)]
    allowed = set(keys[::3])
    rows = [{"id": 1, "consent_no": NO_PATIENT}, {"id": 2, "consent_no": None}]
    rows += [{"id": 10 + i, "consent_no": profile_no(k)} for i, k in enumerate(keys)]
    rows += [{"id": 99, "consent_no": 123456789}]  # a profile the gate does not know
    with eng.begin() as conn:
        conn.execute(insert(t), rows)
        scope = AccessScope(unrestricted=False, allowed_profiles=frozenset(allowed), summary="t")
        got = set(conn.execute(select(t.c.id).where(scope.row_clause(t.c.consent_no))).scalars())
        assert got == {1} | {10 + i for i, k in enumerate(keys) if k in allowed}
        nobody = AccessScope(unrestricted=False, allowed_profiles=frozenset(), summary="t")
        assert set(conn.execute(select(t.c.id).where(nobody.row_clause(t.c.consent_no))).scalars()) == {1}
        everyone = set(conn.execute(select(t.c.id).where(AccessScope().row_clause(t.c.consent_no))).scalars())
        assert everyone == {r["id"] for r in rows}


def test_row_clause_renders_integers_only():
    scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k1", "k2"}), summary="t",
                        allowed_nos=frozenset({7, 3}))
    _, t = _table()
    sql = str(scope.row_clause(t.c.consent_no).compile(compile_kwargs={"literal_binds": True}))
    assert sql == "rows.consent_no IN (0, 3, 7)"


def test_row_clause_is_one_array_constant_on_postgresql():
    from sqlalchemy.dialects import postgresql

    scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k1", "k2"}), summary="t",
                        allowed_nos=frozenset({7, 3}))
    _, t = _table()
    sql = str(scope.row_clause(t.c.consent_no).compile(dialect=postgresql.dialect()))
    assert sql == "rows.consent_no = ANY ('{0,3,7}'::BIGINT[])"


def test_scopes_with_different_numbers_never_share_a_cached_statement():
    """The numbers are part of SQLAlchemy's cache key: a statement compiled for one scope is never
    reused for another (that would show one requester another's permitted rows)."""
    eng, t = _table()

    def key(nos):
        scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k"}), summary="t",
                            allowed_nos=frozenset(nos))
        return select(t.c.id).where(scope.row_clause(t.c.consent_no))._generate_cache_key()

    assert key({3, 7}) == key({7, 3})
    assert key({3, 7}) != key({3, 8})
    assert key({3}) != key({3, 7})
    with eng.begin() as conn:
        conn.execute(insert(t), [{"id": n, "consent_no": n} for n in (3, 7, 8)])
        for nos, want in (({3, 7}, {3, 7}), ({3, 8}, {3, 8}), ({7}, {7})):
            scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k"}), summary="t",
                                allowed_nos=frozenset(nos))
            assert set(conn.execute(select(t.c.id).where(scope.row_clause(t.c.consent_no))).scalars()) == want


def test_row_clause_is_a_plain_in_on_sqlite_so_an_index_can_serve_it():
    """SQLite has no native boolean: SQLAlchemy renders a boolean expression that is not a comparison as
    ``expr = 1`` in a WHERE clause, and ``(consent_no IN (...)) = 1`` is a term no index can serve —
    the gated QIDO total then scanned every row instead of seeking the ``consent_no`` index."""
    from sqlalchemy import Index, func, text
    from sqlalchemy.dialects import sqlite

    eng, t = _table()
    scope = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k1", "k2"}), summary="t",
                        allowed_nos=frozenset({7, 3}))
    count = select(func.count()).select_from(t).where(scope.row_clause(t.c.consent_no))
    sql = str(count.compile(dialect=sqlite.dialect()))
    assert sql.endswith("WHERE rows.consent_no IN (0, 3, 7)"), sql
    with eng.begin() as conn:
        Index("ix_rows_consent_no", t.c.consent_no).create(conn)
        conn.execute(insert(t), [{"id": i, "consent_no": i % 50} for i in range(2000)])
        plan = " ".join(r[3] for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        assert "SEARCH rows USING COVERING INDEX ix_rows_consent_no (consent_no=?)" in plan, plan
        assert conn.execute(count).scalar_one() == 3 * 40


def test_for_patient_narrows_every_kind_of_row_and_is_never_unrestricted():
    """A SMART patient/ token's scope: DICOM-like rows (patient_id) of that patient only; an unknown table
    (no patient column) nothing; the consent decision it narrows still applies."""
    md = MetaData()
    t = Table("dcm", md, Column("id", Integer, primary_key=True), Column("patient_id", String(64)),
              Column("consent_no", BigInteger))
    other = Table("other", md, Column("id", Integer, primary_key=True), Column("consent_no", BigInteger))
    eng = create_engine("sqlite://")
    md.create_all(eng)
    ok = profile_no("ok")
    with eng.begin() as conn:
        conn.execute(insert(t), [{"id": 1, "patient_id": "a", "consent_no": ok},
                                 {"id": 2, "patient_id": "b", "consent_no": ok},
                                 {"id": 3, "patient_id": "a", "consent_no": profile_no("refused")},
                                 {"id": 4, "patient_id": None, "consent_no": NO_PATIENT}])
        conn.execute(insert(other), [{"id": 1, "consent_no": NO_PATIENT}])
        treatment = AccessScope().for_patient("a")
        research = AccessScope(False, frozenset({"ok"}), "t").for_patient("a")
        assert not treatment.unrestricted and not research.unrestricted
        for scope, want in ((treatment, {1, 3}), (research, {1})):
            assert set(conn.execute(select(t.c.id).where(scope.row_clause(t.c.consent_no))).scalars()) == want
            assert not list(conn.execute(select(other.c.id).where(scope.row_clause(other.c.consent_no))))
        # a scope bound to one patient asked for another: nothing of either
        assert not list(conn.execute(select(t.c.id).where(
            treatment.for_patient("b").row_clause(t.c.consent_no)).where(t.c.patient_id.is_not(None))))


def test_patient_row_clause_narrows_like_patient_clause():
    """The cohort compiler's predicate on cm_patient rows selects exactly the patients patient_clause does,
    for a research scope, a scope narrowed to one patient (SMART patient/), and an empty one."""
    import sqlite3

    from sqlalchemy import select as sel
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from gateway.store.schema import cm_patient

    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE cm_patient (pk INTEGER PRIMARY KEY, src_type TEXT, src_id TEXT, patient_id TEXT,"
                " identifiers TEXT, birth_date TEXT, birth_year INT, sex TEXT, deceased_date TEXT, race TEXT,"
                " ethnicity TEXT, consent_profile TEXT)")
    rows = [("p1", "k1"), ("p2", "k2"), ("p3", "k3"), ("p4", None)]
    con.executemany("INSERT INTO cm_patient (src_type, src_id, patient_id, consent_profile) VALUES ('t', ?, ?, ?)",
                    [(p, p, k) for p, k in rows])

    def ids(pred):
        q = sel(cm_patient.c.patient_id).where(pred)
        sql = str(q.compile(dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}))
        return {r[0] for r in con.execute(sql)}

    research = AccessScope(unrestricted=False, allowed_profiles=frozenset({"k1", "k2"}), summary="t")
    for scope in (research, research.for_patient("p2"), research.for_patient("p3"),
                  AccessScope(unrestricted=False, allowed_profiles=frozenset(), summary="t"),
                  AccessScope().for_patient("p4")):
        want = ids(scope.patient_clause(cm_patient.c.patient_id, allow_no_patient=False))
        assert ids(scope.patient_row_clause()) == want, scope.summary
    assert ids(research.for_patient("p2").patient_row_clause()) == {"p2"}
    assert ids(research.for_patient("p3").patient_row_clause()) == set()
