"""De-identification for research exports (pure; issue #24): per-project keys (:mod:`mappings.deid.keys`),
FHIR resources (:mod:`mappings.deid.fhir`) and DICOM datasets per PS3.15 Annex E (:mod:`mappings.deid.dicom`).
See docs/deidentification.md."""
