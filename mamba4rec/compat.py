"""The few shims that make RecBole 1.2.1 run on today's torch, numpy and pandas, without ray.

Each entry says what breaks without it; tests/test_compat.py shows each failure it prevents.

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
"""

from __future__ import annotations

import hashlib
import os
import threading
import types
import warnings

#: (message, category, module) of the warnings RecBole 1.2.1 raises on every run that a user can
#: do nothing about: notes 6 and 9. Nothing else is filtered.
WARNING_FILTERS = (
    (r".*torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated.*", FutureWarning, ""),
    (r"The given NumPy array is not writable", UserWarning, r"recbole\.data\.dataset\.dataset$"),
)

_REGISTRY_LOCK = threading.Lock()
#: realpath -> sha256 of checkpoints written by a RecBole trainer in this process (or trusted).
_TRUSTED: dict[str, str] = {}
_INSTALLED = False


def _major(version: str) -> int:
    return int(version.split(".")[0])


def file_sha256(path) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints, data files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trust_checkpoint(path) -> None:
    """Allow RecBole's trainer to unpickle ``path`` (its current bytes) in this process.

    For a RecBole checkpoint you wrote yourself in an earlier run, before
    ``trainer.resume_checkpoint(path)`` or ``trainer.evaluate(..., model_file=path)``.
    If the file changes afterwards it is refused again.
    """
    real = os.path.realpath(os.fspath(path))
    if not os.path.isfile(real):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with _REGISTRY_LOCK:
        _TRUSTED[real] = file_sha256(real)


def is_trusted_checkpoint(path) -> bool:
    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:  # a file object, a buffer: never trusted implicitly
        return False
    with _REGISTRY_LOCK:
        digest = _TRUSTED.get(real)
    return digest is not None and os.path.isfile(real) and file_sha256(real) == digest


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
    path = os.fspath(f)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp, *args, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    trust_checkpoint(path)


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


def install() -> None:
    """Apply every shim once (called by ``import mamba4rec``)."""
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
    import_recbole_models()
    _INSTALLED = True
