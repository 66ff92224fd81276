"""Selective scan in Triton: one fused forward kernel and one chunked backward kernel.

Shapes (mamba_ssm's ``selective_scan_fn`` contract, see mamba4rec/kernels/reference.py)::

    u, delta, z   : (B D L)          A : (D N) real
    B, C          : (B N L) or (B G N L)   channel d reads group d // (D // G)
    D, delta_bias : (D,)
    out           : (B D L) in u's dtype      last_state : (B D N) float32

Tiers: ``_selective_scan_fwd_kernel`` / ``_selective_scan_bwd_kernel``
(private, ``@triton.jit``), the launchers ``_selective_scan_fwd`` / ``_selective_scan_bwd``
(allocate, pick blocks, build grids), ``SelectiveScanFn`` (autograd) and the public
``selective_scan_fn``.

Design in one paragraph (longer: docs/KERNEL_NOTES.md). Each program owns one batch row
and BLOCK_D channels of one B/C group, keeps their (BLOCK_D, N) state in registers and
walks L one step at a time, so B_t / C_t are loaded once per program and shared by its
channels. The forward writes the output and, every ``chunk_size`` steps, the state at the
end of the chunk (B, D, n_chunks, N) in fp32. The backward walks the chunks in reverse;
per chunk it recomputes the states forward from the saved boundary state (pass F), then
runs the reverse recurrence for the state gradient (pass R). The states of pass F are
never stored: the gradient of the decay exp(dt*A) is rewritten so that pass F only leaves
one fp32 scalar per (b, d, t) behind (see ``_selective_scan_bwd_kernel``), which keeps
backward memory at O(B*D*L + B*D*N*L/chunk) and its work at two passes over L.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import check_scan_inputs

#: Timesteps between saved states. The backward's work does not depend on it (two passes
#: over every chunk, no O(chunk^2) recompute), so it trades only two things:
#:   memory  the saved states are B*D*N*ceil(L/chunk)*4 bytes; at 64 and N=32 that is
#:           2 bytes per (b, d, t), the size of one bf16 activation like u;
#:   rounding the decay gradient is a difference of two running sums over one chunk
#:           (see the backward kernel), whose fp32 error grows like chunk * 2^-24; at 64
#:           that is ~4e-6 relative, far under the fp32 test tolerance.
#: Not yet swept on a GPU (no measurement exists): benchmarks/bench_scan.py
#: takes --chunk-size to do it.
DEFAULT_CHUNK_SIZE = 64

#: Largest BLOCK_D * BLOCK_N tile one program keeps per state-sized register tensor, and the
#: fp32 elements of such a tile per thread (num_warps follows from both). Chosen by compiling
#: for sm_90 without a GPU (benchmarks/kernel_resources.py): at 4 elements per thread the
#: backward needs 168-218 registers and does not spill; at 8 it hits 255 and spills 600+ bytes
#: (BLOCK_D 64, N 32, 4 warps), at 16 the forward alone takes 253. Not yet timed on a GPU.
_MAX_TILE = 1024
_ELEMS_PER_THREAD = 4

#: Tests set this to float("nan") so every buffer the launchers allocate starts as NaN and an
#: element a kernel forgets to write shows up in the comparison (fla's trick). None: plain
#: torch.empty, as in production.
_EMPTY_FILL_VALUE: float | None = None


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _EMPTY_FILL_VALUE is not None:
        out.fill_(_EMPTY_FILL_VALUE)
    return out


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with log1p(w) ~ w - w^2/2 for small w so that very
    # negative x keeps its tiny positive dt instead of rounding log(1 + w) to 0.
    w = tl.exp(-tl.abs(x))
    log1p_w = tl.where(w < 1e-4, w * (1.0 - 0.5 * w), tl.log(1.0 + w))
    return tl.maximum(x, 0.0) + log1p_w


# optional inputs become compile-time flags: an absent one costs no load and no branch
_FLAGS = {
    "HAS_D": lambda args: args["D_ptr"] is not None,
    "HAS_Z": lambda args: args["z_ptr"] is not None,
    "HAS_DELTA_BIAS": lambda args: args["bias_ptr"] is not None,
}


@triton.heuristics(_FLAGS)
@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    L, N, dim_per_group, n_dblk, chunk_size,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    s_st_b, s_st_d, s_st_c,
    DELTA_SOFTPLUS: tl.constexpr, STORE_ALL_STATES: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (batch, G * n_dblk). A (D, N), D, delta_bias contiguous; states (B, D, C, N)
    with unit stride on N. Writes out and the state at the end of every chunk (or, when
    STORE_ALL_STATES is off, only the last one, at chunk index 0)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_gd = tl.program_id(1)
    grp = pid_gd // n_dblk
    blk = pid_gd % n_dblk
    offs_dl = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dl < dim_per_group
    offs_d = grp * dim_per_group + offs_dl
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # padded states read A = 0, B = C = 0: their decay is 1 and they stay exactly 0.
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_ptrs = u_ptr + pid_b * s_u_b + offs_d * s_u_d
    dt_ptrs = delta_ptr + pid_b * s_dt_b + offs_d * s_dt_d
    if HAS_Z:
        z_ptrs = z_ptr + pid_b * s_z_b + offs_d * s_z_d
    o_ptrs = out_ptr + pid_b * s_o_b + offs_d * s_o_d
    B_ptrs = B_ptr + pid_b * s_B_b + grp * s_B_g + offs_n * s_B_n
    C_ptrs = C_ptr + pid_b * s_C_b + grp * s_C_g + offs_n * s_C_n
    st_ptrs = states_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, chunk_size)
    for c in range(n_chunks):
        t_end = tl.minimum((c + 1) * chunk_size, L)
        for t in range(c * chunk_size, t_end):
            u = tl.load(u_ptrs + t * s_u_l, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptrs + t * s_dt_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptrs + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptrs + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)
            # kept fp32 whatever the input dtype: exp(dt*A) and the running state lose
            # their low bits in bf16 within a few dozen steps.
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                z = tl.load(z_ptrs + t * s_z_l, mask=mask_d, other=0.0).to(tl.float32)
                y *= z * tl.sigmoid(z)
            tl.store(o_ptrs + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        if STORE_ALL_STATES:
            tl.store(st_ptrs + c * s_st_c, h, mask=mask_dn)
        else:  # overwrite slot 0 each chunk: the last write is the last state
            tl.store(st_ptrs, h, mask=mask_dn)


@triton.heuristics(_FLAGS)
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dD_part_ptr, dB_part_ptr, dC_part_ptr,
    L, N, dim, dim_per_group, n_dblk, chunk_size,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_do_b, s_do_d, s_do_l,
    s_dl_b, s_dl_d, s_dl_n,
    s_st_b, s_st_d, s_st_c,
    DELTA_SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (batch, G * n_dblk), as the forward. du, ddelta (fp32), dz are contiguous
    (B, D, L); dA_part (B, D, N) and dD_part (B, D) fp32 are summed over batch by the
    launcher, dB_part / dC_part (B, G, n_dblk, L, N) fp32 over the channel blocks.

    Notation per channel d and state n: a_t = dt_t * A, x_t = dt_t * u_t * B_t,
    h_t = exp(a_t) h_{t-1} + x_t, dy_t = dL/dy_t, g_t = dL/dh_t = dy_t C_t + exp(a_{t+1}) g_{t+1}.

    Every gradient but the decay's needs h only (dC, dz: pass F) or g only (du, dB, the
    x-part of ddelta: pass R). The decay gradient dL/da_k = g_k exp(a_k) h_{k-1} needs both
    at the same k, in opposite directions. Within a chunk [s, e) it equals

        dL/da_k = sum_{t=k}^{e-1} (P_t - Q_t) + E,   P_t = dy_t C_t h_t,  Q_t = x_t g_t,
                                                     E = g_in h_{e-1}

    (g_in: the gradient reaching h_{e-1} from later chunks), because dy_t C_t h_t counts
    every input to h_t while x_t g_t takes back the ones from k on. So pass F leaves the
    per-channel scalar p_t = sum_n A_n P_t in the ddelta buffer and pass R adds the
    reverse running sum of p_t - q_t to ddelta. dA = sum_k dt_k dL/da_k is split the same
    way: sum_t cumdt_t P_t in pass F, minus sum_k dt_k sum_{t>=k} Q_t in pass R.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_gd = tl.program_id(1)
    grp = pid_gd // n_dblk
    blk = pid_gd % n_dblk
    offs_dl = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dl < dim_per_group
    offs_d = grp * dim_per_group + offs_dl
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_ptrs = u_ptr + pid_b * s_u_b + offs_d * s_u_d
    dt_ptrs = delta_ptr + pid_b * s_dt_b + offs_d * s_dt_d
    if HAS_Z:
        z_ptrs = z_ptr + pid_b * s_z_b + offs_d * s_z_d
    do_ptrs = dout_ptr + pid_b * s_do_b + offs_d * s_do_d
    B_ptrs = B_ptr + pid_b * s_B_b + grp * s_B_g + offs_n * s_B_n
    C_ptrs = C_ptr + pid_b * s_C_b + grp * s_C_g + offs_n * s_C_n
    st_ptrs = states_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :]
    # gradient outputs: contiguous (B, D, L)
    g_off = pid_b * dim * L + offs_d * L
    part_ptrs = (pid_b * tl.num_programs(1) + pid_gd) * L * N + offs_n  # (B, G, n_dblk, L, N)

    if HAS_DLAST:
        g_in = tl.load(dlast_ptr + pid_b * s_dl_b + offs_d[:, None] * s_dl_d + offs_n[None, :] * s_dl_n,
                       mask=mask_dn, other=0.0).to(tl.float32)
    else:
        g_in = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    n_chunks = tl.cdiv(L, chunk_size)
    for c_rev in range(n_chunks):
        c = n_chunks - 1 - c_rev
        t_start = c * chunk_size
        t_end = tl.minimum(t_start + chunk_size, L)

        # ---- pass F: states of this chunk from the one saved at the end of the previous
        h = tl.load(st_ptrs + tl.maximum(c - 1, 0) * s_st_c, mask=mask_dn, other=0.0)
        h = tl.where(c > 0, h, 0.0)  # the first chunk starts from h = 0
        cum_dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t in range(t_start, t_end):
            u = tl.load(u_ptrs + t * s_u_l, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptrs + t * s_dt_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt)
            B_t = tl.load(B_ptrs + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptrs + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t[None, :]
            # masked channels read dout = 0, so they add nothing to dC, dD, p below
            dy = tl.load(do_ptrs + t * s_do_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptrs + t * s_z_l, mask=mask_d, other=0.0).to(tl.float32)
                sig_z = tl.sigmoid(z)
                y = tl.sum(h * C_t[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                dz = dy * y * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(dz_ptr + g_off + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z * sig_z
            if HAS_D:
                dD_acc += dy * u
            P = (dy[:, None] * C_t[None, :]) * h
            tl.store(ddelta_ptr + g_off + t, tl.sum(P * A, axis=1), mask=mask_d)
            cum_dt += dt
            dA_acc += cum_dt[:, None] * P
            tl.store(dC_part_ptr + part_ptrs + t * N, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
        E = g_in * h
        run = tl.sum(E * A, axis=1)
        dA_acc += cum_dt[:, None] * E
        # pass R reads back the p_t that pass F stored; other threads of this program may
        # have written them.
        tl.debug_barrier()

        # ---- pass R: reverse recurrence for g_t, no state needed
        sum_Q = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for i in range(t_start, t_end):
            t = t_start + t_end - 1 - i
            u = tl.load(u_ptrs + t * s_u_l, mask=mask_d, other=0.0).to(tl.float32)
            dt_raw = tl.load(dt_ptrs + t * s_dt_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_DELTA_BIAS:
                dt_raw += bias
            if DELTA_SOFTPLUS:
                dt = _softplus(dt_raw)
            else:
                dt = dt_raw
            B_t = tl.load(B_ptrs + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptrs + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(do_ptrs + t * s_do_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptrs + t * s_z_l, mask=mask_d, other=0.0).to(tl.float32)
                dy = dy * z * tl.sigmoid(z)
            g = dy[:, None] * C_t[None, :] + g_in
            dtu = dt * u
            Q = dtu[:, None] * B_t[None, :] * g
            p = tl.load(ddelta_ptr + g_off + t, mask=mask_d, other=0.0)
            run += p - tl.sum(Q * A, axis=1)
            sum_Q += Q
            dA_acc -= dt[:, None] * sum_Q
            gB = tl.sum(g * B_t[None, :], axis=1)
            du = dt * gB
            if HAS_D:
                du += Dv * dy
            ddt = u * gB + run
            if DELTA_SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            tl.store(du_ptr + g_off + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + g_off + t, ddt, mask=mask_d)
            tl.store(dB_part_ptr + part_ptrs + t * N, tl.sum(g * dtu[:, None], axis=0), mask=mask_n)
            g_in = tl.exp(dt[:, None] * A) * g

    tl.store(dA_part_ptr + pid_b * dim * N + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


def _num_warps(block_d: int, block_n: int) -> int:
    return max(1, min(8, block_d * block_n // (32 * _ELEMS_PER_THREAD)))


def _blocks(batch: int, groups: int, dim_per_group: int, N: int, device) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps). N is padded to a power of 2 (masked); BLOCK_D fills
    the tile budget, then shrinks on CUDA until the grid covers the GPU twice, because
    small-batch long-sequence shapes (batch 64) would otherwise leave SMs idle for the whole
    sequential walk over L. A heuristic, not yet measured on a GPU."""
    block_n = triton.next_power_of_2(N)
    block_d = min(triton.next_power_of_2(dim_per_group), max(1, _MAX_TILE // block_n))
    if device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        while block_d > 4 and batch * groups * triton.cdiv(dim_per_group, block_d) < 2 * n_sm:
            block_d //= 2
    return block_d, block_n, _num_warps(block_d, block_n)


def _bc_strides(X: torch.Tensor) -> tuple[int, int, int, int]:
    if X.dim() == 3:  # (B, N, L): one group
        return X.stride(0), 0, X.stride(1), X.stride(2)
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size,
                        store_all_states):
    """Launch the forward. Returns (out, states): states (B, D, n_chunks, N) fp32 holds the
    state at the end of every chunk (last one = last state), or (B, D, 1, N) with only the
    last state when ``store_all_states`` is False (no backward will need them)."""
    groups = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    batch, dim, L = u.shape
    N = A.shape[1]
    dpg = dim // groups
    # the kernel indexes A, D, delta_bias as contiguous (tiny tensors: copying is free)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    n_chunks = triton.cdiv(L, chunk_size)
    out = _empty((batch, dim, L), u.dtype, u.device)
    states = _empty((batch, dim, n_chunks if store_all_states else 1, N), torch.float32, u.device)
    block_d, block_n, num_warps = _blocks(batch, groups, dpg, N, u.device)
    n_dblk = triton.cdiv(dpg, block_d)
    zs = z.stride() if z is not None else (0, 0, 0)
    grid = (batch, groups * n_dblk)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, states,
        L, N, dpg, n_dblk, chunk_size,
        *u.stride(), *delta.stride(), *_bc_strides(B), *_bc_strides(C), *zs, *out.stride(),
        *states.stride()[:3],
        DELTA_SOFTPLUS=bool(delta_softplus), STORE_ALL_STATES=bool(store_all_states),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, states


def _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states,
                        delta_softplus, chunk_size):
    """Launch the backward; return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in
    its input's dtype (None for absent optional inputs)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    dpg = dim // groups
    dev = u.device
    # the kernel indexes A, D, delta_bias as contiguous (tiny tensors: copying is free)
    A_c = A.contiguous()
    D_c = D.contiguous() if D is not None else None
    bias_c = delta_bias.contiguous() if delta_bias is not None else None
    block_d, block_n, num_warps = _blocks(batch, groups, dpg, N, dev)
    n_dblk = triton.cdiv(dpg, block_d)
    if dout is None:
        dout = torch.zeros_like(u)
    du = _empty((batch, dim, L), u.dtype, dev)
    ddelta = _empty((batch, dim, L), torch.float32, dev)  # also pass F's scratch, see kernel
    dz = _empty((batch, dim, L), z.dtype, dev) if z is not None else None
    dA_part = _empty((batch, dim, N), torch.float32, dev)
    dD_part = _empty((batch, dim), torch.float32, dev) if D is not None else None
    dB_part = _empty((batch, groups, n_dblk, L, N), torch.float32, dev)
    dC_part = _empty((batch, groups, n_dblk, L, N), torch.float32, dev)
    zs = z.stride() if z is not None else (0, 0, 0)
    dls = dlast.stride() if dlast is not None else (0, 0, 0)
    grid = (batch, groups * n_dblk)
    _selective_scan_bwd_kernel[grid](
        u, delta, A_c, B, C, D_c, z, bias_c, states, dout, dlast,
        du, ddelta, dz, dA_part, dD_part, dB_part, dC_part,
        L, N, dim, dpg, n_dblk, chunk_size,
        *u.stride(), *delta.stride(), *_bc_strides(B), *_bc_strides(C), *zs, *dout.stride(), *dls,
        *states.stride()[:3],
        DELTA_SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
    )
    # Deterministic reductions of the per-program partials (no atomics): a torch sum over
    # the batch for dA / dD / ddelta_bias, over channel blocks for dB / dC.
    ddelta_bias = ddelta.sum(dim=(0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None

    def _bc(part, like):
        grad = part.sum(2).transpose(-1, -2)  # (B, G, N, L)
        if like.dim() == 3:
            grad = grad.squeeze(1)
        return grad.to(like.dtype).contiguous()

    return (du, ddelta.to(delta.dtype), dA, _bc(dB_part, B), _bc(dC_part, C), dD, dz, ddelta_bias)


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper. Saves the inputs and the chunk-boundary states only: no tensor of
    size (B, D, L, N) lives between forward and backward, nor the output."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          chunk_size, store_all_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return out, states[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if dout is None and dlast is None:
            return (None,) * 10
        grads = _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states,
                                    ctx.delta_softplus, ctx.chunk_size)
        return (*grads, None, None)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, chunk_size: int | None = None):
    """Selective scan on the Triton kernels, forward and backward; mamba_ssm's semantics.

    Args:
        u, delta: (batch, dim, L). delta is the step size before bias / softplus.
        A: (dim, N) real, N <= 256 in practice (padded to a power of 2 inside).
        B, C: (batch, N, L), or (batch, G, N, L) where channel d reads group d // (dim // G).
        D: (dim,) skip connection, optional.
        z: (batch, dim, L) gate, optional: out = y * silu(z).
        delta_bias: (dim,), optional, added to delta before softplus.
        delta_softplus: dt = softplus(delta + delta_bias) if True, else delta + delta_bias.
        return_last_state: also return the state after step L, (batch, dim, N) float32.
        chunk_size: timesteps between the states the forward saves for the backward
            (default ``DEFAULT_CHUNK_SIZE``); changes memory, not results beyond rounding.

    Inputs may be fp32, fp16 or bf16 (mixed is fine) and non-contiguous; CUDA tensors, or
    CPU tensors with ``TRITON_INTERPRET=1`` (slow: tests and smoke runs only). Accumulation
    is fp32; ``out`` has u's dtype and every gradient its input's dtype. Gradients flow
    into the last state too.

    Returns:
        out, or (out, last_state) when ``return_last_state``.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last_state = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias,
                                                bool(delta_softplus), chunk_size)
    else:  # inference: keep only the last state, not one per chunk
        out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          chunk_size, store_all_states=False)
        last_state = states[:, :, 0]
    return (out, last_state) if return_last_state else out


__all__ = ["DEFAULT_CHUNK_SIZE", "SelectiveScanFn", "selective_scan_fn"]
