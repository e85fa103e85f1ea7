"""Packing efficiency on real token lengths (lengths only, no pixels): the bundled Luma shards at
num_crops=16, crop 336, and Phi-3-V-like mixed lengths.

The Luma photos are all 413x512 or 512x512: 2509 image tokens each, 2546..2563 tokens per sample.
Whole samples then fit floor(L / 2546) per pack (1 at 4K, 3 at 8K, 6 at 16K, 12 at 32K, 51 at
128K), which caps slot use at 62.3 / 93.4 / 93.4 / 93.4 / 99.1..99.6%: the packers must reach that
cap; the >= 99% target holds at 128K. Where lengths vary (other aspect ratios, text lengths) the
default best_fill packer reaches >= 99% from 16K on.
"""

import random
from pathlib import Path

import pytest

from phi3v_train.bench_data import efficiency_table, manifest_lengths, whole_sample_bound
from phi3v_train.data.pack import packing_efficiency, simulate_packing
from phi3v_train.data.shards import write_shards
from phi3v_train.model.processor import hd_size, num_image_tokens

LUMA = Path(__file__).resolve().parents[1] / "data" / "luma"
SEQ_LENS = (4096, 8192, 16384, 32768, 131072)


@pytest.fixture(scope="module")
def luma_lengths(tmp_path_factory):
    manifest = write_shards(LUMA / "products.csv", LUMA, tmp_path_factory.mktemp("luma"), seed=0)
    assert manifest["lengths"] == {**manifest["lengths"], "num_crops": 16, "crop_size": 336}
    return manifest_lengths(manifest, "train") + manifest_lengths(manifest, "val")


def test_luma_lengths_are_the_real_token_counts(luma_lengths):
    assert len(luma_lengths) == 183
    assert 2546 <= min(luma_lengths) and max(luma_lengths) <= 2563  # 2509 image tokens + text


def test_luma_packing_reaches_the_whole_sample_bound(luma_lengths):
    rows = efficiency_table(luma_lengths, SEQ_LENS, num_samples=3000, seed=0)
    eff = {(r["max_seq_len"], r["strategy"]): r["efficiency"] for r in rows}
    for r in rows:
        # at the bound (which holds for the average over all packs; the flushed tail is left out)
        assert abs(r["efficiency"] - r["bound"]) <= 0.001, r
    assert eff[131072, "best_fill"] >= 0.99
    assert eff[8192, "best_fill"] >= 0.93 and eff[16384, "best_fill"] >= 0.93 and eff[32768, "best_fill"] >= 0.93
    assert whole_sample_bound(luma_lengths, 16384) < 0.94  # why 99% at 16K-32K is out of reach here


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    """Phi-3-V samples at num_crops=16: common product-photo aspect ratios, 37..54 text tokens."""
    sizes = [(512, 512), (413, 512), (640, 480), (480, 640), (1280, 720), (720, 1280), (600, 900),
             (900, 600), (500, 1000), (1000, 500), (800, 300)]
    rng = random.Random(seed)
    return [num_image_tokens(*hd_size(*rng.choice(sizes), 16)) + rng.randint(37, 54) for _ in range(n)]


@pytest.mark.parametrize("max_seq_len,target", [(16384, 0.99), (32768, 0.99), (131072, 0.99)])
def test_mixed_lengths_best_fill_reaches_99_percent(max_seq_len, target):
    lengths = mixed_lengths(3000)
    fills, flushed = simulate_packing(lengths, max_seq_len, 64)
    best = packing_efficiency(fills[:-flushed], max_seq_len)
    fills, flushed = simulate_packing(lengths, max_seq_len, 64, strategy="bfd")
    bfd = packing_efficiency(fills[:-flushed], max_seq_len)
    assert best >= target and best >= bfd


@pytest.mark.parametrize("max_seq_len,target", [(8192, 0.99), (16384, 0.99), (32768, 0.99), (131072, 0.99)])
def test_uniform_lengths_reach_99_percent(max_seq_len, target):
    rng = random.Random(1)
    lengths = [rng.randint(300, 3000) for _ in range(3000)]
    fills, flushed = simulate_packing(lengths, max_seq_len, 64)
    assert packing_efficiency(fills[:-flushed], max_seq_len) >= target
