"""Mamba4Rec's layers: the Mamba block, the position-wise feed-forward network, MambaLayer.

Shapes: B batch, L sequence length, H hidden_size, Di = expand * H (inner width),
N d_state, R dt_rank = ceil(H / 16).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba4rec.kernels import get_scan_fn, resolve_scan_impl, update_state

from mamba4rec.kernels.fast_dropout import FastDropout
from mamba4rec.kernels.numba_conv import causal_conv_silu, causal_conv_silu_torch

logger = logging.getLogger(__name__)

DT_INITS = ("paper", "mamba")


class MambaBlock(nn.Module):
    """in_proj -> causal depthwise conv1d + SiLU -> x_proj -> dt_proj -> selective scan
    -> * SiLU(gate) -> out_proj.  Input and output (B, L, H)."""

    def __init__(self, d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2,
                 scan_impl: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_impl = scan_impl
        self._scan_path = None  # (device type, path) last resolved, for the one log line

        # define layers
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # S4D-real initialisation: A = -(1..N) per channel, kept as log for positivity.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1,
                            dt_init_floor: float = 1e-4, dt_scale: float = 1.0) -> None:
        """Mamba's own dt initialisation: dt = softplus(bias) log-uniform in [dt_min, dt_max].

        Mamba4Rec's paper code overwrites this with normal(0, 0.02) weights and a zero bias
        (its blanket Linear init); ``dt_init: mamba`` re-applies this after that init.
        """
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def scan_path(self, device) -> str:
        path, why = resolve_scan_impl(self.scan_impl, device)
        key = (getattr(device, "type", str(device)), path)
        if self._scan_path != key:
            self._scan_path = key
            logger.info("Mamba4Rec selective scan: %s path (%s)", path, why)
        return path

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None, ssm_state: torch.Tensor | None = None):
        """[B, L, H] -> [B, L, H]. Given ``lengths`` [B] (left-aligned rows, 0 <= length <= L), also
        the states step() continues from, each row's taken after its own last item:
        (out, conv_state [B, Di, d_conv - 1], ssm_state [B, Di, N] fp32).

        ``conv_state`` and ``ssm_state`` (with ``lengths``): the states the rows start from, as a
        previous call returned them (zeros when None): the conv reads its d_conv - 1 inputs
        before position 0 from conv_state, the scan starts from ssm_state. A sequence run in
        two calls so gives the outputs and states of one call over all of it, and gradients
        flow back through both states (train_mode=history).

        Ragged rows in one scan: dt is set to 0 after each row's end (its input to softplus to
        -inf), so exp(dt * A) = 1 and dt * B * x = 0 there: the scan carries every row's state
        unchanged through its padding and its last state is the state at the row's own end. out
        is exact up to each length.
        """
        Bsz, L, _ = hidden_states.shape
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)       # [B, L, Di] each
        x = x.transpose(1, 2)                                     # [B, Di, L]
        k = self.d_conv - 1
        start = conv_state
        if start is not None:
            start = start.to(x.dtype)
        if lengths is not None:  # the conv window: the d_conv - 1 inputs before each row's end
            conv_state = _last_inputs(x, lengths, start, k)
        path = self.scan_path(x.device)
        # causal conv + SiLU from the state (zeros when None): one compiled pass on the numba path
        # (kernels/numba_conv.py), torch's ops on every other
        conv = causal_conv_silu if path == "numba" else causal_conv_silu_torch
        x = conv(x, self.conv1d.weight, self.conv1d.bias, start)
        x_dbl = self.x_proj(x.transpose(1, 2))                    # [B, L, R + 2N]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)       # [B, Di, L]; bias goes to the scan
        A = -torch.exp(self.A_log.float())                        # [Di, N]
        scan = get_scan_fn(path)
        args = (A, B.transpose(1, 2), C.transpose(1, 2))
        if lengths is None:
            y = scan(x, dt, *args, D=self.D.float(), z=z.transpose(1, 2),
                     delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            return self.out_proj(y.transpose(1, 2))
        # dt = softplus(-inf) = 0 after each row's end, inside the scan (every path gives exactly 0
        # there, and masked_fill passes no gradient back through those positions)
        padding = torch.arange(L, device=x.device)[None, None, :] >= lengths[:, None, None]  # [B, 1, L]
        dt = dt.float().masked_fill(padding, float("-inf"))
        h0 = {} if ssm_state is None else {"initial_state": ssm_state}
        y, ssm_state = scan(x, dt, *args, D=self.D.float(), z=z.transpose(1, 2),
                            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True, **h0)
        return self.out_proj(y.transpose(1, 2)), conv_state.contiguous(), ssm_state.float().contiguous()

    def prefill(self, hidden_states: torch.Tensor, lengths: torch.Tensor):
        """forward(hidden_states, lengths): the output and the states after each row's length."""
        return self.forward(hidden_states, lengths)

    def step(self, x_t: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One new position: x_t [B, H] -> [B, H]; conv_state [B, Di, d_conv - 1] (the last
        conv inputs, oldest first) and ssm_state [B, Di, N] (float32) are updated in place.
        Equals forward() at that position given the same history; O(1) in the history length.

        The same ops as forward() for one position: in_proj, the conv over the kept window,
        x_proj and dt_proj (folded into one matmul, see _step_weights), the state update of the
        scan's path (kernels.update_state: the Triton kernel where the scan is Triton, else the
        plain torch update), out_proj. Differentiable when grad is enabled."""
        w = self._step_weights()
        Di, N = self.d_inner, self.d_state
        x, z = F.linear(x_t, self.in_proj.weight).split(Di, dim=-1)  # [B, Di] each
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)   # [B, Di, d_conv]
        x = F.silu(torch.mul(window, w["conv_w"]).sum(-1) + w["conv_b"])
        conv_state.copy_(window[:, :, 1:])
        dt, B, C = F.linear(x, w["dbc_w"], w["dbc_b"]).split([Di, N, N], dim=-1)  # dt (+ bias), B, C
        y = update_state(ssm_state, x, dt, w["A"], B, C, D=w["D"], z=z, dt_softplus=True,
                         impl=self.scan_path(x.device), check=False)
        return F.linear(y, self.out_proj.weight)

    def _step_weights(self) -> dict:
        """Weights in the form step() uses: A = -exp(A_log); the conv kernel as [Di, d_conv]; and
        x_proj's dt rows folded into dt_proj, so that one matmul with bias gives dt + dt_bias, B
        and C (dt differs from forward's two matmuls by fp32 rounding). Without grad (serving,
        where a step at batch 1 is a few dozen tiny ops whose dispatch is the whole cost) they
        are derived once and kept until a parameter changes (optimizer step, load_state_dict,
        .to()); with grad they are derived on each call, so gradients reach the parameters."""
        if torch.is_grad_enabled():
            return self._derive_step_weights()
        own, mods = self._parameters, self._modules  # direct lookups: this runs every step
        conv, xp, dtp = mods["conv1d"]._parameters, mods["x_proj"]._parameters, mods["dt_proj"]._parameters
        params = (own["A_log"], own["D"], conv["weight"], conv["bias"], xp["weight"], dtp["weight"], dtp["bias"])
        key = tuple((t.data_ptr(), t._version) for t in params)  # new data (to(), dtype) or in-place update
        cached = getattr(self, "_step_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = self._derive_step_weights()
        self._step_cache = (key, weights)
        return weights

    def _derive_step_weights(self) -> dict:
        R = self.dt_rank
        xw = self.x_proj.weight.float()
        dtype = self.x_proj.weight.dtype
        return {
            "A": -torch.exp(self.A_log.float()),
            "D": self.D.float(),
            "conv_w": self.conv1d.weight[:, 0, :],
            "conv_b": self.conv1d.bias,
            "dbc_w": torch.cat([self.dt_proj.weight.float() @ xw[:R], xw[R:]]).to(dtype),     # [Di + 2N, Di]
            "dbc_b": torch.cat([self.dt_proj.bias.float(), xw.new_zeros(2 * self.d_state)]).to(dtype),
        }


def _last_inputs(x: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor | None, k: int) -> torch.Tensor:
    """The k inputs before each row's end, oldest first, [B, Di, k]: x's (x [B, Di, L]) where the
    row has them, else the state's ``start`` [B, Di, k] (zeros when None) that precede x."""
    Bsz, Di = x.shape[:2]
    idx = lengths[:, None] + torch.arange(-k, 0, device=x.device)  # [B, k] into x; < 0: into the state

    def take(src, i):
        return src.gather(2, i[:, None, :].expand(Bsz, Di, k))

    window = take(x, idx.clamp(min=0))
    before = take(start, (idx + k).clamp(max=k - 1)) if start is not None else torch.zeros_like(window)
    return torch.where((idx >= 0)[:, None, :], window, before)


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(H, 4H) -> GELU -> dropout -> Linear(4H, H) -> dropout
    -> + input -> LayerNorm."""

    def __init__(self, d_model: int, inner_size: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = FastDropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.activation(self.w_1(input_tensor)))
        hidden = self.dropout(self.w_2(hidden))
        return self.LayerNorm(hidden + input_tensor)


class MambaLayer(nn.Module):
    """Mamba block -> dropout -> (+ the layer's input when ``residual``) -> LayerNorm, then the PFFN.

    The paper's code adds the residual around the block only when num_layers > 1, so a single
    layer normalises the block output alone; the model passes that rule in (its
    ``block_residual`` key, mamba4rec.model.block_residual) unless the config forces it.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float,
                 residual: bool, scan_impl: str = "auto"):
        super().__init__()
        self.residual = bool(residual)
        self.mamba = MambaBlock(d_model, d_state, d_conv, expand, scan_impl=scan_impl)
        self.dropout = FastDropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, inner_size=4 * d_model, dropout=dropout)

    def forward(self, input_tensor: torch.Tensor, lengths: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None, ssm_state: torch.Tensor | None = None):
        """[B, L, H] -> [B, L, H]; given ``lengths``, also the block's states after each row's
        length, starting from ``conv_state`` / ``ssm_state`` when given (see MambaBlock.forward)."""
        if lengths is None:
            return self._after_block(self.mamba(input_tensor), input_tensor)
        hidden, conv_state, ssm_state = self.mamba(input_tensor, lengths, conv_state, ssm_state)
        return self._after_block(hidden, input_tensor), conv_state, ssm_state

    def prefill(self, input_tensor: torch.Tensor, lengths: torch.Tensor):
        """forward(input_tensor, lengths): the output and the block's states after each row's length."""
        return self.forward(input_tensor, lengths)

    def step(self, x_t: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """forward() for one new position [B, H], states updated in place (see MambaBlock.step)."""
        return self._after_block(self.mamba.step(x_t, conv_state, ssm_state), x_t)

    def _after_block(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """What follows the block, per position (any leading shape): dropout, the residual when
        on, LayerNorm, the PFFN."""
        hidden = self.dropout(hidden)
        if self.residual:
            hidden = hidden + input_tensor
        return self.ffn(self.LayerNorm(hidden))
