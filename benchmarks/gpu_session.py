#!/usr/bin/env python
"""What a session lent a GPU runs: the device tool's machine (one command of at most 10 minutes,
15 minutes of device time a task, a bare machine after each give-back; back come at most 8 files
under $OUT, 16 MiB each, 64 MiB together; the working tree and the carried paths travel, 64 MiB).

Here, on the dev machine, before the first device call:

    python benchmarks/gpu_session.py prepare [FILES_AT]
        .whl/  the wheels the GPU image lacks (recbole 1.2.1, colorlog 4.7.2, texttable 1.7.0:
               pure Python, fetched with --no-deps; the image's numpy 2 and pandas are fine)
        .gpu/  datasets/ (the files of benchmarks/results.py's DATASETS, laid out as under
               ../shared/datasets, which does not travel), commit.txt (the commit the rows are
               trained at: commit first), and, given FILES_AT (an earlier compare call's files_at),
               state/ (the packs it brought back, which the next compare call continues)

There, as the device tool's command, with carry [".whl", ".gpu"]:

    python3 benchmarks/gpu_session.py kernels
        bench_scan, the e2e triton-vs-torch check, bench_streaming and kernel_resources on the
        GPU (up to 540 s); outputs in $OUT
    python3 benchmarks/gpu_session.py compare SECONDS [DATASET ...] [--only KEY ...]
        benchmarks/results.py's sequence-mode jobs (or those of the data sets named, or the jobs
        --only names), all at once on the one GPU, each its own `Job.command` process (with
        --resume: a stopped job continues exactly); jobs results/ holds are skipped (--rerun
        trains them). SECONDS after the command started the trainings still running are stopped
        (an epoch under way is lost) and the run folder is packed into $OUT: pack-N.tar (rows,
        curves, per-user values, logs, and the checkpoints of the unfinished jobs while they fit,
        best checkpoints without their optimizer state) and status.txt. Give the call a
        timeout_s of SECONDS + 120 at least (stopping and packing).

Here again, with that call's files_at:

    python benchmarks/gpu_session.py export FILES_AT      # its finished rows -> results/
    python benchmarks/gpu_session.py prepare FILES_AT     # its state -> .gpu/state: the next call resumes

The run folder there is a fixed path (--state, default /tmp/mamba4rec-gpu): a job's settings
hold its --data_path and its last checkpoint names the best one by its absolute path.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # mamba4rec of this checkout, not of another install
    sys.path.insert(0, str(REPO))


def _load_results():
    """benchmarks/results.py as a module (one instance, whoever loads it first)."""
    name = "results_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "results.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: its dataclass looks itself up there
        spec.loader.exec_module(module)
    return sys.modules[name]


results = _load_results()

WHL = REPO / ".whl"
GPU = REPO / ".gpu"
STATE = Path("/tmp/mamba4rec-gpu")  # there: the run folder (results.py's OUT)
SITE = Path("/tmp/mamba4rec-site")  # there: the carried wheels, installed
SHARED = REPO.parent / "shared" / "datasets"
WHEELS = ("recbole==1.2.1", "colorlog==4.7.2", "texttable==1.7.0")
MIB = 1 << 20
FILE_LIMIT = 16 * MIB  # the device tool brings back files of at most 16 MiB
BACK_FILES = 8         # ... at most 8 of them
CARRY_LIMIT = 64 * MIB  # what travels to it: the tree and the carried paths
#: what the packs may hold together: they come back (64 MiB at most) and travel again as
#: .gpu/state, beside the data (about 7 MiB), the wheels and the tree, in the 64 MiB carry
PACK_BUDGET = 48 * MIB
KERNEL_BENCHMARKS = (  # name, arguments, seconds
    ("bench_scan", ["benchmarks/bench_scan.py", "--device", "cuda", "--csv", "{out}/bench_scan.csv"], 240),
    ("e2e_triton_vs_torch", ["benchmarks/e2e_triton_vs_torch.py", "--device", "cuda"], 120),
    ("bench_streaming", ["benchmarks/bench_streaming.py", "--device", "cuda", "--csv", "{out}/bench_streaming.csv"],
     120),
    ("kernel_resources", ["benchmarks/kernel_resources.py"], 60),
)


class UsageError(Exception):
    """Bad arguments or a missing input: the CLI prints it and exits with status 2."""


# ---- which jobs ----------------------------------------------------------------------------

def select_jobs(datasets=(), only=None) -> list:
    """results.py's sequence-mode jobs, or the jobs ``only`` names (any of JOBS), kept to
    ``datasets`` when given."""
    known = {j.key: j for j in results.JOBS}
    bad = [d for d in datasets if d not in results.DATASETS]
    if bad:
        raise UsageError(f"unknown data set(s) {', '.join(bad)}: one of {', '.join(results.DATASETS)}")
    if only:
        stray = [k for k in only if k not in known]
        if stray:
            raise UsageError(f"unknown job(s) {', '.join(stray)}; known: {', '.join(known)}")
        jobs = [known[k] for k in dict.fromkeys(only)]
    else:
        jobs = [j for j in results.JOBS if j.mode == "sequence"]
    if datasets:
        jobs = [j for j in jobs if j.dataset in datasets]
    if not jobs:
        raise UsageError(f"no job left: none of --only {' '.join(only or [])} is of {', '.join(datasets)}")
    return jobs


def data_file(gpu: Path, dataset: str) -> Path:
    """Where .gpu holds a data set's file: as under ../shared/datasets (results.prepare reads it there)."""
    return gpu / "datasets" / results.DATASETS[dataset][1]


# ---- here: prepare, export -----------------------------------------------------------------

def _have_wheel(whl: Path, requirement: str) -> bool:
    name, version = requirement.split("==")
    return any(whl.glob(f"{name.replace('-', '_')}-{version}-*.whl")) or any(whl.glob(f"{name}-{version}-*.whl"))


def download_wheels(whl: Path, python: str = sys.executable) -> None:
    missing = [r for r in WHEELS if not _have_wheel(whl, r)]
    if not missing:
        return
    whl.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
           "--platform", "any", "-d", str(whl), *missing]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"pip download of {', '.join(missing)} failed (above); without them the GPU image "
                         f"cannot import recbole")


def tree_bytes(repo: Path = REPO) -> int:
    """What of the checkout travels without carry: tracked files and untracked ones git does not ignore."""
    try:
        names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, check=True, timeout=60).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return 0
    paths = [repo / os.fsdecode(n) for n in names if n]
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def prepare(files_at: Path | None = None, shared: Path = SHARED, whl: Path = WHL, gpu: Path = GPU,
            datasets=None, python: str = sys.executable, log=print) -> int:
    """Lay out .whl and .gpu for the next device call. Returns 0, or 1 when the carry would be
    over the device tool's limit."""
    state = gpu / "state"
    packs = sorted(files_at.glob("*.tar")) if files_at is not None else []
    if files_at is not None and not packs:
        raise UsageError(f"no *.tar in {files_at}: give the files_at of a compare call")
    download_wheels(whl, python)
    for name in datasets or results.DATASETS:
        src, dst = shared / results.DATASETS[name][1], data_file(gpu, name)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        else:
            log(f"warning: no {src}: compare cannot train {name} (give --shared, the folder of SOURCES.md's files)")
    from mamba4rec.compare import git_commit

    commit = git_commit() or "unknown"
    gpu.mkdir(parents=True, exist_ok=True)
    (gpu / "commit.txt").write_text(commit + "\n")
    if commit.endswith("+changes"):
        log(f"warning: the tree differs from {commit[:-8]}: the rows will name it '{commit}'; commit first")
    if packs:  # the newest call's packs hold everything: earlier ones go
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        for p in packs:
            shutil.copyfile(p, state / p.name)
    if any(state.glob("*.tar")):
        log(f"state to resume: {', '.join(p.name for p in sorted(state.glob('*.tar')))} (rm -r {state} to start over)")
    for ignored in ("/.whl/", "/.gpu/"):
        if ignored not in (REPO / ".gitignore").read_text().split():
            log(f"warning: {ignored} is not in .gitignore: git would see its files as untracked")
    carry = tree_bytes() + folder_bytes(whl) + folder_bytes(gpu)
    log(f"carry [\".whl\", \".gpu\"]: {carry / MIB:.1f} MiB with the tree; command: python3 benchmarks/gpu_session.py "
        f"compare 480, timeout_s 600 (or: kernels)")
    if carry > CARRY_LIMIT:
        log(f"error: {carry / MIB:.1f} MiB is over the {CARRY_LIMIT // MIB} MiB the device tool carries: "
            f"rm -r {state} (start over) or leave data sets out (--datasets)")
        return 1
    return 0


def unpack(packs, dest: Path, checkpoints: bool = True) -> list[str]:
    """Extract the packs into ``dest`` (without checkpoints/ when not ``checkpoints``); returns the names."""
    names = []
    dest.mkdir(parents=True, exist_ok=True)
    for pack in packs:
        with tarfile.open(pack) as tar:
            members = [m for m in tar.getmembers() if checkpoints or "checkpoints" not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python without extraction filters: refuse what would land outside dest
                bad = [m.name for m in members if Path(m.name).is_absolute() or ".." in Path(m.name).parts
                       or not (m.isfile() or m.isdir())]
                if bad:
                    raise ValueError(f"{pack}: members outside the folder or not plain files: {', '.join(bad)}")
                tar.extractall(dest, members=members)
            names += [m.name for m in members if m.isfile()]
    return names


def export(files_at: Path, out: Path, results_dir: Path | None = None, log=print) -> list[str]:
    """The finished rows in a compare call's packs -> results/ (through results.export)."""
    packs = sorted(files_at.glob("*.tar"))
    if not packs:
        raise UsageError(f"no *.tar in {files_at}: give the files_at of a compare call")
    unpack(packs, out, checkpoints=False)
    done = [j for j in results.JOBS if results.finished(j, out)]
    if not done:
        log(f"no finished job in {files_at} (status.txt says where each stands)")
        return []
    kwargs = {} if results_dir is None else {"results": results_dir}
    return results.export(out, done, log=log, **kwargs)


# ---- there: setup, kernels -----------------------------------------------------------------

def need_back(back: str | None) -> Path:
    if not back:
        raise UsageError("OUT is not set: run this through the device tool, or give --back DIR")
    return Path(back)


def setup_device(whl: Path = WHL, site: Path = SITE, cpu: bool = False) -> list[str]:
    """Install the carried wheels into ``site`` and put it and the checkout on the path of this
    process and its children; returns lines on the machine and its stack."""
    wheels = sorted(whl.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    elif importlib.util.find_spec("recbole") is None:
        raise UsageError(f"no wheels in {whl}/ and no recbole here: run 'python benchmarks/gpu_session.py prepare' "
                         f"on the dev machine and carry .whl")
    paths = [str(site)] if wheels else []
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ["PYTHONUNBUFFERED"] = "1"
    lines = []
    try:
        lines.append(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=60,
                                    check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        lines.append("no nvidia-smi")
    import importlib.metadata as md

    versions = [f"{n} {md.version(n)}" for n in ("torch", "triton", "numpy", "pandas", "recbole", "numba")
                if importlib.util.find_spec(n) is not None]
    lines.append(f"python {sys.version.split()[0]}, " + ", ".join(versions))
    import torch

    if not torch.cuda.is_available() and not cpu:
        raise UsageError("torch sees no CUDA device: this is for the lent GPU (--cpu to try it on a CPU anyway)")
    return lines


def _run_logged(cmd, path: Path, timeout: float) -> int:
    """Run ``cmd`` in the checkout, its output to the terminal and to ``path``; 124 when it ran out of time."""
    import threading

    with open(path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
        reader.join(10)
        if rc == 124:
            fh.write(f"\n(stopped after {timeout:g} s)\n")
        return rc


def kernels(back: Path, python: str = sys.executable, benchmarks=KERNEL_BENCHMARKS, log=print) -> int:
    """The kernel benchmarks one after another, each with its time limit; one failing does not
    stop the others. Returns the number that failed."""
    back.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, args, seconds in benchmarks:
        rc = _run_logged([python, *(a.format(out=back) for a in args)], back / f"{name}.txt", seconds)
        log(f"{name}: " + ("ok" if rc == 0 else f"stopped after {seconds} s" if rc == 124 else f"exit status {rc}"))
        failed += rc != 0
    return failed


# ---- there: compare ------------------------------------------------------------------------

def strip_optimizer(path: Path) -> bytes:
    """A best checkpoint without its optimizer state: only its weights are read again (the test
    evaluation); the -last.pth keeps the optimizer for --resume."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)  # our own run's file
    if isinstance(state, dict):
        state.pop("optimizer", None)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@dataclass
class Unit:
    """Files that go back together (a job's checkpoints), or one of the run's result files."""
    label: str
    members: list = field(default_factory=list)  # (name in the pack, Path or bytes)
    required: bool = False

    def sizes(self):
        return [len(src) if isinstance(src, bytes) else src.stat().st_size for _, src in self.members]


def tar_bytes(sizes) -> int:
    """At most the bytes of a tar of files of these sizes: per file a header, room for a pax
    header of a long name, the data in 512-byte blocks; two end blocks; whole records."""
    blocks = sum(3 + -(-n // 512) for n in sizes) + 2
    return -(-blocks * 512 // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def last_checkpoint(job, state: Path) -> Path:
    return job.compare_dir(state) / "checkpoints" / f"{job.model}-{job.dataset}-last.pth"


def state_unit(job, state: Path) -> Unit | None:
    """What the next call needs to continue ``job``: its -last.pth, the data checksums beside it
    and its best checkpoint (the one the -last.pth names), without optimizer state. None when the
    job finished or has no checkpoint."""
    last = last_checkpoint(job, state)
    if results.finished(job, state) or not last.is_file():
        return None
    import torch

    unit = Unit(job.key, [(str(last.relative_to(state)), last)])
    side = last.with_name(last.name + ".data.json")
    if side.is_file():
        unit.members.append((str(side.relative_to(state)), side))
    best = torch.load(last, map_location="cpu", weights_only=False).get("saved_model_file")
    if best and Path(best).is_file() and Path(best).resolve().is_relative_to(state.resolve()):
        unit.members.append((str(Path(best).resolve().relative_to(state.resolve())), strip_optimizer(Path(best))))
    return unit


def result_units(state: Path, datasets) -> list[Unit]:
    """Every file of the data sets' folders but checkpoints: rows, curves, per-user values, tables, logs."""
    units = []
    for name in datasets:
        folder = state / results.DATASETS[name][0]
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file() and "checkpoints" not in path.relative_to(folder).parts:
                units.append(Unit(str(path.relative_to(state)), [(str(path.relative_to(state)), path)], True))
    return units


def plan_packs(units, file_limit: int = FILE_LIMIT, files: int = BACK_FILES - 1, budget: int = PACK_BUDGET):
    """Units into at most ``files`` packs of at most ``file_limit`` bytes, ``budget`` in all, in
    order, each into the first pack it fits: (packs as lists of units, units left out)."""
    packs, left = [], []

    def total(extra=0):
        return sum(tar_bytes([s for u in p for s in u.sizes()]) for p in packs) + extra

    for unit in units:
        for p in packs:
            before = tar_bytes([s for u in p for s in u.sizes()])
            after = tar_bytes([s for u in p for s in u.sizes()] + unit.sizes())
            if after <= file_limit and total(after - before) <= budget:
                p.append(unit)
                break
        else:
            size = tar_bytes(unit.sizes())
            if len(packs) < files and size <= file_limit and total(size) <= budget:
                packs.append([unit])
            else:
                left.append(unit)
    return packs, left


def write_packs(packs, back: Path, file_limit: int = FILE_LIMIT) -> list[Path]:
    written = []
    for i, units in enumerate(packs, 1):
        path = back / f"pack-{i}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for unit in units:
                for name, src in unit.members:
                    if isinstance(src, bytes):
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(src), int(time.time()), 0o644
                        tar.addfile(info, io.BytesIO(src))
                    else:
                        tar.add(src, arcname=name, recursive=False)
        if path.stat().st_size > file_limit:  # tar_bytes is an upper bound: this would be its bug
            raise RuntimeError(f"{path} is {path.stat().st_size} bytes, over {file_limit}: tar_bytes underestimates")
        written.append(path)
    return written


def pack(state: Path, back: Path, jobs, file_limit: int = FILE_LIMIT, files: int = BACK_FILES - 1,
         budget: int = PACK_BUDGET, log=print) -> tuple[list[Path], list[Unit]]:
    """``state`` into ``back``/pack-N.tar: every result file of the data sets that have a folder there, then
    the state of each unfinished job, ``jobs`` first (in their order), then any other job of
    results.JOBS with a checkpoint there. Returns (packs, the units that did not fit)."""
    datasets = list(dict.fromkeys([j.dataset for j in jobs] + list(results.DATASETS)))
    order = list(dict.fromkeys(list(jobs) + list(results.JOBS)))
    units = result_units(state, datasets) + [u for j in order if (u := state_unit(j, state))]
    packs, left = plan_packs(units, file_limit, files, budget)
    back.mkdir(parents=True, exist_ok=True)
    written = write_packs(packs, back, file_limit)
    lost = [u.label for u in left if u.required]
    if lost:
        log(f"error: no room for {', '.join(lost)} in {files} files of {file_limit // MIB} MiB: they stay behind")
    unstarted = [u.label for u in left if not u.required]
    if unstarted:
        log(f"warning: no room for the checkpoints of {', '.join(unstarted)} in the packs "
            f"({files} files of {file_limit // MIB} MiB, {budget // MIB} MiB in all): the next call starts them over "
            f"(or finish them in this one: a longer SECONDS)")
    return written, left


def stamp_commit(state: Path, jobs, commit: str | None) -> list[str]:
    """Rows trained in a tree without git (the device's copy) name no commit: give them the one
    prepare recorded. Returns the keys stamped."""
    stamped = []
    if not commit:
        return stamped
    for job in jobs:
        saved = results.finished(job, state)
        if saved and not saved["row"].get("git_commit"):
            saved["row"]["git_commit"] = commit
            results._atomic_write(job.row_path(state), json.dumps(saved, indent=1).encode())
            stamped.append(job.key)
    return stamped


def compare(jobs, seconds: float, back: Path, state: Path = STATE, gpu: Path = GPU, python: str = sys.executable,
            lanes: int | None = None, rerun: bool = False, results_dir: Path | None = None, grace: float = 30.0,
            started: float | None = None, header=(), log=print) -> int:
    """Train ``jobs`` at once (``lanes`` at a time, default all) until ``seconds`` after ``started``
    (time.monotonic(); default now), then pack ``state`` into ``back``. Returns the number of jobs
    that failed (+ 1 when result files did not fit into the packs)."""
    started = time.monotonic() if started is None else started
    lines = list(header)

    def say(message):
        lines.append(message)
        log(message)

    carried = sorted((gpu / "state").glob("*.tar"))
    fresh = not any(state.glob("*/*/checkpoints/*")) and not any(state.glob("*/*/rows/*"))
    if carried and fresh:
        unpack(carried, state)
        say(f"continuing from {', '.join(p.name for p in carried)}")
    elif carried:
        say(f"{state} holds a run already (this machine's last call): the carried packs are not unpacked over it")
    datasets = list(dict.fromkeys(j.dataset for j in jobs))
    results.prepare(state, gpu / "datasets", python, datasets)
    left = seconds - (time.monotonic() - started)
    kwargs = {} if results_dir is None else {"results": results_dir}
    if left > 0:
        say(f"training {len(jobs)} jobs for at most {left:.0f} s: {', '.join(j.key for j in jobs)}")
        failed = results.run_queue(state, jobs, lanes or len(jobs), python, log=say, rerun=rerun, seconds=left,
                                   grace=grace, **kwargs)
    else:
        say(f"no time left to train ({seconds:g} s after the start are past): packing what there is")
        failed = 0
    commit_file = gpu / "commit.txt"
    stamped = stamp_commit(state, jobs, commit_file.read_text().strip() if commit_file.is_file() else None)
    if stamped:
        say(f"rows given the commit of {commit_file}: {', '.join(stamped)}")
    written, left_out = pack(state, back, jobs, log=say)
    lines += ["", results.status(state), "", "back: " + ", ".join(f"{p.name} ({p.stat().st_size / MIB:.1f} MiB)"
                                                                 for p in written)]
    (back / "status.txt").write_text("\n".join(lines) + "\n")
    log("\n".join(lines[-3:]))
    return max(failed, 0) + any(u.required for u in left_out)


# ---- CLI -----------------------------------------------------------------------------------

def _seconds(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"SECONDS must be a whole number > 0, not {text!r}")
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_session.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="here: .whl and .gpu for the next device call")
    pr.add_argument("files_at", nargs="?", type=Path, help="an earlier compare call's files_at: its state resumes")
    pr.add_argument("--shared", type=Path, default=SHARED, help="the folder of SOURCES.md's data files")
    pr.add_argument("--datasets", nargs="+", default=None, metavar="DATASET", help="only these (default: all)")
    k = sub.add_parser("kernels", help="there: the kernel benchmarks, outputs in $OUT")
    c = sub.add_parser("compare", help="there: train results.py's jobs at once, pack for export and resume")
    c.add_argument("seconds", type=_seconds, metavar="SECONDS",
                   help="stop the trainings this long after the command started")
    c.add_argument("datasets", nargs="*", metavar="DATASET", help=f"only these of {', '.join(results.DATASETS)}")
    c.add_argument("--only", nargs="+", default=None, metavar="KEY",
                   help="these jobs (DATASET/MODE/MODEL, any of results.py's) instead of the sequence-mode ones")
    c.add_argument("--lanes", type=int, default=None, help="trainings at a time (default: all at once)")
    c.add_argument("--rerun", action="store_true", help="train the jobs results/ holds too")
    c.add_argument("--state", type=Path, default=STATE, help=f"the run folder (default {STATE})")
    c.add_argument("--cpu", action="store_true", help="run without a CUDA device (to try it on a CPU)")
    for s in (k, c):
        s.add_argument("--back", default=os.environ.get("OUT"), help="where the files to bring back go (default $OUT)")
    e = sub.add_parser("export", help="here: the finished rows of a compare call's packs -> results/")
    e.add_argument("files_at", type=Path)
    e.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu",
                   help="where the packs are unpacked (default benchmarks/out/gpu)")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        if args.cmd == "prepare":
            bad = [d for d in args.datasets or [] if d not in results.DATASETS]
            if bad:
                raise UsageError(f"unknown data set(s) {', '.join(bad)}: one of {', '.join(results.DATASETS)}")
            return prepare(args.files_at, args.shared, whl=WHL, gpu=GPU, datasets=args.datasets)
        if args.cmd == "export":
            written = export(args.files_at, args.out.resolve())
            if written:
                print(f"wrote {len(written)} rows; then: python benchmarks/results.py tables")
            return 0
        if args.cmd == "kernels":
            back = need_back(args.back)
            header = setup_device()
            back.mkdir(parents=True, exist_ok=True)
            (back / "gpu.txt").write_text("\n".join(header) + "\n")
            return 1 if kernels(back) else 0
        jobs = select_jobs(args.datasets, args.only)
        if args.lanes is not None and args.lanes < 1:
            raise UsageError(f"--lanes={args.lanes}: it must be >= 1")
        back = need_back(args.back)
        missing = [str(data_file(GPU, d)) for d in dict.fromkeys(j.dataset for j in jobs)
                   if not data_file(GPU, d).is_file()]
        if missing:
            raise UsageError(f"no {', '.join(missing)}: run prepare on the dev machine and carry .gpu")
        header = setup_device(cpu=args.cpu)
        back.mkdir(parents=True, exist_ok=True)
        failed = compare(jobs, args.seconds, back, state=args.state.resolve(), lanes=args.lanes, rerun=args.rerun,
                         started=started, header=header, log=lambda m: print(m, flush=True))
        return 1 if failed else 0
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
