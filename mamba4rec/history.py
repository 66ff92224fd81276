"""train_mode=history: each user's whole training history runs once an epoch, in chunks that
carry the model's state, and evaluation from each user's whole history.

A state space model carries a fixed-size state from item to item, so a user's history need not
be cut into windows of MAX_ITEM_LIST_LENGTH (L) items. Here a history runs in chunks of
``history_chunk`` items; each chunk starts from the SSM and conv states the previous chunk of
the same row ended with (Mamba4Rec.forward_chunk), and gradients flow back through them, so a
row's outputs, loss and gradients are those of one pass over all of it. The chunk is a memory
knob (the scan's buffers hold one chunk), not a limit on the history.

Batches. ``train_batch_size`` counts targets, as in the other modes: every epoch the users are
shuffled (the loader's generator, seeded with ``seed`` and saved in ``-last.pth``) and their
targets cut into batches of exactly that many (mamba4rec.sequence.plan_batches), so steps per
epoch and targets per step are the prefix protocol's. A user whose targets straddle two batches
(or more: ML-1M's longest user has 2,313 targets) trains each piece in its own batch: the piece
starts from the state of all the user's earlier items, computed in that step without a gradient
(the same parameters, the same state; only the gradient through the earlier items is cut). Every
target of the prefix protocol is trained once an epoch, with all the items before it in its
state.

Evaluation (``eval_history: whole``, the default in history mode): the valid item is scored from
the state after all of the user's training items, the test item after those and the valid item,
through RecBole's evaluation (its metrics, full ranking, the same users and targets as its
protocol, so rows pair user by user with window rows). It works for a model trained in any mode.

Which models: Mamba4Rec (a model with ``forward_chunk``) without a position embedding (its
positions end at L). Others are refused before any data work, naming what works.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from recbole.data.interaction import Interaction

from .causal import INDEX, POS, ROW, USER, _get, _loss_with, padding_groups  # noqa: F401 (re-exported)
from .checks import int_in
from .sequence import SequenceTrainDataLoader, user_sequences
from .streaming import StreamState

#: Default ``history_chunk``: items per chunk of a row. Smaller chunks mean more, smaller calls
#: of the layers (ML-1M's history step: 1024 against 256 in docs/RESULTS.md, "Training step");
#: at 1024 a chunk's scan buffers (a few chunk x d_state blocks per thread) still fit in a CPU
#: core's L2.
DEFAULT_CHUNK = 1024
EVAL_HISTORY = ("window", "whole")
#: field of a history batch: the position (in the row's items) of each row's first trained target
FROM = "_history_from"


def resolve_history(config, model_class=None) -> tuple[int, bool]:
    """(history_chunk, whole-history evaluation) from a config, validated; ValueError naming the
    key, the value and what works. Called before any data work."""
    mode = _get(config, "train_mode") or "prefix"
    chunk = _get(config, "history_chunk")
    if chunk is None:
        chunk = DEFAULT_CHUNK
    if not int_in(chunk, 1):
        raise ValueError(f"history_chunk={chunk!r} is invalid: it must be an integer >= 1 (items a chunk of a "
                         f"user's history runs at once in train_mode=history and eval_history=whole; default "
                         f"{DEFAULT_CHUNK}). It bounds memory, not the history.")
    ev = _get(config, "eval_history")
    if ev is None:
        ev = "whole" if mode == "history" else "window"
    if ev not in EVAL_HISTORY:
        raise ValueError(f"eval_history={ev!r} is invalid: use window (the last MAX_ITEM_LIST_LENGTH items, "
                         f"RecBole's protocol) or whole (each user's whole history); default: whole in "
                         f"train_mode=history, window otherwise.")
    if model_class is not None and (mode == "history" or ev == "whole"):
        what = "train_mode=history" if mode == "history" else "eval_history=whole"
        name = getattr(model_class, "__name__", str(model_class))
        if not hasattr(model_class, "forward_chunk"):
            raise ValueError(f"{what} cannot run {name}: it needs a model that carries a state from one chunk of "
                             f"a history to the next (Mamba4Rec); {name} has none (attention attends to every "
                             f"earlier item, RecBole's GRU4Rec takes no initial state). Train {name} with "
                             f"train_mode=prefix or sequence and eval_history=window.")
        if _get(config, "position_embedding"):
            raise ValueError(f"{what} cannot run {name} with position_embedding: True: its positions end at "
                             f"MAX_ITEM_LIST_LENGTH, and a whole history runs past them. Set "
                             f"--position_embedding=False (the paper's Mamba4Rec has none).")
    return int(chunk), ev == "whole"


# ---- running rows of items in chunks ---------------------------------------------------------

def _rows(state: StreamState, a: int, b: int) -> StreamState:
    return StreamState([c[a:b] for c in state.conv], [s[a:b] for s in state.ssm], state.steps[a:b])


def run_chunks(model, items: torch.Tensor, lengths: torch.Tensor, chunk: int, state: StreamState | None = None,
               outputs: str = "all", final_state: bool = True):
    """Run rows of items (left-aligned [R, W], lengths [R] >= 1) through ``model.forward_chunk``
    ``chunk`` items at a time, each chunk from the state the row's previous chunk ended with
    (``state``, or the empty state, before the first). Returns (out, final state), the final
    state None unless ``final_state``:

    outputs "all": out [sum(lengths), H], every row's outputs in row order, position order;
            "last": out [R, H], each row's output at its last item; None: out None.

    The rows run longest first: in wave k every row still running takes items [k*chunk,
    (k+1)*chunk); the rows that go on past it run together (all exactly ``chunk`` long), the
    rows that end in it run in the groups :func:`padding_groups` picks, each cut at its longest
    row. Differentiable (gradients flow through the carried states) unless called under no_grad."""
    R = items.shape[0]
    order = torch.argsort(lengths, descending=True, stable=True)
    lens = lengths[order]
    host = lens.tolist()
    current = None if state is None else state.select(order)
    done, parts = [], []  # (first sorted row, state) of rows that ended; (rows, positions, hidden)
    for start in range(0, host[0], chunk):
        active = sum(1 for n in host if n > start)
        going_on = sum(1 for n in host if n > start + chunk)
        groups = [(0, going_on)] if going_on else []
        groups += [(going_on + a, going_on + b) for a, b in
                   padding_groups([n - start for n in host[going_on:active]])]
        nxt = None
        for a, b in groups:
            width = min(host[a] - start, chunk)  # the group's longest row: rows run longest first
            rows = order[a:b]
            part_len = (lens[a:b] - start).clamp(max=chunk)
            hidden, after = model.forward_chunk(items[rows, start:start + width], part_len,
                                                None if current is None else _rows(current, a, b),
                                                outputs=outputs is not None)
            if outputs == "all":
                keep = torch.arange(width, device=hidden.device)[None, :] < part_len[:, None]
                pos = (torch.arange(width, device=hidden.device)[None, :] + start).expand(b - a, width)
                parts.append((rows[:, None].expand(b - a, width)[keep], pos[keep], hidden[keep]))
            elif outputs == "last" and b > going_on:
                parts.append((rows, None, hidden[torch.arange(b - a, device=hidden.device), part_len - 1]))
            if a == 0 and going_on:
                nxt = after
            elif final_state:
                done.append((a, after))
        current = nxt
    final = None
    if final_state:
        final = StreamState.cat([s for _, s in sorted(done, key=lambda x: x[0])])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(R, device=order.device)
        final = final.select(inverse)
    if outputs is None:
        return None, final
    rows = torch.cat([p[0] for p in parts])
    hidden = torch.cat([p[2] for p in parts])
    if outputs == "last":
        out = hidden.new_empty(R, hidden.shape[-1])
        out = out.index_copy(0, rows.to(hidden.device), hidden)
        return out, final
    pos = torch.cat([p[1] for p in parts])
    key = rows.to(pos.device) * (int(lengths.max()) + 1) + pos
    return hidden[torch.argsort(key)], final


# ---- training ------------------------------------------------------------------------------

class UserHistories:
    """Each user's training sequence as one unit of training: what plan_batches cuts into
    batches (``new``: targets per user), stored flat."""

    def __init__(self, users, seqs):
        keep = [i for i, s in enumerate(seqs) if len(s) >= 2]
        self.user = np.asarray([users[i] for i in keep], dtype=np.int64)
        self.seqs = [seqs[i] for i in keep]
        self.new = np.asarray([len(s) - 1 for s in self.seqs], dtype=np.int64)
        self.n_targets = int(self.new.sum())

    def __len__(self):
        return len(self.new)


class HistoryTrainDataLoader(SequenceTrainDataLoader):
    """Training batches of train_mode=history (module docstring): pieces (user, first target,
    end) of the shuffled users' target streams, ``train_batch_size`` targets a batch. A batch
    holds each piece's items from the user's first item up to its last target's input; the
    pieces that start after the user's first target run their earlier items without gradient
    (:func:`history_loss`). Shuffling, DDP sharding and resuming are sequence mode's."""

    mode = "history"

    def build_units(self, users, seqs):
        return UserHistories(users, seqs)

    def collate(self, pieces: np.ndarray) -> Interaction:
        h = self.windows
        unit, lo, hi = pieces[:, 0], pieces[:, 1], pieces[:, 2]
        width = int(hi.max())
        items = np.zeros((len(unit), width), dtype=np.int64)
        targets, rows, pos = [], [], []
        for r, (u, a, b) in enumerate(zip(unit, lo, hi)):
            seq = h.seqs[u]
            items[r, :b] = seq[:b]
            targets.append(seq[a + 1:b + 1])
            rows.append(np.full(b - a, r))
            pos.append(np.arange(a, b))
        row, posi = np.concatenate(rows), np.concatenate(pos)
        target = np.concatenate(targets)
        data = {
            self.item_seq_field: torch.from_numpy(items), self.item_len_field: torch.from_numpy(hi.astype(np.int64)),
            FROM: torch.from_numpy(lo.astype(np.int64)), self.iid_field: torch.from_numpy(target),
            ROW: torch.from_numpy(row), POS: torch.from_numpy(posi),
            USER: torch.from_numpy(h.user[unit][row]), INDEX: torch.from_numpy(posi + 1),
        }
        if self.negatives:
            neg = self._sampler.sample_by_user_ids(data[USER].numpy(), target, 1)
            data[self.neg_item_field] = torch.as_tensor(neg, dtype=torch.long).reshape(-1)
        return Interaction(data)


def history_loss(model, interaction, chunk: int):
    """The model's own calculate_loss over every target of a history batch: each row runs from
    its first item in chunks carrying the state; the items before the row's first trained target
    without gradient, the rest with. Its outputs are the outputs of one pass over the row."""
    items = interaction[model.ITEM_SEQ]
    end = interaction[model.ITEM_SEQ_LEN]
    lo = interaction[FROM]
    state = model.init_state(items.shape[0])
    earlier = torch.nonzero(lo > 0).reshape(-1)
    if len(earlier):
        with torch.no_grad():
            _, before = run_chunks(model, items[earlier], lo[earlier], chunk, outputs=None)
        for i in range(len(state.conv)):
            state.conv[i][earlier] = before.conv[i].to(state.conv[i].dtype)
            state.ssm[i][earlier] = before.ssm[i]
        state.steps[earlier] = before.steps
    width = int((end - lo).max())
    idx = (lo[:, None] + torch.arange(width, device=items.device)[None, :]).clamp(max=items.shape[1] - 1)
    rest = items.gather(1, idx)
    out, _ = run_chunks(model, rest, end - lo, chunk, state=state, outputs="all", final_state=False)
    return _loss_with(model, interaction, out)


# ---- evaluation ----------------------------------------------------------------------------

class WholeHistory:
    """Each evaluated user's whole history, per evaluation split: valid = the user's training
    sequence, test = that and the valid item. Checked against RecBole's own samples: the window
    a sample holds must be the end of the history used for it."""

    def __init__(self, train_dataset, valid_dataset, test_dataset, chunk):
        users, seqs = user_sequences(train_dataset)
        self.chunk = chunk
        train = dict(zip(users.tolist(), seqs))
        valid_item = self._targets(valid_dataset)
        self.by_split = {id(valid_dataset): train,
                         id(test_dataset): {u: np.r_[train.get(u, np.zeros(0, np.int64)), [v]]
                                            for u, v in valid_item.items()}}

    @staticmethod
    def _targets(dataset) -> dict:
        feat = dataset.inter_feat
        return dict(zip(feat[dataset.uid_field].numpy().tolist(), feat[dataset.iid_field].numpy().tolist()))

    def histories(self, dataset, interaction, model):
        """(items [B, W], lengths [B]) of the batch's users: their whole histories for ``dataset``'s split."""
        table = self.by_split.get(id(dataset))
        if table is None:
            raise ValueError("eval_history=whole: this evaluation split is neither the valid nor the test split "
                             "the run was set up with")
        users = interaction[dataset.uid_field].cpu().numpy()
        window = interaction[model.ITEM_SEQ].cpu().numpy()
        wlen = interaction[model.ITEM_SEQ_LEN].cpu().numpy()
        hists = []
        for u, w, n in zip(users, window, wlen):
            hist = table.get(int(u))
            if hist is None or len(hist) < n or not np.array_equal(hist[len(hist) - n:], w[:n]):
                if n < window.shape[1] and hist is None:  # a user with no training target: the window is all
                    hist = w[:n]
                else:
                    raise ValueError(f"eval_history=whole: user {int(u)}'s evaluation window does not end the "
                                     f"history rebuilt from the training split (eval_args order must be TO, "
                                     f"and the data set RecBole's own augmented one)")
            hists.append(hist)
        lengths = np.asarray([len(x) for x in hists], dtype=np.int64)
        items = np.zeros((len(hists), int(lengths.max())), dtype=np.int64)
        for r, x in enumerate(hists):
            items[r, :len(x)] = x
        device = interaction[model.ITEM_SEQ].device
        return torch.from_numpy(items).to(device), torch.from_numpy(lengths).to(device)

    @contextlib.contextmanager
    def scoring(self, model, dataset):
        """For the duration, model.full_sort_predict and predict score each user from the whole
        history (its forward answers with the output after the last history item)."""
        from .compat import instance_attributes

        def full_sort_predict(interaction):
            return self._scores(model, dataset, interaction, full=True)

        def predict(interaction):
            return self._scores(model, dataset, interaction, full=False)

        with instance_attributes(model, full_sort_predict=full_sort_predict, predict=predict):
            yield

    def _scores(self, model, dataset, interaction, full):
        items, lengths = self.histories(dataset, interaction, model)
        with torch.no_grad():
            out, _ = run_chunks(model, items, lengths, self.chunk, outputs="last", final_state=False)
        if full:
            return torch.matmul(out, model.item_embedding.weight.t())
        return (out * model.item_embedding(interaction[model.ITEM_ID])).sum(-1)
