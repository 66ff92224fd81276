"""The CPU / no-Triton selective scan: blocked over the batch, with a hand-written backward.

Shapes (mamba_ssm's contract, see mamba4rec/kernels/reference.py)::

    u, delta, z   : (B D L)          A : (D N)
    B, C          : (B N L) or (B G N L)   channel d reads group d // (D // G)
    D, delta_bias : (D,)
    initial_state : (B D N) or None (zeros)  h_{-1}, the state before t = 0
    out           : (B D L) in u's dtype      last_state : (B D N) float32 (float64 for float64)

How it runs. The batch is cut into blocks of ``bb`` sequences (blocks are independent).
Per block everything that is not sequential is vectorised over L into a workspace laid
out (L, bb, G, D/G, N), so that one time step is one contiguous slab:

    forward   dA = exp(dt * A),  H = dt*u*B  (written in place of dBu),
              for t: H_t += dA_t * H_{t-1}     (one addcmul_ per step; H_{-1} = initial_state),
              y = H @ C                        (batched mat-vec over (t, b, g))
    backward  recompute dA and H, G = gy * C,
              for t backwards: G_t += dA_{t+1} * G_{t+1},
              d initial_state = dA_0 * G_0,
              dC = gy @ H,  d(dt*u) = G @ B,  dB = (dt*u) @ G,
              X = G * dA * H_{t-1}:  ddt += X @ A  (per channel),  dA += dt @ X

The forward saves only its inputs; no (B, D, L, N) tensor is ever held, only
``workspace_bytes`` of blocks plus O(B*D*L) tensors. Accumulation is in float32
(float64 for float64 input, so gradcheck works); gradients come back in each input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_scan_inputs

#: Default bytes of (L, bb, D, N) workspace a call may hold (2 buffers forward, 3 backward).
#: Chosen with python -m benchmarks.bench_scan_cpu --budgets on the 2-core AMD EPYC dev box
#: (1 MiB L2 per core, 32 MiB L3), batch 2048, D 128, N 32, fwd+bwd, 2 threads, idle box:
#: L=50: 8 MiB (blocks of 5 fwd / 3 bwd) 3.6 s, 16 MiB 4.3 s, 32 MiB 4.8 s, 64 MiB 5.2 s --
#: small blocks stay in cache. At L=200 the same 8 MiB means blocks of 1 and 23 s: the
#: python loop's per-step dispatch (~10 us) then dominates, hence MIN_STEP_ELEMS.
WORKSPACE_BYTES = 8 * 2**20
#: With the default budget a block still covers at least this many (b, d, n) elements per
#: time step (3 sequences at D=128, N=32), growing the budget with L if need be (29 MiB at
#: L=200): L=200 then takes ~17 s instead of 23 s.  Explicit budgets are taken as given.
MIN_STEP_ELEMS = 12288


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _block_size(batch: int, L: int, dim: int, N: int, nbuf: int, itemsize: int,
                workspace_bytes: int | None = None) -> int:
    """Sequences per block so that ``nbuf`` (L, bb, dim, N) buffers fit the budget (>= 1).

    ``None``: the default budget, WORKSPACE_BYTES or enough for MIN_STEP_ELEMS per step.
    """
    per_seq = nbuf * L * dim * N * itemsize
    if workspace_bytes is None:
        workspace_bytes = max(WORKSPACE_BYTES, nbuf * L * MIN_STEP_ELEMS * itemsize)
    return max(1, min(batch, int(workspace_bytes) // per_seq))


def _time_major(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(bb, ..., L) -> contiguous (L, bb, ...) in the compute dtype."""
    return x.movedim(-1, 0).to(cdt).contiguous()


class _Blocks:
    """Per-call constants plus the preallocated workspace the blocks reuse."""

    def __init__(self, u, A, B, nbuf, cdt, workspace_bytes):
        batch, dim, L = u.shape
        N = A.shape[1]
        self.G = 1 if B.dim() == 3 else B.shape[1]
        self.Dg = dim // self.G
        self.batch, self.dim, self.L, self.N, self.cdt = batch, dim, L, N, cdt
        itemsize = torch.empty((), dtype=cdt).element_size()
        self.bb = _block_size(batch, L, dim, N, nbuf, itemsize, workspace_bytes)
        numel = L * self.bb * dim * N
        flat = torch.empty(nbuf * numel, dtype=cdt, device=u.device)
        self._bufs = [flat[i * numel:(i + 1) * numel] for i in range(nbuf)]
        self.A = A.to(cdt).contiguous().view(self.G, self.Dg, N)
        self.ones_n = torch.ones(N, dtype=cdt, device=u.device)
        self.ones_m = torch.ones(L * self.bb, dtype=cdt, device=u.device)

    def ranges(self):
        for b0 in range(0, self.batch, self.bb):
            yield b0, min(b0 + self.bb, self.batch)

    def buf(self, i: int, bb: int) -> torch.Tensor:
        """Workspace i as (L, bb, G, Dg, N); the ragged last block uses its front part."""
        return self._bufs[i][: self.L * bb * self.dim * self.N].view(
            self.L, bb, self.G, self.Dg, self.N)

    def bc(self, X: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        """B or C rows b0:b1 as contiguous (L, bb, G, N) in the compute dtype."""
        X = X[b0:b1]
        if X.dim() == 3:
            X = X.unsqueeze(1)
        return _time_major(X, self.cdt)

    def dt(self, delta, delta_bias, delta_softplus, b0, b1):
        """(dt_raw, dt) for rows b0:b1 as (bb, D, L) in the compute dtype."""
        dt_raw = delta[b0:b1].to(self.cdt)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(self.cdt)[:, None]
        return dt_raw, (F.softplus(dt_raw) if delta_softplus else dt_raw)

    def h0(self, initial_state, b0, b1):
        """initial_state rows b0:b1 as (bb, G, Dg, N) in the compute dtype, or None."""
        if initial_state is None:
            return None
        return initial_state[b0:b1].to(self.cdt).reshape(b1 - b0, self.G, self.Dg, self.N)

    def states(self, dA, H, dtT, dtuT, BT, h0=None):
        """Fill dA = exp(dt*A) and H = all states h_0..h_{L-1} for one block, in place,
        starting from h0 = h_{-1} (block rows of initial_state; None: zeros)."""
        L, bb = dtT.shape[0], dtT.shape[1]
        G, Dg = self.G, self.Dg
        torch.mul(dtT.view(L, bb, G, Dg, 1), self.A, out=dA)
        dA.exp_()
        torch.mul(dtuT.view(L, bb, G, Dg, 1), BT.view(L, bb, G, 1, self.N), out=H)
        # unbind once: indexing H[t] in the loop costs ~3 us of dispatch per view, as much
        # as the addcmul itself at the block sizes used here
        Hs, dAs = H.unbind(0), dA.unbind(0)
        if h0 is not None:
            Hs[0].addcmul_(dAs[0], h0)
        for t in range(1, L):
            Hs[t].addcmul_(dAs[t], Hs[t - 1])


def _sum_state(X, Y, scratch, ones_n):
    """sum_n X * Y for (L, bb, G, Dg, N) X and Y broadcastable to it, as (L, bb, G*Dg).

    Multiply into ``scratch`` then one mat-vec with ones. Measured (torch.profiler, 1 thread,
    a 13 MB block): 1.7 ms, vs 3.8 ms for the batched (Dg x N) @ (N x 1) matmul and 21 ms
    for a matmul batched over d (the d-strided ddt = sum_n X * A term).
    """
    torch.mul(X, Y, out=scratch)
    L, bb, G, Dg, N = scratch.shape
    return torch.mv(scratch.view(-1, N), ones_n).view(L, bb, G * Dg)


class _SelectiveScanTorch(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                return_last_state, workspace_bytes):
        cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        blocks = _Blocks(u, A, B, 2, cdt, workspace_bytes)
        batch, dim, L, N = blocks.batch, blocks.dim, blocks.L, blocks.N
        out = torch.empty(batch, dim, L, dtype=u.dtype, device=u.device)
        last = torch.empty(batch, dim, N, dtype=cdt, device=u.device) if return_last_state else None
        with torch.no_grad():
            for b0, b1 in blocks.ranges():
                bb = b1 - b0
                dA, H = blocks.buf(0, bb), blocks.buf(1, bb)
                u_b = u[b0:b1].to(cdt)
                _, dt = blocks.dt(delta, delta_bias, delta_softplus, b0, b1)
                dtT = _time_major(dt, cdt)
                dtuT = dtT * _time_major(u_b, cdt)
                blocks.states(dA, H, dtT, dtuT, blocks.bc(B, b0, b1), blocks.h0(initial_state, b0, b1))
                CT = blocks.bc(C, b0, b1).view(L, bb, blocks.G, 1, N)
                y = _sum_state(H, CT, dA, blocks.ones_n).permute(1, 2, 0)  # (bb, D, L); dA as scratch
                if D is not None:
                    y = y + D.to(cdt)[:, None] * u_b
                if z is not None:
                    y = y * F.silu(z[b0:b1].to(cdt))
                out[b0:b1] = y
                if last is not None:
                    last[b0:b1] = H[L - 1].view(bb, dim, N)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = delta_softplus
        ctx.workspace_bytes = workspace_bytes
        if last is not None:
            return out, last
        return out

    @staticmethod
    def backward(ctx, gout, glast=None):
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        need = ctx.needs_input_grad  # u, delta, A, B, C, D, z, delta_bias, initial_state, ...
        need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias, need_h0 = need[:9]
        need_ddt = need_u or need_delta or need_bias  # d(dt*u) feeds du; ddt feeds delta/bias
        need_X = need_delta or need_bias or need_A
        cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        blocks = _Blocks(u, A, B, 3, cdt, ctx.workspace_bytes)
        batch, dim, L, N, G, Dg = blocks.batch, blocks.dim, blocks.L, blocks.N, blocks.G, blocks.Dg
        dev = u.device

        def empty_like_in(x, needed):
            return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else None

        du = empty_like_in(u, need_u)
        ddelta = empty_like_in(delta, need_delta)
        dz = empty_like_in(z, need_z) if z is not None else None
        dB = torch.empty(batch, G, N, L, dtype=B.dtype, device=dev) if need_B else None
        dC = torch.empty(batch, G, N, L, dtype=C.dtype, device=dev) if need_C else None
        dh0 = empty_like_in(initial_state, need_h0) if initial_state is not None else None
        dA_acc = torch.zeros(G, Dg, N, dtype=cdt, device=dev) if need_A else None
        dD_acc = torch.zeros(dim, dtype=cdt, device=dev) if need_D else None
        dbias_acc = torch.zeros(dim, dtype=cdt, device=dev) if need_bias else None
        Dc = D.to(cdt) if D is not None else None

        with torch.no_grad():
            for b0, b1 in blocks.ranges():
                bb = b1 - b0
                dA, H, Gs = blocks.buf(0, bb), blocks.buf(1, bb), blocks.buf(2, bb)
                u_b = u[b0:b1].to(cdt)
                dt_raw, dt = blocks.dt(delta, delta_bias, delta_softplus=ctx.delta_softplus,
                                       b0=b0, b1=b1)
                dtT, uT = _time_major(dt, cdt), _time_major(u_b, cdt)
                dtuT = dtT * uT
                BT, CT = blocks.bc(B, b0, b1), blocks.bc(C, b0, b1)
                h0 = blocks.h0(initial_state, b0, b1)
                blocks.states(dA, H, dtT, dtuT, BT, h0)

                g = gout[b0:b1].to(cdt)
                if z is not None:
                    z_b = z[b0:b1].to(cdt)
                    sz = torch.sigmoid(z_b)
                    if need_z:
                        y = _sum_state(H, CT.view(L, bb, G, 1, N), Gs, blocks.ones_n).permute(1, 2, 0)
                        if Dc is not None:
                            y = y + Dc[:, None] * u_b
                        # d silu(z)/dz = s * (1 + z * (1 - s))
                        dz[b0:b1] = g * y * sz * (1 + z_b * (1 - sz))
                    g = g * (z_b * sz)
                if need_D:
                    dD_acc += (g * u_b).sum((0, 2))
                gT = _time_major(g, cdt)                                   # (L, bb, D)

                # G_t = dL/dh_t: local gy_t * C_t plus what flows back from h_{t+1}.
                torch.mul(gT.view(L, bb, G, Dg, 1), CT.view(L, bb, G, 1, N), out=Gs)
                if glast is not None:
                    Gs[L - 1] += glast[b0:b1].to(cdt).view(bb, G, Dg, N)
                Gl, dAl = Gs.unbind(0), dA.unbind(0)
                for t in range(L - 2, -1, -1):
                    Gl[t].addcmul_(dAl[t + 1], Gl[t + 1])
                if need_h0:  # h_0 = dA_0 * h_{-1} + ...: before dA becomes X below
                    dh0[b0:b1] = (dAl[0] * Gl[0]).view(bb, dim, N)

                if need_C:   # dC = sum over the group's channels of gy * h
                    dCT = torch.matmul(gT.view(L, bb, G, 1, Dg), H).view(L, bb, G, N)
                    dC[b0:b1] = dCT.permute(1, 2, 3, 0)
                if need_B:   # dB = sum over the group's channels of G * dt * u
                    dBT = torch.matmul(dtuT.view(L, bb, G, 1, Dg), Gs).view(L, bb, G, N)
                    dB[b0:b1] = dBT.permute(1, 2, 3, 0)
                if not (need_ddt or need_X):
                    continue
                if need_X:
                    # X_t = G_t * dA_t * h_{t-1} (h_{-1} = initial_state or 0), in place over dA.
                    X = dA
                    X.mul_(Gs)
                    X[1:].mul_(H[:-1])
                    if h0 is None:
                        X[0].zero_()
                    else:
                        X[0].mul_(h0)
                # d(dt*u) = sum_n G * B   (H is free now: scratch)
                ddtuT = _sum_state(Gs, BT.view(L, bb, G, 1, N), H, blocks.ones_n)    # (L, bb, D)
                if need_u:
                    du_b = (ddtuT * dtT).permute(1, 2, 0)
                    if Dc is not None:
                        du_b = du_b + g * Dc[:, None]
                    du[b0:b1] = du_b
                if not need_X:
                    continue
                if need_delta or need_bias:
                    # ddt = sum_n X * A  +  d(dt*u) * u        (Gs is free now: scratch)
                    ddtT = _sum_state(X, blocks.A, Gs, blocks.ones_n) + ddtuT * uT
                    ddt = ddtT.permute(1, 2, 0)                                         # (bb, D, L)
                    if ctx.delta_softplus:
                        ddt = ddt * torch.sigmoid(dt_raw)
                    if need_delta:
                        ddelta[b0:b1] = ddt
                    if need_bias:
                        dbias_acc += ddt.sum((0, 2))
                if need_A:   # dA[d, n] = sum_{t, b} X * dt: scale in place, then one column-sum mat-vec
                    X.mul_(dtT.view(L, bb, G, Dg, 1))
                    M = L * bb
                    dA_acc += torch.mv(X.view(M, dim * N).t(), blocks.ones_m[:M]).view(G, Dg, N)

        if dB is not None:
            dB = dB.view(B.shape)
        if dC is not None:
            dC = dC.view(C.shape)
        dA_out = dA_acc.view(dim, N).to(A.dtype) if need_A else None
        dD_out = dD_acc.to(D.dtype) if need_D else None
        dbias_out = dbias_acc.to(delta_bias.dtype) if need_bias else None
        return du, ddelta, dA_out, dB, dC, dD_out, dz, dbias_out, dh0, None, None, None


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False, initial_state=None, *,
                         workspace_bytes: int | None = None):
    """Selective scan on any device with plain torch ops; mamba_ssm's selective_scan_fn contract.

    Args:
        u, delta, z: (batch, dim, L).  A: (dim, N).  D, delta_bias: (dim,).
        B, C: (batch, N, L) or grouped (batch, G, N, L); channel d reads group d // (dim // G).
        delta_softplus: dt = softplus(delta + delta_bias) instead of delta + delta_bias.
        return_last_state: also return h_{L-1}, (batch, dim, N) float32 (float64 for float64).
        initial_state: (batch, dim, N), the state h_{-1} before the first step (None: zeros), so
            h_0 = exp(dt_0 * A) * initial_state + dt_0 * B_0 * u_0. It gets a gradient (in its
            own dtype) when it requires one. A scan started from another's last state continues it.
        workspace_bytes: cap on the (L, bb, dim, N) workspace blocks (at least one sequence's
            worth is always used); default: WORKSPACE_BYTES, raised for long L so that a time
            step covers MIN_STEP_ELEMS elements (see there).
            Memory stays O(batch*dim*(L+N)) + this, whatever the shape.

    Returns:
        out (batch, dim, L) in u's dtype [, last_state].
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    budget = None if workspace_bytes is None else int(workspace_bytes)
    return _SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                     bool(delta_softplus), bool(return_last_state), budget)


__all__ = ["MIN_STEP_ELEMS", "WORKSPACE_BYTES", "selective_scan_torch"]
