"""Shared helpers for the selective-scan tests: case ids, inputs, one tolerance table, comparisons."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Tolerances per input dtype, in one place (mamba_ssm's test_selective_scan starts from
#: fp32 6e-4 / 2e-3 and bf16 3e-2 / 5e-2). fp64 runs both paths in fp64.
TOL = {
    torch.float64: dict(rtol=1e-8, atol=1e-10),
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.float16: dict(rtol=3e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
}
#: Gradients that sum many products (ddelta, dA over batch and time) get this factor on atol.
GRAD_ATOL_FACTOR = {"delta": 2.0, "A": 4.0, "delta_bias": 2.0, "D": 2.0}

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
               torch.bfloat16: "bf16"}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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

    @property
    def id(self) -> str:
        g = "G1" if self.G == 0 else f"G{self.G}-4d"
        s = f"B{self.batch}-L{self.L}-D{self.dim}-N{self.N}-{g}-{DTYPE_NAMES[self.dtype]}"
        flags = [n for n, on in (("z", self.z), ("D", self.D), ("bias", self.bias),
                                 ("softplus", self.softplus)) if not on]
        return s + ("-no_" + "_".join(flags) if flags else "")


def make_inputs(case: Case, seed: int = 0, noncontiguous: bool = False):
    """Scan arguments as a dict. u, delta, B, C, z in case.dtype; A, D, delta_bias in the
    weight dtype (fp32, fp64 for fp64), as a MambaBlock passes them. All require grad."""
    g = torch.Generator().manual_seed(seed)
    itype = case.dtype
    wtype = torch.float64 if itype == torch.float64 else torch.float32
    b, d, L, N, G = case.batch, case.dim, case.L, case.N, case.G

    def rnd(*shape, dtype, scale=1.0, shift=0.0):
        if noncontiguous:  # same values, laid out with the last two axes swapped (or strided)
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
    if noncontiguous:
        x["A"] = x["A"].t().contiguous().t()
        for k in ("D", "delta_bias"):
            if x[k] is not None:
                x[k] = x[k].repeat_interleave(2)[::2]
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}


def run_scan(fn, x, case: Case, seed: int = 1, **kw):
    """Forward with return_last_state, backward the same random g (and g_last); return
    (out, last_state, {name: grad})."""
    out, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                   delta_bias=x["delta_bias"], delta_softplus=case.softplus,
                   return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    glast = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    names = [n for n in NAMES if x[n] is not None]
    grads = torch.autograd.grad((out, last), [x[n] for n in names], (gout, glast))
    return out.detach(), last.detach(), dict(zip(names, grads))


def assert_close(what: str, actual, expected, dtype, atol_factor: float = 1.0):
    """Print max / mean abs diff, then assert within TOL[dtype]."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    print(f"{what:>12}: max diff {diff.max().item():.3e}  mean diff {diff.mean().item():.3e}  "
          f"max |ref| {e.abs().max().item():.3e}")
    tol = TOL[dtype]
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * atol_factor,
                               msg=lambda m: f"{what}: {m}")


def detached_copy(x):
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in x.items()}


def compare_with_reference(fn, x, case: Case, **kw):
    """fn and selective_scan_ref on copies of the same inputs: output, last state and every
    gradient within TOL[case.dtype]."""
    from kernels.reference import selective_scan_ref

    out, last, grads = run_scan(fn, x, case, **kw)
    out_r, last_r, grads_r = run_scan(selective_scan_ref, detached_copy(x), case)
    assert_close("out", out, out_r, case.dtype)
    assert_close("last_state", last, last_r, case.dtype)
    assert grads.keys() == grads_r.keys() == {n for n in NAMES if x[n] is not None}
    for name in grads:
        assert_close("d" + name, grads[name], grads_r[name], case.dtype, GRAD_ATOL_FACTOR.get(name, 1.0))
