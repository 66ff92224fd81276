"""experiments (plan, runner, export, tables, goals, results): the queue of result runs, the export to
results/, the tables and the goal checks."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments import export, goals, plan, results, runner, tables
from tests.conftest import TINY_DATA, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_jobs(monkeypatch):
    monkeypatch.setitem(plan.DATASETS, "tiny", ("tiny", "tiny/tiny.inter", []))
    jobs = [plan.Job("tiny", "sequence", n) for n in ("Mamba4Rec", "SASRec", "GRU4Rec", "Mamba4Rec-2layers")]
    monkeypatch.setattr(plan, "JOBS", jobs)
    return jobs


def _train(job, out):
    """What a job's command does, in this process: its comparison with --compare_run=<model>."""
    from mamba4rec.compare import compare

    cmd = job.command(out)
    cmd_args = [a for a in cmd if a.startswith("--") and "=" in a and a.split("=")[0] not in
                ("--compare_dir", "--compare", "--compare_run", "--data_path")]
    models = ["Mamba4Rec"] + next(a for a in cmd if a.startswith("--compare=")).split("=", 1)[1].split(",")
    cfg = tiny_config_dict(out, scan_impl="torch", epochs=2, data_path=str(TINY_DATA))
    cfg.pop("checkpoint_dir")
    compare(models, "tiny", job.compare_dir(out), config_dict=cfg, cmd_args=cmd_args, only=[job.model],
            isolate=False, progress=lambda m: None)


def test_jobs_keep_the_prefix_comparison_s_arguments_and_separate_the_2_layer_run():
    beauty = {j.name: j for j in plan.JOBS if j.dataset == "amazon-beauty" and j.mode == "prefix"}
    cmd = beauty["SASRec"].command(Path("/o"))
    # the arguments the prefix Beauty runs were started with, and the records results/ keeps (which a
    # row's settings leave out: their rows and checkpoints resume under these)
    assert cmd == ["run_recbole.py", "-d", "amazon-beauty", "--compare_dir=/o/beauty/out", "--data_path=/o/dataset/",
                   "--show_progress=False", "--resume", "--test_input_masked=True", "--record_machine_by_epoch=True",
                   "--compare=GRU4Rec,SASRec", "--compare_run=SASRec"]
    two = next(j for j in plan.JOBS if j.name == "Mamba4Rec-2layers" and j.dataset == "ml-1m")
    assert "--num_layers=2" in two.command(Path("/o")) and "--train_mode=sequence" in two.command(Path("/o"))
    assert two.compare_dir(Path("/o")) != next(j for j in plan.JOBS if j.key == "ml-1m/sequence/SASRec").compare_dir(Path("/o"))
    # Beauty's jobs first (both modes), then Video Games in sequence mode, then ML-1M
    order = [(j.dataset, j.mode) for j in plan.JOBS]
    beauty = [i for i, j in enumerate(plan.JOBS) if j.dataset == "amazon-beauty" and j.name not in goals.ABLATIONS]
    assert beauty == list(range(len(beauty))) and len(beauty) == 9
    # the ablations (one layer with the block residual) after the table's rows, before the optional
    # Video Games prefix runs; a comparison of their own, with the variant's key
    residual = [i for i, j in enumerate(plan.JOBS) if j.name == "Mamba4Rec-residual"]
    assert len(residual) == 2 and min(residual) > max(i for i, (d, m) in enumerate(order) if d == "ml-1m"
                                                      and m == "sequence")
    assert max(residual) < order.index(("amazon-video-games", "prefix"))
    assert {(plan.JOBS[i].dataset, plan.JOBS[i].mode) for i in residual} == {
        ("amazon-video-games", "sequence"), ("amazon-beauty", "sequence")}
    # the whole-history runs last, each in a comparison folder of its own mode
    history = [j for j in plan.JOBS if j.mode == "history"]
    assert plan.JOBS[-len(history):] == history and {j.key for j in history} == {
        "ml-1m/history/Mamba4Rec", "ml-1m/history/Mamba4Rec-2layers", "amazon-video-games/history/Mamba4Rec"}
    assert all("--train_mode=history" in j.command(Path("/o")) for j in history)
    assert history[0].compare_dir(Path("/o")) == Path("/o/ml-1m/history")
    assert history[-1].compare_dir(Path("/o")) == Path("/o/ml-1m/history-2layers")
    ablation = plan.JOBS[residual[0]]
    assert "--block_residual=True" in ablation.command(Path("/o")) and "--compare_run=Mamba4Rec" in ablation.command(Path("/o"))
    assert ablation.compare_dir(Path("/o")).name == "sequence-residual"
    # the seed-2021 run and the prefix run of Mamba4Rec (its learning curves) before the long 2-layer run
    names = [(j.mode, j.name) for j in plan.JOBS]
    assert names.index(("sequence", "Mamba4Rec-seed2021")) < names.index(("sequence", "Mamba4Rec-2layers"))
    assert names.index(("prefix", "Mamba4Rec")) < names.index(("sequence", "Mamba4Rec-2layers"))
    assert order.index(("amazon-video-games", "sequence")) < order.index(("ml-1m", "sequence"))
    assert plan.JOBS.index(plan.Job("amazon-beauty", "prefix", "SASRec")) == 2  # the longest run starts early


def test_export_writes_rows_per_user_curves_and_tables_and_keeps_earlier_results(in_tmp, tiny_jobs):
    out = in_tmp / "runs"
    for job in tiny_jobs[:3]:
        _train(job, out)
    store = in_tmp / "results"
    # a row finished on another machine earlier: results/ keeps it though OUT has no trace of it
    earlier = store / "tiny" / "prefix" / "SASRec.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"dataset": "tiny", "train_mode": "prefix", "model": "SASRec",
                                   "valid_result": {"ndcg@10": 0.1}, "test_result": dict.fromkeys(plan.METRICS, 0.1),
                                   "best_epoch": 3, "epochs_run": 14, "stopped_by": "early stopping"}))
    written = export.export(out, results=store, log=lambda m: None)
    assert sorted(Path(p).name for p in written) == ["GRU4Rec.json", "Mamba4Rec.json", "SASRec.json"]
    rec = json.loads((store / "tiny" / "sequence" / "Mamba4Rec.json").read_text())
    assert set(rec["test_result"]) == set(plan.METRICS) and rec["epochs_run"] == 2
    assert "--train_mode=sequence" in rec["config_overrides"] and rec["data_sha256"]
    assert rec["machine"] and rec["params"] > 0 and rec["train_s_to_stop"] > 0
    assert "machine_by_epoch" not in rec  # trained in one stretch on one machine
    # the jobs turn on what results/ records; a row's settings, hence its overrides, leave those keys out
    assert "--test_input_masked=True" in rec["command"] and "--record_machine_by_epoch=True" in rec["command"]
    assert not [o for o in rec["config_overrides"] if o.startswith(("--test_input_masked", "--record_machine"))]
    curve = json.loads((out / "tiny" / "sequence" / "curves" / "Mamba4Rec.json").read_text())
    assert [m[0] for m in curve["machines"]] == [0] and curve["machines"][0][1] == rec["machine"]
    with np.load(store / "tiny" / "per_user.npz") as data:
        assert set(data.files) == {f"sequence/{m}/{v}{k}" for m in ("Mamba4Rec", "SASRec", "GRU4Rec")
                                   for v in ("", "input_masked_") for k in plan.METRICS}
        assert abs(float(data["sequence/Mamba4Rec/ndcg@10"].mean()) - rec["test_result"]["ndcg@10"]) < 1e-4
        masked = rec["test_result_input_masked"]  # run()'s second test pass, input sequences ranked out
        assert abs(float(data["sequence/Mamba4Rec/input_masked_ndcg@10"].mean()) - masked["ndcg@10"]) < 1e-4
    curves = (store / "tiny" / "curves.csv").read_text().splitlines()
    assert curves[0] == "train_mode,model,epoch,valid_ndcg@10,train_hours" and len(curves) == 1 + 3 * 2
    assert (store / "tiny" / "curves.png").stat().st_size > 1000
    assert earlier.is_file()

    text = tables.tables(store)
    assert "### tiny, train_mode=sequence" in text and "### tiny, train_mode=prefix" in text
    assert "Not finished yet: Mamba4Rec-2layers." in text
    assert "better of 1 and 2 layers by valid NDCG@10: **Mamba4Rec** (provisional: Mamba4Rec-2layers is not " \
           "finished yet)" in text
    for other in ("SASRec", "GRU4Rec"):  # paired, one line per baseline, with each metric's interval and verdict
        line = next(ln for ln in text.splitlines() if ln.startswith(f"- Mamba4Rec - {other}: "))
        assert all(f"{metric} " in line for metric in plan.METRICS) and line.count(" [") == len(plan.METRICS)
    masked_block = text.split("Test with each user's input sequence masked", 1)[1].split("### ", 1)[0]
    assert "| SASRec | " in masked_block and "No masked test values: " not in masked_block
    assert "Mamba4Rec (chosen by valid NDCG@10, as above) minus each baseline, masked test values" in masked_block
    assert masked_block.count("- Mamba4Rec - ") == 2
    assert "No masked test values" not in text.split("### tiny, train_mode=prefix", 1)[1]  # no masked rows there
    # exporting again changes nothing (the same rows)
    before = {p: p.read_bytes() for p in (store / "tiny").rglob("*") if p.is_file() and p.suffix != ".png"}
    export.export(out, results=store, log=lambda m: None)
    assert {p: p.read_bytes() for p in before} == before
    # a job trained again without per-user values or a curve leaves nothing of its earlier run
    (out / "tiny" / "sequence" / "per_user" / "SASRec.npz").unlink()
    (out / "tiny" / "sequence" / "curves" / "SASRec.json").unlink()
    export.export(out, results=store, log=lambda m: None)
    with np.load(store / "tiny" / "per_user.npz") as data:
        assert not [k for k in data.files if k.startswith("sequence/SASRec/")] and "sequence/GRU4Rec/hit@10" in data.files
    assert ",SASRec," not in (store / "tiny" / "curves.csv").read_text()
    assert "SASRec: no per-user values" in tables.tables(store)
    # a row resumed on another machine says where each stretch of its epochs trained
    curve_file = out / "tiny" / "sequence" / "curves" / "GRU4Rec.json"
    curve = json.loads(curve_file.read_text())
    curve["machines"] = [[0, None], [1, "Box B, 2 cpus", 2]]
    curve_file.write_text(json.dumps(curve))
    export.export(out, results=store, log=lambda m: None)
    rec = json.loads((store / "tiny" / "sequence" / "GRU4Rec.json").read_text())
    assert rec["machine_by_epoch"] == [{"from_epoch": 0, "machine": "not recorded"},
                                       {"from_epoch": 1, "machine": "Box B, 2 cpus", "threads": 2}]
    text = tables.tables(store)
    assert ("GRU4Rec trained in stretches (resumed): epochs 0-0 on a machine not recorded, epochs 1-1 on Box B, "
            "2 cpus (2 threads).") in text
    machine_line = text.split("GRU4Rec trained in stretches", 1)[0].rsplit("Machine: ", 1)[1]
    assert "Box B, 2 cpus" in machine_line and "not recorded" not in machine_line


def test_tables_fill_the_marked_block_of_the_doc(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Results\n\nintro\n\n{tables.BEGIN}\nold\n{tables.END}\n\nafter\n")
    store = tmp_path / "results"
    rec = {"dataset": "ml-1m", "train_mode": "sequence", "valid_result": dict.fromkeys(plan.METRICS, 0.2),
           "test_result": {"hit@10": 0.33, "ndcg@10": 0.19, "mrr@10": 0.15}, "best_epoch": 40, "epochs_run": 51,
           "stopped_by": "early stopping", "train_s_per_epoch": 100.0, "peak_rss_mib": 900}
    for name in ("Mamba4Rec", "Mamba4Rec-2layers"):
        p = store / "ml-1m" / "sequence" / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({**rec, "model": name}))
    tables.write_tables(doc, store)
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n\n") and text.endswith(f"{tables.END}\n\nafter\n")
    assert "old" not in text and "| *Mamba4Rec, paper* | 0.3121 | 0.1822 | 0.1425 |" in text
    assert "hit@10 >= Mamba4Rec, paper 0.3121 (Mamba4Rec): met (0.3300)" in text
    assert "2 layers, hit@10 >= TiM4Rec's 0.3253: met (0.3300)" in text
    assert "Not finished yet: SASRec, GRU4Rec." in text
    bare = tmp_path / "bare.md"
    bare.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no .* block"):
        tables.write_tables(bare, store)


def test_run_queue_skips_finished_jobs_runs_the_rest_in_lanes_and_reports_failures(tmp_path, tiny_jobs, monkeypatch):
    out = tmp_path / "runs"
    fake = tmp_path / "fake_python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        args = dict(a.split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
        model = args["--compare_run"]
        if model == "GRU4Rec":
            sys.exit(3)  # a job that fails
        rows = os.path.join(args["--compare_dir"], "rows")
        os.makedirs(rows, exist_ok=True)
        assert os.environ["OMP_NUM_THREADS"] == "1"
        # in the job's own folder (RecBole's log/ goes there, not into the checkout), the script by its path
        assert os.getcwd() == os.path.realpath(args["--compare_dir"]), os.getcwd()
        assert sys.argv[1] == {str(plan.REPO / "run_recbole.py")!r}
        with open(os.path.join(rows, model + ".json"), "w") as fh:
            json.dump({{"row": {{"model": model, "status": "ok", "epochs_run": 1}}, "settings": {{}}, "data": {{}}}}, fh)
        """))
    fake.chmod(0o755)
    exported = []
    monkeypatch.setattr(export, "export", lambda out_, jobs, log=None, **kw: exported.extend(j.key for j in jobs))
    lines = []
    handler = signal.getsignal(signal.SIGTERM)
    failed = runner.run_queue(out, tiny_jobs, 2, str(fake), log=lines.append)
    assert failed == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # the queue's stop handler is gone with it
    assert sorted(exported) == sorted(j.key for j in tiny_jobs if j.name != "GRU4Rec")
    assert any("tiny/sequence/GRU4Rec ended with status 3" in m for m in lines)
    lines.clear()
    exported.clear()
    assert runner.run_queue(out, tiny_jobs, 2, str(fake), log=lines.append) == 1  # only GRU4Rec runs again
    assert sum("finished earlier" in m for m in lines) == 3
    # the jobs finished before are exported again (an export cut short by a stop reaches results/)
    assert sorted(exported) == sorted(j.key for j in tiny_jobs if j.name != "GRU4Rec")


def test_run_queue_does_not_train_again_what_results_holds_unless_rerun(tmp_path, tiny_jobs, monkeypatch):
    """An OUT lost with its machine: the rows committed to results/ are not trained again."""
    store = tmp_path / "results"
    (store / "tiny" / "sequence").mkdir(parents=True)
    (store / "tiny" / "sequence" / "SASRec.json").write_text("{}")
    started = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            started.append(next(a for a in cmd if a.startswith("--compare_run=")).split("=", 1)[1])

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakePopen)
    lines = []
    jobs = tiny_jobs[:2]  # Mamba4Rec, SASRec
    assert runner.run_queue(tmp_path / "runs", jobs, 1, "python", log=lines.append, results=store) == 1
    assert started == ["Mamba4Rec"]  # (it wrote no row: a failure, not a skip)
    assert any("tiny/sequence/SASRec: in results/ already" in m for m in lines)
    started.clear()
    runner.run_queue(tmp_path / "runs", jobs, 1, "python", log=lines.append, results=store, rerun=True)
    assert started == ["Mamba4Rec", "SASRec"]


def test_status_tells_a_row_results_holds_from_a_job_not_started(tmp_path, tiny_jobs):
    store = tmp_path / "results"
    (store / "tiny" / "sequence").mkdir(parents=True)
    (store / "tiny" / "sequence" / "SASRec.json").write_text("{}")
    lines = runner.status(tmp_path / "runs", results=store).splitlines()
    assert lines[0] == "tiny/sequence/Mamba4Rec: not started"
    assert lines[1].startswith("tiny/sequence/SASRec: in results/")
    assert len(lines) == len(tiny_jobs)


def test_cli_refuses_unknown_jobs_and_bad_lanes(capsys):
    assert results.main(["run", "/tmp/x", "--only", "ml-1m/sequence/BERT4Rec"]) == 2
    assert "unknown job(s) ml-1m/sequence/BERT4Rec" in capsys.readouterr().err
    assert results.main(["run", "/tmp/x", "--lanes", "0"]) == 2
    assert results.main(["run", "/tmp/x", "--threads", "0"]) == 2
    assert "--threads=0: it must be >= 1" in capsys.readouterr().err


def test_run_queue_gives_each_training_the_threads_asked_for(tmp_path, tiny_jobs, monkeypatch):
    envs = []

    class FakePopen:
        def __init__(self, cmd, env=None, **kw):
            envs.append({k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakePopen)
    runner.run_queue(tmp_path / "runs", tiny_jobs[:1], 1, "python", log=lambda m: None,
                      results=tmp_path / "results", threads=2)
    assert envs == [dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"), "2")]
    envs.clear()
    runner.run_queue(tmp_path / "runs2", tiny_jobs[:1], 1, "python", log=lambda m: None,
                      results=tmp_path / "results")
    assert envs == [dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"), "1")]


def test_curve_lines_compare_the_modes_beside_the_seed_noise(tmp_path):
    folder = tmp_path / "amazon-beauty"
    folder.mkdir()
    rows = ["train_mode,model,epoch,valid_ndcg@10,train_hours"]
    for e in range(3):
        rows += [f"prefix,Mamba4Rec,{e},{0.01 * e:.4f},", f"sequence,Mamba4Rec,{e},{0.01 * e + 0.002:.4f},",
                 f"sequence,Mamba4Rec-seed2021,{e},{0.01 * e + 0.001:.4f},"]
    (folder / "curves.csv").write_text("\n".join(rows) + "\n")
    text = "\n".join(tables.curve_lines(tmp_path, "amazon-beauty"))
    assert "- Mamba4Rec: |sequence - prefix| mean 0.0020, largest 0.0020 over epochs 0-2" in text
    assert "|seed 2020 - seed 2021| (sequence mode) mean 0.0010" in text
    assert "| 2 |" not in text and "`results/amazon-beauty/curves.csv`" in text  # every epoch: in the csv
    assert "SASRec" not in text  # no curves of it: no line
    # a data set without a second-seed job: no seed column, and the noise is "not run", not "not yet"
    other = tmp_path / "amazon-video-games"
    other.mkdir()
    (other / "curves.csv").write_text("\n".join(r for r in rows if "seed2021" not in r) + "\n")
    text = "\n".join(tables.curve_lines(tmp_path, "amazon-video-games"))
    assert "(sequence mode) not run on this data set" in text and "seed 2021 |" not in text
    assert "- Mamba4Rec: |sequence - prefix| mean 0.0020, largest 0.0020 over epochs 0-2" in text


def test_a_second_run_on_the_same_out_is_refused_while_one_holds_it(tmp_path):
    with runner.queue_lock(tmp_path):
        with pytest.raises(SystemExit, match=f"being trained by another 'python -m experiments.results run' \\(pid {os.getpid()}\\)"):
            with runner.queue_lock(tmp_path):
                pass
    with runner.queue_lock(tmp_path):  # released: free again
        pass


def test_noise_lines_put_the_other_seed_beside_its_row():
    row = {"test_result": {"hit@10": 0.0839, "ndcg@10": 0.0420, "mrr@10": 0.0291}}
    other = {"test_result": {"hit@10": 0.0834, "ndcg@10": 0.0411, "mrr@10": 0.0281}, "epochs_run": 25, "best_epoch": 22}
    lines = tables._noise_lines({"SASRec": row}, {"SASRec-seed2021": other})
    assert lines[0] == ("- SASRec-seed2021 (run-to-run noise: 25 epochs, best 22): test HR@10 0.0834, NDCG@10 0.0411, "
                        "MRR@10 0.0281; minus the seed-2020 row: -0.0005, -0.0009, -0.0010")
    assert "minus" not in tables._noise_lines({}, {"SASRec-seed2021": other})[0]  # no row of its own seed yet
    assert tables._noise_lines({"SASRec": row}, {}) == []
    # a seed run cut at its epoch limit before the row's best epoch measures the shorter training, not noise
    slow = {**row, "best_epoch": 119}
    line = tables._noise_lines({"Mamba4Rec": slow}, {"Mamba4Rec-seed2021": other})[0]
    assert "minus" not in line and "before the seed-2020 run's best epoch (119)" in line


def test_curves_of_unfinished_jobs_go_to_results_and_never_replace_a_finished_curve(tmp_path, tiny_jobs, monkeypatch):
    import torch

    prefix = plan.Job("tiny", "prefix", "Mamba4Rec")
    jobs = tiny_jobs + [prefix]
    monkeypatch.setattr(plan, "JOBS", jobs)
    out, store = tmp_path / "runs", tmp_path / "results"

    def last(job, scores, seconds):
        path = job.compare_dir(out) / "checkpoints" / f"{job.model}-{job.dataset}-last.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": len(scores) - 1, "history": {"valid_scores": scores, "train_seconds": seconds}}, path)

    last(prefix, [(0, 0.01), (1, 0.02), (2, 0.03)], [3600.0, 1800.0, 1800.0])
    last(tiny_jobs[0], [(0, 0.05), (1, 0.06)], [10.0, 10.0])  # sequence Mamba4Rec: its row is in results/
    finished_row = store / "tiny" / "sequence" / "Mamba4Rec.json"
    finished_row.parent.mkdir(parents=True)
    finished_row.write_text("{}")
    (store / "tiny" / "curves.csv").write_text("train_mode,model,epoch,valid_ndcg@10,train_hours\n"
                                               "sequence,Mamba4Rec,0,0.0111,\nsequence,Mamba4Rec,1,0.0222,\n")
    assert export.export_curves(out, results=store, log=lambda m: None) == [str(store / "tiny" / "curves.csv")]
    rows = (store / "tiny" / "curves.csv").read_text().splitlines()
    assert "prefix,Mamba4Rec,0,0.01,1.0" in rows and "prefix,Mamba4Rec,2,0.03,2.0" in rows
    assert "sequence,Mamba4Rec,0,0.0111," in rows and ",0.05," not in "\n".join(rows)  # the finished curve stays
    text = "\n".join(tables.curve_lines(store, "tiny"))
    assert "(runs not yet at their stopping point: prefix Mamba4Rec, its first 3 epochs)" in text
    # again: the same file (no curve twice); a job finished in OUT is the export's, not this command's
    before = (store / "tiny" / "curves.csv").read_bytes()
    export.export_curves(out, results=store, log=lambda m: None)
    assert (store / "tiny" / "curves.csv").read_bytes() == before
    with monkeypatch.context() as mp:
        mp.setattr(export, "finished", lambda job, out_: {"row": {}} if job == prefix else None)
        assert export.export_curves(out, results=store, log=lambda m: None) == []
    # once the prefix run's row exists, its curve is the finished one and the note goes
    (store / "tiny" / "prefix").mkdir()
    (store / "tiny" / "prefix" / "Mamba4Rec.json").write_text("{}")
    assert "not yet at its stopping point" not in "\n".join(tables.curve_lines(store, "tiny"))


def test_goal_lines_judge_the_chosen_variant_and_show_the_other_beside_it():
    from mamba4rec.significance import paired_difference

    rng = np.random.default_rng(0)
    base = rng.random(500).astype(np.float32)
    per_user = {}
    for name, shift in (("Mamba4Rec", 0.05), ("Mamba4Rec-2layers", -0.05), ("SASRec", 0.0)):
        for metric in plan.METRICS:
            per_user[f"sequence/{name}/{metric}"] = base + shift
    recs = {"Mamba4Rec": {"valid_result": {"ndcg@10": 0.06}}, "Mamba4Rec-2layers": {"valid_result": {"ndcg@10": 0.05}},
            "SASRec": {"valid_result": {"ndcg@10": 0.05}}}
    text = "\n".join(goals._goal_lines("amazon-beauty", "sequence", recs, per_user, paired_difference))
    assert "better of 1 and 2 layers by valid NDCG@10: **Mamba4Rec**. Paired" in text  # both there: final
    assert "- Mamba4Rec - SASRec: hit@10 +0.0500 [+0.0500, +0.0500] met (ahead); "  in text
    assert "Mamba4Rec-2layers (not chosen: valid NDCG@10 0.0500 against 0.0600)" in text
    assert "- Mamba4Rec-2layers - SASRec: hit@10 -0.0500 [-0.0500, -0.0500] behind; " in text
    assert text.count("NOT MET") == 0  # the variant not chosen gets no verdict


def test_published_figures_are_judged_on_the_chosen_variant_under_its_own_lines():
    from mamba4rec.significance import paired_difference

    recs = {"Mamba4Rec": {"valid_result": {"ndcg@10": 0.13}, "test_result": {"hit@10": 0.25}},
            "Mamba4Rec-2layers": {"valid_result": {"ndcg@10": 0.14}, "test_result": {"hit@10": 0.33}}}
    lines = goals._goal_lines("ml-1m", "sequence", recs, {}, paired_difference)
    paper = next(i for i, line in enumerate(lines) if "paper 0.3121" in line)
    assert lines[paper] == "- hit@10 >= Mamba4Rec, paper 0.3121 (Mamba4Rec-2layers): met (0.3300)"
    # before the block of the variant not chosen, which would otherwise seem to own them
    assert paper < next(i for i, line in enumerate(lines) if line.startswith("Mamba4Rec (not chosen"))


def test_an_ablation_is_paired_with_the_variants_it_takes_apart_and_never_chosen_for_the_goal():
    from mamba4rec.significance import paired_difference

    rng = np.random.default_rng(1)
    base = rng.random(400)
    shifts = {"Mamba4Rec": 0.0, "Mamba4Rec-2layers": 0.02, "Mamba4Rec-residual": 0.03, "SASRec": 0.01}
    # masked values move twice as far as RecBole's: a masked line that read the unmasked ones is seen
    per_user = {f"sequence/{n}/{values}{m}": base + (2 * s + 0.1 if values else s)
                for n, s in shifts.items() for m in plan.METRICS for values in ("", "input_masked_")}
    recs = {n: {"valid_result": {"ndcg@10": 0.05 + s}, "test_result": dict.fromkeys(plan.METRICS, 0.05 + s),
                "test_result_input_masked": dict.fromkeys(plan.METRICS, 0.15 + 2 * s)} for n, s in shifts.items()}
    text = "\n".join(goals._goal_lines("amazon-beauty", "sequence", recs, per_user, paired_difference))
    # the best valid NDCG@10 is the ablation's, yet the goal judges the better of 1 and 2 layers
    assert "by valid NDCG@10: **Mamba4Rec-2layers**" in text
    assert "Mamba4Rec-residual, one layer with the residual" in text and "outside the goal's choice" in text
    assert "- Mamba4Rec-residual - SASRec: hit@10 +0.0200 [+0.0200, +0.0200] ahead; " in text
    assert "; ndcg@10 +0.0300 [+0.0300, +0.0300] ahead; " in text
    assert "- Mamba4Rec-residual - Mamba4Rec-2layers: hit@10 +0.0100 [+0.0100, +0.0100] ahead" in text
    assert "Mamba4Rec-residual - GRU4Rec" not in text  # no GRU4Rec row: no line for it
    assert "Mamba4Rec-residual - SASRec" not in text.split("outside the goal's choice")[0]  # no verdict lines for it
    masked = "\n".join(tables._masked_lines(recs, "sequence", per_user, paired_difference))
    assert "| Mamba4Rec-residual | 0.2100 | 0.2100 | 0.2100 | +0.1300 | +0.1300 | +0.1300 |" in masked
    assert "paired the same way on the masked test values, for reference" in masked
    assert "- Mamba4Rec-residual - Mamba4Rec: hit@10 +0.0600 [+0.0600, +0.0600] ahead" in masked
    assert "mrr@10 +0.0400 [+0.0400, +0.0400] ahead" in masked


def test_an_ablation_without_partners_or_without_a_goal_row_is_still_shown_right():
    from mamba4rec.significance import paired_difference

    base = np.random.default_rng(2).random(300)
    per_user = {f"sequence/{n}/{m}": base + s for n, s in (("Mamba4Rec-residual", 0.01), ("SASRec", 0.0))
                for m in plan.METRICS}
    per_user.update({f"sequence/Mamba4Rec-residual/input_masked_{m}": base + 0.2 for m in plan.METRICS})
    recs = {"Mamba4Rec-residual": {"valid_result": {"ndcg@10": 0.05}, "test_result": dict.fromkeys(plan.METRICS, 0.1),
                                   "test_result_input_masked": dict.fromkeys(plan.METRICS, 0.3)},
            "SASRec": {"valid_result": {"ndcg@10": 0.04}, "test_result": dict.fromkeys(plan.METRICS, 0.09)}}
    # no Mamba4Rec row of 1 or 2 layers yet (a run of --only the ablation): its pairs with SASRec still show
    goal = goals._goal_lines("amazon-beauty", "sequence", recs, per_user, paired_difference)
    assert goal[0].startswith("Mamba4Rec-residual, one layer with the residual")
    assert "- Mamba4Rec-residual - SASRec: hit@10 +0.0100 [+0.0100, +0.0100] ahead; " in goal[2]
    # masked values only for the ablation: nothing to pair them with, so no heading over an empty list
    masked = "\n".join(tables._masked_lines(recs, "sequence", per_user, paired_difference))
    assert "| Mamba4Rec-residual | 0.3000 |" in masked and "for reference" not in masked


def test_the_tim4rec_check_sits_under_the_2_layer_lines_whichever_variant_is_chosen():
    from mamba4rec.significance import paired_difference

    recs = {"Mamba4Rec": {"valid_result": {"ndcg@10": 0.14}, "test_result": {"hit@10": 0.25}},
            "Mamba4Rec-2layers": {"valid_result": {"ndcg@10": 0.13}, "test_result": {"hit@10": 0.26}}}
    lines = goals._goal_lines("ml-1m", "sequence", recs, {}, paired_difference)
    tim = lines.index("- 2 layers, hit@10 >= TiM4Rec's 0.3253: **NOT MET** (0.2600)")
    assert tim > lines.index("Mamba4Rec-2layers (not chosen: valid NDCG@10 0.1300 against 0.1400), paired the same "
                             "way, for reference:")
    assert "- hit@10 >= Mamba4Rec, paper 0.3121 (Mamba4Rec): **NOT MET** (0.2500)" in lines[:tim]


def test_masked_values_of_an_older_row_come_from_its_best_checkpoint(in_tmp, tiny_jobs):
    """A row exported before run()'s masked test pass gets the values of that pass from its best
    checkpoint (the same values, user by user); a checkpoint that is not the row's is refused."""
    out, store = in_tmp / "runs", in_tmp / "results"
    job = tiny_jobs[1]  # SASRec
    _train(job, out)
    (out / "dataset" / "tiny").mkdir(parents=True)
    (out / "dataset" / "tiny" / "tiny.inter").write_bytes((TINY_DATA / "tiny" / "tiny.inter").read_bytes())
    path, npz = job.row_path(out), job.compare_dir(out) / "per_user" / "SASRec.npz"
    saved = json.loads(path.read_text())
    own = {k: saved["row"].pop(f"test_input_masked_{k}") for k in plan.METRICS}  # as an older row
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    with open(npz, "wb") as fh:
        np.savez(fh, **{k: v for k, v in arrays.items() if not k.startswith("input_masked_")})
    path.write_text(json.dumps(saved))

    lines = []
    assert export.masked_from_checkpoints(out, [job], results=store, log=lines.append) == [job.key]
    assert any("test metrics equal the row's" in line for line in lines)
    rec = json.loads((store / "tiny" / "sequence" / "SASRec.json").read_text())
    assert rec["test_result_input_masked"] == own and "re-evaluated by experiments.results masked" in rec["input_masked_from"]
    with np.load(store / "tiny" / "per_user.npz") as data:
        for k in plan.METRICS:
            assert np.allclose(data[f"sequence/SASRec/input_masked_{k}"], arrays[f"input_masked_{k}"], atol=1e-6)
    assert export.masked_from_checkpoints(out, [job], results=store, log=lines.append) == []  # has them now

    saved = json.loads(path.read_text())  # a row whose best validation is not the checkpoint's
    for k in plan.METRICS:
        saved["row"].pop(f"test_input_masked_{k}")
    saved["row"]["valid_ndcg@10"] += 0.01
    path.write_text(json.dumps(saved))
    lines.clear()
    assert export.masked_from_checkpoints(out, [job], results=store, log=lines.append) == []
    assert any("not the row's best checkpoint" in line for line in lines)


def test_a_row_named_with_the_first_of_tied_best_epochs_is_exported_with_the_last():
    """Rows written before the tie fix kept the first of tied best epochs; RecBole tested the last."""
    job = plan.Job("amazon-beauty", "sequence", "GRU4Rec")
    row = {"best_epoch": 1, "valid_ndcg@10": 0.3, "epochs_run": 6, "stopped_by": "early stopping"}
    saved = {"row": row, "settings": {}, "data": {}}
    curve = {"metric": "ndcg@10", "bigger": True, "valid_scores": [[0, 0.1], [1, 0.3], [2, 0.2], [3, 0.3], [4, 0.2], [5, 0.1]]}
    assert export.result_record(job, saved, curve)["best_epoch"] == 3
    assert export.result_record(job, saved, None)["best_epoch"] == 1  # no curve: the row's own
    other = {**curve, "valid_scores": [[0, 0.1], [1, 0.25]]}  # a curve that is not the row's: kept as it is
    assert export.result_record(job, saved, other)["best_epoch"] == 1


def test_mode_lines_pair_prefix_with_sequence_beside_the_seed_spread():
    from mamba4rec.significance import paired_difference

    rng = np.random.default_rng(1)
    base = rng.random(400)
    per_user = {}
    for key, shift in (("prefix/SASRec/", 0.02), ("sequence/SASRec/", 0.0), ("sequence/SASRec-seed2021/", -0.01)):
        for metric in plan.METRICS:
            per_user[key + metric] = base + shift
    rec = {"test_result": dict.fromkeys(plan.METRICS, 0.1), "valid_result": {"ndcg@10": 0.05},
           "best_epoch": 20, "epochs_run": 31, "data_sha256": {"x.inter": "a"}, "train_s_to_stop": 3600.0}
    by_mode = {"prefix": {"SASRec": rec, "GRU4Rec": rec}, "sequence": {"SASRec": rec, "SASRec-seed2021": rec}}
    text = "\n".join(tables.mode_lines("amazon-beauty", by_mode, per_user, paired_difference))
    assert "| SASRec | prefix | 0.1000 |" in text and "| SASRec | sequence |" in text
    assert "GRU4Rec" not in text  # no sequence row to pair with
    assert "- SASRec, prefix - sequence: hit@10 +0.0200 [+0.0200, +0.0200] (beyond the users' noise)" in text
    assert "- SASRec, sequence, seed 2021 - seed 2020: hit@10 -0.0100" in text
    assert "the two seeds of one mode give the run-to-run spread" in text
    other = {**rec, "data_sha256": {"x.inter": "b"}}  # prefix trained on other data files: not paired
    text = "\n".join(tables.mode_lines("d", {"prefix": {"SASRec": other}, "sequence": {"SASRec": rec}},
                                        per_user, paired_difference))
    assert "prefix - sequence: hit@10: not paired" in text
    # no second seed on this data set: the text does not claim a spread it has not got
    assert "no second seed ran on this data set" in text and "the two seeds" not in text
    assert tables.mode_lines("d", {"sequence": {"SASRec": rec}}, per_user, paired_difference) == []


def test_history_lines_pair_whole_histories_with_the_window_row_and_sasrec():
    from mamba4rec.significance import paired_difference

    rng = np.random.default_rng(2)
    base = rng.random(300)
    per_user = {}
    for key, shift in (("history/Mamba4Rec/", 0.03), ("sequence/Mamba4Rec/", 0.0), ("sequence/SASRec/", 0.01),
                       ("history/Mamba4Rec-2layers/", 0.0)):
        for metric in plan.METRICS:
            per_user[key + metric] = base + shift
    rec = {"data_sha256": {"x.inter": "a"}}
    by_mode = {"history": {"Mamba4Rec": rec, "Mamba4Rec-2layers": rec},
               "sequence": {"Mamba4Rec": rec, "SASRec": rec}}
    text = "\n".join(tables.history_lines("ml-1m", by_mode, per_user, paired_difference))
    assert "### ml-1m: whole histories vs windows" in text
    assert "- Mamba4Rec (history) - Mamba4Rec (sequence): hit@10 +0.0300 [+0.0300, +0.0300] (beyond" in text
    assert "- Mamba4Rec (history) - SASRec (sequence): hit@10 +0.0200" in text
    # no window row of the 2-layer variant: paired with SASRec only
    assert "Mamba4Rec-2layers (history) - SASRec (sequence): hit@10 -0.0100" in text
    assert "Mamba4Rec-2layers (history) - Mamba4Rec-2layers" not in text
    other = {"history": {"Mamba4Rec": {"data_sha256": {"x.inter": "b"}}}, "sequence": {"Mamba4Rec": rec}}
    assert "hit@10: not paired" in "\n".join(tables.history_lines("d", other, per_user, paired_difference))
    assert tables.history_lines("d", {"sequence": {"SASRec": rec}}, per_user, paired_difference) == []


def test_seconds_are_a_ratio_to_sasrec_only_for_rows_of_one_machine_and_threads(tmp_path):
    xeon, epyc = "Intel Xeon, 2 cpus", "AMD EPYC, 2 cpus"
    sasrec = {"machine": xeon, "threads": 1}
    assert tables._setting_gap({"machine": xeon, "threads": 1}, sasrec) is None
    assert tables._setting_gap({"machine": epyc, "threads": 1}, sasrec) == "other machine"
    assert tables._setting_gap({"machine": xeon, "threads": 2}, sasrec) == "other threads"
    assert tables._setting_gap({"machine": None}, {"machine": None}) == "other machine"  # not known: no ratio
    # a resumed row whose stretches ran on two machines, or with two thread counts, compares with neither
    moved = {"machine": xeon, "threads": 1, "machine_by_epoch": [{"from_epoch": 0, "machine": epyc},
                                                                 {"from_epoch": 9, "machine": xeon, "threads": 1}]}
    assert tables._setting_gap(moved, sasrec) == "other machine"
    rethreaded = {"machine": xeon, "threads": 2, "machine_by_epoch": [{"from_epoch": 0, "machine": xeon, "threads": 1},
                                                                      {"from_epoch": 5, "machine": xeon, "threads": 2}]}
    assert tables._setting_gap(rethreaded, {"machine": xeon, "threads": 2}) == "other threads"
    # in the table: the ratio where the setting is SASRec's, the reason where it is not
    rec = {"dataset": "tiny", "train_mode": "sequence", "valid_result": dict.fromkeys(plan.METRICS, 0.1),
           "test_result": dict.fromkeys(plan.METRICS, 0.1), "best_epoch": 1, "epochs_run": 2,
           "stopped_by": "early stopping", "peak_rss_mib": 100}
    for name, extra in (("SASRec", {**sasrec, "train_s_per_epoch": 100.0}),
                        ("GRU4Rec", {"machine": xeon, "threads": 1, "train_s_per_epoch": 50.0}),
                        ("Mamba4Rec", {"machine": epyc, "threads": 1, "train_s_per_epoch": 20.0})):
        path = tmp_path / "tiny" / "sequence" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**rec, **extra, "model": name}))
    text = tables.tables(tmp_path)
    assert "| GRU4Rec | 0.1000 | 0.1000 | 0.1000 | 0.1000 | 1 / 2 | early stopping | 50.0 | 0.50 | 100 | 1.00 |" in text
    assert "| Mamba4Rec | 0.1000 | 0.1000 | 0.1000 | 0.1000 | 1 / 2 | early stopping | 20.0 | other machine | 100 | 1.00 |" in text


def test_a_comparison_s_rows_are_judged_against_the_baselines_and_the_paper(tmp_path, capsys):
    def row(model, hit, ndcg, mrr=0.1425):
        return {"model": model, "status": "ok", "test_hit@10": hit, "test_ndcg@10": ndcg, "test_mrr@10": mrr}

    mine = row("Mamba4Rec", 0.3200, 0.1800)
    assert goals.verdict([mine], dataset="ml-1m") == [  # no baseline needed for this part
        "- test_hit@10: Mamba4Rec >= the paper's 0.3121: met (Mamba4Rec 0.3200)",
        "- test_ndcg@10: Mamba4Rec >= the paper's 0.1822: **NOT MET** (Mamba4Rec 0.1800)",
        "- test_mrr@10: Mamba4Rec >= the paper's 0.1425: met (Mamba4Rec 0.1425)"]
    assert goals.verdict([mine], dataset="amazon-beauty") == []      # no paper figure for it
    assert goals.verdict([dict(mine, model="SASRec")], model="SASRec", dataset="ml-1m") == []
    rows = [row("Mamba4Rec", 0.05, 0.0206), row("SASRec", 0.05, 0.0277), row("GRU4Rec", 0.04, 0.0177),
            {"model": "NARM", "status": "failed: RuntimeError: x", "test_ndcg@10": None}]
    lines = goals.verdict(rows, dataset="amazon-beauty")
    assert "- test_ndcg@10: Mamba4Rec >= every baseline: **NOT MET** (Mamba4Rec 0.0206; SASRec 0.0277)" in lines
    assert "- test_hit@10: Mamba4Rec >= every baseline: met (Mamba4Rec 0.0500)" in lines  # ties count as met
    rows[1]["test_ndcg@10"] = 0.02
    assert not any("NOT MET" in line for line in goals.verdict(rows, dataset="amazon-beauty"))
    # the paper's figures are defined once, beside the other published ones
    assert goals.PAPER == {"ml-1m": dict(goals.REFERENCES["ml-1m"])["Mamba4Rec, paper"]}

    # python -m experiments.goals COMPARE_DIR: a comparison's rows on disk
    (tmp_path / "rows").mkdir()
    for r in (mine, row("SASRec", 0.30, 0.1700)):
        (tmp_path / "rows" / f"{r['model']}.json").write_text(
            json.dumps({"row": r, "settings": {"dataset": "ml-1m"}}))
    assert goals.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Goal (Mamba4Rec >= every baseline and the paper's figures, ml-1m, test split):\n")
    assert "- test_ndcg@10: Mamba4Rec >= the paper's 0.1822: **NOT MET** (Mamba4Rec 0.1800)" in out
    assert "- test_ndcg@10: Mamba4Rec >= every baseline: met (Mamba4Rec 0.1800)" in out
    with pytest.raises(SystemExit, match="no rows in"):
        goals.main([str(tmp_path / "elsewhere")])


def test_figures_are_drawn_again_from_results_alone_as_the_export_drew_them(tmp_path, monkeypatch, capsys):
    curves = [{"train_mode": mode, "model": m, "epoch": e, "valid_ndcg@10": 0.01 * e + (0.002 if mode == "prefix" else 0),
               "train_hours": ""} for mode in ("prefix", "sequence") for m in ("Mamba4Rec", "SASRec") for e in range(4)]
    export._write_curves(tmp_path / "tiny", "tiny", curves)  # what an export writes
    drawn = (tmp_path / "tiny" / "curves.png").read_bytes()
    assert drawn[:4] == b"\x89PNG"
    (tmp_path / "tiny" / "curves.png").unlink()
    assert export.redraw_curves(tmp_path, log=lambda m: None) == [str(tmp_path / "tiny" / "curves.png")]
    assert (tmp_path / "tiny" / "curves.png").read_bytes() == drawn  # from curves.csv alone, the same chart
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r'pip install "mamba4rec-recbole\[plot\]"'):
        export.redraw_curves(tmp_path, log=lambda m: None)
