"""CPU cost of FHIR write validation per resource: the JSON rules walk (``check_envelope``: envelope, R4 JSON
rules and element types) and the R4B model check (``model_issues``), over the demo Synthea bundles.

Process CPU time (not wall time: the machine is shared), best of ``--rounds``. Run it once per checkout, with
``PYTHONPATH`` at the checkout whose ``mappings`` package is measured, alternating, to compare two versions::

    PYTHONPATH=/path/to/a .venv/bin/python bench/fhir_validate_bench.py --label a
    PYTHONPATH=/path/to/b .venv/bin/python bench/fhir_validate_bench.py --label b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mappings.fhir.validate import check_envelope, model_issues

SYNTHEA = Path(__file__).resolve().parents[1] / "demo" / "data" / "synthea"


def best(fn, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = [e["resource"] for p in sorted(SYNTHEA.glob("*.json")) for e in json.loads(p.read_text())["entry"]]
    env = best(lambda: [check_envelope(r) for r in res], args.rounds)
    model = best(lambda: [model_issues(r) for r in res], args.rounds)
    n = len(res)
    print(f"{args.label}: {n} resources; JSON rules {env / n * 1e6:.1f} µs/resource, model "
          f"{model / n * 1e6:.1f} µs/resource, total {(env + model) / n * 1e6:.1f} µs/resource")


if __name__ == "__main__":
    main()
