"""Checkpoint parameter names.

`Phi3VForCausalLM` registers its parameters under exactly the official names of
`microsoft/Phi-3-vision-128k-instruct` / `Phi-3.5-vision-instruct` (592 keys, spec "Checkpoint
keys"), so no renaming is needed in either direction. The mapping official name -> our name is the
identity, with two explicit exceptions on the way in (`normalize_state_dict`):
- `module.` (the DeepSpeed/DDP wrapper prefix) is stripped;
- `model.vision_embed_tokens.wte.weight`, the reference's second registration of the text embedding
  (`ALIASES`), is dropped after checking that it equals `model.embed_tokens.weight`.
Nothing else is renamed; every other difference is an error that lists the names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Names under which the reference registers a tensor twice: alias -> the name we keep.
ALIASES = {"model.vision_embed_tokens.wte.weight": "model.embed_tokens.weight"}


def index_key_names(index_path: str | Path) -> list[str]:
    """Sorted parameter names of a `model.safetensors.index.json` (its `weight_map` keys)."""
    return sorted(json.loads(Path(index_path).read_text())["weight_map"])


def check_keys(actual: Iterable[str], expected: Iterable[str], max_listed: int = 20) -> None:
    """Raise KeyError listing missing and unexpected names when `actual` != `expected` (as sets)."""
    actual, expected = set(actual), set(expected)
    missing, unexpected = sorted(expected - actual), sorted(actual - expected)
    if missing or unexpected:
        raise KeyError(
            f"parameter names differ from the official checkpoint: {len(missing)} missing "
            f"{missing[:max_listed]}, {len(unexpected)} unexpected {unexpected[:max_listed]}"
        )


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those named by `model.safetensors.index.json`,
    else `model.safetensors`. Raises FileNotFoundError when there is neither or a listed shard is absent."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {directory}: {absent}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {directory}")


def checkpoint_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint directory, from the safetensors headers (no data read).
    With an index, its `weight_map` must name exactly the tensors the shards hold (else KeyError)."""
    shapes, located = {}, {}
    for file in checkpoint_files(directory):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
                located[name] = file.name
    index = Path(directory) / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = sorted(k for k in set(weight_map) | set(located) if weight_map.get(k) != located.get(k))
        if wrong:
            raise KeyError(f"{index} does not match its shards for {len(wrong)} tensors: {wrong[:20]}")
    return shapes


def check_checkpoint(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    where: str = "checkpoint",
    max_listed: int = 20,
) -> None:
    """Raise KeyError listing missing, unexpected and mis-shaped tensors when the name -> shape maps differ.
    Names in `ALIASES` are tolerated as extras (the reference's duplicate text embedding)."""
    actual = {k: tuple(v) for k, v in actual.items() if k not in ALIASES}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    mis_shaped = sorted(
        f"{k}: {actual[k]} != expected {tuple(expected[k])}"
        for k in set(actual) & set(expected)
        if actual[k] != tuple(expected[k])
    )
    if missing or unexpected or mis_shaped:
        raise KeyError(
            f"{where} does not match the Phi-3-V architecture of its config: {len(missing)} missing "
            f"{missing[:max_listed]}, {len(unexpected)} unexpected {unexpected[:max_listed]}, "
            f"{len(mis_shaped)} with a different shape {mis_shaped[:max_listed]}"
        )


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a leading `module.` from every name and drop the `ALIASES` (after checking that each alias
    equals the tensor kept). Raises ValueError when an alias differs from its target."""
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for alias, target in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if target in out and not torch.equal(value, out[target]):
                raise ValueError(f"{alias} differs from {target}; the reference ties them: which one is trained?")
            out.setdefault(target, value)
    return out
