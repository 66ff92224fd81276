"""``compare``: the loop over a comparison's models. It checks everything up front (model names,
classes a model's own process can import, the rows already on disk), trains each model (through
.isolation, in a process of its own by default), resumes, shares a comparison between processes
(``only``), keeps each row (.rows) and rewrites the table after every model (.report).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

from ..pipeline import last_checkpoint_path
from ..registry import build_config, resolve_model
from . import isolation
from .report import write_outputs
from .rows import (METRIC_KEYS, _atomic_write, _check_checkpoint_data, _curve_from_checkpoint, _data_files,
                   _load_rows, _row, _save_curve, _save_per_user, _settings, git_commit)

logger = logging.getLogger(__name__)


def compare(models, dataset, out_dir, config_files=None, config_dict=None, cmd_args=None,
            progress=print, resume=False, only=None, isolate=True) -> list[dict]:
    """Run each model, then write ``out_dir``/compare.md, compare.csv and compare.png.

    ``resume``: keep the rows of models that finished in an earlier call with the same
    ``out_dir`` and settings, and continue an interrupted model from its last epoch.
    ``only``: run just these of ``models``; the others appear as their rows in ``out_dir``
    say (written by another process sharing the comparison), or as "pending".
    ``isolate``: train each model in a fresh process of its own (multiprocessing "spawn"), so
    that its peak memory is its own (not what earlier models left in this process), and a model
    whose process dies (out of memory, a crash in native code) is reported as failed while the
    others go on. A script calling compare() then needs the usual ``if __name__ == "__main__":``
    guard. ``isolate=False`` trains in this process (for tests that patch the training)."""
    classes = {}
    for m in models:  # unknown names fail before any training
        cls, name = resolve_model(m)
        if name in classes:
            raise ValueError(f"--compare lists a model twice: {', '.join([*classes, name])}")
        classes[name] = cls
        if isolate:
            isolation._spawnable(cls)  # before any training, not when its turn comes
    names = list(classes)
    if only is not None:
        only = [resolve_model(m)[1] for m in only]
        stray = [m for m in only if m not in names]
        if stray or not only:
            raise ValueError(f"--compare_run names {', '.join(stray) or 'no model'}: it takes models of the "
                             f"comparison ({', '.join(names)}), comma-separated")
    out = Path(out_dir)
    rows_dir = out / "rows"
    settings = _settings(dataset, config_files, config_dict, cmd_args)
    commit = git_commit()  # the code this process runs (it may change on disk while a model trains)
    running = names if only is None else [n for n in names if n in only]
    others = [n for n in names if n not in running]
    run_dict = dict(config_dict or {})
    if "checkpoint_dir" not in run_dict and not any(a.startswith("--checkpoint_dir=") for a in cmd_args or []):
        run_dict["checkpoint_dir"] = str(out / "checkpoints")
    data = None  # the data files the models of this run read (the data path is the same for all)
    for name in names:
        try:
            data = _data_files(build_config(classes[name], dataset, config_files, run_dict, cmd_args))
            break
        except Exception:  # noqa: BLE001 - a config error shows in that model's row
            continue
    # the rows of models run elsewhere must be of this protocol and data too (refused now, not after hours)
    _load_rows(rows_dir, others, settings, failed=True, flag="--compare_run", data=data)
    done = _load_rows(rows_dir, running, settings, data=data) if resume else {}
    rows, row_data = {}, {}

    def snapshot():
        try:  # re-read: another process may have finished one of the others meanwhile
            elsewhere = _load_rows(rows_dir, others, settings, failed=True, data=data)
        except ValueError:
            elsewhere = {}
        merged = {**elsewhere, **rows}
        write_outputs([merged.get(n) or _row(n, status="pending") for n in names], dataset, out)

    for i, name in enumerate(running, 1):
        if name in done:
            rows[name] = done[name]
            progress(f"[{i}/{len(running)}] {name}: finished earlier, kept ({rows_dir / (name + '.json')})")
            if not (out / "curves" / f"{name}.json").is_file():  # a row from before curves were kept
                _curve_from_checkpoint(out, name, classes[name], dataset, config_files, run_dict, cmd_args)
            continue
        progress(f"[{i}/{len(running)}] {name} on {dataset} ...")
        t0 = time.perf_counter()
        try:
            config = build_config(classes[name], dataset, config_files, run_dict, cmd_args)
            resume_from = None
            if resume and os.path.isfile(last_checkpoint_path(config)):
                resume_from = last_checkpoint_path(config)
                progress(f"[{i}/{len(running)}] {name}: continuing from {resume_from}")
            model_data = _data_files(config)  # now, not at the start: hours may have passed
            _check_checkpoint_data(last_checkpoint_path(config), resume_from, model_data)
            train = isolation._train_isolated if isolate else isolation._train
            result, peak, threads = train(classes[name], dataset, config_files, run_dict, cmd_args, resume_from)
            rows[name] = _row(name, result, peak=peak, seconds=time.perf_counter() - t0,
                              epoch_limit=config["epochs"], threads=threads, commit=commit)
            row_data[name] = model_data
            _save_per_user(out, name, result, config)
            _save_curve(out, name, result.extra.get("history"), config)
            if resume_from:
                rows[name]["status"] = "ok (resumed)"
            progress(f"[{i}/{len(running)}] {name}: test " + ", ".join(
                f"{k}={result.test_result.get(k, float('nan')):.4f}" for k in METRIC_KEYS))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a failed model is reported; the others still run
            # the error of a model's own process is already its own "Type: message" (and that
            # process logged the traceback)
            own = isinstance(exc, (isolation.ModelFailed, isolation.ModelProcessDied))
            error = str(exc) if own else f"{type(exc).__name__}: {exc}"
            if own:
                logger.error("%s failed: %s", name, error)
            else:
                logger.error("%s failed:\n%s", name, traceback.format_exc())
            rows[name] = _row(name, error=error.splitlines()[0][:200], seconds=time.perf_counter() - t0)
            progress(f"[{i}/{len(running)}] {name}: FAILED ({error})")
        rows_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(rows_dir / f"{name}.json",
                      lambda p, r=rows[name], d=row_data.get(name, data): p.write_text(
                          json.dumps({"row": r, "settings": settings, "data": d}, indent=1)))
        snapshot()
    if not names:
        return []
    snapshot()
    return [rows[n] for n in running]
