"""``python -m mamba4rec.selfcheck``: the options, the shapes for each device, the run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .correctness import ScanCase

#: What the interpreter (CPU) checks the Triton kernels on: tiny shapes, a partial chunk and
#: odd sizes; the interpreter runs the kernels' code in numpy, orders of magnitude slower.
TINY_CASES = (ScanCase("tiny", 2, 8, 4, 16), ScanCase("odd", 1, 5, 3, 7, h0=True))


@dataclass(frozen=True)
class Profile:
    """The sizes of one run: correctness cases, the timed scan shape and repeats, the bandwidth
    probe's tensor, the training shape and steps."""
    cases: tuple
    timing: ScanCase
    reps: int
    bandwidth_mib: int
    train_batch: int
    train_L: int
    n_items: int
    steps: int
    time_ref_backward: bool = True


PROFILES = {
    # One data-center GPU: Mamba4Rec's own scan (d_inner 128, d_state 32) at ML-1M's length 200;
    # the correctness cases keep the fp32 reference's saved graph small, one has odd sizes.
    "cuda": Profile(cases=(ScanCase("model", 16, 128, 32, 200), ScanCase("odd", 3, 50, 7, 37, h0=True)),
                    timing=ScanCase("timing", 256, 128, 32, 200), reps=20, bandwidth_mib=1024,
                    train_batch=256, train_L=200, n_items=3417, steps=300),
    # A few CPU cores: the same channel and state sizes, fewer sequences, and training at the
    # Amazon data sets' length 50 over ml-100k's item count. The reference loop's backward is not
    # timed: at every step it builds a gradient of B and C as large as all of B and C broadcast
    # over the channels, (batch, dim, N, L), so it costs L times a full pass (tens of seconds here).
    "cpu": Profile(cases=(ScanCase("model", 8, 128, 32, 200), ScanCase("odd", 3, 50, 7, 37, h0=True)),
                   timing=ScanCase("timing", 16, 128, 32, 200), reps=5, bandwidth_mib=256,
                   train_batch=128, train_L=50, n_items=1683, steps=200, time_ref_backward=False),
    # --quick: seconds anywhere (a smoke test of the check itself).
    "quick": Profile(cases=TINY_CASES, timing=ScanCase("timing", 4, 16, 8, 32), reps=2, bandwidth_mib=16,
                     train_batch=8, train_L=12, n_items=50, steps=5),
}


REF_BACKWARD_UNTIMED = ("not timed on CPU: the reference loop's backward builds a (batch, dim, N, L) gradient of "
                        "B and C at each of the L steps")


class UsageError(Exception):
    """A bad option: printed as ``error: ...`` with exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mamba4rec.selfcheck",
        description="Check every selective-scan path and the streaming step on this device against the fp32 "
                    "reference (outputs, last state, all gradients), time each path against the torch scan and "
                    "the memory-traffic bound, and train Mamba4Rec beside SASRec. Exits 1 when a check fails.")
    p.add_argument("--out", type=Path, default=Path("selfcheck"),
                   help="folder for selfcheck.json and selfcheck.md (default ./selfcheck)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees one, else cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per model and precision (default 300 on CUDA, 200 on CPU, 5 with "
                        "--quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 5 steps: seconds, a smoke test")
    p.add_argument("--triton-interpreter", action="store_true",
                   help="CPU only: also check the Triton kernels through Triton's interpreter, on tiny shapes "
                        "(also on when TRITON_INTERPRET=1 is set before the start)")
    return p.parse_args(argv)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: the self-check runs on cpu or cuda (the scan paths' devices)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}, but torch {torch.__version__} sees no CUDA device "
                             f"(built with CUDA {torch.version.cuda}): use --device cpu, or install a CUDA build "
                             f"of torch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name!r}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def plan(device, triton_interpreter: bool):
    """(scan paths, step paths, skipped): path -> its cases (None: the profile's), and the paths
    not checked here with the reason."""
    from mamba4rec.kernels import numba_scan, triton_status

    scan, step, skipped = {}, {}, []
    interp = device.type == "cpu" and (triton_interpreter or _interpreting())
    if device.type == "cuda" or interp:
        ok, why = triton_status()
        if ok:
            cases = TINY_CASES if interp else None
            scan["triton"], step["triton"] = cases, cases
        else:
            skipped += [{"kind": k, "path": "triton", "reason": why} for k in ("scan", "step")]
    else:
        why = ("the Triton kernels run on CPU only through Triton's interpreter, far too slowly for real "
               "shapes: --triton-interpreter checks them on tiny shapes")
        skipped += [{"kind": k, "path": "triton", "reason": why} for k in ("scan", "step")]
    if device.type == "cpu":
        if numba_scan.available():
            scan["numba"] = None
        else:
            skipped.append({"kind": "scan", "path": "numba", "reason": 'numba is not installed: pip install '
                                                                      '"mamba4rec-recbole[fast]"'})
    scan["torch"], scan["ref"], step["torch"] = None, None, None
    return scan, step, skipped


def main(argv=None, log=None) -> int:
    log = log or (lambda m: print(m, flush=True))
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"--steps {args.steps}: it must be at least 1")
        device = resolve_device(args.device)
        if device.type == "cuda" and (args.triton_interpreter or _interpreting()):
            raise UsageError("TRITON_INTERPRET=1 (or --triton-interpreter) with a CUDA device would interpret the "
                             "Triton kernels instead of compiling them: unset it, or use --device cpu")
        if args.triton_interpreter and not _interpreting():
            if "triton" in sys.modules:
                raise UsageError("--triton-interpreter: triton was imported before TRITON_INTERPRET=1 could be set; "
                                 "run with TRITON_INTERPRET=1 in the environment instead")
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: Triton reads it at decoration
        try:  # now, not after minutes of checks
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {str(args.out)!r}: cannot create the report folder ({exc.strerror or exc}): "
                             f"give a writable folder") from None
        return run(args, device, started, log)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, device, started: float, log) -> int:
    import torch

    from . import correctness, report, timing, training

    prof = PROFILES["quick" if args.quick else device.type]
    steps = args.steps or prof.steps
    dtypes = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    scan_paths, step_paths, skipped = plan(device, args.triton_interpreter)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = report.environment(device)
    log(f"mamba4rec self-check on {device} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, "
        f"{env['torch_threads']} threads")
    for sk in skipped:
        log(f"  not checked: {sk['kind']} {sk['path']}: {sk['reason']}")
    log("correctness against the fp32 reference:")
    entries = correctness.run_checks(scan_paths, step_paths, dtypes, prof.cases, device, log=log)
    log("scan speed:")
    bandwidth = timing.measure_bandwidth(device, prof.bandwidth_mib)
    log(f"  copy bandwidth {bandwidth['gbps']:.1f} GB/s")
    timed = [p for p, cases in scan_paths.items() if cases is None]  # not the interpreter's tiny cases
    if len(timed) < len(scan_paths):
        skipped.append({"kind": "timing", "path": "triton", "reason": "interpreted on CPU: its time means nothing"})
    rows = timing.time_scans(timed, dtypes, prof.timing, device, bandwidth, prof.reps, log=log,
                             skip={} if prof.time_ref_backward else {("ref", "fwd+bwd"): REF_BACKWARD_UNTIMED})
    log(f"training ({steps} steps each):")
    shape = training.TrainShape(prof.train_batch, prof.train_L, prof.n_items)
    # On CPU (not --quick) each training gets a process of its own: clean resident-memory figures.
    isolate = device.type == "cpu" and not args.quick
    trained = training.run_training(shape, steps, dtypes, device, log=log, isolate=isolate)
    rep = {"schema": report.SCHEMA, "command": " ".join(["python -m mamba4rec.selfcheck", *argv_of(args)]),
           "device": str(device), "environment": env,
           "settings": {"profile": "quick" if args.quick else device.type, "dtypes": list(dtypes), "steps": steps,
                        "cases": [asdict(c) for c in prof.cases], "timing_shape": prof.timing.shape(),
                        "timing_reps": prof.reps, "train_shape": shape.as_dict(), "train_processes": isolate,
                        "triton_interpreter": bool(device.type == "cpu" and _interpreting())},
           "correctness": entries, "skipped": skipped, "bandwidth": bandwidth, "timing": rows, "training": trained}
    rep["failures"] = report.verdict(rep)
    rep["passed"] = not rep["failures"]
    rep["seconds"] = time.perf_counter() - started
    js, md = report.write(rep, args.out)
    log("")
    log(md.read_text())
    log(f"wrote {js} and {md}")
    return 0 if rep["passed"] else 1


def argv_of(args) -> list[str]:
    """The options as given, for the report's command line."""
    out = []
    if args.device:
        out += ["--device", args.device]
    if args.quick:
        out.append("--quick")
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    if args.triton_interpreter:
        out.append("--triton-interpreter")
    if args.out != Path("selfcheck"):
        out += ["--out", str(args.out)]
    return out
