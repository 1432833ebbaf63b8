"""``fedgate query`` (analysts) and ``fedgate demo`` (a hub and three sites on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.settings import Settings, load_settings

EXAMPLE_COHORT = {
    "cohort": {"all": [
        {"age": {"min": 40, "max": 80}},
        {"condition": {"code": "http://snomed.info/sct|73211009", "descendants": True}},
        {"imaging": {"modality": "MR", "body_part": "HEART"}},
    ]},
    "breakdowns": ["sex", "age_band", "modality", "manufacturer"],
    "stats": ["age", "observation:http://loinc.org|4548-4"],
}

EXAMPLE_SR = {
    "cohort": {"all": [
        {"seg": {"segments": [{"label": "Left Ventricle"}, {"label": "Right Ventricle"}]}},
        {"sr": {"same": "group", "items": [{"concept": "DCM:121071", "code": "SCT|87878005"},
                                           {"concept": "LN:10230-1", "value": {"max": 50}}]}},
    ]},
    "stats": ["sr:LN:10230-1"],
}


def runnable_command() -> str:
    """How to run ``fedgate`` again from any plain shell: the absolute path of this interpreter's console
    script (a venv's ``bin/fedgate`` is not on PATH unless the venv is activated)."""
    import shlex
    import shutil

    script = Path(sys.executable).with_name("fedgate")
    if script.exists():
        return shlex.quote(str(script))
    found = shutil.which("fedgate")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m gateway"


# ------------------------------------------------------------------------------------------------
# fedgate query
# ------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return "<5" if v is None else str(v)


def render_table(ans: dict, out=sys.stdout) -> None:
    w = out.write
    w(f"{'site':<14}{'status':<10}{'eligible':>10}{'ms':>9}  note\n")
    for s in ans.get("sites", []):
        note = s.get("error", "")
        w(f"{s['site']:<14}{s['status']:<10}{_fmt(s.get('count')) if s['status'] == 'ok' else '-':>10}"
          f"{s.get('elapsed_ms', 0):>9.0f}  {note}\n")
    w(f"{'TOTAL':<14}{'partial' if ans.get('partial') else 'complete':<10}{_fmt(ans.get('count')):>10}"
      f"{ans.get('elapsed_ms', 0):>9.0f}\n")
    consent = ans.get("consent") or {}
    w(f"\nconsent: eligible for this purpose {_fmt(consent.get('eligible'))} (only these patients are counted)\n")
    for name, cells in (ans.get("breakdowns") or {}).items():
        w(f"\n{name}:\n")
        for cat, v in cells.items():
            w(f"  {cat:<28}{_fmt(v):>8}\n")
    for name, st in (ans.get("stats") or {}).items():
        q = st.get("quantiles") or {}
        w(f"\n{name}: n={_fmt(st.get('count'))} mean={st.get('mean')} std={st.get('std')} "
          f"p25={q.get('p25')} p50={q.get('p50')} p75={q.get('p75')}\n")
    w("\n" + "\n".join(table_notes(ans)) + "\n")


#: breakdowns where one patient can fall in several categories (one per kind of series they have)
MULTI_VALUED = {"modality", "manufacturer"}


def _disclosure(ans: dict) -> tuple[set[int], set[int]]:
    thresholds, bases = set(), set()
    for res in (ans.get("per_site") or {}).values():
        d = (res or {}).get("disclosure") or {}
        if d.get("min_cell"):
            thresholds.add(int(d["min_cell"]))
        if d.get("round_base"):
            bases.add(int(d["round_base"]))
    return thresholds, bases


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def table_notes(ans: dict) -> list[str]:
    """The table's footer: every suppressed or rounded figure explained (what ``--json`` carries as fields)."""
    thresholds, bases = _disclosure(ans)
    thr = "/".join(str(t) for t in sorted(thresholds)) or "the site's threshold"
    base = "/".join(str(b) for b in sorted(bases)) or "the site's rounding base"
    notes = ["Notes (disclosure control at each site, docs/federation.md):",
             f"- <5 = suppressed: a site released no figure for that cell because it held fewer than {thr} "
             "patients (zero included), or by complementary suppression (see below); a suppressed cell adds "
             "nothing to the sums here."]
    notes.append(f"- Every released count is rounded at its site to a multiple of {base} (cell-key rounding: the "
                 "same patients always give the same figure); totals are sums of rounded site figures, so a "
                 "total and the sum of its cells can differ by the rounding of each cell.")
    total = ans.get("count")
    complementary = []
    for name, cells in (ans.get("breakdowns") or {}).items():
        values = [v for v in cells.values() if v is not None]
        hidden = sum(1 for v in cells.values() if v is None)
        if name in MULTI_VALUED:
            notes.append(f"- {name}: a patient with series of several kinds is counted under each, so the "
                         "cells may add up to more than the total.")
        elif total is not None and hidden and sum(values) != total:
            complementary.append(f"{name} ({sum(values)} shown of {total}, {_plural(hidden, 'cell')} suppressed)")
    if complementary:
        notes.append("- Complementary suppression: when exactly one non-empty cell of a breakdown falls below the "
                     "threshold, a site also hides the next smallest, so the hidden one cannot be recovered as "
                     "total minus the others — the shown cells then add up to less than the total (rounding "
                     "moves it too)"
                     + (": " + "; ".join(complementary) if complementary else "") + ".")
    n_sites = len(ans.get("sites") or [])
    ok = (ans.get("status") or {}).get("ok")
    if ans.get("partial") and ok is not None:
        notes.append(f"- Partial: {ok} of {_plural(n_sites, 'site')} answered in time; the others add nothing.")
    return notes


async def run_query(hub: str, token: str, body: dict, timeout_s: float = 60.0) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async with s.post(hub.rstrip("/") + "/federation/query", json=body,
                          headers={"Authorization": f"Bearer {token}"}) as r:
            try:
                return r.status, await r.json(content_type=None)
            except (aiohttp.ContentTypeError, json.JSONDecodeError, ValueError):
                return r.status, {"detail": (await r.text())[:500]}


def bearer_token(args, settings: Settings, role: str, ttl_s: int) -> str:
    """``--token``, else ``$FEDGATE_TOKEN``, else a dev token of ``role`` signed with the data dir's secret
    whose purpose is ``--purpose`` (DUO codes; other CURIEs are diseases; default DUO:0000042)."""
    from gateway.auth import issue_dev_token

    token = args.token or os.environ.get("FEDGATE_TOKEN")
    if token:
        return token
    items = [t for t in (args.purpose or "DUO:0000042").replace(",", " ").split() if t]
    purpose = {"codes": [t for t in items if "DUO" in t.upper()], "diseases": [t for t in items if "DUO" not in t.upper()]}
    return issue_dev_token(settings, subject=os.environ.get("USER", "analyst"), roles=[role], purpose=purpose,
                           ttl_s=ttl_s)


def cmd_query(args, settings: Settings) -> int:

    try:
        doc = json.loads(Path(args.cohort).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"fedgate query: {args.cohort}: {exc}", file=sys.stderr)
        return 2
    body = doc if isinstance(doc, dict) and "cohort" in doc else {"cohort": doc}
    if args.deadline is not None:
        body["deadline_s"] = args.deadline
    token = bearer_token(args, settings, "analyst", ttl_s=300)
    hub = args.hub or os.environ.get("FEDGATE_HUB") or f"http://{settings.host}:{settings.port}"
    try:
        status, ans = asyncio.run(run_query(hub, token, body))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        print(f"fedgate query: hub {hub} unreachable ({type(exc).__name__})", file=sys.stderr)
        return 1
    if status != 200:
        print(f"fedgate query: hub answered {status}: {ans.get('detail') if isinstance(ans, dict) else ans}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(ans, indent=2))
    else:
        render_table(ans)
    return 0


# ------------------------------------------------------------------------------------------------
# fedgate demo
# ------------------------------------------------------------------------------------------------

#: Site-fixed histogram edges the demo sites use for their lab and SR values.
DEMO_BINS = {
    "observation:http://loinc.org|4548-4": [4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0, 10.0],
    "observation:http://loinc.org|39156-5": [15.0, 18.5, 20.0, 22.5, 25.0, 27.5, 30.0, 35.0, 40.0],
    "sr:LN:10230-1": [0.0, 20.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0, 65.0, 70.0, 80.0, 100.0],
}



async def _demo(root: Path, base_port: int, patients: int, seconds: float | None, host: str = "127.0.0.1") -> None:
    from aiohttp import web

    from gateway.app import create_app
    from gateway.services.federation import FederationConfig, hub_private_key, public_pem
    from gateway.services.federation_synth import DEMO_SITES, generate, load
    from gateway.store.db import Database
    from gateway.store.migrate import migrate
    from gateway.vocab_cli import load_demo

    root.mkdir(parents=True, exist_ok=True)
    hub_settings = load_settings(env={}, overrides={
        "data_dir": root / "hub", "site_id": "hub", "port": base_port, "host": host, "log_level": "WARNING",
        "validation_workers": 0})
    key = hub_private_key(hub_settings, FederationConfig(hub_id="hub"))
    pub = root / "hub.pub.pem"
    pub.write_text(public_pem(key))
    sites = []
    for i, profile in enumerate(DEMO_SITES, start=1):
        s = load_settings(env={}, overrides={
            "data_dir": root / profile.name, "site_id": profile.name, "port": base_port + i, "host": host,
            "log_level": "WARNING", "validation_workers": 0, "viewer_dev_login": True,
            "extra": {"federation": {"role": "site", "trusted_hubs": [{"id": "hub", "public_key": str(pub)}],
                                     "bins": DEMO_BINS}}})
        marker = s.data_dir / "demo-population.json"
        if not marker.exists():
            s.data_dir.mkdir(parents=True, exist_ok=True)
            db = Database(s.effective_database_url)
            try:
                await migrate(db)
                await load(db, await asyncio.to_thread(generate, profile, patients, 1))
                await load_demo(db)  # the code hierarchies (SNOMED, MONDO, ...) every site serves from
            finally:
                await db.dispose()
            marker.write_text(json.dumps({"site": profile.name, "patients": patients}))
        sites.append(s)
    hub_settings = load_settings(env={}, overrides={
        "data_dir": root / "hub", "site_id": "hub", "port": base_port, "host": host, "log_level": "WARNING",
        "validation_workers": 0, "viewer_dev_login": True, "extra": {"federation": {"role": "hub", "hub_id": "hub", "deadline_s": 5.0, "sites": [
            {"id": s.site_id, "url": f"http://{host}:{s.port}"} for s in sites]}}})
    runners = []
    for s in [*sites, hub_settings]:
        app = create_app(s)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, s.port).start()
        runners.append(runner)
    (root / "cohort.json").write_text(json.dumps(EXAMPLE_COHORT, indent=2))
    (root / "cohort-sr.json").write_text(json.dumps(EXAMPLE_SR, indent=2))
    hub_url = f"http://{host}:{base_port}"
    print(f"fedgate demo: hub {hub_url}; sites " + ", ".join(f"{s.site_id} http://{host}:{s.port}" for s in sites))
    print(f"  {patients} synthetic patients per site (vendors, demographics, consent mixes, SR/SEG differ); data in {root}")
    print("query it (in another shell):")
    fedgate, top = runnable_command(), root.resolve()
    print(f"  {fedgate} query {top / 'cohort.json'} --hub {hub_url} --data-dir {top / 'hub'} --purpose DUO:0000006")
    print(f"  {fedgate} query {top / 'cohort-sr.json'} --hub {hub_url} --data-dir {top / 'hub'} --purpose DUO:0000042 --json")
    print(f"web console (docs/ui.md; development sign-in, loopback demo only): cohort builder and training at "
          f"{hub_url}/ui/, consent, models and audit at each site's /ui/")
    print("Ctrl-C stops it.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if seconds is None:
            await stop.wait()
        else:
            try:
                await asyncio.wait_for(stop.wait(), seconds)
            except TimeoutError:
                pass
    finally:
        for r in reversed(runners):
            await r.cleanup()


def cmd_demo(args) -> int:
    asyncio.run(_demo(Path(args.dir), args.base_port, args.patients, args.seconds))
    return 0


__all__ = ["cmd_query", "cmd_demo", "render_table", "EXAMPLE_COHORT"]
