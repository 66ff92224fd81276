#!/usr/bin/env python
"""ms per training step, side by side in one run: Mamba4Rec train_mode=sequence as the code is now
and as it was at an older commit (923e454 by default), and SASRec train_mode=sequence now.

Each contender is a worker process (benchmarks/train_step_worker.py) with its own code on its
module path: the checkout, or the older commit extracted once with ``git archive`` into the temp
folder. One after another, each worker loads the data set, builds its model (the repo's configs,
with train_batch_size and MAX_ITEM_LIST_LENGTH set here) and its first --batches real training
batches of the seeded epoch, lets the data set go and waits (ML-1M at L = 200: about 5 GiB
while a worker loads, 0.5 GiB each after). The parent then asks one worker at a time for one
training step (zero_grad, loss, backward, optimizer step on its next batch), all contenders in
turn, the order reversed every other round, so that they share the machine's conditions; the
first --warmup rounds (numba compiles or loads its kernels) are not counted. Prints each
contender's settings, then a table of median ms per step and the work per step: targets, rows
(windows), positions in them and positions computed (with the length buckets' padding), per
target; then the ratios to Mamba4Rec now: of the medians, and the median of each round's ratio
(steps seconds apart, which a busy machine slows alike). The project's goal: Mamba4Rec's
sequence step 1.3x faster than 923e454's on ML-1M (L=200) and on Beauty (L=50).

    python -m benchmarks.bench_train_step --dataset ml-1m --data-path ../shared/datasets --threads 1
    python -m benchmarks.bench_train_step --dataset amazon-beauty --data-path ../shared/datasets --threads 1
    python -m benchmarks.bench_train_step --dataset ml-1m --data-path DIR --contenders mamba-old,mamba --repeats 9
    python -m benchmarks.bench_train_step --dataset ml-1m --data-path DIR --contenders mamba-history@HEAD,mamba-history
    python -m benchmarks.bench_train_step --dataset ml-1m --data-path DIR --contenders mamba@REV,mamba \
        --init-from BEST.pth        # every Mamba4Rec contender with a trained model's weights

--data-path is RecBole's data_path (DIR/<dataset>/<dataset>.inter), or a folder of the raw benchmark
files (../shared/datasets: SOURCES.md there): these are prepared once into the temp folder with
the settings docs/DATASETS.md gives (ML-1M: items with fewer than 5 ratings dropped).

Contenders (--contenders): mamba (Mamba4Rec, sequence, this checkout), mamba-old (the same at
--old-rev), sasrec (SASRec, sequence, this checkout), mamba-history (Mamba4Rec,
train_mode=history, this checkout: each user's whole history, see train_step_worker.history_mode;
a version of the code without that mode is reported as unavailable and left out of the table),
mamba@REV (Mamba4Rec, sequence, at any git revision REV that has the same entry points) and
mamba-history@REV (the same in history mode). Every
mode has the same steps per epoch (train_batch_size targets a step), so the ratio of two
contenders' steps is the ratio of their epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the speed-up of Mamba4Rec's sequence step over mamba-old's that the project aims at
GOAL = 1.3
WORKER = Path(__file__).resolve().parent / "train_step_worker.py"
SCRATCH = Path(tempfile.gettempdir()) / "mamba4rec-bench"
#: the paper's lengths (configs/dataset/*.yaml)
MAX_LEN = {"ml-1m": 200, "amazon-beauty": 50, "amazon-video-games": 50, "amazon-sports-outdoors": 50}
#: raw benchmark files (relative to a folder laid out as ../shared/datasets) -> prepare.py's --kcore-item
RAW = {"ml-1m": ("ml-1m/ml-1m.txt", 5), "amazon-beauty": ("amazon-beauty/Beauty.txt", 0),
       "amazon-video-games": ("amazon-video-games/Video_Games.txt", 0),
       "amazon-sports-outdoors": ("amazon-sports-outdoors/Sports_and_Outdoors.txt", 0)}


@dataclass
class Contender:
    name: str
    root: Path          # put on PYTHONPATH: the code whose step is timed
    model: str
    train_mode: str
    code: str           # what the table says of the code
    proc: subprocess.Popen | None = None
    stderr: object = None
    info: dict = field(default_factory=dict)
    ms: list = field(default_factory=list)
    unavailable: str | None = None


def old_code(rev: str) -> tuple[Path, str]:
    """The tree of ``rev`` extracted (once) into the temp folder, and its short hash."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    root = SCRATCH / f"code-{sha}"
    if not (root / "mamba4rec" / "__init__.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root, sha


def current_mamba(args) -> Contender:
    return Contender("mamba", REPO, "Mamba4Rec", "sequence", "this checkout")


def old_mamba(args) -> Contender:
    root, sha = old_code(args.old_rev)
    return Contender("mamba-old", root, "Mamba4Rec", "sequence", sha)


def mamba_at(spec: str) -> Contender:
    """mamba@REV (sequence mode) or mamba-history@REV (history mode) at git revision REV."""
    name, rev = spec.split("@", 1)
    root, sha = old_code(rev)
    return Contender(f"{name}@{sha}", root, "Mamba4Rec", AT_REV[name], sha)


def current_sasrec(args) -> Contender:
    return Contender("sasrec", REPO, "SASRec", "sequence", "this checkout")


def history_mamba(args) -> Contender:
    """Mamba4Rec with train_mode=history: its batches, loss and work per step come from
    train_step_worker.history_mode."""
    return Contender("mamba-history", REPO, "Mamba4Rec", "history", "this checkout")


#: NAME@REV contenders -> their train mode
AT_REV = {"mamba": "sequence", "mamba-history": "history"}
#: --contenders choices, in the table's order
CONTENDERS = {"mamba-old": old_mamba, "mamba": current_mamba, "sasrec": current_sasrec,
              "mamba-history": history_mamba}


def data_path(path: str, dataset: str) -> str:
    """RecBole's data_path for ``dataset``: ``path`` when it holds the atomic file, else the raw
    benchmark file under it prepared into the temp folder (again only when the raw file changed)."""
    if (Path(path) / dataset / f"{dataset}.inter").exists():
        return os.path.abspath(path)
    if dataset not in RAW or not (Path(path) / RAW[dataset][0]).exists():
        raise SystemExit(f"{path} holds neither {dataset}/{dataset}.inter nor a raw file this benchmark knows "
                         f"for {dataset} ({', '.join(f'{k}: {v[0]}' for k, v in RAW.items())})")
    raw, item_k = Path(path) / RAW[dataset][0], RAW[dataset][1]
    out = SCRATCH / "dataset"
    inter, stats = out / dataset / f"{dataset}.inter", out / dataset / f"{dataset}.stats.json"
    fresh = (inter.exists() and stats.exists() and inter.stat().st_mtime >= raw.stat().st_mtime
             and json.loads(stats.read_text()).get("input") == str(raw.resolve())
             and json.loads(stats.read_text()).get("kcore", {}).get("item") == item_k)
    if not fresh:
        sys.path.insert(0, str(REPO))
        from mamba4rec.data_prep import prepare

        prepare("seq-text", str(raw.resolve()), dataset, str(out), item_k=item_k)
        print(f"# prepared {raw} into {inter} (items >= {item_k} ratings)" if item_k else
              f"# prepared {raw} into {inter}")
    return str(out)


def available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def wait_for_memory(gib: float, name: str, patience: float = 120.0) -> None:
    """Start a worker only with ``gib`` GiB available (other processes of the machine must not be
    pushed out of memory by a loading worker): wait up to ``patience`` s for it, then give up."""
    deadline = time.monotonic() + patience
    while (free := available_gib()) is not None and free < gib:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: only {free:.1f} GiB of memory available, --min-free-gib asks "
                               f"{gib:g} before a worker loads the data set")
        time.sleep(5)


def start(c: Contender, args, data: str) -> None:
    wait_for_memory(args.min_free_gib, c.name)
    env = dict(os.environ, PYTHONPATH=str(c.root), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(WORKER), "--model", c.model, "--train-mode", c.train_mode, "--dataset", args.dataset,
           "--data-path", data, "--max-len", str(args.max_len), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--batches", str(args.batches), "--scratch", str(SCRATCH / "saved")]
    if args.init_from and c.model == "Mamba4Rec":
        cmd += ["--init-from", str(Path(args.init_from).resolve())]
    c.stderr = open(SCRATCH / f"worker-{c.name}.log", "w")  # RecBole writes log/ in its working folder
    c.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=c.stderr, text=True,
                              bufsize=1, env=env, cwd=SCRATCH)


def receive(c: Contender) -> dict:
    for line in c.proc.stdout:
        if line.startswith("@@"):
            msg = json.loads(line[2:])
            if "error" in msg:
                raise RuntimeError(f"{c.name}: {msg['error']}")
            return msg
    c.stderr.flush()
    tail = (SCRATCH / f"worker-{c.name}.log").read_text()[-2000:]
    raise RuntimeError(f"{c.name}: the worker ended (exit {c.proc.wait()}):\n{tail}")


def step(c: Contender) -> float:
    c.proc.stdin.write("step\n")
    c.proc.stdin.flush()
    return receive(c)["ms"]


def stop(c: Contender) -> None:
    if c.proc and c.proc.poll() is None:
        try:
            c.proc.stdin.write("quit\n")
            c.proc.stdin.close()
        except OSError:
            pass
        c.proc.wait(timeout=60)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-path", required=True, help="RecBole data_path, or a folder of the raw benchmark files")
    p.add_argument("--contenders", default="mamba-old,mamba,mamba-history,sasrec",
                   help=f"comma list of {', '.join(CONTENDERS)}, mamba@REV, mamba-history@REV (see above)")
    p.add_argument("--old-rev", default="923e454", help="the commit mamba-old runs")
    p.add_argument("--max-len", type=int, default=None,
                   help="MAX_ITEM_LIST_LENGTH (default: the paper's, 200 on ml-1m and 50 on the Amazon sets)")
    p.add_argument("--batch-size", type=int, default=2048, help="train_batch_size (targets per step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of every worker")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    p.add_argument("--batches", type=int, default=0, help="distinct batches each worker cycles through "
                   "(default: one per step, warm-up included)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between two steps (idle OpenMP threads "
                   "of the last worker stop spinning)")
    p.add_argument("--min-free-gib", type=float, default=8.0, help="memory that must be available before a "
                   "worker starts loading the data set (ML-1M's loading peaks at about 5 GiB)")
    p.add_argument("--init-from", help="a Mamba4Rec checkpoint (RecBole's best .pth, of this data set and "
                   "settings) every Mamba4Rec contender starts from: a trained model's step (its dt, and so its "
                   "decays, differ from the initial ones); SASRec starts from its initialisation")
    p.add_argument("--csv", default=str(REPO / "benchmarks" / "out" / "train_step.csv"))
    args = p.parse_args(argv)
    args.max_len = args.max_len or MAX_LEN.get(args.dataset) or p.error(f"--max-len: no default for {args.dataset}")
    args.batches = args.batches or args.repeats + args.warmup
    names = [n for n in args.contenders.split(",") if n]
    unknown = [n for n in names if n not in CONTENDERS and n.split("@", 1)[0] not in AT_REV]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}: choose from {', '.join(CONTENDERS)}")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    data = data_path(args.data_path, args.dataset)

    import torch

    sys.path.insert(0, str(REPO))
    from mamba4rec.pipeline import cpu_name

    print(f"# {cpu_name()} x{os.cpu_count()} | {platform.platform()} | python {platform.python_version()} | "
          f"torch {torch.__version__} | threads {args.threads} | load avg {load_avg()}")
    print(f"# {args.dataset} ({data}), MAX_ITEM_LIST_LENGTH {args.max_len}, train_batch_size {args.batch_size}; "
          f"{args.warmup} warm-up + {args.repeats} timed steps per contender, interleaved")
    contenders = [CONTENDERS[n](args) if n in CONTENDERS else mamba_at(n) for n in names]
    live = []
    try:
        for c in contenders:  # one after another: RecBole's data set takes gigabytes while it loads
            start(c, args, data)
            msg = receive(c)
            if "unavailable" in msg:
                c.unavailable = msg["unavailable"]
                print(f"# {c.name}: unavailable: {c.unavailable}")
                continue
            c.info = msg["ready"]
            print(f"# {c.name}: {c.model} train_mode={c.train_mode}, code {c.code} ({c.info['mamba4rec']}), "
                  f"scan {c.info['scan']}, {c.info['params']:,} parameters, loaded in {c.info['load_s']} s "
                  f"(RSS {c.info['rss_mib']['loaded']} MiB, {c.info['rss_mib']['kept']} MiB kept); "
                  f"settings {json.dumps(c.info['settings'])}", flush=True)
        live = [c for c in contenders if not c.unavailable]
        for r in range(args.warmup + args.repeats):
            times = {}
            for c in (live if r % 2 == 0 else live[::-1]):
                time.sleep(args.pause)
                times[c.name] = step(c)
                if r >= args.warmup:
                    c.ms.append(times[c.name])
            print(f"# round {r + 1}{' (warm-up)' if r < args.warmup else ''}: "
                  + ", ".join(f"{c.name} {times[c.name]:.0f} ms" for c in live), flush=True)
    finally:
        for c in contenders:
            stop(c)
    report(args, live)


def report(args, live) -> None:
    from mamba4rec.pipeline import cpu_name

    print(f"# load avg at the end {load_avg()}")
    print()
    print("| contender | model | train mode | code | ms/step median | min | max | targets/step | rows/step "
          "| positions/target | computed/target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for c in live:
        i = c.info
        med = statistics.median(c.ms)
        row = dict(contender=c.name, model=c.model, train_mode=c.train_mode, code=c.code, dataset=args.dataset,
                   max_len=args.max_len, batch_size=args.batch_size, threads=args.threads,
                   ms_median=round(med, 1), ms_min=round(min(c.ms), 1), ms_max=round(max(c.ms), 1),
                   steps=len(c.ms), targets_per_step=i["targets"] / i["batches"],
                   rows_per_step=i["rows"] / i["batches"],
                   positions_per_target=i["positions"] / i["targets"], computed_per_target=i["computed"] / i["targets"],
                   cpu=cpu_name())
        rows.append(row)
        print(f"| {c.name} | {c.model} | {c.train_mode} | {c.code} | {med:.0f} | {min(c.ms):.0f} | {max(c.ms):.0f} "
              f"| {row['targets_per_step']:.0f} | {row['rows_per_step']:.1f} | {row['positions_per_target']:.2f} "
              f"| {row['computed_per_target']:.2f} |")
    print()
    new = next((c for c in live if c.name == "mamba"), None)
    for c, row in zip(live, rows):
        if new and c is not new:
            ratio = row["ms_median"] / statistics.median(new.ms)
            # each round's two steps ran seconds apart: their ratio leaves out the machine's slower spells
            paired = statistics.median(a / b for a, b in zip(c.ms, new.ms))
            row["ratio_to_mamba"], row["paired_ratio_to_mamba"] = round(ratio, 3), round(paired, 3)
            goal = f"; goal {GOAL:.2f}x: {'met' if min(ratio, paired) >= GOAL else 'not met'}" \
                if c.name == "mamba-old" else ""
            print(f"{c.name} ({c.code}) / mamba: {ratio:.2f}x (medians), {paired:.2f}x (median of the rounds' "
                  f"ratios){goal}")
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)) or ["contender"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
