"""Speed half of the self-check: each scan path's time against the torch scan's and against the
memory-traffic bound of the scan on this device.

The bound is the time it takes just to move the bytes a scan cannot avoid, at a bandwidth
measured here (the best of several copies of a tensor far larger than any cache):

    fwd      reads u, delta, z, B, C, A, D, delta_bias; writes out
             (4*b*d*L + 2*b*N*L) * s + (d*N + 2*d) * 4
    bwd      reads u, delta, z, B, C, dout and the weights; writes du, ddelta, dz, dB, dC, dA, dD,
             ddelta_bias:  (7*b*d*L + 4*b*N*L) * s + 2 * (d*N + 2*d) * 4
    fwd+bwd  the sum

with s the element size of u (the weights are fp32). "x bound" = measured time / bound time:
1 would be a scan running at copy speed; the states (b*d*N per step) never need to reach memory,
so a good kernel stays within a small factor of it.
"""

from __future__ import annotations

import statistics
import time

import torch

from mamba4rec import kernels

from .correctness import DTYPES, NAMES, ScanCase, make_inputs

MODES = ("fwd", "fwd+bwd")


def compulsory_bytes(case: ScanCase, elem: int) -> dict[str, int]:
    bdl, bnl = case.batch * case.dim * case.L, case.batch * case.N * case.L
    weights = (case.dim * case.N + 2 * case.dim) * 4
    fwd = (4 * bdl + 2 * bnl) * elem + weights
    bwd = (7 * bdl + 4 * bnl) * elem + 2 * weights
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps: int, warmup: int = 1, budget_s: float = 3.0) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` calls after ``warmup`` untimed ones (the
    first call compiles: Triton's kernels, numba's scan); CUDA calls are synchronised. Stops
    early, after at least one timed call, once ``budget_s`` seconds were spent timing (the fp32
    reference loop's backward takes seconds on a CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    while len(times) < reps and (not times or sum(times) < budget_s * 1e3):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_bandwidth(device, mib: int, reps: int = 10) -> dict:
    """Copy bandwidth of this device: ``dst.copy_(src)`` of ``mib`` MiB reads and writes
    2 * mib MiB; the best of ``reps`` copies (a copy is the fastest a scan could move its bytes)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    if not torch.equal(dst[:: max(1, n // 1024)], src[:: max(1, n // 1024)]):
        raise RuntimeError(f"the bandwidth probe's copy on {device} is wrong: this device's memory is unreliable")
    moved = 2 * n * 4
    return {"bytes": moved, "ms": best * 1e3, "gbps": moved / best / 1e9, "tensor_mib": mib}


def _scan_call(fn, x: dict, mode: str, gout: torch.Tensor):
    def fwd():
        return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
                  delta_softplus=True)

    if mode == "fwd":
        return fwd
    return lambda: torch.autograd.grad(fwd(), [x[n] for n in NAMES], gout)


def time_scans(paths, dtypes, case: ScanCase, device, bandwidth: dict, reps: int, log=print,
               skip: dict | None = None) -> list[dict]:
    """Each (path, dtype, mode): ms, ms / the torch scan's, and ms / the memory-traffic bound.
    ``skip``: (path, mode) -> why it is not timed (kept as the row's note)."""
    skip = skip or {}
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        nbytes = compulsory_bytes(case, torch.empty((), dtype=dtype).element_size())
        x = {k: v.requires_grad_() for k, v in make_inputs(case, dtype, device).items()}
        gout = torch.randn(case.batch, case.dim, case.L, device=device).to(dtype)
        for mode in MODES:
            bound_ms = nbytes[mode] / (bandwidth["gbps"] * 1e9) * 1e3
            for path in paths:
                row = {"path": path, "dtype": dtype_name, "mode": mode, "shape": case.shape(),
                       "bytes": nbytes[mode], "bound_ms": bound_ms, "ms": None, "x_torch": None, "x_bound": None,
                       "error": None, "note": skip.get((path, mode))}
                if row["note"]:
                    rows.append(row)
                    continue
                try:
                    row["ms"] = time_ms(_scan_call(kernels.get_scan_fn(path), x, mode, gout), device, reps)
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"out of memory at this shape ({str(exc).splitlines()[0][:200]})"
                    torch.cuda.empty_cache()
                except Exception as exc:  # timing is informative: the correctness half judges the path
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                if row["ms"] is not None:
                    row["x_bound"] = row["ms"] / bound_ms
                rows.append(row)
            torch_ms = next((r["ms"] for r in rows if r["path"] == "torch" and r["dtype"] == dtype_name
                             and r["mode"] == mode), None)
            for r in rows:
                if r["dtype"] == dtype_name and r["mode"] == mode and r["ms"] is not None and torch_ms:
                    r["x_torch"] = r["ms"] / torch_ms
            for r in rows[-len(paths):]:
                log(f"  {r['path']:6s} {dtype_name} {mode:8s} " + (
                    f"{r['ms']:9.3f} ms  {r['x_torch']:.2f}x torch  {r['x_bound']:.1f}x bound"
                    if r["ms"] is not None and r["x_torch"] is not None else
                    f"{r['ms']:9.3f} ms  {r['x_bound']:.1f}x bound" if r["ms"] is not None else
                    r["error"] or r["note"]))
        del x, gout
    return rows
