"""Throughput metrics of a training run: tokens/s, MFU, step breakdown, memory, stragglers.

The trainer feeds a :class:`ThroughputMeter` with host-side numbers only (batch token counts
read from the CPU batch, phase timings) and calls :meth:`ThroughputMeter.flush` at the logging
interval, where the only device sync and the only extra collective (one all_gather of a small
vector) happen. Phase timing uses CUDA events on GPU (read at the flush: no sync per phase) and
``time.perf_counter`` on CPU.

Record fields added by :meth:`ThroughputMeter.flush` (per logging interval; "per device" = divided
by the number of ranks; times are seconds per optimizer step, averaged over ranks):

=============================== ===========================================================
tokens, token_slots             non-padding tokens / all token slots (B x L) over all ranks
label_tokens, samples, images   tokens with a label, samples, real images (all ranks)
packing_efficiency              tokens / token_slots: share of the slots computed that hold real
                                tokens (rows of the longest pack with micro_batch_size 1: ~1.0
                                even when packs of whole samples leave room)
pack_fill                       tokens / (packs x max_seq_len): how full the packs are (equals
                                packing_efficiency with packing.padding=max_length)
tokens_per_s[_per_device]       non-padding tokens per second
all_tokens_per_s[_per_device]   all token slots (padding included) per second
samples_per_s, images_per_s     samples / images per second (all ranks)
image_token_share               image tokens / non-padding tokens
padding_share                   padding slots / all slots (1 - packing efficiency)
tflops_per_device               model TFLOP/s per device (see flops.py for what is counted)
mfu                             tflops_per_device / peak, or None when the peak is unknown
data_wait_s, forward_s,         time per step in each phase (mean over ranks);
backward_s, optimizer_s,        other_s = step_time_s - the four (loss all-reduce, host->
other_s                         device copies, logging)
data_wait_frac                  data_wait_s / step_time_s
step_time_s                     wall time per optimizer step
rank_busy_s_min / _max          per-rank forward+backward+optimizer time per step, fastest and
                                slowest rank; straggler_ratio = max / min
rank_tokens_max_over_mean       token imbalance between ranks (1.0 = perfectly balanced)
gpu_mem_allocated_gib /         peak allocated / reserved CUDA memory since the start, max over
gpu_mem_reserved_gib            ranks (GPU only)
rss_peak_gib, rss_gib           peak and current resident set size of the process, max over
                                ranks; rss_peak_delta_gib = peak - the RSS before the model
                                was built (compare with `phi3v-train plan`)
=============================== ===========================================================
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator

import torch

from .flops import FlopModel, batch_train_flops, mfu, resolve_peak_flops  # noqa: F401 (re-exported)

GIB = 1024**3
PHASES = ("forward", "backward", "optimizer")


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; 0 if unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``getrusage`` ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseTimer:
    """Accumulates seconds per named phase without a device sync per phase.

    On CUDA each phase records a start and an end event on the current stream; the elapsed
    times are read in :meth:`collect`, after one ``torch.cuda.synchronize()``. On CPU it uses
    ``time.perf_counter`` (CPU ops are synchronous).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._host: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body of the ``with`` block under ``name``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (then reset). CUDA: one device sync here."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()  # device sync: once per logging interval
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._host, self._events = {}, []
        return out


def _gather(values: list[float], device: torch.device) -> torch.Tensor:
    """[world, K] float64: every rank's ``values`` (one all_gather), or [1, K] without a process group."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local.unsqueeze(0).cpu()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu()  # device-to-host sync: logging interval only


class ThroughputMeter:
    """Per-interval throughput, MFU, step breakdown and memory (fields: module docstring).

    Usage in the loop (all host-side except :meth:`flush`)::

        meter = ThroughputMeter(FlopModel.from_config(model.config), device=device, peak_flops=...)
        b = next(batches); meter.add_batch(b, data_s=...)     # CPU batch, before .to(device)
        with meter.phase("forward"): ...
        with meter.phase("backward"): ...
        with meter.phase("optimizer"): ...
        if log_step: rec.update(meter.flush(elapsed_s, num_steps))   # every rank calls it

    Args:
        flop_model: the FLOP formula of the architecture.
        device: this rank's device (CUDA events and the all_gather tensor live there).
        peak_flops: peak FLOP/s per device (``flops.resolve_peak_flops``); None -> mfu None.
        image_token_id: the ``<|image|>`` id (image-token share, projector FLOPs).
        causal: count attention with the causal discount (default: no discount, see flops.py).
        rss_baseline: RSS in bytes before the model was built (for ``rss_peak_delta_gib``);
            default: the RSS now.
    """

    def __init__(self, flop_model: FlopModel, *, device: torch.device | str = "cpu",
                 peak_flops: float | None = None, image_token_id: int = 32044, causal: bool = False,
                 rss_baseline: int | None = None):
        self.flop_model, self.device = flop_model, torch.device(device)
        self.peak_flops, self.image_token_id, self.causal = peak_flops, image_token_id, causal
        self.rss_baseline = current_rss_bytes() if rss_baseline is None else rss_baseline
        self.timer = PhaseTimer(self.device)
        self._reset()

    def _reset(self) -> None:
        self.num_tokens = self.token_slots = self.num_samples = self.num_images = 0
        self.num_image_tokens = self.num_label_tokens = self.budget_slots = 0
        self.flops = 0.0
        self.data_s = 0.0

    def add_batch(self, batch: dict, data_s: float = 0.0) -> None:
        """Count one micro-batch (host tensors) and the seconds spent waiting for it."""
        B, L = batch["input_ids"].shape
        self.num_tokens += int(batch["num_tokens"])
        self.token_slots += B * L
        self.budget_slots += B * int(batch.get("max_seq_len", L))
        self.num_label_tokens += int(batch.get("num_label_tokens", 0))
        self.num_samples += int(batch["num_samples"])
        self.num_images += int(batch.get("num_images", batch["image_sizes"].shape[0]))
        self.num_image_tokens += int((batch["input_ids"] == self.image_token_id).sum())
        self.flops += batch_train_flops(self.flop_model, batch, self.image_token_id, self.causal)
        self.data_s += data_s

    def phase(self, name: str):
        """Context manager timing one of ``forward`` / ``backward`` / ``optimizer``."""
        return self.timer.phase(name)

    def memory(self) -> dict[str, float]:
        """This rank's memory now: CUDA peak allocated/reserved (GiB) on GPU, RSS always."""
        out = {"rss_peak": peak_rss_bytes() / GIB, "rss": current_rss_bytes() / GIB,
               "rss_peak_delta": (peak_rss_bytes() - self.rss_baseline) / GIB}
        if self.device.type == "cuda":
            out["gpu_allocated"] = torch.cuda.max_memory_allocated(self.device) / GIB
            out["gpu_reserved"] = torch.cuda.max_memory_reserved(self.device) / GIB
        return out

    def flush(self, elapsed_s: float, num_steps: int) -> dict:
        """The record fields for the interval since the last flush (then reset).

        Collective: every rank must call it at the same step (one all_gather).

        Args:
            elapsed_s: wall seconds of the interval (the same on every rank, from the trainer).
            num_steps: optimizer steps in the interval.
        """
        phases = self.timer.collect()
        mem = self.memory()
        mem_keys = sorted(mem)
        counts = [self.num_tokens, self.token_slots, self.num_samples, self.num_images, self.num_image_tokens,
                  self.flops, self.num_label_tokens, self.budget_slots]
        local = [*counts, self.data_s, *(phases.get(p, 0.0) for p in PHASES), *(mem[k] for k in mem_keys)]
        g = _gather(local, self.device)  # [world, K]
        world, n = g.shape[0], len(counts)
        tokens, slots, samples, images, image_tokens, flops, label_tokens, budget = g[:, :n].sum(0).tolist()
        dt = max(elapsed_s, 1e-9)
        steps = max(num_steps, 1)
        per_rank = g[:, n:n + 4] / steps  # [world, 4]: data, forward, backward, optimizer s/step
        mean = per_rank.mean(0).tolist()
        busy = per_rank[:, 1:].sum(1)  # [world]
        tok_per_rank = g[:, 0]
        step_time = dt / steps
        rec = {
            "tokens": int(tokens), "token_slots": int(slots), "label_tokens": int(label_tokens),
            "samples": int(samples), "images": int(images),
            "packing_efficiency": tokens / slots if slots else 0.0, "pack_fill": tokens / budget if budget else 0.0,
            "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / world,
            "all_tokens_per_s": slots / dt, "all_tokens_per_s_per_device": slots / dt / world,
            "samples_per_s": samples / dt, "images_per_s": images / dt,
            "image_token_share": image_tokens / tokens if tokens else 0.0,
            "padding_share": 1.0 - tokens / slots if slots else 0.0,
            "model_flops": flops,
            "tflops_per_device": flops / dt / world / 1e12,
            "mfu": mfu(flops, dt, world, self.peak_flops),
            "step_time_s": step_time,
            "data_wait_s": mean[0], "forward_s": mean[1], "backward_s": mean[2], "optimizer_s": mean[3],
            "other_s": max(0.0, step_time - sum(mean)),
            "data_wait_frac": mean[0] / step_time,
            "rank_busy_s_min": float(busy.min()), "rank_busy_s_max": float(busy.max()),
            "straggler_ratio": float(busy.max() / busy.min()) if float(busy.min()) > 0 else None,
            "rank_tokens_max_over_mean": (float(tok_per_rank.max() / tok_per_rank.mean())
                                          if float(tok_per_rank.mean()) > 0 else None),
        }
        mem_max = g[:, n + 4:].max(0).values.tolist()
        for k, v in zip(mem_keys, mem_max):
            rec[{"gpu_allocated": "gpu_mem_allocated_gib", "gpu_reserved": "gpu_mem_reserved_gib"}.get(k, k + "_gib")] = v
        self._reset()
        return rec


def init_wandb(cfg, run_dir, is_main: bool):
    """A wandb run on rank 0 when ``cfg.logging.wandb`` is set, else None.

    Offline (files under ``<run_dir>/wandb``) unless ``WANDB_API_KEY`` is set or ``WANDB_MODE``
    says otherwise. Log each metrics record with ``run.log(rec, step=rec["step"])``.
    """
    if not (is_main and cfg.logging.wandb):
        return None
    import wandb

    from .config import to_dict

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=cfg.logging.wandb_project, name=os.path.basename(os.fspath(run_dir)),
                      dir=os.fspath(run_dir), config=to_dict(cfg), mode=mode)


def format_log_line(rec: dict) -> str:
    """A compact one-line summary of the throughput fields of a record."""
    mfu_s = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "n/a"
    mem = (f"gpu {rec['gpu_mem_allocated_gib']:.1f}/{rec['gpu_mem_reserved_gib']:.1f} GiB"
           if "gpu_mem_allocated_gib" in rec else f"rss {rec.get('rss_peak_gib', 0):.2f} GiB")
    return (f"tok/s/dev {rec['tokens_per_s_per_device']:.0f} TFLOP/s/dev {rec['tflops_per_device']:.3g} "
            f"MFU {mfu_s} step {rec['step_time_s']:.3f}s = data {rec['data_wait_s']:.3f} fwd {rec['forward_s']:.3f} "
            f"bwd {rec['backward_s']:.3f} opt {rec['optimizer_s']:.3f} other {rec['other_s']:.3f} | {mem}")
