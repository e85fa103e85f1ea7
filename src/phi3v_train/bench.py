"""``phi3v-train bench train``: a throughput grid of real training runs -> a report directory.

Every grid point is the real ``train`` entry point launched with torchrun (``--nproc`` ranks; on
CPU: gloo, ``DS_ACCELERATOR=cpu``) for ``--steps`` optimizer steps with ``logging.log_every=1``;
the first ``--warmup`` records are dropped and the rest aggregated from its ``metrics.jsonl``
(fields: :mod:`phi3v_train.metrics`). Axes: ``packing.max_seq_len``, ``optim.micro_batch_size``,
packing on/off (off = one sample per row padded to max_seq_len), ``model.attn_implementation``,
``model.gradient_checkpointing`` and the ZeRO config. Data: the bundled Luma shards (real photos,
the default) or synthetic samples with a given token-length distribution (``--data
synthetic:uniform:64:448``).

The report directory gets ``results.json`` (full config, hardware, versions, per-point results),
``report.md`` (the table), ``grid.yaml`` (the grid as run) and PNG plots: non-padding tokens/s
and memory vs seq len (packed and padded), and the step breakdown per configuration. The
checked-in CPU report is ``docs/benchmarks/``, made by ``phi3v-train bench train --out docs/benchmarks
--repeats 2`` (~10 min on 2 CPU cores; the command is also written into its report.md).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from .config import REPO_ROOT

BASE_CONFIG = "configs/train/demo.yaml"
ZERO2_JSON = {
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 50000000, "allgather_bucket_size": 50000000},
    "steps_per_print": 1000000, "wall_clock_breakdown": False,
}


@dataclass
class BenchPoint:
    """One configuration of the grid (units: tokens, rows)."""

    name: str
    seq_len: int = 512
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 2
    packing: bool = True
    padding: str = "max_length"
    """packing.padding: max_length (rows of max_seq_len, the padded baseline's layout) | longest."""
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    zero: str = "zero3"
    """zero3 (configs/deepspeed/zero3.json) | zero2 (ZERO2_JSON, written to the report dir) | a path."""
    extra: list = field(default_factory=list)
    """More key=value training overrides."""

    def overrides(self, zero2_path: Path) -> list[str]:
        ds = {"zero3": "configs/deepspeed/zero3.json", "zero2": str(zero2_path)}.get(self.zero, self.zero)
        return [f"packing.max_seq_len={self.seq_len}", f"optim.micro_batch_size={self.micro_batch_size}",
                f"optim.gradient_accumulation_steps={self.gradient_accumulation_steps}",
                f"packing.enabled={str(self.packing).lower()}", f"packing.padding={self.padding}",
                f"model.attn_implementation={self.attn_implementation}",
                f"model.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"deepspeed.config={ds}", *self.extra]


def default_grid() -> list[BenchPoint]:
    """The CPU grid (tiny model, ~5 min on 2 cores): seq len x packing on/off (rows of max_seq_len),
    then one axis at a time from the packed 512 point: micro batch 2, eager attention, rows of
    the longest pack (``packing.padding=longest``), checkpointing, ZeRO-2."""
    grid = []
    for L in (128, 256, 512):
        grid.append(BenchPoint(f"packed-{L}", seq_len=L))
        grid.append(BenchPoint(f"padded-{L}", seq_len=L, packing=False))
    grid += [BenchPoint("packed-512-mb2", micro_batch_size=2, gradient_accumulation_steps=1),
             BenchPoint("packed-512-eager", attn_implementation="eager"),
             BenchPoint("packed-512-longest", padding="longest", extra=["packing.pad_to_multiple_of=8"]),
             BenchPoint("packed-512-ckpt", gradient_checkpointing=True),
             BenchPoint("packed-512-zero2", zero="zero2")]
    return grid


def quick_grid() -> list[BenchPoint]:
    """Two points (CI): packed vs padded at 256."""
    return [BenchPoint("packed-256", seq_len=256), BenchPoint("padded-256", seq_len=256, packing=False)]


def load_grid(spec: str) -> list[BenchPoint]:
    """``default`` | ``quick`` | a YAML file with a list of BenchPoint mappings."""
    if spec == "default":
        return default_grid()
    if spec == "quick":
        return quick_grid()
    return [BenchPoint(**p) for p in yaml.safe_load(Path(spec).read_text())]


# ----------------------------------------------------------------------------------------- data

def _num_workers(overrides: list[str], default: int = 0) -> int:
    """max(1, data.num_workers) as the last such override sets it (the base config's: 0)."""
    values = [int(x.split("=", 1)[1]) for x in overrides if x.startswith("data.num_workers=")]
    return max(1, values[-1] if values else default)


def luma_shards(work_dir: Path) -> Path:
    """Shards of the bundled Luma photos (written once into ``work_dir/shards``)."""
    out = work_dir / "shards"
    if not (out / "manifest.json").exists():
        from .data.shards import write_shards

        write_shards(REPO_ROOT / "data/luma/products.csv", REPO_ROOT / "data/luma", out, seed=0)
    return out


def synthetic_shards(work_dir: Path, spec: str, num_samples: int = 256, seed: int = 0) -> Path:
    """WebDataset shards of synthetic samples whose answers give a token-length distribution.

    ``spec`` = ``synthetic:uniform:LO:HI`` or ``synthetic:lognormal:MEDIAN:SIGMA`` (answer tokens,
    on top of the prompt and the image tokens), optionally ``...:text`` for no images. Each
    sample: a one-colour image of a random size (so the HD crop count varies) and an answer of
    ``n`` repeated words.
    """
    import io

    import webdataset as wds
    from PIL import Image

    parts = spec.split(":")
    kind, a, b = parts[1], float(parts[2]), float(parts[3])
    text_only = len(parts) > 4 and parts[4] == "text"
    out = work_dir / ("shards-" + "-".join(parts[1:]))
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = []
    per_shard = 64
    for shard in range((num_samples + per_shard - 1) // per_shard):
        name = f"train-{shard:06d}.tar"
        names.append(name)
        with wds.TarWriter(str(out / name)) as tw:
            for i in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
                n = int(rng.uniform(a, b)) if kind == "uniform" else int(rng.lognormvariate(__import__("math").log(a), b))
                rec = {"key": f"syn{i:06d}", "prompt": "<|image_1|>\nDescribe the product." if not text_only
                       else "Describe the product.", "answer": " ".join(["item"] * max(1, n))}
                sample = {"__key__": f"syn{i:06d}", "json": rec}
                if not text_only:
                    img = Image.new("RGB", (rng.randint(64, 640), rng.randint(64, 640)),
                                    tuple(rng.randint(0, 255) for _ in range(3)))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG")
                    sample["jpg"] = buf.getvalue()
                tw.write(sample)
    (out / "manifest.json").write_text(json.dumps(
        {"splits": {"train": {"shards": names, "num_samples": num_samples}}, "synthetic": spec}))
    return out


# ------------------------------------------------------------------------------------------ run

def aggregate(records: list[dict], warmup: int) -> dict:
    """Aggregate per-step metrics records (``log_every=1``) after dropping ``warmup`` of them."""
    recs = records[warmup:] or records[-1:]
    if not recs:
        raise ValueError("no metrics records")
    dt = sum(r["step_time_s"] for r in recs)
    tok = sum(r["tokens"] for r in recs)
    slots = sum(r["token_slots"] for r in recs)
    world = recs[0]["tokens_per_s"] / max(recs[0]["tokens_per_s_per_device"], 1e-12)
    flops = sum(r["model_flops"] for r in recs)
    mfus = [r["mfu"] for r in recs]

    def mean(k):
        return sum(r.get(k) or 0.0 for r in recs) / len(recs)

    out = {
        "steps_measured": len(recs), "seconds": dt,
        "tokens_per_s": tok / dt, "tokens_per_s_per_device": tok / dt / world,
        "all_tokens_per_s": slots / dt, "all_tokens_per_s_per_device": slots / dt / world,
        "samples_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in recs) / dt,
        "images_per_s": sum(r["images_per_s"] * r["step_time_s"] for r in recs) / dt,
        "packing_efficiency": tok / slots, "image_token_share": mean("image_token_share"),
        "tflops_per_device": flops / dt / world / 1e12,
        "mfu": None if any(m is None for m in mfus) else sum(m * r["step_time_s"] for m, r in zip(mfus, recs)) / dt,
        "step_time_s": dt / len(recs),
        "data_wait_frac": sum(r["data_wait_s"] for r in recs) / dt,
        "straggler_ratio_max": max((r.get("straggler_ratio") or 1.0) for r in recs),
        "world_size": round(world),
    }
    for k in ("data_wait_s", "forward_s", "backward_s", "optimizer_s", "other_s"):
        out[k] = mean(k)
    for k in ("rss_peak_gib", "rss_peak_delta_gib", "gpu_mem_allocated_gib", "gpu_mem_reserved_gib"):
        if k in recs[-1]:
            out[k] = max(r[k] for r in records if k in r)
    return out


def run_point(point: BenchPoint, *, nproc: int, shards: Path, work_dir: Path, steps: int, warmup: int,
              timeout_s: int, extra_overrides: list[str], base_config: str = BASE_CONFIG, repeat: int = 0) -> dict:
    """Run one grid point as a torchrun of ``phi3v-train train`` and aggregate its metrics
    (``records``: the per-step records kept after the warm-up, for combining repeats)."""
    from .cli import cpu_torchrun_env, torchrun_cmd

    run_dir = work_dir / "runs" / (point.name if repeat == 0 else f"{point.name}-r{repeat}")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", f"data.shards={shards}", f"optim.max_steps={steps}", "logging.log_every=1",
                 "optim.warmup_steps=0", "checkpoint.save_every=0", "process_group_timeout_s=120",
                 # one sub-stream per loader worker: a fresh packer buffer fills its first packs better
                 # than its steady state, and a short run over 8 fresh sub-streams measures only that
                 f"data.num_streams={_num_workers([*point.extra, *extra_overrides])}",
                 *point.overrides(work_dir / "zero2.json"), *extra_overrides]
    cmd = torchrun_cmd(nproc, str(REPO_ROOT / base_config), overrides)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=cpu_torchrun_env(), capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = -9, f"timed out after {timeout_s} s: {(e.stdout or b'')[-2000:]!r}"
    result = {"point": asdict(point), "overrides": overrides, "wall_s": time.time() - t0, "returncode": rc}
    metrics_path = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics_path.exists():
        result["error"] = tail
        return result
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    result.update(aggregate(records, warmup))
    result["records"] = records[warmup:] or records[-1:]
    result["planned_gib"] = planned_gib(point, yaml.safe_load((REPO_ROOT / base_config).read_text()),
                                        work_dir / "zero2.json", result)
    return result


def combine_repeats(runs: list[dict]) -> dict:
    """One result per grid point from its repeats: the kept records of all repeats aggregated together
    (time-weighted), memory the max; the per-repeat tokens/s are kept in ``repeat_tokens_per_s``."""
    failed = [r for r in runs if "tokens_per_s" not in r]
    if failed:
        return failed[0]
    out = dict(runs[0])
    out.update(aggregate([rec for r in runs for rec in r["records"]], warmup=0))
    for k in ("rss_peak_gib", "rss_peak_delta_gib", "gpu_mem_allocated_gib", "gpu_mem_reserved_gib"):
        if k in runs[0]:
            out[k] = max(r[k] for r in runs)
    out["repeat_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    out["wall_s"] = sum(r["wall_s"] for r in runs)
    out.pop("records", None)
    return out


def planned_gib(point: BenchPoint, base: dict, zero2_path: Path, result: dict) -> float | None:
    """The memory planner's peak for this point (per rank; process RSS on CPU), for comparison."""
    from .config import resolve_path
    from .plan import PlanConfig, plan_memory

    ds = {"zero3": "configs/deepspeed/zero3.json", "zero2": str(zero2_path)}.get(point.zero, point.zero)
    try:
        pc = PlanConfig.from_deepspeed_json(
            resolve_path(ds), model=base["model"]["name"], num_nodes=1, gpus_per_node=result["world_size"],
            precision=base.get("deepspeed", {}).get("precision", "bf16"), seq_len=point.seq_len,
            micro_batch_size=point.micro_batch_size, gradient_checkpointing=point.gradient_checkpointing,
            loss_chunk_size=base["model"].get("loss_chunk_size", 4096), attn_implementation=point.attn_implementation,
            image_token_share=result["image_token_share"] * result["packing_efficiency"], cpu=True)
        return plan_memory(pc).total / 1024**3
    except Exception as e:  # noqa: BLE001 - the planner column is informative only
        print(f"[bench] planner failed for {point.name}: {e}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------- report

def environment() -> dict:
    """Hardware and versions for the report."""
    import deepspeed
    import torch
    import transformers

    from . import __version__

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "deepspeed": deepspeed.__version__, "phi3v_train": __version__, "platform": platform.platform(),
           "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if env["git_commit"] and dirty:
            env["git_commit"] += " (with uncommitted changes)"
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def packing_ratios(results: list[dict]) -> list[dict]:
    """Non-padding tokens/s of packed / padded at each seq len (same run, same other settings)."""
    ok = {r["point"]["name"]: r for r in results if "tokens_per_s" in r}
    out = []
    for r in ok.values():
        p = r["point"]
        if not p["packing"]:
            continue
        twin = next((q for q in ok.values() if not q["point"]["packing"] and
                     {**q["point"], "packing": True, "name": ""} == {**p, "name": ""}), None)
        if twin:
            out.append({"seq_len": p["seq_len"], "packed": p["name"], "padded": twin["point"]["name"],
                        "packed_tokens_per_s": r["tokens_per_s"], "padded_tokens_per_s": twin["tokens_per_s"],
                        "ratio": r["tokens_per_s"] / twin["tokens_per_s"],
                        "efficiency_ratio": r["packing_efficiency"] / twin["packing_efficiency"],
                        "slot_rate_ratio": r["all_tokens_per_s"] / twin["all_tokens_per_s"],
                        "packed_efficiency": r["packing_efficiency"], "padded_efficiency": twin["packing_efficiency"]})
    return sorted(out, key=lambda d: d["seq_len"])


def _layout_key(point: dict) -> dict:
    """A point's settings other than its name and row layout (padding, pad_to_multiple_of)."""
    extra = [x for x in point.get("extra", []) if not x.startswith("packing.pad_to_multiple_of=")]
    return {**point, "name": "", "padding": "", "extra": extra}


def layout_ratios(results: list[dict]) -> list[dict]:
    """Non-padding tokens/s with rows of the longest pack / rows of max_seq_len (same other settings)."""
    ok = [r for r in results if "tokens_per_s" in r]
    out = []
    for r in ok:
        p = r["point"]
        if p.get("padding") != "longest":
            continue
        twin = next((q for q in ok if _layout_key(q["point"]) == _layout_key(p)
                     and q["point"].get("padding", "max_length") == "max_length"), None)
        if twin:
            out.append({"seq_len": p["seq_len"], "longest": p["name"], "max_length": twin["point"]["name"],
                        "longest_tokens_per_s": r["tokens_per_s"], "max_length_tokens_per_s": twin["tokens_per_s"],
                        "ratio": r["tokens_per_s"] / twin["tokens_per_s"],
                        "longest_efficiency": r["packing_efficiency"], "max_length_efficiency": twin["packing_efficiency"]})
    return out


def _fmt(v, spec=".0f", none="n/a"):
    return none if v is None else format(v, spec)


def _packing_cell(p: dict) -> str:
    """"on"/"off", plus the row layout when rows are cut to the longest pack."""
    layout = " (rows: longest)" if p.get("padding") == "longest" else ""
    return ("on" if p["packing"] else "off") + layout


def report_table(results: list[dict], model: str, hardware: str, versions: str) -> str:
    head = ("| config | model | hardware | #dev | seq len | micro batch | accum | packing | attn | ckpt | ZeRO "
            "| tokens/s | tokens/s/dev | all tok/s | TFLOP/s/dev | MFU | peak mem GiB | planned GiB | packing eff "
            "| data wait % | versions |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p = r["point"]
        if "tokens_per_s" not in r:
            lines.append(f"| {p['name']} | {model} | {hardware} | - | {p['seq_len']} | {p['micro_batch_size']} | "
                         f"{p['gradient_accumulation_steps']} | {_packing_cell(p)} | "
                         f"{p['attn_implementation']} | {'on' if p['gradient_checkpointing'] else 'off'} | {p['zero']} | "
                         f"FAILED (rc {r['returncode']}) |||||||||")
            continue
        mem = r.get("gpu_mem_allocated_gib", r.get("rss_peak_delta_gib"))
        lines.append(
            f"| {p['name']} | {model} | {hardware} | {r['world_size']} | {p['seq_len']} | {p['micro_batch_size']} "
            f"| {p['gradient_accumulation_steps']} | {_packing_cell(p)} | {p['attn_implementation']} "
            f"| {'on' if p['gradient_checkpointing'] else 'off'} | {p['zero']} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s_per_device']:.0f} | {r['all_tokens_per_s']:.0f} | {r['tflops_per_device']:.4f} "
            f"| {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {_fmt(mem, '.2f')} "
            f"| {_fmt(r.get('planned_gib'), '.2f')} | {100 * r['packing_efficiency']:.1f}% "
            f"| {100 * r['data_wait_frac']:.1f} | {versions} |")
    return "\n".join(lines)


def write_plots(results: list[dict], out: Path) -> list[str]:
    """tokens_vs_seq_len.png, memory_vs_seq_len.png, step_breakdown.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "tokens_per_s" in r]
    files = []
    sweep = {}
    for r in ok:
        p = r["point"]
        if p["name"].startswith(("packed-", "padded-")) and p["name"].count("-") == 1:
            sweep.setdefault("packed" if p["packing"] else "padded", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, rs in sorted(sweep.items()):
        rs = sorted(rs, key=lambda r: r["point"]["seq_len"])
        L = [r["point"]["seq_len"] for r in rs]
        axes[0].plot(L, [r["tokens_per_s"] for r in rs], "o-", label=f"{label}: non-padding tokens/s")
        axes[0].plot(L, [r["all_tokens_per_s"] for r in rs], "x--", alpha=0.6, label=f"{label}: all token slots/s")
        axes[1].plot(L, [r.get("gpu_mem_allocated_gib", r.get("rss_peak_delta_gib", 0)) for r in rs], "o-",
                     label=f"{label}: measured peak")
        planned = [(r["point"]["seq_len"], r["planned_gib"]) for r in rs if r.get("planned_gib") is not None]
        if planned:
            axes[1].plot(*zip(*planned), "x--", label=f"{label}: planner")
    axes[0].set(xlabel="max_seq_len (tokens)", ylabel="tokens/s (all ranks)", title="Throughput vs sequence length",
                xscale="log")
    axes[1].set(xlabel="max_seq_len (tokens)", ylabel="GiB per rank (RSS delta on CPU)",
                title="Peak memory vs sequence length", xscale="log")
    ticks = sorted({r["point"]["seq_len"] for rs in sweep.values() for r in rs})
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(out / "tokens_memory_vs_seq_len.png", dpi=110)
    plt.close(fig)
    files.append("tokens_memory_vs_seq_len.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    names = [r["point"]["name"] for r in ok]
    bottom = [0.0] * len(ok)
    for k, color in (("data_wait_s", "#999999"), ("forward_s", "#4c72b0"), ("backward_s", "#dd8452"),
                     ("optimizer_s", "#55a868"), ("other_s", "#c44e52")):
        vals = [r[k] for r in ok]
        ax.bar(names, vals, bottom=bottom, color=color, label=k.removesuffix("_s").replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="seconds per optimizer step", title="Step breakdown per configuration")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "step_breakdown.png", dpi=110)
    plt.close(fig)
    files.append("step_breakdown.png")
    return files


def write_report(results: list[dict], out: Path, meta: dict) -> None:
    """results.json, report.md and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ratios = packing_ratios(results)
    env = meta["environment"]
    hardware = env["gpu"] or f"CPU ({env['cpu_count']} cores)"
    versions = f"torch {env['torch']}, transformers {env['transformers']}, deepspeed {env['deepspeed']}"
    (out / "results.json").write_text(json.dumps({**meta, "packing_vs_padding": ratios, "results": results}, indent=2))
    plots = write_plots(results, out)
    lines = [
        "# phi3v-train throughput benchmark",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"- Model: `{meta['model']}`; data: {meta['data']}; {meta['nproc']} rank(s); "
        f"{meta['steps']} optimizer steps per configuration, the first {meta['warmup']} dropped"
        + (f"; the grid run {meta['repeats']} times round-robin, repeats aggregated." if meta.get("repeats", 1) > 1 else "."),
        f"- Hardware: {env['cpu']} ({env['cpu_count']} cores), GPU: {env['gpu'] or 'none'}; platform {env['platform']}.",
        f"- Versions: Python {env['python']}, {versions}, phi3v_train {env['phi3v_train']}, "
        f"commit {env.get('git_commit') or 'n/a'}.",
        "- tokens/s: non-padding tokens over all ranks; all tok/s: token slots incl. padding. TFLOP/s: model FLOPs "
        "(flops.py: 6N + per-document attention, no causal discount, vision tower for the crops run). MFU: n/a on "
        "CPU unless `logging.peak_tflops` is set. Peak mem: on CPU the rank's peak RSS minus its RSS before the "
        "model was built (max over ranks); planned: `phi3v-train plan` for the same configuration (it counts "
        "tensors only: on CPU the measured delta also holds the tokenizer, the data pipeline and DeepSpeed/gloo "
        "buffers, ~0.3 GiB here; the planner alone is validated to +-15% by `phi3v-train plan --validate`).",
        "- CPU numbers on a shared 2-core machine are noisy; compare ratios within this run.",
        "",
        "## Packing vs padding (non-padding tokens/s, same run)",
        "",
        "ratio = packed / padded non-padding tokens/s = efficiency ratio (slots holding real tokens) x slot-rate "
        "ratio (token slots/s: the same compute per slot, so ideally 1.0; its spread is the run-to-run noise).",
        "",
        "| seq len | packed tok/s | padded tok/s | ratio | packed eff | padded eff | efficiency ratio | slot-rate ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in ratios:
        lines.append(f"| {d['seq_len']} | {d['packed_tokens_per_s']:.0f} | {d['padded_tokens_per_s']:.0f} | "
                     f"**{d['ratio']:.2f}x** | {100 * d['packed_efficiency']:.1f}% | {100 * d['padded_efficiency']:.1f}% "
                     f"| {d['efficiency_ratio']:.2f} | {d['slot_rate_ratio']:.2f} |")
    layouts = layout_ratios(results)
    if layouts:
        lines += ["", "## Rows of the longest pack vs rows of max_seq_len (packed, non-padding tokens/s, same run)", "",
                  "`packing.padding=longest` cuts each micro batch's rows to its longest pack (rounded up to "
                  "`packing.pad_to_multiple_of`, 8 in the default grid): the same packs, fewer padding slots "
                  "computed.", "",
                  "| seq len | longest tok/s | max_length tok/s | ratio | longest eff | max_length eff |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['seq_len']} | {d['longest_tokens_per_s']:.0f} | {d['max_length_tokens_per_s']:.0f} | "
                  f"**{d['ratio']:.2f}x** | {100 * d['longest_efficiency']:.1f}% | {100 * d['max_length_efficiency']:.1f}% |"
                  for d in layouts]
    lines += ["", "## All configurations", "", report_table(results, meta["model"], hardware, versions), "",
              "## Step breakdown (seconds per optimizer step, mean over ranks)", "",
              "| config | step | data wait | forward | backward | optimizer | other | straggler max/min |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "tokens_per_s" in r:
            lines.append(f"| {r['point']['name']} | {r['step_time_s']:.3f} | {r['data_wait_s']:.3f} | {r['forward_s']:.3f} "
                         f"| {r['backward_s']:.3f} | {r['optimizer_s']:.3f} | {r['other_s']:.3f} "
                         f"| {r['straggler_ratio_max']:.2f} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    failed = [r for r in results if "tokens_per_s" not in r]
    if failed:
        lines += ["", "## Failed points", ""] + [f"- {r['point']['name']}: rc {r['returncode']}\n\n```\n{r['error'][-1500:]}\n```"
                                                  for r in failed]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run_bench(*, out: Path, grid: list[BenchPoint], nproc: int = 2, steps: int = 6, warmup: int = 2,
              data: str = "luma", work_dir: Path | None = None, timeout_s: int = 300,
              overrides: list[str] = (), command: str = "phi3v-train bench train", warmup_run: bool = True,
              repeats: int = 1) -> dict:
    """Run the grid and write the report into ``out``; returns the results.json content."""
    work_dir = Path(work_dir or REPO_ROOT / "runs/bench")
    work_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    zero2 = work_dir / "zero2.json"
    zero2.write_text(json.dumps(ZERO2_JSON, indent=2))
    shards = luma_shards(work_dir) if data == "luma" else synthetic_shards(work_dir, data)
    base = yaml.safe_load((REPO_ROOT / BASE_CONFIG).read_text())
    if warmup_run and grid:  # a throwaway run first: cold page cache and first imports would slow point 1
        print(f"[bench] warm-up run ({grid[0].name}, 2 steps, not reported) ...", flush=True)
        run_point(replace(grid[0], name="warmup"), nproc=nproc, shards=shards, work_dir=work_dir, steps=2, warmup=1,
                  timeout_s=timeout_s, extra_overrides=list(overrides))
    runs: list[list[dict]] = [[] for _ in grid]
    for rep in range(repeats):  # round-robin: a load change on a shared machine hits every point alike
        for i, point in enumerate(grid):
            print(f"[bench] {i + 1}/{len(grid)} {point.name}" + (f" (repeat {rep + 1}/{repeats})" if repeats > 1 else "")
                  + " ...", flush=True)
            r = run_point(point, nproc=nproc, shards=shards, work_dir=work_dir, steps=steps, warmup=warmup,
                          timeout_s=timeout_s, extra_overrides=list(overrides), repeat=rep)
            runs[i].append(r)
            if "tokens_per_s" in r:
                print(f"[bench]   {r['tokens_per_s']:.0f} tok/s ({r['all_tokens_per_s']:.0f} slots/s), packing "
                      f"{100 * r['packing_efficiency']:.1f}%, step {r['step_time_s']:.3f}s, wall {r['wall_s']:.0f}s",
                      flush=True)
            else:
                print(f"[bench]   FAILED rc={r['returncode']}:\n{r['error'][-1500:]}", flush=True)
    results = [combine_repeats(rs) for rs in runs]
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": base["model"]["name"],
            "data": "bundled Luma shards (real photos)" if data == "luma" else data, "nproc": nproc, "steps": steps,
            "warmup": warmup, "repeats": repeats, "base_config": BASE_CONFIG, "base_config_content": base, "zero2_json": ZERO2_JSON,
            "extra_overrides": list(overrides), "grid": [asdict(p) for p in grid], "environment": environment()}
    (out / "grid.yaml").write_text(yaml.safe_dump([asdict(p) for p in grid], sort_keys=False))
    write_report(results, out, meta)
    return {**meta, "results": results, "packing_vs_padding": packing_ratios(results)}


# ------------------------------------------------------------------------------------------ CLI

def _add_train_args(p) -> None:
    p.add_argument("--out", default="runs/bench/report", help="report directory (results.json, report.md, PNGs)")
    p.add_argument("--grid", default="default", help="default (10 points, ~5 min on 2 CPU cores) | quick (2 points) "
                                                     "| a YAML list of BenchPoint mappings")
    p.add_argument("--nproc", type=int, default=2, help="ranks per grid point (torchrun --nproc_per_node)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per grid point")
    p.add_argument("--warmup", type=int, default=2, help="leading steps dropped from the averages")
    p.add_argument("--data", default="luma", help="luma (bundled photos) | synthetic:uniform:LO:HI | "
                                                  "synthetic:lognormal:MEDIAN:SIGMA[:text] (answer tokens)")
    p.add_argument("--work-dir", default="runs/bench", help="where shards and the per-point run directories go")
    p.add_argument("--timeout", type=int, default=300, help="seconds before a grid point is killed")
    p.add_argument("--no-warmup-run", action="store_true", help="skip the unreported warm-up run before the grid")
    p.add_argument("--repeats", type=int, default=1, help="run the whole grid this many times (round-robin) and "
                                                          "aggregate: evens out load changes on a shared machine")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training override applied to every point, repeatable (e.g. --set logging.peak_tflops=0.1)")


def cmd_bench_train(args) -> int:
    cmd = "phi3v-train " + " ".join(sys.argv[1:]) if "bench" in sys.argv[1:2] else "phi3v-train bench train"
    res = run_bench(out=Path(args.out), grid=load_grid(args.grid), nproc=args.nproc, steps=args.steps,
                    warmup=args.warmup, data=args.data, work_dir=Path(args.work_dir), timeout_s=args.timeout,
                    overrides=args.overrides, command=cmd.strip(), warmup_run=not args.no_warmup_run,
                    repeats=args.repeats)
    print(f"\n[bench] report: {Path(args.out) / 'report.md'}")
    for d in res["packing_vs_padding"]:
        print(f"[bench] seq len {d['seq_len']}: packed / padded non-padding tokens/s = {d['ratio']:.2f}x")
    failed = [r["point"]["name"] for r in res["results"] if "tokens_per_s" not in r]
    if failed:
        print(f"[bench] failed points: {failed}", file=sys.stderr)
        return 1
    return 0


def add_bench_parser(sub):
    """Register ``bench`` (alone = ``bench train``) and ``bench train``; returns the ``bench``
    sub-parsers so other benchmarks (``bench data``, ``bench memory``) can add theirs."""
    b = sub.add_parser("bench", help="throughput benchmarks; `bench train` (the default): a grid of short training "
                                     "runs -> report.md, results.json, plots")
    _add_train_args(b)
    b.set_defaults(fn=cmd_bench_train)
    bsub = b.add_subparsers(dest="bench_command", required=False)
    t = bsub.add_parser("train", help="grid of short training runs (seq len, micro batch, packing, attention, "
                                      "checkpointing, ZeRO) -> report directory")
    _add_train_args(t)
    t.set_defaults(fn=cmd_bench_train)
    return bsub
