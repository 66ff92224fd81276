"""Models for the compare(isolate=True) tests. They must live in an importable module: each
model trains in a spawned process, which imports its class by name."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from recbole.model.sequential_recommender import GRU4Rec

_KEPT = []  # what HogGRU4Rec leaves behind in its process


class KilledGRU4Rec(GRU4Rec):
    """Its process is killed as it builds the model (as the kernel's OOM killer would)."""

    def __init__(self, config, dataset):
        os.kill(os.getpid(), signal.SIGKILL)


class HogGRU4Rec(GRU4Rec):
    """GRU4Rec that leaves 256 MiB of touched memory in its process."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        _KEPT.append(np.ones(256 * 2**20 // 8))


class SleepyGRU4Rec(GRU4Rec):
    """Writes its process id to $SLEEPY_PID_FILE, then sleeps (a training that takes long)."""

    def __init__(self, config, dataset):
        with open(os.environ["SLEEPY_PID_FILE"], "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(120)
