#!/usr/bin/env python
"""How much of a train_mode=sequence batch is the CE over all items (logits and softmax,
forward and backward), per model: the part that prefix and sequence mode pay alike per target.

    python benchmarks/bench_loss_share.py                                   # ml-100k
    python benchmarks/bench_loss_share.py --dataset amazon-beauty --data-path DIR

Times ten batches after two warm-ups: the model's whole sequence-mode step (forward, the
model's own loss, backward, Adam), then F.cross_entropy(x @ W.T, targets) forward + backward
alone on the same batches' targets, with the model's item embedding as W.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-path", default=None)
    p.add_argument("--models", default="Mamba4Rec,SASRec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from recbole.data import create_dataset, data_preparation

    from mamba4rec import pipeline, sequence

    torch.set_num_threads(args.threads)
    for model in args.models.split(","):
        cfg = {"state": "ERROR", "show_progress": False, "train_mode": "sequence"}
        if args.data_path:
            cfg["data_path"] = args.data_path
        config = pipeline.build_config(model, args.dataset, config_dict=cfg)
        train, _, _ = data_preparation(config, create_dataset(config))
        loader = sequence.SequenceTrainDataLoader(config, train.dataset, train._sampler)
        net = pipeline.build_model(config, train.dataset)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        it = iter(loader)
        batches = [next(it) for _ in range(args.batches + 2)]

        def step(batch):
            opt.zero_grad()
            sequence.sequence_loss(net, batch).backward()
            opt.step()

        def ce(batch, weight=net.item_embedding.weight):
            x = torch.randn(len(batch[net.POS_ITEM_ID]), weight.shape[1], requires_grad=True)
            F.cross_entropy(x @ weight.T, batch[net.POS_ITEM_ID]).backward()

        for fn in (step, ce):
            fn(batches[0])
            fn(batches[1])
        t0 = time.perf_counter()
        for b in batches[2:]:
            step(b)
        whole = (time.perf_counter() - t0) / args.batches
        t0 = time.perf_counter()
        for b in batches[2:]:
            ce(b)
        loss = (time.perf_counter() - t0) / args.batches
        print(f"{args.dataset} {model}: sequence batch {whole:.3f} s, of which CE over "
              f"{net.item_embedding.weight.shape[0]:,} items {loss:.3f} s ({100 * loss / whole:.0f}%)", flush=True)


if __name__ == "__main__":
    main()
