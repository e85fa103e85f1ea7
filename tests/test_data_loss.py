"""Packed, collated micro-batches give the loss of unpacked training on the same samples.

The trainer divides every micro-batch's summed cross-entropy by the label tokens of the whole
global batch (``num_items_in_batch`` = sum of ``num_label_tokens`` over ranks and micro-steps),
so the sum over 2 ranks x 2 micro-steps of packed losses equals the token mean over the samples
run one by one. Tiny model on CPU, fp32.
"""

import torch

from phi3v_train.data.collate import collate_packs
from phi3v_train.data.pack import Packer
from phi3v_train.model.config import load_model_config
from test_model import alone, make_sample, tiny_model


def test_packed_global_batch_loss_equals_unpacked_token_mean():
    tiny_config = load_model_config("tiny")
    crops = [[(1, 2)], [], [(2, 1), (1, 1)], [(1, 1)], [(2, 2)], [], [(1, 3)], [(1, 1)], [(2, 1)], []]
    samples = [dict(make_sample(tiny_config, c, seed=30 + i), key=f"s{i}") for i, c in enumerate(crops)]
    L = max(len(s["input_ids"]) for s in samples) + 24
    packs = list(Packer(iter(samples), L, buffer_size=4))
    assert len(packs) >= 4 and sum(len(p) for p in packs) == len(samples) and max(len(p) for p in packs) > 1
    # 2 ranks x 2 micro-steps, rows dealt round robin (uneven label counts per micro-batch)
    micro = [collate_packs(packs[i::4], L, crop_size=tiny_config.crop_size) for i in range(4)]
    num_items = sum(b["num_label_tokens"] for b in micro)
    assert len({b["num_label_tokens"] for b in micro}) > 1  # a per-micro-batch mean would differ
    model = tiny_model("sdpa")
    with torch.no_grad():
        packed = sum(model(**b, num_items_in_batch=num_items).loss for b in micro)
        summed = sum(model(**alone(s), num_items_in_batch=1).loss for s in samples)
    labelled = sum(int((s["labels"] != -100).sum()) for s in samples)
    assert num_items == labelled
    torch.testing.assert_close(packed, summed / labelled, rtol=1e-5, atol=1e-6)
