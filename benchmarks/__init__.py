"""Scripts that print figures (epoch time and memory, scans, streaming, evaluation, the loss).

Run each from the checkout's root as a module, so that it imports the mamba4rec beside it:
``python -m benchmarks.bench_epoch_cpu --help``.
"""
