"""kernels.numba_env: a kernel's first call in a process runs under an inter-process lock."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mamba4rec.kernels import numba_env

numba = pytest.importorskip("numba", reason="the compiled kernels need numba (the fast extra)")


def test_only_a_kernels_first_call_takes_the_compile_lock(monkeypatch, tmp_path):
    taken = []
    real = numba_env.compile_lock

    def recording(path=None):
        taken.append(1)
        return real(tmp_path / "lock")

    monkeypatch.setattr(numba_env, "compile_lock", recording)

    @numba.njit
    def double(a, out):
        for i in range(a.shape[0]):
            out[i] = 2 * a[i]

    out = np.zeros(3)
    numba_env.run(double, np.arange(3.0), out)
    numba_env.run(double, np.arange(3.0), out)
    assert taken == [1] and out.tolist() == [0.0, 2.0, 4.0]


def test_the_compile_lock_excludes_another_process(tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="the lock is POSIX flock")
    path = tmp_path / "lock"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom mamba4rec.kernels.numba_env import compile_lock\n"
         f"with compile_lock({str(path)!r}):\n    print('held', flush=True)\n    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with open(path, "a") as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == 0
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the child's block
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        if child.poll() is None:
            child.kill()
