"""Submit training to SLURM with submitit: validate, snapshot, submit, print the job id and run directory.

    python launch/submit.py --config configs/train/phi3v_8k.yaml --nodes 2 --gpus-per-node 8
        --cpus-per-task 8 --time 24:00:00 --partition gpu --account myacct [key=value ...]
    phi3v-train submit ...                      # the same
    python launch/submit.py ... --dry-run       # print the resolved config(s) and sbatch script only
    python launch/submit.py ... --sweep optim.lr=1e-5,2e-5 --sweep seed=0,1   # a 4-task job array

What it does, in order:
1. Resolves the config (YAML <- key=value overrides) and validates it as every rank will
   (``phi3v_train.config.validate_for_launch``: keys and values, the DeepSpeed dict for
   nodes x tasks ranks, model, pretrained weights, shards, sample lengths). Relative paths
   become absolute (relative to where you run this).
2. Snapshots the code (src/, configs/, launch/, slurm/, pyproject.toml) and the resolved
   config(s) into ``<run_dir>/submit-<time>/``; the job runs from that copy (cwd and PYTHONPATH),
   so editing the tree while the job waits in the queue changes nothing.
3. Submits one task per GPU (``--tasks-per-node`` on CPU nodes) through ``srun``; every task
   runs :class:`TrainJob`, i.e. ``phi3v_train.train.train`` in-process, with rank and world size
   from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (``phi3v_train.dist``).

Preemption and time limits: submitit asks SLURM for USR2 ``--signal-delay-s`` seconds before
the limit; preemption (``job._interrupt()``: SIGTERM + USR2) and ``scontrol requeue`` (SIGTERM)
signal the ranks too. The trainer's own handler catches them, every rank stops at the same step
boundary and saves a checkpoint, and ``train()`` returns ``preempted``; :class:`TrainJob` then
requeues the job if it is still RUNNING (rank 0, ``scontrol requeue``; a job SLURM already
requeues is left alone, and one ``scancel`` cancelled stays cancelled) and exits without a
result, and the requeued job (same id, same pickle) resumes from
``<run_dir>/checkpoints/latest``: no step lost or repeated.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import submitit
import yaml
from phi3v_train.config import REPO_ROOT, ConfigError, load_config, save_config, to_dict, validate_for_launch

SNAPSHOT_ITEMS = ("src", "configs", "launch", "slurm", "pyproject.toml")
PREEMPTED_EXIT = 3  # as phi3v_train.train.PREEMPTED_EXIT_CODE; a requeued task exits with it


class TrainJob(submitit.helpers.Checkpointable):
    """One rank of a training run, started by submitit on every SLURM task.

    Args:
        config_path: the resolved config YAML written at submission (absolute paths).
        max_requeues: preemptions/time limits after which the job is no longer requeued
            (it then fails with a message; resubmit to continue from the last checkpoint).
    """

    def __init__(self, config_path: str, max_requeues: int = 20):
        self.config_path = config_path
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        import phi3v_train
        from phi3v_train.config import load_config as load
        from phi3v_train.train import train

        print(f"[submit] {submitit.JobEnvironment()}: phi3v_train from {Path(phi3v_train.__file__).parent}, "
              f"config {self.config_path}", flush=True)
        summary = train(load(self.config_path))
        if summary.get("preempted"):
            self._requeue_and_exit()
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit calls this from its USR2 handler on rank 0, then requeues the job.

        While ``train()`` runs its own handler holds USR2/USR1/SIGTERM, so submitit's handler (and
        this method) only runs when the signal lands outside the training loop (start-up before
        the handler is installed, or after training ended): no step has run since the last
        checkpoint then, and the requeued job resumes from it. Resubmit the same job.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _requeue_and_exit(self) -> None:
        """After the preemption checkpoint: rank 0 requeues the job; every rank exits without
        writing a result (the requeued job writes it), after a barrier so that no rank's exit
        can get rank 0 killed (``--kill-on-bad-exit``) before it requeued."""
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            raise RuntimeError(f"preempted after {restarts} requeues (max_requeues={self.max_requeues}): not requeued; "
                               "resubmit the same run_dir to resume from its last checkpoint")
        if env.global_rank == 0:
            state = _job_state(env.job_id)
            if state != "RUNNING":  # scancel (CANCELLED) must stay cancelled; SLURM's own requeue (PENDING) is done
                print(f"[submit] stopped after a checkpoint; job {env.job_id} is {state}: not requeued", flush=True)
            else:
                proc = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
                print(f"[submit] preempted: checkpoint saved, job {env.job_id} requeued (restart {restarts + 1})"
                      if proc.returncode == 0 else f"[submit] `scontrol requeue {env.job_id}` failed: {proc.stderr.strip()}",
                      flush=True)
        try:
            import torch.distributed as torch_dist

            if torch_dist.is_available() and torch_dist.is_initialized():
                torch_dist.barrier()
        except Exception:  # a peer already gone: we are exiting anyway
            pass
        raise SystemExit(PREEMPTED_EXIT)  # not an Exception: submitit writes no result pickle


def _job_state(job_id: str) -> str:
    """SLURM's JobState of ``job_id`` (RUNNING, CANCELLED, PENDING, ...), UNKNOWN if scontrol fails."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    found = re.findall(r"JobState=(\w+)", out)
    return found[0] if found else "UNKNOWN"


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------

def parse_time_min(text: str) -> int:
    """SLURM time ("90", "1:30:00", "2-00:00:00", "30:00" = 30 min) -> whole minutes (rounded up)."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, *parts
    elif len(parts) == 3:
        h, m, s = parts
    else:
        raise ValueError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    return days * 1440 + h * 60 + m + (1 if s else 0)


def _is_url(spec: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+]*:", spec))  # pipe:, s3:, http:, gs: ...


def _abs(path: str | None, cwd: Path) -> str | None:
    if path is None or _is_url(path) or Path(path).is_absolute():
        return path
    return str((cwd / path).resolve())


def absolutize(cfg, cwd: Path) -> None:
    """Make the config's paths absolute (the job runs from the snapshot, not from ``cwd``).

    ``deepspeed.config`` and ``model.name`` stay relative when they name bundled files, so they
    resolve inside the snapshot."""
    cfg.run_dir = _abs(cfg.run_dir, cwd)
    cfg.data.shards = _abs(cfg.data.shards, cwd)
    cfg.data.val_shards = _abs(cfg.data.val_shards, cwd)
    cfg.model.pretrained = _abs(cfg.model.pretrained, cwd)
    if (cwd / cfg.deepspeed.config).exists() and not (REPO_ROOT / cfg.deepspeed.config).exists():
        cfg.deepspeed.config = _abs(cfg.deepspeed.config, cwd)
    if ("/" in cfg.model.name or cfg.model.name.endswith(".json")) and (cwd / cfg.model.name).exists():
        cfg.model.name = _abs(cfg.model.name, cwd)


def expand_sweep(sweeps: list[str]) -> list[list[str]]:
    """``["optim.lr=1e-5,2e-5", "seed=0,1"]`` -> the cartesian product as override lists."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise ConfigError(f"--sweep {s!r}: use key=v1,v2,...")
        key, values = s.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def _slug(overrides: list[str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", o.split(".")[-1]) for o in overrides)


def snapshot_code(dest: Path) -> dict:
    """Copy the code and bundled configs into ``dest``; returns the git commit and dirty state."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in SNAPSHOT_ITEMS:
        src = REPO_ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / item)
    info = {"source": str(REPO_ROOT)}
    try:  # read-only git queries; a tree without git is fine
        git = ["git", "-C", str(REPO_ROOT)]
        info["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        diff = subprocess.run(git + ["diff", "HEAD"], capture_output=True, text=True, check=True).stdout
        info["dirty"] = bool(diff)
        if diff:
            (dest / "git.diff").write_text(diff)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def executor_parameters(args, code_dir: Path, num_tasks_per_node: int) -> dict:
    """submitit SlurmExecutor parameters (sbatch options, environment set-up) from the CLI args."""
    setup = [
        f"export PYTHONPATH={shlex.quote(str(code_dir / 'src'))}${{PYTHONPATH:+:$PYTHONPATH}}  # the snapshot",
        f"export OMP_NUM_THREADS={args.cpus_per_task}  # one thread pool per rank, sized to its CPUs",
        "export TOKENIZERS_PARALLELISM=false  # no Rust thread pool in forked loader workers",
        "export PYTHONUNBUFFERED=1",
        "export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # rows vary in length",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails the job instead of hanging it",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # rank 0 host',
        "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))  # per job: jobs sharing a node do not collide",
    ]
    if not args.gpus_per_node:
        setup.append("export DS_ACCELERATOR=cpu  # no GPUs: DeepSpeed on CPU, gloo collectives")
    params = dict(
        job_name=args.job_name, nodes=args.nodes, ntasks_per_node=num_tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=parse_time_min(args.time), signal_delay_s=args.signal_delay_s,
        setup=setup, stderr_to_stdout=True,
        additional_parameters={"requeue": True, "chdir": str(code_dir)},
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    optional = dict(mem=args.mem, partition=args.partition, account=args.account, qos=args.qos,
                    constraint=args.constraint, exclusive=True if args.exclusive else None)
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.array_parallelism:
        params["array_parallelism"] = args.array_parallelism
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi3v-train submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training recipe YAML, e.g. configs/train/phi3v_8k.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=1e-5")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir); resubmitting resumes it")
    r = p.add_argument_group("resources (sbatch options)")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    r.add_argument("--tasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    r.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per rank (data workers + main thread)")
    r.add_argument("--mem", help="memory per node, e.g. 400G (default: the partition's)")
    r.add_argument("--time", default="60", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--qos")
    r.add_argument("--constraint", help="node features, e.g. h100")
    r.add_argument("--exclusive", action="store_true", help="no other job on the nodes")
    r.add_argument("--job-name", default="phi3v-train")
    r.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds (SLURM: up to 30 s more) before the time limit: checkpoint + requeue")
    r.add_argument("--max-requeues", type=int, default=20, help="give up requeueing after this many restarts")
    s = p.add_argument_group("sweeps and dry runs")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one job-array task per combination (repeat for a grid); run dirs <run_dir>/<i>_<values>")
    s.add_argument("--array-parallelism", type=int, help="at most this many array tasks at once")
    s.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted; write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cwd = Path.cwd()
    tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    world_size = args.nodes * tasks_per_node
    try:
        base = load_config(args.config, args.overrides)
        run_root = Path(_abs(args.run_dir or base.run_dir, cwd))
        points = expand_sweep(args.sweep)
        configs = []
        for i, sweep_overrides in enumerate(points):
            cfg = load_config(args.config, [*args.overrides, *sweep_overrides])
            cfg.run_dir = str(run_root / f"{i:03d}_{_slug(sweep_overrides)}") if args.sweep else str(run_root)
            absolutize(cfg, cwd)
            validate_for_launch(cfg, world_size)  # what the ranks check first, before submitting
            configs.append((sweep_overrides, cfg))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"phi3v-train submit: invalid config, nothing submitted: {e}", file=sys.stderr)
        return 2

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    submit_dir = run_root / f"submit-{stamp}"
    code_dir = submit_dir / "code"
    params = executor_parameters(args, code_dir, tasks_per_node)
    folder = run_root / "submitit" / "%j"  # submitit's pickles and per-task logs, %j = job id

    if args.dry_run:  # no SLURM needed: submitit's own sbatch text, without submitting it
        from submitit.slurm.slurm import _make_sbatch_string

        for overrides, cfg in configs:
            print(f"# run_dir {cfg.run_dir}  ({world_size} ranks: {args.nodes} nodes x {tasks_per_node})"
                  + (f"  sweep {' '.join(overrides)}" if overrides else ""))
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"# sbatch script ({len(configs)} job(s){', one array' if len(configs) > 1 else ''})")
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"
        print(_make_sbatch_string(command=command, folder=folder, **params,
                                  **({"map_count": len(configs)} if len(configs) > 1 else {})))
        print(f"# dry run: nothing written, nothing submitted (code snapshot would go to {code_dir})")
        return 0

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    (submit_dir / "configs").mkdir(parents=True, exist_ok=True)
    code_info = snapshot_code(code_dir)
    fns = []
    for i, (_, cfg) in enumerate(configs):
        path = submit_dir / "configs" / f"{i:03d}.yaml"
        save_config(cfg, path)
        fns.append(TrainJob(str(path), max_requeues=args.max_requeues))
    if len(fns) == 1:
        jobs = [executor.submit(fns[0])]
    else:
        jobs = executor.submit_array(fns)
    record = {
        "job_ids": [j.job_id for j in jobs], "run_dirs": [c.run_dir for _, c in configs],
        "sweep": [o for o, _ in configs], "world_size": world_size, "argv": sys.argv if argv is None else argv,
        "executor": {k: v for k, v in params.items() if k != "setup"}, "setup": params["setup"],
        "code": code_info, "submitted_at": stamp,
    }
    (submit_dir / "submission.json").write_text(json.dumps(record, indent=2, default=str))
    for job, (_, cfg) in zip(jobs, configs):
        print(f"submitted job {job.job_id}  run_dir {cfg.run_dir}")
    print(f"code + config snapshot: {submit_dir}; submitit logs: {run_root / 'submitit'}")
    return 0


if __name__ != "__main__":
    # Imported as a module (e.g. by `phi3v-train submit`): pickle TrainJob by value, so the job
    # does not need launch/ on its path.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

if __name__ == "__main__":
    sys.exit(main())
