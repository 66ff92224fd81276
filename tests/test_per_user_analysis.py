"""experiments.per_user_analysis: its numpy parts on synthetic arrays (no real data); and
experiments.checkpoint_analysis (its checkpoint mode) on two models trained on tests/data/tiny."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import checkpoint_analysis as ca
from experiments import per_user_analysis as pua
from mamba4rec.significance import paired_difference


def _metrics(rank):
    """RecBole's per-user HR/NDCG/MRR@10 of test-item ranks (0: not in the top 10), as float32."""
    rank = np.asarray(rank)
    hit = (rank > 0).astype(np.float32)
    ndcg = np.where(rank > 0, 1 / np.log2(np.maximum(rank, 1) + 1), 0).astype(np.float32)
    mrr = np.where(rank > 0, 1 / np.maximum(rank, 1), 0).astype(np.float32)
    return {"hit@10": hit.astype(np.float64), "ndcg@10": ndcg.astype(np.float64), "mrr@10": mrr.astype(np.float64)}


def test_ranks_from_mrr_recovers_every_rank_and_checks_hr_and_ndcg():
    rank = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 2])
    m = _metrics(rank)
    np.testing.assert_array_equal(pua.ranks_from_mrr(m["mrr@10"], m["hit@10"], m["ndcg@10"]), rank)
    swapped = m["ndcg@10"].copy()
    swapped[[2, 3]] = swapped[[3, 2]]  # ranks 2 and 3: MRR says one, NDCG the other
    with pytest.raises(ValueError, match="NDCG"):
        pua.ranks_from_mrr(m["mrr@10"], m["hit@10"], swapped)
    hit = m["hit@10"].copy()
    hit[0] = 1.0
    with pytest.raises(ValueError, match="HR"):
        pua.ranks_from_mrr(m["mrr@10"], hit, m["ndcg@10"])
    with pytest.raises(ValueError, match="not 1/rank"):
        pua.ranks_from_mrr([0.4, 1.0])  # 1/2.5
    with pytest.raises(ValueError, match="not 1/rank"):
        pua.ranks_from_mrr([1 / 11])  # past k


def test_length_buckets_edges_are_inclusive_upper_bounds():
    lengths = [1, 3, 4, 5, 6, 8, 9, 15, 16, 50, 51, 200]
    idx, labels = pua.length_buckets(lengths, (3, 5, 8, 15, 50))
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert labels == ["<=3", "4-5", "6-8", "9-15", "16-50", ">50"]
    assert pua.length_buckets([4], (3, 4))[1] == ["<=3", "4", ">4"]
    with pytest.raises(ValueError):
        pua.length_buckets([1], (5, 5))


def test_bigram_ranks_count_ties_against_the_target_and_stay_within_sequences():
    train = [["a", "b"], ["a", "b", "x"], ["a", "c"], ["q", "a", "c"], ["a", "d"], ["x", "y"], ["x", "y"], ["e"], ["f"]]
    # successors of a: b 2, c 2, d 1; of x: y 2; of b: x 1
    queries = [("a", "b"), ("a", "c"), ("a", "d"), ("x", "y"), ("b", "x"), ("a", "e"), ("e", "f"), ("zz", "a")]
    assert pua.bigram_ranks(train, queries).tolist() == [2, 2, 3, 1, 1, 0, 0, 0]
    groups = pua.transition_groups(np.array([1, 2, 10, 11, 0]))
    assert groups["seen, bigram top-1"].tolist() == [True, False, False, False, False]
    assert groups["seen, bigram rank 2-10"].tolist() == [False, True, True, False, False]
    assert groups["seen, bigram rank >10"].tolist() == [False, False, False, True, False]
    assert groups["unseen"].tolist() == [False, False, False, False, True]


def test_bucket_rows_means_paired_differences_and_shares():
    rng = np.random.default_rng(0)
    n = 400
    rank_a, rank_b = rng.integers(0, 11, n), rng.integers(0, 11, n)
    values = {"A": _metrics(rank_a), "B": _metrics(rank_b)}
    buckets = rng.integers(0, 3, n)
    rows = pua.bucket_rows(buckets, ["x", "y", "z"], values, ["A", "B"], paired_difference)
    assert [r["bucket"] for r in rows] == ["x", "y", "z", "all"]
    assert sum(r["users"] for r in rows[:3]) == n and rows[-1]["share"] == 1.0
    for j, r in enumerate(rows[:3]):
        s = buckets == j
        assert r[("A", "mrr@10")] == pytest.approx(values["A"]["mrr@10"][s].mean())
        d = values["A"]["ndcg@10"][s] - values["B"]["ndcg@10"][s]
        assert r[("diff", "B", "ndcg@10")][0] == pytest.approx(d.mean())
        half = 1.96 * d.std(ddof=1) / np.sqrt(s.sum())
        assert r[("diff", "B", "ndcg@10")][2] == pytest.approx(d.mean() + half)
    total = np.sum((rank_a > 0).astype(int) - (rank_b > 0))
    for j, r in enumerate(rows[:3]):
        s = buckets == j
        assert r[("share", "B")] == pytest.approx(np.sum((rank_a[s] > 0).astype(int) - (rank_b[s] > 0)) / total)
    assert sum(r[("share", "B")] for r in rows[:3]) == pytest.approx(1.0)


def test_rank_rows_and_cross_tab():
    ra = np.array([1, 1, 2, 5, 6, 0, 0, 10])
    rb = np.array([2, 1, 2, 0, 7, 0, 3, 1])
    rows = {r["rank"]: r for r in pua.rank_rows({"A": ra, "B": rb}, ["A", "B"], len(ra))}
    assert rows["1"]["A"] == (2 / 8, 2) and rows["2"]["B"] == (2 / 8, 2)
    assert rows["2-5"]["A"][1] == 2 and rows["6-10"]["A"][1] == 2 and rows["<=10"]["B"][1] == 6
    tab = pua.cross_tab(ra, rb)  # classes 1, 2-5, 6-10, >10
    assert tab.sum() == len(ra)
    assert tab.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_check_order_accepts_the_leave_one_out_split_and_names_what_is_off():
    seqs = {"u1": ["i1", "i2", "i3", "i4"], "u2": ["i2", "i5", "i6"], "u3": [f"i{k}" for k in range(10)]}
    users = np.array(["u1", "u2", "u3"])
    targets, lasts = np.array(["i4", "i6", "i9"]), np.array(["i3", "i5", "i8"])
    lengths = np.array([3, 2, 5])  # min(n - 1, 5)
    pua.check_order((users, targets, lasts, lengths, 5), seqs, 3)
    for bad, what in [((users, np.array(["i4", "i5", "i9"]), lasts, lengths, 5), "target"),
                      ((users, targets, np.array(["i3", "i5", "i7"]), lengths, 5), "last input item"),
                      ((users, targets, lasts, np.array([3, 2, 9]), 5), "item_length"),
                      ((users[::-1], targets, lasts, lengths, 5), "target")]:
        with pytest.raises(SystemExit, match=what):
            pua.check_order(bad, seqs, 3)
    with pytest.raises(SystemExit, match="per-user values"):
        pua.check_order((users, targets, lasts, lengths, 5), seqs, 4)


def test_model_mode_reads_mode_slash_name_or_takes_the_default():
    assert pua.model_mode("history/Mamba4Rec", None) == ("history", "Mamba4Rec")
    assert pua.model_mode("sequence/Mamba4Rec-2layers", "history") == ("sequence", "Mamba4Rec-2layers")
    assert pua.model_mode("SASRec", "sequence") == ("sequence", "SASRec")
    with pytest.raises(ValueError, match="no train mode"):
        pua.model_mode("SASRec", None)
    with pytest.raises(ValueError, match="unknown train mode 'windows'"):
        pua.model_mode("windows/SASRec", None)
    with pytest.raises(ValueError, match="no model name"):
        pua.model_mode("history/", None)


def test_main_refuses_a_model_without_a_mode_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pua.main(["--dataset", "ml-1m", "--models", "history/Mamba4Rec,SASRec", "--data-path", str(tmp_path)])
    assert "'SASRec' has no train mode" in capsys.readouterr().err


def test_read_inter_orders_by_time(tmp_path):
    path = tmp_path / "d.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                    "1\ta\t5\n1\tb\t1\n2\tc\t0\n1\td\t3\n1\te\t3\n")
    assert pua.read_inter(path) == {"1": ["b", "d", "e", "a"], "2": ["c"]}


def test_analyse_prints_the_three_tables():
    rng = np.random.default_rng(1)
    n = 300
    values = {"A": _metrics(rng.integers(0, 11, n)), "B": _metrics(rng.integers(0, 11, n))}
    text = pua.analyse(values, ["A", "B"], rng.integers(3, 60, n), rng.integers(0, 15, n), (3, 5, 8, 15, 50),
                       paired_difference, repeats=0.0)
    for part in ("#### 1.", "#### 2.", "#### 3.", "| all | 300 |", "rank 2 / rank 1", "seen, bigram top-1"):
        assert part in text


def test_history_stats_and_mask_history_on_a_hand_made_ranking():
    torch = pytest.importorskip("torch")
    inf = float("-inf")
    # items 0..5, 0 the padding (already -inf); sequences left-aligned, 0-padded
    scores = torch.tensor([[inf, 5.0, 4.0, 3.0, 2.0, 1.0],   # top-1 item 1 = last input item
                           [inf, 1.0, 2.0, 3.0, 4.0, 5.0],   # top-1 item 5, not an input item; item 1 last
                           [inf, 9.0, 1.0, 8.0, 2.0, 0.5]])  # top-1 item 1, an input item, not the last
    seq = torch.tensor([[3, 1, 0], [2, 1, 0], [1, 2, 4]])
    s = ca.history_stats(scores, seq, k=3)
    assert s["top1_in_seq"].tolist() == [True, False, True]
    assert s["top1_is_last"].tolist() == [True, False, False]
    assert s["topk_in_seq"].tolist() == [2, 0, 2]  # top 3: [1, 2, 3], [5, 4, 3], [1, 3, 4]
    masked = ca.mask_history(scores, seq)
    assert torch.isinf(masked[0, [0, 1, 3]]).all() and masked[0, 2] == 4.0 and scores[0, 1] == 5.0  # a copy
    m = ca.history_stats(masked, seq, k=3)  # row 3 has two items left: its third is a masked one, not counted
    assert not m["top1_in_seq"].any() and m["topk_in_seq"].tolist() == [0, 0, 0]


def test_checkpoint_mode_reproduces_the_runs_test_and_masks_the_input_sequence(tmp_path, monkeypatch, capsys):
    """Two tiny models trained one epoch (their best checkpoint is epoch 0's): the unmasked
    per-user values are the run's own test values, user by user; masking removes every input item
    from the top 10 and changes exactly the users it should; the CLI checks a result row."""
    import json

    import torch

    from mamba4rec import pipeline
    from tests.conftest import tiny_config_dict

    monkeypatch.chdir(tmp_path)  # RecBole writes ./log/
    small = {"SASRec": {"n_layers": 1, "n_heads": 1, "inner_size": 32}, "GRU4Rec": {"embedding_size": 16}}
    runs = {m: pipeline.run(m, "tiny", config_dict=tiny_config_dict(tmp_path, **extra)) for m, extra in small.items()}
    ev = ca.evaluate_checkpoint(runs["SASRec"].saved_model_file)
    res, per_user, stats = ev["scored"]["unmasked"]
    assert res == runs["SASRec"].test_result
    for met in pua.METRICS:
        np.testing.assert_array_equal(per_user[met], runs["SASRec"].extra["per_user_test"][met])
    assert ev["valid_recomputed"] == pytest.approx(runs["SASRec"].best_valid_score, abs=1e-12)

    _, masked, mstats = ev["scored"]["masked"]
    assert stats["top1_in_seq"].any() and (stats["topk_in_seq"] > 0).any()  # else masking would test nothing
    assert not mstats["top1_in_seq"].any() and not mstats["top1_is_last"].any() and not mstats["topk_in_seq"].any()
    untouched = stats["topk_in_seq"] == 0  # no input item in the top 10: masking leaves the top 10 as it is
    for met in pua.METRICS:
        np.testing.assert_array_equal(masked[met][untouched], per_user[met][untouched])
        assert (masked[met][ev["target_in_seq"]] == 0).all()  # a masked target cannot be hit
    # a hit whose target is no input item moves up by the input items ranked above it
    rank = pua.ranks_from_mrr(per_user["mrr@10"], per_user["hit@10"], per_user["ndcg@10"])
    mrank = pua.ranks_from_mrr(masked["mrr@10"], masked["hit@10"], masked["ndcg@10"])
    moved = (rank > 0) & ~ev["target_in_seq"]
    above = np.array([stats["in_seq_at"][u, :rank[u] - 1].sum() for u in np.flatnonzero(moved)])
    np.testing.assert_array_equal(mrank[moved], rank[moved] - above)
    assert (above > 0).any()  # some hit did move

    files = [runs[m].saved_model_file for m in ("SASRec", "GRU4Rec")]
    rows = tmp_path / "results" / "tiny" / "prefix"
    rows.mkdir(parents=True)
    r = runs["SASRec"]
    row = {"test_result": r.test_result, "best_epoch": r.best_epoch, "valid_result": r.best_valid_result}
    (rows / "SASRec.json").write_text(json.dumps(row))
    assert pua.main(["checkpoint", *files, "--results", str(tmp_path / "results"), "--eval-batch-size", "7"]) == 0
    out = capsys.readouterr().out
    assert "- SASRec: test metrics equal the row's (best epoch 0)" in out
    assert "no " in out and "GRU4Rec.json" in out
    assert "#### Paired over the same 40 test users: SASRec - GRU4Rec" in out
    row["test_result"] = dict(r.test_result, **{"mrr@10": r.test_result["mrr@10"] + 0.01})
    (rows / "SASRec.json").write_text(json.dumps(row))
    with pytest.raises(SystemExit, match="differ from the row's"):
        pua.main(["checkpoint", files[0], "--results", str(tmp_path / "results"), "--skip-valid"])
    state = torch.load(files[1], weights_only=False)
    state["best_valid_score"] += 0.01  # not the weights' validation score
    torch.save(state, tmp_path / "off.pth")
    with pytest.raises(SystemExit, match="best_valid_score"):
        ca.evaluate_checkpoint(tmp_path / "off.pth")
    with pytest.raises(SystemExit, match="eval_history=whole cannot run SASRec"):
        ca.evaluate_checkpoint(files[0], overrides=["eval_history=whole"])


def test_checkpoint_mode_scores_a_history_run_from_whole_histories_and_pairs_it_with_windows(
        tmp_path, monkeypatch, capsys):
    """A train_mode=history run tested from each user's whole history (eval_history: whole): the
    checkpoint mode scores each user from that history (longer than MAX_ITEM_LIST_LENGTH for
    some), reproducing the run's test values user by user and its valid score; with
    --eval-history window it scores the windows only and compares with neither."""
    import json

    from mamba4rec import history, pipeline
    from tests.conftest import tiny_config_dict

    monkeypatch.chdir(tmp_path)
    L = 8
    run = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(
        tmp_path, scan_impl="torch", train_mode="history", MAX_ITEM_LIST_LENGTH=L, history_chunk=3))
    path = run.saved_model_file
    seen = []
    real = history.WholeHistory.histories

    def recording(self, dataset, interaction, model):
        items, lengths = real(self, dataset, interaction, model)
        seen.extend(lengths.tolist())
        return items, lengths

    monkeypatch.setattr(history.WholeHistory, "histories", recording)
    whole = ca.evaluate_checkpoint(path)
    assert whole["eval_history"] == "whole" and whole["as_run"]
    assert max(seen) > L  # whole histories, not windows
    assert whole["scored"]["unmasked"][0] == run.test_result
    for met in pua.METRICS:
        np.testing.assert_array_equal(whole["scored"]["unmasked"][1][met], run.extra["per_user_test"][met])
    assert whole["valid_recomputed"] == pytest.approx(run.best_valid_score, abs=1e-12)

    seen.clear()
    window = ca.evaluate_checkpoint(path, overrides=["eval_history=window"])
    assert window["eval_history"] == "window" and not window["as_run"] and not seen
    np.testing.assert_array_equal(window["users"], whole["users"])

    rows = tmp_path / "results" / "tiny" / "history"
    rows.mkdir(parents=True)
    row = {"test_result": run.test_result, "best_epoch": run.best_epoch, "valid_result": run.best_valid_result}
    (rows / "Mamba4Rec.json").write_text(json.dumps(row))
    assert pua.main(["checkpoint", str(path), str(path), "--names", "Mamba4Rec,window", "--eval-history",
                     "run,window", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "- Mamba4Rec: test metrics equal the row's" in out
    window["name"] = "Mamba4Rec"
    assert ca.compare_with_row(window, row).startswith("- Mamba4Rec: scored with eval_history=window, not as its run")
    assert "#### Paired over the same 40 test users: Mamba4Rec - window" in out
    with pytest.raises(SystemExit):
        pua.main(["checkpoint", str(path), "--eval-history", "all"])
    assert "--eval-history 'all'" in capsys.readouterr().err
