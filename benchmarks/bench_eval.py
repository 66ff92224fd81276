#!/usr/bin/env python
"""Full-ranking evaluation time: each model's forward over the batch padded to L (RecBole's own
evaluation) against the length buckets run() evaluates in (mamba4rec.sequence.bucketed_forward,
the buckets of its training batches), side by side in one process, on the same weights.

For each model: one validation pass of RecBole's Trainer.evaluate per setting, alternated
``--repeats`` times (after one untimed pass each), the median seconds of each, their ratio, and
what changes in the scores: the largest |score difference| over every user and item, the users
whose top 10 differs (items or order) and the metrics of both. Weights: a fresh init moved by
seeded noise (away from the near-uniform scores of an init, so differences would show), or a
trained checkpoint (``--checkpoint MODEL=PATH``, RecBole's best .pth of a run on this data).

    python -m benchmarks.bench_eval                                  # ml-100k, SASRec, GRU4Rec, Mamba4Rec
    python -m benchmarks.bench_eval --dataset amazon-beauty --data-path DIR --threads 1
    python -m benchmarks.bench_eval --dataset amazon-video-games --data-path DIR --models SASRec \\
        --checkpoint SASRec=OUT/video-games/sequence/checkpoints/SASRec-<time>.pth

Mamba4Rec's forward buckets itself (its ``length_buckets``): its "padded" column sets
length_buckets 1 on the model for the duration, so that it runs to each batch's longest history
(L in practice: a batch of thousands of users holds one that long); the score comparison of
its bucketed side goes through sequence.bucketed_forward, the same outputs as its own buckets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _model_weights(net, path, seed=1):
    import torch

    if path:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise SystemExit(f"{path}: not a checkpoint of RecBole's Trainer (no state_dict)")
        try:
            net.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise SystemExit(f"{path}: does not fit {type(net).__name__} on this data ({exc}); give the best "
                             f"checkpoint of a run of that model on the same data set") from None
        return "checkpoint"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return "init + noise"


def compare_scores(net, loader, buckets, k=10):
    """(largest |padded - bucketed| score, users whose top k differs, users) over the loader."""
    import torch

    from mamba4rec.sequence import bucketed_forward

    gap, differ, users = 0.0, 0, 0
    net.eval()
    with torch.no_grad():
        device = next(net.parameters()).device
        for interaction, _, _, _ in loader:
            interaction = interaction.to(device)
            with _padded(net):
                a = net.full_sort_predict(interaction)
            with bucketed_forward(net, buckets):
                b = net.full_sort_predict(interaction)
            gap = max(gap, float((a - b).abs().max()))
            ta, tb = torch.topk(a, k, dim=-1).indices, torch.topk(b, k, dim=-1).indices
            differ += int((ta != tb).any(dim=-1).sum())
            users += a.shape[0]
    return gap, differ, users


class _padded:
    """Mamba4Rec's forward without its own buckets (length_buckets 1) for the duration."""

    def __init__(self, net):
        self.net, self.saved = net, getattr(net, "length_buckets", None)

    def __enter__(self):
        if self.saved is not None:
            self.net.length_buckets = 1

    def __exit__(self, *exc):
        if self.saved is not None:
            self.net.length_buckets = self.saved


def bench_model(args, name, checkpoint):
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed

    from mamba4rec import pipeline, sequence

    cfg = {"MAX_ITEM_LIST_LENGTH": args.max_len, "show_progress": False, "state": "ERROR",
           "eval_batch_size": args.eval_batch_size}
    if args.data_path:
        cfg["data_path"] = args.data_path
    config = pipeline.build_config(name, args.dataset, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, _ = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    net = pipeline.build_model(config, train.dataset)
    weights = _model_weights(net, checkpoint)
    own = getattr(net, "length_buckets", None)
    buckets = own if own is not None else sequence.prefix_buckets(net, config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)

    def padded():
        with _padded(net):
            return trainer.evaluate(valid, load_best_model=False)

    def bucketed():
        if own is not None:  # its own forward buckets
            return trainer.evaluate(valid, load_best_model=False)
        with sequence.bucketed_forward(net, buckets):
            return trainer.evaluate(valid, load_best_model=False)

    results = {"padded": padded(), "bucketed": bucketed()}  # untimed warm-up (numba scan, allocator)
    times = {"padded": [], "bucketed": []}
    for _ in range(args.repeats):
        for key, fn in (("padded", padded), ("bucketed", bucketed)):
            t0 = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - t0)
    gap, differ, users = compare_scores(net, valid, buckets)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "weights": weights, "buckets": buckets, "users": users,
            "padded_s": med["padded"], "bucketed_s": med["bucketed"], "padded_over_bucketed": med["padded"] / med["bucketed"],
            "max_score_gap": gap, "top10_differs_users": differ,
            "padded_result": dict(results["padded"]), "bucketed_result": dict(results["bucketed"]),
            "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-path", default=None, help="folder holding <dataset>/<dataset>.inter")
    ap.add_argument("--models", default="SASRec,GRU4Rec,Mamba4Rec")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--eval-batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                    help="evaluate these weights for MODEL (RecBole's best .pth); repeatable")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    checkpoints = {}
    for item in args.checkpoint:
        model, sep, path = item.partition("=")
        if not sep or not path:
            ap.error(f"--checkpoint {item!r}: give MODEL=PATH")
        if not Path(path).is_file():
            ap.error(f"--checkpoint {item!r}: no file {path}")
        checkpoints[model] = path
    import torch

    torch.set_num_threads(args.threads)
    rows = [bench_model(args, m, checkpoints.get(m)) for m in args.models.split(",") if m]
    from mamba4rec.compare import machine

    print(f"# {args.dataset}, L={args.max_len}, eval batch {args.eval_batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats}; {machine()}")
    print("| model | weights | buckets | users | padded s | bucketed s | padded / bucketed | max |score gap| "
          "| users with another top 10 | NDCG@10 padded | NDCG@10 bucketed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['buckets']} | {r['users']:,} | {r['padded_s']:.2f} | "
              f"{r['bucketed_s']:.2f} | {r['padded_over_bucketed']:.2f}x | {r['max_score_gap']:.2g} | "
              f"{r['top10_differs_users']} | {r['padded_result'].get('ndcg@10')} | {r['bucketed_result'].get('ndcg@10')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
