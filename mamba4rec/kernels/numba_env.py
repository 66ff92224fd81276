"""Calling numba's parallel kernels from torch code: threads, and the floating-point environment.

``run`` calls a compiled parallel kernel (the numba scan's, the compiled dropout's) with torch's
thread count, one call at a time, and its first call in a process under an inter-process lock.
``fp_intrinsics`` gives kernels two numba intrinsics that set and restore the thread's
floating-point mode around their work.

Subnormals. On x86 each chunk of sequences of the numba scan runs with the thread's MXCSR set to
flush subnormal results and inputs to zero (FTZ and DAZ), and puts the caller's value back after
it. In sequence mode a window overlaps the previous one of its user (stride L/2 by default), and
the positions they share have no targets in the later window: there the backward's dL/dh only
decays, exp(dt A) at a time, into the subnormal range (below 1.2e-38), where each float operation
costs a microcode assist. With a trained ML-1M model that made the training step 1.38x as long
(docs/ARCHITECTURE.md, "The compiled CPU path"). Flushing zeroes only results below 1.2e-38, and
changes what is computed from them by as little. Other CPUs keep subnormals: the same results,
without the speed-up.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import threading

import torch


def run(kernel, *args):
    """Call a parallel kernel with as many threads as torch uses (torch.set_num_threads is the
    knob users already turn), one call at a time: numba's default threading layer aborts the
    process if two Python threads enter parallel code at once (a threaded server calling
    prefill), so calls from several threads queue here instead.

    numba's OpenMP layer shares the OpenMP runtime with torch and, when it starts its threads,
    sets the runtime's thread count to NUMBA_NUM_THREADS (all cores): torch's own count, as the
    user set it (torch.set_num_threads, OMP_NUM_THREADS), is put back after every call."""
    import numba

    with _call_lock:
        threads = torch.get_num_threads()
        try:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            if kernel.signatures:
                kernel(*args)
            else:  # its first call here compiles it or loads it from numba's disk cache
                with compile_lock():
                    kernel(*args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


_call_lock = threading.Lock()

#: the file whose lock serialises first calls across processes (see compile_lock)
COMPILE_LOCK = os.path.join(tempfile.gettempdir(), "mamba4rec-numba-compile.lock")


@contextlib.contextmanager
def compile_lock(path=COMPILE_LOCK):
    """Hold an exclusive lock on ``path`` (POSIX flock; elsewhere nothing): one process at a time
    compiles a parallel kernel and writes numba's cache, or loads it. Parallel kernels are cached
    as several files, and processes that compile the same kernel at once (DDP ranks, test
    workers, on a cold cache) can write mismatched ones that crash whoever loads them (numba
    issues 4807 and 10128). The others wait, then load what the first one wrote."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fh = open(path, "a")
    except OSError:  # another user's lock file, a read-only temp folder: go on unlocked
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: MXCSR bits: flush-to-zero (15) and denormals-are-zero (6)
FTZ_DAZ = 0x8040


def x86() -> bool:
    """Whether this process runs on x86, whose MXCSR the kernels set."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


# The numba scan's cached kernels inline what follows; numba checks only numba_scan.py to reuse
# them: with any change below, bump numba_scan.ENV_REVISION.
def fp_intrinsics(intrinsic, types, ir, cgutils):
    """(_flush_subnormals, _restore_fp) as numba intrinsics: LLVM's stmxcsr / ldmxcsr on x86,
    no-ops elsewhere (other CPUs keep subnormals: the same results, without the speed-up)."""
    on_x86 = x86()
    i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
    csr_fn = ir.FunctionType(ir.VoidType(), [i8p])

    def _load_csr(builder, value):
        slot = cgutils.alloca_once_value(builder, value)
        fn = cgutils.get_or_insert_function(builder.module, csr_fn, "llvm.x86.sse.ldmxcsr")
        builder.call(fn, [builder.bitcast(slot, i8p)])

    @intrinsic
    def flush(typingctx):
        def codegen(context, builder, sig, args):
            if not on_x86:
                return ir.Constant(i32, 0)
            slot = cgutils.alloca_once(builder, i32)
            fn = cgutils.get_or_insert_function(builder.module, csr_fn, "llvm.x86.sse.stmxcsr")
            builder.call(fn, [builder.bitcast(slot, i8p)])
            old = builder.load(slot)
            _load_csr(builder, builder.or_(old, ir.Constant(i32, FTZ_DAZ)))
            return old
        return types.uint32(), codegen

    @intrinsic
    def restore(typingctx, csr):
        def codegen(context, builder, sig, args):
            if on_x86:
                _load_csr(builder, args[0])
            return context.get_dummy_value()
        return types.void(types.uint32), codegen

    return flush, restore
