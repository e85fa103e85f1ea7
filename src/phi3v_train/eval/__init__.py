"""Evaluation of the reference task (`phi3v-train eval`): does the model read title, category and
price off the photo? The pipeline and the model specs are described in :mod:`.run`.

- :mod:`.scoring`: `parse_answer` and the metrics (no model, no torch).
- :mod:`.report`: report.md, eval.jsonl, metrics.json and `--compare`.
- :mod:`.models`: `[NAME=]SPEC` parsing and loading (ZeRO-3 checkpoints, exports, the initial model).
- :mod:`.run`: reading the val shards, generation on all ranks, `run_eval`, the CLI and the demo's eval.

Importing this package is cheap (standard library only): torch, deepspeed and webdataset are
imported where they are used.
"""

from .models import LoadedModel, ModelSpec, load_model, load_zero_checkpoint, parse_model_spec
from .report import compare_outputs, format_value, render_report, write_outputs
from .run import (
    DEMO_MAX_NEW_TOKENS,
    add_eval_parser,
    build_args,
    cmd_eval,
    demo_eval,
    eval_torchrun_cmd,
    format_demo_eval,
    generate_rows,
    launch,
    read_samples,
    resolve_split,
    run_eval,
    truth_of,
)
from .scoring import (
    DEFAULT_MAX_NEW_TOKENS,
    FIELDS,
    ParsedAnswer,
    baseline_metrics,
    char_similarity,
    compute_metrics,
    normalize_category,
    normalize_title,
    parse_answer,
    parse_price,
    score_sample,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "DEMO_MAX_NEW_TOKENS", "FIELDS", "LoadedModel", "ModelSpec", "ParsedAnswer",
    "add_eval_parser", "baseline_metrics", "build_args", "char_similarity", "cmd_eval", "compare_outputs",
    "compute_metrics", "demo_eval", "eval_torchrun_cmd", "format_demo_eval", "format_value", "generate_rows",
    "launch", "load_model", "load_zero_checkpoint", "normalize_category", "normalize_title", "parse_answer",
    "parse_model_spec", "parse_price", "read_samples", "render_report", "resolve_split", "run_eval", "score_sample",
    "truth_of", "write_outputs",
]
