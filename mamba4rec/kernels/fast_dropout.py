"""Dropout for large float32 CPU tensors: torch's random bits, numba's mask (the `fast` extra).

Why. On CPU, ``F.dropout`` draws one Bernoulli per element through torch's generic sampler: for
the ~46 M activations a Mamba4Rec training batch drops (batch 2048, L 50, hidden 64: embedding,
block output and the FFN's two dropouts) that was about 15 % of the batch (torch.profiler),
0.44 s for a 26 M tensor on the 2-core dev box. Here torch fills one int64 per four elements
with ``random_()`` (its fast integer path: ~20 ms for the same tensor), each 16-bit quarter
gives 15 uniform bits, and one compiled, threaded loop keeps an element where those bits are
>= round(p * 2^15), scales it and writes the mask for the backward.

Semantics: the same as ``nn.Dropout`` except that p is taken to the nearest multiple of 2^-15
(p = 0.2 drops with probability 0.200012); kept elements are scaled by 1 / (1 - that p), so the
expectation is exact. The bits come from torch's default generator, so ``torch.manual_seed``
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

from . import numba_scan as _numba_scan

#: Below this many elements F.dropout is quick enough and the kernel call not worth it.
MIN_ELEMENTS = 1 << 16
_ONE = 1 << 15  # 15 random bits per element

_kernels = None
_lock = threading.Lock()


def _threshold(p: float) -> int:
    return min(_ONE, max(0, round(p * _ONE)))


def _mask_scale(x, bits, threshold, scale, out, mask):
    n = x.shape[0]
    chunk = 1 << 16
    for c in _prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):  # branch-free, so it vectorises
            keep = np.uint8((bits[i] & np.int16(0x7FFF)) >= threshold)
            mask[i] = keep
            out[i] = x[i] * (scale * np.float32(keep))


def _apply_mask(g, mask, scale, out):
    n = g.shape[0]
    chunk = 1 << 16
    for c in _prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            out[i] = g[i] * (scale * np.float32(mask[i]))


_prange = range


def _compile():
    global _kernels, _prange
    with _lock:
        if _kernels is None:
            import numba

            _prange = numba.prange
            jit = numba.njit(cache=True, parallel=True)
            _kernels = jit(_mask_scale), jit(_apply_mask)
    return _kernels


class _Dropout(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, p):
        mask_scale, _ = _compile()
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
        threshold = _threshold(p)
        scale = np.float32(_ONE / (_ONE - threshold))
        out = torch.empty(n, dtype=torch.float32)
        mask = torch.empty(n, dtype=torch.uint8)
        _numba_scan._run(mask_scale, x.detach().contiguous().view(-1).numpy(), bits.numpy(), np.int16(threshold),
                         scale, out.numpy(), mask.numpy())
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        _, apply_mask = _compile()
        (mask,) = ctx.saved_tensors
        out = torch.empty(mask.shape[0], dtype=torch.float32)
        _numba_scan._run(apply_mask, grad.detach().contiguous().view(-1).numpy(), mask.numpy(), ctx.scale, out.numpy())
        return out.view(grad.shape), None


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
