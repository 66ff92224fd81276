"""Property tests (hypothesis): random shapes, dtypes and options of the torch scan against the
reference; random malformed data files for prepare(); extreme inputs stay finite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mamba4rec.kernels.reference import selective_scan_ref
from mamba4rec.kernels.torch_scan import selective_scan_torch
from mamba4rec import data_prep
from tests.scan_utils import Case, assert_close, call_scan, make_inputs


@st.composite
def scan_cases(draw):
    batch = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    dim = groups * draw(st.integers(1, 4))
    case = Case(batch, L=draw(st.integers(1, 24)), dim=dim, N=draw(st.integers(1, 6)), G=0 if groups == 1 else groups,
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                z=draw(st.booleans()), D=draw(st.booleans()), bias=draw(st.booleans()), softplus=draw(st.booleans()))
    return case, draw(st.sampled_from([None, 1, 4096])), draw(st.integers(0, 2**16))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scan_cases())
def test_torch_scan_matches_reference_on_random_cases(drawn):
    """Every input in the case's dtype (A, D, delta_bias too) against the reference run in fp64
    on the same values."""
    case, budget, seed = drawn
    x = {k: (v.detach().to(case.dtype).requires_grad_() if v is not None else None)
         for k, v in make_inputs(case, seed).items()}
    x64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in x.items()}
    out, last = call_scan(selective_scan_torch, x, case, return_last_state=True, workspace_bytes=budget)
    ref_out, ref_last = call_scan(selective_scan_ref, x64, case, return_last_state=True)
    assert_close("out", out.double(), ref_out, "torch_fp64", case.dtype)
    assert_close("last_state", last.double(), ref_last, "torch_fp64", case.dtype)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    names = [n for n in x if x[n] is not None]
    grads = torch.autograd.grad((out.double() * gout).sum(), [x[n] for n in names])
    ref_grads = torch.autograd.grad((ref_out * gout).sum(), [x64[n] for n in names])
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(f"d{name}", got.double(), want, "torch_fp64", case.dtype, key="grad",
                     atol_scale=max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("delta", [-30.0, 30.0, 1e4])
def test_extreme_dt_and_long_sequences_stay_finite(delta):
    """dt from ~1e-13 (softplus(-30)) to 1e4, L = 4096: outputs, state and gradients finite."""
    torch.manual_seed(0)
    b, d, L, n = 1, 4, 4096, 8
    u = torch.randn(b, d, L, requires_grad=True)
    dl = torch.full((b, d, L), delta, requires_grad=True)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).requires_grad_()
    B, C = torch.randn(b, n, L, requires_grad=True), torch.randn(b, n, L, requires_grad=True)
    out, last = selective_scan_torch(u, dl, A, B, C, D=torch.ones(d), z=torch.randn(b, d, L),
                                     delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    grads = torch.autograd.grad(out.sum() + last.sum(), [u, dl, A, B, C])
    assert all(torch.isfinite(g).all() for g in grads)


_GOOD = "u1 i1 i2 i3\nu2 i2 i3\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
       fmt=st.sampled_from(["movielens", "amazon"]))
def test_random_malformed_lines_give_clear_errors_and_no_files(tmp_path_factory, junk, fmt):
    """A MovieLens / Amazon CSV file with one random junk line: either it still parses (then
    the output is complete) or a PrepareError names the file and line, and nothing is written."""
    tmp = tmp_path_factory.mktemp("prep")
    good = "1::10::5::100\n2::11::4::101\n" if fmt == "movielens" else "u1,i1,5.0,100\nu2,i2,4.0,101\n"
    src = tmp / ("ratings.dat" if fmt == "movielens" else "ratings.csv")
    src.write_text(good + junk.replace("\r", " ") + "\n" + good, encoding="utf-8")
    out = tmp / "out"
    try:
        stats = data_prep.prepare(fmt, src, "junk", out)
    except data_prep.PrepareError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(src.name) in msg
        assert not out.exists() or not any(out.rglob("*"))
    else:
        assert (out / "junk" / "junk.inter").is_file() and stats["interactions"] >= 4


@settings(max_examples=30, deadline=None)
@given(user_k=st.integers(-3, 0), item_k=st.integers(-3, 3), fmt=st.sampled_from(["seq-text", "csv", "xml"]))
@example(user_k=0, item_k=3, fmt="seq-text")  # valid options that leave nothing: CI once drew it
def test_random_bad_options_are_refused_before_reading(tmp_path_factory, user_k, item_k, fmt):
    tmp = tmp_path_factory.mktemp("opts")
    src = tmp / "seq.txt"
    src.write_text(_GOOD)
    bad = user_k < 0 or item_k < 0 or fmt != "seq-text"
    empties = item_k > 2  # valid, but no item of _GOOD has 3 interactions: nothing is left
    try:
        data_prep.prepare(fmt, src, "x", tmp / "out", user_k=user_k, item_k=item_k)
    except data_prep.PrepareError as err:
        assert bad or empties
        if not bad:
            assert "nothing left after k-core filtering" in str(err)
        assert not (tmp / "out").exists()
    else:
        assert not bad and not empties
