"""experiments.gpu: the plan's jobs at once on one GPU, stopped at a time limit and resumed on the
same run folder, each exported as it finishes; and the queue's stop of a training that ignores it."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
import torch

from experiments import export, gpu, plan, runner

VG = [j for j in plan.JOBS if j.dataset == "amazon-video-games" and j.mode == "sequence"]

# A python that acts as run_recbole.py and datasets/prepare.py would. Per job (FAKE_PLAN:
# "<compare_dir>|<model>" -> finish, fail or stop) it writes its row, or puts its checkpoints
# (templates under FAKE_CKPT) in place and trains until stopped.
FAKE = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, shutil, sys, time
    log = open(os.environ["FAKE_LOG"], "a")
    if sys.argv[1] == "datasets/prepare.py":
        a = sys.argv[2:]
        out, ds = a[a.index("--output-dir") + 1], a[a.index("--dataset") + 1]
        os.makedirs(os.path.join(out, ds), exist_ok=True)
        open(os.path.join(out, ds, ds + ".inter"), "w").close()
        log.write(json.dumps({{"prepare": ds, "args": a}}) + "\\n")
        sys.exit(0)
    args = dict(a.split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
    cdir, model = args["--compare_dir"], args["--compare_run"]
    ckpts = os.path.join(cdir, "checkpoints")
    had = os.path.isfile(os.path.join(ckpts, model + "-amazon-video-games-last.pth"))
    log.write(json.dumps({{"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"), "had_last": had}}) + "\\n")
    log.close()
    action = json.load(open(os.environ["FAKE_PLAN"])).get(cdir + "|" + model, "stop")
    template = os.path.join(os.environ["FAKE_CKPT"], os.path.basename(os.path.dirname(cdir)) + "-"
                            + os.path.basename(cdir) + "-" + model)
    shutil.copytree(template, ckpts, dirs_exist_ok=True)
    if action == "stop":
        time.sleep(60)
        sys.exit(0)
    os.makedirs(os.path.join(cdir, "rows"), exist_ok=True)
    row = {{"model": model, "status": "ok" if action == "finish" else "failed: boom", "epochs_run": 3,
           "best_epoch": 1, "test_ndcg@10": 0.25, "git_commit": "abc123"}}
    with open(os.path.join(cdir, "rows", model + ".json"), "w") as fh:
        json.dump({{"row": row, "settings": {{"cmd_args": ["--train_mode=sequence"]}}, "data": {{}}}}, fh)
    sys.exit(0 if action == "finish" else 1)
    """)


def _checkpoints(job, out, folder):
    """A job's -last.pth naming its best checkpoint, as a stopped run leaves them."""
    cdir = job.compare_dir(out) / "checkpoints"
    template = folder / f"{job.compare_dir(out).parent.name}-{job.compare_dir(out).name}-{job.model}"
    template.mkdir(parents=True)
    best = cdir / f"{job.model}-Dec-01-2026_10-00-00.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, template / best.name)
    torch.save({"epoch": 2, "state_dict": {"w": torch.zeros(2)}, "optimizer": {}, "rng": {},
                "saved_model_file": str(best),
                "history": {"valid_scores": [(0, 0.1), (1, 0.2), (2, 0.15)], "train_seconds": [1.0, 1.0, 1.0]}},
               template / f"{job.model}-{job.dataset}-last.pth")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    shared = tmp_path / "shared"
    (shared / "amazon-video-games").mkdir(parents=True)
    (shared / "amazon-video-games" / "Video_Games.txt").write_text("1 1 2 3\n")
    out = tmp_path / "runs"
    for job in VG:
        _checkpoints(job, out, tmp_path / "templates")
    actions = tmp_path / "plan.json"
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_PLAN", str(actions))
    monkeypatch.setenv("FAKE_CKPT", str(tmp_path / "templates"))

    def set_plan(**what):
        actions.write_text(json.dumps({f"{j.compare_dir(out)}|{j.model}": what.get(j.name, "stop") for j in VG}))

    def calls():
        log = tmp_path / "calls.log"
        found = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return found

    return dict(python=str(fake), shared=shared, out=out, set_plan=set_plan, calls=calls)


def test_train_runs_every_job_at_once_stops_at_the_limit_and_resumes_on_the_same_folder(machine, tmp_path):
    store = tmp_path / "results"
    machine["set_plan"](SASRec="finish", GRU4Rec="fail")
    lines = []
    t0 = time.monotonic()
    failed = gpu.train(VG, machine["out"], machine["shared"], machine["python"], seconds=4, results=store,
                       grace=5, log=lines.append)
    assert time.monotonic() - t0 < 30  # the stopped jobs would sleep 60 s
    assert failed == 1  # GRU4Rec
    calls = machine["calls"]()
    assert [c["prepare"] for c in calls if "prepare" in c] == ["amazon-video-games"]
    trains = [c for c in calls if "argv" in c]
    # every job at once (a stopped one holds its lane until the limit), each its plan's command
    assert sorted(c["argv"] for c in trains) == sorted(_launched(j, machine["out"]) for j in VG)
    assert all(c["omp"] == "1" and not c["had_last"] for c in trains)
    text = "\n".join(lines)
    assert "amazon-video-games/sequence/SASRec: finished" in text
    assert "amazon-video-games/sequence/Mamba4Rec: in progress, 3 epochs, best valid 0.2000 at epoch 1" in text
    assert "ended with status 1" in text and "s are up: stopping the trainings" in text
    assert sorted(p.name for p in (store / "amazon-video-games" / "sequence").iterdir()) == ["SASRec.json"]

    # run again on the same folder: the finished job is not trained again, the others continue
    machine["set_plan"](**{j.name: "finish" for j in VG})
    assert gpu.train(VG, machine["out"], machine["shared"], machine["python"], seconds=60, results=store,
                     grace=5, log=lambda m: None) == 0
    by_job = {tuple(_launched(j, machine["out"])): j.name for j in VG}
    trains = {by_job[tuple(c["argv"])]: c["had_last"] for c in machine["calls"]() if "argv" in c}
    assert trains == {"Mamba4Rec": True, "GRU4Rec": True, "Mamba4Rec-2layers": True, "Mamba4Rec-residual": True}
    record = json.loads((store / "amazon-video-games" / "sequence" / "Mamba4Rec.json").read_text())
    assert record["git_commit"] == "abc123" and record["test_result"]["ndcg@10"] == 0.25
    assert sorted(p.name for p in (store / "amazon-video-games" / "sequence").iterdir()) == sorted(
        f"{j.name}.json" for j in VG)


def _launched(job, out) -> list[str]:
    """The job's command as the queue starts it: run_recbole.py by its path (the job runs in its own folder)."""
    cmd = job.command(out)
    return [str(plan.REPO / cmd[0]), *cmd[1:]]


def test_the_jobs_are_the_plan_s_sequence_and_history_mode_ones_unless_chosen():
    jobs = gpu.select_jobs()
    assert jobs == [j for j in plan.JOBS if j.mode in ("sequence", "history")] and len(jobs) == 19
    assert {j.dataset for j in gpu.select_jobs(["ml-1m"])} == {"ml-1m"}
    assert gpu.select_jobs(only=["amazon-video-games/prefix/Mamba4Rec"]) == [
        plan.Job("amazon-video-games", "prefix", "Mamba4Rec")]


@pytest.mark.parametrize("args, message", [
    (["ml-10m"], "unknown data set(s) ml-10m: one of"),
    (["--only", "ml-1m/sequence/BERT4Rec"], "unknown job(s) ml-1m/sequence/BERT4Rec; known:"),
    (["ml-1m", "--only", "amazon-beauty/sequence/SASRec"], "no job left"),
    ([], "torch sees no CUDA device"),
])
def test_bad_arguments_and_a_machine_without_a_gpu_are_refused_before_anything_runs(args, message, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "runs"
    assert gpu.main([str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--seconds", "0"), ("--seconds", "ten"), ("--lanes", "0"),
                                         ("--lanes", "-2")])
def test_seconds_and_lanes_must_be_above_zero(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main([str(tmp_path / "runs"), flag, value])
    assert exc.value.code == 2 and "it must be a number > 0" in capsys.readouterr().err


def test_a_training_that_ignores_the_stop_is_killed_after_the_grace(tmp_path, monkeypatch):
    stubborn = tmp_path / "python"
    stubborn.write_text(f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "time.sleep(60)\n")
    stubborn.chmod(0o755)
    monkeypatch.setattr(export, "export", lambda out, jobs, log=None, **kw: None)
    lines = []
    t0 = time.monotonic()
    failed = runner.run_queue(tmp_path / "runs", VG[:1], 1, str(stubborn), log=lines.append,
                              results=tmp_path / "results", seconds=1, grace=1)
    assert time.monotonic() - t0 < 20
    assert failed == 0  # stopped by the time limit: it resumes next time, it did not fail
    assert any("1 s are up" in m for m in lines) and any(f"{VG[0].key}: still running 1 s after the stop: killed" in m
                                                        for m in lines)
