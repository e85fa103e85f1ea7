"""Write a product table and its images into WebDataset shards + ``manifest.json``.

First stage of the data path (docs/architecture.md): a table (CSV/TSV/JSONL/parquet/saved
``datasets`` folder, :mod:`phi3v_train.data.sources`) + images -> ``train-NNNNNN.tar``,
``val-NNNNNN.tar`` and ``manifest.json`` in one folder. Each sample is two tar members:

- ``{key}.{ext}``: the image bytes (the original file's unless repaired, see
  :mod:`phi3v_train.data.images`), ext from the decoded format (jpg, png, webp, ...);
- ``{key}.json``: {"key", "product_code", "title", "category", "category1", "category2",
  "full_price" (float), "currency", "prompt" (the user message content, with its
  ``<|image_1|>`` tag), "answer" (the rendered answer template), "image_width", "image_height"}.

How it runs:

1. Plan (one pass over the table, no image decoded): text checks, keys, duplicates, image
   file present and non-empty; the split is a hash of the key with the seed (independent of row
   order and of other rows); within a split samples are ordered by that hash (categories mixed
   across shards) and cut into shards of at most ``samples_per_shard`` samples and
   ``max_shard_bytes`` bytes (source image bytes + ~1.5 KB per sample). So every shard's content
   is fixed before any work, and a shard is a unit of work with a fingerprint.
2. Build the shards in parallel processes (progress bar): decode every image fully, repair or
   skip it, count its tokens, write the tar to ``NAME.tmp`` and rename it when complete, then
   record the shard's state in ``.state/NAME.json``. A re-run keeps every shard whose tar and
   state exist with the same fingerprint (same samples, same source bytes, same options) and
   rebuilds the rest; a crash never leaves a partial tar under a final name. An image that turns
   out bad leaves its shard one sample short.
3. ``manifest.json`` (written last, atomically): shards with sample counts and bytes, totals per
   split, per-sample token lengths (text + image tokens from the image size at ``num_crops``,
   so the trainer knows every length without decoding pixels), every skipped row with its reason
   and every repaired image. Tars are reproducible byte for byte (fixed mtime, fixed order).

Bad rows never stop the run: empty or duplicate product id, empty title, missing or
non-numeric price, missing, zero-byte, corrupt, truncated, non-image or oversized image file are
skipped with the reason; transparent, CMYK, 16-bit, EXIF-rotated and (with ``downscale``) very
large images are repaired.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from phi3v_train.data.images import BadImage, prepare_image
from phi3v_train.data.sources import FieldMap, open_source, read_rows

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "<|image_1|>What is shown in this image?"
DEFAULT_ANSWER = "Product: {title}, Category: {category3_code}, Full Price: {full_price}"
WRITER_VERSION = 2  # part of every shard's fingerprint: bump when the tar content changes
STATE_DIR = ".state"
SAMPLE_OVERHEAD_BYTES = 1536  # tar headers of the two members + padding + json, for max_shard_bytes
_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")


def sanitize_key(product_code: Any) -> str:
    """Deterministic WebDataset-safe sample key of a product id.

    Lowercase; every char outside [a-z0-9_-] becomes "_" (a dot would split the key from the
    extension, a slash would make a folder). When that replaced anything (non-ASCII, spaces,
    dots), 8 hex digits of the id's sha1 are appended so distinct ids keep distinct keys.
    """
    raw = str(product_code or "").strip()
    key = re.sub(r"[^a-z0-9_-]", "_", raw.lower())
    if key and key != raw.lower():
        key += "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return key


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """"val" if the sha1 of "{seed}:{key}", read as a number in [0, 1), is below val_fraction."""
    return "val" if _hash_fraction(key, seed) < val_fraction else "train"


def _hash_fraction(key: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def read_csv_rows(source: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings ("" for empty cells, no NA guessing)."""
    return read_rows(source, "csv")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _plan_row(i: int, row: dict[str, Any], fields: FieldMap, images_root: Path, prompt: str,
              answer_template: str) -> dict[str, Any]:
    """The planned sample of one row (record without image size, image reference, source
    identity and bytes); raises ValueError(reason) for a bad row, KeyError for a bad template."""
    key = sanitize_key(row.get(fields.key))
    if not key:
        raise ValueError(f"empty {fields.key}")
    title = _text(row.get(fields.title))
    if not title:
        raise ValueError("empty title")
    price = None
    if fields.price:
        price_text = _text(row.get(fields.price))
        if not price_text:
            raise ValueError(f"missing {fields.price}")
        try:
            price = float(price_text)
        except ValueError:
            price = math.nan
        if not math.isfinite(price):
            raise ValueError(f"non-numeric {fields.price}: {row.get(fields.price)!r}")

    value = row.get(fields.image)
    if isinstance(value, dict):  # a datasets.Image column, undecoded
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ValueError(f"zero-byte image file: row {i}")
        ref, ident, num_bytes = ("row", i), hashlib.sha1(value).hexdigest(), len(value)
    elif _text(value):
        path = images_root / _text(value)
        if not path.is_file():
            raise ValueError(f"missing image file: {path}")
        stat = path.stat()
        if stat.st_size == 0:
            raise ValueError(f"zero-byte image file: {path}")
        ref, ident, num_bytes = ("path", str(path)), f"{_text(value)}:{stat.st_size}:{stat.st_mtime_ns}", stat.st_size
    else:
        raise ValueError(f"empty {fields.image}")

    columns = {k: ("" if v is None else v) for k, v in row.items() if not isinstance(v, (bytes, bytearray, dict))}
    category = _text(row.get(fields.category))
    template_fields = {**columns, "title": title, "category": category}
    if fields.price:
        template_fields["full_price"] = price
    try:
        answer = answer_template.format(**template_fields)
    except KeyError as e:
        raise KeyError(f"answer_template uses {e}, not a column; available: {sorted(template_fields)}") from None
    record = {
        "key": key, "product_code": _text(row.get(fields.key)), "title": title, "category": category,
        "category1": _text(row.get(fields.category1)), "category2": _text(row.get(fields.category2)),
        **({"full_price": price} if fields.price else {}),
        "currency": _text(row.get(fields.currency)), "prompt": prompt, "answer": answer,
    }
    return {"row": i, "key": key, "record": record, "ref": ref, "ident": ident, "num_bytes": num_bytes}


# -- building one shard (in a worker process) -------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(ds, image_column: str, options: dict[str, Any]) -> None:
    _WORKER.update(ds=ds, image_column=image_column, options=options)


@functools.lru_cache(maxsize=4)
def _record_processor(num_crops: int, crop_size: int, patch_size: int):
    from phi3v_train.data.process import RecordProcessor
    from phi3v_train.model.processor import Phi3VProcessor

    return RecordProcessor(Phi3VProcessor.from_pretrained(num_crops=num_crops, crop_size=crop_size,
                                                          patch_size=patch_size))


def _image_bytes(sample: dict[str, Any]) -> tuple[bytes, str]:
    kind, where = sample["ref"]
    if kind == "path":
        try:
            return Path(where).read_bytes(), where
        except OSError as e:
            raise BadImage(f"missing image file: {where}: {e}") from None
    value = _WORKER["ds"][where][_WORKER["image_column"]]
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value or b""), f"row {where}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (or keep it when its tar and state match the fingerprint); its state."""
    import webdataset as wds

    out, name = Path(task["out_dir"]), task["name"]
    tar, state_path = out / name, out / STATE_DIR / f"{name}.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("fingerprint") == task["fingerprint"] and (tar.exists() or state.get("num_samples") == 0):
        return dict(state, kept=True)  # complete from an earlier run (a shard of only bad images has no tar)

    opts = _WORKER["options"]
    proc = _record_processor(opts["num_crops"], opts["crop_size"], opts["patch_size"])
    downscale = (opts["num_crops"], opts["crop_size"]) if opts["downscale"] else None
    entries, skipped, repaired = [], [], []
    tmp = tar.with_name(name + ".tmp")
    try:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as writer:
            for s in task["samples"]:
                try:
                    data, what = _image_bytes(s)
                    image = prepare_image(data, what, max_pixels=opts["max_image_pixels"], downscale_for=downscale)
                except BadImage as e:
                    skipped.append({"row": s["row"], "key": s["key"], "reason": str(e)})
                    continue
                record = dict(s["record"], image_width=image.width, image_height=image.height)
                num_tokens = proc.num_tokens(record, (image.width, image.height))
                num_image_tokens = proc.processor.image_token_count(image.width, image.height)
                payload = json.dumps(record, ensure_ascii=False).encode()
                writer.write({"__key__": s["key"], image.ext: image.data, "json": payload})
                entries.append({"key": s["key"], "num_tokens": num_tokens,
                                "num_text_tokens": num_tokens - num_image_tokens,
                                "image_size": [image.width, image.height]})
                if image.repairs:
                    repaired.append({"row": s["row"], "key": s["key"], "repairs": image.repairs})
        if entries:
            os.replace(tmp, tar)
        else:
            tar.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    state = {"name": name, "fingerprint": task["fingerprint"], "num_samples": len(entries),
             "num_bytes": tar.stat().st_size if entries else 0, "samples": entries,
             "skipped": skipped, "repaired": repaired}
    _write_atomic(state_path, json.dumps(state, ensure_ascii=False) + "\n")
    return dict(state, kept=False)


# -- the whole run ---------------------------------------------------------------------------

def _plan_shards(samples: list[dict[str, Any]], split: str, samples_per_shard: int,
                 max_shard_bytes: int | None) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for s in samples:
        sample_bytes = s["num_bytes"] + SAMPLE_OVERHEAD_BYTES
        full = len(current) >= samples_per_shard or (
            max_shard_bytes is not None and current and size + sample_bytes > max_shard_bytes)
        if full:
            shards.append({"name": f"{split}-{len(shards):06d}.tar", "samples": current})
            current, size = [], 0
        current.append(s)
        size += sample_bytes
    if current:
        shards.append({"name": f"{split}-{len(shards):06d}.tar", "samples": current})
    return shards


def _fingerprint(shard: dict[str, Any], options: dict[str, Any]) -> str:
    content = {"version": WRITER_VERSION, "options": options,
               "samples": [[s["record"], s["ident"]] for s in shard["samples"]]}
    return hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_shards(
    source: str | Path,
    images_root: str | Path | None,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    samples_per_shard: int = 64,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    prompt_template: str = DEFAULT_PROMPT,
    answer_template: str = DEFAULT_ANSWER,
    fields: FieldMap | None = None,
    source_format: str | None = None,
    source_split: str | None = None,
    num_workers: int = 1,
    progress: bool = False,
    downscale: bool = False,
    num_crops: int = 16,
    crop_size: int = 336,
    patch_size: int = 14,
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Write the rows of ``source`` into WebDataset shards + ``manifest.json`` in ``out_dir``.

    Args:
        source: table file (.csv, .tsv, .jsonl/.json, .parquet) or a ``save_to_disk`` folder.
        images_root: folder that image paths are relative to (None: the source's folder).
        out_dir: output folder (created). Complete shards of an earlier run with the same
            content are kept; our other ``train-*/val-*`` tars there are deleted.
        val_fraction: expected share of the validation split, in [0, 1); when > 0 and at least
            2 samples are planned, val holds at least one (the smallest hash).
        samples_per_shard: at most this many samples per tar.
        max_shard_bytes: also cut a shard before it would exceed this many bytes (estimated from
            the source image sizes; None: no byte limit).
        seed: salt of the split hash (and of the order within a split).
        prompt_template: user message content stored as "prompt" (must hold ``<|image_1|>``).
        answer_template: ``str.format`` template over the columns, with ``title`` stripped,
            ``full_price`` a float and ``category`` = the category column.
        fields: column names (default: the Burberry schema, :class:`FieldMap`).
        source_format: force one of ``sources.FORMATS`` (default: from the path).
        source_split: split of a saved DatasetDict.
        num_workers: processes building shards (1: in this process).
        progress: show a progress bar (samples).
        downscale: store images larger than the HD transform uses at ``num_crops`` at that size.
        num_crops, crop_size, patch_size: the HD transform the manifest's token lengths (and the
            downscale size) are computed for.
        max_image_pixels: images with more pixels are skipped (Pillow's decompression-bomb
            guard); None: no limit.

    Returns:
        The manifest, also written to ``out_dir/manifest.json``: {"source", "created_by",
        "format_version", "splits": {"train"|"val": {"shards": [names], "num_samples",
        "num_tokens", "num_bytes", "shard_info": [{"name", "num_samples", "num_bytes",
        "num_tokens"}], "samples": {"key", "shard" (index into shards), "num_tokens",
        "num_text_tokens", "image_size" ([w, h]) lists}}}, "lengths" (num_crops, crop_size,
        patch_size the token lengths are for), "skipped": [{"row" (0-based data row), "key",
        "reason"}], "num_skipped", "repaired": [{"row", "key", "repairs"}], "num_repaired",
        "shards_kept" (from an earlier run), "templates", "fields", "seed", "val_fraction",
        "samples_per_shard", "max_shard_bytes", "downscale"}.

    Raises:
        ValueError: bad arguments, or required columns missing from the source.
        KeyError: answer_template names a field that is not a column.
    """
    if not 0 <= val_fraction < 1 or samples_per_shard < 1 or (max_shard_bytes is not None and max_shard_bytes < 1):
        raise ValueError("need 0 <= val_fraction < 1, samples_per_shard >= 1 and max_shard_bytes >= 1, "
                         f"got {val_fraction}, {samples_per_shard}, {max_shard_bytes}")
    if "<|image_1|>" not in prompt_template:
        raise ValueError(f"prompt_template must hold the image tag <|image_1|>: {prompt_template!r}")
    fields = fields or FieldMap()
    out_dir = Path(out_dir)
    images_root = Path(images_root) if images_root is not None else (
        Path(source).parent if Path(source).is_file() else Path("."))
    options = {"downscale": downscale, "num_crops": num_crops, "crop_size": crop_size,
               "patch_size": patch_size, "max_image_pixels": max_image_pixels}

    with open_source(source, source_format, source_split) as ds:
        missing = [c for c in fields.required() if c not in ds.column_names]
        if missing:
            raise ValueError(f"{source}: missing columns {missing}; found {sorted(ds.column_names)}; "
                             "map them with fields (--field NAME=COLUMN)")
        planned, skipped, first_row = [], [], {}
        for i, row in enumerate(ds):
            key = sanitize_key(row.get(fields.key))
            try:
                if key in first_row:
                    raise ValueError(f"duplicate key {key!r} (kept row {first_row[key]})")
                sample = _plan_row(i, row, fields, images_root, prompt_template, answer_template)
            except ValueError as e:
                skipped.append({"row": i, "key": key, "reason": str(e)})
                continue
            first_row[key] = i
            planned.append(sample)

        planned.sort(key=lambda s: _hash_fraction(s["key"], seed))
        by_split: dict[str, list] = {"train": [], "val": []}
        for s in planned:
            by_split[split_of(s["key"], seed, val_fraction)].append(s)
        if val_fraction > 0 and len(planned) >= 2 and not by_split["val"]:
            by_split["val"].append(by_split["train"].pop(0))  # the smallest hash

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STATE_DIR).mkdir(exist_ok=True)
        tasks = []
        for split, items in by_split.items():
            for shard in _plan_shards(items, split, samples_per_shard, max_shard_bytes):
                tasks.append({"split": split, "name": shard["name"], "out_dir": str(out_dir),
                              "samples": shard["samples"], "samples_planned": len(shard["samples"]),
                              "fingerprint": _fingerprint(shard, options)})
        states = _run_tasks(tasks, ds, fields.image, options, num_workers, progress)

    manifest_splits = {}
    for split in by_split:
        names, info = [], []
        columns: dict[str, list] = {"key": [], "shard": [], "num_tokens": [], "num_text_tokens": [], "image_size": []}
        for task in (t for t in tasks if t["split"] == split):
            state = states[task["name"]]
            skipped += state["skipped"]
            if not state["num_samples"]:
                continue
            for e in state["samples"]:
                columns["shard"].append(len(names))
                for k in ("key", "num_tokens", "num_text_tokens", "image_size"):
                    columns[k].append(e[k])
            names.append(task["name"])
            info.append({"name": task["name"], "num_samples": state["num_samples"], "num_bytes": state["num_bytes"],
                         "num_tokens": sum(e["num_tokens"] for e in state["samples"])})
        manifest_splits[split] = {
            "shards": names, "num_samples": sum(i["num_samples"] for i in info),
            "num_tokens": sum(i["num_tokens"] for i in info), "num_bytes": sum(i["num_bytes"] for i in info),
            "shard_info": info, "samples": columns,
        }
    _remove_stale(out_dir, {n for s in manifest_splits.values() for n in s["shards"]}, {t["name"] for t in tasks})

    skipped.sort(key=lambda s: s["row"])
    repaired = sorted((r for st in states.values() for r in st["repaired"]), key=lambda r: r["row"])
    manifest = {
        "source": str(source), "created_by": "phi3v-train", "format_version": WRITER_VERSION,
        "splits": manifest_splits,
        "lengths": {"num_crops": num_crops, "crop_size": crop_size, "patch_size": patch_size,
                    "note": "num_tokens = text tokens + image tokens of image_size at num_crops "
                            "(RecordProcessor.num_tokens); num_text_tokens excludes the image"},
        "skipped": skipped, "num_skipped": len(skipped), "repaired": repaired, "num_repaired": len(repaired),
        "shards_kept": sum(1 for st in states.values() if st["kept"]),
        "templates": {"prompt": prompt_template, "answer": answer_template}, "fields": fields.as_dict(),
        "seed": seed, "val_fraction": val_fraction, "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_shard_bytes, "downscale": downscale, "max_image_pixels": max_image_pixels,
    }
    _write_atomic(out_dir / "manifest.json", json.dumps(manifest, ensure_ascii=False) + "\n")
    logger.info("wrote %d train / %d val samples to %s, skipped %d, repaired %d, kept %d shards",
                manifest_splits["train"]["num_samples"], manifest_splits["val"]["num_samples"], out_dir,
                len(skipped), len(repaired), manifest["shards_kept"])
    return manifest


def _run_tasks(tasks: list[dict], ds, image_column: str, options: dict, num_workers: int,
               progress: bool) -> dict[str, dict]:
    """Build every shard (in ``num_workers`` processes); {name: state}."""
    from tqdm import tqdm

    states = {}
    bar = tqdm(total=sum(t["samples_planned"] for t in tasks), unit="sample", desc="shards",
               disable=not progress, dynamic_ncols=True)
    with bar:
        if num_workers <= 1 or len(tasks) <= 1:
            _init_worker(ds, image_column, options)
            results = map(_build_shard, tasks)
            pool = None
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers in forked workers
            pool = multiprocessing.Pool(min(num_workers, len(tasks)), _init_worker, (ds, image_column, options))
            results = pool.imap_unordered(_build_shard, tasks)
        try:
            for state in results:
                states[state["name"]] = state
                bar.update(state["num_samples"] + len(state["skipped"]))
                bar.set_postfix(kept=sum(1 for s in states.values() if s["kept"]),
                                skipped=sum(len(s["skipped"]) for s in states.values()))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return states


def _remove_stale(out_dir: Path, written: set[str], planned: set[str]) -> None:
    """Delete our tars not in ``written``, leftover temporary files and unplanned states."""
    for path in out_dir.iterdir():
        if (_SHARD_NAME.match(path.name) and path.name not in written) or path.name.endswith(".tar.tmp"):
            path.unlink()
    for path in (out_dir / STATE_DIR).iterdir():
        if path.name.removesuffix(".json") not in planned:
            path.unlink()
