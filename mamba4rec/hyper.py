"""Hyper-parameter search as RecBole users run it (run_hyper.py, a params file, hyperopt), with
every trial trained and evaluated by this project's pipeline (mamba4rec.pipeline.run).

    python run_hyper.py --model=Mamba4Rec --dataset=ml-100k          # the shipped space, all 12 trials
    python run_hyper.py -m SASRec -d ml-100k --epochs=50               # same budget for a baseline
    python run_hyper.py --params_file=my.hyper --algo=bayes --max_evals=30 --output_file=out.md

The params file (RecBole's format) and the searches it allows: mamba4rec/hyper_space.py, whose
names are imported here too. Every trial gets the params as a config dict, so the priority is
RecBole's: command line > the trial's params > config files; a key both searched and set on the
command line is refused. Each trial trains in a fresh process of its own (as the
comparison does), prints one line, and the table in the output file is rewritten after it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checks import int_in
from .files import write_text_atomic
from .hyper_space import (  # noqa: F401  (re-exported: the space is part of mamba4rec.hyper's API)
    ALGOS, TYPES, Param, SpaceError, check_space, parse_space, plan, read_space)

logger = logging.getLogger(__name__)


@dataclass
class Search:
    """What a search did: one row per trial, the best one, where it wrote."""
    model: str
    dataset: str
    algo: str
    planned: int
    space: list
    valid_metric: str
    bigger: bool
    rows: list = field(default_factory=list)
    output_file: str | None = None
    log_file: str | None = None
    finished: str = "running"

    @property
    def best(self) -> dict | None:
        ok = [r for r in self.rows if r["status"] == "ok" and r["score"] is not None and not math.isnan(r["score"])]
        if not ok:
            return None
        sign = 1.0 if self.bigger else -1.0
        return max(ok, key=lambda r: (sign * r["score"], -r["trial"]))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def override(name, value) -> str:
    """``--name=value`` as run_recbole.py (RecBole's command line) reads it back."""
    text = value if isinstance(value, str) else repr(value).replace(" ", "")
    return f"--{name}={text}"


def markdown(search: Search, fixed: str = "") -> str:
    names = [p.name for p in search.space]
    metrics = list(dict.fromkeys(k for r in search.rows for k in r["valid"])) or [search.valid_metric]
    cols = ["trial", *names, *[f"valid {m}" for m in metrics], *[f"test {m}" for m in metrics],
            "best_epoch", "epochs_run", "wall_s", "status"]
    best = search.best
    lines = [f"# Hyper-parameter search: {search.model} on {search.dataset}", "",
             f"- search: {search.algo}, {len(search.rows)} of {search.planned} trials ({search.finished})",
             f"- space: " + "; ".join(p.describe() for p in search.space),
             f"- selected by: valid {search.valid_metric} ({'higher' if search.bigger else 'lower'} is better)"]
    if fixed:
        lines.append(f"- fixed: {fixed}")
    if search.log_file:
        lines.append(f"- RecBole's log: {search.log_file}")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in search.rows:
        cells = [str(r["trial"]) + (" *" if r is best else ""), *[_fmt(r["params"].get(n)) for n in names],
                 *[_fmt(r["valid"].get(m)) for m in metrics], *[_fmt(r["test"].get(m)) for m in metrics],
                 _fmt(r["best_epoch"]), _fmt(r["epochs_run"]), _fmt(r["wall_s"]), r["status"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if best is None:
        lines.append("best: none (no trial finished)")
    else:
        lines.append(f"best: trial {best['trial']} (valid {search.valid_metric} {best['score']:.4f}): "
                     + ", ".join(f"{n}={best['params'][n]!r}" for n in names))
        lines.append("as overrides: " + " ".join(override(n, best["params"][n]) for n in names))
    return "\n".join(lines) + "\n"


def _logged_train(log_file, level, model, dataset, config_files, run_dict, cmd_args, resume_from):
    """One trial (mamba4rec.compare.isolation._train) with RecBole's log going to ``log_file`` only: a
    handler on the root logger makes RecBole's init_logger (logging.basicConfig) a no-op, so
    the console keeps one line per trial."""
    from .compare.isolation import _train

    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s"))
    for h in saved:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    try:
        logging.getLogger(__name__).info("trial: %s", run_dict)
        return _train(model, dataset, config_files, run_dict, cmd_args, resume_from)
    finally:
        root.removeHandler(handler)
        handler.close()
        for h in saved:
            root.addHandler(h)
        root.setLevel(saved_level)


def _level(state) -> int:
    return getattr(logging, str(state or "INFO").upper(), logging.INFO)


def _draws(space, trials, seed):
    """The exhaustive search's parameter dicts, in grid order (a random subset when cut short)."""
    grid = [dict(zip([p.name for p in space], combo)) for combo in itertools.product(*(p.args for p in space))]
    if trials < len(grid):
        keep = sorted(random.Random(seed).sample(range(len(grid)), trials))
        grid = [grid[i] for i in keep]
    return grid


def search(model, dataset, space, config_files=None, cmd_args=None, output_file=None, algo="auto",
           max_evals=None, early_stop=0, isolate=True, progress=print) -> Search:
    """Search ``space`` (a params file path or a list of Param) for ``model`` on ``dataset``.

    Every trial is ``pipeline.run(model, dataset, config_files, config_dict=params, cmd_args)``
    (through mamba4rec.compare's trainer, in a process of its own when ``isolate``). Input is
    checked before any trial (SpaceError; an existing output file is refused, not overwritten).
    The table goes to ``output_file`` after every trial (RecBole's log to the same name with .log); ``early_stop`` > 0 ends the search after that
    many trials without a better valid score. A failed trial is a row; the search goes on."""
    from .compare import isolation
    from .registry import _check_cmd_args, resolve_model

    cmd_args = _check_cmd_args(cmd_args)
    if isinstance(space, (str, os.PathLike)):
        space = read_space(space)
    space = list(space)
    if not space:
        raise SpaceError("the search space is empty")
    if not int_in(early_stop, 0):
        raise SpaceError(f"early_stop must be an integer >= 0 (0: off), got {early_stop!r}")
    algo, planned = plan(space, algo, max_evals)
    if algo in ("random", "bayes"):
        _import_hyperopt()
    if isolate:
        isolation._spawnable(model)
    name = resolve_model(model)[1]
    out = Path(output_file or f"saved/hyper-{name}-{dataset}.md")
    log = out.with_suffix(".log") if out.suffix != ".log" else out.with_name(out.name + ".log")
    for path in (out, log):
        if path.exists():  # an earlier search's table (hours of trials) is not overwritten
            raise SpaceError(f"{path} already exists (an earlier search's): give another output file "
                             f"(--output_file=...) or remove {out} and {log}")
    base = check_space(space, model, dataset, config_files, cmd_args)
    result = Search(name, dataset, algo, planned, space, base["valid_metric"].lower(), bool(base["valid_metric_bigger"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.output_file, result.log_file = str(out), str(log)
    fixed = " ".join([*(f"--config_files={f}" for f in config_files or []), *cmd_args])
    train = functools.partial(_logged_train, str(log), _level(base["state"]))

    def write():
        write_text_atomic(out, markdown(result, fixed))

    def trial(params):
        params = {p.name: p.value(params[p.name]) for p in space}  # in the file's order
        n = len(result.rows) + 1
        run_dict = {"show_progress": False, **params}
        t0 = time.perf_counter()
        row = {"trial": n, "params": params, "valid": {}, "test": {}, "best_epoch": None, "epochs_run": None,
               "score": None, "status": "ok"}
        try:
            if isolate:
                res, _, _ = isolation._train_isolated(model, dataset, config_files, run_dict, cmd_args, None,
                                                      train=train)
            else:
                res, _, _ = train(model, dataset, config_files, run_dict, cmd_args, None)
            row.update(valid=dict(res.best_valid_result or {}), test=dict(res.test_result), best_epoch=res.best_epoch,
                       epochs_run=res.epochs_run, score=float(res.best_valid_score))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed trial is a row of the table; the search goes on
            row["status"] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        result.rows.append(row)
        write()
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        if row["status"] == "ok":
            m = result.valid_metric
            note = "  (best so far)" if result.best is row else ""
            progress(f"[{n}/{planned}] {shown}: valid {m} {row['valid'].get(m, row['score']):.4f}, test {m} "
                     f"{row['test'].get(m, float('nan')):.4f}, epochs {row['epochs_run']} (best {row['best_epoch']}), "
                     f"{row['wall_s']:.0f} s{note}")
        else:
            progress(f"[{n}/{planned}] {shown}: {row['status']}")
        return row

    progress(f"{name} on {dataset}: {algo} search, {planned} trials over " + "; ".join(p.describe() for p in space))
    progress(f"table: {out} (after every trial); RecBole's log: {log}")
    write()
    try:
        if algo == "exhaustive":
            since_best = 0
            for params in _draws(space, planned, base["seed"]):
                before = result.best
                trial(params)
                since_best = 0 if result.best is not before else since_best + 1
                if early_stop and since_best >= early_stop:
                    result.finished = f"stopped: {early_stop} trials without a better valid score"
                    break
        else:
            _hyperopt_search(space, algo, planned, early_stop, base["seed"], trial, result)
        if result.finished == "running":
            result.finished = "done"
    except BaseException:
        result.finished = f"interrupted after {len(result.rows)} trials"
        write()
        raise
    write()
    best = result.best
    if best is not None:
        progress(f"best: trial {best['trial']}, valid {result.valid_metric} {best['score']:.4f}: "
                 + " ".join(override(k, v) for k, v in best["params"].items()))
    return result


def _import_hyperopt():
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        raise SpaceError("random and bayes searches need hyperopt: pip install hyperopt (the "
                         "hyper extra); an all-choice space runs exhaustively without it") from None
    return hyperopt


def _hyperopt_search(space, algo, planned, early_stop, seed, trial, result):
    import numpy as np
    from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, hp, rand, tpe

    def dimension(p):
        if p.kind == "choice":
            return hp.choice(p.name, list(p.args))
        if p.kind == "quniform":
            return hp.quniform(p.name, *p.args)
        return getattr(hp, p.kind)(p.name, *p.args)

    sign = -1.0 if result.bigger else 1.0

    def objective(params):
        row = trial(params)
        if row["status"] != "ok" or row["score"] is None or math.isnan(row["score"]):
            return {"status": STATUS_FAIL}
        return {"loss": sign * row["score"], "status": STATUS_OK}

    stop = None
    if early_stop:
        from hyperopt.early_stop import no_progress_loss

        stop = no_progress_loss(early_stop)
    trials = Trials()
    fmin(objective, {p.name: dimension(p) for p in space}, algo=tpe.suggest if algo == "bayes" else rand.suggest,
         max_evals=planned, trials=trials, rstate=np.random.default_rng(seed), show_progressbar=False,
         early_stop_fn=stop)
    if early_stop and len(result.rows) < planned:
        result.finished = f"stopped: {early_stop} trials without a better valid score"


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="run_hyper.py",
        description="Search hyper-parameters of Mamba4Rec or any RecBole model (RecBole's params file format, "
                    "hyperopt); every trial runs through mamba4rec's pipeline.",
        epilog="Any other --key=value sets a config key for every trial (e.g. --epochs=50). The params file has "
               "one 'name type range' line per key: choice [a,b,...], uniform low,high, quniform low,high,q, "
               "loguniform low,high (natural logs). Exit status: 0 all trials ran, 1 some failed, 2 bad input.")
    parser.add_argument("--model", "-m", default="Mamba4Rec", help="Mamba4Rec or a RecBole model name")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="data set name (default: ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated extra YAML files, applied after configs/")
    parser.add_argument("--params_file", default=None,
                        help="the search space (default: the shipped configs/hyper/<model>.hyper)")
    parser.add_argument("--output_file", default=None,
                        help="where the table of trials goes (default saved/hyper-<model>-<dataset>.md)")
    parser.add_argument("--max_evals", type=int, default=None,
                        help="number of trials (default: every combination of an all-choice space)")
    parser.add_argument("--algo", default="auto", choices=ALGOS,
                        help="auto (exhaustive for an all-choice space, else bayes), exhaustive, random or bayes (TPE)")
    parser.add_argument("--early_stop", type=int, default=0,
                        help="end after this many trials without a better valid score (default 0: off, so every "
                             "model of a comparison gets the same number of trials)")
    parser.add_argument("--tool", default="Hyperopt", choices=["Hyperopt"],
                        help="RecBole's flag; hyperopt is the only tool here (RecBole's Ray path imports ray)")
    return parser.parse_known_args(argv)  # the rest: --key=value overrides, checked by the pipeline


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from .defaults import search_space_file
    from .registry import _check_cmd_args

    config_files = args.config_files.strip().split() if args.config_files else None
    try:
        overrides = _check_cmd_args(overrides)  # a stray word: "override 'x' is not of the form --key=value"
        space = args.params_file or search_space_file(args.model)
        if space is None:
            raise SpaceError(f"no search space is shipped for {args.model!r} (configs/hyper/ has Mamba4Rec, SASRec "
                             f"and GRU4Rec): give --params_file=FILE, one 'name type range' line per key")
        for f in config_files or []:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"config file {f!r} does not exist")
        result = search(args.model, args.dataset, space, config_files=config_files, cmd_args=overrides,
                        output_file=args.output_file, algo=args.algo, max_evals=args.max_evals,
                        early_stop=args.early_stop)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished trials are in the output file", file=sys.stderr)
        return 130
    print(f"table: {result.output_file}")
    return 0 if result.rows and all(r["status"] == "ok" for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
