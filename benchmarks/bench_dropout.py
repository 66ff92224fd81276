"""Dropout on CPU, side by side in one process: torch's ``F.dropout`` against
mamba4rec.kernels.fast_dropout's compiled mask (the `fast` extra), forward + backward, at several
tensor sizes.

    python -m benchmarks.bench_dropout                               # 1 thread, 1 k to 1 M elements
    python -m benchmarks.bench_dropout --sizes 4096,8192,16384 --threads 2 --repeats 400

Each round times one forward + backward of each (torch first in odd rounds, the compiled path
first in even ones) so that a busy machine slows them alike. Prints, per size: the medians in
microseconds, torch's per element, their ratio, and the compiled mask's own loop alone (the
kernel called on numpy arrays: the hashes, the mask and the scaling) per element. Where torch is
faster, fast_dropout.MIN_ELEMENTS should be above that size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,8192,16384,65536,262144,1048576")
    p.add_argument("--p", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args(argv)

    from mamba4rec.kernels import fast_dropout, numba_scan
    from mamba4rec.pipeline import cpu_name

    if not numba_scan.available():
        p.error("the compiled dropout needs numba: pip install 'mamba4rec-recbole[fast]'")
    torch.set_num_threads(a.threads)
    print(f"# {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, p = {a.p}, "
          f"{a.repeats} rounds a size; fast_dropout.MIN_ELEMENTS = {fast_dropout.MIN_ELEMENTS}")
    print("| elements | torch us | compiled us | torch / compiled | torch ns/element | compiled loop ns/element |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in a.sizes.split(",")):
        x = torch.randn(n, requires_grad=True)
        g = torch.randn(n)

        def torch_step():
            F.dropout(x, a.p, True).backward(g)

        def compiled_step():
            fast_dropout._Dropout.apply(x, a.p).backward(g)

        steps = {"torch": torch_step, "compiled": compiled_step}
        times = {k: [] for k in steps}
        for f in steps.values():  # the first call compiles or loads the kernel
            f()
        for r in range(a.repeats):
            for name in (("torch", "compiled") if r % 2 == 0 else ("compiled", "torch")):
                x.grad = None
                t = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t)
        kernel = fast_dropout._compile()
        xs, out = x.detach().numpy(), np.empty(n, np.float32)
        args = (xs, np.uint64(12345), np.int64(fast_dropout._threshold(a.p)), np.float32(1.25), out)
        numba_scan._run(kernel, *args)
        loop = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            numba_scan._run(kernel, *args)
            loop.append(time.perf_counter() - t)
        t_torch, t_comp = statistics.median(times["torch"]), statistics.median(times["compiled"])
        print(f"| {n:,} | {t_torch * 1e6:.0f} | {t_comp * 1e6:.0f} | {t_torch / t_comp:.2f} | "
              f"{t_torch / n * 1e9:.2f} | {statistics.median(loop) / n * 1e9:.2f} |")


if __name__ == "__main__":
    main()
