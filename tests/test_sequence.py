"""train_mode=sequence (mamba4rec/sequence.py): exact where the spec says, refused where it cannot be."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec

from mamba4rec import pipeline
from mamba4rec import sequence as sq
from tests.conftest import tiny_config_dict

L = 6
MODELS = ["Mamba4Rec", "SASRec", "GRU4Rec"]


def write_data(root, n_users=14, n_items=25, seed=0):
    """Users of 5 .. 5 + 2 * (n_users - 1) interactions: training sequences shorter and longer than L."""
    rng = np.random.default_rng(seed)
    folder = root / "seqdata"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        n = 5 + 2 * u
        start = int(rng.integers(1, n_items))
        for t in range(n):
            item = (start + t) % n_items + 1 if rng.random() < 0.7 else int(rng.integers(1, n_items + 1))
            lines.append(f"u{u}\ti{item}\t{t}")
    (folder / "seqdata.inter").write_text("\n".join(lines) + "\n")
    return root


def _setup(tmp, model, max_len=L, **overrides):
    cfg = tiny_config_dict(tmp, data_path=str(write_data(tmp)), MAX_ITEM_LIST_LENGTH=max_len, dropout_prob=0.0,
                           hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                           **{"scan_impl": "torch", "train_batch_size": 16, **overrides})
    config = pipeline.build_config(model, "seqdata", config_dict=cfg)
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    net = pipeline.build_model(config, train.dataset)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the near-uniform scores of a fresh init, so gaps would show
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return config, train, net


def _prefix_keys(dataset):
    """(user, target index in the user's training sequence) of every RecBole prefix sample."""
    uid = dataset.inter_feat[dataset.uid_field].numpy()
    index = np.zeros(len(uid), dtype=np.int64)
    for i in range(1, len(uid)):
        index[i] = index[i - 1] + 1 if uid[i] == uid[i - 1] else 0
    return uid, index + 1


def prefix_losses(net, dataset):
    """{(user, target index): CE} in prefix mode: the model's forward on every prefix sample."""
    feat = dataset.inter_feat
    out = net.forward(feat[net.ITEM_SEQ], feat[net.ITEM_SEQ_LEN])
    ce = F.cross_entropy(out @ net.item_embedding.weight.T, feat[net.POS_ITEM_ID], reduction="none")
    uid, index = _prefix_keys(dataset)
    return {(int(u), int(t)): c for u, t, c in zip(uid, index, ce)}


def sequence_losses(net, loader):
    """{(user, target index): CE} in sequence mode, over one epoch of the loader's batches."""
    losses = {}
    for batch in loader:
        out = sq.target_output(net, batch)
        ce = F.cross_entropy(out @ net.item_embedding.weight.T, batch[net.POS_ITEM_ID], reduction="none")
        for u, t, c in zip(batch[sq.USER].tolist(), batch[sq.INDEX].tolist(), ce):
            assert (u, t) not in losses, "a target trained twice in one epoch"
            losses[(u, t)] = c
    return losses


@pytest.mark.parametrize("model", MODELS)
def test_each_target_loss_equals_the_prefix_protocol_where_exact(in_tmp, model):
    config, train, net = _setup(in_tmp, model)
    net.eval()
    with torch.no_grad():
        ref = prefix_losses(net, train.dataset)
        default = sequence_losses(net, sq.SequenceTrainDataLoader(config, train.dataset))
        exact = sequence_losses(net, sq.SequenceTrainDataLoader(config, train.dataset, stride=1))
    assert set(default) == set(exact) == set(ref)  # every prefix-protocol target, once
    within = [k for k in ref if k[1] <= L]  # the first window: the prefix's own history
    beyond = [k for k in ref if k[1] > L]
    assert within and beyond
    for k in within:
        assert torch.allclose(default[k], ref[k], atol=1e-5, rtol=1e-5), (k, default[k], ref[k])
    for k in ref:
        assert torch.allclose(exact[k], ref[k], atol=1e-5, rtol=1e-5), (k, exact[k], ref[k])
    # past L the default windows see less history (>= L - stride + 1 items), so losses differ
    assert any(not torch.allclose(default[k], ref[k], atol=1e-4) for k in beyond)


@pytest.mark.parametrize("model", MODELS)
def test_summed_gradient_over_users_equals_the_prefix_protocol(in_tmp, model):
    config, train, net = _setup(in_tmp, model)
    net.eval()  # dropout off (it is 0 too); gradients still flow
    users = {2, 5, 11}

    def grads(losses):
        net.zero_grad()
        sum(v for (u, _), v in losses.items() if u in users).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    g_prefix = grads(prefix_losses(net, train.dataset))
    g_seq = grads(sequence_losses(net, sq.SequenceTrainDataLoader(config, train.dataset, stride=1)))
    assert set(g_prefix) == set(g_seq)
    for name, g in g_prefix.items():
        assert torch.allclose(g_seq[name], g, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_the_models_own_loss_is_taken_over_every_target(in_tmp, loss_type):
    config, train, net = _setup(in_tmp, "SASRec", loss_type=loss_type)
    loader = sq.SequenceTrainDataLoader(config, train.dataset, train._sampler)
    batch = next(iter(loader))
    out = sq.target_output(net, batch)
    pos = net.item_embedding(batch[net.POS_ITEM_ID])
    if loss_type == "BPR":
        neg_items = batch[net.NEG_ITEM_ID]
        assert neg_items.shape == batch[net.POS_ITEM_ID].shape and (neg_items != batch[net.POS_ITEM_ID]).all()
        neg = net.item_embedding(neg_items)
        expected = -torch.log(1e-10 + torch.sigmoid((out * pos).sum(-1) - (out * neg).sum(-1))).mean()
    else:
        expected = F.cross_entropy(out @ net.item_embedding.weight.T, batch[net.POS_ITEM_ID])
    assert torch.allclose(sq.sequence_loss(net, batch), expected, atol=1e-6)
    assert "forward" not in net.__dict__ and "gather_indexes" not in net.__dict__  # nothing left patched


def test_batches_hold_train_batch_size_targets_and_match_the_protocols_steps(in_tmp):
    config, train, net = _setup(in_tmp, "Mamba4Rec")
    loader = sq.SequenceTrainDataLoader(config, train.dataset)
    sizes = [len(b[net.POS_ITEM_ID]) for b in loader]
    assert loader.n_targets == len(train.dataset) == sum(sizes)
    assert len(sizes) == len(loader) == len(train) == math.ceil(len(train.dataset) / 16)
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    # a batch is no wider than its longest window
    for b in loader:
        assert b[net.ITEM_SEQ].shape[1] == int(b[net.ITEM_SEQ_LEN].max()) <= L


def test_window_spans_train_each_target_once_with_at_least_l_minus_stride_plus_one_history():
    for m in range(1, 40):
        for stride in range(1, L + 1):
            seen = []
            for start, length, new in sq.window_spans(m, L, stride):
                assert 1 <= new <= length <= L and start >= 0 and start + length <= m - 1
                for j in range(length - new, length):
                    target = start + j + 1
                    history = target - start
                    assert history == min(target, L) or history >= L - stride + 1
                    if stride == 1:
                        assert history == min(target, L)  # the exact setting
                    seen.append(target)
            assert seen == list(range(1, m)), (m, stride)


def test_shuffle_is_seeded_and_resumes_from_the_generator_state(in_tmp):
    config, train, _ = _setup(in_tmp, "Mamba4Rec")

    def epoch(loader):
        return [b["item_id"].tolist() for b in loader]

    a, b = sq.SequenceTrainDataLoader(config, train.dataset), sq.SequenceTrainDataLoader(config, train.dataset)
    first = epoch(a)
    assert first == epoch(b)
    state = a.generator.get_state()
    second = epoch(a)
    assert second != first  # a new order each epoch
    c = sq.SequenceTrainDataLoader(config, train.dataset)
    c.generator.set_state(state)
    assert epoch(c) == second


class BidirectionalSASRec(SASRec):
    """SASRec attending to later items too: not causal."""

    def get_attention_mask(self, item_seq, bidirectional=False):
        return super().get_attention_mask(item_seq, bidirectional=True)


@pytest.mark.parametrize("model,match", [("BERT4Rec", "BERT4Rec"), ("NARM", "NARM"),
                                         (BidirectionalSASRec, "not causal")])
def test_a_non_causal_model_is_refused_before_training(in_tmp, monkeypatch, model, match):
    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr("recbole.trainer.Trainer.fit", no_training)
    cfg = tiny_config_dict(in_tmp, train_mode="sequence")
    if isinstance(model, type):  # a class of the user's own: RecBole has no settings file for it
        import recbole
        import yaml

        props = Path(recbole.__file__).parent / "properties" / "model" / "SASRec.yaml"
        cfg = {**yaml.safe_load(props.read_text()), **cfg}
    with pytest.raises(sq.NotSequenceTrainable, match=f"train_mode=sequence cannot train.*{match}.*train_mode=prefix"):
        pipeline.run(model, "tiny", config_dict=cfg)


@pytest.mark.parametrize("override,match", [
    ({"train_mode": "windows"}, "train_mode='windows' is invalid.*prefix, sequence"),
    ({"train_mode": "sequence", "sequence_stride": 0}, "sequence_stride=0 is invalid.*from 1 to"),
    ({"train_mode": "sequence", "sequence_stride": 11}, "sequence_stride=11 is invalid"),
    ({"train_mode": "sequence", "sequence_stride": "half"}, "sequence_stride='half' is invalid"),
])
def test_bad_train_mode_or_stride_fails_before_any_data_work(in_tmp, monkeypatch, override, match):
    monkeypatch.setattr(pipeline, "create_dataset", lambda *a, **k: pytest.fail("data work started"))
    with pytest.raises(ValueError, match=match):
        pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, **override))


def test_cli_bad_train_mode_exits_2(in_tmp, capsys):
    import run_recbole

    assert run_recbole.main(["--dataset=tiny", "--train_mode=window", f"--data_path={in_tmp}"]) == 2
    assert "train_mode='window' is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["Mamba4Rec", "SASRec"])
def test_sequence_mode_trains_and_resumes_exactly(in_tmp, model):
    def cfg(sub, epochs):
        return tiny_config_dict(in_tmp, scan_impl="torch", epochs=epochs, checkpoint_dir=str(in_tmp / sub),
                                stopping_step=10, train_mode="sequence", sequence_stride=3)

    full = pipeline.run(model, "tiny", config_dict=cfg("full", 3))
    pipeline.run(model, "tiny", config_dict=cfg("cut", 1))
    resumed = pipeline.run(model, "tiny", config_dict=cfg("cut", 3),
                           resume=str(in_tmp / "cut" / f"{model}-tiny-last.pth"))
    assert resumed.epochs_run == full.epochs_run == 3
    assert resumed.test_result == full.test_result and resumed.best_valid_result == full.best_valid_result
    a = torch.load(in_tmp / "full" / f"{model}-tiny-last.pth", weights_only=False)["state_dict"]
    b = torch.load(in_tmp / "cut" / f"{model}-tiny-last.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert all(0.0 <= v <= 1.0 for v in full.test_result.values())


def test_sequence_mode_amp_bf16_on_cpu_stays_finite(in_tmp):
    result = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(
        in_tmp, scan_impl="torch", enable_amp=True, epochs=1, train_mode="sequence"))
    assert all(0.0 <= v <= 1.0 for v in result.test_result.values())


def test_distributed_ranks_split_every_step_and_take_the_same_number_of_steps(in_tmp):
    config, train, net = _setup(in_tmp, "GRU4Rec")
    seen, steps = [], []
    for rank in range(3):
        loader = sq.SequenceTrainDataLoader(config, train.dataset)
        loader.world_size, loader.rank, loader.step = 3, rank, 16 // 3
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader) and all(len(b["item_id"]) <= 5 for b in batches)
        seen += [(u, t) for b in batches for u, t in zip(b[sq.USER].tolist(), b[sq.INDEX].tolist())]
    assert len(set(steps)) == 1
    everything = set(sequence_losses_keys(config, train))
    assert set(seen) == everything  # every target on some rank; repeats only as the last step's padding
    assert len(seen) - len(everything) < 3 * 5


def sequence_losses_keys(config, train):
    return [(u, t) for b in sq.SequenceTrainDataLoader(config, train.dataset)
            for u, t in zip(b[sq.USER].tolist(), b[sq.INDEX].tolist())]


def test_sequence_mode_exports_the_best_weights_for_serving(in_tmp):
    from mamba4rec.serving import load_checkpoint

    export = in_tmp / "serving.pt"
    result = pipeline.run("Mamba4Rec", "tiny", export_path=str(export), config_dict=tiny_config_dict(
        in_tmp, scan_impl="torch", epochs=2, train_mode="sequence"))
    payload = load_checkpoint(export)
    best = torch.load(result.saved_model_file, weights_only=False)["state_dict"]  # this run's own file
    assert best.keys() == payload["state_dict"].keys()
    assert all(torch.equal(v.cpu(), payload["state_dict"][k]) for k, v in best.items())


class TwoViewSASRec(SASRec):
    """A causal model whose loss runs forward twice (a second view, as contrastive losses do)."""

    def calculate_loss(self, interaction):
        first = super().calculate_loss(interaction)
        return first + 0.0 * self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]).sum()


class DeadGateSASRec(SASRec):
    """Non-causal only through a path that is zero at the fresh init: the perturbed probe sees it."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.mix = torch.nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        torch.nn.init.zeros_(self.mix.weight)

    def forward(self, item_seq, item_seq_len):
        out = super().forward(item_seq, item_seq_len)
        extra = self.mix(self.item_embedding(item_seq).mean(dim=1))  # every item, later ones too
        return out + (extra[:, None] if out.dim() == 3 else extra)


@pytest.mark.parametrize("model,match", [(TwoViewSASRec, "runs forward more than once"),
                                         (DeadGateSASRec, "not causal")])
def test_models_that_only_look_causal_are_refused(in_tmp, model, match):
    import recbole
    import yaml

    props = Path(recbole.__file__).parent / "properties" / "model" / "SASRec.yaml"
    cfg = {**yaml.safe_load(props.read_text()), **tiny_config_dict(in_tmp)}
    config = pipeline.build_config(model, "tiny", config_dict=cfg)
    train, _, _ = data_preparation(config, create_dataset(config))
    net = model(config, train.dataset)
    with pytest.raises(sq.NotSequenceTrainable, match=match):
        sq.check_model(net, config)
    assert "forward" not in net.__dict__ and "gather_indexes" not in net.__dict__


def test_patched_attributes_are_restored_after_an_error_and_keep_an_instance_forward(in_tmp):
    config, train, net = _setup(in_tmp, "SASRec")
    batch = next(iter(sq.SequenceTrainDataLoader(config, train.dataset)))
    own = net.forward  # an instance attribute, as RecBole's set_reduce_hook leaves one under DDP
    net.forward = own
    broken = dict(batch.interaction)
    del broken[net.POS_ITEM_ID]
    from recbole.data.interaction import Interaction

    with pytest.raises(KeyError):
        sq.sequence_loss(net, Interaction(broken))
    assert net.__dict__["forward"] is own and "gather_indexes" not in net.__dict__
    sq.sequence_loss(net, batch).backward()
    assert net.__dict__["forward"] is own


@pytest.mark.parametrize("overrides", [{"position_embedding": True}, {"length_buckets": 1}])
def test_mamba4rec_variants_pass_the_probe_and_stay_exact(in_tmp, overrides):
    config, train, net = _setup(in_tmp, "Mamba4Rec", **overrides)
    sq.check_model(net, config)
    net.eval()
    with torch.no_grad():
        ref = prefix_losses(net, train.dataset)
        exact = sequence_losses(net, sq.SequenceTrainDataLoader(config, train.dataset, stride=1))
    assert all(torch.allclose(exact[k], ref[k], atol=1e-5, rtol=1e-5) for k in ref)


# ---- train_mode=prefix: RecBole's causal models in length buckets -------------------------------

@pytest.mark.parametrize("model,loss_type", [("SASRec", "CE"), ("GRU4Rec", "CE"), ("SASRec", "BPR")])
def test_prefix_batches_in_buckets_give_the_models_own_loss_and_gradient(in_tmp, model, loss_type):
    config, train, net = _setup(in_tmp, model, loss_type=loss_type)
    batch = next(iter(train))  # RecBole's own prefix samples, padded to L
    lengths = batch[net.ITEM_SEQ_LEN]
    assert batch[net.ITEM_SEQ].shape[1] == L and lengths.min() < lengths.max()  # buckets of unequal widths

    def loss_and_grads(fn):
        net.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    widths = []
    forward = type(net).forward

    def spy(self, item_seq, item_seq_len):
        widths.append(item_seq.shape[1])
        return forward(self, item_seq, item_seq_len)

    ref, g_ref = loss_and_grads(lambda: net.calculate_loss(batch))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(net), "forward", spy)
        got, g_got = loss_and_grads(lambda: sq.prefix_loss(net, batch, 4))
    assert len(widths) == 4 and max(widths) == int(lengths.max()) and min(widths) < L  # each cut at its longest
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5), (got, ref)
    assert set(g_got) == set(g_ref)
    for name, g in g_ref.items():
        assert torch.allclose(g_got[name], g, atol=1e-6, rtol=1e-4), name
    assert "forward" not in net.__dict__ and "gather_indexes" not in net.__dict__


@pytest.mark.parametrize("model,buckets,expect", [("SASRec", None, "auto"), ("GRU4Rec", 3, 3), ("SASRec", 4, 4),
                                                  ("SASRec", 1, 0), ("BERT4Rec", None, 0), ("FEARec", None, 0),
                                                  ("ItemKNN", None, 0), ("Mamba4Rec", None, 0)])
def test_prefix_mode_buckets_recbole_causal_models_only(in_tmp, monkeypatch, caplog, model, buckets, expect):
    """run() in prefix mode: a causal RecBole model's batches run in length_buckets buckets (default
    auto); length_buckets 1, a non-causal model (logged) and Mamba4Rec (its forward buckets itself) go
    through the model's own calculate_loss on the padded batch."""
    calls = []
    real = pipeline.prefix_loss

    def counting(model_, interaction, n_buckets):
        calls.append(n_buckets)
        return real(model_, interaction, n_buckets)

    monkeypatch.setattr(pipeline, "prefix_loss", counting)
    extra = {} if buckets is None else {"length_buckets": buckets}
    with caplog.at_level("INFO"):
        result = pipeline.run(model, "tiny", config_dict=tiny_config_dict(in_tmp, epochs=1, scan_impl="torch", **extra))
    assert all(0.0 <= v <= 1.0 for v in result.test_result.values())
    assert (set(calls) == {expect}) if expect else not calls
    if model in ("BERT4Rec", "FEARec"):  # the probe refused them (FEARec's forward fails on a narrower batch)
        assert f"{model}'s prefix batches run padded to MAX_ITEM_LIST_LENGTH, as RecBole runs them: " in caplog.text
        assert "train_mode=sequence" not in caplog.text


def test_prefix_mode_in_buckets_trains_as_the_padded_batches_do(in_tmp):
    """Dropout 0: length_buckets 4 and 1 (RecBole's padded forward) train the same weights. With
    dropout the buckets draw other masks (same distribution, other draws)."""
    def run(buckets):
        return pipeline.run("SASRec", "tiny", config_dict=tiny_config_dict(
            in_tmp, epochs=2, checkpoint_dir=str(in_tmp / f"b{buckets}"), length_buckets=buckets,
            hidden_dropout_prob=0.0, attn_dropout_prob=0.0))

    padded, bucketed = run(1), run(4)
    assert bucketed.best_valid_result == padded.best_valid_result and bucketed.test_result == padded.test_result
    a = torch.load(in_tmp / "b1" / "SASRec-tiny-last.pth", weights_only=False)
    b = torch.load(in_tmp / "b4" / "SASRec-tiny-last.pth", weights_only=False)
    assert (a["buckets"], b["buckets"]) == (1, 4)
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-5), k


def test_prefix_mode_in_buckets_resumes_exactly(in_tmp):
    def cfg(sub, epochs):
        return tiny_config_dict(in_tmp, epochs=epochs, checkpoint_dir=str(in_tmp / sub), stopping_step=10)

    full = pipeline.run("SASRec", "tiny", config_dict=cfg("full", 2))
    pipeline.run("SASRec", "tiny", config_dict=cfg("cut", 1))
    last = str(in_tmp / "cut" / "SASRec-tiny-last.pth")
    assert torch.load(last, weights_only=False)["buckets"] == "auto"
    with pytest.raises(ValueError, match="trained with length_buckets=auto .*would use 1.*--length_buckets=auto"):
        pipeline.run("SASRec", "tiny", config_dict={**cfg("cut", 2), "length_buckets": 1}, resume=last)
    resumed = pipeline.run("SASRec", "tiny", config_dict=cfg("cut", 2), resume=last)
    assert resumed.test_result == full.test_result and resumed.epochs_run == full.epochs_run == 2
    a = torch.load(in_tmp / "full" / "SASRec-tiny-last.pth", weights_only=False)["state_dict"]
    b = torch.load(last, weights_only=False)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())  # dropout on: the same draws after the resume


@pytest.mark.parametrize("value", [0, 2.5, "four", True])
def test_bad_length_buckets_fails_before_any_data_work(in_tmp, monkeypatch, value):
    monkeypatch.setattr(pipeline, "create_dataset", lambda *a, **k: pytest.fail("data work started"))
    with pytest.raises(ValueError, match=f"length_buckets={value!r} is invalid.*integer >= 1"):
        pipeline.run("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp, length_buckets=value))


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
def test_bucketed_forward_scores_as_the_padded_forward_and_restores_it(in_tmp, model):
    """Evaluation's forward (full_sort_predict) in length buckets: each bucket cut at its longest
    history, the scores of the batch padded to L."""
    config, train, net = _setup(in_tmp, model)
    batch = next(iter(train))
    lengths = batch[net.ITEM_SEQ_LEN]
    assert lengths.min() < lengths.max() <= L
    net.eval()
    widths = []
    forward = type(net).forward

    def spy(self, item_seq, item_seq_len):
        widths.append(item_seq.shape[1])
        return forward(self, item_seq, item_seq_len)

    with torch.no_grad():
        ref = net.full_sort_predict(batch)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(net), "forward", spy)
            with sq.bucketed_forward(net, 4):
                got = net.full_sort_predict(batch)
    assert len(widths) == 4 and max(widths) == int(lengths.max()) and min(widths) < int(lengths.max())
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert "forward" not in net.__dict__ and "gather_indexes" not in net.__dict__
    with sq.bucketed_forward(net, 1):  # 1: the model's own forward, not patched
        assert "forward" not in net.__dict__


@pytest.mark.parametrize("model,buckets,expect", [("SASRec", None, "auto"), ("GRU4Rec", 3, 3), ("SASRec", 1, 1),
                                                  ("BERT4Rec", None, 1), ("Mamba4Rec", None, 1)])
@pytest.mark.parametrize("mode", ["prefix", "sequence"])
def test_run_evaluates_in_the_buckets_of_its_training_batches(in_tmp, monkeypatch, model, buckets, expect, mode):
    """run(): validation and test of a causal RecBole model run in its training batches' buckets;
    Mamba4Rec (its forward buckets itself), a model the probe refuses and length_buckets 1 run the
    model's own forward."""
    if mode == "sequence" and model == "BERT4Rec":
        pytest.skip("sequence mode refuses BERT4Rec")
    calls = []
    real = pipeline.bucketed_forward

    def counting(net, n_buckets):
        calls.append(n_buckets)
        return real(net, n_buckets)

    monkeypatch.setattr(pipeline, "bucketed_forward", counting)
    extra = {} if buckets is None else {"length_buckets": buckets}
    masked = mode == "sequence"  # the masked test pass (off by default) in the same buckets, where it runs
    result = pipeline.run(model, "tiny", config_dict=tiny_config_dict(in_tmp, epochs=1, scan_impl="torch",
                                                                      train_mode=mode, test_input_masked=masked,
                                                                      **extra))
    assert all(0.0 <= v <= 1.0 for v in result.test_result.values())
    assert ("test_result_input_masked" in result.extra) is masked
    # one validation, the test, and the masked test when asked for
    assert len(calls) == (3 if masked else 2) and set(calls) == {expect}


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
def test_run_trainers_evaluation_in_buckets_equals_recboles_padded_one(in_tmp, model):
    """The trainer run() uses, on RecBole's own full-ranking test loader: the same metrics and
    per-user values with buckets 4 as with RecBole's padded forward (buckets 1)."""
    from recbole.utils import get_trainer

    from mamba4rec.significance import recording

    config, _, net = _setup(in_tmp, model, max_len=2 * L)  # test histories of 4 .. 12 items
    _, _, test = data_preparation(config, create_dataset(config))
    trainer = pipeline.run_trainer(get_trainer(config["MODEL_TYPE"], config["model"]))(config, net)
    out, widths = {}, {1: [], 4: []}
    forward = type(net).forward
    for buckets in (1, 4):
        trainer.buckets = buckets

        def spy(self, item_seq, item_seq_len, _seen=widths[buckets]):
            _seen.append(item_seq.shape[1])
            return forward(self, item_seq, item_seq_len)

        with pytest.MonkeyPatch.context() as mp, recording(10) as per_user:
            mp.setattr(type(net), "forward", spy)
            result = trainer.evaluate(test, load_best_model=False)
        out[buckets] = (dict(result), per_user)
    assert set(widths[1]) == {2 * L} and min(widths[4]) < 2 * L  # padded to L, and cut in buckets
    assert out[4][0] == out[1][0]
    for key, values in out[1][1].items():
        assert np.array_equal(out[4][1][key], values), key
    assert "forward" not in net.__dict__


def test_bucketed_forward_is_removed_after_an_error(in_tmp):
    config, train, net = _setup(in_tmp, "SASRec")
    with pytest.raises(RuntimeError, match="boom"):
        with sq.bucketed_forward(net, 4):
            assert "forward" in net.__dict__
            raise RuntimeError("boom")
    assert "forward" not in net.__dict__


def test_auto_buckets_run_fewer_padded_positions_than_equal_counts():
    from mamba4rec.causal import CALL_COST

    """length_buckets: auto groups a batch of short histories and one long one so that the short
    ones are not padded to it; the groups cover every row once."""
    lengths = torch.tensor([3, 50, 4, 5, 3, 6, 7, 2, 4, 5, 3, 6, 48, 5])
    auto = sq.length_buckets(lengths, "auto")
    assert sorted(torch.cat(auto).tolist()) == list(range(len(lengths)))

    def padded(parts):
        return sum(len(p) * int(lengths[p].max()) for p in parts)

    assert padded(auto) == 12 * 7 + 2 * 50 < padded(sq.length_buckets(lengths, 4))  # the long two apart
    for n in range(1, len(lengths) + 1):  # no equal-count bucketing costs less, with the per-call cost
        equal = sq.length_buckets(lengths, n)
        assert padded(auto) + CALL_COST * len(auto) <= padded(equal) + CALL_COST * len(equal)
