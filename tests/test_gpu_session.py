"""benchmarks/gpu_session.sh's compare half with a stub in place of python: it trains every
(data set, model) at once, stops them at the time limit, and brings back what the next call
needs to resume, within the device tool's limits on what comes back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
MODELS = ("Mamba4Rec", "GRU4Rec", "SASRec")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# A 'python' that logs each call (OMP_NUM_THREADS|arguments|whether the model's last checkpoint
# was there at the start) and acts as each program would on the files the script reads back.
STUB = r"""#!/usr/bin/env bash
arg() { local a; for a in "$@"; do case "$a" in --$KEY=*) echo "${a#--$KEY=}"; return ;; esac; done; }
case "$*" in
"- "*) head -c 10 "$2" > "$3"; exit 0 ;;  # gpu_session.sh's strip_optimizer
*" pip "*|"-m pip"*) exit 0 ;;
-c*) echo "stub python"; exit 0 ;;
*prepare.py*)
    echo "${OMP_NUM_THREADS:-unset}|$*|" >> "$STUB_LOG"
    while [ $# -gt 0 ]; do case "$1" in --output-dir) out=$2 ;; --dataset) ds=$2 ;; esac; shift; done
    mkdir -p "$out/$ds" && touch "$out/$ds/$ds.inter"; exit 0 ;;
esac
KEY=compare_dir dir=$(arg "$@"); KEY=compare_run m=$(arg "$@")
ds=$(echo "$*" | sed -E 's/.*-d ([^ ]+).*/\1/')
if [[ "$*" == *--compare_status* ]]; then echo "status of $dir"; exit 0; fi
had=no; [ -n "$m" ] && [ -f "$dir/checkpoints/$m-$ds-last.pth" ] && had=yes
echo "${OMP_NUM_THREADS:-unset}|$*|$had" >> "$STUB_LOG"
[ -z "$m" ] && { echo "| table of $ds |" > "$dir/compare.md"; exit 0; }
mkdir -p "$dir/checkpoints"
head -c "${STUB_CKPT_BYTES:-100}" /dev/zero > "$dir/checkpoints/$m-$ds-last.pth"
head -c "${STUB_CKPT_BYTES:-100}" /dev/zero > "$dir/checkpoints/$m-Nov-29-2026_10-00-00.pth"
case " $STUB_FINISH " in
*" $ds:$m "*) mkdir -p "$dir/rows" && printf '{"row": {\n  "status": "ok"\n}}\n' > "$dir/rows/$m.json"
    echo "| $m |" > "$dir/compare.md"; exit 0 ;;
*" $ds:$m:failed "*) mkdir -p "$dir/rows" && printf '{"row": {\n  "status": "failed: boom"\n}}\n' > "$dir/rows/$m.json"
    exit 1 ;;
esac
exec sleep "${STUB_SLEEP:-0}"
"""


@pytest.fixture
def env(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    gpu, whl = tmp_path / "gpu", tmp_path / "whl"
    gpu.mkdir()
    whl.mkdir()
    (whl / "recbole-1.2.1-py3-none-any.whl").write_bytes(b"")
    for ds in ("ml-1m", "amazon-beauty", "amazon-video-games"):
        (gpu / f"{ds}.txt").write_text("1 1 2 3\n")
    return dict(os.environ, PYTHON=str(stub), GPU_DIR=str(gpu), WHL_DIR=str(whl),
                STATE_ROOT=str(tmp_path / "state"), OUT=str(tmp_path / "OUT"), STUB_LOG=str(tmp_path / "calls.log"))


def _run(env, *args, timeout=60, **extra):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**env, **extra}, capture_output=True,
                          text=True, timeout=timeout)


def _calls(env):
    log = Path(env["STUB_LOG"])
    return [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []


def _members(path):
    with tarfile.open(path) as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def test_trains_every_data_set_and_model_at_once_and_brings_back_unfinished_state(env, tmp_path):
    proc = _run(env, "compare", "3", "ml-1m", "amazon-beauty", "--epochs=3", STUB_SLEEP="60",
                STUB_FINISH="ml-1m:Mamba4Rec ml-1m:GRU4Rec ml-1m:SASRec amazon-beauty:GRU4Rec amazon-beauty:SASRec:failed")
    assert proc.returncode == 0, proc.stderr
    calls = _calls(env)
    prepares = [c[1] for c in calls if "prepare.py" in c[1]]
    assert len(prepares) == 2 and "--kcore-item 5" in prepares[0] and "kcore" not in prepares[1]
    trains = [c for c in calls if "--compare_run=" in c[1]]
    jobs = sorted((c[1].split("-d ")[1].split()[0], c[1].split("--compare_run=")[1].split()[0]) for c in trains)
    assert jobs == sorted((d, m) for d in ("ml-1m", "amazon-beauty") for m in MODELS)
    assert all(c[0] == "1" and "--resume" in c[1] and "--epochs=3" in c[1] and c[2] == "no" for c in trains)
    # ML-1M is complete: one more pass (no --compare_run) writes its whole table; Beauty is not
    tables = [c[1] for c in calls if "run_recbole.py" in c[1] and "--compare_run" not in c[1]]
    assert len(tables) == 1 and "-d ml-1m" in tables[0]
    out = Path(env["OUT"])
    ml1m, beauty = _members(out / "ml-1m.tar"), _members(out / "amazon-beauty.tar")
    assert not [n for n in ml1m if "/checkpoints/" in n]  # finished: its rows are what counts
    assert "ml-1m/rows/SASRec.json" in ml1m and "ml-1m/SASRec.log" in ml1m
    # Beauty: GRU4Rec finished; Mamba4Rec (stopped) and SASRec (failed: trained again next time)
    # go back with their last and best checkpoints
    assert [n for n in beauty if "/checkpoints/" in n] == sorted(
        f"amazon-beauty/checkpoints/{m}-{s}" for m in ("Mamba4Rec", "SASRec")
        for s in ("amazon-beauty-last.pth", "Nov-29-2026_10-00-00.pth"))
    assert (out / "ml-1m.md").read_text() == "| table of ml-1m |\n"
    assert "status of" in (out / "status.txt").read_text()
    assert "amazon-beauty Mamba4Rec: exit status 124 (stopped at the time limit" in proc.stdout
    assert "ml-1m SASRec: exit status 0 (finished)" in proc.stdout
    assert "amazon-beauty SASRec: exit status 1 (failed: its row and amazon-beauty/SASRec.log say why)" in proc.stdout


def test_the_time_limit_stops_the_trainings_and_the_next_call_resumes_them(env, tmp_path):
    t0 = time.monotonic()
    proc = _run(env, "compare", "2", "amazon-video-games", STUB_SLEEP="120")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    assert proc.stdout.count("stopped at the time limit; the next call resumes") == 3
    first = Path(env["OUT"]) / "amazon-video-games.tar"
    assert len([n for n in _members(first) if n.endswith("-last.pth")]) == 3
    # here: prepare with that call's files; there: a bare machine (a fresh state folder)
    files_at = tmp_path / "files_at"
    files_at.mkdir()
    shutil.copy(first, files_at)
    proc = _run(env, "prepare", str(files_at), SHARED_DATASETS=str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr
    assert "state to resume: amazon-video-games.tar" in proc.stdout
    open(env["STUB_LOG"], "w").close()
    proc = _run(env, "compare", "30", "amazon-video-games", STATE_ROOT=str(tmp_path / "bare"),
                STUB_FINISH=" ".join(f"amazon-video-games:{m}" for m in MODELS))
    assert proc.returncode == 0, proc.stderr
    trains = [c for c in _calls(env) if "--compare_run=" in c[1]]
    assert len(trains) == 3 and all(c[2] == "yes" for c in trains)  # each found its checkpoint
    assert not [n for n in _members(Path(env["OUT"]) / "amazon-video-games.tar") if "/checkpoints/" in n]


def test_checkpoints_go_back_as_far_as_16_mib_allow_and_the_rest_is_named(env):
    """Best checkpoints go back without their optimizer state (the stub's strip keeps 10 bytes);
    the last ones whole. 6 MiB each: Mamba4Rec's and GRU4Rec's fit, SASRec's does not."""
    proc = _run(env, "compare", "30", "amazon-beauty", STUB_CKPT_BYTES=str(6 * 1024 * 1024))
    assert proc.returncode == 0, proc.stderr
    assert "amazon-beauty: no room for the checkpoints of SASRec" in proc.stderr
    tar = Path(env["OUT"]) / "amazon-beauty.tar"
    assert tar.stat().st_size <= 16 * 1024 * 1024
    with tarfile.open(tar) as t:
        sizes = {m.name: m.size for m in t.getmembers() if "/checkpoints/" in m.name}
    assert sizes == {f"amazon-beauty/checkpoints/{m}-{s}": n for m in ("Mamba4Rec", "GRU4Rec")
                     for s, n in (("amazon-beauty-last.pth", 6 * 1024 * 1024), ("Nov-29-2026_10-00-00.pth", 10))}
    assert "amazon-beauty/SASRec.log" in sizes.keys() | set(_members(tar))


@pytest.mark.parametrize("args, message", [
    (["compare", "0"], "SECONDS must be a whole number > 0"),
    (["compare", "ten"], "SECONDS must be a whole number > 0"),
    (["compare", "60", "ml-10m"], "unknown data set 'ml-10m'"),
])
def test_bad_arguments_are_refused_before_anything_runs(env, args, message):
    proc = _run(env, *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert _calls(env) == [] and not Path(env["OUT"]).exists()


def test_a_missing_data_file_is_named(env, tmp_path):
    (Path(env["GPU_DIR"]) / "amazon-beauty.txt").unlink()
    proc = _run(env, "compare", "60", "amazon-beauty")
    assert proc.returncode == 2 and "amazon-beauty.txt: run prepare here" in proc.stderr
    assert _calls(env) == []


def test_a_best_checkpoint_without_its_optimizer_state_still_gives_the_same_test_result(in_tmp):
    """What the script sends back of a best checkpoint (strip_optimizer, run as the script runs it)
    is enough: a run resumed on it evaluates test on the same weights, with the same result."""
    import mamba4rec.pipeline as pipeline

    cfg = tiny_config_dict(in_tmp, scan_impl="torch", epochs=2, stopping_step=10)
    first = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg)
    last = in_tmp / "saved" / "Mamba4Rec-tiny-last.pth"
    best = Path(torch.load(last, weights_only=False)["saved_model_file"])
    full_size = best.stat().st_size
    stripped = in_tmp / "stripped.pth"
    script = f"""source <(sed -n '/^strip_optimizer() {{/,/^}}/p' {SCRIPT}); py={sys.executable}
                 strip_optimizer {best} {stripped}"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(stripped, weights_only=False)
    assert "optimizer" not in state and "state_dict" in state
    assert stripped.stat().st_size < full_size / 2  # Adam keeps two moments per weight
    shutil.move(stripped, best)  # as the next call lays it out on a fresh machine
    again = pipeline.run("Mamba4Rec", "tiny", config_dict=cfg, resume=str(last))  # nothing left to train
    assert again.epochs_run == first.epochs_run == 2
    assert again.test_result == first.test_result
