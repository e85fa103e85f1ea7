"""Read product tables for the shard writer with the `datasets` library (local, no hub access).

Sources: CSV, TSV, JSONL (or JSON), parquet, and a dataset saved with ``save_to_disk`` (a
folder). CSV/TSV cells are read as strings ("" for empty cells, no NA guessing); the other
formats keep their types. Images are a path (str, relative to ``images_root``), embedded bytes,
or a ``datasets.Image`` column (read undecoded: ``{"bytes", "path"}``).

:class:`FieldMap` names the columns; its defaults are the reference (Burberry) schema.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMATS = ("csv", "tsv", "jsonl", "parquet", "dataset")
_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
           ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class FieldMap:
    """Column names of the source table (defaults: the Burberry product-price schema).

    ``key``, ``title`` and ``image`` are required columns; ``price`` may be None (no price check,
    no ``full_price`` in the record); the category and currency columns are optional (missing
    columns give "").
    """
    key: str = "product_code"
    """Product id: becomes the sample key (sanitised) and must be unique."""
    title: str = "title"
    """Product title; must not be empty."""
    price: str | None = "full_price"
    """Price column; must parse as a finite float (None: no price)."""
    image: str = "imageurl"
    """Image: a path relative to images_root, bytes, or a datasets.Image column."""
    category: str = "category3_code"
    """Category stored as "category" (the reference answer's category)."""
    category1: str = "category1_code"
    category2: str = "category2_code"
    currency: str = "currency_code"

    def required(self) -> list[str]:
        return [c for c in (self.key, self.title, self.price, self.image) if c]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pairs(cls, pairs: list[str]) -> FieldMap:
        """From ``["title=name", "price=", ...]`` (an empty value means None).

        Raises:
            ValueError: an unknown field or a pair without "=".
        """
        names = set(cls.__dataclass_fields__)
        values: dict[str, Any] = {}
        for pair in pairs:
            name, sep, column = pair.partition("=")
            if not sep or name not in names:
                raise ValueError(f"--field {pair!r}: use NAME=COLUMN with NAME in {sorted(names)}")
            values[name] = column or None
        return cls(**values)


def detect_format(source: str | Path) -> str:
    """One of FORMATS from the path: a folder is a saved dataset, else by suffix.

    Raises:
        ValueError: an unknown suffix.
    """
    path = Path(source)
    if path.is_dir():
        return "dataset"
    fmt = _SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{source}: cannot tell the format from the suffix; pass one of {FORMATS}")
    return fmt


@contextlib.contextmanager
def open_source(source: str | Path, fmt: str | None = None, split: str | None = None) -> Iterator[Any]:
    """A ``datasets.Dataset`` over the source, memory-mapped from an Arrow cache that lives as
    long as the context (workers forked inside it can read rows by index).

    Args:
        source: file path, or folder of a dataset saved with ``save_to_disk``.
        fmt: one of FORMATS (default: :func:`detect_format`).
        split: for a saved ``DatasetDict``: which split (default: the only one, else "train").

    Raises:
        ValueError: unknown format or split.
    """
    import datasets

    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {FORMATS}")
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="phi3v-shards-") as cache_dir:
            if fmt == "dataset":
                ds = datasets.load_from_disk(str(source))
                if isinstance(ds, datasets.DatasetDict):
                    names = list(ds)
                    name = split or (names[0] if len(names) == 1 else "train")
                    if name not in ds:
                        raise ValueError(f"{source}: no split {name!r}; splits: {names}")
                    ds = ds[name]
            elif fmt in ("csv", "tsv"):
                delimiter = "," if fmt == "csv" else "\t"
                with open(source, newline="", encoding="utf-8") as f:
                    columns = next(csv.reader(f, delimiter=delimiter), [])
                features = datasets.Features({c: datasets.Value("string") for c in columns})
                ds = datasets.load_dataset("csv", data_files=str(source), split="train", features=features,
                                           na_filter=False, delimiter=delimiter, cache_dir=cache_dir)
            else:
                builder = "json" if fmt == "jsonl" else "parquet"
                ds = datasets.load_dataset(builder, data_files=str(source), split="train", cache_dir=cache_dir)
            for name, feature in ds.features.items():
                if isinstance(feature, datasets.Image) and feature.decode:
                    ds = ds.cast_column(name, datasets.Image(decode=False))
            yield ds
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def read_rows(source: str | Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """All rows of a source as dicts, in memory (small tables, tests)."""
    with open_source(source, fmt) as ds:
        return ds.to_list()
