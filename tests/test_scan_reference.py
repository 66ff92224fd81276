"""selective_scan_ref against an independent recomputation, and gradcheck of the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba4rec.kernels.reference import selective_scan_ref
from tests.scan_utils import Case, compare, detached_copy, gradcheck_scan, make_inputs, run_scan


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False, initial_state=None):
    """The closed form h_t = exp(sum_{r<=t} dt_r A) h_{-1} + sum_{s<=t} exp(sum_{r=s+1..t} dt_r A) dt_s u_s B_s, materialised
    as (batch, dim, L, L, N) from cumulative sums of dt*A: no loop, no shared code with the
    reference. Tiny shapes only."""
    cdt = torch.float64
    batch, dim, L = u.shape
    u, dt, A = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt).unsqueeze(-1)
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))
    B4 = (B if B.dim() == 4 else B.unsqueeze(1)).to(cdt)
    C4 = (C if C.dim() == 4 else C.unsqueeze(1)).to(cdt)
    group = torch.arange(dim) // (dim // B4.shape[1])              # channel -> group
    Bc = B4[:, group].permute(0, 1, 3, 2)                          # (b, d, L, N)
    Cc = C4[:, group].permute(0, 1, 3, 2)
    S = torch.cumsum(dt.unsqueeze(-1) * A[:, None, :], dim=2)      # (b, d, L, N)
    expo = S[:, :, :, None, :] - S[:, :, None, :, :]               # (b, d, t, s, N)
    causal = torch.ones(L, L, dtype=torch.bool).tril()[:, :, None]
    decay = torch.exp(torch.where(causal, expo, torch.full_like(expo, -float("inf"))))
    x = (dt * u).unsqueeze(-1) * Bc                                # (b, d, s, N)
    h = (decay * x[:, :, None, :, :]).sum(3)                       # (b, d, t, N)
    if initial_state is not None:
        h = h + torch.exp(S) * initial_state.to(cdt)[:, :, None, :]
    y = (h * Cc).sum(-1)
    if D is not None:
        y = y + D.to(cdt).unsqueeze(-1) * u
    if z is not None:
        zc = z.to(cdt)
        y = y * zc / (1 + torch.exp(-zc))
    last = h[:, :, -1]
    return (y, last) if return_last_state else y


CASES = [
    Case(2, 1, 3, 1, dtype=torch.float64),
    Case(2, 7, 4, 3, G=2, dtype=torch.float64),
    Case(1, 9, 6, 2, G=3, dtype=torch.float64, softplus=False, bias=False),
    Case(2, 8, 5, 4, dtype=torch.float64, z=False, D=False),
    Case(2, 7, 4, 3, G=2, dtype=torch.float64, h0=True),
    Case(1, 1, 3, 2, dtype=torch.float64, h0=True, use_last=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_closed_form(case):
    x = make_inputs(case)
    got = run_scan(selective_scan_ref, x, case)
    want = run_scan(naive_scan, detached_copy(x), case)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    compare("closed_form", got, want, case)


def test_reference_fp32_output_types():
    case = Case(2, 5, 4, 3, dtype=torch.bfloat16)
    x = make_inputs(case)
    out, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 5)
    assert last.dtype == torch.float32 and last.shape == (2, 4, 3)


@pytest.mark.parametrize("h0", [False, True], ids=["zero_state", "initial_state"])
def test_reference_gradcheck_fp64(h0):
    gradcheck_scan(selective_scan_ref, Case(2, 5, 4, 3, G=2, dtype=torch.float64, h0=h0))


def test_a_scan_split_in_two_equals_the_whole():
    """Scanning t < k, then t >= k from the first part's last state, is the whole scan: what
    train_mode=history does with its chunks."""
    case = Case(2, 9, 4, 3, G=2, dtype=torch.float64, h0=True)
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case).items()}
    whole, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                     delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True,
                                     initial_state=x["initial_state"])
    state, outs = x["initial_state"], []
    for lo, hi in ((0, 4), (4, 9)):
        part = {k: x[k][..., lo:hi] for k in ("u", "delta", "B", "C", "z")}
        out, state = selective_scan_ref(part["u"], part["delta"], x["A"], part["B"], part["C"], D=x["D"],
                                        z=part["z"], delta_bias=x["delta_bias"], delta_softplus=True,
                                        return_last_state=True, initial_state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, -1), whole)
    torch.testing.assert_close(state, last)


def test_initial_state_of_the_wrong_shape_is_refused():
    case = Case(2, 5, 4, 3)
    x = make_inputs(case)
    with pytest.raises(ValueError, match=r"initial_state must be \(batch, dim, N\) = \(2, 4, 3\)"):
        selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], initial_state=torch.zeros(2, 3, 4))


def test_reference_softplus_is_torch_softplus():
    # the closed form spells softplus as log1p(exp); make sure the two agree on the test range
    t = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(torch.log1p(torch.exp(t)), F.softplus(t))
