"""``fedgate train start|status|cancel|deploy`` — federated training through a hub (docs/training.md)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.federation_cli import bearer_token
from gateway.settings import Settings


async def _call(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            try:
                return r.status, await r.json(content_type=None)
            except (aiohttp.ContentTypeError, json.JSONDecodeError, ValueError):
                return r.status, {"detail": (await r.text())[:500]}


def render(run: dict, out=sys.stdout) -> None:
    w = out.write
    w(f"run {run['id']}  state {run['state']}  round {run['round']}/{run['spec']['rounds']}"
      f"{'  error: ' + run['error'] if run.get('error') else ''}\n")
    for r in run.get("rounds", []):
        cells = []
        for site, v in sorted(r["sites"].items()):
            m = v.get("metrics") or {}
            cells.append(f"{site}: {v['status']}" + (f" n={v['n_train']} auc={m.get('auroc')}" if v["status"] == "ok" else ""))
        w(f"  round {r['round']:>3}  " + "; ".join(cells) + "\n")
    if run.get("model"):
        lin = run.get("lineage") or {}
        w(f"model {run['model']['name']} version {run['model']['version']}  weights {run['model']['weights_hash'][:16]}  "
          f"energy {lin.get('energy_j')} J  CO2e {lin.get('co2e_g')} g  pooled held-out {lin.get('final_evaluation_pooled')}\n")


def cmd_train(args, settings: Settings) -> int:
    target = args.target  # start: spec file; status / cancel: run id; deploy: NAME@VERSION
    if not target:
        print(f"fedgate train {args.action}: missing {'spec file' if args.action == 'start' else 'run id' if args.action != 'deploy' else 'NAME@VERSION'}",
              file=sys.stderr)
        return 2
    hub = (args.hub or os.environ.get("FEDGATE_HUB") or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        if args.action == "start":
            try:
                spec = json.loads(Path(target).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"fedgate train: {target}: {exc}", file=sys.stderr)
                return 2
            status, doc = asyncio.run(_call("POST", hub + "/training/runs", bearer_token(args, settings, "analyst", ttl_s=3600), spec))
            if status != 201:
                print(f"fedgate train: {status}: {doc.get('detail', doc)}", file=sys.stderr)
                return 1
            if not args.wait:
                print(doc["id"])
                return 0
            target = doc["id"]
            args.action = "status"
        if args.action == "status":
            token = bearer_token(args, settings, "analyst", ttl_s=3600)
            while True:
                status, doc = asyncio.run(_call("GET", f"{hub}/training/runs/{target}", token))
                if status != 200:
                    print(f"fedgate train: {status}: {doc.get('detail', doc)}", file=sys.stderr)
                    return 1
                if not args.wait or doc["state"] not in ("queued", "running"):
                    break
                time.sleep(1.0)
            print(json.dumps(doc, indent=2)) if args.json else render(doc)
            return 0 if doc["state"] != "failed" else 1
        if args.action == "cancel":
            status, doc = asyncio.run(_call("POST", f"{hub}/training/runs/{target}/cancel", bearer_token(args, settings, "analyst", ttl_s=3600)))
        else:  # deploy
            name, _, version = target.partition("@")
            body = {"sites": args.sites.split(",")} if args.sites else {}
            status, doc = asyncio.run(_call("POST", f"{hub}/training/models/{name}/{version}/deploy",
                                            bearer_token(args, settings, "admin", ttl_s=3600), body))
        print(json.dumps(doc, indent=2))
        return 0 if status == 200 else 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        print(f"fedgate train: hub {hub} unreachable ({type(exc).__name__})", file=sys.stderr)
        return 1
