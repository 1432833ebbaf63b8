"""SR content-item rows and SEG segment rows from the real demo files, checked against what highdicom reads
from the same files (an independent parser), plus the TID 1500 measurement-group semantics."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest

from mappings.dicom.seg import seg_segments
from mappings.dicom.sr import sr_items
from tests.conftest import data_path

SR_FILES = ["dcmqi/sr-tid1500/sr.dcm", "highdicom/sr_document.dcm", "highdicom/sr_document_with_multiple_groups.dcm",
            "pydicom/test-SR.dcm"]
SEG_FILES = ["dcmqi/seg/liver_seg_on_ct-3slice.dcm", "dcmqi/sr-tid1500/seg.dcm", "highdicom/seg_image_ct_binary.dcm",
             "highdicom/seg_image_ct_binary_overlap.dcm"]


def _read(rel: str) -> pydicom.Dataset:
    return pydicom.dcmread(data_path("dicom", *rel.split("/")))


@pytest.mark.parametrize("rel", SR_FILES)
def test_sr_rows_form_the_content_tree(rel):
    ds = _read(rel)
    rows = sr_items(ds)
    ids = {r["item_id"] for r in rows}
    assert rows[0]["item_id"] == "1" and rows[0]["parent_item_id"] is None and rows[0]["depth"] == 0
    for r in rows[1:]:
        assert r["parent_item_id"] in ids  # every item hangs under an existing parent
        assert r["item_id"].startswith(r["parent_item_id"] + ".")
        assert r["depth"] == r["item_id"].count(".")
        parent_path = next(p["concept_path"] for p in rows if p["item_id"] == r["parent_item_id"])
        assert r["concept_path"].startswith(parent_path + "/")
    # the document title is the root's concept name
    title = ds.ConceptNameCodeSequence[0]
    assert (rows[0]["concept_scheme"], rows[0]["concept_code"]) == (title.CodingSchemeDesignator, title.CodeValue)


@pytest.mark.parametrize("rel", [f for f in SR_FILES if f.startswith(("dcmqi", "highdicom"))])
def test_tid1500_measurements_match_highdicom(rel):
    ds = _read(rel)
    report = hd.sr.srread(data_path("dicom", *rel.split("/")))
    c = report.content
    all_groups = (c.get_image_measurement_groups() + c.get_planar_roi_measurement_groups()
                  + c.get_volumetric_roi_measurement_groups())
    expected = []
    for group in all_groups:
        for m in group.get_measurements():
            expected.append((m.name.value, float(m.value), m.unit.value))
    rows = sr_items(ds)
    # highdicom's measurements are the NUM items directly contained in a measurement group
    got = [(r["concept_code"], r["num_value"], r["unit_code"]) for r in rows
           if r["value_type"] == "NUM" and r["parent_item_id"] == r["group_item_id"]
           and any(g["item_id"] == r["group_item_id"] and g["concept_code"] == "125007" for g in rows)]
    got, expected = sorted(got), sorted(expected)
    assert [(c, u) for c, _, u in got] == [(c, u) for c, _, u in expected]
    assert [v for _, v, _ in got] == pytest.approx([v for _, v, _ in expected], rel=1e-9)  # DS string vs FD value
    # every measurement's group is a TID 1501 measurement group (DCM 125007) that contains it
    groups = {r["item_id"] for r in rows if (r["concept_scheme"], r["concept_code"]) == ("DCM", "125007")}
    assert len(groups) == len(all_groups)
    for r in rows:
        if r["group_item_id"] in groups:
            assert r["item_id"] == r["group_item_id"] or r["item_id"].startswith(r["group_item_id"] + ".")


@pytest.mark.parametrize("rel", SEG_FILES)
def test_seg_segments_match_highdicom(rel):
    ds = _read(rel)
    seg = hd.seg.Segmentation.from_dataset(ds)
    expected = sorted((n, seg.get_segment_description(n).segment_label,
                       seg.get_segment_description(n).segmented_property_type.value)
                      for n in seg.segment_numbers)
    got = sorted((r["segment_number"], r["label"], r["type_code"]) for r in seg_segments(ds))
    assert got == expected
    refs = {r["ref_series_uid"] for r in seg_segments(ds)}
    assert refs and None not in refs
