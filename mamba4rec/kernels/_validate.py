"""Shape and dtype checks shared by every selective-scan implementation.

One place, so the reference, the CPU path and the Triton path reject the same bad
input with the same message (tests compare them against each other).
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> int:
    """Validate selective-scan arguments; return the number of B/C groups G.

    Shapes (mamba_ssm's contract)::

        u, delta, z : (batch, dim, L)      A : (dim, N)
        B, C        : (batch, N, L) or (batch, G, N, L)
        D, delta_bias : (dim,)
        initial_state : (batch, dim, N) or None
    """
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, L = u.shape
    if L < 1 or batch < 1 or dim < 1:
        raise ValueError(f"selective_scan: u must have batch, dim, L >= 1, got shape {_shape(u)}")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real (dim, N) tensor")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got shape {_shape(A)}")
    N = A.shape[1]
    if N < 1:
        raise ValueError("selective_scan: A must have N >= 1 state columns")
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            expect, g = (batch, N, L), 1
        elif t.dim() == 4:
            g = t.shape[1]
            expect = (batch, g, N, L)
        else:
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L), got shape {_shape(t)}"
            )
        if tuple(t.shape) != expect:
            raise ValueError(
                f"selective_scan: {name} must be {expect} for u {_shape(u)} and A {_shape(A)}, "
                f"got {_shape(t)}"
            )
        if g < 1 or dim % g != 0:
            raise ValueError(f"selective_scan: {name} has G={g} groups, which must divide dim={dim}")
        if groups is not None and g != groups:
            raise ValueError(f"selective_scan: B has {groups} groups but C has {g}; they must match")
        groups = g
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != dim):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got shape {_shape(t)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(f"selective_scan: initial_state must be (batch, dim, N) = {(batch, dim, N)} (the state "
                         f"before the first step, as return_last_state gives it), got {_shape(initial_state)}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"selective_scan: {name} must be a floating tensor, got {t.dtype}")
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    return groups
