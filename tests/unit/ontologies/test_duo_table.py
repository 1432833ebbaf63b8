"""A hand-written table of consent × purpose × requester cases, each decision taken from the rules
in ../shared/docs/DUO.md ("Matching semantics a data-access gateway must implement") and cited per
row.  Every row is driven twice: through the library (ConsentProfile/ResearchPurpose/Requester +
evaluate) and through the real CLI (`python -m gateway consent evaluate`, JSON Lines in, one
decision per line out).  Expectations are NOT produced by the evaluator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from ontologies import (
    CompositeHierarchy,
    ConsentProfile,
    Requester,
    ResearchPurpose,
    evaluate,
    load_duo,
    load_hierarchy,
    request_supplied_hierarchy,
)

DATA = Path(__file__).parent / "data"
OBO = DATA / "mini_mondo.obo"
OWL = DATA / "mini_disease.owl"
ROOT = Path(__file__).resolve().parents[3]
FEDGATE = [sys.executable, "-m", "gateway"]  # run with cwd=ROOT: this checkout's gateway
TODAY = "2026-01-15"

P, D, I = "permit", "deny", "indeterminate"

# DUO terms (DUO.md, "Class hierarchy")
NRES, GRU, HMB, DS, POA = "DUO:0000004", "DUO:0000042", "DUO:0000006", "DUO:0000007", "DUO:0000011"
RS, NMDS, GSO, NPUNCU, PUB, COL, IRB = ("DUO:0000012", "DUO:0000015", "DUO:0000016", "DUO:0000018",
                                       "DUO:0000019", "DUO:0000020", "DUO:0000021")
GS, MOR, TS, US, PS, IS, RTN = ("DUO:0000022", "DUO:0000024", "DUO:0000025", "DUO:0000026", "DUO:0000027",
                                "DUO:0000028", "DUO:0000029")
CC, NPOA, NPU, NCU = "DUO:0000043", "DUO:0000044", "DUO:0000045", "DUO:0000046"
METHODS, POPULATION, ANCESTRY, AGE, GENDER, CONTROL = (f"DUO:00000{n}" for n in (31, 32, 33, 34, 35, 36))
BIOMED, GENETIC, DRUG, DISEASE = (f"DUO:00000{n}" for n in (37, 38, 39, 40))
IRI = "http://purl.obolibrary.org/obo/"

# MONDO classes (tests/unit/ontologies/data/mini_mondo.obo; edges simplified there)
DISEASE_ROOT, CANCER, MELANOMA, UVEAL = "MONDO:0000001", "MONDO:0004992", "MONDO:0005105", "MONDO:0006486"
ACRAL, OBSOLETE_SUBTYPE = "MONDO:0100001", "MONDO:0019999"
INTESTINAL, COLORECTAL, LUNG, LUNG_ADENO, ADENO = ("MONDO:0006517", "MONDO:0005575", "MONDO:0008903",
                                                   "MONDO:0005061", "MONDO:0004970")
DIABETES, T1D, T2D = "MONDO:0005015", "MONDO:0005147", "MONDO:0005148"
# request-supplied ancestors (DUO.md: "accept ancestor sets supplied with a request")
UVEAL_UP = {UVEAL: [MELANOMA, CANCER, DISEASE_ROOT]}
MELANOMA_UP = {MELANOMA: [CANCER, DISEASE_ROOT]}

R_DS = "DUO.md DS: permits disease X iff X ≡ D or X ⊑ D"
R_DS_GENERAL = "DUO.md DS: denies a request for a more general disease"
R_DS_NODIS = "DUO.md DS: denies HMB-only or POA requests that name no disease"
R_DS_ALL = "DUO.md DS: each requested disease must fall under at least one consent disease"
R_GRU = "DUO.md GRU: any research purpose"
R_HMB = "DUO.md HMB: permits biomedical research (37 and subclasses 38/39/40), any disease"
R_HMB_NO = "DUO.md HMB: denies ancestry (33, POA) and GRU-level-only requests"
R_POA = "DUO.md POA: permits only population origins/ancestry research (33/32)"
R_POA_NO = "DUO.md POA: denies HMB-only and disease-specific requests"
R_METHODS = "DUO.md NMDS: absent NMDS, methods research is allowed on GRU/HMB/DS/POA data"
R_NRES = "DUO.md NRES: any use, including non-research use"
R_CC = "DUO.md CC: clinical-care use is permitted in addition to the permission"
R_FAIL = "DUO.md: unknown or obsolete codes fail closed (deny or manual review), never approve"
R_ATTEST = "DUO.md: requester-attested checks; without the attestation → never permit (issue #4)"
R_AND = "DUO.md: allowed only if every dataset condition is satisfied (AND)"


def case(expected, rule, permission, codes, *, mods=(), diseases=(), params=None, pdiseases=(), topics=(),
         req=None, anc=None, onto=None, today=TODAY, cid=None):
    record = {
        "consent": {"permission": permission, "modifiers": list(mods), "diseases": list(diseases),
                    "parameters": params or {}},
        "purpose": {"codes": list(codes), "diseases": list(pdiseases), "topics": list(topics)},
        "requester": req or {},
        "today": today,
    }
    if anc is not None:
        record["disease_ancestors"] = anc
    return pytest.param(record, expected, onto, rule, id=cid)


CASES = [
    # --- permissions × purposes ---------------------------------------------------------------
    case(P, R_GRU, GRU, [GRU], cid="GRU×GRU"),
    case(P, R_GRU, GRU, [BIOMED], cid="GRU×biomedical"),
    case(P, R_GRU + " (incl. POA/ancestry)", GRU, [ANCESTRY], cid="GRU×ancestry"),
    case(P, R_GRU, GRU, [POPULATION], cid="GRU×population"),
    case(P, R_GRU + " (methods)", GRU, [METHODS], cid="GRU×methods"),
    case(P, R_GRU, GRU, [AGE], cid="GRU×age"),
    case(P, R_GRU, GRU, [GENDER], cid="GRU×gender"),
    case(P, R_GRU, GRU, [CONTROL], cid="GRU×control"),
    case(P, R_GRU, GRU, [GENETIC], cid="GRU×genetic"),
    case(P, R_GRU, GRU, [DRUG], cid="GRU×drug"),
    case(P, R_GRU + " (HMB, disease-specific)", GRU, [DISEASE], pdiseases=[MELANOMA], cid="GRU×disease"),
    case(P, R_HMB, HMB, [BIOMED], cid="HMB×biomedical"),
    case(P, R_HMB, HMB, [GENETIC], cid="HMB×genetic"),
    case(P, R_HMB, HMB, [DRUG], cid="HMB×drug"),
    case(P, R_HMB, HMB, [DISEASE], pdiseases=[MELANOMA], cid="HMB×disease-any"),
    case(P, R_HMB, HMB, [HMB], cid="HMB×HMB"),
    case(D, R_HMB_NO, HMB, [ANCESTRY], cid="HMB×ancestry"),
    case(D, R_HMB_NO, HMB, [POA], cid="HMB×POA"),
    case(D, R_HMB_NO, HMB, [GRU], cid="HMB×GRU-only"),
    case(P, R_METHODS, HMB, [METHODS], cid="HMB×methods"),
    case(P, R_DS, DS, [DISEASE], diseases=[MELANOMA], pdiseases=[UVEAL], anc=UVEAL_UP, cid="DS-mel×uveal(anc)"),
    case(P, R_DS + " (≡)", DS, [DISEASE], diseases=[MELANOMA], pdiseases=[MELANOMA], anc=MELANOMA_UP,
         cid="DS-mel×mel"),
    case(D, R_DS_GENERAL, DS, [DISEASE], diseases=[UVEAL], pdiseases=[MELANOMA], anc={**UVEAL_UP, **MELANOMA_UP},
         cid="DS-uveal×mel(anc)"),
    case(D, R_DS_GENERAL, DS, [DISEASE], diseases=[INTESTINAL], pdiseases=[CANCER], onto="obo",
         cid="DS-intestinal×cancer(obo)"),
    case(P, R_DS, DS, [DISEASE], diseases=[INTESTINAL], pdiseases=[COLORECTAL], onto="obo",
         cid="DS-intestinal×colorectal(obo)"),
    case(D, R_DS_NODIS, DS, [BIOMED], diseases=[MELANOMA], cid="DS×HMB-no-disease"),
    case(D, R_DS_NODIS, DS, [ANCESTRY], diseases=[MELANOMA], cid="DS×ancestry"),
    case(D, R_DS, DS, [DISEASE], diseases=[MELANOMA], pdiseases=[T2D], onto="obo", cid="DS-mel×T2D(obo)"),
    case(P, R_DS, DS, [DISEASE], diseases=[MELANOMA], pdiseases=[UVEAL], onto="obo", cid="DS-mel×uveal(obo)"),
    case(P, R_DS, DS, [DISEASE], diseases=[MELANOMA], pdiseases=[UVEAL], onto="owl", cid="DS-mel×uveal(owl)"),
    case(D, R_DS_GENERAL, DS, [DISEASE], diseases=[UVEAL], pdiseases=[MELANOMA], onto="owl",
         cid="DS-uveal×mel(owl)"),
    case(P, R_DS + " (multiple parents)", DS, [DISEASE], diseases=[ADENO], pdiseases=[LUNG_ADENO], onto="obo",
         cid="DS-adeno×lung-adeno(obo)"),
    case(P, R_DS + " (transitive)", DS, [DISEASE], diseases=[CANCER], pdiseases=[LUNG_ADENO], onto="obo",
         cid="DS-cancer×lung-adeno(obo)"),
    case(P, R_DS_ALL, DS, [DISEASE], diseases=[MELANOMA, DIABETES], pdiseases=[UVEAL, T2D], onto="obo",
         cid="DS-2×2(obo)"),
    case(D, R_DS_ALL, DS, [DISEASE], diseases=[MELANOMA], pdiseases=[UVEAL, T1D], onto="obo",
         cid="DS-mel×uveal+T1D(obo)"),
    case(P, R_DS + " (obsolete parent ignored, live parent matches)", DS, [DISEASE], diseases=[MELANOMA],
         pdiseases=[ACRAL], onto="obo", cid="DS-mel×acral(obo)"),
    case(D, R_FAIL + " (obsolete disease class)", DS, [DISEASE], diseases=[MELANOMA],
         pdiseases=[OBSOLETE_SUBTYPE], onto="obo", cid="DS-mel×obsolete-disease(obo)"),
    case(D, R_FAIL + " (obsolete disease class)", DS, [DISEASE], diseases=[MELANOMA],
         pdiseases=[OBSOLETE_SUBTYPE], onto="owl", cid="DS-mel×obsolete-disease(owl)"),
    case(D, R_FAIL + " (unknown disease)", DS, [DISEASE], diseases=[MELANOMA], pdiseases=["MONDO:9999999"],
         onto="obo", cid="DS-mel×unknown-disease"),
    case(D, R_FAIL + " (no hierarchy knows the disease)", DS, [DISEASE], diseases=[MELANOMA], pdiseases=[UVEAL],
         cid="DS-mel×uveal(no-anc)"),
    case(P, R_DS + " (OBO IRI forms)", IRI + "DUO_0000007", [IRI + "DUO_0000040"], diseases=[IRI + "MONDO_0005105"],
         pdiseases=[IRI + "MONDO_0006486"], anc=UVEAL_UP, cid="DS-IRI-forms"),
    case(P, R_DS + " (non-MONDO, ancestors supplied)", DS, [DISEASE], diseases=["DOID:1909"],
         pdiseases=["DOID:6039"], anc={"DOID:6039": ["DOID:1909", "DOID:4"]}, cid="DS-DOID(anc)"),
    case(P, R_DS + " (SNOMED CT, ancestors supplied)", DS, [DISEASE], diseases=["SCTID:372244006"],
         pdiseases=["SCTID:274087000"], anc={"SCTID:274087000": ["SCTID:372244006"]}, cid="DS-SNOMED(anc)"),
    case(P, R_POA, POA, [ANCESTRY], cid="POA×ancestry"),
    case(P, R_POA, POA, [POPULATION], cid="POA×population"),
    case(D, R_POA_NO, POA, [BIOMED], cid="POA×biomedical"),
    case(D, R_POA_NO, POA, [DISEASE], pdiseases=[MELANOMA], cid="POA×disease"),
    case(P, R_METHODS, POA, [METHODS], cid="POA×methods"),
    case(P, R_METHODS, DS, [METHODS], diseases=[MELANOMA], cid="DS×methods"),
    case(P, R_NRES, NRES, [BIOMED], cid="NRES×biomedical"),
    case(P, R_NRES, NRES, [ANCESTRY], cid="NRES×ancestry"),
    case(P, R_NRES + " (non-research: clinical care)", NRES, [CC], cid="NRES×clinical"),
    case(D, R_CC + " (without CC, GRU is research only)", GRU, [CC], cid="GRU×clinical"),
    case(P, R_CC, GRU, [CC], mods=[CC], cid="GRU+CC×clinical"),
    case(P, R_CC + " (restricts nothing)", HMB, [BIOMED], mods=[CC], cid="HMB+CC×biomedical"),
    # --- NPU / NCU / NPUNCU -------------------------------------------------------------------
    case(P, "DUO.md NPU: requester organisation must be not-for-profit", GRU, [BIOMED], mods=[NPU],
         req={"not_for_profit": True}, cid="NPU-nfp"),
    case(D, "DUO.md NPU", GRU, [BIOMED], mods=[NPU], req={"not_for_profit": False}, cid="NPU-forprofit"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[NPU], cid="NPU-unattested"),
    case(P, "DUO.md NCU: purpose must be non-commercial", GRU, [BIOMED], mods=[NCU],
         req={"commercial_purpose": False}, cid="NCU-noncommercial"),
    case(D, "DUO.md NCU", GRU, [BIOMED], mods=[NCU], req={"commercial_purpose": True}, cid="NCU-commercial"),
    case(P, "DUO.md NCU: for-profit orgs may do non-commercial research", GRU, [BIOMED], mods=[NCU],
         req={"not_for_profit": False, "commercial_purpose": False}, cid="NCU-forprofit-noncommercial"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[NCU], cid="NCU-unattested"),
    case(P, "DUO.md NPUNCU: both NPU and NCU", GRU, [BIOMED], mods=[NPUNCU],
         req={"not_for_profit": True, "commercial_purpose": False}, cid="NPUNCU-both"),
    case(D, "DUO.md NPUNCU: a commercial purpose is denied", GRU, [BIOMED], mods=[NPUNCU],
         req={"not_for_profit": True, "commercial_purpose": True}, cid="NPUNCU-commercial"),
    case(D, "DUO.md NPUNCU: a for-profit requester is denied (no subsumption)", GRU, [BIOMED], mods=[NPUNCU],
         req={"not_for_profit": False, "commercial_purpose": False}, cid="NPUNCU-forprofit"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[NPUNCU], req={"not_for_profit": True}, cid="NPUNCU-half-attested"),
    # --- attested modifiers -------------------------------------------------------------------
    case(P, "DUO.md IRB 21", HMB, [BIOMED], mods=[IRB], req={"irb_approved": True}, cid="IRB-approved"),
    case(D, "DUO.md IRB 21", HMB, [BIOMED], mods=[IRB], req={"irb_approved": False}, cid="IRB-refused"),
    case(I, R_ATTEST, HMB, [BIOMED], mods=[IRB], cid="IRB-unattested"),
    case(P, "DUO.md COL 20", GRU, [BIOMED], mods=[COL], params={"collaborator": "Dr PI"},
         req={"collaboration_agreed": True}, cid="COL-agreed"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[COL], params={"collaborator": "Dr PI"}, cid="COL-unattested"),
    case(P, "DUO.md PUB 19", GRU, [BIOMED], mods=[PUB], req={"publication_agreed": True}, cid="PUB-agreed"),
    case(D, "DUO.md PUB 19", GRU, [BIOMED], mods=[PUB], req={"publication_agreed": False}, cid="PUB-refused"),
    case(P, "DUO.md RTN 29", GRU, [BIOMED], mods=[RTN], req={"return_agreed": True}, cid="RTN-agreed"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[RTN], cid="RTN-unattested"),
    case(P, "DUO.md MOR 24: accepted date on or after the dataset's date", GRU, [BIOMED], mods=[MOR],
         params={"moratorium_until": "2026-06-01"}, req={"publication_not_before": "2026-06-01"}, cid="MOR-same-date"),
    case(D, "DUO.md MOR 24: must not publish before date", GRU, [BIOMED], mods=[MOR],
         params={"moratorium_until": "2026-06-01"}, req={"publication_not_before": "2026-03-01"}, cid="MOR-earlier"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[MOR], params={"moratorium_until": "2026-06-01"}, cid="MOR-unattested"),
    case(P, "DUO.md MOR 24: the moratorium date has passed", GRU, [BIOMED], mods=[MOR],
         params={"moratorium_until": "2026-06-01"}, today="2026-07-01", cid="MOR-ended"),
    case(D, R_FAIL + " (MOR without its date)", GRU, [BIOMED], mods=[MOR], cid="MOR-no-date"),
    case(P, "DUO.md TS 25: within the months since approval", GRU, [BIOMED], mods=[TS],
         params={"time_limit_months": 12, "granted_on": "2025-06-01"}, cid="TS-within"),
    case(D, "DUO.md TS 25: deny after expiry", GRU, [BIOMED], mods=[TS],
         params={"time_limit_months": 12, "granted_on": "2025-06-01"}, today="2026-06-01", cid="TS-expired"),
    case(P, "DUO.md GS 22: location within region", GRU, [BIOMED], mods=[GS], params={"regions": ["DE"]},
         req={"location": "DE"}, cid="GS-inside"),
    case(D, "DUO.md GS 22", GRU, [BIOMED], mods=[GS], params={"regions": ["DE"]}, req={"location": "FR"},
         cid="GS-outside"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[GS], params={"regions": ["DE"]}, cid="GS-unattested"),
    case(P, "DUO.md GS 22 (region group EU contains FR)", GRU, [BIOMED], mods=[GS], params={"regions": ["EU"]},
         req={"location": "FR"}, cid="GS-EU"),
    case(D, "DUO.md GS 22 (US is not in the EU)", GRU, [BIOMED], mods=[GS], params={"regions": ["EU"]},
         req={"location": "US"}, cid="GS-EU-outside"),
    case(P, "DUO.md US 26: user on the allow-list", GRU, [BIOMED], mods=[US], params={"users": ["alice"]},
         req={"user": "alice"}, cid="US-listed"),
    case(D, "DUO.md US 26", GRU, [BIOMED], mods=[US], params={"users": ["alice"]}, req={"user": "bob"},
         cid="US-unlisted"),
    case(I, R_ATTEST, GRU, [BIOMED], mods=[US], params={"users": ["alice"]}, cid="US-unattested"),
    case(P, "DUO.md PS 27", GRU, [BIOMED], mods=[PS], params={"projects": ["P-1"]}, req={"project": "P-1"},
         cid="PS-listed"),
    case(D, "DUO.md PS 27", GRU, [BIOMED], mods=[PS], params={"projects": ["P-1"]}, req={"project": "P-2"},
         cid="PS-unlisted"),
    case(P, "DUO.md IS 28", GRU, [BIOMED], mods=[IS], params={"institutions": ["Charite"]},
         req={"institution": "Charite"}, cid="IS-listed"),
    case(D, "DUO.md IS 28", GRU, [BIOMED], mods=[IS], params={"institutions": ["Charite"]},
         req={"institution": "Acme"}, cid="IS-unlisted"),
    # --- ontology-checked modifiers -------------------------------------------------------------
    case(P, "DUO.md GSO 16: genetic studies (38)", GRU, [GENETIC], mods=[GSO], cid="GSO-genetic"),
    case(D, "DUO.md GSO 16: phenotype-only studies are denied", GRU, [BIOMED], mods=[GSO], cid="GSO-phenotype"),
    case(D, "DUO.md NMDS 15: methods purposes denied", GRU, [METHODS], mods=[NMDS], cid="NMDS-methods"),
    case(P, "DUO.md NMDS 15: non-methods research unaffected", GRU, [BIOMED], mods=[NMDS], cid="NMDS-biomedical"),
    case(P, "DUO.md NMDS 15: allowed when the disease matches the dataset's DS", DS, [METHODS, DISEASE],
         mods=[NMDS], diseases=[MELANOMA], pdiseases=[UVEAL], anc=UVEAL_UP, cid="NMDS-DS-match"),
    case(D, "DUO.md NMDS 15 + DS: disease does not match", DS, [METHODS, DISEASE], mods=[NMDS],
         diseases=[MELANOMA], pdiseases=[T2D], onto="obo", cid="NMDS-DS-mismatch"),
    case(D, "DUO.md NPOA 44: ancestry purposes denied", GRU, [ANCESTRY], mods=[NPOA], cid="NPOA-ancestry"),
    case(P, "DUO.md NPOA 44", GRU, [BIOMED], mods=[NPOA], cid="NPOA-biomedical"),
    case(D, "DUO.md NPOA 44 (32 population)", GRU, [POPULATION], mods=[NPOA], cid="NPOA-population"),
    case(D, "DUO.md NPOA quirk: misspelled IRI DUO_00000044 is NPOA", GRU, [ANCESTRY],
         mods=[IRI + "DUO_00000044"], cid="NPOA-typo-IRI"),
    case(P, "DUO.md NPOA quirk: misspelled IRI DUO_00000044 is NPOA", GRU, [BIOMED],
         mods=[IRI + "DUO_00000044"], cid="NPOA-typo-IRI-biomedical"),
    case(P, "DUO.md RS 12: purpose within the topic", GRU, [BIOMED], mods=[RS],
         params={"topics": ["EDAM:topic_0634"]}, topics=["EDAM:topic_0634"], cid="RS-topic"),
    case(D, "DUO.md RS 12", GRU, [BIOMED], mods=[RS], params={"topics": ["EDAM:topic_0634"]},
         topics=["EDAM:topic_3070"], cid="RS-other-topic"),
    case(I, "DUO.md RS 12 (the purpose declares no topic; manual review)", GRU, [BIOMED], mods=[RS],
         params={"topics": ["EDAM:topic_0634"]}, cid="RS-no-topic"),
    # --- AND over conditions --------------------------------------------------------------------
    case(P, R_AND, HMB, [DISEASE], mods=[NPU, IRB, PUB], pdiseases=[MELANOMA],
         req={"not_for_profit": True, "irb_approved": True, "publication_agreed": True}, cid="AND-all-hold"),
    case(I, R_AND + "; deny > indeterminate > permit", HMB, [BIOMED], mods=[NPU, IRB], req={"not_for_profit": True},
         cid="AND-one-unattested"),
    case(D, R_AND + "; deny > indeterminate", HMB, [BIOMED], mods=[NPU, IRB], req={"not_for_profit": False},
         cid="AND-one-fails"),
    case(D, R_AND, DS, [DISEASE], mods=[NCU], diseases=[CANCER], pdiseases=[COLORECTAL], onto="obo",
         req={"commercial_purpose": True}, cid="DS-cancer+NCU-commercial"),
    case(P, R_AND, DS, [DISEASE], mods=[NCU], diseases=[CANCER], pdiseases=[COLORECTAL], onto="obo",
         req={"commercial_purpose": False, "favourite_colour": "blue"}, cid="DS-cancer+NCU-unknown-field-ignored"),
    # --- fail closed ----------------------------------------------------------------------------
    case(D, R_FAIL + " (DUO:0000005 GRU-CC obsolete)", "DUO:0000005", [BIOMED], cid="obsolete-permission"),
    case(D, R_FAIL, "DUO:0009999", [BIOMED], cid="unknown-permission"),
    case(D, R_FAIL + " (a modifier is not a permission)", IRB, [BIOMED], cid="modifier-as-permission"),
    case(D, R_FAIL, GRU, [BIOMED], mods=["DUO:0000099"], cid="unknown-modifier"),
    case(D, R_FAIL + " (DUO:0000014 RU obsolete)", GRU, ["DUO:0000014"], cid="obsolete-purpose"),
    case(D, R_FAIL + " (IRB is not a purpose)", GRU, [IRB], cid="modifier-as-purpose"),
    case(D, R_FAIL + " (non-DUO purpose)", GRU, [MELANOMA], cid="disease-as-purpose"),
    case(D, R_FAIL + " (no purpose)", GRU, [], cid="empty-purpose"),
    case(D, R_FAIL + " (DS without disease permits nothing)", DS, [DISEASE], pdiseases=[MELANOMA], cid="DS-no-disease"),
    case(D, R_FAIL + " (not a DUO or OBO term)", "XYZ:1", [BIOMED], cid="foreign-permission"),
]

assert len(CASES) >= 60


@pytest.fixture(scope="module")
def duo():
    return load_duo()


def _hierarchy(record, onto):
    parts = []
    if onto == "obo":
        parts.append(load_hierarchy(OBO))
    elif onto == "owl":
        parts.append(load_hierarchy(OWL))
    if "disease_ancestors" in record:
        parts.append(request_supplied_hierarchy(record["disease_ancestors"]))
    return CompositeHierarchy(tuple(parts))


@pytest.mark.parametrize(("record", "expected", "onto", "rule"), CASES)
def test_library(duo, record, expected, onto, rule):
    profile = ConsentProfile.from_json(record["consent"])
    purpose = ResearchPurpose.from_json(record["purpose"])
    requester = Requester.from_json(record["requester"])
    decision = evaluate(profile, purpose, requester, duo, _hierarchy(record, onto),
                        date.fromisoformat(record["today"]))
    assert decision.decision == expected, f"{rule}: {decision.reasons}"
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)


def _run_cli(lines, onto):
    cmd = [*FEDGATE, "consent", "evaluate"]
    if onto:
        cmd += ["--disease-ontology", str(OBO if onto == "obo" else OWL)]
    done = subprocess.run(cmd, input="\n".join(lines) + "\n", check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done


@pytest.mark.parametrize("onto", [None, "obo", "owl"])
def test_cli_json_lines(onto):
    """All rows for one disease-ontology setting go through one CLI process as JSON Lines; the
    output has one decision per line, in order."""
    rows = [p.values for p in CASES if p.values[2] == onto]
    assert rows
    done = _run_cli([json.dumps(r[0]) for r in rows], onto)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == len(rows)
    for (record, expected, _, rule), line in zip(rows, out):
        got = json.loads(line)
        assert set(got) == {"decision", "reasons"}
        assert got["decision"] == expected, f"{rule}: {record} → {got}"


def test_cli_single_object_and_malformed_line():
    """One pretty-printed object → one decision; a malformed JSON Lines line → an indeterminate line
    naming the line, the others still evaluated, exit status 2."""
    record = CASES[0].values[0]
    done = subprocess.run([*FEDGATE, "consent", "evaluate"], cwd=ROOT, input=json.dumps(record, indent=2),
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["decision"] for x in done.stdout.splitlines()] == ["permit"]
    bad = json.dumps({"consent": {"modifiers": []}, "purpose": {"codes": [BIOMED]}})
    done = subprocess.run([*FEDGATE, "consent", "evaluate"], cwd=ROOT,
                          input="\n".join([json.dumps(record), "{not json", bad, json.dumps(record)]) + "\n",
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    out = [json.loads(x) for x in done.stdout.splitlines()]
    assert [o["decision"] for o in out] == ["permit", "indeterminate", "indeterminate", "permit"]
    assert "line 2" in out[1]["reasons"][0]
    assert "consent.permission" in out[2]["reasons"][0]


def test_python_module_entry_matches_cli():
    record = CASES[1].values[0]
    done = subprocess.run([sys.executable, "-m", "ontologies.cli", "evaluate"], input=json.dumps(record),
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(done.stdout)["decision"] == "permit"
