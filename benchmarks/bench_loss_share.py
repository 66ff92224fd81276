#!/usr/bin/env python
"""How much of a train_mode=sequence batch is the CE over all items (logits and softmax,
forward and backward), per model: the part that prefix and sequence mode pay alike per target.

    python -m benchmarks.bench_loss_share                                   # ml-100k
    python -m benchmarks.bench_loss_share --dataset amazon-beauty --data-path DIR
    python -m benchmarks.bench_loss_share --dataset amazon-beauty --data-path DIR --chunk-rows 0,32,64,128,256

Times ten batches after two warm-ups: the model's whole sequence-mode step (forward, the
model's own loss, backward, Adam), then F.cross_entropy(x @ W.T, targets) forward + backward
alone on the same batches' targets, with the model's item embedding as W, and the same loss as
mamba4rec.loss.full_softmax_ce computes it (64 rows of logits at a time: what Mamba4Rec's CE
uses on CPU, ce_chunk_rows auto), side by side. Mamba4Rec's step is timed both ways
(``Mamba4Rec``: ce_chunk_rows auto; ``Mamba4Rec[ce_chunk_rows=0]``: the whole logits at once).

``--chunk-rows``: instead, Mamba4Rec's whole sequence step with each ce_chunk_rows value (0: the
whole logits), the values interleaved batch by batch in one process (their order reversed every
other batch), median per value.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-path", default=None)
    p.add_argument("--models", default="Mamba4Rec,SASRec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--chunk-rows", default=None, help="comma-separated ce_chunk_rows values to compare (see above)")
    args = p.parse_args()
    if args.chunk_rows:
        return chunk_rows(args)

    import torch
    import torch.nn.functional as F
    from recbole.data import create_dataset, data_preparation

    from mamba4rec import pipeline, sequence

    torch.set_num_threads(args.threads)
    from mamba4rec.loss import CPU_CHUNK_ROWS, full_softmax_ce

    runs = [(m, None) for m in args.models.split(",")]
    runs += [("Mamba4Rec", 0)] if "Mamba4Rec" in args.models.split(",") else []
    for model, rows in runs:
        cfg = {"state": "ERROR", "show_progress": False, "train_mode": "sequence"}
        if rows is not None:
            cfg["ce_chunk_rows"] = rows
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

        def chunked(batch, weight=net.item_embedding.weight):
            x = torch.randn(len(batch[net.POS_ITEM_ID]), weight.shape[1], requires_grad=True)
            full_softmax_ce(x, weight, batch[net.POS_ITEM_ID], CPU_CHUNK_ROWS).backward()

        def timed(fn):
            t0 = time.perf_counter()
            for b in batches[2:]:
                fn(b)
            return (time.perf_counter() - t0) / args.batches

        for fn in (step, ce, chunked):
            fn(batches[0])
            fn(batches[1])
        whole, loss, loss_chunked = timed(step), timed(ce), timed(chunked)
        name = model + (f"[ce_chunk_rows={rows}]" if rows is not None else "")
        print(f"{args.dataset} {name}: sequence batch {whole:.3f} s; CE over {net.item_embedding.weight.shape[0]:,} "
              f"items alone: whole logits {loss:.3f} s ({100 * loss / whole:.0f}% of the batch), "
              f"{CPU_CHUNK_ROWS} rows at a time {loss_chunked:.3f} s ({loss_chunked / loss:.2f}x)", flush=True)


def chunk_rows(args) -> None:
    import statistics

    import torch
    from recbole.data import create_dataset, data_preparation

    from mamba4rec import pipeline, sequence

    torch.set_num_threads(args.threads)
    cfg = {"state": "ERROR", "show_progress": False, "train_mode": "sequence"}
    if args.data_path:
        cfg["data_path"] = args.data_path
    config = pipeline.build_config("Mamba4Rec", args.dataset, config_dict=cfg)
    train, _, _ = data_preparation(config, create_dataset(config))
    loader = sequence.SequenceTrainDataLoader(config, train.dataset, train._sampler)
    net = pipeline.build_model(config, train.dataset)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    it = iter(loader)
    batches = [next(it) for _ in range(args.batches + 2)]
    values = [int(v) for v in args.chunk_rows.split(",")]
    times = {v: [] for v in values}
    for i, batch in enumerate(batches):
        for v in (values if i % 2 else values[::-1]):
            net.ce_chunk_rows = v
            t0 = time.perf_counter()
            opt.zero_grad()
            sequence.sequence_loss(net, batch).backward()
            opt.step()
            times[v].append(time.perf_counter() - t0)
    print(f"{args.dataset} Mamba4Rec sequence step, {args.threads} thread(s), median of {args.batches} batches: "
          + ", ".join(f"ce_chunk_rows {v}: {statistics.median(t[2:]):.3f} s" for v, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
