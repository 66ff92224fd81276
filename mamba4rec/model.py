"""Mamba4Rec: selective state space models for sequential recommendation.

Reference:
    Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee.
    "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space Models."
    arXiv:2403.03900, 2024.

Defaults follow the paper's official code (hidden 64, one layer, d_state 32, d_conv 4, expand 2,
dropout, LayerNorm eps 1e-12, normal(0, 0.02) init, tied output embedding, CE loss).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss

from mamba4rec.kernels.fast_dropout import FastDropout
from .layers import MambaLayer
from .loss import CPU_CHUNK_ROWS, full_softmax_ce
from .causal import length_buckets
from .model_config import LOSS_TYPES, MODEL_DEFAULTS, block_residual, resolve_model_config  # noqa: F401 (API)
from .streaming import Streaming, drop_cpu_steps

class Mamba4Rec(Streaming, SequentialRecommender):
    r"""Item embedding -> dropout -> LayerNorm -> num_layers x MambaLayer -> the output at the
    last item -> scores against the (tied) item embedding. Streaming (``init_state``,
    ``prefill``, ``step``) comes from mamba4rec.streaming.Streaming."""

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
        self.register_load_state_dict_post_hook(drop_cpu_steps)

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
        after a sequence cannot change any output we read. The batch is sorted by length and cut
        into groups (length_buckets: auto, the groups with the least padding plus a per-call
        cost; n, n equal-count buckets), each run only up to its own longest sequence: the same
        outputs for less work when lengths vary (short Amazon histories next to long ones).
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
