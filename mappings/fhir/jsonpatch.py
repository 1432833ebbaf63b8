"""JSON Patch (RFC 6902) with JSON Pointer (RFC 6901) for FHIR PATCH (FHIR R4 §3.1.0.6) (pure).

:func:`apply_patch` returns a patched deep copy; a malformed document or a path that does not resolve raises
:class:`PatchError` (``kind="invalid"``, → 400); a failed ``test`` operation raises it with ``kind="test"``
(→ 422).
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    def __init__(self, message: str, kind: str = "invalid", index: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.index = index


def _tokens(pointer: Any, index: int) -> list[str]:
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        raise PatchError(f"operation {index}: path {pointer!r} is not a JSON Pointer", index=index)
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]] if pointer else []


def _array_index(arr: list[Any], token: str, index: int, *, adding: bool) -> int:
    if adding and token == "-":
        return len(arr)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"operation {index}: {token!r} is not an array index", index=index)
    i = int(token)
    if i > len(arr) or (i == len(arr) and not adding):
        raise PatchError(f"operation {index}: array index {i} is out of range", index=index)
    return i


def _parent(doc: Any, tokens: list[str], index: int) -> Any:
    node = doc
    for t in tokens[:-1]:
        if isinstance(node, dict) and t in node:
            node = node[t]
        elif isinstance(node, list):
            node = node[_array_index(node, t, index, adding=False)]
        else:
            raise PatchError(f"operation {index}: path element {t!r} does not exist", index=index)
    return node


def _get(doc: Any, tokens: list[str], index: int) -> Any:
    if not tokens:
        return doc
    parent = _parent(doc, tokens, index)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list):
        return parent[_array_index(parent, last, index, adding=False)]
    raise PatchError(f"operation {index}: path element {last!r} does not exist", index=index)


def _remove(doc: Any, tokens: list[str], index: int) -> Any:
    if not tokens:
        raise PatchError(f"operation {index}: cannot remove the whole resource", index=index)
    parent = _parent(doc, tokens, index)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_array_index(parent, last, index, adding=False))
    raise PatchError(f"operation {index}: path element {last!r} does not exist", index=index)


def _add(doc: Any, tokens: list[str], value: Any, index: int, *, replace: bool = False) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens, index)
    last = tokens[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"operation {index}: path element {last!r} does not exist", index=index)
        parent[last] = value
    elif isinstance(parent, list):
        i = _array_index(parent, last, index, adding=not replace)
        if replace:
            parent[i] = value
        else:
            parent.insert(i, value)
    else:
        raise PatchError(f"operation {index}: cannot add below a {type(parent).__name__}", index=index)
    return doc


def _same(a: Any, b: Any) -> bool:
    """JSON equality (RFC 6902 §4.6): a boolean is not a number, 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def apply_patch(doc: dict[str, Any], ops: Any) -> dict[str, Any]:
    if not isinstance(ops, list):
        raise PatchError("a JSON Patch document is an array of operations")
    doc = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"operation {i}: an object with an 'op' member expected", index=i)
        name = op["op"]
        path = _tokens(op.get("path"), i)
        if name in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {i}: {name} needs a 'value'", index=i)
        if name == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]), i)
        elif name == "remove":
            _remove(doc, path, i)
        elif name == "replace":
            doc = _add(doc, path, copy.deepcopy(op["value"]), i, replace=True)
        elif name in ("move", "copy"):
            src = _tokens(op.get("from"), i)
            if name == "move" and path[: len(src)] == src and len(path) > len(src):
                raise PatchError(f"operation {i}: cannot move a value into itself", index=i)
            value = _remove(doc, src, i) if name == "move" else copy.deepcopy(_get(doc, src, i))
            doc = _add(doc, path, value, i)
        elif name == "test":
            if not _same(_get(doc, path, i), op["value"]):
                raise PatchError(f"operation {i}: test of {op['path']!r} failed", kind="test", index=i)
        else:
            raise PatchError(f"operation {i}: unknown op {name!r}", index=i)
        if not isinstance(doc, dict):
            raise PatchError(f"operation {i}: the result is not a resource", index=i)
    return doc
