"""Streaming: step() equals forward() at every position; the state does not grow; the one-step
update kernels (torch and Triton) against each other and against the scan."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.reference import selective_scan_ref
from kernels.state_update import selective_state_update_ref
from tests.test_model import make_model


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_step_equals_forward_at_every_position(num_layers, position_embedding):
    L = 45
    model = make_model(n_items=60, max_len=L, num_layers=num_layers, position_embedding=position_embedding,
                       scan_impl="torch", hidden_size=32, d_state=8).eval()
    torch.manual_seed(3)
    seq = torch.randint(1, 60, (3, L))
    state = model.init_state(3)
    sizes = None
    for t in range(L):
        out, state = model.step(seq[:, t], state)
        with torch.no_grad():
            full = model(seq[:, : t + 1], torch.full((3,), t + 1))
        torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)
        now = [x.numel() for x in state.conv + state.ssm]
        assert sizes is None or now == sizes  # constant state: O(1) per step
        sizes = now


def test_step_refuses_bad_ids_and_overlong_positions():
    model = make_model(n_items=20, max_len=3, position_embedding=True).eval()
    state = model.init_state(2)
    with pytest.raises(ValueError, match="internal ids in 1..19"):
        model.step(torch.tensor([0, 5]), state)
    with pytest.raises(ValueError, match="must be \\[B\\] with B=2"):
        model.step(torch.tensor([1]), state)
    for _ in range(3):
        model.step(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="max_seq_length=3"):
        model.step(torch.tensor([1, 2]), state)


@pytest.mark.parametrize("groups", [1, 2])
def test_state_update_ref_steps_reproduce_the_scan(groups):
    torch.manual_seed(0)
    b, d, L, n = 2, 6, 9, 4
    u, delta = torch.randn(b, d, L), 0.5 * torch.randn(b, d, L)
    A = -torch.rand(d, n) - 0.5
    shape = (b, n, L) if groups == 1 else (b, groups, n, L)
    B, C, D, z, bias = torch.randn(shape), torch.randn(shape), torch.randn(d), torch.randn(b, d, L), torch.randn(d)
    out, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                   return_last_state=True)
    state = torch.zeros(b, d, n)
    for t in range(L):
        y = selective_state_update_ref(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=D,
                                       z=z[..., t], dt_bias=bias, dt_softplus=True)
        torch.testing.assert_close(y, out[..., t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


TRITON_CASES = [(2, 5, 4, 1, True, torch.float32), (3, 8, 16, 2, False, torch.float32),
                (2, 6, 3, 2, True, torch.bfloat16)]


@pytest.mark.parametrize("case", TRITON_CASES,
                         ids=[f"B{c[0]}-D{c[1]}-N{c[2]}-G{c[3]}-{'zDbias' if c[4] else 'plain'}-{str(c[5])[6:]}"
                              for c in TRITON_CASES])
def test_triton_state_update_matches_ref(case):
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is created (see test_scan_triton)
    pytest.importorskip("triton")
    from kernels.state_update import selective_state_update

    b, d, n, g, opts, dtype = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    x, dt = torch.randn(b, d).to(dev, dtype), (0.5 * torch.randn(b, d)).to(dev, dtype)
    A = (-torch.rand(d, n) - 0.5).to(dev)
    shape = (b, n) if g == 1 else (b, g, n)
    B, C = torch.randn(shape).to(dev, dtype), torch.randn(shape).to(dev, dtype)
    D, z, bias = (torch.randn(d).to(dev), torch.randn(b, d).to(dev, dtype), torch.randn(d).to(dev)) if opts \
        else (None, None, None)
    s0 = torch.randn(b, d, n).to(dev)
    s_ref, s_tri = s0.clone(), s0.clone()
    y_ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=opts)
    y_tri = selective_state_update(s_tri, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=opts)
    tol = (6e-4, 2e-3) if dtype == torch.float32 else (3e-2, 5e-2)
    print("max diff out", (y_ref.float() - y_tri.float()).abs().max().item(), "state", (s_ref - s_tri).abs().max().item())
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(s_tri, s_ref, rtol=tol[0], atol=tol[1])
    assert not torch.equal(s_tri, s0)  # updated in place
