"""FHIR references (FHIR R4 §2.3.0 "Resource References"): parsing and rewriting (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_REL = re.compile(
    r"^(?:(?P<base>https?://.+?)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/(?P<vid>[A-Za-z0-9\-.]{1,64}))?$"
)
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True)
class Ref:
    type: str
    id: str
    version: str | None = None
    base: str | None = None


@lru_cache(maxsize=8192)
def parse_reference(text: str) -> Ref | None:
    """``Type/id[/_history/v]``, optionally absolute; None for contained (``#x``), urn: or other forms.
    (Remembered for recent texts: a patient's resources name the same few references over and over;
    ``Ref`` is immutable.)"""
    m = _REL.match(text)
    if not m:
        return None
    return Ref(m["type"], m["id"], m["vid"], m["base"])


def rewrite_references(node: Any, fn: Callable[[str], str | None]) -> Any:
    """Copy of ``node`` with every ``reference`` string passed through ``fn`` (None keeps it)."""
    if isinstance(node, list):
        return [rewrite_references(v, fn) for v in node]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                new = fn(v)
                out[k] = v if new is None else new
            else:
                out[k] = rewrite_references(v, fn)
        return out
    return node


def iter_references(node: Any) -> Iterator[str]:
    """Every ``reference`` string in a resource."""
    if isinstance(node, list):
        for v in node:
            yield from iter_references(v)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from iter_references(v)
