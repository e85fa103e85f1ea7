"""Running an evaluation of the reference task: does the model read title, category and price off the photo?

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
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .models import LoadedModel, ModelSpec, load_model, parse_model_spec
from .report import compare_outputs, format_value, write_outputs
from .scoring import (
    DEFAULT_MAX_NEW_TOKENS,
    baseline_metrics,
    compute_metrics,
    score_sample,
)

log = logging.getLogger("phi3v_train.eval")


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

    from ..data.stream import decode_raw

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
    from ..config import REPO_ROOT
    from ..train import resolve_shards

    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        spec = str(REPO_ROOT / path)
    return resolve_shards(spec, split)


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
    from ..dist import max_over_ranks
    from ..generate import any_rank, greedy_generate, score_answers

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
    share = max_over_ranks(len(prompts))
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

    from .. import dist

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
    from ..config import load_config

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
        out.append("    " + n.ljust(w) + "  ".join(format_value(m["models"][n].get(c[1]), c[2]).rjust(max(7, len(c[0])))
                                                for c in cols))
    b = m.get("baseline")
    if b:
        cells = [format_value(b.get(k), kind) if k in b else "-" for _, k, kind in cols]
        out.append("    " + "constant".ljust(w) + "  ".join(x.rjust(max(7, len(c[0]))) for x, c in zip(cells, cols))
                   + f"  (train majority {b['majority_category']}, median price {format_value(b['median_price'], 'money')})")
    out.append("    * teacher-forced on the reference answer (nats/token, next-token argmax accuracy)")
    return "\n".join(out)
