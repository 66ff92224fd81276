"""Streaming: the state Mamba4Rec keeps per user, and which step path a call takes.

``Mamba4Rec.init_state`` / ``prefill`` / ``step`` (mamba4rec/model.py) use these; the step
paths themselves are mamba4rec/numpy_step.py (numpy) and mamba4rec/numba_step.py (numba), and the
torch step in the model. docs/STREAMING.md has the API and the measured latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import numba_step

from . import numpy_step

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
