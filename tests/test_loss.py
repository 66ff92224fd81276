"""mamba4rec/loss.py: the chunked CE over all items equals the plain one in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba4rec.loss import full_softmax_ce
from tests.conftest import tiny_config_dict


def _case(T=37, H=8, V=53, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
def test_value_and_gradients_equal_the_plain_cross_entropy(chunk):
    h, w, y = _case()
    ref = F.cross_entropy(h @ w.T, y)
    g_h, g_w = torch.autograd.grad(ref * 3.0, (h, w))  # an upstream gradient other than 1
    got = full_softmax_ce(h, w, y, chunk)
    c_h, c_w = torch.autograd.grad(got * 3.0, (h, w))
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(c_h, g_h, atol=1e-6, rtol=1e-5) and torch.allclose(c_w, g_w, atol=1e-6, rtol=1e-5)


def test_gradcheck_fp64():
    h, w, y = _case(T=9, H=3, V=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: full_softmax_ce(a, b, y, 4), (h, w))


def test_only_the_needed_gradient_and_bf16_autocast_in_fp32():
    h, w, y = _case()
    w.requires_grad_(False)
    (g,) = torch.autograd.grad(full_softmax_ce(h, w, y, 8), (h,))
    assert torch.allclose(g, torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h,))[0], atol=1e-6)
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_softmax_ce(hb, w, y, 8)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(hb.float() @ w.T, y), atol=1e-5)
    (gb,) = torch.autograd.grad(loss, (hb,))
    assert gb.dtype == torch.bfloat16 and torch.isfinite(gb.float()).all()


@pytest.mark.parametrize("bad,match", [
    (dict(h=torch.zeros(4, 3), w=torch.zeros(5, 2)), r"hidden \[T, H\] and weight \[V, H\]"),
    (dict(y=torch.zeros(3, dtype=torch.long)), "one target per row"),
    (dict(chunk=0), "chunk_rows must be >= 1"),
])
def test_bad_shapes_are_refused(bad, match):
    h, w, y = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    args = dict(h=h, w=w, y=y, chunk=2) | bad
    with pytest.raises(ValueError, match=match):
        full_softmax_ce(args["h"], args["w"], args["y"], args["chunk"])


def test_mamba4rec_loss_is_the_same_chunked_or_whole(tmp_path):
    """Mamba4Rec's calculate_loss with ce_chunk_rows auto (CPU: chunks), 3 and 0 (whole logits)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from mamba4rec import pipeline

    losses, grads = {}, {}
    for rows in ("auto", 3, 0):
        config = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(
            tmp_path, scan_impl="torch", dropout_prob=0.0, ce_chunk_rows=rows))
        init_seed(config["seed"], config["reproducibility"])
        train, _, _ = data_preparation(config, create_dataset(config))
        init_seed(config["seed"], config["reproducibility"])
        net = pipeline.build_model(config, train.dataset)
        batch = next(iter(train))
        loss = net.calculate_loss(batch)
        losses[rows] = loss.detach()
        grads[rows] = torch.autograd.grad(loss, net.item_embedding.weight)[0]
    for rows in ("auto", 3):
        assert torch.allclose(losses[rows], losses[0], atol=1e-6)
        assert torch.allclose(grads[rows], grads[0], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("value", [-1, 2.5, "some", True])
def test_bad_ce_chunk_rows_is_refused_with_the_key(value):
    from mamba4rec import resolve_model_config

    with pytest.raises(ValueError, match=f"ce_chunk_rows={value!r} is invalid: it must be auto, 0"):
        resolve_model_config({"ce_chunk_rows": value})


def test_no_gradient_work_without_grad_mode(monkeypatch):
    """Under no_grad (an evaluation loss) only the log-sum-exp is computed: no softmax, no
    gradient products (counted through torch.Tensor.addmm_, which only the gradient uses)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 6, requires_grad=True), torch.randn(30, 6, requires_grad=True)
    target = torch.randint(0, 30, (10,))
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        value = full_softmax_ce(hidden, weight, target, 4)
    assert not calls
    torch.testing.assert_close(value, torch.nn.functional.cross_entropy(hidden @ weight.T, target))
    full_softmax_ce(hidden, weight, target, 4)
    assert len(calls) == 3  # one per chunk of 4 rows when gradients are wanted
