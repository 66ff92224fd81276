"""One pipeline for every model: load data, train (resumable), evaluate.

Used by run_recbole.py, the benchmarks and the tests. Mamba4Rec and any RecBole model name
(SASRec, GRU4Rec, ...) go through the same code, configs and protocol. The model registry and
config building live in mamba4rec.registry; their names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import recbole
import yaml
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_trainer, init_logger, init_seed

from .defaults import CONFIG_DIR  # noqa: F401  (re-exported: where the configs are read)
from .model import Mamba4Rec
from .registry import (  # noqa: F401  (re-exported: `from mamba4rec.pipeline import build_config` etc.)
    BUNDLED_DATA, OUR_MODELS, _check_cmd_args, build_config, build_model, default_config_files, known_models,
    resolve_model, resolve_records)
from .causal import bucketed_forward, check_model, prefix_loss, sequence_loss, train_buckets
from .history import HistoryTrainDataLoader, WholeHistory, history_loss, resolve_history
from .resume import _resume, _save_last
from .sequence import SequenceTrainDataLoader, resolve_train_mode

logger = logging.getLogger(__name__)


def _downloadable() -> dict:
    path = Path(recbole.__file__).resolve().parent / "properties" / "dataset" / "url.yaml"
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def check_dataset_files(config) -> None:
    """Fail before any data work when the data set has no atomic files (unless RecBole can fetch it)."""
    name, folder = config["dataset"], config["data_path"]
    inter = os.path.join(folder, f"{name}.inter")
    if os.path.isfile(inter):
        return
    how = (f"Prepare it with: python datasets/prepare.py --format seq-text --input FILE "
           f"--dataset {name} --output-dir DIR (see docs/DATASETS.md), then pass --data_path=DIR; "
           f"or point --data_path at the folder that holds {name}/{name}.inter.")
    urls = _downloadable()
    if name in urls and not os.path.exists(folder):
        logger.warning("data set %r not found at %s: RecBole will download it from %s. Offline? %s",
                       name, folder, urls[name], how)
        return
    raise FileNotFoundError(f"data set {name!r}: no atomic file at {inter}. {how}")


@dataclass
class RunResult:
    model: str
    dataset: str
    best_valid_score: float
    best_valid_result: dict
    test_result: dict
    params: int
    epochs_run: int
    best_epoch: int | None
    train_seconds_per_epoch: float
    eval_seconds: float
    saved_model_file: str | None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The fields as plain Python values (JSON-ready: per-user arrays become lists)."""
        out = dict(self.__dict__)
        out["extra"] = {k: ({m: [float(x) for x in v] for m, v in val.items()} if k.startswith("per_user_test") else val)
                        for k, val in self.extra.items()}
        return out



def last_checkpoint_path(config) -> str:
    """Where run() keeps the resumable state after each epoch: <checkpoint_dir>/<model>-<dataset>-last.pth."""
    return os.path.join(config["checkpoint_dir"], f"{config['model']}-{config['dataset']}-last.pth")


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The hardware and stack this process trains on, in one line (a row's "machine")."""
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_name()}, {os.cpu_count()} cpus{gpu}, {platform.system()}, python {platform.python_version()}, "
            f"torch {torch.__version__}")


class _RunTrainer:
    """What run() adds to RecBole's trainer (mixed into the model's own trainer class by
    :func:`run_trainer`): the resumable ``-last.pth`` after every validated epoch, the per-epoch
    history (validation score, training seconds), sequence mode's loss, and one saving rank."""

    rank0 = True
    history: dict
    epoch = -1  # the last epoch started
    buckets = 1  # length buckets of a training batch (prefix mode, RecBole models: 1 = RecBole's own forward)
    mask_input = False  # evaluate with each user's input sequence ranked out (run()'s second test pass)
    record_machines = False  # record_machine_by_epoch: history["machines"], a row per stretch of epochs
    history_chunk = None  # train_mode=history: items per chunk (mamba4rec.history)
    whole_history = None  # eval_history=whole: a WholeHistory, which scores each user from all of it

    def batch_buckets(self):
        """The length buckets a training batch runs in (Mamba4Rec's forward: its own length_buckets)."""
        return getattr(self.model, "length_buckets", self.buckets)

    def track(self, train_data, last_path, train_mode):
        """Start recording; ``last_path`` None writes no -last.pth (saved=False, or not rank 0)."""
        if not hasattr(self, "history"):
            self.history = {"valid_scores": [], "train_seconds": []}  # (epoch, score); s per epoch
        if self.record_machines:  # [first epoch, machine(), threads] per stretch of training
            self.history.setdefault("machines", [])
        else:
            self.history.pop("machines", None)
        self.train_data, self.last_path, self.train_mode = train_data, last_path, train_mode
        self.first_epoch = self.start_epoch
        self.epoch = self.start_epoch - 1

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.last_path and epoch_idx > self.first_epoch:  # the previous epoch is trained and validated
            _save_last(self.last_path, self, self.model, self.train_data, epoch_idx - 1, self.history)
        self.epoch = epoch_idx
        if self.record_machines and epoch_idx == self.first_epoch:  # a stretch starts with the first epoch
            import torch  # trained on another machine (or with another number of threads)

            machines, here = self.history["machines"], [machine(), torch.get_num_threads()]
            if not machines or list(machines[-1][1:]) != here:
                machines.append([epoch_idx, *here])
        if loss_func is None and self.train_mode == "history":
            model, chunk = self.model, self.history_chunk

            def loss_func(interaction):
                return history_loss(model, interaction, chunk)
        elif loss_func is None and (self.train_mode == "sequence" or self.buckets != 1):
            model, buckets = self.model, self.buckets
            loss = sequence_loss if self.train_mode == "sequence" else prefix_loss

            def loss_func(interaction):
                return loss(model, interaction, buckets)
        t0 = time.perf_counter()
        out = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.history["train_seconds"].append(time.perf_counter() - t0)
        return out

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.history["valid_scores"].append((self.epoch, float(score)))
        return score, result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's evaluation, with a causal RecBole model's forward in the length buckets of its
        training batches (``buckets``): the same scores, without the padding after each history;
        with eval_history=whole, each user scored from the whole history (mamba4rec.history)."""
        import contextlib

        whole = self.whole_history
        with bucketed_forward(self.model, self.buckets), \
                (whole.scoring(self.model, eval_data.dataset) if whole else contextlib.nullcontext()):
            return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                    show_progress=show_progress)

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.mask_input:  # the items of each user's input sequence cannot be recommended
            seq = interaction[self.model.ITEM_SEQ].to(scores.device)
            scores.scatter_(1, seq, float("-inf"))  # its padding is item 0, -inf already
        return interaction, scores, positive_u, positive_i

    def _save_checkpoint(self, *args, **kwargs):
        if self.rank0:  # RecBole lets every node's local rank 0 save; one copy, rank 0's, is the checkpoint
            return super()._save_checkpoint(*args, **kwargs)
        return None


def run_trainer(trainer_class: type) -> type:
    """``trainer_class`` (RecBole's trainer for the model) with run()'s additions (:class:`_RunTrainer`)."""
    return type(f"Run{trainer_class.__name__}", (_RunTrainer, trainer_class), {})


def run(model="Mamba4Rec", dataset="ml-100k", config_files=None, config_dict=None, cmd_args=None,
        saved=True, config=None, config_class=Config, resume=None, export_path=None) -> RunResult:
    """Train ``model`` on ``dataset`` and evaluate the best checkpoint on the test split.

    After every epoch (once validated) the resumable state goes to last_checkpoint_path(config).
    ``resume``: a path to such a file, or "auto" for last_checkpoint_path(config) when it exists
    (else a fresh start). The result of a resumed run equals an uninterrupted run's: weights,
    metrics, epochs_run and best_epoch count every epoch, before and after the resume.
    ``export_path``: after evaluation, write the evaluated (best) Mamba4Rec and its item map
    there as a serving checkpoint (mamba4rec.serving.export_checkpoint; docs/STREAMING.md)."""
    model_class, model_name = resolve_model(model)
    if export_path is not None and not issubclass(model_class, Mamba4Rec):
        raise ValueError(f"export_path: only Mamba4Rec models can be exported for serving, not {model_name}")
    if config is None:
        config = build_config(model_class, dataset, config_files, config_dict, cmd_args,
                              config_class=config_class)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    log = logging.getLogger()
    log.info(config)
    check_dataset_files(config)
    last_path = last_checkpoint_path(config)
    if resume == "auto":
        resume = last_path if os.path.isfile(last_path) else None
        log.info("resume: %s", f"continuing from {last_path}" if resume else f"no {last_path} yet, starting at epoch 0")

    data = create_dataset(config)
    log.info(data)
    train_data, valid_data, test_data = data_preparation(config, data)
    train_mode, stride = resolve_train_mode(config)
    chunk, whole = resolve_history(config, model_class)
    if train_mode == "sequence":  # one pass per window of each user's history (mamba4rec.sequence)
        train_data = SequenceTrainDataLoader(config, train_data.dataset, train_data._sampler, stride)
        log.info("train_mode=sequence: %d windows (stride %d) train %d targets in %d steps an epoch",
                 len(train_data.windows), stride, train_data.n_targets, len(train_data))
    elif train_mode == "history":  # one pass over each user's whole history (mamba4rec.history)
        train_data = HistoryTrainDataLoader(config, train_data.dataset, train_data._sampler)
        log.info("train_mode=history: %d users train %d targets in %d steps an epoch (chunks of %d items)",
                 len(train_data.windows), train_data.n_targets, len(train_data), chunk)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = build_model(config, train_data.dataset, model_class)
    log.info(net)
    if train_mode == "sequence":
        check_model(net, config)  # refuses a model whose outputs are not its prefixes' outputs
    trainer = run_trainer(get_trainer(config["MODEL_TYPE"], config["model"]))(config, net)
    trainer.buckets = train_buckets(net, config, train_mode)  # prefix: a causal RecBole model's in buckets
    trainer.rank0 = _is_global_rank0(config)
    records = resolve_records(config)
    trainer.record_machines = records["record_machine_by_epoch"]
    trainer.history_chunk = chunk if train_mode == "history" else None
    if whole:
        trainer.whole_history = WholeHistory(train_data.dataset, valid_data.dataset, test_data.dataset, chunk)
    if resume:
        trainer.history = _resume(resume, trainer, net, train_data, log)
    trainer.track(train_data, last_path if saved and trainer.rank0 else None, train_mode)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    if trainer.last_path and trainer.epoch >= trainer.first_epoch:
        _save_last(last_path, trainer, net, train_data, trainer.epoch, trainer.history)
    private_copy = _share_best_checkpoint(trainer) if saved and not config["single_spec"] else None
    t0 = time.perf_counter()
    from .significance import recording

    try:
        with recording(config["topk"]) as per_user:  # RecBole's per-user values, for paired comparisons
            test_result = trainer.evaluate(test_data, load_best_model=saved,
                                           show_progress=config["show_progress"])
    finally:
        if private_copy:
            import shutil

            shutil.rmtree(private_copy, ignore_errors=True)
    eval_seconds = time.perf_counter() - t0
    best_valid_result, test_result = _plain(best_valid_result), _plain(test_result)
    log.info("best valid : %s", best_valid_result)
    log.info("test result: %s", test_result)
    masked = _masked_test(trainer, test_data, config, log) if records["test_input_masked"] else None
    # the learning curve: (epoch, valid score) per validation, train seconds per epoch (all epochs,
    # those before a resume included), and where they trained when recorded
    extra = {"per_user_test": per_user,
             "history": {"valid_scores": [[int(e), float(v)] for e, v in trainer.history["valid_scores"]],
                         "train_seconds": [float(t) for t in trainer.history["train_seconds"]]}}
    if trainer.record_machines:
        extra["history"]["machines"] = [list(m) for m in trainer.history.get("machines", [])]
    if masked is not None:
        extra["test_result_input_masked"], extra["per_user_test_input_masked"] = masked
    if export_path is not None and config["local_rank"] == 0:
        from .serving import export_checkpoint

        extra["export_path"] = export_checkpoint(net, train_data.dataset, export_path)
        log.info("serving checkpoint: %s", extra["export_path"])
    return RunResult(
        model=model_name,
        dataset=config["dataset"],
        best_valid_score=float(best_valid_score),
        best_valid_result=dict(best_valid_result),
        test_result=dict(test_result),
        params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        epochs_run=trainer.epoch + 1,
        best_epoch=_best_epoch(trainer.history["valid_scores"], config["valid_metric_bigger"], best_valid_score),
        train_seconds_per_epoch=sum(trainer.history["train_seconds"]) / max(len(trainer.history["train_seconds"]), 1),
        eval_seconds=eval_seconds,
        saved_model_file=trainer.saved_model_file if saved else None,
        extra=extra,
    )


def _masked_test(trainer, test_data, config, log):
    """With ``test_input_masked: True``: the test split once more, the same model, with each user's
    input sequence (the up to MAX_ITEM_LIST_LENGTH items before the target) ranked out: (result,
    per-user values), or None for a model without item sequences or a loader that does not rank
    every item.

    Not RecBole's protocol, which ranks every item but padding for a sequential model: a model that
    recommends what the user just took spends a slot on an item that, on data where nobody takes
    an item twice (Amazon 5-core, MovieLens ratings), is always a miss (docs/RESULTS.md)."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    from .significance import recording

    if not isinstance(test_data, FullSortEvalDataLoader) or not hasattr(trainer.model, "ITEM_SEQ"):
        return None
    trainer.mask_input = True
    try:
        with recording(config["topk"]) as per_user:
            result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    finally:
        trainer.mask_input = False
    result = _plain(result)
    log.info("test result, input sequence masked: %s", result)
    return result, per_user


def _plain(result) -> dict:
    """RecBole's metrics (numpy scalars, which numpy 2 prints as ``np.float64(...)``) as floats."""
    return {k: float(v) for k, v in result.items()}


def _is_global_rank0(config) -> bool:
    if config["single_spec"]:
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def _share_best_checkpoint(trainer) -> str | None:
    """Distributed: only global rank 0 saves; every rank then evaluates rank 0's best checkpoint
    (its file name carries rank 0's clock), trusted as this job's own. Ranks on nodes that do not
    see rank 0's file (no shared filesystem between the nodes) get its bytes over the process
    group and evaluate a private copy (its folder is returned, for removal after evaluation)."""
    import tempfile

    import torch.distributed as dist

    from . import compat

    name = [trainer.saved_model_file]
    dist.broadcast_object_list(name, src=0)
    path, folder = name[0], None
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.isfile(path))
    if not all(seen):
        payload = [Path(path).read_bytes() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        if not os.path.isfile(path):
            folder = tempfile.mkdtemp(prefix="mamba4rec-best-")
            path = os.path.join(folder, os.path.basename(name[0]))
            with open(path, "wb") as fh:
                fh.write(payload[0])
    dist.barrier()
    trainer.saved_model_file = path
    compat.trust_checkpoint(path)
    return folder


def _best_epoch(valid_scores, bigger_is_better=True, best_score=None):
    """The (0-based) epoch whose weights RecBole's early stopping keeps as the best checkpoint: the
    last epoch with the best validation score (recbole.utils.early_stopping counts a tie as an
    improvement, and the trainer saves the checkpoint again). None when unknown: no validation,
    or (a resume from a file without history) the best score was reached before the recorded epochs."""
    if not valid_scores:
        return None
    sign = 1.0 if bigger_is_better in (None, True) else -1.0
    best = max(valid_scores, key=lambda es: (sign * es[1], es[0]))
    if best_score is not None and abs(best[1] - float(best_score)) > 1e-12:
        return None
    return best[0]
