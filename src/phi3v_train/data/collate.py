"""Collate packs of samples into the model's batch dict (contract: docs/architecture.md)."""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

IGNORE_INDEX = -100
PAD_TOKEN_ID = 32000  # <|endoftext|>
IMAGE_TOKEN_ID = 32044  # <|image|>


def image_token_runs(input_ids: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID) -> list[tuple[int, int]]:
    """(start, end) of every run of consecutive image tokens in ``input_ids`` [T], in order.

    The processor separates images by text (every text chunk starts with BOS), so there is one
    run per image.
    """
    is_image = (input_ids == image_token_id).to(torch.int8)  # [T]
    if not bool(is_image.any()):
        return []
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))  # [T+1]
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of the samples' crops, without copying when they already lie back to back in one
    buffer (the stream writes them so, see ``PackedStream._materialize``); otherwise in a
    DataLoader worker straight into shared memory (as torch's default_collate does), so sending
    the batch to the trainer costs no second copy (~23 MB per sample at 17 crops of 336 px)."""
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset:
            break
        offset += t.numel()
    else:  # one buffer, in order: a view
        return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())
    if get_worker_info() is None:
        return torch.cat(tensors)
    numel = sum(t.numel() for t in tensors)
    out = first.new(first._typed_storage()._new_shared(numel, device=first.device))
    return torch.cat(tensors, out=out.resize_(sum(t.shape[0] for t in tensors), *first.shape[1:]))


PADDING = ("max_length", "longest")


def row_length(pack_num_tokens: list[int], max_seq_len: int, padding: str = "max_length",
               pad_to_multiple_of: int = 1) -> int:
    """Tokens per row of a batch whose packs hold ``pack_num_tokens`` tokens (padding images
    included): ``max_seq_len`` for ``padding="max_length"``; for ``"longest"`` the longest pack
    rounded up to a multiple of ``pad_to_multiple_of``, capped at ``max_seq_len`` (at least 1).

    Raises:
        ValueError: an unknown ``padding`` or ``pad_to_multiple_of < 1``.
    """
    if padding not in PADDING or pad_to_multiple_of < 1:
        raise ValueError(f"padding={padding!r} (use one of {PADDING}), pad_to_multiple_of="
                         f"{pad_to_multiple_of} (>= 1)")
    if padding == "max_length":
        return max_seq_len
    longest = max(pack_num_tokens, default=0)
    return max(1, min(max_seq_len, -(-longest // pad_to_multiple_of) * pad_to_multiple_of))


def _pack_tokens(pack: list[dict], pad_images_to: int | None, pad_image_tokens: int) -> int:
    """Tokens a pack takes in its row: its samples plus its padding images."""
    tokens = sum(int(s["input_ids"].shape[0]) for s in pack)
    if pad_images_to is None:
        return tokens
    images = sum(0 if s.get("image_sizes") is None else int(s["image_sizes"].shape[0]) for s in pack)
    return tokens + max(0, pad_images_to - images) * pad_image_tokens


def collate_packs(
    packs: list[list[dict]],
    max_seq_len: int,
    pad_token_id: int = PAD_TOKEN_ID,
    crop_size: int = 336,
    *,
    pad_images_to: int | None = None,
    pad_image_tokens: int = 0,
    image_token_id: int = IMAGE_TOKEN_ID,
    padding: str = "max_length",
    pad_to_multiple_of: int = 1,
) -> dict:
    """Lay out ``B = len(packs)`` packs as rows of ``L`` tokens.

    Row length (the names of Hugging Face tokenizers' ``padding=``): ``padding="max_length"``
    gives ``L = max_seq_len`` for every batch (static shapes); ``"longest"`` gives the longest
    pack of this batch rounded up to a multiple of ``pad_to_multiple_of``, at most
    ``max_seq_len``, so no compute is spent on the room a pack of whole samples leaves empty
    (varlen attention needs no fixed length; the memory peak is still set by ``max_seq_len``).

    Each row is its samples back to back, then a padding tail of ``pad_token_id``. Every sample,
    and the padding tail, is its own segment: ``position_ids`` restart at 0 and ``cu_seqlens``
    has a boundary at its start. The first token of every sample gets label -100 so no sample
    is predicted from the previous one (the model shifts labels left by one). An empty pack is
    a row of padding.

    Equal vision work (``pad_images_to``): every row is padded to exactly ``pad_images_to``
    images with blank 1x1-crop images (``image_sizes`` [S, S], 2 all-zero crops, the global
    view and one sub-crop), each a segment of ``pad_image_tokens`` image tokens with label -100
    placed right after the row's samples. Every micro-batch then runs the vision tower on
    ``B * pad_images_to`` images (crops still vary with the real images' sizes); the packer must
    have kept room for them (``Packer(pad_images_to=..., pad_image_tokens=...)``).

    Args:
        packs: B lists of samples, each a dict with ``input_ids`` LongTensor [T], ``labels``
            LongTensor [T], ``pixel_values`` FloatTensor [C, 3, S, S], ``image_sizes``
            LongTensor [I, 2] and ``key`` str (see docs/architecture.md).
        max_seq_len: the longest row allowed, tokens (L itself with ``padding="max_length"``).
        pad_token_id: id written into the padding tail.
        crop_size: S, the crop side in pixels: shape of an empty ``pixel_values`` [0, 3, S, S]
            and of the padding images.
        pad_images_to: images per row after padding (None: no padding images).
        pad_image_tokens: image tokens of one padding image, ``num_image_tokens(S, S)``.
        image_token_id: the ``<|image|>`` id, to find each image's first token.
        padding: ``"max_length"`` or ``"longest"`` (see above).
        pad_to_multiple_of: ``"longest"`` only: round the row length up to a multiple of this
            (e.g. 64 for tensor-core friendly shapes; 1 = no rounding).

    Returns:
        dict with ``input_ids``, ``labels``, ``position_ids`` LongTensor [B, L]; ``cu_seqlens``
        IntTensor [D + 1] (int32, D segments over the flattened B*L tokens, padding tails and
        padding images included); ``max_seqlen`` int (longest segment); ``pixel_values``
        [C, 3, S, S] (all crops in token order); ``image_sizes`` LongTensor [I, 2];
        ``image_positions`` LongTensor [I, 2] (row, offset of the image's first token);
        ``num_tokens`` (sample tokens: no padding, no padding images), ``num_label_tokens``
        (labels != -100), ``num_samples``, ``num_images`` (real), ``num_pad_images``,
        ``max_seq_len`` (the pack capacity, >= L) ints;
        ``sample_keys`` list[str].

    Raises:
        ValueError: no packs, an unknown ``padding`` or ``pad_to_multiple_of < 1``, an empty sample, a pack longer than ``max_seq_len`` (with its
            padding images), a sample whose ``labels`` length differs from its ``input_ids``
            length, a pack with more than ``pad_images_to`` images, or a sample whose image
            token runs do not match its ``image_sizes``.
    """
    if not packs:
        raise ValueError("collate_packs needs at least one pack")
    B, S = len(packs), crop_size
    L = row_length([_pack_tokens(p, pad_images_to, pad_image_tokens) for p in packs], max_seq_len,
                   padding, pad_to_multiple_of)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seg_lens: list[int] = []
    pixel_values, image_sizes, image_positions, keys = [], [], [], []
    num_tokens = num_images = num_pad_images = 0
    for b, pack in enumerate(packs):
        pos = row_images = 0
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
            pv = sample.get("pixel_values")
            if pv is not None and pv.shape[0] > 0:
                pixel_values.append(pv)  # [C_i, 3, S, S]
            sizes = sample.get("image_sizes")
            n_img = 0 if sizes is None else int(sizes.shape[0])
            if n_img:
                image_sizes.append(sizes)  # [I_i, 2]
                runs = image_token_runs(ids, image_token_id)
                if len(runs) != n_img:
                    raise ValueError(f"sample {sample.get('key')!r}: {len(runs)} runs of image tokens "
                                     f"but {n_img} image_sizes rows")
                image_positions += [(b, pos + start) for start, _ in runs]
            row_images += n_img
            keys.append(sample.get("key", ""))
            num_tokens += T
            pos += T
        num_images += row_images
        if pad_images_to is not None:
            missing = pad_images_to - row_images
            if missing < 0 or pos + missing * pad_image_tokens > L:
                raise ValueError(f"row {b}: {row_images} images and {pos} tokens leave no room to pad "
                                 f"to {pad_images_to} images of {pad_image_tokens} tokens in {L}: pack "
                                 "with Packer(pad_images_to=..., pad_image_tokens=...)")
            for _ in range(missing):  # blank image segments, label -100
                input_ids[b, pos:pos + pad_image_tokens] = image_token_id
                position_ids[b, pos:pos + pad_image_tokens] = torch.arange(pad_image_tokens)
                seg_lens.append(pad_image_tokens)
                dtype = pixel_values[0].dtype if pixel_values else torch.float32
                pixel_values.append(torch.zeros(2, 3, S, S, dtype=dtype))  # [2, 3, S, S]: global view + 1 crop
                image_sizes.append(torch.tensor([[S, S]]))
                image_positions.append((b, pos))
                pos += pad_image_tokens
            num_pad_images += missing
        if pos < L:  # padding tail: its own segment counting from 0
            position_ids[b, pos:] = torch.arange(L - pos)
            seg_lens.append(L - pos)

    cu_seqlens = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int32), 0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(seg_lens),
        "pixel_values": _cat(pixel_values) if pixel_values else torch.zeros(0, 3, S, S),
        "image_sizes": (torch.cat(image_sizes).long() if image_sizes
                        else torch.zeros(0, 2, dtype=torch.long)),
        "image_positions": torch.tensor(image_positions, dtype=torch.long).reshape(-1, 2),
        "num_tokens": num_tokens,
        "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
        "num_samples": len(keys),
        "num_images": num_images,
        "num_pad_images": num_pad_images,
        "max_seq_len": max_seq_len,
        "sample_keys": keys,
    }
