"""Template contexts of the console's views (pure): service answers in, what the templates show out.

Nothing here reads data: every answer comes from a service called with the signed-in requester."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from gateway.ui import charts

#: breakdown name → (title, fixed category order or None)
BREAKDOWN_TITLES = {"sex": ("Sex", ["female", "male", "other", "unknown"]),
                    "age_band": ("Age band", ["0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+", "unknown"]),
                    "modality": ("Modality", None), "manufacturer": ("Manufacturer", None)}
SITE_STATUS_WORDS = {"ok": "answered", "refused": "refused the query", "timeout": "did not answer in time",
                     "error": "failed to answer"}


def cell(v: Any) -> str:
    """A released count as shown: None (suppressed at the site) → "<5"."""
    return "<5" if v is None else str(v)


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cohort_result(ans: dict, purpose: str) -> dict:
    """The cohort answer of ``HubService.query`` → sites table, pooled figures, breakdown and stats tables, charts."""
    per_site = ans.get("per_site") or {}
    sites = []
    for s in ans.get("sites") or []:
        ok = s.get("status") == "ok"
        sites.append({"site": s["site"], "status": s.get("status"), "words": SITE_STATUS_WORDS.get(s.get("status"), s.get("status")),
                      "count": cell(s.get("count")) if ok else "—", "ms": round(s.get("elapsed_ms") or 0),
                      "error": s.get("error") or ""})
    site_ids = [s["site"] for s in sites if s["status"] == "ok"]
    breakdowns = []
    for name, pooled in (ans.get("breakdowns") or {}).items():
        title, order = BREAKDOWN_TITLES.get(name, (name, None))
        cats = list(order or []) if order else []
        for sid in site_ids:
            for c in ((per_site.get(sid) or {}).get("breakdowns") or {}).get(name, {}):
                if c not in cats:
                    cats.append(c)
        for c in pooled:
            if c not in cats:
                cats.append(c)
        if not order:
            cats.sort()
        rows = [{"category": c, "sites": [cell(((per_site.get(sid) or {}).get("breakdowns") or {}).get(name, {}).get(c))
                                          for sid in site_ids], "pooled": cell(pooled.get(c))}
                for c in cats if c in pooled or any(c in (((per_site.get(sid) or {}).get("breakdowns") or {}).get(name) or {})
                                                    for sid in site_ids)]
        series = {sid: ((per_site.get(sid) or {}).get("breakdowns") or {}).get(name, {}) for sid in site_ids}
        breakdowns.append({"name": name, "title": title, "rows": rows,
                           "spec": charts.breakdown_bars(title, series, order)})
    stats = []
    for name, pooled in (ans.get("stats") or {}).items():
        labels = pooled.get("bins") or []
        hists = {sid: (((per_site.get(sid) or {}).get("stats") or {}).get(name) or {}).get("histogram") or [None] * len(labels)
                 for sid in site_ids}
        q = pooled.get("quantiles") or {}
        stats.append({"name": name, "count": cell(pooled.get("count")), "mean": pooled.get("mean"), "std": pooled.get("std"),
                      "p25": q.get("p25"), "p50": q.get("p50"), "p75": q.get("p75"),
                      "rows": [{"bin": lab, "sites": [cell(hists[sid][i] if i < len(hists[sid]) else None) for sid in site_ids],
                                "pooled": cell((pooled.get("histogram") or [None] * len(labels))[i])}
                               for i, lab in enumerate(labels)],
                      "spec": charts.histogram(name, labels, hists)})
    return {"sites": sites, "site_ids": site_ids, "total": cell(ans.get("count")), "partial": ans.get("partial"),
            "answered": len(site_ids), "asked": len(sites), "breakdowns": breakdowns, "stats": stats,
            "elapsed_ms": round(ans.get("elapsed_ms") or 0), "purpose": purpose}


def consent_matrix(m: dict, withdrawals: list[dict]) -> dict:
    rows = m["profiles"]
    spec = charts.bars("Withdrawn consents by day", withdrawals, "day", "withdrawn") if withdrawals else None
    matrix_spec = charts.bars("Patients permitted per purpose",
                              [{"purpose": p["label"], "patients": t} for p, t in zip(m["purposes"], m["totals"])],
                              "purpose", "patients")
    return {"purposes": m["purposes"], "rows": rows, "totals": m["totals"], "patients": m["patients"],
            "no_profile": m["no_profile"], "withdrawals": withdrawals, "withdrawal_spec": spec,
            "matrix_spec": matrix_spec}


def monitoring(report: dict, by: str) -> dict:
    points = (report.get("timeline") or {}).get("points") or []
    perf = report.get("performance") or {}
    subgroups = []
    for key in ("sex", "age_band", "manufacturer"):
        for group, p in (perf.get(key) or {}).items():
            subgroups.append({"key": key, "group": group, **p})
    drift = []
    for scanner, d in ((report.get("drift") or {}).get(f"by_{by}") or {}).items():
        drift.append({"scanner": scanner, "n": d["n"], "score_psi": d["drift"]["score"]["psi"],
                      "input_psi": d["drift"]["input_mean"]["psi"]})
    jobs = [{**j, "when": when(j["ts"])} for j in report.get("jobs") or []]
    return {"report": report, "by": by, "drift": drift, "subgroups": subgroups, "overall": perf.get("overall") or {},
            "score_spec": charts.timeline(points, by, "mean_score", "Mean model score over time"),
            "input_spec": charts.timeline(points, by, "mean_input", "Mean input intensity over time"),
            "energy_spec": charts.bars("Energy per inference job (J)", [
                {"job": j["job"][:8], "energy_j": j["energy_j"], by: j.get(by) or "unknown"} for j in jobs
                if j["energy_j"] is not None], "job", "energy_j", by) if jobs else None,
            "jobs": jobs}


def training_run(run: dict) -> dict:
    rounds = run.get("rounds") or []
    #: consented patients each site trained and tested on, per round (the run's lineage)
    lineage = {(r["round"], site): v for r in ((run.get("lineage") or {}).get("rounds") or [])
               for site, v in (r.get("sites") or {}).items()}
    metric_rows, count_rows, energy_rows, table = [], [], [], []
    for r in rounds:
        for site, v in sorted(r["sites"].items()):
            m = v.get("metrics") or {}
            lin = lineage.get((r["round"], site)) or {}
            p_train, p_test = lin.get("patients_train"), lin.get("patients_test")
            n = (p_train or 0) + (p_test or 0) if p_train is not None else None
            table.append({"round": r["round"], "site": site, "status": v.get("status"), "n_train": v.get("n_train"),
                          "n_test": v.get("n_test"), "patients": n, "p_train": p_train, "p_test": p_test,
                          "metrics": {k: val for k, val in m.items() if isinstance(val, (int, float)) and not isinstance(val, bool)},
                          "energy_j": v.get("energy_j"), "co2e_g": v.get("co2e_g"), "detail": v.get("detail") or ""})
            for k, val in m.items():
                if k in ("auroc", "loss", "accuracy", "dice") and isinstance(val, (int, float)):
                    metric_rows.append({"round": r["round"], "site": site, "metric": k, "value": val, "series": f"{site} {k}"})
            if n is not None:
                count_rows.append({"round": r["round"], "site": site, "patients": n})
            if v.get("energy_j") is not None:
                energy_rows.append({"round": r["round"], "site": site, "energy_j": v["energy_j"]})
    metric_names = sorted({k for row in table for k in row["metrics"]})
    return {"run": run, "table": table, "metric_names": metric_names,
            "sites": sorted({row["site"] for row in table}),
            "metric_spec": charts.lines("Metrics per round and site", metric_rows, "round", "value", "series") if metric_rows else None,
            "count_spec": charts.bars("Consented patients per round and site", count_rows, "round", "patients", "site") if count_rows else None,
            "energy_spec": charts.bars("Energy per round and site (J)", energy_rows, "round", "energy_j", "site") if energy_rows else None,
            "created": when(run.get("created")), "updated": when(run.get("updated"))}


def job_results(job: dict) -> list[str]:
    """What a job wrote, as lines: "SR series 1.2…", "FHIR DiagnosticReport/inf-…"."""
    out = []
    res = job.get("result") or {}
    for kind, ref in (res.get("dicom") or {}).items():
        uid = ref.get("series") if isinstance(ref, dict) else ref
        out.append(f"{kind.upper()} series {uid}")
    for kind, ref in (res.get("fhir") or {}).items():
        refs = ref if isinstance(ref, list) else [ref]
        out += [f"FHIR {kind}/{r}" for r in refs if isinstance(r, str)][:3]
    return out


def audit_rows(events: list[dict]) -> list[dict]:
    out = []
    for e in events:
        who = next((a.get("who", {}).get("display") or a.get("who", {}).get("identifier", {}).get("value")
                    for a in e.get("agent") or [] if a.get("requestor")), "")
        patients = [x["what"]["reference"] for x in e.get("entity") or []
                    if (x.get("type") or {}).get("code") == "1" and (x.get("what") or {}).get("reference")]
        out.append({"id": e.get("id"), "recorded": e.get("recorded", ""), "action": e.get("action", ""),
                    "subtype": ", ".join(s.get("code", "") for s in e.get("subtype") or []),
                    "outcome": e.get("outcome", ""), "outcome_desc": e.get("outcomeDesc", ""), "who": who,
                    "patients": ", ".join(patients)})
    return out


__all__ = ["audit_rows", "cell", "cohort_result", "consent_matrix", "monitoring", "training_run", "when"]
