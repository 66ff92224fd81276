"""benchmarks/compare_amazon.sh with a stub in place of python: which commands it runs, in
which lanes and with how many threads, and that stopping it stops its trainings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_amazon.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pgrep") is None,
                                reason="needs bash and pgrep")


@pytest.fixture
def stub(tmp_path):
    """A 'python' that logs one line per call (pid, OMP_NUM_THREADS, arguments, parent pid: the
    lane that ran it); a training call sleeps STUB_SLEEP seconds."""
    log = tmp_path / "calls.log"
    path = tmp_path / "python"
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$$|${{OMP_NUM_THREADS:-unset}}|$*|$PPID" >> {log}\n'
        'case "$*" in *prepare.py*) exit 0 ;; esac\n'
        'if [ -n "${STUB_SLOW:-}" ]; then case "$*" in *$STUB_SLOW*) exec sleep 3 ;; esac; fi\n'
        'exec sleep "${STUB_SLEEP:-0}"\n')
    path.chmod(0o755)
    return path, log


def _run(stub, tmp_path, lanes=None, extra=(), wait=True, sleep=0, slow=""):
    env = dict(os.environ, PYTHON=str(stub[0]), SHARED_DATASETS=str(tmp_path / "shared"), STUB_SLEEP=str(sleep),
               STUB_SLOW=slow)
    env.pop("LANES", None)
    if lanes is not None:
        env["LANES"] = lanes
    cmd = ["bash", str(SCRIPT), str(tmp_path / "out"), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _calls(log):
    return [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []


def test_one_lane_runs_each_data_set_once_with_every_model(stub, tmp_path):
    proc = _run(stub, tmp_path, extra=["--epochs=3"])
    assert proc.returncode == 0, proc.stderr
    calls = _calls(stub[1])
    assert [c[2].split()[0] for c in calls] == ["datasets/prepare.py"] * 2 + ["run_recbole.py"] * 2
    runs = [c for c in calls if "run_recbole.py" in c[2]]
    assert ["-d amazon-beauty" in c[2] and "beauty/out" in c[2] for c in runs] == [True, False]
    assert all("--compare=GRU4Rec,SASRec" in c[2] and "--resume" in c[2] and c[2].endswith("--epochs=3")
               for c in runs)
    assert all("--compare_run" not in c[2] and c[1] == "unset" for c in runs)


def test_two_lanes_share_a_queue_of_jobs_one_thread_each_then_write_the_tables(stub, tmp_path):
    # the first job takes a while, so the other lane runs the rest of the queue one after another:
    # its calls are then in the queue's order whatever the load (two lanes starting at once log
    # in any order)
    proc = _run(stub, tmp_path, lanes="2", extra=["--epochs=3"], slow="amazon-beauty*--compare_run=Mamba4Rec")
    assert proc.returncode == 0, proc.stderr
    runs = [c for c in _calls(stub[1]) if "run_recbole.py" in c[2]]
    lanes = [c for c in runs if "--compare_run" in c[2]]
    final = [c for c in runs if "--compare_run" not in c[2]]
    assert all(c[1] == "1" and "--epochs=3" in c[2] for c in lanes)
    jobs = [(c[2].split("-d ")[1].split()[0], c[2].split("--compare_run=")[1]) for c in lanes]
    # every (data set, model) exactly once, one model per job, Beauty's jobs taken first
    assert sorted(jobs) == sorted((d, m) for d in ("amazon-beauty", "amazon-video-games")
                                  for m in ("Mamba4Rec", "SASRec", "GRU4Rec"))
    first = next(c[3] for c in lanes if c[2].endswith("--compare_run=Mamba4Rec") and "amazon-beauty" in c[2])
    other = [j for c, j in zip(lanes, jobs) if c[3] != first]
    assert other[:3] == [("amazon-beauty", "SASRec"), ("amazon-beauty", "GRU4Rec"), ("amazon-video-games", "SASRec")]
    # after both lanes: one pass per data set writes the whole table (and retries a failed model)
    assert runs[-2:] == final and [c[1] for c in final] == ["unset", "unset"]
    assert (tmp_path / "out" / "beauty" / "lane1.log").exists()
    assert f"logs {tmp_path / 'out'}/{{beauty,video-games}}/lane{{1..2}}.log" in proc.stdout


def test_each_lane_takes_the_next_free_job_while_the_others_train(stub, tmp_path):
    """Three lanes, trainings that take a moment: Beauty's three models go to three different
    lanes, which then take Video Games' jobs; no job runs twice."""
    proc = _run(stub, tmp_path, lanes="3", sleep=1)
    assert proc.returncode == 0, proc.stderr
    lanes = [c for c in _calls(stub[1]) if "--compare_run" in c[2]]
    assert len(lanes) == 6 and len({c[2] for c in lanes}) == 6
    assert sorted(c[2].split("--compare_run=")[1] for c in lanes[:3]) == ["GRU4Rec", "Mamba4Rec", "SASRec"]
    assert len({c[3] for c in lanes[:3]}) == 3 and {c[3] for c in lanes[3:]} <= {c[3] for c in lanes[:3]}
    assert all(f"lane {n}: amazon-" in proc.stdout for n in (1, 2, 3))


@pytest.mark.parametrize("value", ["0", "two", "-1", "02"])
def test_lanes_must_be_a_positive_whole_number(stub, tmp_path, value):
    proc = _run(stub, tmp_path, lanes=value)
    assert proc.returncode == 2 and "LANES must be a whole number >= 1" in proc.stderr
    assert _calls(stub[1]) == []


def test_stopping_the_script_stops_the_lanes_trainings(stub, tmp_path):
    proc = _run(stub, tmp_path, lanes="2", wait=False, sleep=60)
    try:
        deadline = time.monotonic() + 30
        while len([c for c in _calls(stub[1]) if "run_recbole.py" in c[2]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        trainings = [int(c[0]) for c in _calls(stub[1]) if "run_recbole.py" in c[2]]
        assert len(trainings) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in trainings) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in trainings)
    finally:
        if proc.poll() is None:
            proc.kill()
        for line in _calls(stub[1]):
            if _alive(int(line[0])):
                os.kill(int(line[0]), signal.SIGKILL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
