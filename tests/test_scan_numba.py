"""kernels.numba_scan.selective_scan_numba against selective_scan_ref: output, last state and
every gradient, fp32 / bf16 / fp16, grouped B/C, optional inputs, non-contiguous inputs; the
calls it hands to the torch scan; reproducibility across thread counts; dispatch."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import mamba4rec.kernels as kernels
from mamba4rec.kernels import numba_scan
from mamba4rec.kernels.reference import selective_scan_ref
from mamba4rec.kernels.torch_scan import selective_scan_torch
from tests.conftest import count_applies
from tests.scan_utils import (Case, assert_close, check_padding_by_minus_inf, compare_with_reference, detached_copy,
                              make_inputs, run_scan)

pytest.importorskip("numba", reason="the numba scan needs numba (the fast extra)")
#: The compiled kernels run in parallel: two threads, as the numba path gets on a 2-core machine.
pytestmark = pytest.mark.usefixtures("two_threads")
selective_scan_numba = numba_scan.selective_scan_numba


@pytest.fixture
def numba_calls(monkeypatch):
    """Counts calls that really ran the compiled kernels (not a hand-off to the torch scan)."""
    return count_applies(monkeypatch, numba_scan._SelectiveScanNumba)


def check_against_reference(case, layout="contiguous"):
    # without softplus, dt = delta + bias as given: kept positive, as Mamba's always is
    compare_with_reference("numba", selective_scan_numba, make_inputs(case, layout=layout, positive_dt=True), case)


SHAPES = [  # (batch, L, dim, N, G)
    (2, 1, 5, 1, 0),
    (2, 7, 5, 16, 0),
    (2, 7, 24, 16, 2),
    (3, 63, 33, 16, 3),
    (70, 9, 8, 32, 0),   # more sequences than CHUNKS: uneven chunks
]
CASES = [Case(b, L, d, n, G=g, dtype=dt)
         for (b, L, d, n, g), dt in itertools.product(SHAPES, (torch.float32, torch.bfloat16))]
CASES += [Case(2, 7, 24, 16, G=2, dtype=torch.float16)]
# a scan that starts from a given state (train_mode=history's chunks): its gradient too
CASES += [Case(3, 9, 24, 16, G=2, h0=True), Case(70, 5, 8, 32, dtype=torch.bfloat16, h0=True),
          Case(2, 1, 5, 4, h0=True, use_last=False), Case(2, 7, 6, 4, z=False, D=False, bias=False, h0=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, numba_calls):
    check_against_reference(case)
    assert numba_calls  # the compiled path ran, not the torch fallback


@pytest.mark.parametrize("case", [Case(2, 7, 6, 4, G=2, z=z, D=D, bias=bias, softplus=sp)
                                  for z, D, bias, sp in itertools.product((True, False), repeat=4)],
                         ids=lambda c: c.id)
def test_optional_inputs(case, numba_calls):
    check_against_reference(case)
    assert numba_calls


def test_noncontiguous_inputs(numba_calls):
    case = Case(3, 7, 24, 16, G=2)
    assert not make_inputs(case, layout="transposed")["u"].is_contiguous()
    check_against_reference(case, layout="transposed")
    assert numba_calls


def _fallback_inputs(kind):
    case = Case(2, 9, 6, 4, dtype=torch.float64 if kind == "fp64" else torch.float32,
                softplus=kind != "negative-dt")
    x = make_inputs(case)
    if kind == "positive-A":
        x["A"] = x["A"].detach().clone()
        x["A"][0, 0] = 0.3
        x["A"].requires_grad_()
    if kind == "negative-dt":
        assert bool((x["delta"] + x["delta_bias"][:, None] < 0).any())
    return case, x


@pytest.mark.parametrize("kind", ["fp64", "positive-A", "negative-dt"])
def test_calls_outside_the_fast_exp_go_to_the_torch_scan(kind, numba_calls):
    """The fast exp covers dt * A <= 0 in fp32: fp64 (gradcheck), a positive A or a negative dt
    are handed to the torch scan, and still match the reference."""
    case, x = _fallback_inputs(kind)
    compare_with_reference("numba", selective_scan_numba, x, case)
    assert not numba_calls


def test_fast_exp_accuracy():
    import numpy as np

    numba_scan._compile()
    x = -np.linspace(0.0, 87.0, 200001).astype(np.float32)
    out = np.empty_like(x)
    numba_scan._exp_nonpos(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 5e-7
    numba_scan._exp_nonpos(np.array([-1e4, -88.0, 0.0], np.float32), out[:3])
    assert out[2] == 1.0 and 0.0 < out[0] < 1e-37 and out[0] == out[1]  # clamped at exp(-87)


def test_same_bits_with_one_or_two_threads():
    """Partial sums are per chunk of sequences, a fixed number, added in order: the thread
    count does not change a single bit (resume-equals-uninterrupted relies on that)."""
    case = Case(70, 20, 16, 8)
    x = make_inputs(case)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_scan(selective_scan_numba, detached_copy(x), case))
    finally:
        torch.set_num_threads(saved)
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_the_scan_leaves_torchs_thread_count_as_the_user_set_it():
    """numba's OpenMP layer sets the shared OpenMP runtime to NUMBA_NUM_THREADS when it starts
    its threads; a process asked to use one thread (OMP_NUM_THREADS=1: one training per core)
    must go on using one, in torch and in the scan. A fresh process: the threads start once."""
    code = (
        "import torch\n"
        "from mamba4rec.kernels.numba_scan import selective_scan_numba\n"
        "u, dt = torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 8, 16)\n"
        "A, B, C = -torch.rand(8, 4), torch.randn(4, 4, 16), torch.randn(4, 4, 16)\n"
        "selective_scan_numba(u, dt, A, B, C, delta_softplus=True).sum().backward()\n"
        "import numba\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1"]


def _subnormal_case():
    """A scan whose every output is subnormal: h_0 = dt B u = 1e-40 (float32 keeps it as a
    subnormal), y = C h = 1e-40, and later steps decay it (A = -1)."""
    u = torch.full((2, 3, 5), 1e-20)
    dt = torch.ones(2, 3, 5)
    A = -torch.ones(3, 2)
    B = torch.full((2, 2, 5), 1e-20)
    C = torch.ones(2, 2, 5)
    return u, dt, A, B, C


@pytest.mark.skipif(not numba_scan._x86(), reason="flushing subnormals is x86's MXCSR")
def test_subnormals_are_flushed_inside_the_kernels_only(numba_calls):
    """Inside the kernels (x86) subnormal results are zero: a gradient decaying through positions
    without a target otherwise falls into the subnormal range, where each operation costs a
    microcode assist. The calling thread's floating-point mode is as it was before, after the
    forward and the backward, whether or not it flushed subnormals itself."""
    u, dt, A, B, C = _subnormal_case()
    ref = selective_scan_ref(u, dt, A, B, C)
    assert (ref != 0).all() and (ref.abs() < torch.finfo(torch.float32).tiny).all()  # subnormal, not flushed
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    for flushing in (False, True):
        torch.set_flush_denormal(flushing)
        try:
            x = u.clone().requires_grad_()
            y = selective_scan_numba(x, dt, A, B, C)
            assert (y == 0).all()
            y.sum().backward()
            assert bool(((tiny / 4) == 0).item()) == flushing  # the thread's own mode, untouched
        finally:
            torch.set_flush_denormal(False)
    assert len(numba_calls) == 2


def test_calls_from_two_python_threads_are_serialised():
    """numba's default threading layer aborts on concurrent entry into parallel code; the scan
    queues callers instead (a threaded server calling prefill must not crash)."""
    case = Case(8, 30, 16, 8)
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case).items()}
    expected = selective_scan_ref(**x, delta_softplus=True)
    errors, outs = [], []

    def work():
        try:
            for _ in range(5):
                outs.append(selective_scan_numba(**x, delta_softplus=True))
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 15
    for out in outs:
        assert_close("out", out, expected, "numba", torch.float32)


def test_extreme_dt_stays_finite_and_matches_reference():
    case = Case(2, 40, 8, 4)
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case).items()}
    x["delta"] = torch.cat([torch.full((1, 8, 40), 30.0), torch.full((1, 8, 40), -30.0)])  # dt ~ 30 and ~ 1e-13
    out = selective_scan_numba(**x, delta_softplus=True)
    ref = selective_scan_ref(**x, delta_softplus=True)
    assert torch.isfinite(out).all()
    assert_close("out", out, ref, "numba", torch.float32)


def test_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.get_scan_fn("numba") is selective_scan_numba
    assert kernels.resolve_scan_impl("auto", cpu)[0] == "numba"
    assert kernels.resolve_scan_impl("numba", cpu)[0] == "numba"
    with pytest.raises(ValueError, match="runs on CPU tensors; tensors are on cuda"):
        kernels.resolve_scan_impl("numba", cuda)
    monkeypatch.setattr(numba_scan, "available", lambda: False)
    assert kernels.resolve_scan_impl("auto", cpu)[0] == "torch"
    with pytest.raises(ValueError, match='numba is not installed: pip install numba'):
        kernels.resolve_scan_impl("numba", cpu)
    case = Case(2, 5, 4, 3)
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case).items()}
    with pytest.raises(ImportError, match="pip install"):
        selective_scan_numba(x["u"], x["delta"], x["A"], x["B"], x["C"])


def test_equals_torch_scan_inside_a_model_training_step():
    """One loss and backward of a Mamba4Rec with scan_impl numba vs torch: same loss, same grads."""
    from tests.test_model import make_model

    grads = {}
    for impl in ("numba", "torch"):
        model = make_model(n_items=40, max_len=12, num_layers=2, hidden_size=16, d_state=8, scan_impl=impl)
        torch.manual_seed(5)
        seq = torch.randint(1, 40, (6, 12))
        inter = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.randint(1, 13, (6,)),
                 model.POS_ITEM_ID: torch.randint(1, 40, (6,))}
        model.eval()  # no dropout draws: the two runs see the same network
        loss = model.calculate_loss(inter)
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_close("loss", grads["numba"][0], grads["torch"][0], "numba_model", torch.float32)
    assert grads["numba"][1].keys() == grads["torch"][1].keys()
    for name, g in grads["numba"][1].items():
        assert_close(f"d{name}", g, grads["torch"][1][name], "numba_model", torch.float32, key="grad")
    assert selective_scan_torch is kernels.get_scan_fn("torch")


def test_nan_in_A_or_delta_comes_out_as_nan_not_a_finite_number():
    """No silent NaN: the fast exp's clamp must not turn a NaN exponent into a finite decay."""
    import numpy as np

    numba_scan._compile()
    out = np.empty(2, np.float32)
    numba_scan._exp_nonpos(np.array([np.nan, -1.0], np.float32), out)
    assert np.isnan(out[0]) and abs(out[1] - np.exp(-1.0)) < 1e-6
    case = Case(2, 6, 4, 3)
    for name in ("A", "delta"):
        x = {k: (v.detach().clone() if v is not None else None) for k, v in make_inputs(case).items()}
        x[name].view(-1)[0] = float("nan")
        out = selective_scan_numba(**x, delta_softplus=True)
        ref = selective_scan_ref(**x, delta_softplus=True)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any(), name


@pytest.mark.parametrize("path", ["numba", "torch", "reference"])
def test_minus_inf_delta_pads_like_a_cut_row(path, numba_calls):
    fn = {"numba": selective_scan_numba, "torch": selective_scan_torch, "reference": selective_scan_ref}[path]
    check_padding_by_minus_inf(fn, "torch" if path == "reference" else path)  # the reference: torch's tolerances
    assert len(numba_calls) == (1 + 3 if path == "numba" else 0)  # the padded call, then each row cut
