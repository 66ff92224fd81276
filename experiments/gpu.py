"""The converged comparison's jobs on one GPU, all at once: a GPU has the memory and the speed for
several trainings beside each other, where a CPU takes them a lane per core.

    python -m experiments.gpu OUT [DATASET ...] [--only DATASET/MODE/MODEL ...] [--seconds S]
                              [--lanes N] [--rerun] [--shared DIR]

The jobs: :data:`experiments.plan.JOBS`' sequence- and history-mode ones (or those of the data
sets named, or the jobs ``--only`` names, of any mode), every one at once unless ``--lanes`` says how many,
each its own ``run_recbole.py ... --resume`` process with one CPU thread, as
``python -m experiments.results run`` starts them. Jobs results/ holds are skipped (``--rerun``
trains them again); each finished job is exported to results/ as it finishes. ``--seconds``: the
trainings still running that long after the start are stopped (the epoch under way is lost) and
continue from their last epoch when the command is run again on the same OUT. At the end it
prints where each job stands.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import plan
from .plan import REPO, RESULTS
from .runner import prepare, queue_lock, run_queue, status


class UsageError(Exception):
    """Bad arguments or a missing input: the CLI prints it and exits with status 2."""


def select_jobs(datasets=(), only=None) -> list:
    """The plan's sequence- and history-mode jobs, or the jobs ``only`` names (any of JOBS), kept to
    ``datasets`` when given."""
    known = {j.key: j for j in plan.JOBS}
    bad = [d for d in datasets if d not in plan.DATASETS]
    if bad:
        raise UsageError(f"unknown data set(s) {', '.join(bad)}: one of {', '.join(plan.DATASETS)}")
    if only:
        stray = [k for k in only if k not in known]
        if stray:
            raise UsageError(f"unknown job(s) {', '.join(stray)}; known: {', '.join(known)}")
        jobs = [known[k] for k in dict.fromkeys(only)]
    else:
        jobs = [j for j in plan.JOBS if j.mode in ("sequence", "history")]
    if datasets:
        jobs = [j for j in jobs if j.dataset in datasets]
    if not jobs:
        raise UsageError(f"no job left: none of --only {' '.join(only or [])} is of {', '.join(datasets)}")
    return jobs


def device_line() -> str:
    """The GPU torch trains on, or a UsageError when it sees none."""
    import torch

    if not torch.cuda.is_available():
        raise UsageError("torch sees no CUDA device: on a CPU, run 'python -m experiments.results run OUT' "
                         "(one lane per core)")
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, torch {torch.__version__}"


def train(jobs, out: Path, shared: Path, python: str = sys.executable, lanes: int | None = None,
          seconds: float | None = None, rerun: bool = False, results: Path = RESULTS, grace: float = 30.0,
          log=print) -> int:
    """Prepare the jobs' data sets in ``out``, train ``jobs`` ``lanes`` at a time (default all),
    each exported to ``results`` as it finishes, until they end or ``seconds`` pass; then log
    where each stands. Returns the number of jobs that failed, or -signal when SIGTERM / SIGINT
    stopped it."""
    started = time.monotonic()
    with queue_lock(out):
        prepare(out, shared, python, dict.fromkeys(j.dataset for j in jobs))
        left = None if seconds is None else seconds - (time.monotonic() - started)
        if left is not None and left <= 0:
            log(f"no time left to train: {seconds:g} s passed preparing the data sets")
            failed = 0
        else:
            log(f"training {len(jobs)} jobs" + (f" for at most {left:.0f} s" if left is not None else "")
                + f": {', '.join(j.key for j in jobs)}")
            failed = run_queue(out, jobs, lanes or len(jobs), python, log=log, results=results, rerun=rerun,
                               seconds=left, grace=grace)
    keys = {j.key for j in jobs}
    log("\n".join(line for line in status(out, results).splitlines() if line.split(":", 1)[0] in keys))
    return failed


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: it must be a number > 0")
        return value
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the run folder (resumes what an earlier run there left)")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help=f"only these of {', '.join(plan.DATASETS)}")
    p.add_argument("--only", nargs="+", default=None, metavar="KEY",
                   help="these jobs (DATASET/MODE/MODEL, any mode) instead of the sequence- and history-mode ones")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="stop the trainings still running this long after the start (they resume next time)")
    p.add_argument("--lanes", type=_positive(int), default=None, help="trainings at a time (default: all at once)")
    p.add_argument("--rerun", action="store_true", help="train the jobs results/ holds too")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets",
                   help="the folder of the data sets' source files (docs/DATASETS.md)")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    try:
        jobs = select_jobs(args.datasets, args.only)
        print(device_line(), flush=True)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = train(jobs, args.out.resolve(), args.shared, args.python, args.lanes, args.seconds, args.rerun,
                   log=lambda m: print(m, flush=True))
    return 128 - failed if failed < 0 else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
