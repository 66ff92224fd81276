"""Dropout for float32 CPU tensors: a counter-based mask in one compiled pass (the `fast` extra).

Why. On CPU, ``F.dropout`` draws one Bernoulli per element through torch's generic sampler:
7-8 ns an element forward + backward at 1 thread (python -m benchmarks.bench_dropout), which
made dropout 15 % of a Mamba4Rec training batch (batch 2048, L 50, hidden 64). Here one int64
from torch's default generator seeds a hash (splitmix64's finaliser over a Weyl sequence) of
each group of four elements' index; each 16-bit quarter of a hash gives an element 15 uniform
bits, and the element is kept where those bits are >= round(p * 2^15), then scaled. The loop
vectorises (about 0.35 ns an element). The backward computes the same mask again from the same
seed: nothing but the seed is kept for it.

Semantics: the same as ``nn.Dropout`` except that p is taken to the nearest multiple of 2^-15
(p = 0.2 drops with probability 0.200012); kept elements are scaled by 1 / (1 - that p), so the
expectation is exact. The seed comes from torch's default generator, so ``torch.manual_seed``
(RecBole's ``init_seed``) makes runs repeatable and ``--resume`` restores them; the result does
not depend on the thread count. Anything else (eval mode, p = 0, small tensors, other dtypes
or devices, no numba, ``MAMBA4REC_FAST_DROPOUT=0``) goes to ``F.dropout``.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import numba_scan as _numba_scan

#: Below this many elements F.dropout is quick enough and the kernel call not worth it
#: (python -m benchmarks.bench_dropout: forward + backward at 1 thread, the two about equal at
#: 4,096 elements).
MIN_ELEMENTS = 1 << 13
_ONE = 1 << 15  # 15 random bits per element
#: elements per block: a block's hashes fill it a quarter at a time (see _masked)
_BLOCK = 1 << 12

_kernels = None
_lock = threading.Lock()

# splitmix64: a Weyl sequence (the golden-ratio increment) through a 64-bit finaliser; every
# output bit depends on every bit of seed + j * increment, so distinct j give independent bits
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LOW15 = np.uint64(0x7FFF)


def _threshold(p: float) -> int:
    return min(_ONE, max(0, round(p * _ONE)))


def _hash(seed, j):
    z = seed + np.uint64(j) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def _masked(x, seed, threshold, scale, out):
    """out[i] = x[i] * scale where element i's 15 random bits are >= threshold, else 0.

    One 64-bit hash of (seed, j) gives four elements 16 bits each (15 used). In a whole block
    of _BLOCK elements starting at b, hash j = b / 4 + k serves elements b + k, b + q + k,
    b + 2q + k and b + 3q + k (q = _BLOCK / 4): the block's hashes go to a buffer, then each
    quarter of the block is one contiguous loop, so both loops vectorise. The elements past the
    last whole block take hash i // 4, quarter i % 4: hashes no block uses. The forward and the
    backward call this with the same seed, so no mask is stored."""
    n = x.shape[0]
    q = _BLOCK // 4
    blocks = n // _BLOCK
    thr = np.uint64(threshold)
    for c in _prange(blocks):
        z = np.empty(q, np.uint64)
        for k in range(q):
            z[k] = _hash(seed, c * q + k)
        for r in range(4):
            shift = np.uint64(16 * r)
            xr = x[c * _BLOCK + r * q:c * _BLOCK + (r + 1) * q]
            outr = out[c * _BLOCK + r * q:c * _BLOCK + (r + 1) * q]
            for k in range(q):
                outr[k] = xr[k] * (scale * np.float32(((z[k] >> shift) & _LOW15) >= thr))
    for i in range(blocks * _BLOCK, n):
        bits = _hash(seed, i >> 2) >> np.uint64(16 * (i & 3))
        out[i] = x[i] * (scale * np.float32((bits & _LOW15) >= thr))


_prange = range


def _compile():
    global _kernels, _prange, _hash
    with _lock:
        if _kernels is None:
            import numba

            _prange = numba.prange
            _hash = numba.njit(cache=True, inline="always")(_hash)
            _kernels = numba.njit(cache=True, parallel=True)(_masked)
    return _kernels


def _apply(t, seed, threshold, scale):
    out = torch.empty(t.numel(), dtype=torch.float32)
    _numba_scan._run(_compile(), t.detach().contiguous().view(-1).numpy(), seed, np.int64(threshold), scale,
                     out.numpy())
    return out.view(t.shape)


class _Dropout(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, p):
        # one int64 from torch's generator seeds the hash: torch.manual_seed governs the masks
        ctx.seed = np.uint64(torch.empty((), dtype=torch.int64).random_().item())
        ctx.threshold = _threshold(p)
        ctx.scale = np.float32(_ONE / (_ONE - ctx.threshold))
        return _apply(x, ctx.seed, ctx.threshold, ctx.scale)

    @staticmethod
    @once_differentiable  # a double backward raises instead of returning a detached gradient
    def backward(ctx, grad):
        return _apply(grad, ctx.seed, ctx.threshold, ctx.scale), None


#: Set to 0 to use torch's dropout everywhere (e.g. to time the two side by side).
ENV = "MAMBA4REC_FAST_DROPOUT"


def applies(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether dropout(x) takes the compiled path."""
    return (training and 0.0 < p < 1.0 and x.is_cpu and x.dtype == torch.float32
            and x.numel() >= MIN_ELEMENTS and _numba_scan.available() and os.environ.get(ENV, "1") != "0")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if _threshold(p) == _ONE:  # p rounds to 1: everything dropped, as F.dropout(p=1) does
        return F.dropout(x, 1.0, training)
    if applies(x, p, training):
        return _Dropout.apply(x, p)
    return F.dropout(x, p, training)


class FastDropout(nn.Dropout):
    """nn.Dropout whose training-mode forward on big float32 CPU tensors runs the compiled path
    (see the module docstring); identical state dict and repr, so checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


__all__ = ["ENV", "FastDropout", "MIN_ELEMENTS", "applies", "dropout"]
