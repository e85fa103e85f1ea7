"""One benchmark report from finished (multi-node) run directories: config, throughput, versions, hardware.

    python launch/bench_report.py --skip 2 --out runs/bench-123/bench.json runs/bench-123/00 runs/bench-123/01

``slurm/bench.sbatch`` runs it after its grid. Per run: the resolved ``config.yaml`` and its
``metrics.jsonl`` aggregated the way ``phi3v-train bench`` does (:func:`phi3v_train.bench.aggregate`:
time-weighted tokens/s, MFU, step breakdown, memory, after dropping ``--skip`` warm-up records).
Once for all: versions and hardware (:func:`phi3v_train.bench.environment`) and the SLURM allocation.
Prints a table and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from phi3v_train.bench import aggregate, environment

COLUMNS = ("world_size", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s", "packing_efficiency")
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_CPUS_PER_TASK",
              "SLURM_GPUS_ON_NODE", "SLURM_JOB_PARTITION")


def summarize_run(run_dir: Path, skip: int) -> dict:
    """Config and aggregated metrics of one run directory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
    return {"run_dir": str(run_dir), "num_records": len(records), "result": aggregate(records, skip), "config": config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--skip", type=int, default=2, help="leading metrics records (steps) dropped as warm-up")
    p.add_argument("--out", type=Path, required=True, help="report JSON")
    args = p.parse_args(argv)
    runs = [summarize_run(d, args.skip) for d in args.run_dirs if (d / "metrics.jsonl").exists()]
    if not runs:
        print(f"bench_report: no metrics.jsonl in {[str(d) for d in args.run_dirs]}", file=sys.stderr)
        return 1
    slurm = {k: os.environ[k] for k in SLURM_KEYS if k in os.environ}
    report = {"environment": environment(), "slurm": slurm, "skip": args.skip, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print("run_dir".ljust(32) + "".join(c.rjust(25) for c in COLUMNS))
    for r in runs:
        values = [r["result"].get(c) for c in COLUMNS]
        print(r["run_dir"][-32:].ljust(32) + "".join(("n/a" if v is None else f"{v:.4g}").rjust(25) for v in values))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
