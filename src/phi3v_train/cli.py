"""``phi3v-train <command>``: shards, train, demo.

Examples::

    phi3v-train shards --source data/luma/products.csv --images-root data/luma --out runs/shards
    torchrun --standalone --nproc_per_node 2 -m phi3v_train.cli train --config configs/train/demo.yaml
    phi3v-train demo
    phi3v-train export --run-dir runs/demo --out runs/demo/hf
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
    from .data.shards import DEFAULT_ANSWER, DEFAULT_PROMPT, write_shards
    from .data.sources import FieldMap

    manifest = write_shards(
        args.source, args.images_root, args.out, val_fraction=args.val_fraction,
        samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes, seed=args.seed,
        prompt_template=args.prompt_template or DEFAULT_PROMPT, answer_template=args.answer_template or DEFAULT_ANSWER,
        fields=FieldMap.from_pairs(args.field), source_format=args.format, source_split=args.split,
        num_workers=args.workers, progress=not args.no_progress, downscale=args.downscale,
        num_crops=args.num_crops, max_image_pixels=args.max_image_pixels or None)
    splits = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    print(f"wrote {args.out}: {splits}, skipped {manifest['num_skipped']}, repaired {manifest['num_repaired']}, "
          f"kept {manifest['shards_kept']} complete shard(s) from an earlier run")
    for s in manifest["skipped"][:20]:
        print(f"  skipped row {s.get('row')}: {s['reason']}")
    if manifest["num_skipped"] > 20:
        print(f"  ... {manifest['num_skipped'] - 20} more in {args.out}/manifest.json")
    return 0


def cmd_train(args) -> int:
    """Exit codes: 0 done, 2 bad config, 3 preempted (checkpoint saved: requeue), 4 a peer rank died
    or hung, 5 too many non-finite steps in a row (see train.py)."""
    from .dist import PeerLostError
    from .train import NONFINITE_EXIT_CODE, PEER_LOST_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteLossError, train

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except PeerLostError as e:
        print(f"phi3v-train train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PEER_LOST_EXIT_CODE)  # no clean shutdown: teardown over a broken process group can hang
    except NonFiniteLossError as e:
        print(f"phi3v-train train: error: {e}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def cmd_export(args) -> int:
    import torch

    from .checkpoint import export

    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    out = export(args.run_dir, args.out, tag=args.tag, dtype=dtype)
    print(f"exported {args.run_dir} ({args.tag or 'latest checkpoint'}) -> {out}")
    return 0


def cmd_submit(args) -> int:
    """Forward to the submitit launcher, ``launch/submit.py`` (its own options and --help)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("phi3v_launch_submit", REPO_ROOT / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # TrainJob is pickled by value from it (see the module's end)
    spec.loader.exec_module(module)
    return module.main(args.argv)


def cpu_torchrun_env() -> dict:
    """Environment for DeepSpeed ZeRO-3 on CPU ranks (see docs: gloo, no compiled ops)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# torchrun's agent dies of SIGUSR1/SIGUSR2 unless it handles them; handled, it forwards them to the
# ranks (which checkpoint at the next step boundary and exit 3), waits TORCHRUN_SHUTDOWN_S for them
# (then SIGKILL), and exits 1 itself: the ranks' logs and summary.json say "preempted".
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
TORCHRUN_SHUTDOWN_S = 270  # slurm/train.sbatch signals 300 s before the time limit


def torchrun_cmd(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """The torchrun command line that runs ``phi3v-train train`` on ``nproc`` local ranks; the
    agent forwards the preemption signals (``TORCHRUN_SIGNALS``) to the ranks and gives them
    ``TORCHRUN_SHUTDOWN_S`` seconds to checkpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--signals_to_handle={TORCHRUN_SIGNALS}", f"--shutdown_timeout={TORCHRUN_SHUTDOWN_S}",
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
    from .eval import demo_eval, format_demo_eval

    eval_rc = 0 if args.no_eval else demo_eval(run_dir, args.nproc)  # before/after fine-tuning, held-out val
    s = json.loads((run_dir / "summary.json").read_text())
    print("\n== phi3v-train demo summary")
    print(f"  model            tiny Phi-3-V, {s['num_params']:,} parameters, ZeRO-3 on {s['world_size']} CPU ranks")
    print(f"  steps            {s['steps']}")
    print(f"  loss             {s['first_loss']:.3f} -> {s['last_loss']:.3f}")
    print(f"  tokens/s         {s['tokens_per_s']:.0f} (all ranks)")
    print(f"  packing          {100 * s['packing_efficiency']:.1f}% of the token slots computed are real tokens; "
          f"packs {100 * s['pack_fill']:.1f}% full of {s['max_seq_len']} tokens")
    print(f"  checkpoint       {s['checkpoint']}")
    print(f"  run directory    {run_dir}  (config.yaml, metrics.jsonl, logs/)")
    if not args.no_eval:
        print(format_demo_eval(run_dir) or f"  eval             failed (exit code {eval_rc})")
    print(f"  wall time        {time.time() - t0:.0f} s")
    return eval_rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi3v-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shards", help="write WebDataset shards + manifest.json from a product table and its images")
    s.add_argument("--source", required=True, help="CSV, TSV, JSONL, parquet, or a `datasets` save_to_disk folder "
                                                   "(default schema: Burberry product prices)")
    s.add_argument("--format", choices=["csv", "tsv", "jsonl", "parquet", "dataset"], help="default: from the path")
    s.add_argument("--split", help="split of a saved DatasetDict (default: its only split, else train)")
    s.add_argument("--images-root", help="directory image paths are relative to (default: the source's folder)")
    s.add_argument("--out", required=True, help="output directory for the tars and manifest.json")
    s.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                   help="column of a field (key, title, price, image, category, category1, category2, currency); "
                        "repeatable; an empty COLUMN drops an optional field, e.g. --field price=")
    s.add_argument("--prompt-template", help="user message with <|image_1|> (default: the reference prompt)")
    s.add_argument("--answer-template", help="str.format over the columns (default: "
                                             "'Product: {title}, Category: {category3_code}, Full Price: {full_price}')")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of samples in the validation split")
    s.add_argument("--samples-per-shard", type=int, default=64, help="at most this many samples per tar")
    s.add_argument("--max-shard-bytes", type=int, help="also cut tars at about this many bytes")
    s.add_argument("--seed", type=int, default=0, help="seed of the deterministic train/val split and order")
    s.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="processes")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--downscale", action="store_true",
                   help="store images larger than the HD transform uses at --num-crops at that size")
    s.add_argument("--num-crops", type=int, default=16, help="HD crop budget of the manifest's token lengths")
    s.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="skip larger images (decompression-bomb guard; 0: no limit)")
    s.set_defaults(fn=cmd_shards)

    t = sub.add_parser("train", help="train on this rank (launch with torchrun or srun)")
    t.add_argument("--config", help="YAML recipe, e.g. configs/train/demo.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    t.set_defaults(fn=cmd_train)

    # everything after `submit` goes to launch/submit.py's own parser (prefix_chars: no option here)
    sm = sub.add_parser("submit", add_help=False, prefix_chars="\0",
                        help="submit training to SLURM with submitit (see `phi3v-train submit --help`)")
    sm.add_argument("argv", nargs="*")
    sm.set_defaults(fn=cmd_submit)

    e = sub.add_parser("export", help="consolidate a ZeRO-3 training checkpoint into an HF-format model directory "
                                      "(official key names, safetensors)")
    e.add_argument("--run-dir", required=True, help="training run directory (holds checkpoints/)")
    e.add_argument("--tag", help="checkpoint to export, e.g. step_0000200 (default: the one a resume would use)")
    e.add_argument("--out", required=True, help="output model directory (loads with model.pretrained=DIR)")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="tensor dtype written (default fp32)")
    e.set_defaults(fn=cmd_export)

    d = sub.add_parser("demo", help="shards from the bundled real photos + 2-rank ZeRO-3 CPU training + summary")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    d.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    d.add_argument("--no-eval", action="store_true", help="skip the evaluation on the held-out val split")
    d.set_defaults(fn=cmd_demo)

    from .eval import add_eval_parser  # stdlib-only at import: cheap

    add_eval_parser(sub)
    from .bench import add_bench_parser  # no torch at import: cheap
    from .plan import add_plan_parser

    bench_sub = add_bench_parser(sub)  # returns the `bench` sub-parsers: add `bench data` / `bench memory` to them
    from .bench_data import add_parser as add_bench_data_parser

    add_bench_data_parser(bench_sub)
    add_plan_parser(sub)
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
