"""``phi3v-train <command>``: shards, train, demo.

Examples::

    phi3v-train shards --source data/luma/products.csv --images-root data/luma --out runs/shards
    torchrun --standalone --nproc_per_node 2 -m phi3v_train.cli train --config configs/train/demo.yaml
    phi3v-train demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import REPO_ROOT, ConfigError, load_config


def cmd_shards(args) -> int:
    from .data.shards import write_shards

    manifest = write_shards(args.source, args.images_root, args.out, val_fraction=args.val_fraction,
                            samples_per_shard=args.samples_per_shard, seed=args.seed)
    splits = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    print(f"wrote {args.out}: {splits}, skipped {manifest['num_skipped']}")
    for s in manifest["skipped"][:20]:
        print(f"  skipped row {s.get('row')}: {s['reason']}")
    return 0


def cmd_train(args) -> int:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def cpu_torchrun_env() -> dict:
    """Environment for DeepSpeed ZeRO-3 on CPU ranks (see docs: gloo, no compiled ops)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def torchrun_cmd(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """The torchrun command line that runs ``phi3v-train train`` on ``nproc`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "phi3v_train.cli", "train", "--config", config, *overrides]


def cmd_demo(args) -> int:
    """The main job: real photos -> shards -> 2-rank ZeRO-3 training of the tiny model -> summary."""
    run_dir = Path(args.run_dir)
    shards_dir = run_dir / "shards"
    t0 = time.time()
    if not (shards_dir / "manifest.json").exists():
        from .data.shards import write_shards

        m = write_shards(REPO_ROOT / "data/luma/products.csv", REPO_ROOT / "data/luma", shards_dir, seed=0)
        print(f"[demo] shards: {m['splits']['train']['num_samples']} train / {m['splits']['val']['num_samples']} val "
              f"samples, {m['num_skipped']} skipped -> {shards_dir}")
    config = str(REPO_ROOT / "configs/train/demo.yaml")
    overrides = [f"run_dir={run_dir}", f"data.shards={shards_dir}", *args.overrides]
    cmd = torchrun_cmd(args.nproc, config, overrides)
    print("[demo] " + " ".join(cmd[2:]))
    rc = subprocess.call(cmd, env=cpu_torchrun_env())
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}; logs in {run_dir / 'logs'}", file=sys.stderr)
        return rc
    s = json.loads((run_dir / "summary.json").read_text())
    print("\n== phi3v-train demo summary")
    print(f"  model            tiny Phi-3-V, {s['num_params']:,} parameters, ZeRO-3 on {s['world_size']} CPU ranks")
    print(f"  steps            {s['steps']}")
    print(f"  loss             {s['first_loss']:.3f} -> {s['last_loss']:.3f}")
    print(f"  tokens/s         {s['tokens_per_s']:.0f} (all ranks)")
    print(f"  packing          {100 * s['packing_efficiency']:.1f}% of token slots are real tokens")
    print(f"  checkpoint       {s['checkpoint']}")
    print(f"  run directory    {run_dir}  (config.yaml, metrics.jsonl, logs/)")
    print(f"  wall time        {time.time() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi3v-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shards", help="write WebDataset shards + manifest.json from a CSV of image paths and metadata")
    s.add_argument("--source", required=True, help="CSV in the reference (Burberry) schema")
    s.add_argument("--images-root", required=True, help="directory the CSV's imageurl paths are relative to")
    s.add_argument("--out", required=True, help="output directory for the tars and manifest.json")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of samples in the validation split")
    s.add_argument("--samples-per-shard", type=int, default=64)
    s.add_argument("--seed", type=int, default=0, help="seed of the deterministic train/val split")
    s.set_defaults(fn=cmd_shards)

    t = sub.add_parser("train", help="train on this rank (launch with torchrun or srun)")
    t.add_argument("--config", help="YAML recipe, e.g. configs/train/demo.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("demo", help="shards from the bundled real photos + 2-rank ZeRO-3 CPU training + summary")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    d.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"phi3v-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
