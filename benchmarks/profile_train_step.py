#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over a few steps of one contender of
benchmarks/bench_train_step.py (the same config, batches and step), grouped into the CE over
all items, the selective scan, dropout, the depthwise conv, the optimizer and the rest.

    python -m benchmarks.profile_train_step --dataset ml-1m --data-path DIR --train-mode history
    python -m benchmarks.profile_train_step --dataset amazon-beauty --data-path DIR --train-mode sequence --steps 10

DIR: RecBole's data_path (DIR/<dataset>/<dataset>.inter; bench_train_step prepares the raw
files of ../shared/datasets into its temp folder, /tmp/mamba4rec-bench/dataset). Mamba4Rec only
(the groups are its operations). --warmup steps first (numba loads its kernels), then --steps
profiled steps; prints the groups' share of the profiled CPU time and ms per step, then
torch.profiler's own table of the top operations by self time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

#: group -> (operations whose CPU time *including their children* counts, operations whose own time counts)
GROUPS = {
    "CE over all items (its matrix products included)": (("_ChunkedSoftmaxCE", "_ChunkedSoftmaxCEBackward"), ()),
    "selective scan, forward and backward": (("_SelectiveScanNumba", "_SelectiveScanNumbaBackward",
                                              "SelectiveScanFn", "SelectiveScanFnBackward"), ()),
    "dropout": (("_Dropout", "_DropoutBackward"), ("aten::bernoulli_",)),
    "depthwise conv": (("_CausalConvSiLU", "_CausalConvSiLUBackward"),
                       ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_conv_depthwise2d",
                        "aten::thnn_conv2d")),
    "optimizer": (("Optimizer.step#Adam.step",), ()),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--train-mode", default="history", choices=["history", "sequence"])
    p.add_argument("--max-len", type=int, default=None, help="default: the paper's (bench_train_step.MAX_LEN)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=20, help="rows of torch.profiler's table")
    a = p.parse_args(argv)

    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_train_step import MAX_LEN
    from benchmarks.train_step_worker import MODES
    from mamba4rec import pipeline
    from mamba4rec.pipeline import cpu_name

    torch.set_num_threads(a.threads)
    max_len = a.max_len or MAX_LEN.get(a.dataset) or p.error(f"--max-len: no default for {a.dataset}")
    cfg = {"train_mode": a.train_mode, "MAX_ITEM_LIST_LENGTH": max_len, "train_batch_size": a.batch_size,
           "data_path": os.path.abspath(a.data_path), "show_progress": False, "state": "ERROR"}
    config = pipeline.build_config("Mamba4Rec", a.dataset, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    model = pipeline.build_model(config, train.dataset)
    loader, loss_of, _ = MODES[a.train_mode](config, train, model)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= a.warmup + a.steps:
            break
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        # RecBole's trainer opens a tensorboard folder (log_tensorboard/) in the working directory
        optimizer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model).optimizer
    model.train()

    def step(batch):
        optimizer.zero_grad()
        loss_of(batch).backward()
        optimizer.step()

    for batch in batches[:a.warmup]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[a.warmup:]:
            step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    n = len(batches) - a.warmup
    print(f"# {cpu_name()}, {torch.get_num_threads()} thread(s); Mamba4Rec train_mode={a.train_mode}, {a.dataset}, "
          f"L={max_len}, {a.batch_size} targets a step; {n} profiled steps, {total / 1e3 / n:.1f} ms a step under "
          f"the profiler")
    print("| group | share | ms/step |\n|---|---|---|")
    counted = 0.0
    for name, (with_children, own) in GROUPS.items():
        t = sum(e.cpu_time_total for e in events if e.key in with_children)
        t += sum(e.self_cpu_time_total for e in events if e.key in own)
        counted += t
        print(f"| {name} | {t / total:.0%} | {t / 1e3 / n:.1f} |")
    rest = total - counted
    print(f"| the rest (the layers' matrix products, elementwise passes, indexing) | {rest / total:.0%} | "
          f"{rest / 1e3 / n:.1f} |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
