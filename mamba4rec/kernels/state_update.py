"""One step of the selective SSM for streaming inference: fold one new input into a state.

Shapes::

    state       : (batch, dim, N) float32, updated in place
    x, dt, z    : (batch, dim)        A : (dim, N)       D, dt_bias : (dim,)
    B, C        : (batch, N) or (batch, G, N)            returns out : (batch, dim) in x's dtype

    dt  = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
    state = exp(dt * A) * state + dt * B * x
    out = sum_n state * C + D * x ;   out *= silu(z) if z is given

Cost per step is independent of how many steps came before. ``selective_state_update_ref`` is
plain torch (any device); ``selective_state_update`` is a fused Triton kernel (CUDA, or CPU
under TRITON_INTERPRET=1); ``update_state`` picks Triton on CUDA and torch elsewhere (or
the path named by ``impl``, which MambaBlock.step takes from its scan path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(X, dim):
    """(batch, N) or (batch, G, N) -> (batch, dim, N)."""
    if X.dim() == 2:
        return X[:, None, :]
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def _check(state, x, dt, A, B, C):
    batch, dim, N = state.shape
    if state.dtype != torch.float32:
        raise ValueError(f"state must be float32 (it accumulates), got {state.dtype}")
    if x.shape != (batch, dim) or dt.shape != (batch, dim):
        raise ValueError(f"x and dt must be (batch={batch}, dim={dim}), got {tuple(x.shape)} and {tuple(dt.shape)}")
    if A.shape != (dim, N):
        raise ValueError(f"A must be (dim={dim}, N={N}), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if not (t.shape == (batch, N) or (t.dim() == 3 and t.shape[0] == batch and t.shape[2] == N
                                          and dim % t.shape[1] == 0)):
            raise ValueError(f"{name} must be (batch, N) or (batch, G, N) with G dividing dim, got {tuple(t.shape)}")


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Plain-torch one-step update; ``state`` is updated in place. Returns out (batch, dim)."""
    _check(state, x, dt, A, B, C)
    return _update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """selective_state_update_ref without the shape checks (callers whose shapes are their own)."""
    dim = state.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.float()
    # Few, fused ops: at batch 1 a step is a few dozen tiny ops and their dispatch is the cost.
    state.mul_(torch.exp(dt.unsqueeze(-1) * A.float()))
    state.addcmul_((dt * xf).unsqueeze(-1), _per_channel(B.float(), dim))
    if C.dim() == 2:  # one group: the contraction over N is a batched mat-vec
        out = torch.bmm(state, C.float().unsqueeze(-1)).squeeze(-1)
    else:
        out = (state * _per_channel(C.float(), dim)).sum(-1)
    if D is not None:
        out = torch.addcmul(out, D.float(), xf)
    if z is not None:
        out.mul_(F.silu(z.float()))  # in place: out is no input of a backward formula
    return out.to(x.dtype)


_TRITON = None


def _triton_update():
    """mamba4rec/kernels/state_update_triton.launch, imported on first use (importing kernels never pulls
    in triton)."""
    global _TRITON
    if _TRITON is None:
        from .state_update_triton import launch

        _TRITON = launch
    return _TRITON


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The one-step update as a fused Triton kernel (in place on ``state``); same contract as the ref."""
    return _triton_update()(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def update_state(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, impl="auto",
                 check=True):
    """The one-step update through the path ``impl`` picks (same names as the scan's paths).

    ``auto``: Triton for CUDA tensors when triton imports, else plain torch. ``triton``: the
    Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1). ``torch`` / ``ref``: plain
    torch (one step has nothing to chunk, so the CPU path is the reference itself).
    """
    if impl == "triton":
        fn = _triton_update()
    elif impl == "auto" and state.is_cuda:
        try:
            fn = _triton_update()
        except ImportError:
            fn = selective_state_update_ref
    elif impl in ("auto", "numba", "torch", "ref"):  # one step on CPU: the torch update
        if not check:  # MambaBlock.step: its shapes are its own, and a step is dispatch-bound
            return _update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        fn = selective_state_update_ref
    else:
        raise ValueError(f"update_state: impl={impl!r} is not a path; use auto, triton, torch or ref")
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
