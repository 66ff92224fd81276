"""Mamba4Rec's config keys: their defaults (the single source; configs/model/Mamba4Rec.yaml mirrors
them) and the check that reads them from a RecBole Config before any data work."""

from __future__ import annotations

import numbers

from mamba4rec.kernels import SCAN_IMPLS

from .checks import int_in
from .layers import DT_INITS

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
    "length_buckets": "auto",
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
        if key == "length_buckets" and v == "auto":
            continue
        if not int_in(v, 1):
            raise _bad(key, v, "it must be an integer >= 1" + (
                " or auto (groups of similar length chosen to minimise padding)" if key == "length_buckets" else ""))
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
