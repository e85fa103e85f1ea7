"""Greedy generation for `Phi3VForCausalLM`: batched, with a KV cache.

Cached (models with `supports_generation_cache`, i.e. `Phi3VForCausalLM`): the prompts are
left-padded with `<|endoftext|>` (32000) under an attention mask, positions count from each row's
first real token, one forward runs all prompts (CLIP included) into a transformers `DynamicCache`,
then every step feeds one token per row; only the last position's logits are computed
(`logits_to_keep=1`). A row's logits equal those of the row alone. One exception is sent down the
uncached path: a longrope row that would cross `original_max_position_embeddings` (4096) while
generating, since its prompt was encoded with the short factors that the longer sequence no
longer uses.

Uncached (any model called as `model(input_ids, position_ids, pixel_values, image_sizes).logits`):
each step re-runs the whole batch, right-padded; the padding tail of a row is its own document
(positions restart at 0), so it neither sees the row nor makes a short row look long to longrope.
A generation of n tokens costs about n prefills.

Under ZeRO-3 every forward all-gathers parameters collectively, so all ranks must run the same
number of forwards: callers give every rank the same number of prompts (pad with dummies) and
pass `sync`, which all-reduces "any row still running" before every step (see `any_rank`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model.processor import END_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID


@dataclass
class Generation:
    """One generated continuation.

    Attributes:
        token_ids: generated ids, without the stop token.
        stopped: the stop token was generated within `max_new_tokens`.
    """

    token_ids: list[int]
    stopped: bool


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (one all-reduce; a no-op without a process group)."""
    from .dist import max_over_ranks

    return bool(max_over_ranks(int(flag)))


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_token_id: int = END_TOKEN_ID,
    pad_token_id: int = PAD_TOKEN_ID,
    banned_token_ids: Sequence[int] = (IMAGE_TOKEN_ID,),
    vocab_limit: int | None = None,
    sync: Callable[[bool], bool] | None = None,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> list[Generation]:
    """Greedy decoding of `prompts` in batches of `batch_size`, stopping each row at `stop_token_id`.

    Args:
        model: called as `model(input_ids=[B, T], pixel_values=[C, 3, S, S], image_sizes=[I, 2])`,
            returning `.logits` [B, T, V] (Phi3VForCausalLM without labels).
        prompts: processor outputs without an answer (`input_ids` [T], `pixel_values`, `image_sizes`).
        max_new_tokens: most tokens generated per prompt (the stop token counts).
        batch_size: prompts per forward.
        stop_token_id: ends a row (`<|end|>` = 32007, the Phi-3 turn end; not config.json's eos 2).
        pad_token_id: right padding.
        banned_token_ids: never generated. Default the image placeholder 32044: fed back, it would
            make the next forward fail (image tokens without image features).
        vocab_limit: ids >= this are never generated (the tokenizer's size, 32045: the model's 32064
            rows include unused padding rows that no tokenizer can decode).
        sync: `sync(local_flag) -> flag on any rank`, called before every step (any row still
            running) and once per batch (any rank that cannot use the cache); under ZeRO-3 pass
            `any_rank` and give every rank the same number of prompts, so that all ranks run the
            same forwards through the same modules. Without it a batch stops when its rows stop.
        device: where inputs go (default: the device of the model's first parameter, else CPU).
        use_cache: decode with a KV cache where the model has one (see the module docstring).

    Returns:
        One `Generation` per prompt, in order.

    Raises:
        ValueError: ``max_new_tokens < 1`` or ``batch_size < 1``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    device = _input_device(model, device)
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cached = use_cache and _can_cache(model, [int(p["input_ids"].numel()) for p in batch], max_new_tokens)
        if sync is not None:  # ZeRO-3: the ranks run the same modules, so one uncached rank makes all uncached
            cached = not sync(not cached)
        step = _cached_steps if cached else _uncached_steps
        results += _generate_batch(step(model, batch, max_new_tokens, pad_token_id, device), len(batch), max_new_tokens,
                                   stop_token_id, banned_token_ids, vocab_limit, sync)
    return results


def _input_device(model, device) -> torch.device:
    """`device`, else the device of the model's first parameter, else the CPU."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _images(batch: Sequence[dict], device) -> dict:
    """The batch's crops and image sizes, concatenated in row order, on `device`."""
    return {"pixel_values": torch.cat([p["pixel_values"] for p in batch]).to(device),
            "image_sizes": torch.cat([p["image_sizes"].reshape(-1, 2) for p in batch]).to(device)}


def padded_positions(lengths: Sequence[int], width: int | None = None) -> torch.Tensor:
    """position_ids [B, width] of right-padded rows: 0..n-1 over a row's n tokens, then 0.. again
    over its padding, which is thereby a separate document (no attention to or from the row, and
    longrope sees the row's own length). ``width`` defaults to ``max(lengths)``."""
    width = max(lengths) if width is None else width
    pos = torch.arange(width).repeat(len(lengths), 1)  # [B, width]
    for i, n in enumerate(lengths):
        pos[i, n:] = torch.arange(width - n)
    return pos


def _can_cache(model, lengths: list[int], max_new_tokens: int) -> bool:
    """The model keeps a KV cache, and no longrope row crosses the short/long factor boundary."""
    if not getattr(model, "supports_generation_cache", False):
        return False
    rope = model.model.rotary_emb
    if getattr(rope, "is_longrope", False):  # prompt short (max position n - 1 < boundary), last fed
        boundary = rope.original_max_positions  # position n + max_new_tokens - 2 long: a crossing row
        return not any(n <= boundary <= n + max_new_tokens - 2 for n in lengths)
    return True


def _uncached_steps(model, batch, max_new_tokens, pad_token_id, device):
    """One batch as a generator: each ``next``/``send([(row, token), ...])`` appends the tokens of
    the rows still running, runs one forward and yields the logits at every row's last token [B, V]."""
    lengths = [int(p["input_ids"].numel()) for p in batch]
    buf = torch.full((len(batch), max(lengths) + max_new_tokens), pad_token_id, dtype=torch.long)
    for i, p in enumerate(batch):
        buf[i, :lengths[i]] = p["input_ids"]
    images = _images(batch, device)
    rows = torch.arange(len(batch))
    while True:
        logits = model(input_ids=buf[:, :max(lengths)].to(device), position_ids=padded_positions(lengths).to(device),
                       **images).logits
        appended = yield logits[rows.to(logits.device), torch.tensor(lengths, device=logits.device) - 1]
        for i, tok in appended:  # (row, token) of the rows still running
            buf[i, lengths[i]] = tok
            lengths[i] += 1


def _cached_steps(model, batch, max_new_tokens, pad_token_id, device):
    """As `_uncached_steps`, with a KV cache: prompts left-padded, one new token per row per step
    (rows that have stopped are fed padding, their logits ignored)."""
    from transformers import DynamicCache

    lengths = [int(p["input_ids"].numel()) for p in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - lengths[i]:], mask[i, width - lengths[i]:] = p["input_ids"], 1
    mask = mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: 0.. from each row's first real token
    cache = DynamicCache(config=model.config.text_config)
    logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1,
                   **_images(batch, device)).logits
    while True:
        appended = yield logits[:, -1]
        feed = torch.full((len(batch), 1), pad_token_id, dtype=torch.long)
        for i, tok in appended:
            feed[i, 0] = tok
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=feed.to(device), attention_mask=mask, position_ids=positions, cache=cache,
                       logits_to_keep=1).logits


def _generate_batch(steps, batch_size, max_new_tokens, stop_token_id, banned_token_ids, vocab_limit,
                    sync) -> list[Generation]:
    """Drive a step generator: one forward per step (all ranks alike under ZeRO-3 via `sync`)."""
    out: list[list[int]] = [[] for _ in range(batch_size)]
    running = [True] * batch_size
    appended = None
    for _ in range(max_new_tokens):
        if not (sync(any(running)) if sync is not None else any(running)):
            break
        last = (next(steps) if appended is None else steps.send(appended)).float()  # [B, V]: one forward
        if vocab_limit is not None and vocab_limit < last.shape[-1]:
            last[:, vocab_limit:] = float("-inf")
        banned = [t for t in banned_token_ids if 0 <= t < last.shape[-1]]
        if banned:
            last[:, banned] = float("-inf")
        appended = []
        for i, tok in enumerate(last.argmax(-1).tolist()):
            if not running[i]:
                continue
            if tok == stop_token_id:
                running[i] = False
                continue
            out[i].append(tok)
            appended.append((i, tok))
    steps.close()
    return [Generation(token_ids=o, stopped=not r) for o, r in zip(out, running)]


@dataclass
class AnswerScore:
    """Teacher-forced score of a known answer: summed cross-entropy (nats), tokens, argmax hits."""

    loss_sum: float
    num_tokens: int
    num_correct: int


@torch.no_grad()
def score_answers(
    model: torch.nn.Module,
    samples: Sequence[dict],
    *,
    batch_size: int = 8,
    pad_token_id: int = PAD_TOKEN_ID,
    device: torch.device | str | None = None,
) -> list[AnswerScore]:
    """Teacher-forced cross-entropy and next-token accuracy of the labelled tokens (the answer and its
    `<|end|>`) of processor samples (`input_ids`, `labels`, `pixel_values`, `image_sizes`).

    One forward per batch of `batch_size` right-padded rows: under ZeRO-3 give every rank the same
    number of samples (a sample without labels scores 0 tokens). Logits at t are scored against
    labels[t + 1], as in training; only the labelled positions are taken out of the logits.
    """
    device = _input_device(model, device)
    out: list[AnswerScore] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        width = max(int(s["input_ids"].numel()) for s in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, s in enumerate(batch):
            n = int(s["input_ids"].numel())
            ids[i, :n], labels[i, :n] = s["input_ids"], s["labels"]
        lengths = [int(s["input_ids"].numel()) for s in batch]
        logits = model(input_ids=ids.to(device), position_ids=padded_positions(lengths, width).to(device),
                       **_images(batch, device)).logits
        for i in range(len(batch)):
            pos = (labels[i, 1:] != -100).nonzero().flatten()  # logits positions t predicting labels[t + 1]
            if pos.numel() == 0:
                out.append(AnswerScore(0.0, 0, 0))
                continue
            row = logits[i, pos.to(logits.device)].float()  # [n, V]
            target = labels[i, pos + 1].to(row.device)
            loss = torch.nn.functional.cross_entropy(row, target, reduction="sum")
            out.append(AnswerScore(float(loss), int(pos.numel()), int((row.argmax(-1) == target).sum())))
    return out
