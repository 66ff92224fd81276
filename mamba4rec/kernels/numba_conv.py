"""The Mamba block's causal depthwise conv and its SiLU on CPU as numba-compiled loops, forward
and backward (the `fast` extra).

y = silu(bias + sum_k w[k] * xp[t + k]) per (sequence, channel), where xp is the channel's
d_conv - 1 inputs before position 0 (the carried conv state, or zeros) followed by its L inputs.

Why. torch runs this as a cat (with a state), a depthwise Conv1d (oneDNN on CPU) and a SiLU, each
a pass over (batch, d_inner, L) forward and more backward; the conv's backward was about 1 ms a
call at a history batch's shapes, 9 % of ML-1M's history-mode step (benchmarks/profile_train_step.py
at 3240ab3). Here each (sequence, channel) row is one loop nest whose L + d_conv - 1 inputs stay in
L1: the taps as d_conv passes of a fused multiply-add over t (vectorised), the sigmoid through
numba_scan's fast exp. The backward recomputes the pre-activation rather than keep it. Per-chunk
partial sums of the weight and bias gradients are added in a fixed order (numba_scan.CHUNKS
chunks of sequences), so results do not depend on the thread count.

Contract: :func:`causal_conv_silu` takes x (batch, dim, L), the Conv1d's weight (dim, 1, d_conv)
and bias (dim,), and optionally the state (batch, dim, d_conv - 1), oldest input first, and
returns silu of the causal conv, (batch, dim, L); gradients reach all four. float32 CPU tensors
with numba installed take the compiled loops; anything else (other dtypes or devices, no numba)
takes the same computation in torch ops.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from . import numba_scan as _scan
from .numba_env import run as _run

#: numba caches these kernels keyed on this file only; they inline numba_scan's _exp1 and
#: _sigmoid: bump this with any change to those, so that no kernel compiled from the old ones is
#: loaded again
SCAN_HELPERS_REVISION = 1

_kernels = None
_lock = threading.Lock()
_prange = range
_exp1 = _sigmoid = None


def _inputs(x, w, st, has_st, b, d, xp):
    """xp = the state's d_conv - 1 inputs (or zeros), then x[b, d, :]."""
    K1 = w.shape[1] - 1
    for i in range(K1):
        xp[i] = st[b, d, i] if has_st else np.float32(0.0)
    xr = x[b, d]
    for t in range(x.shape[2]):
        xp[t + K1] = xr[t]


def _pre(w, bias, d, xp, pre):
    """pre[t] = bias[d] + sum_k w[d, k] xp[t + k]: one vectorised pass over t per tap."""
    L = pre.shape[0]
    bd = bias[d]
    for t in range(L):
        pre[t] = bd
    for k in range(w.shape[1]):
        wk = w[d, k]
        xs = xp[k:k + L]
        for t in range(L):
            pre[t] += wk * xs[t]


def _forward(x, w, bias, st, has_st, n_chunks, y):
    batch, dim, L = x.shape
    for c in _prange(n_chunks):
        xp = np.empty(L + w.shape[1] - 1, np.float32)
        pre = np.empty(L, np.float32)
        for b in range(*_scan._chunk_range(c, n_chunks, batch)):
            for d in range(dim):
                _inputs(x, w, st, has_st, b, d, xp)
                _pre(w, bias, d, xp, pre)
                yr = y[b, d]
                for t in range(L):
                    a = pre[t]
                    yr[t] = a * _sigmoid(a, _exp1(-abs(a)))


def _backward(x, w, bias, st, has_st, gy, n_chunks, gx, gst, gw_part, gb_part):
    batch, dim, L = x.shape
    K = w.shape[1]
    for c in _prange(n_chunks):
        xp = np.empty(L + K - 1, np.float32)
        pre = np.empty(L, np.float32)
        gxp = np.empty(L + K - 1, np.float32)
        for b in range(*_scan._chunk_range(c, n_chunks, batch)):
            for d in range(dim):
                _inputs(x, w, st, has_st, b, d, xp)
                _pre(w, bias, d, xp, pre)
                gr = gy[b, d]
                gb = np.float32(0.0)
                for t in range(L):  # pre becomes dL/dpre: silu'(a) = s (1 + a (1 - s))
                    a = pre[t]
                    s = _sigmoid(a, _exp1(-abs(a)))
                    g = gr[t] * s * (np.float32(1.0) + a * (np.float32(1.0) - s))
                    pre[t] = g
                    gb += g
                gb_part[c, d] += gb
                for j in range(L + K - 1):
                    gxp[j] = np.float32(0.0)
                for k in range(K):
                    wk = w[d, k]
                    xs, gs = xp[k:k + L], gxp[k:k + L]
                    acc = np.float32(0.0)
                    for t in range(L):
                        acc += pre[t] * xs[t]
                        gs[t] += pre[t] * wk
                    gw_part[c, d, k] += acc
                for i in range(K - 1):
                    gst[b, d, i] = gxp[i]
                gxr = gx[b, d]
                for t in range(L):
                    gxr[t] = gxp[t + K - 1]


def _compile():
    """jit the loops above on first use (numba is imported only here), with the scan's helpers."""
    global _kernels, _prange, _exp1, _sigmoid, _inputs, _pre
    with _lock:
        if _kernels is None:
            import numba

            _scan._compile()
            _exp1, _sigmoid, _prange = _scan._exp1, _scan._sigmoid, numba.prange
            flags = {"reassoc", "contract", "arcp", "nsz"}  # as the scan's: a NaN stays NaN
            inner = numba.njit(cache=True, fastmath=flags, inline="always")
            _inputs, _pre = inner(_inputs), inner(_pre)
            outer = numba.njit(cache=True, fastmath=flags, parallel=True)
            _kernels = outer(_forward), outer(_backward)
    return _kernels


_NO_STATE = np.zeros((1, 1, 1), np.float32)


class _CausalConvSiLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        fwd, _ = _compile()
        xc = x.detach().contiguous()
        w = weight.detach()[:, 0, :].contiguous()
        st = state.detach().contiguous() if state is not None else None
        batch, dim, L = x.shape
        n_chunks = min(_scan.CHUNKS, batch)
        y = torch.empty(batch, dim, L, dtype=torch.float32)
        _run(fwd, xc.numpy(), w.numpy(), bias.detach().contiguous().numpy(),
             st.numpy() if st is not None else _NO_STATE, st is not None, n_chunks, y.numpy())
        ctx.save_for_backward(xc, w, bias, st)
        ctx.n_chunks = n_chunks
        return y

    @staticmethod
    def backward(ctx, gy):
        _, bwd = _compile()
        xc, w, bias, st = ctx.saved_tensors
        batch, dim, L = xc.shape
        K = w.shape[1]
        gx = torch.empty_like(xc)
        gst = torch.empty(batch, dim, K - 1, dtype=torch.float32)
        gw = np.zeros((ctx.n_chunks, dim, K), np.float32)
        gb = np.zeros((ctx.n_chunks, dim), np.float32)
        _run(bwd, xc.numpy(), w.numpy(), bias.detach().contiguous().numpy(),
             st.numpy() if st is not None else _NO_STATE, st is not None,
             gy.detach().to(torch.float32).contiguous().numpy(), ctx.n_chunks, gx.numpy(), gst.numpy(), gw, gb)
        grad_w = torch.from_numpy(gw.sum(0))[:, None, :]  # chunks added in order: any thread count
        grad_b = torch.from_numpy(gb.sum(0))
        return gx, grad_w, grad_b, (gst if st is not None else None)


def causal_conv_silu_torch(x, weight, bias, state=None):
    """The same in torch ops: silu(conv1d) over the state (or zeros) and x."""
    k = weight.shape[-1] - 1
    padded = F.pad(x, (k, 0)) if state is None else torch.cat([state.to(x.dtype), x], dim=-1)
    return F.silu(F.conv1d(padded, weight, bias, groups=x.shape[1]))


def applies(x, weight, bias, state=None) -> bool:
    """Whether :func:`causal_conv_silu` takes the compiled loops for these tensors."""
    tensors = (x, weight, bias) + ((state,) if state is not None else ())
    return (_scan.available() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and bias is not None)


def _check_shapes(x, weight, bias, state):
    """The compiled loops index without bounds checks: shapes that do not fit are refused here."""
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (x.shape[1], 1) or weight.shape[2] < 1:
        raise ValueError(f"causal_conv_silu: x (batch, dim, L) and weight (dim, 1, d_conv) expected, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv_silu: bias (dim,) = ({x.shape[1]},) expected, got {tuple(bias.shape)}")
    want = (x.shape[0], x.shape[1], weight.shape[2] - 1)
    if state is not None and tuple(state.shape) != want:
        raise ValueError(f"causal_conv_silu: state (batch, dim, d_conv - 1) = {want} expected, got "
                         f"{tuple(state.shape)}")


def causal_conv_silu(x, weight, bias, state=None):
    """silu(causal depthwise conv) of x (batch, dim, L) with the Conv1d's weight (dim, 1, d_conv) and
    bias, starting from ``state`` (batch, dim, d_conv - 1; zeros when None). Differentiable in all
    four. The compiled loops where :func:`applies`, else :func:`causal_conv_silu_torch`."""
    _check_shapes(x, weight, bias, state)
    if applies(x, weight, bias, state):
        return _CausalConvSiLU.apply(x, weight, bias, state)
    return causal_conv_silu_torch(x, weight, bias, state)


__all__ = ["applies", "causal_conv_silu", "causal_conv_silu_torch"]
