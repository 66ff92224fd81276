"""Selective scan as Triton kernels, forward and backward: a drop-in for mamba_ssm's
``selective_scan_fn`` that needs no CUDA build.

Shapes (see kernels/reference.py)::

    u, delta, z : (batch, dim, L)      A : (dim, N)
    B, C        : (batch, N, L) or (batch, G, N, L)     D, delta_bias : (dim,)
    out         : (batch, dim, L) in u's dtype           last_state : (batch, dim, N) float32

Design. One program per (sequence, block of BLOCK_D channels) walks L in chunks of CHUNK
time steps. Inside a chunk everything is a (CHUNK, BLOCK_D, BLOCK_N) register tile: dt (bias,
softplus), dA = exp(dt*A), dBu = dt*u*B, the recurrence h_t = dA_t*h_{t-1} + dBu_t as a
parallel ``tl.associative_scan`` over the chunk (the carried state folded into its first
element), the contraction with C, the D skip and the SiLU(z) gate. All arithmetic is fp32.

The forward stores the state entering each chunk, (batch, dim, n_chunks, N) fp32, and nothing
else. The backward walks the chunks in reverse: it recomputes the chunk's states from that
boundary state with the same scan, runs the state-gradient recurrence
g_t = gy_t*C_t + dA_{t+1}*g_{t+1} as a reverse associative scan (carrying dA*g across chunk
boundaries), and forms every gradient from the tiles. The dA term uses
dA_t*h_{t-1} = h_t - dBu_t, so h_{t-1} is never shifted or divided. No (batch, dim, L, N)
tensor exists: extra memory is O(batch*dim*N*L/CHUNK) for the boundary states plus fp32
dB/dC accumulators and (batch, dim, N) partial sums for dA.

CHUNK = 16: a (16, BLOCK_D, BLOCK_N) fp32 tile with BLOCK_D*BLOCK_N <= 256 is 4096 values,
what 4-8 warps hold in registers without spilling; the boundary states then cost 1/16 of
a full (B, D, L, N) tensor. BLOCK_D shrinks as N grows (N up to 256). These are starting
points for the GPU sweep in benchmarks/bench_scan.py, not yet tuned on a GPU.

dB and dC are summed over channels with fp32 atomic adds (order not deterministic; the
other gradients are). Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import check_scan_inputs

CHUNK = 16
TILE = 4096  # CHUNK * BLOCK_D * BLOCK_N upper bound

#: Tests set this to fill outputs with NaN before launch, so unwritten elements show up.
DEBUG_FILL_NAN = False


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) of h -> a*h + b
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _dt(delta_ptr, bias, ptr, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = tl.load(delta_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    dt = tl.where(mask, dt, 0.0)  # masked steps: dt = 0, so dA = 1 and dBu = 0 (state unchanged)
    return raw, dt


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, states_ptr, last_ptr,
    dim, L, N, G, group_size, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = offs_d // group_size

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    state_base = (pid_b * dim + offs_d[:, None]) * n_chunks * N + offs_n[None, :]
    for c in range(n_chunks):
        tl.store(states_ptr + state_base + c * N, h, mask=mask_dn)
        t = c * CHUNK + offs_t
        m2 = (t < L)[:, None] & mask_d[None, :]
        ptr2 = (pid_b * dim + offs_d[None, :]) * L + t[:, None]
        uu = tl.load(u_ptr + ptr2, mask=m2, other=0.0).to(tl.float32)
        _, dt = _dt(delta_ptr, bias, ptr2, m2, HAS_BIAS, SOFTPLUS)
        m3 = m2[:, :, None] & mask_n[None, None, :]
        ptr3 = ((pid_b * G + grp[None, :, None]) * N + offs_n[None, None, :]) * L + t[:, None, None]
        Bv = tl.load(B_ptr + ptr3, mask=m3, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + ptr3, mask=m3, other=0.0).to(tl.float32)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])
        dBu = (dt * uu)[:, :, None] * Bv
        first = (offs_t == 0)[:, None, None]
        dBu = dBu + tl.where(first, dA * h[None, :, :], 0.0)
        _, H = tl.associative_scan((dA, dBu), 0, _combine)
        y = tl.sum(H * Cv, axis=2)
        if HAS_D:
            y = y + Dv[None, :] * uu
        if HAS_Z:
            zz = tl.load(z_ptr + ptr2, mask=m2, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + ptr2, y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where((offs_t == CHUNK - 1)[:, None, None], H, 0.0), axis=0)
    tl.store(last_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    dout_ptr, dlast_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
    dim, L, N, G, group_size, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, ONE_GROUP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = offs_d // group_size

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    dn_ptr = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # dA_{t+1} * g_{t+1} entering a chunk's end
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + dn_ptr, mask=mask_dn, other=0.0).to(tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == CHUNK - 1)[:, None, None]
    state_base = (pid_b * dim + offs_d[:, None]) * n_chunks * N + offs_n[None, :]
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * CHUNK + offs_t
        m2 = (t < L)[:, None] & mask_d[None, :]
        ptr2 = (pid_b * dim + offs_d[None, :]) * L + t[:, None]
        uu = tl.load(u_ptr + ptr2, mask=m2, other=0.0).to(tl.float32)
        raw, dt = _dt(delta_ptr, bias, ptr2, m2, HAS_BIAS, SOFTPLUS)
        m3 = m2[:, :, None] & mask_n[None, None, :]
        ptr3 = ((pid_b * G + grp[None, :, None]) * N + offs_n[None, None, :]) * L + t[:, None, None]
        Bv = tl.load(B_ptr + ptr3, mask=m3, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + ptr3, mask=m3, other=0.0).to(tl.float32)

        # recompute the chunk's states from the saved boundary state
        h0 = tl.load(states_ptr + state_base + c * N, mask=mask_dn, other=0.0)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])
        dtu = dt * uu
        dBu = dtu[:, :, None] * Bv
        _, H = tl.associative_scan((dA, dBu + tl.where(first, dA * h0[None, :, :], 0.0)), 0, _combine)

        g = tl.load(dout_ptr + ptr2, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + ptr2, mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            y = tl.sum(H * Cv, axis=2)
            if HAS_D:
                y = y + Dv[None, :] * uu
            tl.store(dz_ptr + ptr2, (g * y * sz * (1.0 + zz * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m2)
            g = g * zz * sz
        if HAS_D:
            dD_acc += tl.sum(g * uu, axis=0)

        # state gradient: G_t = g_t * C_t + dA_{t+1} * G_{t+1}, reverse scan over the chunk
        t1 = t + 1
        m2n = (t1 < L)[:, None] & mask_d[None, :]
        _, dt1 = _dt(delta_ptr, bias, ptr2 + 1, m2n, HAS_BIAS, SOFTPLUS)
        dA1 = tl.where(last, 0.0, tl.exp(dt1[:, :, None] * A[None, :, :]))
        x = g[:, :, None] * Cv + tl.where(last, carry[None, :, :], 0.0)
        _, GH = tl.associative_scan((dA1, x), 0, _combine, reverse=True)
        carry = tl.sum(tl.where(first, dA * GH, 0.0), axis=0)

        # dC = sum over channels of g * h ; dB = sum over channels of G * dt * u
        dCc = g[:, :, None] * H
        dBc = GH * dtu[:, :, None]
        if ONE_GROUP:
            ptrn = (pid_b * N + offs_n[None, :]) * L + t[:, None]
            mtn = (t < L)[:, None] & mask_n[None, :]
            tl.atomic_add(dC_ptr + ptrn, tl.sum(dCc, axis=1), mask=mtn)
            tl.atomic_add(dB_ptr + ptrn, tl.sum(dBc, axis=1), mask=mtn)
        else:
            tl.atomic_add(dC_ptr + ptr3, dCc, mask=m3)
            tl.atomic_add(dB_ptr + ptr3, dBc, mask=m3)

        ddtu = tl.sum(GH * Bv, axis=2)
        du = ddtu * dt
        if HAS_D:
            du = du + g * Dv[None, :]
        tl.store(du_ptr + ptr2, du.to(du_ptr.dtype.element_ty), mask=m2)
        X = GH * (H - dBu)                        # = G_t * dA_t * h_{t-1}
        ddt = ddtu * uu + tl.sum(X * A[None, :, :], axis=2)
        dA_acc += tl.sum(X * dt[:, :, None], axis=0)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        tl.store(ddelta_ptr + ptr2, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
    tl.store(dA_part_ptr + dn_ptr, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


def _blocks(dim: int, N: int):
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(triton.next_power_of_2(dim), TILE // (CHUNK * block_n)))
    return block_d, block_n


def _empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if DEBUG_FILL_NAN else t


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    G = 1 if B.dim() == 3 else B.shape[1]
    batch, dim, L = u.shape
    N = A.shape[1]
    Bg = B.reshape(batch, G, N, L).contiguous()
    Cg = C.reshape(batch, G, N, L).contiguous()
    return (u.contiguous(), delta.contiguous(), A.contiguous(), Bg, Cg,
            None if D is None else D.contiguous(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.contiguous(), G)


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, G):
    batch, dim, L = u.shape
    N = A.shape[1]
    block_d, block_n = _blocks(dim, N)
    n_chunks = triton.cdiv(L, CHUNK)
    out = _empty((batch, dim, L), u.dtype, u.device)
    states = _empty((batch, dim, n_chunks, N), torch.float32, u.device)
    last = _empty((batch, dim, N), torch.float32, u.device)
    grid = (batch, triton.cdiv(dim, block_d))
    dummy = u
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, out, states, last,
        dim, L, N, G, dim // G, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return out, states, last


class SelectiveScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        b_shape, c_shape = B.shape, C.shape
        u, delta, A, B, C, D, z, delta_bias, G = _prepare(u, delta, A, B, C, D, z, delta_bias)
        out, states, last = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, G)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.G, ctx.b_shape, ctx.c_shape = delta_softplus, G, b_shape, c_shape
        if return_last_state:
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, L = u.shape
        N, G = A.shape[1], ctx.G
        block_d, block_n = _blocks(dim, N)
        n_chunks = states.shape[2]
        dev = u.device
        du = _empty(u.shape, u.dtype, dev)
        ddelta = _empty(delta.shape, delta.dtype, dev)
        dz = _empty(z.shape, z.dtype, dev) if z is not None else None
        dB = torch.zeros(batch, G, N, L, dtype=torch.float32, device=dev)
        dC = torch.zeros(batch, G, N, L, dtype=torch.float32, device=dev)
        dA_part = _empty((batch, dim, N), torch.float32, dev)
        dD_part = _empty((batch, dim), torch.float32, dev) if D is not None else None
        dummy = u
        grid = (batch, triton.cdiv(dim, block_d))
        _selective_scan_bwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            dout.contiguous(), dlast.contiguous() if dlast is not None else dummy, states,
            du, ddelta, dz if dz is not None else dummy, dB, dC, dA_part,
            dD_part if dD_part is not None else dummy,
            dim, L, N, G, dim // G, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, HAS_DLAST=dlast is not None, ONE_GROUP=G == 1,
            CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
        )
        dA = dA_part.sum(0).to(A.dtype)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        ddelta_bias = ddelta.float().sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        dB = dB.to(B.dtype).reshape(ctx.b_shape)
        dC = dC.to(C.dtype).reshape(ctx.c_shape)
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, None


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan with Triton kernels; mamba_ssm's ``selective_scan_fn`` contract.

    Args:
        u, delta, z: (batch, dim, L), fp32 / fp16 / bf16 (fp32 accumulation).  A: (dim, N) real.
        B, C: (batch, N, L) or grouped (batch, G, N, L).  D, delta_bias: (dim,).
        delta_softplus: dt = softplus(delta + delta_bias).
        return_last_state: also return the final state, (batch, dim, N) float32.
    Returns:
        out (batch, dim, L) in u's dtype [, last_state].
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                 bool(return_last_state))


__all__ = ["CHUNK", "SelectiveScanFn", "selective_scan_fn"]
