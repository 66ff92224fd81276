#!/usr/bin/env python
"""End-to-end check: Mamba4Rec trained 20 steps with scan_impl=triton and with scan_impl=torch
from the same initial weights on the same batches; prints both loss curves and their largest
gap (dropout off so the two runs see the same computation).

    python -m benchmarks.e2e_triton_vs_torch                                   # GPU
    TRITON_INTERPRET=1 python -m benchmarks.e2e_triton_vs_torch --device cpu --batch 8 --max-len 12 --steps 3
"""

from __future__ import annotations

import argparse
import copy

import torch


class _Data:
    def __init__(self, n):
        self.n = n

    def num(self, field):
        return self.n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--n-items", type=int, default=3417)
    args = p.parse_args()
    from mamba4rec import Mamba4Rec

    cfg = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
           "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": args.max_len,
           "device": torch.device(args.device), "dropout_prob": 0.0}
    torch.manual_seed(0)
    base = Mamba4Rec(dict(cfg, scan_impl="torch"), _Data(args.n_items)).to(args.device)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        lens = torch.randint(1, args.max_len + 1, (args.batch,), generator=gen)
        seq = torch.randint(1, args.n_items, (args.batch, args.max_len), generator=gen)
        seq = seq * (torch.arange(args.max_len)[None] < lens[:, None])
        batches.append({"item_id_list": seq.to(args.device), "item_length": lens.to(args.device),
                        "item_id": torch.randint(1, args.n_items, (args.batch,), generator=gen).to(args.device)})
    curves = {}
    for impl in ("torch", "triton"):
        model = copy.deepcopy(base)
        for layer in model.mamba_layers:
            layer.mamba.scan_impl = impl
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        curves[impl] = []
        for inter in batches:
            opt.zero_grad()
            loss = model.calculate_loss(inter)
            loss.backward()
            opt.step()
            curves[impl].append(loss.item())
    for i, (a, b) in enumerate(zip(curves["torch"], curves["triton"])):
        print(f"step {i:3d}  torch {a:.6f}  triton {b:.6f}  diff {abs(a - b):.2e}")
    gap = max(abs(a - b) for a, b in zip(curves["torch"], curves["triton"]))
    print(f"largest loss gap over {args.steps} steps: {gap:.3e}")


if __name__ == "__main__":
    main()
