"""The training loop: DeepSpeed ZeRO-3, packed micro-batches, a token-weighted loss over the global batch.

Run it on every rank (``torchrun --nproc_per_node N -m phi3v_train.cli train ...`` or srun);
rank/world come from :func:`phi3v_train.dist.get_dist_env`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from . import dist
from .config import TrainConfig, build_deepspeed_config, lr_at, save_config, resolve_path
from .data.stream import build_train_loader
from .model.config import load_model_config
from .model.modeling import Phi3VForCausalLM
from .model.processor import Phi3VProcessor

log = logging.getLogger("phi3v_train")
# DeepSpeed 0.19 calls the torch 2.13-deprecated collective names on every ZeRO-3 gather/scatter.
warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Log INFO to stdout on rank 0 and to ``<run_dir>/logs/rank{rank}.log`` on every rank."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S")
    handlers = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def resolve_shards(spec: str, split: str) -> list[str]:
    """Shard URLs for ``split``: from ``<spec>/manifest.json`` when spec is a directory, else
    the spec itself (a glob, brace pattern or pipe: URL) as one pattern.

    Raises:
        FileNotFoundError: spec is a directory without manifest.json, or the split has no shards.
    """
    path = Path(spec)
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{path} has no manifest.json: run `phi3v-train shards` first or pass a shard pattern")
        shards = json.loads(manifest.read_text())["splits"].get(split, {}).get("shards", [])
        if not shards:
            raise FileNotFoundError(f"{manifest} lists no {split!r} shards")
        return [str(path / s) for s in shards]
    return [spec]


def make_process_fn(processor: Phi3VProcessor):
    """record (shard JSON) + PIL image (or None) -> sample dict, per docs/architecture.md.

    A record without an image becomes a text-only sample (its ``<|image_1|>`` tag removed).
    """
    def process(record: dict, image) -> dict:
        prompt = record["prompt"]
        images = [image] if image is not None else []
        if image is None:
            prompt = prompt.replace("<|image_1|>", "")
        text = processor.render_prompt([{"role": "user", "content": prompt}], add_generation_prompt=True)
        sample = processor.encode(text, images, record["answer"])
        sample["key"] = record.get("key", "")
        return sample
    return process


def build_model(cfg: TrainConfig, ds_config: dict) -> tuple[Phi3VForCausalLM, object]:
    """Build (or load) the model so that ZeRO-3 partitions it at construction.

    Returns the model and the ``HfDeepSpeedConfig`` that must stay alive while it is used
    (transformers reads ZeRO-3 state through it).
    """
    from transformers.integrations import HfDeepSpeedConfig

    dschf = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    if cfg.model.pretrained:
        model = Phi3VForCausalLM.from_pretrained(cfg.model.pretrained, dtype=dtype,
                                                 attn_implementation=cfg.model.attn_implementation)
    else:
        mcfg = load_model_config(cfg.model.name)
        model = Phi3VForCausalLM._from_config(mcfg, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    model.loss_chunk_size = cfg.model.loss_chunk_size
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, dschf


@dataclass
class StepStats:
    """What one optimizer step did on this rank (host-side numbers, no device syncs)."""
    num_tokens: int = 0
    num_label_tokens: int = 0
    num_samples: int = 0
    num_images: int = 0
    token_slots: int = 0
    data_s: float = 0.0
    losses: list = field(default_factory=list)


def train(cfg: TrainConfig) -> dict:
    """Run training to ``cfg.optim.max_steps``; returns a summary dict (rank 0's view)."""
    import deepspeed

    denv = dist.get_dist_env()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, denv.rank)
    ds_config = build_deepspeed_config(cfg, denv.world_size)
    shards = resolve_shards(cfg.data.shards, "train")
    if cfg.data.split_shards_by_rank:
        if len(shards) < denv.world_size:
            raise ValueError(f"data.split_shards_by_rank needs >= {denv.world_size} shards, got {len(shards)}")
        shards = shards[denv.rank::denv.world_size]

    backend = dist.init_distributed(denv, cfg.process_group_timeout_s)
    if denv.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    log.info("world_size=%d backend=%s run_dir=%s", denv.world_size, backend, run_dir)

    torch.manual_seed(cfg.seed)
    model, _dschf = build_model(cfg, ds_config)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    # ZeRO-3 partitions at construction: each rank holds only its shard (numel() == 0 here).
    local_numel = sum(p.numel() for p in model.parameters())
    partition_numel = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    o = cfg.optim
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o)))
    log.info("model %s: %d parameters (ZeRO stage %d, %d materialised on this rank)", cfg.model.name, num_params,
             engine.zero_optimization_stage(), local_numel)

    ckpt_dir = run_dir / "checkpoints"
    start_step = 0
    if cfg.checkpoint.resume and (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start_step = int(client["step"])
        log.info("resumed from %s at step %d", ckpt_dir, start_step)

    mcfg = model.config
    num_crops = cfg.data.num_crops or mcfg.num_crops
    processor = Phi3VProcessor.from_pretrained(num_crops=num_crops, crop_size=mcfg.crop_size, patch_size=mcfg.patch_size)
    loader = build_train_loader(
        shards, make_process_fn(processor), max_seq_len=cfg.packing.max_seq_len,
        micro_batch_size=o.micro_batch_size, rank=denv.rank, world_size=denv.world_size,
        num_workers=cfg.data.num_workers, seed=cfg.seed + 1000 * start_step, buffer_size=cfg.packing.buffer_size,
        crop_size=mcfg.crop_size)
    batches = iter(loader)
    device = dist.device()
    metrics_file = open(run_dir / "metrics.jsonl", "a") if denv.is_main else None
    history = []
    t_last = time.perf_counter()
    interval = [0.0] * 5  # label tokens, tokens, token slots, samples, images since the last log
    interval_data_s = 0.0
    last_logged = start_step
    for step in range(start_step, o.max_steps):
        stats = StepStats()
        micro = []
        for _ in range(o.gradient_accumulation_steps):
            t0 = time.perf_counter()
            b = next(batches)
            stats.data_s += time.perf_counter() - t0
            micro.append(b)
            stats.num_tokens += b["num_tokens"]
            stats.num_label_tokens += b["num_label_tokens"]
            stats.num_samples += b["num_samples"]
            stats.num_images += int(b["image_sizes"].shape[0])
            stats.token_slots += b["input_ids"].numel()
        # Token counts of the whole global batch (one small all-reduce per step): the loss is
        # sum(CE) / (label tokens over all ranks and micro-steps), i.e. a global token mean.
        counts = torch.tensor([stats.num_label_tokens, stats.num_tokens, stats.token_slots,
                               stats.num_samples, stats.num_images], dtype=torch.float64, device=device)
        torch_dist.all_reduce(counts)
        counts = counts.tolist()  # device-to-host sync: the loss normaliser is needed before forward
        n_label = max(counts[0], 1.0)
        for i, c in enumerate(counts):
            interval[i] += c
        interval_data_s += stats.data_s
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            out = engine(**inputs, num_items_in_batch=n_label)
            # DeepSpeed averages gradients over ranks; undo it so grads are of the global token mean.
            engine.backward(out.loss * denv.world_size, scale_wrt_gas=False)
            engine.step()
            loss_sum += out.loss.detach().float()
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == o.max_steps:
            torch_dist.all_reduce(loss_sum)  # device sync: only at the logging interval
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            n_steps = step + 1 - last_logged
            last_logged = step + 1
            rec = {
                "step": step + 1, "loss": loss_sum.item(), "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": interval[1] / dt,
                "tokens_per_s_per_device": interval[1] / dt / denv.world_size,
                "packing_efficiency": interval[1] / interval[2],
                "samples": int(interval[3]), "images": int(interval[4]), "label_tokens": int(interval[0]),
                "step_time_s": dt / n_steps, "data_wait_s": interval_data_s / n_steps,
            }
            interval = [0.0] * 5
            interval_data_s = 0.0
            history.append(rec)
            log.info("step %d/%d loss %.4f lr %.2e gnorm %.3f tok/s %.0f packing %.1f%%", rec["step"], o.max_steps,
                     rec["loss"], rec["lr"], rec["grad_norm"], rec["tokens_per_s"], 100 * rec["packing_efficiency"])
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
        if cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0 and step + 1 < o.max_steps:
            save_checkpoint(engine, ckpt_dir, step + 1, cfg)
    save_checkpoint(engine, ckpt_dir, o.max_steps, cfg)
    summary = {
        "run_dir": str(run_dir), "world_size": denv.world_size, "num_params": num_params,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in history[1:]) / max(1, len(history) - 1)) if history else None,
        "packing_efficiency": (sum(h["packing_efficiency"] for h in history) / len(history)) if history else None,
        "steps": o.max_steps, "checkpoint": str(ckpt_dir), "zero_stage": engine.zero_optimization_stage(),
        "local_param_numel_at_init": local_numel, "partition_numel_rank0": partition_numel,
    }
    if denv.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
    torch_dist.barrier()
    return summary


def save_checkpoint(engine, ckpt_dir: Path, step: int, cfg: TrainConfig) -> None:
    """ZeRO-3 checkpoint (every rank writes its partitions) tagged ``step_{step:07d}``."""
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    log.info("saved checkpoint %s", ckpt_dir / tag)
