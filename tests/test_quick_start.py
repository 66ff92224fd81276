"""RecBole's quick-start entry points with Mamba4Rec by name: this project's own (every Python)
and RecBole's (where ray is installed, which recbole.quick_start imports)."""

from __future__ import annotations

import importlib.util
import inspect
import queue

import pytest

from mamba4rec import Mamba4Rec, quick_start
from tests.conftest import tiny_config_dict

KEYS = {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
METRICS = {"hit@10", "ndcg@10", "mrr@10"}


def _check(result, plain=True):
    """RecBole's return value; this project's metrics are plain floats (RecBole's: numpy's)."""
    assert set(result) == KEYS and result["valid_score_bigger"] is True
    assert set(result["test_result"]) == METRICS and set(result["best_valid_result"]) == METRICS
    assert all((type(v) is float or not plain) and 0.0 <= float(v) <= 1.0 for v in result["test_result"].values())
    assert abs(result["best_valid_score"] - result["best_valid_result"]["ndcg@10"]) <= 5e-5


def test_run_recbole_and_objective_function_of_this_project(in_tmp, one_thread):
    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    result = quick_start.run_recbole(model="Mamba4Rec", dataset="tiny", config_dict=cfg)
    _check(result)

    out = queue.Queue()
    sasrec = quick_start.run_recbole(model="SASRec", dataset="tiny", config_dict=cfg, queue=out)
    _check(sasrec)
    assert out.get_nowait() == sasrec and sasrec["test_result"] != result["test_result"]

    found = quick_start.objective_function(config_dict={**cfg, "model": "Mamba4Rec", "dataset": "tiny"})
    assert found["model"] == "Mamba4Rec" and set(found) == KEYS | {"model"}
    assert found["test_result"] == result["test_result"]  # same seed, same settings

    (in_tmp / "m.yaml").write_text("model: Mamba4Rec\ndataset: tiny\n")  # names from a config file
    _check(quick_start.run_recbole(config_file_list=[str(in_tmp / "m.yaml")], config_dict=cfg))

    with pytest.raises(ValueError, match="no model given: pass model=... or set 'model'"):
        quick_start.objective_function(config_dict={**cfg, "dataset": "tiny"})
    with pytest.raises(ValueError, match="no dataset given"):
        quick_start.run_recbole(model="Mamba4Rec", config_dict=cfg)


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed: recbole.quick_start imports it (Python 3.11 only)")


@needs_ray
def test_recbole_quick_start_runs_mamba4rec_by_name(in_tmp, one_thread):
    """RecBole's own run_recbole and objective_function find Mamba4Rec by name and by class
    (mamba4rec.compat, note 11); this project's have their signatures."""
    from recbole import quick_start as recbole_quick_start

    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    for model in ("Mamba4Rec", Mamba4Rec):
        _check(recbole_quick_start.run_recbole(model=model, dataset="tiny", config_dict=cfg), plain=False)
    found = recbole_quick_start.objective_function(config_dict={**cfg, "model": "Mamba4Rec", "dataset": "tiny"})
    assert found["model"] == "Mamba4Rec" and set(found["test_result"]) == METRICS
    for name in ("run_recbole", "objective_function"):
        assert inspect.signature(getattr(quick_start, name)) == inspect.signature(getattr(recbole_quick_start, name))
