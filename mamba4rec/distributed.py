"""Distributed data-parallel training through RecBole's own Trainer, on GPUs or CPUs.

RecBole's launcher only takes model names from recbole.model, and its Config hard-codes
``init_process_group(backend="nccl")`` and CUDA devices. Here:

* we start the processes (torch.multiprocessing, spawn) and initialise the process group
  ourselves, with nccl on GPUs and gloo on CPU-only machines (or the backend you choose), a
  bounded timeout, and clear errors for a busy port or a wrong world size;
* :class:`DistributedConfig` is RecBole's Config with a device setup that uses that group
  instead of creating an nccl one;
* RecBole's Trainer then does the DDP work (gradient all-reduce, sharded sampling,
  metric map-reduce). Its ``DistributedDataParallel(model, device_ids=[local_rank])`` is only
  valid for GPU modules; compat routes CPU modules to ``device_ids=None``.

Only rank 0 logs, saves and returns the result.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from recbole.config import Config

from .checks import int_in

BACKENDS = ("gloo", "nccl")


@dataclass
class DistSpec:
    nproc: int = 1
    world_size: int | None = None
    ip: str = "127.0.0.1"
    port: int = 29500
    group_offset: int = 0
    backend: str | None = None
    timeout_s: float = 300.0

    def resolved(self) -> "DistSpec":
        spec = DistSpec(**self.__dict__)
        if spec.world_size is None:
            spec.world_size = spec.nproc + spec.group_offset
        if spec.backend is None:
            spec.backend = "nccl" if torch.cuda.is_available() else "gloo"
        return spec


def check_spec(spec: DistSpec) -> DistSpec:
    """Refuse impossible settings before any process starts."""
    if not int_in(spec.group_offset, 0):
        raise ValueError(f"--group_offset={spec.group_offset!r} is invalid: it must be an integer >= 0")
    spec = spec.resolved()
    for key in ("nproc", "world_size"):
        value = getattr(spec, key)
        if not int_in(value, 1):
            raise ValueError(f"--{key}={value!r} is invalid: it must be an integer >= 1")
    if spec.group_offset + spec.nproc > spec.world_size:
        raise ValueError(
            f"--world_size={spec.world_size} is too small: this node starts ranks {spec.group_offset}.."
            f"{spec.group_offset + spec.nproc - 1} (--group_offset={spec.group_offset}, --nproc={spec.nproc}); "
            f"world_size must be the total number of processes over all nodes")
    if not 0 < int(spec.port) < 65536:
        raise ValueError(f"--port={spec.port!r} is invalid: it must be in 1..65535")
    if spec.backend not in BACKENDS:
        raise ValueError(f"--backend={spec.backend!r} is invalid: use one of {', '.join(BACKENDS)}")
    if spec.backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--backend=nccl needs CUDA GPUs; this machine has none: use --backend=gloo")
        if spec.nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc={spec.nproc} exceeds the {torch.cuda.device_count()} visible GPUs")
    if spec.group_offset == 0:  # this node hosts the rendezvous store: its port must be free
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((spec.ip, int(spec.port)))
            except OSError as exc:
                raise ValueError(
                    f"--port={spec.port} on {spec.ip} is not available ({exc.strerror}): another job "
                    f"holds it; pick a free --port") from None
    return spec


class DistributedConfig(Config):
    """RecBole's Config whose device setup joins the already-initialised process group."""

    def _init_device(self):
        d = self.final_config_dict
        d["gpu_id"] = ",".join(map(str, d["gpu_id"])) if isinstance(d["gpu_id"], tuple) else str(d["gpu_id"])
        local_rank = d["local_rank"]
        if dist.get_backend() == "nccl":
            d["device"] = torch.device("cuda", local_rank)
            torch.cuda.set_device(local_rank)
        else:
            d["device"] = torch.device("cpu")
        d["single_spec"] = False
        if dist.get_rank() != 0:  # only rank 0 logs and shows progress
            d["state"] = "error"
            d["show_progress"] = False
            d["verbose"] = False


def _worker(local_rank, spec: DistSpec, run_kwargs: dict, result_path: str):
    rank = spec.group_offset + local_rank
    try:
        dist.init_process_group(
            backend=spec.backend, init_method=f"tcp://{spec.ip}:{spec.port}", rank=rank,
            world_size=spec.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s))
    except Exception as exc:  # noqa: BLE001 - reworded for the user, cause kept
        raise RuntimeError(
            f"rank {rank}: could not form the process group at tcp://{spec.ip}:{spec.port} with "
            f"world_size={spec.world_size} within {spec.timeout_s:.0f} s ({type(exc).__name__}). Check that "
            f"--world_size equals the number of processes over all nodes and that every node started") from exc
    try:
        from . import pipeline

        config_dict = dict(run_kwargs.pop("config_dict", None) or {})
        config_dict.update({"local_rank": local_rank, "nproc": spec.nproc, "world_size": spec.world_size,
                            "offset": spec.group_offset, "ip": spec.ip, "port": spec.port})
        result = pipeline.run(config_dict=config_dict, config_class=DistributedConfig, **run_kwargs)
        if rank == 0:
            from .files import write_text_atomic

            write_text_atomic(result_path, json.dumps(result.as_dict()))
    finally:
        dist.destroy_process_group()


def run_distributed(model="Mamba4Rec", dataset="ml-100k", spec: DistSpec | None = None,
                    config_files=None, config_dict=None, cmd_args=None):
    """Train with ``spec.nproc`` processes on this node; returns rank 0's RunResult as a dict
    (None on nodes that do not host rank 0)."""
    import torch.multiprocessing as mp

    from .registry import build_config

    spec = check_spec(spec or DistSpec())
    # the whole config is checked here, once, before any process starts
    build_config(model, dataset, config_files, config_dict, cmd_args)
    with tempfile.TemporaryDirectory(prefix="mamba4rec-ddp-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        run_kwargs = {"model": model, "dataset": dataset, "config_files": config_files,
                      "config_dict": config_dict, "cmd_args": cmd_args}
        mp.start_processes(_worker, args=(spec, run_kwargs, result_path), nprocs=spec.nproc,
                           join=True, start_method="spawn")
        if not os.path.exists(result_path):
            return None
        with open(result_path) as fh:
            return json.load(fh)
