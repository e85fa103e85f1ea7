"""Evaluation outputs: report.md (one column per model), eval.jsonl / metrics.json, comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .scoring import FIELDS

# ------------------------------------------------------------------------------------------------
# Reports


def format_value(value: Any, kind: str = "") -> str:
    """A metric as report text: "pct" -> 12.3%, "money" -> 12.30, floats to 3 decimals, None -> n/a."""
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
            cells = ["/".join(format_value(models[n]["parse_failure_rate_by_field"][f], "pct") for f in FIELDS) for n in names]
        else:
            cells = [format_value(models[n].get(key), kind) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    base = result.get("baseline")
    if base:
        lines += ["Constant baseline fitted on the train split (ignores the photo): always "
                  f"`{base['majority_category']}` and {format_value(base['median_price'], 'money')}: category accuracy "
                  f"{format_value(base['category_accuracy'], 'pct')}, price MAE {format_value(base['price_mae'], 'money')}, "
                  f"MAPE {format_value(base['price_mape'], 'pct')}, within 10% {format_value(base['price_within_10pct'], 'pct')}.", ""]
    cats = sorted({c for n in names for c in models[n]["category_accuracy_by_category"]})
    if cats:
        lines += ["## Category accuracy per true category", "",
                  "| category | n | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for c in cats:
            per = [models[n]["category_accuracy_by_category"].get(c) for n in names]
            count = next(p["n"] for p in per if p)
            lines.append(f"| {_escape(c)} | {count} | " + " | ".join(
                format_value(p["accuracy"], "pct") if p else "n/a" for p in per) + " |")
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
