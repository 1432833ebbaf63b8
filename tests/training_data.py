"""Synthetic labelled CT slices for the federated-training tests and benchmark.

Each site has its own *kind* of lesion, so a model trained at one site alone does not recognise the
others' (a real learning signal that only pooling — federated — can learn; in a quick simulation with
12 rounds × 1 epoch, Adam lr 0.01, two data seeds: federated pooled AUROC 1.0, local-only 0.80–0.82 /
0.33–0.43 / 0.80–0.82):

- ``bright``: a small sharp hyperdense nodule (radius 3–5 px, +180..+240 HU);
- ``dark``: a large smooth hypodense area (Gaussian profile, σ 7–9 px, −180..−230 HU at its centre);
- ``ring``: a thin sharp hyperdense annulus (radius 6–9 px, 1.5 px wide).

Patients with a lesion carry a FHIR Condition (SNOMED CT 52988006 "Lesion"); every patient has a Patient
(identifier ``urn:fedgate:test|<id>``, matched by the DICOM PatientID), a research Consent (DUO GRU) and
``slices`` CT instances (64×64, stored values = HU + 1024) in one study.
"""

from __future__ import annotations

import numpy as np

from tests.dicom_synth import ct_series

SIZE = 64
LESION = {"system": "http://snomed.info/sct", "code": "52988006"}
DUO = "http://purl.obolibrary.org/obo/duo"
KINDS = ("bright", "dark", "ring")
MANUFACTURERS = {"bright": "ACME", "dark": "Globex", "ring": "Initech"}


def slice_hu(rng: np.random.Generator, lesion: bool, kind: str, size: int = SIZE) -> np.ndarray:
    return slice_and_mask(rng, lesion, kind, size)[0]


def slice_and_mask(rng: np.random.Generator, lesion: bool, kind: str, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, lesion mask) — the mask is what a reader would outline (the dark area: where it is at
    least half as deep as at its centre)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # a field of view inside soft tissue (no air boundary: max-pooled features then see dark and bright alike)
    img = np.full((size, size), 40.0, np.float32)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    mask = np.zeros((size, size), bool)
    if lesion:
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        if kind == "bright":  # a small, sharp hyperdense nodule
            r = rng.uniform(3.0, 5.0)
            mask = d2 <= r * r
            img[mask] += rng.uniform(180, 240)
        elif kind == "dark":  # a large, smooth hypodense area (Gaussian profile: no sharp edge)
            sigma = rng.uniform(7.0, 9.0)
            img -= rng.uniform(180, 230) * np.exp(-d2 / (2 * sigma * sigma)).astype(np.float32)
            mask = d2 <= 2 * sigma * sigma * np.log(2)
        else:  # ring: a thin sharp hyperdense annulus
            r = rng.uniform(6.0, 9.0)
            mask = (d2 <= r * r) & (d2 >= (r - 1.5) ** 2)
            img[mask] += rng.uniform(180, 240)
    return img, mask


def window01(hu: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    """PS3.3 C.11.2.1.2 linear window to [0, 1] (written out here, independently of inference.preprocess)."""
    lo = center - 0.5 - (width - 1) / 2
    return np.clip((hu - lo) / (width - 1), 0, 1).astype(np.float32)


def pooled_test_set(n_per_kind: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 64, 64) windowed inputs and labels, half positive, equally from every site's kind."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for kind in KINDS:
        for i in range(n_per_kind):
            lesion = bool(i % 2)
            xs.append(window01(slice_hu(rng, lesion, kind))[None])
            ys.append(int(lesion))
    return np.stack(xs), np.array(ys)


def auroc(labels, scores) -> float:
    """Probability that a random positive scores above a random negative (ties ½), by direct counting."""
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def site_population(site: str, kind: str, n_patients: int, slices: int = 3, seed: int = 0, seg: bool = False):
    """(FHIR transaction bundle, DICOM datasets, {patient id: lesion}) for one site; with ``seg`` every
    patient with a lesion also gets a DICOM SEG (segment "lesion") outlining it on its slices."""
    rng = np.random.default_rng(seed)
    entries, datasets, labels = [], [], {}
    for i in range(n_patients):
        pid = f"{site}-p{i:03d}"
        lesion = bool(i % 2)
        labels[pid] = lesion
        sex = "female" if i % 4 < 2 else "male"
        birth = f"{1950 + (i * 7) % 50}-03-01"
        res = [{"resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:fedgate:test", "value": pid}],
                "gender": sex, "birthDate": birth},
               {"resourceType": "Consent", "id": f"c-{pid}", "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                      "code": "research"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
                "patient": {"reference": f"Patient/{pid}"},
                "policyRule": {"coding": [{"system": DUO, "code": "DUO:0000042"}]},
                "provision": {"type": "permit", "purpose": [{"system": DUO, "code": "DUO:0000042"}]}}]
        if lesion:
            res.append({"resourceType": "Condition", "id": f"cond-{pid}", "subject": {"reference": f"Patient/{pid}"},
                        "code": {"coding": [dict(LESION, display="Lesion")]},
                        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                       "code": "active"}]}})
        entries += [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]
        pairs = [slice_and_mask(rng, lesion, kind) for _ in range(slices)]
        series = ct_series(patient_id=pid, patient_name=f"Test^{pid}", accession=f"A{pid[-6:]}",
                           manufacturer=MANUFACTURERS[kind], sex=sex[0].upper(), birth_date=birth.replace("-", ""),
                           pixels=[np.round(img + 1024) for img, _ in pairs])
        datasets += series
        if seg and lesion:
            datasets.append(lesion_seg(series, np.stack([m for _, m in pairs])))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, datasets, labels


def lesion_seg(sources, masks: np.ndarray):
    """A BINARY DICOM SEG (highdicom) with one segment "lesion" (SCT 52988006) over ``sources``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept("52988006", "SCT", "Lesion"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="fedgate tests", manufacturer_model_name="reader", software_versions="1",
        device_serial_number="1", omit_empty_frames=False)
