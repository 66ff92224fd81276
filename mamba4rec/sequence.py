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

Which models: a causal RecBole sequential model whose forward reads its per-position output
through ``gather_indexes`` (mamba4rec.causal: the outputs at the targets, the losses, the length
buckets, and the probe that refuses any other model before training). Their names are imported
here too, so ``mamba4rec.sequence`` gives both sides of train_mode=sequence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from recbole.data.interaction import Interaction

from .causal import (  # noqa: F401  (re-exported: the model side of train_mode=sequence)
    DEFAULT_BUCKETS, INDEX, POS, ROW, USER, NotSequenceTrainable, _get, _refuse, bucketed_forward, check_model,
    last_output, length_buckets, prefix_buckets, prefix_loss, resolve_buckets, sequence_loss, sequence_output,
    target_output, train_buckets)
from .checks import int_in

TRAIN_MODES = ("prefix", "sequence", "history")


def resolve_train_mode(config) -> tuple[str, int | None]:
    """(train_mode, stride) from a config, validated; stride is None in prefix mode.

    Raises ValueError naming the key, the value and what is allowed. Called before any data work.
    """
    mode = _get(config, "train_mode")
    mode = "prefix" if mode is None else mode
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode={mode!r} is invalid: it must be one of {', '.join(TRAIN_MODES)} "
                         f"(prefix: RecBole's protocol, one sample per target; sequence: one pass per "
                         f"window of a user's history; history: one pass over each user's whole history, "
                         f"in chunks carrying the state). Set --train_mode=sequence or leave it out.")
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

    mode = "sequence"

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
                raise ValueError(f"train_mode={self.mode} takes one uniform or popularity negative per target "
                                 f"(train_neg_sample_args sample_num 1, not dynamic), not {neg}")
        if config["transform"]:
            raise _refuse(config["model"], f"its batches need RecBole's transform {config['transform']!r}, "
                                           f"which train_mode={self.mode} does not apply to its batches")
        users, seqs = user_sequences(dataset)
        self.windows = self.build_units(users, seqs)
        self.n_targets = self.windows.n_targets
        # per rank and step: batch_size // world_size targets, as RecBole's DistributedSampler
        self.step = max(1, self.batch_size // self.world_size)
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.item_seq_field = dataset.item_id_list_field
        self.item_len_field = dataset.item_list_length_field
        self.neg_item_field = config["NEG_PREFIX"] + self.iid_field
        self.n_buckets = DEFAULT_BUCKETS

    def build_units(self, users, seqs):
        """What each epoch shuffles and cuts into batches (plan_batches reads its ``new``)."""
        return Windows(users, seqs, self.max_len, self.stride)

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
