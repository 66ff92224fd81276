"""Mamba4Rec: selective state space models for sequential recommendation.

Reference:
    Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee.
    "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space Models."
    arXiv:2403.03900, 2024.

Defaults follow the paper's official code (hidden 64, one layer, d_state 32, d_conv 4, expand 2,
dropout, LayerNorm eps 1e-12, normal(0, 0.02) init, tied output embedding, CE loss).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss

from mamba4rec.kernels import SCAN_IMPLS

from mamba4rec.kernels.fast_dropout import FastDropout
from .checks import int_in
from .layers import DT_INITS, MambaLayer
from .loss import CPU_CHUNK_ROWS, full_softmax_ce
from .numpy_step import NumpyStep
from .sequence import length_buckets
from .streaming import STEP_IMPLS, StreamState, step_path

#: Every model key with its default: the single source; configs/model/Mamba4Rec.yaml mirrors it
#: (tests/test_model.py checks that they agree).
MODEL_DEFAULTS = {
    "hidden_size": 64,
    "num_layers": 1,
    "dropout_prob": 0.2,
    "d_state": 32,
    "d_conv": 4,
    "expand": 2,
    "loss_type": "CE",
    "scan_impl": "auto",
    "position_embedding": False,
    "dt_init": "paper",
    "length_buckets": 4,
    "ce_chunk_rows": "auto",
    "block_residual": "auto",
}
LOSS_TYPES = ("CE", "BPR")


def _bad(key, value, rule):
    return ValueError(
        f"Mamba4Rec config: {key}={value!r} is invalid: {rule}. Set it in "
        f"configs/model/Mamba4Rec.yaml, a config file of yours or on the command line "
        f"(--{key}=...); the default is {MODEL_DEFAULTS[key]!r}."
    )


def resolve_model_config(config) -> dict:
    """Read Mamba4Rec's keys from a RecBole Config (or dict), fill defaults, validate.

    Raises ValueError naming the key, the value and the allowed range. Called by the pipeline
    before any data work, and again by the model for users' own pipelines.
    """
    get = config.get if isinstance(config, dict) else config.__getitem__
    out = {}
    for key, default in MODEL_DEFAULTS.items():
        value = get(key)
        out[key] = default if value is None else value
    for key in ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "length_buckets"):
        v = out[key]
        if not int_in(v, 1):
            raise _bad(key, v, "it must be an integer >= 1")
        out[key] = int(v)
    p = out["dropout_prob"]
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise _bad("dropout_prob", p, "it must be a number in [0, 1)")
    out["dropout_prob"] = float(p)
    if out["loss_type"] not in LOSS_TYPES:
        raise _bad("loss_type", out["loss_type"], f"it must be one of {', '.join(LOSS_TYPES)}")
    if out["scan_impl"] not in SCAN_IMPLS:
        raise _bad("scan_impl", out["scan_impl"], f"it must be one of {', '.join(SCAN_IMPLS)}")
    if out["dt_init"] not in DT_INITS:
        raise _bad("dt_init", out["dt_init"], f"it must be one of {', '.join(DT_INITS)}")
    if not isinstance(out["position_embedding"], bool):
        raise _bad("position_embedding", out["position_embedding"], "it must be True or False")
    c = out["ce_chunk_rows"]
    if c != "auto" and not int_in(c, 0):
        raise _bad("ce_chunk_rows", c, "it must be auto, 0 (the whole [targets, items] logits at once) or "
                                      "an integer >= 1 (rows of logits per chunk)")
    out["ce_chunk_rows"] = c if c == "auto" else int(c)
    r = out["block_residual"]
    if r != "auto" and not isinstance(r, bool):
        raise _bad("block_residual", r, "it must be auto (the paper's code: a residual around each block "
                                        "only when num_layers > 1), True or False")
    return out


def block_residual(params: dict) -> bool:
    """Whether each layer adds its input to the block's output: the paper's code does so only
    when num_layers > 1 (``block_residual: auto``); True/False force it either way."""
    r = params["block_residual"]
    return params["num_layers"] > 1 if r == "auto" else r


def _drop_cpu_steps(module, incompatible_keys):
    """load_state_dict post-hook (a module-level function, so the model still pickles)."""
    module._cpu_steps.clear()


class Mamba4Rec(SequentialRecommender):
    r"""Item embedding -> dropout -> LayerNorm -> num_layers x MambaLayer -> the output at the
    last item -> scores against the (tied) item embedding."""

    @classmethod
    def default_config_files(cls, dataset):
        """The packaged configs RecBole's Config reads as this model's internal defaults (below
        every file, dict and command-line key of the user's): the paper's protocol and settings,
        so ``Config(model=Mamba4Rec, dataset=...)`` needs no files (mamba4rec/defaults.py)."""
        from .defaults import MODEL, config_files

        return config_files(MODEL, dataset)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        params = resolve_model_config(config)
        self.model_config = dict(params)  # the resolved keys, for mamba4rec.serving's checkpoints
        self.hidden_size = params["hidden_size"]
        self.num_layers = params["num_layers"]
        self.dropout_prob = params["dropout_prob"]
        self.d_state = params["d_state"]
        self.d_conv = params["d_conv"]
        self.expand = params["expand"]
        self.loss_type = params["loss_type"]
        self.scan_impl = params["scan_impl"]
        self.dt_init = params["dt_init"]
        self.use_position_embedding = params["position_embedding"]
        self.length_buckets = params["length_buckets"]
        self.ce_chunk_rows = params["ce_chunk_rows"]
        self.block_residual = block_residual(params)
        #: step() path: "auto" (small float32 CPU batches in eval mode: numba when installed, else
        #: numpy; torch otherwise), "numba", "numpy" or "torch". See streaming.step_path.
        self.step_impl = "auto"
        self._cpu_steps = {}  # "numpy"/"numba" step objects (see _step_cpu)
        # load_state_dict(assign=True) swaps Parameter objects, which a NumpyStep's freshness
        # key (data_ptr, _version of the old objects) cannot see: drop the cache on any load.
        self.register_load_state_dict_post_hook(_drop_cpu_steps)

        # define layers and loss
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = (
            nn.Embedding(self.max_seq_length, self.hidden_size) if self.use_position_embedding else None
        )
        self.dropout = FastDropout(self.dropout_prob)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(self.hidden_size, self.d_state, self.d_conv, self.expand, self.dropout_prob,
                       residual=self.block_residual, scan_impl=self.scan_impl)
            for _ in range(self.num_layers)
        )
        if self.loss_type == "BPR":
            self.loss_fct = BPRLoss()
        elif self.loss_type == "CE":
            self.loss_fct = nn.CrossEntropyLoss()
        else:  # resolve_model_config already refused it; kept as RecBole's closed check
            raise NotImplementedError("Make sure 'loss_type' in ['BPR', 'CE']!")

        # parameters initialization
        self.apply(self._init_weights)
        if self.dt_init == "mamba":
            for layer in self.mamba_layers:
                layer.mamba.reset_dt_parameters()

    @staticmethod
    def _init_weights(module):
        """The paper's init: normal(0, 0.02) for Linear/Embedding weights, zero Linear biases
        (dt_proj's too), LayerNorm 1/0. Conv1d, A_log and D keep their own init."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq, item_seq_len):
        """Output at position item_seq_len - 1 of each sequence.  [B, L] -> [B, H]

        Sequences are left-aligned and every layer is causal and per-sequence, so the padding
        after a sequence cannot change any output we read. With length_buckets > 1 the batch is
        sorted by length and cut into that many buckets, each run only up to its own longest
        sequence: the same outputs for less work when lengths vary (short Amazon histories
        next to long ones in one batch).
        """
        parts = length_buckets(item_seq_len, self.length_buckets)
        if len(parts) <= 1:
            return self._forward_trimmed(item_seq, item_seq_len)
        out = None
        for idx in parts:
            part = self._forward_trimmed(item_seq[idx], item_seq_len[idx])
            if out is None:
                out = part.new_empty(item_seq.shape[0], part.shape[-1])
            out[idx] = part
        return out

    def _forward_trimmed(self, item_seq, item_seq_len):
        return self.gather_indexes(self.sequence_output(item_seq, item_seq_len), item_seq_len - 1)  # [B, H]

    def sequence_output(self, item_seq, item_seq_len):
        """Output at every position up to the batch's longest sequence.  [B, L] -> [B, L', H]

        Position t's output is the forward output of the prefix ending at t (the model is
        causal): train_mode=sequence (mamba4rec.sequence) reads it at every target at once."""
        L = int(item_seq_len.max())
        item_seq = item_seq[:, :L]                                  # drop the shared padding
        hidden = self._embed(item_seq, torch.arange(L, device=item_seq.device)[None])  # [B, L, H]
        for layer in self.mamba_layers:
            hidden = layer(hidden)
        return hidden

    def _embed(self, items, positions):
        """The input to the first layer, for any shape of ``items`` ([B, L] in forward, [B] in
        step): item embedding, plus the position embedding at ``positions`` (broadcast to
        ``items``), dropout, LayerNorm."""
        hidden = self.item_embedding(items)
        if self.position_embedding is not None:
            hidden = hidden + self.position_embedding(positions)
        return self.LayerNorm(self.dropout(hidden))

    # streaming: one interaction at a time, O(1) per step in the history length

    def init_state(self, batch_size: int) -> StreamState:
        """Empty states (no interaction yet) for ``batch_size`` users, on the model's device; the
        conv windows in the model's dtype, the SSM states in float32 (see StreamState)."""
        p = self.item_embedding.weight
        conv = [p.new_zeros(batch_size, layer.mamba.d_inner, self.d_conv - 1) for layer in self.mamba_layers]
        ssm = [torch.zeros(batch_size, layer.mamba.d_inner, self.d_state, device=p.device, dtype=torch.float32)
               for layer in self.mamba_layers]
        return StreamState(conv, ssm, torch.zeros(batch_size, dtype=torch.long, device=p.device))

    @torch.no_grad()
    def prefill(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor):
        """Start streaming from histories: (seq_output [B, H], state) as after step()-ing each row's
        items one by one, in one forward-like pass over the batch (the scan returns the states).

        item_seq [B, L] left-aligned, padded with 0; item_seq_len [B], 1 <= length <= L, may
        differ per row (MambaBlock.prefill keeps every row's state at its own end). seq_output
        equals forward(item_seq, item_seq_len). The state belongs to the caller (fresh tensors).
        """
        if item_seq.dim() != 2 or item_seq_len.dim() != 1 or item_seq_len.shape[0] != item_seq.shape[0]:
            raise ValueError(f"prefill: item_seq must be [B, L] and item_seq_len [B], got shapes "
                             f"{tuple(item_seq.shape)} and {tuple(item_seq_len.shape)}")
        lengths = item_seq_len.to(device=item_seq.device, dtype=torch.long)
        if item_seq.shape[0] == 0 or (lengths < 1).any() or (lengths > item_seq.shape[1]).any():
            raise ValueError(f"prefill: every item_seq_len must be in 1..L={item_seq.shape[1]}, got "
                             f"{lengths.tolist()[:8]}{' ...' if lengths.numel() > 8 else ''}")
        L = int(lengths.max())
        item_seq = item_seq[:, :L]
        valid = torch.arange(L, device=item_seq.device)[None, :] < lengths[:, None]
        bad = valid & ((item_seq <= 0) | (item_seq >= self.n_items))
        if bad.any():
            raise ValueError(f"prefill: item ids must be internal ids in 1..{self.n_items - 1} within each "
                             f"row's length (0 is padding); found {item_seq[bad][:5].tolist()}")
        if self.position_embedding is not None and L > self.max_seq_length:
            raise ValueError(f"prefill: a history of {L} items is longer than max_seq_length="
                             f"{self.max_seq_length}, the positions the position embedding was trained "
                             f"for; pass the last {self.max_seq_length} items")
        hidden = self._embed(item_seq, torch.arange(L, device=item_seq.device)[None])  # [B, L, H]
        conv, ssm = [], []
        for layer in self.mamba_layers:
            hidden, c, h = layer(hidden, lengths)
            conv.append(c)
            ssm.append(h)
        return self.gather_indexes(hidden, lengths - 1), StreamState(conv, ssm, lengths.clone())

    def __getstate__(self):
        """Pickling and deepcopy leave out the derived step caches (numpy copies of the weights,
        a compiled function): the copy rebuilds them on its first step."""
        state = super().__getstate__()
        state["_cpu_steps"] = {}
        return state

    @torch.no_grad()
    def warm_up_step(self, batch_size: int = 1) -> str:
        """Prepare step() for batches of ``batch_size`` before the first real event: derive its
        weights and, on the numba path, compile (or load from numba's disk cache) the native
        step, which otherwise makes the first event take seconds. Runs one step on a scratch
        state; returns the path step() takes ("numba", "numpy" or "torch")."""
        state = self.init_state(batch_size)
        path = step_path(self, batch_size, state)
        if self.n_items > 1:
            self.step(torch.ones(batch_size, dtype=torch.long, device=state.steps.device), state)
        return path

    @torch.no_grad()
    def step(self, item_ids: torch.Tensor, state: StreamState):
        """Fold in one item per user: item_ids [B] (internal ids) -> (seq_output [B, H], state).

        seq_output equals forward() for the sequence ending at this item (in eval mode; in train
        mode dropout draws differ). The state is updated in place and also returned; the cost
        does not depend on how many items the state has seen. Runs under no_grad.

        With a position embedding, a row that has seen max_seq_length items cannot take another
        (ValueError): the model has no position for it. Restart it with prefill() on its last
        items (mamba4rec.serving.Recommender does so itself)."""
        if self.step_impl not in STEP_IMPLS:
            raise ValueError(f"step_impl={self.step_impl!r} is invalid: use one of {', '.join(STEP_IMPLS)}")
        if item_ids.dim() != 1 or item_ids.shape[0] != state.steps.shape[0]:
            raise ValueError(f"item_ids must be [B] with B={state.steps.shape[0]} (the state's batch), "
                             f"got shape {tuple(item_ids.shape)}")
        lo, hi = torch.aminmax(item_ids)  # one op and one sync, not four ops
        if int(lo) <= 0 or int(hi) >= self.n_items:
            raise ValueError(f"item ids must be internal ids in 1..{self.n_items - 1} (0 is padding)")
        if self.position_embedding is not None and (state.steps >= self.max_seq_length).any():
            raise ValueError(f"a sequence passed max_seq_length={self.max_seq_length}, the length the "
                             f"position embedding was trained for; restart it from its recent history")
        path = step_path(self, item_ids.shape[0], state)
        if path != "torch":
            return self._step_cpu(path, item_ids, state), state
        hidden = self._embed(item_ids, state.steps)                  # [B, H]
        for layer, conv, ssm in zip(self.mamba_layers, state.conv, state.ssm):
            hidden = layer.step(hidden, conv, ssm)
        state.steps += 1
        return hidden, state

    def _step_cpu(self, path, item_ids, state):
        """The numpy or numba step (see step_path); both read weights NumpyStep prepared once per
        weight version."""
        steps = self._cpu_steps
        prepared = steps.get("numpy")
        if prepared is None or not prepared.fresh():
            steps.clear()
            steps["numpy"] = prepared = NumpyStep(self)
        fn = prepared
        if path == "numba":
            fn = steps.get("numba")
            if fn is None:
                from mamba4rec.numba_step import NumbaStep  # imports numba: only when this path is taken

                steps["numba"] = fn = NumbaStep(prepared)
        pos = state.steps.numpy() if self.position_embedding is not None else None
        out = fn(item_ids.numpy(), pos, [c.numpy() for c in state.conv], [h.numpy() for h in state.ssm])
        state.steps += 1
        return torch.from_numpy(out)

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = torch.sum(seq_output * self.item_embedding(pos_items), dim=-1)  # [B]
            neg_score = torch.sum(seq_output * self.item_embedding(neg_items), dim=-1)  # [B]
            return self.loss_fct(pos_score, neg_score)
        rows = self.ce_chunk_rows
        if rows == "auto":  # on CPU chunks of logits that stay in cache; on a GPU one product is faster
            rows = 0 if seq_output.is_cuda else CPU_CHUNK_ROWS
        if rows:  # the same loss and gradients without the [B, n_items] logits (mamba4rec/loss.py)
            return full_softmax_ce(seq_output, self.item_embedding.weight, pos_items, rows)
        logits = torch.matmul(seq_output, self.item_embedding.weight.transpose(0, 1))  # [B, n_items]
        return self.loss_fct(logits, pos_items)

    def predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        test_item = interaction[self.ITEM_ID]
        seq_output = self.forward(item_seq, item_seq_len)
        return torch.mul(seq_output, self.item_embedding(test_item)).sum(dim=1)  # [B]

    def full_sort_predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        return torch.matmul(seq_output, self.item_embedding.weight.transpose(0, 1))  # [B, n_items]
