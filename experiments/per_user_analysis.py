#!/usr/bin/env python
"""Where a difference between two models' test metrics comes from, user by user.

    python -m experiments.per_user_analysis --dataset amazon-beauty --mode sequence \\
        --models Mamba4Rec,SASRec --data-path DIR [--results results] [--buckets 3,5,8,15,50]
    python -m experiments.per_user_analysis --dataset ml-1m \\
        --models history/Mamba4Rec,sequence/Mamba4Rec,sequence/SASRec --data-path DIR

A model given as MODE/NAME is the row of that train mode (rows of different modes pair user by
user: every mode is tested on the same users and targets); a bare NAME takes --mode.

Reads the per-user test values ``results/<dataset>/per_user.npz`` (keys "<mode>/<model>/<metric>",
written by ``python -m experiments.results export``) and the result rows ``results/<dataset>/<mode>/<model>.json``,
and prints markdown tables, the first model against each of the others:

1. by training-history length (a user's interactions less the valid and test items): users, each
   model's HR/NDCG/MRR@10, the paired difference with its 95% interval
   (mamba4rec.significance.paired_difference) and each bucket's share of the total HR difference;
2. the rank of the test item (recovered from MRR@10: rank = 1 / MRR for a hit; checked against
   HR@10 and NDCG@10 = 1 / log2(rank + 1)), per model with counts, and the cross-tab of rank
   classes between the first two models;
3. groups by the transition (last input item -> test item): unseen in the training part of any
   user's sequence, or seen with the test item at rank 1, 2-10 or > 10 among the last input
   item's successors by count (a first-order "bigram" ranking; ties count against the test item).

The per-user arrays carry no user ids: their order is that of RecBole's test dataloader. It is
rebuilt here the way ``mamba4rec.pipeline.run`` builds it (build_config with the rows' settings,
create_dataset, data_preparation; no model, no training) and checked against DIR's .inter file:
each test user's target must be their last item, their last input item the one before, and
item_length min(n - 1, MAX_ITEM_LIST_LENGTH). DIR holds ``<dataset>/<dataset>.inter``, as
experiments.results' OUT/dataset does; nothing is prepared here. The rows' data checksums must
match that file.

Checkpoint mode (does a model rank the user's own input items first?):
``python -m experiments.per_user_analysis checkpoint ...``, :mod:`experiments.checkpoint_analysis`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("hit@10", "ndcg@10", "mrr@10")
DEFAULT_BUCKETS = (3, 5, 8, 15, 50)
#: rank classes of table 2 (inclusive bounds; rank 0 means not in the top k)
RANK_CLASSES = (("1", 1, 1), ("2", 2, 2), ("2-5", 2, 5), ("6-10", 6, 10), ("<=10", 1, 10))
#: disjoint classes for the cross-tab
CROSS_CLASSES = (("1", 1, 1), ("2-5", 2, 5), ("6-10", 6, 10), (">10", 0, 0))
#: settings that decide which rows the test split holds and in what order (a model whose values
#: of these differ from another's gets its own split)
SPLIT_KEYS = ("data_path", "benchmark_filename", "eval_args", "repeatable", "MAX_ITEM_LIST_LENGTH",
              "USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "LIST_SUFFIX", "ITEM_LIST_LENGTH_FIELD",
              "load_col", "unload_col", "unused_col", "rm_dup_inter", "val_interval", "filter_inter_by_user_or_item",
              "user_inter_num_interval", "item_inter_num_interval", "alias_of_item_id", "MODEL_TYPE")


# ---- pure numpy ----------------------------------------------------------------------------

def ranks_from_mrr(mrr, hit=None, ndcg=None, k=10, atol=1e-4) -> np.ndarray:
    """The test item's rank per user (1..k; 0: not in the top k) from MRR@k = 1 / rank.

    With ``hit`` and ``ndcg`` (HR@k, NDCG@k of the same users) the three must agree: hit iff
    rank > 0, NDCG = 1 / log2(rank + 1) for a hit and 0 otherwise. Raises ValueError otherwise,
    and when an MRR value is no 1 / r for an integer r <= k."""
    mrr = np.asarray(mrr, dtype=np.float64)
    rank = np.zeros(len(mrr), dtype=np.int64)
    pos = mrr > 0
    rank[pos] = np.rint(1.0 / mrr[pos]).astype(np.int64)
    bad = pos & ((rank < 1) | (rank > k) | ~np.isclose(mrr, 1.0 / np.maximum(rank, 1), rtol=0, atol=atol))
    bad |= mrr < 0
    if bad.any():
        raise ValueError(f"{int(bad.sum())} MRR@{k} values are not 1/rank for a rank 1..{k} (first: "
                         f"{mrr[bad][:3].tolist()}): not RecBole's per-user MRR")
    if hit is not None:
        hit = np.asarray(hit, dtype=np.float64)
        off = (hit > 0) != (rank > 0)
        if off.any():
            raise ValueError(f"{int(off.sum())} users where HR@{k} and MRR@{k} disagree on a hit: "
                             f"the arrays are not of the same users")
    if ndcg is not None:
        ndcg = np.asarray(ndcg, dtype=np.float64)
        expect = np.where(rank > 0, 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0)
        off = ~np.isclose(ndcg, expect, rtol=0, atol=atol)
        if off.any():
            raise ValueError(f"{int(off.sum())} users where NDCG@{k} != 1/log2(rank+1) of the rank from "
                             f"MRR@{k}: the arrays are not of the same users")
    return rank


def length_buckets(lengths, edges=DEFAULT_BUCKETS) -> tuple[np.ndarray, list[str]]:
    """(bucket index per user, labels): bucket j holds edges[j-1] < length <= edges[j], the last
    one length > edges[-1]. Labels: "<=3", "4-5", ..., ">50"."""
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must be increasing integers, got {edges}")
    labels = [f"<={edges[0]}"]
    labels += [f"{a + 1}" if b == a + 1 else f"{a + 1}-{b}" for a, b in zip(edges, edges[1:])]
    labels.append(f">{edges[-1]}")
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left"), labels


def bigram_ranks(train_sequences, queries) -> np.ndarray:
    """Per query (previous item, target item): the target's rank among the successors of the
    previous item in ``train_sequences`` (each a list of items in order), by how often each
    follows it; ties count against the target (rank = 1 + successors as frequent or more).
    0 where the transition never occurs."""
    succ = collections.defaultdict(collections.Counter)
    for seq in train_sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            succ[a][b] += 1
    out = np.zeros(len(queries), dtype=np.int64)
    for n, (prev, target) in enumerate(queries):
        counts = succ.get(prev)
        x = counts.get(target, 0) if counts else 0
        if x:
            out[n] = 1 + sum(1 for item, c in counts.items() if item != target and c >= x)
    return out


def transition_groups(brank) -> dict:
    """{label: mask} of the users by bigram rank (bigram_ranks): top-1, 2-10, > 10, unseen."""
    brank = np.asarray(brank)
    return {"seen, bigram top-1": brank == 1, "seen, bigram rank 2-10": (brank >= 2) & (brank <= 10),
            "seen, bigram rank >10": brank > 10, "seen (all)": brank > 0, "unseen": brank == 0}


def _in(rank, lo, hi):
    return (rank >= lo) & (rank <= hi)


def bucket_rows(buckets, labels, values, models, paired_difference, metrics=METRICS) -> list[dict]:
    """Table 1's rows, one per bucket and one "all": users, share, each model's mean of each metric,
    the paired difference models[0] - other with its interval, and the bucket's share of the total
    difference in the first metric (HR)."""
    buckets = np.asarray(buckets)
    n = len(buckets)
    first = metrics[0]
    total = {o: float(np.sum(values[models[0]][first] - values[o][first])) for o in models[1:]}
    rows = []
    for j, label in [(j, lab) for j, lab in enumerate(labels)] + [(None, "all")]:
        mask = np.ones(n, bool) if j is None else buckets == j
        row = {"bucket": label, "users": int(mask.sum()), "share": mask.mean() if n else math.nan}
        for m in models:
            for met in metrics:
                row[(m, met)] = float(values[m][met][mask].mean()) if mask.any() else math.nan
        for o in models[1:]:
            for met in metrics:
                a, b = values[models[0]][met][mask], values[o][met][mask]
                row[("diff", o, met)] = paired_difference(a, b) if mask.sum() >= 2 else None
            part = float(np.sum(values[models[0]][first][mask] - values[o][first][mask]))
            row[("share", o)] = part / total[o] if total[o] else math.nan
        rows.append(row)
    return rows


def rank_rows(ranks, models, n_users) -> list[dict]:
    """Table 2's rows: per rank class, each model's share of all users and count."""
    rows = []
    for label, lo, hi in RANK_CLASSES:
        row = {"rank": label}
        for m in models:
            c = int(_in(ranks[m], lo, hi).sum())
            row[m] = (c / n_users, c)
        rows.append(row)
    return rows


def cross_tab(rank_a, rank_b) -> np.ndarray:
    """Users by (rank class of a, rank class of b), classes CROSS_CLASSES."""
    def cls(r):
        return np.select([_in(r, lo, hi) for _, lo, hi in CROSS_CLASSES[:-1]], range(len(CROSS_CLASSES) - 1),
                         len(CROSS_CLASSES) - 1)
    ca, cb = cls(np.asarray(rank_a)), cls(np.asarray(rank_b))
    k = len(CROSS_CLASSES)
    return np.bincount(ca * k + cb, minlength=k * k).reshape(k, k)


def group_rows(groups, ranks, values, models) -> list[dict]:
    """Table 3's rows: per group, users, each model's HR and MRR, its share of users at rank 1,
    2, 2-5, 6-10, and the HR difference models[0] - other in users."""
    rows = []
    for label, mask in groups.items():
        row = {"group": label, "users": int(mask.sum())}
        for m in models:
            row[(m, "hit@10")] = float(values[m]["hit@10"][mask].mean()) if mask.any() else math.nan
            row[(m, "mrr@10")] = float(values[m]["mrr@10"][mask].mean()) if mask.any() else math.nan
            for cl, lo, hi in RANK_CLASSES[:4]:
                row[(m, cl)] = float(_in(ranks[m][mask], lo, hi).mean()) if mask.any() else math.nan
        for o in models[1:]:
            row[("hit users", o)] = int(np.sum((ranks[models[0]][mask] > 0).astype(int) - (ranks[o][mask] > 0)))
        rows.append(row)
    return rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _f(v, d=4):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _ci(d):
    return "-" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def _short(metric):
    return {"hit@10": "HR", "ndcg@10": "NDCG", "mrr@10": "MRR"}.get(metric, metric)


# ---- data ----------------------------------------------------------------------------------

def read_inter(path, user_field="user_id", item_field="item_id", time_field="timestamp") -> dict:
    """{user token: [item tokens in time order]} of an atomic .inter file (stable for ties)."""
    rows = collections.defaultdict(list)
    with open(path) as fh:
        header = [h.split(":", 1)[0] for h in fh.readline().rstrip("\n").split("\t")]
        try:
            iu, ii, it = header.index(user_field), header.index(item_field), header.index(time_field)
        except ValueError:
            raise SystemExit(f"{path}: header {header} lacks {user_field}, {item_field} or {time_field}") from None
        for line in fh:
            f = line.rstrip("\n").split("\t")
            rows[f[iu]].append((float(f[it]), f[ii]))
    return {u: [i for _, i in sorted(r, key=lambda x: x[0])] for u, r in rows.items()}


def _sha256(path) -> str:
    from mamba4rec.compat import file_sha256  # the hash the result rows' data_sha256 was made with

    return file_sha256(path)


def prepare_hint(dataset, data_path) -> str:
    from .plan import DATASETS as known

    if dataset not in known:
        return f"prepare it with datasets/prepare.py (docs/DATASETS.md), --output-dir {data_path}"
    _, src, flags = known[dataset]
    return ("prepare it (docs/DATASETS.md):\n  python datasets/prepare.py --format seq-text --input "
            f"../shared/datasets/{src} --dataset {dataset} --output-dir {data_path}"
            + "".join(f" {f}" for f in flags))


def build_test_split(dataset, records, data_path) -> dict:
    """{model: (user tokens, target tokens, last input item tokens, item lengths, max length)} of
    RecBole's test dataloader, in its order, for each model's row settings (one split per distinct
    SPLIT_KEYS values)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from mamba4rec.pipeline import build_config

    built, out = {}, {}
    for label, record in records.items():
        name = label.rsplit("/", 1)[-1]  # MODE/NAME or NAME: the results file's name
        config = build_config(name.split("-", 1)[0], dataset, None,
                              {"data_path": str(data_path), "show_progress": False, "state": "WARNING",
                               "save_dataset": False, "save_dataloaders": False},
                              list(record.get("config_overrides") or []))
        key = json.dumps({k: config[k] for k in SPLIT_KEYS if k in config}, sort_keys=True, default=str)
        if key not in built:
            init_seed(config["seed"], config["reproducibility"])
            ds = create_dataset(config)
            _, _, test = data_preparation(config, ds)
            uf, itf = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
            lf, listf = config["ITEM_LIST_LENGTH_FIELD"], itf + config["LIST_SUFFIX"]
            users, targets, lengths, lasts = [], [], [], []
            for batch, _, _, _ in test:  # the order the evaluator sees (FullSortEvalDataLoader, no shuffle)
                users.append(batch[uf].numpy())
                targets.append(batch[itf].numpy())
                ln = batch[lf].numpy()
                lengths.append(ln)
                lasts.append(batch[listf].numpy()[np.arange(len(ln)), ln - 1])
            utok, itok = ds.field2id_token[uf], ds.field2id_token[itf]
            built[key] = (utok[np.concatenate(users)].astype(str), itok[np.concatenate(targets)].astype(str),
                          itok[np.concatenate(lasts)].astype(str), np.concatenate(lengths),
                          int(config["MAX_ITEM_LIST_LENGTH"]))
        out[label] = built[key]
    return out


def check_order(split, sequences, n_values) -> None:
    """Each test user once, target = last item, last input item = the one before, item_length =
    min(n - 1, MAX_ITEM_LIST_LENGTH), and as many users as per-user values; SystemExit otherwise."""
    users, targets, lasts, lengths, max_len = split
    problems = []
    if len(users) != n_values:
        problems.append(f"{len(users)} test users but {n_values} per-user values")
    if len(set(users)) != len(users):
        problems.append("a user appears more than once in the test split")
    missing = [u for u in users if u not in sequences]
    if missing:
        problems.append(f"{len(missing)} test users not in the .inter file (first {missing[:3]})")
    else:
        n = np.array([len(sequences[u]) for u in users])
        bad_t = np.flatnonzero(targets != np.array([sequences[u][-1] for u in users]))
        bad_p = np.flatnonzero(lasts != np.array([sequences[u][-2] if len(sequences[u]) > 1 else "" for u in users]))
        bad_l = np.flatnonzero(lengths != np.minimum(n - 1, max_len))
        for what, bad in (("target != last item", bad_t), ("last input item != second to last item", bad_p),
                          (f"item_length != min(n - 1, {max_len})", bad_l)):
            if len(bad):
                problems.append(f"{len(bad)} test users with {what} (first: user {users[bad[0]]})")
    if problems:
        raise SystemExit("the test split does not line up with the .inter file:\n  " + "\n  ".join(problems))


# ---- main ----------------------------------------------------------------------------------

def analyse(values, models, n_train, brank, edges, paired_difference, repeats=None) -> str:
    """The three tables (markdown) from the per-user values, history lengths and bigram ranks."""
    n = len(n_train)
    first = models[0]
    ranks = {m: ranks_from_mrr(values[m]["mrr@10"], values[m]["hit@10"], values[m]["ndcg@10"]) for m in models}
    out = [f"{n:,} test users; training-history length (interactions - 2): min {int(n_train.min())}, "
           f"median {np.median(n_train):g}, max {int(n_train.max())}.", ""]

    buckets, labels = length_buckets(n_train, edges)
    header = ["train items", "users", "share"]
    for met in METRICS:
        header += [f"{_short(met)} {m}" for m in models] + [f"d{_short(met)} {first}-{o} [95%]" for o in models[1:]]
    header += [f"share of dHR ({o})" for o in models[1:]]
    body = []
    for r in bucket_rows(buckets, labels, values, models, paired_difference):
        cells = [r["bucket"], f"{r['users']:,}", _f(r["share"], 3)]
        for met in METRICS:
            cells += [_f(r[(m, met)]) for m in models] + [_ci(r[("diff", o, met)]) for o in models[1:]]
        cells += [_f(r[("share", o)], 2) for o in models[1:]]
        body.append(cells)
    out += ["#### 1. By training-history length", "", markdown(header, body), ""]

    header = ["test-item rank"] + [f"{m}: share (users)" for m in models]
    body = [[r["rank"]] + [f"{r[m][0]:.4f} ({r[m][1]:,})" for m in models] for r in rank_rows(ranks, models, n)]
    out += ["#### 2. Rank of the test item (share of all users)", "", markdown(header, body), ""]
    for m in models:
        h = np.bincount(ranks[m], minlength=11)[1:11]
        out.append(f"- {m}: hits by rank 1..10 {h.tolist()}; rank 2 / rank 1 = {h[1] / max(h[0], 1):.2f}; "
                   f"rank 1 share of hits {h[0] / max(h.sum(), 1):.3f}")
    if len(models) >= 2:
        tab = cross_tab(ranks[first], ranks[models[1]])
        names = [c[0] for c in CROSS_CLASSES]
        out += ["", f"Users by rank class, rows {first}, columns {models[1]}:", "",
                markdown([f"{first} \\ {models[1]}"] + names,
                         [[names[i]] + [f"{v:,}" for v in tab[i]] for i in range(len(names))])]
    out.append("")

    header = ["transition (last input item -> test item)", "users"]
    header += [f"{_short(met)} {m}" for met in ("hit@10", "mrr@10") for m in models]
    header += [f"rank {cl} {m}" for cl, _, _ in RANK_CLASSES[:4] for m in models]
    header += [f"dHR users {first}-{o}" for o in models[1:]]
    body = []
    for r in group_rows(transition_groups(brank), ranks, values, models):
        cells = [r["group"], f"{r['users']:,}"]
        cells += [_f(r[(m, met)], 3) for met in ("hit@10", "mrr@10") for m in models]
        cells += [_f(r[(m, cl)], 3) for cl, _, _ in RANK_CLASSES[:4] for m in models]
        cells += [f"{r[('hit users', o)]:+d}" for o in models[1:]]
        body.append(cells)
    oracle = _in(brank, 1, 10)
    out += ["#### 3. By whether the transition occurs in training (bigram rank of the test item)", "",
            markdown(header, body), "",
            f"Bigram ranking alone (successors of the last input item by training count): HR@10 "
            f"{oracle.mean():.4f}, rank 1 {np.mean(brank == 1):.4f}."
            + ("" if repeats is None else f" Test item already in the user's earlier history: {repeats:.4f} of users."),
            ""]
    return "\n".join(out)


#: the train modes whose rows results/ holds (results/<dataset>/<mode>/)
MODES = ("prefix", "sequence", "history")


def model_mode(spec: str, default: str | None) -> tuple[str, str]:
    """(mode, name) of a --models entry: MODE/NAME, or NAME with the --mode default."""
    mode, _, name = spec.rpartition("/")
    mode = mode or default
    if mode is None:
        raise ValueError(f"{spec!r} has no train mode: write MODE/{spec} or pass --mode")
    if mode not in MODES:
        raise ValueError(f"{spec!r}: unknown train mode {mode!r}, expected one of {', '.join(MODES)}")
    if not name:
        raise ValueError(f"{spec!r}: no model name after the mode")
    return mode, name


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["checkpoint"]:
        from .checkpoint_analysis import checkpoint_main

        return checkpoint_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--mode", choices=MODES, help="train mode of the models given without one")
    p.add_argument("--models", required=True, help="comma-separated NAME or MODE/NAME, the first compared with "
                   "each other one")
    p.add_argument("--data-path", required=True, type=Path,
                   help="folder holding <dataset>/<dataset>.inter (experiments.results' OUT/dataset)")
    p.add_argument("--results", type=Path, default=REPO / "results")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                   help="upper edges of the history-length buckets (inclusive)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        p.error("--models needs at least two models")
    try:
        where = {m: model_mode(m, args.mode) for m in models}
    except ValueError as exc:
        p.error(str(exc))
    edges = [int(e) for e in args.buckets.split(",")]
    inter = args.data_path / args.dataset / f"{args.dataset}.inter"
    if not inter.is_file():
        raise SystemExit(f"no {inter}; {prepare_hint(args.dataset, args.data_path)}")
    npz = args.results / args.dataset / "per_user.npz"
    if not npz.is_file():
        raise SystemExit(f"no {npz}: export finished runs first (python -m experiments.results export OUT)")
    with np.load(npz) as data:
        missing = [f"{where[m][0]}/{where[m][1]}/{met}" for m in models for met in METRICS
                   if f"{where[m][0]}/{where[m][1]}/{met}" not in data]
        if missing:
            raise SystemExit(f"{npz} lacks {', '.join(missing)}; it holds {', '.join(sorted(data.files))}")
        values = {m: {met: data[f"{where[m][0]}/{where[m][1]}/{met}"].astype(np.float64) for met in METRICS}
                  for m in models}
    records = {}
    digest = _sha256(inter)
    for m in models:
        path = args.results / args.dataset / where[m][0] / f"{where[m][1]}.json"
        if not path.is_file():
            raise SystemExit(f"no {path}: the row of {m} (its settings) is needed to rebuild the split")
        records[m] = json.loads(path.read_text())
        want = (records[m].get("data_sha256") or {}).get(inter.name)
        if want and want != digest:
            raise SystemExit(f"{inter} (sha256 {digest[:12]}...) is not the file {m} was trained and "
                             f"tested on (sha256 {want[:12]}...)")

    sequences = read_inter(inter)
    splits = build_test_split(args.dataset, records, args.data_path.resolve())
    for m in models:
        check_order(splits[m], sequences, len(values[m]["mrr@10"]))
    users = splits[models[0]][0]
    if any(not np.array_equal(splits[m][0], users) for m in models[1:]):
        raise SystemExit("the models' test splits order their users differently: the values are not paired")
    from mamba4rec.significance import paired_difference

    seqs = [sequences[u] for u in users]
    n_train = np.array([len(s) - 2 for s in seqs])
    brank = bigram_ranks([s[:-2] for s in sequences.values()], [(s[-2], s[-1]) for s in seqs])
    repeats = float(np.mean([s[-1] in set(s[:-1]) for s in seqs]))
    text = analyse(values, models, n_train, brank, edges, paired_difference, repeats)
    modes = sorted({mode for mode, _ in where.values()})
    heading = f"{modes[0]} mode" if len(modes) == 1 else "modes " + ", ".join(modes)
    print(f"### {args.dataset}, {heading}: {', '.join(models)} per test user\n")
    print(f"Order checked: {len(users):,} test users of RecBole's test dataloader; each target is the user's "
          f"last item of {inter}, item_length = min(n - 1, {splits[models[0]][4]}); sha256 {digest[:12]}.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
