#!/usr/bin/env python
"""Where a difference between two models' test metrics comes from, user by user.

    python -m experiments.per_user_analysis --dataset amazon-beauty --mode sequence \\
        --models Mamba4Rec,SASRec --data-path DIR [--results results] [--buckets 3,5,8,15,50]

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

    python -m experiments.per_user_analysis checkpoint CKPT.pth [CKPT.pth ...] [--names A,B] \
        [--data-path DIR] [--results results] [--eval-batch-size N] [--set key=value]

Each CKPT is a best checkpoint RecBole's Trainer saved in a run (``config``, ``state_dict``, ...;
not the ``-last.pth`` resume file). Its config is rebuilt with mamba4rec.registry.build_config
from the settings the run was given (data_path replaceable), the model with build_model, and the
test dataloader as mamba4rec.pipeline.run builds it; the test users are scored with the model's
full_sort_predict in eval mode without grad, as RecBole's Trainer.evaluate does (item 0 at -inf;
the history is not masked for sequential models), with RecBole's Collector and Evaluator. The
tables: per model, the share of test users whose top-1 item is in their input sequence, is their
last input item, and how many of the top 10 are input items; HR/NDCG/MRR@10 as RecBole computes
them and with the input sequence masked to -inf, with the paired difference masked - RecBole;
the test item's hits at rank 1 and 2; and the first model paired with each other one
(mamba4rec.significance.paired_difference), both ways. Checks: the recomputed valid metric must
equal the checkpoint's best_valid_score (--skip-valid to skip), and where
``<results>/<dataset>/<mode>/<name>.json`` exists and is the checkpoint's run (best epoch and
valid metric equal), its test values must equal RecBole's unmasked ones.
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
    for name, record in records.items():
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
        out[name] = built[key]
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


# ---- checkpoint mode -----------------------------------------------------------------------
#: keys of a checkpoint's config this mode sets itself (not reported as drift from the saved config)
_OWN_KEYS = ("data_path", "state", "show_progress", "save_dataset", "save_dataloaders", "eval_batch_size", "device",
             "metrics", "topk", "checkpoint_dir")


def load_checkpoint(path) -> dict:
    """A checkpoint RecBole's Trainer saved ('config', 'state_dict', 'epoch', 'best_valid_score', ...).
    Fully unpickled (it holds RecBole's Config): name only files your own runs wrote."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file
        raise SystemExit(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None
    keys = {"config", "state_dict", "epoch"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise SystemExit(f"{path}: not a checkpoint of RecBole's Trainer (no {sorted(keys - set(state or {}))}); "
                         "a '-last.pth' resume file holds no config: give the best checkpoint beside it")
    return state


def checkpoint_config(state, data_path=None, eval_batch_size=None, device=None, overrides=()):
    """The checkpoint's config rebuilt with mamba4rec.registry.build_config from the settings it
    was given (its external_config_dict: files, dict and command line of the run), no config
    files re-read, ``data_path`` (the folder holding <dataset>/) and ``overrides`` ("key=value",
    command-line priority) replacing its own. Returns (config, keys whose values differ from the
    saved config's, other than those set here)."""
    from mamba4rec.registry import build_config

    saved = state["config"]
    given = dict(saved.external_config_dict)
    given.update({"show_progress": False, "state": "WARNING", "save_dataset": False, "save_dataloaders": False})
    if data_path is not None:
        given["data_path"] = str(data_path)
    if eval_batch_size:
        given["eval_batch_size"] = int(eval_batch_size)
    given["metrics"] = list(dict.fromkeys(list(saved["metrics"]) + ["Hit", "NDCG", "MRR"]))
    given["topk"] = sorted(set(saved["topk"]) | {10})
    config = build_config(saved["model"], saved["dataset"], None, given, [f"--{o}" for o in overrides],
                          use_default_configs=False)
    if device is not None:
        import torch

        config["device"] = torch.device(device)
    split_off = [k for k in SPLIT_KEYS if k != "data_path" and k in saved and config[k] != saved[k]]
    if split_off:
        raise SystemExit("the rebuilt config would split the data differently from the checkpoint's run: "
                         + ", ".join(f"{k} {config[k]!r} != {saved[k]!r}" for k in split_off))
    drift = sorted(k for k in set(saved.final_config_dict) | set(config.final_config_dict)
                   if k not in _OWN_KEYS and k not in overrides_keys(overrides)
                   and str(saved.final_config_dict.get(k)) != str(config.final_config_dict.get(k)))
    return config, drift


def overrides_keys(overrides) -> set:
    return {o.split("=", 1)[0] for o in overrides}


def history_stats(scores, item_seq, k=10) -> dict:
    """Per user (rows of ``scores``, the padding item 0 already at -inf): whether the top-1 item
    is in the user's input sequence ``item_seq`` (0-padded item ids), whether it is the last input
    item (the last non-zero one: RecBole left-aligns sequences), how many of the top ``k`` are
    input items (those at -inf not counted), and which ranks 1..k hold one ([users, k])."""
    import torch

    values, top = torch.topk(scores, k, dim=-1)
    # an item at -inf is not ranked (masked; only there when fewer than k items are left)
    in_seq = (top.unsqueeze(-1) == item_seq.unsqueeze(1)).any(-1) & (top != 0) & (values > float("-inf"))
    length = (item_seq != 0).sum(1)
    last = item_seq[torch.arange(len(item_seq)), (length - 1).clamp(min=0)]
    return {"top1_in_seq": in_seq[:, 0].cpu().numpy(),
            "top1_is_last": ((top[:, 0] == last) & (length > 0)).cpu().numpy(),
            "topk_in_seq": in_seq.sum(1).cpu().numpy(), "in_seq_at": in_seq.cpu().numpy()}


def mask_history(scores, item_seq):
    """``scores`` with every item of the input sequence (and the padding item 0) at -inf (a copy)."""
    return scores.scatter(1, item_seq, float("-inf"))


def _score_loader(net, loader, config, masked=True):
    """RecBole's full-sort evaluation of ``loader`` (Trainer.evaluate: full_sort_predict, item 0 and
    any history index at -inf, its Collector and Evaluator), and the same with the input sequence
    masked. Returns {variant: (rounded result, per-user values, history_stats)}, the test users'
    ids and targets, and whether each target is in its input sequence."""
    import torch
    from recbole.evaluator import Collector, Evaluator

    from mamba4rec.significance import recording

    variants = ("unmasked", "masked") if masked else ("unmasked",)
    collectors = {v: Collector(config) for v in variants}
    stats = {v: collections.defaultdict(list) for v in variants}
    uf, itf = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    listf = itf + config["LIST_SUFFIX"]
    n_items = loader._dataset.item_num
    users, targets, target_in = [], [], []
    device = config["device"]
    net.eval()
    with torch.no_grad():
        for interaction, history_index, positive_u, positive_i in loader:
            interaction = interaction.to(device)
            scores = net.full_sort_predict(interaction).view(-1, n_items)
            scores[:, 0] = -np.inf
            if history_index is not None:
                scores[history_index] = -np.inf
            seq = interaction[listf]
            for v in variants:
                s = scores if v == "unmasked" else mask_history(scores, seq)
                for key, arr in history_stats(s, seq, 10).items():
                    stats[v][key].append(arr)
                collectors[v].eval_batch_collect(s, interaction, positive_u, positive_i)
                del s
            hit_in = torch.zeros(len(seq), dtype=torch.bool, device=seq.device)
            hit_in[positive_u] |= (seq[positive_u] == positive_i.to(seq.device).unsqueeze(1)).any(1)
            target_in.append(hit_in.cpu().numpy())
            users.append(interaction[uf].cpu().numpy())
            targets.append(interaction[itf].cpu().numpy())
    out = {}
    for v in variants:
        with recording(10) as per_user:
            result = Evaluator(config).evaluate(collectors[v].get_data_struct())
        out[v] = (dict(result), dict(per_user), {k: np.concatenate(a) for k, a in stats[v].items()})
    return out, np.concatenate(users), np.concatenate(targets), np.concatenate(target_in)


def evaluate_checkpoint(path, data_path=None, eval_batch_size=None, device=None, overrides=(), check_valid=True,
                        name=None, _cache=None) -> dict:
    """Rebuild ``path``'s model and test dataloader from its own config (checkpoint_config), load
    its weights and score the test users (RecBole's ranking and with the input sequence masked);
    with ``check_valid`` also the validation users, whose valid metric must equal the
    checkpoint's best_valid_score. ``_cache`` (a dict) shares the data between checkpoints that
    split it the same way."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from mamba4rec.registry import build_model, resolve_model

    state = load_checkpoint(path)
    config, drift = checkpoint_config(state, data_path, eval_batch_size, device, overrides)
    key = json.dumps({k: config[k] for k in SPLIT_KEYS if k in config}, sort_keys=True, default=str)
    cache = {} if _cache is None else _cache
    if key not in cache:
        init_seed(config["seed"], config["reproducibility"])
        ds = create_dataset(config)
        cache[key] = (ds, *data_preparation(config, ds))
    ds, train, valid, test = cache[key]
    model_class, model_name = resolve_model(config["model"])
    init_seed(config["seed"], config["reproducibility"])
    net = build_model(config, train.dataset, model_class)
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise SystemExit(f"{path}: its weights do not fit {model_name} built from its own config "
                         f"({str(exc).splitlines()[0]})") from None
    net.load_other_parameter(state.get("other_parameter"))
    scored, users, targets, target_in = _score_loader(net, test, config)
    out = {"name": name or model_name, "path": str(path), "model": model_name, "dataset": config["dataset"],
           "mode": str(config["train_mode"]), "epoch": int(state["epoch"]), "drift": drift,
           "best_valid_score": state.get("best_valid_score"), "valid_metric": config["valid_metric"].lower(),
           "valid_recomputed": None, "scored": scored, "target_in_seq": target_in,
           "users": ds.field2id_token[config["USER_ID_FIELD"]][users].astype(str),
           "targets": ds.field2id_token[config["ITEM_ID_FIELD"]][targets].astype(str),
           "inter": Path(config["data_path"]) / f"{config['dataset']}.inter",
           "decimals": int(config["metric_decimal_place"])}
    if check_valid:
        vres = _score_loader(net, valid, config, masked=False)[0]["unmasked"][0]
        out["valid_recomputed"] = float(vres[out["valid_metric"]])
        if out["best_valid_score"] is not None and not math.isclose(
                out["valid_recomputed"], float(out["best_valid_score"]), abs_tol=0.5 * 10 ** -out["decimals"] + 1e-12):
            raise SystemExit(f"{path}: valid {out['valid_metric']} recomputed {out['valid_recomputed']} != the "
                             f"checkpoint's best_valid_score {out['best_valid_score']}: the model or the data "
                             "is not the run's")
    return out


def compare_with_row(ev, row) -> str:
    """One line on whether ``ev``'s unmasked test metrics equal the result row's test values;
    SystemExit when the row's best epoch is the checkpoint's and they differ."""
    best = row.get("best_epoch")
    valid = (row.get("valid_result") or {}).get(ev["valid_metric"])
    tol = 0.5 * 10 ** -ev["decimals"] + 1e-12
    same_valid = valid is not None and ev["best_valid_score"] is not None and abs(valid - ev["best_valid_score"]) <= tol
    if not same_valid or (best is not None and best != ev["epoch"]):  # another run's row, or another epoch's
        return (f"- {ev['name']}: not the row's best checkpoint (row: best epoch {best}, valid {ev['valid_metric']} "
                f"{valid}; checkpoint: epoch {ev['epoch']}, {ev['best_valid_score']}): test values not compared")
    got = ev["scored"]["unmasked"][0]
    off = {m: (got.get(m), v) for m, v in (row.get("test_result") or {}).items()
           if m in got and abs(float(got[m]) - float(v)) > tol}
    if off or not row.get("test_result"):
        raise SystemExit(f"{ev['name']}: test metrics of the checkpoint (epoch {ev['epoch']}, the row's best) "
                         f"differ from the row's: {off or 'the row has no test_result'}")
    return (f"- {ev['name']}: test metrics equal the row's (best epoch {best}): "
            + ", ".join(f"{m} {got[m]:.4f}" for m in row["test_result"] if m in got))


def checkpoint_report(evs, paired_difference, notes=()) -> str:
    """Markdown tables of evaluate_checkpoint's results, the first model paired with the others."""
    out = []
    head = ["model", "checkpoint", "epoch", "valid metric: checkpoint / recomputed", "test users"]
    body = [[e["name"], Path(e["path"]).name, e["epoch"],
             f"{e['valid_metric']} {_f(e['best_valid_score'])} / {_f(e['valid_recomputed'])}", f"{len(e['users']):,}"]
            for e in evs]
    out += [markdown(head, body), ""]
    out += [f"- {e['name']}: settings that differ from the saved config's when rebuilt: {', '.join(e['drift'])}"
            for e in evs if e["drift"]]
    out += list(notes) + [""]

    head = ["model", "ranking", "target in input seq", "top-1 in input seq", "top-1 = last input item",
            "top-10 holds an input item", "input items in top 10 (mean)"]
    body = []
    for e in evs:
        for v in ("unmasked", "masked"):
            s = e["scored"][v][2]
            body.append([e["name"], "RecBole (history not masked)" if v == "unmasked" else "input sequence masked",
                         _f(float(e["target_in_seq"].mean())), _f(float(s["top1_in_seq"].mean())),
                         _f(float(s["top1_is_last"].mean())), _f(float((s["topk_in_seq"] > 0).mean())),
                         _f(float(s["topk_in_seq"].mean()), 3)])
    out += ["#### Items of the user's input sequence in the top 10 (share of test users)", "", markdown(head, body), ""]

    head = ["model"] + [f"{_short(m)}" for m in METRICS] + [f"{_short(m)} masked" for m in METRICS]
    head += [f"d{_short(m)} masked - RecBole [95%]" for m in METRICS]
    head += ["rank 1 / rank 2 (RecBole)", "rank 1 / rank 2 (masked)"]
    body = []
    for e in evs:
        res_u, pu_u, _ = e["scored"]["unmasked"]
        res_m, pu_m, _ = e["scored"]["masked"]
        cells = [e["name"]] + [_f(res_u[m]) for m in METRICS] + [_f(res_m[m]) for m in METRICS]
        cells += [_ci(paired_difference(pu_m[m], pu_u[m])) for m in METRICS]
        for pu in (pu_u, pu_m):
            r = ranks_from_mrr(pu["mrr@10"], pu["hit@10"], pu["ndcg@10"])
            cells.append(f"{int(np.sum(r == 1)):,} / {int(np.sum(r == 2)):,}")
        body.append(cells)
    out += ["#### Test HR/NDCG/MRR@10: RecBole's (history not masked) and with the input sequence masked", "",
            markdown(head, body), ""]

    first = evs[0]
    for o in evs[1:]:
        if not np.array_equal(o["users"], first["users"]) or not np.array_equal(o["targets"], first["targets"]):
            raise SystemExit(f"{first['name']} and {o['name']}: their test users or targets differ: not paired")
        pair = f"{first['name']} - {o['name']}"
        head = ["metric", f"{pair}, RecBole [95%]", f"{pair}, masked [95%]"]
        body = [[_short(m)] + [_ci(paired_difference(first["scored"][v][1][m], o["scored"][v][1][m]))
                               for v in ("unmasked", "masked")] for m in METRICS]
        out += [f"#### Paired over the same {len(first['users']):,} test users: {first['name']} - {o['name']}", "",
                markdown(head, body), ""]
    return "\n".join(out)


def checkpoint_main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.per_user_analysis checkpoint",
        description="Score the test users with trained checkpoints (RecBole's best .pth): how often an item "
                    "of the user's input sequence is ranked first / in the top 10, and HR/NDCG/MRR@10 as "
                    "RecBole computes them and with the input sequence masked.")
    p.add_argument("checkpoints", nargs="+", type=Path, help="RecBole checkpoints of one data set; the first "
                   "is paired with each other one")
    p.add_argument("--names", help="comma-separated names (default: the models'), also the result rows' names")
    p.add_argument("--data-path", type=Path, help="folder holding <dataset>/<dataset>.inter (default: the "
                   "checkpoint's own data_path)")
    p.add_argument("--results", type=Path, default=REPO / "results",
                   help="compare with <results>/<dataset>/<mode>/<name>.json when it exists")
    p.add_argument("--eval-batch-size", type=int, help="users per full-sort batch (default: the checkpoint's)")
    p.add_argument("--device", help="e.g. cpu (default: the checkpoint's config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. scan_impl=torch (repeatable)")
    p.add_argument("--skip-valid", action="store_true",
                   help="do not recompute the valid metric (checked against the checkpoint's best_valid_score)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else [None] * len(args.checkpoints)
    if len(names) != len(args.checkpoints):
        p.error(f"--names: {len(names)} names for {len(args.checkpoints)} checkpoints")
    for o in args.set:
        if "=" not in o or not o.split("=", 1)[0]:
            p.error(f"--set {o!r}: not KEY=VALUE")
    from mamba4rec.significance import paired_difference

    cache, evs = {}, []
    for path, name in zip(args.checkpoints, names):
        evs.append(evaluate_checkpoint(path, args.data_path.resolve() if args.data_path else None,
                                       args.eval_batch_size, args.device, args.set, not args.skip_valid, name, cache))
    if len({(e["dataset"], str(e["inter"])) for e in evs}) > 1:
        raise SystemExit("the checkpoints are not of one data set: "
                         + ", ".join(f"{e['name']} {e['dataset']} at {e['inter']}" for e in evs))
    seen = collections.Counter(e["name"] for e in evs)
    if any(c > 1 for c in seen.values()):
        raise SystemExit(f"two checkpoints named alike ({seen.most_common(1)[0][0]}): give --names")
    digest = _sha256(evs[0]["inter"])
    notes = []
    for e in evs:
        row_path = args.results / e["dataset"] / e["mode"] / f"{e['name']}.json"
        if not row_path.is_file():
            notes.append(f"- {e['name']}: no {row_path}: test values not compared with a result row")
            continue
        row = json.loads(row_path.read_text())
        want = (row.get("data_sha256") or {}).get(e["inter"].name)
        if want and want != digest:
            notes.append(f"- {e['name']}: {row_path} was tested on another {e['inter'].name}: not compared")
            continue
        notes.append(compare_with_row(e, row))
    print(f"### {evs[0]['dataset']}, {evs[0]['mode']} mode: the input sequence in the ranking, from checkpoints\n")
    print(f"Test users scored with each checkpoint's full_sort_predict (eval mode, no grad), data "
          f"{evs[0]['inter']} (sha256 {digest[:12]}); 'input seq' = the model's input item list "
          f"(the last MAX_ITEM_LIST_LENGTH items before the test item).\n")
    print(checkpoint_report(evs, paired_difference, notes))
    return 0


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["checkpoint"]:
        return checkpoint_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--mode", required=True, choices=("prefix", "sequence"))
    p.add_argument("--models", required=True, help="comma-separated, the first compared with each other one")
    p.add_argument("--data-path", required=True, type=Path,
                   help="folder holding <dataset>/<dataset>.inter (experiments.results' OUT/dataset)")
    p.add_argument("--results", type=Path, default=REPO / "results")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                   help="upper edges of the history-length buckets (inclusive)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        p.error("--models needs at least two models")
    edges = [int(e) for e in args.buckets.split(",")]
    inter = args.data_path / args.dataset / f"{args.dataset}.inter"
    if not inter.is_file():
        raise SystemExit(f"no {inter}; {prepare_hint(args.dataset, args.data_path)}")
    npz = args.results / args.dataset / "per_user.npz"
    if not npz.is_file():
        raise SystemExit(f"no {npz}: export finished runs first (python -m experiments.results export OUT)")
    with np.load(npz) as data:
        missing = [f"{args.mode}/{m}/{met}" for m in models for met in METRICS if f"{args.mode}/{m}/{met}" not in data]
        if missing:
            raise SystemExit(f"{npz} lacks {', '.join(missing)}; it holds {', '.join(sorted(data.files))}")
        values = {m: {met: data[f"{args.mode}/{m}/{met}"].astype(np.float64) for met in METRICS} for m in models}
    records = {}
    digest = _sha256(inter)
    for m in models:
        path = args.results / args.dataset / args.mode / f"{m}.json"
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
    print(f"### {args.dataset}, {args.mode} mode: {', '.join(models)} per test user\n")
    print(f"Order checked: {len(users):,} test users of RecBole's test dataloader; each target is the user's "
          f"last item of {inter}, item_length = min(n - 1, {splits[models[0]][4]}); sha256 {digest[:12]}.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
