"""Peak CPU memory of one LM-loss training step: full logits vs the chunked cross-entropy.

The step is what the model does after its last layer: hidden [T, D] -> lm_head (D -> V, no bias) ->
summed token cross-entropy -> backward to hidden and lm_head.weight. The real Phi-3-V vocabulary
(V = 32064) with a tiny hidden size (D = 64) isolates the [T, V] logits, the term that decides
whether 128K-token packs fit. Variants:

    full            F.cross_entropy(lm_head(hidden)) -- [T, V] fp32 logits, their log-softmax and
                    gradients all live at once
    chunked-<n>     phi3v_train.model.loss.chunked_cross_entropy, n tokens per chunk (what the model runs)

Every (variant, T) runs in a fresh subprocess, after a 64-token warm-up step (lazy imports and kernel
set-up are not measured). Peak memory is the process's resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs right before the step; ru_maxrss where that is not allowed) minus the
resident set just before the step, i.e. what the step itself added on top of its inputs and the
weight. tracemalloc does not see torch's allocations; RSS does, provided freed tensors go back to the
OS: the workers run with MALLOC_MMAP_THRESHOLD_=1MiB, so glibc serves every tensor above 1 MiB with
mmap and unmaps it on free (its default dynamic threshold keeps freed buffers of up to 32 MiB in the
heap, and RSS would then over-count small chunks). The parent compares loss and gradients with `full`.

    .venv/bin/python bench/memory_loss.py                      # T = 16384, 32768 (needs ~14 GB free RAM)
    .venv/bin/python bench/memory_loss.py --tokens 4096 --chunk-sizes 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(variant: str, tokens: int, hidden_size: int, vocab: int, seed: int, out: str) -> None:
    """One training step of `variant`; writes loss, gradients and memory numbers to `out` (torch.save)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from phi3v_train.model.loss import chunked_cross_entropy

    def inputs(num_tokens: int):
        hidden = torch.randn(num_tokens, hidden_size, requires_grad=True)  # [T, D]
        labels = torch.randint(0, vocab, (num_tokens,))  # [T]
        labels[torch.rand(num_tokens) < 0.25] = -100  # prompt / image tokens carry no loss
        return hidden, labels

    def step(hidden, labels):
        if variant == "full":
            logits = lm_head(hidden).float()  # [T, V]
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            del logits
        else:
            chunk = int(variant.removeprefix("chunked-"))
            loss, _ = chunked_cross_entropy(hidden, lm_head, labels, chunk_size=chunk, ignore_index=-100)
        loss.backward()
        return loss

    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
    step(*inputs(64))  # warm-up: lazy imports and kernel set-up are not part of the measured step
    lm_head.weight.grad = None
    torch.manual_seed(seed)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    hidden, labels = inputs(tokens)

    rss_before = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = _reset_peak()
    start = time.perf_counter()
    loss = step(hidden, labels)
    seconds = time.perf_counter() - start
    if hwm_reset:
        peak_kib = _status_kib("VmHWM")
    else:  # ru_maxrss (KiB on Linux) is the process-lifetime peak: valid when the step set a new one
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib = peak_kib if peak_kib > maxrss_before else None
    torch.save(
        {
            "loss": loss.detach(),
            "grad_hidden": hidden.grad,
            "grad_weight": lm_head.weight.grad,
            "rss_before_mib": rss_before / 1024,
            "peak_mib": None if peak_kib is None else peak_kib / 1024,
            "step_peak_mib": None if peak_kib is None else (peak_kib - rss_before) / 1024,
            "peak_method": "VmHWM after clear_refs" if hwm_reset else "ru_maxrss",
            "seconds": seconds,
        },
        out,
    )


def run(tokens: list[int], chunk_sizes: list[int], hidden_size: int, vocab: int, seed: int = 0) -> list[dict]:
    """Run every (variant, T) in its own subprocess; returns one row per run (see `main` for the keys)."""
    import torch

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MALLOC_MMAP_THRESHOLD_=str(MIB))
    with tempfile.TemporaryDirectory() as tmp:
        for t in tokens:
            results = {}
            for variant in ["full", *(f"chunked-{c}" for c in chunk_sizes)]:
                out = os.path.join(tmp, f"{variant}-{t}.pt")
                cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(t), "--hidden", str(hidden_size),
                       "--vocab", str(vocab), "--seed", str(seed), "--out", out]  # fmt: skip
                subprocess.run(cmd, check=True, env=env)
                results[variant] = torch.load(out)
            ref = results["full"]
            for variant, r in results.items():
                rows.append({
                    "tokens": t,
                    "variant": variant,
                    "step_peak_mib": r["step_peak_mib"],
                    "peak_mib": r["peak_mib"],
                    "rss_before_mib": r["rss_before_mib"],
                    "peak_method": r["peak_method"],
                    "seconds": r["seconds"],
                    "loss": float(r["loss"]),
                    "loss_rel_diff": abs(float(r["loss"]) - float(ref["loss"])) / abs(float(ref["loss"])),
                    "grad_hidden_max_abs_diff": float((r["grad_hidden"] - ref["grad_hidden"]).abs().max()),
                    "grad_weight_max_abs_diff": float((r["grad_weight"] - ref["grad_weight"]).abs().max()),
                })  # fmt: skip
    return rows


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                           if line.startswith("model name")), platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "2"),
        "malloc_mmap_threshold": MIB,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768], help="T, tokens per step")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[4096, 1024], help="chunked-CE chunk sizes")
    p.add_argument("--hidden", type=int, default=64, help="D, hidden size (tiny on purpose)")
    p.add_argument("--vocab", type=int, default=32064, help="V, vocabulary size (Phi-3-V: 32064)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write config, environment and rows to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.tokens[0], args.hidden, args.vocab, args.seed, args.out)
        return 0

    rows = run(args.tokens, args.chunk_sizes, args.hidden, args.vocab, args.seed)
    print(f"LM loss step, hidden {args.hidden} -> vocab {args.vocab}, fp32, CPU; "
          "step peak = RSS high-water mark of the step over the RSS before it")
    print(f"{'tokens':>7} {'variant':>14} {'step peak MiB':>14} {'x full':>7} {'s':>6} {'loss rel diff':>14} "
          f"{'grad diff (h / W)':>20}")  # fmt: skip
    for r in rows:
        full = next(x for x in rows if x["tokens"] == r["tokens"] and x["variant"] == "full")
        known = r["step_peak_mib"] and full["step_peak_mib"]
        ratio = r["step_peak_mib"] / full["step_peak_mib"] if known else float("nan")
        print(f"{r['tokens']:>7} {r['variant']:>14} {r['step_peak_mib']:>14.0f} {ratio:>7.2f} {r['seconds']:>6.1f} "
              f"{r['loss_rel_diff']:>14.1e} {r['grad_hidden_max_abs_diff']:>9.1e} / "
              f"{r['grad_weight_max_abs_diff']:.1e}")
    logits_gib = {t: t * args.vocab * 4 / 2**30 for t in (*args.tokens, 131072)}
    print("one fp32 [T, V] logits tensor: " + ", ".join(f"T={t}: {g:.1f} GiB" for t, g in logits_gib.items()))
    if args.json:
        config = {k: getattr(args, k) for k in ("tokens", "chunk_sizes", "hidden", "vocab", "seed")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {"config": config, "environment": environment(), "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
