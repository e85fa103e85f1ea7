"""Checkpoint parameter names.

`Phi3VForCausalLM` registers its parameters under exactly the official names of
`microsoft/Phi-3-vision-128k-instruct` / `Phi-3.5-vision-instruct` (592 keys, spec "Checkpoint
keys"), so no renaming is needed in either direction; these helpers only check that it stays so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


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
