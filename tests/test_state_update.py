"""The one-step SSM update (mamba4rec/kernels/state_update.py): the Triton kernel against the torch
reference, and the reference stepped over a sequence against the scan.

Without CUDA the Triton kernel runs through Triton's interpreter: tests/scan_utils.py sets
TRITON_INTERPRET=1 before triton is imported (enable_triton_interpreter). If triton was imported
earlier without it, the Triton cases skip with that reason; the reference cases always run.
Inputs and tolerances: tests/scan_utils.py (make_step_inputs, make_inputs; TOLERANCES from mamba4rec/kernels/tolerances.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.scan_utils import TRITON_DEVICE as DEVICE
from tests.scan_utils import Case, assert_close, enable_triton_interpreter, make_inputs, make_step_inputs

_SKIP_TRITON = enable_triton_interpreter()
needs_triton = pytest.mark.skipif(_SKIP_TRITON is not None, reason=_SKIP_TRITON or "")

from mamba4rec.kernels import selective_state_update_ref, update_state  # noqa: E402
from mamba4rec.kernels.reference import selective_scan_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds barriers, which on a shared 2-core
    machine cost seconds per test when the other core is busy."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# one time step (L=1); G=0: B, C are (batch, N), else (batch, G, N)
CASES = [
    Case(2, 1, 5, 4),                                                         # odd dim, everything on
    Case(3, 1, 8, 16, G=2, z=False, D=False, bias=False, softplus=False),     # grouped, nothing optional
    Case(1, 1, 7, 5, z=True, D=False, bias=False, softplus=True),             # gate only
    Case(2, 1, 12, 3, G=3, z=False, D=True, bias=True, softplus=True),        # odd N, 3 groups
    Case(4, 1, 130, 32, G=2),                                                 # dim over one block of channels
    Case(2, 1, 6, 3, G=2, dtype=torch.bfloat16),
    Case(3, 1, 9, 8, z=False, dtype=torch.bfloat16),
]


def _steps(step, x, case, device="cpu"):
    """Run ``step`` (a state update) over every time step of scan inputs x from a zero state;
    return (outputs stacked over time, final state)."""
    x = {k: (v.detach().to(device) if v is not None else None) for k, v in x.items()}
    state = torch.zeros(case.batch, case.dim, case.N, device=device)
    ys = [step(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], D=x["D"],
               z=None if x["z"] is None else x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=case.softplus)
          for t in range(case.L)]
    return torch.stack(ys, -1).cpu(), state.cpu()


def _scan(x, case):
    out, last = selective_scan_ref(**{k: (v.detach() if v is not None else None) for k, v in x.items()},
                                   delta_softplus=case.softplus, return_last_state=True)
    return out, last


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_kernel_matches_reference(case):
    from mamba4rec.kernels import selective_state_update

    args = make_step_inputs(case, device=DEVICE)
    s0 = args.pop("state")
    s_ref, s_tri = s0.clone(), s0.clone()
    y_ref = selective_state_update_ref(s_ref, **args)
    y_tri = selective_state_update(s_tri, **args)
    assert y_tri.dtype == case.dtype and y_tri.shape == (case.batch, case.dim)
    print(case.id)
    assert_close("out", y_tri.float(), y_ref.float(), "step_triton", case.dtype)
    assert_close("state", s_tri, s_ref, "step_triton", case.dtype, key="out")
    assert not torch.equal(s_tri, s0)  # updated in place


@needs_triton
def test_triton_kernel_steps_reproduce_the_scan():
    """Twelve kernel steps in a row end in the scan's last state (errors do not pile up)."""
    from mamba4rec.kernels import selective_state_update

    case = Case(2, 12, 10, 6, G=2)
    x = make_inputs(case)
    out, last = _scan(x, case)
    ys, state = _steps(selective_state_update, x, case, device=DEVICE)
    assert_close("out", ys, out, "step_triton", torch.float32)
    assert_close("last_state", state, last, "step_triton", torch.float32)


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
            assert_close("out", tri.step(x, *states[0]), ref.step(x, *states[1]), "step_triton", torch.float32)
    assert_close("state", states[0][1], states[1][1], "step_triton", torch.float32, key="out")


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("opts", [True, False], ids=["zDbias-softplus", "plain"])
def test_reference_steps_reproduce_the_scan(groups, opts):
    """The step reference, run over a sequence, gives the scan's outputs and last state."""
    case = Case(2, 9, 6, 4, G=groups, z=opts, D=opts, bias=opts, softplus=opts)
    x = make_inputs(case)
    out, last = _scan(x, case)
    ys, state = _steps(selective_state_update_ref, x, case)
    assert_close("out", ys, out, "step_ref", torch.float32)
    assert_close("last_state", state, last, "step_ref", torch.float32)


def test_bad_input_is_refused_with_the_shapes():
    args = make_step_inputs(Case(2, 1, 6, 4, G=2))
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
