"""Greedy generation for `Phi3VForCausalLM`, which has no KV cache.

Each step re-runs the whole batch (prompt + tokens so far, CLIP included) and takes the argmax
at every row's last real token. Rows are right-padded with `<|endoftext|>` (32000) and use the
default positions 0..T-1: under a causal mask a real token never attends to the padding after
it, so no attention mask is needed and every row's logits equal those of the row alone.

Cost: one step costs a full forward over the longest row, so a generation of n tokens costs
about n prefills. That is fine for the tiny model and for short answers (the reference answer is
<= 38 tokens); for the real model (~2.5k image tokens per image at num_crops=16) it is ~40x the
cost of a cached decoder, and all B x T x 32064 logits are materialised each step (a model with a
KV cache and `logits_to_keep` would remove both costs).

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
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    from . import dist as phi_dist

    t = torch.tensor([int(flag)], dtype=torch.int32, device=phi_dist.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
        sync: `sync(local_any_running) -> global_any_running`, called before every step; under
            ZeRO-3 pass `any_rank` and give every rank the same number of prompts, so that all
            ranks run the same number of forwards. Without it a batch stops when its rows stop.
        device: where inputs go (default: the device of the model's first parameter, else CPU).

    Returns:
        One `Generation` per prompt, in order.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        results += _generate_batch(model, prompts[start:start + batch_size], max_new_tokens, stop_token_id,
                                   pad_token_id, banned_token_ids, vocab_limit, sync, device)
    return results


def _generate_batch(model, batch, max_new_tokens, stop_token_id, pad_token_id, banned_token_ids, vocab_limit,
                    sync, device) -> list[Generation]:
    lengths = [int(p["input_ids"].numel()) for p in batch]
    buf = torch.full((len(batch), max(lengths) + max_new_tokens), pad_token_id, dtype=torch.long)
    for i, p in enumerate(batch):
        buf[i, :lengths[i]] = p["input_ids"]
    pixel_values = torch.cat([p["pixel_values"] for p in batch]).to(device)
    image_sizes = torch.cat([p["image_sizes"].reshape(-1, 2) for p in batch]).to(device)
    out: list[list[int]] = [[] for _ in batch]
    running = [True] * len(batch)
    rows = torch.arange(len(batch))
    for _ in range(max_new_tokens):
        if not (sync(any(running)) if sync is not None else any(running)):
            break
        logits = model(input_ids=buf[:, :max(lengths)].to(device), pixel_values=pixel_values,
                       image_sizes=image_sizes).logits
        last = logits[rows.to(logits.device), torch.tensor(lengths, device=logits.device) - 1].float()  # [B, V]
        if vocab_limit is not None and vocab_limit < last.shape[-1]:
            last[:, vocab_limit:] = float("-inf")
        banned = [t for t in banned_token_ids if 0 <= t < last.shape[-1]]
        if banned:
            last[:, banned] = float("-inf")
        next_ids = last.argmax(-1).tolist()
        for i, tok in enumerate(next_ids):
            if not running[i]:
                continue
            if tok == stop_token_id:
                running[i] = False
                continue
            out[i].append(tok)
            buf[i, lengths[i]] = tok
            lengths[i] += 1
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
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    out: list[AnswerScore] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        width = max(int(s["input_ids"].numel()) for s in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, s in enumerate(batch):
            n = int(s["input_ids"].numel())
            ids[i, :n], labels[i, :n] = s["input_ids"], s["labels"]
        logits = model(input_ids=ids.to(device), pixel_values=torch.cat([s["pixel_values"] for s in batch]).to(device),
                       image_sizes=torch.cat([s["image_sizes"].reshape(-1, 2) for s in batch]).to(device)).logits
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
