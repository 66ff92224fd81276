"""RecBole's quick-start entry points with RecBole's signatures and return values, on every
Python (``recbole.quick_start`` imports ray, which exists for Python 3.11 only).

    from mamba4rec.quick_start import run_recbole
    result = run_recbole(model="Mamba4Rec", dataset="ml-100k", config_dict={"epochs": 5})
    result["test_result"]  # {"hit@10": ..., "ndcg@10": ..., "mrr@10": ...}

Any model RecBole knows runs here too (``model="SASRec"``). They train through
:func:`mamba4rec.pipeline.run`, so they get this project's configs and checks, ``train_mode`` and
its per-user records; the one difference from RecBole's: overrides come from ``config_dict`` and
``config_file_list`` only, never from the script's own command line (``sys.argv``).
Where ray is installed, RecBole's own ``recbole.quick_start.run_recbole(model="Mamba4Rec")``
works too after ``import mamba4rec`` (mamba4rec.compat, note 11).
"""

from __future__ import annotations

import yaml


def _name(key, given, config_file_list, config_dict):
    """``model`` or ``dataset`` as RecBole's Config finds it: the argument, else the config dict,
    else the last config file that sets it."""
    if given is not None:
        return given
    if config_dict and config_dict.get(key) is not None:
        return config_dict[key]
    value = None
    for path in config_file_list or []:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if data.get(key) is not None:
            value = data[key]
    if value is None:
        raise ValueError(f"no {key} given: pass {key}=... or set {key!r} in config_dict or a config file")
    return value


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train ``model`` on ``dataset`` and test the best epoch, as ``recbole.quick_start.run_recbole``.

    Returns ``{"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}``
    (metrics as floats); ``queue``, when given, also receives it (for ``torch.multiprocessing``).
    """
    from . import pipeline

    model = _name("model", model, config_file_list, config_dict)
    dataset = _name("dataset", dataset, config_file_list, config_dict)
    config = pipeline.build_config(model, dataset, config_files=config_file_list, config_dict=config_dict)
    run = pipeline.run(model, dataset, saved=saved, config=config)
    result = {
        "best_valid_score": run.best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": run.best_valid_result,
        "test_result": run.test_result,
    }
    if queue is not None:
        queue.put(result)
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """One trial of a hyper-parameter search, as ``recbole.quick_start.objective_function``: the
    model and data set come from ``config_dict`` or the config files. Returns
    ``{"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}``."""
    model = _name("model", None, config_file_list, config_dict)
    result = run_recbole(model=model, config_file_list=config_file_list, config_dict=config_dict, saved=saved)
    model_name = model if isinstance(model, str) else model.__name__
    return {"model": model_name, **result}
