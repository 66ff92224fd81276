"""kernels.numba_conv: the compiled causal depthwise conv + SiLU against the same in torch ops
(output and the gradients of x, weight, bias and the state), its thread-count independence, NaN,
and which calls take it."""

from __future__ import annotations

import pytest
import torch

from mamba4rec.kernels import numba_conv
from mamba4rec.kernels.numba_conv import causal_conv_silu, causal_conv_silu_torch
from tests.conftest import count_applies

pytest.importorskip("numba", reason="the compiled conv needs numba (the fast extra)")
pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture
def compiled_calls(monkeypatch):
    return count_applies(monkeypatch, numba_conv._CausalConvSiLU)


def inputs(batch, dim, L, d_conv, state, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, L, generator=g)
    w = torch.randn(dim, 1, d_conv, generator=g) * 0.5
    b = torch.randn(dim, generator=g) * 0.3
    s = torch.randn(batch, dim, d_conv - 1, generator=g) if state else None
    gy = torch.randn(batch, dim, L, generator=g)
    return (x, w, b, s), gy


def run(fn, tensors, gy):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    y.backward(gy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


# batch 70 > numba_scan.CHUNKS: chunks of more than one sequence; L 1; d_conv 2 and 4 (a
# non-contiguous x, as the block passes it: test_non_contiguous_x)
@pytest.mark.parametrize("batch,dim,L,d_conv,state", [(3, 8, 37, 4, True), (3, 8, 37, 4, False), (70, 4, 5, 4, True),
                                                      (2, 6, 1, 4, True), (4, 5, 9, 2, True), (2, 3, 6, 4, False)])
def test_matches_torch(batch, dim, L, d_conv, state, compiled_calls):
    tensors, gy = inputs(batch, dim, L, d_conv, state)
    y, grads = run(causal_conv_silu, tensors, gy)
    y_ref, grads_ref = run(causal_conv_silu_torch, tensors, gy)
    assert len(compiled_calls) == 1
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("x", "weight", "bias", "state"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_non_contiguous_x(compiled_calls):
    (x, w, b, s), gy = inputs(2, 6, 11, 4, True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, D, L) view of (B, L, D) storage
    assert not xt.is_contiguous()
    y, grads = run(causal_conv_silu, (xt, w, b, s), gy)
    assert len(compiled_calls) == 1
    y_ref, grads_ref = run(causal_conv_silu_torch, (x, w, b, s), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-5, atol=1e-5)


def test_same_bits_with_one_or_two_threads():
    tensors, gy = inputs(70, 8, 20, 4, True, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(causal_conv_silu, tensors, gy)
        torch.set_num_threads(2)
        two = run(causal_conv_silu, tensors, gy)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    for a, b in zip(one[1], two[1]):
        assert torch.equal(a, b)


def test_nan_comes_out_as_nan():
    """No silent NaN: a NaN input reaches the outputs whose window holds it (its own position and
    the next d_conv - 1), and no others."""
    (x, w, b, s), _ = inputs(1, 2, 8, 4, True)
    x[0, 0, 2] = float("nan")
    y = causal_conv_silu(x, w, b, s)
    assert torch.isnan(y[0, 0, 2:6]).all() and not torch.isnan(y[0, 0, :2]).any()
    assert not torch.isnan(y[0, 0, 6:]).any() and not torch.isnan(y[0, 1]).any()


def test_other_dtypes_take_torch(compiled_calls):
    (x, w, b, s), _ = inputs(2, 4, 5, 4, True)
    out = causal_conv_silu(x.double(), w.double(), b.double(), s.double())
    torch.testing.assert_close(out, causal_conv_silu_torch(x.double(), w.double(), b.double(), s.double()))
    assert not compiled_calls
    assert not numba_conv.applies(x.bfloat16(), w, b) and numba_conv.applies(x, w, b, s)


@pytest.mark.parametrize("bad", ["state batch", "state width", "weight dim", "bias"])
def test_shapes_that_do_not_fit_are_refused(bad, compiled_calls):
    """The compiled loops do not check bounds: a state, weight or bias of the wrong shape is a
    ValueError naming the expected shape, not a read past the end."""
    (x, w, b, s), _ = inputs(3, 4, 6, 4, True)
    if bad == "state batch":
        s = s[:2]
    elif bad == "state width":
        s = s[..., :2]
    elif bad == "weight dim":
        w = w[:3]
    else:
        b = b[:3]
    with pytest.raises(ValueError, match="expected"):
        causal_conv_silu(x, w, b, s)
    assert not compiled_calls


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_the_block_takes_it_on_the_numba_path_only(impl, compiled_calls):
    from mamba4rec.layers import MambaBlock

    block = MambaBlock(16, d_state=4, d_conv=4, expand=2, scan_impl=impl)
    h = torch.randn(3, 7, 16)
    out = block(h)
    out_state, conv_state, ssm_state = block(h, torch.tensor([7, 4, 1]))
    (out.sum() + out_state.sum()).backward()
    assert len(compiled_calls) == (2 if impl == "numba" else 0)
