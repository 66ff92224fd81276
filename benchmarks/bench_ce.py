"""The CE over all items, forward + backward, side by side in one process: mamba4rec.loss's
chunked CE (both gradients made in the forward), the same chunks with the logits made again in
the backward (the way it was computed before: four matrix products a chunk where three do), and
the plain ``F.cross_entropy(hidden @ weight.T, target)``.

    python -m benchmarks.bench_ce --threads 1                     # Beauty's and ML-1M's shapes
    python -m benchmarks.bench_ce --rows 2048 --items 12102 --hidden 64 --repeats 20

The variants run interleaved (one call of each per round) so that a busy machine slows them
alike; the medians and their ratios to the chunked CE are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mamba4rec.loss import CPU_CHUNK_ROWS, full_softmax_ce

#: (name, targets a batch, items, hidden): a sequence-mode batch of each data set
SHAPES = (("amazon-beauty", 2048, 12102, 64), ("ml-1m", 2048, 3417, 64))


class _RecomputeCE(torch.autograd.Function):
    """The baseline: the forward keeps each row's log-sum-exp only; the backward makes each
    chunk's logits again and turns them into softmax minus one-hot."""

    @staticmethod
    def forward(ctx, h, w, target, chunk):
        lse = torch.empty(h.shape[0], dtype=h.dtype)
        for s in range(0, h.shape[0], chunk):
            lse[s:s + chunk] = torch.logsumexp(h[s:s + chunk] @ w.T, dim=1)
        ctx.save_for_backward(h, w, target, lse)
        ctx.chunk = chunk
        return (lse - (h * w[target]).sum(dim=1)).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, target, lse = ctx.saved_tensors
        scale = grad_loss / h.shape[0]
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            p = torch.addmm(lse[s:s + ctx.chunk, None].neg(), hc, w.T).exp_().mul_(scale)
            grad_h[s:s + ctx.chunk] = p @ w
            grad_w.addmm_(p.T, hc)
        grad_h -= scale * w[target]
        grad_w.index_add_(0, target, -scale * h)
        return grad_h, grad_w, None, None


def _variants(chunk):
    return {
        "chunked (mamba4rec.loss)": lambda h, w, t: full_softmax_ce(h, w, t, chunk),
        "chunked, logits again in backward": lambda h, w, t: _RecomputeCE.apply(h, w, t, chunk),
        "plain F.cross_entropy": lambda h, w, t: F.cross_entropy(h @ w.T, t),
    }


def bench(rows, items, hidden, chunk, repeats, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_()
    w = (torch.randn(items, hidden, generator=gen) * 0.1).requires_grad_()
    t = torch.randint(1, items, (rows,), generator=gen)
    variants = _variants(chunk)
    grads = {}
    times = {name: [] for name in variants}
    for r in range(repeats + 1):  # round 0 warms up
        for name, fn in variants.items():
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fn(h, w, t).backward()
            if r:
                times[name].append(time.perf_counter() - t0)
            grads[name] = (h.grad.clone(), w.grad.clone())
    ref = grads["plain F.cross_entropy"]
    for name, (gh, gw) in grads.items():  # the same gradients, or the timing means nothing
        torch.testing.assert_close(gh, ref[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, ref[1], rtol=1e-4, atol=1e-6)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk-rows", type=int, default=CPU_CHUNK_ROWS)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--items", type=int)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [("custom", args.rows, args.items, args.hidden)] if args.rows and args.items else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), chunk {args.chunk_rows} rows, "
          f"median of {args.repeats} forward+backward calls")
    for name, rows, items, hidden in shapes:
        medians = bench(rows, items, hidden, args.chunk_rows, args.repeats)
        base = medians["chunked (mamba4rec.loss)"]
        print(f"\n{name}: {rows} targets x {items} items x {hidden}")
        for variant, sec in medians.items():
            print(f"  {variant:36s} {sec * 1e3:8.2f} ms   {sec / base:5.2f}x")


if __name__ == "__main__":
    main()
