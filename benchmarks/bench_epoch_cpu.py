#!/usr/bin/env python
"""CPU training-epoch time and peak memory: Mamba4Rec vs SASRec vs GRU4Rec, side by side, in
both train modes (prefix: RecBole's protocol; sequence: one pass per window, mamba4rec/sequence.py).

Each (model, max length) runs in its own child process (clean peak RSS), on the same data,
split, batch size and seed, through mamba4rec.pipeline (the models' RecBole defaults + the
project's configs). Prints one table with the ratios to SASRec and writes CSV. The first batch
of each run is an untimed warm-up (it loads, or on a fresh install compiles, the numba scan);
s/epoch is the timed batches' mean times the batches in an epoch.

    python -m benchmarks.bench_epoch_cpu                       # ml-100k, L=50 and 200, full epochs
    python -m benchmarks.bench_epoch_cpu --max-batches 5       # time 5 batches, scale to an epoch
    python -m benchmarks.bench_epoch_cpu --lengths 50 --models Mamba4Rec,SASRec
    python -m benchmarks.bench_epoch_cpu --scan-impl numba,torch --models Mamba4Rec,SASRec   # both CPU scans
    python -m benchmarks.bench_epoch_cpu --scan-impl numba --fast-dropout on,off              # both dropouts
    python -m benchmarks.bench_epoch_cpu --dataset amazon-beauty --data-path OUT/dataset/ --lengths 50
    python -m benchmarks.bench_epoch_cpu --dataset ml-1m --data-path DIR --lengths 200 --prefix-max-batches 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    from mamba4rec.memory import PeakMemory

    with PeakMemory() as mem:  # the whole process: data loading, model, training
        _child(args, mem)


def _child(args, mem) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed

    from mamba4rec import pipeline, sequence
    from mamba4rec.memory import rss_mib

    padded = args.train_mode == "prefix-padded"  # the protocol as RecBole runs it: every sample padded to L
    mode = "prefix" if padded else args.train_mode
    cfg = {"train_mode": mode, "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": args.batch_size,
           "show_progress": False, "state": "ERROR", "checkpoint_dir": args.tmp}
    if padded:
        cfg["length_buckets"] = 1
    if args.scan_impl:
        cfg["scan_impl"] = args.scan_impl
    if args.data_path:
        cfg["data_path"] = args.data_path
    config = pipeline.build_config(args.model, args.dataset, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    if mode == "sequence":
        train = sequence.SequenceTrainDataLoader(config, train.dataset, train._sampler)
    model = pipeline.build_model(config, train.dataset)
    buckets = sequence.train_buckets(model, config, mode)  # the batches as run() trains them
    if mode == "sequence":
        def loss_of(inter):
            return sequence.sequence_loss(model, inter, buckets)
    elif buckets != 1:
        def loss_of(inter):
            return sequence.prefix_loss(model, inter, buckets)
    else:
        loss_of = model.calculate_loss
    max_batches = args.prefix_max_batches if mode == "prefix" and args.prefix_max_batches else args.max_batches
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    n_batches = len(train)
    rss_before = rss_mib()
    model.train()
    t0 = time.perf_counter()
    done = 0
    warm = True  # the first batch is a warm-up, not timed: it loads or compiles the numba scan
    for interaction in train:  # the trainer's own step: forward, loss, backward, Adam
        interaction = interaction.to(config["device"])
        if warm:
            trainer.optimizer.zero_grad()
            loss_of(interaction).backward()
            trainer.optimizer.step()
            warm = False
            t0 = time.perf_counter()
            continue
        trainer.optimizer.zero_grad()
        loss = loss_of(interaction)
        loss.backward()
        trainer.optimizer.step()
        done += 1
        if max_batches and done >= max_batches:
            break
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise SystemExit(f"{args.model}: non-finite loss {loss.item()}")
    peak = max(mem.peak_mib, rss_mib())
    print(json.dumps({
        "model": args.model + (f"[{args.scan_impl}]" if args.scan_impl else ""), "max_len": args.max_len, "train_mode": args.train_mode, "batches_timed": done, "batches_per_epoch": n_batches,
        "epoch_seconds": seconds / done * n_batches, "seconds_per_batch": seconds / done,
        "peak_rss_mib": peak, "rss_before_train_mib": rss_before, "train_rss_growth_mib": peak - rss_before,
        "params": sum(p.numel() for p in model.parameters()), "final_loss": float(loss),
        "extrapolated": done < n_batches - 1,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--models", default="Mamba4Rec,SASRec,GRU4Rec")
    p.add_argument("--lengths", default="50,200")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-batches", type=int, default=0, help="time only this many batches (0 = a full epoch)")
    p.add_argument("--prefix-max-batches", type=int, default=0,
                   help="prefix mode only: time this many batches and scale (default: --max-batches)")
    p.add_argument("--train-modes", default="prefix,sequence",
                   help="comma-separated, side by side: prefix (RecBole's protocol as run() trains it: each batch in "
                        "length_buckets buckets), prefix-padded (the same samples padded to L, as RecBole runs "
                        "them: length_buckets 1), sequence")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--scan-impl", default=None,
                   help="Mamba4Rec scan path(s), comma-separated: each gets its own row (default: the config's, auto)")
    p.add_argument("--fast-dropout", default="on", help="on, off or on,off: Mamba4Rec's compiled CPU dropout "
                   "(MAMBA4REC_FAST_DROPOUT); on,off times both side by side")
    p.add_argument("--data-path", default=None, help="RecBole data_path (prepared atomic files), for data sets "
                   "other than the embedded ml-100k")
    p.add_argument("--csv", default=str(REPO / "benchmarks" / "out" / "epoch_cpu.csv"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--train-mode", default="prefix", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/mamba4rec-bench", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    print(f"# {platform.platform()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {args.threads} | cpus {os.cpu_count()} | {platform.processor() or platform.machine()}")
    print(f"# dataset {args.dataset}, batch {args.batch_size}, "
          f"{'first %d batches, scaled to an epoch' % args.max_batches if args.max_batches else 'full epoch'}"
          f"{'; prefix mode: first %d batches, scaled' % args.prefix_max_batches if args.prefix_max_batches else ''}")
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        drops = args.fast_dropout.split(",")
        runs = [(m, impl, drop, mode) for m in args.models.split(",")
                for mode in args.train_modes.split(",")
                for impl in ((args.scan_impl or "").split(",") if m == "Mamba4Rec" else [""])
                for drop in (drops if m == "Mamba4Rec" else ["on"])]
        for model, impl, drop, mode in runs:
            # the child runs this module from the scratch folder (RecBole writes log/ there): the
            # checkout goes on its module path, so it imports the same mamba4rec as this process
            env = dict(os.environ, MAMBA4REC_FAST_DROPOUT="0" if drop == "off" else "1",
                       PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            cmd = [sys.executable, "-m", "benchmarks.bench_epoch_cpu", "--child", "--model", model, "--max-len", str(L),
                   "--dataset", args.dataset, "--batch-size", str(args.batch_size),
                   "--max-batches", str(args.max_batches), "--threads", str(args.threads),
                   "--train-mode", mode, "--prefix-max-batches", str(args.prefix_max_batches)]
            if impl:
                cmd += ["--scan-impl", impl]
            if args.data_path:
                cmd += ["--data-path", os.path.abspath(args.data_path)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  cwd=args.tmp if os.path.isdir(args.tmp) else None)
            if proc.returncode != 0:
                print(f"{model} L={L} {mode}: FAILED\n{proc.stderr[-1500:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if model == "Mamba4Rec" and len(drops) > 1:
                row["model"] += "+torch-dropout" if drop == "off" else "+fast-dropout"
            rows.append(row)
            print(f"  {row['model']:16s} L={L:4d} {mode:8s} {row['epoch_seconds']:8.1f} s/epoch  "
                  f"{row['seconds_per_batch']:6.2f} s/batch  peak RSS {row['peak_rss_mib']:7.0f} MiB", flush=True)
    print()
    print("| model | L | mode | s/epoch | batches timed / epoch | s/batch | peak RSS MiB | train RSS growth MiB "
          "| prefix / sequence epoch | padded prefix / sequence epoch | epoch / SASRec's (same mode) "
          "| memory growth / SASRec's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        def find(model, mode):
            return next((r for r in rows if r["model"] == model and r["max_len"] == row["max_len"]
                         and r["train_mode"] == mode), None)
        base = find("SASRec", row["train_mode"])
        prefix = find(row["model"], "prefix")
        t_ratio = f"{row['epoch_seconds'] / base['epoch_seconds']:.2f}" if base else "-"
        m_ratio = f"{row['train_rss_growth_mib'] / max(base['train_rss_growth_mib'], 1):.2f}" if base else "-"
        padded = find(row["model"], "prefix-padded")
        seq = row["train_mode"] == "sequence"
        speedup = f"{prefix['epoch_seconds'] / row['epoch_seconds']:.1f}x" if prefix and seq else "-"
        padded_speedup = f"{padded['epoch_seconds'] / row['epoch_seconds']:.1f}x" if padded and seq else "-"
        print(f"| {row['model']} | {row['max_len']} | {row['train_mode']} | {row['epoch_seconds']:.1f} | "
              f"{row['batches_timed']} / {row['batches_per_epoch']} | {row['seconds_per_batch']:.3f} | "
              f"{row['peak_rss_mib']:.0f} | {row['train_rss_growth_mib']:.0f} | {speedup} | {padded_speedup} | {t_ratio} "
              f"| {m_ratio} |")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    os.makedirs("/tmp/mamba4rec-bench", exist_ok=True)
    main()
