"""experiments.memory_analysis: the carry and the dt it reads, against the block's own scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import memory_analysis as ma
from mamba4rec.kernels.reference import selective_scan_ref


def test_layer_dt_is_the_dt_the_block_scans_with(monkeypatch):
    from mamba4rec.layers import MambaBlock

    torch.manual_seed(0)
    block = MambaBlock(8, 4, 4, 2, scan_impl="ref").eval()
    hidden = torch.randn(3, 11, 8)
    seen = {}
    import mamba4rec.layers as layers

    real = layers.get_scan_fn

    def spy(path):
        fn = real(path)

        def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
            seen["dt"] = torch.nn.functional.softplus(delta + delta_bias[:, None]) if delta_softplus else delta
            return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)
        return scan

    monkeypatch.setattr(layers, "get_scan_fn", spy)
    with torch.no_grad():
        block(hidden)
        dt = ma.layer_dt(block, hidden)
    torch.testing.assert_close(dt, seen["dt"])


def test_carry_is_what_the_state_k_items_back_is_scaled_by():
    """h_T with an initial state h0 minus h_T from zero is exactly carry * h0 per (channel, state)
    when u = 0 over the last k items (the scan is linear in the state)."""
    torch.manual_seed(1)
    Bsz, D, N, L = 3, 5, 4, 9
    dt = torch.rand(Bsz, D, L) * 0.5
    A = -torch.rand(D, N) - 0.1
    lengths = torch.tensor([9, 6, 3])
    k = 3
    got = ma.carry_stats(dt * (torch.arange(L)[None, :] < lengths[:, None])[:, None, :], A, lengths, [k, 7])
    assert set(got) == {3, 7} and got[7].shape == (1 * D * N,)  # only the row with >= 7 items at k = 7
    h0 = torch.rand(Bsz, D, N) + 0.5
    u = torch.zeros(Bsz, D, k)
    Bm, Cm = torch.randn(Bsz, N, k), torch.randn(Bsz, N, k)
    for r, n in enumerate(lengths.tolist()):
        window = dt[r:r + 1, :, n - k:n]
        _, last = selective_scan_ref(u[r:r + 1], window, A, Bm[r:r + 1], Cm[r:r + 1], return_last_state=True,
                                     initial_state=h0[r:r + 1])
        np.testing.assert_allclose(got[k].reshape(Bsz, D, N)[r], (last[0] / h0[r]).numpy(), rtol=1e-5)


def test_cli_on_a_trained_checkpoint(tiny_run, capsys):
    """The tables for a trained model: carries in (0, 1], each horizon over the users that have it,
    and the whole-vs-window section over the test users longer than MAX_ITEM_LIST_LENGTH (10)."""
    assert ma.main([str(tiny_run["recbole"]), "--horizons", "2,5,12", "--batch", "7"]) == 0
    assert torch.is_grad_enabled()  # no process-wide state left behind (the tests share a process)
    out = capsys.readouterr().out
    assert "#### Layer 1: carry" in out and "#### Layer 2" not in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "e-" in line}
    assert {"2", "5", "12"} <= set(rows)
    assert "#### Output after the whole history vs after the last 10 items" in out
    with pytest.raises(SystemExit):
        ma.main([str(tiny_run["recbole"]), "--horizons", "0"])


def test_carry_values_lie_in_zero_one_and_shrink_with_the_horizon(tiny_run):
    from experiments.checkpoint_analysis import checkpoint_model
    from mamba4rec.history import WholeHistory

    *_, train, valid, test, model = checkpoint_model(tiny_run["recbole"], device="cpu")
    hist = list(WholeHistory(train.dataset, valid.dataset, test.dataset, 1).by_split[id(test.dataset)].values())
    per_layer, A, outputs = ma.analyse(model, hist, 10, [1, 4, 8], batch=5)
    c = per_layer[0]["carry"]
    assert all(((v > 0) & (v <= 1)).all() for v in c.values())
    assert np.median(c[1]) > np.median(c[4]) > np.median(c[8])
    n_long = sum(len(h) > 10 for h in hist)
    assert len(outputs) == n_long > 0
    assert all(r >= 0 and 0 <= o <= 10 for r, o in outputs)
