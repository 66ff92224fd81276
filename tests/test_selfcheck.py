"""`python -m mamba4rec.selfcheck`: a --quick run on CPU passes and writes the report it promises;
a scan path giving a wrong answer and a step path that raises are reported as failed with exit
status 1; bad options exit 2 with a message naming the value and the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba4rec.kernels import numba_scan, torch_scan
from mamba4rec.selfcheck import cli, correctness, timing

REPO = Path(__file__).resolve().parents[1]
GRADS = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]


def _run(tmp_path, monkeypatch, *extra):
    # The interpreter may be on in this pytest process (the Triton tests): these runs check the
    # CPU paths only, as a user's plain run does.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MAMBA4REC_SCAN_IMPL", raising=False)
    lines = []
    rc = cli.main(["--quick", "--device", "cpu", "--steps", "2", "--out", str(tmp_path), *extra], log=lines.append)
    report = json.loads((tmp_path / "selfcheck.json").read_text())
    return rc, report, (tmp_path / "selfcheck.md").read_text(), "\n".join(lines)


def test_quick_cpu_run_passes_and_reports_every_path(tmp_path, monkeypatch):
    rc, rep, md, printed = _run(tmp_path, monkeypatch)
    assert rc == 0, rep["failures"]
    assert rep["passed"] and rep["failures"] == []
    scan_paths = ["numba", "torch", "ref"] if numba_scan.available() else ["torch", "ref"]
    scans = [e for e in rep["correctness"] if e["kind"] == "scan"]
    assert [e["path"] for e in scans] == [p for p in scan_paths for _ in cli.TINY_CASES]
    for e in scans:
        assert e["passed"] and e["error"] is None and e["dtype"] == "fp32"
        h0 = ["dinitial_state"] if e["shape"]["initial_state"] else []  # the "odd" case starts from a state
        assert [c["quantity"] for c in e["checks"]] == ["out", "last_state", *GRADS, *h0]
        assert all(0 <= c["worst"] <= 1 and c["passed"] for c in e["checks"])
        assert e["worst"] == max(c["worst"] for c in e["checks"])
    assert [e["shape"]["initial_state"] for e in scans] == [c.h0 for _ in scan_paths for c in cli.TINY_CASES]
    assert any(c.h0 for c in cli.TINY_CASES) and not all(c.h0 for c in cli.TINY_CASES)
    steps = [e for e in rep["correctness"] if e["kind"] == "step"]
    assert [e["path"] for e in steps] == ["torch"] * len(cli.TINY_CASES)
    assert all(e["passed"] and [c["quantity"] for c in e["checks"]] == ["out", "last_state"] for e in steps)
    assert {(s["kind"], s["path"]) for s in rep["skipped"]} >= {("scan", "triton"), ("step", "triton")}

    assert rep["bandwidth"]["gbps"] > 0
    timed = {(r["path"], r["mode"]): r for r in rep["timing"]}
    assert set(timed) == {(p, m) for p in scan_paths for m in timing.MODES}
    for r in timed.values():
        assert r["error"] is None and r["ms"] > 0
        assert r["x_bound"] == pytest.approx(r["ms"] / r["bound_ms"])
        assert r["x_torch"] == pytest.approx(r["ms"] / timed[("torch", r["mode"])]["ms"])
    assert [(r["model"], r["precision"]) for r in rep["training"]] == [("Mamba4Rec", "fp32"), ("SASRec", "fp32")]
    for r in rep["training"]:
        assert r["passed"] and r["steps"] == 2 and r["ms_per_step"] > 0 and r["nonfinite_steps"] == 0
        assert r["loss_first"] == pytest.approx(r["loss_first"])  # a number, not NaN
    assert rep["settings"]["profile"] == "quick" and rep["settings"]["dtypes"] == ["fp32"]
    assert md.startswith("# mamba4rec self-check: PASSED")
    assert "| scan | torch | fp32 | tiny (2, 8, 4, 16) |" in md and md in printed


def test_a_wrong_scan_and_a_raising_step_fail_the_check(tmp_path, monkeypatch):
    real = torch_scan.selective_scan_torch

    def off_by_one_percent(*args, **kwargs):
        out, last = real(*args, **kwargs)
        return out * 1.01, last

    def broken_step(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(torch_scan, "selective_scan_torch", off_by_one_percent)
    monkeypatch.setattr("mamba4rec.kernels.update_state", broken_step)
    rc, rep, md, _ = _run(tmp_path, monkeypatch)
    assert rc == 1 and not rep["passed"]
    by = {(e["kind"], e["path"], e["case"]): e for e in rep["correctness"]}
    bad_scan = by[("scan", "torch", "tiny")]
    assert not bad_scan["passed"] and bad_scan["worst"] > 1
    checks = {c["quantity"]: c for c in bad_scan["checks"]}
    assert not checks["out"]["passed"] and checks["last_state"]["passed"]  # only what the path got wrong
    assert by[("scan", "ref", "tiny")]["passed"]
    step = by[("step", "torch", "tiny")]
    assert not step["passed"] and step["error"] == "RuntimeError: kernel launch failed"
    assert any(f.startswith("scan torch fp32 tiny: out: ") for f in rep["failures"])
    assert "step torch fp32 odd: RuntimeError: kernel launch failed" in rep["failures"]
    assert md.startswith("# mamba4rec self-check: FAILED") and "FAIL: out:" in md


def test_compare_holds_each_element_to_its_tolerance():
    want = torch.tensor([1.0, -2.0, 0.0])
    inside = correctness.compare("out", want + torch.tensor([0.0, 0.0, 0.9e-3]), want, rtol=0.0, atol=1e-3)
    assert inside["passed"] and inside["worst"] == pytest.approx(0.9, rel=1e-6)
    # 2e-3 off at |ref| = 2: inside rtol 1e-3 (atol + rtol * 2 = 3e-3); off at 0 it is outside
    rel = correctness.compare("out", want + torch.tensor([0.0, 2e-3, 0.0]), want, rtol=1e-3, atol=1e-3)
    assert rel["passed"]
    outside = correctness.compare("out", want + torch.tensor([0.0, 0.0, 2e-3]), want, rtol=1e-3, atol=1e-3)
    assert not outside["passed"] and outside["worst"] == pytest.approx(2.0, rel=1e-6)
    nan = correctness.compare("dA", torch.tensor([1.0, float("nan"), 0.0]), want, rtol=1.0, atol=1.0)
    assert not nan["passed"] and nan["error"] == "1 non-finite value(s) of 3"
    shape = correctness.compare("dA", want[:2], want, rtol=1.0, atol=1.0)
    assert not shape["passed"] and "shape (2,)" in shape["error"]


def test_compulsory_bytes_counts_every_input_and_output_once():
    case = correctness.ScanCase("t", batch=2, dim=3, N=4, L=5)
    b = timing.compulsory_bytes(case, elem=2)
    weights = (3 * 4 + 2 * 3) * 4
    # fwd: u, delta, z, out (b*d*L each) and B, C (b*N*L each) in 2 bytes, plus A, D, bias in fp32
    assert b["fwd"] == (4 * 30 + 2 * 40) * 2 + weights
    # bwd: reads u, delta, z, dout, B, C, weights; writes du, ddelta, dz, dB, dC, dweights
    assert b["bwd"] == (7 * 30 + 4 * 40) * 2 + 2 * weights
    assert b["fwd+bwd"] == b["fwd"] + b["bwd"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0: it must be at least 1"),
    (["--device", "mps"], "--device 'mps': the self-check runs on cpu or cuda"),
    (["--device", "tpu"], "--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    (["--out", "FILE"], "--out 'FILE': cannot create the report folder (File exists): give a writable folder"),
])
def test_bad_options_exit_2_naming_the_value(argv, message, capsys, tmp_path):
    if argv == ["--out", "FILE"]:
        (tmp_path / "FILE").write_text("")
        argv = ["--out", str(tmp_path / "FILE")]
        message = message.replace("FILE", str(tmp_path / "FILE"))
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "selfcheck.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_by_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mamba4rec.selfcheck", "--device", "cuda", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device 'cuda', but torch" in proc.stderr and "use --device cpu" in proc.stderr


def test_a_skipped_timing_keeps_its_row_and_reason():
    case = correctness.ScanCase("t", 1, 4, 2, 8)
    bw = {"gbps": 10.0}
    rows = timing.time_scans(["torch", "ref"], ["fp32"], case, torch.device("cpu"), bw, reps=1, log=lambda m: None,
                             skip={("ref", "fwd+bwd"): cli.REF_BACKWARD_UNTIMED})
    by = {(r["path"], r["mode"]): r for r in rows}
    assert len(rows) == 4
    skipped = by[("ref", "fwd+bwd")]
    assert skipped["ms"] is None and skipped["x_torch"] is None and skipped["note"] == cli.REF_BACKWARD_UNTIMED
    assert by[("ref", "fwd")]["ms"] > 0 and by[("torch", "fwd+bwd")]["x_torch"] == 1.0
    assert not cli.PROFILES["cpu"].time_ref_backward and cli.PROFILES["cuda"].time_ref_backward


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs triton and no CUDA (the interpreter runs on CPU)")
def test_triton_interpreter_option_checks_the_triton_paths_on_tiny_shapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAMBA4REC_SCAN_IMPL")}
    proc = subprocess.run([sys.executable, "-m", "mamba4rec.selfcheck", "--quick", "--triton-interpreter", "--steps",
                           "1", "--out", str(tmp_path)], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "selfcheck.json").read_text())
    triton = [e for e in rep["correctness"] if e["path"] == "triton"]
    assert [(e["kind"], e["case"]) for e in triton] == [(k, c.name) for k in ("scan", "step") for c in cli.TINY_CASES]
    assert all(e["passed"] for e in triton)
    assert [c["quantity"] for c in triton[0]["checks"]] == ["out", "last_state", *GRADS]
    assert "triton" not in {r["path"] for r in rep["timing"]}  # the interpreter's time means nothing
    assert {"kind": "timing", "path": "triton", "reason": "interpreted on CPU: its time means nothing"} in rep["skipped"]
    assert rep["settings"]["triton_interpreter"] is True


def test_cpu_training_in_a_process_of_its_own_reports_its_row():
    """The default CPU run trains each model in a spawned process (clean resident-memory figures)."""
    from mamba4rec.selfcheck import training

    shape = training.TrainShape(batch=4, L=6, n_items=20, pool=2)
    rows = training.run_training(shape, 2, ["fp32"], torch.device("cpu"), log=lambda m: None, isolate=True,
                                 models=("SASRec",))
    assert len(rows) == 1 and rows[0]["passed"], rows
    assert rows[0]["model"] == "SASRec" and rows[0]["steps"] == 2 and rows[0]["ms_per_step"] > 0
    assert rows[0]["peak_mib"] >= 0 and "resident memory" in rows[0]["memory"]
    with pytest.raises(ValueError, match="isolate=True measures process memory on CPU"):
        training.run_training(shape, 1, ["fp32"], torch.device("meta"), isolate=True)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_interpreter_is_refused_with_a_cuda_device(how, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if how == "environment":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda", 0))  # as on a GPU machine
    argv = ["--out", str(tmp_path / "r")] + (["--triton-interpreter"] if how == "option" else [])
    assert cli.main(argv) == 2
    assert "with a CUDA device would interpret the Triton kernels instead of compiling them" in capsys.readouterr().err
    assert os.environ.get("TRITON_INTERPRET") == ("1" if how == "environment" else None)  # left as it was
    assert not (tmp_path / "r").exists()
