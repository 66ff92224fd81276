#!/usr/bin/env python
"""Turn raw public interaction data into RecBole atomic files: DIR/NAME/NAME.inter (+ stats).

    python datasets/prepare.py --format seq-text --input ../shared/datasets/ml-1m/ml-1m.txt \\
        --dataset ml-1m --output-dir dataset --kcore-item 5

Formats: movielens (ratings.dat, u.data, ml-1m.zip, ml-100k.zip), amazon (ratings CSV or
5-core reviews JSON lines, optionally .gz), seq-text (one line per user: user item1 item2 ...).
See docs/DATASETS.md. Exit status 2 with a one-line message on stderr for any bad input.

The logic lives in mamba4rec/data_prep.py, imported from the installed package (in a checkout:
pip install -e .). This folder is deliberately not a package (no __init__.py): ``datasets`` is a
popular PyPI package and must not be shadowed.
"""

from __future__ import annotations

import argparse
import os
import sys

from mamba4rec import data_prep as dp


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse's own adds the usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prepare.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=dp.FORMATS, help="input format")
    p.add_argument("--input", required=True, help="input file (plain, .gz, or a MovieLens .zip)")
    p.add_argument("--dataset", required=True,
                   help="data set name = RecBole's --dataset (ml-1m, amazon-beauty, ...)")
    p.add_argument("--output-dir", default="dataset",
                   help="RecBole data_path; writes OUTPUT_DIR/DATASET/DATASET.inter "
                        "(default: dataset, RecBole's and configs/overall.yaml's data_path)")
    p.add_argument("--kcore-user", type=int, default=0, metavar="K",
                   help="keep users with >= K interactions (iterated with --kcore-item to a "
                        "fixed point; default 0: no filtering)")
    p.add_argument("--kcore-item", type=int, default=0, metavar="K",
                   help="keep items with >= K interactions (default 0: no filtering)")
    p.add_argument("--csv-columns", default=",".join(dp.CSV_COLUMNS),
                   help="amazon CSV column order (default user,item,rating,timestamp as in the "
                        "2014 ratings_*.csv; the 2018 files are item,user,rating,timestamp)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = {"csv_columns": args.csv_columns} if args.format == "amazon" else {}
    try:
        stats = dp.prepare(args.format, args.input, args.dataset, args.output_dir,
                           user_k=args.kcore_user, item_k=args.kcore_item,
                           progress=not args.no_progress and sys.stderr.isatty(), **options)
    except dp.PrepareError as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output folder, disk full, ...
        print(f"prepare.py: error: {exc.strerror or exc}"
              f"{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return 2
    folder = os.path.join(args.output_dir, args.dataset)
    before, k = stats["before_filter"], stats["kcore"]
    if k["user"] > 1 or k["item"] > 1:
        removed = before["interactions"] - stats["interactions"]
        print(f"read {before['interactions']:,} interactions ({before['users']:,} users, "
              f"{before['items']:,} items); k-core (users >= {k['user']}, items >= {k['item']}): "
              + (f"{removed:,} removed in {k['passes']} pass(es)" if removed else "already satisfied"))
    print(f"{args.dataset}: {dp.format_stats(stats)}")
    print(f"wrote {os.path.join(folder, args.dataset + '.inter')} and {args.dataset}.stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
