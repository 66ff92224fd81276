"""Each compat shim / pin, and the failure it prevents."""

from __future__ import annotations

import os
import pickle

import pandas as pd
import pytest
import torch

import mamba4rec.compat as compat
from mamba4rec import pipeline
from tests.conftest import tiny_config_dict


def test_numpy2_and_pandas3_are_refused_with_the_fix():
    with pytest.raises(ImportError, match=r"numpy < 2.*np\.float_.*pip install"):
        compat.check_stack({"numpy": "2.1.0", "pandas": "2.2.0", "setuptools": "70"})
    with pytest.raises(ImportError, match=r"pandas < 3.*fillna"):
        compat.check_stack({"numpy": "1.26.4", "pandas": "3.0.0", "setuptools": "70"})
    with pytest.warns(RuntimeWarning, match="pkg_resources"):
        compat.check_stack({"numpy": "1.26.4", "pandas": "2.3.0", "setuptools": "81.0"})
    assert compat.check_stack({"numpy": "1.26.4", "pandas": "2.3.3", "setuptools": "79.0.1"}) == []


def test_installed_stack_passes_and_quick_start_imports():
    """The pins keep recbole.quick_start importable (ray 2.6.3 needs pkg_resources and numpy 1)."""
    compat.check_stack()
    import recbole.quick_start  # noqa: F401


def _trained_trainer(tmp_path):
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    config = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(tmp_path, scan_impl="torch"))
    train, valid, test = data_preparation(config, create_dataset(config))
    trainer = Trainer(config, pipeline.build_model(config, train.dataset))
    trainer.fit(train, valid, saved=True, show_progress=False)
    return trainer, test


def test_trainer_checkpoints_load_but_foreign_pickles_do_not(in_tmp):
    trainer, test = _trained_trainer(in_tmp)
    ckpt = trainer.saved_model_file
    # what the shim prevents: torch >= 2.6 refuses RecBole's own checkpoint by default
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    assert set(trainer.evaluate(test, load_best_model=True)) == {"hit@10", "ndcg@10", "mrr@10"}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    foreign = in_tmp / "foreign.pth"
    torch.save({"state_dict": {}, "x": Evil()}, foreign)
    with pytest.raises(pickle.UnpicklingError):
        trainer.evaluate(test, load_best_model=True, model_file=str(foreign))
    # a trainer checkpoint changed after it was written is no longer trusted
    with open(ckpt, "ab") as fh:
        fh.write(b"\0")
    assert not compat.is_trusted_checkpoint(ckpt)
    # an explicitly trusted file from an earlier run loads
    fresh = in_tmp / "copy.pth"
    torch.save(torch.load(ckpt, weights_only=False), fresh)
    compat.trust_checkpoint(fresh)
    trainer.evaluate(test, load_best_model=True, model_file=str(fresh))


def test_checkpoint_write_is_atomic(in_tmp, monkeypatch):
    target = in_tmp / "ckpt.pth"
    compat._trainer_save({"epoch": 1}, str(target))
    before = target.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        compat._trainer_save({"epoch": 2}, str(target))
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before
    assert sorted(p.name for p in in_tmp.iterdir() if "ckpt" in p.name) == ["ckpt.pth"]


@pytest.mark.parametrize("fill", ["recbole", "compat"])
def test_fill_nan_survives_copy_on_write(in_tmp, monkeypatch, fill):
    """A missing float value is filled with the column mean under copy-on-write with the shim;
    RecBole's own in-place fill leaves the NaN there."""
    import numpy as np
    from recbole.data import create_dataset
    from recbole.data.dataset import Dataset

    data = in_tmp / "data" / "holes"
    data.mkdir(parents=True)
    (data / "holes.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t1.0\t1\nu1\ti2\t\t2\nu1\ti3\t3.0\t3\nu2\ti1\t5.0\t1\nu2\ti3\t1.0\t2\nu2\ti2\t2.0\t3\n")
    cfg = tiny_config_dict(in_tmp, data_path=str(in_tmp / "data"),
                           load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
    if fill == "recbole":
        monkeypatch.setattr(Dataset, "_fill_nan", compat._RECBOLE_FILL_NAN)
    config = pipeline.build_config("Mamba4Rec", "holes", config_dict=cfg)
    pd.set_option("mode.copy_on_write", True)
    try:
        ds = create_dataset(config)
    finally:
        pd.set_option("mode.copy_on_write", False)
    ratings = np.asarray(ds.inter_feat["rating"], dtype=float)
    if fill == "recbole":
        assert np.isnan(ratings).any()
    else:
        assert not np.isnan(ratings).any()
        assert np.isclose(ratings, 12.0 / 5).any()
