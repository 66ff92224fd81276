"""The converged comparison on the paper's data sets, trained to early stopping and kept in git.

    python -m experiments.results run OUT [--lanes 2] [--threads 1] [--only DATASET/MODE/MODEL ...]
                                          [--seconds S]
    python -m experiments.results status OUT
    python -m experiments.results export OUT      # OUT's finished rows -> results/
    python -m experiments.results curves OUT      # OUT's unfinished runs' curves so far -> results/
    python -m experiments.results masked OUT      # masked test values of older rows, from their checkpoints
    python -m experiments.results tables          # results/ -> docs/RESULTS.md's tables
    python -m experiments.results figures         # results/ -> the tables and results/<dataset>/curves.png

``run`` works through :data:`experiments.plan.JOBS` in order, ``--lanes`` at a time (default 2:
one-thread processes on a 2-core machine; ``--threads`` gives each process more, e.g. ``--lanes 1
--threads 2`` for one job on the whole machine), each job one ``run_recbole.py --compare ...
--compare_run=MODEL --resume`` process: a stopped job continues exactly from its last epoch when
``run`` is started again. It prepares the data sets from ../shared/datasets into OUT/dataset
first. Each finished job is exported at once (:mod:`experiments.export`). ``--seconds``: stop the
trainings still running after that long (they resume on the next ``run``). On a GPU,
``python -m experiments.gpu`` runs several jobs at once on the one device.

The modules: plan (data sets, jobs), runner (the queue, status), gpu (the jobs at once on one
GPU), export (results/), tables and goals (docs/RESULTS.md's generated block), and the analyses
per_user_analysis, checkpoint_analysis and tie_order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import plan
from .export import export, export_curves, masked_from_checkpoints, redraw_curves
from .plan import REPO, RESULTS_DOC, finished
from .runner import prepare, queue_lock, run_queue, status
from .tables import write_tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    r.add_argument("--seconds", type=float, default=None,
                   help="stop the trainings still running after this long (they resume on the next run)")
    for name, what in (("status", "where each job stands"), ("export", "write the finished jobs to results/"),
                       ("curves", "write the unfinished jobs' curves so far to results/<dataset>/curves.csv"),
                       ("masked", "give finished rows without masked test values those of their best checkpoints")):
        s = sub.add_parser(name, help=what)
        s.add_argument("out", type=Path)
        if name == "masked":
            s.add_argument("--only", nargs="*", default=None, metavar="DATASET/MODE/MODEL")
    sub.add_parser("tables", help="rewrite docs/RESULTS.md's tables from results/")
    sub.add_parser("figures", help="rewrite docs/RESULTS.md's tables and draw every results/<dataset>/curves.png "
                                   "again, from results/ alone")
    args = p.parse_args(argv)
    if args.cmd in ("tables", "figures"):
        write_tables()
        print(f"wrote the tables of {RESULTS_DOC}")
        if args.cmd == "figures":
            redraw_curves()
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
    jobs = plan.JOBS
    if getattr(args, "only", None) is not None:
        known = {j.key: j for j in plan.JOBS}
        bad = [k for k in args.only if k not in known]
        if bad:
            print(f"error: unknown job(s) {', '.join(bad)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        jobs = [known[k] for k in args.only]
    if args.cmd == "masked":
        masked_from_checkpoints(out, jobs if args.only is not None else [j for j in plan.JOBS if finished(j, out)])
        return 0
    if args.seconds is not None and args.seconds <= 0:
        print(f"error: --seconds={args.seconds:g}: it must be > 0", file=sys.stderr)
        return 2
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
                           rerun=args.rerun, threads=args.threads, seconds=args.seconds)
    return 128 - failed if failed < 0 else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
