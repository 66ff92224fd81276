"""Streaming: step() equals forward() at every position; the state does not grow. (The one-step
update kernels themselves: tests/test_state_update.py.)"""

from __future__ import annotations

import pytest
import torch

from mamba4rec.model import StreamState
from tests.test_model import make_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds barriers, which on a shared 2-core
    machine cost seconds per test when the other core is busy."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("step_impl", ["numpy", "torch"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_step_equals_forward_at_every_position(num_layers, position_embedding, step_impl):
    L = 45
    model = make_model(n_items=60, max_len=L, num_layers=num_layers, position_embedding=position_embedding,
                       scan_impl="torch", hidden_size=32, d_state=8).eval()
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


@pytest.mark.parametrize("step_impl", ["numpy", "torch"])
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


@pytest.mark.parametrize("step_impl", ["numpy", "torch"])
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


def _step_numpy_and_torch(model, seq):
    """Step every column of seq [B, T] through the numpy and the torch path from empty states,
    asserting equal outputs at each position; returns the two final states."""
    a, b = model.init_state(seq.shape[0]), model.init_state(seq.shape[0])
    for t in range(seq.shape[1]):
        model.step_impl = "numpy"
        out_np, _ = model.step(seq[:, t], a)
        model.step_impl = "torch"
        out_t, _ = model.step(seq[:, t], b)
        torch.testing.assert_close(out_np, out_t, rtol=1e-5, atol=1e-5)
    return a, b


def test_numpy_and_torch_steps_agree_and_auto_picks_by_batch_mode_and_dtype(monkeypatch):
    from mamba4rec import numpy_step

    model = make_model(n_items=50, max_len=40, num_layers=2, hidden_size=32, d_state=8, scan_impl="torch").eval()
    torch.manual_seed(1)
    seq = torch.randint(1, 50, (3, 30))
    a, b = _step_numpy_and_torch(model, seq)
    for x, y in zip(a.conv + a.ssm, b.conv + b.ssm):  # the caller's state tensors, updated in place
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert a.steps.tolist() == b.steps.tolist() == [30] * 3

    calls = []
    real = numpy_step.NumpyStep.__call__
    monkeypatch.setattr(numpy_step.NumpyStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    model.step_impl = "auto"
    model.step(seq[:, 0], model.init_state(3))
    assert len(calls) == 1                                            # small CPU float32 batch, eval
    big = torch.randint(1, 50, (numpy_step.NUMPY_STEP_MAX_BATCH + 1,))
    model.step(big, model.init_state(big.shape[0]))
    model.train()
    model.step(seq[:, 0], model.init_state(3))                        # dropout: torch draws it
    model.eval()
    assert len(calls) == 1
    model.step_impl = "fast"
    with pytest.raises(ValueError, match="step_impl='fast' is invalid"):
        model.step(seq[:, 0], model.init_state(3))
    half = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl="torch").eval().to(torch.bfloat16)
    half.step_impl = "numpy"
    with pytest.raises(ValueError, match="needs a float32 model"):
        half.step(seq[:, 0], half.init_state(3))
    half.step_impl = "auto"
    half.step(seq[:, 0], half.init_state(3))                          # auto: torch for bf16
    assert len(calls) == 1
    for scan_impl, expected in [("ref", False), ("triton", False), ("auto", True)]:
        m = make_model(n_items=50, max_len=40, hidden_size=32, d_state=8, scan_impl=scan_impl).eval()
        assert numpy_step.numpy_step_applies(m, 3, m.init_state(3)) is expected, scan_impl


def test_numpy_step_follows_weight_updates():
    """Its weights are numpy copies: an optimizer step, load_state_dict or .to() must rebuild them."""
    model = make_model(n_items=40, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    other = make_model(n_items=40, max_len=20, hidden_size=16, d_state=4, scan_impl="torch").eval()
    items = torch.tensor([3, 9])

    def both():
        model.step_impl = "numpy"
        a, _ = model.step(items, model.init_state(2))
        model.step_impl = "torch"
        b, _ = model.step(items, model.init_state(2))
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


@pytest.mark.parametrize("table_bytes", [0, 2**30])
def test_numpy_step_with_and_without_per_item_tables(monkeypatch, table_bytes):
    """Small catalogs get per-item tables (LayerNorm(embedding), first in_proj); large ones
    compute them per step. Both must equal the torch step."""
    from mamba4rec import numpy_step

    monkeypatch.setattr(numpy_step, "NUMPY_STEP_TABLE_BYTES", table_bytes)
    model = make_model(n_items=60, max_len=30, num_layers=2, hidden_size=16, d_state=4, scan_impl="torch").eval()
    seq = torch.randint(1, 60, (2, 12))
    _step_numpy_and_torch(model, seq)
    assert (model._numpy_step.first_xz is not None) == bool(table_bytes)
