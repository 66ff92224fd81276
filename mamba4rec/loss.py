"""Cross-entropy over every item without keeping the [targets, items] logits.

Mamba4Rec's CE loss is ``CrossEntropyLoss(hidden @ item_embedding.weight.T, target)``: softmax over
all items at every target. Computed as written, one step of a Beauty batch (2,048 targets, 12,102
items) writes the logits, their log-softmax, a zero-filled gradient and the gradient of the
logits, 99 MB each, and reads them back. :func:`full_softmax_ce` takes the same loss a few rows
at a time instead: the forward keeps only each row's log-sum-exp, the backward recomputes one
chunk of logits, turns it into its softmax minus the one-hot target in place and adds that
chunk's share to both gradients. One more matrix product than the plain way, but each chunk's
logits stay in cache: a Mamba4Rec training step on Beauty takes 0.7x the time
(python -m benchmarks.bench_loss_share --chunk-rows), and the memory is one chunk's logits.

Value and gradients equal ``F.cross_entropy(hidden @ weight.T, target)`` up to fp32 rounding
(tests/test_loss.py). Under autocast the loss is computed in fp32, as autocast computes
cross_entropy.
"""

from __future__ import annotations

import torch

#: rows per chunk on CPU (Mamba4Rec's ce_chunk_rows auto): 64 x 12,102 items is 3 MiB of fp32
#: logits. Measured on Beauty's sequence batches (quiet AMD EPYC, 2 cores; docs/ARCHITECTURE.md):
#: the fastest of 32-256 rows at 1 thread and at 2 threads.
CPU_CHUNK_ROWS = 64


def _wide(hidden, weight):
    """Both in fp32 at least (fp64 stays fp64): the loss is never computed in half precision."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    return hidden.to(dtype), weight.to(dtype)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = _wide(hidden, weight)
            lse = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
            for s in range(0, h.shape[0], chunk):
                lse[s:s + chunk] = torch.logsumexp(h[s:s + chunk] @ w.T, dim=1)
            target_logit = (h * w[target]).sum(dim=1)
            loss = (lse - target_logit).mean()
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = _wide(hidden, weight)
            n = h.shape[0]
            scale = grad_loss.to(h.dtype) / n
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            for s in range(0, n, ctx.chunk):
                hc = h[s:s + ctx.chunk]
                # softmax of the chunk's logits: exp(logit - lse), in place, times d loss / d logit's scale
                p = torch.addmm(lse[s:s + ctx.chunk, None].neg(), hc, w.T).exp_().mul_(scale)
                if need_h:
                    grad_h[s:s + ctx.chunk] = p @ w
                if need_w:
                    grad_w.addmm_(p.T, hc)
            # the one-hot target's part of softmax - one_hot
            if need_h:
                grad_h -= scale * w[target]
            if need_w:
                grad_w.index_add_(0, target, -scale * h)
        return (grad_h.to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None)


def full_softmax_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                    chunk_rows: int = CPU_CHUNK_ROWS) -> torch.Tensor:
    """Mean over the rows of the cross-entropy of ``hidden @ weight.T`` ([T, H] x [V, H]) against
    ``target`` ([T] item ids), ``chunk_rows`` rows of logits at a time."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"full_softmax_ce: hidden [T, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"full_softmax_ce: one target per row expected, got {tuple(target.shape)} "
                         f"for {hidden.shape[0]} rows")
    if chunk_rows < 1:
        raise ValueError(f"full_softmax_ce: chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedSoftmaxCE.apply(hidden, weight, target, int(chunk_rows))
