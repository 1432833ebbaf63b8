"""A generated, Synthea-shaped FHIR population (pure, seeded): the scale bench's data (bench/scale.py) and
the search-plan test's (tests/integration/test_search_plans.py).

Per patient, in Synthea's proportions scaled down (a Synthea record holds a few hundred resources, most of
them Observations and Encounters): a Patient (name, gender, birth date, MRN identifier, address), a
research Consent with one of a few DUO permissions (so the consent gate has profiles to tell apart),
Encounters, Conditions, Procedures, an Immunization, DiagnosticReports and Observations — vital signs
and labs over a small LOINC set with ``valueQuantity``, ``effectiveDateTime``, ``encounter`` and
``category``.  :data:`COMMON_CODE` (heart rate, LOINC 8867-4) is one Observation in ten of the whole
store, so at 1M resources a ``code=8867-4`` search has ≥ 100k matches.
"""

from __future__ import annotations

import random
from typing import Iterator

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
DUO = "http://purl.obolibrary.org/obo/duo"
#: heart rate: one resource in ten of the store (see the module docstring)
COMMON_CODE = "8867-4"
#: (code, display, unit, low, high): vital signs and labs as Synthea writes them
OBS_CODES = [
    ("8302-2", "Body Height", "cm", 150, 195), ("29463-7", "Body Weight", "kg", 45, 120),
    ("39156-5", "Body mass index", "kg/m2", 18, 40), ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 180),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 110), ("9279-1", "Respiratory rate", "/min", 10, 25),
    ("2339-0", "Glucose", "mg/dL", 65, 200), ("2093-3", "Total cholesterol", "mg/dL", 140, 280),
    ("4548-4", "Hemoglobin A1c", "%", 4, 11), ("72514-3", "Pain severity", "{score}", 0, 10),
]
CONDITIONS = [("38341003", "Hypertension"), ("44054006", "Diabetes"), ("195662009", "Acute viral pharyngitis"),
              ("10509002", "Acute bronchitis"), ("55822004", "Hyperlipidemia"), ("40055000", "Chronic sinusitis")]
PROCEDURES = [("430193006", "Medication reconciliation"), ("171207006", "Depression screening"),
              ("710824005", "Assessment of health and social care needs")]
FAMILIES = ["Smith", "Müller", "García", "Nguyen", "Kowalski", "Rossi", "Dubois", "Jansen", "Öztürk", "Silva",
            "Andersen", "Novák", "Papadopoulos", "Kim", "Okafor", "Haddad"]
GIVEN = ["Anna", "Ben", "Chloé", "David", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luis"]
PERMISSIONS = ["DUO:0000042", "DUO:0000006", "DUO:0000011", "DUO:0000004"]
#: resources per patient (Patient + Consent + the rest): 50
PER_PATIENT = 50
_N_OBS = 34  # of which 5 (k = 0, 7, ..., 28) are COMMON_CODE: 5 / 50 = 1 in 10


def patient_resources(i: int, seed: int = 27) -> list[dict]:
    """The :data:`PER_PATIENT` resources of patient ``i`` (deterministic in ``seed`` and ``i``)."""
    rng = random.Random(seed * 1_000_003 + i)
    pid = f"sp{i}"
    subj = {"reference": f"Patient/{pid}"}
    year = 1930 + rng.randrange(85)
    out: list[dict] = [{
        "resourceType": "Patient", "id": pid,
        "identifier": [{"system": "urn:fedgate:scale:mrn", "value": f"MRN{i:08d}"}],
        "name": [{"family": f"{rng.choice(FAMILIES)}{i % 997}", "given": [rng.choice(GIVEN)]}],
        "gender": rng.choice(["female", "male"]), "birthDate": f"{year}-{1 + rng.randrange(12):02d}-{1 + rng.randrange(28):02d}",
        "address": [{"city": rng.choice(["Berlin", "Lyon", "Utrecht", "Graz"]), "country": "EU"}],
    }, {
        "resourceType": "Consent", "id": f"c-{pid}", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": LOINC, "code": "57016-8"}]}],
        "patient": subj, "policyRule": {"coding": [{"system": DUO, "code": PERMISSIONS[i % len(PERMISSIONS)]}]},
    }]
    encounters = []
    for k in range(5):
        eid = f"e{i}-{k}"
        day = f"{2015 + k}-{1 + rng.randrange(12):02d}-{1 + rng.randrange(28):02d}"
        encounters.append((eid, day))
        out.append({"resourceType": "Encounter", "id": eid, "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "type": [{"coding": [{"system": SNOMED, "code": "185349003", "display": "Encounter for check up"}]}],
                    "subject": subj, "period": {"start": f"{day}T09:00:00Z", "end": f"{day}T09:30:00Z"}})
    for k in range(3):
        code, display = CONDITIONS[(i + k) % len(CONDITIONS)]
        eid, day = encounters[k]
        out.append({"resourceType": "Condition", "id": f"cond{i}-{k}",
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                   "code": "active"}]},
                    "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
                    "subject": subj, "encounter": {"reference": f"Encounter/{eid}"}, "onsetDateTime": f"{day}T09:00:00Z"})
    for k in range(3):
        code, display = PROCEDURES[k]
        eid, day = encounters[k + 1]
        out.append({"resourceType": "Procedure", "id": f"proc{i}-{k}", "status": "completed",
                    "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
                    "subject": subj, "encounter": {"reference": f"Encounter/{eid}"},
                    "performedPeriod": {"start": f"{day}T09:05:00Z", "end": f"{day}T09:15:00Z"}})
    eid, day = encounters[0]
    out.append({"resourceType": "Immunization", "id": f"imm{i}", "status": "completed",
                "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
                "patient": subj, "encounter": {"reference": f"Encounter/{eid}"}, "occurrenceDateTime": f"{day}T09:10:00Z"})
    obs_ids = []
    for k in range(_N_OBS):
        oid = f"o{i}-{k}"
        eid, day = encounters[k % 5]
        if k % 7 == 0:
            code, display, unit, lo, hi = COMMON_CODE, "Heart rate", "/min", 50, 110
        else:
            code, display, unit, lo, hi = OBS_CODES[k % len(OBS_CODES)]
        value = round(lo + (hi - lo) * rng.random(), 1)
        category = "laboratory" if code in ("2339-0", "2093-3", "4548-4") else "vital-signs"
        out.append({"resourceType": "Observation", "id": oid, "status": "final",
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                              "code": category}]}],
                    "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                    "subject": subj, "encounter": {"reference": f"Encounter/{eid}"},
                    "effectiveDateTime": f"{day}T09:{10 + k % 40:02d}:00Z",
                    "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
        obs_ids.append(oid)
    for k in range(2):
        eid, day = encounters[k]
        out.append({"resourceType": "DiagnosticReport", "id": f"dr{i}-{k}", "status": "final",
                    "code": {"coding": [{"system": LOINC, "code": "51990-0", "display": "Basic metabolic panel"}]},
                    "subject": subj, "encounter": {"reference": f"Encounter/{eid}"},
                    "effectiveDateTime": f"{day}T10:00:00Z",
                    "result": [{"reference": f"Observation/{o}"} for o in obs_ids[k * 3:k * 3 + 3]]})
    assert len(out) == PER_PATIENT, len(out)
    return out


def population(n_resources: int, seed: int = 27) -> Iterator[dict]:
    """About ``n_resources`` resources (whole patients: rounded up to :data:`PER_PATIENT`)."""
    for i in range(-(-n_resources // PER_PATIENT)):
        yield from patient_resources(i, seed)
