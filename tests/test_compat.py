"""Each compat shim / pin, and the failure it prevents."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

import mamba4rec.compat as compat
from mamba4rec import pipeline
from tests.conftest import tiny_config_dict


def test_config_builds_without_the_aliases_numpy2_removed(in_tmp, monkeypatch):
    """numpy 2 has no np.float_, np.complex_, np.unicode_: RecBole's own compatibility_settings
    fails on every Config; with the fix the Config builds and np.float (used by RecBole's
    metrics) is float64. On numpy 1, numpy is made to look like numpy 2 here."""
    import numpy as np
    from recbole.config import Config

    monkeypatch.setattr(Config, "compatibility_settings", Config.compatibility_settings)  # restored after
    for name in ("float_", "complex_", "unicode_"):
        monkeypatch.delattr(np, name, raising=False)  # on numpy 2 they are gone already
    monkeypatch.setattr(np, "__version__", "2.1.0")
    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    monkeypatch.setattr(Config, "compatibility_settings", compat._RECBOLE_COMPATIBILITY_SETTINGS)
    with pytest.raises(AttributeError, match="float_"):
        pipeline.build_config("Mamba4Rec", "tiny", config_dict=cfg)
    compat.install_numpy2_fix()
    assert Config.compatibility_settings is compat._compatibility_settings
    config = pipeline.build_config("Mamba4Rec", "tiny", config_dict=cfg)
    assert config["model"] == "Mamba4Rec"
    assert np.float is np.float64 and np.complex is np.complex128 and np.unicode is np.str_


def test_recbole_quick_start_imports_beside_mamba4rec_where_ray_is_installed():
    """RecBole's quick_start (the only importer of ray) still imports after mamba4rec's shims, for
    users whose own scripts use it; ray 2.6.3 exists for Python 3.11 only (docs/ENV.md)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (RecBole is installed without it; only recbole.quick_start needs it)")
    import recbole.quick_start  # noqa: F401


def _trained_trainer(tmp_path):
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    config = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(tmp_path, scan_impl="torch"))
    train, valid, test = data_preparation(config, create_dataset(config))
    trainer = Trainer(config, pipeline.build_model(config, train.dataset))
    trainer.fit(train, valid, saved=True, show_progress=False)
    return trainer, test


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the foreign pickle refused
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


def _one_file_dataset(tmp, name, text, fields):
    """A data set of one .inter file under tmp/data; the config dict that loads ``fields``."""
    folder = tmp / "data" / name
    folder.mkdir(parents=True)
    (folder / f"{name}.inter").write_text(text)
    return tiny_config_dict(tmp, data_path=str(tmp / "data"), load_col={"inter": fields})


@contextlib.contextmanager
def _copy_on_write():
    """pandas 3's only mode; opt-in on pandas 2 (where the option exists and is not deprecated)."""
    if int(pd.__version__.split(".")[0]) >= 3:
        yield
        return
    pd.set_option("mode.copy_on_write", True)
    try:
        yield
    finally:
        pd.set_option("mode.copy_on_write", False)


@pytest.mark.parametrize("fill", ["recbole", "compat"])
def test_fill_nan_survives_copy_on_write(in_tmp, monkeypatch, fill):
    """A missing float value is filled with the column mean under copy-on-write with the shim;
    RecBole's own in-place fill leaves the NaN there."""
    import numpy as np
    from recbole.data import create_dataset
    from recbole.data.dataset import Dataset

    cfg = _one_file_dataset(
        in_tmp, "holes", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t1.0\t1\nu1\ti2\t\t2\nu1\ti3\t3.0\t3\nu2\ti1\t5.0\t1\nu2\ti3\t1.0\t2\nu2\ti2\t2.0\t3\n",
        ["user_id", "item_id", "rating", "timestamp"])
    if fill == "recbole":
        monkeypatch.setattr(Dataset, "_fill_nan", compat._RECBOLE_FILL_NAN)
    config = pipeline.build_config("Mamba4Rec", "holes", config_dict=cfg)
    with _copy_on_write():
        ds = create_dataset(config)
    ratings = np.asarray(ds.inter_feat["rating"], dtype=float)
    if fill == "recbole":
        assert np.isnan(ratings).any()
    else:
        assert not np.isnan(ratings).any()
        assert np.isclose(ratings, 12.0 / 5).any()


@pytest.mark.parametrize("fill", ["recbole", "compat"])
def test_missing_sequence_values_load_under_copy_on_write(in_tmp, monkeypatch, fill):
    """pandas 3 (copy-on-write) loses RecBole's in-place fill of a sequence field's missing
    values, and the NaN then fails on .split; the shim's read_csv fills them itself."""
    import recbole.data.dataset.dataset as rb_dataset
    from recbole.data import create_dataset

    cfg = _one_file_dataset(
        in_tmp, "seqholes", "user_id:token\titem_id:token\ttags:token_seq\ttimestamp:float\n"
        "u1\ti1\ta b\t1\nu1\ti2\t\t2\nu1\ti3\tb\t3\nu2\ti1\tc\t1\nu2\ti3\ta\t2\nu2\ti2\tb c\t3\n",
        ["user_id", "item_id", "tags", "timestamp"])
    if fill == "recbole":
        monkeypatch.setattr(rb_dataset, "pd", pd)
    config = pipeline.build_config("Mamba4Rec", "seqholes", config_dict=cfg)
    if int(pd.__version__.split(".")[0]) >= 3:  # copy-on-write always; the shim refuses seq fields
        if fill == "compat":
            with pytest.raises(ValueError, match=r"tags:token_seq.*pandas<3.*load_col"):
                create_dataset(config)
        return
    with _copy_on_write():
        if fill == "recbole":
            with pytest.raises(AttributeError, match="split"):
                create_dataset(config)
            return
        ds = create_dataset(config)
    lengths = sorted(len(tags) for tags in ds.inter_feat["tags"])
    assert lengths == [0, 1, 1, 1, 2, 2]  # the missing value is an empty sequence, the others intact


def test_sequence_fields_under_pandas3_are_refused_with_the_fix(in_tmp, monkeypatch):
    """pandas 3 also breaks RecBole's per-row Series.agg(len) on sequence fields: refused before
    the file is read, with what to do; a data set without them is not affected."""
    from recbole.data import create_dataset

    text = ("user_id:token\titem_id:token\ttags:token_seq\ttimestamp:float\n"
            "u1\ti1\ta\t1\nu1\ti2\tb\t2\nu1\ti3\tb\t3\nu2\ti1\tc\t1\nu2\ti3\ta\t2\nu2\ti2\tc\t3\n")
    with_seq = _one_file_dataset(in_tmp, "seqs", text, ["user_id", "item_id", "tags", "timestamp"])
    monkeypatch.setattr(pd, "__version__", "3.0.0")
    with pytest.raises(ValueError, match=r"tags:token_seq under pandas 3\.0\.0.*pandas<3"):
        create_dataset(pipeline.build_config("Mamba4Rec", "seqs", config_dict=with_seq))
    without = dict(with_seq, load_col={"inter": ["user_id", "item_id", "timestamp"]})
    assert len(create_dataset(pipeline.build_config("Mamba4Rec", "seqs", config_dict=without)).inter_feat) == 6


def test_importing_recbole_models_leaves_anomaly_detection_as_it_was(monkeypatch):
    """RecBole's sine.py turns torch's anomaly detection on at import (every later training then
    records a traceback per op); compat imports the models once with the caller's setting kept."""
    import sys

    import recbole.model

    for name in [n for n in sys.modules if n.startswith("recbole.model.sequential_recommender")]:
        if name.endswith((".sine", ".sequential_recommender")):  # re-run these two on import
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(recbole.model, "sequential_recommender", recbole.model.sequential_recommender)
    saved = torch.is_anomaly_enabled()
    try:
        torch.autograd.set_detect_anomaly(False)
        import recbole.model.sequential_recommender.sine  # noqa: F401  what RecBole does alone
        assert torch.is_anomaly_enabled()
        for name in ("recbole.model.sequential_recommender.sine", "recbole.model.sequential_recommender"):
            del sys.modules[name]
        torch.autograd.set_detect_anomaly(False)
        compat.import_recbole_models()
        assert not torch.is_anomaly_enabled()
        for name in ("recbole.model.sequential_recommender.sine", "recbole.model.sequential_recommender"):
            del sys.modules[name]
        torch.autograd.set_detect_anomaly(True)  # a user's own choice stays
        compat.import_recbole_models()
        assert torch.is_anomaly_enabled()
    finally:
        torch.autograd.set_detect_anomaly(saved)


def test_import_mamba4rec_and_model_lookup_leave_anomaly_detection_off():
    from mamba4rec.registry import resolve_model

    resolve_model("SASRec")
    resolve_model("GRU4Rec")
    assert not torch.is_anomaly_enabled()


def test_the_readme_s_one_call_works_after_a_bare_import():
    """README: ``import mamba4rec`` then ``mamba4rec.pipeline.run(...)``, in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, mamba4rec; assert 'mamba4rec.pipeline' not in sys.modules; "
            "assert callable(mamba4rec.pipeline.run) and 'mamba4rec.pipeline' in sys.modules; "
            "assert mamba4rec.significance.__name__ == 'mamba4rec.significance'\n"
            "try:\n    mamba4rec.no_such_thing\nexcept AttributeError as e:\n    print(e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "has no attribute 'no_such_thing'" in res.stdout


def test_a_run_prints_plain_metrics_and_no_warning_a_user_cannot_act_on(tmp_path):
    """A training run as a user starts it (default warning filters, fresh process): RecBole's
    per-run warnings that notes 6 and 9 name are filtered, nothing else warns, and the metrics are
    plain floats (numpy 2 would print its scalars as ``np.float64(...)``)."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from mamba4rec import pipeline\n"
        "from tests.conftest import tiny_config_dict\n"
        "from pathlib import Path\n"
        "cfg = tiny_config_dict(Path(sys.argv[1]), scan_impl='torch', epochs=1, state='WARNING')\n"
        "r = pipeline.run('Mamba4Rec', 'tiny', config_dict=cfg)\n"
        "print(r.test_result, r.best_valid_result)\n"
        "assert all(type(v) is float for v in [*r.test_result.values(), *r.best_valid_result.values()])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", MAMBA4REC_FAST_DROPOUT="0", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "hit@10" in proc.stdout and "np.float" not in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- the door

SNAPSHOT = r"""
import fnmatch, importlib, json, pkgutil, sys, types
import recbole

for info in pkgutil.walk_packages(recbole.__path__, "recbole."):
    if info.name.startswith(("recbole.quick_start", "recbole.model.exlib_recommender")):
        continue  # ray; lightgbm and xgboost: not installed here
    try:
        importlib.import_module(info.name)
    except Exception:
        pass

def snapshot():
    out = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("recbole") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, types.ModuleType) and value.__name__.startswith("recbole."):
                continue  # a submodule, bound when it was imported
            out[f"{name}:{attr}"] = value
            if isinstance(value, type) and value.__module__ == name:
                for key, member in list(vars(value).items()):
                    out[f"{name}:{attr}.{key}"] = member
    return out

before = snapshot()
import mamba4rec
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k, before) is not after.get(k, after))
print(json.dumps(changed))
"""


def test_importing_mamba4rec_changes_recbole_exactly_as_the_patch_table_says():
    """Every attribute of every RecBole module and class, before and after ``import mamba4rec``:
    each change matches an "import" entry of compat.PATCHES, and each such entry changed
    something. A patch made anywhere without its entry (or an entry that no longer patches)
    fails here."""
    import fnmatch
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    changed = json.loads(proc.stdout.strip().splitlines()[-1])
    targets = [p.target for p in compat.PATCHES if p.when == "import" and p.target.startswith("recbole")]
    unlisted = [c for c in changed if not any(fnmatch.fnmatchcase(c, t) for t in targets)]
    assert not unlisted, f"changed by import mamba4rec but not in compat.PATCHES: {unlisted}"
    import numpy as np

    only_if = {"recbole.config.configurator:Config.compatibility_settings": int(np.__version__.split(".")[0]) >= 2}
    idle = [t for t in targets if only_if.get(t, True) and not any(fnmatch.fnmatchcase(c, t) for c in changed)]
    assert not idle, f"in compat.PATCHES but unchanged: {idle}"
    assert len(changed) >= len(targets)


def test_the_patch_table_is_the_one_in_the_docs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    for patch in compat.PATCHES:
        assert f"`{patch.target}`" in text, f"docs/ARCHITECTURE.md's table lacks {patch.target}"
        assert patch.when in ("import", "temporary") and patch.test


def test_temporary_patches_are_put_back(monkeypatch):
    import sys

    from recbole.evaluator import metrics

    argv = list(sys.argv)
    with pytest.raises(RuntimeError):
        with compat.recbole_argv(["--epochs=2"]):
            assert sys.argv[1:] == ["--epochs=2"]
            raise RuntimeError
    assert sys.argv == argv

    classes = (metrics.Hit, metrics.MRR, metrics.NDCG)
    own = [cls.__dict__["metric_info"] for cls in classes]
    seen = []
    with pytest.raises(RuntimeError):
        with compat.metric_info_hook(classes, lambda cls, result: seen.append(cls)):
            with compat.metric_info_hook(classes[:1], lambda cls, result: seen.append("inner")):
                import numpy as np

                metrics.Hit.metric_info(None, np.array([[True, False]]))
            raise RuntimeError
    assert [cls.__dict__["metric_info"] for cls in classes] == own
    assert seen == [metrics.Hit, "inner"]  # the inner hook wraps the outer one

    class Model:
        def forward(self):
            return "class"

    m = Model()
    with compat.instance_attributes(m, forward=lambda: "instance"):
        assert m.forward() == "instance" and Model().forward() == "class"
    assert m.forward() == "class" and "forward" not in m.__dict__


def test_recbole_finds_mamba4rec_by_name(in_tmp):
    """RecBole's own lookup (Config, quick_start) knows Mamba4Rec by name; RecBole's get_model
    alone falls through to exlib_recommender (lightgbm) and fails."""
    from recbole.config import Config
    from recbole.utils import get_model

    from mamba4rec import Mamba4Rec

    with pytest.raises((ModuleNotFoundError, ValueError)):
        compat._RECBOLE_GET_MODEL("Mamba4Rec")
    assert get_model("Mamba4Rec") is Mamba4Rec and get_model(Mamba4Rec) is Mamba4Rec
    assert get_model("SASRec").__name__ == "SASRec"
    with pytest.raises(ValueError, match="NoSuchModel"):
        get_model("NoSuchModel")
    config = Config(model="Mamba4Rec", dataset="tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch"))
    assert config["model"] == "Mamba4Rec" and config["d_conv"] == 4  # the packaged defaults were read
