"""The training loop: DeepSpeed ZeRO-3, packed micro-batches, a token-weighted loss over the global batch.

Run it on every rank (``torchrun --nproc_per_node N -m phi3v_train.cli train ...`` or srun);
rank/world come from :func:`phi3v_train.dist.get_dist_env`.

Faults (the exit codes are the ``train`` CLI's):

- SIGUSR1 / SIGUSR2 / SIGTERM on any rank: all ranks agree at the next step boundary (a flag in
  the per-step all-reduce), save a checkpoint and stop; ``train()`` returns ``preempted: True``,
  exit code 3 (:data:`PREEMPTED_EXIT_CODE`); under SLURM rank 0 first runs ``scontrol requeue``.
  Relaunching resumes from the checkpoint with no step lost or repeated.
- The file ``<run_dir>/SAVE_NOW``: a checkpoint at the next step boundary, then training goes on.
- A rank that dies or hangs: the others' next collective fails (or times out after
  ``process_group_timeout_s``); they exit with code 4 and a message naming the silent rank.
- A NaN/inf loss or gradient norm: the step is skipped on every rank and counted; after
  ``optim.max_nonfinite_steps_in_row`` in a row the run stops with code 5.
- Bad configuration: found before any process group starts (``config.validate_for_launch``), code 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as torch_dist

from . import dist, metrics, profiling
from . import checkpoint
from .config import TrainConfig, lr_at, save_config, validate_for_launch
from .data.stream import build_train_loader
from .model.config import load_model_config
from .model.modeling import Phi3VForCausalLM, apply_freezing
from .model.processor import Phi3VProcessor, num_image_tokens

log = logging.getLogger("phi3v_train")
PREEMPTED_EXIT_CODE = 3  # checkpoint saved after SIGUSR1/SIGUSR2/SIGTERM: requeue and relaunch
PEER_LOST_EXIT_CODE = 4  # another rank died or hung: relaunch resumes from the last checkpoint
NONFINITE_EXIT_CODE = 5  # too many non-finite steps in a row: needs a look, not a requeue
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
    """record (shard JSON) + PIL image (or None) -> sample dict, per docs/architecture.md; its
    ``num_tokens(record, image_size)`` lets the stream pack records before decoding pixels.

    A record without an image becomes a text-only sample (its ``<|image_1|>`` tag removed).
    """
    from .data.process import RecordProcessor

    return RecordProcessor(processor)


def build_loader(cfg: TrainConfig, mcfg, shards: list[str], *, rank: int, world_size: int, start_batch: int = 0):
    """This rank's endless stream of packed micro batches as the config sets it (data, packing,
    optim.micro_batch_size, seed): :func:`phi3v_train.data.stream.build_train_loader` with the
    model config's crop and patch size, pixel_values in ``data.pixel_dtype``.

    Args:
        cfg: the run config.
        mcfg: the model config (``crop_size``, ``patch_size``, ``num_crops``).
        shards: resolved shard URLs.
        rank, world_size: global rank and number of ranks.
        start_batch: micro batches this rank already consumed (resume: ``step * grad_accum``).
    """
    num_crops = cfg.data.num_crops or mcfg.num_crops
    pixel_dtype = cfg.data.pixel_dtype
    if pixel_dtype == "auto":
        pixel_dtype = "bfloat16" if cfg.deepspeed.precision == "bf16" else "float32"
    processor = Phi3VProcessor.from_pretrained(num_crops=num_crops, crop_size=mcfg.crop_size, patch_size=mcfg.patch_size,
                                               pixel_dtype=getattr(torch, pixel_dtype))
    p = cfg.packing
    return build_train_loader(
        shards, make_process_fn(processor), max_seq_len=p.max_seq_len, micro_batch_size=cfg.optim.micro_batch_size,
        rank=rank, world_size=world_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
        buffer_size=p.buffer_size, crop_size=mcfg.crop_size, pack=p.enabled, shuffle_buffer=cfg.data.shuffle_buffer,
        overlong=p.overlong, packing_strategy=p.strategy, padding=p.padding, pad_to_multiple_of=p.pad_to_multiple_of,
        max_images_per_pack=p.max_images_per_pack, pad_images_to=p.pad_images_to, num_streams=cfg.data.num_streams,
        pad_image_tokens=num_image_tokens(mcfg.crop_size, mcfg.crop_size, mcfg.crop_size, mcfg.patch_size),
        start_batch=start_batch)


def data_order(cfg: TrainConfig, shards: list[str]) -> dict:
    """The settings that decide which samples land in which micro batch (saved in checkpoints):
    a resume yields exactly the uninterrupted run's batches only when they are unchanged.
    ``shards``: the whole training shard list (before ``data.split_shards_by_rank``)."""
    p = cfg.packing
    return {"seed": cfg.seed, "data.num_streams": cfg.data.num_streams, "data.shuffle_buffer": cfg.data.shuffle_buffer,
            "data.num_crops": cfg.data.num_crops, "optim.micro_batch_size": cfg.optim.micro_batch_size,
            "packing.max_seq_len": p.max_seq_len, "packing.buffer_size": p.buffer_size,
            "packing.enabled": p.enabled, "packing.strategy": p.strategy, "packing.overlong": p.overlong,
            "packing.max_images_per_pack": p.max_images_per_pack, "packing.pad_images_to": p.pad_images_to,
            "data.split_shards_by_rank": cfg.data.split_shards_by_rank,
            "shards": len(shards),  # by name: the same shards moved to another folder read the same
            "shards_hash": hashlib.sha256("\n".join(u.rsplit("/", 1)[-1] for u in shards).encode()).hexdigest()[:16]}


def data_order_changes(saved: dict | None, current: dict) -> list[str]:
    """``"key: old -> new"`` for every data-order setting that differs (none for old checkpoints)."""
    if not saved:
        return []
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if k in saved and saved[k] != v]


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
    model.loss_impl = cfg.model.loss_impl
    apply_freezing(model, freeze_vision=cfg.model.freeze_vision, freeze_projector=cfg.model.freeze_projector,
                   freeze_lm=cfg.model.freeze_lm)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: LM and CLIP layers
    return model, dschf


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm."""


class StopRequests:
    """Turns SIGUSR1/SIGUSR2/SIGTERM (what SLURM sends before preemption or the time limit) and
    the file ``<run_dir>/SAVE_NOW`` into flags that the loop all-reduces at each step boundary, so
    every rank stops (or saves) at the same step. A context manager: restores the old handlers.
    The handler only records the signal; nothing else is safe inside it.
    """

    SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")

    def __init__(self, run_dir: Path, is_main: bool):
        self.signal: str | None = None
        self.save_file = run_dir / "SAVE_NOW"
        self.is_main = is_main
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)

    def local_flags(self) -> list[float]:
        """[stop, save] as seen by this rank (rank 0 alone looks for SAVE_NOW: one stat per step)."""
        return [float(self.signal is not None), float(self.is_main and self.save_file.exists())]


def train_step(engine, micro: list[dict], n_label: float, world_size: int, device: torch.device,
               meter=None, poison: bool = False) -> tuple[torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches.

    Each micro-step's loss is its summed token cross-entropy divided by ``n_label``, the label
    tokens of the whole global batch (all ranks and micro-steps), so the accumulated gradient is
    that of the global token mean. DeepSpeed averages gradients over ranks (backward of
    ``loss * world_size`` undoes it) and would divide by the accumulation steps
    (``scale_wrt_gas=False`` stops it).

    A NaN/inf gradient norm (from a non-finite loss on any rank, or an overflow) makes DeepSpeed
    skip the update on every rank alike, since the norm is global: no parameter, optimizer state
    or LR-schedule change (DeepSpeed >= 0.19 checks the norm in every precision).

    Args:
        engine: the DeepSpeed engine.
        micro: the micro-batches (collate output), gradient_accumulation_steps of them.
        n_label: label tokens in the global batch (>= 1).
        world_size: data-parallel size.
        device: where the batches go.
        meter: optional ``metrics.ThroughputMeter`` timing the forward/backward/optimizer phases.
        poison: make the loss NaN (fault injection for tests).

    Returns:
        (this rank's share of the global mean loss as a 0-dim device tensor: all-reduce it for
        the loss; whether the update was applied).
    """
    phase = meter.phase if meter is not None else (lambda name: contextlib.nullcontext())
    loss_sum = torch.zeros((), device=device)
    for b in micro:
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        with phase("forward"):
            out = engine(**inputs, num_items_in_batch=n_label)
        loss = out.loss * float("nan") if poison else out.loss
        with phase("backward"):
            engine.backward(loss * world_size, scale_wrt_gas=False)
        with phase("optimizer"):
            engine.step()
        loss_sum += loss.detach().float()
    return loss_sum, engine.was_step_applied()  # the norm check inside step() already synced the device


def configure_wandb_env(cfg: TrainConfig, run_dir: Path) -> None:
    """Set WANDB_MODE (and a run id kept in the run directory, so a resumed run continues the same
    W&B run) before ``wandb.init``: offline unless WANDB_API_KEY is set (or WANDB_MODE asks) and
    ``logging.wandb_mode`` is not offline. Only the mode and id are set; no secret is written."""
    mode = cfg.logging.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    os.environ.setdefault("WANDB_RUN_ID", id_file.read_text().strip())
    os.environ.setdefault("WANDB_RESUME", "allow")


def _inject_signal(cfg: TrainConfig, step: int, rank: int) -> None:
    """Test hook: ``debug.signal`` to this process at ``debug.signal_step`` on ``debug.signal_rank``."""
    if cfg.debug.signal_step == step and cfg.debug.signal_rank == rank:
        os.kill(os.getpid(), getattr(signal, cfg.debug.signal))


def _kill_in_save(cfg: TrainConfig, step: int, rank: int):
    """Test hook for :func:`checkpoint.save`: SIGKILL rank 0 before the commit at ``debug.kill_in_save_step``."""
    if cfg.debug.kill_in_save_step == step and rank == 0:
        return lambda: os.kill(os.getpid(), signal.SIGKILL)
    return None


def train(cfg: TrainConfig) -> dict:
    """Run training to ``cfg.optim.max_steps``, or until a stop request (module docstring).

    Returns:
        A summary dict (rank 0's view), with ``preempted`` True when a signal stopped the run
        after its checkpoint.

    Raises:
        ConfigError: invalid configuration, before any process group starts.
        dist.PeerLostError: another rank died or hung; the message names it.
        NonFiniteLossError: ``optim.max_nonfinite_steps_in_row`` non-finite steps in a row.
    """
    denv = dist.get_dist_env()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, denv.rank)
    ds_config = validate_for_launch(cfg, denv.world_size)  # all that can fail, before the process group
    shards = resolve_shards(cfg.data.shards, "train")
    order = data_order(cfg, shards)  # the whole shard list, before any split
    if cfg.data.split_shards_by_rank:
        shards = shards[denv.rank::denv.world_size]

    backend = dist.init_distributed(denv, cfg.process_group_timeout_s)
    monitor = dist.PeerMonitor(denv)
    log.info("launch environment (secrets masked): %s", dist.scrub_env(dict(os.environ)))
    with StopRequests(run_dir, denv.is_main) as stop:
        try:
            return _run(cfg, denv, run_dir, ds_config, shards, order, backend, stop)
        except NonFiniteLossError as e:
            log.error("%s", e)
            raise
        except Exception as e:
            if dist.is_comm_failure(e):
                msg = monitor.describe_failure(e)
                log.error("%s", msg)
                raise dist.PeerLostError(msg) from e
            log.exception("rank %d failed", denv.rank)
            raise


def _run(cfg: TrainConfig, denv: dist.DistEnv, run_dir: Path, ds_config: dict, shards: list[str], order: dict,
         backend: str, stop: StopRequests) -> dict:
    """:func:`train` once the process group is up: build, resume, loop, save. ``shards``: this
    rank's; ``order``: :func:`data_order` of the whole list (saved in checkpoints)."""
    import deepspeed

    if denv.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    log.info("world_size=%d backend=%s run_dir=%s", denv.world_size, backend, run_dir)

    torch.manual_seed(cfg.seed)
    rss_before_model = metrics.current_rss_bytes()
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
    start_step, num_skipped, start_batch = 0, 0, 0
    resume_tag = [None]
    if denv.is_main and cfg.checkpoint.resume:
        checkpoint.remove_partial(ckpt_dir)
        resume_tag = [checkpoint.find_resume_tag(ckpt_dir)]
    torch_dist.broadcast_object_list(resume_tag, src=0)  # every rank loads the tag rank 0 chose
    if resume_tag[0] is not None:
        state = checkpoint.load(engine, ckpt_dir, resume_tag[0], rank=denv.rank, world_size=denv.world_size)
        start_step, num_skipped = int(state["step"]), int(state.get("num_skipped_steps", 0))
        # micro batches consumed so far: right even if gradient accumulation changes on resume
        start_batch = int(state.get("micro_batches_per_rank", start_step * o.gradient_accumulation_steps))
        log.info("resumed from %s at step %d (micro batch %d)", ckpt_dir / resume_tag[0], start_step, start_batch)
        if "data_order" not in state:
            log.warning("the checkpoint does not record its data-order settings (older phi3v-train): the batches "
                        "from step %d on may differ from those the uninterrupted run would have seen", start_step)
        elif changed := data_order_changes(state["data_order"], order):
            log.warning("resuming with another data order than the checkpointed run (%s): the batches from "
                        "step %d on are valid but not those the uninterrupted run would have seen",
                        "; ".join(changed), start_step)
    if denv.is_main and checkpoint.truncate_metrics(run_dir / "metrics.jsonl", start_step):
        log.info("dropped metrics records after step %d (logged after the last checkpoint)", start_step)

    mcfg = model.config
    loader = build_loader(cfg, mcfg, shards, rank=denv.rank, world_size=denv.world_size,
                          start_batch=start_batch)  # exact resume: replays lengths only
    batches = iter(loader)
    device = dist.device()
    meter = metrics.ThroughputMeter(
        metrics.FlopModel.from_config(mcfg), device=device, image_token_id=mcfg.image_token_id,
        peak_flops=metrics.resolve_peak_flops(cfg.logging.peak_tflops), rss_baseline=rss_before_model)
    profiler = profiling.StepProfiler(cfg.profiling, run_dir, denv.rank)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if denv.is_main else None
    if denv.is_main and cfg.logging.wandb:
        configure_wandb_env(cfg, run_dir)
    wandb_run = metrics.init_wandb(cfg, run_dir, denv.is_main)
    history = []
    t_last = time.perf_counter()
    last_logged = start_step
    last_saved = start_step if resume_tag[0] is not None else None
    nonfinite_in_row, preempted, t_first = 0, False, None

    def save(at_step: int) -> None:
        nonlocal last_saved
        if at_step == last_saved:
            return
        checkpoint.save(engine, ckpt_dir, at_step, rank=denv.rank, world_size=denv.world_size,
                        keep_last=cfg.checkpoint.keep_last, config_path=run_dir / "config.yaml",
                        client_state={"step": at_step, "num_skipped_steps": num_skipped, "data_order": order,
                                      "micro_batches_per_rank":
                                          start_batch + (at_step - start_step) * o.gradient_accumulation_steps},
                        before_commit=_kill_in_save(cfg, at_step, denv.rank))
        last_saved = at_step

    for step in range(start_step, o.max_steps):
        micro = []
        for _ in range(o.gradient_accumulation_steps):
            t0 = time.perf_counter()
            b = next(batches)
            meter.add_batch(b, data_s=time.perf_counter() - t0)  # host-side: CPU batch, no device sync
            micro.append(b)
        # Label tokens of the whole global batch and the stop/save requests (one small all-reduce
        # per step): the loss is sum(CE) / (label tokens over all ranks and micro-steps), a global
        # token mean; a signal on any rank stops every rank at this same step boundary.
        counts = torch.tensor([sum(b["num_label_tokens"] for b in micro), *stop.local_flags()],
                              dtype=torch.float64, device=device)
        torch_dist.all_reduce(counts)
        n_label, stop_now, save_now = counts.tolist()  # device-to-host sync: the normaliser is needed before forward
        if stop_now or save_now:  # this step's batches are unused: a resume reads them again
            log.warning("%s: checkpoint at step %d%s", f"received {stop.signal}" if stop.signal else "stop/save request",
                        step, ", then stop" if stop_now else " (SAVE_NOW)")
            save(step)
            if denv.is_main:
                stop.save_file.unlink(missing_ok=True)
            if stop_now:
                preempted = True
                break
        n_label = max(n_label, 1.0)
        poison = step + 1 in cfg.debug.nan_loss_steps and denv.rank == denv.world_size - 1
        loss_sum, applied = train_step(engine, micro, n_label, denv.world_size, device, meter, poison=poison)
        nonfinite_in_row = 0 if applied else nonfinite_in_row + 1
        if not applied:
            num_skipped += 1
            log.warning("step %d: non-finite loss or gradient norm: update skipped (%d in a row, %d in all)",
                        step + 1, nonfinite_in_row, num_skipped)
            if nonfinite_in_row >= o.max_nonfinite_steps_in_row:
                raise NonFiniteLossError(
                    f"{nonfinite_in_row} optimizer steps in a row (up to step {step + 1}) had a NaN/inf loss or "
                    "gradient norm: lower optim.lr, check the data of these steps, or use deepspeed.precision=fp32 "
                    "to rule out overflow; resume from the last checkpoint")
        _inject_signal(cfg, step + 1, denv.rank)
        t_first = t_first or (time.perf_counter(), step + 1)  # ETA from the steps after the first (warm-up)
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == o.max_steps or step == start_step:
            torch_dist.all_reduce(loss_sum)  # device sync: only at the logging interval
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            n_steps = step + 1 - last_logged
            last_logged = step + 1
            loss, grad_norm = loss_sum.item(), float(engine.get_global_grad_norm() or 0.0)
            done = step + 1 - t_first[1]
            eta_s = (now - t_first[0]) / done * (o.max_steps - step - 1) if done else None
            rec = {
                "step": step + 1, "loss": loss if math.isfinite(loss) else None, "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "skipped_steps": num_skipped,
                "eta_s": eta_s,
            }
            rec.update(meter.flush(dt, n_steps))  # collective: counts, tokens/s, MFU, step breakdown, memory
            history.append(rec)
            log.info("step %d/%d loss %.4f lr %.2e gnorm %.3f tok/s %.0f packing %.1f%% eta %s", rec["step"], o.max_steps,
                     loss, rec["lr"], grad_norm, rec["tokens_per_s"], 100 * rec["packing_efficiency"], _hms(eta_s))
            log.info("  %s", metrics.format_log_line(rec))
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if wandb_run:
                wandb_run.log(rec, step=rec["step"])
        if cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0:
            save(step + 1)
        profiler.step()
    profiler.stop()
    if not preempted:
        save(o.max_steps)
    summary = {
        "preempted": preempted, "resumed_from_step": start_step if resume_tag[0] is not None else None,
        "last_step": last_saved, "skipped_steps": num_skipped,
        "run_dir": str(run_dir), "world_size": denv.world_size, "num_params": num_params,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in history[1:]) / max(1, len(history) - 1)) if history else None,
        "packing_efficiency": (sum(h["packing_efficiency"] for h in history) / len(history)) if history else None,
        "pack_fill": (sum(h["pack_fill"] for h in history) / len(history)) if history else None,
        "max_seq_len": cfg.packing.max_seq_len,
        "steps": o.max_steps, "checkpoint": str(ckpt_dir), "zero_stage": engine.zero_optimization_stage(),
        "local_param_numel_at_init": local_numel, "partition_numel_rank0": partition_numel,
    }
    if denv.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
        if wandb_run:
            wandb_run.finish()
        if preempted and cfg.requeue_on_preemption:
            # SIGTERM: SLURM ends the job itself (scancel, time limit, its own requeue/preemption);
            # `scontrol requeue` would bring a cancelled job back. USR1/USR2 (--signal) ask for it.
            log.info("%s", dist.requeue_slurm_job() if stop.signal != "SIGTERM" else
                     "not requeued: SIGTERM means SLURM is ending or requeueing the job itself")
    torch_dist.barrier()
    if preempted:
        log.warning("stopped at step %d after a preemption signal; relaunch to resume (exit code %d)",
                    last_saved, PREEMPTED_EXIT_CODE)
    return summary


def _hms(seconds: float | None) -> str:
    """12:34:56 for the ETA; ? when unknown."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
