"""The console's pure view helpers (issue 28): suppressed cells read "<5" and never become chart bars, a site
that did not answer is said so and adds nothing, and the charts are valid Vega-Lite shapes."""

from __future__ import annotations

from gateway.ui import charts, views


def _answer() -> dict:
    per_site = {
        "a": {"count": 20, "breakdowns": {"sex": {"female": 15, "male": None}},
              "stats": {"age": {"bins": ["[0,50)", "[50,100)"], "histogram": [None, 10]}}},
        "b": {"count": None, "breakdowns": {"sex": {"female": None, "male": None}},
              "stats": {"age": {"bins": ["[0,50)", "[50,100)"], "histogram": [None, None]}}},
    }
    return {"count": 20, "partial": True, "elapsed_ms": 12.3,
            "sites": [{"site": "a", "status": "ok", "count": 20, "elapsed_ms": 5},
                      {"site": "b", "status": "ok", "count": None, "elapsed_ms": 6},
                      {"site": "c", "status": "timeout", "error": "no answer within 5 s", "elapsed_ms": 5000}],
            "breakdowns": {"sex": {"female": 15, "male": None}},
            "stats": {"age": {"count": 10, "mean": 60.0, "std": 5.0, "bins": ["[0,50)", "[50,100)"],
                              "histogram": [None, 10], "quantiles": {"p25": 55, "p50": 60, "p75": 65}}},
            "per_site": per_site}


def test_cohort_result_words_and_suppression():
    ctx = views.cohort_result(_answer(), "research:DUO:0000006")
    assert [(s["site"], s["count"], s["words"]) for s in ctx["sites"]] == [
        ("a", "20", "answered"), ("b", "<5", "answered"), ("c", "—", "did not answer in time")]
    assert ctx["answered"] == 2 and ctx["asked"] == 3 and ctx["partial"]
    (sex,) = ctx["breakdowns"]
    assert [(r["category"], r["sites"], r["pooled"]) for r in sex["rows"]] == [
        ("female", ["15", "<5"], "15"), ("male", ["<5", "<5"], "<5")]
    assert sex["spec"]["data"]["values"] == [{"category": "female", "site": "a", "patients": 15}]
    (age,) = ctx["stats"]
    assert [(r["bin"], r["sites"], r["pooled"]) for r in age["rows"]] == [
        ("[0,50)", ["<5", "<5"], "<5"), ("[50,100)", ["10", "<5"], "10")]
    assert age["spec"]["data"]["values"] == [{"bin": "[50,100)", "order": 1, "site": "a", "patients": 10}]


def test_chart_specs_are_vega_lite():
    for spec in (charts.bars("t", [{"x": "a", "y": 1}], "x", "y"), charts.lines("t", [], "x", "y", "s"),
                 charts.timeline([{"t": 1.0, "manufacturer": "ACME", "mean_score": 0.5, "n": 1}], "manufacturer",
                                 "mean_score", "t")):
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        assert spec["mark"]["type"] in ("bar", "line") and "x" in spec["encoding"] and "y" in spec["encoding"]


def test_training_run_patients_from_lineage():
    run = {"id": "r", "state": "succeeded", "round": 1, "spec": {"rounds": 1}, "created": 0, "updated": 1,
           "lineage": {"rounds": [{"round": 1, "sites": {"a": {"patients_train": 8, "patients_test": 2}}}]},
           "rounds": [{"round": 1, "sites": {"a": {"status": "ok", "n_train": 24, "n_test": 6,
                                                  "metrics": {"auroc": 0.9, "n": 6}, "energy_j": 1.0, "co2e_g": 0.1}}},
                      {"round": 2, "sites": {"a": {"status": "ok", "n_train": 0, "n_test": 6, "metrics": {"auroc": 0.95}}}}]}
    ctx = views.training_run(run)
    assert [(t["round"], t["patients"], t["p_train"], t["p_test"]) for t in ctx["table"]] == [(1, 10, 8, 2), (2, None, None, None)]
    assert ctx["count_spec"]["data"]["values"] == [{"round": 1, "site": "a", "patients": 10}]
    assert ctx["metric_names"] == ["auroc", "n"]
