"""The one harness of the selective-scan tests: the Triton interpreter switch, case ids, input
makers, the tolerance table (mamba4rec/kernels/tolerances.py), and the comparison of outputs and gradients.

Every scan and step test (test_scan_reference, test_scan_torch, test_scan_numba,
test_scan_triton, test_state_update, test_properties) takes its inputs from ``make_inputs`` /
``make_step_inputs`` and its tolerances from ``TOLERANCES``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

# The one tolerance table lives in the package: `python -m mamba4rec.selfcheck` holds a user's
# device to the same figures as these tests.
from mamba4rec.kernels.tolerances import GRADCHECK_EPS, TOLERANCES, tol  # noqa: F401

ON_CUDA = torch.cuda.is_available()
#: Where the Triton kernels run: the GPU, or the CPU through Triton's interpreter.
TRITON_DEVICE = "cuda" if ON_CUDA else "cpu"


def enable_triton_interpreter() -> str | None:
    """Without CUDA, set TRITON_INTERPRET=1 so the Triton kernels run on CPU; return why they
    cannot run here (None when they can).

    Call it before triton is imported: Triton reads the variable when a kernel is decorated and
    again while interpreting, so it stays set for the rest of the pytest process. That changes
    nothing else: scan_impl=auto picks the numba or torch scan for CPU tensors regardless, only
    an explicit scan_impl=triton uses the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: the Triton kernels are optional"
    if not ON_CUDA:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return ("triton was imported before TRITON_INTERPRET=1 could be set and there is no CUDA: "
                    "run with TRITON_INTERPRET=1 in the environment")
        os.environ["TRITON_INTERPRET"] = "1"
    return None


def assert_close(what: str, actual, expected, path: str, dtype: torch.dtype, *, key: str | None = None,
                 atol_scale: float = 1.0):
    """Same shape and dtype, then within tol(path, dtype, key or what), atol times atol_scale;
    prints max / mean abs diff."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    rtol, atol = tol(path, dtype, key or what)
    diff = (a - e).abs()
    print(f"{what:>12}: max diff {diff.max().item():.3e}  mean diff {diff.mean().item():.3e}  "
          f"max |ref| {e.abs().max().item():.3e}  ({path}: rtol {rtol:g}, atol {atol * atol_scale:g})")
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * atol_scale, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- cases and inputs

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
               torch.bfloat16: "bf16"}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclass(frozen=True)
class Case:
    batch: int
    L: int
    dim: int
    N: int
    G: int = 0             # 0: B/C as (batch, N, L); >= 1: grouped (batch, G, N, L)
    dtype: torch.dtype = torch.float32
    z: bool = True
    D: bool = True
    bias: bool = True
    softplus: bool = True
    use_last: bool = True  # the loss also reads the last state (a gradient flows into it)
    h0: bool = False       # the scan starts from a random initial_state (a gradient flows into it)

    @property
    def id(self) -> str:
        g = "G1" if self.G == 0 else f"G{self.G}-4d"
        s = f"B{self.batch}-L{self.L}-D{self.dim}-N{self.N}-{g}-{DTYPE_NAMES[self.dtype]}"
        flags = [n for n, on in (("z", self.z), ("D", self.D), ("bias", self.bias),
                                 ("softplus", self.softplus)) if not on]
        s += "-no_" + "_".join(flags) if flags else ""
        return s + ("" if self.use_last else "-outonly") + ("-h0" if self.h0 else "")


LAYOUTS = ("contiguous", "transposed", "model")


def make_inputs(case: Case, seed: int = 0, layout: str = "contiguous", device="cpu", positive_dt: bool = False):
    """Scan arguments as a dict. u, delta, B, C, z in case.dtype; A, D, delta_bias in the
    weight dtype (fp32, fp64 for fp64), as a MambaBlock passes them. All are leaves that require
    grad. Drawn on CPU from ``seed``, then moved to ``device``.

    layout: "contiguous"; "transposed": the same kind of values drawn with the last two axes
    swapped and transposed back (A too), D and delta_bias strided; "model": the contiguous
    values as a (B, L, D) model lays them out: u, delta, z views of (B, L, D) storage, B, C of
    (B, L, G, N) (or (B, L, N)), A of (N, D).
    positive_dt: without softplus, dt = delta + bias as given is kept positive, as Mamba's
    always is (|delta| + 0.1, |bias|)."""
    assert layout in LAYOUTS, layout
    g = torch.Generator().manual_seed(seed)
    itype = case.dtype
    wtype = torch.float64 if itype == torch.float64 else torch.float32
    b, d, L, N, G = case.batch, case.dim, case.L, case.N, case.G
    swap = layout == "transposed"

    def rnd(*shape, dtype, scale=1.0, shift=0.0):
        if swap:  # same distribution, laid out with the last two axes swapped
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64)
            t = (t * scale + shift).to(dtype).transpose(-1, -2)
            assert not t.is_contiguous() or min(shape[-2:]) == 1
            return t
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc_shape = (b, N, L) if G == 0 else (b, G, N, L)
    x = dict(
        u=rnd(b, d, L, dtype=itype),
        delta=rnd(b, d, L, dtype=itype, scale=0.5, shift=-0.5 if case.softplus else 0.5),
        A=-torch.rand(d, N, generator=g, dtype=torch.float64).add(0.2).to(wtype),
        B=rnd(*bc_shape, dtype=itype),
        C=rnd(*bc_shape, dtype=itype),
        D=rnd(d, 1, dtype=wtype)[:, 0] if case.D else None,
        z=rnd(b, d, L, dtype=itype) if case.z else None,
        delta_bias=(rnd(d, 1, dtype=wtype, scale=0.3)[:, 0] if case.bias else None),
    )
    # drawn last, so the other inputs of a case are the same with or without it
    x["initial_state"] = rnd(b, d, N, dtype=wtype) if case.h0 else None
    if positive_dt and not case.softplus:
        x["delta"] = x["delta"].abs() + 0.1
        if x["delta_bias"] is not None:
            x["delta_bias"] = x["delta_bias"].abs()
    if swap:
        x["A"] = x["A"].t().contiguous().t()
        for k in ("D", "delta_bias"):
            if x[k] is not None:
                x[k] = x[k].repeat_interleave(2)[::2]
    x = {k: (v.to(device) if v is not None else None) for k, v in x.items()}
    if layout == "model":
        for k in ("u", "delta", "z"):  # (B, D, L) views of (B, L, D) storage
            if x[k] is not None:
                x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        for k in ("B", "C"):  # (B, G, N, L) views of (B, L, G, N) storage
            x[k] = (x[k].transpose(1, 2).contiguous().transpose(1, 2) if G == 0 else
                    x[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1))
        x["A"] = x["A"].t().contiguous().t()
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}


def make_step_inputs(case: Case, seed: int = 0, device="cpu"):
    """Arguments of one step (kernels.selective_state_update*), as keyword arguments: time step
    0 of make_inputs(case) (so case.L must be 1), and a random fp32 state (batch, dim, N)."""
    assert case.L == 1, "a step reads one time step"
    x = {k: (v.detach()[..., 0] if v is not None and k in ("u", "delta", "B", "C", "z") else
             (v.detach() if v is not None else None))
         for k, v in make_inputs(case, seed).items()}
    g = torch.Generator().manual_seed(seed + 1000)
    args = dict(state=torch.randn(case.batch, case.dim, case.N, generator=g), x=x["u"], dt=x["delta"], A=x["A"],
                B=x["B"], C=x["C"], D=x["D"], z=x["z"], dt_bias=x["delta_bias"])
    args = {k: (v.to(device) if v is not None else None) for k, v in args.items()}
    return {**args, "dt_softplus": case.softplus}


def detached_copy(x):
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in x.items()}


def call_scan(fn, x, case: Case, **kw):
    """fn(u, delta, A, B, C, D=, z=, delta_bias=, delta_softplus=case.softplus, **kw), and
    initial_state= when the case has one."""
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
              delta_softplus=case.softplus, **_h0(x), **kw)


def _h0(x) -> dict:
    return {} if x.get("initial_state") is None else {"initial_state": x["initial_state"]}


def run_scan(fn, x, case: Case, seed: int = 1, return_last_state: bool = True, strided_gout: bool = False, **kw):
    """Forward, then backward a random upstream gradient for out (and for the last state when
    case.use_last); return (out, last_state or None, {name: grad of every input given}).

    strided_gout: the gradient of out arrives as a (B, D, L) view of (B, L, D) storage, as a
    (B, L, D) model produces it."""
    res = call_scan(fn, x, case, return_last_state=return_last_state, **kw)
    out, last = res if return_last_state else (res, None)
    g = torch.Generator().manual_seed(seed)
    if strided_gout:
        gout = torch.randn(out.shape[0], out.shape[2], out.shape[1], generator=g, dtype=torch.float64)
        gout = gout.to(out.device, out.dtype).transpose(1, 2)
    else:
        gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    outputs, grad_outputs = [out], [gout]
    if last is not None and case.use_last:
        outputs.append(last)
        grad_outputs.append(torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.device, last.dtype))
    names = [n for n in NAMES if x.get(n) is not None]
    grads = torch.autograd.grad(outputs, [x[n] for n in names], grad_outputs)
    assert all(gr is not None for gr in grads), f"no gradient for {[n for n, gr in zip(names, grads) if gr is None]}"
    return out.detach(), (last.detach() if last is not None else None), dict(zip(names, grads))


def compare(path: str, got, want, case: Case):
    """Two run_scan results: output, last state (if any) and every gradient within
    tol(path, case.dtype)."""
    (out, last, grads), (out_r, last_r, grads_r) = got, want
    assert_close("out", out, out_r, path, case.dtype)
    assert (last is None) == (last_r is None)
    if last is not None:
        assert_close("last_state", last, last_r, path, case.dtype)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        assert_close("d" + name, grads[name], grads_r[name], path, case.dtype)


def compare_with_reference(path: str, fn, x, case: Case, return_last_state: bool = True, strided_gout: bool = False,
                           **kw):
    """fn (with **kw) and selective_scan_ref on copies of the same inputs, backpropagating the
    same upstream gradients: output, last state and every gradient within tol(path, case.dtype)."""
    from mamba4rec.kernels.reference import selective_scan_ref

    opts = dict(return_last_state=return_last_state, strided_gout=strided_gout)
    got = run_scan(fn, x, case, **opts, **kw)
    want = run_scan(selective_scan_ref, detached_copy(x), case, **opts)
    assert got[2].keys() == {n for n in NAMES if x.get(n) is not None}
    compare(path, got, want, case)


def gradcheck_scan(fn, case: Case, seed: int = 0, return_last_state: bool = True, **kw):
    """torch.autograd.gradcheck of fn (with **kw) in fp64, over every input the case has, with
    out (and the last state) as outputs; tolerances TOLERANCES[("gradcheck", fp64)]."""
    assert case.dtype == torch.float64
    x = make_inputs(case, seed)
    names = [n for n in NAMES if x.get(n) is not None]

    def f(*args):
        a = dict.fromkeys(NAMES)
        a.update(zip(names, args))
        return call_scan(fn, a, case, return_last_state=return_last_state, **kw)

    rtol, atol = tol("gradcheck", torch.float64, "grad")
    assert torch.autograd.gradcheck(f, [x[n] for n in names], eps=GRADCHECK_EPS, atol=atol, rtol=rtol)


def check_padding_by_minus_inf(fn, path: str, device="cpu"):
    """MambaBlock pads ragged rows with delta = -inf (softplus on): dt must be 0 there. So each
    row's outputs up to its end and its last state equal the scan of the row cut at its end, no
    gradient reaches the padded delta, and every gradient equals the one of dt =
    softplus(delta + bias) * mask computed outside the scan (the reference, softplus off)."""
    from mamba4rec.kernels.reference import selective_scan_ref

    case = Case(3, 9, 8, 4, h0=True)
    x = make_inputs(case, seed=3, device=device)
    lengths = torch.tensor([9, 5, 1], device=device)
    pad = torch.arange(case.L, device=device)[None, None, :] >= lengths[:, None, None]
    delta = x["delta"].detach().masked_fill(pad, float("-inf")).requires_grad_()
    padded = dict(x, delta=delta)
    out, last, grads = run_scan(fn, padded, case)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert (grads["delta"][pad.expand_as(delta)] == 0).all(), "a gradient reached a padded position"
    for r, n in enumerate(lengths.tolist()):
        row = {k: (v.detach()[r:r + 1, ..., :n].contiguous() if k in ("u", "delta", "B", "C", "z") else
                   v.detach()[r:r + 1] if k == "initial_state" else v.detach()) for k, v in x.items()}
        cut_out, cut_last = call_scan(fn, row, case, return_last_state=True)
        # within rounding, not bit for bit: a compiled loop over 9 steps runs vectorised, over 5 not
        assert_close(f"row {r} last_state", last[r:r + 1], cut_last, path, case.dtype)
        assert_close(f"row {r} out", out[r:r + 1, :, :n], cut_out, path, case.dtype)

    def masked_outside(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, **kw):
        dt = torch.nn.functional.softplus(delta + delta_bias[:, None]) * ~pad
        return selective_scan_ref(u, dt, A, B, C, D=D, z=z, delta_softplus=False, **kw)

    want = run_scan(masked_outside, dict(detached_copy(x)), case)
    # the masked reference gives the padded delta no gradient either; compare the rest
    compare(path, (out, last, grads), want, case)
