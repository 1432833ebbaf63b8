"""The FHIR R4 JSON representation rules the R4B models do not enforce (pure).

FHIR R4 §2.6.2 (json.html) and §2.24.0.1 (datatypes.html, "string"):

* no empty values: ``""``, ``{}`` and ``[]`` are not allowed anywhere ("elements that have no value ...
  SHALL be omitted");
* ``null`` only inside an array of a primitive whose ``_name`` array carries the id/extensions at that
  position (``"given": ["A", null], "_given": [null, {"extension": [...]}]``), and there only where the
  other array has something;
* strings SHALL NOT contain characters below U+0020 other than TAB, CR and LF (so NUL is refused: the
  same refusal on SQLite and PostgreSQL, which cannot store U+0000 in text);
* each value has the JSON type of its element (:mod:`mappings.fhir.jsontypes`): numbers for integer and
  decimal, ``true``/``false`` for boolean, strings for the other primitives (the models would take ``"5"``
  for a decimal and ``"true"`` for a boolean);
* a string SHALL NOT exceed 1 MiB (1,048,576 characters); base64Binary (``Attachment.data``,
  ``Binary.data``) is bounded by the request size limit instead. ``language`` (a BCP-47 tag, ``code``)
  and the ids of the Element/Resource id datatypes are kept to the lengths their rules allow.

:func:`json_issues` returns at most ``limit`` issues, each naming the element path.
"""

from __future__ import annotations

import re
from typing import Any

from mappings.fhir.jsontypes import RESOURCE, field_kinds, type_problem
from mappings.fhir.validate import Issue, model_class

#: FHIR R4 datatypes.html: "strings SHALL NOT exceed 1MB (1024*1024 characters) in size".
MAX_STRING = 1024 * 1024
#: elements whose values are short by definition (characters)
SHORT = {
    "language": 64,  # BCP-47 tag (code); real tags are < 40 characters
    "versionId": 64,  # id datatype
}
#: base64Binary elements: bounded by the request body limit, not by MAX_STRING
BASE64 = frozenset({"data"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_NAMES = {0: "NUL"}


def _control_name(s: str) -> str:
    m = _CONTROL.search(s)
    code = ord(m.group(0)) if m else 0
    return _NAMES.get(code, f"U+{code:04X}")


def json_issues(resource: Any, root: str, limit: int = 20) -> list[Issue]:
    """Problems of ``resource`` (a parsed JSON object) against the R4 JSON rules; [] when it follows them."""
    issues: list[Issue] = []

    def add(path: str, msg: str) -> bool:
        issues.append(Issue(path, msg))
        return len(issues) >= limit

    def check_str(path: str, key: str, value: str) -> bool:
        if value == "":
            return add(path, "empty string (FHIR R4 JSON: an element without a value SHALL be omitted)")
        if _CONTROL.search(value):
            return add(
                path,
                f"contains the control character {_control_name(value)} (FHIR R4: strings SHALL NOT"
                " contain characters below U+0020 other than tab, CR and LF)",
            )
        cap = SHORT.get(key, None if key in BASE64 else MAX_STRING)
        if cap is not None and len(value) > cap:
            return add(path, f"value of {len(value):,} characters exceeds the limit of {cap:,}")
        return False

    # iterative walk (no recursion limit): (path, element name, value, kind of the element: a primitive
    # kind, a model class, RESOURCE, or None where the model does not know the name)
    stack: list[tuple[str, str, Any, Any]] = [(root, "", resource, model_class(root))]
    while stack:
        path, key, value, kind = stack.pop()
        if isinstance(value, dict):
            if not value:
                if add(path, "empty object (FHIR R4 JSON: an element without content SHALL be omitted)"):
                    break
                continue
            if kind == RESOURCE:
                rtype = value.get("resourceType")
                kind = model_class(rtype) if isinstance(rtype, str) else None
            fields = field_kinds(kind) if kind is not None and not isinstance(kind, str) else _NO_FIELDS
            for k, v in value.items():
                if _CONTROL.search(k) and add(
                    f"{path}", f"element name contains the control character {_control_name(k)}"
                ):
                    return issues
                sub = f"{path}.{k}"
                if v is None:
                    if add(sub, "null (FHIR R4 JSON: an element without a value SHALL be omitted)"):
                        return issues
                    continue
                sub_kind = fields.get(k)
                if isinstance(v, list) and v:
                    twin = value.get(k[1:] if k.startswith("_") else "_" + k)
                    twin = twin if isinstance(twin, list) else None
                    if all(x is None for x in v):
                        if add(sub, "array of only nulls"):
                            return issues
                        continue
                    for i, item in enumerate(v):
                        if item is None:
                            if twin is None or len(twin) != len(v) or twin[i] is None:
                                if add(
                                    f"{sub}[{i}]",
                                    "null in an array is only allowed where the matching "
                                    f"{'_' + k if not k.startswith('_') else k[1:]} entry "
                                    "has a value",
                                ):
                                    return issues
                            continue
                        stack.append((f"{sub}[{i}]", k, item, sub_kind))
                    continue
                stack.append((sub, k, v, sub_kind))
        elif isinstance(value, list):
            if not value:
                if add(path, "empty array (FHIR R4 JSON: an element without a value SHALL be omitted)"):
                    break
                continue
            for i, item in enumerate(value):  # a list inside a list is not FHIR; the model reports it
                stack.append((f"{path}[{i}]", key, item, None))
        else:
            if kind.__class__ is str:
                problem = type_problem(kind, value)
                if problem and add(path, problem):
                    break
            if isinstance(value, str) and check_str(path, key, value):
                break
    return issues


_NO_FIELDS: dict[str, Any] = {}
