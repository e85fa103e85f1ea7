"""Rank, world size and process-group set-up, read from torchrun's or SLURM's environment in one place.

Data code never reads the environment: it gets a :class:`DistEnv` passed in, so tests can fake it.
"""

from __future__ import annotations

import datetime
import importlib
import os
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes (data-parallel size).
        local_rank: rank within this node (selects the GPU).
        local_world_size: processes on this node.
        master_addr / master_port: rendezvous address of global rank 0.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    """First host of the SLURM allocation (``scontrol show hostnames $SLURM_JOB_NODELIST``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def get_dist_env(environ: dict | None = None) -> DistEnv:
    """Read rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, ...) or, failing that,
    from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...); a single process otherwise.

    torchrun wins when both are present (``srun torchrun ...`` sets both; torchrun's are the
    per-process ones). MASTER_PORT under SLURM defaults to 29500 + (job id % 1000).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)), local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1),
            master_addr=env.get("MASTER_ADDR") or (_slurm_master_addr() if environ is None else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500 + job % 1000)))
    return DistEnv()


def init_distributed(denv: DistEnv, timeout_s: int = 600) -> str:
    """Initialise the default process group (NCCL on GPU, gloo on CPU) via DeepSpeed.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so that DeepSpeed and torch see
    the same values whichever launcher started the process. Returns the backend name.
    ``timeout_s`` bounds every collective: a dead rank fails the job instead of hanging it.
    """
    import deepspeed

    for k, v in dict(RANK=denv.rank, WORLD_SIZE=denv.world_size, LOCAL_RANK=denv.local_rank,
                     LOCAL_WORLD_SIZE=denv.local_world_size, MASTER_ADDR=denv.master_addr,
                     MASTER_PORT=denv.master_port).items():
        os.environ[k] = str(v)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank)
    else:
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op (inference only, ~60 s
        # cold, a C++ compiler needed); training over gloo does not use it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               rank=denv.rank, world_size=denv.world_size)
    return backend


def device() -> torch.device:
    """This process's device: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
