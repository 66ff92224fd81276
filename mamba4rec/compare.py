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

import csv
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from .memory import PeakMemory
from .pipeline import last_checkpoint_path, run
from .registry import build_config, resolve_model

METRIC_KEYS = ("hit@10", "ndcg@10", "mrr@10")
logger = logging.getLogger(__name__)


def _row(model, result=None, error=None, peak=None, seconds=None, status=None, epoch_limit=None, threads=None,
         commit=None):
    row = {"model": model, "status": status or ("ok" if error is None else f"failed: {error}")}
    for split in ("valid", "test"):
        values = {} if result is None else (result.best_valid_result if split == "valid" else result.test_result)
        for key in METRIC_KEYS:
            row[f"{split}_{key}"] = values.get(key)
    row.update({
        "best_epoch": None if result is None else result.best_epoch,
        "epochs_run": None if result is None else result.epochs_run,
        # early stopping ends a run before the epoch limit; a run that reached the limit may
        # still have been improving (then its best epoch is its last)
        "stopped_by": None if result is None or epoch_limit is None else (
            "early stopping" if result.epochs_run < epoch_limit else "epoch limit"),
        "params": None if result is None else result.params,
        "train_s_per_epoch": None if result is None else round(result.train_seconds_per_epoch, 2),
        "eval_s": None if result is None else round(result.eval_seconds, 2),
        "peak_rss_mib": None if peak is None else round(peak.peak_mib),
        "peak_cuda_mib": None if peak is None or peak.cuda_peak_mib is None else round(peak.cuda_peak_mib),
        "wall_s": None if seconds is None else round(seconds, 1),
        "threads": None if result is None else (threads or _threads()),
        "machine": None if result is None else machine(),
        "git_commit": None if result is None else (commit or git_commit()),
    })
    return row


def machine() -> str:
    """The hardware and stack a row was trained on, in one line."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cpus{gpu}, {platform.system()}, python {platform.python_version()}, torch {torch.__version__}"


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or None outside git."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--"], timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _settings(dataset, config_files, config_dict, cmd_args) -> dict:
    """What a row was made with: a resume under other settings would mix two protocols."""
    return {"dataset": dataset, "config_files": [os.path.abspath(f) for f in config_files or []],
            "config_dict": json.loads(json.dumps(config_dict or {}, sort_keys=True, default=str)),
            "cmd_args": sorted(cmd_args or [])}


def _data_files(config) -> dict | None:
    """{file name: sha256} of the data set's atomic files (``<data_path>/<dataset>.inter`` etc.), or None
    when they are not there yet (a RecBole download name before its download). Settings alone
    do not pin the data: the same name may have been prepared again, with another k-core."""
    import glob
    import hashlib

    folder, name = config["data_path"], config["dataset"]
    # the atomic files RecBole reads, not side files (prepare.py's stats.json names its input path)
    files = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*"))
                   if p.rsplit(".", 1)[-1] in ("inter", "user", "item", "kg", "link", "net"))
    if not files:
        return None
    digests = {}
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digests[os.path.basename(path)] = digest.hexdigest()
    return digests


def _check_checkpoint_data(last_path, resume_from, data):
    """Keep, beside a model's -last.pth, the checksums of the data it is trained on; refuse to
    continue it on other data (the data set prepared again while it was stopped)."""
    side = Path(f"{last_path}.data.json")
    if not data:
        return
    if resume_from and side.is_file():
        try:
            before = json.loads(side.read_text())
        except ValueError:
            before = None
        if before and before != data:
            changed = sorted(set(data) ^ set(before) | {f for f in data if before.get(f) != data[f]})
            raise ValueError(f"--resume: {resume_from} was trained on other data files ({', '.join(changed)} "
                             f"changed since): delete it to train this model from the start, or use another "
                             f"--compare_dir")
    side.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(side, lambda p: p.write_text(json.dumps(data)))


def _load_rows(rows_dir: Path, names, settings, failed=False, flag="--resume", data=None) -> dict:
    """Finished rows of ``names`` kept in ``rows_dir`` (and failed ones with ``failed``).
    ``data``: this run's _data_files; a row made from other data files is refused."""
    done = {}
    for name in names:
        path = rows_dir / f"{name}.json"
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
            row, made_with = saved["row"], saved["settings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{flag}: {path} is not a row written by compare ({exc}); "
                             f"delete it to rerun {name}") from None
        if made_with != settings:
            raise ValueError(
                f"{flag}: {path} was made with other settings ({made_with}) than this run ({settings}). "
                f"Rerun with the same data set, config files and overrides, or use another --compare_dir.")
        if data and saved.get("data") and saved["data"] != data:
            changed = sorted(set(data) ^ set(saved["data"]) | {f for f in data if saved["data"].get(f) != data[f]})
            raise ValueError(
                f"{flag}: {path} was made from other data files than this run's ({', '.join(changed)} "
                f"changed since: the data set was prepared again?). Mixing them would compare models on "
                f"different data: use another --compare_dir, or delete {rows_dir} to train every model again.")
        if failed or str(row.get("status", "")).startswith("ok"):  # a failed model is retried
            done[name] = row
    return done


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


def progress_report(out_dir, checkpoint_dir=None, now=None, models=()) -> str:
    """Where a comparison stands, from what is on disk (rows/ and the models' -last.pth files),
    while it runs or after it stopped: per model, finished / failed / in progress / pending,
    epochs so far, best and last validation score, evaluations since the best (early stopping
    ends the run at stopping_step), recent seconds per epoch and how long ago the last epoch ended.
    ``models``: the comparison's models (those not started yet show as pending).
    ``run_recbole.py --compare_status`` prints it."""
    import torch

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"--compare_status: no comparison at {out} (give the --compare_dir it ran with)")
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    now = time.time() if now is None else now
    rows, row_files, dataset = {}, {}, None
    for path in sorted((out / "rows").glob("*.json")):
        try:
            saved = json.loads(path.read_text())
            rows[path.stem], row_files[path.stem] = saved["row"], path
            dataset = dataset or saved["settings"]["dataset"]
        except (ValueError, KeyError, TypeError):
            continue
    lasts = {}
    for path in sorted(checkpoints.glob("*-last.pth")):
        model, rest = path.name.split("-", 1)  # <model>-<dataset>-last.pth; model names have no "-"
        if dataset is None or rest == f"{dataset}-last.pth":  # a checkpoint_dir may hold other data sets'
            lasts.setdefault(model, path)
    lines = [f"Comparison at {out}", "",
             "| model | state | epochs | best valid (epoch) | last valid | evals since best | s/epoch (last 5) | "
             "last epoch ended |", "|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys([*models, *rows, *lasts]):
        row, last = rows.get(model), lasts.get(model)
        if row and not (last and last.stat().st_mtime > row_files[model].stat().st_mtime):
            state = "finished" if str(row.get("status", "")).startswith("ok") else str(row.get("status"))
        else:  # no row yet, or a failed model being run again since its row was written
            state = "in progress" if last else "pending"
        state = state.replace("|", "\\|")
        epochs = best = latest = since = pace = age = "-"
        if last is not None:
            try:
                saved = torch.load(last, map_location="cpu", weights_only=False)  # our own file
            except Exception as exc:  # noqa: BLE001 - being rewritten, or foreign: say so, go on
                lines.append(f"| {model} | {state} | unreadable {last.name}: {type(exc).__name__} | | | | | |")
                continue
            history = saved.get("history") or {}
            scores, seconds = history.get("valid_scores") or [], history.get("train_seconds") or []
            epochs = str(saved.get("epoch", -1) + 1)
            if scores:
                target = saved.get("best_valid_score")  # the trainer's, whichever way its metric points
                top = next((i for i, (_, v) in enumerate(scores) if target is not None and abs(v - target) < 1e-12),
                           max(range(len(scores)), key=lambda i: scores[i][1]))
                best = f"{scores[top][1]:.4f} ({scores[top][0]})"
                latest = f"{scores[-1][1]:.4f}"
                since = str(saved.get("cur_step", len(scores) - 1 - top))
            if seconds:
                pace = f"{sum(seconds[-5:]) / len(seconds[-5:]):.0f}"
            age = _ago(now - last.stat().st_mtime)
        elif row:
            epochs = _fmt(row.get("epochs_run"))
            best = f"{_fmt(row.get('valid_ndcg@10'))} ({_fmt(row.get('best_epoch'))})"
        lines.append(f"| {model} | {state} | {epochs} | {best} | {latest} | {since} | {pace} | {age} |")
    return "\n".join(lines) + "\n"


def _ago(seconds) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"


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


def _save_per_user(out: Path, name, result, config):
    """out/per_user/<model>.npz: the per-user test values behind the row (for paired intervals)."""
    import numpy as np

    from .significance import consistent

    places = config["metric_decimal_place"] if "metric_decimal_place" in config else 4
    arrays = consistent(result.extra.get("per_user_test") or {}, result.test_result, places)
    folder = out / "per_user"
    if not arrays:
        (folder / f"{name}.npz").unlink(missing_ok=True)  # an earlier run's values are not this row's
        return
    folder.mkdir(parents=True, exist_ok=True)

    def write(p):
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)

    _atomic_write(folder / f"{name}.npz", write)


def _save_curve(out: Path, name, history, config):
    """out/curves/<model>.json: valid score per validated epoch and train seconds per epoch."""
    folder = out / "curves"
    if not history or not history.get("valid_scores"):
        (folder / f"{name}.json").unlink(missing_ok=True)  # an earlier run's curve is not this row's
        return
    curve = {"metric": str(config["valid_metric"]), "bigger": bool(config["valid_metric_bigger"]),
             "valid_scores": history["valid_scores"],
             "train_seconds": history.get("train_seconds", [])}
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(curve)))


def _curve_from_checkpoint(out: Path, name, model, dataset, config_files, run_dict, cmd_args):
    """The curve of a row kept from an older version, read back from the model's -last.pth
    (which keeps the per-epoch history across resumes); nothing when there is none."""
    import torch

    try:
        config = build_config(model, dataset, config_files, run_dict, cmd_args)
        path = last_checkpoint_path(config)
        if not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file (pipeline._save_last)
        history = state.get("history") or {}
        _save_curve(out, name, {"valid_scores": [[int(e), float(v)] for e, v in history.get("valid_scores", [])],
                                "train_seconds": [float(t) for t in history.get("train_seconds", [])]}, config)
    except Exception as exc:  # noqa: BLE001 - the curve is an extra; the row stands without it
        logger.warning("%s: no learning curve from its checkpoint (%s)", name, exc)


def load_curves(out_dir, rows) -> dict:
    """{model: curve} for the finished rows whose curves/<model>.json is there."""
    found = {}
    for row in rows:
        path = Path(out_dir) / "curves" / f"{row['model']}.json"
        if str(row.get("status", "")).startswith("ok") and path.is_file():
            found[row["model"]] = json.loads(path.read_text())
    return found


def load_per_user(out_dir, rows) -> dict:
    """{model: {metric: array}} for the finished rows that have per-user values saved."""
    import numpy as np

    found = {}
    for row in rows:
        path = Path(out_dir) / "per_user" / f"{row['model']}.npz"
        if str(row.get("status", "")).startswith("ok") and path.is_file():
            with np.load(path) as data:
                found[row["model"]] = {k: data[k] for k in data.files}
    return found


def paired_lines(per_user, model="Mamba4Rec") -> list[str]:
    """Per baseline and test metric: ``model`` - baseline over the same users, with its 95%
    interval (mamba4rec.significance)."""
    from .significance import describe

    if model not in per_user:
        return []
    lines = []
    for other, values in per_user.items():
        if other == model:
            continue
        for key in METRIC_KEYS:
            a, b = per_user[model].get(key), values.get(key)
            if a is not None and b is not None and a.shape == b.shape and len(a) > 1:
                lines.append(describe(key, model, other, a, b))
    return lines


def _fmt(value):
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and value <= 1.0 else str(value)


#: Mamba4Rec's test metrics as the paper reports them (Liu et al., 2024; the figures issue #4 quotes), per
#: data set name; the comparison's table says whether a run met them.
PAPER = {"ml-1m": {"hit@10": 0.3121, "ndcg@10": 0.1822, "mrr@10": 0.1425}}


def verdict(rows, model="Mamba4Rec", dataset=None) -> list[str]:
    """Lines saying, per test metric, whether ``model`` is >= every baseline that finished
    (the comparison's goal) and, for a data set in :data:`PAPER`, >= the paper's figure; and
    which runs may not have converged."""
    ok = {r["model"]: r for r in rows if str(r.get("status", "")).startswith("ok")}
    lines = []
    paper = PAPER.get(dataset) if model == "Mamba4Rec" else None
    if paper and model in ok:
        for key, target in paper.items():
            mine = ok[model].get(f"test_{key}")
            if mine is not None:
                met = "met" if mine >= target else "**NOT MET**"
                lines.append(f"- test_{key}: {model} >= the paper's {target:.4f}: {met} ({model} {mine:.4f})")
    if model not in ok or len(ok) < 2:
        return lines
    for key in METRIC_KEYS:
        col = f"test_{key}"
        mine = ok[model].get(col)
        ahead = [(n, r[col]) for n, r in ok.items() if n != model and None not in (mine, r.get(col)) and r[col] > mine]
        if ahead:
            lines.append(f"- {col}: {model} >= every baseline: **NOT MET** ({model} {mine:.4f}; "
                         + ", ".join(f"{n} {v:.4f}" for n, v in ahead) + ")")
        elif mine is not None:
            lines.append(f"- {col}: {model} >= every baseline: met ({model} {mine:.4f})")
    open_runs = [n for n, r in ok.items() if r.get("stopped_by") == "epoch limit"
                 and r.get("best_epoch") is not None and r.get("best_epoch") == (r.get("epochs_run") or 0) - 1]
    if open_runs:
        lines.append(f"- not converged: {', '.join(open_runs)} reached the epoch limit with the best validation "
                     f"score in the last epoch; more epochs may change the ranking")
    return lines


def markdown_table(rows, dataset, per_user=None) -> str:
    cols = ["model", "status"] + [f"{s}_{k}" for s in ("valid", "test") for k in METRIC_KEYS] + [
        "best_epoch", "epochs_run", "stopped_by", "params", "train_s_per_epoch", "threads", "eval_s",
        "peak_rss_mib", "peak_cuda_mib"]
    lines = [f"Data set: {dataset}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    goal = verdict(rows, dataset=dataset)
    if goal:
        title = "Goal (Mamba4Rec >= every baseline" + (" and the paper's figures" if dataset in PAPER else "")
        lines += ["", title + ", test split):"] + goal
    paired = paired_lines(per_user or {})
    if paired:
        lines += ["", "Paired over the same test users (is the difference more than the sample of users?):"] + paired
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(rows, dataset, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}
    per_user = load_per_user(out, rows)
    _atomic_write(paths["md"], lambda p: p.write_text(markdown_table(rows, dataset, per_user)))

    def write_csv(p):
        # every key of every row: rows kept from an earlier version (--resume) may lack newer ones
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(p, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(paths["csv"], write_csv)
    curves = load_curves(out, rows)
    if curves:
        paths["curves_csv"] = out / "curves.csv"

        def write_curves(p):
            with open(p, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["model", "epoch", "valid_metric", "valid_score", "train_s", "cum_train_s"])
                for model, curve in curves.items():
                    seconds = curve.get("train_seconds") or []
                    if len(seconds) < max(e for e, _ in curve["valid_scores"]) + 1:
                        seconds = []  # resumed from a file without history: not every epoch's time is known
                    for epoch, score in curve["valid_scores"]:
                        spent = seconds[epoch] if epoch < len(seconds) else None
                        total = sum(seconds[:epoch + 1]) if epoch < len(seconds) else None
                        writer.writerow([model, epoch, curve.get("metric"), score,
                                         None if spent is None else round(spent, 2),
                                         None if total is None else round(total, 1)])

        _atomic_write(paths["curves_csv"], write_curves)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency, but an environment may lack it: the table and CSV still count
        logger.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        for stale in (paths.pop("png"), out / "compare_curves.png"):
            if stale.exists():  # a chart of an earlier table would no longer match this one
                stale.unlink()
        return paths
    ok = [r for r in rows if r["status"].startswith("ok")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    width = 0.8 / max(len(ok), 1)
    for j, row in enumerate(ok):
        axes[0].bar([i + j * width for i in range(3)], [row[f"test_{k}"] for k in METRIC_KEYS], width,
                    label=row["model"])
    axes[0].set_xticks([i + width * (len(ok) - 1) / 2 for i in range(3)], [k.upper() for k in METRIC_KEYS])
    axes[0].set_title(f"test metrics, {dataset}")
    if ok:
        axes[0].legend()
    names = [r["model"] for r in ok]
    axes[1].bar(names, [r["train_s_per_epoch"] for r in ok])
    axes[1].set_title("train seconds / epoch")
    axes[2].bar(names, [r.get("eval_s") or 0 for r in ok])  # rows kept from older versions may lack it
    axes[2].set_title("test evaluation seconds")
    axes[3].bar(names, [r["peak_cuda_mib"] or r["peak_rss_mib"] for r in ok])
    axes[3].set_title("peak memory (MiB; CUDA if used, else RSS)")
    fig.tight_layout()
    _atomic_write(paths["png"], lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    if curves:
        paths["curves_png"] = out / "compare_curves.png"
        _plot_curves(plt, curves, dataset, paths["curves_png"])
    return paths


def _plot_curves(plt, curves, dataset, path):
    """Valid score per epoch, and against the training time spent to reach it."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    metric = next(iter(curves.values())).get("metric") or "valid score"
    for model, curve in curves.items():
        epochs = [e for e, _ in curve["valid_scores"]]
        scores = [v for _, v in curve["valid_scores"]]
        line, = axes[0].plot(epochs, scores, label=model)
        pick = max if curve.get("bigger", True) else min  # the first best, as RecBole's early stopping
        best = pick(range(len(scores)), key=scores.__getitem__)
        axes[0].plot([epochs[best]], [scores[best]], "o", color=line.get_color())
        seconds = curve.get("train_seconds") or []
        if len(seconds) >= max(epochs) + 1:
            cumulative, total = [], 0.0
            for t in seconds:
                total += t
                cumulative.append(total / 3600)
            axes[1].plot([cumulative[e] for e in epochs], scores, label=model, color=line.get_color())
    axes[0].set(title=f"validation {metric} per epoch, {dataset} (dot: best)", xlabel="epoch", ylabel=metric)
    axes[1].set(title="against training time (hours; threads and load as in the rows)", xlabel="hours of training",
                ylabel=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
