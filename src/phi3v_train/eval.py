"""Evaluation of the reference task: does the model read title, category and price off the photo?

    val shards --(every rank reads the list, keeps samples i % world == rank)--> prompts
      --greedy_generate (stop at <|end|> 32007; all ranks step together under ZeRO-3)--> answers
      --gather to rank 0--> parse_answer --> metrics --> eval.jsonl, metrics.json, report.md

Models (``[NAME=]SPEC``; several are evaluated one after the other and compared in one report):

- ``RUN_DIR``: a training run (``config.yaml`` + ``checkpoints/``, ZeRO-3): its checkpoint
  (``latest``, or ``--tag``). On N ranks the model is built under ZeRO-3 from the run's config and
  rank 0 streams the consolidated fp32 weights into the partitions; in one process it is a plain
  model. Any world size works (the checkpoint's world size need not match).
- ``init:RUN_DIR``: the same model before fine-tuning: the run's ``model.pretrained`` weights,
  or a random init with the run's seed when it trained from scratch (built like training builds
  it; under ZeRO-3 the random values depend on the world size, so compare on the same one).
- ``HF_DIR``: an exported / official directory (``config.json`` + weights), loaded with
  ``Phi3VForCausalLM.from_pretrained`` (under ZeRO-3 on N ranks).

Ground truth comes from the shard records (``title``, ``category`` = category3_code,
``full_price``). The model's answer ``Product: {title}, Category: {category}, Full Price: {price}``
is parsed by :func:`parse_answer`; a field it cannot find is a parse failure of that field (the
sample then counts as wrong for it), never an error. The reference answer is also scored
teacher-forced (cross-entropy and next-token accuracy), which shows learning before greedy answers
become parseable.

Launch on N ranks: ``torchrun --nproc_per_node N -m phi3v_train.cli eval ...`` or
``phi3v-train eval ... --nproc N`` (relaunches itself under torchrun; CPU: gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("phi3v_train.eval")

DEFAULT_MAX_NEW_TOKENS = 64  # the reference answer is <= 38 tokens with <|end|> on the Luma data
FIELDS = ("title", "category", "price")

# ------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class ParsedAnswer:
    """Fields read from one generated answer; None = not found (a parse failure of that field).

    Attributes:
        labelled: the fields were found by their labels ("Product:", "Category:", "Price:");
            False when read positionally from an unlabelled "title, category, price".
    """

    title: str | None = None
    category: str | None = None
    price: float | None = None
    labelled: bool = True

    @property
    def failed_fields(self) -> list[str]:
        return [f for f in FIELDS if getattr(self, f) is None]


_LABEL_WORDS = {
    "price": r"full[\s_-]*price|retail[\s_-]*price|list[\s_-]*price|price|cost",
    "category": r"categor(?:y|ie|ies)|cat\.",
    "title": r"product[\s_-]*(?:name|title)|product|title|name|item",
}
_ANY_LABEL = "|".join(f"(?P<{k}>{v})" for k, v in _LABEL_WORDS.items())
# "Label:" / "Label =" anywhere, or "Label value" (no colon) at the start of a clause.
_LABEL_RE = re.compile(rf"\b(?:{_ANY_LABEL})\s*[:=]\s*", re.IGNORECASE)
_CLAUSE_LABEL_RE = re.compile(rf"(?:^|(?<=[,;|\n]))\s*(?:{_ANY_LABEL})\s+(?=\S)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?)")
_STRIP = " \t\r\n,;|.:\"'`*"


def parse_price(text: str | None) -> float | None:
    """First number in `text`, tolerant to currency and formatting: "$52", "52.00 USD", "USD 52",
    "1,234.50" (thousands), "52,5" (decimal comma). None when there is no number."""
    if not text:
        return None
    m = _NUMBER_RE.search(text)
    if not m:
        return None
    s = m.group(1)
    if "," in s:
        s = s.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", s) else s.replace(",", ".")
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _clean(text: str) -> str | None:
    """Collapsed, outer punctuation stripped; None unless it holds a letter (".0" is no title)."""
    text = re.sub(r"\s+", " ", text).strip(_STRIP)
    return text if re.search(r"[^\W\d_]", text) else None


def parse_answer(text: str | None) -> ParsedAnswer:
    """Read title, category and price from a generated answer; never raises.

    Expected: ``Product: {title}, Category: {category}, Full Price: {price}``. Tolerated: any case
    and spacing, ":" or "=", labels in any order, synonyms (Title/Name/Item, Price/Cost),
    currency symbols and codes, a missing colon at the start of a clause ("Category TEES"),
    trailing garbage after the price, no labels at all ("title, category, 52.0": read from the
    last two commas). Each field's value runs from its label to the next label; the first
    occurrence of a label wins (a repeated answer is not read twice).
    """
    if not isinstance(text, str):
        return ParsedAnswer(labelled=False)
    text = text.replace("<|end|>", "\n").strip()
    matches = []
    for regex in (_LABEL_RE, _CLAUSE_LABEL_RE):
        for m in regex.finditer(text):
            kind = next(k for k in _LABEL_WORDS if m.group(k) is not None)
            matches.append((m.start(), m.end(), kind))
    matches.sort(key=lambda m: (m[0], -m[1]))  # at one position the longer match ("Title = ") wins
    labels: list[tuple[int, int, str]] = []
    for start, end, kind in matches:  # drop overlaps (the same label found by both patterns)
        if labels and start < labels[-1][1]:
            continue
        labels.append((start, end, kind))
    if not labels:
        return _parse_unlabelled(text)
    out = ParsedAnswer()
    for i, (_, end, kind) in enumerate(labels):
        if kind == "title" and out.title is not None or kind == "category" and out.category is not None:
            continue
        if kind == "price" and out.price is not None:
            continue
        value = text[end:labels[i + 1][0] if i + 1 < len(labels) else len(text)]
        if kind == "price":
            out.price = parse_price(value)
        else:
            setattr(out, kind, _clean(value))
    return out


def _parse_unlabelled(text: str) -> ParsedAnswer:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) >= 3 and parse_price(parts[-1]) is not None:
        return ParsedAnswer(title=_clean(", ".join(parts[:-2])), category=_clean(parts[-2]),
                            price=parse_price(parts[-1]), labelled=False)
    return ParsedAnswer(labelled=False)


# ------------------------------------------------------------------------------------------------
# Scoring


def normalize_title(text: str) -> str:
    """Case-folded, whitespace collapsed, outer punctuation stripped (for exact match/similarity)."""
    return re.sub(r"\s+", " ", text.casefold()).strip(_STRIP + "!?-")


def normalize_category(text: str) -> str:
    """Case-folded words with "&" read as "and": "Hoodies &  sweatshirts" == "HOODIES & SWEATSHIRTS"."""
    return " ".join(re.findall(r"[a-z0-9]+", text.casefold().replace("&", " and ")))


def char_similarity(a: str, b: str) -> float:
    """difflib ratio (2 * matching characters / total length) of the normalised titles, in [0, 1]."""
    a, b = normalize_title(a), normalize_title(b)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def score_sample(prediction: str, truth: dict[str, Any]) -> dict[str, Any]:
    """Parse `prediction` and compare it with `truth` ({"title", "category", "price"}).

    Returns a dict with "parsed" (the fields), "parse_failed" (field names), "labelled",
    "title_exact", "title_similarity" (0 when no title), "category_correct", "price_abs_error",
    "price_ape" (|error| / |truth|; None when no price or truth 0), "price_within_10pct".
    """
    p = parse_answer(prediction)
    t_price = truth.get("price")
    out: dict[str, Any] = {
        "parsed": {"title": p.title, "category": p.category, "price": p.price},
        "parse_failed": p.failed_fields, "labelled": p.labelled,
        "title_exact": p.title is not None and normalize_title(p.title) == normalize_title(truth["title"]),
        "title_similarity": char_similarity(p.title, truth["title"]) if p.title is not None else 0.0,
        "category_correct": p.category is not None
        and normalize_category(p.category) == normalize_category(truth["category"]),
        "price_abs_error": None, "price_ape": None, "price_within_10pct": False,
    }
    if p.price is not None and t_price is not None:
        err = abs(p.price - t_price)
        out["price_abs_error"] = err
        out["price_ape"] = err / abs(t_price) if t_price else None
        out["price_within_10pct"] = err <= 0.1 * abs(t_price)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate scored rows (each with "truth", "stopped" and the keys of :func:`score_sample`).

    Rates are over all samples (a field that failed to parse counts as wrong), except the price
    errors MAE / MAPE / median AE, which are over the samples whose price parsed
    (`price_num_parsed` of them; MAPE also skips a true price of 0). MAPE and rates are fractions.
    """
    n = len(rows)
    errs = [r["price_abs_error"] for r in rows if r["price_abs_error"] is not None]
    apes = [r["price_ape"] for r in rows if r["price_ape"] is not None]
    by_cat: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = by_cat.setdefault(r["truth"]["category"], {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(r["category_correct"])
    for c in by_cat.values():
        c["accuracy"] = c["correct"] / c["n"]

    def rate(pred) -> float | None:
        return sum(1 for r in rows if pred(r)) / n if n else None

    answer_tokens = sum(r.get("answer_tokens", 0) for r in rows)

    return {
        "num_samples": n,
        "parse_failure_rate": rate(lambda r: r["parse_failed"]),
        "parse_failure_rate_by_field": {f: rate(lambda r, f=f: f in r["parse_failed"]) for f in FIELDS},
        "unlabelled_rate": rate(lambda r: not r["labelled"]),
        "stopped_rate": rate(lambda r: r["stopped"]),
        "price_num_parsed": len(errs),
        "price_mae": _mean(errs),
        "price_median_ae": statistics.median(errs) if errs else None,
        "price_mape": _mean(apes),
        "price_within_10pct": rate(lambda r: r["price_within_10pct"]),
        "category_accuracy": rate(lambda r: r["category_correct"]),
        "category_accuracy_by_category": dict(sorted(by_cat.items())),
        "title_exact_match": rate(lambda r: r["title_exact"]),
        "title_char_similarity": _mean([r["title_similarity"] for r in rows]),
        "mean_generated_tokens": _mean([r["num_generated_tokens"] for r in rows if "num_generated_tokens" in r]),
        # Teacher-forced on the reference answer (+ <|end|>): token-weighted over all samples.
        "answer_loss": sum(r.get("answer_loss_sum", 0.0) for r in rows) / answer_tokens if answer_tokens else None,
        "answer_token_accuracy": sum(r.get("answer_correct_tokens", 0) for r in rows) / answer_tokens
        if answer_tokens else None,
    }


def baseline_metrics(train_truths: Sequence[dict], val_truths: Sequence[dict]) -> dict[str, Any] | None:
    """Scores of constant predictors fitted on the train split: the most common train category and
    the median train price (what a model that ignores the photo can reach)."""
    cats = [t["category"] for t in train_truths if t.get("category")]
    prices = [t["price"] for t in train_truths if t.get("price") is not None]
    if not cats or not prices or not val_truths:
        return None
    majority, median = Counter(cats).most_common(1)[0][0], statistics.median(prices)
    n = len(val_truths)
    apes = [abs(median - t["price"]) / abs(t["price"]) for t in val_truths if t["price"]]
    return {
        "majority_category": majority, "median_price": median,
        "category_accuracy": sum(normalize_category(t["category"]) == normalize_category(majority)
                                 for t in val_truths) / n,
        "price_mae": sum(abs(median - t["price"]) for t in val_truths) / n,
        "price_mape": _mean(apes),
        "price_within_10pct": sum(abs(median - t["price"]) <= 0.1 * abs(t["price"]) for t in val_truths) / n,
    }


# ------------------------------------------------------------------------------------------------
# Reports


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "money":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_REPORT_ROWS = (
    ("samples", "num_samples", ""),
    ("parse failures (any field)", "parse_failure_rate", "pct"),
    ("  title / category / price missing", None, ""),
    ("answers that stopped at <\\|end\\|>", "stopped_rate", "pct"),
    ("price MAE", "price_mae", "money"),
    ("price MAPE", "price_mape", "pct"),
    ("price within 10%", "price_within_10pct", "pct"),
    ("prices parsed", "price_num_parsed", ""),
    ("category accuracy", "category_accuracy", "pct"),
    ("title exact match", "title_exact_match", "pct"),
    ("title character similarity", "title_char_similarity", ""),
    ("answer loss, teacher-forced (nats/token)", "answer_loss", ""),
    ("answer token accuracy, teacher-forced", "answer_token_accuracy", "pct"),
)


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(result: dict[str, Any], rows: Sequence[dict[str, Any]] = (), num_examples: int = 8) -> str:
    """Markdown report of one or more models (one column each) from a metrics.json dict."""
    names = result["order"]
    models = result["models"]
    lines = [f"# Evaluation: {result.get('title', 'reference task')}", ""]
    meta = result.get("meta", {})
    if meta:
        lines += [f"- shards: `{meta.get('shards')}` ({meta.get('num_samples')} samples)",
                  f"- greedy decoding, at most {meta.get('max_new_tokens')} new tokens, stop at `<|end|>` (32007); "
                  f"{meta.get('world_size', 1)} rank(s)"]
        for name in names:
            spec = meta.get("specs", {}).get(name)
            if spec:
                lines.append(f"- `{name}`: {spec}")
        lines.append("")
    lines += ["| metric | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for label, key, kind in _REPORT_ROWS:
        if key is None:
            cells = ["/".join(_fmt(models[n]["parse_failure_rate_by_field"][f], "pct") for f in FIELDS) for n in names]
        else:
            cells = [_fmt(models[n].get(key), kind) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    base = result.get("baseline")
    if base:
        lines += ["Constant baseline fitted on the train split (ignores the photo): always "
                  f"`{base['majority_category']}` and {_fmt(base['median_price'], 'money')}: category accuracy "
                  f"{_fmt(base['category_accuracy'], 'pct')}, price MAE {_fmt(base['price_mae'], 'money')}, "
                  f"MAPE {_fmt(base['price_mape'], 'pct')}, within 10% {_fmt(base['price_within_10pct'], 'pct')}.", ""]
    cats = sorted({c for n in names for c in models[n]["category_accuracy_by_category"]})
    if cats:
        lines += ["## Category accuracy per true category", "",
                  "| category | n | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for c in cats:
            per = [models[n]["category_accuracy_by_category"].get(c) for n in names]
            count = next(p["n"] for p in per if p)
            lines.append(f"| {_escape(c)} | {count} | " + " | ".join(
                _fmt(p["accuracy"], "pct") if p else "n/a" for p in per) + " |")
        lines.append("")
    if rows and num_examples:
        by_key: dict[str, dict[str, dict]] = {}
        for r in rows:
            by_key.setdefault(r["key"], {})[r["model"]] = r
        lines += [f"## First {min(num_examples, len(by_key))} samples", "",
                  "| key | truth | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for key, per in list(by_key.items())[:num_examples]:
            t = next(iter(per.values()))["truth"]
            truth = f"{t['title']} / {t['category']} / {t['price']}"
            cells = [_escape(per[n]["prediction"][:120]) if n in per else "" for n in names]
            lines.append(f"| {_escape(key)} | {_escape(truth)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Rates are over all samples (a field that does not parse counts as wrong); price MAE/MAPE are over "
              "the samples whose price parsed. Title similarity: difflib character ratio of the case-folded "
              "titles (0 when no title). Category: case-insensitive, `&` = `and`. Teacher-forced rows: the "
              "reference answer and its `<|end|>` fed in, cross-entropy and argmax accuracy of each next token "
              "(shows learning before greedy answers become parseable).", ""]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, result: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """Write `eval.jsonl` (one line per sample and model), `metrics.json` and `report.md`; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    report = out / "report.md"
    report.write_text(render_report(result, rows))
    return report


def compare_outputs(dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """One report from earlier eval output folders (their metrics.json and eval.jsonl); a model name
    seen twice gets the folder name appended."""
    result: dict[str, Any] = {"models": {}, "order": [], "meta": {"specs": {}}, "title": "comparison"}
    rows: list[dict] = []
    for d in map(Path, dirs):
        m = json.loads((d / "metrics.json").read_text())
        rename = {}
        for name in m["order"]:
            new = name if name not in result["models"] else f"{name} ({d.name})"
            rename[name] = new
            result["models"][new] = m["models"][name]
            result["order"].append(new)
            result["meta"]["specs"][new] = m.get("meta", {}).get("specs", {}).get(name, str(d))
        for k in ("shards", "num_samples", "max_new_tokens", "world_size"):
            result["meta"].setdefault(k, m.get("meta", {}).get(k))
        result.setdefault("baseline", m.get("baseline"))
        if (d / "eval.jsonl").exists():
            for line in (d / "eval.jsonl").read_text().splitlines():
                r = json.loads(line)
                r["model"] = rename.get(r["model"], r["model"])
                rows.append(r)
    return write_outputs(out_dir, result, rows)


# ------------------------------------------------------------------------------------------------
# Data


def truth_of(record: dict[str, Any]) -> dict[str, Any]:
    """Ground truth of a shard record: title, category (category3_code), price (full_price)."""
    try:
        price = float(record.get("full_price"))
    except (TypeError, ValueError):
        price = None
    return {"title": str(record.get("title", "")), "category": str(record.get("category", "")), "price": price}


def read_samples(urls: Sequence[str], *, rank: int = 0, world_size: int = 1, limit: int | None = None,
                 decode_images: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Read the eval samples of this rank: every rank walks all shards in order (cheap: the tar is
    read, only this rank's images are decoded) and keeps samples ``i % world_size == rank``.

    Returns:
        (total samples, this rank's samples as {"index", "key", "record", "image", "error"}); a sample
        whose json is unreadable is kept with record None and the error (scored as a failure).
    """
    import webdataset as wds

    from .data.stream import decode_raw

    total, mine = 0, []
    raws = wds.tarfile_to_samples(handler=wds.warn_and_continue)([{"url": u} for u in urls])
    for i, raw in enumerate(raws):
        if limit is not None and i >= limit:
            break
        total += 1
        if i % world_size != rank:
            continue
        sample = {"index": i, "key": raw.get("__key__"), "record": None, "image": None, "error": None}
        try:
            if decode_images:
                sample["record"], sample["image"] = decode_raw(raw)
            else:
                sample["record"] = json.loads(raw["json"])
        except Exception as e:  # noqa: BLE001 - any corrupt bytes: counted, never fatal
            sample["error"] = f"decode: {type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                sample["record"] = json.loads(raw["json"])
        mine.append(sample)
    return total, mine


def resolve_split(spec: str, split: str) -> list[str]:
    """Shard URLs of `split` from a shards folder with manifest.json, else `spec` as a pattern."""
    from .config import REPO_ROOT
    from .train import resolve_shards

    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        spec = str(REPO_ROOT / path)
    return resolve_shards(spec, split)


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
    from .config import build_deepspeed_config

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

    from .checkpoint import find_resume_tag

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

    from .config import TrainConfig, load_config
    from .model.config import Phi3VConfig, load_model_config
    from .model.modeling import Phi3VForCausalLM
    from .model.processor import DEFAULT_TOKENIZER_DIR, Phi3VProcessor

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if spec.kind in ("run", "init"):
        cfg = load_config(spec.path / "config.yaml")
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        cfg.deepspeed.precision = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
        attn = attn or cfg.model.attn_implementation
        pretrained = cfg.model.pretrained
        if pretrained and not Path(pretrained).exists():
            from .config import REPO_ROOT

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


# ------------------------------------------------------------------------------------------------
# Running


def _dummy_prompt(processor) -> dict:
    """A text-only prompt for padding a rank's share (the vision tower still runs on a dummy crop)."""
    text = processor.render_prompt([{"role": "user", "content": "Hello."}], add_generation_prompt=True)
    return processor.encode(text, [])


def _encode(processor, sample: dict, with_answer: bool = False) -> dict:
    """The generation prompt of a sample (with `with_answer`: plus the reference answer, labelled)."""
    record, image = sample["record"], sample["image"]
    prompt = record.get("prompt") or "<|image_1|>What is shown in this image?"
    images = [image] if image is not None else []
    if image is None:
        prompt = re.sub(r"<\|image_\d+\|>", "", prompt)
    answer = processor.reference_messages(record)[1] if with_answer else None
    return processor.encode(processor.render_prompt([{"role": "user", "content": prompt}], True), images, answer)


def _max_over_ranks(n: int) -> int:
    import torch
    import torch.distributed as tdist

    from . import dist

    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=dist.device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def _gather_to_rank0(obj: list) -> list | None:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return obj
    parts = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(obj, parts, dst=0)
    return [x for p in parts for x in p] if parts is not None else None


def generate_rows(loaded: LoadedModel, samples: list[dict], *, max_new_tokens: int, batch_size: int,
                  model_name: str) -> list[dict] | None:
    """Generate for this rank's samples (padded with dummies to the longest share, so all ranks
    run the same forwards), score the reference answer teacher-forced, gather to rank 0 and score
    there. Returns the rows on rank 0, else None."""
    from .generate import any_rank, greedy_generate, score_answers

    processor = loaded.processor
    prompts, targets, errors = [], [], []
    for s in samples:
        error = s["error"]
        prompt = target = None
        if s["record"] is not None and error is None:
            try:
                prompt, target = _encode(processor, s), _encode(processor, s, with_answer=True)
            except Exception as e:  # noqa: BLE001 - a sample the processor rejects is a failure, not a crash
                error, prompt = f"process: {type(e).__name__}: {e}", None
        prompts.append(prompt if prompt is not None else _dummy_prompt(processor))
        targets.append(target if prompt is not None else _dummy_prompt(processor))
        errors.append(error if prompt is None else None)
    share = _max_over_ranks(len(prompts))
    prompts += [_dummy_prompt(processor)] * (share - len(prompts))
    targets += [_dummy_prompt(processor)] * (share - len(targets))
    scores = score_answers(loaded.module, targets, batch_size=batch_size)
    gens = greedy_generate(loaded.module, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           vocab_limit=len(processor.tokenizer), sync=any_rank)
    local = []
    for s, err, g, sc in zip(samples, errors, gens, scores):
        text = "" if err else processor.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        local.append({"index": s["index"], "key": s["record"].get("key", s["key"]) if s["record"] else s["key"],
                      "truth": truth_of(s["record"] or {}), "prediction": text, "stopped": bool(g.stopped and not err),
                      "num_generated_tokens": 0 if err else len(g.token_ids) + int(g.stopped), "error": err,
                      "answer_loss_sum": sc.loss_sum, "answer_tokens": sc.num_tokens,
                      "answer_correct_tokens": sc.num_correct})
    gathered = _gather_to_rank0(local)
    if gathered is None:
        return None
    rows = []
    for r in sorted(gathered, key=lambda r: r["index"]):
        rows.append({"model": model_name, **r, **score_sample(r["prediction"], r["truth"])})
    return rows


def run_eval(specs: Sequence[str], *, shards: str | None = None, split: str = "val", out_dir: str | Path,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8, limit: int | None = None,
             tag: str | None = None, dtype: str = "auto", attn: str | None = None, num_crops: int | None = None,
             timeout_s: int = 600) -> dict[str, Any] | None:
    """Evaluate each model spec on the shards; on N ranks call it on every rank (torchrun).

    Returns the metrics.json dict on rank 0 (None on other ranks) and writes `out_dir`/{eval.jsonl,
    metrics.json, report.md} there.
    """
    import gc

    import torch.distributed as tdist

    from . import dist

    model_specs = [parse_model_spec(s) for s in specs]
    names = [m.name for m in model_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}: use NAME=SPEC")
    denv = dist.get_dist_env()
    if denv.world_size > 1 and not tdist.is_initialized():
        dist.init_distributed(denv, timeout_s)
    if shards is None:
        shards = _default_shards(model_specs)
    urls = resolve_split(shards, split)
    total, samples = read_samples(urls, rank=denv.rank, world_size=denv.world_size, limit=limit)
    t0 = time.perf_counter()
    all_rows: list[dict] = []
    result: dict[str, Any] = {"models": {}, "order": names, "meta": {
        "shards": shards, "split": split, "num_samples": total, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "world_size": denv.world_size, "specs": {}, "models": {}}}
    for ms in model_specs:
        t1 = time.perf_counter()
        loaded = load_model(ms, world_size=denv.world_size, tag=tag, dtype=dtype, attn=attn, num_crops=num_crops)
        rows = generate_rows(loaded, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             model_name=ms.name)
        info = loaded.info
        loaded.close()
        del loaded
        gc.collect()
        if rows is not None:
            all_rows += rows
            result["models"][ms.name] = compute_metrics(rows)
            result["meta"]["specs"][ms.name] = _describe(ms, info)
            result["meta"]["models"][ms.name] = {**info, "seconds": round(time.perf_counter() - t1, 1)}
            log.info("eval %s: %d samples in %.1f s", ms.name, len(rows), time.perf_counter() - t1)
    if denv.is_main:
        result["baseline"] = _train_baseline(shards, all_rows)
        result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        write_outputs(out_dir, result, all_rows)
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
    return result if denv.is_main else None


def _describe(ms: ModelSpec, info: dict) -> str:
    if ms.kind == "run":
        return f"ZeRO checkpoint `{ms.path}/checkpoints/{info.get('tag')}` (after training)"
    if ms.kind == "init":
        return f"`{ms.path}` before training (its pretrained weights, or random init with its seed)"
    return f"model folder `{ms.path}`"


def _default_shards(model_specs: Sequence[ModelSpec]) -> str:
    from .config import load_config

    for ms in model_specs:
        if ms.kind in ("run", "init"):
            cfg = load_config(ms.path / "config.yaml")
            return cfg.data.val_shards or cfg.data.shards
    raise ValueError("pass --shards (no run folder to take the val shards from)")


def _train_baseline(shards: str, rows: Sequence[dict]) -> dict | None:
    """Constant-predictor baseline from the train split of a shards folder (None if not available)."""
    try:
        urls = resolve_split(shards, "train")
        _, train = read_samples(urls, decode_images=False)
    except Exception:  # noqa: BLE001 - a pattern without a manifest has no train split: no baseline
        return None
    val = {r["key"]: r["truth"] for r in rows if r["truth"]["price"] is not None}
    return baseline_metrics([truth_of(s["record"]) for s in train if s["record"]], list(val.values()))


# ------------------------------------------------------------------------------------------------
# CLI


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register ``phi3v-train eval`` on an argparse subparsers object."""
    e = sub.add_parser(
        "eval", help="greedy generation on the val shards + title/category/price metrics and a report",
        description="Evaluate models on the reference task. MODEL: [NAME=]RUN_DIR (its ZeRO checkpoint), "
                    "[NAME=]init:RUN_DIR (the same model before training), or [NAME=]DIR with config.json "
                    "(exported / official). Two or more models give one comparison report.")
    e.add_argument("models", nargs="*", help="model specs (see above)")
    e.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="merge earlier eval output folders into one report")
    e.add_argument("--shards", help="shards folder (manifest.json) or pattern; default: the run's data.val_shards "
                                    "or data.shards")
    e.add_argument("--split", default="val", help="manifest split (default val)")
    e.add_argument("--out", help="output folder (default: <first run>/eval, or eval_out)")
    e.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    e.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    e.add_argument("--limit", type=int, help="only the first N samples")
    e.add_argument("--tag", help="checkpoint tag (default: latest)")
    e.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    e.add_argument("--attn", help="attention implementation (default: the run's, else sdpa)")
    e.add_argument("--num-crops", type=int, help="HD crop budget (default: the run's / the model's)")
    e.add_argument("--nproc", type=int, default=0,
                   help="relaunch on this many local ranks with torchrun (ZeRO-3); 0 = as launched")
    e.add_argument("--timeout", type=int, default=600, help="seconds: collective timeout and --nproc job limit")
    e.add_argument("--quiet", action="store_true", help="do not print the report (it is written to --out)")
    e.set_defaults(fn=cmd_eval)
    return e


def eval_torchrun_cmd(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs ``phi3v-train eval <argv>`` on `nproc` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "phi3v_train.cli", "eval", *argv]


def _to_argv(args: argparse.Namespace, out: str) -> list[str]:
    """Command-line arguments equivalent to parsed `args` (without --nproc), with --out `out`."""
    argv = [*args.models, *(["--quiet"] if args.quiet else [])]
    for opt in ("shards", "split", "max_new_tokens", "batch_size", "limit", "tag", "dtype", "attn", "num_crops",
                "timeout"):
        value = getattr(args, opt, None)
        if value is not None:
            argv += ["--" + opt.replace("_", "-"), str(value)]
    return [*argv, "--out", out]


def _launch_env() -> dict:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(nproc: int, argv: Sequence[str], timeout_s: int | None = None) -> int:
    """Run ``phi3v-train eval <argv>`` on `nproc` local ranks (torchrun) and wait; returns the exit code."""
    cmd = eval_torchrun_cmd(nproc, argv)
    try:
        return subprocess.run(cmd, env=_launch_env(), timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"phi3v-train eval: timed out after {timeout_s} s", file=sys.stderr)
        return 124


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s [eval] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def cmd_eval(args) -> int:
    """Entry point of ``phi3v-train eval``."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)"
                                              r".*deprecated")
    if args.compare:
        if args.models:
            print("phi3v-train eval: give either models or --compare folders", file=sys.stderr)
            return 2
        report = compare_outputs(args.compare, args.out or "eval_compare")
        print(report.read_text())
        return 0
    if not args.models:
        print("phi3v-train eval: no model given (RUN_DIR, init:RUN_DIR or a model folder)", file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        first = parse_model_spec(args.models[0])
        out = str(first.path / "eval") if first.kind in ("run", "init") else "eval_out"
    if args.nproc and "RANK" not in os.environ:
        return launch(args.nproc, _to_argv(args, out), args.timeout)  # rank 0 prints the report
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _setup_logging()
    result = run_eval(args.models, shards=args.shards, split=args.split, out_dir=out,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                      tag=args.tag, dtype=args.dtype, attn=args.attn, num_crops=args.num_crops,
                      timeout_s=args.timeout)
    if result is not None and not args.quiet:
        print((Path(out) / "report.md").read_text())
    return 0


# ------------------------------------------------------------------------------------------------
# Demo


DEMO_MAX_NEW_TOKENS = 40


def demo_eval(run_dir: str | Path, nproc: int = 2, timeout_s: int = 600) -> int:
    """The demo's last stage: the trained checkpoint ("after") and the same model at its random
    init ("before") on the held-out val split, on `nproc` ZeRO-3 ranks; writes `<run_dir>/eval`."""
    run_dir = Path(run_dir)
    argv = [f"after={run_dir}", f"before=init:{run_dir}", "--out", str(run_dir / "eval"),
            "--max-new-tokens", str(DEMO_MAX_NEW_TOKENS), "--batch-size", "16", "--timeout", str(timeout_s), "--quiet"]
    print("[demo] eval: " + " ".join(eval_torchrun_cmd(nproc, argv)[2:]), flush=True)
    return launch(nproc, argv, timeout_s) if nproc > 1 else cmd_eval(build_args(argv))


def build_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``eval`` arguments (for in-process calls)."""
    p = argparse.ArgumentParser(prog="phi3v-train")
    return add_eval_parser(p.add_subparsers()).parse_args(list(argv))


def format_demo_eval(run_dir: str | Path) -> str:
    """Summary table of `<run_dir>/eval/metrics.json` for the demo's printout ("" if missing)."""
    path = Path(run_dir) / "eval" / "metrics.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text())
    names = m["order"]
    w = max(8, *(len(n) for n in names)) + 1
    cols = [("cat.acc", "category_accuracy", "pct"), ("price MAE", "price_mae", "money"), ("MAPE", "price_mape", "pct"),
            ("within10%", "price_within_10pct", "pct"), ("title exact", "title_exact_match", "pct"),
            ("title sim", "title_char_similarity", ""), ("parse fail", "parse_failure_rate", "pct"),
            ("answer loss*", "answer_loss", ""), ("token acc*", "answer_token_accuracy", "pct")]
    out = [f"  eval             held-out val split: {m['meta']['num_samples']} real products, greedy, <= "
           f"{m['meta']['max_new_tokens']} new tokens; report {path.parent / 'report.md'}",
           "    " + "model".ljust(w) + "  ".join(c[0].rjust(max(7, len(c[0]))) for c in cols)]
    for n in names:
        out.append("    " + n.ljust(w) + "  ".join(_fmt(m["models"][n].get(c[1]), c[2]).rjust(max(7, len(c[0])))
                                                for c in cols))
    b = m.get("baseline")
    if b:
        cells = [_fmt(b.get(k), kind) if k in b else "-" for _, k, kind in cols]
        out.append("    " + "constant".ljust(w) + "  ".join(x.rjust(max(7, len(c[0]))) for x, c in zip(cells, cols))
                   + f"  (train majority {b['majority_category']}, median price {_fmt(b['median_price'], 'money')})")
    out.append("    * teacher-forced on the reference answer (nats/token, next-token argmax accuracy)")
    return "\n".join(out)
