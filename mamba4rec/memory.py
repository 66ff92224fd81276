"""The one peak-memory sampler: used by comparisons (mamba4rec.compare) and the benchmarks."""

from __future__ import annotations

import os
import sys
import threading


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux); elsewhere its lifetime maximum."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the process-wide maximum is the best we have
        try:
            import resource
        except ImportError:  # Windows: no figure rather than a wrong one
            return 0.0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every
    ``interval`` seconds by a thread: ``base_mib`` at entry, ``peak_mib``, ``growth_mib`` (peak -
    base); plus ``cuda_peak_mib`` when a GPU is in use."""

    def __init__(self, interval=0.05):
        self.interval, self.peak_mib, self.cuda_peak_mib = interval, 0.0, None
        self.base_mib = 0.0
        self._stop = threading.Event()

    rss_mib = staticmethod(rss_mib)

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.base_mib

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.base_mib = self.peak_mib = rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())
        if torch.cuda.is_available():
            self.cuda_peak_mib = torch.cuda.max_memory_allocated() / 2**20
        return False
