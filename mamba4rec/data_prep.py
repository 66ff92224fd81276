"""Raw public interaction data -> RecBole atomic files, with k-core filtering and statistics.

:func:`prepare` reads the input with a reader of mamba4rec/data_readers.py (movielens, amazon,
seq-text; their names are imported here too), filters it to its k-core, and writes
``DATASET.inter`` and ``DATASET.stats.json`` through :func:`mamba4rec.files.atomic_paths`:
both complete and flushed to disk before either is renamed into place.

Neither this module nor the readers import RecBole or torch themselves (datasets/prepare.py is
the command line). Every problem with the input is a :class:`PrepareError` whose message is one
line naming the file, the line and the reason.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from typing import Iterable, Iterator

from .data_readers import (  # noqa: F401  (re-exported: the readers are part of data_prep's API)
    AMAZON_JSON_KEYS, CSV_COLUMNS, FORMATS, MOVIELENS_RATING_FILES, MOVIELENS_ZIP_MEMBERS, PROGRESS_MIN_BYTES,
    READERS, PrepareError, Record, _check_input, amazon_kind, read_amazon, read_movielens, read_records,
    read_seq_text)
from .files import atomic_paths


# --------------------------------------------------------------------------- filtering


def kcore_pass(records: list, user_k: int = 0, item_k: int = 0) -> list:
    """One pass: drop interactions of users with < user_k and items with < item_k of them."""
    users = Counter(r[0] for r in records) if user_k > 1 else None
    items = Counter(r[1] for r in records) if item_k > 1 else None
    if users is not None and min(users.values(), default=user_k) >= user_k:
        users = None
    if items is not None and min(items.values(), default=item_k) >= item_k:
        items = None
    if users is None and items is None:
        return records
    return [r for r in records
            if (users is None or users[r[0]] >= user_k) and (items is None or items[r[1]] >= item_k)]


def _check_k(user_k, item_k) -> None:
    for what, k in (("user", user_k), ("item", item_k)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise PrepareError(f"--kcore-{what} must be an integer >= 0, got {k!r}")


def kcore_filter(records: list, user_k: int = 0, item_k: int = 0) -> tuple[list, int]:
    """k-core filtering repeated until nothing changes; returns ``(records, passes)``.

    Dropping an item can push a user under user_k and the reverse, so one pass is not enough.
    The fixed point is the largest sub-data set where every user has >= user_k and every item
    >= item_k interactions, whatever the order of removals. ``passes`` counts the passes that
    removed something. K <= 1 means no filtering on that side. Order is kept.
    """
    _check_k(user_k, item_k)
    passes = 0
    while True:
        kept = kcore_pass(records, user_k, item_k)
        if len(kept) == len(records):
            return kept, passes
        records, passes = kept, passes + 1


# --------------------------------------------------------------------------- statistics


def compute_stats(records: list) -> dict:
    """users, items, interactions, density and per-user sequence length min/median/mean/max."""
    lengths = Counter(r[0] for r in records)
    n_items = len({r[1] for r in records})
    n_users, n = len(lengths), len(records)
    seq = sorted(lengths.values())
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "density": n / (n_users * n_items) if n_users and n_items else 0.0,
        "seq_len": {
            "min": seq[0] if seq else 0,
            "median": statistics.median(seq) if seq else 0,
            "mean": n / n_users if n_users else 0.0,
            "max": seq[-1] if seq else 0,
        },
    }


def format_stats(stats: dict) -> str:
    s = stats["seq_len"]
    return (f"users {stats['users']:,}  items {stats['items']:,}  interactions "
            f"{stats['interactions']:,}  density {stats['density']:.4%}  sequence length "
            f"min {s['min']} / median {s['median']:g} / mean {s['mean']:.1f} / max {s['max']}")


# --------------------------------------------------------------------------- writing


def _fmt(x: float) -> str:
    # integral values written as integers ("5", "978300760"): exact and as RecBole's own files
    if x.is_integer() and abs(x) < 2 ** 53:
        return str(int(x))
    return repr(x)


def inter_header(with_rating: bool) -> str:
    cols = ["user_id:token", "item_id:token"]
    if with_rating:
        cols.append("rating:float")
    cols.append("timestamp:float")
    return "\t".join(cols)


def inter_lines(records: list, with_rating: bool) -> Iterator[str]:
    """Header, then each user's interactions in time order (users in order of first appearance;
    equal timestamps keep the input order, which RecBole's stable sort keeps too)."""
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r[0], []).append(r)
    yield inter_header(with_rating) + "\n"
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r[3])  # stable
        if with_rating:
            for _, item, rating, ts in rows:
                yield f"{user}\t{item}\t{_fmt(rating)}\t{_fmt(ts)}\n"
        else:
            for _, item, _, ts in rows:
                yield f"{user}\t{item}\t{_fmt(ts)}\n"


def write_atomic(path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, then rename it onto ``path``: readers
    see the old file or the whole new one, and a failure leaves no partial file behind."""
    _write_files([(path, chunks)])


def _write_files(files: list) -> None:
    """``(path, chunks)`` pairs, each flushed to disk, all complete before any is renamed."""
    with atomic_paths(*(path for path, _ in files), fsync=True) as temps:
        for tmp, (_, chunks) in zip(temps, files):
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                for chunk in chunks:
                    fh.write(chunk)


def _make_dirs(path: str) -> list:
    """os.makedirs that returns the folders it created, outermost first."""
    created, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    created.reverse()
    for d in created:
        os.mkdir(d)
    return created


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise PrepareError(f"--dataset must be a plain folder name such as ml-1m, got {name!r}")
    return name


# --------------------------------------------------------------------------- the whole job


def prepare(fmt: str, input_path, dataset: str, output_dir, user_k: int = 0, item_k: int = 0,
            progress: bool = False, **reader_options) -> dict:
    """Read, k-core filter, and write ``output_dir/dataset/dataset.inter`` plus
    ``dataset.stats.json``; returns the statistics written. Nothing is written (no folder is
    created) unless the whole input was read and the result is not empty."""
    _check_name(dataset)
    _check_k(user_k, item_k)  # before reading: a typo should not cost a full read
    if fmt not in READERS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    input_path = _check_input(input_path)
    records = list(read_records(fmt, input_path, progress=progress, **reader_options))
    if not records:
        raise PrepareError(f"{input_path}: no interactions found")
    before = compute_stats(records)
    records, passes = kcore_filter(records, user_k, item_k)
    if not records:
        raise PrepareError(
            f"nothing left after k-core filtering (users >= {user_k}, items >= {item_k} "
            f"interactions) of {before['interactions']:,} interactions from {input_path}")
    with_rating = records[0][2] is not None
    stats = {
        "dataset": dataset,
        "format": fmt,
        "input": os.path.abspath(input_path),
        "kcore": {"user": user_k, "item": item_k, "passes": passes},
        "before_filter": {k: before[k] for k in ("users", "items", "interactions")},
        **compute_stats(records),
        "columns": inter_header(with_rating).split("\t"),
    }
    folder = os.path.join(os.fspath(output_dir), dataset)
    created = _make_dirs(folder)
    try:
        _write_files([
            (os.path.join(folder, f"{dataset}.inter"), inter_lines(records, with_rating)),
            (os.path.join(folder, f"{dataset}.stats.json"),
             [json.dumps(stats, indent=2) + "\n"]),
        ])
    except BaseException:
        for d in reversed(created):  # only folders this call made, and only if still empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return stats
