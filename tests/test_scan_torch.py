"""kernels.torch_scan.selective_scan_torch against selective_scan_ref: output, last state and
every gradient, for every dtype, odd sizes, grouped B/C, optional inputs, non-contiguous
inputs, several batch blocks and a given initial_state; gradcheck; and a check that no
(B, D, L, N) tensor is made."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mamba4rec.kernels as kernels
from mamba4rec.kernels import torch_scan
from mamba4rec.kernels.reference import selective_scan_ref
from mamba4rec.kernels.torch_scan import selective_scan_torch
from tests.scan_utils import (Case, assert_close, call_scan, compare_with_reference, detached_copy, gradcheck_scan,
                              make_inputs)


def check_against_reference(case, layout="contiguous", **kw):
    compare_with_reference("torch", selective_scan_torch, make_inputs(case, layout=layout), case, **kw)


SHAPES = [  # (batch, L, dim, N, G)
    (2, 1, 5, 1, 0),
    (2, 7, 5, 16, 0),
    (2, 7, 24, 16, 2),
    (2, 63, 24, 16, 2),
    (2, 63, 33, 1, 0),
    (3, 63, 33, 16, 3),
    (2, 63, 24, 16, 1),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
CASES = [Case(b, L, d, n, G=g, dtype=dt) for (b, L, d, n, g), dt in itertools.product(SHAPES, DTYPES)]
CASES += [Case(2, 7, 24, 16, G=2, dtype=torch.float16), Case(2, 63, 5, 16, dtype=torch.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    check_against_reference(case)


FLAG_CASES = [Case(2, 7, 6, 4, G=2, z=z, D=D, bias=bias, softplus=sp)
              for z, D, bias, sp in itertools.product((True, False), repeat=4)]


@pytest.mark.parametrize("case", FLAG_CASES, ids=lambda c: c.id)
def test_optional_inputs(case):
    check_against_reference(case)


H0_CASES = [  # every one starts from a random initial_state (which gets a gradient)
    Case(2, 1, 5, 3, h0=True),                                  # L = 1: h_0 = dA_0 * h_{-1} + dBu_0
    Case(2, 7, 24, 16, G=2, h0=True),                           # grouped B/C
    Case(3, 63, 33, 16, G=3, dtype=torch.bfloat16, h0=True),
    Case(2, 7, 5, 16, dtype=torch.float16, h0=True),
    Case(2, 9, 5, 4, dtype=torch.float64, h0=True),
    Case(2, 7, 6, 4, G=2, use_last=False, h0=True),            # no gradient into the last state
    Case(2, 7, 6, 4, G=2, z=False, D=False, bias=False, softplus=False, h0=True),
]


@pytest.mark.parametrize("case", H0_CASES, ids=lambda c: c.id)
def test_initial_state_matches_reference(case):
    check_against_reference(case, return_last_state=case.use_last)


@pytest.mark.parametrize("case", [Case(3, 7, 24, 16, G=2), Case(2, 9, 5, 4, dtype=torch.float64),
                                  Case(2, 5, 6, 2, G=0, dtype=torch.bfloat16),
                                  Case(3, 7, 6, 4, G=2, h0=True)], ids=lambda c: c.id)
def test_noncontiguous_inputs(case):
    x = make_inputs(case, layout="transposed")
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous() and not x["A"].is_contiguous()
    check_against_reference(case, layout="transposed")


def _budget_for(case, bb_bwd):
    """A workspace budget giving blocks of bb_bwd sequences in backward (3 buffers);
    forward (2 buffers) then gets 3 * bb_bwd // 2."""
    isz = 8 if case.dtype == torch.float64 else 4
    return 3 * bb_bwd * case.L * case.dim * case.N * isz


@pytest.mark.parametrize("case", [Case(7, 63, 24, 16, G=2), Case(5, 7, 5, 3, dtype=torch.float64),
                                  Case(7, 63, 24, 16, G=2, h0=True), Case(5, 7, 5, 3, dtype=torch.float64, h0=True),
                                  Case(7, 9, 6, 4, dtype=torch.bfloat16, use_last=False, h0=True)],
                         ids=lambda c: c.id)
def test_several_blocks_with_ragged_last(case):
    budget = _budget_for(case, 2)
    isz = 8 if case.dtype == torch.float64 else 4
    bb_f = torch_scan._block_size(case.batch, case.L, case.dim, case.N, 2, isz, budget)
    bb_b = torch_scan._block_size(case.batch, case.L, case.dim, case.N, 3, isz, budget)
    assert (bb_f, bb_b) == (3, 2)  # blocks 3+3+1 / 3+2 forward, 2+2+2+1 / 2+2+1 backward
    assert case.batch % bb_f and case.batch % bb_b
    check_against_reference(case, workspace_bytes=budget)


def test_default_budget_keeps_steps_large_and_bounded():
    # L=50 (the model's): 8 MiB -> blocks of 5 forward, 3 backward; L=200: raised so a
    # step still covers MIN_STEP_ELEMS; either way independent of the batch
    for L, (f, b) in ((50, (5, 3)), (200, (3, 3))):
        assert torch_scan._block_size(2048, L, 128, 32, 2, 4) == f
        assert torch_scan._block_size(2048, L, 128, 32, 3, 4) == b
        assert torch_scan._block_size(10**6, L, 128, 32, 3, 4) == b
    assert torch_scan._block_size(2, 50, 128, 32, 3, 4) == 2


def test_one_sequence_per_block():
    case = Case(3, 7, 6, 4, G=2)
    check_against_reference(case, workspace_bytes=1)  # budget below one sequence: bb = 1


@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("budget", [None, "small"], ids=["one-block", "blocks-of-1"])
def test_gradcheck_fp64(budget, h0):
    kw = {} if budget is None else {"workspace_bytes": 1}
    gradcheck_scan(selective_scan_torch, Case(3, 5, 4, 3, G=2, dtype=torch.float64, h0=h0), **kw)


def test_gradcheck_fp64_no_optionals_3d_bc():
    # out alone (no last state), no optional input: the plainest call
    gradcheck_scan(selective_scan_torch, Case(2, 6, 3, 2, dtype=torch.float64, z=False, D=False, bias=False,
                                              softplus=False), return_last_state=False)


def test_gradcheck_fp64_initial_state_no_optionals():
    gradcheck_scan(selective_scan_torch, Case(2, 6, 3, 2, dtype=torch.float64, z=False, D=False, bias=False,
                                              softplus=False, h0=True), return_last_state=False)


@pytest.mark.parametrize("only_h0", [True, False], ids=["only-initial_state", "all-but-initial_state"])
def test_partial_grads_with_initial_state(only_h0):
    """Only initial_state requires grad, or everything but it: the rest get no gradient, and
    what is asked for matches the reference."""
    case = Case(3, 7, 6, 4, G=2, h0=True)
    want = {"initial_state"} if only_h0 else {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    x = {k: (v if k in want else v.detach()) for k, v in make_inputs(case).items()}
    xr = {k: (v if k in want else v.detach()) for k, v in detached_copy(x).items()}
    for fn, xs, kw in ((selective_scan_torch, x, {"workspace_bytes": 1}), (selective_scan_ref, xr, {})):
        out, last = call_scan(fn, xs, case, return_last_state=True, **kw)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().add(last.square().sum()).backward()
    for k, v in x.items():
        if k not in want:
            assert v.grad is None, k
            continue
        assert v.grad.dtype == v.dtype, k
        assert_close("d" + k, v.grad, xr[k].grad, "torch", torch.float32)


def test_initial_state_continues_a_split_scan():
    """Scanning t < 4, then t >= 4 from that last state (initial_state passed positionally, as
    the numba scan's fallback does) is the whole scan; a zero initial_state is none at all."""
    case = Case(3, 9, 6, 4, G=2)
    x = {k: v.detach() for k, v in make_inputs(case).items() if v is not None}

    def args(sl):  # u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        return [x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl], x["C"][..., sl],
                x["D"], x["z"][..., sl], x["delta_bias"], True, True]

    out, last = selective_scan_torch(*args(slice(None)))
    out1, last1 = selective_scan_torch(*args(slice(0, 4)))
    out2, last2 = selective_scan_torch(*args(slice(4, None)), last1)
    assert_close("out", torch.cat([out1, out2], -1), out, "torch", torch.float32)
    assert_close("last_state", last2, last, "torch", torch.float32)
    out0, last0 = selective_scan_torch(*args(slice(None)), torch.zeros_like(last))
    assert torch.equal(out0, out) and torch.equal(last0, last)


def test_output_types_and_partial_grads():
    case = Case(2, 7, 6, 4, G=2, dtype=torch.bfloat16)
    x = make_inputs(case)
    out = selective_scan_torch(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == (2, 6, 7)
    out, last = selective_scan_torch(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert last.dtype == torch.float32 and last.shape == (2, 6, 4)
    # only A and C require grad: the others get no .grad, and A, C match the reference
    x = make_inputs(Case(2, 7, 6, 4, G=2))
    for k in ("u", "delta", "B", "D", "z", "delta_bias"):
        x[k] = x[k].detach()
    xr = detached_copy(x)
    for k in ("u", "delta", "B", "D", "z", "delta_bias"):
        xr[k] = xr[k].detach()
    for fn, xs in ((selective_scan_torch, x), (selective_scan_ref, xr)):
        o = fn(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], D=xs["D"], z=xs["z"],
               delta_bias=xs["delta_bias"], delta_softplus=True)
        o.sum().backward()
    assert x["u"].grad is None and x["B"].grad is None and x["D"].grad is None
    assert_close("dA", x["A"].grad, xr["A"].grad, "torch", torch.float32, key="grad")  # no atol factor for dA here
    assert_close("dC", x["C"].grad, xr["C"].grad, "torch", torch.float32, key="grad")


def test_dispatch_reaches_torch_path():
    assert kernels.get_scan_fn("torch") is selective_scan_torch
    case = Case(2, 5, 4, 3)
    x = make_inputs(case)
    out = kernels.scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="torch")
    ref = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert_close("out", out, ref, "torch", torch.float32)


def _bad_inputs():
    u = torch.randn(2, 6, 5)
    A = -torch.rand(6, 3)
    B = torch.randn(2, 3, 5)
    ok = dict(u=u, delta=u.clone(), A=A, B=B, C=B.clone())
    yield "delta-shape", {**ok, "delta": torch.randn(2, 6, 4)}
    yield "A-rows", {**ok, "A": torch.randn(5, 3)}
    yield "B-N", {**ok, "B": torch.randn(2, 4, 5)}
    yield "groups-not-dividing-dim", {**ok, "B": torch.randn(2, 4, 3, 5), "C": torch.randn(2, 4, 3, 5)}
    yield "B-C-groups-differ", {**ok, "B": torch.randn(2, 2, 3, 5), "C": torch.randn(2, 3, 3, 5)}
    yield "D-shape", {**ok, "D": torch.randn(5)}
    yield "z-shape", {**ok, "z": torch.randn(2, 6, 4)}
    yield "u-2d", {**ok, "u": torch.randn(6, 5)}
    yield "initial_state-shape", {**ok, "initial_state": torch.randn(2, 6, 4)}


@pytest.mark.parametrize("bad", [b for _, b in _bad_inputs()], ids=[n for n, _ in _bad_inputs()])
def test_bad_input_raises_value_error_like_reference(bad):
    with pytest.raises(ValueError) as got:
        selective_scan_torch(**bad)
    with pytest.raises(ValueError) as want:
        selective_scan_ref(**bad)
    assert str(got.value) == str(want.value)


class MaxAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) any op returns while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes, self.max_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                if n > self.max_bytes:
                    self.max_bytes, self.max_op = n, (str(func), tuple(t.shape))
        return out


def _fwd_bwd(fn, x, case, **kw):
    out, last = call_scan(fn, x, case, return_last_state=True, **kw)
    (out.float().sum() + last.sum()).backward()


def test_never_materialises_batch_dim_length_state():
    case = Case(8, 20, 16, 8, G=2)
    full = case.batch * case.dim * case.L * case.N * 4        # one fp32 (B, D, L, N) tensor
    budget = full // 2                          # forward blocks of 2, backward of 1, of 8
    assert torch_scan._block_size(case.batch, case.L, case.dim, case.N, 2, 4, budget) < case.batch
    x = make_inputs(case)
    with MaxAllocation() as rec:
        _fwd_bwd(selective_scan_torch, x, case, workspace_bytes=budget)
    print("largest allocation:", rec.max_bytes, rec.max_op, "budget", budget, "full", full)
    assert rec.max_bytes <= budget < full, rec.max_op
    # the recorder does see such a tensor when one is made: the reference expands grouped
    # B/C to every channel, (B, D, N, L)
    with MaxAllocation() as rec_ref:
        _fwd_bwd(selective_scan_ref, make_inputs(case), case)
    assert rec_ref.max_bytes >= full, rec_ref.max_op
