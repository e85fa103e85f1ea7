"""Packing (pack.py) and collation (collate.py) on plain synthetic samples."""

import random

import pytest
import torch

from phi3v_train.data.collate import IGNORE_INDEX, IMAGE_TOKEN_ID, collate_packs, image_token_runs
from phi3v_train.data.pack import Packer, best_fit_decreasing, packing_efficiency

S = 4  # crop size of the synthetic pixel tensors


def make_sample(key: str, num_tokens: int, num_prompt: int = 2, num_crops: int = 0,
                num_images: int = 0, fill: float = 0.0) -> dict:
    """A processor-like sample: ids 1000+i, one image token per image at 0, 2, 4, ... (each its
    own run), labels on the answer part, constant-valued crops."""
    ids = torch.arange(1000, 1000 + num_tokens)  # [T]
    ids[0:2 * num_images:2] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:num_prompt] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.full((num_crops, 3, S, S), fill),  # [C, 3, S, S]
        "image_sizes": torch.full((num_images, 2), S, dtype=torch.long),  # [I, 2]
        "key": key,
    }


@pytest.mark.parametrize("max_len", [16, 100, 1000])
def test_bfd_packs_fit_and_cover_every_index_once(max_len):
    rng = random.Random(max_len)
    lengths = [rng.randint(1, max_len) for _ in range(300)]
    images = [rng.randint(0, 3) for _ in lengths]
    packs = best_fit_decreasing(lengths, max_len, max_images_per_pack=4, images=images)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for p in packs:
        assert p == sorted(p)
        assert sum(lengths[i] for i in p) <= max_len
        assert sum(images[i] for i in p) <= 4


def test_bfd_known_set_and_efficiency():
    lengths = [6, 5, 4, 3, 2]
    packs = best_fit_decreasing(lengths, 10)
    assert packs == [[0, 2], [1, 3, 4]]  # 6+4 and 5+3+2: best fit fills both exactly
    assert packing_efficiency([sum(lengths[i] for i in p) for p in packs], 10) == 1.0
    packs = best_fit_decreasing([7, 7, 7, 3], 10)
    assert packs == [[0, 3], [1], [2]]
    assert packing_efficiency([10, 7, 7], 10) == pytest.approx(24 / 30)
    assert packing_efficiency([], 10) == 0.0


def test_bfd_rejects_oversized_items():
    with pytest.raises(ValueError, match="exceeds a pack"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="needs images"):
        best_fit_decreasing([3], 10, max_images_per_pack=1)


def test_packer_drops_long_samples_and_emits_the_rest_once():
    samples = [make_sample(f"s{i}", n) for i, n in enumerate([5, 40, 9, 33, 7, 2, 17, 12])]
    dropped = []
    packer = Packer(iter(samples), max_seq_len=32, buffer_size=3, on_drop=dropped.append)
    packs = list(packer)
    assert packer.num_dropped == 2 and [s["key"] for s in dropped] == ["s1", "s3"]
    keys = [s["key"] for p in packs for s in p]
    assert sorted(keys) == sorted(["s0", "s2", "s4", "s5", "s6", "s7"])
    assert all(sum(len(s["input_ids"]) for s in p) <= 32 for p in packs)
    assert packer.num_samples == 6 and packer.num_packs == len(packs)


def test_packer_is_deterministic_and_efficient():
    rng = random.Random(0)
    lengths = [rng.randint(300, 3000) for _ in range(3000)]

    def run():
        samples = ({"input_ids": torch.empty(n, dtype=torch.long), "key": str(i)}
                   for i, n in enumerate(lengths))
        packer = Packer(samples, max_seq_len=16384, buffer_size=64)
        return packer, [[s["key"] for s in p] for p in packer]

    packer, packs = run()
    assert packs == run()[1]
    assert sorted(int(k) for p in packs for k in p) == list(range(len(lengths)))
    # steady state (all but the flushed tail) is >= 99%; overall including the tail ~99%
    fills = [sum(lengths[int(k)] for k in p) for p in packs]
    assert packing_efficiency(fills[:-3], 16384) >= 0.99
    assert packer.efficiency == pytest.approx(packing_efficiency(fills, 16384))


def test_packer_respects_image_cap():
    samples = [make_sample(f"s{i}", 4, num_crops=1, num_images=2) for i in range(10)]
    packs = list(Packer(samples, max_seq_len=100, buffer_size=4, max_images_per_pack=4))
    assert all(len(p) <= 2 for p in packs)
    assert sum(len(p) for p in packs) == 10


def test_collate_layout():
    L = 16
    a = make_sample("a", 5, num_prompt=2, num_crops=2, num_images=1, fill=1.0)
    b = make_sample("b", 4, num_prompt=1, num_crops=0, num_images=0)
    c = make_sample("c", 7, num_prompt=3, num_crops=3, num_images=1, fill=3.0)
    d = make_sample("d", 16, num_prompt=4, num_crops=1, num_images=1, fill=4.0)
    batch = collate_packs([[a, b], [c], [d]], max_seq_len=L, crop_size=S)

    for name in ("input_ids", "labels", "position_ids"):
        assert batch[name].shape == (3, L)
    # position_ids restart per sample; the padding tail is its own segment from 0
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3] + list(range(7))
    assert batch["position_ids"][1].tolist() == list(range(7)) + list(range(9))
    assert batch["position_ids"][2].tolist() == list(range(16))
    # cu_seqlens over the flattened B*L tokens: a(5) b(4) pad(7) | c(7) pad(9) | d(16)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 16, 23, 32, 48]
    assert batch["max_seqlen"] == 16
    # segments from position_ids (a restart at 0 opens one) == segments from cu_seqlens
    flat_pos = batch["position_ids"].flatten()
    assert torch.nonzero(flat_pos == 0).flatten().tolist() == batch["cu_seqlens"][:-1].tolist()
    # padding: pad id and label -100
    assert batch["input_ids"][0, 9:].eq(32000).all() and batch["labels"][0, 9:].eq(-100).all()
    assert batch["labels"][1, 7:].eq(-100).all()
    # first token of every sample is -100 (b has num_prompt=1 but its first label must go anyway)
    for row, start in [(0, 0), (0, 5), (1, 0), (2, 0)]:
        assert batch["labels"][row, start] == IGNORE_INDEX
    assert batch["labels"][0, 5:9].tolist() == [-100, 1001, 1002, 1003]
    # label tokens: a 5-2, b 4-1, c 7-3, d 16-4
    assert batch["num_label_tokens"] == 3 + 3 + 4 + 12
    assert batch["num_tokens"] == 5 + 4 + 7 + 16
    assert batch["num_samples"] == 4 and batch["sample_keys"] == ["a", "b", "c", "d"]
    # crops concatenated in sample order: a(2) c(3) d(1)
    assert batch["pixel_values"].shape == (6, 3, S, S)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1, 1, 3, 3, 3, 4]
    assert batch["image_sizes"].shape == (3, 2) and batch["image_sizes"].dtype == torch.long


def test_collate_without_images_and_errors():
    batch = collate_packs([[make_sample("t", 3)]], max_seq_len=8, crop_size=S)
    assert batch["pixel_values"].shape == (0, 3, S, S)
    assert batch["image_sizes"].shape == (0, 2)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8]
    with pytest.raises(ValueError, match="does not fit"):
        collate_packs([[make_sample("x", 5), make_sample("y", 5)]], max_seq_len=8, crop_size=S)
    with pytest.raises(ValueError):
        collate_packs([], max_seq_len=8)


def test_collate_rows_of_the_longest_pack():
    """padding="longest": rows are the longest pack rounded up to pad_to_multiple_of, capped at
    max_seq_len; the layout inside a row is the max_length one cut short."""
    packs = [[make_sample("a", 5), make_sample("b", 4)], [make_sample("c", 7)]]
    full = collate_packs(packs, 32, crop_size=S)
    for multiple, expected in [(1, 9), (4, 12), (8, 16), (64, 32)]:  # 64: capped at max_seq_len
        batch = collate_packs(packs, 32, crop_size=S, padding="longest", pad_to_multiple_of=multiple)
        assert batch["input_ids"].shape == (2, expected)
        for name in ("input_ids", "labels", "position_ids"):
            assert torch.equal(batch[name], full[name][:, :expected])
        assert batch["cu_seqlens"][-1] == 2 * expected and batch["num_tokens"] == full["num_tokens"]
        pos = batch["position_ids"].flatten()
        assert torch.nonzero(pos == 0).flatten().tolist() == batch["cu_seqlens"][:-1].tolist()
    # a full row needs no padding segment at all
    assert collate_packs([[make_sample("d", 8)]], 32, padding="longest", pad_to_multiple_of=8)["cu_seqlens"].tolist() == [0, 8]
    for bad in [{"padding": "longestt"}, {"padding": "longest", "pad_to_multiple_of": 0}]:
        with pytest.raises(ValueError, match="padding="):
            collate_packs(packs, 32, **bad)


def test_collate_longest_counts_padding_images():
    """The row holds the padding images too: 2 blank images of 3 tokens after a 4-token sample."""
    a = make_sample("a", 4, num_crops=1, num_images=1)
    batch = collate_packs([[a]], 64, crop_size=S, pad_images_to=3, pad_image_tokens=3, padding="longest",
                          pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (1, 12) and batch["num_pad_images"] == 2
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 10, 12]


# --- best_fill, padding images, image positions ---------------------------------------------

def test_best_fill_is_an_exact_subset_sum():
    import itertools

    from phi3v_train.data.pack import best_fill

    rng = random.Random(1)
    for _ in range(200):
        n, cap = rng.randint(1, 8), rng.randint(5, 60)
        lengths = [rng.randint(0, cap) for _ in range(n)]
        images = [rng.randint(0, 3) for _ in range(n)]
        img_cap = rng.choice([None, 1, 2, 4])
        forced = rng.choice([None, *range(n)])
        if forced is not None and img_cap is not None and images[forced] > img_cap:
            continue
        got = best_fill(lengths, cap, img_cap, images, forced)
        best = max(sum(lengths[i] for i in sub)
                   for r in range(n + 1) for sub in itertools.combinations(range(n), r)
                   if (forced is None or forced in sub) and sum(lengths[i] for i in sub) <= cap
                   and (img_cap is None or sum(images[i] for i in sub) <= img_cap))
        assert got == sorted(got) and sum(lengths[i] for i in got) == best
        assert img_cap is None or sum(images[i] for i in got) <= img_cap
        assert forced is None or forced in got


@pytest.mark.parametrize("strategy", ["best_fill", "bfd"])
def test_packer_strategies_emit_everything_once_with_bounded_wait(strategy):
    rng = random.Random(2)
    lengths = [rng.choice([1700, 1960, 2390, 2550]) + rng.randint(0, 40) for _ in range(1500)]
    consumed = []

    def items():
        for i in range(len(lengths)):
            consumed.append(i)
            yield i

    packer = Packer(items(), 8192, 64, size=lambda i: (lengths[i], 1), strategy=strategy, max_images_per_pack=4)
    waits, seen = [], []
    for pack in packer:
        assert sum(lengths[i] for i in pack) <= 8192 and len(pack) <= 4 and pack == sorted(pack)
        waits += [len(consumed) - 1 - i for i in pack]
        seen += pack
    assert sorted(seen) == list(range(len(lengths)))
    assert max(waits) <= 4 * 2 * 64 + 64  # wait_factor x the (<= 2 x buffer_size) buffer, + a round


def test_packer_reserves_room_for_padding_images_and_collate_pads():
    samples = [make_sample(f"s{i}", n, num_prompt=2, num_crops=2 * k, num_images=k)
               for i, (n, k) in enumerate([(20, 1), (9, 2), (30, 1), (5, 0), (12, 2), (25, 1), (7, 1)])]
    L, K, p = 48, 3, 6
    packs = list(Packer(iter(samples), L, buffer_size=4, pad_images_to=K, pad_image_tokens=p))
    assert sorted(s["key"] for pk in packs for s in pk) == sorted(s["key"] for s in samples)
    batch = collate_packs(packs, L, crop_size=S, pad_images_to=K, pad_image_tokens=p)
    assert batch["image_sizes"].shape[0] == K * len(packs)
    assert batch["num_images"] == 8 and batch["num_pad_images"] == K * len(packs) - 8
    rows, cols = batch["image_positions"].unbind(1)
    assert batch["input_ids"][rows, cols].eq(IMAGE_TOKEN_ID).all()
    assert batch["pixel_values"].shape[0] == 2 * 8 + 2 * batch["num_pad_images"]
    # padding images are unlabelled segments of their own; real tokens are unchanged
    assert batch["num_tokens"] == sum(len(s["input_ids"]) for s in samples)
    assert batch["num_label_tokens"] == sum(len(s["input_ids"]) - 2 for s in samples)
    flat = batch["position_ids"].flatten()
    assert torch.nonzero(flat == 0).flatten().tolist() == batch["cu_seqlens"][:-1].tolist()
    with pytest.raises(ValueError, match="no room to pad"):
        collate_packs([[samples[0], samples[5]]], L, crop_size=S, pad_images_to=K, pad_image_tokens=p)


def test_collate_image_positions_and_empty_pack():
    a = make_sample("a", 6, num_crops=2, num_images=2)  # image tokens at 0 and 2
    b = make_sample("b", 5, num_crops=1, num_images=1)
    batch = collate_packs([[a, b], []], 16, crop_size=S)
    assert batch["image_positions"].tolist() == [[0, 0], [0, 2], [0, 6]]
    assert batch["num_images"] == 3 and batch["input_ids"][1].eq(32000).all()
    assert image_token_runs(torch.tensor([IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 5, IMAGE_TOKEN_ID])) == [(0, 2), (3, 4)]
    with pytest.raises(ValueError, match="runs of image tokens"):
        collate_packs([[make_sample("c", 5, num_crops=1, num_images=1) | {"image_sizes": torch.ones(2, 2)}]], 8)
