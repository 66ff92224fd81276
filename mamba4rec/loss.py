"""Cross-entropy over every item without keeping the [targets, items] logits.

Mamba4Rec's CE loss is ``CrossEntropyLoss(hidden @ item_embedding.weight.T, target)``: softmax over
all items at every target. Computed as written, one step of a Beauty batch (2,048 targets, 12,102
items) writes the logits, their log-softmax, a zero-filled gradient and the gradient of the
logits, 99 MB each, and reads them back. :func:`full_softmax_ce` takes the same loss a few rows
at a time instead: for each chunk of rows the forward makes the logits once, takes their
log-sum-exp and, when a gradient is wanted, turns them into softmax minus the one-hot target in
place and adds the chunk's share to both gradients (the backward then only scales them). The
same three matrix products as the plain way, but each chunk's
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
    """The loss and, when a gradient is wanted, both gradients in one pass over the chunks: a
    chunk's logits are made once, turned into softmax minus one-hot in place and multiplied
    into d hidden and d weight right away (three matrix products a chunk; recomputing the
    logits in the backward would take four, and the exponentials twice). The backward only
    scales what the forward kept (d loss is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, grad_mode):
        # needs_input_grad says True under no_grad too: grad_mode is the caller's
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = _wide(hidden, weight)
            n = h.shape[0]
            lse = torch.empty(n, dtype=h.dtype, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            # the logits go to one buffer, reused by every chunk, from a contiguous copy of w.T:
            # a fresh [chunk, items] result each chunk and the transposed operand made the
            # logits' product about 1.5x slower than the other two in a CPU step (the buffer
            # stays in cache); the copy is one pass over w
            w_t = w.T.contiguous()
            buf = torch.empty(min(chunk, n), w.shape[0], dtype=h.dtype, device=h.device)
            for s in range(0, n, chunk):
                hc = h[s:s + chunk]
                logits = torch.mm(hc, w_t, out=buf[:hc.shape[0]])
                if not (need_h or need_w):
                    lse[s:s + chunk] = torch.logsumexp(logits, dim=1)
                    continue
                # one exp pass gives both the log-sum-exp and the softmax, in place
                top = logits.amax(dim=1, keepdim=True)
                p = logits.sub_(top).exp_()
                total = p.sum(dim=1, keepdim=True)
                lse[s:s + chunk] = (top + total.log()).squeeze(1)
                p.div_(total)
                p[torch.arange(len(hc), device=p.device), target[s:s + chunk]] -= 1  # minus one-hot
                if need_h:
                    torch.mm(p, w, out=grad_h[s:s + chunk])
                if need_w:
                    grad_w.addmm_(p.T, hc)
            target_logit = (h * w[target]).sum(dim=1)
            loss = (lse - target_logit).mean()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = n
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return (None if grad_h is None else (grad_h * scale.to(grad_h.dtype)).to(ctx.dtypes[0]),
                None if grad_w is None else (grad_w * scale.to(grad_w.dtype)).to(ctx.dtypes[1]), None, None, None)


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
    return _ChunkedSoftmaxCE.apply(hidden, weight, target, int(chunk_rows), torch.is_grad_enabled())
