"""Shared fixtures: a tiny RecBole data set and a config that trains in about a second."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
TINY_DATA = TESTS / "data"
#: ../shared/datasets beside the checkout (real benchmark data); tests using it skip without it.
SHARED_DATASETS = TESTS.parents[1] / "shared" / "datasets"

#: One intra-op thread by default: the tests' tensors are tiny, and a second thread only adds a
#: barrier to every op, which costs milliseconds per op (minutes over the suite) whenever the
#: other core is busy. Tests of our parallel kernels ask for two (the ``two_threads`` fixture).
torch.set_num_threads(1)

# Property tests draw the same cases on every run by default, so a test run (and CI) is
# reproducible: a case that fails, fails again. HYPOTHESIS_PROFILE=explore draws fresh random
# cases each run to hunt for new failures; pin what it finds with @example.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("deterministic", derandomize=True, print_blob=True)
_hyp_settings.register_profile("explore", derandomize=False, print_blob=True)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def tiny_config_dict(tmp_path, **overrides):
    cfg = {
        "data_path": str(TINY_DATA),
        "checkpoint_dir": str(tmp_path / "saved"),
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 16,
        "d_state": 4,
        "show_progress": False,
        "state": "WARNING",
        "stopping_step": 2,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    }
    cfg.update(overrides)
    return cfg


def count_applies(monkeypatch, function_class) -> list:
    """A list that gets one entry per call of ``function_class.apply`` (an autograd Function of
    ours) for the rest of the test: which calls really ran the compiled kernels."""
    calls = []
    real = function_class.apply
    monkeypatch.setattr(function_class, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture(autouse=True)
def _no_anomaly_detection():
    """RecBole's sine.py calls torch.autograd.set_detect_anomaly(True) when
    recbole.model.sequential_recommender is imported (collecting test_sequence does it; so does
    any model lookup), and it stays on for the process: every autograd op then records a Python
    traceback, which made tiny trainings and gradchecks in the suite several times slower (a
    gradcheck of the reference: 1 s alone, 15 s after it). No test relies on it; off for each,
    the import done first where RecBole is loaded already, so that it cannot happen mid-test."""
    if "recbole" in sys.modules:
        import recbole.model.sequential_recommender  # noqa: F401
    torch.autograd.set_detect_anomaly(False)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary folder: RecBole writes ./log/ into the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """One intra-op thread for this test: the tiny trainings take 0.1 s on one thread and
    seconds on two busy cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def two_threads():
    """Two intra-op threads (numba's parallel kernels follow torch's count) for this test."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One model trained once per test session, for tests that only read a trained model or its
    files: one epoch of Mamba4Rec (scan_impl=torch) on tests/data/tiny through pipeline.run,
    with a serving export. Returns the RunResult, the export, RecBole's best checkpoint, the
    resumable -last.pth, the config dict and the folder. Read these files; copy before changing."""
    import mamba4rec.pipeline as pipeline

    tmp = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(tmp)  # RecBole writes ./log/
    try:
        cfg = tiny_config_dict(tmp, scan_impl="torch")
        export = tmp / "export" / "tiny.pt"
        result = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, export_path=str(export))
    finally:
        os.chdir(cwd)
    return {"result": result, "export": export, "recbole": Path(result.saved_model_file),
            "last": tmp / "saved" / "Mamba4Rec-tiny-last.pth", "config": cfg, "tmp": tmp}
