"""bench.py, metrics.py, profiling.py, bench/gpu_check.sh: the throughput tooling on CPU."""

import json
import subprocess
import sys
import tarfile

import pytest
import torch

from phi3v_train.bench import (BenchPoint, aggregate, combine_repeats, layout_ratios, packing_ratios,
                                synthetic_shards, write_report)
from phi3v_train.config import REPO_ROOT, load_config
from phi3v_train.data.collate import collate_packs
from phi3v_train.flops import FlopModel
from phi3v_train.metrics import ThroughputMeter
from phi3v_train.profiling import StepProfiler


def _sample(n, image=False):
    ids = torch.randint(0, 1000, (n,))
    if image:
        ids[1:5] = 32044
    return {"input_ids": ids, "labels": ids.clone(), "key": str(n),
            "pixel_values": torch.zeros(2 if image else 0, 3, 56, 56),
            "image_sizes": torch.tensor([[56, 56]]) if image else torch.zeros(0, 2, dtype=torch.long)}


def test_meter_fields_without_process_group():
    fm = FlopModel.from_config("tiny")
    meter = ThroughputMeter(fm, peak_flops=1e12)
    batch = collate_packs([[_sample(10, image=True), _sample(20)], [_sample(30)]], 32, crop_size=56)
    meter.add_batch(batch, data_s=0.5)
    for name in ("forward", "backward", "optimizer"):
        with meter.phase(name):
            torch.ones(64, 64) @ torch.ones(64, 64)
    rec = meter.flush(elapsed_s=2.0, num_steps=1)
    assert rec["tokens"] == 60 and rec["token_slots"] == 64
    assert rec["tokens_per_s"] == pytest.approx(30.0) and rec["all_tokens_per_s"] == pytest.approx(32.0)
    assert rec["padding_share"] == pytest.approx(4 / 64) and rec["image_token_share"] == pytest.approx(4 / 60)
    assert rec["samples_per_s"] == pytest.approx(1.5) and rec["images_per_s"] == pytest.approx(0.5)
    assert rec["model_flops"] == pytest.approx(fm.train_flops([10, 20, 30], 2, 4))
    assert rec["mfu"] == pytest.approx(rec["model_flops"] / 2.0 / 1e12)
    assert rec["data_wait_s"] == 0.5 and rec["data_wait_frac"] == 0.25
    assert rec["forward_s"] > 0 and rec["backward_s"] > 0 and rec["optimizer_s"] > 0
    assert rec["straggler_ratio"] == pytest.approx(1.0) and rec["rank_tokens_max_over_mean"] == 1.0
    assert rec["rss_peak_gib"] > 0 and "gpu_mem_allocated_gib" not in rec
    assert meter.flush(1.0, 1)["tokens"] == 0  # reset after a flush
    assert ThroughputMeter(fm).flush(1.0, 1)["mfu"] is None  # no peak known (CPU): MFU n/a


def test_profiler_writes_a_trace_per_cycle(tmp_path):
    cfg = load_config(None, ["profiling.enabled=true", "profiling.wait=1", "profiling.warmup=1",
                             "profiling.active=2"]).profiling
    with StepProfiler(cfg, tmp_path, rank=1) as prof:
        for _ in range(6):
            torch.ones(32, 32) @ torch.ones(32, 32)
            prof.step()
    assert [p.name for p in prof.traces] == ["rank1.step4.pt.trace.json"]
    assert (tmp_path / "profile" / "rank1.step4.txt").read_text().strip()
    assert json.loads(prof.traces[0].read_text())["traceEvents"]
    off = StepProfiler(load_config(None, []).profiling, tmp_path / "off")
    off.step()
    off.stop()
    assert not (tmp_path / "off").exists()


def test_synthetic_shards_follow_the_length_distribution(tmp_path):
    out = synthetic_shards(tmp_path, "synthetic:uniform:10:20", num_samples=8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 8
    with tarfile.open(out / manifest["splits"]["train"]["shards"][0]) as tf:
        records = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
        assert sum(m.name.endswith(".jpg") for m in tf.getmembers()) == 8
    assert len(records) == 8 and all(10 <= len(r["answer"].split()) < 20 for r in records)


def _record(step, tokens, slots, dt, **kw):
    rec = {"step": step, "tokens": tokens, "token_slots": slots, "step_time_s": dt, "tokens_per_s": tokens / dt,
           "tokens_per_s_per_device": tokens / dt / 2, "samples_per_s": 1.0, "images_per_s": 1.0,
           "image_token_share": 0.4, "model_flops": 1e9, "mfu": None, "data_wait_s": 0.1, "forward_s": 0.2,
           "backward_s": 0.4, "optimizer_s": 0.1, "other_s": 0.2, "straggler_ratio": 1.1, "rss_peak_gib": 1.0,
           "rss_peak_delta_gib": 0.5}
    rec.update(kw)
    return rec


def test_aggregate_ratio_and_report(tmp_path):
    packed = [_record(1, 100, 1000, 5.0)] + [_record(i, 900, 1000, 1.0) for i in (2, 3)]
    padded = [_record(1, 100, 1000, 5.0)] + [_record(i, 300, 1000, 1.0) for i in (2, 3)]
    a, b = aggregate(packed, warmup=1), aggregate(padded, warmup=1)
    both = combine_repeats([{**a, "records": packed[1:], "wall_s": 1.0},
                            {**b, "records": padded[1:], "wall_s": 2.0, "rss_peak_gib": 3.0}])
    assert both["tokens_per_s"] == 600 and both["repeat_tokens_per_s"] == [900, 300] and both["wall_s"] == 3.0
    assert both["rss_peak_gib"] == 3.0 and "records" not in both
    assert a["tokens_per_s"] == 900 and a["packing_efficiency"] == 0.9 and a["world_size"] == 2
    assert a["data_wait_frac"] == pytest.approx(0.1) and a["mfu"] is None
    results = [{"point": vars(BenchPoint("packed-256", seq_len=256)), **a, "planned_gib": 0.2},
               {"point": vars(BenchPoint("padded-256", seq_len=256, packing=False)), **b, "planned_gib": 0.2},
               {"point": vars(BenchPoint("packed-512-eager", attn_implementation="eager")), "returncode": 1,
                "error": "boom"}]
    longest = [_record(i, 900, 920, 0.9) for i in (2, 3)]
    results.append({"point": vars(BenchPoint("packed-256-longest", seq_len=256, padding="longest",
                                             extra=["packing.pad_to_multiple_of=8"])),
                    **aggregate(longest, warmup=0)})
    (ratio,) = packing_ratios(results)  # the longest-rows point has no padded twin
    assert ratio["seq_len"] == 256 and ratio["ratio"] == pytest.approx(3.0)
    (layout,) = layout_ratios(results)
    assert layout["max_length"] == "packed-256" and layout["ratio"] == pytest.approx(1000 / 900)
    assert ratio["efficiency_ratio"] == pytest.approx(3.0) and ratio["slot_rate_ratio"] == pytest.approx(1.0)
    env = {"gpu": None, "cpu": "test cpu", "cpu_count": 2, "torch": "t", "transformers": "x", "deepspeed": "d",
           "python": "3", "phi3v_train": "0", "platform": "p", "git_commit": None}
    write_report(results, tmp_path, {"command": "phi3v-train bench", "date": "today", "model": "tiny", "data": "luma",
                                     "nproc": 2, "steps": 3, "warmup": 1, "environment": env})
    report = (tmp_path / "report.md").read_text()
    assert "**3.00x**" in report and "FAILED" in report and "boom" in report
    assert "**1.11x**" in report and "on (rows: longest)" in report
    assert json.loads((tmp_path / "results.json").read_text())["packing_vs_padding"][0]["ratio"] == pytest.approx(3.0)
    for png in ("tokens_memory_vs_seq_len.png", "step_breakdown.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_cli_packing_beats_padding(tmp_path):
    """The real CLI: two 2-rank ZeRO-3 training runs on the Luma photos, packed vs padded at 256."""
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "phi3v_train.cli", "bench", "train", "--grid", "quick", "--steps", "2", "--warmup",
           "1", "--out", str(out), "--work-dir", str(tmp_path), "--timeout", "240", "--no-warmup-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    (ratio,) = res["packing_vs_padding"]
    assert ratio["ratio"] > 1.5, ratio  # packed ~80% of slots used, padded ~27% at 256 tokens
    r = res["results"][0]
    for key in ("tokens_per_s", "all_tokens_per_s", "tflops_per_device", "forward_s", "backward_s", "optimizer_s",
                "data_wait_frac", "rss_peak_delta_gib", "planned_gib", "straggler_ratio_max"):
        assert r[key] is not None and r[key] >= 0, key
    assert r["mfu"] is None  # CPU: no peak unless logging.peak_tflops is set
    metrics = [json.loads(x) for x in (tmp_path / "runs/packed-256/metrics.jsonl").read_text().splitlines()]
    assert {"samples_per_s", "images_per_s", "padding_share", "image_token_share", "rank_busy_s_max",
            "rss_peak_gib"} <= set(metrics[-1])
    assert (out / "report.md").exists() and (out / "step_breakdown.png").exists()


@pytest.mark.slow
def test_gpu_check_tiny_mode_on_cpu(tmp_path):
    """bench/gpu_check.sh in its CI mode: tiny model, bf16 ZeRO-3 with the optimizer offloaded (the
    GPU configuration), one short length."""
    out = tmp_path / "gc.jsonl"
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench/gpu_check.sh"), "--tiny", "--precision", "bf16",
                           "--offload", "on", "--seq-lens", "256", "--steps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["seq_len"] == 256 and row["tokens_per_s"] > 0 and row["planned_gib"] > 0
    assert "L=256:" in proc.stdout and "tokens/s" in proc.stdout


def test_unpacked_mode_gives_one_sample_per_row():
    """packing.enabled=false (the padded baseline): the packer emits every sample alone, in order."""
    from phi3v_train.data.pack import Packer

    samples = [_sample(n) for n in (5, 7, 40, 3)]
    packs = list(Packer(iter(samples), max_seq_len=32, buffer_size=8).singletons())
    assert [[s["key"] for s in p] for p in packs] == [["5"], ["7"], ["3"]]  # the 40-token sample is dropped
    batch = collate_packs(packs[:2], 32, crop_size=56)
    assert batch["num_tokens"] == 12 and batch["input_ids"].shape == (2, 32)
