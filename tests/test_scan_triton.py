"""The Triton selective scan against the reference, under Triton's CPU interpreter when there
is no GPU: outputs, last state and every gradient, per-dtype tolerances, unwritten outputs."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    # Triton's interpreter runs the kernels on CPU tensors. It must be on when the kernels are
    # created and while they run; scan_impl=auto ignores it (it picks Triton on CUDA only), so
    # leaving it set for the rest of the session changes nothing else.
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")


def _load_kernels():
    module = importlib.import_module("kernels.selective_scan")
    if not ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(module._selective_scan_fwd_kernel, InterpretedFunction):
            module = importlib.reload(module)  # it was imported earlier without the interpreter
    return module


ss = _load_kernels()
from kernels.reference import selective_scan_ref  # noqa: E402

#: (rtol, atol) per dtype for outputs/last state and for gradients; ddelta gets the looser
#: gradient entry doubled (mamba_ssm's starting points, kept unless a case showed why not).
TOLERANCES = {
    torch.float32: {"out": (6e-4, 2e-3), "grad": (6e-4, 2e-3)},
    torch.bfloat16: {"out": (3e-2, 5e-2), "grad": (3e-2, 5e-2)},
}

CASES = [
    # batch, dim, L, N, G, with z/D/bias/softplus, dtype
    (2, 8, 1, 4, 1, True, torch.float32),
    (2, 8, 7, 4, 1, True, torch.float32),
    (1, 5, 63, 16, 1, True, torch.float32),
    (2, 6, 33, 3, 2, True, torch.float32),
    (2, 7, 20, 8, 1, False, torch.float32),
    (1, 4, 17, 2, 2, False, torch.float32),
    (2, 24, 63, 16, 1, True, torch.bfloat16),
    (1, 6, 7, 4, 2, True, torch.bfloat16),
]


def case_id(case):
    b, d, L, n, g, opts, dtype = case
    return f"B{b}-L{L}-D{d}-N{n}-G{g}-{'zDbias-softplus' if opts else 'plain'}-{str(dtype).split('.')[-1]}"


def make_inputs(b, d, L, n, g, opts, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype).requires_grad_()

    bc_shape = (b, n, L) if g == 1 else (b, g, n, L)
    inputs = {
        "u": rnd(b, d, L), "delta": rnd(b, d, L, scale=0.5),
        "A": (-0.5 - torch.rand(d, n, generator=gen)).to(DEVICE).requires_grad_(),
        "B": rnd(*bc_shape), "C": rnd(*bc_shape),
        "D": rnd(d) if opts else None, "z": rnd(b, d, L) if opts else None,
        "delta_bias": rnd(d, scale=0.5) if opts else None,
    }
    return inputs


def run(fn, inputs, softplus, g_out, g_last):
    out, last = fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                   z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=softplus,
                   return_last_state=True)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad((out.float() * g_out).sum() + (last * g_last).sum(), [inputs[k] for k in names])
    return out, last, dict(zip(names, grads))


def assert_close(name, got, want, rtol, atol):
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    print(f"{name:12s} max diff {diff.max().item():.3e}  mean diff {diff.mean().item():.3e}")
    assert not torch.isnan(got).any(), f"{name}: NaN (an element the kernel never wrote?)"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    monkeypatch.setattr(ss, "DEBUG_FILL_NAN", True)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_triton_scan_matches_reference(case):
    b, d, L, n, g, opts, dtype = case
    inputs = make_inputs(*case)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(b, d, L, generator=gen).to(DEVICE)
    g_last = torch.randn(b, d, n, generator=gen).to(DEVICE)
    out_t, last_t, grads_t = run(ss.selective_scan_fn, inputs, opts, g_out, g_last)
    ref_inputs = {k: (None if v is None else v.detach().float().requires_grad_()) for k, v in inputs.items()}
    out_r, last_r, grads_r = run(selective_scan_ref, ref_inputs, opts, g_out, g_last)
    assert out_t.dtype == dtype and out_t.shape == (b, d, L)
    assert last_t.dtype == torch.float32 and last_t.shape == (b, d, n)
    tol = TOLERANCES[dtype]
    assert_close("out", out_t, out_r, *tol["out"])
    assert_close("last_state", last_t, last_r, *tol["out"])
    for name, grad in grads_r.items():
        rtol, atol = tol["grad"]
        if name in ("delta", "delta_bias"):
            rtol, atol = 2 * rtol, 2 * atol
        assert grads_t[name].shape == inputs[name].shape and grads_t[name].dtype == inputs[name].dtype
        assert_close(f"d{name}", grads_t[name], grad, rtol, atol * max(1.0, grad.abs().max().item() / 10))


def test_non_contiguous_inputs():
    b, d, L, n = 2, 6, 9, 4
    base = make_inputs(b, d, L, n, 1, True, torch.float32)
    u = base["u"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not u.is_contiguous()
    C = torch.randn(b, L, n).transpose(1, 2)
    out_t = ss.selective_scan_fn(u, base["delta"].detach(), base["A"].detach(), base["B"].detach(), C,
                                 delta_softplus=True)
    out_r = selective_scan_ref(u, base["delta"].detach(), base["A"].detach(), base["B"].detach(), C,
                               delta_softplus=True)
    assert_close("out", out_t, out_r, 6e-4, 2e-3)


def test_unwritten_outputs_are_caught():
    """The NaN fill works: an output buffer the kernel does not write stays NaN."""
    inputs = make_inputs(1, 4, 5, 2, 1, False, torch.float32)
    out, states, last = ss._fwd(*[inputs[k].detach().contiguous() for k in ("u", "delta", "A")],
                                inputs["B"].detach().reshape(1, 1, 2, 5).contiguous(),
                                inputs["C"].detach().reshape(1, 1, 2, 5).contiguous(),
                                None, None, None, False, 1)
    assert not torch.isnan(out).any() and not torch.isnan(last).any()
    assert torch.isnan(ss._empty((3,), torch.float32, "cpu")).all()


def test_backward_saves_no_full_state_tensor():
    b, d, L, n = 2, 4, 40, 8
    inputs = make_inputs(b, d, L, n, 1, True, torch.float32)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = ss.selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                   D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"],
                                   delta_softplus=True)
    assert out.shape == (b, d, L)
    assert max(sizes) < b * d * L * n  # boundary states: b*d*n*ceil(L/CHUNK)
    assert sum(sizes) <= 5 * b * d * L + b * d * n * -(-L // ss.CHUNK) + 4 * b * n * L + 4 * d * n


def test_dispatch_picks_triton_only_on_cuda_or_when_asked():
    from kernels import resolve_scan_impl

    assert resolve_scan_impl("auto", torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            resolve_scan_impl("triton", torch.device("cpu"))
        else:
            raise ValueError("needs CUDA tensors (interpreter already on)")
