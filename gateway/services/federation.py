"""Federation: the site's cohort/statistics service and the hub's fan-out (docs/federation.md).

Configuration (TOML section ``[federation]``, read from ``Settings.extra["federation"]``)::

    [federation]
    role = "both"                 # site | hub | both (default site)
    min_cell = 5                  # disclosure threshold (site)
    round_base = 5                # rounding base (site)
    hub_id = "hub"                # this gateway's identity when it acts as hub (default: site_id)
    hub_key = "secrets/hub.pem"   # hub's EC P-256 private key (default: generated in data_dir/secrets)
    token_ttl_s = 30              # lifetime of hub→site tokens (≤ 60)
    deadline_s = 5.0              # per-site deadline (hub)
    trusted_hubs = [{id = "hub", public_key = "/etc/fedgate/hub.pub.pem"}]   # site: hubs it accepts
    [[federation.sites]]          # hub: the sites it fans out to
    id = "site-a"                 # = that site's site_id (the token audience)
    url = "http://site-a:8080"
    [federation.bins]             # site-fixed histogram edges per numeric field
    "observation:http://loinc.org|4548-4" = [4, 5, 5.7, 6.5, 8, 10]

Hub → site requests carry a short-lived ES256 JWT signed with the hub key: ``iss`` = hub id, ``aud`` =
site id, ``sub``/``roles``/``org``/``attrs``/``purpose`` of the analyst, ``exp`` − ``iat`` ≤ 60 s, a
``jti`` the site refuses to see twice, and ``qh`` = SHA-256 of the exact request body.  The site verifies
all of it with the hub's public key from its own configuration and then applies its own consent gate.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp
import orjson

from gateway.auth import (MAX_HUB_TOKEN_TTL_S as MAX_TTL_S, HubTokenVerifier, body_hash, hub_private_key, public_pem,
                          sign_hub_token)
from gateway.context import Requester
from gateway.errors import BadRequest, Forbidden
from gateway.services.access import AccessRecord
from gateway.settings import Settings, SettingsError
from gateway.store import cohort_reads
from gateway.store.scope import AccessScope
from mappings.cohort import CohortError, Expander, parse
from mappings.cohort.disclosure import (
    CellKeys,
    Disclosure,
    bin_index,
    bin_labels,
    histogram_edges,
    merge_moments,
    quantiles_from_histogram,
    sig3,
)

log = logging.getLogger(__name__)

ROLES = ("site", "hub", "both")
AGE_BANDS = ("0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")
SEXES = ("female", "male", "other", "unknown")
BREAKDOWNS = ("sex", "age_band", "modality", "manufacturer")
ANALYST_ROLES = ("analyst", "admin")
#: Bound parameters per IN list (below SQLite's and asyncpg's limits).
ID_CHUNK = 5000


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRef:
    id: str
    url: str


@dataclass(frozen=True)
class FederationConfig:
    role: str = "site"
    min_cell: int = 5
    round_base: int = 5
    hub_id: str = ""
    hub_key: str = ""
    token_ttl_s: int = 30
    deadline_s: float = 5.0
    trusted_hubs: tuple[tuple[str, str], ...] = ()  # (hub id, public key PEM or path)
    sites: tuple[SiteRef, ...] = ()
    bins: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    cell_key_secret: str = ""

    @property
    def is_hub(self) -> bool:
        return self.role in ("hub", "both")

    @classmethod
    def from_settings(cls, settings: Settings) -> "FederationConfig":
        raw = dict(settings.extra.get("federation") or {})
        known = {"role", "min_cell", "round_base", "hub_id", "hub_key", "token_ttl_s", "deadline_s",
                 "trusted_hubs", "sites", "bins", "cell_key_secret"}
        for k in raw:
            if k not in known:
                raise SettingsError(f"setting 'federation.{k}': unknown (known: {', '.join(sorted(known))})")
        role = raw.get("role", "site")
        if role not in ROLES:
            raise SettingsError(f"setting 'federation.role': {role!r} is not one of {', '.join(ROLES)}")
        try:
            min_cell = int(raw.get("min_cell", 5))
            base = int(raw.get("round_base", 5))
            ttl = int(raw.get("token_ttl_s", 30))
            deadline = float(raw.get("deadline_s", 5.0))
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"setting 'federation': {exc}") from None
        if min_cell < 1:
            raise SettingsError("setting 'federation.min_cell': must be ≥ 1")
        if base < 1:
            raise SettingsError("setting 'federation.round_base': must be ≥ 1")
        if not 1 <= ttl <= MAX_TTL_S:
            raise SettingsError(f"setting 'federation.token_ttl_s': must be 1..{MAX_TTL_S}")
        if deadline <= 0:
            raise SettingsError("setting 'federation.deadline_s': must be > 0")
        hubs = []
        for i, h in enumerate(raw.get("trusted_hubs") or ()):
            if not isinstance(h, Mapping) or not h.get("id") or not h.get("public_key"):
                raise SettingsError(f"setting 'federation.trusted_hubs[{i}]': needs id and public_key")
            hubs.append((str(h["id"]), str(h["public_key"])))
        sites = []
        for i, s in enumerate(raw.get("sites") or ()):
            if not isinstance(s, Mapping) or not s.get("id") or not s.get("url"):
                raise SettingsError(f"setting 'federation.sites[{i}]': needs id and url")
            sites.append(SiteRef(str(s["id"]), str(s["url"]).rstrip("/")))
        if len({s.id for s in sites}) != len(sites):
            raise SettingsError("setting 'federation.sites': duplicate site id")
        bins = {}
        for name, edges in (raw.get("bins") or {}).items():
            try:
                e = tuple(float(x) for x in edges)
            except (TypeError, ValueError):
                raise SettingsError(f"setting 'federation.bins.{name}': a list of numbers") from None
            if len(e) < 2 or list(e) != sorted(set(e)):
                raise SettingsError(f"setting 'federation.bins.{name}': ≥ 2 strictly increasing edges")
            bins[name] = e
        return cls(role, min_cell, base, str(raw.get("hub_id") or settings.site_id), str(raw.get("hub_key") or ""),
                   ttl, deadline, tuple(hubs), tuple(sites), bins, str(raw.get("cell_key_secret") or ""))


# ------------------------------------------------------------------------------------------------
# Site
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortRequest:
    root: Any
    breakdowns: tuple[str, ...]
    stats: tuple[str, ...]
    age_at: _dt.date

    @classmethod
    def from_json(cls, doc: Any, *, default_breakdowns: tuple[str, ...] = BREAKDOWNS) -> "CohortRequest":
        if not isinstance(doc, dict):
            raise BadRequest("request body: a JSON object with 'cohort'", expression=["$"])
        unknown = set(doc) - {"cohort", "breakdowns", "stats", "age_at", "deadline_s", "sites"}
        if unknown:
            raise BadRequest(f"request body: unknown field {sorted(unknown)[0]!r}", expression=[f"$.{sorted(unknown)[0]}"])
        if "cohort" not in doc:
            raise BadRequest("cohort: required", expression=["$.cohort"])
        try:
            root = parse(doc["cohort"], "$.cohort")
        except CohortError as exc:
            raise BadRequest(str(exc), expression=[exc.field]) from None
        bds = doc.get("breakdowns", list(default_breakdowns))
        if not isinstance(bds, list) or any(b not in BREAKDOWNS for b in bds):
            raise BadRequest(f"breakdowns: a list of {', '.join(BREAKDOWNS)}", expression=["$.breakdowns"])
        stats = doc.get("stats", [])
        if not isinstance(stats, list) or any(not isinstance(s, str) or not _stat_field_ok(s) for s in stats):
            raise BadRequest("stats: a list of numeric fields (age, birth_year, slice_thickness, "
                             "observation:<system|code>, sr:<scheme:code>)", expression=["$.stats"])
        try:
            age_at = _dt.date.fromisoformat(doc["age_at"]) if doc.get("age_at") else _dt.date.today()
        except (TypeError, ValueError):
            raise BadRequest("age_at: a date YYYY-MM-DD", expression=["$.age_at"]) from None
        return cls(root, tuple(bds), tuple(stats), age_at)


def _stat_field_ok(name: str) -> bool:
    if name in ("age", "birth_year", "slice_thickness"):
        return True
    kind, _, arg = name.partition(":")
    return kind in ("observation", "sr") and bool(arg)


def age_on(birth: str | None, at: _dt.date) -> int | None:
    if not birth or len(birth) < 10:
        return None
    try:
        b = _dt.date.fromisoformat(birth[:10])
    except ValueError:
        return None
    return at.year - b.year - ((at.month, at.day) < (b.month, b.day))


def age_band(age: int | None) -> str | None:
    if age is None:
        return None
    if age < 18:
        return AGE_BANDS[0]
    if age < 30:
        return AGE_BANDS[1]
    return AGE_BANDS[min(7, age // 10 - 1)]


class SiteService:
    """Answers cohort counts and statistics for this site, with its consent gate and disclosure control."""

    def __init__(self, settings: Settings, cfg: FederationConfig, db, expand: Expander | None = None) -> None:
        self.settings = settings
        self.cfg = cfg
        self.db = db
        self.expand = expand
        self.disclosure = Disclosure(cfg.min_cell, cfg.round_base)
        secret = cfg.cell_key_secret or hashlib.sha256(b"fedgate-cell-key:" + settings.dev_secret().encode()).hexdigest()
        self.keys = CellKeys(secret.encode())

    @staticmethod
    def check_requester(requester: Requester) -> None:
        if not requester.has_role(*ANALYST_ROLES):
            raise Forbidden("federated queries need the analyst role")
        if requester.purpose.is_treatment or not requester.purpose.codes:
            raise Forbidden("purpose of use: federated cohort queries need a research purpose (DUO codes)")

    async def answer(self, requester: Requester, req: CohortRequest, *, gate, audit, via: str = "direct",
                     path: str = "", expand: Expander | None = None) -> dict:
        """Count ``req`` for ``requester`` under ``gate``'s scope; release only disclosure-controlled values."""
        try:
            self.check_requester(requester)
        except Forbidden as exc:
            await audit.record(AccessRecord(requester=requester, action="E", interaction="federation-cohort",
                                            outcome="4", path=path, detail=f"via={via} refused: {exc.message}"))
            raise
        if expand is not None:
            self.expand = expand
        scope: AccessScope = await gate.scope_for(requester)
        t0 = time.perf_counter()
        try:
            result = await self._answer(req, scope)
        except CohortError as exc:
            raise BadRequest(str(exc), expression=[exc.field]) from None
        result["site"] = self.settings.site_id
        result["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        await audit.record(AccessRecord(
            requester=requester, action="E", interaction="federation-cohort", outcome="0",
            scope_summary=scope.summary, path=path,
            detail=f"via={via} purpose={requester.purpose.describe()} eligible={result['count']}",
            extra={"cohort_hash": body_hash(orjson.dumps(req.root.path + repr(req.root)))[:16]}))
        return result

    async def _answer(self, req: CohortRequest, scope: AccessScope) -> dict:
        # Only patients whose consent permits the purpose are ever read: the cohort SQL
        # is intersected with the scope, so no released value — counts, breakdowns, stats, cell keys —
        # depends on a refused patient.  (An earlier ``consent.matching`` counted every patient matching
        # the criteria: comparing count(A) with count(A or X) told whether a withdrawn patient had X.)
        with_series = bool({"modality", "manufacturer"} & set(req.breakdowns))
        async with self.db.read() as conn:
            # the cohort with its series in one statement when a series breakdown is asked for
            rows = await cohort_reads.eligible(conn, scope, req.root, expand=self.expand, today=req.age_at,
                                               series=with_series)
            elig: dict[str, tuple] = {}
            for r in rows:
                elig.setdefault(r[0], r)
            series_rows = [(r[0], r[3], r[4]) for r in rows] if with_series else []
            stats = {}
            for name in req.stats:
                stats[name] = await self._stat(conn, name, req, scope, elig)
        d, k = self.disclosure, self.keys
        result: dict[str, Any] = {
            "count": d.release(len(elig), k.cell_key(elig)),
            "consent": {"eligible": d.release(len(elig), k.cell_key(elig))},
            "breakdowns": {},
            "disclosure": {"min_cell": d.min_cell, "round_base": d.base, "method": "cell-key rounding"},
        }
        if "sex" in req.breakdowns:
            groups: dict[str, list[str]] = {}
            for pid, r in elig.items():
                groups.setdefault(r.sex if r.sex in SEXES else "unknown", []).append(pid)
            result["breakdowns"]["sex"] = d.cells(groups, k, fixed=SEXES)
        if "age_band" in req.breakdowns:
            groups = {}
            for pid, r in elig.items():
                groups.setdefault(age_band(age_on(r.birth_date, req.age_at)) or "unknown", []).append(pid)
            result["breakdowns"]["age_band"] = d.cells(groups, k, fixed=AGE_BANDS)
        for name, idx in (("modality", 1), ("manufacturer", 2)):
            if name in req.breakdowns:
                groups = {}
                for row in series_rows:
                    if row[0] in elig and row[idx]:
                        groups.setdefault(str(row[idx]).strip(), set()).add(row[0])
                result["breakdowns"][name] = d.cells({c: sorted(v) for c, v in groups.items()}, k)
        if req.stats:
            result["stats"] = stats
        return result

    async def _stat(self, conn, name: str, req: CohortRequest, scope: AccessScope, elig: Mapping[str, Any]) -> dict:
        values: dict[str, float] = {}
        if name == "age":
            for pid, r in elig.items():
                a = age_on(r.birth_date, req.age_at)
                if a is not None:
                    values[pid] = float(a)
        elif name == "birth_year":
            for pid, r in elig.items():
                if r.birth_date and r.birth_date[:4].isdigit():
                    values[pid] = float(r.birth_date[:4])
        else:
            values = {pid: v for pid, v in (await cohort_reads.mean_values(conn, scope, name, sorted(elig))).items()
                      if pid in elig}
        return self._release_stat(name, values)

    def _release_stat(self, name: str, values: Mapping[str, float]) -> dict:
        d, k = self.disclosure, self.keys
        edges = histogram_edges(name, self.cfg.bins)
        labels = bin_labels(edges)
        n = len(values)
        if n < d.min_cell:
            return {"count": None, "mean": None, "std": None, "bins": labels, "edges": edges,
                    "histogram": [None] * len(labels), "quantiles": quantiles_from_histogram([], edges)}
        groups: dict[str, list[str]] = {}
        for pid, v in values.items():
            groups.setdefault(labels[bin_index(v, edges)], []).append(pid)
        cells = d.cells(groups, k, fixed=labels)
        hist = [cells[lab] for lab in labels]
        vals = list(values.values())
        mean = sum(vals) / n
        std = (sum((v - mean) ** 2 for v in vals) / n) ** 0.5
        return {"count": d.release(n, k.cell_key(values)), "mean": sig3(mean), "std": sig3(std), "bins": labels,
                "edges": edges, "histogram": hist, "quantiles": quantiles_from_histogram(hist, edges)}


# ------------------------------------------------------------------------------------------------
# Hub
# ------------------------------------------------------------------------------------------------


class HubService:
    """Fans a query out to the configured sites concurrently and merges what comes back in time."""

    #: the application's :class:`~gateway.metrics.Metrics` (site round trips), wired at start-up
    metrics_observer = None

    def __init__(self, settings: Settings, cfg: FederationConfig, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.cfg = cfg
        self.session = session
        self.key = hub_private_key(settings, cfg)

    async def query(self, requester: Requester, doc: dict) -> dict:
        SiteService.check_requester(requester)
        req = CohortRequest.from_json(doc)  # validate once at the hub so a typo fails fast
        deadline = self.cfg.deadline_s
        if doc.get("deadline_s") is not None:
            try:
                deadline = min(deadline, float(doc["deadline_s"]))
            except (TypeError, ValueError):
                raise BadRequest("deadline_s: a number of seconds", expression=["$.deadline_s"]) from None
            if deadline <= 0:
                raise BadRequest("deadline_s: must be > 0", expression=["$.deadline_s"])
        sites = self.cfg.sites
        if doc.get("sites") is not None:
            wanted = doc["sites"]
            if not isinstance(wanted, list) or any(w not in {s.id for s in sites} for w in wanted):
                raise BadRequest("sites: a list of configured site ids", expression=["$.sites"])
            sites = tuple(s for s in sites if s.id in wanted)
        forward = {k: v for k, v in doc.items() if k not in ("deadline_s", "sites")}
        forward["age_at"] = req.age_at.isoformat()
        body = orjson.dumps(forward)
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self._ask(s, requester, body, deadline) for s in sites))
        merged = merge(answers, req)
        merged["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        merged["deadline_s"] = deadline
        return merged

    async def _ask(self, site: SiteRef, requester: Requester, body: bytes, deadline: float) -> dict:
        token = sign_hub_token(self.key, self.cfg.hub_id, site.id, requester, body, self.cfg.token_ttl_s)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"site": site.id}
        try:
            async with asyncio.timeout(deadline):
                async with self.session.post(site.url + "/federation/cohort/count", data=body, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                    payload = await r.read()
                    status = r.status
            if status == 200:
                out.update(status="ok", result=orjson.loads(payload))
            elif status in (401, 403):
                out.update(status="refused", http_status=status, error=_detail(payload))
            else:
                out.update(status="error", http_status=status, error=_detail(payload))
        except TimeoutError:
            out.update(status="timeout", error=f"no answer within {deadline:g} s")
        except aiohttp.ClientError as exc:
            out.update(status="error", error=f"{type(exc).__name__}: site unreachable")
        except orjson.JSONDecodeError:
            out.update(status="error", error="site answered with invalid JSON")
        elapsed = time.perf_counter() - t0
        out["elapsed_ms"] = round(elapsed * 1000, 1)
        if self.metrics_observer is not None:
            self.metrics_observer.observe_round_trip(site.id, out["status"], elapsed)
        return out


def _detail(payload: bytes) -> str:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:200].decode("utf-8", "replace")
    return str(doc.get("detail") or doc.get("title") or "")[:300] if isinstance(doc, dict) else ""


def _add(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else a + b


def merge(answers: list[dict], req: CohortRequest) -> dict:
    """Combine per-site released results: sums of released cells (a suppressed cell adds nothing and is
    counted in ``suppressed``), pooled moments, summed histograms, quantiles from the merged histogram."""
    ok = [a for a in answers if a["status"] == "ok"]
    total: int | None = None
    consent: dict[str, int | None] = {"eligible": None}
    breakdowns: dict[str, dict[str, int | None]] = {}
    suppressed: dict[str, int] = {}
    for a in ok:
        res = a["result"]
        total = _add(total, res.get("count"))
        if res.get("count") is None:
            suppressed["count"] = suppressed.get("count", 0) + 1
        for k in consent:
            consent[k] = _add(consent[k], (res.get("consent") or {}).get(k))
        for bd, cells in (res.get("breakdowns") or {}).items():
            merged_cells = breakdowns.setdefault(bd, {})
            for cat, v in cells.items():
                merged_cells[cat] = _add(merged_cells.get(cat), v)
                if v is None:
                    suppressed[f"{bd}.{cat}"] = suppressed.get(f"{bd}.{cat}", 0) + 1
    stats: dict[str, Any] = {}
    for name in req.stats:
        parts, hist, edges, labels = [], None, None, None
        for a in ok:
            s = (a["result"].get("stats") or {}).get(name)
            if not s:
                continue
            edges, labels = s["edges"], s["bins"]
            if s.get("count") is not None and s.get("mean") is not None:
                parts.append((s["count"], s["mean"], s["std"] or 0.0))
            h = s["histogram"]
            hist = h if hist is None else [_add(x, y) for x, y in zip(hist, h)]
        n, mean, std = merge_moments(parts)
        stats[name] = {"count": n or None, "mean": sig3(mean), "std": sig3(std), "bins": labels, "edges": edges,
                       "histogram": hist,
                       "quantiles": quantiles_from_histogram(hist or [], edges) if edges else {}}
    status_counts: dict[str, int] = {}
    for a in answers:
        status_counts[a["status"]] = status_counts.get(a["status"], 0) + 1
    return {
        "count": total, "consent": consent, "breakdowns": breakdowns, "stats": stats if req.stats else None,
        "suppressed": suppressed, "partial": len(ok) < len(answers), "status": status_counts,
        "sites": [{k: v for k, v in a.items() if k != "result"} | ({"count": a["result"].get("count")} if a["status"] == "ok" else {})
                  for a in answers],
        "per_site": {a["site"]: a["result"] for a in ok},
    }


__all__ = ["FederationConfig", "SiteRef", "SiteService", "HubService", "HubTokenVerifier", "CohortRequest",
           "sign_hub_token", "hub_private_key", "public_pem", "merge", "age_on", "age_band"]
