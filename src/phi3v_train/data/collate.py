"""Collate packs of samples into the model's batch dict (contract: docs/architecture.md)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
PAD_TOKEN_ID = 32000  # <|endoftext|>


def collate_packs(
    packs: list[list[dict]],
    max_seq_len: int,
    pad_token_id: int = PAD_TOKEN_ID,
    crop_size: int = 336,
) -> dict:
    """Lay out ``B = len(packs)`` packs as rows of length ``L = max_seq_len``.

    Each row is its samples back to back, then a padding tail of ``pad_token_id``. Every sample,
    and the padding tail, is its own segment: ``position_ids`` restart at 0 and ``cu_seqlens``
    has a boundary at its start. The first token of every sample gets label -100 so no sample
    is predicted from the previous one (the model shifts labels left by one).

    Args:
        packs: B lists of samples, each a dict with ``input_ids`` LongTensor [T], ``labels``
            LongTensor [T], ``pixel_values`` FloatTensor [C, 3, S, S], ``image_sizes``
            LongTensor [I, 2] and ``key`` str (see docs/architecture.md).
        max_seq_len: L, tokens per row.
        pad_token_id: id written into the padding tail.
        crop_size: S, the crop side in pixels; only used for the shape of an empty
            ``pixel_values`` [0, 3, S, S] when no sample has an image.

    Returns:
        dict with ``input_ids``, ``labels``, ``position_ids`` LongTensor [B, L]; ``cu_seqlens``
        IntTensor [D + 1] (int32, D segments over the flattened B*L tokens, padding tails
        included); ``max_seqlen`` int (longest segment); ``pixel_values`` [C, 3, S, S] (all crops
        in sample order); ``image_sizes`` LongTensor [I, 2]; ``num_tokens`` (non-padding),
        ``num_label_tokens`` (labels != -100), ``num_samples`` ints; ``sample_keys`` list[str].

    Raises:
        ValueError: no packs, an empty sample, a pack longer than ``max_seq_len``, or a sample
            whose ``labels`` length differs from its ``input_ids`` length.
    """
    if not packs:
        raise ValueError("collate_packs needs at least one pack")
    B, L = len(packs), max_seq_len
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seg_lens: list[int] = []
    pixel_values, image_sizes, keys = [], [], []
    for b, pack in enumerate(packs):
        pos = 0
        for sample in pack:
            ids, lab = sample["input_ids"], sample["labels"]  # [T], [T]
            T = int(ids.shape[0])
            if T == 0 or lab.shape[0] != T or pos + T > L:
                raise ValueError(f"sample {sample.get('key')!r}: {T} tokens, {lab.shape[0]} labels "
                                 f"at offset {pos} does not fit a row of {L} (empty, mismatched, "
                                 "or pack too long: pack with Packer(max_seq_len=L))")
            input_ids[b, pos:pos + T] = ids
            labels[b, pos:pos + T] = lab
            labels[b, pos] = IGNORE_INDEX  # a sample is never predicted from the previous one
            position_ids[b, pos:pos + T] = torch.arange(T)
            seg_lens.append(T)
            pos += T
            pv = sample.get("pixel_values")
            if pv is not None and pv.shape[0] > 0:
                pixel_values.append(pv)  # [C_i, 3, S, S]
            sizes = sample.get("image_sizes")
            if sizes is not None and sizes.shape[0] > 0:
                image_sizes.append(sizes)  # [I_i, 2]
            keys.append(sample.get("key", ""))
        if pos < L:  # padding tail: its own segment counting from 0
            position_ids[b, pos:] = torch.arange(L - pos)
            seg_lens.append(L - pos)

    cu_seqlens = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int32), 0)
    num_tokens = sum(len(s["input_ids"]) for pack in packs for s in pack)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(seg_lens),
        "pixel_values": (torch.cat(pixel_values) if pixel_values
                         else torch.zeros(0, 3, crop_size, crop_size)),
        "image_sizes": (torch.cat(image_sizes).long() if image_sizes
                        else torch.zeros(0, 2, dtype=torch.long)),
        "num_tokens": num_tokens,
        "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
        "num_samples": len(keys),
        "sample_keys": keys,
    }
