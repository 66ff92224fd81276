"""The paper's settings as shipped with the package, and how they reach RecBole's ``Config``.

The YAML files of the checkout's ``configs/`` are installed as package data
(``mamba4rec/configs/`` inside site-packages; setup.cfg). :func:`config_files` and
:func:`config_dict` give them for a model and data set, from an install or a checkout:

    Config(model="SASRec", dataset="ml-100k", config_file_list=mamba4rec.config_files("SASRec", "ml-100k"))

For Mamba4Rec itself no file is needed: :func:`load_internal_config_dict`, which
``import mamba4rec`` makes RecBole's (mamba4rec.compat, note 10), has RecBole's ``Config`` read them as its *internal* defaults, the place where RecBole puts its own
models' ``properties/model/<Model>.yaml``, so ``Config(model=Mamba4Rec, dataset=...)`` gets the
paper's model, training and evaluation settings, and every file, dict or command-line key of the
user still wins over them. Mamba4Rec does not declare ``input_type``: RecBole derives it from
``loss_type`` (CE pointwise, BPR pairwise), which a fixed class attribute could not follow.
"""

from __future__ import annotations

from pathlib import Path

import yaml

_HERE = Path(__file__).resolve().parent
#: Where the configs are looked for: inside the installed package first, then the checkout's
#: configs/ (a checkout on sys.path, or an editable install).
CONFIG_DIR_CANDIDATES = (_HERE / "configs", _HERE.parent / "configs")
#: RecBole's own values for the eval_args keys a user's eval_args leaves out
#: (recbole/config/configurator.py, Config._set_default_parameters).
RECBOLE_EVAL_ARGS = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}
#: The model whose packaged files Mamba4Rec and its subclasses read.
MODEL = "Mamba4Rec"


def _is_config_dir(path: Path) -> bool:
    return (path / "overall.yaml").is_file() and (path / "model" / f"{MODEL}.yaml").is_file()


def _find_config_dir() -> Path | None:
    return next((d for d in CONFIG_DIR_CANDIDATES if _is_config_dir(d)), None)


#: The folder the configs are read from (the first candidate when none is complete: then
#: config_dir() raises).
CONFIG_DIR = _find_config_dir() or CONFIG_DIR_CANDIDATES[0]


def config_dir() -> Path:
    """The folder holding overall.yaml, model/, dataset/ and hyper/; FileNotFoundError when the
    install lacks them (a broken or partial install), never a silent fallback to RecBole's defaults."""
    if not _is_config_dir(CONFIG_DIR):
        where = " or ".join(str(d) for d in CONFIG_DIR_CANDIDATES)
        raise FileNotFoundError(
            f"mamba4rec's configs (overall.yaml, model/{MODEL}.yaml) are not in {where}: this install "
            f"is incomplete, and without them RecBole's default evaluation would replace the paper's. "
            f"Reinstall it (pip install --force-reinstall --no-deps mamba4rec-recbole, or pip install -e . in a checkout).")
    return CONFIG_DIR


def _model_name(model) -> str:
    if isinstance(model, type):
        return model.__name__
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a model class or name, got {model!r}")
    return model


def config_files(model=MODEL, dataset: str | None = None) -> list[str]:
    """The packaged config files for ``model`` (a name or class) on ``dataset``, in the order to
    apply them: overall.yaml (the protocol every model shares), model/<model>.yaml,
    dataset/<dataset>.yaml and model/<model>/<dataset>.yaml, those that exist.

    Per-(model, data set) settings live in their own file so that one model's tuning (say
    Mamba4Rec's dropout_prob) never leaks into a baseline with a key of the same name. A data set
    without a file of its own (your own data) gets the shared protocol only.
    """
    root, name = config_dir(), _model_name(model)
    candidates = [root / "overall.yaml", root / "model" / f"{name}.yaml"]
    if dataset is not None:
        candidates += [root / "dataset" / f"{dataset}.yaml", root / "model" / name / f"{dataset}.yaml"]
    return [str(p) for p in candidates if p.is_file()]


def config_dict(model=MODEL, dataset: str | None = None) -> dict:
    """The settings of :func:`config_files` merged into one dict (later files win), e.g. for
    ``Config(..., config_dict={**mamba4rec.config_dict("Mamba4Rec", "ml-1m"), "epochs": 50})``."""
    merged = {}
    for path in config_files(model, dataset):
        with open(path, encoding="utf-8") as fh:
            merged.update(yaml.load(fh, Loader=yaml.FullLoader) or {})
    return merged


def search_space_file(model) -> Path | None:
    """The shipped hyper-parameter search space of ``model`` (configs/hyper/<model>.hyper), or None."""
    path = config_dir() / "hyper" / f"{_model_name(model)}.hyper"
    return path if path.is_file() else None


def check_protocol(external: dict) -> None:
    """Refuse a user's ``eval_args`` that leaves out a key whose RecBole default differs from this
    project's protocol (configs/overall.yaml): RecBole fills the missing keys with its own defaults
    (random 8:1:1 split, random order), which would silently replace leave-one-out by time.

    ``external``: the settings the user gave (RecBole's ``config.external_config_dict``).
    """
    given = external.get("eval_args")
    if not isinstance(given, dict):  # absent (the defaults apply whole), or RecBole refuses it itself
        return
    with open(config_dir() / "overall.yaml", encoding="utf-8") as fh:
        ours = (yaml.load(fh, Loader=yaml.FullLoader) or {}).get("eval_args") or {}
    lost = {key: value for key, value in RECBOLE_EVAL_ARGS.items()
            if key not in given and key in ours and _same(key, ours[key]) != _same(key, value)}
    if lost:
        keep = {**ours, **given}
        raise ValueError(
            f"eval_args {given!r} leaves out {', '.join(lost)}: RecBole would fill "
            + ", ".join(f"{k}={v!r}" for k, v in lost.items())
            + f" (its own defaults), not this project's protocol ("
            + ", ".join(f"{k}={ours[k]!r}" for k in lost)
            + f", configs/overall.yaml). Give every eval_args key, e.g. eval_args: {keep!r}; to use RecBole's "
              f"value on purpose, write it out.")


def _same(key, value):
    """eval_args values as RecBole compares them: a mode string means that mode for valid and test."""
    return {"valid": value, "test": value} if key == "mode" and isinstance(value, str) else value


RECBOLE_LOAD_INTERNAL = None  # RecBole's own Config._load_internal_config_dict (set by mamba4rec.compat)


def load_internal_config_dict(self, model, model_class, dataset):
    """RecBole's internal defaults, then those of a model that names its own files
    (``default_config_files(dataset)``, as Mamba4Rec does), then the eval_args check. As in
    mamba4rec.registry.build_config, loss_type BPR without a sampler of the user's gets RecBole's
    uniform 1:1 negative sampling (CE must have none, and the packaged default is none).
    mamba4rec.compat makes it RecBole's Config._load_internal_config_dict (its note 10)."""
    RECBOLE_LOAD_INTERNAL(self, model, model_class, dataset)
    files = getattr(model_class, "default_config_files", None)
    if callable(files):
        for path in files(dataset):
            self._update_internal_config_dict(path)
        external = self.external_config_dict
        check_protocol(external)
        loss = external.get("loss_type", self.internal_config_dict.get("loss_type"))
        if loss == "BPR" and external.get("train_neg_sample_args") is None:
            self.internal_config_dict["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
            if "train_neg_sample_args" in external:  # None, e.g. from the packaged overall.yaml: BPR needs one
                external["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}


def check_recbole_config(Config) -> None:
    """The two Config methods the defaults hook relies on exist (RecBole 1.2.1's)."""
    from . import RECBOLE_INSTALL

    for name in ("_load_internal_config_dict", "_update_internal_config_dict"):
        if not callable(getattr(Config, name, None)):
            raise ImportError(f"recbole.config.Config has no {name}: this RecBole is not the 1.2.1 that "
                              f"mamba4rec is built for ({RECBOLE_INSTALL})")
