"""Identifier generation."""

from __future__ import annotations

import uuid


def new_id() -> str:
    """A new FHIR logical id (UUID v4, satisfies ``[A-Za-z0-9\\-.]{1,64}``)."""
    return str(uuid.uuid4())
