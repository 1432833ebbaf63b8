"""DICOM index tables: study / series / instance, SR content items, SEG segments.

The blob store keeps each instance's file under ``data_dir/blobs``; these tables index what QIDO-RS,
WADO-RS /metadata, the cohort compiler and the OMOP export need without re-reading files.  Every table
carries ``patient_id`` (the common-model patient id: the FHIR Patient id when the DICOM patient matched
one by identifier, otherwise a stable ``dicom-<hash>`` id with its own ``cm_patient`` row) so the consent
gate's ``AccessScope.patient_clause`` applies to every read.  Study, series and instance rows also carry
the number of the patient's effective consent profile (``consent_no``, kept in step by
``gateway.store.consent_schema``) so QIDO/WADO filter on the row itself (``AccessScope.row_clause``).

Text columns hold DICOM values as stored (dates ``YYYYMMDD``, multi-values backslash-joined);
``*_norm`` columns are upper-cased with ``^`` → space for case-insensitive matching.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text

from gateway.store.schema import PK, metadata

dcm_study = Table(
    "dcm_study",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("patient_id", String(64)),
    Column("consent_no", BigInteger),  # the patient's consent profile number (consent gate)
    Column("dicom_patient_id", String(64)),
    Column("issuer_of_patient_id", String(64)),
    Column("patient_name", String(324)),
    Column("patient_name_norm", String(324)),
    Column("patient_birth_date", String(8)),
    Column("patient_sex", String(16)),
    Column("study_date", String(8)),
    Column("study_time", String(16)),
    Column("accession_number", String(64)),
    Column("study_id", String(16)),
    Column("referring_physician", String(324)),
    Column("study_description", String(255)),
    Column("modalities", String(255)),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("updated_ts", Float, nullable=False),
)
Index("ix_dcm_study_patient", dcm_study.c.patient_id)
Index("ix_dcm_study_pid", dcm_study.c.dicom_patient_id)
Index("ix_dcm_study_name", dcm_study.c.patient_name_norm)
Index("ix_dcm_study_date", dcm_study.c.study_date)
Index("ix_dcm_study_accession", dcm_study.c.accession_number)

dcm_series = Table(
    "dcm_series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("patient_id", String(64)),
    Column("consent_no", BigInteger),  # the patient's consent profile number (consent gate)
    Column("modality", String(16)),
    Column("series_number", Integer),
    Column("series_description", String(255)),
    Column("body_part", String(64)),
    Column("manufacturer", String(128)),
    Column("model_name", String(128)),
    Column("protocol_name", String(128)),
    Column("slice_thickness", Float),
    Column("convolution_kernel", String(64)),
    Column("kvp", Float),
    Column("pixel_spacing", String(64)),
    Column("series_date", String(8)),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("updated_ts", Float, nullable=False),
)
Index("ix_dcm_series_study", dcm_series.c.study_uid)
Index("ix_dcm_series_patient", dcm_series.c.patient_id)
# covering for a cohort imaging leaf's patient list (modality, body part, slice thickness)
Index("ix_dcm_series_modality_patient", dcm_series.c.modality, dcm_series.c.body_part, dcm_series.c.slice_thickness,
      dcm_series.c.patient_id)

dcm_instance = Table(
    "dcm_instance",
    metadata,
    Column("sop_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("patient_id", String(64)),
    Column("consent_no", BigInteger),  # the patient's consent profile number (consent gate)
    Column("sop_class_uid", String(64)),
    Column("instance_number", Integer),
    Column("transfer_syntax", String(64)),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("frames", Integer),
    Column("blob_path", String(512), nullable=False),
    Column("size", Integer, nullable=False),
    Column("stored_ts", Float, nullable=False),
    Column("metadata", Text),  # DICOM JSON (PS3.18 F.2) with BulkDataURI placeholders
)
Index("ix_dcm_instance_series", dcm_instance.c.series_uid, dcm_instance.c.instance_number)
Index("ix_dcm_instance_study", dcm_instance.c.study_uid)
Index("ix_dcm_instance_patient", dcm_instance.c.patient_id)
Index("ix_dcm_instance_class", dcm_instance.c.sop_class_uid)

dcm_sr_item = Table(
    "dcm_sr_item",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False),
    Column("patient_id", String(64)),
    Column("item_id", String(128), nullable=False),  # ordinal path "1.3.2"
    Column("parent_item_id", String(128)),
    Column("depth", Integer, nullable=False),
    Column("group_item_id", String(128)),  # enclosing TID 1501 measurement group / top-level container
    Column("relationship", String(32)),
    Column("value_type", String(16)),
    Column("concept_scheme", String(32)),
    Column("concept_code", String(64)),
    Column("concept_meaning", String(255)),
    Column("concept_path", Text),  # "DCM:126000/DCM:126010/..."
    Column("num_value", Float),
    Column("unit_code", String(64)),
    Column("code_scheme", String(32)),
    Column("code_value", String(64)),
    Column("code_meaning", String(255)),
    Column("text_value", Text),
    Column("ref_sop_uid", String(64)),
    Column("ref_frame", Integer),
    Column("ref_segment_number", Integer),
)
# an SR leaf's second and later items, probed per first item (same instance/group): covering, so the probe
# reads no table row (replaces ix_dcm_sr_item_sop: the same leading columns)
Index("ix_dcm_sr_item_sop_value", dcm_sr_item.c.sop_uid, dcm_sr_item.c.group_item_id, dcm_sr_item.c.concept_code,
      dcm_sr_item.c.concept_scheme, dcm_sr_item.c.num_value, dcm_sr_item.c.code_value, dcm_sr_item.c.code_scheme)
# covering for a cohort SR leaf (coded or numeric item, same instance/group): no table lookups
Index("ix_dcm_sr_item_concept_value", dcm_sr_item.c.concept_code, dcm_sr_item.c.concept_scheme,
      dcm_sr_item.c.code_value, dcm_sr_item.c.code_scheme, dcm_sr_item.c.num_value, dcm_sr_item.c.sop_uid,
      dcm_sr_item.c.group_item_id, dcm_sr_item.c.patient_id)
Index("ix_dcm_sr_item_patient", dcm_sr_item.c.patient_id)

dcm_seg_segment = Table(
    "dcm_seg_segment",
    metadata,
    Column("sop_uid", String(64), primary_key=True),
    Column("segment_number", Integer, primary_key=True),
    Column("series_uid", String(64)),
    Column("study_uid", String(64)),
    Column("patient_id", String(64)),
    Column("label", String(255)),
    Column("algorithm_type", String(32)),
    Column("category_scheme", String(32)),
    Column("category_code", String(64)),
    Column("category_meaning", String(255)),
    Column("type_scheme", String(32)),
    Column("type_code", String(64)),
    Column("type_meaning", String(255)),
    Column("ref_series_uid", String(64)),
)
Index("ix_dcm_seg_segment_type", dcm_seg_segment.c.type_code)
Index("ix_dcm_seg_segment_patient", dcm_seg_segment.c.patient_id)


def _part_table(name: str, of: Table, key: str) -> Table:
    """A table with the columns of ``of`` keyed by (``key``, patient_id): one row per patient of a study or
    series that holds instances of several patients (a PACS merge error, a reused UID)."""
    pk = (key, "patient_id")
    cols = [Column(c.name, c.type, primary_key=c.name in pk, nullable=c.nullable and c.name not in pk) for c in of.c]
    return Table(name, metadata, *cols)


dcm_study_part = _part_table("dcm_study_part", dcm_study, "study_uid")
"""Per-patient views of a *conflicting* study (its instances belong to several patients): for each patient,
the study row as that patient's own instances give it (patient name/ID, study attributes, counts,
modalities).  Rows exist only for conflicting studies; a research scope reads these instead of the study
row (see ``gateway.store.dicom_access``)."""
dcm_series_part = _part_table("dcm_series_part", dcm_series, "series_uid")
"""Per-patient views of a conflicting series (instances of several patients in one series)."""
Index("ix_dcm_study_part_consent_no", dcm_study_part.c.consent_no)
Index("ix_dcm_series_part_study", dcm_series_part.c.study_uid)

DICOM_TABLES = (dcm_study, dcm_series, dcm_instance, dcm_sr_item, dcm_seg_segment)
