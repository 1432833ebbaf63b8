"""Federated-training aggregation throughput (issue 7): inference/fl.py on realistic state sizes.

Workloads: the SliceClassifier CNN fedgate ships (3,602 float32 parameters, 14 KB) and a synthetic ~50 MB
state (three large float32 tensors + a bias), each with K = 3 and 8 sites.  Throughput is MB of float32
weights processed per second (K × state size for the aggregation steps, one state for the per-site and
encoding steps); each figure is the median of ``--repeats`` timed runs (CNN: 50× as many, they are µs).

  * fedavg       — hub: ``fedavg`` over K states (float64 accumulation)
  * dp           — hub: ``clip`` each of the K updates + ``gaussian_noise`` once
  * sec site     — one site: ``quantize(n·Δ)`` + ``mask`` with K−1 pairwise streams (X25519 secrets
                   agreed beforehand, HKDF per pair and round included)
  * sec hub      — hub: ``unmask_sum`` of K masked states + ``dequantize`` + ``/ Σn`` (``secure_average``)
  * encode/decode — one state through ``encode_state`` / ``decode_state`` (float32; uint64 masked too)

Usage::

    .venv/bin/python bench/training_agg_bench.py [--repeats 3] [--write]

``--write`` appends a section to bench/RESULTS.md (machine, date, command, load average, figures).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import fl
from inference.models import SliceClassifier

SYNTHETIC_SHAPES = [(2048, 4096), (1024, 4096), (4, 4096), (4096,)]  # 12.6 M float32 ≈ 50.4 MB


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (one untimed warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cnn_states(k: int, seed: int) -> list[fl.State]:
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        out.append(fl.state_from_module(SliceClassifier()))
    return out


def synthetic_states(k: int, seed: int) -> list[fl.State]:
    rng = np.random.default_rng(seed)
    return [
        {f"layer{j}.weight": rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
         for j, shape in enumerate(SYNTHETIC_SHAPES)}
        for _ in range(k)
    ]


def mb(state: fl.State) -> float:
    return sum(v.nbytes for v in state.values()) / 1e6


def bench_workload(name: str, states: list[fl.State], repeats: int) -> dict[str, object]:
    k = len(states)
    size = mb(states[0])
    rng = np.random.default_rng(0)
    counts = [int(c) for c in rng.integers(50, 5000, size=k)]
    ids = [f"site-{i}" for i in range(k)]
    keys = {sid: fl.SiteKeys.generate() for sid in ids}
    publics = {sid: keys[sid].public_b64() for sid in ids}
    secrets = {sid: {p: keys[sid].shared(publics[p]) for p in ids if p != sid} for sid in ids}
    run_id = "bench"

    t_fedavg = timed(lambda: fl.fedavg(list(zip(states, counts))), repeats)

    def dp() -> None:
        clipped = [fl.clip(s, 1.0)[0] for s in states]
        fl.gaussian_noise(clipped[0], 0.5, np.random.default_rng(1))

    t_dp = timed(dp, repeats)

    def site() -> dict[str, np.ndarray]:
        weighted = {n: v.astype(np.float64) * counts[0] for n, v in states[0].items()}
        return fl.mask(fl.quantize(weighted), ids[0], secrets[ids[0]], run_id, 1)

    t_site = timed(site, repeats)
    masked = []
    for i, sid in enumerate(ids):
        weighted = {n: v.astype(np.float64) * counts[i] for n, v in states[i].items()}
        masked.append(fl.mask(fl.quantize(weighted), sid, secrets[sid], run_id, 1))
    t_hub = timed(lambda: fl.secure_average(masked, float(sum(counts))), repeats)
    # Correctness guard: the secure average equals plain FedAvg of the same states.
    sec = fl.secure_average(masked, float(sum(counts)))
    plain = fl.fedavg(list(zip(states, counts)))
    worst = max(float(np.abs(sec[n] - plain[n]).max()) for n in plain)
    assert worst < 1e-5, worst

    blob = fl.encode_state(states[0])
    t_enc = timed(lambda: fl.encode_state(states[0]), repeats)
    t_dec = timed(lambda: fl.decode_state(blob), repeats)
    masked_blob = fl.encode_state(masked[0])
    t_dec_masked = timed(lambda: fl.decode_state(masked_blob), repeats)
    return {
        "workload": name,
        "K": k,
        "state MB": size,
        "fedavg MB/s": k * size / t_fedavg,
        "fedavg ms": t_fedavg * 1e3,
        "dp MB/s": k * size / t_dp,
        "sec site MB/s": size / t_site,
        "sec site ms": t_site * 1e3,
        "sec hub MB/s": k * size / t_hub,
        "sec hub ms": t_hub * 1e3,
        "encode MB/s": size / t_enc,
        "decode MB/s": size / t_dec,
        "decode masked MB/s": (masked_blob.__len__() / 1e6) / t_dec_masked,
        "wire MB": len(blob) / 1e6,
        "masked wire MB": len(masked_blob) / 1e6,
    }


COLUMNS = ["workload", "K", "state MB", "fedavg MB/s", "fedavg ms", "dp MB/s", "sec site MB/s", "sec site ms",
           "sec hub MB/s", "sec hub ms", "encode MB/s", "decode MB/s", "decode masked MB/s"]


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure for the 50 MB state")
    parser.add_argument("--write", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    for k in (3, 8):
        rows.append(bench_workload("SliceClassifier CNN", cnn_states(k, 10), args.repeats * 50))
        print(f"done CNN K={k}", file=sys.stderr)
    for k in (3, 8):
        rows.append(bench_workload("synthetic 50 MB", synthetic_states(k, 20), args.repeats))
        print(f"done 50 MB K={k}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    md = table(rows)
    print(md)
    wire = {r["workload"]: (r["wire MB"], r["masked wire MB"]) for r in rows}
    print(f"\nwire size (encode_state): " + "; ".join(f"{w}: {a:.3f} MB float32, {b:.3f} MB masked uint64"
                                                     for w, (a, b) in wire.items()))
    if args.write:
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## Federated training aggregation (issue 7) — {now}\n\n"
            f"Machine: {platform.node()}, {os.cpu_count()}-core shared VM, Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}; other engineers' work was running "
            f"(1-min load average {load_before:.1f} before, {load_after:.1f} after). Single-threaded numpy.\n"
            f"Command: `.venv/bin/python bench/training_agg_bench.py --repeats {args.repeats} --write` "
            f"(median of {args.repeats} runs per 50 MB figure, {args.repeats * 50} per CNN figure).\n\n"
            f"{md}\n"
        )
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(section)
        print("appended to bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
