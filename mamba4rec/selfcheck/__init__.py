"""A self-check any user can run on their own machine: ``python -m mamba4rec.selfcheck``.

On the device it is given (CUDA or CPU) it

1. checks every scan path available there (CUDA: triton, torch, ref; CPU: numba when installed,
   torch, ref, and the Triton kernels through Triton's interpreter on tiny shapes when asked
   for) and each ``update_state`` path against the fp32 reference: output, last state and every
   gradient, in fp32 (and bf16 on CUDA), at the tolerances of mamba4rec/kernels/tolerances.py
   (correctness.py);
2. times each scan path against the torch scan and against the memory-traffic bound of the scan
   at a copy bandwidth it measures itself (timing.py);
3. trains Mamba4Rec and SASRec side by side on the same synthetic batches: time per step, peak
   memory, loss; fp32 (and bf16 autocast on CUDA); a NaN or inf loss fails (training.py);
4. writes selfcheck.json and selfcheck.md into --out (report.py), prints the markdown, and exits
   1 when a check failed (2 on a bad option).

Options: cli.py (``python -m mamba4rec.selfcheck --help``); docs/SELFCHECK.md has a CPU run.
"""

from .cli import PROFILES, main

__all__ = ["PROFILES", "main"]
