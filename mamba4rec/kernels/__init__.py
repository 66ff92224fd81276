"""Selective-scan ops for mamba4rec. Depends on torch (and, optionally, triton and numba).

Public functions share mamba_ssm's ``selective_scan_fn`` signature:

* ``selective_scan_ref``   plain-torch fp32 loop over L, the ground truth (mamba4rec/kernels/reference.py)
* ``selective_scan_torch`` the CPU / no-triton path with its own autograd (mamba4rec/kernels/torch_scan.py)
* ``selective_scan_fn``    the Triton kernels, forward and backward (mamba4rec/kernels/selective_scan.py)
* ``selective_scan_numba`` the CPU scan compiled with numba, forward and backward
                           (mamba4rec/kernels/numba_scan.py; optional: the ``fast`` extra)
* ``scan``                 dispatch by ``impl`` = auto | triton | numba | torch | ref

Beyond mamba_ssm's signature, every path takes ``initial_state`` (batch, dim, N), the state
before the first step (zeros when None), and returns its gradient: a scan split in two, the
second part started from the first's last state, is the whole scan (train_mode=history runs a
user's history in chunks this way).

And, for streaming inference, one step of the same recurrence (mamba4rec/kernels/state_update.py):

* ``selective_state_update_ref`` plain torch, state updated in place (mamba_ssm's signature)
* ``selective_state_update``     the fused Triton kernel (imported lazily)
* ``update_state``               dispatch by ``impl``, as ``scan`` (not named ``state_update``:
  that is the submodule, the same clash as ``scan`` / ``selective_scan``)
"""

from __future__ import annotations

import importlib
import os

from .reference import selective_scan_ref
from .state_update import selective_state_update_ref, update_state

SCAN_IMPLS = ("auto", "triton", "numba", "torch", "ref")
#: Environment variable that forces a scan path for every call, whatever the config says.
SCAN_IMPL_ENV = "MAMBA4REC_SCAN_IMPL"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status() -> tuple[bool, str]:
    """(usable, why): whether the Triton scan can be imported here."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken triton install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module(__name__ + ".selective_scan")
    except Exception as exc:
        return False, f"the Triton scan failed to import ({type(exc).__name__}: {exc})"
    return True, "triton is importable"


def resolve_scan_impl(impl: str, device) -> tuple[str, str]:
    """Pick the scan path for tensors on ``device``; return (path, one-line reason).

    ``MAMBA4REC_SCAN_IMPL`` (auto | triton | numba | torch | ref), when set, overrides ``impl``.
    "auto": Triton on CUDA; on CPU the numba scan when numba is installed, else the torch scan.
    """
    from . import numba_scan

    forced = os.environ.get(SCAN_IMPL_ENV, "").strip().lower()
    source = f"scan_impl={impl!r}"
    if forced:
        if forced not in SCAN_IMPLS:
            raise ValueError(
                f"{SCAN_IMPL_ENV}={forced!r} is not a scan path; use one of {', '.join(SCAN_IMPLS)} "
                f"or unset it"
            )
        impl, source = forced, f"{SCAN_IMPL_ENV}={forced}"
    if impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl={impl!r} is not a scan path; use one of {', '.join(SCAN_IMPLS)}")
    dev_type = getattr(device, "type", str(device))
    if impl == "auto":
        # auto uses Triton on CUDA only; the interpreter (TRITON_INTERPRET=1) runs the same
        # kernels on CPU for tests, far too slowly to be chosen automatically.
        if dev_type == "cpu" and numba_scan.available():
            return "numba", f"{source}: tensors on cpu and numba is installed, so the compiled numba scan"
        if dev_type != "cuda":
            return "torch", f"{source}: tensors on {dev_type}, so the chunked torch scan"
        ok, why = triton_status()
        if ok:
            return "triton", f"{source}: tensors on cuda and {why}"
        return "torch", f"{source}: tensors on cuda but {why}; falling back to the torch scan"
    if impl == "triton":
        if dev_type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"{source} needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"tensors are on {dev_type}: use scan_impl=torch or auto"
            )
        ok, why = triton_status()
        if not ok:
            raise ValueError(f"{source} was asked for but {why}: pip install triton, or use scan_impl=torch")
        return "triton", f"{source}"
    if impl == "numba":
        if dev_type != "cpu":
            raise ValueError(f"{source} runs on CPU tensors; tensors are on {dev_type}: use scan_impl=auto")
        if not numba_scan.available():
            raise ValueError(f'{source} was asked for but numba is not installed: pip install numba, '
                             f"or use scan_impl=torch")
    return impl, source


def get_scan_fn(path: str):
    """The scan function of a resolved path ('triton', 'numba', 'torch' or 'ref')."""
    if path == "ref":
        return selective_scan_ref
    if path == "numba":
        from .numba_scan import selective_scan_numba

        return selective_scan_numba
    if path == "torch":
        from .torch_scan import selective_scan_torch

        return selective_scan_torch
    if path == "triton":
        from .selective_scan import selective_scan_fn

        return selective_scan_fn
    raise ValueError(f"unknown scan path {path!r}; expected triton, numba, torch or ref")


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
         return_last_state=False, initial_state=None, impl: str = "auto"):
    """Selective scan through the path ``impl`` resolves to for ``u``'s device.

    (Not named ``selective_scan``: that is the submodule mamba4rec/kernels/selective_scan.py, and importing
    it would replace a package attribute of the same name.)"""
    path, _ = resolve_scan_impl(impl, u.device)
    return get_scan_fn(path)(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                             delta_softplus=delta_softplus, return_last_state=return_last_state,
                             initial_state=initial_state)


def __getattr__(name):  # lazy, so importing kernels never pulls in triton
    if name == "selective_scan_torch":
        return get_scan_fn("torch")
    if name == "selective_scan_fn":
        return get_scan_fn("triton")
    if name == "selective_scan_numba":
        return get_scan_fn("numba")
    if name == "selective_state_update":
        from .state_update import selective_state_update

        return selective_state_update
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SCAN_IMPLS",
    "SCAN_IMPL_ENV",
    "get_scan_fn",
    "resolve_scan_impl",
    "scan",
    "selective_scan_fn",
    "selective_scan_numba",
    "selective_scan_ref",
    "selective_scan_torch",
    "selective_state_update",
    "selective_state_update_ref",
    "update_state",
    "triton_status",
]
