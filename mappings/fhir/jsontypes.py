"""The JSON type each element of a FHIR R4 resource must have, read from the ``fhir.resources.R4B`` models (pure).

FHIR R4 §2.6.2 (json.html): ``integer``, ``unsignedInt``, ``positiveInt`` and ``decimal`` are JSON numbers,
``boolean`` is JSON ``true``/``false``, every other primitive is a JSON string. The models coerce (``"5"`` is
taken for a decimal, ``"true"`` for a boolean), so the JSON walk of :mod:`mappings.fhir.jsonrules` checks
each value against the kind this module gives for its element.

:func:`field_kinds` maps each JSON property name of a model class to one of

* ``"boolean"``, ``"integer"``, ``"decimal"``, ``"string"``: a primitive (or an array of them);
* a model class: a complex type or backbone element (or an array of them);
* ``RESOURCE``: a resource whose class follows from its own ``resourceType`` (``contained``,
  ``Bundle.entry.resource``, ``Parameters.parameter.resource``).

Names the model does not know are absent (the model reports them).
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any

#: the kind of an element holding a whole resource (its class is chosen by its ``resourceType``)
RESOURCE = "resource"
_NUMBER_TYPES = {"Integer": "integer", "UnsignedInt": "integer", "PositiveInt": "integer", "Decimal": "decimal"}


def _unwrap(ann: Any) -> Any:
    """The item type of an Optional / Union-with-None / List annotation."""
    while True:
        origin = typing.get_origin(ann)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return None  # e.g. fhir_comments: str | list[str] (not an element)
            ann = args[0]
        elif origin is list:
            ann = typing.get_args(ann)[0]
        else:
            return ann


def _kind(ann: Any) -> Any:
    ann = _unwrap(ann)
    if ann is None:
        return None
    if ann is bool:
        return "boolean"
    if typing.get_origin(ann) is typing.Annotated:
        for meta in getattr(ann, "__metadata__", ()):
            kind = _NUMBER_TYPES.get(type(meta).__name__)
            if kind:
                return kind
        return "string"
    getter = getattr(ann, "get_model_klass", None)
    if getter is None:
        return None
    klass = getter()
    if klass.__name__ in ("Resource", "DomainResource"):
        return RESOURCE
    return klass


@cache
def field_kinds(cls: Any) -> dict[str, Any]:
    """JSON property name → kind (see the module docstring) for a model class."""
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if name == "fhir_comments":
            continue
        kind = _kind(field.annotation)
        if kind is not None:
            out[field.alias or name] = kind
    out["resourceType"] = "string"
    return out


#: JSON type names for messages
def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def type_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` (a parsed JSON scalar) is not of the primitive ``kind``; None when it is."""
    if kind == "string":
        if isinstance(value, str):
            return None
        return f"must be a JSON string, not {json_type(value)}"
    if kind == "boolean":
        if value is True or value is False:
            return None
        return f"must be a JSON boolean (true or false), not {json_type(value)}"
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return f"must be a JSON number without a fraction (integer), not {json_type(value)}"
    if kind == "decimal":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return f"must be a JSON number (decimal), not {json_type(value)}"
    return None
