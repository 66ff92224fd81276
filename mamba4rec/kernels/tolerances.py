"""The one tolerance table of the scan and step paths: what the tests hold each path to
(tests/scan_utils.py imports it) and what ``python -m mamba4rec.selfcheck`` holds each path to
on the user's device. Plain data and torch dtypes; nothing here runs a kernel.
"""

from __future__ import annotations

import torch

_FP64 = (1e-8, 1e-10)
#: mamba_ssm's starting points (tests/ops/test_selective_scan.py), (rtol, atol) per input dtype.
_MAMBA = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def _scan_vs_ref(rtol, atol):
    """A CPU scan against selective_scan_ref on the same inputs: out, last state and every
    gradient at (rtol, atol). (The worst case of the suite sits below a quarter of it; the
    gradients of delta, A, D and delta_bias need no larger atol.)"""
    return {"out": (rtol, atol), "grad": (rtol, atol)}


def _triton_vs_ref(rtol, atol):
    """The Triton scan against selective_scan_ref: as in mamba_ssm, ddelta (x-part and decay
    part over the whole suffix of the sequence) gets 5x rtol / 10x atol, kept for the GPU
    (in the CPU interpreter it stays far inside the output's tolerance); every other gradient,
    dA included, is held to the output's tolerance."""
    return {"out": (rtol, atol), "grad": (rtol, atol), "ddelta": (5 * rtol, 10 * atol)}


#: (path, dtype) -> {quantity: (rtol, atol)}. The path names what is compared with what:
#:   closed_form   selective_scan_ref against the closed form recomputed in fp64 (test_scan_reference)
#:   torch, numba  that scan against selective_scan_ref on the same inputs
#:   triton        the Triton scan against selective_scan_ref on the same inputs
#:   torch_fp64    a scan in the dtype against the reference run in fp64 on the same values: the torch
#:                 scan (test_properties), selective_scan_ref on the device (the selfcheck's "ref");
#:                 gradients also scale atol by max(1, max |reference grad|)
#:   step_triton   the Triton one-step update against the step reference, and Triton steps (alone or
#:                 inside MambaBlock.step, or stepped over a sequence) against the scan / the torch step
#:   step_ref      the step reference stepped over a sequence against selective_scan_ref
#:   numba_model   one training step of a Mamba4Rec, scan_impl numba against torch (loss, gradients)
#:   gradcheck     torch.autograd.gradcheck of a scan in fp64 ("grad": its rtol, atol; eps below)
#: quantity: "out" (output, last state, loss), "grad" (every gradient without its own entry),
#: "d<name>" (the gradient of one input).
TOLERANCES = {
    ("closed_form", torch.float64): _scan_vs_ref(*_FP64),
    **{("torch", dt): _scan_vs_ref(*tol) for dt, tol in {torch.float64: _FP64, **_MAMBA}.items()},
    **{("numba", dt): _scan_vs_ref(*tol) for dt, tol in {torch.float64: _FP64, **_MAMBA}.items()},
    **{("triton", dt): _triton_vs_ref(*tol) for dt, tol in _MAMBA.items()},
    ("torch_fp64", torch.float64): {"out": (1e-7, 1e-7), "grad": (4e-7, 4e-7)},
    ("torch_fp64", torch.float32): {"out": (6e-4, 2e-3), "grad": (2.4e-3, 8e-3)},
    ("torch_fp64", torch.bfloat16): {"out": (3e-2, 5e-2), "grad": (1.2e-1, 2e-1)},
    ("step_triton", torch.float32): {"out": _MAMBA[torch.float32]},
    ("step_triton", torch.bfloat16): {"out": _MAMBA[torch.bfloat16]},
    ("step_ref", torch.float32): {"out": (1e-5, 1e-5)},
    ("step_ref", torch.bfloat16): {"out": _MAMBA[torch.bfloat16]},
    ("numba_model", torch.float32): {"out": (1e-5, 1e-5), "grad": (1e-3, 1e-4)},
    ("gradcheck", torch.float64): {"grad": (1e-5, 1e-6)},
}
GRADCHECK_EPS = 1e-6


def tol(path: str, dtype: torch.dtype, what: str = "out") -> tuple[float, float]:
    """(rtol, atol) for quantity ``what`` ("out", "last_state", "grad", "d<name>") of ``path``."""
    try:
        table = TOLERANCES[(path, dtype)]
    except KeyError:
        have = sorted(f"{p}/{d}" for p, d in TOLERANCES)
        raise KeyError(f"no tolerance for path {path!r} in {dtype}; the table has {', '.join(have)}") from None
    if what in ("out", "last_state", "loss"):
        return table["out"]
    return table.get(what, table["grad"])
