"""Model FLOPs of Phi-3-V training, the peak-FLOPS table, and MFU.

One function counts the work: :meth:`FlopModel.forward_flops` for the documents, crops and image
tokens of a (micro-)batch; training is 3x the forward pass (the backward pass does two matmuls
per forward matmul: grad wrt input and grad wrt weight). MFU = model FLOPs per second / peak.

Derivation (forward pass; a matmul [m, k] x [k, n] costs 2*m*k*n FLOPs):

- Language model, dense part. Every token goes through every weight matrix once, so a token costs
  2 * N forward FLOPs, N = the weights of all LM matmuls: per layer qkv_proj H*(n_h + 2*n_kv)*d_h,
  o_proj H*H, gate_up_proj H*2I, down_proj I*H, plus lm_head H*V. The input embedding is a lookup,
  not a matmul, and is excluded; RMSNorm gains (2LH + H) are excluded too (< 0.01% of N).
  Training: 6 * N per token (Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, app. B;
  torchtitan ``get_num_flop_per_token``) -- "6 x non-embedding parameters".
- Language model, attention scores. Per layer, QK^T and (softmax) x V are two [T, d_h] x [d_h, T]
  sized matmuls per head: 2 * 2 * T^2 * n_h * d_h = 4 * T^2 * H forward, i.e. training
  12 * L * H * T^2 per sequence, the PaLM/torchtitan "12 * L * H * d_head * T" per token.
  PACKED SEQUENCES: a token attends only within its own document, so the term is summed over the
  documents of a pack, sum_d T_d^2, not (pack length)^2. This is the work a varlen kernel
  (flash-attn ``cu_seqlens``, FlexAttention block mask) does; SDPA with a dense block-diagonal
  mask computes the full L^2 (those extra FLOPs are hardware FLOPs, not model FLOPs).
  CAUSAL CONVENTION: no causal discount (``causal=False``, as PaLM and torchtitan), although a
  causal kernel skips about half of the score matrix. At 128K the attention term is ~7x the 6N
  term for Phi-3-mini, so the convention changes MFU by up to ~2x; pass ``causal=True`` to halve
  the attention term.
- Padding tokens: not counted (they do no useful work). MFU is the useful fraction of the peak.
- Vision tower (CLIP ViT): per crop n = 1 + (S/p)^2 tokens (577 for ViT-L/14-336). Phi-3-V uses
  ``hidden_states[-2]``, so num_hidden_layers - 1 encoder layers run (the last never does). Per
  layer: dense 2 * n * (4 Dv^2 + 2 Dv Dff) and attention 4 * n^2 * Dv (bidirectional, no discount).
  Patch embedding: a conv = 2 * (S/p)^2 * 3 p^2 Dv. Counted for the crops actually run: every
  real crop in ``pixel_values``, and the 2-crop dummy pass a text-only micro-batch runs so that
  all ZeRO-3 ranks run the same modules (see ``Phi3VModel.embed``).
- Projector: per image token (every ``<|image|>`` position: crop tokens, row separators, the
  global separator) a Linear(4Dv, H) and a Linear(H, H): 2 * (4 Dv H + H^2).
- Training = 3 x forward for all of the above. Not counted: norms, activations, softmax, RoPE,
  the embedding backward, activation-checkpointing recompute (MFU, not HFU: recompute makes the
  hardware do ~4/3 of this), the chunked-loss recompute of lm_head.

``tests/test_flops.py`` checks :meth:`FlopModel.forward_flops` against
``torch.utils.flop_counter.FlopCounterMode`` on the tiny model, and the parameter counts against
the real 4.15B architecture built on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Dense (no 2:4 sparsity) BF16 tensor-core peak per device, FLOP/s.
#   A100 (SXM and PCIe): 312 TFLOPS -- NVIDIA A100 datasheet,
#     https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   H100 SXM: 989 TFLOPS (the datasheet's 1,979 is with sparsity); H100 PCIe: 756 TFLOPS
#   (1,513 sparse); H100 NVL: 835 TFLOPS (1,671 sparse) --
#     https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
#   H200 (SXM and NVL): 989 TFLOPS (1,979 sparse) -- https://www.nvidia.com/en-us/data-center/h200/
# A measured 8192^3 bf16 matmul reaches ~790 TFLOP/s on one H200 (shared/docs/ANCHORS.md).
PEAK_FLOPS_BF16: dict[str, float] = {
    "a100": 312e12,
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h100-nvl": 835e12,
    "h200": 989e12,
}


def peak_flops_for_device(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its CUDA name, or None when unknown (or a CPU).

    Matches ``torch.cuda.get_device_name()`` strings: "NVIDIA A100-SXM4-80GB" -> a100,
    "NVIDIA H100 80GB HBM3" -> h100-sxm, "NVIDIA H100 PCIe" -> h100-pcie, "NVIDIA H100 NVL",
    "NVIDIA H200" / "NVIDIA H200 NVL" -> h200. An H100 name without PCIe/NVL is taken as SXM.
    """
    name = device_name.lower()
    if "h200" in name or "gh200" in name:
        return PEAK_FLOPS_BF16["h200"]
    if "h100" in name or "h800" in name:
        if "pcie" in name:
            return PEAK_FLOPS_BF16["h100-pcie"]
        if "nvl" in name:
            return PEAK_FLOPS_BF16["h100-nvl"]
        return PEAK_FLOPS_BF16["h100-sxm"]
    if "a100" in name or "a800" in name:
        return PEAK_FLOPS_BF16["a100"]
    return None


def resolve_peak_flops(override_tflops: float | None = None, device_name: str | None = None) -> float | None:
    """Peak FLOP/s per device: the override (in TFLOP/s, e.g. ``logging.peak_tflops``) when set,
    else the table entry for ``device_name`` (default: the current CUDA device), else None
    (then MFU is reported as n/a; on CPU there is no table entry, give an override)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return peak_flops_for_device(device_name)


def mfu(model_flops: float, seconds: float, num_devices: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: ``model_flops / seconds / (num_devices * peak_flops)``; None
    when the peak is unknown or no time passed."""
    if not peak_flops or seconds <= 0 or num_devices <= 0:
        return None
    return model_flops / seconds / (num_devices * peak_flops)


@dataclass(frozen=True)
class FlopModel:
    """Forward-pass FLOPs of one Phi-3-V architecture (see the module docstring).

    Build it with :meth:`from_config`. All counts are forward FLOPs; ``train_flops`` = 3x.
    """

    lm_matmul_params: int
    """N: weights of all LM matmuls (attention, MLP, lm_head); no embedding, no norm gains."""
    num_layers: int
    """L: decoder layers."""
    attn_dim: int
    """n_heads * d_head of the LM (= H for Phi-3)."""
    vision_tokens_per_crop: int
    """n = 1 + (S/p)^2 CLIP tokens per crop (577 for ViT-L/14-336)."""
    vision_layers_run: int
    """CLIP encoder layers run: num_hidden_layers - 1 (features are hidden_states[-2])."""
    vision_hidden: int
    """Dv: CLIP width."""
    vision_layer_matmul_params: int
    """Weights of one CLIP layer's matmuls: 4 Dv^2 + 2 Dv Dff."""
    patch_embed_params: int
    """3 * p^2 * Dv: the patch-embedding conv weight."""
    patches_per_crop: int
    """(S/p)^2."""
    projector_params: int
    """4 Dv H + H^2: the two projector matmuls per image token."""
    dummy_crops: int = 2
    """Crops of the dummy pass a text-only micro-batch runs (global view + one sub-crop)."""

    @classmethod
    def from_config(cls, config) -> FlopModel:
        """From a :class:`phi3v_train.model.config.Phi3VConfig` (or a name/path accepted by
        :func:`phi3v_train.model.config.load_model_config`)."""
        if isinstance(config, str):
            from .model.config import load_model_config

            config = load_model_config(config)
        t, v = config.text_config, config.vision_config
        H, I, V, L = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
        n_h = t.num_attention_heads
        n_kv = t.num_key_value_heads or n_h
        d_h = getattr(t, "head_dim", None) or H // n_h
        per_layer = H * (n_h + 2 * n_kv) * d_h + n_h * d_h * H + H * 2 * I + I * H
        Dv, Dff, p = v.hidden_size, v.intermediate_size, v.patch_size
        g2 = (v.image_size // p) ** 2
        return cls(
            lm_matmul_params=L * per_layer + H * V,
            num_layers=L,
            attn_dim=n_h * d_h,
            vision_tokens_per_crop=1 + g2,
            vision_layers_run=v.num_hidden_layers - 1,
            vision_hidden=Dv,
            vision_layer_matmul_params=4 * Dv * Dv + 2 * Dv * Dff,
            patch_embed_params=3 * p * p * Dv,
            patches_per_crop=g2,
            projector_params=4 * Dv * H + H * H,
        )

    def lm_flops(self, doc_lengths: Sequence[int], causal: bool = False) -> float:
        """LM forward FLOPs of documents of these lengths (each attending only to itself):
        ``2 N sum(T_d) + 4 L (n_h d_h) sum(T_d^2)`` (attention halved if ``causal``)."""
        num_tokens = sum(doc_lengths)
        sum_sq = sum(n * n for n in doc_lengths)
        attention = 4 * self.num_layers * self.attn_dim * sum_sq * (0.5 if causal else 1.0)
        return 2.0 * self.lm_matmul_params * num_tokens + attention

    def vision_flops_per_crop(self) -> float:
        """CLIP forward FLOPs of one crop: patch conv + (layers run) x (dense + attention)."""
        n, Dv = self.vision_tokens_per_crop, self.vision_hidden
        per_layer = 2 * n * self.vision_layer_matmul_params + 4 * n * n * Dv
        return 2.0 * self.patches_per_crop * self.patch_embed_params + self.vision_layers_run * per_layer

    def forward_flops(self, doc_lengths: Sequence[int], num_crops: int, num_image_tokens: int,
                      causal: bool = False) -> float:
        """Forward FLOPs of a micro-batch: LM over the documents + CLIP over the crops run +
        projector over the image tokens. ``num_crops`` = 0 means a text-only micro-batch, which
        still runs the 2-crop dummy pass (counted, it is real work on every ZeRO-3 rank)."""
        crops = num_crops if num_crops > 0 else self.dummy_crops
        projector_tokens = num_image_tokens if num_crops > 0 else self._dummy_image_tokens()
        return (self.lm_flops(doc_lengths, causal) + crops * self.vision_flops_per_crop()
                + 2.0 * self.projector_params * projector_tokens)

    def train_flops(self, doc_lengths: Sequence[int], num_crops: int, num_image_tokens: int,
                    causal: bool = False) -> float:
        """Training FLOPs (forward + backward = 3 x forward) of a micro-batch."""
        return 3.0 * self.forward_flops(doc_lengths, num_crops, num_image_tokens, causal)

    def train_flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per token of text-only documents of ``seq_len`` tokens (the PaLM
        number: 6 N + 12 L H T, attention halved if ``causal``)."""
        return 3.0 * self.lm_flops([seq_len], causal) / seq_len

    def _dummy_image_tokens(self) -> int:
        h = math.isqrt(self.patches_per_crop) // 2  # a 1x1 HD image: (1+1) h^2 + 1 + 2h tokens
        return 2 * h * h + 1 + 2 * h


def document_lengths(batch: dict, pad_token_id: int = 32000) -> list[int]:
    """Lengths of the real documents of a collated batch (docs/architecture.md), host-side.

    Segments come from ``cu_seqlens``; a row's padding tail is the segment that ends at the row
    end and holds only ``pad_token_id`` with no labels. Reads ``input_ids``/``labels`` on the
    host: call it on the CPU batch, before ``.to(device)`` (no device sync).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    row_len = ids.shape[1]
    flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
    bounds = batch["cu_seqlens"].tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end % row_len == 0 and start // row_len == (end - 1) // row_len:
            seg_ids, seg_labels = flat_ids[start:end], flat_labels[start:end]
            if bool((seg_ids == pad_token_id).all()) and bool((seg_labels == -100).all()):
                continue  # padding tail
        out.append(end - start)
    return out


def batch_train_flops(flop_model: FlopModel, batch: dict, image_token_id: int = 32044,
                      causal: bool = False) -> float:
    """Training FLOPs of one collated micro-batch (host tensors; see :func:`document_lengths`)."""
    docs = document_lengths(batch)
    num_image_tokens = int((batch["input_ids"] == image_token_id).sum())
    return flop_model.train_flops(docs, int(batch["pixel_values"].shape[0]), num_image_tokens, causal)
