"""Training half of the self-check: Mamba4Rec and RecBole's SASRec trained side by side on the
same synthetic item sequences, batch for batch, with Adam: time per step, peak memory, the loss
at the start and the end, and a failure on any NaN or inf loss.

The sequences are learnable (each item is the previous one plus 1, 2 or 3, wrapping around), so
a working model's loss falls over a few hundred steps; the check only fails on a non-finite loss
(how far it falls is reported, not judged). Both models use their defaults: Mamba4Rec the
paper's (mamba4rec.model.MODEL_DEFAULTS), SASRec RecBole 1.2.1's (properties/model/SASRec.yaml),
CE over every item, hidden size 64.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass

import torch

MODELS = ("Mamba4Rec", "SASRec")
#: RecBole 1.2.1's SASRec defaults (recbole/properties/model/SASRec.yaml).
SASREC_DEFAULTS = {"n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.5,
                   "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                   "initializer_range": 0.02, "loss_type": "CE"}
WARMUP_STEPS = 3  # untimed: the first steps compile kernels (Triton, numba) and grow allocator pools


@dataclass(frozen=True)
class TrainShape:
    batch: int
    L: int
    n_items: int
    pool: int = 16  # distinct batches, cycled

    def as_dict(self) -> dict:
        return {"batch": self.batch, "L": self.L, "n_items": self.n_items}


class _Items:
    """The one thing RecBole's models ask of a dataset: the number of item ids (0 is padding)."""

    def __init__(self, n):
        self.n = n

    def num(self, field):
        return self.n


def make_batches(shape: TrainShape, device, seed: int = 0) -> list[dict]:
    """``shape.pool`` batches of left-aligned sequences (lengths 1..L, padding 0) and their next item."""
    g = torch.Generator().manual_seed(seed)
    n, L, b = shape.n_items - 1, shape.L, shape.batch  # real items are 1..n
    batches = []
    for _ in range(shape.pool):
        start = torch.randint(0, n, (b, 1), generator=g)
        steps = torch.randint(1, 4, (b, L + 1), generator=g)
        items = (start + steps.cumsum(1)) % n + 1  # (b, L + 1)
        lens = torch.randint(1, L + 1, (b,), generator=g)
        seq = items[:, :L] * (torch.arange(L)[None] < lens[:, None])
        target = items.gather(1, lens[:, None])[:, 0]
        batches.append({"item_id_list": seq.to(device), "item_length": lens.to(device), "item_id": target.to(device)})
    return batches


def build_model(name: str, shape: TrainShape, device, seed: int = 0):
    from mamba4rec import Mamba4Rec

    config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
              "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": shape.L,
              "device": device}
    torch.manual_seed(seed)
    if name == "Mamba4Rec":
        return Mamba4Rec(config, _Items(shape.n_items)).to(device)
    if name == "SASRec":
        from recbole.model.sequential_recommender import SASRec

        return SASRec({**config, **SASREC_DEFAULTS}, _Items(shape.n_items)).to(device)
    raise ValueError(f"unknown model {name!r}; the self-check trains {', '.join(MODELS)}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name: str, precision: str, shape: TrainShape, steps: int, batches: list[dict], device) -> dict:
    """WARMUP_STEPS + ``steps`` Adam steps of model ``name`` (``precision`` "fp32", or "bf16":
    the forward and loss under CUDA bf16 autocast); the last ``steps`` are timed."""
    from mamba4rec.memory import PeakMemory

    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    losses = []
    with PeakMemory() as mem:
        model = build_model(name, shape, device)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in range(WARMUP_STEPS + steps):
            if i == WARMUP_STEPS:
                _sync(device)
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = model.calculate_loss(batches[i % len(batches)])
            loss.backward()
            opt.step()
            losses.append(loss.detach().float())
        _sync(device)
        seconds = time.perf_counter() - start
    values = torch.stack(losses).cpu().tolist()
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    k = max(1, min(10, len(values) // 2))
    row = {"model": name, "precision": precision, "steps": steps, "warmup_steps": WARMUP_STEPS,
           "ms_per_step": seconds / steps * 1e3, "params": sum(p.numel() for p in model.parameters()),
           "loss_first": sum(values[:k]) / k, "loss_last": sum(values[-k:]) / k,
           "nonfinite_steps": len(bad), "passed": not bad,
           "error": f"non-finite loss at step {bad[0]} ({values[bad[0]]})" if bad else None}
    if name == "Mamba4Rec":
        row["scan_path"] = _scan_path(device)
    if cuda:
        row.update(memory="torch.cuda.max_memory_allocated, above what was allocated before the model",
                   peak_mib=(torch.cuda.max_memory_allocated(device) - base) / 2**20)
    else:
        row.update(memory="growth of the process's resident memory while building and training "
                          "(mamba4rec.memory.PeakMemory)", peak_mib=mem.growth_mib)
    del model, opt
    return row


def _scan_path(device) -> str:
    from mamba4rec.kernels import resolve_scan_impl

    return resolve_scan_impl("auto", device)[0]


def _train_in_child(name: str, precision: str, shape: TrainShape, steps: int, threads: int) -> dict:
    """train() in a process of its own (CPU): its resident memory is this model's alone."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    return train(name, precision, shape, steps, make_batches(shape, device), device)


def run_training(shape: TrainShape, steps: int, precisions, device, log=print, isolate: bool = False,
                 models=MODELS) -> list[dict]:
    """Each model in each precision, on the same batches, one row each.

    ``isolate`` (CPU): each training runs in a fresh process (spawned, at this process's torch
    thread count) so that the resident-memory growth is that model's, not shaped by what the
    model before it left in the allocator; the batches are drawn there from the same seed."""
    import concurrent.futures
    import multiprocessing

    if isolate and device.type != "cpu":
        raise ValueError(f"isolate=True measures process memory on CPU; {device} has its own allocator statistics")
    batches = None if isolate else make_batches(shape, device)
    rows = []
    for precision in precisions:
        for name in models:
            try:
                if isolate:
                    with concurrent.futures.ProcessPoolExecutor(
                            1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        row = pool.submit(_train_in_child, name, precision, shape, steps,
                                          torch.get_num_threads()).result()
                else:
                    row = train(name, precision, shape, steps, batches, device)
            except Exception as exc:  # a model that cannot train here fails the check, with the reason
                row = {"model": name, "precision": precision, "steps": steps, "passed": False,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
                if device.type == "cuda" and isinstance(exc, torch.OutOfMemoryError):
                    torch.cuda.empty_cache()
            rows.append(row)
            log(f"  {name:9s} {precision} " + (
                f"{row['ms_per_step']:8.2f} ms/step  peak {row['peak_mib']:7.1f} MiB  "
                f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}" if row.get("ms_per_step") is not None
                else "") + ("" if row["passed"] else f"  FAIL {row['error']}"))
    return rows
