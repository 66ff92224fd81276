"""The one door to RecBole: every change mamba4rec makes to RecBole's classes, modules or
process state is made in this module, and each is listed in :data:`PATCHES` (what, when, why,
the test that shows it; docs/ARCHITECTURE.md prints the same table, and
tests/test_compat.py fails if RecBole changes in a way the table lacks).

``import mamba4rec`` calls :func:`install` once (idempotent): the permanent changes below. The
temporary ones are context managers that put back what they changed: :func:`recbole_argv`,
:func:`metric_info_hook`, :func:`instance_attributes`. Each note says what breaks without it.

1. numpy 2. RecBole's ``Config.compatibility_settings`` assigns ``np.float = np.float_`` and
   friends (its metrics use ``np.float``), and ``np.float_`` no longer exists in numpy 2: every
   ``Config(...)`` would raise AttributeError. :func:`install_numpy2_fix` makes the same aliases
   from names numpy 2 keeps (``np.float64`` for ``np.float_``, ...). numpy 1 keeps RecBole's own.
2. pandas 3. RecBole fills missing values with ``df[field].fillna(..., inplace=True)`` on a
   column, which under copy-on-write (pandas 3's only mode) writes into a temporary copy and
   is lost: in ``Dataset._fill_nan`` (note 5) and, for sequence fields, in ``Dataset._load_feat``,
   where the NaN left in a ``token_seq``/``float_seq`` column then fails on ``.split``.
   :func:`install_seq_fillna_fix` gives that module a ``pd`` whose ``read_csv`` fills missing
   sequence values with "" itself (what the lost call meant to do). Sequence fields break in
   pandas 3 further on (``Series.agg(len)``, used to split them back per row, measures the whole
   column there), so under pandas 3 that ``read_csv`` refuses them with the fix; data sets of
   user, item, rating and time fields (all that Mamba4Rec and the baselines here use) load and
   train.
3. ray. RecBole 1.2.1 requires ray<=2.6.3, which has no wheel past Python 3.11 and is built
   against numpy 1; only ``recbole.quick_start`` imports it, and mamba4rec never does. So RecBole
   is installed without it (``pip install --no-deps``, see ``mamba4rec.RECBOLE_INSTALL``), and
   nothing here depends on ray, numpy 1 or ``pkg_resources``.
4. torch >= 2.6 loads with ``weights_only=True`` by default, and RecBole's checkpoints pickle the
   whole ``Config``: ``Trainer.evaluate(load_best_model=True)`` and ``resume_checkpoint`` fail for
   every model. :func:`install_checkpoint_shim` records the sha256 of every checkpoint the
   trainer writes in this process and lets RecBole's own ``torch.load`` call unpickle exactly those
   files (same path, same bytes) with ``weights_only=False``; any other file keeps torch's safe
   default. A checkpoint you wrote in an earlier process and trust can be opened explicitly with
   :func:`trust_checkpoint`.
5. RecBole's ``Dataset._fill_nan`` calls ``feat[field].fillna(..., inplace=True)``: pandas 2.2+
   warns on every load and, under copy-on-write (pandas 3's only mode, opt-in in 2.x), the
   fill is lost and NaN reaches the model. :func:`install_fill_nan_fix` assigns the filled
   column back instead (same values, no chained assignment).
6. RecBole 1.2.1 builds ``torch.cuda.amp.GradScaler`` at every ``fit``, which torch >= 2.4 flags
   with a FutureWarning on every run; that one message is filtered (nothing else is).
7. RecBole's ``AbstractTrainer`` wraps the model in ``DistributedDataParallel(model,
   device_ids=[local_rank])``, which torch rejects for CPU modules: distributed training on
   CPU-only machines (gloo) fails. :func:`install_ddp_cpu_fix` passes ``device_ids=None`` for
   modules whose parameters are on the CPU, and leaves GPU modules exactly as RecBole does.
8. RecBole's ``ensure_dir`` checks ``os.path.exists`` then calls ``os.makedirs``: two ranks
   creating ./log or the checkpoint folder at once crash with FileExistsError. The copies of
   that name inside RecBole's modules are replaced by ``os.makedirs(..., exist_ok=True)``.
9. pandas 3 (copy-on-write) hands out column ``.values`` read-only, and RecBole's
   ``Dataset._dataframe_to_interaction`` wraps them with ``torch.LongTensor(values)``, which
   shares the memory: torch warns once a run that the array is not writable. The DataFrame is
   dropped right after (the Interaction replaces it), so nothing else reads that memory; the
   warning, raised from that RecBole module only, is filtered (:data:`WARNING_FILTERS`).
10. Defaults of a model. RecBole's ``Config`` reads internal defaults for its own models only;
   ``Config._load_internal_config_dict`` also reads the files a model class names in
   ``default_config_files(dataset)`` (mamba4rec.defaults), so ``Config(model=Mamba4Rec, ...)``
   gets the paper's settings with no file of the user's.
11. Models by name. RecBole's ``get_model`` looks in its own model packages only and falls
   through to exlib_recommender, which fails without lightgbm: ``Config(model="Mamba4Rec")``,
   ``recbole.quick_start.run_recbole(model="Mamba4Rec")`` (and with the class: quick_start looks
   the name up again) failed with ModuleNotFoundError. The name ``get_model`` in RecBole's
   modules becomes one that knows this project's models and hands every other name to RecBole's.
12. Anomaly mode. RecBole's sine.py turns torch's anomaly detection on for the whole process
   at import (see :func:`import_recbole_models`); it is switched back to what it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import warnings
from typing import NamedTuple

from .files import atomic_path, file_sha256, is_trusted_checkpoint, trust_checkpoint  # noqa: F401  (API)

#: (message, category, module) of the warnings RecBole 1.2.1 raises on every run that a user can
#: do nothing about: notes 6 and 9. Nothing else is filtered.
WARNING_FILTERS = (
    (r".*torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated.*", FutureWarning, ""),
    (r"The given NumPy array is not writable", UserWarning, r"recbole\.data\.dataset\.dataset$"),
)

_INSTALLED = False


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _trainer_load(f, *args, **kwargs):
    """torch.load as RecBole's trainer calls it: full unpickling only for trusted files."""
    import torch

    if "weights_only" not in kwargs and is_trusted_checkpoint(f):
        kwargs["weights_only"] = False
    return torch.load(f, *args, **kwargs)


def _trainer_save(obj, f, *args, **kwargs):
    """torch.save for RecBole's trainer: write to a temporary file, then rename.

    A kill mid-write leaves the previous checkpoint intact; the written file is then trusted.
    """
    import torch

    if not isinstance(f, (str, os.PathLike)):
        return torch.save(obj, f, *args, **kwargs)
    with atomic_path(f) as tmp:
        torch.save(obj, tmp, *args, **kwargs)
    trust_checkpoint(f)


class _ModuleProxy(types.ModuleType):
    """A module as one RecBole module sees it: every attribute is the real module's, except
    those the subclass defines. Replaces one module's global name, never the module itself."""

    def __init__(self, module):
        super().__init__(module.__name__)
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


class _TorchForRecBoleTrainer(_ModuleProxy):
    """``torch`` as seen from recbole.trainer.trainer: everything is torch's, but load/save."""

    load = staticmethod(_trainer_load)
    save = staticmethod(_trainer_save)


def install_checkpoint_shim() -> None:
    """Route recbole.trainer.trainer's torch.load / torch.save through the functions above.

    Only that module's global name ``torch`` is replaced; torch itself is untouched, so no
    other code in the process gets weaker loading.
    """
    import torch
    import recbole.trainer.trainer as rb_trainer

    if not isinstance(rb_trainer.torch, _TorchForRecBoleTrainer):
        rb_trainer.torch = _TorchForRecBoleTrainer(torch)


def _fill_nan(self):
    """RecBole's Dataset._fill_nan, assigning the filled columns back (see note 5)."""
    import numpy as np
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x, dtype=dtype: np.array([], dtype=dtype) if isinstance(x, float) else x)


_RECBOLE_FILL_NAN = None  # RecBole's own, kept so a test can show what it does under CoW


def install_fill_nan_fix() -> None:
    global _RECBOLE_FILL_NAN
    from recbole.data.dataset import Dataset

    if Dataset._fill_nan is not _fill_nan:
        _RECBOLE_FILL_NAN = Dataset._fill_nan
        Dataset._fill_nan = _fill_nan


def _compatibility_settings(self):
    """RecBole's Config.compatibility_settings with numpy 2's names (see note 1): the same
    aliases for code written before numpy 1.20 (RecBole's metrics use ``np.float``)."""
    import numpy as np

    for old, new in (("bool", np.bool_), ("int", np.int_), ("float", np.float64), ("complex", np.complex128),
                     ("object", np.object_), ("str", np.str_), ("long", np.int_), ("unicode", np.str_)):
        setattr(np, old, new)


#: RecBole's atomic-file header types of sequence fields (``name:token_seq``)
_SEQ_TYPES = ("token_seq", "float_seq")


class _PandasForRecBoleDataset(_ModuleProxy):
    """``pandas`` as seen from recbole.data.dataset.dataset: everything is pandas', but
    read_csv also fills missing sequence values with "" (note 2)."""

    def read_csv(self, *args, **kwargs):
        pandas = self.__dict__["_module"]
        seq = [c for c in kwargs.get("usecols") or [] if isinstance(c, str) and c.rsplit(":", 1)[-1] in _SEQ_TYPES]
        if seq and _major(pandas.__version__) >= 3:
            raise ValueError(
                f"RecBole 1.2.1 cannot load the sequence field(s) {', '.join(seq)} under pandas "
                f"{pandas.__version__}: it measures each row with Series.agg(len), which pandas 3 applies "
                f"to the whole column. Install pandas<3 (pip install \"pandas<3\"), or leave these fields "
                f"out of load_col (Mamba4Rec needs only user, item and time).")
        df = pandas.read_csv(*args, **kwargs)
        for col in df.columns:
            if isinstance(col, str) and col.rsplit(":", 1)[-1] in _SEQ_TYPES and df[col].isna().any():
                df[col] = df[col].fillna("")
        return df


def install_seq_fillna_fix() -> None:
    import pandas
    import recbole.data.dataset.dataset as rb_dataset

    if not isinstance(rb_dataset.pd, _PandasForRecBoleDataset):
        rb_dataset.pd = _PandasForRecBoleDataset(pandas)


_RECBOLE_COMPATIBILITY_SETTINGS = None  # RecBole's own, kept so a test can show it fail


def install_numpy2_fix() -> None:
    global _RECBOLE_COMPATIBILITY_SETTINGS
    import numpy as np
    from recbole.config import Config

    if _RECBOLE_COMPATIBILITY_SETTINGS is None:
        _RECBOLE_COMPATIBILITY_SETTINGS = Config.compatibility_settings
    if _major(np.__version__) >= 2:
        Config.compatibility_settings = _compatibility_settings


def _ddp_for_recbole(module, device_ids=None, *args, **kwargs):
    from torch.nn.parallel import DistributedDataParallel

    first = next(module.parameters(), None)
    if first is not None and first.device.type == "cpu":
        device_ids = None
    return DistributedDataParallel(module, device_ids, *args, **kwargs)


def install_ddp_cpu_fix() -> None:
    import recbole.trainer.trainer as rb_trainer

    rb_trainer.DistributedDataParallel = _ddp_for_recbole


def _ensure_dir(dir_path):
    os.makedirs(dir_path, exist_ok=True)


def install_ensure_dir_fix() -> None:
    import sys

    import recbole.data.utils  # noqa: F401  (load every module that holds a copy of the name)
    import recbole.trainer.trainer  # noqa: F401
    import recbole.utils.logger  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name.startswith("recbole") and getattr(module, "ensure_dir", None) is not None \
                and getattr(module.ensure_dir, "__module__", "") == "recbole.utils.utils":
            module.ensure_dir = _ensure_dir


def install_config_defaults() -> None:
    """Note 10: RecBole's Config reads a model's ``default_config_files`` as internal defaults."""
    from recbole.config import Config

    from . import defaults

    defaults.check_recbole_config(Config)
    if Config._load_internal_config_dict is not defaults.load_internal_config_dict:
        defaults.RECBOLE_LOAD_INTERNAL = Config._load_internal_config_dict
        Config._load_internal_config_dict = defaults.load_internal_config_dict


_RECBOLE_GET_MODEL = None  # RecBole's own recbole.utils.utils.get_model


def get_model(model_name):
    """RecBole's ``get_model`` that also knows this project's models (note 11); a model class is
    returned as it is. Every other name goes to RecBole's own lookup, errors included."""
    if isinstance(model_name, type):
        return model_name
    from .registry import OUR_MODELS

    if model_name in OUR_MODELS:
        return OUR_MODELS[model_name]
    try:
        return _RECBOLE_GET_MODEL(model_name)
    except ModuleNotFoundError:
        # RecBole looks in exlib_recommender last, and importing it needs lightgbm and xgboost:
        # for a name of no model that error would hide RecBole's own message
        import importlib.util

        exlib = importlib.util.find_spec("recbole.model.exlib_recommender")
        if any(os.path.isfile(os.path.join(d, f"{str(model_name).lower()}.py"))
               for d in exlib.submodule_search_locations or []):
            raise
        raise ValueError(f"`model_name` [{model_name}] is not the name of an existing model.") from None


def install_get_model() -> None:
    """Give every loaded RecBole module that imported ``get_model`` this one (note 11). A module
    loaded later (``recbole.quick_start``) imports it from ``recbole.utils``, which has it."""
    global _RECBOLE_GET_MODEL
    import recbole.utils.utils as rb_utils

    if _RECBOLE_GET_MODEL is None:
        _RECBOLE_GET_MODEL = rb_utils.get_model
    for name, module in list(sys.modules.items()):
        if name.startswith("recbole") and getattr(module, "get_model", None) is _RECBOLE_GET_MODEL:
            module.get_model = get_model


_ARGV_LOCK = threading.RLock()


@contextlib.contextmanager
def recbole_argv(cmd_args):
    """Temporary: ``sys.argv`` holds exactly ``cmd_args`` while the block runs. RecBole's Config
    reads ``--key=value`` overrides from ``sys.argv`` itself, which in-process use (a caller's
    own argv, tests, searches) must not leak into."""
    with _ARGV_LOCK:
        saved = sys.argv
        sys.argv = [saved[0] if saved else "mamba4rec", *cmd_args]
        try:
            yield
        finally:
            sys.argv = saved


_METRIC_LOCK = threading.RLock()


@contextlib.contextmanager
def metric_info_hook(classes, on_result):
    """Temporary: while the block runs, each RecBole metric class in ``classes`` reports what its
    ``metric_info`` returns (the per-user values behind the mean) to ``on_result(cls, result)``.
    RecBole keeps only the means; paired intervals need the per-user values."""
    with _METRIC_LOCK:
        own = {cls: cls.__dict__.get("metric_info") for cls in classes}  # None: inherited
        for cls in classes:
            def metric_info(self, *args, _inner=cls.metric_info, _cls=cls):
                result = _inner(self, *args)
                on_result(_cls, result)
                return result

            cls.metric_info = metric_info
        try:
            yield
        finally:
            for cls, inner in own.items():
                if inner is None:
                    del cls.metric_info
                else:
                    cls.metric_info = inner


@contextlib.contextmanager
def instance_attributes(obj, **attrs):
    """Temporary: set attributes on one object (a RecBole model instance: its ``forward``, its
    ``gather_indexes``) for the duration, putting back an instance attribute that was there.
    Its class, and every other instance, are untouched."""
    saved = {k: obj.__dict__[k] for k in attrs if k in obj.__dict__}
    try:
        for k, v in attrs.items():
            object.__setattr__(obj, k, v)
        yield
    finally:
        for k in attrs:
            if k in saved:
                object.__setattr__(obj, k, saved[k])
            else:
                obj.__dict__.pop(k, None)


def import_recbole_models() -> None:
    """Import RecBole's sequential models with torch's anomaly detection left as it was.

    RecBole 1.2.1's sine.py calls ``torch.autograd.set_detect_anomaly(True)`` at import, and any
    model lookup (``get_model``, which imports the package) runs it: from then on every autograd
    op records a traceback and every backward checks each gradient for NaN, in every training of
    the process, whatever the model (a Mamba4Rec training batch of Amazon Beauty's shape took
    1.19x as long). Importing the package here first, once, keeps a user's own setting."""
    import torch

    enabled = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(enabled)


class Patch(NamedTuple):
    """One change to RecBole: ``target`` is ``module:attribute`` or ``module:Class.attribute``
    (``*``: any module); ``when`` "import" (made by :func:`install`, kept) or "temporary" (a
    context manager here); ``note``: this docstring's note (0: the context manager's); ``test``."""

    target: str
    when: str
    note: int
    test: str


#: Every change to RecBole (docs/ARCHITECTURE.md has the table with what each does and why);
#: tests/test_compat.py checks that ``import mamba4rec`` changes exactly the "import" targets.
PATCHES = (
    Patch("recbole.config.configurator:Config.compatibility_settings", "import", 1,
          "test_config_builds_without_the_aliases_numpy2_removed"),
    Patch("recbole.data.dataset.dataset:pd", "import", 2, "test_missing_sequence_values_load_under_copy_on_write"),
    Patch("recbole.trainer.trainer:torch", "import", 4, "test_trainer_checkpoints_load_but_foreign_pickles_do_not"),
    Patch("recbole.data.dataset.dataset:Dataset._fill_nan", "import", 5, "test_fill_nan_survives_copy_on_write"),
    Patch("recbole.trainer.trainer:DistributedDataParallel", "import", 7, "tests/test_distributed.py"),
    Patch("recbole.*:ensure_dir", "import", 8, "tests/test_distributed.py"),
    Patch("recbole.config.configurator:Config._load_internal_config_dict", "import", 10, "tests/test_defaults.py"),
    Patch("recbole.*:get_model", "import", 11, "test_recbole_finds_mamba4rec_by_name"),
    Patch("torch.autograd:anomaly mode", "import", 12,
          "test_importing_recbole_models_leaves_anomaly_detection_as_it_was"),
    Patch("warnings:filters", "import", 9, "test_a_run_prints_plain_metrics_and_no_warning_a_user_cannot_act_on"),
    Patch("sys:argv", "temporary", 0, "test_temporary_patches_are_put_back"),
    Patch("recbole.evaluator.metrics:Hit.metric_info", "temporary", 0, "test_temporary_patches_are_put_back"),
    Patch("<a model instance>:forward", "temporary", 0, "test_temporary_patches_are_put_back"),
)


def install() -> None:
    """Make every "import" change of :data:`PATCHES` once (called by ``import mamba4rec``)."""
    global _INSTALLED
    if _INSTALLED:
        return
    for message, category, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    install_numpy2_fix()
    install_checkpoint_shim()
    install_fill_nan_fix()
    install_seq_fillna_fix()
    install_ddp_cpu_fix()
    install_ensure_dir_fix()
    install_config_defaults()
    import_recbole_models()
    install_get_model()
    _INSTALLED = True
