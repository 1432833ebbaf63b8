"""FHIR mutation fuzzing (issue 20): seeded mutants of valid resources, sent to a running gateway.

Used by tests/integration/test_fhir_fuzz.py (a short seeded run per engine) and bench/fhir_fuzz.py (a
larger run against ``fedgate serve``). Every mutant is one request (create, update or a transaction of
two entries); the rule checked: never a 5xx; a refusal (4xx) is an OperationOutcome and leaves the store
as it was (every resource count and the total history length unchanged); an acceptance is a 200/201
whose body is FHIR JSON.

Mutations: type swaps (string ↔ number/bool/object/array/null), R4 JSON type mistakes (a number or
boolean written as a string, a string as a number: the models coerce them, the gateway must refuse them,
so such a mutant's acceptance is a failure too), deep nesting, unicode (astral, combining,
RTL, lone surrogates, control characters, noncharacters), sizes (long strings, long arrays, huge numbers),
removed or duplicated keys, wrong resourceType/id, and raw-text damage (truncation, byte flips,
duplicate keys, trailing garbage).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from typing import Any

SEEDS: list[dict] = [
    {"resourceType": "Patient", "identifier": [{"system": "urn:fuzz:mrn", "value": "F-1"}], "active": True,
     "name": [{"family": "Fuzz", "given": ["Ada", "B"]}], "gender": "female", "birthDate": "1970-02-03",
     "telecom": [{"system": "phone", "value": "+44 20 7946 0000", "use": "home"}],
     "address": [{"line": ["1 Main St"], "city": "Leeds", "postalCode": "LS1", "country": "GB"}]},
    {"resourceType": "Observation", "status": "final",
     "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                               "code": "vital-signs"}]}],
     "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
     "subject": {"reference": "Patient/fuzz-p"}, "effectiveDateTime": "2024-01-15T10:00:00Z",
     "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
    {"resourceType": "Condition",
     "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                    "code": "active"}]},
     "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73211009"}], "text": "Diabetes"},
     "subject": {"reference": "Patient/fuzz-p"}, "onsetDateTime": "2019-05-01"},
    {"resourceType": "Consent", "status": "active",
     "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
     "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
     "patient": {"reference": "Patient/fuzz-p"}, "dateTime": "2024-01-01",
     "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
     "provision": {"type": "permit", "code": [{"coding": [{"system": "http://purl.obolibrary.org/obo/duo.owl",
                                                           "code": "DUO:0000042"}]}]}},
    {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
     "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                               "code": "860975"}]},
     "subject": {"reference": "Patient/fuzz-p"}, "authoredOn": "2024-02-01",
     "dosageInstruction": [{"text": "1 tablet daily", "timing": {"repeat": {"frequency": 1, "period": 1,
                                                                           "periodUnit": "d"}}}]},
]

UNICODE = ["\U0001F600", "e\u0301", "\u202eevil", "\ud800", "\udfff", "\ufffe", "\uffff", "\x00", "\x07",
           "\u2028", "\u00a0", "Ω≈ç√", "\U0010FFFF", " ", "\t", "日本語", "\\", '"', "{}", "%00", "../"]


@dataclass
class Mutant:
    kind: str           # mutation name
    method: str         # POST / PUT / TXN
    res_type: str       # resource type in the URL
    body: bytes         # what is sent
    must_refuse: bool = False  # a mutant the gateway must answer with a 4xx


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _nest_text(inner: str, depth: int, rng: random.Random) -> str:
    kinds = [rng.random() < 0.5 for _ in range(depth)]
    return "".join('{"x": ' if k else "[" for k in kinds) + inner + "".join("}" if k else "]" for k in reversed(kinds))


def _other_type(value: Any, rng: random.Random) -> Any:
    choices = ["s", 1, -1, 0, 1.5, 1e308, 2**63, True, False, None, {}, [], {"a": 1}, ["s"], [None], ""]
    while True:
        v = rng.choice(choices)
        if type(v) is not type(value) or v != value:
            return copy.deepcopy(v)


def mutate(rng: random.Random) -> Mutant:
    """One seeded mutant."""
    seed = copy.deepcopy(rng.choice(SEEDS))
    rtype = seed["resourceType"]
    leafs = [p for p in _paths(seed) if p and p != ("resourceType",)]
    path = rng.choice(leafs)
    kind = rng.choice(["type", "type", "nest", "unicode", "unicode", "size", "remove", "add", "envelope",
                       "raw", "raw", "array", "json-type"])
    raw: bytes | None = None
    nest_text: str | None = None
    must_refuse = False
    if kind == "json-type":  # "72" for 72, "true" for true; 42 for a string
        scalars = [p for p in leafs if isinstance(_get(seed, p), (bool, int, float, str))]
        typed = [p for p in scalars if not isinstance(_get(seed, p), str)]
        path = rng.choice(typed if typed and rng.random() < 0.7 else scalars)
        cur = _get(seed, path)
        _set(seed, path, json.dumps(cur) if not isinstance(cur, str) else rng.choice([42, 1.5, True]))
        must_refuse = True
    elif kind == "type":
        _set(seed, path, _other_type(_get(seed, path), rng))
    elif kind == "nest":  # spliced in as text: deeper than json.dumps recurses
        depth = rng.choice([2, 10, 50, 200, 1000, 5000])
        nest_text = _nest_text(json.dumps(_get(seed, path)), depth, rng)
        _set(seed, path, "__FUZZ_NEST__")
    elif kind == "unicode":
        cur = _get(seed, path)
        s = cur if isinstance(cur, str) else "v"
        pos = rng.randint(0, len(s))
        _set(seed, path, s[:pos] + rng.choice(UNICODE) * rng.choice([1, 3, 100]) + s[pos:])
    elif kind == "size":
        what = rng.choice(["str", "num", "key"])
        if what == "str":
            _set(seed, path, "x" * rng.choice([65, 1000, 70_000, 1_100_000]))
        elif what == "num":
            _set(seed, path, rng.choice([10**30, -(10**30), 1e300, 123456789.123456789123, 2**31, -(2**31) - 1]))
        else:
            target = _get(seed, path[:-1]) if isinstance(_get(seed, path[:-1]), dict) else seed
            target["k" * rng.choice([100, 10_000])] = "v"
    elif kind == "array":
        cur = _get(seed, path)
        _set(seed, path, [cur] * rng.choice([0, 2, 1000, 20_000]))
    elif kind == "remove":
        parent = _get(seed, path[:-1])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent.pop(path[-1])
    elif kind == "add":
        target = _get(seed, path) if isinstance(_get(seed, path), dict) else seed
        target[rng.choice(["unknownElement", "_gender", "extension", "modifierExtension", "contained", "meta",
                           "id", "text", "_birthDate"])] = _other_type(None, rng)
    elif kind == "envelope":
        choice = rng.choice(["rt", "rt-num", "rt-missing", "id", "id-long", "id-bad", "rt-bundle"])
        if choice == "rt":
            seed["resourceType"] = rng.choice(["Pationt", "patient", "Element", "Resource", "", "Bundle"])
        elif choice == "rt-num":
            seed["resourceType"] = 7
        elif choice == "rt-missing":
            seed.pop("resourceType")
        elif choice == "id":
            seed["id"] = rng.choice(["", " ", "a/b", "a b", "..", "é", 5])
        elif choice == "id-long":
            seed["id"] = "a" * rng.choice([65, 10_000])
        else:
            seed = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": seed}]}
    if kind == "raw":
        text = json.dumps(seed).encode()
        dmg = rng.choice(["truncate", "flip", "dupkey", "trailing", "bom", "nan"])
        if dmg == "truncate":
            raw = text[: rng.randint(0, len(text) - 1)]
        elif dmg == "flip":
            b = bytearray(text)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] = rng.randrange(256)
            raw = bytes(b)
        elif dmg == "dupkey":
            raw = text[:-1] + b', "resourceType": "Observation"}'
        elif dmg == "trailing":
            raw = text + rng.choice([b"x", b"{}", b"\x00", b" ,"])
        elif dmg == "bom":
            raw = b"\xef\xbb\xbf" + text
        else:
            raw = text.replace(b"72", b"NaN") if b"72" in text else text[:-1] + b', "x": Infinity}'
    method = rng.choice(["POST", "POST", "PUT", "TXN"])
    if nest_text is not None:  # the nested value spliced into the text of the whole request
        if method == "PUT" and isinstance(seed, dict):
            seed.setdefault("id", "fuzz-put")
        raw = json.dumps(seed).replace('"__FUZZ_NEST__"', nest_text, 1).encode()
    body = raw if raw is not None else json.dumps(seed).encode()
    if method == "PUT":
        rid = seed.get("id") if isinstance(seed, dict) and isinstance(seed.get("id"), str) else "fuzz-put"
        if raw is None and isinstance(seed, dict):
            seed.setdefault("id", rid)
            body = json.dumps(seed).encode()
    if method == "TXN" and raw is None:
        good = {"resourceType": "Patient", "name": [{"family": "TxnGood"}]}
        body = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": good, "request": {"method": "POST", "url": "Patient"}},
            {"resource": seed, "request": {"method": "POST", "url": rtype}}]}).encode()
    elif method == "TXN":
        method = "POST"
    return Mutant(kind, method, rtype, body, must_refuse)


def mutants(seed: int, n: int) -> list[Mutant]:
    rng = random.Random(seed)
    return [mutate(rng) for _ in range(n)]


TYPES = ("Patient", "Observation", "Condition", "Consent", "MedicationRequest")


async def store_state(http, fhir: str, headers: dict) -> tuple:
    """Counts of every fuzzed type and the system history length: what a refusal must leave unchanged."""
    out = []
    for t in TYPES:
        async with http.get(f"{fhir}/{t}?_summary=count", headers=headers) as r:
            assert r.status == 200, await r.text()
            out.append((await r.json())["total"])
    async with http.get(f"{fhir}/_history?_count=0", headers=headers) as r:
        assert r.status == 200, await r.text()
        out.append((await r.json())["total"])
    return tuple(out)


async def send(http, fhir: str, headers: dict, m: Mutant) -> tuple[int, bytes]:
    h = dict(headers, **{"Content-Type": "application/fhir+json"})
    if m.method == "TXN":
        url, method = fhir, "POST"
    elif m.method == "PUT":
        url, method = f"{fhir}/{m.res_type}/fuzz-put", "PUT"
    else:
        url, method = f"{fhir}/{m.res_type}", "POST"
    async with http.request(method, url, data=m.body, headers=h) as r:
        return r.status, await r.read()


async def run(http, fhir: str, write_headers: dict, read_headers: dict, items: list[Mutant]) -> dict:
    """Send every mutant; returns {"accepted", "refused", "by_status", "failures": [...]}."""
    failures: list[str] = []
    by_status: dict[int, int] = {}
    state = await store_state(http, fhir, read_headers)
    accepted = refused = 0
    for i, m in enumerate(items):
        status, body = await send(http, fhir, write_headers, m)
        by_status[status] = by_status.get(status, 0) + 1
        where = f"#{i} {m.kind} {m.method} {m.res_type}: {status}"
        if status >= 500:
            failures.append(f"{where} {body[:300]!r}")
            state = await store_state(http, fhir, read_headers)
            continue
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        after = await store_state(http, fhir, read_headers)
        if status >= 400:
            refused += 1
            if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
                failures.append(f"{where} not an OperationOutcome: {body[:200]!r}")
            if after != state:
                failures.append(f"{where} store changed on refusal {state} -> {after}")
        else:
            accepted += 1
            if status not in (200, 201) or not isinstance(doc, dict) or "resourceType" not in doc:
                failures.append(f"{where} odd acceptance {body[:200]!r}")
            if m.must_refuse:
                failures.append(f"{where} accepted a mutant it must refuse: {m.body[:300]!r}")
        state = after
    return {"accepted": accepted, "refused": refused, "by_status": dict(sorted(by_status.items())),
            "failures": failures}
