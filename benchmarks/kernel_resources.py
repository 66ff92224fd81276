"""Compile the Triton scan kernels for a CUDA architecture without a GPU; print their resources.

Triton's nvidia backend and ptxas ship in the triton wheel, so the whole path from Python to
cubin runs on any machine. This catches what the interpreter (TRITON_INTERPRET=1) cannot:
type errors of the real compiler, and register pressure. For each launch configuration,
without and with an initial state (h0: HAS_INITIAL_STATE), it prints cuobjdump's resource
line (REG = registers per thread, STACK = bytes of stack frame, which is where spills go).

    python -m benchmarks.kernel_resources                  # the configurations _blocks picks
    python -m benchmarks.kernel_resources --configs 64:32:4 --arch 80
    python -m benchmarks.kernel_resources --check 64       # exit 1 if a stack frame > 64 bytes

Must run without TRITON_INTERPRET (the interpreter replaces the kernels' compiled form).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _configs_from_blocks(ts):
    """(BLOCK_D, BLOCK_N, num_warps) that _blocks picks for dim 128 at several N, with and
    without the small-grid shrink (batch 64 on an H100 takes BLOCK_D down to 16)."""
    out = []
    for n in (16, 32, 64, 256):
        bn = 1 << (n - 1).bit_length()
        for bd in sorted({min(128, max(1, ts._MAX_TILE // bn)), 16 if bn <= 64 else 4}, reverse=True):
            out.append((bd, bn, ts._num_warps(bd, bn)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    p.add_argument("--configs", nargs="*", default=None,
                   help="BLOCK_D:BLOCK_N[:num_warps] (default: what _blocks picks for dim 128)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--check", type=int, default=None, metavar="BYTES",
                   help="exit 1 if a kernel compiles to a stack frame larger than BYTES")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter has no compiled form to inspect")
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mamba4rec.kernels import selective_scan as ts
    from mamba4rec.kernels import selective_scan_triton as tk

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    io_ptrs = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "dz_ptr"}

    def resources(kernel, consts, num_warps):
        fn = kernel.fn  # under triton.heuristics
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = f"*{args.dtype}" if name in io_ptrs else "*fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(compiled.asm["cubin"])
            dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                                  capture_output=True, text=True, check=True).stdout
        line = next(l.strip() for l in dump.splitlines() if "REG:" in l)
        reg = int(re.search(r"REG:(\d+)", line).group(1))
        stack = int(re.search(r"STACK:(\d+)", line).group(1))
        return reg, stack

    if args.configs:
        configs = []
        for c in args.configs:
            parts = [int(x) for x in c.split(":")]
            configs.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ts._num_warps(*parts[:2])))
    else:
        configs = _configs_from_blocks(ts)

    flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, DELTA_SOFTPLUS=True)
    worst = 0
    print(f"sm_{args.arch}, {args.dtype} inputs, every optional input on")
    print(f"{'kernel':<5} {'h0':>3} {'BLOCK_D':>7} {'BLOCK_N':>7} {'warps':>5} {'REG':>4} {'STACK':>6}")
    for bd, bn, nw in configs:
        for h0 in (False, True):
            for label, kernel, extra in (("fwd", tk._selective_scan_fwd_kernel, {"STORE_ALL_STATES": True}),
                                         ("bwd", tk._selective_scan_bwd_kernel, {"HAS_DLAST": True})):
                consts = dict(flags, HAS_INITIAL_STATE=h0, BLOCK_D=bd, BLOCK_N=bn, **extra)
                reg, stack = resources(kernel, consts, nw)
                worst = max(worst, stack)
                print(f"{label:<5} {'yes' if h0 else 'no':>3} {bd:>7} {bn:>7} {nw:>5} {reg:>4} {stack:>6}")
    if args.check is not None and worst > args.check:
        print(f"FAIL: a stack frame of {worst} bytes > {args.check} (register spills)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
