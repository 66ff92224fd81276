"""Mamba4Rec.step compiled with numba: the whole eval-mode step of a few users as one native loop.

The numpy step (numpy_step.py) still makes ~30 numpy calls per step, 1 to 4 microseconds each
whatever their size; at batch 1 that call overhead, not the arithmetic (~80k multiply-adds and
4096 exps for the paper's model), is the cost. Here one compiled function does every layer for
every row, reading the same prepared weights as the numpy step (NumpyStep builds them: dt folded
into x_proj, per-item tables, transposed matrices), and updates the caller's state arrays in
place.

numba is optional (``pip install numba``, the ``fast`` extra, also in the test extra): without it
``step_impl="auto"`` uses the numpy step and ``"numba"`` says how to install it. numba is
imported only when this path is first taken. The first call on a machine compiles (2-4 s;
``cache=True`` keeps the machine code on disk, so later processes load it in well under a
second); ``Recommender.from_checkpoint`` takes that hit at load time, not on the first event.

Accumulation is float32 as in torch's CPU kernels; tests hold it to the torch step and to
``forward`` within 1e-4.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .kernels import numba_scan as _numba_scan

#: "auto" uses the compiled step up to this many users per call (one core, rows one after the
#: other); beyond it torch's batched, threaded kernels win. Measured on 2 CPU cores, history 50:
#: numba 0.51 vs torch 0.82 ms at batch 8, even at 16 (0.89 vs 0.92), torch ahead from 24
#: (python -m benchmarks.bench_streaming --step-impl numba,torch --batches 1,8,16,24,32,64
#: --lengths 50 --reps 101).
NUMBA_STEP_MAX_BATCH = 16


# whether numba is installed: one cached lookup, shared with the scan, that does not import it
available = _numba_scan.available


def _layer_norm_row(v, w, b, eps, out):
    n = v.shape[0]
    mean = np.float32(0.0)
    for i in range(n):
        mean += v[i]
    mean /= n
    var = np.float32(0.0)
    for i in range(n):
        d = v[i] - mean
        var += d * d
    var /= n
    inv = np.float32(1.0) / np.sqrt(var + eps)
    for i in range(n):
        out[i] = (v[i] - mean) * inv * w[i] + b[i]


def _matvec(v, W, out):
    """out = v @ W for v [I], W [I, O] (row-major): axpy over W's rows, vectorisable over O."""
    for o in range(W.shape[1]):
        out[o] = 0.0
    for i in range(W.shape[0]):
        vi = v[i]
        if vi != 0.0:
            for o in range(W.shape[1]):
                out[o] += vi * W[i, o]


def _step_rows(item_ids, steps, emb, pos, ln0_w, ln0_b, ln0_eps, normed, first_xz,
               in_w, conv_w, conv_b, dbc_w, dbc_b, A, Dv, out_w, ln_w, ln_b, ln_eps,
               w1, b1, w2, b2, lnf_w, lnf_b, lnf_eps, residual, conv_states, ssm_states, out):
    """One step for every row. Per-layer weights come as tuples (one entry per layer); the
    tables ``normed``/``first_xz`` are used when non-empty (no position embedding)."""
    H = emb.shape[1]
    n_layers = len(in_w)
    use_tables = normed.shape[0] > 0
    hidden = np.empty(H, np.float32)
    tmp = np.empty(H, np.float32)
    for r in range(item_ids.shape[0]):
        item = item_ids[r]
        if use_tables:
            for i in range(H):
                hidden[i] = normed[item, i]
        else:
            for i in range(H):
                tmp[i] = emb[item, i]
            if pos.shape[0] > 0:
                p = steps[r]
                for i in range(H):
                    tmp[i] += pos[p, i]
            _layer_norm_row(tmp, ln0_w, ln0_b, ln0_eps, hidden)
        for li in range(n_layers):
            Wi = in_w[li]
            Di = Wi.shape[1] // 2
            xz = np.empty(2 * Di, np.float32)
            if li == 0 and use_tables:
                for o in range(2 * Di):
                    xz[o] = first_xz[item, o]
            else:
                _matvec(hidden, Wi, xz)
            # causal depthwise conv over the kept window and the new input, then shift
            cw = conv_w[li]
            K = cw.shape[1]
            conv = conv_states[li]
            x = np.empty(Di, np.float32)
            for d in range(Di):
                acc = conv_b[li][d] + xz[d] * cw[d, K - 1]
                for k in range(K - 1):
                    acc += conv[r, d, k] * cw[d, k]
                for k in range(K - 2):
                    conv[r, d, k] = conv[r, d, k + 1]
                if K > 1:
                    conv[r, d, K - 2] = xz[d]
                x[d] = acc / (np.float32(1.0) + np.exp(-acc))              # SiLU
            Wd = dbc_w[li]
            dbc = np.empty(Wd.shape[1], np.float32)
            _matvec(x, Wd, dbc)
            bd = dbc_b[li]
            for o in range(dbc.shape[0]):
                dbc[o] += bd[o]
            N = A[li].shape[1]
            Al, Dl = A[li], Dv[li]
            ssm = ssm_states[li]
            y = np.empty(Di, np.float32)
            for d in range(Di):
                v = dbc[d]
                dt = _softplus(v)
                dtx = dt * x[d]
                acc = np.float32(0.0)
                for n in range(N):
                    h = ssm[r, d, n] * np.exp(dt * Al[d, n]) + dtx * dbc[Di + n]
                    ssm[r, d, n] = h
                    acc += h * dbc[Di + N + n]
                zd = xz[Di + d]
                y[d] = (acc + Dl[d] * x[d]) * (zd / (np.float32(1.0) + np.exp(-zd)))   # gate
            o_ = np.empty(H, np.float32)
            _matvec(y, out_w[li], o_)
            if residual:
                for i in range(H):
                    o_[i] += hidden[i]
            h1 = np.empty(H, np.float32)
            _layer_norm_row(o_, ln_w[li], ln_b[li], ln_eps[li], h1)
            W1 = w1[li]
            inner = np.empty(W1.shape[1], np.float32)
            _matvec(h1, W1, inner)
            bb1 = b1[li]
            for o in range(inner.shape[0]):
                g = inner[o] + bb1[o]
                inner[o] = np.float32(0.5) * g * (np.float32(1.0) + np.float32(math.erf(g * 0.7071067811865476)))
            _matvec(inner, w2[li], tmp)
            bb2 = b2[li]
            for i in range(H):
                tmp[i] += bb2[i] + h1[i]
            _layer_norm_row(tmp, lnf_w[li], lnf_b[li], lnf_eps[li], hidden)
        for i in range(H):
            out[r, i] = hidden[i]


_softplus = _numba_scan.softplus_f32  # compiled by _kernel
_compiled = None
_compile_lock = threading.Lock()


def _kernel():
    """The jitted _step_rows, wrapping the functions above on first use. fastmath only lets the
    sums be reordered (vectorised), contracted to FMAs and divisions be reciprocals: not the
    flags that assume no NaN or inf, so a NaN weight still shows up as NaN."""
    global _compiled, _layer_norm_row, _matvec, _softplus
    with _compile_lock:
        if _compiled is None:
            import numba

            jit = numba.njit(cache=True, fastmath={"reassoc", "contract", "arcp"}, nogil=True)
            # the step's body resolves these globals when it compiles: jit them first
            _layer_norm_row, _matvec = jit(_layer_norm_row), jit(_matvec)
            _softplus = jit(_numba_scan.softplus_f32)  # the scan's softplus: one definition
            _compiled = jit(_step_rows)
    return _compiled


_EMPTY2 = np.zeros((0, 0), np.float32)


class NumbaStep:
    """Binds the weights a NumpyStep prepared to the compiled step (same freshness key)."""

    def __init__(self, prepared):
        self.kernel = _kernel()
        self.prepared = prepared
        P = prepared.layers
        t = lambda k: tuple(np.ascontiguousarray(p[k], dtype=np.float32) for p in P)  # noqa: E731
        f32 = lambda v: np.float32(v)  # noqa: E731
        self.args = (
            prepared.embedding, _EMPTY2 if prepared.position is None else prepared.position,
            prepared.ln0[0], prepared.ln0[1], f32(prepared.ln0[2]),
            _EMPTY2 if prepared.normed is None else np.ascontiguousarray(prepared.normed, dtype=np.float32),
            _EMPTY2 if prepared.first_xz is None else np.ascontiguousarray(prepared.first_xz, dtype=np.float32),
            t("in"), t("conv_w"), t("conv_b"), t("dbc_w"), t("dbc_b"), t("A"), t("D"), t("out"),
            tuple(p["ln"][0] for p in P), tuple(p["ln"][1] for p in P),
            np.array([p["ln"][2] for p in P], np.float32),
            t("w1"), t("b1"), t("w2"), t("b2"),
            tuple(p["ln_ffn"][0] for p in P), tuple(p["ln_ffn"][1] for p in P),
            np.array([p["ln_ffn"][2] for p in P], np.float32),
            bool(P and P[0]["residual"]),
        )
        self._no_steps = np.zeros(0, np.int64)

    @property
    def key(self):
        return self.prepared.key

    def fresh(self) -> bool:
        return self.prepared.fresh()

    def __call__(self, item_ids, steps, conv_states, ssm_states):
        if not all(x.flags.c_contiguous for x in conv_states + ssm_states):
            # one compiled signature for all layers needs one array layout; a strided state
            # (a caller's slice) takes the numpy step, which updates views in place too
            return self.prepared(item_ids, steps, conv_states, ssm_states)
        a = self.args
        out = np.empty((item_ids.shape[0], a[0].shape[1]), np.float32)
        self.kernel(item_ids, self._no_steps if steps is None else steps, *a[:26], tuple(conv_states),
                   tuple(ssm_states), out)
        return out
