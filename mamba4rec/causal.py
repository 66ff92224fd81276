"""A causal RecBole model run over many positions at once: its output at every position, the
length buckets a batch runs in, the losses of both train modes, and the probe that refuses a
model for which they would not be its own.

Which models: any RecBole sequential model whose ``forward(item_seq, item_seq_len)`` ends by
reading its per-position output through ``gather_indexes`` and is causal. The per-position
output is had by letting ``gather_indexes`` return the whole output for the duration of a
call (a model may instead define ``sequence_output(item_seq, item_seq_len)``, as Mamba4Rec
does), and the model's own ``calculate_loss`` then computes the loss over the targets (CE over
all items, or BPR with one sampled negative per target), unchanged. :func:`check_model` probes
this before any training: a model whose outputs are not its prefixes' outputs is refused.

A sequence batch (mamba4rec.sequence builds them) names its targets in the fields below: the
row and position of each target in the batch's items, its user and its index in the user's
training sequence.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from recbole.data.interaction import Interaction

from .checks import int_in
from .compat import instance_attributes

#: batches of models without a ``length_buckets`` attribute of their own run in these buckets:
#: "auto", the padding-optimal groups of :func:`padding_groups`; an integer n, n equal-count buckets
DEFAULT_BUCKETS = "auto"
# fields of a sequence batch: target -> (row, position, user, index)
ROW, POS, USER, INDEX = "_seq_row", "_seq_pos", "_seq_user", "_seq_index"
logger = logging.getLogger(__name__)


def _get(config, key):
    try:
        return config[key]
    except KeyError:
        return None


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


def length_buckets(lengths: torch.Tensor, n_buckets) -> list:
    """The rows of a batch in groups of similar length (indices, sorted by length, stable; none
    empty): "auto", the groups with the fewest padded positions plus a per-call cost
    (:func:`padding_groups`); an integer n, up to n groups of equal counts. A causal model run
    over each group cut at its longest row gives the outputs it gives over the whole padded
    batch, for less work. The one bucketing: Mamba4Rec's forward (its ``length_buckets``) and
    :func:`target_output` (RecBole's causal models, and sequence batches) both use it."""
    order = torch.argsort(lengths, stable=True)
    if n_buckets == "auto":
        order = order.flip(0)  # longest first, as padding_groups takes them
        groups = padding_groups(lengths[order].tolist())
        return [order[a:b].flip(0) for a, b in reversed(groups)]
    return [idx for idx in torch.tensor_split(order, max(1, min(int(n_buckets), len(order)))) if len(idx)]


#: What one more call of a model's layers costs, in positions of work: :func:`padding_groups`
#: weighs the padding a group of rows saves against the calls it adds.
CALL_COST = 32


def padding_groups(lengths: list[int], call_cost: int = CALL_COST) -> list[tuple[int, int]]:
    """Rows of ``lengths`` (sorted longest first) as contiguous groups (a, b), each to run padded to
    its longest row, lengths[a]: the grouping with the fewest padded positions plus ``call_cost``
    a group (exact, by dynamic programming over the distinct lengths)."""
    n = len(lengths)
    if n == 0:
        return []
    starts = [0] + [i for i in range(1, n) if lengths[i] != lengths[i - 1]]
    s = np.asarray(starts + [n], dtype=np.int64)
    v = np.asarray([lengths[i] for i in starts], dtype=np.int64)
    m = len(starts)
    best = np.zeros(m + 1, dtype=np.int64)
    cut = np.zeros(m + 1, dtype=np.int64)
    for k in range(1, m + 1):  # the best grouping of the first k runs: its last group starts at run j
        costs = best[:k] + (s[k] - s[:k]) * v[:k] + call_cost
        j = int(np.argmin(costs))
        best[k], cut[k] = costs[j], j
    groups, k = [], m
    while k > 0:
        groups.append((int(s[cut[k]]), int(s[k])))
        k = int(cut[k])
    return groups[::-1]


def target_output(model, interaction, n_buckets=DEFAULT_BUCKETS) -> torch.Tensor:
    """The model's output at each target of a sequence batch, [T, H], in the batch's target
    order. The rows run in up to ``n_buckets`` length buckets, each cut at its longest row."""
    item_seq = interaction[model.ITEM_SEQ]
    item_len = interaction[model.ITEM_SEQ_LEN]
    row, pos = interaction[ROW], interaction[POS]
    n_buckets = getattr(model, "length_buckets", n_buckets)
    if n_buckets != "auto":
        n_buckets = max(1, min(int(n_buckets), item_seq.shape[0]))
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
    if n_buckets == 1:
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


def resolve_buckets(config):
    """``length_buckets`` for any model (Mamba4Rec reads it as its own key; for RecBole's models
    it sets how train_mode prefix and sequence run each batch), validated: "auto" (the
    padding-optimal groups, the default) or an integer >= 1 (that many equal-count buckets; 1 = one
    bucket: in prefix mode RecBole's own forward over the padded batch)."""
    value = _get(config, "length_buckets")
    if value is None:
        return DEFAULT_BUCKETS
    if value == "auto":
        return value
    if not int_in(value, 1):
        raise ValueError(f"length_buckets={value!r} is invalid: it must be auto (groups of similar length "
                         f"chosen to minimise padding, the default) or an integer >= 1 (that many equal-count "
                         f"length buckets each batch runs in; 1 = off).")
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
