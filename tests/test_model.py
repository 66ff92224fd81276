"""Mamba4Rec's structure, defaults and config checks (no data pipeline needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mamba4rec import MODEL_DEFAULTS, Mamba4Rec, resolve_model_config
from mamba4rec.layers import MambaBlock, MambaLayer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class FakeDataset:
    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def make_model(n_items=50, max_len=12, **overrides):
    cfg = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_",
        "MAX_ITEM_LIST_LENGTH": max_len, "device": torch.device("cpu"), "scan_impl": "ref",
    }
    cfg.update(overrides)
    torch.manual_seed(0)
    return Mamba4Rec(cfg, FakeDataset(n_items))


def test_parameter_count_matches_the_paper_defaults():
    model = make_model(n_items=100)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("item_embedding"))
    block = sum(p.numel() for p in model.mamba_layers[0].mamba.parameters())
    ffn = model.mamba_layers[0].ffn
    pffn = sum(p.numel() for p in list(ffn.w_1.parameters()) + list(ffn.w_2.parameters()))
    assert (block, pffn, non_embedding) == (38_784, 33_088, 72_256)
    assert model.item_embedding.weight.shape == (100, 64)


def test_yaml_defaults_agree_with_code():
    with open(CONFIGS / "model" / "Mamba4Rec.yaml") as fh:
        assert yaml.safe_load(fh) == MODEL_DEFAULTS


def test_block_structure_is_the_papers():
    block = MambaBlock(64, d_state=32, d_conv=4, expand=2)
    assert block.dt_rank == math.ceil(64 / 16) == 4
    assert block.in_proj.bias is None and block.x_proj.bias is None and block.out_proj.bias is None
    assert block.conv1d.groups == 128 and block.conv1d.bias is not None
    assert block.x_proj.out_features == 4 + 2 * 32
    assert torch.allclose(-torch.exp(block.A_log[5]), -torch.arange(1, 33, dtype=torch.float32))
    assert torch.equal(block.D.data, torch.ones(128))


def test_paper_init_zeroes_dt_bias_and_mamba_init_keeps_it():
    paper = make_model()
    bias = paper.mamba_layers[0].mamba.dt_proj.bias
    assert torch.count_nonzero(bias) == 0
    assert abs(paper.item_embedding.weight.std().item() - 0.02) < 0.004
    mamba = make_model(dt_init="mamba")
    dt = torch.nn.functional.softplus(mamba.mamba_layers[0].mamba.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0


def test_layer_residual_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for residual in (False, True):
        layer = MambaLayer(16, 4, 4, 2, 0.0, residual, scan_impl="ref").eval()
        block_out = layer.mamba(x)
        expected_pre_ffn = layer.LayerNorm(block_out + x if residual else block_out)
        assert torch.allclose(layer(x), layer.ffn(expected_pre_ffn), atol=1e-6)


@pytest.mark.parametrize("num_layers,setting,expected", [
    (1, "auto", False), (2, "auto", True), (3, "auto", True),  # the paper's code
    (1, True, True), (2, False, False), (1, False, False), (2, True, True),
])
def test_block_residual_rule(num_layers, setting, expected):
    model = make_model(num_layers=num_layers, block_residual=setting)
    assert [layer.residual for layer in model.mamba_layers] == [expected] * num_layers
    assert model.block_residual is expected


def test_forced_residual_changes_a_single_layer_model_and_only_that():
    torch.manual_seed(3)
    plain = make_model().eval()
    torch.manual_seed(3)
    forced = make_model(block_residual=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), forced.state_dict().values()))
    seq, lens = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 9, 10, 11]]), torch.tensor([4, 5])
    with torch.no_grad():
        assert not torch.allclose(plain(seq, lens), forced(seq, lens), atol=1e-4)
        forced.mamba_layers[0].residual = False  # the only difference between the two
        assert torch.allclose(plain(seq, lens), forced(seq, lens), atol=1e-6)


def test_forward_is_causal_and_ignores_padding():
    model = make_model().eval()
    seq = torch.tensor([[3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12, 1, 2, 0, 0, 0, 0]])
    lens = torch.tensor([4, 8])
    with torch.no_grad():
        out = model(seq, lens)
        # changing items after each sequence's end changes nothing
        seq2 = seq.clone()
        seq2[0, 4:6] = torch.tensor([20, 21])
        out2 = model(seq2, lens)
        # a prefix gives the output at that position
        prefix = model(seq[1:, :4], torch.tensor([4]))
        full_at_4 = model(seq[1:], torch.tensor([4]))
    assert out.shape == (2, 64)
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(prefix, full_at_4, atol=1e-6)


@pytest.mark.parametrize("position_embedding", [False, True])
def test_length_buckets_give_the_same_outputs_and_gradients(position_embedding):
    torch.manual_seed(1)
    lens = torch.tensor([1, 12, 3, 7, 12, 2, 5, 9, 4, 11])
    seq = torch.randint(1, 50, (10, 12)) * (torch.arange(12)[None] < lens[:, None])
    outs, grads = [], []
    for buckets in (1, 3, 4, 64, "auto"):
        model = make_model(length_buckets=buckets, position_embedding=position_embedding).eval()
        out = model(seq, lens)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(model.mamba_layers[0].mamba.A_log.grad.clone())
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.allclose(out, outs[0], atol=1e-5)
        assert torch.allclose(grad, grads[0], rtol=1e-4, atol=1e-6)


def test_position_embedding_switch():
    model = make_model(position_embedding=True, max_len=12)
    assert model.position_embedding.weight.shape == (12, 64)
    seq = torch.tensor([[3, 4, 5, 0], [3, 4, 5, 6]])
    with torch.no_grad():
        assert model.eval()(seq, torch.tensor([3, 4])).shape == (2, 64)
    assert make_model().position_embedding is None


def test_losses_and_scores():
    for loss_type in ("CE", "BPR"):
        model = make_model(loss_type=loss_type)
        inter = {"item_id_list": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
                 "item_length": torch.tensor([3, 2]), "item_id": torch.tensor([4, 6]),
                 "neg_item_id": torch.tensor([9, 9])}
        loss = model.calculate_loss(inter)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert model.mamba_layers[0].mamba.A_log.grad is not None
    model.eval()
    scores = model.full_sort_predict(inter)
    assert scores.shape == (2, 50)
    assert torch.allclose(model.predict(inter), scores.gather(1, inter["item_id"][:, None]).squeeze(1))


BAD_VALUES = [
    ("d_state", 0), ("d_conv", 0), ("expand", 0), ("hidden_size", -1), ("num_layers", 0),
    ("d_state", 2.5), ("num_layers", True), ("dropout_prob", 1.0), ("dropout_prob", -0.1),
    ("dropout_prob", "high"), ("loss_type", "MSE"), ("scan_impl", "cuda"), ("dt_init", "xavier"),
    ("position_embedding", "yes"), ("length_buckets", 0), ("block_residual", "yes"),
    ("block_residual", 1),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_config_values_name_key_value_and_range(key, value):
    with pytest.raises(ValueError) as info:
        resolve_model_config({key: value})
    msg = str(info.value)
    assert f"{key}={value!r}" in msg
    assert any(word in msg for word in (">= 1", "[0, 1)", "one of", "True or False"))
    with pytest.raises(ValueError):
        make_model(**{key: value})


def test_missing_keys_fall_back_to_defaults():
    assert resolve_model_config({}) == MODEL_DEFAULTS
    assert resolve_model_config({"d_state": 8})["d_state"] == 8


def test_scan_path_env_override_and_log_line(monkeypatch, caplog):
    import logging

    from mamba4rec.kernels import SCAN_IMPL_ENV, resolve_scan_impl

    monkeypatch.setenv(SCAN_IMPL_ENV, "ref")
    assert resolve_scan_impl("torch", torch.device("cpu")) == ("ref", f"{SCAN_IMPL_ENV}=ref")
    model = make_model(scan_impl="torch").eval()
    with caplog.at_level(logging.INFO, logger="mamba4rec.layers"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    assert "selective scan: ref path" in caplog.text
    monkeypatch.setenv(SCAN_IMPL_ENV, "fastest")
    with pytest.raises(ValueError, match="MAMBA4REC_SCAN_IMPL='fastest' is not a scan path"):
        resolve_scan_impl("auto", torch.device("cpu"))
