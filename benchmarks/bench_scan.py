"""Selective-scan benchmark: forward, backward and forward+backward per provider and shape.

Providers: triton (mamba4rec/kernels/selective_scan.py), torch (kernels.get_scan_fn("torch"), skipped until
that path exists), ref (mamba4rec/kernels/reference.py, the loop the tests trust), and, only when they
import, mambapy (pure-torch parallel scan) and mamba_ssm (the CUDA kernels).

Shapes are Mamba4Rec's scan (hidden 64, expand 2 -> dim 128, d_state N 32, B and C shared by
every channel: G = 1, with z, D, delta_bias and softplus as Mamba calls it):

    ml1m     batch 2048, dim 128, N 32, L 200    (MovieLens-1M, max_seq_length 200)
    amazon   batch 2048, dim 128, N 32, L 50     (Amazon reviews, max_seq_length 50)
    long     batch 64,   dim 128, N 32, L 4096   (one long-history case)

Columns: time in ms (triton.testing.do_bench, mean; on CPU a median of a few wall-clock runs),
GB/s = compulsory bytes / time, where the compulsory bytes are every input read once and every
output written once (nothing an implementation chooses to keep, such as saved states):

    fwd     (3*b*d*L [u, delta, z] + 2*b*G*N*L [B, C]) * s_in + (d*N + 2*d) * 4
            + b*d*L * s_in [out]
    bwd     (4*b*d*L [u, delta, z, dout] + 2*b*G*N*L) * s_in + (d*N + 2*d) * 4       (reads)
            + (3*b*d*L [du, ddelta, dz] + 2*b*G*N*L [dB, dC]) * s_in + (d*N + 2*d) * 4 (writes)
    fwd+bwd the sum of both

with s_in the input element size. Peak memory (CUDA only) is torch.cuda.max_memory_allocated
during the timed call minus what was allocated before it (inputs, upstream gradients, and for
bwd the graph saved by the forward).

Run on a GPU:   python -m benchmarks.bench_scan
Smoke on CPU:   TRITON_INTERPRET=1 python -m benchmarks.bench_scan --device cpu --quick
Results go to --csv (default benchmarks/out/bench_scan.csv, git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name: (batch, dim, N, L, G)
    "ml1m": (2048, 128, 32, 200, 1),
    "amazon": (2048, 128, 32, 50, 1),
    "long": (64, 128, 32, 4096, 1),
}
QUICK_SHAPES = {
    "tiny": (2, 8, 4, 16, 1),
    "tiny-long": (1, 4, 4, 64, 1),
}
PROVIDERS = ("triton", "torch", "ref", "mambapy", "mamba_ssm")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (Triton interpreter)")
    p.add_argument("--quick", action="store_true", help="tiny shapes only (a smoke test)")
    p.add_argument("--shapes", default=None, help=f"comma list from {', '.join(SHAPES)} (default: all)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma list (default: all that import)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, fwd+bwd")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="u, delta, z, B, C dtype; A, D, bias stay fp32")
    p.add_argument("--chunk-size", type=int, default=None, help="triton: steps between saved states (default: the module's)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "out" / "bench_scan.csv"))
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    # must happen before triton is imported: Triton decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import mamba4rec.kernels as kernels  # noqa: E402
from mamba4rec.kernels.reference import selective_scan_ref  # noqa: E402


# ----------------------------------------------------------------------------- providers
def _mambapy_scan():
    """mambapy's parallel scan behind our signature. mambapy materialises (B, L, D, N)."""
    from mambapy.pscan import pscan
    import torch.nn.functional as F

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False):
        dt = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
        dt = F.softplus(dt) if delta_softplus else dt
        dt = dt.transpose(1, 2)                                   # (b, L, d)
        Bl, Cl = B.float().transpose(1, 2), C.float().transpose(1, 2)  # (b, L, N)
        x = u.float().transpose(1, 2)
        dA = torch.exp(dt.unsqueeze(-1) * A.float())              # (b, L, d, N)
        BX = (dt * x).unsqueeze(-1) * Bl.unsqueeze(2)             # (b, L, d, N)
        hs = pscan(dA, BX)
        y = (hs @ Cl.unsqueeze(-1)).squeeze(-1)                   # (b, L, d)
        if D is not None:
            y = y + D.float() * x
        y = y.transpose(1, 2)
        if z is not None:
            y = y * F.silu(z.float())
        out = y.to(u.dtype)
        return (out, hs[:, -1]) if return_last_state else out

    return scan


def load_providers(names, chunk_size):
    """name -> (fn, note); a provider that cannot load is reported and left out."""
    found = {}
    for name in names:
        try:
            if name == "triton":
                fn = kernels.get_scan_fn("triton")
                if chunk_size is not None:
                    base = fn
                    fn = lambda *a, _f=base, **k: _f(*a, chunk_size=chunk_size, **k)  # noqa: E731
            elif name == "torch":
                fn = kernels.get_scan_fn("torch")
            elif name == "ref":
                fn = selective_scan_ref
            elif name == "mambapy":
                fn = _mambapy_scan()
            elif name == "mamba_ssm":
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
            else:
                raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        except (ImportError, AttributeError) as exc:
            print(f"[skip] provider {name}: {type(exc).__name__}: {exc}")
            continue
        found[name] = fn
    return found


# ----------------------------------------------------------------------------- measuring
def compulsory_bytes(batch, dim, N, L, G, elem) -> dict[str, int]:
    bdl, bcl = batch * dim * L, batch * G * N * L
    params = (dim * N + 2 * dim) * 4
    fwd = (3 * bdl + 2 * bcl) * elem + params + bdl * elem
    bwd = (4 * bdl + 2 * bcl) * elem + params + (3 * bdl + 2 * bcl) * elem + params
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def make_inputs(batch, dim, N, L, G, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape, scale=None, dt=dtype):
        x = torch.rand(*shape, generator=gen) * scale if scale else torch.randn(*shape, generator=gen)
        return x.to(device=device, dtype=dt).requires_grad_()

    bc = (batch, N, L) if G == 1 else (batch, G, N, L)
    return dict(u=t(batch, dim, L), delta=t(batch, dim, L, scale=0.5), A=t(dim, N, scale=-0.5, dt=torch.float32),
                B=t(*bc), C=t(*bc), D=t(dim, dt=torch.float32), z=t(batch, dim, L),
                delta_bias=t(dim, scale=0.5, dt=torch.float32))


def bench_ms(fn, device, grad_to_none=None) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none))
    # CPU (the Triton interpreter): do_bench needs a GPU driver; a few wall-clock runs will do
    fn()
    times = []
    for _ in range(3):
        for x in grad_to_none or ():
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn, inputs, mode, device):
    """(ms, peak bytes above the starting allocation or None)."""
    leaves = list(inputs.values())
    call = lambda: fn(**inputs, delta_softplus=True)  # noqa: E731
    g = torch.randn_like(inputs["u"])
    if mode == "fwd":
        run, grad_to_none = call, None
    elif mode == "bwd":
        out = call()
        run = lambda: out.backward(g, retain_graph=True)  # noqa: E731
        grad_to_none = leaves
    else:
        run = lambda: call().backward(g)  # noqa: E731
        grad_to_none = leaves
    ms = bench_ms(run, device, grad_to_none)
    peak = None
    if device.type == "cuda":
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return ms, peak


def environment(device) -> dict[str, str]:
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
    }
    for mod in ("mamba_ssm", "mambapy"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "installed")
        except ImportError:
            env[mod] = "not installed"
    return env


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.quick:
        print("--device cpu runs Triton through its interpreter: add --quick (tiny shapes)")
        return 2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        unknown = set(args.shapes.split(",")) - set(shapes)
        if unknown:
            print(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(shapes)}")
            return 2
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    modes = args.modes.split(",")
    dtype = getattr(torch, DTYPES[args.dtype])
    elem = torch.empty((), dtype=dtype).element_size()

    env = environment(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    providers = load_providers(args.providers.split(","), args.chunk_size)
    if device.type == "cpu":
        for name in [n for n in providers if n in ("mamba_ssm",)]:
            print(f"[skip] provider {name}: CUDA only")
            providers.pop(name)

    rows = []
    header = f"{'shape':<10} {'provider':<10} {'mode':<8} {'ms':>10} {'GB/s':>8} {'peak MiB':>9}"
    print(header)
    for shape_name, (batch, dim, N, L, G) in shapes.items():
        nbytes = compulsory_bytes(batch, dim, N, L, G, elem)
        for name, fn in providers.items():
            for mode in modes:
                inputs = make_inputs(batch, dim, N, L, G, dtype, device)
                note = ""
                try:
                    ms, peak = measure(fn, inputs, mode, device)
                except torch.cuda.OutOfMemoryError:
                    ms, peak, note = float("nan"), None, "out of memory"
                    torch.cuda.empty_cache()
                except Exception as exc:  # report and go on: one provider must not sink the run
                    ms, peak, note = float("nan"), None, f"{type(exc).__name__}: {exc}"[:200]
                gbps = nbytes[mode] / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
                peak_mib = peak / 2**20 if peak is not None else None
                print(f"{shape_name:<10} {name:<10} {mode:<8} {ms:>10.3f} {gbps:>8.3g} "
                      f"{(f'{peak_mib:.1f}' if peak_mib is not None else '-'):>9} {note}")
                rows.append(dict(shape=shape_name, batch=batch, dim=dim, N=N, L=L, G=G, dtype=args.dtype,
                                 provider=name, mode=mode, ms=f"{ms:.4f}", gbps=f"{gbps:.2f}",
                                 compulsory_bytes=nbytes[mode],
                                 peak_mem_mib="" if peak_mib is None else f"{peak_mib:.1f}",
                                 chunk_size=args.chunk_size or "", note=note, **env))
                del inputs
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["shape"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
