"""The queue: the jobs of :mod:`experiments.plan` trained ``lanes`` at a time, each exported to
results/ as it finishes; where each job stands; one queue per OUT.

Each job is one ``run_recbole.py ... --resume`` process, so a stopped job continues exactly from
its last epoch when the queue is started again. ``python -m experiments.results run OUT`` runs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from . import export as _export
from . import plan
from .plan import DATASETS, REPO, RESULTS, Job, finished, in_results


def prepare(out: Path, shared: Path, python: str, datasets) -> None:
    for name in datasets:
        folder, src, flags = DATASETS[name]
        if (out / "dataset" / name / f"{name}.inter").is_file():
            continue
        if not (shared / src).is_file():
            raise SystemExit(f"{name}: no {shared / src}; give --shared, the folder holding SOURCES.md's files")
        subprocess.run([python, "datasets/prepare.py", "--format", "seq-text", "--input", str(shared / src),
                        "--dataset", name, "--output-dir", str(out / "dataset"), *flags], cwd=REPO, check=True)


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
        _export.export(out, done_before, log=log, results=results)
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
                # run in the job's own folder: RecBole writes log/ and log_tensorboard/ to the working
                # directory, and a checkout being tidied must not take a running job's files with it
                cwd = job.compare_dir(out)
                cwd.mkdir(parents=True, exist_ok=True)
                cmd = job.command(out)
                procs[job] = subprocess.Popen([python, str(REPO / cmd[0]), *cmd[1:]], cwd=cwd, env=env,
                                              stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = procs[job].wait()
            finally:
                with lock:
                    procs.pop(job, None)
        if rc == 0 and finished(job, out) is not None:
            log(f"lane {n}: {job.key} finished")
            with lock:
                _export.export(out, [job], log=log, results=results)
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
    for job in plan.JOBS:
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
            raise SystemExit(f"{out} is being trained by another 'python -m experiments.results run' ({fh.read().strip() or 'pid ?'}); "
                             f"stop it first (kill PID: its trainings stop too and resume later)") from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield


if __name__ == "__main__":
    sys.exit(main())
