"""CPU time (and, with a third argument, a cProfile) of 5,000 resources written by ``fhir_repo.apply_writes``
in one source tree.  Usage: ``PYTHONPATH=TREE .venv/bin/python bench/write_path_profile.py TREE "" [profile]``"""
import asyncio, sys, tempfile, time, cProfile, pstats
from pathlib import Path
tree = sys.argv[1]
sys.path.insert(0, tree); sys.path.insert(0, tree + "/bench")
from gateway.app import create_app
from gateway.settings import load_settings
from aiohttp.test_utils import TestServer
import consent_gate_bench as cb

async def main():
    tmp = Path(tempfile.mkdtemp(prefix="i19prof-"))
    settings = load_settings(env={}, overrides={"data_dir": tmp, "database_url": sys.argv[2] if len(sys.argv) > 2 else "",
                                                 "jwt_secret": "bench-" + "x" * 32, "log_level": "WARNING"})
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await cb.load(app, 10, 48)
        prof = len(sys.argv) > 3
        pr = cProfile.Profile()
        t0 = time.process_time()
        if prof: pr.enable()
        n = 0
        for k in range(4):
            # reuse cb.load but offset patients: monkeypatch range via resources_for ids
            from gateway import keys
            from gateway.store import fhir_repo
            db = app[keys.DB]
            for start in range(100 + k * 25, 100 + (k + 1) * 25, 25):
                writes = [fhir_repo.Write(r["resourceType"], r["id"], r, None, "PUT")
                          for i in range(start, start + 25) for r in cb.resources_for(i, 48)]
                async with db.write() as conn:
                    await fhir_repo.apply_writes(conn, writes)
                n += len(writes)
        pr.disable()
        cpu = time.process_time() - t0
        print(f"{tree}: {n} res, cpu {cpu:.2f} s, {n / cpu:.0f} res/cpu-s")
        if prof: pstats.Stats(pr).sort_stats("cumulative").print_stats(35)
    finally:
        await server.close()
asyncio.run(main())
