"""The model registry and config building: a model name or class -> its class, and a checked
RecBole Config for it on a data set, before any data work.

Mamba4Rec and every RecBole model name (SASRec, GRU4Rec, ...) resolve here and get their config
from the same files and priorities (docs/ARCHITECTURE.md, "Configs"). mamba4rec.pipeline
trains with them; mamba4rec.hyper and mamba4rec.compare check settings with them up front.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import recbole
import yaml
from recbole.config import Config

from .compat import recbole_argv
from .defaults import check_protocol
from .defaults import config_files as _packaged_config_files
from .model import Mamba4Rec, resolve_model_config
from .causal import resolve_buckets
from .history import resolve_history
from .sequence import resolve_train_mode

BUNDLED_DATA = Path(recbole.__file__).resolve().parent / "dataset_example"
OUR_MODELS = {"Mamba4Rec": Mamba4Rec}
_RECBOLE_MODEL_PACKAGES = ("general_recommender", "sequential_recommender",
                           "context_aware_recommender", "knowledge_aware_recommender")


def known_models() -> list[str]:
    """Mamba4Rec plus every model class RecBole ships (as RecBole's get_model finds them)."""
    from recbole.model.abstract_recommender import AbstractRecommender

    names = set(OUR_MODELS)
    for pkg in _RECBOLE_MODEL_PACKAGES:
        try:
            module = importlib.import_module(f"recbole.model.{pkg}")
        except Exception:  # an optional dependency missing: skip that family
            continue
        for info in pkgutil.iter_modules(module.__path__):
            for attr in dir(module):
                obj = getattr(module, attr)
                if (isinstance(obj, type) and issubclass(obj, AbstractRecommender)
                        and attr.lower() == info.name):
                    names.add(attr)
    return sorted(names, key=str.lower)


def resolve_model(model) -> tuple[type, str]:
    """A model class or name -> (class, name). Unknown names list the known ones."""
    if isinstance(model, type):
        return model, model.__name__
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a model class or name, got {model!r}")
    if model in OUR_MODELS:
        return OUR_MODELS[model], model
    from recbole.utils import get_model

    try:
        return get_model(model), model
    except (ValueError, AttributeError, ImportError):
        raise ValueError(
            f"unknown model {model!r}; known models: {', '.join(known_models())}"
        ) from None


def build_model(config, train_dataset, model_class=None):
    model_class = model_class or resolve_model(config["model"])[0]
    return model_class(config, train_dataset).to(config["device"])


def default_config_files(model_name: str, dataset: str) -> list[str]:
    """The packaged configs/overall.yaml, model/<model>.yaml, dataset/<dataset>.yaml and
    model/<model>/<dataset>.yaml, those that exist (mamba4rec.defaults.config_files); raises
    FileNotFoundError when the install lacks configs/ rather than dropping them."""
    return _packaged_config_files(model_name, dataset)


def _check_cmd_args(cmd_args) -> list[str]:
    cmd_args = list(cmd_args or [])
    for arg in cmd_args:
        if not (arg.startswith("--") and len(arg[2:].split("=")) == 2 and arg[2:].split("=")[0]):
            raise ValueError(f"override {arg!r} is not of the form --key=value (e.g. --epochs=5)")
    return cmd_args


def _file_config_value(files, key):
    value = None
    for f in files:
        with open(f) as fh:
            data = yaml.load(fh, Loader=yaml.FullLoader) or {}
        if key in data:
            value = data[key]
    return value


def build_config(model="Mamba4Rec", dataset="ml-100k", config_files=None, config_dict=None,
                 cmd_args=None, use_default_configs=True, config_class=Config) -> Config:
    """A RecBole Config for ``model`` on ``dataset``, validated before any data work.

    Files: configs/overall.yaml, configs/model/<model>.yaml, configs/dataset/<dataset>.yaml,
    then ``config_files`` (later wins); then ``config_dict``; then ``cmd_args`` ("--key=value",
    RecBole's command-line priority).
    """
    model_class, model_name = resolve_model(model)
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
    files = default_config_files(model_name, dataset) if use_default_configs else []
    for f in config_files or []:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"config file {f!r} does not exist")
        files.append(str(f))
    cmd_args = _check_cmd_args(cmd_args)
    config_dict = dict(config_dict or {})

    with recbole_argv(cmd_args):
        config = config_class(model=model_class, dataset=dataset, config_file_list=files or None,
                              config_dict=config_dict)
        # BPR needs a sampled negative; CE must have none. Give BPR RecBole's uniform 1:1
        # sampling unless the user chose a sampler.
        if (config["loss_type"] == "BPR" and not any(a.startswith("--train_neg_sample_args=") for a in cmd_args)
                and config_dict.get("train_neg_sample_args") is None
                and _file_config_value(files, "train_neg_sample_args") is None):
            config_dict["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
            config = config_class(model=model_class, dataset=dataset, config_file_list=files or None,
                                  config_dict=config_dict)
    check_protocol(config.external_config_dict)  # a partial eval_args would fall back to RecBole's split
    if model_class is Mamba4Rec or issubclass(model_class, Mamba4Rec):
        resolve_model_config(config)  # ValueError naming key, value and range
    resolve_train_mode(config)  # train_mode / sequence_stride: the same
    resolve_history(config, model_class)  # history_chunk / eval_history, and the models they can run
    resolve_buckets(config)  # length_buckets, for every model
    resolve_records(config)  # test_input_masked, record_machine_by_epoch: the same
    _resolve_data_path(config)
    check_output_folders(config)
    return config


#: the folders RecBole writes into, relative to the working directory (recbole.utils.logger and
#: get_tensorboard), besides the checkpoint_dir of the config
_RECBOLE_FOLDERS = ("log", "log_tensorboard")


def check_output_folders(config) -> None:
    """A file where RecBole makes a folder (``log``, ``log_tensorboard``, the checkpoint_dir;
    e.g. a shell redirect named ``log``) fails here, before any data work, instead of as a
    FileExistsError from inside RecBole after the data is loaded."""
    checkpoint_dir = str(config["checkpoint_dir"])
    for folder in (*_RECBOLE_FOLDERS, os.path.join("log", str(config["model"])), checkpoint_dir):
        parts = os.path.normpath(folder).split(os.sep)
        for i in range(1, len(parts) + 1):  # the folder or any folder above it
            path = os.sep.join(parts[:i]) or os.sep
            if os.path.exists(path) and not os.path.isdir(path):
                what = ("checkpoint_dir" if folder == checkpoint_dir else "its log folder")
                raise ValueError(
                    f"{os.path.abspath(path)!r} is a file, but RecBole writes {what} ({folder!r}) as a folder "
                    f"there: move or rename that file, or run from another working directory"
                    + (" (or set checkpoint_dir to another folder)" if folder == checkpoint_dir else ""))


#: what a run records beyond RecBole's, each off unless set True (configs/overall.yaml). They
#: change no training and no RecBole result, so a comparison resumed with another value of them
#: continues its rows (mamba4rec.compare.rows leaves them out of a row's settings).
RECORD_KEYS = {
    "test_input_masked": "after RecBole's test, test the same model again with each user's input "
                         "sequence ranked out",
    "record_machine_by_epoch": "record the machine and CPU threads of each stretch of training epochs "
                               "(in -last.pth and the learning curve)",
}


def resolve_records(config) -> dict:
    """{key: bool} of :data:`RECORD_KEYS`, validated: True or False (unset = False)."""
    found = {}
    for key, what in RECORD_KEYS.items():
        try:
            value = config[key]
        except KeyError:
            value = None
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is invalid: it must be True or False ({what}; default False).")
        found[key] = value
    return found


def _resolve_data_path(config) -> None:
    """ml-100k: the user's copy under data_path if there is one, else RecBole's bundled copy."""
    if config["dataset"] != "ml-100k":
        return
    user_root = config.external_config_dict.get("data_path") or config.internal_config_dict.get("data_path")
    user_dir = os.path.join(user_root or "dataset/", "ml-100k")
    if os.path.isfile(os.path.join(user_dir, "ml-100k.inter")):
        config["data_path"] = os.path.abspath(user_dir)
    else:
        config["data_path"] = str(BUNDLED_DATA / "ml-100k")

