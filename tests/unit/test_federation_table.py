"""``fedgate query``'s table footer explains every suppressed or rounded figure of the merged answer."""

from __future__ import annotations

import io

from gateway.federation_cli import render_table, table_notes
from gateway.services.federation import CohortRequest, merge


def _site(site: str, count, sex: dict, modality: dict) -> dict:
    return {"site": site, "status": "ok", "elapsed_ms": 12.0, "result": {
        "count": count, "consent": {"eligible": count},
        "breakdowns": {"sex": sex, "modality": modality},
        "disclosure": {"min_cell": 5, "round_base": 5, "method": "cell-key rounding"}}}


def test_footer_names_complementary_suppression_rounding_and_multi_valued_breakdowns():
    req = CohortRequest.from_json({"cohort": {"age": {"min": 0}}, "breakdowns": ["sex", "modality"]})
    answers = [
        # one small cell (other) hidden, so the next smallest (male) is hidden too: complementary suppression
        _site("a", 180, {"female": 135, "male": None, "other": None, "unknown": None}, {"CT": 150, "MR": 90}),
        _site("b", 185, {"female": 135, "male": None, "other": None, "unknown": None}, {"CT": 120, "MR": 100}),
        {"site": "c", "status": "timeout", "error": "no answer within 5 s", "elapsed_ms": 5000.0},
    ]
    ans = merge(answers, req)
    notes = "\n".join(table_notes(ans))
    assert "Complementary suppression" in notes and "sex (270 shown of 365, 3 cells suppressed)" in notes
    assert "multiple of 5" in notes and "fewer than 5 patients" in notes
    assert "modality: a patient with series of several kinds is counted under each" in notes
    assert "Partial: 2 of 3 sites answered" in notes
    out = io.StringIO()
    render_table(ans, out)
    text = out.getvalue()
    assert "TOTAL" in text and "365" in text and notes in text


def test_footer_without_suppression_does_not_claim_it():
    req = CohortRequest.from_json({"cohort": {"age": {"min": 0}}, "breakdowns": ["sex"]})
    ans = merge([_site("a", 20, {"female": 10, "male": 10, "other": None, "unknown": None}, {})], req)
    notes = "\n".join(table_notes(ans))
    assert "Complementary suppression" not in notes and "Partial" not in notes
