"""Parse FHIR search parameters (FHIR R4 §3.1.1 "Search") into typed clauses (pure).

Errors raise :class:`SearchError` naming the parameter; the FHIR handler renders them as a 400
OperationOutcome (strict handling; ``Prefer: handling=lenient`` drops unknown parameters instead).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from mappings.dates import DateFormatError, parse_range
from mappings.fhir.searchparams import COMMON_PARAMS, RESULT_PARAMS, SearchParam, params_for

ANY = object()  # token system wildcard ("code" without a bar)
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


class SearchError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"search parameter '{param}': {message}")
        self.param = param


@dataclass(frozen=True, slots=True)
class Clause:
    """One occurrence of a parameter: values are OR-ed; clauses are AND-ed."""

    param: SearchParam
    modifier: str | None
    values: tuple[Any, ...]  # type-specific, see _parse_value
    missing: bool | None = None


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: str
    target_type: str | None


@dataclass(slots=True)
class SearchQuery:
    res_type: str
    clauses: list[Clause] = field(default_factory=list)
    count: int | None = None
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary: str | None = None  # "count" | "false"
    #: ``_total`` (FHIR R4 §3.1.1.5.x): none | estimate | accurate.  The default, ``estimate``, gives the
    #: total only when it costs nothing (the page that reaches the end of the matches); ``accurate`` counts.
    total: str = "estimate"
    #: ``_cursor``: the opaque keyset cursor of a ``next`` link (verified by the service), else None
    cursor: str | None = None
    #: keyset position decoded from the cursor: the sort-key values of the last row already returned
    #: (``_sort`` keys, then ``rid``) and how many rows came before the page (set by the service)
    after: tuple[Any, ...] | None = None
    position: int = 0
    #: the search's criteria and result parameters in canonical form (``_cursor``, ``_offset``, ``_format``
    #: and ``_pretty`` left out): what a cursor is bound to
    signature: str = ""
    ignored: list[str] = field(default_factory=list)
    #: compartment search ``Patient/{id}/{type}`` (FHIR R4 §3.1.1.1.5): the Patient id (or several: a Group's
    #: members, Bulk Data ``Group/[id]/$export``), else None
    compartment: str | tuple[str, ...] | None = None
    #: keyset paging in storage (rid) order whatever drives the search, ``after`` = ``(rid,)`` (bulk export's
    #: resumable cursor holds a rid); otherwise the store pages in the order of the driving index walk
    storage_order: bool = False


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def parse_search(
    res_type: str,
    pairs: Iterable[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    lenient: bool = False,
) -> SearchQuery:
    q = SearchQuery(res_type)
    params = params_for(res_type)
    pairs = list(pairs)
    for raw_name, raw_value in pairs:
        if _CONTROL.search(raw_name) or _CONTROL.search(raw_value):  # NUL etc.: no stored string holds one
            raise SearchError(
                raw_name if not _CONTROL.search(raw_name) else repr(raw_name),
                "contains a control character (below U+0020 other than tab, CR, LF)",
            )
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMS:
            _result_param(q, name, modifier, raw_value, default_count, max_count)
            continue
        sp = COMMON_PARAMS.get(name) or params.get(name)
        if sp is None:
            if lenient:
                q.ignored.append(raw_name)
                continue
            raise SearchError(raw_name, f"not supported for {res_type} (see CapabilityStatement)")
        q.clauses.append(_clause(sp, modifier or None, raw_value))
    if q.count is None:
        q.count = default_count
    if q.cursor is not None and q.offset:
        raise SearchError("_cursor", "cannot be combined with _offset (a cursor already says where the page starts)")
    q.signature = search_signature(res_type, [(k, v) for k, v in pairs if k not in q.ignored])
    return q


#: Parameters that say where a page starts or how it is rendered, not what is searched.
_UNSIGNED = frozenset({"_cursor", "_offset", "_format", "_pretty"})


def search_signature(res_type: str, pairs: Iterable[tuple[str, str]]) -> str:
    """The search in canonical form (type, then the sorted parameter pairs other than :data:`_UNSIGNED`):
    equal for the first page and every ``next`` link of one search, different for any other search."""
    kept = sorted((k, v) for k, v in pairs if k.partition(":")[0] not in _UNSIGNED)
    return res_type + "?" + "&".join(f"{len(k)}:{k}={len(v)}:{v}" for k, v in kept)


#: Search parameter types ``_sort`` can order by (each has one comparable index column, see fhir_search._sort_col).
SORTABLE_TYPES = ("string", "token", "date", "quantity", "reference")
#: Largest ``_offset`` (a signed 64-bit integer: the databases' LIMIT/OFFSET type).
MAX_OFFSET = 2**63 - 1


def version_number(text: str | None) -> int | None:
    """A ``_history/[vid]`` as an int, or None when it is not one a store can hold (not digits, or beyond
    a signed 64-bit integer): such a version is never known (404), instead of an overflow in the database."""
    if not text or not text.isdigit() or len(text) > 19:
        return None
    n = int(text)
    return n if n <= MAX_OFFSET else None


def _result_param(q: SearchQuery, name: str, modifier: str, value: str, default: int, maximum: int) -> None:
    if name == "_count":
        try:
            n = int(value)
        except ValueError:
            raise SearchError(name, f"{value!r} is not an integer") from None
        if n < 0:
            raise SearchError(name, "must be ≥ 0")
        q.count = min(n, maximum)
    elif name == "_offset":
        try:
            q.offset = max(0, int(value))
        except ValueError:
            raise SearchError(name, f"{value!r} is not an integer") from None
        if q.offset > MAX_OFFSET:
            raise SearchError(name, f"must be at most {MAX_OFFSET}")
    elif name == "_cursor":
        if not value or len(value) > 2048:
            raise SearchError(name, "is not a cursor this server issued (take the next link as given)")
        q.cursor = value
    elif name == "_sort":
        for part in value.split(","):
            part = part.strip()
            desc = part.startswith("-")
            pname = part[1:] if desc else part
            if pname not in ("_lastUpdated", "_id") and pname not in params_for(q.res_type):
                raise SearchError(name, f"cannot sort {q.res_type} by {pname!r}")
            if pname not in ("_lastUpdated", "_id") and params_for(q.res_type)[pname].type not in SORTABLE_TYPES:
                raise SearchError(
                    name,
                    f"cannot sort by {pname!r}: a {params_for(q.res_type)[pname].type} parameter "
                    f"(sortable: {', '.join(SORTABLE_TYPES)} parameters, _id, _lastUpdated)",
                )
            q.sort.append((pname, desc))
    elif name in ("_include", "_revinclude"):
        if modifier and modifier != "iterate":
            raise SearchError(name, f"modifier :{modifier} not supported")
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise SearchError(name, f"{value!r} is not SourceType:param[:TargetType]")
        src, pname = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        sp = params_for(src).get(pname)
        if sp is None or sp.type != "reference":
            raise SearchError(name, f"{src}:{pname} is not a reference search parameter")
        inc = Include(src, pname, target or sp.target)
        if name == "_include":
            if src != q.res_type:
                raise SearchError(name, f"source type {src} does not match the searched type {q.res_type}")
            q.includes.append(inc)
        else:
            q.revincludes.append(inc)
    elif name == "_summary":
        if value not in ("count", "false"):
            raise SearchError(name, f"only _summary=count and _summary=false are supported, not {value!r}")
        q.summary = value
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise SearchError(name, f"{value!r} is not none, estimate or accurate")
        q.total = value
    elif name == "_totalMethod":  # fhirpy's count() hint; accepted as _total=accurate
        q.total = "accurate"
    elif name in ("_format", "_pretty", "_elements"):
        return  # content negotiation handled by the handler; _elements ignored (documented)


def _clause(sp: SearchParam, modifier: str | None, raw: str) -> Clause:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise SearchError(f"{sp.name}:missing", "value must be true or false")
        return Clause(sp, modifier, (), raw == "true")
    allowed = {
        "token": {None, "not", "below", "above"},
        "string": {None, "exact", "contains"},
        "date": {None},
        "reference": {None},
        "quantity": {None},
    }[sp.type]
    if modifier not in allowed and not (sp.type == "reference" and modifier and modifier[:1].isupper()):  # type: ignore[operator]
        raise SearchError(f"{sp.name}:{modifier}", f"modifier not supported for {sp.type} parameters")
    values = tuple(_parse_value(sp, modifier, v) for v in _split_commas(raw))
    if not values:
        raise SearchError(sp.name, "empty value")
    return Clause(sp, modifier, values)


def _split_commas(raw: str) -> list[str]:
    parts, cur, esc = [], [], False
    for ch in raw:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p != ""]


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and not value[2:3].isalpha():
        return value[:2], value[2:]
    return "eq", value


_NUM = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")


def _parse_value(sp: SearchParam, modifier: str | None, value: str) -> Any:
    if sp.type == "token":
        if "|" in value:
            system, code = value.split("|", 1)
            return (system or None, code or None)
        return (ANY, value)
    if sp.type == "string":
        return value
    if sp.type == "date":
        prefix, text = _prefix(value)
        try:
            lo, hi = parse_range(text)
        except DateFormatError as exc:
            raise SearchError(sp.name, str(exc)) from None
        return (prefix, lo, hi)
    if sp.type == "reference":
        if "/" in value:
            rtype, _, rid = value.rstrip("/").rpartition("/")
            rtype = rtype.rpartition("/")[2]
            return (rtype, rid)
        target = modifier if modifier and modifier[:1].isupper() else sp.target
        return (target, value)
    if sp.type == "quantity":
        prefix, text = _prefix(value)
        number, _, rest = text.partition("|")
        system, _, code = rest.partition("|") if rest else ("", "", "")
        if not _NUM.match(number):
            raise SearchError(sp.name, f"{number!r} is not a number")
        try:
            d = Decimal(number)
        except InvalidOperation:
            raise SearchError(sp.name, f"{number!r} is not a number") from None
        exp = d.as_tuple().exponent
        half = Decimal(5).scaleb(exp - 1) if isinstance(exp, int) else Decimal(0)
        return (prefix, float(d), float(d - half), float(d + half), system or None, code or None)
    raise SearchError(sp.name, f"unsupported parameter type {sp.type}")  # pragma: no cover
