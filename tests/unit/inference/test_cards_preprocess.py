"""Model cards (validation names the field), pre-processing against hand-computed values, repository layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from inference import preprocess
from inference.cards import CardError, Preprocess, parse_card, shipped_cards
from inference.repository import DEFAULT_REPOSITORY, ModelConfig, TensorSpec, list_models, parse_pbtxt, read_config

BASE = shipped_cards()[1].raw  # the segmenter


def _with(path: str, value):
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    d = doc
    for p in parents:
        d = d[int(p)] if p.isdigit() else d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return doc


@pytest.mark.parametrize("path,value,field", [
    ("name", KeyError, "name"),
    ("name", "bad name!", "name"),
    ("triton.model", 3, "triton.model"),
    ("selector.min_slices", "many", "selector.min_slices"),
    ("selector.min_slices", True, "selector.min_slices"),
    ("selector.max_slices", 0, "selector.max_slices"),
    ("selector.series_description", "([", "selector.series_description"),
    ("selector.modality", [1], "selector.modality"),
    ("preprocess.window_width", KeyError, "preprocess.window_width"),
    ("preprocess.window_width", -5, "preprocess.window_width"),
    ("preprocess.resize", [64], "preprocess.resize"),
    ("preprocess.channels", 2, "preprocess.channels"),
    ("outputs", [], "outputs"),
    ("outputs.0.kind", "regression", "outputs[0].kind"),
    ("outputs.0.threshold", 1.5, "outputs[0].threshold"),
    ("outputs.0.regions.0.type.scheme", "XYZ", "outputs[0].regions[0].type.scheme"),
    ("outputs.0.regions.0.category", KeyError, "outputs[0].regions[0]"),
    ("encodings", ["pdf"], "encodings"),
    ("purpose", "marketing", "purpose"),
    ("provenance.lineage_id", KeyError, "provenance.lineage_id"),
])
def test_card_errors_name_the_field(path, value, field):
    with pytest.raises(CardError) as ei:
        parse_card(_with(path, value))
    assert ei.value.field.startswith(field), (ei.value.field, str(ei.value))


def test_seg_encoding_needs_segmentation_output():
    doc = copy.deepcopy(shipped_cards()[0].raw)  # classifier
    doc["encodings"] = ["seg"]
    with pytest.raises(CardError) as ei:
        parse_card(doc)
    assert ei.value.field == "encodings"


def test_selector():
    sel = parse_card(_with("selector.series_description", "^ax")).selector
    row = {"modality": "ct", "body_part": "CHEST", "series_description": "Axial 2.5", "num_instances": 10}
    assert sel.matches(row, {"1.2.840.10008.5.1.4.1.1.2"})
    assert not sel.matches({**row, "modality": "MR"}, {"1.2.840.10008.5.1.4.1.1.2"})
    assert not sel.matches({**row, "series_description": "coronal"}, {"1.2.840.10008.5.1.4.1.1.2"})
    assert not sel.matches(row, {"1.2.840.10008.5.1.4.1.1.4"})
    assert not sel.matches({**row, "num_instances": 5000}, {"1.2.840.10008.5.1.4.1.1.2"})


def test_window_and_rescale_by_hand():
    stored = np.array([[0, 1024], [1064, 1224]], np.int16)  # HU -1024, 0, 40, 200 with intercept -1024
    hu = preprocess.to_hu(stored, 1.0, -1024.0)
    assert hu.tolist() == [[-1024, 0], [40, 200]]
    w = preprocess.window(hu, 40, 400)
    # PS3.3 C.11.2.1.2: (x - (c - 0.5)) / (w - 1) + 0.5, clipped
    expect = np.clip((hu - (40 - 0.5)) / 399 + 0.5, 0, 1)
    assert np.allclose(w, expect)


def test_resize_and_channels():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = preprocess.resize(img, (7, 7))
    assert out.shape == (7, 7) and out[0, 0] == 0 and out[-1, -1] == 15 and out[3, 3] == pytest.approx(7.5)
    x = preprocess.prepare(img, Preprocess(hu_rescale=False, resize=(4, 4), channels=3))
    assert x.shape == (3, 4, 4) and np.array_equal(x[2], img)


def test_repository_layout_roundtrip(tmp_path):
    assert list_models(DEFAULT_REPOSITORY) == ["ct_lesion_classifier", "ct_lesion_segmenter"]
    cfg = read_config(DEFAULT_REPOSITORY, "ct_lesion_segmenter")
    assert cfg.platform == "pytorch_libtorch" and cfg.max_batch_size == 16
    assert cfg.inputs == (TensorSpec("INPUT__0", "TYPE_FP32", (1, 64, 64)),)
    assert (DEFAULT_REPOSITORY / "ct_lesion_segmenter" / "1" / "model.pt").is_file()
    c = ModelConfig("m", (TensorSpec("A", "TYPE_FP32", (3, 8)),), (TensorSpec("B", "TYPE_INT64", (1,)),), 4)
    assert "dynamic_batching" in c.pbtxt()
    assert parse_pbtxt(c.pbtxt()) == ModelConfig("m", c.inputs, c.outputs, 4)
