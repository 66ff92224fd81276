"""Selective scan in Triton: one fused forward kernel and one chunked backward kernel.

Shapes (mamba_ssm's ``selective_scan_fn`` contract, see mamba4rec/kernels/reference.py)::

    u, delta, z   : (B D L)          A : (D N) real
    B, C          : (B N L) or (B G N L)   channel d reads group d // (D // G)
    D, delta_bias : (D,)
    initial_state : (B D N) or None (zeros)  the state before t = 0, any float dtype
    out           : (B D L) in u's dtype      last_state : (B D N) float32

Tiers: the kernels ``_selective_scan_fwd_kernel`` / ``_selective_scan_bwd_kernel`` (private,
``@triton.jit``, in mamba4rec/kernels/selective_scan_triton.py with the design notes), the
launchers ``_selective_scan_fwd`` / ``_selective_scan_bwd`` (allocate, pick blocks, build
grids), ``SelectiveScanFn`` (autograd) and the public ``selective_scan_fn``.
"""

from __future__ import annotations

import torch
import triton

from ._validate import check_scan_inputs
from .selective_scan_triton import _selective_scan_bwd_kernel, _selective_scan_fwd_kernel

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
#: backward needs 168-219 registers (up to 231 with an initial state; sm_80 alike) and at most
#: a 32-byte stack frame; at 8 it hits 255 and spills 600+ bytes
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


def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size,
                        store_all_states):
    """Launch the forward from ``initial_state`` (None: zeros). Returns (out, states): states
    (B, D, n_chunks, N) fp32 holds the state at the end of every chunk (last one = last
    state), or (B, D, 1, N) with only the last state when ``store_all_states`` is False (no
    backward will need them)."""
    groups = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
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
    h0s = initial_state.stride() if initial_state is not None else (0, 0, 0)
    grid = (batch, groups * n_dblk)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, states,
        L, N, dpg, n_dblk, chunk_size,
        *u.stride(), *delta.stride(), *_bc_strides(B), *_bc_strides(C), *zs, *h0s, *out.stride(),
        *states.stride()[:3],
        DELTA_SOFTPLUS=bool(delta_softplus), STORE_ALL_STATES=bool(store_all_states),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, states


def _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, states,
                        delta_softplus, chunk_size):
    """Launch the backward; return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state), each in its input's dtype (None for absent optional inputs)."""
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
    dh0 = _empty((batch, dim, N), torch.float32, dev) if initial_state is not None else None
    zs = z.stride() if z is not None else (0, 0, 0)
    h0s = initial_state.stride() if initial_state is not None else (0, 0, 0)
    dls = dlast.stride() if dlast is not None else (0, 0, 0)
    grid = (batch, groups * n_dblk)
    _selective_scan_bwd_kernel[grid](
        u, delta, A_c, B, C, D_c, z, bias_c, initial_state, states, dout, dlast,
        du, ddelta, dz, dA_part, dD_part, dB_part, dC_part, dh0,
        L, N, dim, dpg, n_dblk, chunk_size,
        *u.stride(), *delta.stride(), *_bc_strides(B), *_bc_strides(C), *zs, *h0s, *dout.stride(), *dls,
        *states.stride()[:3],
        DELTA_SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
    )
    # Deterministic reductions of the per-program partials (no atomics): a torch sum over
    # the batch for dA / dD / ddelta_bias, over channel blocks for dB / dC.
    ddelta_bias = ddelta.sum(dim=(0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None

    def _bc(part, like):
        grad = part.sum(2).transpose(-1, -2)  # (B, G, N, L)
        if like.dim() == 3:
            grad = grad.squeeze(1)
        return grad.to(like.dtype).contiguous()

    return (du, ddelta.to(delta.dtype), dA, _bc(dB_part, B), _bc(dC_part, C), dD, dz, ddelta_bias, dh0)


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper. Saves the inputs and the chunk-boundary states only: no tensor of
    size (B, D, L, N) lives between forward and backward, nor the output."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size):
        out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                          delta_softplus, chunk_size, store_all_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return out, states[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, states = ctx.saved_tensors
        if dout is None and dlast is None:
            return (None,) * 11
        grads = _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state,
                                    states, ctx.delta_softplus, ctx.chunk_size)
        return (*grads, None, None)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, *, chunk_size: int | None = None):
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
        initial_state: (batch, dim, N), optional: the state before step 0 (zeros when None),
            e.g. the last state of the previous part of a sequence; float32 or the weight
            dtype, read as fp32. Differentiable: d(initial_state) = exp(dt_0 A) dL/dh_0.
        chunk_size: timesteps between the states the forward saves for the backward
            (default ``DEFAULT_CHUNK_SIZE``); changes memory, not results beyond rounding.

    Inputs may be fp32, fp16 or bf16 (mixed is fine) and non-contiguous; CUDA tensors, or
    CPU tensors with ``TRITON_INTERPRET=1`` (slow: tests and smoke runs only). Accumulation
    is fp32; ``out`` has u's dtype and every gradient its input's dtype. Gradients flow
    into the last state too, and out of it into initial_state: a sequence scanned in parts,
    each from the last state of the one before, gives the whole scan's outputs and gradients.

    Returns:
        out, or (out, last_state) when ``return_last_state``.
    """
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last_state = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                bool(delta_softplus), chunk_size)
    else:  # inference: keep only the last state, not one per chunk
        out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                          delta_softplus, chunk_size, store_all_states=False)
        last_state = states[:, :, 0]
    return (out, last_state) if return_last_state else out


__all__ = ["DEFAULT_CHUNK_SIZE", "SelectiveScanFn", "selective_scan_fn"]
