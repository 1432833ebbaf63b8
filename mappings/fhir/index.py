"""Search-index extraction: FHIR resource JSON → index rows per parameter type (pure).

Rows are plain tuples ready for the ``idx_*`` tables; the store adds ``rid``/``res_type``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mappings.dates import DateFormatError, parse_range
from mappings.fhir.references import parse_reference
from mappings.fhir.searchparams import COMMON_PARAMS, SearchParam, params_for

_STR_MAX = 255


def normalise(text: str) -> str:
    """Case- and accent-insensitive form used by string search (FHIR R4 §3.1.1.5.8)."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())[:_STR_MAX]


@dataclass(slots=True)
class IndexRows:
    token: list[tuple[str, str | None, str]] = field(default_factory=list)  # param, system, code
    string: list[tuple[str, str, str]] = field(default_factory=list)  # param, norm, exact
    date: list[tuple[str, float, float]] = field(default_factory=list)  # param, lo, hi
    reference: list[tuple[str, str | None, str]] = field(default_factory=list)  # param, type, id
    quantity: list[tuple[str, float, str | None, str | None]] = field(default_factory=list)


#: a dotted path's parts: (key, choice stem or None) — ``name[x]`` matches choice elements
_PATHS: dict[str, tuple[tuple[str, str | None], ...]] = {}


def _parts(path: str) -> tuple[tuple[str, str | None], ...]:
    parts = _PATHS.get(path)
    if parts is None:
        parts = _PATHS[path] = tuple((k, k[:-3] if k.endswith("[x]") else None) for k in path.split("."))
    return parts


def _collect(value: Any, parts: tuple[tuple[str, str | None], ...], i: int, out: list[Any]) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, parts, i, out)
        return
    if i == len(parts):
        if value is not None:
            out.append(value)
        return
    if not isinstance(value, dict):
        return
    key, stem = parts[i]
    if stem is not None:
        n = len(stem)
        for k, v in value.items():
            if k.startswith(stem) and k[n : n + 1].isupper():
                _collect(v, parts, i + 1, out)
    elif key in value:
        _collect(value[key], parts, i + 1, out)


def walk(node: Any, path: str) -> Iterator[Any]:
    """Every value at a dotted path; lists are flattened; ``name[x]`` matches choice elements.  (Collected
    by plain recursion, then iterated: the nested generators it replaced cost most of index extraction.)"""
    out: list[Any] = []
    _collect(node, _parts(path), 0, out)
    return iter(out)


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        yield None, str(value)
    elif isinstance(value, dict):
        if "coding" in value or "text" in value and "system" not in value and "value" not in value:
            for coding in value.get("coding") or ():
                if coding.get("code") is not None:
                    yield coding.get("system"), str(coding["code"])
        elif "code" in value:  # Coding
            yield value.get("system"), str(value["code"])
        elif "value" in value:  # Identifier, ContactPoint
            yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in (
            "text",
            "family",
            "given",
            "prefix",
            "suffix",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
            "name",
            "display",
        ):
            v = value.get(key)
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield from (s for s in v if isinstance(s, str))


def _dates(value: Any) -> Iterator[tuple[float, float]]:
    try:
        if isinstance(value, str):
            yield parse_range(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):
            lo = parse_range(value["start"])[0] if value.get("start") else -1e15
            hi = parse_range(value["end"])[1] if value.get("end") else 1e15
            yield lo, hi
    except DateFormatError:
        return  # validation already rejected malformed dates; ignore odd extensions


def _quantities(value: Any) -> Iterator[tuple[float, str | None, str | None]]:
    if (
        isinstance(value, dict)
        and isinstance(value.get("value"), (int, float))
        and not isinstance(value.get("value"), bool)
    ):
        yield float(value["value"]), value.get("system"), value.get("code") or value.get("unit")


def _references(value: Any, target: str | None) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        ref = parse_reference(value["reference"])
        if ref is None:
            return
        if target and ref.type != target:
            return
        yield ref.type, ref.id
    elif isinstance(value, str):  # canonical / uri
        yield None, value


def extract(resource: dict[str, Any]) -> IndexRows:
    """Index rows for every search parameter of the resource's type (plus ``_tag``)."""
    rows = IndexRows()
    params = dict(params_for(resource["resourceType"]))
    params["_tag"] = COMMON_PARAMS["_tag"]
    for sp in params.values():
        _extract_param(resource, sp, rows)
    return rows


def _extract_param(resource: dict[str, Any], sp: SearchParam, rows: IndexRows) -> None:
    seen: set[Any] = set()
    for path in sp.paths:
        for value in walk(resource, path):
            if sp.type == "token":
                for system, code in _tokens(value):
                    key = (sp.name, system, code[:_STR_MAX])
                    if key not in seen:
                        seen.add(key)
                        rows.token.append(key)
            elif sp.type == "string":
                for s in _strings(value):
                    key = (sp.name, normalise(s), s[:_STR_MAX])
                    if key not in seen:
                        seen.add(key)
                        rows.string.append(key)
            elif sp.type == "date":
                for lo, hi in _dates(value):
                    rows.date.append((sp.name, lo, hi))
            elif sp.type == "reference":
                for rtype, rid in _references(value, sp.target):
                    key = (sp.name, rtype, rid)
                    if key not in seen:
                        seen.add(key)
                        rows.reference.append(key)
            elif sp.type == "quantity":
                for q in _quantities(value):
                    rows.quantity.append((sp.name, *q))


def compartment_patient(resource: dict[str, Any]) -> str | None:
    """The Patient id whose compartment holds the resource (the Patient itself for a Patient)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return resource.get("id")
    for key in ("subject", "patient", "beneficiary"):
        value = resource.get(key)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            ref = parse_reference(value["reference"])
            if ref is not None and ref.type == "Patient":
                return ref.id
    return None
