#!/usr/bin/env python
"""Latency of one new event: Mamba4Rec.step (O(1) state update) vs recomputing forward() over
the whole history, at history lengths 50, 200, 1000 and batch 1 and 256 (paper defaults:
hidden 64, d_state 32, d_conv 4, expand 2; eval mode, no grad). Prints a table, writes CSV.

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --device cuda
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _Data:
    def num(self, field):
        return 3417


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="50,200,1000")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--csv", default=str(REPO / "benchmarks" / "out" / "streaming.csv"))
    args = p.parse_args()
    from mamba4rec import Mamba4Rec

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if args.device == "cpu" else None
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
           "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": max(lengths) + 1,
           "device": torch.device(args.device)}
    model = Mamba4Rec(cfg, _Data()).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"# {platform.processor() or platform.machine()} | torch {torch.__version__} | device {args.device} | "
          f"threads {torch.get_num_threads()}")
    rows = []
    print(f"{'batch':>5s} {'history':>7s} {'step ms':>9s} {'recompute ms':>13s} {'speedup':>8s}")
    for batch in [int(x) for x in args.batches.split(",")]:
        for L in lengths:
            seq = torch.randint(1, 3417, (batch, L + 1), device=args.device)
            state = model.init_state(batch)
            with torch.no_grad():
                for t in range(L):  # build the state over the history
                    model.step(seq[:, t], state)

            def step():
                s = type(state)([c.clone() for c in state.conv], [x.clone() for x in state.ssm], state.steps.clone())
                sync()
                t0 = time.perf_counter()
                model.step(seq[:, L], s)
                sync()
                return time.perf_counter() - t0

            def recompute():
                lens = torch.full((batch,), L + 1, device=args.device)
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(seq, lens)
                sync()
                return time.perf_counter() - t0

            step(), recompute()
            s_ms = 1e3 * sorted(step() for _ in range(args.reps))[args.reps // 2]
            r_ms = 1e3 * sorted(recompute() for _ in range(args.reps))[args.reps // 2]
            rows.append(dict(batch=batch, history=L, step_ms=s_ms, recompute_ms=r_ms, speedup=r_ms / s_ms,
                             device=args.device))
            print(f"{batch:5d} {L:7d} {s_ms:9.3f} {r_ms:13.3f} {r_ms / s_ms:8.1f}x", flush=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# CSV: {args.csv}")


if __name__ == "__main__":
    main()
