"""The cohort definition language: JSON → a validated, immutable criterion tree.

A cohort is one *criterion*; a criterion is a JSON object with exactly one key naming its kind:

* boolean: ``{"all": [c, ...]}``, ``{"any": [c, ...]}``, ``{"not": c}``;
* demographics: ``{"sex": "female"}`` (or a list), ``{"age": {"min": 40, "max": 80, "at": "2024-01-01"}}``
  (``"at": "study"`` = age at an imaging study), ``{"birth_year": {"min": 1950, "max": 1979}}``;
* clinical events: ``{"condition": {...}}``, ``{"procedure": {...}}``, ``{"observation": {...}}`` with
  ``code`` (``"system|code"`` or a list of them), ``descendants`` (expand through the loaded hierarchy),
  ``date`` (``{"from": "2015-01-01", "to": "2020-12-31"}``), ``within`` (a time window relative to another
  criterion's events: ``{"of": "<id>|imaging", "min_days": -365, "max_days": 0}``); observations also take
  ``value`` (``{"min": .., "max": ..}``), ``unit`` and ``value_code``;
* imaging (one series and its study): ``{"imaging": {"modality": "MR", "body_part": "HEART",
  "manufacturer": "Siemens", "model": "Aera", "protocol": "cine*", "series_description": "*sax*",
  "study_description": "...", "study_date": {"from": .., "to": ..}, "slice_thickness": {"min": .., "max": ..}}}``;
* segmentations: ``{"seg": {"segments": [{"label": "Left ventricle"}, {"type": "SCT|53085002"}]}}`` — every
  listed segment in the *same* SEG instance;
* structured reports: ``{"sr": {"same": "group", "items": [{"concept": "DCM:126401", "path": "*/SCT:...",
  "value": {"min": 50}, "unit": "%", "code": "SCT|..."}]}}`` — every item in the same SR instance
  (``same: "instance"``, default) or the same TID 1501 measurement group (``same: "group"``).

Any criterion may carry an ``id`` so that another criterion's ``within`` can refer to its events.
Text matches are case-insensitive; ``*`` is a wildcard.  Errors name the offending field as a JSON path
(``$.all[2].observation.value.min``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: (system or None, code) → the codes to match (the code itself and its descendants).  Without one, the
#: cohort compiler (``gateway.store.cohort``) reads the vocabulary store's active is-a closure.
Expander = Callable[[str | None, str], Iterable[str]]


class CohortError(ValueError):
    """A cohort definition is invalid; ``field`` is the JSON path of the offending value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_date(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        _dt.date.fromisoformat(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a date (YYYY-MM-DD)") from None
    return v


def _split_code(v: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("a code is 'system|code' or 'code'")
    return v.strip()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class DateRange(_Model):
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None

    _v = field_validator("from_", "to")(classmethod(lambda cls, v: _check_date(v)))

    @model_validator(mode="after")
    def _order(self) -> DateRange:
        if self.from_ is None and self.to is None:
            raise ValueError("give from and/or to")
        if self.from_ and self.to and self.from_ > self.to:
            raise ValueError("from is after to")
        return self


class Within(_Model):
    #: id of another criterion (its events are the anchor) or "imaging" (any imaging study of the patient)
    of: str
    min_days: int | None = None
    max_days: int | None = None

    @model_validator(mode="after")
    def _order(self) -> Within:
        if self.min_days is None and self.max_days is None:
            raise ValueError("give min_days and/or max_days")
        if self.min_days is not None and self.max_days is not None and self.min_days > self.max_days:
            raise ValueError("min_days is greater than max_days")
        return self


class Age(_Model):
    min: int | None = Field(default=None, ge=0, le=150)
    max: int | None = Field(default=None, ge=0, le=150)
    #: "YYYY-MM-DD" or "study" (age at any imaging study); default: today
    at: str | None = None

    @field_validator("at")
    @classmethod
    def _at(cls, v: str | None) -> str | None:
        return v if v in (None, "study") else _check_date(v)

    @model_validator(mode="after")
    def _order(self) -> Age:
        if self.min is None and self.max is None:
            raise ValueError("give min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class BirthYear(_Model):
    min: int | None = Field(default=None, ge=1800, le=2200)
    max: int | None = Field(default=None, ge=1800, le=2200)

    @model_validator(mode="after")
    def _order(self) -> BirthYear:
        if self.min is None and self.max is None:
            raise ValueError("give min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class _Event(_Model):
    code: list[str] | None = None
    descendants: bool = False
    date: DateRange | None = None
    within: Within | None = None

    @field_validator("code", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("empty code list")
            return [_split_code(x) for x in v]
        return v


class Condition(_Event):
    clinical_status: str | None = None


class Procedure(_Event):
    pass


class Observation(_Event):
    value: Range | None = None
    unit: str | None = None
    value_code: list[str] | None = None

    @field_validator("value_code", mode="before")
    @classmethod
    def _vcodes(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Imaging(_Model):
    modality: list[str] | None = None
    body_part: list[str] | None = None
    manufacturer: str | None = None
    model: str | None = None
    protocol: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    study_date: DateRange | None = None
    slice_thickness: Range | None = None
    within: Within | None = None

    @field_validator("modality", "body_part", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Segment(_Model):
    label: str | None = None
    #: segmented property type "scheme|code" (e.g. "SCT|10200004")
    type: str | None = None
    #: segmented property category "scheme|code"
    category: str | None = None
    algorithm_type: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] | None = None

    @model_validator(mode="after")
    def _some(self) -> Segment:
        if not (self.label or self.type or self.category or self.algorithm_type):
            raise ValueError("give label, type, category or algorithm_type")
        return self


class Seg(_Model):
    segments: list[Segment] = Field(min_length=1)


class SrItem(_Model):
    #: concept name "scheme:code" of the content item
    concept: str | None = None
    #: concept path from the root, "scheme:code/scheme:code/..." with * wildcards
    path: str | None = None
    value: Range | None = None
    unit: str | None = None
    #: coded value "scheme|code"
    code: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _some(self) -> SrItem:
        if not (self.concept or self.path):
            raise ValueError("give concept or path")
        return self


class Sr(_Model):
    items: list[SrItem] = Field(min_length=1)
    same: Literal["instance", "group"] = "instance"


# ------------------------------------------------------------------------------------------------
# The criterion tree
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    kind: str  # all | any | not | sex | age | birth_year | condition | procedure | observation | imaging | seg | sr
    body: Any  # tuple[Node, ...] for all/any, Node for not, tuple[str,...] for sex, a model otherwise
    path: str
    id: str | None = None


LEAVES: dict[str, type[_Model]] = {
    "age": Age,
    "birth_year": BirthYear,
    "condition": Condition,
    "procedure": Procedure,
    "observation": Observation,
    "imaging": Imaging,
    "seg": Seg,
    "sr": Sr,
}
KINDS = ("all", "any", "not", "sex", *LEAVES)
SEXES = ("female", "male", "other", "unknown")


def _loc(path: str, loc: tuple[Any, ...]) -> str:
    out = path
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "from_":
            out += ".from"
        else:
            out += f".{part}"
    return out


#: Bounds of a cohort definition: nesting of all/any/not, and criteria in all.  Deeper or larger definitions
#: are refused (400) before anything recurses over them or compiles them to SQL (a 900-deep ``not`` chain
#: overflowed Python's stack, 5,000 ``any`` leaves SQLite's expression limits).
MAX_DEPTH = 32
MAX_CRITERIA = 1000


def _check_size(doc: Any, path: str) -> None:
    """Iteratively (no recursion) check MAX_DEPTH and MAX_CRITERIA over the raw JSON."""
    stack = [(doc, path, 1)]
    n = 0
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        n += 1
        if n > MAX_CRITERIA:
            raise CohortError(path, f"a cohort definition has at most {MAX_CRITERIA} criteria")
        if depth > MAX_DEPTH:
            raise CohortError(where, f"criteria nest at most {MAX_DEPTH} deep (all/any/not)")
        for kind in ("all", "any"):
            if isinstance(node.get(kind), list):
                if len(node[kind]) > MAX_CRITERIA:
                    raise CohortError(f"{where}.{kind}", f"a cohort definition has at most {MAX_CRITERIA} criteria")
                stack.extend((c, f"{where}.{kind}[{i}]", depth + 1) for i, c in enumerate(node[kind]))
        if "not" in node:
            stack.append((node["not"], f"{where}.not", depth + 1))


def parse(doc: Any, path: str = "$") -> Node:
    """Validate a cohort definition (parsed JSON) into a :class:`Node` tree; raises :class:`CohortError`."""
    _check_size(doc, path)
    ids: dict[str, str] = {}
    node = _parse(doc, path, ids)
    _check_refs(node, ids)
    return node


def _parse(doc: Any, path: str, ids: dict[str, str]) -> Node:
    if not isinstance(doc, dict):
        raise CohortError(path, "a criterion is a JSON object with one of " + ", ".join(KINDS))
    cid = doc.get("id")
    if cid is not None:
        if not isinstance(cid, str) or not cid or cid == "imaging":
            raise CohortError(path + ".id", "must be a non-empty string other than 'imaging'")
        if cid in ids:
            raise CohortError(path + ".id", f"duplicate id {cid!r} (first at {ids[cid]})")
        ids[cid] = path
    keys = [k for k in doc if k != "id"]
    unknown = [k for k in keys if k not in KINDS]
    if unknown:
        raise CohortError(f"{path}.{unknown[0]}", "unknown criterion; expected one of " + ", ".join(KINDS))
    if len(keys) != 1:
        raise CohortError(
            path, "a criterion has exactly one of " + ", ".join(KINDS) + f" (got {sorted(keys) or 'none'})"
        )
    kind = keys[0]
    body = doc[kind]
    sub = f"{path}.{kind}"
    if kind in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise CohortError(sub, "must be a non-empty list of criteria")
        return Node(kind, tuple(_parse(c, f"{sub}[{i}]", ids) for i, c in enumerate(body)), path, cid)
    if kind == "not":
        return Node(kind, _parse(body, sub, ids), path, cid)
    if kind == "sex":
        values = [body] if isinstance(body, str) else body
        if not isinstance(values, list) or not values or any(v not in SEXES for v in values):
            raise CohortError(sub, "must be one of (or a list of) " + ", ".join(SEXES))
        return Node(kind, tuple(values), path, cid)
    model = LEAVES[kind]
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CohortError(_loc(sub, err["loc"]), err["msg"].removeprefix("Value error, ")) from None
    return Node(kind, parsed, path, cid)


def _check_refs(node: Node, ids: dict[str, str]) -> None:
    if node.kind in ("all", "any"):
        for c in node.body:
            _check_refs(c, ids)
    elif node.kind == "not":
        _check_refs(node.body, ids)
    else:
        within = getattr(node.body, "within", None)
        if within is not None and within.of != "imaging" and within.of not in ids:
            raise CohortError(f"{node.path}.{node.kind}.within.of", f"no criterion with id {within.of!r}")
        if within is not None and within.of == node.id:
            raise CohortError(f"{node.path}.{node.kind}.within.of", "a criterion cannot be relative to itself")


def find(node: Node, cid: str) -> Node | None:
    if node.id == cid:
        return node
    if node.kind in ("all", "any"):
        for c in node.body:
            hit = find(c, cid)
            if hit is not None:
                return hit
    elif node.kind == "not":
        return find(node.body, cid)
    return None


Criterion = Node
__all__ = ["CohortError", "Expander", "Node", "parse", "find", "KINDS", "SEXES"]
