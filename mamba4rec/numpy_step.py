"""Mamba4Rec.step for a few users on a CPU, in numpy: the same math, a fraction of the overhead.

At batch 1 a step is about 30 tiny operations on vectors of 64 to 4096 numbers. Each one costs
torch 5 to 20 microseconds of dispatch (measured: a 0.36 ms step whose arithmetic takes a few
microseconds), and numpy 1 to 4. This module runs the eval-mode step on float32 numpy views of
the model's weights and the caller's state tensors (shared memory: the state is updated in
place, as torch's step does). ``Mamba4Rec.step`` picks it for small CPU float32 batches in eval
mode (``model.step_impl``: "auto", "numpy" or "torch"); tests hold it to the torch step and to
``forward``.

Derived weights are built once per model and rebuilt when any parameter changes: new storage
(``.to()``, ``load_state_dict(assign=True)``) or an in-place update (optimizer step,
``load_state_dict``) both change the key.
"""

from __future__ import annotations

import numpy as np
import torch

#: Without numba, "auto" uses numpy up to this many users per step; beyond it torch's threaded
#: kernels win. Measured on 2 CPU cores (one layer, hidden 64, history 200): numpy 0.26 vs torch
#: 0.53 ms at batch 1, even at batch 8 (0.51 vs 0.51 ms), torch ahead from 16
#: (python -m benchmarks.bench_streaming --step-impl numpy,torch --batches 1,4,8,16).
NUMPY_STEP_MAX_BATCH = 4
#: Without a position embedding the first ops of a step depend on the item alone: LayerNorm of
#: its embedding, then the first layer's in_proj. Both are tabulated per item when the table
#: stays under this size (the in_proj table is 4x the embedding table; ml-1m: 3.5 MiB).
NUMPY_STEP_TABLE_BYTES = 64 * 2**20


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _mm(a, w):
    """a @ w without BLAS. numpy hands a one-row product to OpenBLAS's gemv, which wakes its
    thread pool: 2 microseconds on an idle machine, 1.7 to 3 ms when the other cores are busy
    (measured on a 2-core machine while training ran). einsum's own loop has no thread pool."""
    return np.einsum("bi,io->bo", a, w)


def _layer_norm(h, ln):
    """torch's layer_norm (biased variance). ufunc.reduce and in-place updates: about 17 us at
    batch 1 against 26 us for h.mean / einsum with fresh arrays (each numpy call costs 1-4 us)."""
    w, b, eps = ln
    inv = 1.0 / h.shape[-1]
    d = h - np.add.reduce(h, -1, keepdims=True) * inv
    var = np.add.reduce(d * d, -1, keepdims=True)
    var *= inv
    var += eps
    d /= np.sqrt(var)
    d *= w
    d += b
    return d


class NumpyStep:
    """The eval-mode step of one Mamba4Rec model, on numpy copies of its weights."""

    def __init__(self, model):
        from scipy.special import erf, expit  # in install_requires (and a RecBole dependency)

        self._erf, self._expit = erf, expit
        self.params = list(model.parameters())
        self.key = self.key_of(self.params)
        ln = lambda m: (_np(m.weight), _np(m.bias), float(m.eps))  # noqa: E731
        self.embedding = _np(model.item_embedding.weight)
        self.position = None if model.position_embedding is None else _np(model.position_embedding.weight)
        self.ln0 = ln(model.LayerNorm)
        self.normed = self.first_xz = None  # per-item tables (see NUMPY_STEP_TABLE_BYTES)
        self.layers = []
        for layer in model.mamba_layers:
            blk, ffn = layer.mamba, layer.ffn
            w = blk._step_weights()  # A, D, conv kernel, and dt folded into one matmul
            self.layers.append({
                "residual": layer.residual, "Di": blk.d_inner, "N": blk.d_state,
                "in": _np(blk.in_proj.weight).T.copy(), "conv_w": _np(w["conv_w"]), "conv_b": _np(w["conv_b"]),
                "dbc_w": _np(w["dbc_w"]).T.copy(), "dbc_b": _np(w["dbc_b"]), "A": _np(w["A"]), "D": _np(w["D"]),
                "out": _np(blk.out_proj.weight).T.copy(), "ln": ln(layer.LayerNorm),
                "w1": _np(ffn.w_1.weight).T.copy(), "b1": _np(ffn.w_1.bias),
                "w2": _np(ffn.w_2.weight).T.copy(), "b2": _np(ffn.w_2.bias), "ln_ffn": ln(ffn.LayerNorm),
            })
        if self.position is None and self.layers:
            in_w = self.layers[0]["in"]
            if self.embedding.shape[0] * in_w.shape[1] * 4 <= NUMPY_STEP_TABLE_BYTES:
                self.normed = _layer_norm(self.embedding, self.ln0)
                self.first_xz = self.normed @ in_w      # once per weight version; BLAS is fine here

    @staticmethod
    def key_of(params) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in params)

    def fresh(self) -> bool:
        return self.key_of(self.params) == self.key

    def __call__(self, item_ids: np.ndarray, steps: np.ndarray | None, conv_states, ssm_states) -> np.ndarray:
        """item_ids [B] int; steps [B] (positions, with a position embedding); conv_states and
        ssm_states: per layer float32 arrays [B, Di, d_conv - 1] and [B, Di, N], updated in place."""
        erf, expit = self._erf, self._expit
        if self.normed is not None:
            hidden = self.normed[item_ids]
        else:
            hidden = self.embedding[item_ids]
            if self.position is not None:
                hidden = hidden + self.position[steps]
            hidden = _layer_norm(hidden, self.ln0)
        for i, (p, conv, ssm) in enumerate(zip(self.layers, conv_states, ssm_states)):
            Di, N = p["Di"], p["N"]
            xz = self.first_xz[item_ids] if i == 0 and self.first_xz is not None else _mm(hidden, p["in"])
            x, z = xz[:, :Di], xz[:, Di:]
            # causal depthwise conv over (the d_conv - 1 kept inputs, x), then shift x in
            k = p["conv_w"]
            xc = np.einsum("bdk,dk->bd", conv, k[:, :-1]) + x * k[:, -1] + p["conv_b"]
            if conv.shape[-1]:
                conv[:, :, :-1] = conv[:, :, 1:]
                conv[:, :, -1] = x
            x = xc * expit(xc)                                       # SiLU
            dbc = _mm(x, p["dbc_w"]) + p["dbc_b"]                    # dt + dt_bias, B, C
            dt = np.logaddexp(0.0, dbc[:, :Di])                      # softplus
            B, C = dbc[:, Di:Di + N], dbc[:, Di + N:]
            ssm *= np.exp(dt[:, :, None] * p["A"])
            ssm += (dt * x)[:, :, None] * B[:, None, :]
            y = np.einsum("bdn,bn->bd", ssm, C) + p["D"] * x
            y *= z * expit(z)                                        # gate
            out = _mm(y, p["out"])
            if p["residual"]:
                out = out + hidden
            h1 = _layer_norm(out, p["ln"])
            inner = _mm(h1, p["w1"]) + p["b1"]
            inner = inner * (0.5 + 0.5 * erf(inner * 0.7071067811865476))   # exact GELU
            hidden = _layer_norm(_mm(inner, p["w2"]) + p["b2"] + h1, p["ln_ffn"])
        return hidden
