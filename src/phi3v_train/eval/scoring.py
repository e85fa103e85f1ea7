"""Reading a generated answer and scoring it: `parse_answer`, per-sample scores, metrics, the
constant baseline."""

from __future__ import annotations

import difflib
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
