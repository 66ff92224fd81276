"""Export: a finished job's row in OUT -> results/<dataset>/<train_mode>/<model>.json (metrics,
epochs, how it stopped, speed, memory, machine, commit, data checksums, the settings that differ
from the configs), results/<dataset>/per_user.npz (per-user test values, for the paired
intervals), results/<dataset>/curves.csv and curves.png (valid NDCG@10 per epoch). Files already
in results/ are kept: OUT holds only what one machine trained, results/ everything ever finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

from . import plan
from .plan import METRICS, RESULTS, Job, finished

_NOT_OVERRIDES = ("--data_path=", "--show_progress=")


def result_record(job: Job, saved: dict, curve: dict | None) -> dict:
    r = saved["row"]
    settings = saved["settings"]
    seconds = (curve or {}).get("train_seconds") or []
    stretches = (curve or {}).get("machines") or []
    best_epoch = r.get("best_epoch")
    best_score = _matching_best(curve, r.get("valid_ndcg@10")) if curve and curve.get("valid_scores") else None
    if best_score is not None:
        from mamba4rec.pipeline import _best_epoch

        # rows written before the tie fix named the first of tied best epochs; the curve gives the
        # last, whose checkpoint RecBole tested
        best_epoch = _best_epoch(curve["valid_scores"], curve.get("bigger", True), best_score)
    return {
        "dataset": job.dataset, "train_mode": job.mode, "model": job.name,
        "valid_result": {k: r.get(f"valid_{k}") for k in METRICS},
        "test_result": {k: r.get(f"test_{k}") for k in METRICS},
        **({"test_result_input_masked": {k: r.get(f"test_input_masked_{k}") for k in METRICS},
            "input_masked_from": r.get("input_masked_from") or "run()'s second test pass"}
           if any(f"test_input_masked_{k}" in r for k in METRICS) else {}),
        "best_epoch": best_epoch, "epochs_run": r.get("epochs_run"), "stopped_by": r.get("stopped_by"),
        "train_s_per_epoch": r.get("train_s_per_epoch"), "eval_s": r.get("eval_s"),
        "train_s_to_stop": round(sum(seconds), 1) if seconds else None,
        "peak_rss_mib": r.get("peak_rss_mib"), "peak_cuda_mib": r.get("peak_cuda_mib"),
        "params": r.get("params"), "threads": r.get("threads"), "machine": r.get("machine"),
        # a run resumed on another machine: where each stretch of its epochs trained
        **({"machine_by_epoch": [{"from_epoch": int(s[0]), "machine": s[1] or "not recorded",
                                  **({"threads": s[2]} if len(s) > 2 else {})} for s in stretches]}
           if len(stretches) > 1 else {}),
        "git_commit": r.get("git_commit"), "data_sha256": saved.get("data"),
        "config_overrides": sorted(a for a in settings.get("cmd_args", []) if not a.startswith(_NOT_OVERRIDES))
        + [f"--{k}={v}" for k, v in sorted(settings.get("config_dict", {}).items())],
        "command": "python " + " ".join(job.command(Path("OUT"))),
    }


def _matching_best(curve, valid_ndcg):
    """The curve's best score when it is the row's valid NDCG@10 (to the row's 4 places), else None."""
    if valid_ndcg is None or str(curve.get("metric") or "ndcg@10").lower() != "ndcg@10":
        return None
    sign = 1.0 if curve.get("bigger", True) else -1.0
    best = max(v * sign for _, v in curve["valid_scores"]) * sign
    return best if abs(best - float(valid_ndcg)) <= 0.5e-4 + 1e-12 else None


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` whole or not at all, flushed to disk (mamba4rec.files)."""
    from mamba4rec.files import atomic_path

    with atomic_path(path, fsync=True) as tmp:
        Path(tmp).write_bytes(data)


def export(out: Path, jobs=None, results: Path = RESULTS, log=print) -> list[str]:
    """Write results/ files for every finished job of ``jobs`` in ``out``; keep what is there for others."""
    import numpy as np

    written = []
    jobs = plan.JOBS if jobs is None else jobs
    with results_lock(results):
        for dataset in dict.fromkeys(j.dataset for j in jobs):
            written += _export_dataset(out, dataset, [j for j in jobs if j.dataset == dataset], results, log)
    return written


@contextlib.contextmanager
def results_lock(results: Path):
    """One writer of results/ at a time (an export of a run beside a 'python -m experiments.results export')."""
    import fcntl

    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _export_dataset(out: Path, dataset: str, jobs, results: Path, log) -> list[str]:
    """The results/ files of ``dataset`` for its finished ``jobs``: each job's record, its per-user
    values and its curve replace whatever results/ held for it (a job trained again leaves nothing
    of its earlier run beside the new row); other jobs' entries stay."""
    import numpy as np

    done = [(j, s) for j in jobs if (s := finished(j, out))]
    if not done:
        return []
    written = []
    folder = results / dataset
    per_user_path = folder / "per_user.npz"
    per_user = {}
    if per_user_path.is_file():
        with np.load(per_user_path) as data:
            per_user = {k: data[k] for k in data.files}
    curves = _read_curves(folder / "curves.csv")
    for job, saved in done:
        cdir = job.compare_dir(out)
        curve_file = cdir / "curves" / f"{job.model}.json"
        curve = json.loads(curve_file.read_text()) if curve_file.is_file() else None
        record = result_record(job, saved, curve)
        path = folder / job.mode / f"{job.name}.json"
        _atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())
        written.append(str(path))
        prefix = f"{job.mode}/{job.name}/"
        per_user = {k: v for k, v in per_user.items() if not k.startswith(prefix)}
        npz = cdir / "per_user" / f"{job.model}.npz"
        if npz.is_file():  # compare removes a stale one when a run has no per-user values of its own
            with np.load(npz) as data:
                for metric in data.files:
                    per_user[prefix + metric] = data[metric].astype(np.float32)
        curves = [c for c in curves if (c["train_mode"], c["model"]) != (job.mode, job.name)]
        if curve:
            seconds = curve.get("train_seconds") or []
            hours = np.cumsum(seconds) / 3600
            aligned = len(seconds) == len(curve["valid_scores"])  # a resume from a file without history: not
            for epoch, score in curve["valid_scores"]:
                curves.append({"train_mode": job.mode, "model": job.name, "epoch": int(epoch),
                               "valid_ndcg@10": float(score),
                               "train_hours": round(float(hours[epoch]), 4) if aligned and epoch < len(hours) else ""})
    buf = io.BytesIO()
    np.savez_compressed(buf, **per_user)
    _atomic_write(per_user_path, buf.getvalue())
    _write_curves(folder, dataset, curves)
    log(f"{dataset}: exported {', '.join(f'{j.mode}/{j.name}' for j, _ in done)} to {folder}")
    return written


def masked_from_checkpoints(out: Path, jobs=None, results: Path = RESULTS, log=print) -> list[str]:
    """The masked test values (run()'s second test pass, input sequences ranked out) of finished
    jobs in ``out`` whose rows have none (exported before that pass existed), from their best
    checkpoints: checkpoint_analysis.evaluate_checkpoint scores the test users both ways, and the
    checkpoint counts only when it is the row's (best epoch, valid score) and its RecBole test
    values equal the row's. The values go into the job's row and per-user file in ``out``, then
    to results/ (export), so a later export keeps them. Returns the jobs given values."""
    import numpy as np

    from . import checkpoint_analysis as ca
    from .per_user_analysis import _sha256

    jobs = plan.JOBS if jobs is None else jobs
    done, cache = [], {}  # cache: the data split, shared by the checkpoints of one data set
    for job in jobs:
        saved = finished(job, out)
        if saved is None:
            log(f"{job.key}: not finished in {out}")
            continue
        row = saved["row"]
        if any(f"test_input_masked_{k}" in row for k in METRICS):
            log(f"{job.key}: has masked test values already")
            continue
        curve_file = job.compare_dir(out) / "curves" / f"{job.model}.json"
        record = result_record(job, saved, json.loads(curve_file.read_text()) if curve_file.is_file() else None)
        inter = out / "dataset" / job.dataset / f"{job.dataset}.inter"
        want = (saved.get("data") or {}).get(inter.name)
        if want and inter.is_file() and _sha256(inter) != want:
            log(f"{job.key}: {inter} is not the data the row was trained on (sha256 differs): no masked values")
            continue
        folder = job.compare_dir(out) / "checkpoints"
        found = None
        npz = job.compare_dir(out) / "per_user" / f"{job.model}.npz"
        arrays = {}
        if npz.is_file():
            with np.load(npz) as data:
                arrays = {k: data[k] for k in data.files if not k.startswith("input_masked_")}
        try:
            for path in sorted(folder.glob(f"{job.model}-*.pth")):
                if path.name.endswith("-last.pth"):
                    continue
                ev = ca.evaluate_checkpoint(path, data_path=out / "dataset", check_valid=False, name=job.name,
                                             _cache=cache)
                line = ca.compare_with_row(ev, record)  # SystemExit when it is the row's and its test values differ
                log(line)
                if "equal the row's" in line:
                    found = ev
                    break
            if found is not None:
                unmasked = found["scored"]["unmasked"][1]
                for k, v in arrays.items():  # the same users in the same order as the row's own values
                    if k in unmasked and (len(v) != len(unmasked[k]) or not np.allclose(v, unmasked[k], atol=1e-6)):
                        raise SystemExit(f"the checkpoint's per-user {k} differ from the row's (other test users, "
                                         f"another order, or scores that rank some user's target otherwise)")
        except SystemExit as exc:  # this job's checkpoint is not the row's: the others still go
            log(f"{job.key}: {exc}; no masked values")
            continue
        if found is None:
            log(f"{job.key}: no checkpoint in {folder} is the row's best one: no masked values")
            continue
        masked, per_user, _ = found["scored"]["masked"]
        saved["row"].update({f"test_input_masked_{k}": round(float(masked[k]), found["decimals"]) for k in METRICS})
        where = Path(found["path"])
        where = f"OUT/{where.relative_to(out)}" if where.is_relative_to(out) else str(where)
        saved["row"]["input_masked_from"] = f"{where} (epoch {found['epoch']}), re-evaluated by experiments.results masked"
        arrays.update({f"input_masked_{k}": np.asarray(per_user[k], dtype=np.float64) for k in METRICS if k in per_user})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        npz.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(npz, buf.getvalue())
        _atomic_write(job.row_path(out), json.dumps(saved, indent=1).encode())
        done.append(job.key)
    if done:
        export(out, [j for j in jobs if j.key in done], results=results, log=log)
    return done


def export_curves(out: Path, jobs=None, results: Path = RESULTS, log=print) -> list[str]:
    """The learning curve so far of every unfinished job of ``jobs`` in ``out`` (its -last.pth
    history: one valid NDCG@10 per validated epoch) into results/<dataset>/curves.csv, for the
    prefix-vs-sequence curves of runs that take longer than a machine lasts. A job whose row
    results/ holds keeps its finished curve; a later export of the finished job replaces this one."""
    import numpy as np
    import torch

    jobs = plan.JOBS if jobs is None else jobs
    written = []
    with results_lock(results):
        for dataset in dict.fromkeys(j.dataset for j in jobs):
            folder = results / dataset
            curves = _read_curves(folder / "curves.csv")
            changed = []
            for job in (j for j in jobs if j.dataset == dataset):
                last = job.compare_dir(out) / "checkpoints" / f"{job.model}-{job.dataset}-last.pth"
                if finished(job, out) or (folder / job.mode / f"{job.name}.json").is_file() or not last.is_file():
                    continue
                history = torch.load(last, map_location="cpu", weights_only=False).get("history") or {}  # our own file
                scores, seconds = history.get("valid_scores") or [], history.get("train_seconds") or []
                if not scores:
                    continue
                hours = np.cumsum(seconds) / 3600
                aligned = len(seconds) == len(scores)
                curves = [c for c in curves if (c["train_mode"], c["model"]) != (job.mode, job.name)]
                curves += [{"train_mode": job.mode, "model": job.name, "epoch": int(e), "valid_ndcg@10": float(v),
                            "train_hours": round(float(hours[int(e)]), 4) if aligned and int(e) < len(hours) else ""}
                           for e, v in scores]
                changed.append(f"{job.mode}/{job.name} ({len(scores)} epochs)")
            if changed:
                _write_curves(folder, dataset, curves)
                written.append(str(folder / "curves.csv"))
                log(f"{dataset}: curves so far of {', '.join(changed)} to {folder / 'curves.csv'}")
    return written


def _read_curves(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{**r, "epoch": int(r["epoch"]), "valid_ndcg@10": float(r["valid_ndcg@10"])} for r in csv.DictReader(fh)]


def _write_curves(folder: Path, dataset: str, curves: list[dict]) -> None:
    curves = sorted(curves, key=lambda c: (c["train_mode"], c["model"], c["epoch"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["train_mode", "model", "epoch", "valid_ndcg@10", "train_hours"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(curves)
    _atomic_write(folder / "curves.csv", buf.getvalue().encode())
    draw_curves(folder, dataset, curves)


def draw_curves(folder: Path, dataset: str, curves: list[dict]) -> bool:
    """``folder``/curves.png: valid NDCG@10 per epoch of each (train mode, model) in ``curves``.
    False (and no chart) without matplotlib."""
    curves = sorted(curves, key=lambda c: (c["train_mode"], c["model"], c["epoch"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (mode, model) in dict.fromkeys((c["train_mode"], c["model"]) for c in curves):
        pts = [(c["epoch"], c["valid_ndcg@10"]) for c in curves if (c["train_mode"], c["model"]) == (mode, model)]
        ax.plot(*zip(*pts), linestyle="-" if mode == "sequence" else "--", label=f"{model} ({mode})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10")
    ax.set_title(f"{dataset}: validation NDCG@10 per epoch (solid: sequence mode, dashed: prefix)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(folder / "curves.png", buf.getvalue())
    return True


def redraw_curves(results: Path = RESULTS, log=print) -> list[str]:
    """Every results/<dataset>/curves.png drawn again from its curves.csv alone."""
    drawn = []
    for path in sorted(results.glob("*/curves.csv")):
        if not draw_curves(path.parent, path.parent.name, _read_curves(path)):
            raise SystemExit('matplotlib is not installed: the charts need it (pip install "mamba4rec-recbole[plot]")')
        drawn.append(str(path.with_suffix(".png")))
        log(f"drew {path.with_suffix('.png')}")
    return drawn
