"""Streaming: step() equals forward() at every position; the state does not grow. (The one-step
update kernels themselves: tests/test_state_update.py.)"""

from __future__ import annotations

import pytest
import torch

from mamba4rec.streaming import StreamState
from tests.test_model import make_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds barriers, which on a shared 2-core
    machine cost seconds per test when the other core is busy."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("step_impl", ["numba", "numpy", "torch"])
@pytest.mark.parametrize("num_layers,block_residual", [(1, "auto"), (2, "auto"), (1, True), (2, False)])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_step_equals_forward_at_every_position(num_layers, block_residual, position_embedding, step_impl):
    """Also with the residual forced against the paper's rule (the numpy/numba step reads it too)."""
    L = 45
    model = make_model(n_items=60, max_len=L, num_layers=num_layers, position_embedding=position_embedding,
                       block_residual=block_residual, scan_impl="torch", hidden_size=32, d_state=8).eval()
    model.step_impl = step_impl
    torch.manual_seed(3)
    seq = torch.randint(1, 60, (3, L))
    state = model.init_state(3)
    sizes = None
    for t in range(L):
        out, state = model.step(seq[:, t], state)
        with torch.no_grad():
            full = model(seq[:, : t + 1], torch.full((3,), t + 1))
        torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)
        now = [x.numel() for x in state.conv + state.ssm]
        assert sizes is None or now == sizes  # constant state: O(1) per step
        sizes = now


def test_step_refuses_bad_ids_and_overlong_positions():
    model = make_model(n_items=20, max_len=3, position_embedding=True).eval()
    state = model.init_state(2)
    with pytest.raises(ValueError, match="internal ids in 1..19"):
        model.step(torch.tensor([0, 5]), state)
    with pytest.raises(ValueError, match="must be \\[B\\] with B=2"):
        model.step(torch.tensor([1]), state)
    for _ in range(3):
        model.step(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="max_seq_length=3"):
        model.step(torch.tensor([1, 2]), state)


def _forward(model, rows):
    """forward() on a list of 1-D id tensors of different lengths (left-aligned, 0-padded)."""
    lens = torch.tensor([len(r) for r in rows])
    seq = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        seq[i, : len(r)] = r
    with torch.no_grad():
        return model(seq, lens)


@pytest.mark.parametrize("step_impl", ["numba", "numpy", "torch"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_prefill_ragged_then_step_equals_forward(num_layers, position_embedding, step_impl):
    """Histories of lengths 1, 7, 20, 13 in one padded batch: prefill gives forward()'s output and
    the states stepping would have built, per row; 40 more steps stay equal to forward()."""
    lengths, more = [1, 7, 20, 13], 40
    model = make_model(n_items=60, max_len=max(lengths) + more, num_layers=num_layers,
                       position_embedding=position_embedding, scan_impl="torch", hidden_size=32,
                       d_state=8).eval()
    model.step_impl = step_impl
    torch.manual_seed(5)
    rows = [torch.randint(1, 60, (n,)) for n in lengths]
    seq = torch.zeros(4, 24, dtype=torch.long)  # wider than the longest: trailing padding everywhere
    for i, r in enumerate(rows):
        seq[i, : len(r)] = r
    seq[0, 1:] = 7  # whatever follows a row's length is ignored
    out, state = model.prefill(seq, torch.tensor(lengths))
    torch.testing.assert_close(out, _forward(model, rows), rtol=1e-4, atol=1e-4)

    stepped = model.init_state(4)  # the same states, one item at a time
    for i, r in enumerate(rows):
        one = stepped.select([i])
        for item in r:
            model.step(item[None], one)
        for t_pre, t_one in zip(state.conv + state.ssm, one.conv + one.ssm):
            torch.testing.assert_close(t_pre[i: i + 1], t_one, rtol=1e-4, atol=1e-4)
    assert state.steps.tolist() == lengths

    for _ in range(more):
        items = torch.randint(1, 60, (4,))
        rows = [torch.cat([r, items[i: i + 1]]) for i, r in enumerate(rows)]
        out, state = model.step(items, state)
        torch.testing.assert_close(out, _forward(model, rows), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step_impl", ["numba", "numpy", "torch"])
@pytest.mark.parametrize("d_conv", [1, 2])
def test_step_equals_forward_for_short_conv_windows(d_conv, step_impl):
    model = make_model(n_items=30, max_len=20, d_conv=d_conv, hidden_size=16, d_state=4, scan_impl="torch").eval()
    model.step_impl = step_impl
    torch.manual_seed(0)
    seq = torch.randint(1, 30, (2, 12))
    state = model.init_state(2)
    assert state.conv[0].shape == (2, 32, d_conv - 1)
    for t in range(12):
        out, state = model.step(seq[:, t], state)
        torch.testing.assert_close(out, _forward(model, list(seq[:, : t + 1])), rtol=1e-4, atol=1e-4)
    out, pre = model.prefill(seq[:, :5], torch.tensor([5, 3]))
    torch.testing.assert_close(out, _forward(model, [seq[0, :5], seq[1, :3]]), rtol=1e-4, atol=1e-4)


def test_state_layout_select_cat_clone():
    model = make_model(n_items=30, max_len=20, num_layers=2, hidden_size=16, d_state=4).eval()
    state = model.init_state(3)
    assert state.batch_size == 3 and len(state.conv) == len(state.ssm) == 2
    assert state.conv[0].shape == (3, 32, 3) and state.conv[0].dtype == model.item_embedding.weight.dtype
    assert state.ssm[0].shape == (3, 32, 4) and state.ssm[0].dtype == torch.float32
    items = torch.tensor([3, 4, 5])
    out, _ = model.step(items, state)
    before = state.clone()
    model.step(items, state)
    assert not torch.equal(before.ssm[0], state.ssm[0]) and before.steps.tolist() == [1, 1, 1]
    # splitting users out of the batch and back changes nothing
    parts = [before.select([2]), before.select([0, 1])]
    merged = StreamState.cat([parts[1], parts[0]])
    out_a, _ = model.step(items, merged)
    out_b, _ = model.step(items, before)
    torch.testing.assert_close(out_a, out_b)


def test_prefill_refuses_bad_input():
    model = make_model(n_items=20, max_len=4, position_embedding=True).eval()
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]])
    with pytest.raises(ValueError, match="item_seq_len must be in 1..L=5"):
        model.prefill(seq, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="item_seq_len must be in 1..L=5"):
        model.prefill(seq, torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"internal ids in 1..19 .*found \[0\]"):
        model.prefill(seq, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="longer than max_seq_length=4"):
        model.prefill(torch.ones(1, 5, dtype=torch.long), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"must be \[B, L\]"):
        model.prefill(seq[0], torch.tensor([3]))
    out, state = model.prefill(seq, torch.tensor([3, 2]))
    model.step(torch.tensor([1, 1]), state)  # positions 3 and 2: fine
    with pytest.raises(ValueError, match="max_seq_length=4"):
        model.step(torch.tensor([1, 1]), state)  # row 0 would need position 4


def _step_cpu_paths_and_torch(model, seq, paths=("numba", "numpy")):
    """Step every column of seq [B, T] through each CPU path and the torch path from empty
    states, asserting equal outputs at each position; returns the final states by path."""
    states = {p: model.init_state(seq.shape[0]) for p in (*paths, "torch")}
    for t in range(seq.shape[1]):
        model.step_impl = "torch"
        ref, _ = model.step(seq[:, t], states["torch"])
        for p in paths:
            model.step_impl = p
            out, _ = model.step(seq[:, t], states[p])
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{p} at {t}: {m}")
    return states


def test_cpu_and_torch_steps_agree_in_place():
    model = make_model(n_items=50, max_len=40, num_layers=2, hidden_size=32, d_state=8, scan_impl="torch").eval()
    torch.manual_seed(1)
    seq = torch.randint(1, 50, (3, 30))
    states = _step_cpu_paths_and_torch(model, seq)
    for p in ("numba", "numpy"):  # the caller's state tensors, updated in place
        for x, y in zip(states[p].conv + states[p].ssm, states["torch"].conv + states["torch"].ssm):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert states[p].steps.tolist() == [30] * 3


def test_step_path_auto_picks_by_batch_mode_dtype_and_install(monkeypatch):
    from mamba4rec import numba_step
    from mamba4rec import numpy_step
    from mamba4rec.streaming import step_path

    model = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl="torch").eval()
    st = lambda b: model.init_state(b)  # noqa: E731
    nb_max, np_max = numba_step.NUMBA_STEP_MAX_BATCH, numpy_step.NUMPY_STEP_MAX_BATCH
    assert step_path(model, 1, st(1)) == "numba"
    assert step_path(model, nb_max, st(nb_max)) == "numba"
    assert step_path(model, nb_max + 1, st(nb_max + 1)) == "torch"
    model.train()
    assert step_path(model, 1, st(1)) == "torch"                      # dropout: torch draws it
    model.eval()
    monkeypatch.setattr(numba_step, "available", lambda: False)       # numba not installed
    assert step_path(model, np_max, st(np_max)) == "numpy"
    assert step_path(model, np_max + 1, st(np_max + 1)) == "torch"
    model.step_impl = "numba"
    with pytest.raises(ImportError, match='needs numba, which is not installed: pip install numba'):
        model.step(torch.tensor([1]), st(1))
    monkeypatch.undo()
    for scan_impl, expected in [("ref", "torch"), ("triton", "torch"), ("auto", "numba")]:
        m = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl=scan_impl).eval()
        assert step_path(m, 3, m.init_state(3)) == expected, scan_impl

    half = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl="torch").eval().to(torch.bfloat16)
    assert step_path(half, 1, half.init_state(1)) == "torch"          # auto: torch for bf16
    for impl in ("numpy", "numba"):
        half.step_impl = impl
        with pytest.raises(ValueError, match=f"step_impl='{impl}' needs a float32 model"):
            half.step(torch.tensor([1]), half.init_state(1))
    model.step_impl = "fast"
    with pytest.raises(ValueError, match="step_impl='fast' is invalid: use one of auto, numba, numpy, torch"):
        model.step(torch.tensor([1]), st(1))


def test_model_step_calls_the_path_step_path_names(monkeypatch):
    from mamba4rec import numba_step
    from mamba4rec import numpy_step

    calls = []
    for cls, name in ((numpy_step.NumpyStep, "numpy"), (numba_step.NumbaStep, "numba")):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _r=real, _n=name: calls.append(_n) or _r(self, *a))
    model = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl="torch").eval()
    assert model.warm_up_step(1) == "numba" and calls == ["numba"]
    big = numba_step.NUMBA_STEP_MAX_BATCH + 1
    model.step(torch.randint(1, 50, (big,)), model.init_state(big))   # torch: no call recorded
    model.step_impl = "numpy"
    model.step(torch.tensor([4]), model.init_state(1))
    assert calls == ["numba", "numpy"]


def test_numba_step_on_strided_state_updates_the_callers_rows():
    """A state whose tensors are views with strides (rows of a bigger state) cannot take the
    compiled signature; the numba path hands it to the numpy step, still in place."""
    model = make_model(n_items=30, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    big = model.init_state(4)
    view = StreamState([c[::2] for c in big.conv], [h[::2] for h in big.ssm], big.steps[::2])
    ref = model.init_state(2)
    for item in ([3, 7], [9, 2], [5, 5]):
        model.step_impl = "numba"
        out, _ = model.step(torch.tensor(item), view)
        model.step_impl = "torch"
        expected, _ = model.step(torch.tensor(item), ref)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big.ssm[0][::2], ref.ssm[0], rtol=1e-5, atol=1e-5)
    assert big.ssm[0][1::2].abs().sum() == 0 and big.steps.tolist() == [3, 0, 3, 0]


def test_numpy_step_follows_weight_updates():
    """Its weights are numpy copies: an optimizer step, load_state_dict or .to() must rebuild them."""
    model = make_model(n_items=40, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    other = make_model(n_items=40, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    items = torch.tensor([3, 9])

    def both():
        model.step_impl = "torch"
        b, _ = model.step(items, model.init_state(2))
        for impl in ("numpy", "numba"):
            model.step_impl = impl
            a, _ = model.step(items, model.init_state(2))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return a

    before = both()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    seq = torch.randint(1, 40, (4, 6))
    model.calculate_loss({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.full((4,), 6),
                          model.POS_ITEM_ID: torch.randint(1, 40, (4,))}).backward()
    opt.step()
    model.eval()
    after = both()
    assert not torch.allclose(before, after)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(both(), other.step(items, other.init_state(2))[0], rtol=1e-5, atol=1e-5)
    model.double().float()  # new storage for every parameter
    both()
    fresh = make_model(n_items=40, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    with torch.no_grad():  # make_model seeds: without this, fresh's weights are other's
        for p in fresh.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.load_state_dict(fresh.state_dict(), assign=True)  # new Parameter objects
    torch.testing.assert_close(both(), fresh.step(items, fresh.init_state(2))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table_bytes", [0, 2**30])
def test_numpy_step_with_and_without_per_item_tables(monkeypatch, table_bytes):
    """Small catalogs get per-item tables (LayerNorm(embedding), first in_proj); large ones
    compute them per step. Both must equal the torch step."""
    from mamba4rec import numpy_step

    monkeypatch.setattr(numpy_step, "NUMPY_STEP_TABLE_BYTES", table_bytes)
    model = make_model(n_items=60, max_len=30, num_layers=2, hidden_size=16, d_state=4, scan_impl="torch").eval()
    seq = torch.randint(1, 60, (2, 12))
    _step_cpu_paths_and_torch(model, seq)
    assert (model._cpu_steps["numpy"].first_xz is not None) == bool(table_bytes)


def test_model_with_step_caches_pickles_and_deepcopies():
    """The numpy/numba caches are derived data: torch.save(model) and deepcopy leave them out."""
    import copy
    import io

    model = make_model(n_items=30, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    out, _ = model.step(torch.tensor([3, 4]), model.init_state(2))
    assert set(model._cpu_steps) == {"numpy", "numba"}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert twin._cpu_steps == {}
        torch.testing.assert_close(twin.step(torch.tensor([3, 4]), twin.init_state(2))[0], out)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_layer_step_with_grad_matches_forward_values_and_gradients(num_layers):
    """The one step body serves training too: with grad enabled, stepping a layer through a
    sequence gives forward()'s outputs, and the gradient of the last position's output reaches
    every parameter as forward()'s does (the folded step weights are derived with grad)."""
    model = make_model(n_items=30, max_len=12, num_layers=num_layers, scan_impl="torch",
                       hidden_size=16, d_state=4).eval()
    layer = model.mamba_layers[0]
    torch.manual_seed(5)
    x = torch.randn(2, 7, 16)
    params = [p for p in layer.parameters()]
    full = layer(x)
    g_forward = torch.autograd.grad(full[:, -1].pow(2).sum(), params)
    conv = torch.zeros(2, layer.mamba.d_inner, layer.mamba.d_conv - 1)
    ssm = torch.zeros(2, layer.mamba.d_inner, layer.mamba.d_state)
    outs = [layer.step(x[:, t], conv, ssm) for t in range(7)]
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-4, atol=1e-5)
    g_step = torch.autograd.grad(outs[-1].pow(2).sum(), params)
    for p, a, b in zip(params, g_forward, g_step):
        assert b.abs().sum() > 0 or a.abs().sum() == 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
