"""The one relational schema (SQLite and PostgreSQL alike).

Three layers:

* ``fhir_resource`` / ``fhir_history``: raw FHIR JSON for faithful read-back (current version + every
  version), keyed by an integer ``rid`` that the search index refers to.
* ``idx_*``: the search index, one table per FHIR search-parameter type (the way HAPI indexes).
* ``cm_*``: the common model, projected from FHIR (and later DICOM/OMOP) so cohort queries and exports
  never re-parse JSON.  Each row keeps its source key (``src_type``, ``src_id``) so an update replaces
  exactly the rows it produced.

Other packages add their tables to the same :data:`metadata` (see ``gateway/store/migrate.py``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

#: Auto-increment primary keys: BIGINT on PostgreSQL, INTEGER (rowid alias) on SQLite.
PK = BigInteger().with_variant(Integer(), "sqlite")
RID = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "schema_version",
    metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
)

fhir_resource = Table(
    "fhir_resource",
    metadata,
    Column("rid", PK, primary_key=True, autoincrement=True),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", String(40), nullable=False),
    Column("lu_ts", Float, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    #: Logical id of the Patient whose compartment holds this resource (consent gate joins on it).
    Column("patient_id", String(64), nullable=True),
    #: The number of the patient's effective consent profile (gateway.store.scope.profile_no of
    #: cm_patient.consent_profile; 0 without a patient), kept in step by gateway.store.consent_schema, so
    #: the gate filters on the row itself.  Before ``content``: read without skipping it.
    Column("consent_no", BigInteger, nullable=True),
    Column("content", Text, nullable=True),
    #: True when the row's consent_no comes from its patient links (fhir_link: several patients, or an
    #: unknown one) rather than from ``patient_id`` alone; NULL in rows older than the column.
    Column("multi_link", Boolean, nullable=True),
    UniqueConstraint("res_type", "res_id", name="uq_fhir_resource_type_id"),
)
#: ``_lastUpdated`` searches: the range, and the (lu_ts, rid) keyset order they page in
#: (``fhir_search._walk``; issue 27 — replaces (res_type, lu_ts), which left ties of one transaction's
#: resources unordered on PostgreSQL)
ix_fhir_resource_type_lu_rid = Index("ix_fhir_resource_type_lu_rid", fhir_resource.c.res_type,
                                     fhir_resource.c.lu_ts, fhir_resource.c.rid)
Index("ix_fhir_resource_patient", fhir_resource.c.patient_id)

fhir_history = Table(
    "fhir_history",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", String(40), nullable=False),
    Column("lu_ts", Float, nullable=False),
    Column("method", String(8), nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("content", Text, nullable=True),
)
Index("ix_fhir_history_type_lu", fhir_history.c.res_type, fhir_history.c.lu_ts)

#: The patients each resource *version* is linked to (``mappings.fhir.links``): every Patient it
#: references anywhere, computed once when the version is written.  A version is visible to a research scope
#: only when every linked patient is (``gateway.store.access``).  ``patient_id`` may name no patient at all
#: (``mappings.fhir.links.UNKNOWN``: a contained or identifier-only Patient that resolves to nobody): such a
#: patient has no consent, so the version is hidden from research (fail closed).
fhir_link = Table(
    "fhir_link",
    metadata,
    Column("res_type", String(64), primary_key=True),
    Column("res_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)
Index("ix_fhir_link_patient", fhir_link.c.patient_id)
#: the compartment search's lookup: one patient's resources of one type (issue 27)
ix_fhir_link_patient_type = Index("ix_fhir_link_patient_type", fhir_link.c.patient_id, fhir_link.c.res_type,
                                  fhir_link.c.res_id)


def _idx(name: str, *cols: Column) -> Table:
    return Table(
        name,
        metadata,
        Column("rid", RID, nullable=False),
        Column("res_type", String(64), nullable=False),
        Column("param", String(64), nullable=False),
        *cols,
        #: The resource's ``fhir_resource.consent_no``, kept equal to it by gateway.store.consent_schema
        #: (same transaction), so the consent gate is part of the index lookup that drives a search.
        Column("consent_no", BigInteger, nullable=True),
    )


def _gate_index(table: Table, *value_cols: Column, also: tuple[Column, ...] = ()) -> Index:
    """The lookup index of a gated search: the plain lookup columns (type, parameter, value,
    rid) plus ``consent_no``, so ``consent_no IN (permitted)`` is tested inside the index and only the
    permitted candidates' rows are read (their rids still in order, as the ungated lookup gives them).

    Partial (``consent_no IS NOT NULL``, which a gated search's ``consent_no IN (...)`` implies and an
    ungated one does not), so only gated searches use it: with ``consent_no`` in the ungated lookup
    index SQLite picked it for ungated searches too.  Measured alternatives (SQLite, 100k resources, 110
    of 150 profiles): ``consent_no`` before rid (seeks per profile) or leading gives the rids out of
    order, and building the rid set for ``rid IN (...)`` from them cost more.  ``also``: the
    other columns a search value tests (token system, ...), so the index covers the lookup — otherwise
    SQLite may prefer the plain lookup index and test ``consent_no`` on the table row."""
    not_null = table.c.consent_no.is_not(None)
    return Index(f"ix_{table.name}_gated", table.c.res_type, table.c.param, *value_cols, table.c.rid,
                 table.c.consent_no, *also, sqlite_where=not_null, postgresql_where=not_null)


idx_token = _idx("idx_token", Column("system", String(255)), Column("code", String(255), nullable=False))
Index("ix_idx_token_lookup", idx_token.c.res_type, idx_token.c.param, idx_token.c.code, idx_token.c.rid)
Index("ix_idx_token_rid", idx_token.c.rid)

#: Binary collation on both engines so prefix search is an index range scan (PostgreSQL "C").
BinaryString = String(255).with_variant(String(255, collation="C"), "postgresql")

idx_string = _idx(
    "idx_string", Column("norm", BinaryString, nullable=False), Column("exact", String(255), nullable=False)
)
Index("ix_idx_string_lookup", idx_string.c.res_type, idx_string.c.param, idx_string.c.norm, idx_string.c.rid)
Index("ix_idx_string_rid", idx_string.c.rid)

idx_date = _idx("idx_date", Column("lo", Float, nullable=False), Column("hi", Float, nullable=False))
Index("ix_idx_date_lookup", idx_date.c.res_type, idx_date.c.param, idx_date.c.lo, idx_date.c.hi)
#: date searches bounded by the range's end (gt, ge, eb: ``fhir_search._date_pred``; issue 27)
ix_idx_date_hi = Index("ix_idx_date_hi", idx_date.c.res_type, idx_date.c.param, idx_date.c.hi, idx_date.c.rid)
Index("ix_idx_date_rid", idx_date.c.rid)

idx_ref = _idx(
    "idx_ref", Column("target_type", String(64)), Column("target_id", String(255), nullable=False)
)
Index("ix_idx_ref_lookup", idx_ref.c.res_type, idx_ref.c.param, idx_ref.c.target_id, idx_ref.c.rid)
Index("ix_idx_ref_target", idx_ref.c.target_type, idx_ref.c.target_id)
Index("ix_idx_ref_rid", idx_ref.c.rid)

idx_quantity = _idx(
    "idx_quantity",
    Column("value", Float, nullable=False),
    Column("system", String(255)),
    Column("code", String(64)),
)
#: quantity ranges, walked in (value, rid) keyset order (``fhir_search._walk``; issue 27 — replaces
#: (res_type, param, value), which needed a sort of each value's rows by rid)
ix_idx_quantity_value_rid = Index("ix_idx_quantity_value_rid", idx_quantity.c.res_type, idx_quantity.c.param,
                                  idx_quantity.c.value, idx_quantity.c.rid)
Index("ix_idx_quantity_rid", idx_quantity.c.rid)

GATE_INDEXES = (
    _gate_index(idx_token, idx_token.c.code, also=(idx_token.c.system,)),
    _gate_index(idx_string, idx_string.c.norm),
    _gate_index(idx_date, idx_date.c.lo, idx_date.c.hi),
    _gate_index(idx_ref, idx_ref.c.target_id, also=(idx_ref.c.target_type,)),
    _gate_index(idx_quantity, idx_quantity.c.value, also=(idx_quantity.c.system, idx_quantity.c.code)),
)

#: indexes added after the tables existed (created on older stores by consent_schema.ensure_indexes)
LATER_INDEXES = (ix_fhir_link_patient_type, ix_idx_date_hi, ix_fhir_resource_type_lu_rid, ix_idx_quantity_value_rid)

INDEX_TABLES = {
    "token": idx_token,
    "string": idx_string,
    "date": idx_date,
    "reference": idx_ref,
    "quantity": idx_quantity,
}

# --------------------------------------------------------------------------------------------
# Common model (see mappings/model.py for the typed objects these rows hold)
# --------------------------------------------------------------------------------------------


def _cm(name: str, *cols: Column) -> Table:
    return Table(
        name,
        metadata,
        Column("pk", PK, primary_key=True, autoincrement=True),
        Column("src_type", String(32), nullable=False),
        Column("src_id", String(255), nullable=False),
        Column("patient_id", String(64)),
        *cols,
    )


cm_patient = _cm(
    "cm_patient",
    Column("identifiers", Text),  # JSON list of "system|value"
    Column("birth_date", String(10)),
    Column("birth_year", Integer),
    Column("sex", String(16)),
    Column("deceased_date", String(32)),
    Column("race", String(64)),
    Column("ethnicity", String(64)),
    Column("consent_profile", String(64)),  # ConsentProfile key, filled by the consent gate
)

def _coded() -> list[Column]:
    return [
        Column("system", String(255)),
        Column("code", String(255)),
        Column("display", Text),
        Column("codes", Text),  # JSON list of every "system|code" of the concept
    ]


cm_encounter = _cm(
    "cm_encounter",
    Column("class_code", String(64)),
    *_coded(),
    Column("start", String(32)),
    Column("end", String(32)),
)
cm_condition = _cm(
    "cm_condition",
    *_coded(),
    Column("onset", String(32)),
    Column("abatement", String(32)),
    Column("clinical_status", String(32)),
    Column("encounter_id", String(64)),
)
cm_observation = _cm(
    "cm_observation",
    *_coded(),
    Column("category", String(64)),
    Column("value_num", Float),
    Column("unit", String(64)),
    Column("value_system", String(255)),
    Column("value_code", String(255)),
    Column("value_text", Text),
    Column("effective", String(32)),
    Column("status", String(32)),
    Column("encounter_id", String(64)),
    Column("parent_id", String(255)),  # component rows point at their panel observation
)
cm_procedure = _cm(
    "cm_procedure",
    *_coded(),
    Column("performed", String(32)),
    Column("performed_end", String(32)),
    Column("status", String(32)),
    Column("encounter_id", String(64)),
)
cm_diagnostic_report = _cm(
    "cm_diagnostic_report",
    *_coded(),
    Column("effective", String(32)),
    Column("status", String(32)),
    Column("study_uids", Text),  # JSON list of referenced ImagingStudy ids / study UIDs
    Column("conclusion", Text),
)
cm_imaging_study = _cm(
    "cm_imaging_study",
    Column("study_uid", String(128)),
    Column("started", String(32)),
    Column("modalities", Text),  # JSON list
    Column("description", Text),
    Column("n_series", Integer),
    Column("n_instances", Integer),
)
#: Imaging series known from a source without a DICOM index row (OMOP image_occurrence imports; one row
#: per series), so cohorts and re-exports see them like DICOM-born series (docs/vocab.md, "Imaging").
cm_imaging_series = _cm(
    "cm_imaging_series",
    Column("study_uid", String(128)),
    Column("series_uid", String(128)),
    Column("modality", String(16)),
    Column("body_part", String(64)),
    Column("started", String(32)),
)
Index("ix_cm_imaging_series_src", cm_imaging_series.c.src_type, cm_imaging_series.c.src_id)
Index("ix_cm_imaging_series_patient", cm_imaging_series.c.patient_id)
Index("ix_cm_imaging_series_study", cm_imaging_series.c.study_uid)
cm_consent = _cm(
    "cm_consent",
    Column("status", String(32)),
    Column("period_start", String(32)),
    Column("period_end", String(32)),
    Column("profile", Text),  # JSON of the normalised DUO ConsentProfile (None if no DUO terms)
    Column("date", String(32)),
)

CM_TABLES = {
    "Patient": cm_patient,
    "Encounter": cm_encounter,
    "Condition": cm_condition,
    "Observation": cm_observation,
    "Procedure": cm_procedure,
    "DiagnosticReport": cm_diagnostic_report,
    "ImagingStudy": cm_imaging_study,
    "Consent": cm_consent,
}
for _t in CM_TABLES.values():
    Index(f"ix_{_t.name}_src", _t.c.src_type, _t.c.src_id)
    Index(f"ix_{_t.name}_patient", _t.c.patient_id)
for _t in (cm_condition, cm_observation, cm_procedure, cm_encounter, cm_diagnostic_report):
    # covering for a cohort leaf's "patients with this code" list (no table lookups)
    Index(f"ix_{_t.name}_code_patient", _t.c.code, _t.c.system, _t.c.patient_id)
