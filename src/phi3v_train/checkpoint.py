"""Checkpoints that survive preemption and crashes: atomic ZeRO-3 saves, exact resume, export.

Layout of ``<run_dir>/checkpoints``::

    step_0000200/          one committed checkpoint (the tag is the optimizer step, 7 digits)
        zero_pp_rank_{r}_mp_rank_00_model_states.pt    DeepSpeed: client state, LR scheduler, step counters
        *zero_pp_rank_{r}_mp_rank_00_optim_states.pt   DeepSpeed: rank r's fp32 parameter + AdamW partition
        rng_rank{r}.pt     Python / NumPy / torch (+ CUDA) RNG states of rank r
        config.yaml        the resolved config of the run that wrote it
        meta.json          step, world size, data position: written last, before the commit
    latest                 tag of the newest committed checkpoint (DeepSpeed's format, one line)
    tmp-step_0000400/      a save in progress, or one killed half-way (removed on resume)
    zero_to_fp32.py        DeepSpeed's offline consolidation script

Save protocol (every rank calls :func:`save`):

1. ``engine.save_checkpoint`` into ``tmp-<tag>`` without touching ``latest``; each rank adds its
   ``rng_rank{r}.pt``;
2. barrier: every rank's files are written;
3. rank 0 writes meta.json and config.yaml, renames ``tmp-<tag>`` to ``<tag>`` (atomic), then
   writes ``latest`` (a temporary file renamed over it) and deletes old checkpoints (keep_last);
4. barrier: no rank leaves (e.g. exits on preemption) before the commit.

A process killed anywhere before the rename in 3 leaves ``latest`` on the previous checkpoint and
a ``tmp-`` directory that :func:`remove_partial` deletes on resume; after the rename the new
checkpoint is complete whether or not ``latest`` was updated (:func:`find_resume_tag` falls back to
the newest complete one only when ``latest`` is missing or broken). All ranks must see one shared
filesystem, as DeepSpeed's own checkpointing assumes.

Exact resume needs: the ZeRO-3 partitions of parameters and optimizer state, the LR scheduler
and DeepSpeed's step counters (all in DeepSpeed's files), the data position (the number of
micro-batches each rank consumed: ``step * gradient_accumulation_steps``, in meta.json and the
client state) and the RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

log = logging.getLogger("phi3v_train")

TMP_PREFIX = "tmp-"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    """The checkpoint tag (directory name) of optimizer step ``step``."""
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    """Inverse of :func:`tag_for`."""
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNN)")
    return int(m[1])


def rng_state() -> dict:
    """All RNG states this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def committed_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints in ``ckpt_dir`` (with meta.json), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / "meta.json").is_file()]
    return sorted(tags, key=step_of)


def find_resume_tag(ckpt_dir: str | Path) -> str | None:
    """The checkpoint to resume from: the one ``latest`` names if it is complete, else the newest
    complete one (a warning says so), else None."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    tags = committed_tags(ckpt_dir)
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in tags:
            return tag
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest, tag)
    return tags[-1] if tags else None


def remove_partial(ckpt_dir: str | Path) -> list[str]:
    """Delete the ``tmp-*`` directories of saves that never committed (call on rank 0 only)."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    for p in sorted(ckpt_dir.glob(TMP_PREFIX + "*")) if ckpt_dir.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log.warning("removed unfinished checkpoint save(s) %s (a run was killed while saving)", removed)
    return removed


def save(engine, ckpt_dir: str | Path, step: int, *, rank: int, world_size: int, keep_last: int,
         client_state: dict, config_path: str | Path | None = None,
         before_commit: Callable[[], None] | None = None) -> Path:
    """Save a checkpoint atomically (module docstring); every rank must call it.

    Args:
        engine: the DeepSpeed engine.
        ckpt_dir: ``<run_dir>/checkpoints``.
        step: optimizer steps done; the tag is :func:`tag_for` (step).
        rank, world_size: this process's global rank and the number of ranks.
        keep_last: committed checkpoints kept; older ones (and any newer than ``step``, left by an
            abandoned attempt) are deleted after the commit.
        client_state: small JSON-able training state (step, data position, counters); stored by
            DeepSpeed and, from rank 0, in meta.json.
        config_path: the resolved config.yaml to copy in.
        before_commit: test hook, called on every rank after all files are written and before the
            commit (fault injection).

    Returns:
        The checkpoint directory.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    t0 = time.perf_counter()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tmp_tag / f"rng_rank{rank}.pt")
    _barrier()  # every rank's partitions and RNG file are on disk
    if before_commit is not None:
        before_commit()
    final = ckpt_dir / tag
    if rank == 0:
        tmp = ckpt_dir / tmp_tag
        if config_path is not None and Path(config_path).is_file():
            shutil.copyfile(config_path, tmp / "config.yaml")
        meta = {"tag": tag, "step": step, "world_size": world_size, "time": time.time(), **client_state}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        if final.exists():  # left by an attempt that was abandoned (resumed from an older checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit: from here the checkpoint is complete
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, step, keep_last)
    _barrier()  # nobody leaves before the commit
    log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
    return final


def _prune(ckpt_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step``; delete older ones and newer ones."""
    tags = [t for t in committed_tags(ckpt_dir)]
    newer = [t for t in tags if step_of(t) > step]
    older = [t for t in tags if step_of(t) <= step][:-keep_last]
    for t in newer + older:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    if newer:
        log.info("deleted checkpoints %s of an abandoned attempt (newer than step %d)", newer, step)


def load(engine, ckpt_dir: str | Path, tag: str, *, rank: int, world_size: int) -> dict:
    """Load checkpoint ``tag`` into ``engine`` (parameters, optimizer, LR scheduler) and restore this
    rank's RNG states; every rank must call it.

    Returns:
        meta.json's content merged with the client state (``step``, ``micro_batches_per_rank``, ...).

    Raises:
        RuntimeError: the checkpoint was written by another number of ranks (ZeRO-3 partitions
            are per rank).
    """
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was written by {meta['world_size']} ranks, this run has {world_size}: "
            "resume with the same number of ranks, or `phi3v-train export` it and start a new run from the "
            "export with model.pretrained=<export dir>")
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: numpy state needs pickle
    return {**meta, **(client_state or {})}


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the records with ``step > step`` from a metrics JSONL file (a resumed run logs those
    steps again); returns how many were dropped. Unparsable lines (a torn last write) go too."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        _write_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


def export(run_dir: str | Path, out_dir: str | Path, *, tag: str | None = None, dtype: torch.dtype | None = None,
           progress: bool = True) -> Path:
    """Consolidate a ZeRO-3 checkpoint of ``run_dir`` into an official-format HF model directory.

    Reads the partitions with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (lazily,
    one tensor at a time under a progress bar) and writes them with
    :func:`phi3v_train.model.export.export_hf` (official key names, safetensors shards,
    config.json, tokenizer and preprocessor files). The model config comes from the checkpoint's
    config.yaml (``model.name`` / ``model.pretrained``, ``data.num_crops``).

    Args:
        run_dir: the training run directory (holding ``checkpoints/``).
        out_dir: where the model directory is written.
        tag: checkpoint to export (``step_0000200``); default: the one a resume would pick.
        dtype: cast the tensors (e.g. torch.bfloat16); default fp32, as trained.
        progress: show a tqdm progress bar.

    Raises:
        FileNotFoundError: no (such) complete checkpoint.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from tqdm import tqdm

    from .config import load_config
    from .model.config import load_model_config
    from .model.export import export_hf

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or find_resume_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / "meta.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint {tag or ''} in {ckpt_dir} "
                                f"(complete ones: {committed_tags(ckpt_dir) or 'none'})")
    cfg_file = ckpt_dir / tag / "config.yaml"
    cfg = load_config(cfg_file if cfg_file.is_file() else Path(run_dir) / "config.yaml")
    mcfg = load_model_config(cfg.model.pretrained or cfg.model.name)
    if cfg.data.num_crops:
        mcfg.num_crops = cfg.data.num_crops
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    state = {}
    with tqdm(total=len(lazy) + 1, desc=f"export {tag}", unit="tensor", disable=not progress) as bar:
        for name in list(lazy):
            state[name] = lazy.pop(name).contiguous()  # reads this tensor's pieces from every rank's file
            bar.update()
        bar.set_postfix_str("writing safetensors")
        out = export_hf(state, mcfg, out_dir, dtype=dtype)
        bar.update()
    return out
