"""CPU micro-benchmark of the selective scans: the torch scan (kernels.torch_scan), the numba scan
(kernels.numba_scan, also as it was at any git revision) and selective_scan_ref.

Times forward, backward and forward+backward (median of --repeats after one warm-up) and
the peak RSS growth over each call (a sampling thread reading /proc/self/statm; the largest over
the warm-up and the timed runs), with the arguments a MambaBlock passes (D, z, delta_bias,
delta_softplus=True). The implementations of a shape run interleaved, one call each in turn (the
order reversed every other round), so that they share the machine's conditions; the peak RSS
growth then compares only across runs of one implementation each (the first to run pays for
what the allocator keeps and the others reuse). Prints the environment and writes one CSV row
per (impl, shape, budget).

    python -m benchmarks.bench_scan_cpu                          # default shapes, default budget
    python -m benchmarks.bench_scan_cpu --shapes 2048x128x32x50 --budgets 8,16,32,64 --no-ref
    python -m benchmarks.bench_scan_cpu --impls numba@HEAD,numba --threads 1 --shapes 22x128x32x200

``--impls``: torch, numba, ref, or numba@REV: mamba4rec/kernels/numba_scan.py as committed at git
revision REV, imported under another module name (it must take the arguments this checkout's
scan contract passes), to set a change of the numba scan against what it replaces in one process.

Shapes are BATCHxDIMxNxL. The reference keeps every step for autograd (about 4 tensors of
batch*dim*N per step), so it runs only where batch*dim*L*N <= --ref-max-numel.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


from mamba4rec.kernels import torch_scan  # noqa: E402
from mamba4rec.pipeline import cpu_name  # noqa: E402
from mamba4rec.kernels.reference import selective_scan_ref  # noqa: E402
from mamba4rec.memory import PeakMemory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = "2048x128x32x50,2048x128x32x200,64x64x16x50"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def make_inputs(batch, dim, N, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, delta, z = r(batch, dim, L), r(batch, dim, L) * 0.5 - 1.0, r(batch, dim, L)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1)  # S4D-real init, as Mamba
    B, C = r(batch, N, L), r(batch, N, L)
    D, bias = torch.ones(dim), r(dim) * 0.1
    tensors = [u.to(dtype), delta.to(dtype), A, B.to(dtype), C.to(dtype), D, z.to(dtype), bias]
    return [t.requires_grad_() for t in tensors]


def run_once(fn, xs):
    for x in xs:
        x.grad = None
    t0 = time.perf_counter()
    out = fn(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True)
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def numba_at(rev: str):
    """selective_scan_numba from mamba4rec/kernels/numba_scan.py as committed at git revision ``rev``,
    as module mamba4rec.kernels._numba_scan_<sha> (its relative imports resolve in this checkout's
    kernels). The file is written to the temp folder once per commit, so numba's cache keeps it."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    src = subprocess.run(["git", "show", f"{sha}:mamba4rec/kernels/numba_scan.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.gettempdir()) / "mamba4rec-bench" / f"numba_scan_{sha}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != src:
        path.write_text(src)
    name = f"mamba4rec.kernels._numba_scan_{sha}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return sha, mod.selective_scan_numba


def bench(runs, xs, repeats, dtype):
    """{name: (fwd, bwd, fwd+bwd medians in s, peak RSS growth in bytes)} for runs [(name, fn)]:
    a first call of each on a tiny input (numba compiles or loads its kernels), untimed; then one
    warm-up call of each at this shape (allocator, thread pool), then ``repeats`` rounds."""
    tiny = make_inputs(2, 4, 3, 5, dtype)
    for _, fn in runs:
        run_once(fn, tiny)
    fwd = {name: [] for name, _ in runs}
    bwd = {name: [] for name, _ in runs}
    mem = dict.fromkeys(fwd, 0.0)
    for r in range(repeats + 1):
        for name, fn in (runs if r % 2 else runs[::-1]):
            with PeakMemory(interval=0.001) as m:
                f, b = run_once(fn, xs)
            mem[name] = max(mem[name], m.growth_mib * 2**20)
            if r:  # round 0 is the warm-up
                fwd[name].append(f)
                bwd[name].append(b)
    return {name: (statistics.median(fwd[name]), statistics.median(bwd[name]),
                   statistics.median([f + b for f, b in zip(fwd[name], bwd[name])]), mem[name])
            for name, _ in runs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BATCHxDIMxNxL")
    p.add_argument("--budgets", default="", help="comma list of workspace budgets in MiB "
                   "('auto' or default: the module's default rule, WORKSPACE_BYTES = "
                   f"{torch_scan.WORKSPACE_BYTES >> 20} MiB raised to MIN_STEP_ELEMS per step)")
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--impls", default="torch,ref", help="comma list of torch, numba, ref, numba@REV "
                   "(the numba scan as committed at git revision REV), timed interleaved")
    p.add_argument("--no-ref", action="store_true", help="skip the reference")
    p.add_argument("--ref-max-numel", type=float, default=1.1e8,
                   help="run the reference only where batch*dim*L*N is at most this")
    p.add_argument("--csv", default=str(Path(__file__).resolve().parent / "out" / "scan_cpu.csv"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = _DTYPES[a.dtype]
    budgets = [None if b == "auto" else int(float(b) * 2**20) for b in a.budgets.split(",") if b] or [None]

    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | cpu {cpu_name()} "
          f"x{os.cpu_count()} | python {platform.python_version()} | load avg "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    impls = [x for x in a.impls.split(",") if x and not (a.no_ref and x == "ref")]
    fns = {}
    for impl in impls:
        if impl == "numba":
            from mamba4rec.kernels.numba_scan import selective_scan_numba
            fns[impl] = selective_scan_numba
        elif impl.startswith("numba@"):
            sha, fns[impl] = numba_at(impl.split("@", 1)[1])
            print(f"{impl}: mamba4rec/kernels/numba_scan.py at {sha}")
        elif impl not in ("torch", "ref"):
            p.error(f"unknown impl {impl!r}")
    rows = []
    hdr = (f"{'impl':<14} {'shape BxDxNxL':<18} {'budget':>7} {'bb f/b':>8} {'fwd s':>8} {'bwd s':>8} {'f+b s':>8} "
           f"{'peak MiB':>9} {'1st/this':>8}")
    print(hdr)
    for spec in a.shapes.split(","):
        batch, dim, N, L = (int(x) for x in spec.lower().split("x"))
        xs = make_inputs(batch, dim, N, L, dtype)
        runs = []  # (name, fn, budget shown, blocks shown, budget)
        for impl in impls:
            if impl == "torch":
                for budget in budgets:
                    isz = 8 if dtype == torch.float64 else 4
                    bbf = torch_scan._block_size(batch, L, dim, N, 2, isz, budget)
                    bbb = torch_scan._block_size(batch, L, dim, N, 3, isz, budget)
                    fn = partial(torch_scan.selective_scan_torch, workspace_bytes=budget)
                    shown = "auto" if budget is None else f"{budget / 2**20:g}M"
                    runs.append((f"torch[{shown}]" if len(budgets) > 1 else "torch", fn, shown, f"{bbf}/{bbb}",
                                 "auto" if budget is None else budget))
            elif impl == "ref":
                if batch * dim * L * N <= a.ref_max_numel:
                    runs.append(("ref", selective_scan_ref, "-", "-", ""))
                else:
                    print(f"ref    {spec:<18} skipped: batch*dim*L*N = {batch * dim * L * N:.3g} > --ref-max-numel")
            else:
                runs.append((impl, fns[impl], "-", "-", ""))
        results = bench([(r[0], r[1]) for r in runs], xs, a.repeats, dtype)
        first = results[runs[0][0]][2] if runs else None
        for name, _, bshow, bbshow, budget in runs:
            f, b, t, mem = results[name]
            print(f"{name:<14} {spec:<18} {bshow:>7} {bbshow:>8} {f:8.3f} {b:8.3f} {t:8.3f} {mem / 2**20:9.1f} "
                  f"{first / t:8.2f}", flush=True)
            rows.append(dict(impl=name, batch=batch, dim=dim, N=N, L=L, dtype=a.dtype,
                             budget_bytes=budget, block_fwd_bwd=bbshow, threads=torch.get_num_threads(),
                             fwd_s=f"{f:.4f}", bwd_s=f"{b:.4f}", fwd_bwd_s=f"{t:.4f}",
                             peak_rss_delta_mib=f"{mem / 2**20:.1f}", torch=torch.__version__,
                             cpu=cpu_name()))
        del xs
    out = Path(a.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["impl"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
