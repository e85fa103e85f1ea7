"""``phi3v-train bench data``: data-loader throughput per worker and packing efficiency per L.

Two measurements on the bundled Luma shards (or ``--shards``), written to one JSON report with
the full configuration, library versions and hardware:

1. Packing efficiency per ``max_seq_len`` on the real token lengths (text + image tokens at
   ``num_crops``, from the manifest: no pixels), resampled with a seed into a long stream as a
   training run with resampled shards sees it; steady state (the final flush of a finite stream
   left out), both packing strategies, and the bound for whole samples
   (``floor(L / shortest)`` samples per pack, of the mean length on average).
2. Loader throughput: the real train loader (tar read, json, length planning, packing, JPEG
   decode, HD transform, tokenisation, collate) in this process with one torch thread, i.e. one
   DataLoader worker, then with ``num_workers`` worker processes; samples/s and tokens/s per
   worker. With ``--profile``, a cProfile of the single-worker run split into stages.

Not a unit test: numbers depend on the machine (``os.cpu_count()`` cores, shared or not).
"""

from __future__ import annotations

import cProfile
import functools
import json
import os
import platform
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

from .config import REPO_ROOT

DEFAULT_SEQ_LENS = (4096, 8192, 16384, 32768, 131072)
LUMA = REPO_ROOT / "data" / "luma"


def luma_shards(out_dir: Path) -> Path:
    """The bundled Luma products as shards in ``out_dir`` (written once, then reused)."""
    from .data.shards import write_shards

    if not (out_dir / "manifest.json").exists():
        write_shards(LUMA / "products.csv", LUMA, out_dir, seed=0)
    return out_dir


def manifest_lengths(manifest: dict[str, Any], split: str = "train", num_crops: int | None = None,
                     crop_size: int = 336, patch_size: int = 14) -> list[int]:
    """Per-sample token lengths of a shard manifest at ``num_crops`` (default: the manifest's):
    its text tokens plus the image tokens of each image size (no pixels decoded)."""
    from .model.processor import hd_size, num_image_tokens

    columns = manifest["splits"][split]["samples"]
    info = manifest["lengths"]
    if num_crops is None or (num_crops, crop_size, patch_size) == (info["num_crops"], info["crop_size"], info["patch_size"]):
        return list(columns["num_tokens"])
    return [text + num_image_tokens(*hd_size(w, h, num_crops, crop_size), crop_size, patch_size)
            for text, (w, h) in zip(columns["num_text_tokens"], columns["image_size"])]


def whole_sample_bound(lengths: list[int], max_seq_len: int) -> float:
    """Upper bound of the average slot use when samples are never split and all are packed: a
    pack holds at most ``floor(L / shortest)`` samples, of ``mean`` tokens on average."""
    return min(1.0, (max_seq_len // min(lengths)) * (sum(lengths) / len(lengths)) / max_seq_len)


def efficiency_table(lengths: list[int], seq_lens=DEFAULT_SEQ_LENS, *, num_samples: int = 4000, seed: int = 0,
                     buffer_size: int = 64, strategies=("best_fill", "bfd"),
                     pad_to_multiple_of: int = 64) -> list[dict[str, Any]]:
    """Steady-state packing efficiency of a resampled length stream, per max_seq_len and strategy.

    Two measures, both real tokens / token slots, over the packs before the final flush:
    ``efficiency`` counts ``max_seq_len`` slots per pack (``packing.padding=max_length``: the
    fill of the budget, at most :func:`whole_sample_bound`); ``efficiency_longest`` counts the
    slots a micro batch of one pack computes with ``packing.padding=longest`` (its tokens rounded
    up to ``pad_to_multiple_of``).

    Returns:
        Rows {"max_seq_len", "strategy", "efficiency", "efficiency_longest", "efficiency_all"
        (all packs, max_length), "num_packs", "samples_per_pack", "bound", "num_too_long"}.
    """
    from .data.collate import row_length
    from .data.pack import packing_efficiency, simulate_packing

    stream = random.Random(seed).choices(lengths, k=num_samples)
    rows = []
    for L in seq_lens:
        fits = [n for n in stream if n <= L]
        for strategy in strategies:
            fills, num_flushed = simulate_packing(fits, L, buffer_size, strategy=strategy)
            steady = fills[:-num_flushed] if 0 < num_flushed < len(fills) else fills
            slots = sum(row_length([n], L, "longest", pad_to_multiple_of) for n in steady)
            rows.append({"max_seq_len": L, "strategy": strategy, "efficiency": packing_efficiency(steady, L),
                         "efficiency_longest": sum(steady) / slots if slots else 0.0,
                         "efficiency_all": packing_efficiency(fills, L), "num_packs": len(fills),
                         "samples_per_pack": len(fits) / max(1, len(fills)),
                         "bound": whole_sample_bound(fits, L) if fits else 0.0,
                         "num_too_long": len(stream) - len(fits)})
    return rows


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


@functools.lru_cache(maxsize=4)
def _processor(num_crops: int, pixel_dtype: str = "float32"):
    import torch

    from .model.processor import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(num_crops=num_crops, pixel_dtype=getattr(torch, pixel_dtype))


def measure_throughput(urls: list[str], *, num_crops: int, max_seq_len: int, num_batches: int, warmup: int,
                       num_workers: int = 0, micro_batch_size: int = 1, profile: Path | None = None,
                       start_batch: int = 0, pixel_dtype: str = "float32") -> dict[str, Any]:
    """Time ``num_batches`` batches of the real train loader after ``warmup`` batches.

    ``num_workers=0`` runs in this process with one torch thread and the workers' allocator
    setting (``retain_freed_memory``): a DataLoader worker's work, except that its batch buffer
    comes from the heap instead of shared memory (~6k fewer page faults per sample); with
    ``profile`` the timed part runs under cProfile and the stats go to that file.
    """
    import torch

    from .data.process import RecordProcessor
    from .data.stream import build_train_loader, retain_freed_memory

    if num_workers == 0:
        retain_freed_memory()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        processor = _processor(num_crops, pixel_dtype)
        loader = build_train_loader(urls, RecordProcessor(processor), max_seq_len=max_seq_len,
                                    micro_batch_size=micro_batch_size, rank=0, world_size=1, num_workers=num_workers,
                                    seed=0, crop_size=processor.crop_size, start_batch=start_batch,
                                    padding="longest", pad_to_multiple_of=64)
        t_start = time.perf_counter()
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t_first = time.perf_counter() - t_start
        profiler = cProfile.Profile() if profile else None
        samples = tokens = images = 0
        pids = [w.pid for w in getattr(it, "_workers", [])]  # DataLoader worker processes
        t0, cpu0, wcpu0 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
        if profiler:
            profiler.enable()
        for _ in range(num_batches):
            batch = next(it)
            samples += batch["num_samples"]
            tokens += batch["num_tokens"]
            images += batch["num_images"]
        if profiler:
            profiler.disable()
            profiler.dump_stats(str(profile))
        dt, cpu, wcpu = time.perf_counter() - t0, time.process_time() - cpu0, _cpu_seconds(pids) - wcpu0
        del it
    finally:
        torch.set_num_threads(threads)
    workers = max(1, num_workers)
    return {"num_workers": num_workers, "max_seq_len": max_seq_len, "num_crops": num_crops, "pixel_dtype": pixel_dtype,
            "num_batches": num_batches, "samples": samples, "tokens": tokens, "images": images, "seconds": dt,
            "samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
            "samples_per_s_per_worker": samples / dt / workers, "tokens_per_s_per_worker": tokens / dt / workers,
            "ms_per_sample_per_worker": 1000 * dt * workers / max(1, samples),
            # CPU time of this process (num_workers=0) or of the workers: the cost on a core of
            # its own when the machine is shared
            "cpu_seconds": cpu if num_workers == 0 else wcpu,
            "samples_per_cpu_s": (samples / cpu if num_workers == 0 else samples / wcpu if wcpu > 0 else None),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "seconds_to_first_batches": t_first, "warmup_batches": warmup, "start_batch": start_batch,
            "profiled": profile is not None}


def measure_resume(urls: list[str], *, num_crops: int, max_seq_len: int, start_batch: int) -> dict[str, Any]:
    """Cost of resuming at ``start_batch`` (one process): seconds to the first batch minus those of
    a fresh start, and the records replayed on lengths only (no image decode) in between. One
    sub-stream, so all ``start_batch`` batches are replayed before the first batch out (with S
    sub-streams the same replay is spread over the first S batches)."""
    from .data.process import RecordProcessor
    from .data.stream import build_train_loader

    processor = _processor(num_crops)
    timings = {}
    for k in (0, 0, start_batch):  # the first fresh start warms up (tokenizer, imports): not timed
        loader = build_train_loader(urls, RecordProcessor(processor), max_seq_len=max_seq_len, micro_batch_size=1,
                                    rank=0, world_size=1, num_workers=0, seed=0, crop_size=processor.crop_size,
                                    start_batch=k, num_streams=1)
        t0 = time.perf_counter()
        next(iter(loader))
        timings[k] = (time.perf_counter() - t0, loader.stats.num_read)
    replay_s = timings[start_batch][0] - timings[0][0]
    replayed = timings[start_batch][1] - timings[0][1]
    return {"start_batch": start_batch, "seconds": timings[start_batch][0], "replay_s": replay_s,
            "records_replayed": replayed, "records_per_s": replayed / replay_s if replay_s > 0 else None}


# (file suffix, function name) whose cumulative time makes one stage of the loader
STAGES = {
    "tar read (webdataset)": [("webdataset/tariterators.py", "tar_file_iterator")],
    "JPEG decode (PIL)": [("webdataset/autodecode.py", "__call__")],
    "HD transform (resize, normalise, crops, global view)": [("model/processor.py", "hd_transform")],
    "tokenise: length planning (num_tokens)": [("data/process.py", "num_tokens")],
    "tokenise: sample (encode text)": [("model/processor.py", "_token_ids")],
    "packing (best_fill / bfd)": [("data/pack.py", "best_fill"), ("data/pack.py", "best_fit_decreasing")],
    "collate (rows, crops concatenated)": [("data/collate.py", "collate_packs")],
}


def profile_breakdown(path: Path, top: int = 12) -> dict[str, Any]:
    """Stages (cumulative seconds, share of the profiled wall time) and the top functions by own time."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt
    entries = stats.stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cumulative(file_suffix: str, name: str) -> float:
        return sum(v[3] for (f, _, n), v in entries.items() if n == name and f.endswith(file_suffix))

    stages = {stage: sum(cumulative(f, n) for f, n in funcs) for stage, funcs in STAGES.items()}
    # the sample's tokenisation also runs inside num_tokens (planning): count it once
    inside_planning = sum(v[3] for (f, _, n), v in entries.items() if n == "_token_ids" and f.endswith("model/processor.py")
                          and any(cf.endswith("data/process.py") and cn == "num_tokens"
                                  for (cf, _, cn) in v[4]))
    stages["tokenise: sample (encode text)"] -= min(inside_planning, stages["tokenise: sample (encode text)"])
    stages["other (json, shuffle, queues, Python glue)"] = max(0.0, total - sum(stages.values()))
    own = sorted(((v[2], f"{Path(f).name}:{n}" if f != "~" else n) for (f, _, n), v in entries.items()), reverse=True)
    return {"total_s": total,
            "stages": {k: {"seconds": v, "share": v / total if total else 0.0} for k, v in stages.items()},
            "top_own_time": [{"function": name, "seconds": t, "share": t / total if total else 0.0}
                             for t, name in own[:top]]}


def hardware() -> dict[str, Any]:
    """CPU model, cores visible and usable, Python and library versions."""
    import PIL
    import torch
    import transformers
    import webdataset

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "webdataset": getattr(webdataset, "__version__", "?")}


def run(args) -> int:
    """The ``bench data`` command (see :func:`add_parser`)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else luma_shards(out / "luma_shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / name) for name in manifest["splits"]["train"]["shards"]]
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    report: dict[str, Any] = {"command": "phi3v-train bench data " + " ".join(sys.argv[3:]),
                              "config": {k: v for k, v in vars(args).items() if k != "fn"} | {"shards": str(shards)}, "hardware": hardware()}

    lengths = manifest_lengths(manifest, "train", args.num_crops)
    table = efficiency_table(lengths, seq_lens, num_samples=args.stream_samples, seed=args.seed,
                             buffer_size=args.buffer_size, pad_to_multiple_of=args.pad_to_multiple_of)
    report["lengths"] = {"num_samples": len(lengths), "min": min(lengths), "max": max(lengths),
                         "mean": sum(lengths) / len(lengths), "num_crops": args.num_crops}
    report["packing"] = table
    print(f"== packing efficiency: {len(lengths)} Luma train samples at num_crops={args.num_crops} "
          f"({min(lengths)}..{max(lengths)} tokens), resampled to {args.stream_samples} (seed {args.seed}), "
          f"buffer {args.buffer_size}, steady state")
    print(f"  {'':>11}  {'rows of max_seq_len':^28}  {'rows of the longest pack':^24}")
    print(f"  {'max_seq_len':>11}  {'best_fill':>9}  {'bfd':>7}  {'bound':>7}  {'best_fill':>11}  {'bfd':>10}  "
          f"{'samples/pack':>12}  {'packs':>6}")
    for L in seq_lens:
        rows = {r["strategy"]: r for r in table if r["max_seq_len"] == L}
        bf, bfd = rows["best_fill"], rows["bfd"]
        print(f"  {L:>11}  {100 * bf['efficiency']:>8.2f}%  {100 * bfd['efficiency']:>6.2f}%  "
              f"{100 * bf['bound']:>6.2f}%  {100 * bf['efficiency_longest']:>10.2f}%  "
              f"{100 * bfd['efficiency_longest']:>9.2f}%  {bf['samples_per_pack']:>12.1f}  {bf['num_packs']:>6}")
    print("  real tokens / token slots. rows of max_seq_len (packing.padding=max_length): bound = whole samples, "
          "floor(L / shortest) per pack x mean length; no packer exceeds it.")
    print(f"  rows of the longest pack (packing.padding=longest, the default; micro batch of 1 pack, rounded up to "
          f"{args.pad_to_multiple_of} tokens): the slots actually computed.")

    report["throughput"] = []
    for workers in [int(w) for w in args.workers.split(",")]:
        r = measure_throughput(urls, num_crops=args.num_crops, max_seq_len=args.max_seq_len, num_batches=args.batches,
                               warmup=args.warmup, num_workers=workers, pixel_dtype=args.pixel_dtype)
        report["throughput"].append(r)
        print(f"== loader, {workers} worker process(es){' (this process, 1 thread)' if workers == 0 else ''}, "
              f"num_crops={args.num_crops}, {args.pixel_dtype} pixels, L={args.max_seq_len}: "
              f"{r['samples_per_s_per_worker']:.1f} samples/s and "
              f"{r['tokens_per_s_per_worker']:.0f} tokens/s per worker ({r['samples']} samples in {r['seconds']:.1f} s, "
              f"{r['ms_per_sample_per_worker']:.1f} ms/sample/worker)")
        if r["samples_per_cpu_s"]:
            who = "this process" if workers == 0 else "the worker processes"
            print(f"   per CPU-second of {who}: {r['samples_per_cpu_s']:.1f} samples/s (load average "
                  f"{r['load_average'][0]:.1f} on {os.cpu_count()} cores: wall time is shared)")
    if args.resume_batches:
        report["resume"] = measure_resume(urls, num_crops=args.num_crops, max_seq_len=args.max_seq_len,
                                          start_batch=args.resume_batches)
        r = report["resume"]
        print(f"== resume at start_batch={r['start_batch']}: first batch after {r['seconds']:.1f} s; "
              f"{r['records_replayed']} records replayed on lengths only in {r['replay_s']:.2f} s "
              f"({_fmt_rate(r['records_per_s'])} records/s: tar read + json + tokenising the text, no image decode)")
    profile_path = out / "loader.prof" if args.profile else None
    if profile_path:
        measure_throughput(urls, num_crops=args.num_crops, max_seq_len=args.max_seq_len, num_batches=args.batches,
                           warmup=args.warmup, num_workers=0, profile=profile_path, pixel_dtype=args.pixel_dtype)
    if profile_path:
        breakdown = profile_breakdown(profile_path)
        report["profile"] = breakdown
        print(f"== where the time goes (cProfile of the 1-worker run, {breakdown['total_s']:.1f} s; profiler "
              "overhead inflates Python-heavy stages)")
        for stage, v in sorted(breakdown["stages"].items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"  {100 * v['share']:5.1f}%  {stage}")
        print("  top functions by own time:")
        for f in breakdown["top_own_time"][:8]:
            print(f"  {100 * f['share']:5.1f}%  {f['function']}")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return 0


def _fmt_rate(rate: float | None) -> str:
    return "n/a (too fast to time)" if rate is None else f"{rate:.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md of a ``bench data`` report: the packing table, the loader rates, the profile."""
    cfg, hw, n = report["config"], report["hardware"], report["lengths"]
    lines = ["# phi3v-train data benchmark", "", f"Generated by `{report['command']}`.", "",
             f"- Hardware: {hw['cpu']} ({hw['cpus_usable']} usable cores); Python {hw['python']}, torch {hw['torch']}, "
             f"Pillow {hw['pillow']}, webdataset {hw['webdataset']}.",
             f"- Lengths: {n['num_samples']} train samples at num_crops={n['num_crops']}, {n['min']}..{n['max']} tokens "
             f"(mean {n['mean']:.0f}), resampled to {cfg['stream_samples']} (seed {cfg['seed']}); packer buffer "
             f"{cfg['buffer_size']} samples; steady state (the final flush of the finite stream left out).", "",
             "## Packing efficiency (real tokens / token slots)", "",
             "- rows of max_seq_len (`packing.padding=max_length`): the fill of the pack budget; *bound*: whole "
             "samples, floor(L / shortest) per pack x mean length, which no packer that keeps samples whole exceeds over a whole stream.",
             f"- rows of the longest pack (`packing.padding=longest`, the default): the slots a micro batch of one "
             f"pack computes, its tokens rounded up to {cfg['pad_to_multiple_of']}.", "",
             "| max_seq_len | best_fill | bfd | bound | longest rows: best_fill | longest rows: bfd | samples/pack |",
             "|---|---|---|---|---|---|---|"]
    for L in sorted({r["max_seq_len"] for r in report["packing"]}):
        rows = {r["strategy"]: r for r in report["packing"] if r["max_seq_len"] == L}
        bf, bfd = rows["best_fill"], rows["bfd"]
        lines.append(f"| {L} | {100 * bf['efficiency']:.2f}% | {100 * bfd['efficiency']:.2f}% | {100 * bf['bound']:.2f}% "
                     f"| {100 * bf['efficiency_longest']:.2f}% | {100 * bfd['efficiency_longest']:.2f}% "
                     f"| {bf['samples_per_pack']:.1f} |")
    lines += ["", "## Loader throughput (tar read, json, packing, JPEG decode, HD transform, tokenising, collate)", "",
              "| workers | pixels | samples/s per worker | tokens/s per worker | ms/sample/worker |", "|---|---|---|---|---|"]
    for r in report["throughput"]:
        who = "0 (one worker's work, in-process)" if r["num_workers"] == 0 else str(r["num_workers"])
        lines.append(f"| {who} | {r['pixel_dtype']} | {r['samples_per_s_per_worker']:.1f} | "
                     f"{r['tokens_per_s_per_worker']:.0f} | {r['ms_per_sample_per_worker']:.1f} |")
    if "resume" in report:
        r = report["resume"]
        lines += ["", f"Resume at start_batch={r['start_batch']}: {r['records_replayed']} records replayed on lengths "
                      f"only in {r['replay_s']:.2f} s ({_fmt_rate(r['records_per_s'])} records/s)."]
    if "profile" in report:
        p = report["profile"]
        lines += ["", f"## Where the time goes (cProfile of the in-process run, {p['total_s']:.1f} s)", "",
                  "| share | stage |", "|---|---|"]
        lines += [f"| {100 * v['share']:.1f}% | {k} |" for k, v in sorted(p["stages"].items(), key=lambda kv: -kv[1]["seconds"])]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    """Register ``data`` on a ``bench`` sub-command's subparsers."""
    d = sub.add_parser("data", help="loader throughput per worker and packing efficiency per max_seq_len (bundled shards)")
    d.add_argument("--shards", help="shard folder with manifest.json (default: the bundled Luma photos, written once)")
    d.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_data"), help="report folder (report.json)")
    d.add_argument("--num-crops", type=int, default=16, help="HD crop budget (16: Phi-3-V)")
    d.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)), help="max_seq_len values for packing")
    d.add_argument("--stream-samples", type=int, default=4000, help="length stream resampled from the manifest")
    d.add_argument("--buffer-size", type=int, default=64, help="packer buffer (samples)")
    d.add_argument("--pad-to-multiple-of", type=int, default=64, help="row-length granularity of padding=longest")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-seq-len", type=int, default=16384, help="L of the throughput run")
    d.add_argument("--batches", type=int, default=12, help="timed micro-batches (1 pack each)")
    d.add_argument("--warmup", type=int, default=8,
                   help="untimed micro-batches first (8: one per sub-stream, whose first visit fills its buffers)")
    d.add_argument("--workers", default="0,1,2",
                   help="comma list: 0 = this process (one worker's work), N = a DataLoader with N workers")
    d.add_argument("--pixel-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="pixel_values dtype (bfloat16: training's default with deepspeed.precision=bf16, the "
                        "values a bf16 model casts them to anyway)")
    d.add_argument("--resume-batches", type=int, default=40, help="time a resume at this start_batch (0: skip)")
    d.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile run")
    d.set_defaults(fn=run)
