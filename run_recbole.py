#!/usr/bin/env python
"""Train and evaluate Mamba4Rec (or any RecBole model) from YAML configs.

    python run_recbole.py                                  # Mamba4Rec on ml-100k (bundled)
    python run_recbole.py -m SASRec -d ml-100k --epochs=5  # a RecBole baseline, same configs
    python run_recbole.py --config_files "a.yaml b.yaml" --hidden_size=128
    python run_recbole.py -d amazon-beauty --compare=SASRec,GRU4Rec           # one protocol, one table
    python run_recbole.py -d amazon-beauty --compare=SASRec,GRU4Rec --resume  # after an interruption

Flags as RecBole's run_recbole.py: --model/-m, --dataset/-d, --config_files, and any
--key=value override (command line > config dict > config files).
"""

from __future__ import annotations

import argparse
import signal
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train and evaluate Mamba4Rec or any RecBole model.",
        epilog="Any other --key=value sets a RecBole/Mamba4Rec config key (e.g. --epochs=5).",
    )
    parser.add_argument("--model", "-m", default="Mamba4Rec", help="Mamba4Rec or a RecBole model name")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="data set name (default: ml-100k)")
    parser.add_argument("--config_files", default=None,
                        help="space-separated extra YAML files, applied after configs/")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue an interrupted run exactly: from PATH, or (no PATH) from "
                             "<checkpoint_dir>/<model>-<dataset>-last.pth if there is one; with --compare, "
                             "keep finished models and continue the interrupted one")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="after evaluation, write a serving checkpoint of the best Mamba4Rec to PATH "
                             "(for python -m mamba4rec.recommend; see docs/STREAMING.md)")
    parser.add_argument("--compare", default=None, metavar="MODELS",
                        help="comma-separated baselines (e.g. SASRec,GRU4Rec): train --model and each of "
                             "them under the same protocol, write a table, CSV and chart")
    parser.add_argument("--compare_dir", default=None,
                        help="where --compare writes compare.md/.csv/.png (default saved/compare-<dataset>)")
    parser.add_argument("--compare_run", default=None, metavar="MODELS",
                        help="with --compare: train only these of its models; the table shows the others "
                             "as their rows in --compare_dir say (for several processes sharing one "
                             "comparison, e.g. one model each with OMP_NUM_THREADS=1)")
    parser.add_argument("--compare_status", action="store_true",
                        help="print where the comparison in --compare_dir stands (per model: finished, in "
                             "progress with its epochs and best score so far, pending), from its files; "
                             "trains nothing")
    dist = parser.add_argument_group("distributed (torch.distributed DDP through RecBole's trainer)")
    dist.add_argument("--nproc", type=int, default=1, help="processes on this node (default 1: no DDP)")
    dist.add_argument("--world_size", type=int, default=None, help="processes over all nodes (default: nproc)")
    dist.add_argument("--ip", default="127.0.0.1", help="address of the node running rank 0")
    dist.add_argument("--port", type=int, default=29500, help="rendezvous port on that node")
    dist.add_argument("--group_offset", type=int, default=0, help="global rank of this node's first process")
    dist.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                      help="default: nccl with GPUs, gloo without")
    dist.add_argument("--dist_timeout", type=float, default=300.0,
                      help="seconds to wait for all processes to join (default 300)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {' '.join(bad)}: overrides take the form --key=value")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from mamba4rec.pipeline import run

    config_files = args.config_files.strip().split() if args.config_files else None
    if args.compare_status:
        from mamba4rec.compare import progress_report

        checkpoint_dir = next((a.split("=", 1)[1] for a in overrides if a.startswith("--checkpoint_dir=")), None)
        try:
            models = [args.model] + [m.strip() for m in (args.compare or "").split(",") if m.strip()] \
                if args.compare else []
            print(progress_report(args.compare_dir or f"saved/compare-{args.dataset}", checkpoint_dir,
                                  models=models))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.compare_run and not args.compare:
        print("error: --compare_run picks models of a comparison: give --compare=... too", file=sys.stderr)
        return 2
    if args.compare and args.resume not in (None, "auto"):
        print("error: with --compare, --resume takes no PATH: each model continues from its own "
              "<compare_dir>/checkpoints/<model>-<dataset>-last.pth", file=sys.stderr)
        return 2
    distributed = args.nproc > 1 or (args.world_size or 1) > 1
    if distributed and (args.compare or args.resume):
        print(f"error: {'--compare' if args.compare else '--resume'} runs in one process: drop --nproc/--world_size "
              f"(each rank's random state is its own, so a distributed resume could not be exact)", file=sys.stderr)
        return 2
    if args.export and (args.compare or distributed):
        print("error: --export works with a single training run, not with --compare or distributed runs",
              file=sys.stderr)
        return 2
    try:
        if args.compare:
            return _compare(args, config_files, overrides)
        if distributed:
            return _distributed(args, config_files, overrides)
        result = run(args.model, args.dataset, config_files=config_files, cmd_args=overrides, resume=args.resume,
                     export_path=args.export)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{result.model} on {result.dataset}: {result.epochs_run} epochs, "
          f"best epoch {result.best_epoch}, {result.train_seconds_per_epoch:.1f} s/epoch")
    print("best valid:", ", ".join(f"{k}={v:.4f}" for k, v in result.best_valid_result.items()))
    print("test      :", ", ".join(f"{k}={v:.4f}" for k, v in result.test_result.items()))
    if result.extra.get("export_path"):
        print("serving checkpoint:", result.extra["export_path"])
    return 0


def _distributed(args, config_files, overrides) -> int:
    from mamba4rec.distributed import DistSpec, run_distributed

    spec = DistSpec(nproc=args.nproc, world_size=args.world_size, ip=args.ip, port=args.port,
                    group_offset=args.group_offset, backend=args.backend, timeout_s=args.dist_timeout)
    result = run_distributed(args.model, args.dataset, spec, config_files=config_files, cmd_args=overrides)
    if result is None:  # this node does not host rank 0, which prints the result
        print(f"ranks {spec.group_offset}..{spec.group_offset + spec.nproc - 1} finished; the node running "
              f"rank 0 prints the metrics")
        return 0
    print(f"\n{result['model']} on {result['dataset']} ({spec.nproc} processes on this node): "
          f"{result['epochs_run']} epochs, best epoch {result['best_epoch']}")
    print("best valid:", ", ".join(f"{k}={v:.4f}" for k, v in result["best_valid_result"].items()))
    print("test      :", ", ".join(f"{k}={v:.4f}" for k, v in result["test_result"].items()))
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _compare(args, config_files, overrides) -> int:
    from pathlib import Path

    from mamba4rec.compare import compare

    models = [args.model] + [m.strip() for m in args.compare.split(",") if m.strip()]
    out_dir = args.compare_dir or f"saved/compare-{args.dataset}"
    only = [m.strip() for m in args.compare_run.split(",") if m.strip()] if args.compare_run else None
    # SIGTERM (a `timeout`, a job scheduler) as an exception: the model's own process is then
    # stopped with this one instead of finding out a second later that it was orphaned
    before = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        rows = compare(models, args.dataset, out_dir, config_files=config_files, cmd_args=overrides, only=only,
                       resume=args.resume == "auto")
    finally:
        signal.signal(signal.SIGTERM, before)
    print()
    print(Path(out_dir, "compare.md").read_text())  # with the rows of models run elsewhere (--compare_run)
    written = [name for name in ("compare.md", "compare.csv", "compare.png", "curves.csv", "compare_curves.png")
               if Path(out_dir, name).is_file()]
    print(f"written: {out_dir}/{', '.join(written)}")
    from mamba4rec.compare.report import chart_note

    if chart_note():
        print(chart_note())
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
