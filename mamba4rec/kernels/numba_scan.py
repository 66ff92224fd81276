"""The selective scan on CPU as numba-compiled loops, forward and backward (the `fast` extra).

Why. The torch CPU scan (mamba4rec/kernels/torch_scan.py) is bound by memory traffic: every one of its
~10 passes reads and writes (L, bb, D, N) blocks, and each time step is one more op. Here each
(sequence, channel) pair is one loop over time whose N-vector of states stays in registers or
L1; its L x N decays and states (6.4 KiB each at L=50, N=32) are kept for the backward in
thread-local buffers, so nothing of size (B, D, L, N) is ever written to memory. Sequences are
spread over threads (numba prange); per-thread partial sums of dA, dD and d(delta_bias) are
added in a fixed order, so results do not depend on the thread count.

exp. numba's exp is a scalar libm call, which keeps LLVM from vectorising the loop over N. The
decays exp(dt * A) have dt * A <= 0 (dt > 0 after softplus, A < 0), so ``_exp1`` does exp on
(-87, 0] as Cody-Waite range reduction plus a degree-7 polynomial and a 2^k built from its bits
(an LLVM bitcast): plain arithmetic, vectorised inside the loop of the states. Max relative
error 3e-7 against float64 exp (float32's own rounding is 6e-8); below -87 it returns
exp(-87) ~ 1.6e-38 instead of a denormal or 0. An argument above 0 (a positive A or dt, which
Mamba never makes) is clamped to 0 by the same code, so ``selective_scan_numba`` checks for it
and hands such calls to the torch scan.

Elementwise work per (sequence, channel, t), not per state. softplus of delta + bias and the
backward's sigmoid of it are computed per (sequence, channel) as a loop over t before its states
(``_dt_row``: the fast exp and a series, vectorised over t; libm calls would be scalar), and so
are the gate silu(z) = z sigmoid(z) and its derivative. The backward recomputes all of them rather than keep them
from the forward: nothing (batch, dim, L)-sized is held between the two beyond the inputs.

Subnormals: on x86 each chunk of sequences runs with subnormals flushed to zero (see
mamba4rec/kernels/numba_env.py for why).

Contract: mamba_ssm's selective_scan_fn plus initial_state (see mamba4rec/kernels/reference.py). float32, bfloat16 and
float16 inputs compute in float32; float64 (gradcheck) goes to the torch scan, which computes
in float64. Gradients come back in each input's dtype.
"""

from __future__ import annotations

import importlib.util
import math
import threading

import numpy as np
import torch

from ._validate import check_scan_inputs
from .numba_env import fp_intrinsics as _fp_intrinsics, run as _run, x86 as _x86  # noqa: F401 (_x86: tests)

#: numba caches the kernels keyed on this file only; they inline numba_env's intrinsics: bump this
#: with any change there (and numba_conv.SCAN_HELPERS_REVISION with any to _exp1 or _sigmoid here)
ENV_REVISION = 1

#: Sequences are split into this many chunks, each with its own dA/dD/dbias partial sums; a
#: fixed number (not the thread count) keeps the summation order, so results are reproducible
#: on any machine. 64 chunks give every thread of a typical CPU several chunks to balance.
CHUNKS = 64

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375            # ln 2 split in two (Cody-Waite): k * _LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4

_available = None


def available() -> bool:
    """Whether numba is installed (looked up once, without importing it)."""
    global _available
    if _available is None:
        _available = importlib.util.find_spec("numba") is not None
    return _available


def _exp1(v):
    """exp(v) for one float32 v <= 0, in plain arithmetic that vectorises once inlined in a loop."""
    # clamp to [-87, 0] with comparisons that are false for NaN, so a NaN stays NaN (it then
    # poisons the polynomial; min/max would turn it into a finite bound)
    if v < np.float32(-87.0):
        v = np.float32(-87.0)
    if v > np.float32(0.0):
        v = np.float32(0.0)
    kf = np.floor(v * np.float32(_LOG2E) + np.float32(0.5))
    r = v - kf * np.float32(_LN2_HI) - kf * np.float32(_LN2_LO)   # |r| <= ln2 / 2
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _as_f32((np.int32(kf) + np.int32(127)) << np.int32(23))  # * 2^k


def _exp_nonpos(x, out):
    """out = exp(x) for x <= 0, elementwise over 1-D float32 arrays."""
    for i in range(x.shape[0]):
        out[i] = _exp1(x[i])


def _dt_row(b, d, delta, bias, softplus, dtb, sgb, want_sig):
    """dtb = softplus(x) (torch's: x above 20 as it is) or x, with x = delta + bias, for sequence
    b, channel d, and sgb = sigmoid(x) (want_sig); both exactly 0 at x = -inf, as torch's. One exp(-|x|)
    for both, log1p(e) = 2 atanh(e / (2 + e)) as its series (|s| <= 1/3, 7 terms), vectorised over t."""
    for t in range(dtb.shape[0]):
        x = delta[b, d, t] + bias[d]
        if not softplus:
            dtb[t] = x
            continue
        e = _exp1(-abs(x))
        s = e / (np.float32(2.0) + e)
        s2 = s * s
        q = np.float32(1.0 / 13.0)
        q = q * s2 + np.float32(1.0 / 11.0)
        q = q * s2 + np.float32(1.0 / 9.0)
        q = q * s2 + np.float32(1.0 / 7.0)
        q = q * s2 + np.float32(1.0 / 5.0)
        q = q * s2 + np.float32(1.0 / 3.0)
        sp = (x if x > np.float32(0.0) else np.float32(0.0)) + np.float32(2.0) * s * (q * s2 + np.float32(1.0))
        dtb[t] = x if x > np.float32(20.0) else (sp if x != np.float32(-np.inf) else np.float32(0.0))
        if want_sig:
            sgb[t] = _sigmoid(x, e) if x != np.float32(-np.inf) else np.float32(0.0)


def _sigmoid(x, e):
    """sigmoid(x), given e = exp(-|x|)."""
    r = np.float32(1.0) / (np.float32(1.0) + e)
    return r if x >= np.float32(0.0) else e * r


def softplus_f32(v):
    """torch.nn.functional.softplus (threshold 20) on one float32, for numba: the numba step
    (mamba4rec/numba_step.py) compiles it; the scan applies torch's own to whole tensors."""
    return v if v > 20.0 else np.float32(math.log1p(math.exp(v)))


def _chunk_range(c, n_chunks, batch):
    return (c * batch) // n_chunks, ((c + 1) * batch) // n_chunks


def _states(b, d, g, u, dtb, A, BT, CT, h0, has_h0, L, N, dtu, dA, H, ys):
    """For sequence b, channel d (group g), with dtb = its dt (after bias and softplus): dtu = dt * u,
    dA = exp(dt * A), H = every state and ys = C . h (the output before D and the gate).

    Flat t-major buffers with a zero row on each side, so the loops need no branch at the ends:
    H row t + 1 holds h_t (row 0: h_{-1}, the initial state or 0), dA row t holds exp(dt_t A) (row L: 1, so that the
    backward's G_{L-1} = gy C + 1 * glast). BT, CT are (G, L, N) and passed whole with g. The decays are
    computed in the loop of the states (one pass, nothing in between stored)."""
    for n in range(N):
        H[n] = h0[b, d, n] if has_h0 else np.float32(0.0)
        dA[L * N + n] = np.float32(1.0)  # G_{L-1} = gy C + 1 * G_L, with G_L = d(loss)/d(last state)
    for t in range(L):
        o, q = t * N, (t + 1) * N
        v = dtb[t]
        w = v * u[b, d, t]
        dtu[t] = w
        acc = np.float32(0.0)
        for n in range(N):
            a = _exp1(v * A[d, n])
            dA[o + n] = a
            h = a * H[o + n] + w * BT[g, t, n]
            H[q + n] = h
            acc += h * CT[g, t, n]
        ys[t] = acc


def _transpose_bc(Bm, Cm, b, G, L, N, BT, CT):
    for g in range(G):
        for n in range(N):
            for t in range(L):
                BT[g, t, n] = Bm[b, g, n, t]
                CT[g, t, n] = Cm[b, g, n, t]


def _buffers(G, L, N):
    return (np.empty((G, L, N), np.float32), np.empty((G, L, N), np.float32), np.empty(L, np.float32),
            np.empty(L, np.float32), np.empty((L + 1) * N, np.float32), np.empty((L + 1) * N, np.float32))


def _forward(u, delta, bias, softplus, A, Bm, Cm, Dv, z, has_z, h0, has_h0, n_chunks, out, last, want_last):
    """z (has_z), (batch, dim, L); dt = softplus(delta + bias) or delta + bias."""
    batch, dim, L = u.shape
    G, N = Bm.shape[1], A.shape[1]
    Dg = dim // G
    for c in _prange(n_chunks):
        csr = _flush_subnormals()
        b0, b1 = _chunk_range(c, n_chunks, batch)
        BT, CT = np.empty((G, L, N), np.float32), np.empty((G, L, N), np.float32)
        hs = np.empty(N, np.float32)  # the state: only the outputs and the last state are kept
        dtb, gate = np.empty(L, np.float32), np.empty(L, np.float32)
        for b in range(b0, b1):
            _transpose_bc(Bm, Cm, b, G, L, N, BT, CT)
            for d in range(dim):
                g = d // Dg
                Dd = Dv[d]
                _dt_row(b, d, delta, bias, softplus, dtb, dtb, False)
                for t in range(L if has_z else 0):
                    zt = z[b, d, t]
                    gate[t] = zt * _sigmoid(zt, _exp1(-abs(zt)))
                for n in range(N):
                    hs[n] = h0[b, d, n] if has_h0 else np.float32(0.0)
                for t in range(L):
                    v, ut = dtb[t], u[b, d, t]
                    w = v * ut
                    acc = np.float32(0.0)
                    for n in range(N):
                        h = _exp1(v * A[d, n]) * hs[n] + w * BT[g, t, n]
                        hs[n] = h
                        acc += h * CT[g, t, n]
                    y = acc + Dd * ut
                    if has_z:
                        y *= gate[t]
                    out[b, d, t] = y
                if want_last:
                    for n in range(N):
                        last[b, d, n] = hs[n]
        _restore_fp(csr)


def _backward(u, delta, bias, softplus, A, Bm, Cm, Dv, zf, has_z, h0, has_h0, gout, glast, has_glast,
              n_chunks, du, ddelta, dB, dC, dz, dh0, dA_part, dD_part, dbias_part):
    """dt as in _forward, zf = z (has_z), (batch, dim, L)."""
    batch, dim, L = u.shape
    G, N = Bm.shape[1], A.shape[1]
    Dg = dim // G
    for c in _prange(n_chunks):
        csr = _flush_subnormals()
        b0, b1 = _chunk_range(c, n_chunks, batch)
        BT, CT, dtu, ys, dA, H = _buffers(G, L, N)
        dBT = np.empty((G, L, N), np.float32)
        dCT = np.empty((G, L, N), np.float32)
        gy, dtb, sgb = np.empty(L, np.float32), np.empty(L, np.float32), np.empty(L, np.float32)
        GG = np.empty((L + 1) * N, np.float32)
        accA = np.empty(N, np.float32)
        Ad = np.empty(N, np.float32)
        for b in range(b0, b1):
            _transpose_bc(Bm, Cm, b, G, L, N, BT, CT)
            dBT[:] = 0.0
            dCT[:] = 0.0
            for d in range(dim):
                g = d // Dg
                _dt_row(b, d, delta, bias, softplus, dtb, sgb, True)
                _states(b, d, g, u, dtb, A, BT, CT, h0, has_h0, L, N, dtu, dA, H, ys)
                Dd = Dv[d]
                dD = np.float32(0.0)
                for t in range(L):  # the gate: gy = dL/dy before it, and dz
                    go = gout[b, d, t]
                    if has_z:
                        # silu(z) = z s and its derivative s (1 + z (1 - s)), with s = sigmoid(z)
                        zt = zf[b, d, t]
                        st = _sigmoid(zt, _exp1(-abs(zt)))
                        dgate = st * (np.float32(1.0) + zt * (np.float32(1.0) - st))
                        dz[b, d, t] = go * (ys[t] + Dd * u[b, d, t]) * dgate
                        go = go * (zt * st)
                    gy[t] = go
                    dD += go * u[b, d, t]
                dD_part[c, d] += dD
                for n in range(N):
                    GG[L * N + n] = glast[b, d, n] if has_glast else np.float32(0.0)
                    accA[n] = np.float32(0.0)
                    Ad[n] = A[d, n]
                # G_t = dL/dh_t = gy_t C_t + dA_{t+1} G_{t+1}: the only sequential part; then
                # plain passes over the (L, N) block, each simple enough to vectorise (one fused
                # loop with six arrays did not: 2x slower). Row slices: with t falling, an index
                # t * N + n is not provably >= 0, and its negative-index fix-up kept the loop over n
                # scalar (5x slower, a third of the backward)
                for t in range(L - 1, -1, -1):
                    o, q = t * N, (t + 1) * N
                    gt = gy[t]
                    Gt, Gq, dAq, Ct = GG[o:q], GG[q:q + N], dA[q:q + N], CT[g, t]
                    for n in range(N):
                        Gt[n] = Gq[n] * dAq[n] + gt * Ct[n]
                if has_h0:  # h_0 = dA_0 h_{-1} + ...: dL/dh_{-1} = dA_0 G_0
                    for n in range(N):
                        dh0[b, d, n] = dA[n] * GG[n]
                dbias = np.float32(0.0)
                for t in range(L):  # dC += gy h_t, dB += G_t dt u, and the decays' gradient
                    o, q = t * N, (t + 1) * N
                    gt, w, dtt = gy[t], dtu[t], dtb[t]
                    ddtu = np.float32(0.0)   # d(dt u) = G_t . B_t
                    ddt_x = np.float32(0.0)  # X . A, with X = G_t dA_t h_{t-1}
                    for n in range(N):
                        Gn = GG[o + n]
                        dCT[g, t, n] += gt * H[q + n]
                        dBT[g, t, n] += Gn * w
                        X = Gn * dA[o + n] * H[o + n]
                        ddtu += Gn * BT[g, t, n]
                        ddt_x += X * Ad[n]
                        accA[n] += X * dtt
                    du[b, d, t] = ddtu * dtt + gy[t] * Dd
                    ddt = ddt_x + ddtu * u[b, d, t]
                    if softplus:
                        ddt *= sgb[t]
                    ddelta[b, d, t] = ddt
                    dbias += ddt
                dbias_part[c, d] += dbias
                for n in range(N):
                    dA_part[c, d, n] += accA[n]
            for gg in range(G):
                for n in range(N):
                    for t in range(L):
                        dB[b, gg, n, t] = dBT[gg, t, n]
                        dC[b, gg, n, t] = dCT[gg, t, n]
        _restore_fp(csr)


def _flush_subnormals():
    """Run like this until _compile replaces it: compiled, it sets the x86 thread's MXCSR to flush
    subnormal results and inputs to zero (FTZ, DAZ) and returns its previous value."""
    return 0


def _restore_fp(csr):
    """Compiled: put back the MXCSR value _flush_subnormals returned."""


_prange = range
_kernels = None
_as_f32 = None  # set by _compile
_lock = threading.Lock()


def _compile():
    """jit the functions above on first use (numba is imported only here)."""
    global _kernels, _prange, _as_f32, _exp1, _exp_nonpos, _chunk_range, _states, _transpose_bc, _buffers
    global _dt_row, _sigmoid, _flush_subnormals, _restore_fp
    with _lock:
        if _kernels is None:
            import numba
            from llvmlite import ir
            from numba.core import cgutils, types
            from numba.extending import intrinsic

            _flush_subnormals, _restore_fp = _fp_intrinsics(intrinsic, types, ir, cgutils)

            @intrinsic
            def as_f32(typingctx, i):  # the float32 with the bits of an int32
                return numba.float32(numba.int32), lambda context, builder, sig, args: builder.bitcast(
                    args[0], ir.FloatType())

            _as_f32 = as_f32

            # fastmath: reassociation (vectorised sums), FMA contraction, reciprocals and no
            # signed zeros; not the no-NaN/no-inf flags, so a NaN input still comes out as NaN
            flags = {"reassoc", "contract", "arcp", "nsz"}
            inner = numba.njit(cache=True, fastmath=flags, inline="always")
            _exp1 = inner(_exp1)
            _exp_nonpos, _chunk_range = inner(_exp_nonpos), inner(_chunk_range)
            _states, _transpose_bc, _buffers = inner(_states), inner(_transpose_bc), inner(_buffers)
            _dt_row, _sigmoid = inner(_dt_row), inner(_sigmoid)
            _prange = numba.prange
            outer = numba.njit(cache=True, fastmath=flags, parallel=True)
            _kernels = outer(_forward), outer(_backward)
    return _kernels


def _np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _as_groups(X: torch.Tensor) -> torch.Tensor:
    return X.unsqueeze(1) if X.dim() == 3 else X


_DUMMY = np.zeros((1, 1, 1), np.float32)  # stands for an absent (batch, dim, L) input


def _bias(delta_bias, dim) -> np.ndarray:
    return _np32(delta_bias) if delta_bias is not None else np.zeros(dim, np.float32)


class _SelectiveScanNumba(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        fwd, _ = _compile()
        batch, dim, L = u.shape
        n_chunks = max(1, min(CHUNKS, batch))
        Dv = D if D is not None else u.new_zeros(dim)
        zf = _np32(z) if z is not None else _DUMMY
        h0 = _np32(initial_state) if initial_state is not None else _DUMMY
        out = np.empty((batch, dim, L), np.float32)
        last = np.empty((batch, dim, A.shape[1]) if return_last_state else (1, 1, 1), np.float32)
        _run(fwd, _np32(u), _np32(delta), _bias(delta_bias, dim), bool(delta_softplus), _np32(A),
             _np32(_as_groups(B)), _np32(_as_groups(C)), _np32(Dv), zf,
             z is not None, h0, initial_state is not None, n_chunks, out, last, bool(return_last_state))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = bool(delta_softplus)
        y = torch.from_numpy(out).to(u.dtype)
        if return_last_state:
            return y, torch.from_numpy(last)
        return y

    @staticmethod
    def backward(ctx, gout, glast=None):
        _, bwd = _compile()
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        Bg, Cg = _as_groups(B), _as_groups(C)
        n_chunks = max(1, min(CHUNKS, batch))
        Dv = D if D is not None else u.new_zeros(dim)
        zf = _np32(z) if z is not None else _DUMMY
        has_h0 = initial_state is not None
        h0 = _np32(initial_state) if has_h0 else _DUMMY
        dh0 = np.empty((batch, dim, N) if has_h0 else (1, 1, 1), np.float32)
        du = np.empty((batch, dim, L), np.float32)
        ddelta = np.empty((batch, dim, L), np.float32)
        dB = np.empty(tuple(Bg.shape), np.float32)
        dC = np.empty(tuple(Cg.shape), np.float32)
        dz = np.empty((batch, dim, L) if z is not None else (1, 1, 1), np.float32)
        dA_part = np.zeros((n_chunks, dim, N), np.float32)
        dD_part = np.zeros((n_chunks, dim), np.float32)
        dbias_part = np.zeros((n_chunks, dim), np.float32)
        gl = _np32(glast) if glast is not None else np.zeros((1, 1, 1), np.float32)
        _run(bwd, _np32(u), _np32(delta), _bias(delta_bias, dim), ctx.delta_softplus, _np32(A), _np32(Bg),
             _np32(Cg), _np32(Dv), zf, z is not None, h0, has_h0, _np32(gout), gl, glast is not None, n_chunks,
             du, ddelta, dB, dC, dz, dh0, dA_part, dD_part, dbias_part)

        def back(arr, like):
            return torch.from_numpy(arr).to(like.dtype)

        return (back(du, u), back(ddelta, delta), back(dA_part.sum(0), A), back(dB, B).view(B.shape),
                back(dC, C).view(C.shape), back(dD_part.sum(0), D) if D is not None else None,
                back(dz, z) if z is not None else None,
                back(dbias_part.sum(0), delta_bias) if delta_bias is not None else None,
                back(dh0, initial_state) if has_h0 else None, None, None)


def selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None):
    """Selective scan on CPU tensors, compiled with numba; mamba_ssm's selective_scan_fn contract
    (see selective_scan_torch for the arguments). Calls it cannot serve exactly go to the torch
    scan: float64 inputs, and an A with a positive entry (the fast exp covers dt * A <= 0 only;
    Mamba's A = -exp(A_log) is always negative). Needs numba (``pip install numba``)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not available():
        raise ImportError('the numba scan needs numba, which is not installed: pip install numba '
                          "(or use scan_impl=torch)")
    if u.device.type != "cpu":
        raise ValueError(f"the numba scan runs on CPU tensors; these are on {u.device.type}: use scan_impl=auto")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    negative_dt = False
    if not delta_softplus:  # dt = delta + bias as given: dt * A > 0 where dt < 0
        dt = delta if delta_bias is None else delta + delta_bias[:, None]
        negative_dt = bool((dt < 0).any())
    if any(t is not None and t.dtype == torch.float64 for t in tensors) or bool((A > 0).any()) or negative_dt:
        from .torch_scan import selective_scan_torch

        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    initial_state)
    return _SelectiveScanNumba.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                     bool(return_last_state))


__all__ = ["CHUNKS", "available", "selective_scan_numba"]
