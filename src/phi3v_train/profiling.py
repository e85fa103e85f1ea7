"""``torch.profiler`` on a step schedule, one trace per rank in the run directory.

With ``profiling.enabled=true`` the trainer calls :meth:`StepProfiler.step` after every optimizer
step. The schedule skips ``wait`` steps, warms up for ``warmup`` steps (recording, discarded) and
records ``active`` steps, ``repeat`` times (``torch.profiler.schedule``). Each finished cycle
writes, per rank:

- ``<run_dir>/profile/rank{R}.step{S}.pt.trace.json``: a Chrome/Perfetto trace (open it in
  https://ui.perfetto.dev or chrome://tracing), ``S`` = the last step of the cycle;
- ``<run_dir>/profile/rank{R}.step{S}.txt``: the top operators by self time (CUDA time on GPU).

Profiling slows the recorded steps (more with ``record_shapes``/``profile_memory``/``with_stack``):
do not read throughput off the profiled steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("phi3v_train")


class StepProfiler:
    """A started ``torch.profiler.profile`` on a schedule, or a no-op when disabled.

    Args:
        cfg: a :class:`phi3v_train.config.ProfilingConfig` (``enabled``, ``wait``, ``warmup``,
            ``active``, ``repeat``, ``record_shapes``, ``profile_memory``, ``with_stack``).
        run_dir: the run directory; traces go to ``<run_dir>/profile``.
        rank: this process's global rank (in the file names).
    """

    def __init__(self, cfg, run_dir: str | Path, rank: int = 0):
        self.enabled = bool(cfg is not None and cfg.enabled)
        self.out_dir = Path(run_dir) / "profile"
        self.rank = rank
        self.traces: list[Path] = []
        self._prof = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active,
                                             repeat=cfg.repeat),
            on_trace_ready=self._on_trace_ready,
            record_shapes=cfg.record_shapes, profile_memory=cfg.profile_memory, with_stack=cfg.with_stack)
        self._prof.start()

    def _on_trace_ready(self, prof) -> None:
        stem = f"rank{self.rank}.step{prof.step_num}"
        trace = self.out_dir / f"{stem}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out_dir / f"{stem}.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30))
        self.traces.append(trace)
        log.info("profiler trace written: %s", trace)

    def step(self) -> None:
        """Mark the end of an optimizer step (advances the schedule)."""
        if self._prof is not None:
            self._prof.step()

    def stop(self) -> None:
        """Stop profiling (a cycle still recording is written out)."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
