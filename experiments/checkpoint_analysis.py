"""A model's best checkpoints scored again: does a model rank the user's own input items first?

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

Users are scored as the run scored them: from the window (RecBole's protocol) or, where the run
evaluated with ``eval_history: whole`` (the default of ``train_mode: history``), from each user's
whole history. ``--eval-history`` scores checkpoints another way (one value for all, or one per
checkpoint: run, as the run did; window; whole); a checkpoint scored otherwise than its run is
compared with neither its valid score nor its row. The same checkpoint named twice pairs the two
ways user by user:

    python -m experiments.per_user_analysis checkpoint BEST.pth BEST.pth --names whole,window \
        --eval-history whole,window --data-path DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import numpy as np

from .per_user_analysis import METRICS, REPO, SPLIT_KEYS, _ci, _f, _sha256, _short, markdown, ranks_from_mrr


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
    try:
        config = build_config(saved["model"], saved["dataset"], None, given, [f"--{o}" for o in overrides],
                              use_default_configs=False)
    except ValueError as exc:  # a setting the model refuses (eval_history=whole for SASRec, say)
        raise SystemExit(f"{saved['model']} checkpoint: {exc}") from None
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


def checkpoint_model(path, data_path=None, eval_batch_size=None, device=None, overrides=(), _cache=None):
    """A checkpoint's run rebuilt: (state, config, drift, model class, model name, data set,
    train, valid and test dataloaders, the model with the checkpoint's weights). ``_cache`` (a
    dict) shares the data between checkpoints that split it the same way."""
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
    return state, config, drift, model_class, model_name, ds, train, valid, test, net


def evaluate_checkpoint(path, data_path=None, eval_batch_size=None, device=None, overrides=(), check_valid=True,
                        name=None, _cache=None) -> dict:
    """Rebuild ``path``'s model and test dataloader from its own config (checkpoint_model), load
    its weights and score the test users (RecBole's ranking and with the input sequence masked);
    with ``check_valid`` also the validation users, whose valid metric must equal the
    checkpoint's best_valid_score. ``_cache`` (a dict) shares the data between checkpoints that
    split it the same way."""
    state, config, drift, model_class, model_name, ds, train, valid, test, net = checkpoint_model(
        path, data_path, eval_batch_size, device, overrides, _cache)
    from mamba4rec.history import WholeHistory, resolve_history

    chunk, whole = resolve_history(config, model_class)  # checked when the config was built
    as_run = whole == resolve_history(state["config"])[1]  # scored the way the run scored it
    whole_history = WholeHistory(train.dataset, valid.dataset, test.dataset, chunk) if whole else None

    def score(loader, masked=True):
        """As the run scored it: eval_history=whole from each user's whole history."""
        if whole_history is None:
            return _score_loader(net, loader, config, masked)
        with whole_history.scoring(net, loader.dataset):
            return _score_loader(net, loader, config, masked)

    scored, users, targets, target_in = score(test)
    out = {"name": name or model_name, "path": str(path), "model": model_name, "dataset": config["dataset"],
           "mode": str(config["train_mode"]), "eval_history": "whole" if whole else "window",
           "as_run": as_run,
           "epoch": int(state["epoch"]), "drift": drift,
           "best_valid_score": state.get("best_valid_score"), "valid_metric": config["valid_metric"].lower(),
           "valid_recomputed": None, "scored": scored, "target_in_seq": target_in,
           "users": ds.field2id_token[config["USER_ID_FIELD"]][users].astype(str),
           "targets": ds.field2id_token[config["ITEM_ID_FIELD"]][targets].astype(str),
           "inter": Path(config["data_path"]) / f"{config['dataset']}.inter",
           "decimals": int(config["metric_decimal_place"])}
    if check_valid:
        vres = score(valid, masked=False)[0]["unmasked"][0]
        out["valid_recomputed"] = float(vres[out["valid_metric"]])
        if as_run and out["best_valid_score"] is not None and not math.isclose(
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
    if not ev.get("as_run", True):
        return (f"- {ev['name']}: scored with eval_history={ev['eval_history']}, not as its run scored: test values "
                "not compared with the row")
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
    head = ["model", "checkpoint", "epoch", "eval_history", "valid metric: checkpoint / recomputed", "test users"]
    body = [[e["name"], Path(e["path"]).name, e["epoch"], e.get("eval_history", "window"),
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
    p.add_argument("--eval-history", help="comma-separated, one for all or one per checkpoint: run (as the run "
                   "scored; default), window or whole")
    p.add_argument("--skip-valid", action="store_true",
                   help="do not recompute the valid metric (checked against the checkpoint's best_valid_score)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else [None] * len(args.checkpoints)
    if len(names) != len(args.checkpoints):
        p.error(f"--names: {len(names)} names for {len(args.checkpoints)} checkpoints")
    for o in args.set:
        if "=" not in o or not o.split("=", 1)[0]:
            p.error(f"--set {o!r}: not KEY=VALUE")
        if o.split("=", 1)[0] == "eval_history":
            p.error("--set eval_history=...: use --eval-history, which can differ between checkpoints")
    ways = [w.strip() for w in args.eval_history.split(",")] if args.eval_history else ["run"]
    if len(ways) == 1:
        ways *= len(args.checkpoints)
    if len(ways) != len(args.checkpoints) or any(w not in ("run", "window", "whole") for w in ways):
        p.error(f"--eval-history {args.eval_history!r}: one of run, window, whole, or one per checkpoint "
                f"({len(args.checkpoints)})")
    from mamba4rec.significance import paired_difference

    cache, evs = {}, []
    for path, name, way in zip(args.checkpoints, names, ways):
        overrides = list(args.set) + ([] if way == "run" else [f"eval_history={way}"])
        evs.append(evaluate_checkpoint(path, args.data_path.resolve() if args.data_path else None,
                                       args.eval_batch_size, args.device, overrides, not args.skip_valid, name, cache))
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
          f"(the last MAX_ITEM_LIST_LENGTH items before the test item; the window, also where a "
          f"model is scored from the whole history).\n")
    print(checkpoint_report(evs, paired_difference, notes))
    return 0
