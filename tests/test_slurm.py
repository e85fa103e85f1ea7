"""sbatch and submitit launches on a real SLURM cluster (CI: scripts/start_slurm.sh, 2 nodes n1/n2).

Each cluster test trains the tiny model with ZeRO-3 on 2 CPU ranks, one per node:
(a) sbatch slurm/train.sbatch to the end; (b) `phi3v-train submit` (submitit) to the end;
(c) preemption: submitit's interrupt, and `scontrol requeue` of an sbatch job; (d) the time
limit (USR1 before it); (e) failing jobs report their error. After a requeue, metrics.jsonl
must hold every step exactly once. Without a reachable cluster these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi3v_train.config import REPO_ROOT
from phi3v_train.data.shards import write_shards

DEMO = str(REPO_ROOT / "configs/train/demo.yaml")
TRAIN_SBATCH = str(REPO_ROOT / "slurm/train.sbatch")
# the CPU version of train.sbatch's GPU header: what a user on a CPU cluster passes to sbatch
CPU_SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=3G"]
CPU_SUBMIT = ["--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--mem", "3G"]
COMMON = ["logging.log_every=1", "process_group_timeout_s=120"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _load_submit_module():
    spec = importlib.util.spec_from_file_location("phi3v_launch_submit_test", REPO_ROOT / "launch/submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ no cluster needed

def test_sbatch_scripts_parse_and_carry_the_preemption_settings():
    for script in sorted((REPO_ROOT / "slurm").glob("*.sbatch")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    header = [line for line in Path(TRAIN_SBATCH).read_text().splitlines() if line.startswith("#SBATCH")]
    options = {line.split()[1].split("=")[0] for line in header}
    assert {"--requeue", "--signal", "--open-mode", "--output", "--nodes", "--ntasks-per-node"} <= options
    assert any(re.match(r"#SBATCH --signal=USR1@\d+", line) for line in header)  # to the ranks: no "B:"
    text = Path(TRAIN_SBATCH).read_text()
    for var in re.findall(r"^export (\w+)=", text, re.M):  # every exported variable is explained above it
        assert re.search(rf"#[^\n]*\n(#[^\n]*\n)*export {var}=", text), f"export {var} has no comment"


def test_parse_time_and_sweep():
    sub = _load_submit_module()
    assert [sub.parse_time_min(t) for t in ("90", "30:00", "1:30:00", "2-00:00:00", "0:0:30")] == [90, 30, 90, 2880, 1]
    assert sub.expand_sweep(["optim.lr=1e-4,2e-4", "seed=0,1"]) == [
        ["optim.lr=1e-4", "seed=0"], ["optim.lr=1e-4", "seed=1"], ["optim.lr=2e-4", "seed=0"], ["optim.lr=2e-4", "seed=1"]]


def test_submit_dry_run_prints_a_job_array_and_writes_nothing(tmp_path, luma_shards, capsys):
    from phi3v_train.cli import main

    run_dir = tmp_path / "sweep"
    rc = main(["submit", "--config", DEMO, *CPU_SUBMIT, "--time", "1:30:00", "--partition", "debug", "--account", "acct",
               "--qos", "normal", "--constraint", "cpu", "--exclusive", "--run-dir", str(run_dir), "--dry-run",
               "--sweep", "optim.lr=1e-3,2e-3", f"data.shards={luma_shards}"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    for flag in ("--array=0-1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=3G", "--time=90",
                 "--partition=debug", "--account=acct", "--qos=normal", "--constraint=cpu", "--exclusive",
                 "--requeue", "--signal=USR2@", "--open-mode=append"):
        assert f"#SBATCH {flag}" in out, flag
    assert "export DS_ACCELERATOR=cpu" in out and "srun " in out
    assert f"run_dir: {run_dir}/000_lr=1e-3" in out and f"run_dir: {run_dir}/001_lr=2e-3" in out
    assert not run_dir.exists()


def test_submit_refuses_an_invalid_config(tmp_path, luma_shards, capsys):
    sub = _load_submit_module()
    for overrides, message in ((["optim.bogus=1"], "unknown key"), (["data.shards=/nonexistent"], "data.shards")):
        assert sub.main(["--config", DEMO, "--run-dir", str(tmp_path / "r"), *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and "nothing submitted" in err, err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the cluster

def _cluster_problem() -> str | None:
    """Why SLURM tests cannot run here, or None."""
    for tool in ("sinfo", "sbatch", "squeue", "sacct", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"no SLURM client ({tool} not on PATH); CI starts a local cluster with scripts/start_slurm.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: SLURM controller not reachable"
    if out.returncode != 0:
        return f"SLURM controller not reachable: {out.stderr.strip()[:200]}"
    up = {line.split()[0] for line in out.stdout.splitlines()
          if len(line.split()) == 2 and line.split()[1] in {"idle", "mix", "alloc", "comp"}}
    if len(up) < 2:
        return f"needs 2 SLURM nodes up, sinfo -N shows: {out.stdout.strip()[:200]!r}"
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20)
    if acct.returncode != 0:
        return f"sacct fails (no accounting storage): {acct.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="session")
def slurm():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def luma_shards(tmp_path_factory):
    # under /tmp: the jobs run on the same machine (as root in CI), so they read it directly
    out = tmp_path_factory.mktemp("shards")
    write_shards(REPO_ROOT / "data/luma/products.csv", REPO_ROOT / "data/luma", out, samples_per_shard=48, seed=0)
    return out


@pytest.fixture
def jobs():
    """Job ids a test submitted; anything still queued at the end is cancelled."""
    ids: list[str] = []
    yield ids
    for job in ids:
        if _squeue_state(job):
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def _squeue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else ""


def _sacct(job: str, duplicates: bool = False) -> list[dict]:
    """The job's last allocation (all of them with ``duplicates``) as dicts: id, state, exit, nodes (count)."""
    cmd = ["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,NNodes"] + (["-D"] if duplicates else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(("id", "state", "exit", "nodes"), line.split("|"))) for line in out.splitlines() if line]


def _diagnose(run_dir: Path, log: Path | None) -> str:
    parts = []
    for f in ([log] if log else []) + sorted((run_dir / "logs").glob("rank*.log")) + sorted(run_dir.glob("submitit/*/*_log.out")):
        if f and f.exists():
            parts.append(f"==== {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def _wait(predicate, timeout_s: float, what: str, job: str, run_dir: Path, log: Path | None = None):
    end = time.time() + timeout_s
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (job {job}, queue state "
                f"{_squeue_state(job)!r}, sacct {_sacct(job, True)})\n{_diagnose(run_dir, log)}")


def _wait_end(job: str, timeout_s: float, run_dir: Path, log: Path | None = None) -> dict:
    """Wait until the job left the queue and accounting shows its final state."""
    def ended():
        if _squeue_state(job):
            return None
        rows = _sacct(job)
        return rows[-1] if rows and rows[-1]["state"].split()[0] in TERMINAL else None
    return _wait(ended, timeout_s, "the job to end", job, run_dir, log)


def _sbatch(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env={**os.environ, "PHI3V_PYTHON": sys.executable, "CONFIG": DEMO, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _submit(args: list[str]) -> tuple[str, Path]:
    proc = subprocess.run([sys.executable, "-m", "phi3v_train.cli", "submit", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    m = re.search(r"submitted job (\S+)\s+run_dir (\S+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1), Path(m.group(2))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _assert_trained_to(run_dir: Path, max_steps: int, diag: str = "") -> dict:
    assert _steps(run_dir) == list(range(1, max_steps + 1)), diag  # every step exactly once
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{max_steps:07d}", diag
    files = [p.name for p in (ckpt / f"step_{max_steps:07d}").iterdir()]
    assert any("rank_0" in f or "rank0" in f for f in files) and any("rank_1" in f or "rank1" in f for f in files), files
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and not summary["preempted"], summary
    return summary


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sbatch_two_nodes_zero3_trains_to_the_end(slurm, luma_shards, tmp_path, jobs):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    jobs.append(_sbatch([*CPU_SBATCH, "--time=10", "--signal=USR1@60", f"--output={log}", TRAIN_SBATCH,
                         f"data.shards={luma_shards}", "optim.max_steps=6", *COMMON], env={"RUN_DIR": str(run_dir)}))
    row = _wait_end(jobs[0], 240, run_dir, log)
    diag = _diagnose(run_dir, log)
    assert row["state"] == "COMPLETED" and row["exit"] == "0:0" and row["nodes"] == "2", f"{row}\n{diag}"
    _assert_trained_to(run_dir, 6, diag)
    text = log.read_text()
    assert "0: " in text and "[train.sbatch] finished" in text  # srun --label: rank 0's lines
    # the report slurm/bench.sbatch writes after its grid, from this run's metrics
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch/bench_report.py"), "--skip", "2", "--out",
                           str(tmp_path / "bench.json"), str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["runs"][0]["result"]["tokens_per_s"] > 0 and report["runs"][0]["result"]["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_b_submitit_two_tasks_trains_to_the_end(slurm, luma_shards, tmp_path, jobs):
    import submitit

    job_id, run_dir = _submit(["--config", DEMO, *CPU_SUBMIT, "--time", "10", "--run-dir", str(tmp_path / "run"),
                               f"data.shards={luma_shards}", "optim.max_steps=6", *COMMON])
    jobs.append(job_id)
    job = submitit.SlurmJob(folder=run_dir / "submitit" / "%j", job_id=job_id, tasks=[0, 1])
    _wait(lambda: job.done(), 240, "the submitit job's results", job_id, run_dir)
    results = job.results()  # one per task; raises the job's error if it failed
    assert [r["world_size"] for r in results] == [2, 2]
    _assert_trained_to(run_dir, 6, _diagnose(run_dir, None))
    snapshot = next(run_dir.glob("submit-*"))
    assert (snapshot / "code/src/phi3v_train/train.py").exists() and (snapshot / "configs/000.yaml").exists()
    assert json.loads((snapshot / "submission.json").read_text())["job_ids"] == [job_id]
    # the job ran the snapshot, not the working tree
    assert f"phi3v_train from {snapshot / 'code/src/phi3v_train'}" in (job.stdout() or "")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_c_submitit_preemption_checkpoints_requeues_and_resumes(slurm, luma_shards, tmp_path, jobs):
    import submitit

    job_id, run_dir = _submit(["--config", DEMO, *CPU_SUBMIT, "--time", "10", "--run-dir", str(tmp_path / "run"),
                               f"data.shards={luma_shards}", "optim.max_steps=7", *COMMON])
    jobs.append(job_id)
    job = submitit.SlurmJob(folder=run_dir / "submitit" / "%j", job_id=job_id, tasks=[0, 1])
    _wait(lambda: len(_steps(run_dir)) >= 2, 180, "2 training steps", job_id, run_dir)
    job._interrupt()  # what preemption sends: SIGTERM, then USR2
    _wait(lambda: job.done(), 300, "the requeued job's results", job_id, run_dir)
    diag = _diagnose(run_dir, None)
    results = job.results()
    assert results[0]["resumed_from_step"] >= 2 and not results[0]["preempted"], f"{results[0]}\n{diag}"
    _assert_trained_to(run_dir, 7, diag)
    _wait_end(job_id, 120, run_dir)  # the result files come a moment before accounting's final state
    assert [r["state"] for r in _sacct(job_id, duplicates=True)] == ["REQUEUED", "COMPLETED"], diag
    assert "requeued (restart 1)" in (job.stdout() or ""), diag


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_c_sbatch_scontrol_requeue_checkpoints_and_resumes(slurm, luma_shards, tmp_path, jobs):
    """`scontrol requeue` (what preemption in REQUEUE mode does): SIGTERM to the ranks, they save
    at the next step boundary and exit; SLURM requeues; the job resumes from the checkpoint."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    jobs.append(_sbatch([*CPU_SBATCH, "--time=10", "--signal=USR1@60", f"--output={log}", TRAIN_SBATCH,
                         f"data.shards={luma_shards}", "optim.max_steps=7", *COMMON], env={"RUN_DIR": str(run_dir)}))
    job = jobs[0]
    _wait(lambda: len(_steps(run_dir)) >= 2, 180, "2 training steps", job, run_dir, log)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    row = _wait_end(job, 300, run_dir, log)
    diag = _diagnose(run_dir, log)
    assert row["state"] == "COMPLETED", f"{row}\n{diag}"
    summary = _assert_trained_to(run_dir, 7, diag)
    assert summary["resumed_from_step"] >= 2, summary
    assert [r["state"] for r in _sacct(job, duplicates=True)] == ["REQUEUED", "COMPLETED"], diag
    text = log.read_text()
    assert "restart 1:" in text and "received SIGTERM" in (run_dir / "logs/rank0.log").read_text(), diag


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_d_sbatch_time_limit_checkpoints_requeues_and_resumes(slurm, luma_shards, tmp_path, jobs):
    """--time=1 with USR1@5: SLURM checks limits every 30 s and sends the signal one check
    early, i.e. 25-55 s into the job and >= 30 s before it kills it. The ranks save, rank 0
    requeues, the next allocation resumes; the test stops the job once it has made progress."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    jobs.append(_sbatch([*CPU_SBATCH, "--time=1", "--signal=USR1@5", f"--output={log}", TRAIN_SBATCH,
                         f"data.shards={luma_shards}", "optim.max_steps=500", *COMMON], env={"RUN_DIR": str(run_dir)}))
    job = jobs[0]
    rank0 = run_dir / "logs/rank0.log"

    def resumed_and_stepped():  # -> (step of the first USR1 checkpoint,) once a later step is logged
        saved = re.findall(r"received SIGUSR1: checkpoint at step (\d+)", rank0.read_text() if rank0.exists() else "")
        if saved and "restart 1:" in log.read_text() and max(_steps(run_dir), default=0) > int(saved[0]):
            return (int(saved[0]),)
        return None
    (saved_at,) = _wait(resumed_and_stepped, 300, "USR1, a requeue and a step after the resume", job, run_dir, log)
    subprocess.run(["scancel", job], check=True, timeout=30)
    _wait_end(job, 120, run_dir, log)
    diag = _diagnose(run_dir, log)
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > saved_at, f"{steps}\n{diag}"  # exactly once
    assert (run_dir / f"checkpoints/step_{saved_at:07d}").is_dir()
    states = [r["state"] for r in _sacct(job, duplicates=True)]  # one row per allocation
    assert len(states) >= 2 and set(states[:-1]) == {"REQUEUED"}, f"{states}\n{diag}"  # never TIMEOUT
    # the scancel at the end stays a cancel: its SIGTERM is not turned into a requeue
    assert states[-1].startswith("CANCELLED"), f"{states}\n{diag}"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_e_failing_jobs_report_their_error(slurm, luma_shards, tmp_path, jobs):
    import submitit

    # sbatch: shards that do not exist -> every rank exits 2 with the reason; the job FAILED
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    jobs.append(_sbatch([*CPU_SBATCH, "--time=5", "--signal=USR1@60", f"--output={log}", TRAIN_SBATCH,
                         "data.shards=/nonexistent/shards",
                         *COMMON], env={"RUN_DIR": str(run_dir)}))
    row = _wait_end(jobs[-1], 180, run_dir, log)
    text = log.read_text()
    assert row["state"] == "FAILED" and row["exit"] == "2:0", f"{row}\n{text[-3000:]}"
    assert "/nonexistent/shards" in text and "[train.sbatch] FAILED with exit code 2" in text, text[-3000:]

    # submitit: the shards vanish after the (validated) submission -> results() raises with the traceback
    shards = tmp_path / "shards"
    shutil.copytree(luma_shards, shards)
    job_id, run_dir = _submit(["--config", DEMO, *CPU_SUBMIT, "--time", "5", "--run-dir", str(tmp_path / "run2"),
                               f"data.shards={shards}", *COMMON])
    jobs.append(job_id)
    shutil.rmtree(shards)
    job = submitit.SlurmJob(folder=run_dir / "submitit" / "%j", job_id=job_id, tasks=[0, 1])
    _wait(lambda: job.done(), 180, "the failing job to end", job_id, run_dir)
    with pytest.raises(submitit.core.utils.FailedJobError, match=str(shards)):
        job.results()


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_shards_job_array_writes_one_folder_per_csv(slurm, tmp_path, jobs):
    sources = []
    for name in ("part-a", "part-b"):
        (tmp_path / f"{name}.csv").symlink_to(REPO_ROOT / "data/luma/products.csv")
        sources.append(str(tmp_path / f"{name}.csv"))
    (tmp_path / "sources.txt").write_text("\n".join(sources) + "\n")
    out, log = tmp_path / "shards", tmp_path / "shards-%A_%a.log"
    jobs.append(_sbatch(["--array=0-1", "--mem=1G", "--cpus-per-task=1", f"--output={log}",
                         str(REPO_ROOT / "slurm/shards.sbatch"), str(tmp_path / "sources.txt"), str(out)],
                        env={"IMAGES_ROOT": str(REPO_ROOT / "data/luma")}))
    for task in (0, 1):
        row = _wait_end(f"{jobs[0]}_{task}", 120, tmp_path, None)
        assert row["state"] == "COMPLETED", (row, [p.read_text()[-2000:] for p in tmp_path.glob("shards-*.log")])
    for name in ("part-a", "part-b"):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["splits"]["train"]["num_samples"] > 100 and (out / name / "train-000000.tar").exists()
