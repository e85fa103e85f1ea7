"""Rank, world size and process-group set-up, read from torchrun's or SLURM's environment in one place.

Data code never reads the environment: it gets a :class:`DistEnv` passed in, so tests can fake it.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import re
import subprocess
import threading
import time
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


class PeerLostError(RuntimeError):
    """A collective failed or timed out because another rank died or hung; the message names it."""


# Substrings of the errors gloo/NCCL/c10d raise when a peer is gone or a collective times out.
_COMM_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout|"
                           r"socket|peer|DistBackendError|DistNetworkError|DistStoreError", re.IGNORECASE)


def is_comm_failure(exc: BaseException) -> bool:
    """True when ``exc`` looks like a failed collective (dead or hung peer), not a bug in our code."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_COMM_FAILURE.search(str(exc)))


class PeerMonitor:
    """Heartbeats through the rendezvous TCPStore, so that a rank whose collective fails can say
    which peer died or hung (gloo and NCCL errors do not name it).

    Every rank runs a daemon thread that bumps the key ``phi3v_hb/<rank>`` every ``interval_s``;
    :meth:`silent_ranks` reads all counters twice, ``3 * interval_s`` apart, and returns the ranks
    whose counter did not move. The store is torchrun's agent store (it outlives the ranks) or,
    under srun, the one global rank 0 hosts; when it is unreachable, rank 0 is reported.
    Costs one tiny store write per interval per rank; nothing in the training hot path.
    """

    def __init__(self, denv: DistEnv, interval_s: float = 2.0):
        self.denv, self.interval_s = denv, interval_s
        self._store = None
        self._stop = threading.Event()
        if denv.world_size < 2:
            return
        try:
            self._store = torch.distributed.TCPStore(denv.master_addr, denv.master_port, None, is_master=False,
                                                     timeout=datetime.timedelta(seconds=10))
        except Exception as e:  # noqa: BLE001 - monitoring is best effort
            logging.getLogger("phi3v_train").warning("peer monitor disabled: cannot reach the store: %s", e)
            return
        threading.Thread(target=self._beat, name="phi3v-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self._store.set(f"phi3v_hb/{self.denv.rank}", str(n))
            except Exception:  # noqa: BLE001 - the store host died: nothing left to tell
                return
            n += 1
            self._stop.wait(self.interval_s)

    def _counters(self) -> list[str | None]:
        out = []
        for r in range(self.denv.world_size):
            key = f"phi3v_hb/{r}"
            out.append(self._store.get(key).decode() if self._store.check([key]) else None)
        return out

    def silent_ranks(self) -> list[int] | None:
        """Peers whose heartbeat stopped (blocks ``3 * interval_s``); None when unknown."""
        if self._store is None:
            return None
        self._stop.set()  # our own counter is irrelevant now
        try:
            before = self._counters()
            time.sleep(3 * self.interval_s)
            after = self._counters()
        except Exception:  # noqa: BLE001 - store gone: its host (rank 0 under srun) is gone
            return [0] if self.denv.rank != 0 else None
        return [r for r in range(self.denv.world_size)
                if r != self.denv.rank and (after[r] is None or after[r] == before[r])]

    def describe_failure(self, exc: BaseException) -> str:
        """The message for a failed collective: which peer(s) went silent, and the backend's error."""
        silent = self.silent_ranks()
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if silent:
            who = f"lost peer rank {silent[0]}" if len(silent) == 1 else f"lost peer ranks {silent}"
            return (f"rank {self.denv.rank}: {who} (no heartbeat for {3 * self.interval_s:.0f} s: died or hung); "
                    f"collective failed: {first}. Check logs/rank{silent[0]}.log and the node it ran on; "
                    "resume from the last checkpoint by relaunching.")
        return (f"rank {self.denv.rank}: a collective failed and no peer could be named (all heartbeats alive "
                f"or monitor unavailable): {first}. Check the other ranks' logs.")


SECRET_NAME = re.compile(r"key|token|secret|password|passwd|credential|auth", re.IGNORECASE)
LAUNCH_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_",
                       "CUDA_VISIBLE", "NCCL_", "OMP_NUM_THREADS", "DS_", "WANDB_", "HF_", "SUBMITIT_")


def scrub_env(environ: dict) -> dict:
    """The launcher-related variables of ``environ`` (SLURM_*, MASTER_*, NCCL_*, WANDB_*, ...) with the
    value of every name containing key/token/secret/password/credential/auth replaced by ``***``:
    safe to write to logs."""
    return {k: ("***" if SECRET_NAME.search(k) else v) for k, v in sorted(environ.items())
            if k.startswith(LAUNCH_ENV_PREFIXES)}


def under_submitit(environ: dict | None = None) -> bool:
    """True inside a submitit job (it requeues on preemption by itself)."""
    env = os.environ if environ is None else environ
    return any(k.startswith("SUBMITIT_") for k in env)


def requeue_slurm_job(environ: dict | None = None, timeout_s: float = 60) -> str:
    """``scontrol requeue $SLURM_JOB_ID`` when under SLURM and not under submitit.

    Returns a one-line description of what happened (for the log); never raises.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")  # an array task has its own job id too
    if not job:
        return "not requeued: no SLURM_JOB_ID (not a SLURM job)"
    if under_submitit(env):
        return "not requeued: submitit requeues its own jobs"
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed: {e}"
    if out.returncode != 0:
        return f"scontrol requeue {job} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[:300]}"
    return f"requeued SLURM job {job} (scontrol requeue)"


def device() -> torch.device:
    """This process's device: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(n: int, on: torch.device | None = None) -> int:
    """The largest ``n`` over all ranks: one all-reduce of an int (and one host sync) on ``on``
    (default :func:`device`; it must be one the process group's backend serves: CUDA for NCCL, CPU
    for gloo). ``n`` itself without a process group or with one rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=on if on is not None else device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
