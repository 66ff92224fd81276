#!/usr/bin/env python
"""Latency of one new event: Mamba4Rec.step (O(1) state update) vs recomputing forward() over
the whole history, at history lengths 50, 200, 1000 and batch 1 and 256 (paper defaults:
hidden 64, d_state 32, d_conv 4, expand 2, one layer; eval mode, no grad).

Both sides produce the same seq_output [B, hidden] for the history plus the new item (the
tests check it); scoring against the item table is the same afterwards and is left out. The
state for the history is built once with model.prefill; each timed step starts from a copy of
it. Recompute runs forward() on [B, L + 1] through the scan path scan_impl=auto picks (the
chunked torch scan on CPU, Triton on CUDA). Median of --reps runs after one warm-up.

    python -m benchmarks.bench_streaming                  # CPU
    python -m benchmarks.bench_streaming --device cuda
    python -m benchmarks.bench_streaming --threads 1 --lengths 50,200 --batches 1
    python -m benchmarks.bench_streaming --step-impl numba,numpy,torch --batches 1,4,16   # CPU step paths

--step-impl takes one or more of auto, numba, numpy, torch (model.step_impl; "auto" is the
default a user gets: for CPU float32 batches up to NUMBA_STEP_MAX_BATCH the compiled numba step
when numba is installed, else numpy up to NUMPY_STEP_MAX_BATCH; torch otherwise). With several,
each row is timed once per path, side by side in one run. The numba step is compiled (or loaded
from numba's cache) before timing, by model.warm_up_step.

Prints the environment and a table; writes CSV to benchmarks/out/streaming-<device>.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch

from mamba4rec.pipeline import cpu_name

REPO = Path(__file__).resolve().parents[1]

N_ITEMS = 3417  # ml-1m's item count (+ padding): sets the embedding table, not the timed work


class _Data:
    def num(self, field):
        return N_ITEMS


def environment(device) -> str:
    from mamba4rec.kernels import resolve_scan_impl

    import mamba4rec

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"mamba4rec {mamba4rec.__version__}",
             f"device {device}"]
    if device == "cuda":
        parts.append(torch.cuda.get_device_name())
    else:
        parts += [f"CPU {cpu_name()}", f"{os.cpu_count()} logical CPUs", f"torch threads {torch.get_num_threads()}"]
        if hasattr(os, "getloadavg"):
            parts.append("load avg %.2f" % os.getloadavg()[0])
    path, why = resolve_scan_impl("auto", torch.device(device))
    parts.append(f"recompute scan: {path}")
    return " | ".join(parts)


def _median_seconds(fn, reps, sync):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        times.append(fn(sync))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--lengths", default="50,200,1000", help="history lengths (comma-separated)")
    p.add_argument("--batches", default="1,256", help="batch sizes (comma-separated)")
    p.add_argument("--reps", type=int, default=7, help="timed runs per cell (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, CPUs))")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--step-impl", default="auto",
                   help="model.step_impl to time, comma-separated: auto, numba, numpy, torch (default auto)")
    p.add_argument("--csv", default=None, help="default benchmarks/out/streaming-<device>.csv")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    from mamba4rec import Mamba4Rec

    if args.device == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    from mamba4rec.streaming import STEP_IMPLS

    impls = [x.strip() for x in args.step_impl.split(",") if x.strip()]
    bad = [x for x in impls if x not in STEP_IMPLS]
    if bad or not impls:
        p.error(f"--step-impl {args.step_impl!r}: use one or more of {', '.join(STEP_IMPLS)}")
    if args.device == "cuda" and ({"numpy", "numba"} & set(impls)):
        p.error("--step-impl numpy and numba run on the CPU only")
    cfg = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
           "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": max(lengths) + 1,
           "device": torch.device(args.device), "hidden_size": args.hidden_size, "num_layers": args.num_layers}
    torch.manual_seed(0)
    model = Mamba4Rec(cfg, _Data()).to(args.device).eval()
    cuda_sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    print(f"# {environment(args.device)}")
    print(f"# Mamba4Rec hidden {args.hidden_size}, {args.num_layers} layer(s), d_state {model.d_state}, "
          f"d_conv {model.d_conv}, expand {model.expand}; median of {args.reps}")
    header = f"{'batch':>5s} {'history':>7s} {'path':>6s} {'step ms':>9s} {'recompute ms':>13s} {'speedup':>8s} {'state KiB/user':>15s}"
    print(header)
    rows = []
    for batch in batches:
        for L in lengths:
            seq = torch.randint(1, N_ITEMS, (batch, L + 1), device=args.device)
            lens_hist = torch.full((batch,), L, device=args.device)
            lens_all = torch.full((batch,), L + 1, device=args.device)
            _, state = model.prefill(seq[:, :L], lens_hist)
            new_items = seq[:, L]

            def step(sync=cuda_sync):
                s = state.clone()
                sync()
                t0 = time.perf_counter()
                model.step(new_items, s)
                sync()
                return time.perf_counter() - t0

            def recompute(sync=cuda_sync):
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(seq, lens_all)
                sync()
                return time.perf_counter() - t0

            r_ms = 1e3 * _median_seconds(recompute, args.reps, cuda_sync)
            state_kib = sum(t[0].numel() * t.element_size() for t in state.conv + state.ssm) / 1024
            for impl in impls:
                model.step_impl = impl
                path_used = model.warm_up_step(batch)  # derive weights / compile before timing
                s_ms = 1e3 * _median_seconds(step, args.reps, cuda_sync)
                row = dict(device=args.device, batch=batch, history=L, step_impl=impl, step_path=path_used,
                           step_ms=round(s_ms, 4), recompute_ms=round(r_ms, 4), speedup=round(r_ms / s_ms, 2),
                           state_kib_per_user=round(state_kib, 2),
                           threads=torch.get_num_threads() if args.device == "cpu" else "")
                rows.append(row)
                print(f"{batch:5d} {L:7d} {path_used:>6s} {s_ms:9.3f} {r_ms:13.3f} {r_ms / s_ms:7.1f}x "
                      f"{state_kib:15.1f}", flush=True)
    path = Path(args.csv or REPO / "benchmarks" / "out" / f"streaming-{args.device}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# CSV: {path}")


if __name__ == "__main__":
    main()
