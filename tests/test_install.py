"""A regular install works from anywhere: build a wheel from the checkout, install it into a fresh
venv, and from a folder outside the checkout (which is not importable there) train one epoch on
the tiny data through pipeline.run and through a plain RecBole Config(model=Mamba4Rec, ...), and
run a one-trial search over the shipped search space.

No download: the wheel is built with the running interpreter's setuptools (--no-build-isolation)
and installed with --no-deps --no-index by the fresh venv's own pip; only then does a .pth file
give that venv the running one's site-packages, so torch, RecBole and the rest are found
without being installed again. A .pth line only adds its folder to sys.path (the .pth files
inside it are not run), so an editable mamba4rec of the running venv is not picked up: the child
asserts that mamba4rec, its kernels and the configs all come from the fresh venv.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_DATA

REPO = Path(__file__).resolve().parents[1]
#: what the build reads (setup.cfg: packages, package data, README.md as long description)
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "mamba4rec", "configs")

CHILD = r'''
import json, sys
import torch
torch.set_num_threads(1)
import mamba4rec
import mamba4rec.kernels as kernels
from mamba4rec import Mamba4Rec, pipeline
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer
from recbole.utils import init_seed

data_path, out = sys.argv[1], sys.argv[2]
small = {"data_path": data_path, "checkpoint_dir": "saved", "epochs": 1, "train_batch_size": 64,
         "eval_batch_size": 64, "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16, "d_state": 4,
         "scan_impl": "torch", "show_progress": False, "state": "WARNING",
         "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
KEYS = ("eval_args", "metrics", "topk", "valid_metric", "repeatable", "loss_type")

def protocol(config):
    d = {k: config[k] for k in KEYS}
    d["neg_sampling"] = config["train_neg_sample_args"]["distribution"]
    return d

report = {"mamba4rec": mamba4rec.__file__, "kernels": kernels.__file__, "sys_path": sys.path,
          "config_dir": str(mamba4rec.defaults.config_dir()),
          "config_files": mamba4rec.config_files("Mamba4Rec", "ml-100k")}

result = pipeline.run("Mamba4Rec", "tiny", config_dict=small)
report["run"] = {"test": result.test_result, "valid": result.best_valid_result, "epochs": result.epochs_run,
                 "protocol": protocol(pipeline.build_config("Mamba4Rec", "tiny", config_dict=small))}

config = Config(model=Mamba4Rec, dataset="tiny", config_dict=small)  # no files at all
init_seed(config["seed"], config["reproducibility"])
train, valid, test = data_preparation(config, create_dataset(config))
model = Mamba4Rec(config, train.dataset).to(config["device"])
trainer = Trainer(config, model)
trainer.fit(train, valid, saved=True, show_progress=False)
report["plain"] = {"test": dict(trainer.evaluate(test, load_best_model=True, show_progress=False)),
                   "protocol": protocol(config), "hidden_size": config["hidden_size"]}

from mamba4rec import hyper  # a one-trial search over the shipped space, from the install
space = mamba4rec.defaults.search_space_file("Mamba4Rec")
import yaml
with open("tiny.yaml", "w") as fh:
    yaml.safe_dump(small, fh)
found = hyper.search("Mamba4Rec", "tiny", space, config_files=["tiny.yaml"], max_evals=1, isolate=False,
                     output_file="hyper.md", progress=lambda line: None)
report["hyper"] = {"space": str(space), "status": [r["status"] for r in found.rows]}

ml = pipeline.build_config("Mamba4Rec", "ml-100k")  # the paper's settings of a shipped data set
report["ml-100k"] = {"protocol": protocol(ml), "MAX_ITEM_LIST_LENGTH": ml["MAX_ITEM_LIST_LENGTH"],
                     "dropout_prob": ml["dropout_prob"], "data_path": ml["data_path"]}
with open(out, "w") as fh:
    json.dump(report, fh, default=str)
'''


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _expected_protocol():
    overall = yaml.safe_load((REPO / "configs" / "overall.yaml").read_text())
    model = yaml.safe_load((REPO / "configs" / "model" / "Mamba4Rec.yaml").read_text())
    eval_args = dict(overall["eval_args"])
    if isinstance(eval_args["mode"], str):  # RecBole holds the mode per phase
        eval_args["mode"] = {"valid": eval_args["mode"], "test": eval_args["mode"]}
    return {"eval_args": eval_args, "metrics": overall["metrics"], "topk": overall["topk"],
            "valid_metric": overall["valid_metric"], "repeatable": overall["repeatable"],
            "loss_type": model["loss_type"], "neg_sampling": "none"}


@pytest.mark.install
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    t0 = time.perf_counter()
    src, dist, venv, work = (tmp_path / n for n in ("src", "dist", "venv", "work"))
    for name in BUILD_INPUTS:  # a copy: building writes build/ and *.egg-info next to setup.cfg
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src])
    wheel = next(dist.glob("mamba4rec_recbole-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    # one top-level import package, mamba4rec (PyPI's `kernels` is another project's)
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mamba4rec"}
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() == ["mamba4rec"]
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "mamba4rec").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert "mamba4rec/kernels/selective_scan.py" in modules
    assert modules <= names, f"not in the wheel: {sorted(modules - names)}"
    shipped = {f"mamba4rec/configs/{p.relative_to(REPO / 'configs').as_posix()}"
               for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert shipped <= names, f"not in the wheel: {sorted(shipped - names)}"

    _run([sys.executable, "-m", "venv", venv])  # with its own pip (ensurepip: offline)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_mamba4rec_test_deps.pth").write_text("\n".join(parents) + "\n")

    work.mkdir()
    shutil.copytree(TINY_DATA / "tiny", work / "data" / "tiny")
    (work / "check.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MAMBA4REC_FAST_DROPOUT="0", OMP_NUM_THREADS="1")  # no numba compile: seconds saved
    _run([py, "-I", "check.py", work / "data", work / "report.json"], cwd=work, env=env, timeout=600)
    report = json.loads((work / "report.json").read_text())

    # the installed copy ran, not the checkout, and the checkout was not importable
    for key in ("mamba4rec", "kernels", "config_dir"):  # (and the search space below)
        assert Path(report[key]).resolve().is_relative_to(purelib.resolve()), (key, report[key])
    # nothing of the checkout on the path but the borrowed site-packages (CI's .venv lies inside the clone)
    borrowed = {Path(p).resolve() for p in parents}
    assert not [p for p in report["sys_path"] if p and Path(p).resolve().is_relative_to(REPO)
                and Path(p).resolve() not in borrowed], report["sys_path"]
    assert [Path(f).relative_to(report["config_dir"]).as_posix() for f in report["config_files"]] == [
        "overall.yaml", "model/Mamba4Rec.yaml", "dataset/ml-100k.yaml", "model/Mamba4Rec/ml-100k.yaml"]

    expected = _expected_protocol()
    metrics = {f"{m.lower()}@{k}" for m in expected["metrics"] for k in expected["topk"]}
    for how in ("run", "plain"):
        assert report[how]["protocol"] == expected, how
        assert set(report[how]["test"]) == metrics, how
        assert all(0.0 <= v <= 1.0 for v in report[how]["test"].values()), how
    assert report["run"]["epochs"] == 1 and set(report["run"]["valid"]) == metrics
    assert report["plain"]["hidden_size"] == 16
    assert Path(report["hyper"]["space"]).resolve().is_relative_to(purelib.resolve())
    assert report["hyper"]["status"] == ["ok"]
    ml = report["ml-100k"]
    assert ml["protocol"] == expected and (ml["MAX_ITEM_LIST_LENGTH"], ml["dropout_prob"]) == (50, 0.2)
    assert Path(ml["data_path"], "ml-100k.inter").is_file()
    print(f"wheel build, venv, install and two trainings: {time.perf_counter() - t0:.1f} s")
