"""benchmarks/gpu_session.py, in this process: results.py's jobs trained at once with a stand-in
for run_recbole.py, stopped at the time limit, packed within the device tool's limits on what
comes back, resumed from the packs on a bare machine, and exported to results/."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_session", REPO / "benchmarks" / "gpu_session.py")
gs = importlib.util.module_from_spec(_spec)
sys.modules["gpu_session"] = gs  # before it runs: its dataclass looks itself up there
_spec.loader.exec_module(gs)

VG = [j for j in gs.results.JOBS if j.dataset == "amazon-video-games" and j.mode == "sequence"]

# A python that acts as run_recbole.py and datasets/prepare.py would on the files gpu_session
# reads back. Per job (FAKE_PLAN: "<compare_dir>|<model>" -> finish, fail or stop) it writes its
# row, or puts its checkpoints (templates under FAKE_CKPT) in place and trains until stopped.
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
    log.write(json.dumps({{"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"), "had_last": had,
                          "t": time.time()}}) + "\\n")
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
           "best_epoch": 1, "test_ndcg@10": 0.25, "git_commit": None}}
    with open(os.path.join(cdir, "rows", model + ".json"), "w") as fh:
        json.dump({{"row": row, "settings": {{"cmd_args": ["--train_mode=sequence"]}}, "data": {{}}}}, fh)
    sys.exit(0 if action == "finish" else 1)
    """)


def _checkpoints(job, state, folder, weights=64):
    """A job's -last.pth (with its optimizer) naming its best checkpoint, as a fake run leaves them."""
    cdir = job.compare_dir(state) / "checkpoints"
    template = folder / f"{job.compare_dir(state).parent.name}-{job.compare_dir(state).name}-{job.model}"
    template.mkdir(parents=True)
    best = cdir / f"{job.model}-Dec-01-2026_10-00-00.pth"
    w = {"w": torch.randn(weights, weights)}
    torch.save({"state_dict": w, "optimizer": {"m": torch.randn(weights, weights), "v": torch.randn(weights, weights)},
                "epoch": 1}, template / best.name)
    torch.save({"epoch": 2, "state_dict": w, "optimizer": {"m": torch.randn(weights, weights)}, "rng": {},
                "saved_model_file": str(best),
                "history": {"valid_scores": [(0, 0.1), (1, 0.2), (2, 0.15)], "train_seconds": [1.0, 1.0, 1.0]}},
               template / f"{job.model}-{job.dataset}-last.pth")
    (template / f"{job.model}-{job.dataset}-last.pth.data.json").write_text('{"amazon-video-games.inter": "ab"}')


@pytest.fixture
def device(tmp_path, monkeypatch):
    """A lent machine's layout: .gpu with the data file and the commit, a run folder, $OUT."""
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    gpu = tmp_path / "gpu"
    gs.data_file(gpu, "amazon-video-games").parent.mkdir(parents=True)
    gs.data_file(gpu, "amazon-video-games").write_text("1 1 2 3\n")
    (gpu / "commit.txt").write_text("abc123\n")
    state = tmp_path / "mamba4rec-gpu"
    for job in VG:
        _checkpoints(job, state, tmp_path / "templates")
    plan = tmp_path / "plan.json"
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_PLAN", str(plan))
    monkeypatch.setenv("FAKE_CKPT", str(tmp_path / "templates"))

    def set_plan(**actions):
        plan.write_text(json.dumps({f"{j.compare_dir(state)}|{j.model}": actions.get(j.name, "stop") for j in VG}))

    def calls():
        log = tmp_path / "calls.log"
        found = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return found

    return dict(python=str(fake), gpu=gpu, state=state, set_plan=set_plan, calls=calls)


def _members(back):
    found = {}
    for pack in sorted(back.glob("*.tar")):
        with tarfile.open(pack) as tar:
            for m in tar.getmembers():
                found[m.name] = tar.extractfile(m).read()
    return found


def test_compare_trains_at_once_stops_at_the_limit_packs_resumes_on_a_bare_machine_and_exports(
        device, tmp_path, monkeypatch):
    real_export = gs.results.export
    monkeypatch.setattr(gs.results, "export", lambda out, jobs, log=None, **kw: None)  # the device's own copy
    store, back = tmp_path / "results", tmp_path / "OUT1"
    device["set_plan"](SASRec="finish", GRU4Rec="fail")
    t0 = time.monotonic()
    failed = gs.compare(VG, 4, back, state=device["state"], gpu=device["gpu"], python=device["python"],
                        results_dir=store, grace=5, log=lambda m: None)
    assert time.monotonic() - t0 < 30  # the two stopped jobs would sleep 60 s
    assert failed == 1  # GRU4Rec
    calls = device["calls"]()
    assert [c["prepare"] for c in calls if "prepare" in c] == ["amazon-video-games"]
    trains = [c for c in calls if "argv" in c]
    # every job at once (a stopped one holds its lane until the limit), each its results.py command
    assert sorted(c["argv"] for c in trains) == sorted(j.command(device["state"]) for j in VG)
    assert all(c["omp"] == "1" and not c["had_last"] for c in trains)
    packs = sorted(back.glob("*.tar"))
    assert [p.name for p in packs] == ["pack-1.tar"] and packs[0].stat().st_size <= gs.FILE_LIMIT
    got = _members(back)
    rows = {n: json.loads(b) for n, b in got.items() if "/rows/" in n}
    assert sorted(rows) == ["video-games/sequence/rows/GRU4Rec.json", "video-games/sequence/rows/SASRec.json"]
    assert rows["video-games/sequence/rows/SASRec.json"]["row"]["git_commit"] == "abc123"  # prepare's commit
    assert "video-games/sequence-SASRec.log" in got
    # the stopped jobs' state goes back (the best checkpoint without optimizer), the finished one's does not;
    # the failed one's too: it is trained again, from its checkpoint
    ckpts = sorted(n for n in got if "/checkpoints/" in n)
    assert ckpts == sorted(f"video-games/{sub}/checkpoints/{m}-{s}" for sub, m in
                           (("sequence", "Mamba4Rec"), ("sequence-2layers", "Mamba4Rec"), ("sequence", "GRU4Rec"),
                            ("sequence-residual", "Mamba4Rec"))
                           for s in ("amazon-video-games-last.pth", "amazon-video-games-last.pth.data.json",
                                     "Dec-01-2026_10-00-00.pth"))
    best = torch.load(io.BytesIO(got["video-games/sequence/checkpoints/Mamba4Rec-Dec-01-2026_10-00-00.pth"]),
                      weights_only=False)
    assert "optimizer" not in best and "state_dict" in best
    assert "optimizer" in torch.load(io.BytesIO(got["video-games/sequence/checkpoints/Mamba4Rec-amazon-video-games-last.pth"]),
                                     weights_only=False)
    status = (back / "status.txt").read_text()
    assert "amazon-video-games/sequence/SASRec: finished" in status
    assert "amazon-video-games/sequence/Mamba4Rec: in progress, 3 epochs, best valid 0.2000 at epoch 1" in status
    assert "ended with status 1" in status and "s are up: stopping the trainings" in status

    # here: the packs into .gpu/state; there: a bare machine (the same fixed run folder, empty)
    shared = tmp_path / "shared"
    (shared / "amazon-video-games").mkdir(parents=True)
    (shared / "amazon-video-games" / "Video_Games.txt").write_text("1 1 2 3\n")
    whl = tmp_path / "whl"
    whl.mkdir()
    for r in gs.WHEELS:  # there already: nothing to download
        (whl / f"{r.replace('==', '-')}-py3-none-any.whl").write_bytes(b"")
    (device["gpu"] / "state").mkdir()
    (device["gpu"] / "state" / "pack-2.tar").write_bytes(b"an older call's")
    assert gs.prepare(back, shared, whl=whl, gpu=device["gpu"], datasets=["amazon-video-games"],
                      log=lambda m: None) == 0
    assert sorted(p.name for p in (device["gpu"] / "state").iterdir()) == ["pack-1.tar"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?\n", (device["gpu"] / "commit.txt").read_text())
    shutil.rmtree(device["state"])
    device["set_plan"](**{j.name: "finish" for j in VG})
    back2 = tmp_path / "OUT2"
    assert gs.compare(VG, 60, back2, state=device["state"], gpu=device["gpu"], python=device["python"],
                      results_dir=store, grace=5, log=lambda m: None) == 0
    by_job = {tuple(j.command(device["state"])): j.name for j in VG}
    trains = {by_job[tuple(c["argv"])]: c["had_last"] for c in device["calls"]() if "argv" in c}
    # SASRec's row came back finished: not trained again; the others continue from their checkpoints
    assert trains == {"Mamba4Rec": True, "GRU4Rec": True, "Mamba4Rec-2layers": True, "Mamba4Rec-residual": True}
    assert not [n for n in _members(back2) if "/checkpoints/" in n]  # all finished: only rows go back

    # here: export the finished rows to results/
    monkeypatch.setattr(gs.results, "export", real_export)
    written = gs.export(back2, tmp_path / "local", results_dir=store, log=lambda m: None)
    assert sorted(Path(p).name for p in written) == sorted(f"{j.name}.json" for j in VG)
    record = json.loads((store / "amazon-video-games" / "sequence" / "SASRec.json").read_text())
    assert record["git_commit"] == "abc123" and record["test_result"]["ndcg@10"] == 0.25
    assert not list((tmp_path / "local").rglob("*.pth"))  # checkpoints are not unpacked for an export


def test_packs_keep_every_result_file_and_as_many_job_states_as_the_limits_allow(device, tmp_path):
    """Three unfinished jobs' states of about 50 KiB each, packs of at most 100 KiB: the result
    files and the first two jobs (in the order given) fit, the third is named; no pack is over."""
    state = device["state"]
    for job in VG[:3]:
        shutil.copytree(tmp_path / "templates" / f"video-games-{job.compare_dir(state).name}-{job.model}",
                        job.compare_dir(state) / "checkpoints", dirs_exist_ok=True)
    logs = state / "video-games" / "sequence-SASRec.log"
    logs.write_text("x" * 30000)
    messages = []
    order = [VG[2], VG[0], VG[1]]  # GRU4Rec first
    written, left = gs.pack(state, tmp_path / "OUT", order, file_limit=100 << 10, files=2, budget=180 << 10,
                            log=messages.append)
    assert len(written) <= 2 and all(p.stat().st_size <= 100 << 10 for p in written)
    got = _members(tmp_path / "OUT")
    assert "video-games/sequence-SASRec.log" in got
    assert [u.label for u in left] == [VG[1].key]  # the last in order: no room
    assert f"no room for the checkpoints of {VG[1].key}" in messages[0]
    kept = {n.split("/checkpoints/")[1].split("-")[0] for n in got if "/checkpoints/" in n}
    assert kept == {"GRU4Rec", "Mamba4Rec"} and not [n for n in got if "SASRec-" in n]


def test_tar_bytes_bounds_a_real_tar_of_long_names():
    sizes = [0, 1, 511, 512, 513, 70000]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, n in enumerate(sizes):
            info = tarfile.TarInfo("video-games/sequence-seed2021/checkpoints/" + "x" * 150 + str(i))
            info.size = n
            tar.addfile(info, io.BytesIO(b"\0" * n))
    assert len(buf.getvalue()) <= gs.tar_bytes(sizes) <= len(buf.getvalue()) + 6 * 1024 + tarfile.RECORDSIZE


def test_a_best_checkpoint_without_its_optimizer_state_still_gives_the_same_test_result(in_tmp):
    """What a pack holds of a best checkpoint (strip_optimizer) is enough: a run resumed on it
    evaluates test on the same weights, with the same result."""
    import mamba4rec.pipeline as pipeline

    cfg = tiny_config_dict(in_tmp, scan_impl="torch", epochs=2, stopping_step=10)
    first = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg)
    last = in_tmp / "saved" / "Mamba4Rec-tiny-last.pth"
    best = Path(torch.load(last, weights_only=False)["saved_model_file"])
    full_size = best.stat().st_size
    stripped = gs.strip_optimizer(best)
    state = torch.load(io.BytesIO(stripped), weights_only=False)
    assert "optimizer" not in state and "state_dict" in state
    assert len(stripped) < full_size / 2  # Adam keeps two moments per weight
    best.write_bytes(stripped)  # as the next call lays it out on a fresh machine
    again = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, resume=str(last))  # nothing left to train
    assert again.epochs_run == first.epochs_run == 2
    assert again.test_result == first.test_result


def test_the_jobs_are_results_py_s_sequence_mode_ones_unless_chosen():
    jobs = gs.select_jobs()
    assert jobs == [j for j in gs.results.JOBS if j.mode == "sequence"] and len(jobs) == 16
    assert {j.dataset for j in gs.select_jobs(["ml-1m"])} == {"ml-1m"}
    assert gs.select_jobs(only=["amazon-video-games/prefix/Mamba4Rec"]) == [
        gs.results.Job("amazon-video-games", "prefix", "Mamba4Rec")]


@pytest.mark.parametrize("args, message", [
    (["compare", "60", "ml-10m"], "unknown data set(s) ml-10m: one of"),
    (["compare", "60", "--only", "ml-1m/sequence/BERT4Rec"], "unknown job(s) ml-1m/sequence/BERT4Rec; known:"),
    (["compare", "60", "--lanes", "0"], "--lanes=0: it must be >= 1"),
    (["compare", "60", "--back", ""], "OUT is not set: run this through the device tool"),
    (["compare", "60", "amazon-beauty"], "amazon-beauty/Beauty.txt: run prepare on the dev machine and carry .gpu"),
    (["export", "{tmp}"], "no *.tar in"),
    (["prepare", "{tmp}"], "no *.tar in"),
])
def test_bad_arguments_and_missing_inputs_are_refused_before_anything_runs(args, message, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(gs, "GPU", tmp_path / "gpu")
    monkeypatch.setenv("OUT", str(tmp_path / "OUT"))
    state = tmp_path / "state"
    args = [a.format(tmp=tmp_path) for a in args] + (["--state", str(state)] if args[0] == "compare" else [])
    assert gs.main(args) == 2
    assert message in capsys.readouterr().err
    assert not state.exists() and not (tmp_path / "OUT").exists() and not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("seconds", ["0", "ten", "-5"])
def test_seconds_must_be_a_whole_number_above_zero(seconds, capsys):
    with pytest.raises(SystemExit) as exc:
        gs.main(["compare", seconds])
    assert exc.value.code == 2 and "SECONDS must be a whole number > 0" in capsys.readouterr().err


def test_kernels_runs_each_benchmark_to_its_file_and_goes_on_past_a_failure(tmp_path):
    out = tmp_path / "OUT"
    benchmarks = [("fails", ["-c", "import sys; print('half'); sys.exit(3)"], 30),
                  ("slow", ["-c", "import time; time.sleep(30)"], 3),
                  ("ok", ["-c", "import sys; print('csv at', sys.argv[1])", "{out}/ok.csv"], 30)]
    lines = []
    assert gs.kernels(out, sys.executable, benchmarks, log=lines.append) == 2
    assert lines == ["fails: exit status 3", "slow: stopped after 3 s", "ok: ok"]
    assert (out / "fails.txt").read_text() == "half\n"
    assert (out / "slow.txt").read_text() == "\n(stopped after 3 s)\n"
    assert (out / "ok.txt").read_text() == f"csv at {out}/ok.csv\n"


def test_the_kernel_benchmarks_exist_and_take_the_flags_they_are_given():
    for name, args, _ in gs.KERNEL_BENCHMARKS:
        script = REPO / args[0]
        source = script.read_text()
        assert script.is_file() and script.stem == name
        for flag in (a for a in args[1:] if a.startswith("--")):
            assert f'add_argument("{flag}"' in source, f"{script.name} has no {flag}"


def test_a_training_that_ignores_the_stop_is_killed_after_the_grace(tmp_path, monkeypatch):
    stubborn = tmp_path / "python"
    stubborn.write_text(f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "time.sleep(60)\n")
    stubborn.chmod(0o755)
    monkeypatch.setattr(gs.results, "export", lambda out, jobs, log=None, **kw: None)
    lines = []
    t0 = time.monotonic()
    failed = gs.results.run_queue(tmp_path / "runs", VG[:1], 1, str(stubborn), log=lines.append,
                                  results=tmp_path / "results", seconds=1, grace=1)
    assert time.monotonic() - t0 < 20
    assert failed == 0  # stopped by the time limit: it resumes next time, it did not fail
    assert any("1 s are up" in m for m in lines) and any(f"{VG[0].key}: still running 1 s after the stop: killed" in m
                                                        for m in lines)
