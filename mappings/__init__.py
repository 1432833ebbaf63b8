"""The common model and pure source <-> model mappings (FHIR, DICOM incl. SR/SEG, OMOP)."""
