#!/usr/bin/env python
"""Train and evaluate Mamba4Rec (or any RecBole model) from YAML configs.

    python run_recbole.py                                  # Mamba4Rec on ml-100k (bundled)
    python run_recbole.py -m SASRec -d ml-100k --epochs=5  # a RecBole baseline, same configs
    python run_recbole.py --config_files "a.yaml b.yaml" --hidden_size=128

Flags as RecBole's run_recbole.py: --model/-m, --dataset/-d, --config_files, and any
--key=value override (command line > config dict > config files).
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--compare", default=None, metavar="MODELS",
                        help="comma-separated baselines (e.g. SASRec,GRU4Rec): train --model and each of "
                             "them under the same protocol, write a table, CSV and chart")
    parser.add_argument("--compare_dir", default=None,
                        help="where --compare writes compare.md/.csv/.png (default saved/compare-<dataset>)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {' '.join(bad)}: overrides take the form --key=value")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from mamba4rec.pipeline import run

    config_files = args.config_files.strip().split() if args.config_files else None
    try:
        if args.compare:
            return _compare(args, config_files, overrides)
        result = run(args.model, args.dataset, config_files=config_files, cmd_args=overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{result.model} on {result.dataset}: {result.epochs_run} epochs, "
          f"best epoch {result.best_epoch}, {result.train_seconds_per_epoch:.1f} s/epoch")
    print("best valid:", ", ".join(f"{k}={v:.4f}" for k, v in result.best_valid_result.items()))
    print("test      :", ", ".join(f"{k}={v:.4f}" for k, v in result.test_result.items()))
    return 0


def _compare(args, config_files, overrides) -> int:
    from mamba4rec.compare import compare, markdown_table

    models = [args.model] + [m.strip() for m in args.compare.split(",") if m.strip()]
    out_dir = args.compare_dir or f"saved/compare-{args.dataset}"
    rows = compare(models, args.dataset, out_dir, config_files=config_files, cmd_args=overrides)
    print()
    print(markdown_table(rows, args.dataset))
    print(f"written: {out_dir}/compare.md, compare.csv, compare.png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
