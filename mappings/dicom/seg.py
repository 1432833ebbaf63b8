"""SEG instances → segment rows (``dcm_seg_segment``): label, algorithm type, category and property
type codes, and the series the segmentation was derived from. Pure (pydicom dataset in, dicts out)."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset


def _code(item: Dataset, keyword: str) -> tuple[str | None, str | None, str | None]:
    seq = item.get(keyword)
    if not seq:
        return None, None, None
    c = seq[0]
    return (
        str(c.get("CodingSchemeDesignator") or "") or None,
        str(c.get("CodeValue") or "") or None,
        str(c.get("CodeMeaning") or "") or None,
    )


def referenced_series(ds: Dataset) -> str | None:
    """The source series: ReferencedSeriesSequence, else the first per-frame derivation source's series."""
    ref = ds.get("ReferencedSeriesSequence")
    if ref and ref[0].get("SeriesInstanceUID"):
        return str(ref[0].SeriesInstanceUID)
    for item in ds.get("SharedFunctionalGroupsSequence") or ():
        for der in item.get("DerivationImageSequence") or ():
            for src in der.get("SourceImageSequence") or ():
                if src.get("ReferencedSeriesInstanceUID"):
                    return str(src.ReferencedSeriesInstanceUID)
    return None


def seg_segments(ds: Dataset) -> list[dict[str, Any]]:
    ref_series = referenced_series(ds)
    out = []
    for seg in ds.get("SegmentSequence") or ():
        cat = _code(seg, "SegmentedPropertyCategoryCodeSequence")
        typ = _code(seg, "SegmentedPropertyTypeCodeSequence")
        out.append(
            {
                "segment_number": int(seg.SegmentNumber),
                "label": str(seg.get("SegmentLabel") or "") or None,
                "algorithm_type": str(seg.get("SegmentAlgorithmType") or "") or None,
                "category_scheme": cat[0],
                "category_code": cat[1],
                "category_meaning": cat[2],
                "type_scheme": typ[0],
                "type_code": typ[1],
                "type_meaning": typ[2],
                "ref_series_uid": ref_series,
            }
        )
    return out
