"""Structural validation of FHIR resources with the ``fhir.resources.R4B`` models (pure).

The wire format is FHIR R4 (4.0.1); R4B models share its structure for every resource the gateway
uses.  Errors name the element path (FHIRPath-like) of each problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from mappings.fhir.references import ID_RE


@dataclass(frozen=True, slots=True)
class Issue:
    expression: str
    message: str


class InvalidResource(ValueError):
    def __init__(self, issues: list[Issue], *, structural: bool = False) -> None:
        super().__init__("; ".join(f"{i.expression}: {i.message}" for i in issues[:5]))
        self.issues = issues
        #: True when the problem is the resource's shape/type (400) rather than its content (422).
        self.structural = structural


@cache
def model_class(res_type: str) -> Any:
    """The R4B model class for a resource type, or None if the type does not exist."""
    try:
        return get_fhir_model_class(res_type)
    except (KeyError, ValueError):
        return None


def known_type(res_type: str) -> bool:
    cls = model_class(res_type)
    return cls is not None and res_type not in ("Element", "BackboneElement")


#: Deepest JSON nesting accepted in a resource (objects and arrays). Real resources stay far below (a
#: Questionnaire with 20 levels of items is ~45); deeper ones (400 nested extensions) overflowed the stack
#: of the model validation and of every later walk over the resource (a 500).
MAX_NESTING = 100


def nesting_exceeds(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` nests objects/arrays deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return False


def check_envelope(resource: Any, *, expected_type: str | None = None) -> type:
    """The cheap checks (object, resourceType, id, nesting depth); returns the model class or raises InvalidResource."""
    if not isinstance(resource, dict):
        raise InvalidResource([Issue("$", "a resource must be a JSON object")], structural=True)
    if nesting_exceeds(resource):
        raise InvalidResource([Issue("$", f"the resource nests deeper than {MAX_NESTING} levels")], structural=True)
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InvalidResource([Issue("resourceType", "missing")], structural=True)
    if expected_type is not None and rtype != expected_type:
        raise InvalidResource(
            [Issue("resourceType", f"is {rtype!r} but this endpoint takes {expected_type!r}")], structural=True
        )
    cls = model_class(rtype)
    if cls is None or not known_type(rtype):
        raise InvalidResource([Issue("resourceType", f"{rtype!r} is not a FHIR R4 resource type")], structural=True)
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_RE.match(rid)):
        raise InvalidResource([Issue(f"{rtype}.id", "must match [A-Za-z0-9\\-.]{1,64}")])
    from mappings.fhir.jsonrules import json_issues  # here: jsonrules imports Issue from this module

    issues = json_issues(resource, rtype)
    if issues:
        raise InvalidResource(issues, structural=True)
    return cls  # type: ignore[no-any-return]


def model_issues(resource: dict[str, Any]) -> list[Issue]:
    """Validate against the R4B model (the expensive part); [] when valid."""
    rtype = resource["resourceType"]
    try:
        model_class(rtype).model_validate(resource)
    except ValidationError as exc:
        issues = []
        for err in exc.errors()[:20]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
            issues.append(Issue(f"{rtype}.{loc}" if loc else rtype, err.get("msg", "invalid")))
        return issues or [Issue(rtype, "invalid")]
    return []


def model_issues_many(resources: list[Any]) -> list[tuple[int, list[tuple[str, str]]]]:
    """Batch form for a worker process: (index, [(expression, message)]) of each invalid resource.

    Resources that fail the envelope checks are skipped here (the caller checks envelopes itself).
    """
    out = []
    for i, res in enumerate(resources):
        try:
            check_envelope(res)
        except InvalidResource:
            continue
        issues = model_issues(res)
        if issues:
            out.append((i, [(x.expression, x.message) for x in issues]))
    return out


def validate_resource(resource: Any, *, expected_type: str | None = None) -> dict[str, Any]:
    """Validate a parsed JSON resource; returns it unchanged or raises :class:`InvalidResource`."""
    check_envelope(resource, expected_type=expected_type)
    issues = model_issues(resource)
    if issues:
        raise InvalidResource(issues)
    return resource  # type: ignore[no-any-return]
