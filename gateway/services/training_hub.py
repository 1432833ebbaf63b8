"""Federated training, the hub: runs, rounds, FedAvg aggregation, lineage, model export and deployment
(docs/training.md; the module docstring of ``gateway.services.training`` describes the protocol).

A run is a job of the hub's leased queue (:mod:`gateway.store.leases`, as inference jobs and exports):
``POST /training/runs`` stores it ``queued``; the worker of every serving hub process
(:meth:`TrainingHub.worker`, driven by :func:`~gateway.store.leases.poll_worker`) claims runs with a lease
and runs their rounds.  Each completed round — the sites' answers, the lineage, the round counter and the
new global weights (``trn_checkpoint``) — is committed in one transaction that goes ahead only while the
process still holds the run's lease, so of several hub processes exactly one runs a round, and a round is
counted once.  A hub stopped normally hands its runs back; one that died leaves their leases to expire;
either way another process, or the restarted one, resumes each run at its next round."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
import uuid
from typing import Any

import aiohttp
import numpy as np
import orjson
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from gateway.context import Purpose, Requester
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound
from gateway.services.access import AccessRecord
from gateway.services.federation import FederationConfig, SiteService, _detail, sign_hub_token
from gateway.services.training import _b64
from gateway.services.training_spec import RunSpec, TrainingConfig
from gateway.settings import Settings
from gateway.store import training_runs as runs
from gateway.store.db import xact_lock
from gateway.store.leases import LeaseLost, poll_worker
from gateway.store.training_schema import trn_model
from inference.training import make_module, pooled_metrics, shipped_card, torchscript

log = logging.getLogger(__name__)


#: Class key of the advisory lock that numbers a model's versions (PostgreSQL, several server processes).
MODEL_LOCK_CLASS = 0x464D4F44

#: Seconds between checks that this process still holds a run it is running (a cancellation made through
#: another process, a lease taken over).
CANCEL_POLL_S = 0.5


# ------------------------------------------------------------------------------------------------
# Hub
# ------------------------------------------------------------------------------------------------


def _requester_doc(r: Requester) -> dict:
    return {"subject": r.subject, "roles": sorted(r.roles), "organization": r.organization,
            "attributes": dict(r.attributes), "purpose": {"kind": r.purpose.kind, "codes": list(r.purpose.codes),
                                                          "diseases": list(r.purpose.diseases)}}


def _requester_of(doc: dict) -> Requester:
    p = doc["purpose"]
    return Requester(doc["subject"], frozenset(doc["roles"]), doc.get("organization"), doc.get("attributes") or {},
                     Purpose(p["kind"], tuple(p["codes"]), tuple(p["diseases"])))


def _round_rng(run_id: str, rnd: int) -> np.random.Generator:
    """The generator of round ``rnd``'s DP noise: seeded by (run, round), so a resumed run draws what an
    uninterrupted one would."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{run_id}:{rnd}".encode()).digest()[:8], "big"))


class TrainingHub:
    def __init__(self, settings: Settings, cfg: TrainingConfig, fcfg: FederationConfig, db, session: aiohttp.ClientSession,
                 key, audit) -> None:
        self.settings, self.cfg, self.fcfg, self.db, self.session, self.key, self.audit = \
            settings, cfg, fcfg, db, session, key, audit
        self.worker_id = uuid.uuid4().hex
        self.queue = runs.run_queue(db, self.worker_id, cfg.lease_s)
        self._wake = asyncio.Event()
        #: the runs this process holds, by id
        self._tasks: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------------------------------ API
    async def start(self, requester: Requester, doc: Any) -> dict:
        SiteService.check_requester(requester)
        spec = RunSpec.from_json(doc, self.cfg, tuple(s.id for s in self.fcfg.sites))
        run_id = uuid.uuid4().hex
        await runs.insert_run(self.db, run_id, spec.json(), _requester_doc(requester))
        await self.audit.record(AccessRecord(requester, "C", "training-run", "0", detail=f"run={run_id} "
                                             f"architecture={spec.architecture} rounds={spec.rounds}"))
        self._wake.set()
        return await self.get(requester, run_id)

    @staticmethod
    def _may_see(requester: Requester, row) -> bool:
        return requester.is_admin or orjson.loads(row.requester)["subject"] == requester.subject

    async def get(self, requester: Requester, run_id: str) -> dict:
        found = await runs.run_with_rounds(self.db, run_id)
        if found is None or not self._may_see(requester, found[0]):
            raise NotFound(f"training run {run_id} not found")
        return self._view(*found)

    @staticmethod
    def _view(row, rounds=None) -> dict:
        out = {"id": row.run_id, "state": row.state, "round": row.round, "spec": orjson.loads(row.spec),
               "created": row.created_ts, "updated": row.updated_ts, "error": row.error,
               "model": {"name": row.model_name, "version": row.model_version, "weights_hash": row.weights_hash}
               if row.model_name else None,
               "lineage": orjson.loads(row.lineage) if row.lineage else None}
        if rounds is not None:
            per: dict[int, dict] = {}
            for r in rounds:
                per.setdefault(r["round"], {})[r["site_id"]] = {
                    "status": r["status"], "detail": r["detail"], "n_train": r["n_train"], "n_test": r["n_test"],
                    "metrics": orjson.loads(r["metrics"]) if r["metrics"] else None,
                    "consent_hash": r["consent_hash"], "manifest_hash": r["manifest_hash"], "train_s": r["train_s"],
                    "energy_j": r["energy_j"], "co2e_g": r["co2e_g"], "update_norm": r["update_norm"]}
            out["rounds"] = [{"round": k, "sites": v} for k, v in sorted(per.items())]
        return out

    async def list(self, requester: Requester) -> list[dict]:
        return [self._view(r) for r in await runs.recent_runs(self.db) if self._may_see(requester, r)]

    async def cancel(self, requester: Requester, run_id: str) -> dict:
        row = await runs.run_row(self.db, run_id)
        if row is None or not self._may_see(requester, row):
            raise NotFound(f"training run {run_id} not found")
        if not await runs.cancel_run(self.db, run_id, "cancelled by " + requester.subject):
            row = await runs.run_row(self.db, run_id)
            raise Conflict(f"training run {run_id} is already {row.state if row is not None else 'gone'}")
        task = self._tasks.get(run_id)
        if task is not None:  # held here: stop it now (a process holding it elsewhere sees the cancellation)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.audit.record(AccessRecord(requester, "U", "training-run", "0", detail=f"run={run_id} cancelled"))
        return await self.get(requester, run_id)

    # ------------------------------------------------------------------------------------ the queue
    async def worker(self) -> None:
        """The run queue's worker (every serving hub process runs one): claims runs, up to
        ``training.max_runs`` at a time, each run in a task of its own.  Cancelled (the process stops),
        it stops its runs, which hand themselves back to the queue."""
        try:
            await poll_worker("training", self._claim, self._wake, lambda: self.cfg.poll_s)
        finally:
            held = list(self._tasks.values())
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)

    async def _claim(self) -> bool:
        """Claim one run and start it; False when there is none, or this process runs ``max_runs``."""
        if len(self._tasks) >= self.cfg.max_runs:
            return False
        row = await self.queue.claim()
        if row is None:
            return False
        self._tasks[row.run_id] = asyncio.create_task(self._run(row))
        return True

    async def _run(self, row) -> None:
        run_id = row.run_id
        watch = asyncio.create_task(self._watch(run_id, asyncio.current_task()))
        try:
            if row.attempts > self.cfg.max_attempts:
                raise RunFailed(f"gave up: the hub process running it stopped without handing it back "
                                f"{row.attempts - 1} times")
            spec = RunSpec.from_json(orjson.loads(row.spec), self.cfg, tuple(s.id for s in self.fcfg.sites))
            await self._rounds(row, spec, _requester_of(orjson.loads(row.requester)))
        except asyncio.CancelledError:
            # this process stops: hand the run back (not counted as an attempt); cancelled or taken over
            # instead: no longer this process's to hand back, and nothing changes
            with contextlib.suppress(SQLAlchemyError):
                await asyncio.shield(self.queue.finish(run_id, state="queued", lease_owner=None, lease_until=None,
                                                       not_before=time.time(), attempts=row.attempts - 1))
            raise
        except LeaseLost:
            pass
        except RunFailed as exc:
            await self._fail(run_id, str(exc))
        except SQLAlchemyError as exc:  # the store briefly unavailable: resume later (or when the lease expires)
            log.warning("training run %s: store error", run_id, extra={"error": type(exc).__name__})
            with contextlib.suppress(SQLAlchemyError):
                await self.queue.finish(run_id, state="queued", lease_owner=None, lease_until=None,
                                        not_before=time.time() + self.cfg.lease_s / 3)
        except Exception as exc:  # bad input from a site, the model code (torch), ...: the run fails, saying why
            log.warning("training run %s failed: %s", run_id, type(exc).__name__)
            await self._fail(run_id, f"{type(exc).__name__}: {exc}")
        finally:
            watch.cancel()
            self._tasks.pop(run_id, None)
            self._wake.set()  # room for another run

    async def _fail(self, run_id: str, error: str) -> None:
        """Fail the run (while this process holds it); the store unavailable: its lease expires, and the run
        is tried again."""
        with contextlib.suppress(SQLAlchemyError):
            if await self.queue.finish(run_id, state="failed", error=error, lease_owner=None, lease_until=None):
                await runs.end_run(self.db, run_id)

    async def _watch(self, run_id: str, task: asyncio.Task) -> None:
        """Renew the run's lease every third of ``lease_s``, and cancel the run's task as soon as this
        process no longer holds the run: cancelled (``POST .../cancel`` may reach another server process
        than the one running the rounds; the store is what they share) or taken over after a stall."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(min(CANCEL_POLL_S, self.cfg.lease_s / 3))
            try:
                if time.monotonic() - renewed >= self.cfg.lease_s / 3:
                    held = await self.queue.update(run_id)
                    renewed = time.monotonic()
                else:
                    held = await self.queue.holds(run_id)
            except SQLAlchemyError:
                continue
            if not held:
                task.cancel()
                return

    # ------------------------------------------------------------------------------------ the run
    def _sites(self, spec: RunSpec):
        return [s for s in self.fcfg.sites if spec.sites is None or s.id in spec.sites]

    def _lineage(self, run_id: str, spec: RunSpec, requester: Requester, state) -> dict[str, Any]:
        from inference import fl

        lineage: dict[str, Any] = {
            "run_id": run_id, "architecture": spec.architecture, "hub": self.fcfg.hub_id,
            "hyperparameters": {"rounds": spec.rounds, "local_epochs": spec.local_epochs,
                                "optimizer": spec.optimiser.json(), "min_sites": spec.min_sites,
                                "min_cohort": spec.min_cohort, "seed": spec.seed, "test_fraction": spec.test_fraction},
            "purpose": requester.purpose.describe(),
            "cohort_hash": hashlib.sha256(orjson.dumps(spec.cohort, option=orjson.OPT_SORT_KEYS)).hexdigest(),
            "label_hash": hashlib.sha256(orjson.dumps(spec.label, option=orjson.OPT_SORT_KEYS)).hexdigest(),
            "initial_weights_hash": fl.state_hash(state), "aggregation": "fedavg (sample-count weighted)",
            "secure_aggregation": spec.secure_aggregation, "dp": None, "rounds": [],
            "energy_j": 0.0, "co2e_g": 0.0}
        if spec.dp:
            lineage["aggregation"] = "dp-fedavg (clipped updates, equal weights, Gaussian noise at the hub)"
        return lineage

    async def _rounds(self, row, spec: RunSpec, requester: Requester) -> None:
        """The run's rounds from the one after its checkpoint (the first, for a new run), the final
        evaluation and the export."""
        from inference import fl

        run_id = row.run_id
        sites = self._sites(spec)
        checkpoint = await runs.load_checkpoint(self.db, run_id)
        if checkpoint is not None and row.lineage:
            done, state = checkpoint[0], fl.decode_state(checkpoint[1])
            lineage: dict[str, Any] = orjson.loads(row.lineage)
            log.info("training run resumed", extra={"run": run_id, "round": done + 1})
        else:
            done, state = 0, await asyncio.to_thread(lambda: fl.state_from_module(make_module(spec.architecture,
                                                                                            spec.seed)))
            lineage = self._lineage(run_id, spec, requester, state)
        for rnd in range(done + 1, spec.rounds + 1):
            t0 = time.perf_counter()
            answers, participants = await self._round_with_retry(run_id, rnd, spec, requester, state, sites)
            t_sites = time.perf_counter()
            ok = [a for a in answers if a["status"] == "ok"]
            state = await asyncio.to_thread(self._aggregate, spec, state, ok, _round_rng(run_id, rnd))
            t_agg = time.perf_counter() - t_sites
            wall = time.perf_counter() - t0
            max_train = max((a["train_s"] for a in ok), default=0.0)
            max_eval = max((a.get("eval_s") or 0.0 for a in ok), default=0.0)
            max_site = max((a.get("site_s") or 0.0 for a in ok), default=0.0)
            e = sum(a.get("energy_j") or 0.0 for a in ok)
            co2 = sum(a.get("co2e_g") or 0.0 for a in ok)
            lineage["energy_j"] += e
            lineage["co2e_g"] += co2
            lineage["rounds"].append({
                "round": rnd, "weights_hash": fl.state_hash(state), "wall_s": round(wall, 4),
                "max_train_s": round(max_train, 4), "max_eval_s": round(max_eval, 4),
                "max_site_s": round(max_site, 4), "aggregate_s": round(t_agg, 5),
                "overhead_s": round(wall - max_train, 4), "energy_j": round(e, 3), "co2e_g": round(co2, 6),
                "participants": participants,
                "sites": {a["site"]: ({"status": "ok", "n_train": a["n_train"], "n_test": a["n_test"],
                                       "patients_train": a.get("patients_train"), "patients_test": a.get("patients_test"),
                                       "consent_hash": a["consent_hash"], "manifest_hash": a["manifest_hash"]}
                                      if a["status"] == "ok" else {"status": a["status"]}) for a in answers}})
            weights = fl.encode_state(state)
            async with self.queue.holding(run_id, round=rnd, lineage=orjson.dumps(lineage).decode()) as conn:
                await runs.record_answers(conn, run_id, rnd, answers)
                await runs.save_checkpoint(conn, run_id, rnd, weights)
        # final held-out evaluation of the last global weights at every site
        answers = await asyncio.gather(*(self._ask(run_id, spec.rounds + 1, s, spec, requester, state,
                                                   train=False) for s in sites))
        async with self.queue.holding(run_id) as conn:
            await runs.record_answers(conn, run_id, spec.rounds + 1, answers)
        lineage["final_evaluation"] = {a["site"]: a["metrics"] for a in answers if a["status"] == "ok"}
        lineage["final_evaluation_pooled"] = pooled_metrics(lineage["final_evaluation"])
        if spec.dp:
            lineage["dp"] = {**spec.dp, "unit": "site (one site's whole update per round)",
                             "epsilon": fl.dp_epsilon(spec.dp["noise_multiplier"], spec.rounds, spec.dp["delta"]),
                             "accountant": "RDP of the Gaussian mechanism, composed over rounds, no sampling amplification"}
        await self._export(run_id, spec, state, lineage, requester)

    async def _round_with_retry(self, run_id, rnd, spec, requester, state, sites):
        """The sites' answers of round ``rnd`` and the participants, recorded by the caller with the new
        weights; a round without quorum is recorded here and fails the run (RunFailed)."""
        keys: dict[str, str] | None = None
        for attempt in (1, 2):
            if spec.secure_aggregation:
                keys = await self._site_keys(sites, requester)
                if len(keys) < spec.min_sites:
                    raise RunFailed(f"round {rnd}: only {len(keys)} site(s) reachable for secure aggregation "
                                    f"(min_sites {spec.min_sites})")
            targets = [s for s in sites if keys is None or s.id in keys]
            answers = await asyncio.gather(*(self._ask(run_id, rnd, s, spec, requester, state, train=True,
                                                       participants=keys) for s in targets))
            answers += [{"site": s.id, "status": "error", "detail": "no key"} for s in sites if s not in targets]
            ok = [a for a in answers if a["status"] == "ok"]
            if keys is not None and len(ok) != len(keys) and len(ok) >= spec.min_sites and attempt == 1:
                # a masked participant dropped out: its masks do not cancel; redo the round without it
                sites = [s for s in sites if s.id in {a["site"] for a in ok}]
                continue
            if len(ok) < spec.min_sites:
                async with self.queue.holding(run_id) as conn:
                    await runs.record_answers(conn, run_id, rnd, answers)
                failed = ", ".join(f"{a['site']}: {a['status']}" for a in answers if a["status"] != "ok")
                raise RunFailed(f"round {rnd}: {len(ok)} site(s) answered, fewer than min_sites {spec.min_sites} "
                                f"({failed})")
            return answers, sorted(a["site"] for a in ok)
        raise RunFailed(f"round {rnd}: secure aggregation participants kept dropping out")

    async def _site_keys(self, sites, requester: Requester) -> dict[str, str]:
        async def one(s):
            token = sign_hub_token(self.key, self.fcfg.hub_id, s.id, requester, b"", self.fcfg.token_ttl_s)
            try:
                async with asyncio.timeout(10):
                    async with self.session.get(s.url + "/federation/train/key",
                                                headers={"Authorization": f"Bearer {token}"}) as r:
                        if r.status == 200:
                            return s.id, (await r.json())["public_key"]
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
                pass
            return s.id, None

        return {k: v for k, v in await asyncio.gather(*(one(s) for s in sites)) if v}

    async def _ask(self, run_id, rnd, site, spec: RunSpec, requester, state, *, train: bool,
                   participants: dict[str, str] | None = None) -> dict:
        from inference import fl

        body = orjson.dumps({
            "run_id": run_id, "round": rnd, "architecture": spec.architecture, "cohort": spec.cohort,
            "label": spec.label, "images": spec.images, "local_epochs": spec.local_epochs,
            "optimizer": spec.optimiser.json(), "min_cohort": spec.min_cohort, "seed": spec.seed,
            "test_fraction": spec.test_fraction, "weights": _b64(fl.encode_state(state)), "train": train,
            "dp_clip": spec.dp["clip"] if spec.dp else None,
            "secure": {"participants": participants} if participants else None})
        token = sign_hub_token(self.key, self.fcfg.hub_id, site.id, requester, body, self.fcfg.token_ttl_s)
        out: dict[str, Any] = {"site": site.id}
        try:
            async with asyncio.timeout(self.cfg.round_deadline_s):
                async with self.session.post(site.url + "/federation/train/round", data=body, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                    payload = await r.read()
                    status = r.status
        except asyncio.TimeoutError:
            return out | {"status": "timeout", "detail": f"no answer within {self.cfg.round_deadline_s} s"}
        except aiohttp.ClientError as exc:
            return out | {"status": "error", "detail": f"unreachable ({type(exc).__name__})"}
        if status == 200:
            try:
                doc = orjson.loads(payload)
                if train:
                    upd = fl.decode_state(base64.b64decode(doc["update"]))
                    doc["_update"] = upd
                return out | doc | {"status": "ok"}
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                return out | {"status": "error", "detail": "malformed answer"}
        detail = _detail(payload)
        return out | {"status": "refused" if status in (401, 403, 422) else "error", "http_status": status,
                      "detail": detail}

    def _aggregate(self, spec: RunSpec, state, ok: list[dict], rng):
        from inference import fl

        if spec.secure_aggregation:
            avg = fl.secure_average([a["_update"] for a in ok], sum(float(a["weight"]) for a in ok))
        elif spec.dp:
            avg = fl.fedavg([(a["_update"], 1.0) for a in ok])
        else:
            avg = fl.fedavg([(a["_update"], float(a["n_train"])) for a in ok])
        if spec.dp:
            std = spec.dp["noise_multiplier"] * spec.dp["clip"] / len(ok)
            avg = fl.add(avg, fl.gaussian_noise(avg, std, rng))
        new = fl.add(state, avg)
        return {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}

    async def _export(self, run_id: str, spec: RunSpec, state, lineage: dict, requester: Requester) -> None:
        from inference import fl

        weights_hash = fl.state_hash(state)
        lineage["weights_hash"] = weights_hash
        lineage["energy_j"] = round(lineage["energy_j"], 3)
        lineage["co2e_g"] = round(lineage["co2e_g"], 6)
        ts_bytes = await asyncio.to_thread(torchscript, spec.architecture, state)
        # the model and the run's success in one transaction, only while this process holds the run (a
        # cancellation, possibly through another server process, comes before it or finds it succeeded)
        async with self.queue.holding(run_id) as conn:
            version = await next_model_version(conn, spec.name)
            card = derived_card(spec, version, lineage, requester)
            await runs.mark_succeeded(conn, run_id, model_name=spec.name, model_version=version,
                                      weights_hash=weights_hash, lineage=orjson.dumps(lineage).decode())
            await conn.execute(trn_model.insert().values(
                name=spec.name, version=version, run_id=run_id, architecture=spec.architecture,
                weights_hash=weights_hash, torchscript=ts_bytes, card=orjson.dumps(card).decode(), created_ts=time.time()))

    # ------------------------------------------------------------------------------------ models
    async def models(self, requester: Requester, name: str | None = None) -> list[dict]:
        q = select(trn_model.c.name, trn_model.c.version, trn_model.c.run_id, trn_model.c.architecture,
                   trn_model.c.weights_hash, trn_model.c.card, trn_model.c.created_ts).order_by(
            trn_model.c.name, trn_model.c.created_ts)
        if name:
            q = q.where(trn_model.c.name == name)
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
        return [{"name": r.name, "version": r.version, "run_id": r.run_id, "architecture": r.architecture,
                 "weights_hash": r.weights_hash, "card": orjson.loads(r.card), "created": r.created_ts} for r in rows]

    async def model_bytes(self, name: str, version: str) -> tuple[bytes, dict]:
        async with self.db.read() as conn:
            row = (await conn.execute(select(trn_model).where(trn_model.c.name == name,
                                                              trn_model.c.version == version))).first()
        if row is None:
            raise NotFound(f"model {name} version {version} not found")
        return row.torchscript, orjson.loads(row.card)

    async def deploy(self, requester: Requester, name: str, version: str, doc: Any) -> dict:
        """Install (if needed) and activate ``name``/``version`` at the selected sites (roll-back = deploy
        an older version)."""
        if not requester.is_admin:
            raise Forbidden("deploying a model needs the admin role")
        ts_bytes, card = await self.model_bytes(name, version)
        if not isinstance(doc, dict):
            raise BadRequest('request body: {"sites": [site ids]} or empty (all sites)', expression=["$"])
        wanted = doc.get("sites")
        ids = {s.id for s in self.fcfg.sites}
        if wanted is not None and (not isinstance(wanted, list) or not wanted or any(w not in ids for w in wanted)):
            raise BadRequest("sites: a non-empty list of configured site ids", expression=["$.sites"])
        sites = [s for s in self.fcfg.sites if wanted is None or s.id in wanted]
        arch = card.get("provenance", {}).get("lineage", {}).get("architecture")
        body = orjson.dumps({"card": card, "model": _b64(ts_bytes), "architecture": arch})

        async def one(site) -> dict:
            token = sign_hub_token(self.key, self.fcfg.hub_id, site.id, requester, body, self.fcfg.token_ttl_s)
            try:
                async with asyncio.timeout(60):
                    async with self.session.post(site.url + "/federation/models/deploy", data=body, headers={
                            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                        payload = await r.read()
                        if r.status == 200:
                            return {"site": site.id, "status": "ok", **orjson.loads(payload)}
                        return {"site": site.id, "status": "refused" if r.status < 500 else "error",
                                "http_status": r.status, "detail": _detail(payload)}
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return {"site": site.id, "status": "error", "detail": f"unreachable ({type(exc).__name__})"}

        results = await asyncio.gather(*(one(s) for s in sites))
        await self.audit.record(AccessRecord(requester, "U", "model-deploy", "0",
                                             detail=f"model {name}@{version} → {len(results)} site(s)"))
        return {"model": name, "version": version, "sites": results}


class RunFailed(Exception):
    pass


async def next_model_version(conn, name: str) -> str:
    """The next version number of model ``name`` ("1", "2", ...), on a write transaction that then
    inserts it.  Runs of the same model finishing together in two server processes (PostgreSQL) get one
    number each: the second waits on the advisory lock until the first has committed its version."""
    await xact_lock(conn, MODEL_LOCK_CLASS, name)
    n = (await conn.execute(select(func.count()).select_from(trn_model).where(trn_model.c.name == name))).scalar_one()
    return str(n + 1)


def derived_card(spec: RunSpec, version: str, lineage: dict, requester: Requester) -> dict:
    base = shipped_card(spec.architecture)
    purpose = next((c for c in requester.purpose.codes if c.startswith("DUO:")), "treatment")
    from inference.cards import DUO_PURPOSES

    if purpose not in DUO_PURPOSES:
        purpose = next((c for c in requester.purpose.codes if c in DUO_PURPOSES), "DUO:0000042")
    triton_model = spec.name.replace("-", "_").replace(".", "_")
    return {**base, "name": spec.name, "version": version,
            "description": f"{base.get('description', '')} Federated training run {lineage['run_id']}.",
            "triton": {**base["triton"], "model": triton_model, "version": version},
            "purpose": purpose, "auto_trigger": False,
            "provenance": {"training_data": f"federated: {len(lineage['rounds'])} round(s) across "
                                            f"{len({s for r in lineage['rounds'] for s in r['participants']})} site(s); "
                                            f"cohort {lineage['cohort_hash'][:12]}, label {lineage['label_hash'][:12]}",
                           "lineage_id": f"fedgate:training:{lineage['run_id']}",
                           "lineage": {k: lineage[k] for k in ("run_id", "architecture", "hyperparameters", "purpose",
                                                               "cohort_hash", "label_hash", "weights_hash", "energy_j",
                                                               "co2e_g", "secure_aggregation", "dp", "aggregation")},
                           "rounds": [{"round": r["round"], "weights_hash": r["weights_hash"],
                                       "sites": r["sites"]} for r in lineage["rounds"]]}}
