"""mamba4rec.significance: the paired interval, the verdict, and the recording of RecBole's
per-user metric values."""

from __future__ import annotations

import numpy as np
import pytest

from mamba4rec import significance as sig


def test_paired_difference_is_the_mean_difference_with_its_normal_interval():
    a = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    mean, lo, hi = sig.paired_difference(a, b)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert mean == pytest.approx(2 / 6) and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)
    with pytest.raises(ValueError, match="same length"):
        sig.paired_difference(a, b[:-1])


def test_describe_calls_an_interval_excluding_zero_significant():
    rng = np.random.default_rng(0)
    base = rng.random(5000)
    better = base + 0.01 + rng.normal(0, 0.01, 5000)   # consistently higher
    noisy = base + rng.normal(0, 0.2, 5000)            # same mean, large spread
    assert sig.describe("ndcg@10", "A", "B", better, base).endswith(": significant")
    assert sig.describe("ndcg@10", "A", "B", noisy, base).endswith(": not significant")
    assert "over 5,000 users" in sig.describe("hit@10", "A", "B", noisy, base)


def test_recording_keeps_recboles_per_user_values_and_restores_the_metrics():
    from recbole.config import Config
    from recbole.evaluator import metrics

    Config.compatibility_settings(None)  # the numpy aliases RecBole's metrics use (any Config sets them)
    originals = {name: getattr(metrics, name).metric_info for name in ("Hit", "MRR", "NDCG")}
    # three users, top-3 lists: hit at rank 1, at rank 3, no hit
    pos_index = np.array([[True, False, False], [False, False, True], [False, False, False]])
    pos_len = np.array([1, 1, 1])
    config = {"topk": [1, 3], "metric_decimal_place": 4}
    with sig.recording([1, 3]) as per_user:
        metrics.NDCG(config).metric_info(pos_index, pos_len)
        metrics.Hit(config).metric_info(pos_index)
        metrics.MRR(config).metric_info(pos_index)
    assert {name: getattr(metrics, name).metric_info for name in originals} == originals
    assert per_user["hit@1"].tolist() == [1, 0, 0] and per_user["hit@3"].tolist() == [1, 1, 0]
    assert per_user["mrr@3"].tolist() == pytest.approx([1, 1 / 3, 0])
    assert per_user["ndcg@3"].tolist() == pytest.approx([1, 0.5, 0])
    assert sig.consistent(per_user, {"hit@3": 0.6667, "mrr@3": 0.5}) == {"hit@3": per_user["hit@3"]}
