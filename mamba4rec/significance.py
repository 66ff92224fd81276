"""Per-user test metrics, and whether the difference between two models is more than noise.

A comparison's table gives one number per model and metric: NDCG@10 0.0300 against 0.0290 on
22,000 test users says nothing about whether another seed, or another sample of users, would
rank them the same way. Both models are evaluated on the same users (same data set, split and
evaluation order), so the per-user differences are paired: their mean is the difference in the
table, and its standard error gives a 95% interval (normal approximation, fine for thousands of
users). An interval that excludes 0 is called significant here; this is about the sample of
users, not about training noise (one seed per model).

The per-user values are RecBole's own: :func:`recording` keeps the per-user arrays its Hit, MRR
and NDCG metrics compute before averaging, so their means are RecBole's reported figures.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

#: RecBole metric classes whose per-user values are recorded (their metric_info returns
#: an array [users, max k] of the metric at every cut-off 1..max k)
_METRICS = ("Hit", "MRR", "NDCG")


@contextlib.contextmanager
def recording(topk):
    """While the block runs, keep the per-user values of hit/mrr/ndcg at each k in ``topk``:
    the dict yielded is filled when the block ends ({"ndcg@10": array of one value per user})."""
    from recbole.evaluator import metrics

    from .compat import metric_info_hook

    topk = [topk] if isinstance(topk, int) else list(topk)
    seen, out = {}, {}
    classes = [getattr(metrics, name) for name in _METRICS]
    try:
        with metric_info_hook(classes, lambda cls, result: seen.__setitem__(cls.__name__.lower(), result)):
            yield out
    finally:
        for key, result in seen.items():
            for k in topk:
                if k <= result.shape[1]:
                    out[f"{key}@{k}"] = np.asarray(result[:, k - 1], dtype=np.float64)


def paired_difference(a, b, z=1.96) -> tuple[float, float, float]:
    """Mean of a - b over paired users and its ``z`` (default 95%) normal interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_difference needs two 1-d arrays of the same length >= 2, got {a.shape} and {b.shape}")
    d = a - b
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def describe(metric, model, baseline, a, b) -> str:
    """One line: the difference ``model`` - ``baseline`` in ``metric``, its interval and verdict."""
    mean, lo, hi = paired_difference(a, b)
    verdict = "significant" if lo > 0 or hi < 0 else "not significant"
    return (f"- test_{metric}, {model} - {baseline}: {mean:+.4f} (95% interval {lo:+.4f} .. {hi:+.4f} "
            f"over {len(a):,} users): {verdict}")


def consistent(per_user: dict, reported: dict, places: int = 4) -> dict:
    """The arrays whose mean is the figure RecBole reported (rounded to ``places``): a check
    that they are the test evaluation's own, not another call's."""
    tol = 0.5 * 10 ** -places + 1e-12
    return {k: v for k, v in per_user.items() if k in reported and abs(float(np.mean(v)) - float(reported[k])) <= tol}
