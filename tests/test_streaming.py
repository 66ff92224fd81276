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


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_step_equals_forward_at_every_position(num_layers, position_embedding):
    L = 45
    model = make_model(n_items=60, max_len=L, num_layers=num_layers, position_embedding=position_embedding,
                       scan_impl="torch", hidden_size=32, d_state=8).eval()
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


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("position_embedding", [False, True])
def test_prefill_ragged_then_step_equals_forward(num_layers, position_embedding):
    """Histories of lengths 1, 7, 20, 13 in one padded batch: prefill gives forward()'s output and
    the states stepping would have built, per row; 40 more steps stay equal to forward()."""
    lengths, more = [1, 7, 20, 13], 40
    model = make_model(n_items=60, max_len=max(lengths) + more, num_layers=num_layers,
                       position_embedding=position_embedding, scan_impl="torch", hidden_size=32,
                       d_state=8).eval()
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


@pytest.mark.parametrize("d_conv", [1, 2])
def test_step_equals_forward_for_short_conv_windows(d_conv):
    model = make_model(n_items=30, max_len=20, d_conv=d_conv, hidden_size=16, d_state=4, scan_impl="torch").eval()
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
