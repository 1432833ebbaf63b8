"""The DICOM half of the scale benchmark (issue 27): ``bench/scale.py --dicom-instances 10000,100000``.

After the FHIR half has loaded its Synthea-shaped population (``tests/fhir_population.py``: Patients with
identifier ``MRN<i:08d>``, research Consents, Conditions of which Hypertension is one patient in two), this
generates small synthetic DICOM instances (16×16 by default: the index, not the pixels, is the point) for
those patients and sends them through **STOW-RS over HTTP** to the same in-process gateway on loopback (the
path a PACS takes: multipart parse, blob write + fsync, index, ImagingStudy sync, consent stamp), several
studies at a time (``--stow-concurrency``; each study's series one after another, one request per series
or per ``--stow-batch`` instances of a long one).  PatientID is the FHIR Patient's MRN, so every study is
linked to its FHIR patient and gated by that patient's consent.

Structure (seeded, :func:`plan`): each imaging patient (FHIR patients ``sp0, sp1, …`` in order, wrapping
around when the load needs more studies than the population has patients) has 1–4 studies, each one of

* CT chest/abdomen (one in two): a 1-instance localizer, an axial series of 30–150 slices, in one study
  of two a coronal reformat of 20–60;
* cardiac MR (three in ten): a 3-instance localizer, a short-axis cine of 10–30 slices and an LGE series
  of 8–16 (slice thickness 8 mm, body part HEART), and a 1-instance TID 1500 SR (Comprehensive SR) with a
  measurement group: Finding = left or right ventricle, LVEF (LOINC 10230-1) ~ N(55, 12) %;
* MR head (one in five): T1, T2, FLAIR of 20–60, 20–60 and 20–40 slices.

So the federation bench's cohort query (hypertension + cardiac MR with slice thickness ≤ 8 + an SR
measurement group with Finding = LV and LVEF ≤ 50: ``bench/federation_bench.QUERY``) has matches, and is
timed as its own analyst would ask it (``POST /federation/cohort/count``, purpose DUO:0000042).

Each ``--dicom-instances`` size (comma-separated, ascending) is loaded in turn and measured when reached:

* ingest: instances/s over the stage and per tenth of it (requests' completions as they come in);
* QIDO-RS at every level (studies by PatientID / StudyDate range / ModalitiesInStudy; series by Modality
  within a study and across studies; instances of a series), ``limit=50`` first page and a deep page
  (offset 4,950 = page 100 where there are that many matches, else the last full page), as a research
  analyst (purpose DUO:0000037, as the FHIR half) and as a clinician;
* WADO-RS whole series (the longest series, ``multipart/related; type="application/dicom"``): instances/s
  and MB/s of the bodies, and series ``/metadata`` latency;
* the federation cohort count;
* database bytes per instance (growth since before the DICOM load, SQLite after a WAL checkpoint,
  PostgreSQL ``pg_database_size``), blob store bytes per instance, and the FHIR bytes per resource before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_ROOT_UID, ComprehensiveSRStorage, ExplicitVRLittleEndian, MRImageStorage

from bench.federation_bench import PURPOSE as COHORT_PURPOSE
from bench.federation_bench import QUERY as COHORT_QUERY
from bench.scale import db_size, pcts
from gateway import keys
from gateway.auth import issue_dev_token
from tests.dicom_synth import ct_series, stow_body, to_bytes
from tests.fhir_population import PER_PATIENT, patient_resources

UID_ROOT = PYDICOM_ROOT_UID + "27"  # pydicom's root for generated UIDs; + .seed.study.series.instance (≤ 64)
BOUNDARY = "scale-dicom-7f3a"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
LIMIT = 50
DEEP = 99 * LIMIT  # offset of page 100
SOP_BASE = 100_000  # an image's SOP Instance UID: series UID + "." + (SOP_BASE + InstanceNumber)
DESCRIPTION = {"ct": "CT", "cardiac": "Cardiac MRI", "head": "MR HEAD"}


@dataclass
class Series:
    uid: str
    number: int
    modality: str  # CT, MR or SR
    description: str
    body_part: str
    thickness: float
    n: int
    start: int = 0  # instances of this series sent before (a series cut at a --dicom-instances size)
    stage: int = 0  # which size (index in --dicom-instances) sends it


@dataclass
class Study:
    uid: str
    patient: int  # FHIR patient index (sp<i>, MRN<i:08d>)
    date: str
    kind: str  # "ct", "cardiac", "head"
    series: list[Series] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(s.n for s in self.series)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dicom-instances", default="0",
                    help="DICOM sizes to load and measure, ascending, comma-separated (e.g. 10000,100000); 0: none")
    ap.add_argument("--dicom-size", type=int, default=16, help="image rows/columns")
    ap.add_argument("--stow-concurrency", type=int, default=4, help="studies sent at once")
    ap.add_argument("--stow-batch", type=int, default=50, help="most instances per STOW request")
    ap.add_argument("--dicom-seed", type=int, default=27)
    ap.add_argument("--dicom-only", action="store_true",
                    help="load the FHIR population (its patients, consents, conditions) but time no FHIR search")


def sizes(arg: str) -> list[int]:
    out = [int(x) for x in arg.split(",") if int(x) > 0]
    if out != sorted(out):
        raise SystemExit("--dicom-instances: sizes must be ascending")
    return out


def plan(cuts: list[int], patients: int, seed: int = 27) -> list[Study]:
    """Studies holding exactly ``cuts[-1]`` instances (the last series cut short), for FHIR patients
    ``0 … patients - 1`` in order (wrapping around); pure, deterministic in ``seed``.  A series that
    straddles one of the ``cuts`` is two parts (same series, ``start`` and ``stage`` apart): what is sent
    before that size is measured, and what after."""
    rng = random.Random(seed)
    studies: list[Study] = []
    total = cuts[-1]
    count, p = 0, 0
    while count < total:
        for _ in range(rng.randint(1, 4)):
            if count >= total:
                break
            st = Study(f"{UID_ROOT}.{seed}.{len(studies) + 1}", p % max(1, patients),
                       f"{rng.randint(2012, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", "")
            r = rng.random()
            if r < 0.5:
                st.kind, thick = "ct", rng.choice([1.0, 2.5, 5.0])
                part = rng.choice(["CHEST", "ABDOMEN"])
                defs = [("CT", "LOCALIZER", part, thick, 1), ("CT", "AXIAL", part, thick, rng.randint(30, 150))]
                if rng.random() < 0.5:
                    defs.append(("CT", "CORONAL MPR", part, 3.0, rng.randint(20, 60)))
            elif r < 0.8:
                st.kind = "cardiac"
                defs = [("MR", "LOCALIZER", "HEART", 8.0, 3), ("MR", "CINE SAX", "HEART", 8.0, rng.randint(10, 30)),
                        ("MR", "LGE", "HEART", 8.0, rng.randint(8, 16)), ("SR", "LV ANALYSIS", "HEART", 0.0, 1)]
            else:
                st.kind = "head"
                defs = [("MR", "T1 AX", "HEAD", 5.0, rng.randint(20, 60)),
                        ("MR", "T2 AX", "HEAD", 5.0, rng.randint(20, 60)),
                        ("MR", "FLAIR", "HEAD", 5.0, rng.randint(20, 40))]
            for k, (mod, desc, part, thick, n) in enumerate(defs, start=1):
                n = min(n, total - count)
                if n <= 0:
                    break
                start = 0
                for stage, cut in enumerate(cuts):
                    if count < cut and n > start:
                        m = min(n - start, cut - count)
                        st.series.append(Series(f"{st.uid}.{k}", k, mod, desc, part, thick, m, start, stage))
                        start, count = start + m, count + m
            studies.append(st)
        p += 1
    return studies


def stage_of(studies: list[Study], stage: int) -> list[Study]:
    """The series parts that size ``stage`` sends, by study (studies with none left out)."""
    out = []
    for st in studies:
        parts = [se for se in st.series if se.stage == stage]
        if parts:
            out.append(Study(st.uid, st.patient, st.date, st.kind, parts))
    return out


def upto(studies: list[Study], stage: int) -> list[Study]:
    """The studies as stored once size ``stage`` is loaded (a cut series' parts as one)."""
    out = []
    for st in studies:
        merged: dict[str, Series] = {}
        for se in st.series:
            if se.stage <= stage:
                if se.uid in merged:
                    merged[se.uid] = replace(merged[se.uid], n=merged[se.uid].n + se.n)
                else:
                    merged[se.uid] = replace(se, start=0)
        if merged:
            out.append(Study(st.uid, st.patient, st.date, st.kind, list(merged.values())))
    return out


def _code(scheme: str, value: str, meaning: str) -> Sequence:
    c = Dataset()
    c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning = scheme, value, meaning
    return Sequence([c])


def _item(rel: str, vt: str, concept: tuple[str, str, str], **values) -> Dataset:
    it = Dataset()
    it.RelationshipType, it.ValueType, it.ConceptNameCodeSequence = rel, vt, _code(*concept)
    for k, v in values.items():
        setattr(it, k, v)
    return it


def sr_document(study: Study, series: Series, demo: dict, rng: random.Random) -> Dataset:
    """A TID 1500-shaped Comprehensive SR: report → imaging measurements → one measurement group holding
    a Finding (left or right ventricle) and an LVEF (%)."""
    sop = series.uid + ".1"
    ds = _header(study, series, demo, ComprehensiveSRStorage, sop)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = _code("DCM", "126000", "Imaging Measurement Report")
    ds.CompletionFlag, ds.VerificationFlag, ds.InstanceNumber = "COMPLETE", "UNVERIFIED", 1
    ds.ContentDate, ds.ContentTime = study.date, "120000"
    finding = rng.choice([("SCT", "87878005", "Left Ventricle"), ("SCT", "53085002", "Right Ventricle")])
    ef = Dataset()
    ef.NumericValue = f"{rng.gauss(55, 12):.1f}"
    ef.MeasurementUnitsCodeSequence = _code("UCUM", "%", "percent")
    group = _item("CONTAINS", "CONTAINER", ("DCM", "125007", "Measurement Group"), ContinuityOfContent="SEPARATE",
                  ContentSequence=Sequence([
                      _item("CONTAINS", "CODE", ("DCM", "121071", "Finding"), ConceptCodeSequence=_code(*finding)),
                      _item("CONTAINS", "NUM", ("LN", "10230-1", "Ejection fraction"),
                            MeasuredValueSequence=Sequence([ef]))]))
    ds.ContentSequence = Sequence([_item("CONTAINS", "CONTAINER", ("DCM", "126010", "Imaging Measurements"),
                                         ContinuityOfContent="SEPARATE", ContentSequence=Sequence([group]))])
    return ds


def _header(study: Study, series: Series, demo: dict, sop_class: str, sop: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series.uid
    ds.PatientID, ds.PatientName = demo["mrn"], demo["name"]
    ds.PatientSex, ds.PatientBirthDate = demo["sex"], demo["birth"]
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = study.date, "101500", f"A{study.uid[-10:]}", "1"
    ds.StudyDescription = DESCRIPTION[study.kind]
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = series.modality, series.number, series.description
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "Scale"
    return ds


def demographics(i: int) -> dict:
    """PatientID (the FHIR Patient's MRN identifier), name, sex and birth date of FHIR patient ``i``."""
    pat = patient_resources(i)[0]
    name = pat["name"][0]
    return {"mrn": pat["identifier"][0]["value"], "name": f"{name['family']}^{name['given'][0]}",
            "sex": pat["gender"][0].upper(), "birth": pat["birthDate"].replace("-", "")}


def _splice(raw: bytes, tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """``raw`` (a Part 10 file, explicit VR little endian) with its top-level short-VR element ``tag``
    holding ``value`` (space-padded to even length): a top-level element has no enclosing length to fix."""
    head = struct.pack("<HH", *tag) + vr
    at = raw.index(head)
    old = struct.unpack_from("<H", raw, at + 6)[0]
    value += b" " * (len(value) % 2)
    return raw[:at + 6] + struct.pack("<H", len(value)) + value + raw[at + 8 + old:]


def image_series(study: Study, se: Series, demo: dict, pixels: np.ndarray) -> list[bytes]:
    """The instances of an image series part as Part 10 files: the first written by pydicom
    (tests/dicom_synth.ct_series), the others that file with their SOP Instance UID (one length in a series:
    ``SOP_BASE + instance number``), InstanceNumber, ImagePositionPatient and pixels spliced in: some 50×
    faster than pydicom writing each (tests/integration/test_scale_dicom.py reads them back)."""
    ds = ct_series(patient_id=demo["mrn"], patient_name=demo["name"], study_uid=study.uid, study_date=study.date,
                   modality=se.modality, manufacturer="SIEMENS", accession=f"A{study.uid[-10:]}",
                   series_description=se.description, body_part=se.body_part, sex=demo["sex"],
                   birth_date=demo["birth"], pixels=[pixels[0]])[0]
    first = f"{se.uid}.{SOP_BASE + se.start + 1}"
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = se.uid, first, first
    ds.SeriesNumber, ds.SliceThickness, ds.StudyDescription = se.number, se.thickness, DESCRIPTION[study.kind]
    if se.modality == "MR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        del ds.KVP, ds.ConvolutionKernel
    template = to_bytes(ds)
    assert template.endswith(pixels[0].tobytes())  # PixelData is the last element
    out = []
    for j, px in enumerate(pixels):
        k = se.start + 1 + j
        raw = template.replace(first.encode(), f"{se.uid}.{SOP_BASE + k}".encode())
        raw = _splice(raw, (0x0020, 0x0013), b"IS", str(k).encode())
        raw = _splice(raw, (0x0020, 0x0032), b"DS", f"0\\0\\{(k - 1) * se.thickness:g}".encode())
        out.append(raw[:-px.nbytes] + px.tobytes())
    return out


def study_bodies(study: Study, size: int, batch: int, seed: int) -> list[tuple[int, bytes]]:
    """The STOW-RS request bodies of one study: (instances, multipart body), a series per request (at most
    ``batch`` instances each)."""
    rng = random.Random(f"{seed}:{study.uid}")
    nprng = np.random.default_rng(rng.randrange(2**32))
    demo = demographics(study.patient)
    out = []
    for se in study.series:
        if se.modality == "SR":
            raw = [to_bytes(sr_document(study, se, demo, rng))]
        else:
            raw = image_series(study, se, demo, nprng.normal(1000, 50, (se.n, size, size)).astype(np.int16))
        for i in range(0, len(raw), batch):
            out.append((len(raw[i:i + batch]), stow_body(raw[i:i + batch], BOUNDARY)))
    return out


async def stow(base: str, headers: dict, work: list[tuple[Study, list[tuple[int, bytes]]]], concurrency: int,
               tenths: list[tuple[int, float]]) -> float:
    """Send every study (its requests one after another), ``concurrency`` studies at once; ``tenths``
    gets (instances, seconds) of each tenth of the instances.  Returns the wall seconds."""
    total = sum(n for _, bodies in work for n, _ in bodies)
    queue: asyncio.Queue = asyncio.Queue()
    for w in work:
        queue.put_nowait(w)
    state = {"done": 0, "mark": 0, "t": time.perf_counter(), "tenth": 1}
    h = headers | {"Content-Type": MULTIPART}
    t0 = time.perf_counter()

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            study, bodies = queue.get_nowait()
            for n, body in bodies:
                async with http.post(f"{base}/studies/{study.uid}", data=body, headers=h) as r:
                    if r.status != 200:
                        raise SystemExit(f"STOW answered {r.status}: {(await r.text())[:500]}")
                state["done"] += n
                if state["done"] >= total * state["tenth"] / 10:  # (one request may finish several tenths)
                    now = time.perf_counter()
                    tenths.append((state["done"] - state["mark"], now - state["t"]))
                    state["mark"], state["t"] = state["done"], now
                    state["tenth"] = int(state["done"] * 10 // total) + 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return time.perf_counter() - t0


async def _get(http: aiohttp.ClientSession, url: str, params, headers) -> tuple[float, bytes, aiohttp.ClientResponse]:
    t0 = time.perf_counter()
    async with http.get(url, params=params, headers=headers) as r:
        body = await r.read()
        if r.status != 200:
            raise SystemExit(f"GET {url} answered {r.status}: {body[:300]!r}")
    return time.perf_counter() - t0, body, r


def qido_cells(studies: list[Study]) -> list[tuple[str, str, str, dict]]:
    """(label, level, path under /dicomweb, params) of the QIDO-RS searches, their values taken from the
    loaded studies: the patient with most studies, the study with most series, the longest series."""
    by_patient: dict[int, int] = {}
    for st in studies:
        by_patient[st.patient] = by_patient.get(st.patient, 0) + 1
    patient = max(by_patient, key=lambda p: (by_patient[p], -p))
    mrn = demographics(patient)["mrn"]
    wide = max(studies, key=lambda s: (len(s.series), s.instances))
    longest = max(((st, se) for st in studies for se in st.series), key=lambda x: x[1].n)
    return [
        (f"studies?PatientID={mrn}", "study", "studies", {"PatientID": mrn}),
        ("studies?StudyDate=20180101-20191231", "study", "studies", {"StudyDate": "20180101-20191231"}),
        ("studies?ModalitiesInStudy=MR", "study", "studies", {"ModalitiesInStudy": "MR"}),
        (f"studies/{{study}}/series?Modality={wide.series[-1].modality}", "series", f"studies/{wide.uid}/series",
         {"Modality": wide.series[-1].modality}),
        ("series?Modality=CT", "series", "series", {"Modality": "CT"}),
        ("series?Modality=MR&BodyPartExamined=HEART", "series", "series",
         {"Modality": "MR", "BodyPartExamined": "HEART"}),
        (f"studies/{{study}}/series/{{series}}/instances ({longest[1].n} instances)", "instance",
         f"studies/{longest[0].uid}/series/{longest[1].uid}/instances", {}),
    ]


async def measure(base: str, settings, studies: list[Study], rounds: int) -> dict:
    """QIDO-RS cells (both requesters; p50/p95 over ``rounds`` after warm-up, first page and deep page),
    WADO-RS of the five longest image series with their /metadata (one client, sequential), and the
    federation cohort count, against the gateway at ``base`` holding ``studies``."""
    gated = {"Authorization": "Bearer " + issue_dev_token(
        settings, subject="ana", roles=["analyst"], purpose={"codes": ["DUO:0000037"]}, ttl_s=36000)}
    clin = {"Authorization": "Bearer " + issue_dev_token(settings, subject="doc", roles=["clinician"], ttl_s=36000)}
    out: dict = {"qido": [], "wado": {}, "cohort": {}}
    warm = min(3, rounds)  # warm-up requests per cell
    async with aiohttp.ClientSession() as http:
        for label, level, path, params in qido_cells(studies):
            url = f"{base}/dicomweb/{path}"
            for arm, h in (("research", gated), ("treatment", clin)):
                p = {**params, "limit": str(LIMIT)}
                for _ in range(warm):
                    _, _, r = await _get(http, url, p, h)
                total = int(r.headers.get("X-Total-Count", "0"))
                first = [(await _get(http, url, p, h))[0] for _ in range(rounds)]
                offset = DEEP if total > DEEP else (total - 1) // LIMIT * LIMIT
                deep = None
                if offset > 0:
                    pd = {**p, "offset": str(offset)}
                    deep = [(await _get(http, url, pd, h))[0] for _ in range(rounds)]
                out["qido"].append((label, level, arm, total, pcts(first), offset if deep else None,
                                    pcts(deep) if deep else None))
                print(out["qido"][-1], flush=True)
        series = sorted(((st, se) for st in studies for se in st.series if se.modality != "SR"),
                        key=lambda x: -x[1].n)[:5]
        accept = {**clin, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        times, nbytes, ninst, meta = [], 0, 0, []
        for k in range(max(2, rounds // 8) + 1):
            for st, se in series:
                url = f"{base}/dicomweb/studies/{st.uid}/series/{se.uid}"
                dt, body, _ = await _get(http, url, None, accept)
                if k >= 1:  # after a warm-up pass
                    times.append(dt)
                    nbytes, ninst = nbytes + len(body), ninst + se.n
                dt, _, _ = await _get(http, url + "/metadata", None, {**clin, "Accept": "application/dicom+json"})
                if k >= 1:
                    meta.append(dt)
        out["wado"] = {"series": len(series), "instances": [se.n for _, se in series], "requests": len(times),
                       "inst_s": ninst / sum(times), "mb_s": nbytes / sum(times) / 2**20, "series_ms": pcts(times),
                       "metadata_ms": pcts(meta)}
        print(out["wado"], flush=True)
        tok = issue_dev_token(settings, subject="bench", roles=["analyst"], purpose=COHORT_PURPOSE, ttl_s=36000)
        ms, server, body = [], [], {}
        for i in range(rounds + warm):
            t0 = time.perf_counter()
            async with http.post(f"{base}/federation/cohort/count", json=COHORT_QUERY,
                                 headers={"Authorization": f"Bearer {tok}"}) as r:
                body = await r.json()
                if r.status != 200:
                    raise SystemExit(f"cohort count answered {r.status}: {body}")
            if i >= warm:
                ms.append(time.perf_counter() - t0)
                server.append(body["elapsed_ms"] / 1000)
        out["cohort"] = {"ms": pcts(ms), "server_ms": pcts(server), "count": body.get("count")}
        print(out["cohort"], flush=True)
    return out


def blob_bytes(data_dir: Path) -> int:
    total = 0
    for root, _, files in os.walk(data_dir / "blobs"):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


async def run(app, base: str, settings, data_dir: Path, args: argparse.Namespace, fhir_n: int,
              reuse: bool = False) -> tuple[list[str], list[dict]]:
    """Load and measure each ``--dicom-instances`` size; returns the markdown lines and, per size, the
    load (``stage``) and the measurements (:func:`measure`)."""
    targets = sizes(args.dicom_instances)
    patients = max(1, fhir_n // PER_PATIENT)
    full = plan(targets, patients, args.dicom_seed)
    marker = data_dir / "scale-dicom.json"
    shape = {"patients": patients, "seed": args.dicom_seed, "size": args.dicom_size, "batch": args.stow_batch,
             "uid_root": UID_ROOT}
    saved = json.loads(marker.read_text()) if reuse and marker.exists() else None
    if saved and (saved["shape"] != shape or saved["targets"] != targets[:len(saved["targets"])]):
        raise SystemExit(f"{marker}: loaded with another DICOM shape or sizes {saved['targets']} (a rerun may add "
                         "sizes after them); use another --data-dir")
    saved = saved or {"shape": shape, "targets": [], "base": None, "stages": []}
    if saved["base"] is None:
        saved["base"] = await db_size(app, data_dir)
    base_size = saved["base"]
    headers = {"Authorization": "Bearer " + issue_dev_token(settings, subject="pacs", roles=["pacs"], ttl_s=36000)}
    lines: list[str] = []
    measured: list[dict] = []
    for k, target in enumerate(targets):
        if k < len(saved["stages"]) - 1:  # measured when loaded: the store holds more now
            lines += saved["stages"][k].get("lines") or [f"### DICOM: {target:,} instances: not measured", ""]
            continue
        if k < len(saved["stages"]):
            stage = saved["stages"][k]
        else:
            todo = stage_of(full, k)
            t0 = time.perf_counter()
            work = [(st, study_bodies(st, args.dicom_size, args.stow_batch, args.dicom_seed)) for st in todo]
            gen_s = time.perf_counter() - t0
            tenths: list[tuple[int, float]] = []
            wall = await stow(base + "/dicomweb", headers, work, args.stow_concurrency, tenths)
            del work
            stage = {"instances": target, "sent": sum(st.instances for st in todo), "wall": wall, "gen_s": gen_s,
                     "tenths": tenths}
            saved["stages"].append(stage)
            saved["targets"].append(target)
            if reuse:
                marker.write_text(json.dumps(saved))
        await app[keys.DB].analyze()
        size = await db_size(app, data_dir)
        stored = upto(full, k)
        m = await measure(base, settings, stored, args.rounds)
        stage["lines"] = report(stage, m, len(stored), size - base_size, blob_bytes(data_dir), base_size, fhir_n, args)
        lines += stage["lines"]
        if reuse:
            marker.write_text(json.dumps(saved))
        measured.append({"stage": stage, "studies": stored, "db_growth": size - base_size, **m})
    return lines, measured


def report(stage: dict, m: dict, n_studies: int, grown: int, blobs: int, base_size: int, fhir_n: int,
           args: argparse.Namespace) -> list[str]:
    n = stage["instances"]
    rates = [c / s for c, s in stage["tenths"] if s > 0]
    la = os.getloadavg()
    out = [f"### DICOM: {n:,} instances ({n_studies:,} studies)", "",
           f"STOW-RS over HTTP ({args.stow_concurrency} studies at once, ≤ {args.stow_batch} instances a request, "
           f"{args.dicom_size}×{args.dicom_size} images): {stage['sent']:,} instances in {stage['wall']:.1f} s = "
           f"{stage['sent'] / stage['wall']:,.0f} instances/s; per tenth: " + ", ".join(f"{r:,.0f}" for r in rates)
           + (f" (last tenth / first: {rates[-1] / rates[0]:.2f})" if rates else "")
           + f"; generating the bodies (not in the rate) {stage['gen_s']:.1f} s. "
           f"Database growth {grown / 2**20:,.1f} MiB = {grown / n:,.0f} bytes/instance (FHIR before: "
           f"{base_size / max(1, fhir_n):,.0f} bytes/resource); blob store {blobs / n:,.0f} bytes/instance. "
           f"Load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}.", "",
           f"| QIDO-RS (`limit={LIMIT}`) | level | requester | matches | first page p50 / p95 ms | deep page "
           "p50 / p95 ms (offset) |", "|---|---|---|---:|---|---|"]
    for label, level, arm, total, (f50, f95), offset, deep in m["qido"]:
        d = f"{deep[0]:.1f} / {deep[1]:.1f} ({offset:,})" if deep else "— (one page)"
        out.append(f"| `{label}` | {level} | {arm} | {total:,} | {f50:.1f} / {f95:.1f} | {d} |")
    w, c = m["wado"], m["cohort"]
    out += ["", f"WADO-RS whole series (the {w['series']} longest: {', '.join(map(str, w['instances']))} instances; "
            f"{w['requests']} requests, clinician, one client): {w['inst_s']:,.0f} instances/s, {w['mb_s']:.1f} MB/s, "
            f"p50 / p95 {w['series_ms'][0]:.1f} / {w['series_ms'][1]:.1f} ms a series; series `/metadata` "
            f"p50 / p95 {w['metadata_ms'][0]:.1f} / {w['metadata_ms'][1]:.1f} ms.", "",
            f"Federation site cohort query (bench/federation_bench.py's: hypertension + cardiac MR ≤ 8 mm + SR "
            f"Finding LV with LVEF ≤ 50, with breakdowns; analyst, DUO:0000042), {args.rounds} requests: p50 / p95 "
            f"{c['ms'][0]:.1f} / {c['ms'][1]:.1f} ms (server-side {c['server_ms'][0]:.1f} / {c['server_ms'][1]:.1f}), "
            "released count " + (f"{c['count']:,}" if c["count"] is not None else "none (under the site's disclosure "
                                 "threshold, min_cell 5)") + ".", ""]
    return out
