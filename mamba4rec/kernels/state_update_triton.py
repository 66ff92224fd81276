"""The one-step selective state update as a fused Triton kernel (mamba4rec/kernels/state_update.py has the
contract, the plain-torch reference and the dispatch). It shares ``_softplus`` with the Triton
scan, so a step and the scan it continues compute dt the same way.

One program per (row, block of channels): dt + bias, softplus, exp(dt * A), the state update
in place, the contraction with C, D * x and the SiLU gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selective_scan_triton import _softplus
from .state_update import _check


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                         dim, N, G, group_size,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md, mn = offs_d < dim, offs_n < N
    mdn = md[:, None] & mn[None, :]
    dt = tl.load(dt_ptr + pid_b * dim + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    x = tl.load(x_ptr + pid_b * dim + offs_d, mask=md, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0).to(tl.float32)
    grp = offs_d // group_size
    bc = (pid_b * G + grp[:, None]) * N + offs_n[None, :]
    Bv = tl.load(B_ptr + bc, mask=mdn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc, mask=mdn, other=0.0).to(tl.float32)
    sptr = state_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    s = tl.load(sptr, mask=mdn, other=0.0)
    s = s * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv
    tl.store(sptr, s, mask=mdn)
    out = tl.sum(s * Cv, axis=1)
    if HAS_D:
        out += tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * dim + offs_d, mask=md, other=0.0).to(tl.float32)
        out = out * zz * tl.sigmoid(zz)
    tl.store(out_ptr + pid_b * dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=md)

def launch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    _check(state, x, dt, A, B, C)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous: it is updated in place")
    batch, dim, N = state.shape
    G = 1 if B.dim() == 2 else B.shape[1]
    Bc, Cc = B.reshape(batch, G, N).contiguous(), C.reshape(batch, G, N).contiguous()
    out = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(triton.next_power_of_2(dim), 2048 // block_n))
    x, dt, A = x.contiguous(), dt.contiguous(), A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    _state_update_kernel[(batch, triton.cdiv(dim, block_d))](
        state, x, dt, A, Bc, Cc, D if D is not None else x, z.contiguous() if z is not None else x,
        dt_bias if dt_bias is not None else x, out, dim, N, G, dim // G,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n)
    return out
