"""train_mode=history and eval_history=whole (mamba4rec/history.py): a user's whole history in
chunks that carry the state equals one pass over it; every target once an epoch; evaluation from
the whole history; the streaming state after N events is the training pass's; refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction

from mamba4rec import history as hi
from mamba4rec import pipeline
from mamba4rec import sequence as sq
from tests.conftest import tiny_config_dict
from tests.test_sequence import L, _setup, write_data


def _batch(net, seqs, lo=None):
    """A history batch of whole sequences (rows from their first target, or from ``lo``)."""
    lo = [0] * len(seqs) if lo is None else lo
    hi_ = [len(s) - 1 for s in seqs]
    items = torch.zeros(len(seqs), max(hi_), dtype=torch.long)
    for r, s in enumerate(seqs):
        items[r, :hi_[r]] = torch.as_tensor(s[:hi_[r]])
    targets = torch.cat([torch.as_tensor(s[a + 1:b + 1]) for s, a, b in zip(seqs, lo, hi_)])
    return Interaction({net.ITEM_SEQ: items, net.ITEM_SEQ_LEN: torch.tensor(hi_), hi.FROM: torch.tensor(lo),
                        net.POS_ITEM_ID: targets})


def _one_pass(net, seqs):
    """Per-target CE of one forward over each whole sequence (the model's plain forward path, not
    forward_chunk), in row order."""
    out = []
    for s in seqs:
        items = torch.as_tensor(s[:-1])[None]
        h = net.sequence_output(items, torch.tensor([len(s) - 1]))[0]
        out.append(F.cross_entropy(h @ net.item_embedding.weight.T, torch.as_tensor(s[1:]), reduction="none"))
    return torch.cat(out)


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def _user_seqs(train):
    _, seqs = sq.user_sequences(train.dataset)
    return seqs


@pytest.mark.parametrize("scan_impl", ["torch", "numba", "ref"])
def test_history_loss_and_gradients_equal_one_pass_over_each_whole_sequence(in_tmp, scan_impl):
    if scan_impl == "numba":
        pytest.importorskip("numba")
    config, train, net = _setup(in_tmp, "Mamba4Rec", num_layers=2, scan_impl=scan_impl)
    seqs = sorted(_user_seqs(train), key=len)[-4:]  # the longest users: several chunks each
    assert min(len(s) for s in seqs) > 3 * L
    want_loss = _one_pass(net, seqs).mean()
    want = _grads(net, want_loss)
    for chunk in (1, 4, 7, 1000):  # the chunk size changes nothing
        loss = hi.history_loss(net, _batch(net, seqs), chunk)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        got = _grads(net, loss)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{chunk} {k}: {m}")


def test_a_piece_after_the_users_first_target_starts_from_the_state_of_all_earlier_items(in_tmp):
    config, train, net = _setup(in_tmp, "Mamba4Rec")
    seqs = sorted(_user_seqs(train), key=len)[-3:]
    lo = [5, 0, 13]
    ce = _one_pass(net, seqs)
    starts = np.cumsum([0] + [len(s) - 1 for s in seqs])
    want = torch.cat([ce[starts[r] + a:starts[r + 1]] for r, a in enumerate(lo)]).mean()
    for chunk in (3, 50):
        torch.testing.assert_close(hi.history_loss(net, _batch(net, seqs, lo), chunk), want, rtol=1e-5, atol=1e-6)


def test_run_chunks_gives_the_last_output_and_the_state_of_prefill(in_tmp):
    _, train, net = _setup(in_tmp, "Mamba4Rec", num_layers=2)
    net.eval()
    seqs = _user_seqs(train)[:9]
    lengths = torch.tensor([len(s) for s in seqs])
    items = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for r, s in enumerate(seqs):
        items[r, :len(s)] = torch.as_tensor(s)
    with torch.no_grad():
        want_out, want_state = net.prefill(items, lengths)
        for chunk in (2, 5, 64):
            out, state = hi.run_chunks(net, items, lengths, chunk, outputs="last")
            torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(state.steps, want_state.steps)
            for a, b in zip(state.conv + state.ssm, want_state.conv + want_state.ssm):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            every, _ = hi.run_chunks(net, items, lengths, chunk, outputs="all")
            assert every.shape == (int(lengths.sum()), net.hidden_size)
            full = net.sequence_output(items, lengths)
            keep = torch.arange(items.shape[1])[None] < lengths[:, None]
            torch.testing.assert_close(every, full[keep], rtol=1e-4, atol=1e-5)


def test_the_streaming_state_after_n_events_is_the_training_passs_state(in_tmp):
    """Serving folds events in one at a time with step(); a model trained in history mode built
    its state over the same items in chunks: after N > L events they are the same state."""
    _, train, net = _setup(in_tmp, "Mamba4Rec", num_layers=2)
    net.eval()
    seq = max(_user_seqs(train), key=len)
    n = len(seq)
    assert n > 3 * L
    items = torch.as_tensor(seq)[None]
    with torch.no_grad():
        out, trained = hi.run_chunks(net, items, torch.tensor([n]), 4, outputs="last")
        state = net.init_state(1)
        for item in seq:
            served, state = net.step(torch.tensor([item]), state)
    torch.testing.assert_close(served, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(state.conv + state.ssm, trained.conv + trained.ssm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert int(state.steps) == int(trained.steps) == n


def test_an_epoch_trains_every_target_once_in_batches_of_train_batch_size(in_tmp):
    config, train, net = _setup(in_tmp, "Mamba4Rec", train_mode="history")
    loader = hi.HistoryTrainDataLoader(config, train.dataset)
    seen, sizes = [], []
    for b in loader:
        sizes.append(len(b[net.POS_ITEM_ID]))
        seen += list(zip(b[sq.USER].tolist(), b[sq.INDEX].tolist()))
        # each row holds the user's items from the first up to its last target's input
        end, lo = b[net.ITEM_SEQ_LEN], b[hi.FROM]
        assert b[net.ITEM_SEQ].shape[1] == int(end.max()) and bool((lo < end).all())
    assert len(seen) == len(set(seen)) == loader.n_targets == len(train.dataset) == sum(sizes)
    users, seqs = sq.user_sequences(train.dataset)
    assert set(seen) == {(int(u), t) for u, s in zip(users, seqs) for t in range(1, len(s))}
    assert len(sizes) == len(loader) == len(train)
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    assert any(int(b[hi.FROM].max()) > 0 for b in loader)  # some users straddle batches (16 targets)


def test_the_shuffle_is_seeded_and_resumes_from_the_generator_state(in_tmp):
    config, train, _ = _setup(in_tmp, "Mamba4Rec", train_mode="history")

    def epoch(loader):
        return [b["item_id"].tolist() for b in loader]

    a = hi.HistoryTrainDataLoader(config, train.dataset)
    first = epoch(a)
    assert first == epoch(hi.HistoryTrainDataLoader(config, train.dataset))
    state = a.generator.get_state()
    second = epoch(a)
    assert second != first
    c = hi.HistoryTrainDataLoader(config, train.dataset)
    c.generator.set_state(state)
    assert epoch(c) == second


def test_distributed_ranks_take_the_same_number_of_steps_and_every_target(in_tmp):
    config, train, _ = _setup(in_tmp, "Mamba4Rec", train_mode="history")
    seen, steps = [], []
    for rank in range(3):
        loader = hi.HistoryTrainDataLoader(config, train.dataset)
        loader.world_size, loader.rank, loader.step = 3, rank, 16 // 3
        batches = list(loader)
        steps.append(len(batches))
        assert all(len(b["item_id"]) <= 5 for b in batches)
        seen += [(u, t) for b in batches for u, t in zip(b[sq.USER].tolist(), b[sq.INDEX].tolist())]
    assert len(set(steps)) == 1
    assert len(set(seen)) == len(train.dataset)


def test_whole_history_evaluation_scores_each_user_after_all_earlier_items(in_tmp):
    config = pipeline.build_config("Mamba4Rec", "seqdata", config_dict=tiny_config_dict(
        in_tmp, data_path=str(write_data(in_tmp)), MAX_ITEM_LIST_LENGTH=L, scan_impl="torch", train_mode="history"))
    train, valid, test = data_preparation(config, create_dataset(config))
    net = pipeline.build_model(config, train.dataset).eval()
    whole = hi.WholeHistory(train.dataset, valid.dataset, test.dataset, chunk=4)
    users, seqs = sq.user_sequences(train.dataset)
    train_seq = dict(zip(users.tolist(), seqs))
    longer = 0
    for split, data in (("valid", valid), ("test", test)):
        for batch in data:
            inter = batch[0]
            items, lengths = whole.histories(data.dataset, inter, net)
            for r, u in enumerate(inter[data.dataset.uid_field].tolist()):
                hist = items[r, :lengths[r]].numpy()
                want = train_seq[u] if split == "valid" else np.r_[train_seq[u], hist[-1]]
                np.testing.assert_array_equal(hist, want)
                longer += len(hist) > L
            with whole.scoring(net, data.dataset), torch.no_grad():
                scores = net.full_sort_predict(inter)
            with torch.no_grad():
                full = net.sequence_output(items, lengths)
                last = full[torch.arange(len(lengths)), lengths - 1]
            torch.testing.assert_close(scores, last @ net.item_embedding.weight.T, rtol=1e-5, atol=1e-5)
    assert longer > 0  # the histories run past L items, which the windows cut
    assert net.full_sort_predict.__func__ is type(net).full_sort_predict  # the model's own again


def test_history_mode_trains_evaluates_and_resumes_exactly(in_tmp):
    def cfg(sub, epochs, **kw):
        return tiny_config_dict(in_tmp, scan_impl="torch", epochs=epochs, checkpoint_dir=str(in_tmp / sub),
                                stopping_step=10, train_mode="history", history_chunk=3, train_batch_size=32, **kw)

    full = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("full", 3))
    pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("cut", 1))
    last = in_tmp / "cut" / "Mamba4Rec-tiny-last.pth"
    resumed = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("cut", 3), resume=str(last))
    assert resumed.epochs_run == full.epochs_run == 3
    assert resumed.test_result == full.test_result and resumed.best_valid_result == full.best_valid_result
    assert all(0.0 <= v <= 1.0 for v in full.test_result.values())
    with pytest.raises(ValueError, match="history_chunk=3 and this run would use 5"):
        pipeline.run("Mamba4Rec", "tiny", config_dict={**cfg("cut", 4), "history_chunk": 5}, resume=str(last))


def test_history_mode_with_bpr_and_amp_stays_finite(in_tmp):
    result = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(
        in_tmp, scan_impl="torch", enable_amp=True, epochs=1, train_mode="history", loss_type="BPR"))
    assert all(0.0 <= v <= 1.0 for v in result.test_result.values())


@pytest.mark.parametrize("model,override,match", [
    ("SASRec", {"train_mode": "history"}, "train_mode=history cannot run SASRec: it needs a model that carries"),
    ("GRU4Rec", {"eval_history": "whole"}, "eval_history=whole cannot run GRU4Rec.*train_mode=prefix or sequence"),
    ("Mamba4Rec", {"train_mode": "history", "position_embedding": True}, "position_embedding: True"),
    ("Mamba4Rec", {"train_mode": "history", "history_chunk": 0}, "history_chunk=0 is invalid"),
    ("Mamba4Rec", {"eval_history": "all"}, "eval_history='all' is invalid"),
])
def test_what_cannot_run_is_refused_before_any_data_work(in_tmp, monkeypatch, model, override, match):
    monkeypatch.setattr(pipeline, "create_dataset", lambda *a, **k: pytest.fail("data work started"))
    with pytest.raises(ValueError, match=match):
        pipeline.run(model, "tiny", config_dict=tiny_config_dict(in_tmp, **override))


def test_window_models_are_unchanged_by_the_history_keys(in_tmp):
    """eval_history=window (the default outside history mode) leaves RecBole's evaluation as it was."""
    a = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch",
                                                                       checkpoint_dir=str(in_tmp / "a")))
    b = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch",
                                                                       checkpoint_dir=str(in_tmp / "b"),
                                                                       eval_history="window", history_chunk=9))
    assert a.test_result == b.test_result


def test_padding_groups_are_the_cheapest_contiguous_grouping():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = sorted(rng.integers(1, 40, size=int(rng.integers(1, 9))).tolist(), reverse=True)
        cost = int(rng.integers(0, 50))
        groups = hi.padding_groups(lengths, cost)
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a < b for a, b in groups) and all(g[1] == h[0] for g, h in zip(groups, groups[1:]))

        def total(cuts):
            bounds = [0, *cuts, len(lengths)]
            return sum((b - a) * lengths[a] + cost for a, b in zip(bounds, bounds[1:]))

        best = min(total(c) for r in range(len(lengths)) for c in itertools.combinations(range(1, len(lengths)), r))
        assert total([a for a, _ in groups[1:]]) == best
