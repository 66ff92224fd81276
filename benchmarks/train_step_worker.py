"""One contender of benchmarks/bench_train_step.py: a model, a train mode and a version of the code.

Run as a script by its path, with PYTHONPATH=<root of the code to time>: it then imports that
root's mamba4rec, the current checkout's or an older commit's extracted by ``git archive``
(whose module layout differs: before the move into mamba4rec/kernels the kernels were a
top-level package). So it imports nothing of benchmarks/ and uses only what every version
has: pipeline.build_config / build_model, sequence.SequenceTrainDataLoader / train_buckets /
sequence_loss, RecBole's trainer for the optimizer.

Protocol (stdout lines that start with ``@@``, JSON after it; anything else there is RecBole's):
the worker loads the data, builds the model and its batches, prints ``@@{"ready": ...}`` with
its settings and the batches' sizes, then per line ``step`` on stdin trains one step (zero_grad,
loss, backward, optimizer step) on its next batch, in order, cycling, and prints
``@@{"ms": ...}``; ``quit`` or end of input ends it. Nothing else runs while it waits, so the
parent can alternate contenders step by step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time

#: config keys reported with each contender (those the config lacks are left out)
REPORTED_KEYS = ("hidden_size", "num_layers", "d_state", "expand", "dropout_prob", "scan_impl", "length_buckets",
                 "ce_chunk_rows", "block_residual", "n_heads", "inner_size", "hidden_dropout_prob",
                 "attn_dropout_prob", "sequence_stride", "learning_rate", "learner", "loss_type")


class NotAvailable(RuntimeError):
    """This version of the code cannot run the asked contender (a train mode it does not have)."""


def say(obj) -> None:
    print("@@" + json.dumps(obj), flush=True)


def bucket_positions(lengths, n_buckets) -> int:
    """Positions a causal model computes over rows of these lengths run in ``n_buckets`` length
    buckets, each cut at its longest row (mamba4rec's length_buckets: sorted, stable, equal counts)."""
    import torch

    if n_buckets == "auto":  # the padding-optimal groups (code that has them: it is this code's key)
        from mamba4rec.causal import length_buckets

        return sum(len(idx) * int(lengths[idx].max()) for idx in length_buckets(lengths, "auto"))
    order = torch.argsort(lengths, stable=True)
    parts = torch.tensor_split(order, max(1, min(int(n_buckets), len(order))))
    return sum(len(idx) * int(lengths[idx].max()) for idx in parts if len(idx))


def sequence_mode(config, train, model):
    """train_mode=sequence: (batches, loss_of(batch), sizes(batch)). ``sizes`` gives
    (targets, rows, positions in the rows, positions computed: with the length buckets' padding)."""
    from mamba4rec import sequence

    loader = sequence.SequenceTrainDataLoader(config, train.dataset, train._sampler)
    buckets = sequence.train_buckets(model, config, "sequence")

    def loss_of(batch):
        return sequence.sequence_loss(model, batch, buckets)

    def sizes(batch):
        lengths = batch[model.ITEM_SEQ_LEN]
        n = getattr(model, "length_buckets", buckets)  # sequence.target_output's choice
        return (len(batch[model.POS_ITEM_ID]), len(lengths), int(lengths.sum()), bucket_positions(lengths, n))

    return loader, loss_of, sizes


def history_mode(config, train, model):
    """train_mode=history: what :func:`sequence_mode` returns, from that mode's loader and loss
    (mamba4rec.history). Positions computed: those the step runs the layers over, the no-gradient
    restart of a user that began in an earlier batch included, with the grouping's padding."""
    from mamba4rec import history

    loader = history.HistoryTrainDataLoader(config, train.dataset, train._sampler)
    chunk, _ = history.resolve_history(config)

    def loss_of(batch):
        return history.history_loss(model, batch, chunk)

    def sizes(batch):
        end, lo = batch[model.ITEM_SEQ_LEN], batch[history.FROM]
        earlier = lo[lo > 0].tolist()
        run = (end - lo).tolist()
        computed = history_positions(run, chunk) + history_positions(earlier, chunk)
        return (len(batch[model.POS_ITEM_ID]), len(end), sum(run) + sum(earlier), computed)

    return loader, loss_of, sizes


def history_positions(lengths, chunk) -> int:
    """Positions history.run_chunks computes over rows of these lengths: a wave of chunks at a time,
    the rows going on past a wave run whole, those ending in it in history.padding_groups."""
    from mamba4rec.history import padding_groups

    host = sorted(lengths, reverse=True)
    total = 0
    for start in range(0, host[0] if host else 0, chunk):
        going_on = sum(1 for n in host if n > start + chunk)
        ending = [n - start for n in host if start < n <= start + chunk]
        total += going_on * chunk + sum((b - a) * ending[a] for a, b in padding_groups(ending))
    return total


def history_exists() -> None:
    """Checked before the config is built, which would refuse a train mode it does not know."""
    from mamba4rec import sequence

    if "history" not in getattr(sequence, "TRAIN_MODES", ()):
        raise NotAvailable("this code has no train_mode=history (mamba4rec.sequence.TRAIN_MODES)")


#: train mode -> (config, RecBole train loader, model) -> (batches, loss_of, sizes)
MODES = {"sequence": sequence_mode, "history": history_mode}
#: train mode -> a check that this version of the code has it
PRECHECKS = {"history": history_exists}


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_memory() -> None:
    """Hand back to the system what the data set took: RecBole builds every prefix sample of the
    training data (ML-1M at L = 200: gigabytes), of which a worker keeps only its batches, and
    several workers wait side by side."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolved_scan(model) -> str | None:
    """The scan path a Mamba4Rec trains with on this CPU, as its version of the code resolves it."""
    impl = getattr(model, "scan_impl", None)
    if impl is None:
        return None
    import torch

    for name in ("mamba4rec.kernels", "kernels"):
        try:
            module = __import__(name, fromlist=["resolve_scan_impl"])
            return module.resolve_scan_impl(impl, torch.device("cpu"))[0]
        except (ImportError, AttributeError):
            continue
    return impl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train-mode", required=True, choices=sorted(MODES))
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--max-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batches", type=int, required=True, help="distinct batches to cycle through")
    p.add_argument("--scratch", required=True, help="checkpoint_dir (RecBole's trainer makes it)")
    p.add_argument("--init-from", help="a checkpoint (RecBole's best .pth) whose weights the model starts from")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed

    import mamba4rec
    from mamba4rec import pipeline

    t0 = time.perf_counter()
    cfg = {"train_mode": a.train_mode, "MAX_ITEM_LIST_LENGTH": a.max_len, "train_batch_size": a.batch_size,
           "data_path": a.data_path, "show_progress": False, "state": "ERROR", "checkpoint_dir": a.scratch}
    try:
        PRECHECKS.get(a.train_mode, lambda: None)()
        config = pipeline.build_config(a.model, a.dataset, config_dict=cfg)
        init_seed(config["seed"], config["reproducibility"])
        train, valid, test = data_preparation(config, create_dataset(config))
        model = pipeline.build_model(config, train.dataset)
        if a.init_from:
            state = torch.load(a.init_from, map_location="cpu", weights_only=False)
            model.load_state_dict(state.get("state_dict", state))
        loader, loss_of, sizes = MODES[a.train_mode](config, train, model)
    except NotAvailable as exc:
        say({"unavailable": str(exc)})
        return 0
    batches = []
    for batch in loader:
        batches.append(batch.to(config["device"]))
        if len(batches) >= a.batches:
            break
    per_epoch = len(loader)
    peak_load = rss_mib()
    del loader, train, valid, test
    release_memory()
    optimizer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model).optimizer
    model.train()
    counts = [sizes(b) for b in batches]
    settings = {}
    for key in REPORTED_KEYS:
        try:
            value = config[key]
        except KeyError:
            continue
        if value is not None:
            settings[key] = value
    if a.init_from:
        settings["init_from"] = os.path.basename(a.init_from)
    say({"ready": {
        "mamba4rec": mamba4rec.__file__, "load_s": round(time.perf_counter() - t0, 1), "settings": settings,
        "scan": resolved_scan(model), "params": sum(p.numel() for p in model.parameters()),
        "batches": len(batches), "batches_per_epoch": per_epoch,
        "rss_mib": {"loaded": round(peak_load), "kept": round(rss_mib())},
        "targets": sum(c[0] for c in counts), "rows": sum(c[1] for c in counts),
        "positions": sum(c[2] for c in counts), "computed": sum(c[3] for c in counts),
        "threads": torch.get_num_threads()}})
    i = 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        batch = batches[i % len(batches)]
        i += 1
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        ms = (time.perf_counter() - start) * 1e3
        if not torch.isfinite(loss):
            say({"error": f"non-finite loss {float(loss)}"})
            return 1
        say({"ms": ms, "loss": float(loss.detach())})
    return 0


if __name__ == "__main__":
    if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
        del sys.path[0]  # benchmarks/ of the checkout that holds this file: not the code being timed
    sys.exit(main())
