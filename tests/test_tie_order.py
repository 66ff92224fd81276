"""experiments.tie_order: tie statistics of a seq-text file against a timestamped copy."""

from __future__ import annotations

import pytest

from experiments import tie_order

# user a: 1 at t=1, 2 and 3 tied at t=2, 4 at t=3; b: 5, 6 tied; c: only partly in the timed
# file (skipped); d: the seq file puts 8 before 7 though 7 is earlier
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "a\t1\t5\t1\na\t2\t4\t2\na\t3\t4\t2\na\t4\t3\t3\n"
         "b\t5\t4\t10\nb\t6\t4\t10\n"
         "d\t7\t1\t1\nd\t8\t1\t2\n"
         "c\t9\t1\t1\n")
SEQ = "a 1 3 2 4\nb 6 5\nc 9 10\nd 8 7\n"


def _files(tmp_path, inter=INTER, seq=SEQ):
    (tmp_path / "x.inter").write_text(inter)
    (tmp_path / "x.txt").write_text(seq)
    return str(tmp_path / "x.txt"), str(tmp_path / "x.inter")


def test_statistics(tmp_path):
    seq, timed = _files(tmp_path)
    r = tie_order.compare(tie_order.read_seq(seq), tie_order.read_timed(timed))
    assert (r["users"], r["skipped"], r["unordered"]) == (3, 1, 1)
    assert r["tie_pairs"] == 2 and r["tied_pairs"] == pytest.approx(2 / 5)  # a: 3 pairs, b: 1, d: 1
    assert r["in_tie_group"] == pytest.approx(4 / 8)
    # test items: a 4 = 4, b 5 != 6, d 7 != 8; valid items: a 2 != 3, b 6 != 5, d 8 != 7
    assert r["test_differs"] == pytest.approx(2 / 3) and r["valid_differs"] == pytest.approx(1.0)
    assert (r["recbole_up"], r["seq_up"]) == (1.0, 0.0)  # RecBole keeps the file order 2 3 and 5 6
    assert r["recbole_near"] == 1.0 and 0.0 <= r["random_up"] <= 1.0


def test_ratings_dat_reads_like_the_inter_file(tmp_path):
    dat = "".join(f"{u}::{i}::3::{t}\n" for u, i, _, t in
                  (line.split("\t") for line in INTER.splitlines()[1:]))
    seq, _ = _files(tmp_path)
    (tmp_path / "ratings.dat").write_text(dat)
    a = tie_order.compare(tie_order.read_seq(seq), tie_order.read_timed(str(tmp_path / "ratings.dat")))
    b = tie_order.compare(tie_order.read_seq(seq), tie_order.read_timed(str(tmp_path / "x.inter")))
    assert a == b


def test_cli_reports_and_rejects_bad_input(tmp_path, capsys):
    seq, timed = _files(tmp_path)
    assert tie_order.main(["--seq", seq, "--timed", timed]) == 0
    out = capsys.readouterr().out
    assert "users compared: 3 (skipped, items differ between the files: 1)" in out
    assert "test item 0.6667, valid item 1.0000" in out
    (tmp_path / "bad.inter").write_text("user\titem\ttime\n1\t2\t3\n")
    assert tie_order.main(["--seq", seq, "--timed", str(tmp_path / "bad.inter")]) == 2
    assert "expected a RecBole header" in capsys.readouterr().err
    (tmp_path / "t.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\na\t1\tnoon\n")
    assert tie_order.main(["--seq", seq, "--timed", str(tmp_path / "t.inter")]) == 2
    assert "'noon' is not a number" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text("z 100 101\n")
    assert tie_order.main(["--seq", str(tmp_path / "other.txt"), "--timed", timed]) == 2
    assert "no user has the same items" in capsys.readouterr().err


def test_unanimous_order_of_pairs_tied_in_several_users(tmp_path):
    # items 20 and 21 are tied in users e, f and g: the timed file always lists 20 first, the
    # seq file has 21 first for g only; 30 and 31 are tied in one user only (not counted)
    inter = ("user_id:token\titem_id:token\ttimestamp:float\n"
             "e\t20\t5\ne\t21\t5\nf\t20\t7\nf\t21\t7\nf\t30\t8\nf\t31\t8\ng\t20\t1\ng\t21\t1\n")
    seq, timed = _files(tmp_path, inter, "e 20 21\nf 20 21 31 30\ng 21 20\n")
    r = tie_order.compare(tie_order.read_seq(seq), tie_order.read_timed(timed))
    assert r["shared_pairs"] == 1
    assert (r["recbole_unanimous"], r["seq_unanimous"]) == (1.0, 0.0)


def test_synthetic_ties_fix_the_order_inside_each_run(tmp_path):
    seqs = {"u": ["3", "1", "2", "6", "5", "4"], "v": ["2", "3", "1", "4", "6", "5"], "w": ["7"]}
    fixed, shuffled = tie_order.synthetic_ties(seqs, [3], seed=5)
    runs = lambda line: [line.split()[1:][k:k + 3] for k in range(0, len(line.split()) - 1, 3)]
    for f, s, (u, seq) in zip(fixed, shuffled, seqs.items()):
        assert f.split()[0] == s.split()[0] == u
        assert [sorted(r) for r in runs(f)] == [sorted(r) for r in runs(s)] == [sorted(seq[k:k + 3]) for k in
                                                                                range(0, len(seq), 3)]
    # u and v hold the same two runs in different orders: the fixed order makes them equal
    assert fixed[0].split()[1:] == fixed[1].split()[1:]
    assert fixed[2] == shuffled[2] == "w 7"
    assert tie_order.synthetic_ties(seqs, [3], seed=5) == (fixed, shuffled)  # seeded
    with pytest.raises(tie_order.InputError, match="integer item ids"):
        tie_order.synthetic_ties({"u": ["a", "b"]}, [2])


def test_cli_writes_the_synthetic_files(tmp_path, capsys):
    seq, timed = _files(tmp_path)
    out = tmp_path / "synth"
    assert tie_order.main(["--seq", seq, "--timed", timed, "--synthetic-out", str(out)]) == 0
    lines = (out / "fixed.txt").read_text().splitlines()
    assert [l.split()[0] for l in lines] == ["a", "b", "c", "d"]
    assert sorted(lines[0].split()[1:]) == ["1", "2", "3", "4"]
    assert sorted(p.name for p in out.iterdir()) == ["fixed.txt", "shuffled.txt"]  # no temporaries
