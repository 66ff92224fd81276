"""The self-check's outputs: the environment it ran in, the verdict, selfcheck.json (everything
measured) and selfcheck.md (the short tables, also printed)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

from ..pipeline import cpu_name
from .correctness import describe

JSON_NAME, MD_NAME = "selfcheck.json", "selfcheck.md"
SCHEMA = 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "mamba4rec": _version("mamba4rec-recbole"),
           "recbole": _version("recbole"), "triton": _version("triton"), "numba": _version("numba"),
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
           "MAMBA4REC_SCAN_IMPL": os.environ.get("MAMBA4REC_SCAN_IMPL", "")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")
    return env


def verdict(report: dict) -> list[str]:
    """One line per failure: a correctness entry out of tolerance or raising, a training with a
    non-finite loss or an error. Empty when everything passed."""
    lines = [f"{e['kind']} {e['path']} {e['dtype']} {e['case']}: {describe(e)}"
             for e in report["correctness"] if not e["passed"]]
    lines += [f"training {r['model']} {r['precision']}: {r['error']}" for r in report["training"] if not r["passed"]]
    return lines


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    where = env.get("gpu") or env["cpu"]
    out = [f"# mamba4rec self-check: {'PASSED' if report['passed'] else 'FAILED'}", "",
           f"`{report['command']}` on {report['device']} ({where}), torch {env['torch']}, "
           f"{env['torch_threads']} torch threads, {report['seconds']:.0f} s.", ""]
    if report["failures"]:
        out += ["Failed:", ""] + [f"- {line}" for line in report["failures"]] + [""]
    out += ["## Correctness against the fp32 reference", "",
            "Output, last state and the gradients of u, delta, A, B, C, D, z, delta_bias (scan); output "
            "and last state (step, over the whole sequence). `worst` is the largest |diff| / (atol + rtol "
            "|ref|) over them: at most 1 passes (mamba4rec/kernels/tolerances.py).", "",
            "| kind | path | dtype | case (batch, dim, N, L) | worst | result |", "|---|---|---|---|---|---|"]
    for e in report["correctness"]:
        shp = e["shape"]
        out.append(f"| {e['kind']} | {e['path']} | {e['dtype']} | {e['case']} ({shp['batch']}, {shp['dim']}, "
                   f"{shp['N']}, {shp['L']}) | {_fmt(e['worst'])} | "
                   f"{'pass' if e['passed'] else 'FAIL: ' + describe(e)} |")
    for sk in report["skipped"]:
        out.append(f"| {sk['kind']} | {sk['path']} | - | - | - | not checked: {sk['reason']} |")
    bw, t = report["bandwidth"], report["timing"]
    shp = s["timing_shape"]
    out += ["", f"## Scan speed (batch {shp['batch']}, dim {shp['dim']}, N {shp['N']}, L {shp['L']})", "",
            f"Copy bandwidth measured here: {bw['gbps']:.1f} GB/s ({bw['tensor_mib']} MiB tensor). `x bound` = "
            f"time / (the bytes the scan must read and write / that bandwidth); `x torch` = time / the torch "
            f"scan's.", "", "| path | dtype | mode | ms | x torch | x bound | note |", "|---|---|---|---|---|---|---|"]
    for r in t:
        out.append(f"| {r['path']} | {r['dtype']} | {r['mode']} | {_fmt(r['ms'], '.3f')} | "
                   f"{_fmt(r['x_torch'], '.2f')} | {_fmt(r['x_bound'], '.1f')} | {r['error'] or r['note'] or ''} |")
    tr = s["train_shape"]
    out += ["", f"## Training, {s['steps']} steps (batch {tr['batch']}, L {tr['L']}, {tr['n_items']} items)", "",
            "| model | precision | ms/step | peak MiB | loss first -> last 10 steps | result |",
            "|---|---|---|---|---|---|"]
    for r in report["training"]:
        model = r["model"] + (f" ({r['scan_path']} scan)" if r.get("scan_path") else "")
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r.get("loss_first") is not None else "-")
        out.append(f"| {model} | {r['precision']} | {_fmt(r.get('ms_per_step'), '.2f')} | "
                   f"{_fmt(r.get('peak_mib'), '.1f')} | {loss} | {'pass' if r['passed'] else 'FAIL: ' + r['error']} |")
    mem = next((r["memory"] for r in report["training"] if r.get("memory")), None)
    if mem:
        out += ["", f"Peak memory: {mem}."]
    return "\n".join(out) + "\n"


def write(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / JSON_NAME, out_dir / MD_NAME
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    return js, md

