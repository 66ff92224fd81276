#!/usr/bin/env python
"""Selective-scan speed and memory: Triton vs the torch path vs the reference (and mambapy /
mamba_ssm when importable), forward, backward and forward+backward, on one device.

    python benchmarks/bench_scan.py                     # on a GPU: the three shapes below, fp32
    python benchmarks/bench_scan.py --dtype bf16
    TRITON_INTERPRET=1 python benchmarks/bench_scan.py --device cpu --quick   # smoke test, no GPU

Shapes (batch, dim, N, L): ML-1M-like (2048, 128, 32, 200), Amazon-like (2048, 128, 32, 50),
long (64, 128, 32, 4096). GB/s counts the bytes that must move at least once: inputs read
(u, delta, z: 3*B*D*L; B, C: 2*B*N*L; A, D, bias) and outputs written (B*D*L) forward; the
backward reads those plus dout and writes du, ddelta, dz, dB, dC (and dA, dD, dbias).
Peak memory is torch.cuda.max_memory_allocated during the call minus what was allocated before.
Goals (issue #3, ML-1M shape, fp32, fwd+bwd): >= 20x the torch path, >= 50 % of the bandwidth
bound, extra memory <= 1.5x inputs + outputs, within 1.2x of mamba_ssm.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"ml1m": (2048, 128, 32, 200), "amazon": (2048, 128, 32, 50), "long": (64, 128, 32, 4096)}
QUICK = {"tiny": (2, 16, 8, 40)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def providers():
    from kernels import get_scan_fn
    from kernels.reference import selective_scan_ref

    out = {"reference": selective_scan_ref}
    try:
        out["torch"] = get_scan_fn("torch")
    except Exception as exc:  # noqa: BLE001
        print(f"# torch path unavailable: {exc}")
    try:
        out["triton"] = get_scan_fn("triton")
    except Exception as exc:  # noqa: BLE001
        print(f"# triton unavailable: {exc}")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn

        out["mamba_ssm"] = mamba_fn
    except Exception:
        pass
    try:
        import mambapy  # noqa: F401  (its pscan takes another layout; adapted below)
        from mambapy.pscan import pscan

        def mambapy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
            dt = delta + delta_bias[:, None] if delta_bias is not None else delta
            dt = torch.nn.functional.softplus(dt) if delta_softplus else dt
            dA = torch.exp(dt.transpose(1, 2)[..., None] * A)                     # (B, L, D, N)
            BX = (dt * u).transpose(1, 2)[..., None] * B.transpose(1, 2)[:, :, None]
            hs = pscan(dA, BX)
            y = (hs @ C.transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
            y = y + D[:, None] * u if D is not None else y
            return y * torch.nn.functional.silu(z) if z is not None else y

        out["mambapy"] = mambapy_scan
    except Exception:
        pass
    return out


def make(shape, dtype, device):
    b, d, n, L = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device, dtype).requires_grad_()

    return dict(u=r(b, d, L), delta=r(b, d, L, scale=0.5),
                A=(-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)).to(device).requires_grad_(),
                B=r(b, n, L), C=r(b, n, L), D=torch.ones(d, device=device).requires_grad_(),
                z=r(b, d, L), delta_bias=torch.zeros(d, device=device).requires_grad_())


def bytes_moved(shape, itemsize):
    b, d, n, L = shape
    fwd = (3 * b * d * L + 2 * b * n * L + b * d * L) * itemsize
    bwd = (4 * b * d * L + 2 * b * n * L) * itemsize + (3 * b * d * L + 2 * b * n * L) * itemsize
    return fwd, bwd


def bench(fn, inputs, device, reps):
    def fwd():
        return fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                  z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True)

    params = list(inputs.values())
    g = torch.randn_like(inputs["u"])
    out = fwd()

    def bwd():
        torch.autograd.grad(out, params, g, retain_graph=True)

    def both():
        torch.autograd.grad(fwd(), params, g)

    if device == "cuda":
        import triton.testing

        def t(f):
            return triton.testing.do_bench(f, warmup=reps, rep=reps * 20)
    else:
        import time

        def t(f):
            f()
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            return (time.perf_counter() - t0) / reps * 1e3

    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = (t(fwd), t(bwd), t(both))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return ms, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default all; --quick: tiny)")
    p.add_argument("--providers", default=None, help="comma list (default: all available)")
    p.add_argument("--quick", action="store_true", help="one tiny shape (CPU interpreter smoke test)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--csv", default=str(REPO / "benchmarks" / "out" / "bench_scan.csv"))
    args = p.parse_args()
    shapes = QUICK if args.quick else {k: SHAPES[k] for k in (args.shapes.split(",") if args.shapes else SHAPES)}
    dtype = DTYPES[args.dtype]
    import triton

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# device {dev_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"CUDA {torch.version.cuda} | dtype {args.dtype} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    provs = providers()
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers.split(",")}
    rows = []
    print(f"{'shape':8s} {'provider':10s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} {'fwd GB/s':>9s} "
          f"{'f+b GB/s':>9s} {'peak MiB':>9s} {'io MiB':>8s}")
    for name, shape in shapes.items():
        inputs = make(shape, dtype, args.device)
        fwd_b, bwd_b = bytes_moved(shape, torch.empty((), dtype=dtype).element_size())
        for prov, fn in provs.items():
            b, d, n, L = shape
            if prov in ("reference", "mambapy") and b * d * n * L > 2**28 and args.device == "cpu":
                continue
            try:
                (f, bw, fb), peak = bench(fn, inputs, args.device, args.reps)
            except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the table
                print(f"{name:8s} {prov:10s} FAILED: {type(exc).__name__}: {exc}")
                continue
            row = dict(shape=name, batch=shape[0], dim=shape[1], N=shape[2], L=shape[3], dtype=args.dtype,
                       provider=prov, fwd_ms=f, bwd_ms=bw, fwdbwd_ms=fb, fwd_gbps=fwd_b / f / 1e6,
                       fwdbwd_gbps=(fwd_b + bwd_b) / fb / 1e6, peak_mib=peak, io_mib=(fwd_b + bwd_b) / 2**20,
                       device=dev_name)
            rows.append(row)
            print(f"{name:8s} {prov:10s} {f:9.3f} {bw:9.3f} {fb:9.3f} {row['fwd_gbps']:9.1f} "
                  f"{row['fwdbwd_gbps']:9.1f} {peak:9.1f} {row['io_mib']:8.1f}", flush=True)
        for base in ("torch", "mamba_ssm"):
            tri = next((r for r in rows if r["shape"] == name and r["provider"] == "triton"), None)
            other = next((r for r in rows if r["shape"] == name and r["provider"] == base), None)
            if tri and other:
                print(f"#   {name}: triton f+b is {other['fwdbwd_ms'] / tri['fwdbwd_ms']:.1f}x faster than {base}")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"# CSV: {args.csv}")


if __name__ == "__main__":
    main()
