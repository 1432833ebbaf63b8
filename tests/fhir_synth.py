"""Valid FHIR resources of every type the ``fhir.resources`` R4B models build (issue #19 property test).

:func:`minimal` fills a type's required elements by repair: validate, and for each missing element put
a value of its declared type, until the model accepts it.  :func:`patient_paths` lists the reference
elements of a type (top level and one backbone level down) that may point at a Patient, so a test can link a
resource to a patient through each of them.
"""

from __future__ import annotations

import datetime
import decimal
import pkgutil
import random
import typing
from functools import lru_cache
from typing import Any

import fhir.resources.R4B as R4B
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

SKIP = {"Bundle", "Parameters", "Binary", "OperationOutcome", "DomainResource", "Resource", "Element",
        "BackboneElement", "FHIRPrimitiveExtension",
        "AuditEvent"}  # /fhir/AuditEvent is the audit trail (admin only), not stored resources


@lru_cache(maxsize=1)
def resource_types() -> tuple[str, ...]:
    """Every resource type (DomainResource subclass) of the R4B models."""
    from fhir.resources.R4B.domainresource import DomainResource

    out = []
    for mod in pkgutil.iter_modules(R4B.__path__):
        if mod.name.startswith("_") or mod.name in ("fhirtypes", "fhirtypesvalidators"):
            continue
        for name in dir(__import__(f"fhir.resources.R4B.{mod.name}", fromlist=["x"])):
            if name.lower() == mod.name:
                try:
                    cls = get_fhir_model_class(name)
                except Exception:
                    continue
                if isinstance(cls, type) and issubclass(cls, DomainResource) and name not in SKIP:
                    out.append(name)
    return tuple(sorted(set(out)))


def _inner(annotation) -> tuple[Any, bool, tuple]:
    """(the element's base type, whether it is a list, Annotated metadata)."""
    is_list = False
    meta: tuple = ()
    t = annotation
    for _ in range(6):
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            t = next(a for a in args if a is not type(None))
        elif origin in (list, typing.List):
            is_list, t = True, args[0]
        elif origin is typing.Annotated:
            meta = args[1:]
            t = args[0]
        else:
            break
    return t, is_list, meta


def _model_of(t) -> type | None:
    name = getattr(t, "__name__", "") or str(t)
    if name.endswith("Type") and name not in ("Type",):
        try:
            return get_fhir_model_class(name[:-4])
        except Exception:
            return None
    return None


def _value(field, extra: dict) -> Any:
    t, is_list, meta = _inner(field.annotation)
    model = _model_of(t)
    metaname = " ".join(type(m).__name__ for m in meta)
    if model is not None:
        name = model.__name__
        if name == "Reference":
            v: Any = {"reference": "Organization/org-1"}
        elif name == "CodeableConcept":
            v = {"text": "x"}
        elif name == "Coding":
            v = {"system": "urn:x", "code": "x"}
        elif name == "Identifier":
            v = {"system": "urn:x", "value": "x"}
        elif name == "Period":
            v = {"start": "2024-01-01"}
        elif name in ("Quantity", "Duration", "Age", "Distance", "Count", "SimpleQuantity", "Money"):
            v = {"value": 1}
        elif name == "Attachment":
            v = {"contentType": "text/plain"}
        elif name == "Extension":
            v = {"url": "urn:x", "valueString": "x"}
        elif name == "Narrative":
            v = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}
        else:
            v = {}
    elif extra.get("enum_values"):
        v = extra["enum_values"][0]
    elif t is bool:
        v = True
    elif t in (int,) or "Integer" in metaname or "UnsignedInt" in metaname or "PositiveInt" in metaname:
        v = 1
    elif t in (float, decimal.Decimal) or "Decimal" in metaname:
        v = 1
    elif t is datetime.date or "Date" == metaname:
        v = "2024-01-01"
    elif t is datetime.datetime or "Instant" in metaname or "DateTime" in metaname:
        v = "2024-01-01T00:00:00Z"
    elif t is datetime.time or "Time" in metaname:
        v = "10:00:00"
    elif "Base64" in metaname:
        v = "eA=="
    elif "Uri" in metaname or "Url" in metaname or "Canonical" in metaname or "Oid" in metaname:
        v = "urn:oid:1.2.3"
    elif "Id" in metaname:
        v = "x1"
    else:
        v = "x"
    return [v] if is_list else v


def _model_at(cls: type, path: tuple) -> type | None:
    for step in path:
        if isinstance(step, int):
            continue
        f = cls.model_fields.get(step) or next((x for n, x in cls.model_fields.items() if x.alias == step), None)
        if f is None:
            return None
        cls = _model_of(_inner(f.annotation)[0])
        if cls is None:
            return None
    return cls


def _set(doc: Any, path: tuple, value: Any) -> None:
    node = doc
    for step in path[:-1]:
        if isinstance(step, int):
            while len(node) <= step:
                node.append({})
            node = node[step]
        else:
            node = node.setdefault(step, {})
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append({})
        node[last] = value
    else:
        node[last] = value


def _field(cls: type, name: str):
    return cls.model_fields.get(name) or next((x for n, x in cls.model_fields.items() if x.alias == name), None)


_FILLER = {"extension": [{"url": "urn:x", "valueString": "x"}]}


def _no_empty(node: Any) -> Any:
    """FHIR JSON omits empty elements (the gateway rejects them): an empty object gets an extension."""
    if isinstance(node, dict):
        return {k: _no_empty(v) for k, v in node.items()} if node else dict(_FILLER)
    if isinstance(node, list):
        return [_no_empty(v) for v in node]
    return node


def minimal(rtype: str, rid: str) -> dict[str, Any] | None:
    """A valid ``rtype`` resource with id ``rid``, or None when repair does not converge."""
    cls = get_fhir_model_class(rtype)
    doc: dict[str, Any] = {"resourceType": rtype, "id": rid}
    for _ in range(25):
        try:
            cls.model_validate(_no_empty(doc))
            return _no_empty(doc)
        except ValidationError as exc:
            errors = exc.errors()
        progressed = False
        for err in errors:
            loc = tuple(err["loc"])
            msg = err.get("msg", "")
            if "required" not in msg and err["type"] not in ("missing",):
                # a choice element required: "one of ... value[x]"
                if "one of" in msg.lower() or "choice" in msg.lower():
                    pass
                else:
                    continue
            owner = _model_at(cls, loc[:-1]) if loc else cls
            name = loc[-1] if loc else None
            if owner is None or name is None or isinstance(name, int):
                continue
            f = _field(owner, name)
            if f is None:
                # a choice type: pick its first variant
                variants = [(n, x) for n, x in owner.model_fields.items()
                            if (x.json_schema_extra or {}).get("one_of_many") == name]
                if not variants:
                    continue
                n, f = variants[0]
                _set(doc, loc[:-1] + (f.alias or n,), _value(f, f.json_schema_extra or {}))
                progressed = True
                continue
            _set(doc, loc, _value(f, f.json_schema_extra or {}))
            progressed = True
        if not progressed:
            # choice elements required by a validator (e.g. Observation.value[x] is not): find "one_of_many_required"
            for n, x in cls.model_fields.items():
                extra = x.json_schema_extra or {}
                if extra.get("one_of_many_required") and not any(
                        (y.json_schema_extra or {}).get("one_of_many") == extra["one_of_many"] and (y.alias or k) in doc
                        for k, y in cls.model_fields.items()):
                    doc[x.alias or n] = _value(x, extra)
                    progressed = True
            if not progressed:
                return None
    return None


def patient_paths(rtype: str) -> list[tuple[str, ...]]:
    """Reference elements of ``rtype`` that may point at a Patient (top level and one backbone level)."""
    cls = get_fhir_model_class(rtype)
    out: list[tuple[str, ...]] = []

    def refs(model: type, prefix: tuple[str, ...], depth: int) -> None:
        for n, f in model.model_fields.items():
            name = f.alias or n
            if name in ("contained", "extension", "modifierExtension", "meta", "text"):
                continue
            extra = f.json_schema_extra or {}
            t, _, _ = _inner(f.annotation)
            sub = _model_of(t)
            if sub is None:
                continue
            if sub.__name__ == "Reference":
                targets = extra.get("enum_reference_types") or []
                if "Patient" in targets or "Resource" in targets:
                    out.append(prefix + (name,))
            elif depth < 1 and sub.__name__ not in ("Extension", "Identifier", "CodeableConcept", "Coding"):
                from fhir.resources.R4B.backboneelement import BackboneElement

                if issubclass(sub, BackboneElement):
                    refs(sub, prefix + (name,), depth + 1)

    refs(cls, (), 0)
    return out


def with_reference(base: dict[str, Any], path: tuple[str, ...], ref: dict) -> dict[str, Any] | None:
    """``base`` with ``ref`` at ``path`` (lists get one element); None if the result does not validate."""
    import copy

    cls = get_fhir_model_class(base["resourceType"])
    doc = copy.deepcopy(base)
    node: Any = doc
    model = cls
    for i, step in enumerate(path):
        f = _field(model, step)
        t, is_list, _ = _inner(f.annotation)
        last = i == len(path) - 1
        if last:
            value: Any = ref
        else:
            existing = node.get(step)
            value = (existing[0] if is_list and existing else existing) or {}
            sub = _model_of(t)
            # fill the backbone's required elements
            if sub is not None and not value:
                try:
                    sub.model_validate({})
                except ValidationError as exc:
                    for err in exc.errors():
                        loc = tuple(err["loc"])
                        if len(loc) == 1 and _field(sub, loc[0]) is not None:
                            g = _field(sub, loc[0])
                            value[loc[0]] = _value(g, g.json_schema_extra or {})
            model = sub
        if is_list:
            lst = node.get(step) or [{}]
            lst[0] = value
            node[step] = lst
        else:
            node[step] = value
        node = value
    doc = _no_empty(doc)
    try:
        cls.model_validate(doc)
    except ValidationError:
        return None
    return doc


def sample(rng: random.Random, items: list, k: int) -> list:
    return items if len(items) <= k else rng.sample(items, k)
