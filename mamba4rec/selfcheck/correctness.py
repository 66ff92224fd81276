"""Correctness half of the self-check: every scan path and every ``update_state`` path against
selective_scan_ref (the fp32 loop, mamba4rec/kernels/reference.py), at the tolerances of
mamba4rec/kernels/tolerances.py.

A scan is run forward with ``return_last_state=True`` (a case with ``h0`` starts from a random
initial state, as train_mode=history's chunks do), then random upstream gradients for the
output and the last state are backpropagated into every input; output, last state and each
gradient (u, delta, A, B, C, D, z, delta_bias, and initial_state) must lie within the path's (rtol, atol),
element by element as torch.isclose reads it. A step path folds the same inputs into the same
state (zeros without ``h0``) one time step at a time; its outputs and final state must match the scan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba4rec import kernels
from mamba4rec.kernels.reference import selective_scan_ref
from mamba4rec.kernels.tolerances import tol

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class ScanCase:
    """One input shape: u, delta, z (batch, dim, L); B, C (batch, N, L); A (dim, N); D, bias (dim,);
    with ``h0`` also an initial state (batch, dim, N)."""
    name: str
    batch: int
    dim: int
    N: int
    L: int
    h0: bool = False

    def shape(self) -> dict:
        return {"batch": self.batch, "dim": self.dim, "N": self.N, "L": self.L, "initial_state": self.h0}


def make_inputs(case: ScanCase, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Scan inputs as a Mamba block passes them: u, delta, B, C, z in ``dtype``; A, D and
    delta_bias in fp32 (fp64 for fp64). Drawn on CPU from ``seed`` in fp64, then cast and moved,
    so every dtype and device sees the same values up to rounding."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, L = case.batch, case.dim, case.N, case.L
    wtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dt)

    x = dict(u=rnd(b, d, L), delta=rnd(b, d, L, scale=0.5, shift=-0.5),
             A=(-torch.rand(d, n, generator=g, dtype=torch.float64) - 0.2).to(device, wtype),
             B=rnd(b, n, L), C=rnd(b, n, L), D=rnd(d, dt=wtype), z=rnd(b, d, L),
             delta_bias=rnd(d, scale=0.3, dt=wtype))
    if case.h0:
        x["initial_state"] = rnd(b, d, n, dt=wtype)
    return x


def run_scan(fn, x: dict, seed: int = 1):
    """(out, last_state, {name: gradient}) of fn on leaf copies of ``x``, backpropagating
    seeded random gradients for out and the last state."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    h0 = {"initial_state": leaves["initial_state"]} if "initial_state" in leaves else {}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                   z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True, **h0)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    glast = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.device, last.dtype)
    names = [n for n in (*NAMES, "initial_state") if n in leaves]
    grads = torch.autograd.grad([out, last], [leaves[n] for n in names], [gout, glast], allow_unused=True)
    missing = [n for n, gr in zip(names, grads) if gr is None]
    if missing:
        raise RuntimeError(f"no gradient reached {', '.join(missing)}")
    return out.detach(), last.detach(), dict(zip(names, grads))


def compare(quantity: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> dict:
    """One entry of the report: |got - want| against atol + rtol * |want|, elementwise.

    ``worst`` is the largest |got - want| / (atol + rtol * |want|): at most 1 passes."""
    entry = {"quantity": quantity, "rtol": rtol, "atol": atol}
    if got.shape != want.shape:
        return {**entry, "passed": False, "max_abs_diff": None, "worst": None,
                "error": f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"}
    a, e = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(a).all():
        bad = int((~torch.isfinite(a)).sum())
        return {**entry, "passed": False, "max_abs_diff": None, "worst": None,
                "error": f"{bad} non-finite value(s) of {a.numel()}"}
    diff = (a - e).abs()
    worst = float((diff / (atol + rtol * e.abs())).max()) if diff.numel() else 0.0
    return {**entry, "passed": worst <= 1.0, "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
            "worst": worst}


def _entry(kind, path, dtype_name, case, checks=None, error=None):
    checks = checks or []
    passed = error is None and bool(checks) and all(c["passed"] for c in checks)
    return {"kind": kind, "path": path, "dtype": dtype_name, "case": case.name, "shape": case.shape(),
            "passed": passed, "worst": max((c["worst"] for c in checks if c["worst"] is not None), default=None),
            "checks": checks, "error": error}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def reference(x: dict, fp64: bool, cache: dict | None, key) -> tuple:
    """selective_scan_ref's run_scan of ``x`` (on CPU in fp64 when ``fp64``), kept in ``cache``
    under ``key``: every path of a (dtype, case) is compared with the one reference run."""
    if cache is not None and (key, fp64) in cache:
        return cache[(key, fp64)]
    xs = {k: v.detach().cpu().double() for k, v in x.items()} if fp64 else x
    result = run_scan(selective_scan_ref, xs)
    if cache is not None:
        cache[(key, fp64)] = result
    return result


def check_scan(path: str, dtype_name: str, case: ScanCase, device, cache: dict | None = None) -> dict:
    """Scan path ``path`` in ``dtype_name`` against selective_scan_ref on the same inputs.

    "ref" itself is checked on the device against the reference run on CPU in fp64 from the same
    values (tolerance "torch_fp64", gradients' atol scaled by max(1, max |fp64 gradient|))."""
    dtype = DTYPES[dtype_name]
    x = make_inputs(case, dtype, device)
    table = "torch_fp64" if path == "ref" else path
    try:
        got = run_scan(kernels.get_scan_fn(path), x)
        want = reference(x, path == "ref", cache, (dtype_name, case))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a path that raises on this device is a failed path, not a crash
        return _entry("scan", path, dtype_name, case, error=_error_text(exc))
    (out, last, grads), (out_r, last_r, grads_r) = got, want
    checks = [compare("out", out, out_r, *tol(table, dtype, "out")),
              compare("last_state", last, last_r, *tol(table, dtype, "last_state"))]
    for name in grads_r:
        rtol, atol = tol(table, dtype, "d" + name)
        if path == "ref":
            atol *= max(1.0, float(grads_r[name].abs().max()))
        checks.append(compare("d" + name, grads[name], grads_r[name], rtol, atol))
    return _entry("scan", path, dtype_name, case, checks)


def check_step(path: str, dtype_name: str, case: ScanCase, device) -> dict:
    """``update_state(impl=path)`` stepped over the case's sequence from its initial state (zeros
    without ``h0``), against
    selective_scan_ref's output and last state on the same inputs (tolerance "step_triton" for
    the Triton kernel, "step_ref" for the torch step)."""
    dtype = DTYPES[dtype_name]
    table = "step_triton" if path == "triton" else "step_ref"
    x = {k: v.detach() for k, v in make_inputs(case, dtype, device).items()}
    try:
        with torch.no_grad():
            want_out, want_last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                                     delta_bias=x["delta_bias"], delta_softplus=True,
                                                     return_last_state=True, initial_state=x.get("initial_state"))
            state = (x["initial_state"].float().clone() if case.h0 else
                     torch.zeros(case.batch, case.dim, case.N, device=device, dtype=torch.float32))
            outs = [kernels.update_state(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                         x["C"][..., t], D=x["D"], z=x["z"][..., t], dt_bias=x["delta_bias"],
                                         dt_softplus=True, impl=path)
                    for t in range(case.L)]
            got_out = torch.stack(outs, dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:
        return _entry("step", path, dtype_name, case, error=_error_text(exc))
    checks = [compare("out", got_out, want_out, *tol(table, dtype, "out")),
              compare("last_state", state, want_last, *tol(table, dtype, "last_state"))]
    return _entry("step", path, dtype_name, case, checks)


def run_checks(scan_paths, step_paths, dtypes, cases, device, log=print) -> list[dict]:
    """Every (path, dtype, case) of the scan, then of the step; each logged as it finishes."""
    entries, cache = [], {}
    for kind, paths in (("scan", scan_paths), ("step", step_paths)):
        for path, path_cases in paths.items():
            for dtype_name in dtypes:
                for case in path_cases or cases:
                    e = (check_scan(path, dtype_name, case, device, cache) if kind == "scan" else
                         check_step(path, dtype_name, case, device))
                    entries.append(e)
                    log(f"  {kind:4s} {path:6s} {dtype_name} {case.name:6s} "
                        f"{'ok  ' if e['passed'] else 'FAIL'} {describe(e)}")
    return entries


def describe(entry: dict) -> str:
    """One line: the worst quantity as a fraction of its tolerance, or what failed."""
    if entry["error"]:
        return entry["error"]
    failed = [c for c in entry["checks"] if not c["passed"]]
    if failed:
        return "; ".join(f"{c['quantity']}: " + (c.get("error") or f"{c['worst']:.3g}x tolerance (max |diff| "
                                                 f"{c['max_abs_diff']:.3g}, rtol {c['rtol']:g}, atol {c['atol']:g})")
                         for c in failed)
    worst = max(entry["checks"], key=lambda c: c["worst"])
    return f"worst: {worst['quantity']} at {worst['worst']:.3g}x its tolerance"
