"""Write and read official-format Phi-3-V checkpoint directories.

`export_hf` writes what `microsoft/Phi-3-vision-128k-instruct` ships, so that the directory loads
back here (`Phi3VForCausalLM.from_pretrained(dir)`, no trust_remote_code) and in other tools:

    model-00001-of-0000N.safetensors ...   the 592 official tensor names, one copy of the text embedding
    model.safetensors.index.json           {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    config.json                            `Phi3VConfig.to_official()` (flat, rope_scaling "su")
    tokenizer.json, tokenizer_config.json, special_tokens_map.json (copied)
    preprocessor_config.json               num_crops of the config

`load_state_dict_into` loads a state dict (e.g. a consolidated ZeRO-3 checkpoint) into a model after
checking names and shapes against the architecture.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import Phi3VConfig
from .keys import INDEX_FILE, check_checkpoint, normalize_state_dict
from .modeling import Phi3VForCausalLM, expected_state_shapes

_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "phi3v"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")  # fmt: skip
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of "2GB" (decimal units, like transformers), "500MiB", "1024" or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r}: use an int (bytes) or e.g. '2GB', '500MB', '1GiB'")
    return int(float(match[1]) * _SIZE_UNITS[match[2] or ""])


def _prepare_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config: Phi3VConfig, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint copies (safetensors refuses shared storage) of the checked tensors."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    state = normalize_state_dict(state)
    check_checkpoint({k: tuple(v.shape) for k, v in state.items()}, expected_state_shapes(config), where="state dict")
    out, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu", dtype=dtype if dtype is not None else tensor.dtype).contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # a view of, or tied to, a tensor written already
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: Phi3VConfig,
    out_dir: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an official-format checkpoint directory (module docstring) and return its path.

    Args:
        model_or_state_dict: a (non-partitioned) `Phi3VForCausalLM`, or its state dict, e.g. the output of
            DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`. A `module.` prefix is stripped and the
            reference's duplicate `model.vision_embed_tokens.wte.weight` dropped (`keys.normalize_state_dict`).
        config: the model's config; decides the expected names/shapes, config.json and num_crops.
        out_dir: created if needed; existing shards named model-*.safetensors there are removed first.
        max_shard_size: most bytes per shard ("2GB" = 2e9, or an int); a larger tensor gets a shard alone.
        tokenizer_dir: where the tokenizer files (and a preprocessor_config.json) are copied from; default the
            bundled Phi-3-V tokenizer.
        dtype: cast every tensor to this dtype (e.g. torch.bfloat16, as released); default: keep.

    Raises:
        KeyError: names or shapes differ from the architecture of `config` (the message lists them).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _prepare_state_dict(model_or_state_dict, config, dtype)
    limit = parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():  # model order: layers stay together, like the official shards
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size

    for old in out_dir.glob("model*.safetensors"):
        old.unlink()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in shard}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    official = config.to_official()
    official["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(official, indent=2) + "\n")

    source = Path(tokenizer_dir) if tokenizer_dir is not None else _ASSETS
    copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"no tokenizer.json in {source}")
    for f in copied:
        shutil.copyfile(source / f, out_dir / f)
    preprocessor_src = source / "preprocessor_config.json"
    if not preprocessor_src.is_file():
        preprocessor_src = _ASSETS / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_src.read_text())
    preprocessor["num_crops"] = config.num_crops
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out_dir


def load_state_dict_into(
    model: Phi3VForCausalLM, state_dict: Mapping[str, torch.Tensor], check_keys: bool = True
) -> Phi3VForCausalLM:
    """Copy `state_dict` (official names; `keys.normalize_state_dict` applied) into a non-partitioned model.

    With `check_keys`, names and shapes must be exactly the model's (KeyError listing the differences);
    without, missing names keep their current values and unexpected ones are ignored.
    Under ZeRO-3 load through `from_pretrained` (or `deepspeed.zero.GatheredParameters`) instead.
    """
    state = normalize_state_dict(state_dict)
    if check_keys:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_checkpoint({k: tuple(v.shape) for k, v in state.items()}, expected, where="state dict")
    model.load_state_dict(state, strict=check_keys)
    return model
