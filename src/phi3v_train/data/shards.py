"""Write a product CSV (the Burberry schema) and its images into WebDataset shards.

First stage of the data path (docs/architecture.md): CSV + images -> `train-NNNNNN.tar`,
`val-NNNNNN.tar` and `manifest.json` in one folder. Each sample is two tar members:

- `{key}.{ext}`: the original image bytes, ext from the decoded format (jpg, png, webp, ...);
- `{key}.json`: {"key", "product_code", "title", "category" (category3_code), "category1",
  "category2", "full_price" (float), "currency", "prompt" (the user message content, with its
  `<|image_1|>` tag), "answer" (the rendered answer template), "image_width", "image_height"}.

Bad rows never stop the run: they are listed in the manifest with the reason (empty or
duplicate product code, empty title, missing or non-numeric price, missing, corrupt or
unsupported image). The split is a hash of the key with the seed, so it does not depend on row
order or on other rows; within a split samples are ordered by that hash (categories mixed
across shards). Tars are reproducible byte for byte (fixed mtime), written to a temporary name
and renamed when complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "<|image_1|>What is shown in this image?"
DEFAULT_ANSWER = "Product: {title}, Category: {category3_code}, Full Price: {full_price}"
REQUIRED_COLUMNS = ("product_code", "title", "full_price", "imageurl")
_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")
_EXT = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tiff"}  # PIL format -> extension, else format.lower()


def sanitize_key(product_code: str) -> str:
    """WebDataset-safe sample key: lowercase, every char outside [a-z0-9_-] -> "_" (a dot would
    split the key from the extension, a slash would make a folder)."""
    return re.sub(r"[^a-z0-9_-]", "_", product_code.strip().lower())


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """"val" if the sha1 of "{seed}:{key}", read as a number in [0, 1), is below val_fraction."""
    return "val" if _hash_fraction(key, seed) < val_fraction else "train"


def _hash_fraction(key: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def read_csv_rows(source: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings ("" for empty cells, no NA guessing), read with
    `datasets.load_dataset("csv")` (local, no hub access) into memory."""
    import datasets

    with open(source, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f), [])
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as cache_dir:
            ds = datasets.load_dataset("csv", data_files=str(source), split="train", features=features,
                                       na_filter=False, keep_in_memory=True, cache_dir=cache_dir)
            return ds.to_list()
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _check_image(path: Path) -> tuple[str, int, int]:
    """(extension, width, height) of an image that decodes fully; raises ValueError otherwise."""
    if not path.is_file():
        raise ValueError(f"missing image file: {path}")
    from webdataset.autodecode import IMAGE_EXTENSIONS

    try:
        with Image.open(path) as image:
            image.load()  # full decode: catches truncated and corrupt files
            fmt, width, height = image.format or "", image.width, image.height
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise ValueError(f"corrupt image file: {path}: {type(e).__name__}: {e}") from None
    ext = _EXT.get(fmt, fmt.lower())
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported image format {fmt!r}: {path}")
    return ext, width, height


def _make_sample(row: dict[str, str], images_root: Path, prompt: str, answer_template: str) -> dict[str, Any]:
    """Shard record + image path/extension of one CSV row; raises ValueError(reason) if bad."""
    key = sanitize_key(row["product_code"])
    if not key:
        raise ValueError("empty product_code")
    title = row["title"].strip()
    if not title:
        raise ValueError("empty title")
    if not row["full_price"].strip():
        raise ValueError("missing full_price")
    try:
        price = float(row["full_price"])
    except ValueError:
        price = math.nan
    if not math.isfinite(price):
        raise ValueError(f"non-numeric full_price: {row['full_price']!r}")
    if not row["imageurl"].strip():
        raise ValueError("empty imageurl")
    path = images_root / row["imageurl"].strip()
    ext, width, height = _check_image(path)
    fields = {**row, "title": title, "full_price": price, "category": row.get("category3_code", "")}
    try:
        answer = answer_template.format(**fields)
    except KeyError as e:
        raise KeyError(f"answer_template uses {e}, not a column; available: {sorted(fields)}") from None
    record = {
        "key": key, "product_code": row["product_code"], "title": title,
        "category": row.get("category3_code", ""), "category1": row.get("category1_code", ""),
        "category2": row.get("category2_code", ""), "full_price": price,
        "currency": row.get("currency_code", ""), "prompt": prompt, "answer": answer,
        "image_width": width, "image_height": height,
    }
    return {"record": record, "path": path, "ext": ext}


def _write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """Write one tar to `path` via a temporary file renamed when complete."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as writer:
            for s in samples:
                record = s["record"]
                writer.write({"__key__": record["key"], s["ext"]: s["path"].read_bytes(),
                              "json": json.dumps(record, ensure_ascii=False).encode()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(
    source: str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    samples_per_shard: int = 64,
    seed: int = 0,
    prompt_template: str = DEFAULT_PROMPT,
    answer_template: str = DEFAULT_ANSWER,
) -> dict[str, Any]:
    """Write the rows of `source` (CSV, Burberry columns) into WebDataset shards in `out_dir`.

    Args:
        source: CSV path; needs product_code, title, full_price, imageurl (category*_code and
            currency_code are used when present).
        images_root: folder that `imageurl` is relative to.
        out_dir: output folder (created); our old `train-*/val-*` tars not rewritten are deleted.
        val_fraction: expected share of the validation split, in [0, 1); when > 0 and at least
            2 samples are kept, val holds at least one (the smallest hash).
        samples_per_shard: samples per tar (the last one of a split may hold fewer).
        seed: salt of the split hash (and of the order within a split).
        prompt_template: user message content stored as "prompt" (must hold `<|image_1|>`).
        answer_template: `str.format` template over the CSV columns, with `full_price` as a
            float and `category` = category3_code.

    Returns:
        The manifest, also written to `out_dir/manifest.json`: {"source", "created_by",
        "splits": {"train"|"val": {"shards": [names], "num_samples"}}, "skipped": [{"row"
        (0-based data row), "key", "reason"}], "num_skipped", "templates", "seed",
        "val_fraction", "samples_per_shard"}.

    Raises:
        ValueError: bad arguments, or required columns missing from the CSV.
        KeyError: answer_template names a field that is not a column.
    """
    if not 0 <= val_fraction < 1 or samples_per_shard < 1:
        raise ValueError("need 0 <= val_fraction < 1 and samples_per_shard >= 1, "
                         f"got {val_fraction}, {samples_per_shard}")
    if "<|image_1|>" not in prompt_template:
        raise ValueError(f"prompt_template must hold the image tag <|image_1|>: {prompt_template!r}")
    rows = read_csv_rows(source)
    missing = [c for c in REQUIRED_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; found {sorted(rows[0])}")
    images_root, out_dir = Path(images_root), Path(out_dir)

    samples, skipped, first_row = [], [], {}
    for i, row in enumerate(rows):
        row = {k: v or "" for k, v in row.items()}  # ragged rows may hold None
        key = sanitize_key(row["product_code"])
        try:
            if key in first_row:
                raise ValueError(f"duplicate key {key!r} (kept row {first_row[key]})")
            sample = _make_sample(row, images_root, prompt_template, answer_template)
        except ValueError as e:
            skipped.append({"row": i, "key": key, "reason": str(e)})
            continue
        first_row[key] = i
        samples.append(sample)

    samples.sort(key=lambda s: _hash_fraction(s["record"]["key"], seed))
    splits = {"train": [], "val": []}
    for s in samples:
        splits[split_of(s["record"]["key"], seed, val_fraction)].append(s)
    if val_fraction > 0 and len(samples) >= 2 and not splits["val"]:
        splits["val"].append(splits["train"].pop(0))  # the smallest hash

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, items in splits.items():
        names = []
        for start in range(0, len(items), samples_per_shard):
            names.append(f"{split}-{len(names):06d}.tar")
            _write_tar(out_dir / names[-1], items[start:start + samples_per_shard])
        manifest_splits[split] = {"shards": names, "num_samples": len(items)}
    written = {n for s in manifest_splits.values() for n in s["shards"]}
    for old in out_dir.iterdir():
        if _SHARD_NAME.match(old.name) and old.name not in written:
            old.unlink()

    manifest = {
        "source": str(source), "created_by": "phi3v-train", "splits": manifest_splits,
        "skipped": skipped, "num_skipped": len(skipped),
        "templates": {"prompt": prompt_template, "answer": answer_template},
        "seed": seed, "val_fraction": val_fraction, "samples_per_shard": samples_per_shard,
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / "manifest.json")
    logger.info("wrote %d train / %d val samples to %s, skipped %d", len(splits["train"]),
                len(splits["val"]), out_dir, len(skipped))
    return manifest
