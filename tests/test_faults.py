"""Faults: dead and hung ranks, non-finite losses, stop signals, requeue, secrets, bad configs.

The multi-process tests start the 2 ranks the way srun does (one process each, no torchrun agent
to clean up after a failure), so they show what the ranks themselves do.
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from phi3v_train import dist
from phi3v_train.cli import cpu_torchrun_env
from phi3v_train.train import StopRequests
from test_train_e2e import DEMO, FAST, direct_output, free_port, luma_shards, start_direct, wait_all  # noqa: F401


# ---- fast unit tests ----------------------------------------------------------------------------

def test_scrub_env_masks_secrets_and_keeps_launch_vars():
    env = {"SLURM_JOB_ID": "7", "MASTER_ADDR": "n1", "WANDB_API_KEY": "abc", "HF_TOKEN": "hf_x",
           "NCCL_IB_AUTH_SECRET": "s", "WANDB_PROJECT": "p", "HOME": "/root", "MY_PASSWORD": "pw"}
    out = dist.scrub_env(env)
    assert out == {"HF_TOKEN": "***", "MASTER_ADDR": "n1", "NCCL_IB_AUTH_SECRET": "***", "SLURM_JOB_ID": "7",
                   "WANDB_API_KEY": "***", "WANDB_PROJECT": "p"}


def test_requeue_only_under_slurm_without_submitit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$2" != 13 ]\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    import unittest.mock

    with unittest.mock.patch.dict(os.environ, {"PATH": path}):
        assert "not a SLURM job" in dist.requeue_slurm_job({})
        assert "submitit" in dist.requeue_slurm_job({"SLURM_JOB_ID": "12", "SUBMITIT_EXECUTOR": "slurm"})
        assert dist.requeue_slurm_job({"SLURM_JOB_ID": "12"}) == "requeued SLURM job 12 (scontrol requeue)"
        assert "failed (exit 1)" in dist.requeue_slurm_job({"SLURM_JOB_ID": "13"})  # tolerated, reported
    assert calls.read_text().split() == ["requeue", "12", "requeue", "13"]
    with unittest.mock.patch.dict(os.environ, {"PATH": str(tmp_path)}):  # no scontrol at all
        assert "failed" in dist.requeue_slurm_job({"SLURM_JOB_ID": "12"})


def test_comm_failures_are_told_apart_from_bugs():
    assert dist.is_comm_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert dist.is_comm_failure(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert not dist.is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not dist.is_comm_failure(ValueError("bad value"))


def test_stop_requests_from_signals_and_save_file(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    with StopRequests(tmp_path, is_main=True) as stop:
        assert stop.local_flags() == [0.0, 0.0]
        (tmp_path / "SAVE_NOW").touch()
        assert stop.local_flags() == [0.0, 1.0]
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary
        assert stop.signal == "SIGUSR2" and stop.local_flags() == [1.0, 1.0]
    assert signal.getsignal(signal.SIGUSR2) is before
    with StopRequests(tmp_path, is_main=False) as stop:  # only rank 0 looks for SAVE_NOW
        assert stop.local_flags() == [0.0, 0.0]


def test_peer_monitor_names_the_silent_rank():
    port = free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, None, is_master=True, timeout=timedelta(seconds=10))
    monitors = [dist.PeerMonitor(dist.DistEnv(rank=r, world_size=3, master_port=port), interval_s=0.1)
                for r in range(3)]
    time.sleep(0.3)
    monitors[2]._stop.set()  # rank 2 "dies": its heartbeat stops
    time.sleep(0.2)
    assert monitors[0].silent_ranks() == [2]
    msg = monitors[1].describe_failure(RuntimeError("Connection reset by peer"))
    assert msg.startswith("rank 1: lost peer ranks [0, 2]")  # rank 0 stopped beating in silent_ranks() above
    del server


def test_bad_config_fails_before_any_process_group(tmp_path, luma_shards):
    """Rank 0 of 2 with nobody to meet: it must exit 2 with the fix in the message instead of
    waiting for rank 1 at the rendezvous."""
    env = {**cpu_torchrun_env(), "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "phi3v_train.cli", "train", "--config", DEMO, f"run_dir={tmp_path / 'run'}",
           f"data.shards={luma_shards}", "optim.global_batch_size=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "optim.global_batch_size=3" in proc.stderr and "change one of them" in proc.stderr


# ---- 2-rank runs ---------------------------------------------------------------------------------

def wait_for_step(run_dir: Path, step: int, procs: list, timeout: float = 180) -> None:
    """Until rank 0 has logged ``step`` (metrics.jsonl), failing early if a rank exits."""
    t0 = time.time()
    metrics = run_dir / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.5)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_killed_rank_is_named_by_the_survivor(tmp_path, luma_shards):
    """kill -9 of rank 1 mid-run: rank 0 exits with code 4 within seconds, naming rank 1."""
    run_dir = tmp_path / "run"
    procs = start_direct(run_dir, [f"data.shards={luma_shards}", *FAST, "optim.max_steps=1000",
                                   "process_group_timeout_s=30"])
    try:
        wait_for_step(run_dir, 2, procs)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0].wait(timeout=90)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    out = direct_output(run_dir, 0)
    assert rc == 4, out[-3000:]
    assert "rank 0: lost peer rank 1" in out and "lost peer rank 1" in (run_dir / "logs/rank0.log").read_text()
    assert elapsed < 45


@pytest.mark.slow
def test_hung_rank_times_out_and_is_named(tmp_path, luma_shards):
    """SIGSTOP of rank 1 (a hang, not a death): rank 0's collective times out after
    process_group_timeout_s and it exits with code 4 naming rank 1, instead of hanging."""
    run_dir = tmp_path / "run"
    timeout_s = 15
    procs = start_direct(run_dir, [f"data.shards={luma_shards}", *FAST, "optim.max_steps=1000",
                                   f"process_group_timeout_s={timeout_s}"])
    try:
        wait_for_step(run_dir, 2, procs)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        rc = procs[0].wait(timeout=timeout_s + 60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    out = direct_output(run_dir, 0)
    assert rc == 4, out[-3000:]
    assert "rank 0: lost peer rank 1" in out and "Timed out" in out
    assert timeout_s - 1 <= elapsed < timeout_s + 45


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, luma_shards):
    """NaN loss on rank 1 at steps 1-3, stop after 2 in a row: both ranks exit 5 at step 2, no hang."""
    run_dir = tmp_path / "run"
    procs = start_direct(run_dir, [f"data.shards={luma_shards}", *FAST, "optim.max_steps=10",
                                   "debug.nan_loss_steps=[1,2,3]", "optim.max_nonfinite_steps_in_row=2"])
    rcs = wait_all(procs, 180)
    out = direct_output(run_dir, 0)
    assert rcs == [5, 5], out[-3000:] + direct_output(run_dir, 1)[-2000:]
    assert "2 optimizer steps in a row (up to step 2) had a NaN/inf loss" in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["skipped_steps"]) for m in metrics] == [(1, None, 1)]


def test_sigusr1_to_the_torchrun_agent_checkpoints_and_requeues(tmp_path, luma_shards):
    """SLURM's --signal=USR1 reaches torchrun's agent too: it forwards the signal to the ranks (it
    would die of it otherwise), which checkpoint at the next step boundary, requeue and exit 3."""
    from phi3v_train.cli import torchrun_cmd

    run_dir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**cpu_torchrun_env(), "SLURM_JOB_ID": "77", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = torchrun_cmd(2, DEMO, [f"run_dir={run_dir}", f"data.shards={luma_shards}", *FAST, "optim.max_steps=200"])
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and
                                              len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.5)
        agent.send_signal(signal.SIGUSR1)
        out, _ = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode != -signal.SIGUSR1, out[-3000:]  # the agent survived the signal
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is True and 2 <= summary["last_step"] < 200, out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{summary['last_step']:07d}"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
