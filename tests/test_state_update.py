"""The one-step SSM update (kernels/state_update.py): the Triton kernel against the torch
reference, and the reference stepped over a sequence against the scan.

Without CUDA the Triton kernel runs through Triton's interpreter: this module sets
TRITON_INTERPRET=1 before triton is imported (as tests/test_scan_triton.py does; it stays set
for the rest of the pytest process, which changes nothing for paths that do not ask for
Triton). If triton was imported earlier without it, the Triton cases skip with that reason;
the reference cases always run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import pytest
import torch

_ON_CUDA = torch.cuda.is_available()
_SKIP_TRITON = None
if importlib.util.find_spec("triton") is None:
    _SKIP_TRITON = "triton is not installed: the Triton state update is optional"
elif not _ON_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        _SKIP_TRITON = ("triton was imported before this module could set TRITON_INTERPRET=1 and there "
                        "is no CUDA: run with TRITON_INTERPRET=1 in the environment")
    else:
        os.environ["TRITON_INTERPRET"] = "1"
needs_triton = pytest.mark.skipif(_SKIP_TRITON is not None, reason=_SKIP_TRITON or "")

from kernels import selective_state_update_ref, update_state  # noqa: E402
from kernels.reference import selective_scan_ref  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
#: (rtol, atol) per input dtype: mamba_ssm's starting points (tests/ops/test_selective_scan.py).
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds barriers, which on a shared 2-core
    machine cost seconds per test when the other core is busy."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    N: int
    G: int = 1            # 1: B, C are (batch, N); else (batch, G, N)
    z: bool = True
    D: bool = True
    bias: bool = True
    softplus: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def id(self):
        opts = "".join(n for n, on in (("z", self.z), ("D", self.D), ("b", self.bias), ("sp", self.softplus))
                       if on) or "plain"
        return f"B{self.batch}-D{self.dim}-N{self.N}-G{self.G}-{opts}-{'fp32' if self.dtype == torch.float32 else 'bf16'}"


CASES = [
    Case(2, 5, 4),                                                         # odd dim, everything on
    Case(3, 8, 16, G=2, z=False, D=False, bias=False, softplus=False),     # grouped, nothing optional
    Case(1, 7, 5, z=True, D=False, bias=False, softplus=True),             # gate only
    Case(2, 12, 3, G=3, z=False, D=True, bias=True, softplus=True),        # odd N, 3 groups
    Case(4, 130, 32, G=2),                                                 # dim over one block of channels
    Case(2, 6, 3, G=2, dtype=torch.bfloat16),
    Case(3, 9, 8, z=False, dtype=torch.bfloat16),
]


def _inputs(case: Case, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, d, n = case.batch, case.dim, case.N

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    bc_shape = (b, n) if case.G == 1 else (b, case.G, n)
    return dict(
        state=r(b, d, n),
        x=r(b, d).to(case.dtype), dt=r(b, d, scale=0.5).to(case.dtype),
        A=-(torch.rand(d, n, generator=g) + 0.5).to(DEVICE),
        B=r(*bc_shape).to(case.dtype), C=r(*bc_shape).to(case.dtype),
        D=r(d) if case.D else None, z=r(b, d).to(case.dtype) if case.z else None,
        dt_bias=r(d, scale=0.5) if case.bias else None, dt_softplus=case.softplus,
    )


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_kernel_matches_reference(case):
    from kernels import selective_state_update

    args = _inputs(case)
    s0 = args.pop("state")
    s_ref, s_tri = s0.clone(), s0.clone()
    y_ref = selective_state_update_ref(s_ref, **args)
    y_tri = selective_state_update(s_tri, **args)
    assert y_tri.dtype == case.dtype and y_tri.shape == (case.batch, case.dim)
    rtol, atol = TOLERANCES[case.dtype]
    print(f"{case.id}: max |out diff| {(y_ref.float() - y_tri.float()).abs().max().item():.2e}, "
          f"max |state diff| {(s_ref - s_tri).abs().max().item():.2e}")
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(s_tri, s_ref, rtol=rtol, atol=atol)
    assert not torch.equal(s_tri, s0)  # updated in place


@needs_triton
def test_triton_kernel_steps_reproduce_the_scan():
    """Twelve kernel steps in a row end in the scan's last state (errors do not pile up)."""
    from kernels import selective_state_update

    torch.manual_seed(0)
    b, d, n, L = 2, 10, 6, 12
    u, delta, z = torch.randn(b, d, L), 0.5 * torch.randn(b, d, L), torch.randn(b, d, L)
    A, Bm, Cm = -torch.rand(d, n) - 0.5, torch.randn(b, 2, n, L), torch.randn(b, 2, n, L)
    D, bias = torch.randn(d), torch.randn(d)
    out, last = selective_scan_ref(u, delta, A, Bm, Cm, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                   return_last_state=True)
    state = torch.zeros(b, d, n, device=DEVICE)
    for t in range(L):
        y = selective_state_update(state, u[..., t].to(DEVICE), delta[..., t].to(DEVICE), A.to(DEVICE),
                                   Bm[..., t].to(DEVICE), Cm[..., t].to(DEVICE), D=D.to(DEVICE),
                                   z=z[..., t].to(DEVICE), dt_bias=bias.to(DEVICE), dt_softplus=True)
        torch.testing.assert_close(y.cpu(), out[..., t], rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(state.cpu(), last, rtol=6e-4, atol=2e-3)


@needs_triton
def test_block_step_takes_the_triton_path_when_its_scan_does():
    """MambaBlock.step with scan_impl=triton runs the kernel (here interpreted) and agrees with
    the torch step of the same weights."""
    from mamba4rec.layers import MambaBlock

    torch.manual_seed(0)
    tri = MambaBlock(16, d_state=4, d_conv=3, expand=2, scan_impl="triton").to(DEVICE).eval()
    ref = MambaBlock(16, d_state=4, d_conv=3, expand=2, scan_impl="ref").to(DEVICE).eval()
    ref.load_state_dict(tri.state_dict())
    states = [(torch.zeros(2, 32, 2, device=DEVICE), torch.zeros(2, 32, 4, device=DEVICE)) for _ in range(2)]
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 16, device=DEVICE)
            torch.testing.assert_close(tri.step(x, *states[0]), ref.step(x, *states[1]), rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(states[0][1], states[1][1], rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("opts", [True, False], ids=["zDbias-softplus", "plain"])
def test_reference_steps_reproduce_the_scan(groups, opts):
    """The step reference, run over a sequence, gives the scan's outputs and last state."""
    torch.manual_seed(0)
    b, d, L, n = 2, 6, 9, 4
    u, delta = torch.randn(b, d, L), 0.5 * torch.randn(b, d, L)
    A = -torch.rand(d, n) - 0.5
    shape = (b, n, L) if groups == 1 else (b, groups, n, L)
    B, C = torch.randn(shape), torch.randn(shape)
    D, z, bias = (torch.randn(d), torch.randn(b, d, L), torch.randn(d)) if opts else (None, None, None)
    out, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=opts,
                                   return_last_state=True)
    state = torch.zeros(b, d, n)
    for t in range(L):
        y = selective_state_update_ref(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=D,
                                       z=None if z is None else z[..., t], dt_bias=bias, dt_softplus=opts)
        torch.testing.assert_close(y, out[..., t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_with_the_shapes():
    args = _inputs(Case(2, 6, 4, G=2))
    state = args.pop("state")
    with pytest.raises(ValueError, match="state must be float32"):
        selective_state_update_ref(state.double(), **args)
    with pytest.raises(ValueError, match=r"x and dt must be \(batch=2, dim=6\)"):
        selective_state_update_ref(state, **{**args, "x": args["x"][:, :5]})
    with pytest.raises(ValueError, match=r"A must be \(dim=6, N=4\)"):
        selective_state_update_ref(state, **{**args, "A": args["A"][:, :3]})
    with pytest.raises(ValueError, match="B must be"):
        selective_state_update_ref(state, **{**args, "B": torch.randn(2, 4, 4)})  # 4 groups do not divide 6
    with pytest.raises(ValueError, match="impl='cuda' is not a path"):
        update_state(state, **args, impl="cuda")
