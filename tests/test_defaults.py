"""The paper's settings reach RecBole's Config without files, ship as package data, and a
protocol that would silently change is refused (mamba4rec/defaults.py)."""

from __future__ import annotations

import configparser
import fnmatch
import sys
from pathlib import Path

import pytest
import yaml
from recbole.config import Config
from recbole.utils import InputType

import mamba4rec
import mamba4rec.defaults as defaults
import mamba4rec.pipeline as pipeline
from mamba4rec import Mamba4Rec
from tests.conftest import TINY_DATA, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
OVERALL = yaml.safe_load((REPO / "configs" / "overall.yaml").read_text())
PROTOCOL = ("eval_args", "metrics", "topk", "valid_metric", "repeatable")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """A plain Config reads --key=value from sys.argv: keep pytest's own flags out of it."""
    monkeypatch.setattr(sys, "argv", ["pytest"])


def recbole_eval_args(eval_args):
    """configs/overall.yaml's eval_args as RecBole's Config holds them (mode per phase)."""
    out = dict(eval_args)
    if isinstance(out["mode"], str):
        out["mode"] = {"valid": out["mode"], "test": out["mode"]}
    return out


def protocol_of(config):
    return {key: config[key] for key in PROTOCOL}


EXPECTED = {**{key: OVERALL[key] for key in PROTOCOL}, "eval_args": recbole_eval_args(OVERALL["eval_args"])}


def test_plain_config_gets_the_papers_protocol_and_model_without_files(in_tmp):
    config = Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA)})
    assert protocol_of(config) == EXPECTED
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    assert config["loss_type"] == "CE" and config["MODEL_INPUT_TYPE"] == InputType.POINTWISE
    assert config["train_neg_sample_args"]["distribution"] == "none"
    for key, value in mamba4rec.MODEL_DEFAULTS.items():
        assert config[key] == value, key
    assert config["learning_rate"] == 0.001 and config["train_batch_size"] == 2048


def test_the_data_sets_files_are_read_too(in_tmp):
    config = Config(model=Mamba4Rec, dataset="amazon-beauty", config_dict={"data_path": str(in_tmp)})
    assert config["dropout_prob"] == 0.4  # configs/model/Mamba4Rec/amazon-beauty.yaml, not the 0.2 default
    assert config["MAX_ITEM_LIST_LENGTH"] == 50 and config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}


def test_the_users_keys_win_over_the_packaged_defaults(in_tmp):
    mine = in_tmp / "mine.yaml"
    mine.write_text("hidden_size: 24\nmetrics: ['Hit']\nvalid_metric: Hit@10\n")
    config = Config(model=Mamba4Rec, dataset="tiny", config_file_list=[str(mine)],
                    config_dict={"data_path": str(TINY_DATA), "d_state": 8})
    assert (config["hidden_size"], config["d_state"], config["metrics"]) == (24, 8, ["Hit"])
    assert config["eval_args"] == EXPECTED["eval_args"]  # what the user did not set stays the paper's


def test_bpr_gets_a_sampler_in_a_plain_config_as_in_the_pipeline(in_tmp):
    plain = Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA), "loss_type": "BPR"})
    # the packaged overall.yaml passed as a file says train_neg_sample_args: ~ ; BPR still gets one
    files = Config(model=Mamba4Rec, dataset="tiny", config_file_list=mamba4rec.config_files("Mamba4Rec", "tiny"),
                   config_dict={"data_path": str(TINY_DATA), "loss_type": "BPR"})
    piped = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, loss_type="BPR"))
    for config in (plain, files, piped):
        assert config["MODEL_INPUT_TYPE"] == InputType.PAIRWISE
        assert (config["train_neg_sample_args"]["distribution"], config["train_neg_sample_args"]["sample_num"]) \
            == ("uniform", 1)


def test_without_the_hook_recbole_refuses_mamba4rec(in_tmp, monkeypatch):
    """What `import mamba4rec` fixes: RecBole alone finds no loss_type for a model outside it."""
    monkeypatch.setattr(Config, "_load_internal_config_dict", defaults.RECBOLE_LOAD_INTERNAL)
    with pytest.raises(ValueError, match="input_type"):
        Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA)})


def test_baselines_get_recboles_defaults_from_a_plain_config(in_tmp):
    """The hook is Mamba4Rec's own: a RecBole model keeps RecBole's defaults (its files opt in)."""
    sasrec = Config(model="SASRec", dataset="tiny",  # RecBole wants CE's "no sampler" spelled out
                    config_dict={"data_path": str(TINY_DATA), "train_neg_sample_args": None})
    assert sasrec["valid_metric"] == "MRR@10" and sasrec["hidden_dropout_prob"] == 0.5
    same = Config(model="SASRec", dataset="tiny", config_file_list=mamba4rec.config_files("SASRec", "tiny"),
                  config_dict={"data_path": str(TINY_DATA)})
    assert protocol_of(same) == EXPECTED


@pytest.mark.parametrize("given,lost", [({"mode": "uni100"}, "split, order"),
                                        ({"split": {"LS": "valid_and_test"}, "mode": "full"}, "order")])
def test_a_partial_eval_args_is_refused_not_filled_with_recboles_split(in_tmp, given, lost):
    with pytest.raises(ValueError, match=f"leaves out {lost}: RecBole would fill") as plain:
        Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA), "eval_args": given})
    assert "'TO'" in str(plain.value) and "configs/overall.yaml" in str(plain.value)
    for model in ("Mamba4Rec", "SASRec"):  # the pipeline refuses it for every model
        with pytest.raises(ValueError, match=f"leaves out {lost}"):
            pipeline.build_config(model, "tiny", config_dict=tiny_config_dict(in_tmp, eval_args=given))
    with pytest.raises(ValueError, match=f"leaves out {lost}"):  # on the command line too
        pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp),
                              cmd_args=[f"--eval_args={given!r}".replace(" ", "")])


def test_recboles_split_written_out_is_accepted(in_tmp):
    chosen = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "uni100"}  # group_by: same default
    config = Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA), "eval_args": chosen})
    assert config["eval_args"]["split"] == {"RS": [0.8, 0.1, 0.1]}
    assert config["eval_args"]["mode"] == {"valid": "uni100", "test": "uni100"}


def test_config_files_and_dict_for_a_model_and_data_set():
    rel = [Path(f).relative_to(defaults.config_dir()).as_posix()
           for f in mamba4rec.config_files("Mamba4Rec", "amazon-beauty")]
    assert rel == ["overall.yaml", "model/Mamba4Rec.yaml", "dataset/amazon-beauty.yaml",
                   "model/Mamba4Rec/amazon-beauty.yaml"]
    assert [Path(f).name for f in mamba4rec.config_files(Mamba4Rec)] == ["overall.yaml", "Mamba4Rec.yaml"]
    assert [Path(f).relative_to(defaults.config_dir()).as_posix()
            for f in mamba4rec.config_files("SASRec", "my-data")] == ["overall.yaml"]
    merged = mamba4rec.config_dict("Mamba4Rec", "amazon-beauty")
    assert merged["dropout_prob"] == 0.4 and merged["eval_args"] == OVERALL["eval_args"]
    assert merged["hidden_size"] == 64 and merged["MAX_ITEM_LIST_LENGTH"] == 50
    assert "dropout_prob" not in mamba4rec.config_dict("GRU4Rec", "amazon-beauty")  # nothing leaks
    with pytest.raises(ValueError, match="model must be"):
        mamba4rec.config_files("", "ml-100k")


def test_an_install_without_configs_fails_loudly(in_tmp, monkeypatch):
    """The bug of a wheel without configs/: the files were dropped and RecBole's protocol ran."""
    empty = (in_tmp / "site-packages" / "mamba4rec" / "configs", in_tmp / "site-packages" / "configs")
    monkeypatch.setattr(defaults, "CONFIG_DIR_CANDIDATES", empty)
    monkeypatch.setattr(defaults, "CONFIG_DIR", defaults._find_config_dir() or empty[0])
    for call in (lambda: pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp)),
                 lambda: pipeline.build_config("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp)),
                 lambda: Config(model=Mamba4Rec, dataset="tiny", config_dict={"data_path": str(TINY_DATA)})):
        with pytest.raises(FileNotFoundError, match="configs .* are not in .*incomplete.*Reinstall"):
            call()


def test_the_installed_copy_is_preferred_over_a_checkout(tmp_path, monkeypatch):
    packaged, checkout = tmp_path / "pkg" / "configs", tmp_path / "configs"
    for root in (checkout, packaged):
        (root / "model").mkdir(parents=True)
        (root / "overall.yaml").write_text("epochs: 1\n")
        (root / "model" / "Mamba4Rec.yaml").write_text("hidden_size: 8\n")
    monkeypatch.setattr(defaults, "CONFIG_DIR_CANDIDATES", (packaged, checkout))
    assert defaults._find_config_dir() == packaged
    (packaged / "model" / "Mamba4Rec.yaml").unlink()  # an incomplete folder is skipped
    assert defaults._find_config_dir() == checkout


def test_setup_cfg_ships_every_config_file():
    """Each file under configs/ matches a package_data pattern of mamba4rec.configs (the wheel
    test, tests/test_install.py, checks the built wheel itself)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "mamba4rec.configs" in cfg["options"]["packages"].split()
    assert "mamba4rec.configs = configs" in cfg["options"]["package_dir"]
    patterns = [p.strip() for p in cfg["options.package_data"]["mamba4rec.configs"].split("\n") if p.strip()]
    files = [p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()]
    assert len(files) >= 10
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                                             for pat in patterns)]
    assert unshipped == []
