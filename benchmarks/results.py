#!/usr/bin/env python
"""The converged comparison on the paper's data sets, trained to early stopping and kept in git.

    python benchmarks/results.py run OUT [--lanes 2] [--threads 1] [--only DATASET/MODE/MODEL ...]
    python benchmarks/results.py status OUT
    python benchmarks/results.py export OUT      # OUT's finished rows -> results/
    python benchmarks/results.py curves OUT      # OUT's unfinished runs' curves so far -> results/
    python benchmarks/results.py tables          # results/ -> docs/RESULTS.md's tables

``run`` works through :data:`JOBS` in order, ``--lanes`` at a time (default 2: one-thread
processes on a 2-core machine; ``--threads`` gives each process more, e.g. ``--lanes 1 --threads 2``
for one job on the whole machine), each job one ``run_recbole.py --compare ... --compare_run=MODEL
--resume`` process: a stopped job continues exactly from its last epoch when ``run`` is started
again. It prepares the data sets from ../shared/datasets into OUT/dataset first. Each finished
job is exported at once: ``results/<dataset>/<train_mode>/<model>.json`` (metrics, epochs, how it
stopped, speed, memory, machine, commit, data checksums, the settings that differ from the
configs), ``results/<dataset>/per_user.npz`` (per-user test values, for the paired intervals),
``results/<dataset>/curves.csv`` and ``curves.png`` (valid NDCG@10 per epoch). Files already in
results/ are kept: OUT holds only what this machine trained, results/ everything ever finished.

OUT layout: OUT/<folder>/out (prefix mode: the three models share one comparison),
OUT/<folder>/sequence (sequence mode), OUT/<folder>/sequence-2layers (Mamba4Rec, num_layers=2),
each with rows/, per_user/, curves/, checkpoints/ and one log per job.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
RESULTS_DOC = REPO / "docs" / "RESULTS.md"
BEGIN, END = "<!-- results:begin (benchmarks/results.py tables) -->", "<!-- results:end -->"
METRICS = ("hit@10", "ndcg@10", "mrr@10")

#: data set -> (OUT folder, file under ../shared/datasets, prepare.py k-core flags)
DATASETS = {
    "amazon-beauty": ("beauty", "amazon-beauty/Beauty.txt", []),
    "amazon-video-games": ("video-games", "amazon-video-games/Video_Games.txt", []),
    "ml-1m": ("ml-1m", "ml-1m/ml-1m.txt", ["--kcore-item", "5"]),
}
#: published figures shown beside ours: Mamba4Rec's paper (Liu et al. 2024, ML-1M) and RecBole SASRec
#: as RecBLR (Liu et al. 2024, Table 1) reports it
REFERENCES = {
    "ml-1m": [("Mamba4Rec, paper", {"hit@10": 0.3121, "ndcg@10": 0.1822, "mrr@10": 0.1425}),
              ("SASRec, RecBLR Table 1", {"hit@10": 0.2993, "ndcg@10": 0.1692, "mrr@10": 0.1294})],
    "amazon-beauty": [("SASRec, RecBLR Table 1", {"hit@10": 0.0829, "ndcg@10": 0.0409, "mrr@10": 0.0281})],
}
TIM4REC_ML1M_HIT = 0.3253  # the best published Mamba4Rec HR@10 on ML-1M (TiM4Rec, 2 layers)


@dataclass(frozen=True)
class Job:
    dataset: str
    mode: str   # prefix | sequence
    name: str   # Mamba4Rec, Mamba4Rec-2layers, SASRec, GRU4Rec: the results file's name

    @property
    def model(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def variant(self) -> str | None:
        """"2layers" (Mamba4Rec, num_layers=2), "seed2021" (the run-to-run noise), "residual" (one
        layer, block_residual=True), or None."""
        return self.name.split("-", 1)[1] if "-" in self.name else None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.mode}/{self.name}"

    def compare_dir(self, out: Path) -> Path:
        folder = DATASETS[self.dataset][0]
        if self.variant:
            return out / folder / f"{self.mode}-{self.variant}"
        return out / folder / ("out" if self.mode == "prefix" else "sequence")

    def command(self, out: Path) -> list[str]:
        cmd = ["run_recbole.py", "-d", self.dataset, f"--compare_dir={self.compare_dir(out)}",
               f"--data_path={out}/dataset/", "--show_progress=False", "--resume"]
        if self.variant:  # a comparison of its own: num_layers is GRU4Rec's key too
            cmd += ["--compare=SASRec", *VARIANTS[self.variant], f"--compare_run={self.model}"]
        else:
            cmd += ["--compare=GRU4Rec,SASRec", f"--compare_run={self.model}"]
        if self.mode == "sequence":
            cmd.append("--train_mode=sequence")
        return cmd

    def row_path(self, out: Path) -> Path:
        return self.compare_dir(out) / "rows" / f"{self.model}.json"


#: the settings of a variant job on top of the configs
VARIANTS = {"2layers": ["--num_layers=2"],
            # the same training under another seed, for 25 epochs: the run-to-run noise of a curve
            "seed2021": ["--seed=2021", "--epochs=25", "--stopping_step=100"],
            # one layer with the residual around its block that two layers get: is it the residual,
            # not the depth, that closes the HR@10 gap to SASRec on the Amazon sets?
            "residual": ["--block_residual=True"]}
_SEQ = ("Mamba4Rec", "SASRec", "GRU4Rec", "Mamba4Rec-2layers")
_PRE = ("Mamba4Rec", "SASRec", "GRU4Rec")
#: in order: Beauty (both modes: prefix SASRec, the longest run, starts as soon as a lane is
#: free; the short seed-2021 run of Mamba4Rec and the prefix Mamba4Rec run give the learning
#: curves early), then Video Games in sequence mode, ML-1M, and Video Games in prefix mode
JOBS = ([Job("amazon-beauty", "sequence", n) for n in ("Mamba4Rec", "SASRec")]
        + [Job("amazon-beauty", "prefix", "SASRec")]
        + [Job("amazon-beauty", "sequence", n) for n in ("GRU4Rec", "Mamba4Rec-seed2021")]
        + [Job("amazon-beauty", "prefix", "Mamba4Rec")]
        + [Job("amazon-beauty", "sequence", n) for n in ("Mamba4Rec-2layers", "SASRec-seed2021")]
        + [Job("amazon-beauty", "prefix", "GRU4Rec")]
        + [Job("amazon-video-games", "sequence", n) for n in _SEQ]
        + [Job("ml-1m", "sequence", n) for n in _SEQ]
        + [Job(d, "sequence", "Mamba4Rec-residual") for d in ("amazon-video-games", "amazon-beauty")]
        + [Job("amazon-video-games", "prefix", n) for n in _PRE])


def finished(job: Job, out: Path) -> dict | None:
    """The job's saved compare row (with its settings and data) when it finished, else None."""
    path = job.row_path(out)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if str(saved["row"].get("status", "")).startswith("ok") else None


# ---- run -----------------------------------------------------------------------------------

def prepare(out: Path, shared: Path, python: str, datasets) -> None:
    for name in datasets:
        folder, src, flags = DATASETS[name]
        if (out / "dataset" / name / f"{name}.inter").is_file():
            continue
        if not (shared / src).is_file():
            raise SystemExit(f"{name}: no {shared / src}; give --shared, the folder holding SOURCES.md's files")
        subprocess.run([python, "datasets/prepare.py", "--format", "seq-text", "--input", str(shared / src),
                        "--dataset", name, "--output-dir", str(out / "dataset"), *flags], cwd=REPO, check=True)


def in_results(job: Job, results: Path = RESULTS) -> bool:
    """Whether results/ holds the job's finished row (trained here or on an earlier machine)."""
    return (results / job.dataset / job.mode / f"{job.name}.json").is_file()


def run_queue(out: Path, jobs, lanes: int, python: str, log=print, results: Path = RESULTS,
              rerun: bool = False, seconds: float | None = None, grace: float = 30.0,
              threads: int = 1) -> int:
    """Train ``jobs`` ``lanes`` at a time; export each job as it finishes. Returns the number of
    jobs that failed, or -signal when SIGTERM / SIGINT stopped it (the running trainings are
    stopped too, and resume on the next run). Jobs finished earlier are exported again first,
    so a row whose export a stop or an error cut short still reaches results/. A job whose row
    results/ already holds, but that OUT does not (an OUT lost with its machine), is not
    trained again unless ``rerun``. ``seconds``: after that long the queue stops as a SIGTERM
    would stop it (no job fails by it; they resume on the next run), and returns the number of
    failures. A training still running ``grace`` seconds after a stop is killed. ``threads``: the
    torch / OpenMP / numba threads of each training process."""
    done_before = [j for j in jobs if finished(j, out) is not None]
    kept = [j for j in jobs if j not in done_before and not rerun and in_results(j, results)]
    pending = [j for j in jobs if j not in done_before and j not in kept]
    for j in done_before:
        log(f"{j.key}: finished earlier")
    for j in kept:
        log(f"{j.key}: in results/ already, not trained again (--rerun trains it again)")
    if done_before:
        export(out, done_before, log=log)
    lock = threading.Lock()
    procs: dict[Job, subprocess.Popen] = {}
    failures = []
    stopped = []

    def stop(signum, frame):  # signum: a signal's number, or "time" (the seconds are up)
        stopped.append(signum)
        with lock:
            for p in procs.values():
                p.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def one(n, job):
        logfile = job.compare_dir(out).parent / f"{job.mode}-{job.name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        log(f"lane {n}: {job.key} ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, log {logfile})")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   NUMBA_NUM_THREADS=str(threads))
        with open(logfile, "a") as fh:
            with lock:
                if stopped:
                    return
                procs[job] = subprocess.Popen([python, *job.command(out)], cwd=REPO, env=env,
                                              stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = procs[job].wait()
            finally:
                with lock:
                    procs.pop(job, None)
        if rc == 0 and finished(job, out) is not None:
            log(f"lane {n}: {job.key} finished")
            with lock:
                export(out, [job], log=log)
        elif not stopped:
            failures.append(job)
            log(f"lane {n}: {job.key} ended with status {rc} without a finished row (see {logfile})")

    def lane(n):
        while not stopped:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            try:
                one(n, job)
            except Exception as exc:  # noqa: BLE001 - one job's error must not end the lane
                failures.append(job)
                log(f"lane {n}: {job.key} failed: {type(exc).__name__}: {exc}")

    start = time.monotonic()
    kill_at = None
    try:
        workers = [threading.Thread(target=lane, args=(n + 1,)) for n in range(lanes)]
        for t in workers:
            t.start()
        while any(t.is_alive() for t in workers):
            next(t for t in workers if t.is_alive()).join(0.5)  # wakes for a signal, the time limit
            now = time.monotonic()
            if seconds is not None and not stopped and now - start >= seconds:
                log(f"{seconds:.0f} s are up: stopping the trainings still running (they resume on the next run)")
                stop("time", None)
            if stopped and kill_at is None:
                kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                with lock:
                    for job, p in procs.items():
                        if p.poll() is None:
                            log(f"{job.key}: still running {grace:g} s after the stop: killed")
                            p.kill()
                kill_at = float("inf")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    by_signal = [s for s in stopped if s != "time"]
    return -by_signal[0] if by_signal else len(failures)


def status(out: Path, results: Path = RESULTS) -> str:
    import torch

    lines = []
    for job in JOBS:
        saved = finished(job, out)
        if saved:
            r = saved["row"]
            lines.append(f"{job.key}: finished, {r['epochs_run']} epochs (best {r['best_epoch']}), "
                         f"test ndcg@10 {r['test_ndcg@10']}")
            continue
        last = job.compare_dir(out) / "checkpoints" / f"{job.model}-{job.dataset}-last.pth"
        if last.is_file():
            state = torch.load(last, map_location="cpu", weights_only=False)  # our own file
            secs = state.get("history", {}).get("train_seconds", [])
            pairs = state.get("history", {}).get("valid_scores", [])
            best = max(pairs, key=lambda es: (es[1], es[0])) if pairs else ("-", float("nan"))  # last of ties
            lines.append(f"{job.key}: in progress, {state['epoch'] + 1} epochs, best valid {best[1]:.4f} at epoch "
                         f"{best[0]}, {sum(secs) / max(len(secs), 1):.0f} s/epoch")
        elif in_results(job, results):
            lines.append(f"{job.key}: in results/ (finished earlier; run skips it unless --rerun)")
        else:
            lines.append(f"{job.key}: not started")
    return "\n".join(lines)


# ---- export --------------------------------------------------------------------------------

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(out: Path, jobs=None, results: Path = RESULTS, log=print) -> list[str]:
    """Write results/ files for every finished job of ``jobs`` in ``out``; keep what is there for others."""
    import numpy as np

    written = []
    jobs = JOBS if jobs is None else jobs
    with results_lock(results):
        for dataset in dict.fromkeys(j.dataset for j in jobs):
            written += _export_dataset(out, dataset, [j for j in jobs if j.dataset == dataset], results, log)
    return written


@contextlib.contextmanager
def results_lock(results: Path):
    """One writer of results/ at a time (an export of a run beside a 'results.py export')."""
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
    checkpoints: per_user_analysis.evaluate_checkpoint scores the test users both ways, and the
    checkpoint counts only when it is the row's (best epoch, valid score) and its RecBole test
    values equal the row's. The values go into the job's row and per-user file in ``out``, then
    to results/ (export), so a later export keeps them. Returns the jobs given values."""
    import numpy as np

    pua = _per_user_analysis()
    jobs = JOBS if jobs is None else jobs
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
        if want and inter.is_file() and pua._sha256(inter) != want:
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
                ev = pua.evaluate_checkpoint(path, data_path=out / "dataset", check_valid=False, name=job.name,
                                             _cache=cache)
                line = pua.compare_with_row(ev, record)  # SystemExit when it is the row's and its test values differ
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
        saved["row"]["input_masked_from"] = f"{where} (epoch {found['epoch']}), re-evaluated by results.py masked"
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


def _per_user_analysis():
    import importlib.util

    name = "per_user_analysis_for_results"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "per_user_analysis.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def export_curves(out: Path, jobs=None, results: Path = RESULTS, log=print) -> list[str]:
    """The learning curve so far of every unfinished job of ``jobs`` in ``out`` (its -last.pth
    history: one valid NDCG@10 per validated epoch) into results/<dataset>/curves.csv, for the
    prefix-vs-sequence curves of runs that take longer than a machine lasts. A job whose row
    results/ holds keeps its finished curve; a later export of the finished job replaces this one."""
    import numpy as np
    import torch

    jobs = JOBS if jobs is None else jobs
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
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


# ---- tables --------------------------------------------------------------------------------

def load_results(results: Path = RESULTS) -> dict:
    """{dataset: {mode: {model: record}}} from results/."""
    found = {}
    for path in sorted(results.glob("*/*/*.json")):
        record = json.loads(path.read_text())
        found.setdefault(record["dataset"], {}).setdefault(record["train_mode"], {})[record["model"]] = record
    return found


def _load_per_user(results: Path, dataset: str) -> dict:
    import numpy as np

    path = results / dataset / "per_user.npz"
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {k: data[k].astype(np.float64) for k in data.files}


def _hours(seconds):
    return None if seconds is None else seconds / 3600


def _f(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def tables(results: Path = RESULTS) -> str:
    """The markdown tables of every data set and train mode in results/, with the goal checks."""
    from mamba4rec.significance import paired_difference

    found = load_results(results)
    out = []
    for dataset in [d for d in DATASETS if d in found] + [d for d in found if d not in DATASETS]:
        per_user = _load_per_user(results, dataset)
        for mode in ("sequence", "prefix"):
            recs = found[dataset].get(mode)
            if not recs:
                continue
            expected = [j.name for j in JOBS if j.dataset == dataset and j.mode == mode and not _noise(j.name)]
            noise = {n: r for n, r in recs.items() if _noise(n)}
            recs = {n: r for n, r in recs.items() if not _noise(n)}
            out += [f"### {dataset}, train_mode={mode}", ""]
            out.append("| model | test HR@10 | test NDCG@10 | test MRR@10 | valid NDCG@10 | best epoch / run | "
                       "stopped by | s/epoch | x SASRec | peak MiB | x SASRec | train h to stop | threads |")
            out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            base = recs.get("SASRec")
            for name in [n for n in expected if n in recs] + [n for n in recs if n not in expected]:
                r = recs[name]
                t, v = r["test_result"], r["valid_result"]
                spe = r.get("train_s_per_epoch")
                mem = r.get("peak_rss_mib")
                t_ratio = (_setting_gap(r, base) or _f(spe / base["train_s_per_epoch"], 2)) \
                    if base and spe and base.get("train_s_per_epoch") else "-"
                m_ratio = _f(mem / base["peak_rss_mib"], 2) if base and mem and base.get("peak_rss_mib") else "-"
                out.append(f"| {name} | {_f(t['hit@10'])} | {_f(t['ndcg@10'])} | {_f(t['mrr@10'])} | "
                           f"{_f(v['ndcg@10'])} | {r['best_epoch']} / {r['epochs_run']} | {r['stopped_by'] or '-'} | "
                           f"{_f(spe, 1)} | {t_ratio} | {mem if mem is not None else '-'} | {m_ratio} | "
                           f"{_f(_hours(r.get('train_s_to_stop')), 2)} | {r.get('threads') or '-'} |")
            for label, figures in REFERENCES.get(dataset, []) if mode == "sequence" else []:
                out.append(f"| *{label}* | {figures['hit@10']:.4f} | {figures['ndcg@10']:.4f} | "
                           f"{figures['mrr@10']:.4f} | | | | | | | | | |")
            missing = [n for n in expected if n not in recs]
            if missing:
                out += ["", f"Not finished yet: {', '.join(missing)}."]
            goal = _goal_lines(dataset, mode, recs, per_user, paired_difference)
            out += [""] + (goal + [""] if goal else [])
            out += _masked_lines(recs, mode, per_user, paired_difference)
            out += _noise_lines(recs, noise)
            machines = sorted({r.get("machine") or "?" for r in recs.values()}
                              | {s["machine"] for r in recs.values() for s in r.get("machine_by_epoch", [])
                                 if s["machine"] != "not recorded"})
            out += [f"Machine: {'; '.join(machines)}. Rows: `results/{dataset}/{mode}/*.json` "
                    f"(each with its command and commit); curves: `results/{dataset}/curves.csv`, "
                    f"`results/{dataset}/curves.png`."]
            out += [f"{name} trained in stretches (resumed): {_stretches(r)}." for name, r in recs.items()
                    if r.get("machine_by_epoch")]
            out += [""]
        out += mode_lines(dataset, found[dataset], per_user, paired_difference)
        out += curve_lines(results, dataset)
    return "\n".join(out).rstrip() + "\n"


def _setting_gap(a: dict, b: dict) -> str | None:
    """None when two rows trained every epoch on one machine with the same threads (a ratio of their
    seconds then compares the models), else what differs: "other machine" or "other threads"."""
    def setting(r):
        stretches = r.get("machine_by_epoch") or []
        machines = {s["machine"] for s in stretches} | {r.get("machine")}
        threads = {s.get("threads") for s in stretches if s.get("threads")} | {r.get("threads") or 1}
        return machines, threads

    (ma, ta), (mb, tb) = setting(a), setting(b)
    if len(ma) > 1 or ma != mb or None in ma or "not recorded" in ma:
        return "other machine"
    return "other threads" if len(ta) > 1 or ta != tb else None


def mode_lines(dataset, by_mode, per_user, paired_difference, models=("Mamba4Rec", "SASRec", "GRU4Rec")) -> list[str]:
    """Prefix vs sequence mode at their stopping points, per model with both rows: the test values,
    prefix minus sequence paired over the same test users, and for scale the same model's two
    sequence-mode seeds paired the same way."""
    rows, lines, seeded = [], [], False
    for m in models:
        pre, seq = by_mode.get("prefix", {}).get(m), by_mode.get("sequence", {}).get(m)
        if not pre or not seq:
            continue
        for mode, r in (("prefix", pre), ("sequence", seq)):
            t = r["test_result"]
            rows.append(f"| {m} | {mode} | {_f(t['hit@10'])} | {_f(t['ndcg@10'])} | {_f(t['mrr@10'])} | "
                        f"{_f(r['valid_result']['ndcg@10'])} | {r['best_epoch']} / {r['epochs_run']} | "
                        f"{_f(_hours(r.get('train_s_to_stop')), 2)} |")
        same_data = pre.get("data_sha256") == seq.get("data_sha256")
        pairs = [("prefix - sequence", f"prefix/{m}/", f"sequence/{m}/", same_data)]
        other = by_mode.get("sequence", {}).get(f"{m}-seed2021")
        if other and (seq.get("best_epoch") or 0) < (other.get("epochs_run") or 0):  # a seed run that got as far
            seeded = True
            pairs.append(("sequence, seed 2021 - seed 2020", f"sequence/{m}-seed2021/", f"sequence/{m}/",
                          other.get("data_sha256") == seq.get("data_sha256")))
        for label, a_key, b_key, paired in pairs:
            parts = []
            for metric in METRICS:
                a, b = per_user.get(a_key + metric), per_user.get(b_key + metric)
                if not paired or a is None or b is None or a.shape != b.shape:
                    parts.append(f"{metric}: not paired")
                    continue
                d, lo, hi = paired_difference(a, b)
                parts.append(f"{metric} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("" if lo <= 0 <= hi else " (beyond the users' noise)"))
            lines.append(f"- {m}, {label}: " + "; ".join(parts))
    if not rows:
        return []
    return ([f"### {dataset}: prefix vs sequence mode at the stopping point", "",
             "| model | train mode | test HR@10 | test NDCG@10 | test MRR@10 | valid NDCG@10 | best epoch / run | "
             "train h to stop |", "|---|---|---|---|---|---|---|---|"] + rows
            + ["", "Paired over the same test users (difference, 95% interval); "
                   + ("the two seeds of one mode give the run-to-run spread the modes' difference compares with:"
                      if seeded else
                      "no second seed ran on this data set, so the run-to-run spread is not measured here:"),
               ""] + lines + [""])


def _masked_lines(recs: dict, mode: str, per_user: dict, paired_difference) -> list[str]:
    """The test values with each user's input sequence masked (not RecBole's protocol: run()'s
    second test pass) beside RecBole's, and the paired differences of the better Mamba4Rec on them."""
    have = {n: r for n, r in recs.items() if r.get("test_result_input_masked")}
    if not have:
        return []
    lines = ["Test with each user's input sequence masked (its items ranked out; RecBole's protocol ranks "
             "them), and the change from RecBole's values:", "",
             "| model | HR@10 | NDCG@10 | MRR@10 | HR@10 change | NDCG@10 change | MRR@10 change |",
             "|---|---|---|---|---|---|---|"]
    for name, r in have.items():
        m, t = r["test_result_input_masked"], r["test_result"]
        lines.append(f"| {name} | " + " | ".join(_f(m[k]) for k in METRICS) + " | "
                     + " | ".join("-" if m[k] is None or t[k] is None else f"{m[k] - t[k]:+.4f}" for k in METRICS)
                     + " |")
    missing = [n for n in recs if n not in have]
    if missing:
        lines += ["", f"No masked test values: {', '.join(missing)} (exported without them; `results.py masked OUT` adds them from a row's best checkpoint)."]
    candidates, best = _variants(recs)
    if candidates:
        baselines = [n for n in ("SASRec", "GRU4Rec") if n in have]
        for name in sorted((n for n in candidates if n in have and baselines), key=lambda n: n != best):
            label = "chosen by valid NDCG@10, as above" if name == best else "not chosen"
            lines += ["", f"{name} ({label}) minus each baseline, masked test values, paired:", ""]
            lines += _paired_lines(name, mode, have, per_user, paired_difference, goal=False,
                                   values="input_masked_")
    lines += _ablation_lines(have, mode, per_user, paired_difference, values="input_masked_")
    return lines + [""]


def _noise(name: str) -> bool:
    return "-seed" in name


def _noise_lines(recs: dict, noise: dict) -> list[str]:
    """The same training under another seed beside its row: the run-to-run noise of the metrics."""
    lines = []
    for name, r in sorted(noise.items()):
        base = recs.get(name.split("-seed", 1)[0])
        t = r["test_result"]
        line = (f"- {name} (run-to-run noise: {r['epochs_run']} epochs, best {r['best_epoch']}): test HR@10 "
                f"{_f(t['hit@10'])}, NDCG@10 {_f(t['ndcg@10'])}, MRR@10 {_f(t['mrr@10'])}")
        if base and (base.get("best_epoch") or 0) >= (r.get("epochs_run") or 0):
            line += (f"; not a noise figure for the converged row: it stopped at its epoch limit before the "
                     f"seed-2020 run's best epoch ({base['best_epoch']}); its curve gives the noise at equal epochs")
        elif base:
            b = base["test_result"]
            line += (f"; minus the seed-2020 row: {t['hit@10'] - b['hit@10']:+.4f}, {t['ndcg@10'] - b['ndcg@10']:+.4f}, "
                     f"{t['mrr@10'] - b['mrr@10']:+.4f}")
        lines.append(line)
    return lines + [""] if lines else []


def curve_lines(results: Path, dataset: str, models=("Mamba4Rec", "SASRec"), upto=25) -> list[str]:
    """Prefix vs sequence mode at equal epochs (same seed), beside the run-to-run noise of one
    mode (sequence mode, seeds 2020 and 2021): mean and largest absolute gap in valid NDCG@10."""
    curves = _read_curves(results / dataset / "curves.csv")
    if not curves:
        return []
    by = {}
    for c in curves:
        by.setdefault((c["train_mode"], c["model"]), {})[c["epoch"]] = c["valid_ndcg@10"]
    lines, columns = [], []
    for m in models:
        pre, seq, other = by.get(("prefix", m)), by.get(("sequence", m)), by.get(("sequence", f"{m}-seed2021"))
        if not pre or not seq:
            continue
        def gap(a, b):
            epochs = [e for e in sorted(set(a) & set(b)) if e < upto]
            d = [abs(a[e] - b[e]) for e in epochs]
            return (f"mean {sum(d) / len(d):.4f}, largest {max(d):.4f} over epochs 0-{epochs[-1]}" if d else "-")
        seeded = bool(other) or any(j.dataset == dataset and j.name == f"{m}-seed2021" for j in JOBS)
        noise = gap(seq, other) if other else "not measured yet" if seeded else "not run on this data set"
        unfinished = [f"{mode} {name}, its first {len(curve)} epochs" for mode, name, curve in
                      (("prefix", m, pre), ("sequence", m, seq), ("sequence", f"{m}-seed2021", other))
                      if curve and not (results / dataset / mode / f"{name}.json").is_file()]
        partial = f" (runs not yet at their stopping point: {'; '.join(unfinished)})" if unfinished else ""
        lines.append(f"- {m}: |sequence - prefix| {gap(seq, pre)}; run-to-run noise |seed 2020 - seed 2021| "
                     f"(sequence mode) {noise}{partial}")
        columns += [(f"{m} prefix", pre), (f"{m} sequence", seq)]
        columns += [(f"{m} sequence, seed 2021", other or {})] if seeded else []
    if not lines:
        return []
    out = [f"### {dataset}: learning curves, prefix vs sequence mode (seed 2020)", "",
           "Valid NDCG@10 at equal epochs (chart: `results/%s/curves.png`):" % dataset, ""] + lines + [""]
    out += ["| epoch | " + " | ".join(label for label, _ in columns) + " |", "|" + "---|" * (1 + len(columns))]
    last = max(max(c) for _, c in columns if c)
    for e in range(min(upto, last + 1)):
        out.append(f"| {e} | " + " | ".join(_f(c.get(e)) for _, c in columns) + " |")
    return out + [""]


def _paired_lines(name, mode, recs, per_user, paired_difference, goal, values="",
                  others=("SASRec", "GRU4Rec")) -> list[str]:
    """``name`` minus each of ``others`` on each metric, paired per test user; with the goal's
    verdict. ``values``: "" RecBole's test values, "input_masked_" those with input sequences masked."""
    lines = []
    for other in others:
        if other not in recs:
            continue
        for metric in METRICS:
            a = per_user.get(f"{mode}/{name}/{values}{metric}")
            b = per_user.get(f"{mode}/{other}/{values}{metric}")
            data_a, data_b = recs[name].get("data_sha256"), recs[other].get("data_sha256")
            if data_a and data_b and data_a != data_b:
                lines.append(f"- {metric}: {name} - {other}: not paired (trained on different data files)")
                continue
            if a is None or b is None or a.shape != b.shape or len(a) < 2:
                lines.append(f"- {metric}: {name} - {other}: no per-user values")
                continue
            diff, lo, hi = paired_difference(a, b)
            if goal:
                verdict = ("met: ahead beyond the noise" if lo > 0 else
                           "**NOT MET**: behind beyond the noise" if hi < 0 else
                           "**NOT MET**: within the noise (not significant)")
            else:
                verdict = "ahead beyond the noise" if lo > 0 else "behind beyond the noise" if hi < 0 else "within the noise"
            lines.append(f"- {metric}: {name} - {other} = {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]: {verdict}")
    return lines


#: variants outside the goal's choice of 1 or 2 layers, run to find out why a goal is not met: shown
#: beside the rows, paired with the baselines and with the variants they take apart
ABLATIONS = {"Mamba4Rec-residual": "one layer with the residual around its block that two layers have "
                                   f"(`{' '.join(VARIANTS['residual'])}`)"}


def _ablation_lines(recs, mode, per_user, paired_difference, values="") -> list[str]:
    lines = []
    for name, what in ABLATIONS.items():
        if name not in recs:
            continue
        others = [n for n in ("SASRec", "GRU4Rec", "Mamba4Rec", "Mamba4Rec-2layers") if n in recs]
        if not others:  # nothing to pair it with (on these values): no heading over an empty list
            continue
        lines += ["", f"{name}, {what}: outside the goal's choice, paired the same way"
                  + (" on the masked test values" if values else "") + ", for reference:", ""]
        lines += _paired_lines(name, mode, recs, per_user, paired_difference, goal=False, values=values,
                               others=others)
    return lines


def _variants(recs) -> tuple[list[str], str | None]:
    """The Mamba4Rec variants with rows, and the one the goal judges: the better by valid NDCG@10."""
    candidates = [n for n in ("Mamba4Rec", "Mamba4Rec-2layers") if n in recs]
    best = max(candidates, key=lambda n: recs[n]["valid_result"]["ndcg@10"] or -1) if candidates else None
    return candidates, best


def _goal_lines(dataset, mode, recs, per_user, paired_difference) -> list[str]:
    candidates, best = _variants(recs)
    if not candidates:  # no goal to judge yet; an ablation row is still paired with what there is
        return _ablation_lines(recs, mode, per_user, paired_difference)[1:]
    planned = {j.name for j in JOBS if j.dataset == dataset and j.mode == mode}
    pending = [n for n in ("Mamba4Rec", "Mamba4Rec-2layers") if n not in recs and n in planned]
    lines = [f"Mamba4Rec, the better of 1 and 2 layers by valid NDCG@10: **{best}**"
             + (f" (provisional: {pending[0]} is not finished yet)" if pending else "")
             + ". Paired over the same test users (difference, 95% interval):", ""]
    lines += _paired_lines(best, mode, recs, per_user, paired_difference, goal=True)
    if dataset == "ml-1m":  # the published figures, judged on the chosen variant, under its own lines
        for label, figures in REFERENCES["ml-1m"][:1]:
            for metric, target in figures.items():
                mine = recs[best]["test_result"].get(metric)
                if mine is not None:
                    lines.append(f"- {metric} >= {label} {target:.4f} ({best}): "
                                 f"{'met' if mine >= target else '**NOT MET**'} ({mine:.4f})")
    tim4rec = []  # a goal of the 2-layer variant whichever is chosen: under the 2-layer lines
    if dataset == "ml-1m" and "Mamba4Rec-2layers" in recs:
        mine = recs["Mamba4Rec-2layers"]["test_result"].get("hit@10") or 0.0
        tim4rec = [f"- 2 layers, hit@10 >= TiM4Rec's {TIM4REC_ML1M_HIT}: "
                   f"{'met' if mine >= TIM4REC_ML1M_HIT else '**NOT MET**'} ({mine:.4f})"]
    if best == "Mamba4Rec-2layers":
        lines += tim4rec
    for name in (n for n in candidates if n != best):  # the variant not chosen, beside it: no verdict
        lines += ["", f"{name} (not chosen: valid NDCG@10 {_f(recs[name]['valid_result']['ndcg@10'])} against "
                      f"{_f(recs[best]['valid_result']['ndcg@10'])}), paired the same way, for reference:", ""]
        lines += _paired_lines(name, mode, recs, per_user, paired_difference, goal=False)
        if name == "Mamba4Rec-2layers":
            lines += tim4rec
    lines += _ablation_lines(recs, mode, per_user, paired_difference)
    return lines


def _stretches(rec) -> str:
    """"epochs 0-50 on A (1 thread), 51-87 on B (2 threads)": where each stretch of a resumed row's
    epochs trained."""
    parts = rec["machine_by_epoch"]
    ends = [p["from_epoch"] - 1 for p in parts[1:]] + [(rec.get("epochs_run") or 0) - 1]
    where = [("a machine not recorded" if p["machine"] == "not recorded" else p["machine"])
             + (f" ({p['threads']} thread{'s' if p['threads'] != 1 else ''})" if p.get("threads") else "")
             for p in parts]
    return ", ".join(f"epochs {p['from_epoch']}-{end} on {w}" for p, end, w in zip(parts, ends, where))


def write_tables(doc: Path = RESULTS_DOC, results: Path = RESULTS) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = tables(results) if results.is_dir() and any(results.glob("*/*/*.json")) else "No finished run yet.\n"
    _atomic_write(doc, (head + BEGIN + "\n\n" + body + "\n" + END + tail).encode())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the queue (resumes)")
    r.add_argument("out", type=Path)
    r.add_argument("--lanes", type=int, default=2)
    r.add_argument("--threads", type=int, default=1, help="threads of each training process (default 1)")
    r.add_argument("--only", nargs="*", default=None, metavar="DATASET/MODE/MODEL")
    r.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--rerun", action="store_true",
                   help="train again the jobs whose rows results/ already holds but OUT does not")
    for name, what in (("status", "where each job stands"), ("export", "write the finished jobs to results/"),
                       ("curves", "write the unfinished jobs' curves so far to results/<dataset>/curves.csv"),
                       ("masked", "give finished rows without masked test values those of their best checkpoints")):
        s = sub.add_parser(name, help=what)
        s.add_argument("out", type=Path)
        if name == "masked":
            s.add_argument("--only", nargs="*", default=None, metavar="DATASET/MODE/MODEL")
    sub.add_parser("tables", help="rewrite docs/RESULTS.md's tables from results/")
    args = p.parse_args(argv)
    if args.cmd == "tables":
        write_tables()
        print(f"wrote the tables of {RESULTS_DOC}")
        return 0
    out = args.out.resolve()
    if args.cmd == "status":
        print(status(out))
        return 0
    if args.cmd == "export":
        export(out)
        return 0
    if args.cmd == "curves":
        export_curves(out)
        return 0
    jobs = JOBS
    if getattr(args, "only", None) is not None:
        known = {j.key: j for j in JOBS}
        bad = [k for k in args.only if k not in known]
        if bad:
            print(f"error: unknown job(s) {', '.join(bad)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        jobs = [known[k] for k in args.only]
    if args.cmd == "masked":
        masked_from_checkpoints(out, jobs if args.only is not None else [j for j in JOBS if finished(j, out)])
        return 0
    for flag in ("lanes", "threads"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag}={getattr(args, flag)}: it must be >= 1", file=sys.stderr)
            return 2
    cores = os.cpu_count() or 1
    if args.lanes * args.threads > cores:
        print(f"warning: --lanes {args.lanes} x --threads {args.threads} = {args.lanes * args.threads} threads "
              f"on {cores} cores: the trainings will slow each other down", file=sys.stderr)
    with queue_lock(out):
        prepare(out, args.shared, args.python, dict.fromkeys(j.dataset for j in jobs))
        failed = run_queue(out, jobs, args.lanes, args.python, log=lambda m: print(m, flush=True),
                           rerun=args.rerun, threads=args.threads)
    return 128 - failed if failed < 0 else (1 if failed else 0)


@contextlib.contextmanager
def queue_lock(out: Path):
    """One ``run`` per OUT at a time: two would train the same job into the same checkpoint."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".results.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise SystemExit(f"{out} is being trained by another 'results.py run' ({fh.read().strip() or 'pid ?'}); "
                             f"stop it first (kill PID: its trainings stop too and resume later)") from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield


if __name__ == "__main__":
    sys.exit(main())
