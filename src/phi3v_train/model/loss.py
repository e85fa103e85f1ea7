"""Chunked cross-entropy: the LM-head logits are never materialised for the whole batch.

Full logits cost N x V x 4 bytes in fp32 (8k tokens x 32064 vocab = 1 GiB, plus the same again for
their gradient). Here each chunk of `chunk_size` tokens is projected, reduced to a summed loss and
discarded; `torch.utils.checkpoint` recomputes the chunk's logits in the backward pass, so the peak
is one chunk's logits (4096 x 32064 x 4 B = 0.5 GiB fp32) instead of all of them.
Measured on CPU (`bench/memory_loss.py`, numbers in docs/model.md).

On CUDA with liger-kernel installed, `liger_linear_cross_entropy` (Liger's fused linear
cross-entropy, Triton) does the same in one fused call.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, ignore_index: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk: hidden [n, D], labels [n] -> scalar."""
    logits = lm_head(hidden).float()  # [n, V]; a module call, so ZeRO-3 hooks gather the weight
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    skip_empty_chunks: bool = True,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies of `lm_head(hidden)` against `labels`, chunk by chunk.

    Args:
        hidden: [N, D] final hidden states (already aligned with `labels`: the caller shifts).
        lm_head: the output projection, called as a module (`lm_head(chunk)`) and never through its
            `.weight`: under ZeRO-3 the weight only exists inside the module's forward hooks.
        labels: [N] target ids, `ignore_index` where no loss is taken.
        chunk_size: tokens per chunk (peak memory ~ chunk_size x vocab x 4 bytes).
        skip_empty_chunks: skip chunks whose labels are all `ignore_index`. Under ZeRO-3 with more
            than one rank this must be False: every `lm_head` call all-gathers its weight, so all
            ranks must make the same number of calls or the collectives mismatch (checked: gloo
            aborts).
        num_chunks: run exactly this many chunks (>= ceil(N / chunk_size)); the ones past the end
            call `lm_head` on an empty slice and add 0. Under ZeRO-3, pass the largest count over
            the ranks when N differs between them (rows of the longest pack).

    Returns:
        (loss_sum, num_tokens): fp32 scalar sum over labelled tokens (divide by the global token
        count yourself), and the number of labelled tokens as an int.
        When nothing is computed the sum is `0 * hidden.sum()`, so backward still works.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, D] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    num_total = labels.numel()
    needed = -(-num_total // chunk_size)
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} < {needed} chunks of {chunk_size} for {num_total} tokens")
    # Labelled tokens per chunk in one device-to-host sync (not one per chunk).
    valid = F.pad(labels != ignore_index, (0, -num_total % chunk_size))
    counts = valid.view(-1, chunk_size).sum(dim=1).tolist() if num_total else []
    counts += [0] * ((num_chunks or needed) - needed)  # empty slices: an lm_head call each, no loss
    starts = range(0, len(counts) * chunk_size, chunk_size)
    loss_sum = None
    for start, count in zip(starts, counts):
        if skip_empty_chunks and count == 0:
            continue
        end = start + chunk_size
        part = checkpoint(_chunk_loss, hidden[start:end], labels[start:end], lm_head, ignore_index, use_reentrant=False)
        loss_sum = part if loss_sum is None else loss_sum + part
    if loss_sum is None:
        loss_sum = hidden.sum().float() * 0.0
    return loss_sum, int(sum(counts))


def liger_available() -> bool:
    """True when the liger-kernel package is importable (it needs Triton, i.e. a GPU build)."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed fp32 cross-entropy of `hidden @ weight.T` against `labels` with Liger's fused kernel.

    hidden [N, D], weight [V, D] (use it inside the owning module's forward under ZeRO-3), labels [N].
    CUDA only; the gradients of hidden and weight are computed in the forward, chunk by chunk.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, hidden, labels)
    loss = loss[0] if isinstance(loss, tuple) else loss  # some versions return (loss, z_loss)
    return loss.float()
