"""The RecBole flow end to end on a tiny data set: config, data, train, evaluate, CLI, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import mamba4rec.pipeline as pipeline
from mamba4rec import Mamba4Rec
from tests.conftest import TINY_DATA, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
METRICS = {"hit@10", "ndcg@10", "mrr@10"}


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_train_and_evaluate(in_tmp, loss_type, num_layers):
    cfg = tiny_config_dict(in_tmp, loss_type=loss_type, num_layers=num_layers, epochs=2)
    result = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, cmd_args=["--scan_impl=torch"])
    assert set(result.test_result) == METRICS and set(result.best_valid_result) == METRICS
    for value in list(result.test_result.values()) + list(result.best_valid_result.values()):
        assert 0.0 <= value <= 1.0
    assert result.epochs_run == 2 and result.best_epoch in (0, 1)
    assert Path(result.saved_model_file).is_file()  # load_best_model=True read it back
    assert result.params > 0


def test_the_papers_flow_works_with_load_best_model(in_tmp):
    """Config(model=Mamba4Rec) -> create_dataset -> data_preparation -> Trainer.fit(saved=True)
    -> trainer.evaluate(test, load_best_model=True): RecBole's own calls, as the paper's run.py."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    config = Config(model=Mamba4Rec, dataset="tiny", config_dict=cfg,
                    config_file_list=[str(REPO / "configs" / "overall.yaml"),
                                      str(REPO / "configs" / "model" / "Mamba4Rec.yaml")])
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    model = Mamba4Rec(config, train.dataset).to(config["device"])
    trainer = Trainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # evaluate must reload the best weights from the checkpoint
    result = trainer.evaluate(test, load_best_model=True)
    assert set(result) == METRICS
    assert any(p.abs().sum() > 0 for p in model.parameters())


def test_same_seed_gives_same_metrics(in_tmp):
    runs = [pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch"))
            for _ in range(2)]
    assert runs[0].test_result == runs[1].test_result


def test_baseline_runs_through_the_same_pipeline(in_tmp):
    result = pipeline.run("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp, n_layers=1, n_heads=1))
    assert result.model == "SASRec" and set(result.test_result) == METRICS


def test_priority_cmd_over_dict_over_files(in_tmp):
    extra = in_tmp / "extra.yaml"
    extra.write_text("d_state: 8\nexpand: 3\nhidden_size: 24\n")
    cfg = tiny_config_dict(in_tmp)
    cfg.pop("hidden_size"), cfg.pop("d_state")
    cfg["expand"] = 4
    config = pipeline.build_config("Mamba4Rec", "tiny", config_files=[str(extra)], config_dict=cfg,
                                   cmd_args=["--d_state=16"])
    assert (config["d_state"], config["expand"], config["hidden_size"]) == (16, 4, 24)
    # configs/overall.yaml and configs/model/Mamba4Rec.yaml are read
    assert config["valid_metric"] == "NDCG@10" and config["d_conv"] == 4


def test_model_dataset_settings_do_not_leak_into_baselines():
    mamba = pipeline.default_config_files("Mamba4Rec", "ml-100k")
    assert [Path(f).relative_to(pipeline.CONFIG_DIR).as_posix() for f in mamba] == [
        "overall.yaml", "model/Mamba4Rec.yaml", "dataset/ml-100k.yaml", "model/Mamba4Rec/ml-100k.yaml"]
    gru = pipeline.build_config("GRU4Rec", "ml-100k")
    assert gru["dropout_prob"] == 0.3  # RecBole's GRU4Rec default, not Mamba4Rec's


def test_bpr_gets_a_negative_sampler_ce_none(in_tmp):
    bpr = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, loss_type="BPR"))
    assert bpr["train_neg_sample_args"]["distribution"] == "uniform"
    ce = pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp))
    assert ce["train_neg_sample_args"]["distribution"] == "none"


def test_ml100k_resolves_to_the_bundled_copy(in_tmp):
    config = pipeline.build_config("Mamba4Rec", "ml-100k", config_dict={"data_path": str(in_tmp)})
    assert Path(config["data_path"], "ml-100k.inter").is_file()
    assert Path(config["data_path"]).resolve() == (pipeline.BUNDLED_DATA / "ml-100k").resolve()
    # a copy of the user's own under data_path wins
    mine = in_tmp / "ml-100k"
    mine.mkdir()
    (mine / "ml-100k.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n")
    config = pipeline.build_config("Mamba4Rec", "ml-100k", config_dict={"data_path": str(in_tmp)})
    assert Path(config["data_path"]).resolve() == mine.resolve()


@pytest.mark.parametrize("override", ["--d_state=0", "--dropout_prob=1.5", "--loss_type=MSE",
                                      "--scan_impl=fast", "--num_layers=0"])
def test_bad_config_fails_before_any_data_work(in_tmp, monkeypatch, override):
    def no_data(*a, **k):
        raise AssertionError("data work started before the config was checked")

    monkeypatch.setattr(pipeline, "create_dataset", no_data)
    with pytest.raises(ValueError, match=override.split("=")[0][2:]):
        pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp), cmd_args=[override])


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError) as info:
        pipeline.resolve_model("Mamba5Rec")
    msg = str(info.value)
    assert "Mamba5Rec" in msg and "SASRec" in msg and "GRU4Rec" in msg and "Mamba4Rec" in msg


def test_dataset_without_files_says_where_and_how(in_tmp):
    with pytest.raises(FileNotFoundError) as info:
        pipeline.run("Mamba4Rec", "nosuchdata", config_dict={"data_path": str(in_tmp)})
    msg = str(info.value)
    assert str(in_tmp / "nosuchdata" / "nosuchdata.inter") in msg
    assert "datasets/prepare.py" in msg


@pytest.mark.parametrize("name", ["ml-1m", "amazon-beauty", "amazon-video-games"])
def test_recbole_download_names_go_through_to_recbole_s_download(in_tmp, caplog, name):
    """RecBole's own names still work: with no folder, the run goes on to RecBole's download (a
    warning says from where, and what to do offline); nothing is downloaded here. A folder
    that exists without the file is a mistake in data_path: refused."""
    import logging

    config = pipeline.build_config("Mamba4Rec", name, config_dict={"data_path": str(in_tmp)})
    with caplog.at_level(logging.WARNING, logger="mamba4rec.pipeline"):
        pipeline.check_dataset_files(config)
    text = caplog.text
    assert f"data set {name!r} not found" in text and "RecBole will download it from http" in text
    assert "Offline?" in text and f"--dataset {name}" in text
    (in_tmp / name).mkdir()
    with pytest.raises(FileNotFoundError, match="no atomic file"):
        pipeline.check_dataset_files(config)


def test_override_must_be_key_value(in_tmp):
    with pytest.raises(ValueError, match="--key=value"):
        pipeline.build_config("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp), cmd_args=["--epochs"])


def _cli(args, cwd):
    # one intra-op thread, as in this process (tests/conftest.py): tiny tensors
    return subprocess.run([sys.executable, str(REPO / "run_recbole.py"), *args], cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def _main(args, capsys):
    """run_recbole.main(args) in this process: (exit status, stdout, stderr), as the script's
    process would end (sys.exit(main()), or argparse's SystemExit)."""
    import run_recbole

    try:
        code = run_recbole.main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_and_prints_test_metrics(in_tmp):
    """The README's command, as a user runs it: a process of its own."""
    proc = _cli(["--dataset=tiny", f"--data_path={TINY_DATA}", "--epochs=1", "--train_batch_size=64",
                 "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=16", "--d_state=4", "--show_progress=False",
                 f"--checkpoint_dir={in_tmp / 'saved'}",
                 "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"], in_tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test      : hit@10=" in proc.stdout and "ndcg@10=" in proc.stdout


def test_cli_bad_input_exit_codes(in_tmp, capsys):
    for args, message in [(["-m", "NoSuchModel", "--epochs=1"], "known models"), (["--d_state=0"], "d_state=0"),
                          (["stray"], "--key=value"), (["--compare=SASRec", "--resume=some.pth"], "--resume takes no PATH"),
                          (["--compare_run=SASRec"], "give --compare"), (["--nproc", "2", "--resume"], "drop --nproc"),
                          (["--compare=SASRec", "--export=x.pt"], "--export works with a single training run")]:
        code, _, err = _main(args, capsys)
        assert code == 2 and message in err, (args, code, err)


def test_compare_writes_table_csv_chart_and_survives_a_failed_baseline(in_tmp, monkeypatch):
    import csv

    from mamba4rec import compare as cmp
    from mamba4rec.compare import isolation  # where compare's training looks up pipeline.run

    real_run = isolation.run

    def run_or_fail(model, *a, **k):  # compare passes model classes
        if model.__name__ == "GRU4Rec":
            raise RuntimeError("boom")
        return real_run(model, *a, **k)

    monkeypatch.setattr(isolation, "run", run_or_fail)
    cfg = tiny_config_dict(in_tmp, scan_impl="torch", n_layers=1, n_heads=1, test_input_masked=True)
    rows = cmp.compare(["Mamba4Rec", "GRU4Rec", "SASRec"], "tiny", in_tmp / "out", config_dict=cfg,
                       progress=lambda *_: None, isolate=False)  # the patched run() is in this process
    assert [r["model"] for r in rows] == ["Mamba4Rec", "GRU4Rec", "SASRec"]
    assert rows[1]["status"].startswith("failed: RuntimeError: boom")
    for row in (rows[0], rows[2]):
        assert row["status"] == "ok" and 0 <= row["test_ndcg@10"] <= 1 and row["peak_rss_mib"] > 0
        assert row["train_s_per_epoch"] > 0 and row["params"] > 0
    table = (in_tmp / "out" / "compare.md").read_text()
    assert "| Mamba4Rec | ok |" in table and "failed: RuntimeError: boom" in table
    with open(in_tmp / "out" / "compare.csv") as fh:
        assert [r["model"] for r in csv.DictReader(fh)] == ["Mamba4Rec", "GRU4Rec", "SASRec"]
    png = (in_tmp / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # per-user test values behind each finished row: their means are the row's figures
    per_user = cmp.load_per_user(in_tmp / "out", rows)
    assert sorted(per_user) == ["Mamba4Rec", "SASRec"]  # not the failed GRU4Rec
    for row in (rows[0], rows[2]):
        for key in ("hit@10", "ndcg@10", "mrr@10"):
            values = per_user[row["model"]][key]
            assert len(values) > 1 and abs(values.mean() - row[f"test_{key}"]) <= 5e-5
    assert "Paired over the same test users" in table and "- test_ndcg@10, Mamba4Rec - SASRec: " in table
    # run()'s second test pass, input sequences masked: columns, per-user values and paired lines
    assert " test_input_masked_hit@10 " in table.splitlines()[2].split("|")  # the header
    for row in (rows[0], rows[2]):
        values = per_user[row["model"]]["input_masked_ndcg@10"]
        assert abs(values.mean() - row["test_input_masked_ndcg@10"]) <= 5e-5
    assert "- test_input_masked_ndcg@10, Mamba4Rec - SASRec: " in table
    # learning curves of the finished models: one valid score per epoch, as a CSV and a chart
    curves = cmp.load_curves(in_tmp / "out", rows)
    assert sorted(curves) == ["Mamba4Rec", "SASRec"]
    for row in (rows[0], rows[2]):
        curve = curves[row["model"]]
        assert curve["metric"] == "NDCG@10" and len(curve["valid_scores"]) == row["epochs_run"]
        assert len(curve["train_seconds"]) == row["epochs_run"]
        assert max(v for _, v in curve["valid_scores"]) == pytest.approx(row["valid_ndcg@10"], abs=5e-5)
    with open(in_tmp / "out" / "curves.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert [r["model"] for r in lines] == ["Mamba4Rec"] * rows[0]["epochs_run"] + ["SASRec"] * rows[2]["epochs_run"]
    assert (in_tmp / "out" / "compare_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_unknown_or_repeated_models_before_training(in_tmp):
    from mamba4rec.compare import compare

    with pytest.raises(ValueError, match="known models"):
        compare(["Mamba4Rec", "SASRecc"], "tiny", in_tmp)
    with pytest.raises(ValueError, match="twice"):
        compare(["Mamba4Rec", "SASRec", "SASRec"], "tiny", in_tmp)
    assert not (in_tmp / "compare.md").exists()


def test_resume_after_epoch_k_equals_an_uninterrupted_run(in_tmp):
    def cfg(sub, epochs):
        return tiny_config_dict(in_tmp, scan_impl="torch", epochs=epochs, checkpoint_dir=str(in_tmp / sub),
                                stopping_step=10)

    full = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("full", 4))
    pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("cut", 2))  # "killed" after epoch 1
    last = in_tmp / "cut" / "Mamba4Rec-tiny-last.pth"
    resumed = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg("cut", 4), resume=str(last))
    assert resumed.epochs_run == full.epochs_run == 4  # every epoch counts, before and after the resume
    assert resumed.best_epoch == full.best_epoch
    assert resumed.train_seconds_per_epoch > 0
    a = torch.load(in_tmp / "full" / "Mamba4Rec-tiny-last.pth", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert resumed.test_result == full.test_result
    assert resumed.best_valid_result == full.best_valid_result


def test_resume_auto_continues_from_the_last_file_or_starts_fresh(in_tmp):
    cfg = tiny_config_dict(in_tmp, scan_impl="torch", epochs=2, stopping_step=10)
    fresh = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, resume="auto")  # nothing to resume yet
    assert fresh.epochs_run == 2
    cfg["epochs"] = 3
    more = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, resume="auto")
    assert more.epochs_run == 3
    last = torch.load(in_tmp / "saved" / "Mamba4Rec-tiny-last.pth", weights_only=False)
    assert last["epoch"] == 2 and [e for e, _ in last["history"]["valid_scores"]] == [0, 1, 2]


def test_a_resume_records_the_machine_of_each_stretch_of_epochs(in_tmp, monkeypatch):
    cfg = tiny_config_dict(in_tmp, scan_impl="torch", epochs=1, stopping_step=10)
    last = in_tmp / "saved" / "Mamba4Rec-tiny-last.pth"
    t = torch.get_num_threads()
    # off by default: nothing of the machine in the history or the -last.pth
    result = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, resume="auto")
    assert "machines" not in result.extra["history"]
    assert torch.load(last, weights_only=False)["history"]["machines"] == []
    last.unlink()
    cfg["record_machine_by_epoch"] = True
    for epochs, box in ((1, "box A"), (2, "box A"), (3, "box B")):  # the same machine starts no stretch
        monkeypatch.setattr(pipeline, "machine", lambda box=box: box)
        result = pipeline.run("Mamba4Rec", "tiny", config_dict={**cfg, "epochs": epochs}, resume="auto")
    assert result.extra["history"]["machines"] == [[0, "box A", t], [2, "box B", t]]
    assert torch.load(last, weights_only=False)["history"]["machines"] == [[0, "box A", t], [2, "box B", t]]
    torch.set_num_threads(t + 1)  # the same machine with more threads: a stretch of its own
    try:
        result = pipeline.run("Mamba4Rec", "tiny", config_dict={**cfg, "epochs": 4}, resume="auto")
    finally:
        torch.set_num_threads(t)
    assert result.extra["history"]["machines"] == [[0, "box A", t], [2, "box B", t], [3, "box B", t + 1]]
    state = torch.load(last, weights_only=False)  # a file from before machines were recorded
    del state["history"]["machines"]
    torch.save(state, last)
    result = pipeline.run("Mamba4Rec", "tiny", config_dict={**cfg, "epochs": 5}, resume="auto")
    assert result.extra["history"]["machines"] == [[0, None], [4, "box B", t]]
    monkeypatch.setattr(pipeline, "machine", lambda: "box C")  # resumed with no epoch left: no stretch
    result = pipeline.run("Mamba4Rec", "tiny", config_dict={**cfg, "epochs": 5}, resume="auto")
    assert result.extra["history"]["machines"] == [[0, None], [4, "box B", t]]


def _compare_cfg(tmp):
    return tiny_config_dict(tmp, scan_impl="torch", epochs=3, stopping_step=10, n_layers=1)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted comparison of Mamba4Rec and GRU4Rec (_compare_cfg, in this process), run
    once for the tests that hold an interrupted or shared comparison to it: {model: row}."""
    from mamba4rec import compare as cmp

    tmp = tmp_path_factory.mktemp("whole")
    cwd = os.getcwd()
    os.chdir(tmp)  # RecBole writes ./log/
    try:
        cfg = _compare_cfg(tmp)
        cfg.pop("checkpoint_dir")  # compare keeps them in <out>/checkpoints
        rows = cmp.compare(["Mamba4Rec", "GRU4Rec"], "tiny", tmp / "whole", config_dict=cfg,
                           progress=lambda *_: None, isolate=False)
    finally:
        os.chdir(cwd)
    assert (tmp / "whole" / "checkpoints" / "Mamba4Rec-tiny-last.pth").is_file()
    return {r["model"]: r for r in rows}


def test_compare_resume_keeps_finished_models_and_continues_the_interrupted_one(in_tmp, monkeypatch, capsys, whole):
    from mamba4rec import compare as cmp
    from mamba4rec import pipeline as pl
    from mamba4rec.compare import isolation

    models, quiet = ["GRU4Rec", "Mamba4Rec"], (lambda *_: None)
    cfg = _compare_cfg(in_tmp)
    cfg.pop("checkpoint_dir")  # compare keeps them in <out>/checkpoints

    real_save = pl._save_last

    def save_then_die(path, trainer, net, train_data, epoch_idx, history):
        real_save(path, trainer, net, train_data, epoch_idx, history)
        if "Mamba4Rec" in str(path) and epoch_idx == 1:
            raise KeyboardInterrupt  # killed after epoch 1 of the second model

    monkeypatch.setattr(pl, "_save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(models, "tiny", in_tmp / "cut", config_dict=cfg, progress=quiet, isolate=False)
    monkeypatch.setattr(pl, "_save_last", real_save)
    table = (in_tmp / "cut" / "compare.md").read_text()
    assert "| GRU4Rec | ok |" in table and "| Mamba4Rec | pending |" in table  # written after each model
    # where it stands, from its files: GRU4Rec done, Mamba4Rec stopped after 2 of its 3 epochs
    report = cmp.progress_report(in_tmp / "cut").splitlines()
    gru = next(line for line in report if line.startswith("| GRU4Rec |")).split(" | ")
    mamba = next(line for line in report if line.startswith("| Mamba4Rec |")).split(" | ")
    assert gru[1:3] == ["finished", "3"] and mamba[1:3] == ["in progress", "2"]
    scores = torch.load(in_tmp / "cut" / "checkpoints" / "Mamba4Rec-tiny-last.pth", weights_only=False)["history"]
    best = max(v for _, v in scores["valid_scores"])
    assert mamba[3].startswith(f"{best:.4f} (") and mamba[4] == f"{scores['valid_scores'][-1][1]:.4f}"
    assert mamba[7].endswith("s ago |")
    assert "| SASRec | pending | - |" in cmp.progress_report(in_tmp / "cut", models=["GRU4Rec", "SASRec"])
    code, out, _ = _main(["--compare_status", f"--compare_dir={in_tmp / 'cut'}"], capsys)
    assert code == 0 and "| Mamba4Rec | in progress | 2 |" in out
    code, _, err = _main(["--compare_status", f"--compare_dir={in_tmp / 'nothing'}"], capsys)
    assert code == 2 and "no comparison at" in err

    real_run, ran = isolation.run, []
    monkeypatch.setattr(isolation, "run",
                        lambda m, *a, **k: ran.append((m.__name__, k["resume"])) or real_run(m, *a, **k))
    resumed = cmp.compare(models, "tiny", in_tmp / "cut", config_dict=cfg, progress=quiet, isolate=False, resume=True)
    assert [name for name, _ in ran] == ["Mamba4Rec"] and ran[0][1].endswith("Mamba4Rec-tiny-last.pth")
    assert resumed[1]["status"] == "ok (resumed)"
    assert [r["model"] for r in resumed] == models
    for b in resumed:
        a = whole[b["model"]]
        for key in ("valid_ndcg@10", "test_hit@10", "test_ndcg@10", "test_mrr@10", "best_epoch", "epochs_run",
                    "params"):
            assert a[key] == b[key], (a["model"], key)

    ran.clear()  # everything finished: a resume trains nothing and rewrites the same table
    again = cmp.compare(models, "tiny", in_tmp / "cut", config_dict=cfg, progress=quiet, isolate=False, resume=True)
    assert ran == [] and again == resumed
    # the curve of the resumed model has every epoch, those before the stop included
    curve = json.loads((in_tmp / "cut" / "curves" / "Mamba4Rec.json").read_text())
    assert [e for e, _ in curve["valid_scores"]] == list(range(resumed[1]["epochs_run"]))
    # rows kept from before curves existed: their curves come back from the models' -last.pth
    import shutil

    shutil.rmtree(in_tmp / "cut" / "curves")
    cmp.compare(models, "tiny", in_tmp / "cut", config_dict=cfg, progress=quiet, isolate=False, resume=True)
    assert json.loads((in_tmp / "cut" / "curves" / "Mamba4Rec.json").read_text()) == curve
    assert ran == [] and (in_tmp / "cut" / "curves" / "GRU4Rec.json").is_file()

    other = dict(cfg, learning_rate=0.01)
    with pytest.raises(ValueError, match="other settings"):
        cmp.compare(models, "tiny", in_tmp / "cut", config_dict=other, progress=quiet, isolate=False, resume=True)


def test_compare_run_lets_two_processes_share_one_comparison(in_tmp, monkeypatch, whole):
    """--compare_run: each "process" trains only its models; whichever finishes last writes the
    table with both rows, and the rows equal those of one process running everything."""
    from mamba4rec import compare as cmp
    from mamba4rec.compare import isolation

    models, quiet = ["Mamba4Rec", "GRU4Rec"], (lambda *_: None)
    cfg = _compare_cfg(in_tmp)
    cfg.pop("checkpoint_dir")
    assert all(r["threads"] == torch.get_num_threads() for r in whole.values())

    with pytest.raises(ValueError, match="SASRec"):  # not a model of this comparison
        cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=cfg, progress=quiet, isolate=False, only=["SASRec"])
    with pytest.raises(ValueError, match="no model"):
        cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=cfg, progress=quiet, isolate=False, only=[])

    real_run, ran, tables = isolation.run, [], []

    def run_with_other_lane(model, *a, **k):
        ran.append(model.__name__)
        if model.__name__ == "Mamba4Rec":  # the other process runs GRU4Rec to the end meanwhile
            other = cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=cfg, progress=quiet, isolate=False, only=["GRU4Rec"])
            assert [r["model"] for r in other] == ["GRU4Rec"]
            tables.append((in_tmp / "lanes" / "compare.md").read_text())
        return real_run(model, *a, **k)

    monkeypatch.setattr(isolation, "run", run_with_other_lane)
    mine = cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=cfg, progress=quiet, isolate=False, only=["Mamba4Rec"])
    assert ran == ["Mamba4Rec", "GRU4Rec"] and [r["model"] for r in mine] == ["Mamba4Rec"]
    assert "| GRU4Rec | ok |" in tables[0] and "| Mamba4Rec | pending |" in tables[0]
    table = (in_tmp / "lanes" / "compare.md").read_text()
    assert "| Mamba4Rec | ok |" in table and "| GRU4Rec | ok |" in table  # merged by the last to finish

    ran.clear()  # both done: a resume of the whole comparison trains nothing and has both rows
    merged = cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=cfg, progress=quiet, isolate=False, resume=True)
    assert ran == []
    assert [r["model"] for r in merged] == models
    for b in merged:
        a = whole[b["model"]]
        for key in ("model", "valid_ndcg@10", "test_ndcg@10", "test_mrr@10", "best_epoch", "params"):
            assert a[key] == b[key], (a["model"], key)

    other = dict(cfg, learning_rate=0.01)  # the other lane's row is of another protocol: refused up front
    with pytest.raises(ValueError, match="other settings"):
        cmp.compare(models, "tiny", in_tmp / "lanes", config_dict=other, progress=quiet, isolate=False, only=["Mamba4Rec"])
    assert ran == []


def test_compare_refuses_rows_made_from_other_data_files(in_tmp):
    """Same name, same settings, data prepared again (say with another k-core): the rows on disk
    no longer describe this data, so --resume and --compare_run refuse them before training."""
    import shutil

    from mamba4rec import compare as cmp

    data = in_tmp / "data"
    shutil.copytree(TINY_DATA, data)
    cfg = dict(_compare_cfg(in_tmp), data_path=str(data), epochs=1)
    cfg.pop("checkpoint_dir")
    quiet = lambda *_: None  # noqa: E731
    models = ["GRU4Rec", "Mamba4Rec"]
    cmp.compare(models, "tiny", in_tmp / "out", config_dict=cfg, progress=quiet, isolate=False, only=["GRU4Rec"])
    (data / "tiny" / "tiny.stats.json").write_text("{}")  # prepare.py's side file: not data, not checked
    saved = json.loads((in_tmp / "out" / "rows" / "GRU4Rec.json").read_text())
    assert list(saved["data"]) == ["tiny.inter"] and len(saved["data"]["tiny.inter"]) == 64
    again = cmp.compare(models, "tiny", in_tmp / "out", config_dict=cfg, progress=quiet, isolate=False,
                        resume=True, only=["GRU4Rec"])  # unchanged data: kept
    assert again[0]["test_ndcg@10"] == saved["row"]["test_ndcg@10"]

    inter = data / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text("".join(lines[:-5]))  # the same data set, prepared again with fewer rows
    with pytest.raises(ValueError, match=r"other data files than this run's \(tiny.inter changed"):
        cmp.compare(models, "tiny", in_tmp / "out", config_dict=cfg, progress=quiet, isolate=False, resume=True)
    with pytest.raises(ValueError, match="other data files"):
        cmp.compare(models, "tiny", in_tmp / "out", config_dict=cfg, progress=quiet, isolate=False,
                    only=["Mamba4Rec"])
    assert not (in_tmp / "out" / "rows" / "Mamba4Rec.json").exists()  # refused before any training

    # a model stopped mid-run (its -last.pth, no row yet) does not continue on other data either
    inter.write_text("".join(lines))
    cmp.compare(["Mamba4Rec"], "tiny", in_tmp / "solo", config_dict=cfg, progress=quiet, isolate=False)
    assert (in_tmp / "solo" / "checkpoints" / "Mamba4Rec-tiny-last.pth.data.json").is_file()
    (in_tmp / "solo" / "rows" / "Mamba4Rec.json").unlink()
    inter.write_text("".join(lines[:-5]))
    rows = cmp.compare(["Mamba4Rec"], "tiny", in_tmp / "solo", config_dict=cfg, progress=quiet, isolate=False,
                       resume=True)
    assert rows[0]["status"].startswith("failed: ValueError: --resume: ") and "trained on other data" in rows[0]["status"]


def test_compare_trains_each_model_in_its_own_process(in_tmp):
    """Isolated (the default): a model whose process is killed is a failed row and the others go
    on; memory one model leaves behind does not count in the next one's peak (it does when they
    share a process, which is why each gets its own)."""
    from mamba4rec import compare as cmp
    from tests.compare_models import HogGRU4Rec, KilledGRU4Rec

    quiet = lambda *_: None  # noqa: E731
    # the test models are GRU4Rec by another name: RecBole finds no defaults for that name
    cfg = dict(_compare_cfg(in_tmp), epochs=1, embedding_size=16, num_layers=1, dropout_prob=0.3, loss_type="CE")
    rows = cmp.compare([HogGRU4Rec, KilledGRU4Rec, "GRU4Rec"], "tiny", in_tmp / "iso", config_dict=cfg,
                       progress=quiet)
    assert [r["model"] for r in rows] == ["HogGRU4Rec", "KilledGRU4Rec", "GRU4Rec"]
    assert rows[1]["status"] == "failed: its process ended without a result (signal SIGKILL (out of memory? " \
                                "see dmesg))"
    assert rows[0]["status"] == rows[2]["status"] == "ok" and rows[2]["test_ndcg@10"] is not None
    assert rows[0]["peak_rss_mib"] - rows[2]["peak_rss_mib"] > 200  # the 256 MiB are the hog's alone
    assert rows[2]["threads"] == torch.get_num_threads()
    table = (in_tmp / "iso" / "compare.md").read_text()
    assert "| KilledGRU4Rec | failed: its process ended" in table and "| GRU4Rec | ok |" in table

    shared = cmp.compare([HogGRU4Rec, "GRU4Rec"], "tiny", in_tmp / "shared", config_dict=cfg, progress=quiet,
                         isolate=False)
    assert shared[1]["peak_rss_mib"] >= shared[0]["peak_rss_mib"] - 20  # the hog's memory is still there
    for key in ("test_ndcg@10", "test_hit@10", "valid_ndcg@10", "best_epoch", "params"):  # same training
        assert shared[1][key] == rows[2][key], key


def test_compare_says_how_to_run_a_model_class_from_an_interactive_session(in_tmp, monkeypatch):
    """A class typed into a notebook or `python -c` cannot be imported by a model's own process:
    refused before any training, with the two ways out, instead of a child dying on import."""
    import types

    from recbole.model.sequential_recommender import GRU4Rec

    from mamba4rec import compare as cmp

    typed = type("TypedGRU4Rec", (GRU4Rec,), {"__module__": "__main__"})
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__: interactive
    with pytest.raises(ValueError, match=r"TypedGRU4Rec is defined in an interactive session.*a module.*"
                                         r"isolate=False"):
        cmp.compare(["Mamba4Rec", typed], "tiny", in_tmp / "out", config_dict=_compare_cfg(in_tmp))
    assert not (in_tmp / "out").exists()


def test_a_model_process_ends_with_the_comparison(in_tmp):
    """Killing the comparison (SIGKILL: no Python clean-up runs) must not leave its model's
    process training on as an orphan."""
    import os
    import signal
    import time

    pid_file = in_tmp / "sleepy.pid"
    script = (
        "from mamba4rec.compare import compare\n"
        "from tests.compare_models import SleepyGRU4Rec\n"
        "from tests.conftest import tiny_config_dict\n"
        "from pathlib import Path\n"
        "if __name__ == '__main__':\n"
        "    cfg = tiny_config_dict(Path('.'), embedding_size=16, num_layers=1, dropout_prob=0.3, loss_type='CE')\n"
        "    compare([SleepyGRU4Rec], 'tiny', 'out', config_dict=cfg)\n")
    (in_tmp / "run_sleepy.py").write_text(script)
    env = dict(os.environ, SLEEPY_PID_FILE=str(pid_file), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "run_sleepy.py"], cwd=in_tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, "the comparison ended before its model started"
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert child != proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_cli_compare_stops_its_model_process_on_sigterm(in_tmp):
    """`timeout` and schedulers stop a run with SIGTERM: the CLI turns it into an exit that
    stops the model's own process first (exit 143), rather than leaving it to notice later."""
    import os
    import signal
    import time

    (in_tmp / "tiny.yaml").write_text("load_col:\n  inter: [user_id, item_id, timestamp]\n")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_recbole.py"), "-d", "tiny", "--config_files", "tiny.yaml",
         f"--data_path={TINY_DATA}", "--compare=GRU4Rec", "--epochs=100000", "--stopping_step=100000",
         "--show_progress=False", "--state=WARNING", "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=16",
         "--d_state=4", "--compare_dir=out"], cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, children = time.monotonic() + 120, []
        while not children and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.2)
            children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"],
                                                       capture_output=True, text=True).stdout.split()]
        assert len(children) == 1, "no model process started"  # (not counting multiprocessing's tracker)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert not any(_alive(c) for c in children)  # already gone when the CLI has exited
    finally:
        if proc.poll() is None:
            proc.kill()
        for line in subprocess.run(["pgrep", "-f", str(in_tmp)], capture_output=True, text=True).stdout.split():
            os.kill(int(line), signal.SIGKILL)


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_resume_refuses_foreign_or_truncated_files(in_tmp, tiny_run):
    last = tiny_run["last"]  # the session's one trained model (tests/conftest.py)
    truncated = in_tmp / "truncated.pth"
    truncated.write_bytes(last.read_bytes()[:200])
    foreign = in_tmp / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for bad in (truncated, foreign):
        with pytest.raises(ValueError, match="cannot be resumed from"):
            pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch"),
                         resume=str(bad))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch"),
                     resume=str(in_tmp / "missing.pth"))


def test_amp_bf16_epoch_on_cpu_stays_finite(in_tmp):
    """RecBole's enable_amp on CPU autocasts to bf16; the scan accumulates in fp32."""
    result = pipeline.run("Mamba4Rec", "tiny", config_dict=tiny_config_dict(in_tmp, scan_impl="torch",
                                                                           enable_amp=True, epochs=2))
    assert all(0.0 <= v <= 1.0 for v in result.test_result.values())


def test_compare_table_flags_unconverged_runs_and_judges_no_goal(tmp_path):
    from mamba4rec import compare as cmp

    def row(model, ndcg, best, run, stopped, **extra):
        r = {"model": model, "status": "ok", "test_hit@10": 0.05, "test_ndcg@10": ndcg, "test_mrr@10": 0.02,
             "best_epoch": best, "epochs_run": run, "stopped_by": stopped, "train_s_per_epoch": 100.0,
             "peak_rss_mib": 2000, "peak_cuda_mib": None}
        r.update(extra)
        return r

    rows = [row("Mamba4Rec", 0.0206, 7, 8, "epoch limit"), row("SASRec", 0.0277, 7, 8, "epoch limit"),
            row("GRU4Rec", 0.0177, 3, 14, "early stopping"),
            {"model": "NARM", "status": "failed: RuntimeError: x", "test_ndcg@10": None}]
    table = cmp.markdown_table(rows, "beauty")
    assert "| Mamba4Rec | ok | - | - | - | 0.0500 | 0.0206 | 0.0200 | 7 | 8 | epoch limit |" in table
    assert "not converged: Mamba4Rec, SASRec reached the epoch limit" in table             # not GRU4Rec
    # a table of measurements: no goal, no verdict, no paper's figures (experiments.goals judges those)
    for word in ("Goal", "MET", "paper", ">="):
        assert word not in table
    ml1m = cmp.markdown_table(rows[:2], "ml-1m")  # the data set of the paper's figures
    assert "paper" not in ml1m and "MET" not in ml1m
    rows[0]["best_epoch"] = 5
    assert "not converged: SASRec reached" in cmp.markdown_table(rows, "beauty")
    # a row kept from an older version (no stopped_by) next to a new one: the CSV takes every key
    old = {k: v for k, v in rows[0].items() if k != "stopped_by"}
    cmp.write_outputs([old, rows[1]], "beauty", tmp_path)
    header = (tmp_path / "compare.csv").read_text().splitlines()[0]
    assert "stopped_by" in header
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_without_matplotlib_writes_table_and_csv_and_drops_a_stale_chart(tmp_path, monkeypatch, caplog):
    from mamba4rec import compare as cmp

    (tmp_path / "compare.png").write_bytes(b"\x89PNG of an earlier table")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    row = {"model": "Mamba4Rec", "status": "ok", "test_ndcg@10": 0.05}
    (tmp_path / "compare_curves.png").write_bytes(b"\x89PNG of an earlier table")
    with caplog.at_level(logging.WARNING, logger="mamba4rec.compare.report"):
        paths = cmp.write_outputs([row], "beauty", tmp_path)
    assert sorted(paths) == ["csv", "md"] and not (tmp_path / "compare.png").exists()
    assert not (tmp_path / "compare_curves.png").exists()
    assert "| Mamba4Rec | ok |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.csv").read_text().splitlines()[1].startswith("Mamba4Rec,ok,")
    assert "for them install matplotlib (the plot extra): pip install matplotlib" in caplog.text  # how to get the chart


def test_the_compare_cli_without_matplotlib_says_how_to_get_the_chart(in_tmp, monkeypatch, capsys):
    """The chart is the plot extra: a comparison without matplotlib ends with its table, the files
    it wrote and the install command of the extra."""
    import matplotlib.pyplot  # noqa: F401  (loaded before it is hidden, so the same modules come back)

    from mamba4rec import compare as cmp

    real = sys.modules["matplotlib"]

    def fake_compare(models, dataset, out_dir, **kwargs):  # the models' rows, without training them
        rows = [{"model": m, "status": "ok", "test_hit@10": 0.1, "test_ndcg@10": 0.05, "test_mrr@10": 0.04,
                 "train_s_per_epoch": 1.0, "eval_s": 0.5, "peak_rss_mib": 900, "peak_cuda_mib": None} for m in models]
        cmp.write_outputs(rows, dataset, out_dir)
        return rows

    monkeypatch.setattr(cmp, "compare", fake_compare)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, _ = _main(["--dataset=tiny", "--compare=SASRec", f"--compare_dir={in_tmp / 'cmp'}"], capsys)
    assert code == 0 and "| SASRec | ok |" in out
    assert f"written: {in_tmp / 'cmp'}/compare.md, compare.csv\n" in out
    assert out.rstrip().endswith("pip install matplotlib")
    monkeypatch.setitem(sys.modules, "matplotlib", real)  # installed here: the chart, and no note
    code, out, _ = _main(["--dataset=tiny", "--compare=SASRec", f"--compare_dir={in_tmp / 'cmp'}"], capsys)
    assert code == 0 and "compare.csv, compare.png" in out and "[plot]" not in out


def test_matplotlib_is_the_plot_extra_and_the_test_extra_s():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    def requirement(text):  # the distribution names of a requirement list, one requirement a line
        return [re.match(r"[A-Za-z0-9_.-]+", line.strip()).group(0) for line in text.splitlines() if line.strip()]

    assert "matplotlib" not in requirement(cfg["options"]["install_requires"])
    assert requirement(cfg["options.extras_require"]["plot"]) == ["matplotlib"]
    assert "matplotlib" in requirement(cfg["options.extras_require"]["test"])


def test_masked_test_pass_ranks_out_each_users_input_sequence(in_tmp):
    """run()'s trainer with mask_input: scores at each user's input items are -inf, all others as
    RecBole's evaluation gives them; run() reports that second test pass beside RecBole's."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer

    config = pipeline.build_config("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp))
    _, _, test = data_preparation(config, create_dataset(config))
    net = pipeline.build_model(config, test.dataset)
    trainer = pipeline.run_trainer(get_trainer(config["MODEL_TYPE"], config["model"]))(config, net)
    trainer.tot_item_num = test._dataset.item_num
    batch = next(iter(test))
    net.eval()
    with torch.no_grad():
        _, plain, _, _ = trainer._full_sort_batch_eval(batch)
        trainer.mask_input = True
        inter, masked, _, _ = trainer._full_sort_batch_eval(batch)
    seq = inter[net.ITEM_SEQ]
    ranked_out = torch.zeros_like(plain, dtype=torch.bool).scatter_(1, seq, True)
    assert ranked_out[:, 1:].any()
    assert torch.isinf(masked[ranked_out]).all() and (masked[ranked_out] < 0).all()
    assert torch.equal(masked[~ranked_out], plain[~ranked_out])

    result = pipeline.run("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp, epochs=1))
    assert "test_result_input_masked" not in result.extra  # off by default: RecBole's test only
    result = pipeline.run("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp, epochs=1, test_input_masked=True))
    masked_result = result.extra["test_result_input_masked"]
    assert set(masked_result) == set(result.test_result)
    per_user = result.extra["per_user_test_input_masked"]
    for key, value in masked_result.items():
        assert abs(float(np.mean(per_user[key])) - value) < 1e-4
    assert masked_result != result.test_result  # tiny's users repeat items: masking changes what is ranked


@pytest.mark.parametrize("bigger", [True, False])
def test_best_epoch_is_the_epoch_whose_checkpoint_recbole_keeps(bigger):
    """RecBole's early stopping counts a tied validation score as an improvement and saves the
    checkpoint again: the row's best epoch is the last of the tied ones, the weights tested."""
    from recbole.utils import early_stopping

    scores = [0.10, 0.30, 0.20, 0.30, 0.25, 0.30, 0.05] if bigger else [0.9, 0.3, 0.4, 0.3, 0.35]
    best, step, saved_at = (-np.inf if bigger else np.inf), 0, None
    for epoch, value in enumerate(scores):
        best, step, stop, update = early_stopping(value, best, step, max_step=10, bigger=bigger)
        if update:
            saved_at = epoch
    history = [(e, v) for e, v in enumerate(scores)]
    assert pipeline._best_epoch(history, bigger, best) == saved_at == (5 if bigger else 3)


@pytest.mark.parametrize("key", ["test_input_masked", "record_machine_by_epoch"])
def test_the_record_keys_are_true_or_false_and_off_by_default(key, in_tmp):
    assert pipeline.resolve_records(pipeline.build_config("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp))) == {
        "test_input_masked": False, "record_machine_by_epoch": False}
    on = pipeline.build_config("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp), cmd_args=[f"--{key}=True"])
    assert pipeline.resolve_records(on)[key] is True
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match=f"{key}={bad!r} is invalid: it must be True or False"):
            pipeline.build_config("SASRec", "tiny", config_dict=tiny_config_dict(in_tmp, **{key: bad}))


def test_a_row_s_settings_leave_out_the_record_keys():
    """A comparison resumed with the masked pass or the machine record turned on continues its rows:
    those keys change no training; any other key still counts."""
    from mamba4rec.compare.rows import _settings

    plain = _settings("tiny", [], {"epochs": 3}, ["--train_mode=sequence"])
    assert _settings("tiny", [], {"epochs": 3, "record_machine_by_epoch": True},
                     ["--train_mode=sequence", "--test_input_masked=True"]) == plain
    assert _settings("tiny", [], {"epochs": 3}, ["--train_mode=sequence", "--seed=7"]) != plain
