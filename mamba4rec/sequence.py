"""Sequence-level training: each user's training history runs through the model once.

RecBole's protocol (``train_mode: prefix``) turns a user with training items x_0 .. x_{m-1}
into m - 1 samples, one per target x_t, each holding the last MAX_ITEM_LIST_LENGTH (L) items
before it, and runs the model over every one: O(sum over targets of min(t, L)) positions.
For a causal model the output at position j of a sequence *is* the output of the prefix
sample that ends at j, so ``train_mode: sequence`` runs the model once over a window of the
sequence and takes the loss at every position against the next item.

Windows (per user, L = MAX_ITEM_LIST_LENGTH, S = ``sequence_stride``, default L // 2):

* the first window holds x_0 .. x_{L-1} (x_0 .. x_{m-2} when shorter) and trains the targets
  x_1 .. x_L: each sees exactly the history the prefix protocol gives it;
* each further window ends S targets later, holds the L items before its last target, and
  trains only its targets not trained before: each of those has at least L - S + 1 items of
  history (the prefix protocol gives L). ``sequence_stride: 1`` makes every window one target
  long, so every target sees exactly its prefix sample's history: the exact setting.

Every training target of the prefix protocol is trained exactly once per epoch.
``train_batch_size`` counts targets, as it counts samples in prefix mode: the shuffled windows
are cut into batches of exactly that many targets (a window may be split across two batches),
so steps per epoch and targets per step equal the protocol's. Each step runs its windows in
length buckets, each padded only to its longest window.

Which models: any RecBole sequential model whose ``forward(item_seq, item_seq_len)`` ends by
reading its per-position output through ``gather_indexes`` and is causal. The per-position
output is had by letting ``gather_indexes`` return the whole output for the duration of a
call (a model may instead define ``sequence_output(item_seq, item_seq_len)``, as Mamba4Rec
does), and the model's own ``calculate_loss`` then computes the loss over the targets (CE over
all items, or BPR with one sampled negative per target), unchanged. :func:`check_model` probes
this before any training: a model whose outputs are not its prefixes' outputs is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import torch
from recbole.data.interaction import Interaction

from .checks import int_in
from .compat import instance_attributes

TRAIN_MODES = ("prefix", "sequence")
#: batches of models without a ``length_buckets`` attribute of their own run in this many buckets
DEFAULT_BUCKETS = 4
# fields of a sequence batch that only this module reads: target -> (row, position, user, index)
ROW, POS, USER, INDEX = "_seq_row", "_seq_pos", "_seq_user", "_seq_index"
logger = logging.getLogger(__name__)


def _get(config, key):
    try:
        return config[key]
    except KeyError:
        return None


def resolve_train_mode(config) -> tuple[str, int | None]:
    """(train_mode, stride) from a config, validated; stride is None in prefix mode.

    Raises ValueError naming the key, the value and what is allowed. Called before any data work.
    """
    mode = _get(config, "train_mode")
    mode = "prefix" if mode is None else mode
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode={mode!r} is invalid: it must be one of {', '.join(TRAIN_MODES)} "
                         f"(prefix: RecBole's protocol, one sample per target; sequence: one pass per "
                         f"window of a user's history). Set --train_mode=sequence or leave it out.")
    stride = _get(config, "sequence_stride")
    max_len = _get(config, "MAX_ITEM_LIST_LENGTH")
    if stride is None:
        return mode, (max(1, int(max_len) // 2) if mode == "sequence" else None)
    if not int_in(stride, 1, max_len):
        raise ValueError(f"sequence_stride={stride!r} is invalid: it must be an integer from 1 to "
                         f"MAX_ITEM_LIST_LENGTH ({max_len}); 1 trains every target on exactly its prefix "
                         f"sample's history, the default ({max(1, int(max_len) // 2)}) is L // 2.")
    return mode, (int(stride) if mode == "sequence" else None)


# ---- windows -------------------------------------------------------------------------------

def user_sequences(dataset) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user ids, training item sequences) rebuilt from RecBole's prefix samples.

    RecBole's augmented training set holds, per user and in time order, one sample per target;
    the sequence is the first sample's history item followed by every target. Checked on the
    way: each sample's last history item must be the previous target."""
    feat = dataset.inter_feat
    uid = feat[dataset.uid_field].numpy()
    target = feat[dataset.iid_field].numpy()
    lists = feat[dataset.item_id_list_field].numpy()
    lengths = feat[dataset.item_list_length_field].numpy()
    if len(uid) == 0:
        return np.zeros(0, dtype=np.int64), []
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    ends = np.r_[starts[1:], len(uid)]
    if len(np.unique(uid[starts])) != len(starts):
        raise ValueError("train_mode=sequence: the training samples are not grouped by user, so the "
                         "users' sequences cannot be rebuilt (RecBole sorts them by user and time)")
    last_history = lists[np.arange(len(uid)), lengths - 1]
    follows = np.r_[False, last_history[1:] == target[:-1]]
    follows[starts] = True
    if not follows.all() or (lengths[starts] != 1).any():
        raise ValueError("train_mode=sequence: the training samples are not the prefixes of one "
                         "sequence per user in time order (eval_args order must be TO, and the data "
                         "set RecBole's own augmented one)")
    seqs = [np.r_[lists[s, 0], target[s:e]].astype(np.int64) for s, e in zip(starts, ends)]
    return uid[starts].astype(np.int64), seqs


def window_spans(m: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of one training sequence of m items: (start, length, new targets).

    A window holds items [start, start + length) and trains the targets at its last ``new``
    positions (targets item[start + j + 1]); together they train targets 1 .. m-1 once each."""
    if m < 2:
        return []
    first = min(max_len, m - 1)
    spans = [(0, first, first)]
    end = first  # index of the last target trained so far
    while end < m - 1:
        new_end = min(end + stride, m - 1)
        spans.append((new_end - max_len, max_len, new_end - end))
        end = new_end
    return spans


class Windows:
    """Every window of every user as padded arrays (built once, read every epoch)."""

    def __init__(self, users, seqs, max_len, stride):
        spans = [(u, s, w, k) for u, seq in enumerate(seqs) for s, w, k in window_spans(len(seq), max_len, stride)]
        n = len(spans)
        self.user = np.zeros(n, dtype=np.int64)     # user id (RecBole's internal id)
        self.first = np.zeros(n, dtype=np.int64)    # index in the user's sequence of the window's first target
        self.length = np.zeros(n, dtype=np.int64)
        self.new = np.zeros(n, dtype=np.int64)      # targets trained by this window: its last `new` positions
        self.items = np.zeros((n, max_len), dtype=np.int64)
        self.targets = np.zeros((n, max_len), dtype=np.int64)
        for i, (u, s, w, k) in enumerate(spans):
            seq = seqs[u]
            self.user[i], self.first[i], self.length[i], self.new[i] = users[u], s + 1, w, k
            self.items[i, :w] = seq[s:s + w]
            self.targets[i, :w] = seq[s + 1:s + w + 1]
        self.n_targets = int(self.new.sum())

    def __len__(self):
        return len(self.new)


def plan_batches(windows: Windows, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut the windows, in ``order``, into batches of ``batch_size`` targets (the last may be
    short). Each batch is an int64 array of (window, lo, hi) rows: the window's new-target
    positions lo .. hi-1 counted from its first new target."""
    new = windows.new[order]
    ends = np.cumsum(new)
    starts = ends - new
    total = int(ends[-1]) if len(ends) else 0
    batches = []
    for b0 in range(0, total, batch_size):
        b1 = min(b0 + batch_size, total)
        i0 = int(np.searchsorted(ends, b0, side="right"))
        i1 = int(np.searchsorted(starts, b1, side="left"))
        lo = np.maximum(b0 - starts[i0:i1], 0)
        hi = np.minimum(b1 - starts[i0:i1], new[i0:i1])
        batches.append(np.stack([order[i0:i1], lo, hi], axis=1))
    return batches


class _EpochSampler:
    """What RecBole's trainer calls on a distributed loader (set_epoch); the order itself comes
    from the loader's seeded generator, identical on every rank."""

    def set_epoch(self, epoch):
        pass


class SequenceTrainDataLoader:
    """Training batches of windows (see the module docstring), iterable as RecBole's trainer
    iterates its TrainDataLoader. The window order is drawn each epoch from ``generator``
    (seeded with ``seed``; run()'s resumable checkpoint saves its state)."""

    def __init__(self, config, dataset, sampler=None, stride=None):
        self.config = config
        self._dataset = dataset
        self._sampler = sampler
        self.shuffle = True
        self.max_len = int(config["MAX_ITEM_LIST_LENGTH"])
        self.stride = stride or resolve_train_mode(config)[1] or max(1, self.max_len // 2)
        self.batch_size = int(config["train_batch_size"])
        self.generator = torch.Generator()
        self.generator.manual_seed(config["seed"])
        self.sampler = _EpochSampler()
        self.world_size = 1 if config["single_spec"] else int(config["world_size"])
        self.rank = 0 if config["single_spec"] else torch.distributed.get_rank()
        neg = config["train_neg_sample_args"] or {}
        self.negatives = neg.get("distribution", "none") != "none" and neg.get("sample_num", "none") != "none"
        if self.negatives:
            if neg.get("dynamic", False) or int(neg.get("sample_num", 1)) != 1 or sampler is None:
                raise ValueError(f"train_mode=sequence takes one uniform or popularity negative per target "
                                 f"(train_neg_sample_args sample_num 1, not dynamic), not {neg}")
        if config["transform"]:
            raise _refuse(config["model"], f"its batches need RecBole's transform {config['transform']!r}, "
                                           f"which sequence mode does not apply to its windows")
        users, seqs = user_sequences(dataset)
        self.windows = Windows(users, seqs, self.max_len, self.stride)
        self.n_targets = self.windows.n_targets
        # per rank and step: batch_size // world_size targets, as RecBole's DistributedSampler
        self.step = max(1, self.batch_size // self.world_size)
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.item_seq_field = dataset.item_id_list_field
        self.item_len_field = dataset.item_list_length_field
        self.neg_item_field = config["NEG_PREFIX"] + self.iid_field
        self.n_buckets = DEFAULT_BUCKETS

    @property
    def dataset(self):
        return self._dataset

    def __len__(self):
        chunks = math.ceil(self.n_targets / self.step)
        return math.ceil(chunks / self.world_size)

    def __iter__(self):
        order = torch.randperm(len(self.windows), generator=self.generator).numpy()
        chunks = plan_batches(self.windows, order, self.step)
        steps = len(self)
        for s in range(steps):
            i = s * self.world_size + self.rank
            # every rank takes as many steps (a distributed step waits for all); a rank short of
            # a chunk in the last step repeats the epoch's first, as DistributedSampler pads
            yield self.collate(chunks[i] if i < len(chunks) else chunks[0])

    def collate(self, pieces: np.ndarray) -> Interaction:
        w = self.windows
        win, lo, hi = pieces[:, 0], pieces[:, 1], pieces[:, 2]
        length = w.length[win]
        width = int(length.max())
        counts = hi - lo
        row = np.repeat(np.arange(len(win)), counts)
        # position of each target in its row: length - new + lo + (0 .. count-1)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = np.repeat(length - w.new[win] + lo, counts) + offsets
        target = w.targets[win[row], pos]
        data = {
            self.item_seq_field: torch.from_numpy(w.items[win, :width]),
            self.item_len_field: torch.from_numpy(length),
            self.iid_field: torch.from_numpy(target),
            ROW: torch.from_numpy(row), POS: torch.from_numpy(pos),
            USER: torch.from_numpy(w.user[win][row]), INDEX: torch.from_numpy(w.first[win][row] + pos),
        }
        if self.negatives:
            neg = self._sampler.sample_by_user_ids(data[USER].numpy(), data[self.iid_field].numpy(), 1)
            data[self.neg_item_field] = torch.as_tensor(neg, dtype=torch.long).reshape(-1)
        return Interaction(data)


# ---- the model side ------------------------------------------------------------------------

def sequence_output(model, item_seq, item_seq_len) -> torch.Tensor:
    """The model's output at every position, [B, L', H] (L' <= item_seq's width: Mamba4Rec
    trims it to the longest sequence).

    ``model.sequence_output`` when the model has one; otherwise its ``forward`` with
    ``gather_indexes`` returning the whole output it was given."""
    own = getattr(type(model), "sequence_output", None)
    if own is not None:
        return model.sequence_output(item_seq, item_seq_len)
    with instance_attributes(model, gather_indexes=lambda output, gather_index: output):
        return type(model).forward(model, item_seq, item_seq_len)


def length_buckets(lengths: torch.Tensor, n_buckets: int) -> list:
    """The rows of a batch in up to ``n_buckets`` groups of similar length (indices, sorted by
    length, stable; equal counts; none empty). A causal model run over each group cut at its
    longest row gives the outputs it gives over the whole padded batch, for less work. The one
    bucketing: Mamba4Rec's forward (its ``length_buckets``) and :func:`target_output` (RecBole's
    causal models, and sequence batches) both use it."""
    order = torch.argsort(lengths, stable=True)
    return [idx for idx in torch.tensor_split(order, max(1, min(int(n_buckets), len(order)))) if len(idx)]


def target_output(model, interaction, n_buckets=DEFAULT_BUCKETS) -> torch.Tensor:
    """The model's output at each target of a sequence batch, [T, H], in the batch's target
    order. The rows run in up to ``n_buckets`` length buckets, each cut at its longest row."""
    item_seq = interaction[model.ITEM_SEQ]
    item_len = interaction[model.ITEM_SEQ_LEN]
    row, pos = interaction[ROW], interaction[POS]
    n_buckets = max(1, min(int(getattr(model, "length_buckets", n_buckets)), item_seq.shape[0]))
    if n_buckets == 1:
        full = sequence_output(model, item_seq[:, :int(item_len.max())], item_len)
        return full[row, pos]
    parts = length_buckets(item_len, n_buckets)
    bucket = torch.empty_like(item_len)
    local = torch.empty_like(item_len)  # a row's index inside its bucket
    for b, idx in enumerate(parts):
        bucket[idx] = b
        local[idx] = torch.arange(len(idx), device=idx.device)
    out = None
    for b, idx in enumerate(parts):
        sel = torch.nonzero(bucket[row] == b).reshape(-1)
        if len(sel) == 0:
            continue
        full = sequence_output(model, item_seq[idx, :int(item_len[idx].max())], item_len[idx])
        part = full[local[row[sel]], pos[sel]]
        if out is None:
            out = part.new_empty(len(row), part.shape[-1])
        out[sel] = part
    return out


def sequence_loss(model, interaction, n_buckets=DEFAULT_BUCKETS):
    """The model's own ``calculate_loss`` over every target of a sequence batch: its ``forward``
    answers, for this call, with the outputs at the targets, once, for the batch's own items (a
    loss that runs forward again, say on a second dropout view, would get the same outputs, so it
    is refused)."""
    return _loss_with(model, interaction, target_output(model, interaction, n_buckets))


def prefix_loss(model, interaction, n_buckets=DEFAULT_BUCKETS):
    """The model's own ``calculate_loss`` on a batch of RecBole's prefix samples (train_mode
    prefix), its forward run in up to ``n_buckets`` length buckets, each cut at its longest
    sample, instead of over the batch padded to MAX_ITEM_LIST_LENGTH.

    The samples, batches and loss are the protocol's; only the padding after each sample's last
    item is not computed. For a causal model (:func:`check_model`) a sample's output at its last
    item does not depend on that padding, so the loss and its gradient are the padded forward's
    (tests/test_sequence.py checks SASRec and GRU4Rec against their own calculate_loss)."""
    item_len = interaction[model.ITEM_SEQ_LEN]
    if int(item_len.min()) == int(item_len.max()) == interaction[model.ITEM_SEQ].shape[1]:
        return model.calculate_loss(interaction)  # no padding to leave out
    try:
        return _loss_with(model, interaction, last_output(model, interaction[model.ITEM_SEQ], item_len, n_buckets))
    except NotSequenceTrainable:  # a loss that runs forward twice (only when training): the padded batch
        return model.calculate_loss(interaction)


def last_output(model, item_seq, item_seq_len, n_buckets=DEFAULT_BUCKETS) -> torch.Tensor:
    """What a causal model's ``forward(item_seq, item_seq_len)`` returns (its output at each row's
    last item, [B, H]), computed in up to ``n_buckets`` length buckets, each cut at its longest
    row, instead of over the batch padded to its width (:func:`target_output`, one target a row)."""
    if int(item_seq_len.min()) == item_seq.shape[1]:  # no padding to leave out
        return type(model).forward(model, item_seq, item_seq_len)
    rows = torch.arange(len(item_seq_len), device=item_seq_len.device)
    view = Interaction({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: item_seq_len, ROW: rows, POS: item_seq_len - 1})
    return target_output(model, view, n_buckets)


@contextlib.contextmanager
def bucketed_forward(model, n_buckets):
    """For the duration, ``model.forward`` runs in ``n_buckets`` length buckets (:func:`last_output`):
    run() evaluates a causal RecBole model this way (full_sort_predict calls forward), with the
    buckets its training batches use. 1: the model's own forward, untouched."""
    if n_buckets <= 1:
        yield
        return

    def forward(item_seq, item_seq_len):
        return last_output(model, item_seq, item_seq_len, n_buckets)

    with instance_attributes(model, forward=forward):
        yield


def train_buckets(model, config, train_mode) -> int:
    """The length buckets a training batch of ``model`` runs in under ``train_mode`` (run() and
    the benchmarks): 1 for a model that buckets in its own forward (Mamba4Rec's
    ``length_buckets``); else in sequence mode ``length_buckets``, in prefix mode
    :func:`prefix_buckets`."""
    if train_mode == "sequence":
        return 1 if hasattr(model, "length_buckets") else resolve_buckets(config)
    return prefix_buckets(model, config)


def prefix_buckets(model, config) -> int:
    """The length buckets a prefix batch of ``model`` trains in (what run() and the benchmarks use):
    ``length_buckets`` (:func:`resolve_buckets`) for a RecBole sequential model that passes
    :func:`check_model`; 1 (the batch padded to L, as RecBole runs it) for any other model, logged,
    and for a model that buckets in its own forward (Mamba4Rec's ``length_buckets``)."""
    from recbole.model.abstract_recommender import SequentialRecommender

    buckets = resolve_buckets(config)
    if buckets == 1 or hasattr(model, "length_buckets") or not isinstance(model, SequentialRecommender):
        return 1
    try:
        check_model(model, config)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe: train as RecBole does
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        logger.info("length_buckets: %s's prefix batches run padded to MAX_ITEM_LIST_LENGTH, as RecBole runs "
                    "them: %s", type(model).__name__, reason)
        return 1
    return buckets


def resolve_buckets(config) -> int:
    """``length_buckets`` for any model (Mamba4Rec reads it as its own key; for RecBole's models
    it sets how train_mode prefix and sequence run each batch), validated: an integer >= 1, 1 =
    one bucket (in prefix mode: RecBole's own forward over the padded batch)."""
    value = _get(config, "length_buckets")
    if value is None:
        return DEFAULT_BUCKETS
    if not int_in(value, 1):
        raise ValueError(f"length_buckets={value!r} is invalid: it must be an integer >= 1 (the number of "
                         f"length buckets each training batch runs in; 1 = off, default {DEFAULT_BUCKETS}).")
    return int(value)


def _loss_with(model, interaction, outputs):
    """``model.calculate_loss(interaction)`` with its forward answering ``outputs``, once."""
    calls = []

    def forward(item_seq, item_seq_len):
        calls.append(1)
        if len(calls) > 1 or item_seq is not interaction[model.ITEM_SEQ]:
            raise NotSequenceTrainable(
                f"train_mode=sequence cannot train {type(model).__name__}: its calculate_loss runs forward "
                f"{'more than once' if len(calls) > 1 else 'on items other than the batch'}, which sequence "
                f"mode cannot answer. Train it with train_mode=prefix (the default).")
        return outputs

    with instance_attributes(model, forward=forward):
        return model.calculate_loss(interaction)


class NotSequenceTrainable(ValueError):
    """The model cannot train with train_mode=sequence (not causal, or not read through gather_indexes)."""


def _refuse(name, why):
    exc = NotSequenceTrainable(
        f"train_mode=sequence cannot train {name}: {why}. Sequence mode runs a model once over a "
        f"window and reads its output at every position, which equals the prefix protocol only for "
        f"a causal model whose forward(item_seq, item_seq_len) ends with gather_indexes (Mamba4Rec, "
        f"SASRec, GRU4Rec, ...). Train {name} with train_mode=prefix (the default).")
    exc.reason = why
    return exc


def check_model(model, config=None, n_rows=3, tol=1e-4) -> None:
    """Refuse, before any training, a model for which sequence mode would not equal prefix mode.

    The probe (eval mode, no gradient, its own random items, the model's RNG untouched): the
    output at position t of a sequence, read through :func:`sequence_output`, must equal the
    model's own forward on the prefix ending at t, for every t of a few sequences, and one
    sequence batch must go through the model's calculate_loss."""
    name = type(model).__name__
    max_len = int(getattr(model, "max_seq_length", 0) or (config["MAX_ITEM_LIST_LENGTH"] if config else 0))
    n_items = int(getattr(model, "n_items", 0))
    if max_len < 2 or n_items < 3:
        raise _refuse(name, "it is not a RecBole sequential model (no max_seq_length / n_items)")
    _probe(model, config, name, max_len, n_items, n_rows, tol)
    # a path that is dead at the fresh init (a zero-initialised gate or projection) shows only
    # away from it: the same probe on a copy with perturbed weights
    import copy

    shaken = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(54321)
    with torch.no_grad():
        for p in shaken.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 0.1)
    _probe(shaken, config, name, max_len, n_items, n_rows, tol)


def _probe(model, config, name, max_len, n_items, n_rows, tol):
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(12345)
    L = min(max_len, 16)
    lengths = torch.tensor([L, max(2, L // 2 + 1), 2][:n_rows])
    seq = torch.randint(1, n_items, (len(lengths), L), generator=gen)
    seq[torch.arange(L)[None] >= lengths[:, None]] = 0
    seq, lengths = seq.to(device), lengths.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                full = sequence_output(model, seq, lengths)
            except Exception as exc:  # shapes that only work for one position per row
                raise _refuse(name, f"its forward fails when gather_indexes returns every position "
                                    f"({type(exc).__name__}: {exc})") from None
            if full.dim() != 3 or tuple(full.shape[:2]) != tuple(seq.shape):
                raise _refuse(name, f"its forward does not return its per-position output through "
                                    f"gather_indexes (got shape {tuple(full.shape)} for items of shape "
                                    f"{tuple(seq.shape)})")
            width = seq.shape[1]
            # every position, read as training reads it (length buckets, each cut at its longest row)
            row = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths.tolist())]).to(device)
            pos = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)
            got_all = target_output(model, Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths,
                                                        ROW: row, POS: pos}))
            for t in range(L):
                rows = torch.nonzero(lengths > t).reshape(-1)
                prefix = seq[rows].clone()
                prefix[:, t + 1:] = 0
                ref = model.forward(prefix, torch.full_like(lengths[rows], t + 1))
                got = got_all[pos == t]
                scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
                if ref.shape != got.shape or not torch.allclose(got, ref, atol=tol * scale, rtol=1e-3):
                    gap = (got - ref).abs().max().item() if ref.shape == got.shape else float("nan")
                    raise _refuse(name, f"its output at position {t} of a {width}-item sequence differs "
                                        f"from its output on the prefix ending there (max gap {gap:.3g}): "
                                        f"it reads later items (not causal)")
            probe = _probe_batch(model, seq, lengths, config)
            try:
                loss = sequence_loss(model, probe)
            except Exception as exc:
                raise _refuse(name, f"its calculate_loss fails on a sequence batch "
                                    f"({type(exc).__name__}: {exc})") from None
            parts = loss if isinstance(loss, tuple) else (loss,)
            if not all(torch.isfinite(torch.as_tensor(x)).all() for x in parts):
                raise _refuse(name, "its loss on a probe batch is not finite")
    finally:
        model.train(was_training)


def _probe_batch(model, seq, lengths, config):
    rows, pos = [], []
    for r, n in enumerate(lengths.tolist()):
        for p in range(n - 1):
            rows.append(r)
            pos.append(p)
    row = torch.tensor(rows, device=seq.device)
    posi = torch.tensor(pos, device=seq.device)
    data = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths, model.POS_ITEM_ID: seq[row, posi + 1],
            ROW: row, POS: posi, USER: torch.ones_like(row), INDEX: posi + 1}
    neg = getattr(model, "NEG_ITEM_ID", None)
    if neg is not None:
        data[neg] = (seq[row, posi + 1] % (model.n_items - 1)) + 1
    return Interaction(data)
