"""Model outputs → DICOM SR (TID 1500 Measurement Report) and DICOM SEG with highdicom, plus the summary
the FHIR DiagnosticReport/Observations are built from.  Pure functions (run in a worker thread).

UIDs are derived from the job id, so re-running a job after a crash produces the same SOP Instance UIDs
(the store then recognises the instance instead of duplicating it).
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.cards import Code, ModelCard

MANUFACTURER = "fedgate"
#: Local concepts (no standard DCM/SCT code fits a raw model score or a voxel count); documented in docs/inference.md.
SCORE = hd.sr.CodedConcept("model-score", "99FEDGATE", "Model score")
VOXELS = hd.sr.CodedConcept("voxel-count", "99FEDGATE", "Segmented voxel count")


def job_uid(job_id: str, what: str) -> str:
    return generate_uid(entropy_srcs=["fedgate-inference", job_id, what])


def _cc(c: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(c.value, c.scheme, c.meaning)


@dataclass
class Finding:
    """Series-level result of one output."""

    kind: str
    label: str
    code: Code
    score: float  # classification: max probability of the positive class; segmentation: max voxel probability
    positive: bool
    volume_voxels: int = 0
    slices: tuple[int, ...] = ()  # indices of slices above threshold


def summarise(card: ModelCard, outputs: dict[str, np.ndarray]) -> list[Finding]:
    found = []
    for o in card.outputs:
        y = outputs[o.tensor]
        if o.kind == "classification":
            label, code = o.classes[-1]  # the last class is the finding; earlier ones are "absent"
            p = y[:, len(o.classes) - 1]
            pos = np.nonzero(p >= o.threshold)[0]
            found.append(
                Finding(
                    "classification", label, code, float(p.max()), bool(len(pos)), slices=tuple(int(i) for i in pos)
                )
            )
        else:
            label, _, typ = o.regions[0]
            m = y[:, 0] >= o.threshold
            pos = np.nonzero(m.reshape(len(m), -1).any(1))[0]
            found.append(
                Finding(
                    "segmentation", label, typ, float(y.max()), bool(m.any()), int(m.sum()), tuple(int(i) for i in pos)
                )
            )
    return found


def _algorithm(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=card.name, version=card.version, family=codes.cid7162.ArtificialIntelligence
    )


def build_seg(card: ModelCard, job_id: str, sources: list[Dataset], probs: np.ndarray) -> Dataset:
    """probs: (N, 1, h, w) model output for the N source slices (in order) → a BINARY SEG at source size."""
    o = next(o for o in card.outputs if o.kind == "segmentation")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    m = probs[:, 0] >= o.threshold
    if m.shape[1:] != (rows, cols):  # nearest-neighbour back to the source grid
        yi = np.arange(rows) * m.shape[1] // rows
        xi = np.arange(cols) * m.shape[2] // cols
        m = m[:, yi][:, :, xi]
    label, category, typ = o.regions[0]
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=_cc(category),
        segmented_property_type=_cc(typ),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(card),
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=m.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=job_uid(job_id, "seg-series"),
        series_number=9001,
        sop_instance_uid=job_uid(job_id, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        device_serial_number=card.key,
        series_description=f"{card.name} {card.version} SEG"[:64],
        omit_empty_frames=False,
    )


def build_sr(
    card: ModelCard, job_id: str, sources: list[Dataset], findings: list[Finding], seg: Dataset | None = None
) -> Dataset:
    """TID 1500 measurement report: per output a measurement group with a qualitative evaluation
    (finding present/absent), the score (and lesion voxel count for segmentations), referencing the source images."""
    algo = hd.sr.AlgorithmIdentification(name=card.name, version=card.version)
    groups = []
    for i, f in enumerate(findings):
        present = codes.SCT.Present if f.positive else codes.SCT.Absent
        measurements = [
            hd.sr.Measurement(
                name=SCORE, value=round(f.score, 6), unit=hd.sr.CodedConcept("1", "UCUM", "no units"), algorithm_id=algo
            )
        ]
        if f.kind == "segmentation":
            measurements.append(
                hd.sr.Measurement(
                    name=VOXELS,
                    value=float(f.volume_voxels),
                    unit=hd.sr.CodedConcept("{voxels}", "UCUM", "voxels"),
                    algorithm_id=algo,
                )
            )
        imgs = [sources[j] for j in (f.slices or range(len(sources)))]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=job_uid(job_id, f"track-{i}"), identifier=f"{card.name} {f.label}"
                ),
                finding_type=_cc(f.code),
                algorithm_id=algo,
                measurements=measurements,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(_cc(f.code), present)],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(d) for d in imgs[:50]],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=job_uid(card.key, "device"), name=card.name, manufacturer_name=MANUFACTURER, model_name=card.version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    evidence = list(sources) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=job_uid(job_id, "sr-series"),
        series_number=9000,
        sop_instance_uid=job_uid(job_id, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"{card.name} {card.version} SR"[:64],
    )
