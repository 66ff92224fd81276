"""Train Mamba4Rec and baselines under one protocol and write a table, a CSV and a chart.

Every model goes through :func:`mamba4rec.pipeline.run` with the same data set, split, seed,
evaluation and overrides; each model keeps its own RecBole defaults. Each model trains in a
fresh process of its own, so its peak memory is its own and not what the models before it left
behind in a shared process. A model that fails, even by taking its process down (killed for
memory, a crash in native code), is reported in the table and the others go on.

A comparison can take hours per model on a CPU, so it survives being stopped: each finished
model's row is kept in ``out_dir/rows/<model>.json`` and the table is rewritten after every
model (models not yet run show as "pending"); checkpoints go to ``out_dir/checkpoints`` unless
the caller sets ``checkpoint_dir``. ``compare(..., resume=True)`` (``run_recbole.py ...
--compare=... --resume``) keeps the finished rows, continues an interrupted model from its
``-last.pth`` exactly where it stopped, and runs the rest. The rows record the settings they were
made with and the checksums of the data files they were trained on; resuming under other
settings, or on a data set prepared again since, is refused.

``compare(..., only=[...])`` (``--compare_run=...``) runs only some of the models and shows the
others as their rows on disk say: several processes can then share one comparison (one model
each, one thread each on a small CPU: ``benchmarks/results.py run`` does this with
``--lanes 2``, a queue of (data set, train mode, model) jobs), and the table, rewritten by whichever finishes,
merges their rows. Each row records the CPU threads it trained with, since its seconds per epoch
depend on them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from ..memory import PeakMemory
from ..pipeline import last_checkpoint_path, run
from ..registry import build_config, resolve_model
from .report import PAPER, markdown_table, paired_lines, progress_report, verdict, write_outputs  # noqa: F401
from .rows import (  # noqa: F401
    METRIC_KEYS, _atomic_write, _check_checkpoint_data, _curve_from_checkpoint, _data_files, _load_rows, _row,
    _save_curve, _save_per_user, _settings, _threads, git_commit, load_curves, load_per_user, machine)

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
            _spawnable(cls)  # before any training, not when its turn comes
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
            train = _train_isolated if isolate else _train
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
            # the error of a model's own process is already its own "Type: message"
            own = isinstance(exc, (ModelFailed, ModelProcessDied))  # its process logged the traceback
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


def _train(model, dataset, config_files, run_dict, cmd_args, resume_from):
    """Train one model in this process: (RunResult, PeakMemory, torch threads)."""
    config = build_config(model, dataset, config_files, run_dict, cmd_args)
    with PeakMemory() as peak:
        result = run(model, dataset, config=config, resume=resume_from)
    return result, peak, _threads()


class ModelProcessDied(RuntimeError):
    """The process training a model ended without a result (killed, crashed)."""


class ModelFailed(RuntimeError):
    """Training failed in the model's own process; the message is the child's error."""


def _child(conn, threads, train, *args):
    """Entry of a model's own process: train, send (result, peak, threads) or the error back."""
    _exit_with_parent()
    try:
        import torch

        torch.set_num_threads(threads)  # the comparison's count, however it was set there
        result, peak, threads = train(*args)
        conn.send(("ok", (result, {"peak_mib": peak.peak_mib, "cuda_peak_mib": peak.cuda_peak_mib}, threads)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        conn.close()


def _exit_with_parent():
    """A model's process ends when the comparison's does, however that ends (SIGKILL runs no
    clean-up in the parent): it must not train on as an orphan. The parent's sentinel becomes
    ready the moment it exits, on every platform."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, daemon=True, name="mamba4rec-parent-watch").start()


def _spawnable(model):
    """A model's own process imports its class by module and name: refuse, with the way out,
    a class it could not import (defined in an interactive session's __main__)."""
    cls = resolve_model(model)[0]
    main = sys.modules.get("__main__")
    if cls.__module__ == "__main__" and not getattr(main, "__file__", None):
        raise ValueError(f"model class {cls.__name__} is defined in an interactive session: a model's own "
                         f"process cannot import it. Define it in a module (a .py file), or pass "
                         f"compare(..., isolate=False) to train in this process.")


def _train_isolated(model, dataset, config_files, run_dict, cmd_args, resume_from, train=None):
    """``train`` (default _train, same arguments and result) in a fresh process of its own (see
    compare(isolate=True)); the process imports it by name: a module-level function, or a
    functools.partial of one (mamba4rec.hyper's trials)."""
    import multiprocessing
    import signal
    from types import SimpleNamespace

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, _threads(), train or _train, model, dataset, config_files,
                                            run_dict, cmd_args, resume_from),
                       name=f"mamba4rec-compare-{resolve_model(model)[1]}")
    proc.start()
    send.close()
    try:
        try:
            message = receive.recv()
        except (EOFError, OSError):  # the process ended without sending (all of) its message
            message = None
        proc.join(60)  # it has sent everything; a process that does not end after that is stopped
        if proc.exitcode is None:
            proc.terminate()
            proc.join()
        code = proc.exitcode
    except BaseException:  # interrupted here: the model's process goes too
        proc.terminate()
        proc.join()
        raise
    finally:
        receive.close()
    proc.close()
    if message is None:
        how = f"exit code {code}: its error, if it printed one, is in the log above"
        if code < 0:
            sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            how = f"signal {sig}" + (" (out of memory? see dmesg)" if sig == "SIGKILL" else "")
        raise ModelProcessDied(f"its process ended without a result ({how})")
    kind, payload = message
    if kind == "error":
        name, text, trace = payload
        if name == "KeyboardInterrupt":
            raise KeyboardInterrupt
        logger.error("%s", trace.rstrip())
        raise ModelFailed(f"{name}: {text}")
    result, peak, threads = payload
    return result, SimpleNamespace(**peak), threads
