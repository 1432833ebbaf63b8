"""Pure FHIR R4 mappings: validation, search-parameter index extraction, projection to the common model."""
