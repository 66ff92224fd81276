"""Triton selective scan (mamba4rec/kernels/selective_scan.py) against selective_scan_ref.

Without CUDA the kernels run on CPU through Triton's interpreter: tests/scan_utils.py sets
TRITON_INTERPRET=1 before triton is imported (see enable_triton_interpreter there).

Every named case compares out, last state and every gradient with the reference, both
backpropagating the same random upstream gradients (tests/scan_utils.py: compare_with_reference,
tolerances TOLERANCES[("triton", dtype)]). Buffers the launchers allocate start as NaN here
(``_EMPTY_FILL_VALUE``), so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.scan_utils import TRITON_DEVICE as DEVICE
from tests.scan_utils import (Case, check_padding_by_minus_inf, compare_with_reference, detached_copy,
                              enable_triton_interpreter, make_inputs, tol)

_SKIP = enable_triton_interpreter()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

import mamba4rec.kernels as kernels  # noqa: E402
from mamba4rec.kernels import selective_scan as ss  # noqa: E402
from mamba4rec.kernels.reference import selective_scan_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _unwritten_is_nan(monkeypatch):
    monkeypatch.setattr(ss, "_EMPTY_FILL_VALUE", float("nan"))


def tcase(case: Case, chunk: int | None = None, max_tile: int | None = None):
    """A case with the kernel's knobs: chunk (None: DEFAULT_CHUNK_SIZE), max_tile (shrinks the
    tile budget to force several channel blocks)."""
    extra = (f"-chunk{chunk}" if chunk is not None else "") + (f"-tile{max_tile}" if max_tile is not None else "")
    return pytest.param(case, chunk, max_tile, id=case.id + extra)


# G=0: B/C as (B, N, L); G=1: one group passed as (B, 1, N, L); use_last=False: the loss reads
# only out (no gradient into the last state)
CASES = [
    # several chunks, the last one partial (37 = 2 x 16 + 5); two B/C groups; every option on
    # (L = 37 rather than 63: the same chunk structure, at 60 % of the interpreter's time)
    tcase(Case(2, 37, 24, 16, G=2), chunk=16),
    tcase(Case(2, 37, 24, 16, G=2, dtype=torch.bfloat16), chunk=16),
    # one chunk covering all of L < DEFAULT_CHUNK_SIZE
    tcase(Case(1, 63, 12, 16, D=False, bias=False, use_last=False)),
    tcase(Case(1, 63, 7, 32, dtype=torch.bfloat16, z=False)),
    # L = 1, odd dims, N not a power of 2, no optional input at all
    tcase(Case(1, 1, 5, 8)),
    tcase(Case(1, 1, 5, 8, dtype=torch.bfloat16, use_last=False)),
    tcase(Case(2, 7, 5, 5, z=False, D=False, bias=False, softplus=False), chunk=4),
    tcase(Case(1, 7, 6, 16, G=2, dtype=torch.bfloat16, z=False), chunk=3),
    tcase(Case(2, 7, 8, 4, G=1, softplus=False), chunk=2),
    # several channel blocks per group, the last one partly masked (dim/G = 12, BLOCK_D = 8)
    tcase(Case(1, 7, 24, 16, G=2), chunk=3, max_tile=128),
    tcase(Case(1, 7, 5, 8, dtype=torch.float16), chunk=5),
    # the largest state: N = 256
    tcase(Case(1, 5, 3, 256), chunk=2),
    # from an initial state: the forward and pass F of chunk 0 start from it, its gradient is
    # what the reverse recurrence carries out of t = 0
    tcase(Case(2, 37, 24, 16, G=2, h0=True), chunk=16),
    tcase(Case(1, 21, 12, 16, G=2, dtype=torch.bfloat16, h0=True), chunk=8),
    tcase(Case(2, 9, 6, 8, D=False, bias=False, use_last=False, h0=True), chunk=4),
    tcase(Case(1, 7, 24, 16, G=2, h0=True), chunk=3, max_tile=128),
    tcase(Case(1, 1, 5, 8, h0=True)),
    tcase(Case(1, 1, 5, 8, dtype=torch.bfloat16, use_last=False, h0=True)),
    tcase(Case(2, 7, 5, 5, z=False, D=False, bias=False, softplus=False, h0=True), chunk=4),
]


@pytest.mark.parametrize("case,chunk,max_tile", CASES)
def test_matches_reference(case, chunk, max_tile, monkeypatch):
    if max_tile is not None:
        monkeypatch.setattr(ss, "_MAX_TILE", max_tile)
    print(f"\n{case.id}")
    compare_with_reference("triton", ss.selective_scan_fn, make_inputs(case, device=DEVICE), case, chunk_size=chunk)


def test_non_contiguous_inputs():
    """Strided views (as a (B, L, D) model produces them) go straight to the kernels, and so
    does a strided gradient of out; out alone (return_last_state=False)."""
    case = Case(2, 9, 6, 8, G=2, h0=True)
    inputs = make_inputs(case, layout="model", device=DEVICE)
    inputs["initial_state"] = inputs["initial_state"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    inputs["initial_state"].requires_grad_()
    assert not any(inputs[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A", "initial_state"))
    print()
    compare_with_reference("triton", ss.selective_scan_fn, inputs, case, return_last_state=False, strided_gout=True,
                           chunk_size=4)


def test_backward_saves_no_state_per_timestep():
    """Memory contract: between forward and backward only the inputs and the chunk-boundary
    states (B, D, L/chunk, N) are kept; nothing of size (B, D, L, N), not even the output."""
    case, chunk = Case(2, 16, 4, 8), 4
    inputs = make_inputs(case, device=DEVICE)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ss.selective_scan_fn(**inputs, delta_softplus=True, chunk_size=chunk)
    print(f"\nsaved tensors: {saved}")
    b, d, L, n = case.batch, case.dim, case.L, case.N
    assert saved, "nothing was saved for backward: the hook did not see the Function"
    assert (b, d, L // chunk, n) in saved, "chunk-boundary states are not among the saved tensors"
    big = [s for s in saved if torch.Size(s).numel() >= b * d * L * n]
    assert not big, f"saved tensors as large as (B, D, L, N) = {(b, d, L, n)}: {big}"
    assert sum(torch.Size(s).numel() for s in saved) == (
        sum(v.numel() for v in inputs.values() if v is not None) + b * d * (L // chunk) * n
    ), "backward keeps more than the inputs and the boundary states"
    out.sum().backward()


def test_gradients_are_deterministic():
    """Partials are reduced with torch sums, not atomics: two backwards agree bit for bit."""
    case = Case(2, 9, 6, 8, G=2)
    inputs = make_inputs(case, device=DEVICE)
    grads = []
    for _ in range(2):
        leaves = detached_copy(inputs)
        out = ss.selective_scan_fn(**leaves, delta_softplus=True, chunk_size=4)
        out.float().pow(2).sum().backward()
        grads.append([v.grad for v in leaves.values() if v is not None])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("h0", [False, True], ids=["zeros", "h0"])
def test_inference_path_matches_training_path(h0):
    """Without grad the forward keeps only the last state; results must not change."""
    case = Case(1, 11, 6, 8, h0=h0)
    inputs = make_inputs(case, device=DEVICE)
    with torch.no_grad():
        out_inf, last_inf = ss.selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True,
                                                 chunk_size=4)
    out_tr, last_tr = ss.selective_scan_fn(**detached_copy(inputs), delta_softplus=True, return_last_state=True,
                                           chunk_size=4)
    assert not out_inf.requires_grad
    assert torch.equal(out_inf, out_tr.detach())
    assert torch.equal(last_inf, last_tr.detach())
    assert last_inf.dtype == torch.float32 and last_inf.shape == (1, 6, 8)


def test_scan_in_two_parts_is_the_whole_scan():
    """The second part started from the first part's last state gives the whole scan's out, last
    state and gradients (the gradient reaching the first part through initial_state included);
    the split falls inside a chunk of the second part's grid."""
    case, split = Case(1, 13, 6, 8, G=2), 5
    x = make_inputs(case, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    gout = torch.randn(case.batch, case.dim, case.L, generator=gen).to(DEVICE)
    glast = torch.randn(case.batch, case.dim, case.N, generator=gen).to(DEVICE)
    kw = dict(delta_softplus=True, return_last_state=True, chunk_size=4)

    def loss(out, last):
        return (out * gout).sum() + (last * glast).sum()

    whole = detached_copy(x)
    out_w, last_w = ss.selective_scan_fn(**whole, **kw)
    loss(out_w, last_w).backward()

    parts = detached_copy(x)
    seq = ("u", "delta", "B", "C", "z")
    first = {k: (v[..., :split] if k in seq else v) for k, v in parts.items()}
    second = {k: (v[..., split:] if k in seq else v) for k, v in parts.items()}
    out_1, last_1 = ss.selective_scan_fn(**first, **kw)
    out_2, last_2 = ss.selective_scan_fn(**{**second, "initial_state": last_1}, **kw)
    out_p = torch.cat([out_1, out_2], dim=-1)
    loss(out_p, last_2).backward()

    rtol, atol = tol("triton", torch.float32, "out")
    torch.testing.assert_close(out_p.detach(), out_w.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last_2.detach(), last_w.detach(), rtol=rtol, atol=atol)
    for k, v in whole.items():
        if v is not None:
            rtol, atol = tol("triton", torch.float32, "d" + k)
            torch.testing.assert_close(parts[k].grad, v.grad, rtol=rtol, atol=atol, msg=lambda m: f"d{k}: {m}")


def test_minus_inf_delta_pads_like_a_cut_row():
    """The padding of ragged rows (MambaBlock: delta = -inf): dt = 0 there, no gradient (scan_utils)."""
    check_padding_by_minus_inf(ss.selective_scan_fn, "triton", device=DEVICE)


def test_initial_state_without_grad():
    """An initial state that needs no gradient gets none; the others are unchanged by that."""
    case = Case(1, 6, 4, 8, h0=True)
    x = make_inputs(case, device=DEVICE)
    x["initial_state"] = x["initial_state"].detach()
    out = ss.selective_scan_fn(**x, delta_softplus=True, chunk_size=4)
    out.float().pow(2).sum().backward()
    assert x["initial_state"].grad is None
    ref = detached_copy(x)
    ref["initial_state"] = ref["initial_state"].detach()
    selective_scan_ref(**ref, delta_softplus=True).float().pow(2).sum().backward()
    rtol, atol = tol("triton", torch.float32, "grad")
    for k in ("u", "delta", "A", "B", "C"):
        torch.testing.assert_close(x[k].grad, ref[k].grad, rtol=rtol, atol=atol, msg=lambda m: f"d{k}: {m}")


def test_nan_fill_hook_is_active():
    """The tests above only catch unwritten elements if the launchers' buffers start as NaN."""
    assert torch.isnan(ss._empty((4,), torch.float32, DEVICE)).all()


def test_rejects_bad_shapes_like_the_reference():
    inputs = make_inputs(Case(1, 4, 4, 2), device=DEVICE)
    inputs["B"] = inputs["B"][:, :, :3]
    with pytest.raises(ValueError) as ref_err:
        selective_scan_ref(**inputs)
    with pytest.raises(ValueError) as tri_err:
        ss.selective_scan_fn(**inputs)
    assert str(tri_err.value) == str(ref_err.value)


def test_dispatch_picks_triton(monkeypatch):
    monkeypatch.setenv(kernels.SCAN_IMPL_ENV, "triton")
    path, why = kernels.resolve_scan_impl("auto", torch.device(DEVICE))
    assert path == "triton", why
    assert kernels.get_scan_fn(path) is ss.selective_scan_fn
    # the dispatch is kernels.scan: a function named kernels.selective_scan would be replaced by
    # the submodule mamba4rec/kernels/selective_scan.py as soon as the Triton path is imported
    assert callable(kernels.scan) and kernels.scan.__module__ == "mamba4rec.kernels"
    inputs = make_inputs(Case(1, 3, 4, 4), device=DEVICE)
    torch.testing.assert_close(kernels.scan(**inputs).detach(), ss.selective_scan_fn(**inputs).detach())


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv(kernels.SCAN_IMPL_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors .*TRITON_INTERPRET=1.*use scan_impl=torch or auto"):
        kernels.resolve_scan_impl("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_scan_impl("triton", torch.device("cpu"))[0] == "triton"


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_sm90_without_spills(arch):
    """The interpreter never runs Triton's real compiler: compile both kernels, with and without
    an initial state, to sm_80 (A100) and sm_90 (H100) cubin (no GPU needed, ptxas ships with
    triton) so type errors and register spills show up here."""
    import subprocess
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no nvidia backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--arch", str(arch), "--check", "64"]
    res = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=300)
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
