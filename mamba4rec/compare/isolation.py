"""One model's training, in this process (``_train``) or in a fresh process of its own
(``_train_isolated``, multiprocessing "spawn"), so that its peak memory is its own and a process
that dies (killed for memory, a crash in native code) is a failed row, not the end of the
comparison. The process ends with its parent and trains with the parent's torch thread count.
mamba4rec.hyper runs its trials through the same two functions.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

from ..memory import PeakMemory
from ..pipeline import run
from ..registry import build_config, resolve_model
from .rows import _threads

logger = logging.getLogger(__name__)


def _train(model, dataset, config_files, run_dict, cmd_args, resume_from):
    """Train one model in this process: (RunResult, PeakMemory, torch threads)."""
    config = build_config(model, dataset, config_files, run_dict, cmd_args)
    with PeakMemory() as peak:
        result = run(model, dataset, config=config, resume=resume_from)
    return result, peak, _threads()


class ModelProcessDied(RuntimeError):
    """The process training a model ended without a result (killed, crashed)."""


class ModelFailed(RuntimeError):
    """Training failed in the model's own process; the message is the child's error."""


def _child(conn, threads, train, *args):
    """Entry of a model's own process: train, send (result, peak, threads) or the error back."""
    _exit_with_parent()
    try:
        import torch

        torch.set_num_threads(threads)  # the comparison's count, however it was set there
        result, peak, threads = train(*args)
        conn.send(("ok", (result, {"peak_mib": peak.peak_mib, "cuda_peak_mib": peak.cuda_peak_mib}, threads)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        conn.close()


def _exit_with_parent():
    """A model's process ends when the comparison's does, however that ends (SIGKILL runs no
    clean-up in the parent): it must not train on as an orphan. The parent's sentinel becomes
    ready the moment it exits, on every platform."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, daemon=True, name="mamba4rec-parent-watch").start()


def _spawnable(model):
    """A model's own process imports its class by module and name: refuse, with the way out,
    a class it could not import (defined in an interactive session's __main__)."""
    cls = resolve_model(model)[0]
    main = sys.modules.get("__main__")
    if cls.__module__ == "__main__" and not getattr(main, "__file__", None):
        raise ValueError(f"model class {cls.__name__} is defined in an interactive session: a model's own "
                         f"process cannot import it. Define it in a module (a .py file), or pass "
                         f"compare(..., isolate=False) to train in this process.")


def _train_isolated(model, dataset, config_files, run_dict, cmd_args, resume_from, train=None):
    """``train`` (default _train, same arguments and result) in a fresh process of its own (see
    compare(isolate=True)); the process imports it by name: a module-level function, or a
    functools.partial of one (mamba4rec.hyper's trials)."""
    import multiprocessing
    import signal
    from types import SimpleNamespace

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, _threads(), train or _train, model, dataset, config_files,
                                            run_dict, cmd_args, resume_from),
                       name=f"mamba4rec-compare-{resolve_model(model)[1]}")
    proc.start()
    send.close()
    try:
        try:
            message = receive.recv()
        except (EOFError, OSError):  # the process ended without sending (all of) its message
            message = None
        proc.join(60)  # it has sent everything; a process that does not end after that is stopped
        if proc.exitcode is None:
            proc.terminate()
            proc.join()
        code = proc.exitcode
    except BaseException:  # interrupted here: the model's process goes too
        proc.terminate()
        proc.join()
        raise
    finally:
        receive.close()
    proc.close()
    if message is None:
        how = f"exit code {code}: its error, if it printed one, is in the log above"
        if code < 0:
            sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            how = f"signal {sig}" + (" (out of memory? see dmesg)" if sig == "SIGKILL" else "")
        raise ModelProcessDied(f"its process ended without a result ({how})")
    kind, payload = message
    if kind == "error":
        name, text, trace = payload
        if name == "KeyboardInterrupt":
            raise KeyboardInterrupt
        logger.error("%s", trace.rstrip())
        raise ModelFailed(f"{name}: {text}")
    result, peak, threads = payload
    return result, SimpleNamespace(**peak), threads
