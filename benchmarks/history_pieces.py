"""How much of a train_mode=history epoch trains past a cut gradient: the targets in pieces of users
that began in an earlier batch (their earlier items run without gradient), and the positions those
no-gradient restarts add. One epoch of the loader's batches; nothing is trained.

    python -m benchmarks.history_pieces --dataset ml-1m --data-path DIR [--batch-size 2048]

DIR: RecBole's data_path (DIR/<dataset>/<dataset>.inter), prepared as docs/DATASETS.md says.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--batch-size", type=int, default=2048)
    a = p.parse_args(argv)

    from recbole.data import create_dataset, data_preparation

    import mamba4rec  # noqa: F401  (RecBole's patches)
    from mamba4rec import history
    from mamba4rec.pipeline import build_config

    config = build_config("Mamba4Rec", a.dataset, config_dict={
        "data_path": a.data_path, "train_mode": "history", "train_batch_size": a.batch_size, "state": "ERROR"})
    train, _, _ = data_preparation(config, create_dataset(config))
    loader = history.HistoryTrainDataLoader(config, train.dataset, train._sampler)
    targets = cut = pieces = restart = 0
    for batch in loader:
        lo, end = batch[history.FROM], batch[config["ITEM_LIST_LENGTH_FIELD"]]
        later = lo > 0
        targets += int((end - lo).sum())
        cut += int((end - lo)[later].sum())
        pieces += int(later.sum())
        restart += int(lo[later].sum())
    print(f"{a.dataset}, train_batch_size {a.batch_size}: {len(loader.windows):,} users, {targets:,} targets in "
          f"{len(loader):,} steps")
    print(f"targets in pieces of users that began in an earlier batch: {cut:,} ({100 * cut / targets:.1f} %), "
          f"{pieces:,} such pieces")
    print(f"positions their no-gradient restarts run: {restart:,} ({100 * restart / targets:.1f} % of the targets)")


if __name__ == "__main__":
    main()
