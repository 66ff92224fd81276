"""Hyper-parameter search (mamba4rec/hyper.py, run_hyper.py): RecBole's params format, errors that
name the line, trials through the pipeline, the table of every trial."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mamba4rec import hyper
from mamba4rec.compare import isolation  # where trials look up _train and pipeline.run
from mamba4rec.hyper import Param, SpaceError, parse_space
from mamba4rec.pipeline import RunResult
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(in_tmp, one_thread):
    """A config file with the tiny data set's settings (trials get their params as the dict)."""
    path = in_tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(in_tmp, scan_impl="torch")))
    return [str(path)]


def space_file(tmp_path, text, name="space.hyper"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the params file


def test_recboles_format_parses():
    space = parse_space("# a comment\n\nlearning_rate loguniform -8,0\ndropout_prob choice [0.2, 0.4]\n"
                        "embedding_size quniform 32,128,32\nweight_decay uniform 0,0.01\n"
                        "mlp_hidden_size choice ['[64,64]','[128]']\nflag choice [True,False]\n")
    assert [(p.name, p.kind, p.args, p.line) for p in space] == [
        ("learning_rate", "loguniform", (-8.0, 0.0), 3), ("dropout_prob", "choice", (0.2, 0.4), 4),
        ("embedding_size", "quniform", (32.0, 128.0, 32.0), 5), ("weight_decay", "uniform", (0.0, 0.01), 6),
        ("mlp_hidden_size", "choice", ("[64,64]", "[128]"), 7), ("flag", "choice", (True, False), 8)]
    q = space[2]
    assert q.integral and q.value(70.0) == 64 and isinstance(q.value(70.0), int) and q.value(127.9) == 128
    assert q.probes() == [32, 128]
    assert space[0].probes() == pytest.approx([math.exp(-8), 1.0])
    half = Param("p", "quniform", (0.1, 0.9, 0.25))
    assert not half.integral and half.value(0.3) == 0.25 and half.probes() == [0.25, 0.75]


@pytest.mark.parametrize("text,line,why", [
    ("learning_rate logunifrom -8,0\n", 1, "unknown type 'logunifrom' (did you mean 'loguniform'?)"),
    ("a choice [1]\nlearning_rate loguniform -8\n", 2, "loguniform needs 2 finite numbers"),
    ("learning_rate uniform 0.5,0.1\n", 1, "needs low < high, got 0.5,0.1"),
    ("learning_rate uniform 0,nan\n", 1, "needs 2 finite numbers"),
    ("embedding_size quniform 1,10,0\n", 1, "needs a step q > 0"),
    ("embedding_size quniform 1,10\n", 1, "quniform needs 3 finite numbers"),
    ("embedding_size quniform 33,60,64\n", 1, "no multiple of 64 lies in [33, 60]"),
    ("dropout_prob choice 0.2\n", 1, "needs a non-empty list"),
    ("dropout_prob choice []\n", 1, "needs a non-empty list"),
    ("dropout_prob choice [0.2,\n", 1, "choice needs a Python list"),
    ("dropout_prob choice [a,b]\n", 1, "choice needs a Python list"),
    ("dropout_prob choice [0.2,0.2]\n", 1, "lists 0.2 twice"),
    ("\nlearning_rate\n", 2, "is not 'name type range'"),
    ("dropout_prob choice [0.2]\n# x\ndropout_prob choice [0.4]\n", 3, "already searched on line 1"),
    ("drop-out choice [0.2]\n", 1, "is not a config key name"),
])
def test_bad_lines_are_named_with_the_reason(text, line, why):
    with pytest.raises(SpaceError) as err:
        parse_space(text, source="f.hyper")
    assert f"f.hyper, line {line}: " in str(err.value) and why in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n"])
def test_an_empty_file_is_refused(tmp_path, text):
    with pytest.raises(SpaceError, match="has no parameters .*e.g. learning_rate loguniform -8,0"):
        hyper.read_space(space_file(tmp_path, text))
    with pytest.raises(SpaceError, match="does not exist"):
        hyper.read_space(tmp_path / "missing.hyper")


def test_the_plan_of_each_search():
    grid = parse_space("a choice [1,2,3]\nb choice [4,5]\n")
    mixed = parse_space("a choice [1,2]\nlr loguniform -8,0\n")
    assert hyper.plan(grid) == ("exhaustive", 6) and hyper.plan(grid, max_evals=4) == ("exhaustive", 4)
    assert hyper.plan(grid, max_evals=60) == ("exhaustive", 6)
    assert hyper.plan(mixed, max_evals=5) == ("bayes", 5) and hyper.plan(grid, "random", 3) == ("random", 3)
    with pytest.raises(SpaceError, match="line 2 .*exhaustive search needs choice parameters only"):
        hyper.plan(mixed, "exhaustive")
    with pytest.raises(SpaceError, match="lr loguniform.*--max_evals=20"):
        hyper.plan(mixed)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(SpaceError, match="max_evals must be an integer >= 1"):
            hyper.plan(grid, max_evals=bad)
    draws = hyper._draws(grid, 4, seed=3)
    assert len(draws) == 4 and len({tuple(d.items()) for d in draws}) == 4
    assert draws == hyper._draws(grid, 4, seed=3)  # the seed decides the subset


# --------------------------------------------------------------------------- checks before any trial


@pytest.mark.parametrize("text,cmd,why", [
    ("learing_rate choice [0.001]\n", [], "space.hyper, line 1 .*unknown key 'learing_rate': Mamba4Rec on tiny has no such "
                                           "config key \\(did you mean learning_rate"),
    ("dropout_prob choice [0.2,1.5]\n", [], "line 1 .*dropout_prob=1.5 is refused: .*must be a number in \\[0, 1\\)"),
    ("hidden_size quniform 0,32,16\n", [], "line 1 .*hidden_size=0 is refused: .*integer >= 1"),
    ("a_ok choice [1]\n", [], "unknown key 'a_ok'"),
    ("learning_rate choice [0.001]\n", ["--learning_rate=0.01"],
     "learning_rate is searched but also fixed on the command line \\(--learning_rate=0.01\\)"),
])
def test_bad_keys_and_values_fail_before_any_trial(tiny, monkeypatch, text, cmd, why):
    def no_trial(*a, **k):
        raise AssertionError("a trial started before the space was checked")

    monkeypatch.setattr(isolation, "_train", no_trial)
    path = space_file(Path(tiny[0]).parent, text)
    with pytest.raises(SpaceError, match=why):
        hyper.search("Mamba4Rec", "tiny", path, config_files=tiny, cmd_args=cmd, isolate=False, max_evals=2,
                     output_file="out.md", progress=lambda s: None)
    assert not Path("out.md").exists()  # nothing written for a search that never started


def test_cli_bad_input_exits_2_with_the_line(tiny, capsys):
    folder = Path(tiny[0]).parent
    for text, why in [("learning_rate loguniform -8\n", "line 1"), ("", "has no parameters"),
                      ("learing_rate choice [0.1]\n", "unknown key")]:
        code = hyper.main(["-d", "tiny", f"--params_file={space_file(folder, text)}", f"--config_files={tiny[0]}",
                           "--output_file=out.md"])
        assert code == 2 and why in capsys.readouterr().err
    assert hyper.main(["-m", "Caser", "-d", "tiny", f"--config_files={tiny[0]}"]) == 2
    assert "no search space is shipped for 'Caser'" in capsys.readouterr().err
    assert hyper.main(["-d", "tiny", f"--config_files={tiny[0]}", "stray"]) == 2
    assert "override 'stray' is not of the form --key=value" in capsys.readouterr().err
    assert not Path("out.md").exists()
    with pytest.raises(SystemExit) as exit_:
        hyper.main(["--tool=Ray"])
    assert exit_.value.code == 2


def test_shipped_spaces_are_valid_and_give_every_model_the_same_budget(tiny):
    sizes = {}
    for model in ("Mamba4Rec", "SASRec", "GRU4Rec"):
        path = REPO / "configs" / "hyper" / f"{model}.hyper"
        space = hyper.read_space(path)
        assert not any(line.lstrip().startswith("#") for line in path.read_text().splitlines())  # RecBole reads it too
        assert [p.name for p in space][0] == "learning_rate"
        hyper.check_space(space, model, "tiny", config_files=tiny)
        sizes[model] = hyper.plan(space)
    assert set(sizes.values()) == {("exhaustive", 12)}


# --------------------------------------------------------------------------- searches


def test_exhaustive_search_trains_every_combination_and_writes_the_table(tiny):
    space = space_file(Path(tiny[0]).parent, "dropout_prob choice [0.1,0.3]\nhidden_size choice [8]\n")
    lines = []
    result = hyper.search("Mamba4Rec", "tiny", space, config_files=tiny, cmd_args=["--epochs=2", "--state=INFO"],
                          isolate=False,
                          output_file="out/table.md", progress=lines.append)
    assert [r["params"] for r in result.rows] == [{"dropout_prob": 0.1, "hidden_size": 8},
                                                  {"dropout_prob": 0.3, "hidden_size": 8}]
    assert all(r["status"] == "ok" and r["epochs_run"] == 2 for r in result.rows)
    assert all(set(r["valid"]) == set(r["test"]) == {"hit@10", "ndcg@10", "mrr@10"} for r in result.rows)
    best = max(result.rows, key=lambda r: (r["valid"]["ndcg@10"], -r["trial"]))
    assert result.best is best and result.finished == "done"
    trial_lines = [s for s in lines if s.startswith("[")]
    assert [s[:5] for s in trial_lines] == ["[1/2]", "[2/2]"]  # one line per trial
    table = Path("out/table.md").read_text()
    rows = [s for s in table.splitlines() if s.startswith("| ") and not s.startswith("| trial")]
    assert len(rows) == 2 and f"| {best['trial']} * |" in table
    assert "valid ndcg@10" in table and "test mrr@10" in table and "epochs_run" in table
    assert f"best: trial {best['trial']}" in table
    assert f"as overrides: --dropout_prob={best['params']['dropout_prob']} --hidden_size=8" in table
    assert "--epochs=2" in table
    with pytest.raises(SpaceError, match="out/table.md already exists .*--output_file"):  # not overwritten
        hyper.search("Mamba4Rec", "tiny", space, config_files=tiny, isolate=False, output_file="out/table.md")
    assert Path("out/table.md").read_text() == table
    log = Path("out/table.log").read_text()  # RecBole's log went there, at the config's state
    assert log.count("trial: {") == 2 and log.count("best valid") == 2


def test_each_trial_gets_its_params_and_the_overrides(tiny, monkeypatch):
    """The params reach the config of each trial's pipeline.run, under the command line's keys
    (how train_mode or any other key set as --key=value reaches every trial)."""
    seen, real_run = [], isolation.run

    def spy(model, dataset, config=None, **kwargs):
        seen.append((config["learning_rate"], config["d_state"], config["train_batch_size"], config["show_progress"]))
        return real_run(model, dataset, config=config, **kwargs)

    monkeypatch.setattr(isolation, "run", spy)
    space = space_file(Path(tiny[0]).parent, "learning_rate loguniform -7,-5\nd_state quniform 2,8,2\n")
    result = hyper.search("Mamba4Rec", "tiny", space, config_files=tiny, cmd_args=["--train_batch_size=32"],
                          algo="random", max_evals=3, isolate=False, output_file="o.md", progress=lambda s: None)
    assert len(seen) == 3
    for (lr, d_state, batch, shown), row in zip(seen, result.rows):
        assert math.exp(-7) <= lr <= math.exp(-5) and lr == row["params"]["learning_rate"]
        assert d_state in (2, 4, 6, 8) and isinstance(d_state, int) and d_state == row["params"]["d_state"]
        assert (batch, shown) == (32, False)
    again = hyper.search("Mamba4Rec", "tiny", space, config_files=tiny, cmd_args=["--train_batch_size=32"],
                         algo="random", max_evals=3, isolate=False, output_file="o2.md", progress=lambda s: None)
    assert [r["params"] for r in again.rows] == [r["params"] for r in result.rows]  # seeded by the config's seed


def fake_result(score):
    return RunResult("Mamba4Rec", "tiny", score, {"ndcg@10": score}, {"ndcg@10": score / 2}, 1, 3, 1, 0.1, 0.1, None)


def test_a_failed_trial_is_a_row_and_the_search_goes_on(tiny, monkeypatch, capsys):
    def train(model, dataset, config_files, run_dict, cmd_args, resume_from):
        if run_dict["dropout_prob"] == 0.2:
            raise RuntimeError("out of memory\nsecond line")
        return fake_result(run_dict["dropout_prob"]), None, 1

    monkeypatch.setattr(isolation, "_train", train)
    path = space_file(Path(tiny[0]).parent, "dropout_prob choice [0.1,0.2,0.3]\n")
    result = hyper.search("Mamba4Rec", "tiny", path, config_files=tiny, isolate=False, output_file="o.md",
                          progress=print)
    assert [r["status"] for r in result.rows] == ["ok", "failed: RuntimeError: out of memory", "ok"]
    assert result.best["trial"] == 3 and result.best["params"] == {"dropout_prob": 0.3}
    assert "[2/3] dropout_prob=0.2: failed: RuntimeError: out of memory" in capsys.readouterr().out
    row = next(s for s in Path("o.md").read_text().splitlines() if s.startswith("| 2 |"))
    assert row.startswith("| 2 | 0.2 | - |") and row.endswith("| failed: RuntimeError: out of memory |")

    # the CLI's exit status: 1 when a trial failed, 0 when all ran
    monkeypatch.setattr(hyper, "search", lambda *a, **k: result)
    assert hyper.main(["-d", "tiny", f"--params_file={path}", f"--config_files={tiny[0]}"]) == 1
    result.rows = [r for r in result.rows if r["status"] == "ok"]
    assert hyper.main(["-d", "tiny", f"--params_file={path}", f"--config_files={tiny[0]}"]) == 0


def test_early_stop_ends_the_search_after_trials_without_improvement(tiny, monkeypatch):
    scores = iter([0.5, 0.4, 0.3, 0.9])
    monkeypatch.setattr(isolation, "_train", lambda *a: (fake_result(next(scores)), None, 1))
    path = space_file(Path(tiny[0]).parent, "dropout_prob choice [0.1,0.2,0.3,0.35]\n")
    result = hyper.search("Mamba4Rec", "tiny", path, config_files=tiny, isolate=False, early_stop=2,
                          output_file="o.md", progress=lambda s: None)
    assert len(result.rows) == 3 and result.finished.startswith("stopped: 2 trials without")
    assert "3 of 4 trials (stopped" in Path("o.md").read_text()
    with pytest.raises(SpaceError, match="early_stop must be an integer >= 0"):
        hyper.search("Mamba4Rec", "tiny", path, config_files=tiny, isolate=False, early_stop=-1)


def test_bayes_search_with_hyperopt(tiny):
    pytest.importorskip("hyperopt")
    path = space_file(Path(tiny[0]).parent, "learning_rate loguniform -8,-4\ndropout_prob choice [0.1,0.3]\n")
    result = hyper.search("Mamba4Rec", "tiny", path, config_files=tiny, algo="bayes", max_evals=3, isolate=False,
                          output_file="o.md", progress=lambda s: None)
    assert result.algo == "bayes" and len(result.rows) == 3 and all(r["status"] == "ok" for r in result.rows)
    assert all(math.exp(-8) <= r["params"]["learning_rate"] <= math.exp(-4) for r in result.rows)
    assert all(r["params"]["dropout_prob"] in (0.1, 0.3) for r in result.rows)


def test_run_hyper_cli_each_trial_in_its_own_process(tiny, capfd, monkeypatch):
    """run_hyper.py's main end to end: two trials, each in a fresh process (this process is the
    search's; capfd takes the trials' output too)."""
    import run_hyper

    folder = Path(tiny[0]).parent
    path = space_file(folder, "dropout_prob choice [0.1,0.3]\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the trials' processes
    monkeypatch.setenv("MAMBA4REC_FAST_DROPOUT", "0")
    code = run_hyper.main(["--model=Mamba4Rec", "--dataset=tiny", f"--config_files={tiny[0]}", f"--params_file={path}",
                           "--output_file=cli.md", "--epochs=1"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    out = stdout.splitlines()
    assert [s[:5] for s in out if s.startswith("[")] == ["[1/2]", "[2/2]"]
    assert len(out) == 6 and out[-1] == "table: cli.md", out  # header, table path, 2 trials, best, table
    table = (folder / "cli.md").read_text()
    assert table.count("| ok |") == 2 and "best: trial" in table and "exhaustive, 2 of 2 trials (done)" in table


@pytest.mark.parametrize("name", ["log", "saved"])
def test_a_file_where_recbole_writes_a_folder_stops_the_search_before_any_trial(tiny, capsys, name):
    """A file named like one of RecBole's folders (a shell redirect named ``log``, or the
    checkpoint_dir) is named, with what to do, before any data work: not a FileExistsError
    from inside RecBole in every trial."""
    folder = Path(tiny[0]).parent
    (folder / name).write_text("output of an earlier command\n")
    code = hyper.main(["-d", "tiny", f"--config_files={tiny[0]}", "--output_file=out.md"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{str(folder / name)!r} is a file, but RecBole writes" in err and "move or rename that file" in err
    assert "Traceback" not in err and "FileExistsError" not in err and not Path("out.md").exists()
    assert (folder / name).read_text() == "output of an earlier command\n"  # left as it was
