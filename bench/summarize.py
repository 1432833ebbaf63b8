#!/usr/bin/env python3
# Vendored from the team's shared benchmark harness (shared/bench/summarize.py).
"""Turn dicomweb_bench.py result JSONs into a Markdown comparison table.

  python summarize.py results/orthanc-*.json results/gateway-*.json

Runs with the same label and dataset are grouped into one column showing the
median (and min-max when there are several runs). Disk-ceiling JSONs are
listed in a separate small table.
"""
import json
import statistics
import sys
from pathlib import Path


def g(d, *path):
    for p in path:
        if isinstance(d, list):
            d = d[p] if isinstance(p, int) and p < len(d) else None
        elif isinstance(d, dict):
            d = d.get(p)
        else:
            return None
        if d is None:
            return None
    return d


def level(lst, conc):
    for x in lst or []:
        if x.get("concurrency") == conc:
            return x
    return None


def metrics(r):
    res = r.get("results", {})
    rows = []
    stow = g(res, "stow", "levels") or []
    for lv in stow:
        c = lv["concurrency"]
        rows += [(f"STOW c={c} inst/s", lv["instances_per_s"]),
                 (f"STOW c={c} MB/s", lv["mb_per_s"]),
                 (f"STOW c={c} request p50 ms", g(lv, "request_latency", "p50_ms")),
                 (f"STOW c={c} failed instances", lv["instances_failed"]),
                 (f"STOW c={c} server cores used", g(lv, "usage", "server_avg_cores")),
                 (f"STOW c={c} server RSS peak MB", g(lv, "usage", "server_rss_hwm_mb"))]
    for lv in g(res, "qido", "levels") or []:
        c = lv["concurrency"]
        rows += [(f"QIDO c={c} p50 ms", g(lv, "latency", "p50_ms")),
                 (f"QIDO c={c} p95 ms", g(lv, "latency", "p95_ms")),
                 (f"QIDO c={c} p99 ms", g(lv, "latency", "p99_ms")),
                 (f"QIDO c={c} queries/s", lv["queries_per_s"]),
                 (f"QIDO c={c} errors / count mismatches", f"{lv['errors']} / {lv['count_mismatches']}")]
    for what in ("instance", "series"):
        for lv in g(res, "wado", what) or []:
            c = lv["concurrency"]
            rows += [(f"WADO {what} c={c} inst/s", lv["instances_per_s"]),
                     (f"WADO {what} c={c} MB/s", lv["mb_per_s"]),
                     (f"WADO {what} c={c} request p50 ms", g(lv, "latency", "p50_ms"))]
    for what in ("series", "study"):
        m = g(res, "wado", "metadata", what)
        if m:
            rows += [(f"{what} /metadata p50 ms", g(m, "latency", "p50_ms")),
                     (f"{what} /metadata p95 ms", g(m, "latency", "p95_ms")),
                     (f"{what} /metadata p99 ms", g(m, "latency", "p99_ms"))]
    return rows


def num(x):
    if float(x) == int(x):
        return str(int(x))
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def fmt(vals):
    nums = [v for v in vals if isinstance(v, (int, float))]
    if not vals or all(v is None for v in vals):
        return "-"
    if len(nums) != len(vals):
        return str(vals[0])
    s = num(statistics.median(nums))
    if len(nums) > 1 and min(nums) != max(nums):
        s += f" ({num(min(nums))}-{num(max(nums))})"
    return s


def main(paths):
    groups, order, disks = {}, [], []
    for p in paths:
        r = json.loads(Path(p).read_text())
        if "disk" in r:
            disks.append(r)
            continue
        key = (r.get("label"), r["dataset"]["instances"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(dict(metrics(r)))
    if order:
        names = []
        for k in order:
            names.append(f"{k[0]} N={k[1]}" + (f" (median of {len(groups[k])})" if len(groups[k]) > 1 else ""))
        print("| metric | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(order))
        all_rows = []
        for k in order:
            for run in groups[k]:
                for name in run:
                    if name not in all_rows:
                        all_rows.append(name)
        for name in all_rows:
            cells = [fmt([run.get(name) for run in groups[k] if name in run]) for k in order]
            print(f"| {name} | " + " | ".join(cells) + " |")
    ratio_table(groups, order)
    for r in disks:
        print(f"\nDisk ceiling, {r['dataset']['instances']} files / {r['dataset']['total_mb']} MB:\n")
        print("| mode | MB/s (median) | runs MB/s | files/s |")
        print("|---|---|---|---|")
        for mode, v in r["disk"].items():
            print(f"| {mode} | {v['mb_per_s']} | {v.get('mb_per_s_all')} | {v['files_per_s']} |")


#: issue 3's targets, as ratios to Orthanc: (metric, ">=" or "<=", bound); STOW rows for every level run
#: (issue 27 raised STOW c=4 / c=16 to 1.5 and added whole-series WADO at c=1 and c=4)
STOW_TARGET = {"STOW c=4 inst/s": 1.5, "STOW c=16 inst/s": 1.5}
TARGETS = [("QIDO c=1 p95 ms", "<=", 0.5), ("QIDO c=8 p95 ms", "<=", 0.5),
           ("QIDO c=1 queries/s", ">=", 2.0), ("QIDO c=8 queries/s", ">=", 2.0),
           ("WADO instance c=8 inst/s", ">=", 1.5), ("WADO series c=1 inst/s", ">=", 1.5),
           ("WADO series c=4 inst/s", ">=", 1.5), ("series /metadata p50 ms", "<=", 0.5)]


def ratio_table(groups, order):
    """Per target metric and server: the median of the per-round ratios to Orthanc (the i-th run of a label
    paired with Orthanc's i-th run of the same dataset size), min-max, and whether the target is met."""
    for size in sorted({k[1] for k in order}):
        base = groups.get(("orthanc", size))
        others = [k for k in order if k[1] == size and k[0] != "orthanc"]
        if not base or not others:
            continue
        stow = [name for name in base[0] if name.startswith("STOW") and name.endswith("inst/s")]
        targets = [(name, ">=", STOW_TARGET.get(name, 1.25)) for name in stow] + TARGETS
        print(f"\nRatios to Orthanc, N={size} (median of the per-round ratios, min-max; target):\n")
        print("| metric | target | " + " | ".join(k[0] for k in others) + " |")
        print("|---|---|" + "---|" * len(others))
        for name, op, bound in targets:
            cells = []
            for k in others:
                rs = [run[name] / b[name] for run, b in zip(groups[k], base)
                      if isinstance(run.get(name), (int, float)) and isinstance(b.get(name), (int, float)) and b[name]]
                if not rs:
                    cells.append("-")
                    continue
                m = statistics.median(rs)
                met = m >= bound if op == ">=" else m <= bound
                cell = f"{m:.2f}" + (f" ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else "")
                cells.append(cell + (" met" if met else " **not met**"))
            print(f"| {name} | {op} {bound} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
