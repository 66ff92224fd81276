#!/usr/bin/env python
"""How a timestamp-free sequence file orders equal timestamps, against RecBole's order.

    python -m experiments.tie_order --seq ../shared/datasets/ml-1m/ml-1m.txt --timed ml-1m.inter

``--seq``: one line per user, ``user item_1 item_2 ...`` (the seq-text format of
datasets/prepare.py). ``--timed``: the same interactions with timestamps, as RecBole's atomic
``.inter`` (tab separated, a header naming ``user_id:token``, ``item_id:token`` and
``timestamp:float``) or MovieLens' ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).
RecBole orders a user's history by a stable sort on the timestamp, so equal timestamps keep
the ``.inter`` file's order; that is the order compared here (``ratings.dat`` is in the same
order as RecBole's ``ml-1m.inter``).

Only users whose items are the same in both files are compared (a partial ``--timed`` copy
ends inside a user; that user is skipped and counted). Printed: how many consecutive
interactions share a timestamp, for how many users the leave-one-out test and valid items
differ between the two orders, and, over consecutive pairs inside one timestamp, how the item
ids move (share going up, share within 2 ids) in each order and in a seeded random order of
each tie; and, over item pairs tied in two or more users, the share that every one of those
users has in the same order (1.0: a fixed order of the items decides inside a tie).

``--synthetic-out DIR`` also writes two seq-text variants of ``--seq`` with ties of the
``--timed`` file's sizes put in, one ordered inside each tie by a fixed item order and one at
random (:func:`synthetic_ties`): training on both measures what a fixed order inside ties is
worth to a model (docs/RESULTS.md, ML-1M). Exit status 2 with a message for unreadable input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict

import numpy as np


class InputError(ValueError):
    pass


def read_seq(path) -> dict[str, list[str]]:
    seqs = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise InputError(f"{path}:{n}: a line needs a user and at least one item: {line.strip()!r}")
            if parts[0] in seqs:
                raise InputError(f"{path}:{n}: user {parts[0]} appears on two lines; one line per user")
            seqs[parts[0]] = parts[1:]
    if not seqs:
        raise InputError(f"{path}: no users")
    return seqs


def read_timed(path) -> dict[str, list[tuple[float, str]]]:
    """user -> [(timestamp, item)] in file order."""
    events = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise InputError(f"{path}: empty file")
    if "::" in lines[0]:  # ratings.dat: UserID::MovieID::Rating::Timestamp
        sep, cols, start = "::", (0, 1, 3), 0
    else:  # RecBole atomic file: a header of name:type columns
        names = [c.split(":")[0] for c in lines[0].split("\t")]
        try:
            cols = (names.index("user_id"), names.index("item_id"), names.index("timestamp"))
        except ValueError:
            raise InputError(f"{path}:1: expected a RecBole header with user_id, item_id and timestamp "
                             f"columns, or ratings.dat lines (UserID::MovieID::Rating::Timestamp); "
                             f"got {lines[0][:80]!r}") from None
        sep, start = "\t", 1
    width = max(cols) + 1
    for n, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < width:
            raise InputError(f"{path}:{n}: {len(parts)} fields, expected at least {width}: {line[:80]!r}")
        u, i, t = (parts[c] for c in cols)
        try:
            events[u].append((float(t), i))
        except ValueError:
            raise InputError(f"{path}:{n}: timestamp {t!r} is not a number") from None
    if not events:
        raise InputError(f"{path}: no interactions")
    return events


def compare(seqs, events, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    users = skipped = unordered = 0
    pairs = tied = in_group = total = test_diff = valid_diff = 0
    moves = {"recbole": [], "seq": [], "random": []}
    votes = {name: defaultdict(list) for name in moves}  # (a, b) tied in a user -> [a first?]
    numeric = True
    for u, ev in events.items():
        seq = seqs.get(u)
        if seq is None or sorted(seq) != sorted(i for _, i in ev):
            skipped += 1
            continue
        if len(set(seq)) != len(seq):
            raise InputError(f"user {u} has an item twice; tie order is only defined for distinct items")
        users += 1
        ts = {i: t for t, i in ev}
        timed = sorted(ev, key=lambda e: e[0])  # stable: the file's order inside a tie, as RecBole's
        recbole = [i for _, i in timed]
        if any(ts[a] > ts[b] for a, b in zip(seq, seq[1:])):
            unordered += 1
        times = [ts[i] for i in recbole]
        pairs += len(times) - 1
        tied += sum(a == b for a, b in zip(times, times[1:]))
        counts = Counter(times)
        in_group += sum(counts[t] > 1 for t in times)
        total += len(times)
        test_diff += seq[-1] != recbole[-1]
        if len(seq) > 1:
            valid_diff += seq[-2] != recbole[-2]
        groups = defaultdict(list)
        for t, i in timed:
            groups[t].append(i)
        shuffled = [i for t in sorted(groups) for i in rng.permutation(groups[t])]
        for name, order in (("recbole", recbole), ("seq", seq), ("random", shuffled)):
            pos = {i: k for k, i in enumerate(order)}
            for group in groups.values():
                for x in range(len(group)):
                    for y in range(x + 1, len(group)):
                        a, b = sorted((group[x], group[y]))
                        votes[name][(a, b)].append(pos[a] < pos[b])
            for a, b in zip(order, order[1:]):
                if ts[a] == ts[b]:
                    try:
                        moves[name].append(int(b) - int(a))
                    except ValueError:
                        numeric = False
    if users == 0:
        raise InputError("no user has the same items in both files: are they the same data set?")
    out = {"users": users, "skipped": skipped, "unordered": unordered,
           "tied_pairs": tied / max(pairs, 1), "in_tie_group": in_group / max(total, 1),
           "test_differs": test_diff / users, "valid_differs": valid_diff / users, "tie_pairs": tied}
    for name, v in votes.items():
        shared = [sum(x) in (0, len(x)) for x in v.values() if len(x) >= 2]
        out["shared_pairs"] = len(shared)
        if shared:
            out[f"{name}_unanimous"] = float(np.mean(shared))
    if numeric and tied:
        for name, d in moves.items():
            d = np.asarray(d)
            out[f"{name}_up"] = float(np.mean(d > 0))
            out[f"{name}_near"] = float(np.mean(np.abs(d) <= 2))
    return out


def report(r: dict) -> str:
    lines = [f"users compared: {r['users']:,} (skipped, items differ between the files: {r['skipped']:,})",
             f"--seq order against the timestamps: {r['users'] - r['unordered']:,} users in time order, "
             f"{r['unordered']:,} not",
             f"consecutive interactions with equal timestamps: {r['tied_pairs']:.4f} "
             f"({r['tie_pairs']:,} pairs); interactions in a tie: {r['in_tie_group']:.4f}",
             f"leave-one-out targets that differ between the two orders: test item {r['test_differs']:.4f}, "
             f"valid item {r['valid_differs']:.4f} of the users"]
    if "recbole_unanimous" in r:
        lines.append(f"item pairs tied in >= 2 users ({r['shared_pairs']:,}): share in the same order in all "
                     f"of them: RecBole {r['recbole_unanimous']:.4f}, --seq file {r['seq_unanimous']:.4f}, "
                     f"random order of each tie {r['random_unanimous']:.4f}")
    if "recbole_up" in r:
        lines.append("inside a tie, consecutive item ids: share going up / share within 2 ids")
        for name, what in (("recbole", "RecBole (--timed file order)"), ("seq", "--seq file"),
                           ("random", "random order of each tie (seed 0)")):
            lines.append(f"  {what}: {r[f'{name}_up']:.4f} / {r[f'{name}_near']:.4f}")
    return "\n".join(lines)


def tie_run_sizes(seqs, events) -> list[int]:
    """Sizes of the runs of equal timestamps, per compared user in the --timed file's order."""
    sizes = []
    for u, ev in events.items():
        seq = seqs.get(u)
        if seq is None or sorted(seq) != sorted(i for _, i in ev):
            continue
        counts = Counter(t for t, _ in ev)
        sizes += [counts[t] for t in sorted(counts)]
    if not sizes:
        raise InputError("no user has the same items in both files: are they the same data set?")
    return sizes


def synthetic_ties(seqs, sizes, seed: int = 0) -> tuple[list[str], list[str]]:
    """Two variants of every --seq line, for a test of what a fixed order inside ties is worth:
    each line is cut into consecutive runs whose sizes are drawn from ``sizes`` (the timed
    file's ties); inside a run, "fixed" puts the items in one random order of all items (a
    fixed order, as ratings.dat's), "shuffled" in a random order of its own. Item ids must be
    integers (they are sorted as numbers before the fixed order is drawn)."""
    rng = np.random.default_rng(seed)
    try:
        items = sorted({int(i) for seq in seqs.values() for i in seq})
    except ValueError:
        raise InputError("synthetic ties need integer item ids") from None
    rank = {i: r for r, i in enumerate(rng.permutation(items))}
    sizes = np.asarray(sizes)
    fixed, shuffled = [], []
    for u, seq in seqs.items():
        seq = [int(i) for i in seq]
        k, f, s = 0, [], []
        while k < len(seq):
            run = seq[k:k + int(rng.choice(sizes))]
            k += len(run)
            f += sorted(run, key=rank.get)
            s += list(rng.permutation(run))
        fixed.append(" ".join([u] + [str(i) for i in f]))
        shuffled.append(" ".join([u] + [str(i) for i in s]))
    return fixed, shuffled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", required=True, help="seq-text file: user item_1 item_2 ... per line")
    p.add_argument("--timed", required=True, help="RecBole .inter with timestamps, or ratings.dat")
    p.add_argument("--synthetic-out", default=None, metavar="DIR",
                   help="also write DIR/fixed.txt and DIR/shuffled.txt (see synthetic_ties) for training")
    p.add_argument("--seed", type=int, default=0, help="seed of the random orders (default 0)")
    args = p.parse_args(argv)
    try:
        seqs, events = read_seq(args.seq), read_timed(args.timed)
        print(report(compare(seqs, events, args.seed)))
        if args.synthetic_out:
            fixed, shuffled = synthetic_ties(seqs, tie_run_sizes(seqs, events), args.seed)
            os.makedirs(args.synthetic_out, exist_ok=True)
            from mamba4rec.files import write_text_atomic

            for name, lines in (("fixed", fixed), ("shuffled", shuffled)):
                path = os.path.join(args.synthetic_out, f"{name}.txt")
                write_text_atomic(path, "\n".join(lines) + "\n")
                print(f"wrote {path}")
    except (InputError, OSError, UnicodeDecodeError) as e:
        print(f"python -m experiments.tie_order: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
