"""The models an evaluation compares: `ModelSpec` parsing, ZeRO-3 checkpoint loading, `load_model`."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelSpec:
    """What to evaluate: kind "run" (ZeRO-3 checkpoint of a run), "init" (the run's model before
    training) or "hf" (a from_pretrained directory)."""

    name: str
    kind: str
    path: Path
    spec: str = ""


def parse_model_spec(text: str) -> ModelSpec:
    """``[NAME=]RUN_DIR | [NAME=]init:RUN_DIR | [NAME=]HF_DIR`` -> ModelSpec.

    Raises:
        FileNotFoundError: the folder is neither a run (config.yaml) nor a model (config.json).
    """
    name = None
    head, sep, rest = text.partition("=")
    if sep and "/" not in head and not head.startswith("init:"):
        name, text = head, rest
    if text.startswith("init:"):
        path = Path(text[5:])
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{text}: {path} has no config.yaml (init: takes a training run folder)")
        return ModelSpec(name or f"{path.name}-init", "init", path, text)
    path = Path(text)
    if (path / "config.yaml").is_file():
        if not (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"{path}: a run folder without checkpoints/ (use init:{path} for its init)")
        return ModelSpec(name or path.name, "run", path, text)
    if (path / "config.json").is_file():
        return ModelSpec(name or path.name, "hf", path, text)
    raise FileNotFoundError(f"{text}: not a run folder (config.yaml + checkpoints/) nor a model folder (config.json)")


def _zero3_ds_config(cfg, world_size: int) -> dict:
    from ..config import build_deepspeed_config

    ds = build_deepspeed_config(cfg, world_size)
    ds.pop("optimizer", None)  # inference: DeepSpeed then only partitions and gathers parameters
    ds["zero_optimization"]["stage"] = 3
    ds["zero_optimization"].pop("offload_optimizer", None)
    return ds


def _is_rank0() -> bool:
    import torch.distributed as tdist

    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def _broadcast_from_rank0(obj: Any) -> Any:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def load_zero_checkpoint(model, checkpoint_dir: str | Path, tag: str | None = None) -> str:
    """Load a DeepSpeed ZeRO checkpoint folder (``<run>/checkpoints``) into `model`.

    Rank 0 reads the consolidated fp32 weights lazily (DeepSpeed's zero_to_fp32, memory-mapped,
    one tensor at a time) and writes each into the parameter: directly for a plain model, through
    ``deepspeed.zero.GatheredParameters(modifier_rank=0)`` for a ZeRO-3 partitioned one (every rank
    must call this then: collective). Works for any world size. `tag` None: the checkpoint a resume
    would load (`checkpoint.find_resume_tag`). Returns the tag loaded.

    Why not ``engine.load_checkpoint(..., load_module_only=True)`` on an engine without optimizer: a
    ZeRO-3 checkpoint's module states are empty ([0]-shaped) tensors (the weights live in the
    optimizer partitions); DeepSpeed 0.19.8 then consolidates the full fp32 model on every rank and
    afterwards calls ``optimizer._restore_from_bit16_weights``, which the optimizer-less
    ``DeepSpeedZeRoOffload`` lacks (read in its engine.py; not run).

    Raises:
        FileNotFoundError: no checkpoint; KeyError: parameters missing from the checkpoint (on all ranks).
    """
    import deepspeed
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ..checkpoint import find_resume_tag

    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        tag = find_resume_tag(checkpoint_dir)  # what a resume would load: `latest` if complete, else the newest
        if tag is None:
            raise FileNotFoundError(f"{checkpoint_dir} has no complete checkpoint: pass --tag")
    if not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {checkpoint_dir / tag}")
    params = dict(model.named_parameters())
    state, missing = None, None
    if _is_rank0():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress noise
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
        missing = sorted(set(params) - set(state))
    missing = _broadcast_from_rank0(missing)
    if missing:
        raise KeyError(f"{checkpoint_dir / tag} lacks {len(missing)} parameter(s) of the model, e.g. {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if state is not None:
                        p.data.copy_(state[name].contiguous().to(p.dtype).reshape(p.shape))
            else:
                p.data.copy_(state[name].contiguous().to(p.dtype).reshape(p.shape))
    return tag


@dataclass
class LoadedModel:
    """A model ready for `greedy_generate` plus what its processor needs."""

    module: Any
    processor: Any
    engine: Any = None
    hf_ds_config: Any = None
    info: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            with contextlib.suppress(Exception):
                self.engine.destroy()
        self.module = self.engine = self.hf_ds_config = None


def load_model(spec: ModelSpec, *, world_size: int = 1, tag: str | None = None, dtype: str = "auto",
               attn: str | None = None, num_crops: int | None = None) -> LoadedModel:
    """Build the model of `spec` for evaluation; with `world_size` > 1 under ZeRO-3 (collective: all
    ranks call it). dtype: "auto" (the run's precision / the folder's dtype), "bf16" or "fp32".
    One process: a plain model, on the GPU when there is one."""
    import torch

    from ..config import TrainConfig, load_config
    from ..model.config import Phi3VConfig, load_model_config
    from ..model.modeling import Phi3VForCausalLM
    from ..model.processor import DEFAULT_TOKENIZER_DIR, Phi3VProcessor

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if spec.kind in ("run", "init"):
        cfg = load_config(spec.path / "config.yaml")
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        cfg.deepspeed.precision = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
        attn = attn or cfg.model.attn_implementation
        pretrained = cfg.model.pretrained
        if pretrained and not Path(pretrained).exists():
            from ..config import REPO_ROOT

            pretrained = str(REPO_ROOT / pretrained) if (REPO_ROOT / pretrained).exists() else pretrained
        data_num_crops = cfg.data.num_crops
        seed = cfg.seed
        tokenizer_dir = None
    else:
        cfg = TrainConfig()
        if torch_dtype is None:
            cfg_dtype = json.loads((spec.path / "config.json").read_text()).get("torch_dtype", "float32")
            torch_dtype = torch.bfloat16 if cfg_dtype == "bfloat16" else torch.float32
        cfg.deepspeed.precision = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
        attn = attn or "sdpa"
        pretrained, seed = str(spec.path), 0
        pre = spec.path / "preprocessor_config.json"
        data_num_crops = json.loads(pre.read_text()).get("num_crops") if pre.is_file() else None
        tokenizer_dir = spec.path if (spec.path / "tokenizer.json").is_file() else None

    hf_ds = None
    ds_config = None
    if world_size > 1:
        from transformers.integrations import HfDeepSpeedConfig

        ds_config = _zero3_ds_config(cfg, world_size)
        hf_ds = HfDeepSpeedConfig(ds_config)  # must exist before construction: ZeRO-3 partitions at init
    torch.manual_seed(seed)
    # The run's checkpoint replaces every weight: build from the config only (no pretrained load).
    if pretrained and spec.kind in ("init", "hf"):
        model = Phi3VForCausalLM.from_pretrained(pretrained, dtype=torch_dtype, attn_implementation=attn)
    else:
        mcfg = Phi3VConfig.from_pretrained(pretrained) if pretrained else load_model_config(cfg.model.name)
        model = Phi3VForCausalLM._from_config(mcfg, dtype=torch_dtype, attn_implementation=attn)
    info: dict[str, Any] = {"kind": spec.kind, "path": str(spec.path), "dtype": str(torch_dtype).removeprefix("torch.")}
    if spec.kind == "run":
        info["tag"] = load_zero_checkpoint(model, spec.path / "checkpoints", tag)
    model.eval()
    engine = None
    module = model
    if world_size > 1:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        module = engine.module
    elif torch.cuda.is_available():
        module = model.to("cuda")
    mcfg = model.config
    processor = Phi3VProcessor.from_pretrained(
        tokenizer_dir or DEFAULT_TOKENIZER_DIR, num_crops=num_crops or data_num_crops or mcfg.num_crops,
        crop_size=mcfg.crop_size, patch_size=mcfg.patch_size)
    info["num_crops"] = processor.num_crops
    return LoadedModel(module=module, processor=processor, engine=engine, hf_ds_config=hf_ds, info=info)
