"""Streaming: the state Mamba4Rec keeps per user, which step path a call takes, and the API
(``init_state`` / ``prefill`` / ``step``, the :class:`Streaming` mixin of Mamba4Rec). The CPU
step paths are mamba4rec/numpy_step.py (numpy) and mamba4rec/numba_step.py (numba); the torch
step runs the model's own layers (MambaLayer.step). docs/STREAMING.md has the API and the measured latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import numba_step, numpy_step

#: model.step_impl values. "numba" and "numpy" are CPU float32 eval-mode paths; "auto" picks
#: numba (when installed), else numpy, for small batches and torch otherwise (see step_path).
STEP_IMPLS = ("auto", "numba", "numpy", "torch")


@dataclass
class StreamState:
    """What Mamba4Rec keeps per user to fold in one interaction at a time (model.init_state,
    model.prefill, model.step). Its size does not depend on how many interactions it has seen.

    conv:  per layer [B, d_inner, d_conv - 1] in the model's dtype: the last conv inputs (the
           x half of in_proj's output), oldest first, zeros before the first interaction;
    ssm:   per layer [B, d_inner, d_state] float32: the selective SSM's state;
    steps: [B] long, interactions seen so far per row (the next position: used by the position
           embedding, and to refuse going past max_seq_length with one).

    Row b of every tensor is one user's state: ``select`` / ``cat`` move users in and out of a
    batch. ``model.step`` updates the tensors in place; ``clone`` keeps a copy to branch from.
    """

    conv: list
    ssm: list
    steps: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.steps.shape[0]

    def clone(self) -> "StreamState":
        return StreamState([c.clone() for c in self.conv], [s.clone() for s in self.ssm], self.steps.clone())

    def select(self, rows) -> "StreamState":
        """The users at ``rows`` (an index, a list or a LongTensor) as a new batch (copies)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.steps.device).reshape(-1)
        return StreamState([c[rows] for c in self.conv], [s[rows] for s in self.ssm], self.steps[rows])

    @staticmethod
    def cat(states) -> "StreamState":
        """One batch holding the rows of ``states`` in order (all from the same model)."""
        states = list(states)
        return StreamState([torch.cat(t) for t in zip(*(s.conv for s in states))],
                           [torch.cat(t) for t in zip(*(s.ssm for s in states))],
                           torch.cat([s.steps for s in states]))


def step_path(model, batch: int, state) -> str:
    """Which path model.step takes for this call: "numba", "numpy" or "torch".

    "auto" leaves an explicit scan_impl of "triton" or "ref" to the torch step, which follows
    the scan path (the Triton state update, or the plain reference); train mode is always torch
    (dropout draws). This runs on every step: attribute checks only (is_cpu, not .device)."""
    impl = model.step_impl
    if impl == "torch" or model.training:
        return "torch"
    if impl == "auto" and model.scan_impl not in ("auto", "numba", "torch"):
        return "torch"
    weight = model.item_embedding.weight
    f32 = torch.float32
    usable = (weight.is_cpu and weight.dtype == f32
              and all(t.is_cpu and t.dtype == f32 for t in state.conv) and all(t.is_cpu and t.dtype == f32 for t in state.ssm))
    if impl in ("numpy", "numba"):
        if not usable:
            raise ValueError(f"step_impl={impl!r} needs a float32 model and state on the CPU; use 'auto' or 'torch'")
        if impl == "numba" and not numba_step.available():
            raise ImportError("step_impl='numba' needs numba, which is not installed: "
                              "pip install numba (or use step_impl='auto', 'numpy' or 'torch')")
        return impl
    if not usable:
        return "torch"
    if numba_step.available() and batch <= numba_step.NUMBA_STEP_MAX_BATCH:
        return "numba"
    return "numpy" if batch <= numpy_step.NUMPY_STEP_MAX_BATCH else "torch"


def drop_cpu_steps(module, incompatible_keys):
    """load_state_dict post-hook (a module-level function, so the model still pickles)."""
    module._cpu_steps.clear()


class Streaming:
    """Mamba4Rec's streaming API: one interaction at a time, O(1) per step in the history length.
    A mixin of mamba4rec.model.Mamba4Rec, whose embeddings, layers and ``step_impl`` it uses."""

    def init_state(self, batch_size: int) -> StreamState:
        """Empty states (no interaction yet) for ``batch_size`` users, on the model's device; the
        conv windows in the model's dtype, the SSM states in float32 (see StreamState)."""
        p = self.item_embedding.weight
        conv = [p.new_zeros(batch_size, layer.mamba.d_inner, self.d_conv - 1) for layer in self.mamba_layers]
        ssm = [torch.zeros(batch_size, layer.mamba.d_inner, self.d_state, device=p.device, dtype=torch.float32)
               for layer in self.mamba_layers]
        return StreamState(conv, ssm, torch.zeros(batch_size, dtype=torch.long, device=p.device))

    @torch.no_grad()
    def prefill(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, state: StreamState | None = None):
        """Start streaming from histories: (seq_output [B, H], state) as after step()-ing each row's
        items one by one, in one forward-like pass over the batch (the scan returns the states).

        item_seq [B, L] left-aligned, padded with 0; item_seq_len [B], 1 <= length <= L, may
        differ per row (MambaBlock.prefill keeps every row's state at its own end). seq_output
        equals forward(item_seq, item_seq_len). The state belongs to the caller (fresh tensors).
        ``state``: continue from it instead (the rows' earlier items; it is not changed), so a
        long history can be folded in a piece at a time.
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
        if state is not None and state.batch_size != item_seq.shape[0]:
            raise ValueError(f"prefill: the state holds {state.batch_size} rows and item_seq {item_seq.shape[0]}")
        seen = 0 if state is None else int(state.steps.max())
        if self.position_embedding is not None and seen + L > self.max_seq_length:
            raise ValueError(f"prefill: a history of {seen + L} items is longer than max_seq_length="
                             f"{self.max_seq_length}, the positions the position embedding was trained "
                             f"for; pass the last {self.max_seq_length} items")
        hidden, state = self.forward_chunk(item_seq, lengths, state)
        return self.gather_indexes(hidden, lengths - 1), state

    def forward_chunk(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, state: StreamState | None = None,
                      outputs: bool = True):
        """The layers over the next items of each row, from ``state`` (the empty state when None):
        (hidden [B, L', H] at every position up to the longest row, the state after each row's
        item_seq_len items). No checks, differentiable: gradients reach the parameters and, through
        ``state``, whatever made it. A row's history cut into pieces and run piece by piece, each
        from the state the previous one returned, gives the outputs of one run over all of it
        (mamba4rec.history, which trains and evaluates that way). item_seq_len >= 1 per row.
        ``outputs`` False: only the state is wanted; the last layer stops after its Mamba block
        (what follows it changes no state) and hidden is None."""
        L = int(item_seq_len.max())
        item_seq = item_seq[:, :L]
        steps = (torch.zeros_like(item_seq_len) if state is None else state.steps)
        positions = torch.arange(L, device=item_seq.device)[None] + (0 if state is None else steps[:, None])
        hidden = self._embed(item_seq, positions)  # [B, L, H]
        conv, ssm = [], []
        last = len(self.mamba_layers) - 1
        for i, layer in enumerate(self.mamba_layers):
            start = (None, None) if state is None else (state.conv[i], state.ssm[i])
            if i == last and not outputs:
                _, c, h = layer.mamba(hidden, item_seq_len, *start)
                hidden = None
            else:
                hidden, c, h = layer(hidden, item_seq_len, *start)
            conv.append(c)
            ssm.append(h)
        return hidden, StreamState(conv, ssm, steps + item_seq_len)

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
            steps["numpy"] = prepared = numpy_step.NumpyStep(self)
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
