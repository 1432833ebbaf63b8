"""FHIR Bulk Data Access IG v2.0.0 ("Export"): the kick-off parameters, parsed and checked (pure).

Kick-off (IG §"Bulk Data Kick-off Request"): ``GET`` with query parameters, or ``POST`` with a FHIR
``Parameters`` resource.  Supported: ``_outputFormat`` (``application/fhir+ndjson`` and its abbreviations
``application/ndjson``, ``ndjson``), ``_type``, ``_since`` (a FHIR instant), ``_typeFilter`` (a FHIR
search query on one of the types; several for one type are OR-ed), ``patient`` (Patient- and Group-level:
``valueReference``s of a POST body, or ``Patient/<id>`` strings; only their compartments are exported) and
``_elements`` (``[type.]element`` names of root elements: other non-mandatory elements are left out and the
resource is tagged ``SUBSETTED``; :func:`subset`).  The IG's optional ``includeAssociatedData``, ``_until``,
``organizeOutputBy`` and ``allowPartialManifests`` are refused with a message, as the IG asks of a server
that does not support a parameter, unless the client sent ``Prefer: handling=lenient`` (then ignored).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

import orjson

#: the ``_outputFormat`` values meaning NDJSON of FHIR resources (IG: "at least application/fhir+ndjson")
NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
SUPPORTED = ("_outputFormat", "_type", "_since", "_typeFilter", "patient", "_elements")
#: IG parameters this server does not implement (refused, or ignored under ``handling=lenient``)
UNSUPPORTED = ("includeAssociatedData", "_until", "organizeOutputBy", "allowPartialManifests")
#: the tag of a resource missing elements (FHIR R4 §2.36 "Tags"; IG: ``_elements``)
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
#: search result parameters that make no sense in a ``_typeFilter`` (paging, sorting, includes, summaries)
FILTER_FORBIDDEN = (
    "_count",
    "_offset",
    "_sort",
    "_include",
    "_revinclude",
    "_summary",
    "_elements",
    "_total",
    "_contained",
    "_containedType",
    "_format",
    "_pretty",
)
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ELEMENT = re.compile(r"^(?:([A-Z][A-Za-z]{1,63})\.)?([a-z][A-Za-z0-9]{0,63})$")
_PATIENT_REF = re.compile(r"^(?:.*/)?Patient/([A-Za-z0-9\-.]{1,64})$")


class KickoffError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"$export parameter '{param}': {message}")
        self.param = param


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """A checked kick-off: ``types`` empty = every type the level covers."""

    types: tuple[str, ...] = ()
    since: str | None = None
    #: type → the ``_typeFilter`` queries on it, each as (name, value) pairs
    type_filters: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = field(default_factory=dict)
    output_format: str = "application/fhir+ndjson"
    ignored: tuple[str, ...] = ()
    #: ``patient``: the Patient ids whose compartments are exported (empty: every patient of the level)
    patients: tuple[str, ...] = ()
    #: ``_elements``: ``element`` or ``Type.element`` names (empty: whole resources)
    elements: tuple[str, ...] = ()

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "types": list(self.types),
                "since": self.since,
                "outputFormat": self.output_format,
                "typeFilter": {t: [list(map(list, q)) for q in qs] for t, qs in self.type_filters.items()},
                "patients": list(self.patients),
                "elements": list(self.elements),
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        d = orjson.loads(text)
        return cls(
            tuple(d["types"]),
            d.get("since"),
            {t: tuple(tuple((k, v) for k, v in q) for q in qs) for t, qs in d["typeFilter"].items()},
            d.get("outputFormat") or NDJSON_FORMATS[0],
            patients=tuple(d.get("patients") or ()),
            elements=tuple(d.get("elements") or ()),
        )


def parameters_pairs(body: Any) -> list[tuple[str, str]]:
    """(name, value) pairs of a kick-off ``Parameters`` resource (IG: POST kick-off)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise KickoffError("body", "a POST kick-off takes a FHIR Parameters resource")
    params = body.get("parameter") or []
    if not isinstance(params, list):
        raise KickoffError("Parameters.parameter", "must be a list")
    out = []
    for p in params:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise KickoffError("Parameters.parameter", "each parameter needs a name")
        values = [v for k, v in p.items() if k.startswith("value")]
        if p["name"] in UNSUPPORTED or (values and not isinstance(values[0], str)):
            out.append((p["name"], orjson.dumps(values[0]).decode() if values else ""))
            continue
        if len(values) != 1:
            raise KickoffError(p["name"], "needs exactly one value[x]")
        out.append((p["name"], values[0]))
    return out


def parse_kickoff(pairs: Iterable[tuple[str, str]], *, lenient: bool = False) -> ExportRequest:
    """Check the kick-off parameters; raises :class:`KickoffError` naming the parameter."""
    types: list[str] = []
    since = None
    fmt = NDJSON_FORMATS[0]
    filters: dict[str, list[tuple[tuple[str, str], ...]]] = {}
    ignored = []
    patients: list[str] = []
    elements: list[str] = []
    for name, value in pairs:
        if name == "_outputFormat":
            if value not in NDJSON_FORMATS:
                raise KickoffError(name, f"{value!r} is not supported (use {', '.join(NDJSON_FORMATS)})")
        elif name == "_type":
            for t in (x.strip() for x in value.split(",")):
                if not _TYPE.match(t):
                    raise KickoffError(name, f"{t!r} is not a resource type")
                if t not in types:
                    types.append(t)
        elif name == "_since":
            if since is not None:
                raise KickoffError(name, "given more than once")
            if not _INSTANT.match(value.strip()):
                raise KickoffError(name, f"{value!r} is not a FHIR instant (YYYY-MM-DDThh:mm:ss[.sss]+zz:zz)")
            since = value.strip()
        elif name == "_typeFilter":
            for one in _split_filters(value):
                rtype, sep, query = one.partition("?")
                if not _TYPE.match(rtype) or not sep:
                    raise KickoffError(name, f"{one[:80]!r} is not [type]?[search query]")
                q = tuple(parse_qsl(query, keep_blank_values=True))
                if not q:
                    raise KickoffError(name, f"{rtype}: empty search query")
                bad = [k for k, _ in q if k.partition(":")[0] in FILTER_FORBIDDEN]
                if bad:
                    raise KickoffError(name, f"{rtype}: {bad[0]!r} is not allowed in a _typeFilter")
                filters.setdefault(rtype, []).append(q)
        elif name == "patient":
            pid = _patient_id(value)
            if pid not in patients:
                patients.append(pid)
        elif name == "_elements":
            for e in (x.strip() for x in value.split(",")):
                if not _ELEMENT.match(e):
                    raise KickoffError(name, f"{e[:80]!r} is not an element name ([type.]element, root elements only)")
                if e not in elements:
                    elements.append(e)
        elif lenient:
            ignored.append(name)
        elif name in UNSUPPORTED:
            raise KickoffError(name, "is not supported by this server (Prefer: handling=lenient ignores it)")
        else:
            raise KickoffError(name, "is not a Bulk Data export parameter")
    if types:
        stray = [t for t in filters if t not in types]
        if stray:
            raise KickoffError("_typeFilter", f"{stray[0]} is not one of the _type types")
    return ExportRequest(
        tuple(types),
        since,
        {t: tuple(qs) for t, qs in filters.items()},
        fmt,
        tuple(ignored),
        tuple(patients),
        tuple(elements),
    )


def _patient_id(value: str) -> str:
    """The id of a ``patient`` value: a Reference (as JSON, from a POST body's ``valueReference``) or a
    ``Patient/<id>`` string."""
    ref: Any = value
    if value.startswith("{"):
        try:
            ref = orjson.loads(value).get("reference")
        except (orjson.JSONDecodeError, AttributeError):
            ref = None
    m = _PATIENT_REF.match(ref) if isinstance(ref, str) else None
    if m is None:
        raise KickoffError("patient", "a Reference to a Patient (valueReference {'reference': 'Patient/<id>'})")
    return m[1]


@cache
def mandatory_elements(rtype: str) -> frozenset[str]:
    """The root elements of ``rtype`` with a minimum cardinality of 1 (FHIR R4 base definitions, from the
    ``fhir.resources`` models), plus ``resourceType``, ``id`` and ``meta``: kept whatever ``_elements`` asks."""
    from mappings.fhir.validate import model_class

    names = {"resourceType", "id", "meta"}
    cls = model_class(rtype)
    for name, info in (getattr(cls, "model_fields", None) or {}).items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if info.is_required() or extra.get("element_required"):
            names.add(info.alias or name)
    return frozenset(names)


def _element_of(key: str, wanted: frozenset[str]) -> bool:
    """``key`` (a JSON property) is one of the ``wanted`` elements: itself, its primitive extension
    ``_key``, or a choice type ``value[x]`` asked for as ``value``."""
    base = key[1:] if key.startswith("_") else key
    if base in wanted:
        return True
    return any(base.startswith(w) and len(base) > len(w) and base[len(w)].isupper() for w in wanted)


def subset(resource: dict[str, Any], elements: Iterable[str]) -> dict[str, Any]:
    """IG ``_elements``: ``resource`` with only the requested root elements (``Type.element`` for its type,
    ``element`` for every type) and its mandatory ones, tagged ``SUBSETTED``; a resource whose type no
    requested element names is returned whole."""
    rtype = str(resource.get("resourceType"))
    asked = set()
    for e in elements:
        t, _, name = e.rpartition(".")
        if not t or t == rtype:
            asked.add(name)
    if not asked:
        return resource
    wanted = frozenset(asked) | mandatory_elements(rtype)
    out = {k: v for k, v in resource.items() if _element_of(k, wanted)}
    meta = dict(out.get("meta") or {})
    tags = [t for t in (meta.get("tag") or []) if t != SUBSETTED]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return out


def _split_filters(value: str) -> list[str]:
    """One ``_typeFilter`` value is one query: IG v2 repeats the parameter for several (a comma inside a
    query is the search OR of its values, ``code=a,b``, so values are not split on commas)."""
    return [value.strip()] if value.strip() else []


def ndjson_page(
    contents: list[str], project: str | None = None, secret: bytes | None = None, elements: tuple[str, ...] = ()
) -> tuple[bytes, int]:
    """NDJSON lines of stored resources (one compact JSON per line) and how many were withheld; with a
    ``project`` the de-identified copies (``mappings.deid.fhir.deidentify_resource``; None = withheld); with
    ``elements`` the :func:`subset` of each (of the de-identified copy).  Pure; runs in a worker process for
    de-identification."""
    if project is None and not elements:
        return ("\n".join(contents) + "\n").encode() if contents else b"", 0
    if project is None:
        lines = [orjson.dumps(subset(orjson.loads(text), elements)) for text in contents]
        return (b"\n".join(lines) + b"\n") if lines else b"", 0
    from mappings.deid.fhir import deidentify_resource
    from mappings.deid.keys import ProjectKeys

    keys = ProjectKeys(project, secret or b"")
    lines, withheld = [], 0
    for text in contents:
        out = deidentify_resource(orjson.loads(text), keys)
        if out is None:
            withheld += 1
        else:
            lines.append(orjson.dumps(subset(out, elements) if elements else out))
    return (b"\n".join(lines) + b"\n") if lines else b"", withheld


__all__ = [
    "ExportRequest",
    "KickoffError",
    "NDJSON_FORMATS",
    "SUBSETTED",
    "mandatory_elements",
    "ndjson_page",
    "parameters_pairs",
    "parse_kickoff",
    "subset",
]
