"""Plain-torch references: readable fp32 loops over L, the ground truth for every test.

Shapes::

    u, delta, z   : (B D L)          A : (D N)
    B, C          : (B N L) or (B G N L)   channel d reads group d // (D // G)
    D, delta_bias : (D,)
    initial_state : (B D N) or None (zeros)  the state before t = 0, differentiable
    out           : (B D L) in u's dtype      last_state : (B D N) float32 (float64 for float64 u)

Recurrence, per channel d and state n::

    dt  = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t     (h_{-1} = initial_state, or 0)
    y_t = sum_n h_t * C_t + D * u_t ;   out = y * silu(z) if z is given
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_scan_inputs


def _per_channel(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, dim, N, L), each channel reading its group."""
    if X.dim() == 3:
        return X.unsqueeze(1).expand(X.shape[0], dim, X.shape[1], X.shape[2])
    groups = X.shape[1]
    return X.repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, initial_state=None):
    """Selective scan, one step at a time in float32. Same signature as mamba_ssm's.

    float64 input is computed in float64 (so torch.autograd.gradcheck can check it);
    every other dtype is computed in float32.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    batch, dim, L = u.shape
    u32, dt = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A32 = A.to(cdt)
    Bc, Cc = _per_channel(B.to(cdt), dim), _per_channel(C.to(cdt), dim)
    h = u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, :, t, None] * A32)                        # (B, D, N)
        dBu = (dt[:, :, t] * u32[:, :, t])[:, :, None] * Bc[:, :, :, t]  # (B, D, N)
        h = dA * h + dBu
        ys.append((h * Cc[:, :, :, t]).sum(-1))                        # (B, D)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u32
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out
