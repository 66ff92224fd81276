"""The Triton kernels of the selective scan: one fused forward, one chunked backward, and the
softplus they share with the state update (mamba4rec/kernels/state_update_triton.py). Their
launchers, the autograd Function and the public ``selective_scan_fn`` are in
mamba4rec/kernels/selective_scan.py, which has the shapes.

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

An initial state h_{-1} (HAS_INITIAL_STATE) is where the forward's recurrence and the
backward's pass F of chunk 0 start instead of zeros; nothing else changes, since the decay
rewrite holds for any state a chunk starts from. Its gradient exp(a_0) g_0 is what the
reverse recurrence carries out of t = 0, so the backward stores it once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    "HAS_INITIAL_STATE": lambda args: args["h0_ptr"] is not None,
}


@triton.heuristics(_FLAGS)
@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, states_ptr,
    L, N, dim_per_group, n_dblk, chunk_size,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_h0_b, s_h0_d, s_h0_n,
    s_o_b, s_o_d, s_o_l,
    s_st_b, s_st_d, s_st_c,
    DELTA_SOFTPLUS: tl.constexpr, STORE_ALL_STATES: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
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

    if HAS_INITIAL_STATE:
        h = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n,
                    mask=mask_dn, other=0.0).to(tl.float32)
    else:
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
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, states_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dD_part_ptr, dB_part_ptr, dC_part_ptr, dh0_ptr,
    L, N, dim, dim_per_group, n_dblk, chunk_size,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_h0_b, s_h0_d, s_h0_n,
    s_do_b, s_do_d, s_do_l,
    s_dl_b, s_dl_d, s_dl_n,
    s_st_b, s_st_d, s_st_c,
    DELTA_SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (batch, G * n_dblk), as the forward. du, ddelta (fp32), dz are contiguous
    (B, D, L); dA_part (B, D, N) and dD_part (B, D) fp32 are summed over batch by the
    launcher, dB_part / dC_part (B, G, n_dblk, L, N) fp32 over the channel blocks. With
    HAS_INITIAL_STATE, dh0 (B, D, N) fp32 contiguous receives the initial state's gradient.

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
    The identity holds whatever state h_{s-1} the chunk starts from, so chunk 0 only has to
    start pass F from the initial state (the decay term at t = 0 is g_0 exp(a_0) h_{-1}).
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
        if HAS_INITIAL_STATE:  # the first chunk starts from h_{-1}: read it only there
            # (the mask as one comparison: the interpreter turns mask_dn & (c == 0) into int32)
            mask_h0 = mask_d[:, None] & (offs_n[None, :] < tl.where(c == 0, N, 0))
            h0 = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n,
                         mask=mask_h0, other=0.0).to(tl.float32)
            h = tl.where(c > 0, h, h0)
        else:
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
    if HAS_INITIAL_STATE:  # after t = 0, g_in = exp(a_0) g_0 = dL/dh_{-1}
        tl.store(dh0_ptr + pid_b * dim * N + offs_d[:, None] * N + offs_n[None, :], g_in, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
