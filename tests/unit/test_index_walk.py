"""``mappings.fhir.index.walk`` (rewritten for ingest speed, issue 27) yields what the nested-generator
version it replaced yielded, in the same order, for every search parameter path of a generated population
and of hand-made choice / list / null cases; ``extract`` of the population is then unchanged too."""

from __future__ import annotations

from typing import Any, Iterator

from mappings.fhir.index import walk
from mappings.fhir.references import parse_reference
from mappings.fhir.searchparams import COMMON_PARAMS, params_for
from tests.fhir_population import patient_resources


def _walk_before(node: Any, path: str) -> Iterator[Any]:
    """The implementation before issue 27 (copied verbatim): the reference."""
    parts = path.split(".")

    def rec(value: Any, i: int) -> Iterator[Any]:
        if isinstance(value, list):
            for item in value:
                yield from rec(item, i)
            return
        if i == len(parts):
            if value is not None:
                yield value
            return
        if not isinstance(value, dict):
            return
        key = parts[i]
        if key.endswith("[x]"):
            stem = key[:-3]
            for k, v in value.items():
                if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper():
                    yield from rec(v, i + 1)
        elif key in value:
            yield from rec(value[key], i + 1)

    yield from rec(node, 0)


ODD = [
    {"resourceType": "Observation", "valueQuantity": {"value": 1}, "valueString": "x", "value": 3, "valuex": 4,
     "component": [{"code": {"coding": [{"code": "a"}, None, {"code": "b"}]}, "valueInteger": 0},
                   None, [], {"code": None}, {"valueBoolean": False}],
     "effectivePeriod": {"start": "2020"}, "code": [[{"coding": [{"code": "n"}]}]], "subject": None},
    {"resourceType": "Patient", "name": [{"given": ["A", None, "B"], "family": ""}, {}], "identifier": []},
]


def test_walk_same_values_in_same_order() -> None:
    resources = [r for i in range(60) for r in patient_resources(i)] + ODD
    paths = {p for rt in {r["resourceType"] for r in resources} for sp in dict(params_for(rt)).values()
             for p in sp.paths} | set(COMMON_PARAMS["_tag"].paths)
    paths |= {"component.code.coding.code", "component.value[x]", "value[x]", "name.given", "code.coding",
              "effective[x].start", "subject.reference", "nothing.here"}
    checked = 0
    for res in resources:
        for path in sorted(paths):
            got, want = list(walk(res, path)), list(_walk_before(res, path))
            assert got == want, (res.get("id"), path)
            assert all(a is b for a, b in zip(got, want))  # the very objects, not copies
            checked += bool(want)
    assert checked > 1000


def test_parse_reference_remembered_is_the_same_answer() -> None:
    for text in ["Patient/p1", "Patient/p1", "http://x.org/fhir/Observation/o.1/_history/2", "#c1", "urn:uuid:1",
                 "Patient/", "patient/p1", "Patient/p1"]:
        ref = parse_reference(text)
        again = parse_reference(text)
        assert ref == again
    assert parse_reference("Patient/p1").id == "p1"
    assert parse_reference("http://x.org/fhir/Observation/o.1/_history/2").version == "2"
    assert parse_reference("#c1") is None
