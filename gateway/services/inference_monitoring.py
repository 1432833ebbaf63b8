"""Model monitoring for site administrators: drift (PSI of score and input mean, current window vs reference
window, overall and per scanner), running performance against reference-standard FHIR Observations (read
through the consent gate with the requester's scope), energy and a timeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import select

from gateway.context import Requester
from gateway.errors import Forbidden
from gateway.services.access import AccessRecord
from gateway.services.inference import _SCHEME_OF, REFERENCE_TAG_SYSTEM, _finding_codes
from gateway.store import inference_reads as reads
from gateway.store.scope import AccessScope
from inference.cards import ModelCard

if TYPE_CHECKING:  # pragma: no cover
    from gateway.services.inference import InferenceService


async def report(self: "InferenceService", requester: Requester, model: str, version: str | None,
                 since: float | None, scanner_key: str = "manufacturer") -> dict[str, Any]:
    """Drift (PSI of score and input mean: current window vs reference window, overall and per scanner),
    running performance against reference-standard FHIR Observations, and energy."""
    from gateway.store.jobs_schema import inf_observation as O
    from inference import monitoring as mon

    if not requester.has_role("admin", "site"):
        raise Forbidden("model monitoring is for site administrators (role admin or site)")
    scope = await self.gate.scope_for(requester)  # the reference standard is patient data
    async with self.db.read() as conn:
        card = await self._card(conn, model, version)
        rows = [dict(r) for r in (await conn.execute(select(O).where(
            O.c.model_name == card.name, O.c.model_version == card.version).order_by(O.c.ts))).mappings()]
        truth = await _reference_standard(conn, scope, card)
    if since is None and rows:
        since = rows[len(rows) // 2]["ts"]  # default split: the older half is the reference
    ref = [r for r in rows if since is not None and r["ts"] < since]
    cur = [r for r in rows if since is None or r["ts"] >= since]
    alerts: list[dict] = []

    def drift(cur_rows: list[dict], who: str) -> dict:
        out = {}
        for metric in ("score", "input_mean"):
            a = [r[metric] for r in ref if r[metric] is not None]
            b = [r[metric] for r in cur_rows if r[metric] is not None]
            value = mon.psi(a, b)
            out[metric] = {"psi": None if value is None else round(value, 4), "n_reference": len(a),
                           "n_current": len(b), "mean_current": round(sum(b) / len(b), 4) if b else None}
            if value is not None and value > self.config.drift_alert:
                alerts.append({"scope": who, "metric": metric, "psi": round(value, 4),
                               "threshold": self.config.drift_alert})
        return out

    by_scanner = {k: {"n": len(v), "drift": drift(v, f"{scanner_key}={k}")}
                  for k, v in mon.group(cur, scanner_key).items()}
    overall = drift(cur, "all")
    labelled = [(truth[r["study_uid"]], r) for r in rows if r["study_uid"] in truth and r["score"] is not None]
    threshold = next((o.threshold for o in card.outputs if o.threshold is not None), 0.5)

    def perf(items: list) -> dict:
        labels, scores = [t for t, _ in items], [r["score"] for _, r in items]
        sens, spec = mon.sensitivity_specificity(labels, scores, threshold)
        auc = mon.auroc(labels, scores)
        return {"n": len(items), "positives": sum(labels), "auroc": None if auc is None else round(auc, 4),
                "sensitivity": sens, "specificity": spec, "threshold": threshold}

    performance = {"overall": perf(labelled)}
    for key in ("sex", "age_band", "manufacturer"):
        groups: dict[str, list] = {}
        for t, r in labelled:
            groups.setdefault(str(r.get(key) or "unknown"), []).append((t, r))
        performance[key] = {k: perf(v) for k, v in sorted(groups.items())}
    energy = [r["energy_j"] for r in rows if r["energy_j"] is not None]
    per_kwh = self.config.carbon_g_per_kwh
    span = (rows[-1]["ts"] - rows[0]["ts"]) if rows else 0.0
    # time buckets: the coarsest of day, hour, 10 min, minute, 10 s, second giving about six points or more
    bucket = next((b for b in (86400, 3600, 600, 60, 10) if span / b >= 6), 1)
    timeline: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        timeline.setdefault((r["ts"] // bucket * bucket, str(r.get(scanner_key) or "unknown")), []).append(r)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None
    await self.audit.record(AccessRecord(requester, "R", "inference-monitoring", "0", (), (), "",
                                         f"model {card.key}"))
    return {
        "model": card.key, "site": self.config.site_id, "inferences": len(rows),
        "window": {"since": since, "reference": len(ref), "current": len(cur)},
        "drift": {"overall": overall, f"by_{scanner_key}": by_scanner}, "alerts": alerts,
        "performance": performance,
        "energy": {"total_j": round(sum(energy), 6), "per_inference_j": round(sum(energy) / len(energy), 6)
                   if energy else None, "cpu_watts": self.config.cpu_watts,
                   "co2e_g": round(sum(energy) / 3.6e6 * per_kwh, 9), "carbon_g_per_kwh": per_kwh},
        # drift over time: mean score and input per scanner and time bucket (all rows, reference included)
        "timeline": {"bucket_s": bucket, "points": [
            {"t": t, scanner_key: k, "n": len(v), "mean_score": mean([x["score"] for x in v]),
             "mean_input": mean([x["input_mean"] for x in v])} for (t, k), v in sorted(timeline.items())]},
        "jobs": [{"job": r["job_id"], "ts": r["ts"], scanner_key: r.get(scanner_key), "energy_j": r["energy_j"],
                  "co2e_g": None if r["energy_j"] is None else round(r["energy_j"] / 3.6e6 * per_kwh, 9)}
                 for r in rows[-200:]],
    }


async def _reference_standard(conn, scope: AccessScope, card: ModelCard) -> dict[str, bool]:
    """Ground truth: FHIR Observations tagged ``reference-standard``, coded with the card's finding, pointing
    at the ImagingStudy (``derivedFrom`` or ``partOf``), valueBoolean true/false → {study_uid: label}."""
    codes = {(c.scheme, c.value) for o in card.outputs for c in _finding_codes(o)}
    out: dict[str, bool] = {}
    for content in await reads.tagged_observations(conn, scope, REFERENCE_TAG_SYSTEM, "reference-standard"):
        res = orjson.loads(content)
        if not isinstance(res.get("valueBoolean"), bool):
            continue
        coded = {(_SCHEME_OF.get(c.get("system"), c.get("system")), c.get("code"))
                 for c in (res.get("code") or {}).get("coding", [])}
        if codes and not coded & codes:
            continue
        for ref in list(res.get("derivedFrom") or []) + list(res.get("partOf") or []):
            r = ref.get("reference", "")
            if r.startswith("ImagingStudy/"):
                out[r.split("/", 1)[1]] = res["valueBoolean"]
    return out

