"""A comparison's storage: one row per model (``out_dir/rows/<model>.json``) with the settings it
was made with and the sha256 of the data files it trained on, beside it the per-user test values
(``per_user/``) and the learning curve (``curves/``); the checks that refuse rows, or a stopped
model's ``-last.pth``, from other settings or other data; the atomic writes they all go through.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..files import atomic_path
from ..pipeline import last_checkpoint_path, machine  # noqa: F401 - machine: compare's export
from ..registry import RECORD_KEYS, build_config

METRIC_KEYS = ("hit@10", "ndcg@10", "mrr@10")
logger = logging.getLogger(__name__)


def _row(model, result=None, error=None, peak=None, seconds=None, status=None, epoch_limit=None, threads=None,
         commit=None):
    row = {"model": model, "status": status or ("ok" if error is None else f"failed: {error}")}
    for split in ("valid", "test"):
        values = {} if result is None else (result.best_valid_result if split == "valid" else result.test_result)
        for key in METRIC_KEYS:
            row[f"{split}_{key}"] = values.get(key)
    masked = {} if result is None else (result.extra.get("test_result_input_masked") or {})
    for key in METRIC_KEYS if masked else ():  # run()'s second test pass: input sequences ranked out
        row[f"test_input_masked_{key}"] = masked.get(key)
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


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or None outside git."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
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
    """What a row was made with: a resume under other settings would mix two protocols. The keys of
    what a run records (RECORD_KEYS: the masked test pass, the machine per epoch) are left out:
    they change no training, so a comparison may turn them on or off between its models."""
    record = tuple(f"--{k}=" for k in RECORD_KEYS)
    config_dict = {k: v for k, v in (config_dict or {}).items() if k not in RECORD_KEYS}
    return {"dataset": dataset, "config_files": [os.path.abspath(f) for f in config_files or []],
            "config_dict": json.loads(json.dumps(config_dict, sort_keys=True, default=str)),
            "cmd_args": sorted(a for a in cmd_args or [] if not a.startswith(record))}


def _data_files(config) -> dict | None:
    """{file name: sha256} of the data set's atomic files (``<data_path>/<dataset>.inter`` etc.), or None
    when they are not there yet (a RecBole download name before its download). Settings alone
    do not pin the data: the same name may have been prepared again, with another k-core."""
    import glob

    folder, name = config["data_path"], config["dataset"]
    # the atomic files RecBole reads, not side files (prepare.py's stats.json names its input path)
    files = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*"))
                   if p.rsplit(".", 1)[-1] in ("inter", "user", "item", "kg", "link", "net"))
    if not files:
        return None
    from ..files import file_sha256

    return {os.path.basename(path): file_sha256(path) for path in files}


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


def _atomic_write(path: Path, write):
    """``write(tmp)`` a temporary Path beside ``path``, renamed onto it once complete."""
    with atomic_path(path) as tmp:
        write(Path(tmp))


def _save_per_user(out: Path, name, result, config):
    """out/per_user/<model>.npz: the per-user test values behind the row (for paired intervals),
    those of the test pass with the input sequences masked as ``input_masked_<metric>``."""
    import numpy as np

    from ..significance import consistent

    places = config["metric_decimal_place"] if "metric_decimal_place" in config else 4
    arrays = consistent(result.extra.get("per_user_test") or {}, result.test_result, places)
    masked = consistent(result.extra.get("per_user_test_input_masked") or {},
                        result.extra.get("test_result_input_masked") or {}, places)
    arrays.update({f"input_masked_{k}": v for k, v in masked.items()})
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
             "train_seconds": history.get("train_seconds", []),
             "machines": history.get("machines", [])}
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
                                "train_seconds": [float(t) for t in history.get("train_seconds", [])],
                                "machines": history.get("machines", [])}, config)
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
