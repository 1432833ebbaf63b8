"""Grep-level (AST) review, as a test (issue #19): no module outside the access layer builds a read of a
patient table.

The access layer is ``gateway/store/`` (``gateway/store/access.py`` hands out the consent predicate; the
other store modules are the repositories it serves).  Everywhere else — services, handlers, CLIs,
``mappings/``, ``inference/`` — a ``select(...)`` (or ``Table.select()`` / ``with_only_columns``) that
names a patient table (``fhir_resource``, ``fhir_history``, ``fhir_link``, ``idx_*``, ``cm_*``, ``dcm_*``,
also through ``metadata.tables["..."]``) is a finding.

Modules that still build such reads are listed in :data:`REMAINING` with why; the list can only shrink:
a module not listed that starts reading a patient table fails, and so does a listed module that no
longer does (remove it from the list).  Each listed read takes its consent predicate from the gate's
scope (``gateway.store.access.where`` / ``AccessScope``); moving the statements into ``gateway/store`` is
the remaining work (docs/consent.md, residual risks).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("gateway", "mappings", "inference", "ontologies")
LAYER = "gateway/store/"

#: module → why it still builds reads of patient tables itself (each gated by the caller's scope)
REMAINING = {
}


_RAW_SQL = re.compile(r'\b(?:FROM|JOIN|UPDATE|INTO)\s+"?(\w+)', re.IGNORECASE)


def _patient_table_names() -> set[str]:
    from gateway.store.migrate import load_table_modules
    from gateway.store.schema import metadata

    load_table_modules()
    return {n for n in metadata.tables if n.startswith(("fhir_resource", "fhir_history", "fhir_link", "idx_", "cm_", "dcm_"))}


def _names_in(node: ast.AST, tables: set[str]) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in tables:
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute) and sub.attr in tables:
            found.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in tables:
            found.add(sub.value)
    return found


def _reads(path: Path, tables: set[str]) -> set[str]:
    """Patient tables named in SELECT-building calls of a module (also through a local alias of a table)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):  # st = s.metadata.tables.get("dcm_study") / t = cm_patient / x = dcm_instance.alias()
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            named = _names_in(node.value, tables)
            if len(named) == 1:
                aliases[node.targets[0].id] = next(iter(named))
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple):
            for t, v in zip(node.targets[0].elts, node.value.elts):
                named = _names_in(v, tables)
                if isinstance(t, ast.Name) and len(named) == 1:
                    aliases[t.id] = next(iter(named))
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name in tables and a.asname:
                    aliases[a.asname] = a.name
    known = tables | set(aliases)
    found = set()
    for node in ast.walk(tree):  # raw SQL text naming a patient table (text("SELECT ... FROM cm_patient"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for m in _RAW_SQL.finditer(node.value):
                if m.group(1) in tables:
                    found.add(m.group(1))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
        if name not in ("select", "with_only_columns", "exists", "union_all", "union"):
            continue
        target = [node] if isinstance(fn, ast.Name) else [node, fn.value]
        for t in target:
            found |= {aliases.get(n, n) for n in _names_in(t, known)}
    return found


def test_no_module_outside_the_access_layer_reads_patient_tables():
    tables = _patient_table_names()
    assert {"fhir_resource", "cm_patient", "dcm_instance", "dcm_study_part"} <= tables
    offenders: dict[str, set[str]] = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(LAYER):
                continue
            reads = _reads(path, tables)
            if reads:
                offenders[rel] = reads
    new = {m: sorted(t) for m, t in offenders.items() if m not in REMAINING}
    assert not new, f"reads of patient tables outside the access layer (gateway/store/): {new}"
    gone = sorted(m for m in REMAINING if m not in offenders)
    assert not gone, f"no longer reading patient tables: remove from REMAINING: {gone}"


def test_the_scanner_finds_a_read():
    """The scanner is able to fail: a select of a patient table, directly or through an alias, is found."""
    import tempfile

    tables = _patient_table_names()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text("from gateway.store.schema import cm_patient as P\nfrom sqlalchemy import select\n"
                     "def f(md):\n    t = md.tables.get('dcm_study')\n    return select(P.c.patient_id), select(t)\n")
        assert _reads(p, tables) == {"cm_patient", "dcm_study"}
        p.write_text("from sqlalchemy import text\nq = text('SELECT birth_date FROM cm_patient WHERE 1')\n")
        assert _reads(p, tables) == {"cm_patient"}
        p.write_text("from sqlalchemy import select\nx = select(1)\n")
        assert _reads(p, tables) == set()


def _scoped_builders():
    from gateway.store import cohort, cohort_reads, inference_reads, omop_reads, qido, training_reads

    out = [cohort.compile_cohort, qido.statements, omop_reads.collect]
    for mod in (cohort_reads, inference_reads, training_reads):
        out += [getattr(mod, n) for n in mod.__all__]
    return out


@pytest.mark.parametrize("fn", _scoped_builders(), ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_no_scope_no_query_builder(fn):
    """Every builder of patient reads outside the FHIR/DICOM repositories takes the gate's scope as a
    required parameter (no default meaning "everything"), and refuses anything that is not one."""
    import asyncio

    params = inspect.signature(fn).parameters
    assert "scope" in params and params["scope"].default is inspect.Parameter.empty, fn
    names = list(params)
    args = [object()] * names.index("scope") + [None] + [object()] * (
        sum(1 for p in list(params.values())[names.index("scope") + 1:]
            if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD))
    kwargs = {p.name: None for p in params.values() if p.kind is p.KEYWORD_ONLY and p.default is inspect.Parameter.empty}
    with pytest.raises(TypeError, match="AccessScope"):
        out = fn(*args, **kwargs)
        if inspect.iscoroutine(out):
            asyncio.run(out)
