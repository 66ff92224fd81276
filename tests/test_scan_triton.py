"""Triton selective scan (kernels/selective_scan.py) against selective_scan_ref.

Without CUDA the kernels run on CPU through Triton's interpreter: this module sets
TRITON_INTERPRET=1 before triton is imported. Triton reads that variable when a kernel is
decorated and again while interpreting, so it stays set for the rest of the pytest process;
that changes nothing else: scan_impl=auto picks the torch scan for CPU tensors regardless,
only an explicit scan_impl=triton uses the interpreter.

Every named case compares out, last state and every gradient with the reference, both
backpropagating the same random upstream gradients. Buffers the launchers allocate start as
NaN here (``_EMPTY_FILL_VALUE``), so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

_ON_CUDA = torch.cuda.is_available()
if not _ON_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip(
            "triton was imported before this module could set TRITON_INTERPRET=1 and there is no "
            "CUDA: run with TRITON_INTERPRET=1 in the environment",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not installed: the Triton scan is optional")

import kernels  # noqa: E402
from kernels import selective_scan as ss  # noqa: E402
from kernels.reference import selective_scan_ref  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"

# (rtol, atol) per dtype, in one place. Starting point: mamba_ssm's tests/ops/test_selective_scan.py.
# "out" covers out and last state, "grad" every gradient but ddelta, which sums the most terms
# (x-part and decay part over the whole suffix of the sequence) and gets mamba_ssm's 5x / 10x.
TOLERANCES = {
    torch.float32: {"out": (6e-4, 2e-3), "grad": (6e-4, 2e-3), "ddelta": (3e-3, 2e-2)},
    torch.float16: {"out": (3e-3, 5e-3), "grad": (3e-3, 5e-3), "ddelta": (1.5e-2, 5e-2)},
    torch.bfloat16: {"out": (3e-2, 5e-2), "grad": (3e-2, 5e-2), "ddelta": (1.5e-1, 5e-1)},
}
_DT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def _unwritten_is_nan(monkeypatch):
    monkeypatch.setattr(ss, "_EMPTY_FILL_VALUE", float("nan"))


@dataclass(frozen=True)
class Case:
    batch: int
    L: int
    dim: int
    N: int
    G: int = 1
    dtype: torch.dtype = torch.float32
    z: bool = True
    D: bool = True
    bias: bool = True
    softplus: bool = True
    chunk: int | None = None     # None: DEFAULT_CHUNK_SIZE
    bc_4d: bool = False          # G == 1 passed as (B, 1, N, L) instead of (B, N, L)
    use_last: bool = True        # the loss also reads last_state (gradient into it)
    max_tile: int | None = None  # shrink the tile budget to force several channel blocks

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"L{self.L}", f"D{self.dim}", f"N{self.N}", f"G{self.G}",
                 _DT_NAMES[self.dtype]]
        parts += [name for name, on in (("z", self.z), ("Dskip", self.D), ("bias", self.bias),
                                        ("softplus", self.softplus), ("bc4d", self.bc_4d))
                  if on]
        if not self.use_last:
            parts.append("outonly")
        if self.chunk is not None:
            parts.append(f"chunk{self.chunk}")
        if self.max_tile is not None:
            parts.append(f"tile{self.max_tile}")
        return "-".join(parts)


CASES = [
    # several chunks, the last one partial; two B/C groups; every option on
    Case(2, 63, 24, 16, G=2, chunk=16),
    Case(2, 63, 24, 16, G=2, dtype=torch.bfloat16, chunk=16),
    # one chunk covering all of L < DEFAULT_CHUNK_SIZE
    Case(1, 63, 12, 16, D=False, bias=False, use_last=False),
    Case(1, 63, 7, 32, dtype=torch.bfloat16, z=False),
    # L = 1, odd dims, N not a power of 2, no optional input at all
    Case(1, 1, 5, 8),
    Case(1, 1, 5, 8, dtype=torch.bfloat16, use_last=False),
    Case(2, 7, 5, 5, z=False, D=False, bias=False, softplus=False, chunk=4),
    Case(1, 7, 6, 16, G=2, dtype=torch.bfloat16, z=False, chunk=3),
    Case(2, 7, 8, 4, bc_4d=True, softplus=False, chunk=2),
    # several channel blocks per group, the last one partly masked (dim/G = 12, BLOCK_D = 8)
    Case(1, 7, 24, 16, G=2, chunk=3, max_tile=128),
    Case(1, 7, 5, 8, dtype=torch.float16, chunk=5),
    # the largest state: N = 256
    Case(1, 5, 3, 256, chunk=2),
]


def _make_inputs(case: Case, seed: int = 0):
    """mamba_ssm's test distribution: A = -0.5 rand, delta = 0.5 rand, the rest randn."""
    gen = torch.Generator().manual_seed(seed)
    b, d, L, n, g = case.batch, case.dim, case.L, case.N, case.G

    def rand(*shape, scale=None, dtype=case.dtype):
        t = torch.rand(*shape, generator=gen) * scale if scale else torch.randn(*shape, generator=gen)
        return t.to(DEVICE, dtype)

    bc_shape = (b, g, n, L) if (g > 1 or case.bc_4d) else (b, n, L)
    return dict(
        u=rand(b, d, L),
        delta=rand(b, d, L, scale=0.5),
        A=rand(d, n, scale=-0.5, dtype=torch.float32),  # weights stay fp32, as in Mamba
        B=rand(*bc_shape),
        C=rand(*bc_shape),
        D=rand(d, dtype=torch.float32) if case.D else None,
        z=rand(b, d, L) if case.z else None,
        delta_bias=rand(d, scale=0.5, dtype=torch.float32) if case.bias else None,
    )


def _leaf(inputs):
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}


def _run(fn, inputs, case, g_out, g_last, **kw):
    out, last = fn(**inputs, delta_softplus=case.softplus, return_last_state=True, **kw)
    loss = (out.float() * g_out).sum()
    if case.use_last:
        loss = loss + (last * g_last).sum()
    loss.backward()
    return out, last


def assert_close(name, actual, expected, rtol, atol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().float(), expected.detach().float()
    diff = (a - e).abs()
    print(f"  {name:>10}: max diff {diff.max().item():.3e}  mean diff {diff.mean().item():.3e}  "
          f"max |ref| {e.abs().max().item():.3e}  (rtol {rtol}, atol {atol})")
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, monkeypatch):
    if case.max_tile is not None:
        monkeypatch.setattr(ss, "_MAX_TILE", case.max_tile)
    inputs = _make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(case.batch, case.dim, case.L, generator=gen).to(DEVICE)
    g_last = torch.randn(case.batch, case.dim, case.N, generator=gen).to(DEVICE)

    tri, ref = _leaf(inputs), _leaf(inputs)
    out, last = _run(ss.selective_scan_fn, tri, case, g_out, g_last, chunk_size=case.chunk)
    out_ref, last_ref = _run(selective_scan_ref, ref, case, g_out, g_last)

    tol = TOLERANCES[case.dtype]
    print(f"\n{case.id}")
    assert_close("out", out, out_ref, *tol["out"])
    assert_close("last_state", last, last_ref, *tol["out"])
    for name in inputs:
        if inputs[name] is None:
            continue
        assert tri[name].grad is not None, f"no gradient for {name}"
        assert_close(f"d{name}", tri[name].grad, ref[name].grad, *tol["ddelta" if name == "delta" else "grad"])


def test_non_contiguous_inputs():
    """Strided views (as a (B, L, D) model produces them) go straight to the kernels."""
    case = Case(2, 9, 6, 8, G=2, chunk=4)
    base = _make_inputs(case)
    inputs = dict(base)
    for k in ("u", "delta", "z"):  # (B, D, L) views of (B, L, D) storage
        inputs[k] = base[k].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("B", "C"):  # (B, G, N, L) views of (B, L, G, N) storage
        inputs[k] = base[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    inputs["A"] = base["A"].t().contiguous().t()
    assert not any(inputs[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A"))

    g_out = torch.randn(case.batch, case.L, case.dim).to(DEVICE)  # gives a strided dout
    tri, ref = _leaf(inputs), _leaf(inputs)
    for fn, leaves, kw in ((ss.selective_scan_fn, tri, {"chunk_size": 4}), (selective_scan_ref, ref, {})):
        out = fn(**leaves, delta_softplus=True, **kw)
        (out.transpose(1, 2) * g_out).sum().backward()
        if fn is selective_scan_ref:
            out_ref = out
        else:
            out_tri = out
    tol = TOLERANCES[torch.float32]
    print()
    assert_close("out", out_tri, out_ref, *tol["out"])
    for name in inputs:
        assert_close(f"d{name}", tri[name].grad, ref[name].grad, *tol["ddelta" if name == "delta" else "grad"])


def test_backward_saves_no_state_per_timestep():
    """Memory contract: between forward and backward only the inputs and the chunk-boundary
    states (B, D, L/chunk, N) are kept; nothing of size (B, D, L, N), not even the output."""
    case = Case(2, 16, 4, 8, chunk=4)
    inputs = _leaf(_make_inputs(case))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ss.selective_scan_fn(**inputs, delta_softplus=True, chunk_size=case.chunk)
    print(f"\nsaved tensors: {saved}")
    b, d, L, n = case.batch, case.dim, case.L, case.N
    assert saved, "nothing was saved for backward: the hook did not see the Function"
    assert (b, d, L // case.chunk, n) in saved, "chunk-boundary states are not among the saved tensors"
    big = [s for s in saved if torch.Size(s).numel() >= b * d * L * n]
    assert not big, f"saved tensors as large as (B, D, L, N) = {(b, d, L, n)}: {big}"
    assert sum(torch.Size(s).numel() for s in saved) == (
        sum(v.numel() for v in inputs.values() if v is not None) + b * d * (L // case.chunk) * n
    ), "backward keeps more than the inputs and the boundary states"
    out.sum().backward()


def test_gradients_are_deterministic():
    """Partials are reduced with torch sums, not atomics: two backwards agree bit for bit."""
    case = Case(2, 9, 6, 8, G=2, chunk=4)
    inputs = _make_inputs(case)
    grads = []
    for _ in range(2):
        leaves = _leaf(inputs)
        out = ss.selective_scan_fn(**leaves, delta_softplus=True, chunk_size=4)
        out.float().pow(2).sum().backward()
        grads.append([v.grad for v in leaves.values() if v is not None])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_inference_path_matches_training_path():
    """Without grad the forward keeps only the last state; results must not change."""
    case = Case(1, 11, 6, 8, chunk=4)
    inputs = _make_inputs(case)
    with torch.no_grad():
        out_inf, last_inf = ss.selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True,
                                                 chunk_size=4)
    out_tr, last_tr = ss.selective_scan_fn(**_leaf(inputs), delta_softplus=True, return_last_state=True,
                                           chunk_size=4)
    assert not out_inf.requires_grad
    assert torch.equal(out_inf, out_tr.detach())
    assert torch.equal(last_inf, last_tr.detach())
    assert last_inf.dtype == torch.float32 and last_inf.shape == (1, 6, 8)


def test_nan_fill_hook_is_active():
    """The tests above only catch unwritten elements if the launchers' buffers start as NaN."""
    assert torch.isnan(ss._empty((4,), torch.float32, DEVICE)).all()


def test_rejects_bad_shapes_like_the_reference():
    inputs = _make_inputs(Case(1, 4, 4, 2))
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
    # the submodule kernels/selective_scan.py as soon as the Triton path is imported
    assert callable(kernels.scan) and kernels.scan.__module__ == "kernels"
    inputs = _make_inputs(Case(1, 3, 4, 4))
    torch.testing.assert_close(kernels.scan(**inputs), ss.selective_scan_fn(**inputs))


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never runs Triton's real compiler: compile both kernels to sm_90 cubin
    (no GPU needed, ptxas ships with triton) so type errors and register spills show up here."""
    import subprocess
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no nvidia backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    tool = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    res = subprocess.run([sys.executable, str(tool), "--check", "64"], env=env, capture_output=True,
                         text=True, timeout=300)
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
