"""Native Phi-3-Vision for transformers 5: Phi-3 decoder + CLIP ViT-L/14-336 + HD image embedding.

Built from transformers' own layers (`Phi3DecoderLayer`, `Phi3RMSNorm`, `Phi3RotaryEmbedding`,
`CLIPVisionEmbeddings`, `CLIPEncoder`) under ONE `PreTrainedModel`, so that:
- parameter names are exactly the 592 official checkpoint names (`model.embed_tokens.weight`,
  `model.layers.N...`, `model.vision_embed_tokens.img_processor.vision_model.*`, `lm_head.weight`):
  no key mapping, and no nested `CLIPVisionModel` whose loader would strip `vision_model.`;
- the text embedding is registered once (the reference's `vision_embed_tokens.wte` alias breaks
  safetensors saving);
- every parameter is initialised by `_init_weights`, the path transformers also takes under
  ZeRO-3 (`HfDeepSpeedConfig` + `_from_config`/`from_pretrained`).

Facts and formulas: `docs/PHI3V_SPEC.md` (shared). Batch contract: `docs/architecture.md`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RMSNorm, Phi3RotaryEmbedding

from ..dist import max_over_ranks
from .config import Phi3VConfig
from .keys import check_checkpoint, checkpoint_shapes
from .loss import chunked_cross_entropy, liger_available, liger_linear_cross_entropy

IGNORE_INDEX = -100


class CLIPVisionTower(nn.Module):
    """CLIP vision transformer with the official submodule names (`embeddings`, `pre_layrnorm`,
    `encoder.layers.N`, `post_layernorm`), returning the features Phi-3-V uses.

    Phi-3-V takes `hidden_states[-2]` (spec "Config"), i.e. the output of the second-to-last encoder
    layer; the last layer and `post_layernorm` exist only so the checkpoint loads, are never run and
    get no gradient (freeze them, or weight decay will still move them under DeepSpeed).
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [C, 3, S, S] -> hidden_states[-2] [C, 1 + (S/p)^2, Dv] (CLS first)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:-1]:
            hidden = layer(hidden, None)
        return hidden


def hd_layout(
    features: torch.Tensor,
    image_sizes: torch.Tensor,
    crop_size: int,
    glb_GN: torch.Tensor,
    sub_GN: torch.Tensor,
) -> torch.Tensor:
    """Arrange per-crop CLIP patch features into the image-token sequence ("sub_glb" order).

    Args:
        features: [C, g*g, Dv] patch features (CLS dropped) of all crops, per image the global view
            first, then its hc*wc sub-crops row-major.
        image_sizes: [I, 2] HD sizes (H, W) in pixels, multiples of `crop_size`; hc = H/S, wc = W/S.
        glb_GN: [1, 1, 4Dv] separator between the sub-crop grid and the global view.
        sub_GN: [1, 1, 1, 4Dv] "newline" appended to every row.

    Returns:
        [N, 4Dv] with, per image: the sub-crop grid of hc*g/2 rows x (wc*g/2 + 1) columns, one glb_GN,
        the global view as g/2 rows x (g/2 + 1) columns; N = sum of `Phi3VConfig.num_image_tokens`.
        Each token is a 2x2 patch block, channels ordered (row in block, column in block, Dv) as in
        the reference `reshape_hd_patches_2x2merge`.

    Raises:
        ValueError: sizes not multiples of `crop_size`, or crop count != sum of 1 + hc*wc.
    """
    num_crops, num_patches, dim = features.shape
    g = math.isqrt(num_patches)
    h = g // 2
    merged = features.reshape(num_crops, h, 2, h, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(num_crops, h, h, 4 * dim)
    newline = sub_GN.reshape(1, 1, 4 * dim)

    def rows_with_newline(grid: torch.Tensor) -> torch.Tensor:  # [R, W, 4Dv] -> [R * (W + 1), 4Dv]
        return torch.cat([grid, newline.expand(grid.shape[0], 1, -1)], dim=1).flatten(0, 1)

    sizes = image_sizes.tolist()  # device-to-host sync if image_sizes lives on the accelerator
    if any(H % crop_size or W % crop_size or H <= 0 or W <= 0 for H, W in sizes):
        raise ValueError(f"image_sizes {sizes} must be positive multiples of the crop size {crop_size}")
    expected = sum(1 + (H // crop_size) * (W // crop_size) for H, W in sizes)
    if expected != num_crops:
        raise ValueError(f"pixel_values has {num_crops} crops but image_sizes {sizes} need {expected}")

    pieces, crop = [], 0
    for H, W in sizes:
        hc, wc = H // crop_size, W // crop_size
        global_view, sub_crops = merged[crop], merged[crop + 1 : crop + 1 + hc * wc]
        crop += 1 + hc * wc
        # [hc*wc, h, h, 4Dv] -> [hc, h, wc, h, 4Dv] -> [hc*h, wc*h, 4Dv]: crop rows, then crop columns
        grid = sub_crops.reshape(hc, wc, h, h, -1).permute(0, 2, 1, 3, 4).reshape(hc * h, wc * h, -1)
        pieces += [rows_with_newline(grid), glb_GN.reshape(1, -1), rows_with_newline(global_view)]
    return torch.cat(pieces)


class Phi3VImageEmbedding(nn.Module):
    """CLIP tower + HD layout + projection; official names under `model.vision_embed_tokens`.

    Parameters: `img_processor.vision_model.*` (CLIP), `glb_GN` [1, 1, 4Dv], `sub_GN` [1, 1, 1, 4Dv],
    `img_projection.0` Linear(4Dv, H), `img_projection.2` Linear(H, H) with GELU between (spec).
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision, hidden = config.vision_config, config.text_config.hidden_size
        self.crop_size = config.crop_size
        # A container, not transformers' CLIPVisionModel: its names then carry `vision_model.` like the checkpoint.
        self.img_processor = nn.ModuleDict({"vision_model": CLIPVisionTower(vision)})
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * vision.hidden_size))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * vision.hidden_size))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * vision.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [C, 3, S, S] (real crops only), image_sizes [I, 2] -> image tokens [N, H]."""
        hidden = self.img_processor["vision_model"](pixel_values)  # [C, 1 + g*g, Dv]; one call for all crops
        tokens = hd_layout(hidden[:, 1:], image_sizes, self.crop_size, self.glb_GN, self.sub_GN)  # [N, 4Dv]
        return self.img_projection(tokens.to(self.img_projection[0].weight.dtype))


def document_max_position(position_ids: torch.Tensor) -> torch.Tensor:
    """For every token, the largest position id of its document: [B, T] -> [B, T].

    A document starts where `position_ids` is 0 (packed rows restart at 0 per sample; a row that
    does not start at 0 is one document). Device ops only, no device-to-host sync.
    """
    doc = (position_ids == 0).cumsum(dim=-1)  # [B, T] document index within the row, 0..T
    per_doc = torch.zeros(
        position_ids.shape[0], position_ids.shape[1] + 1, dtype=position_ids.dtype, device=position_ids.device
    )
    per_doc = per_doc.scatter_reduce(1, doc, position_ids, reduce="amax", include_self=False)  # [B, T + 1]
    return per_doc.gather(1, doc)


class Phi3VRotaryEmbedding(Phi3RotaryEmbedding):
    """`Phi3RotaryEmbedding` whose longrope short/long switch is made per document, not per batch.

    The reference (`Phi3SuScaledRotaryEmbedding`) and transformers pick the long factors for the whole
    batch when max(position_ids) + 1 > original_max_position_embeddings (4096). For one sequence this
    is the same rule; in a packed row it would let a long neighbour change a short document's rotary
    frequencies, so packed logits would differ from the document run alone. Here each token uses the
    long factors iff its own document is longer than 4096 tokens. cos/sin are always multiplied by
    `attention_scaling` = sqrt(1 + ln(max_pos / original) / ln(original)) (1.1902 for 131072 / 4096),
    as in the reference. No device-to-host sync (transformers' longrope update has none either).
    Non-longrope configs behave exactly like `Phi3RotaryEmbedding`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.is_longrope = self.rope_type == "longrope"
        if self.is_longrope:
            self.original_max_positions = config.rope_parameters["original_max_position_embeddings"]
            self.long_inv_freq = nn.Buffer(self.compute_long_inv_freq(config), persistent=False)

    @staticmethod
    def compute_long_inv_freq(config) -> torch.Tensor:
        """Inverse frequencies with the long factors: 1 / (long_factor * theta^(2i/d)), [d/2] fp32."""
        original = config.rope_parameters["original_max_position_embeddings"]
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=original + 1)
        return inv_freq

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: any tensor with the compute dtype/device; position_ids [B, T] -> (cos, sin), each [B, T, d]."""
        if not self.is_longrope:
            return super().forward(x, position_ids)
        is_long = document_max_position(position_ids) >= self.original_max_positions  # [B, T]
        long_freq = self.long_inv_freq.to(device=x.device, dtype=torch.float)
        short_freq = self.original_inv_freq.to(device=x.device, dtype=torch.float)
        inv_freq = torch.where(is_long[..., None], long_freq, short_freq)  # [B, T, d/2]
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Phi3VModel(nn.Module):
    """The decoder with the image embedding: `Phi3Model`'s children plus `vision_embed_tokens`."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        text = config.text_config
        self.config = text
        self.image_token_id = config.image_token_id
        self.crop_size = config.crop_size
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.embed_dropout = nn.Dropout(text.embd_pdrop)  # reference: dropout after merging images
        self.layers = nn.ModuleList([Phi3DecoderLayer(text, i) for i in range(text.num_hidden_layers)])
        self.norm = Phi3RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = Phi3VRotaryEmbedding(config=text)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        dummy_vision: bool = True,
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with the image features written at the `image_token_id` positions.

        Without images the vision path still runs on a zero dummy 1x1-crop image and adds
        `0 * features.sum()`: under ZeRO-3 every rank must run (and get gradients for) the same
        parameters every micro-step, or the collectives mismatch or hang (spec "Known failures").
        `dummy_vision=False` skips it: cached decoding steps, where no rank has images and all
        ranks decode with the cache together (`generate.greedy_generate` agrees on it with `sync`).
        Raises ValueError when the number of image tokens differs from the number of features.
        """
        embeds = self.embed_tokens(input_ids)  # [B, T, H]
        is_image = input_ids == self.image_token_id  # [B, T]
        num_image_tokens = int(is_image.sum())  # device-to-host sync (needed for the check below)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if num_image_tokens:
                raise ValueError(
                    f"input_ids has {num_image_tokens} image tokens ({self.image_token_id}) but no pixel_values"
                )
            if not dummy_vision:
                return embeds
            size = self.crop_size
            dummy = embeds.new_zeros(2, 3, size, size)  # global view + one sub-crop
            features = self.vision_embed_tokens(dummy, torch.tensor([[size, size]]))
            return embeds + 0.0 * features.sum()
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        features = self.vision_embed_tokens(pixel_values, image_sizes)  # [N, H]
        if features.shape[0] != num_image_tokens:
            raise ValueError(
                f"input_ids has {num_image_tokens} image tokens ({self.image_token_id}) but the images give "
                f"{features.shape[0]} features (image_sizes {image_sizes.tolist()}); the processor and the "
                "model disagree on crop size or num_crops"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, T, H] (after `norm`). Shapes as in `Phi3VForCausalLM.forward`."""
        decoding = cache is not None and cache.get_seq_length() > 0  # a cached step after the prompt
        hidden = self.embed_dropout(self.embed(input_ids, pixel_values, image_sizes, dummy_vision=not decoding))
        return self.decode(hidden, position_ids, attention_mask, cu_seqlens, max_seqlen, cache)

    def decode(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Run the decoder layers and the final norm on input embeddings hidden [B, T, H] -> [B, T, H].

        With a `cache` (transformers `DynamicCache`, generation only) the keys and values of these T
        tokens are appended to it and attention covers the cached ones too; `attention_mask` [B, S]
        (S = cached + T tokens, 0 = left padding) and `position_ids` [B, T] must then be given.

        How documents of a packed row are kept apart, per attention backend:
        - flash_attention_*: `cu_seqlens` [D + 1] over the flattened B*T tokens and `max_seqlen` (int)
          from the batch go straight to flash-attn varlen; no mask is built and nothing is read back from
          the device. Without `cu_seqlens` they are derived from position_ids (one device-to-host sync).
        - eager / sdpa / flex_attention (no attention_mask): transformers detects the documents from
          `position_ids` and builds a block-diagonal causal mask ([B, 1, T, T] for eager/sdpa, a sparse
          BlockMask for flex). That detection costs one device-to-host sync per forward.
        """
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)  # longrope: per document
        attn_kwargs, mask = {}, None
        flash = (self.config._attn_implementation or "").startswith("flash_attention")
        if attention_mask is None and cache is None and flash:
            # flash-attn varlen over the flattened B*T tokens. transformers' own detection from
            # position_ids only works for B == 1 (B > 1 would silently attend across documents).
            if cu_seqlens is None:
                (cu_seqlens, _), (max_seqlen, _) = prepare_fa_kwargs_from_position_ids(position_ids)
            if isinstance(max_seqlen, torch.Tensor):
                max_seqlen = int(max_seqlen)  # flash-attn wants a Python int: device-to-host sync, pass an int
            cu_seqlens = cu_seqlens.to(device=hidden.device, dtype=torch.int32)
            attn_kwargs = dict(
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen
            )
        else:
            # Packed rows: with no attention_mask, transformers finds the documents from position_ids
            # restarting at 0 and builds a block-diagonal causal mask (eager, sdpa, flex_attention).
            make_mask = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
            mask = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=cache is not None,
                **attn_kwargs,
            )
        return self.norm(hidden)


class Phi3VLMHead(nn.Linear):
    """`lm_head`: an `nn.Linear` (parameter `lm_head.weight`) that can also return Liger's fused linear
    cross-entropy, so that under ZeRO-3 the weight is gathered by this module's own forward hooks."""

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100
    ) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V]; with labels [N]: Liger's summed fp32 CE (GPU + liger-kernel only)."""
        if labels is None:
            return super().forward(hidden)
        return liger_linear_cross_entropy(hidden, self.weight, labels, ignore_index=ignore_index)


def _is_multi_rank() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Phi3VForCausalLM(PreTrainedModel):
    """Phi-3-Vision causal LM with the official parameter names (spec "Checkpoint keys").

    Build with `Phi3VForCausalLM._from_config(config, attn_implementation=..., dtype=...)` or
    `from_pretrained(dir)` (an official checkpoint directory loads as is: same names, and
    `Phi3VConfig.from_dict` translates its flat config.json). Attention: "eager", "sdpa", "flex_attention", or
    "flash_attention_2" when flash_attn is installed; the vision tower uses the same one.
    Generation: `forward(..., cache=DynamicCache(...), logits_to_keep=1)` runs the prompt, then one
    token per step against the cache (`phi3v_train.generate.greedy_generate` does this for batches of
    left-padded prompts); `generate_greedy` is the cache-less reference decode of one prompt.

    Loss (`loss_impl`): "chunked" (`chunked_cross_entropy`, any device), "liger" (Liger's fused linear
    cross-entropy; CUDA + liger-kernel), "auto" (liger when importable and the hidden states are on CUDA,
    else chunked). Neither materialises [tokens, vocab] logits for the whole batch.
    """

    config_class = Phi3VConfig
    supports_generation_cache = True  # forward(cache=DynamicCache, logits_to_keep=1): see generate.py
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        # The layers read the attention choice from their own sub-config: give them the resolved one.
        for sub_config in (config.text_config, config.vision_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation_internal = config._attn_implementation
        self.model = Phi3VModel(config)
        self.lm_head = Phi3VLMHead(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.loss_chunk_size = 4096  # tokens per chunk of the chunked cross-entropy
        self.loss_impl = "auto"  # "chunked" | "liger" | "auto" (see the class docstring)
        self.post_init()
        # Never run (features are hidden_states[-2]): freeze so weight decay cannot move them.
        tower = self.model.vision_embed_tokens.img_processor.vision_model
        tower.encoder.layers[-1].requires_grad_(False)
        tower.post_layernorm.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (normal(0, text initializer_range) for Linear/Conv/Embedding, ones/zeros
        for norms, RoPE buffers) plus CLIP's class embedding and position ids, and zero separators
        (the reference initialises glb_GN/sub_GN to zeros)."""
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)
        if isinstance(module, Phi3VRotaryEmbedding) and module.is_longrope:
            init.copy_(module.long_inv_freq, module.compute_long_inv_freq(module.config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, check_keys: bool = True, **kwargs):
        """transformers' `from_pretrained`, plus a strict check of a local checkpoint directory first.

        With `check_keys` (default) the tensor names and shapes of the directory's safetensors (read from the
        file headers, no weights loaded) must be exactly this architecture's (the 592 official names for the
        real configs); otherwise a KeyError lists the missing, unexpected and mis-shaped tensors. transformers
        itself only warns, and under ZeRO-3 does not even report unexpected keys. The reference's duplicate
        `model.vision_embed_tokens.wte.weight` is tolerated (and ignored by the loader).
        """
        path = Path(str(pretrained_model_name_or_path))
        if check_keys and path.is_dir() and any(path.glob("*.safetensors")):
            config = kwargs.get("config")
            if not isinstance(config, Phi3VConfig):
                config = Phi3VConfig.from_pretrained(path)
            check_checkpoint(checkpoint_shapes(path), expected_state_shapes(config), where=str(path))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Run the model on one micro-batch (the collate output of `docs/architecture.md`).

        Args:
            input_ids: [B, T] token ids; image positions hold `config.image_token_id`.
            position_ids: [B, T], restarting at 0 for every packed sample (default 0..T-1).
            attention_mask: [B, T] padding mask; leave None for packed rows (it disables packing detection).
            pixel_values: [C, 3, S, S] real crops of all images in token order (global view first, then
                hc*wc sub-crops row-major), or None / C == 0 for a text-only micro-batch.
            image_sizes: [I, 2] HD (H, W) in pixels per image, multiples of S.
            labels: [B, T] targets aligned with input_ids (-100 = no loss); shifted here, so the logits at
                t are scored against labels[t + 1].
            num_items_in_batch: divisor of the summed loss (the global label-token count); default the
                number of labelled tokens here.
            cu_seqlens: [D + 1] int32 document boundaries over the flattened B*T tokens, max_seqlen: int;
                used by flash_attention_* only (derived from position_ids when absent).
            cache: a transformers `DynamicCache` for generation (see `Phi3VModel.decode`): these tokens'
                keys/values are appended; needs `attention_mask` [B, cached + T] (0 = left padding) and
                `position_ids`. None in training.
            logits_to_keep: without labels, return logits for the last this many positions only (0 = all).
            **kwargs: other batch keys (num_tokens, num_label_tokens, num_samples, sample_keys, ...) are ignored.

        Returns:
            `CausalLMOutputWithPast` with `logits` [B, T, V] (or [B, logits_to_keep, V]) when labels is None;
            otherwise `loss` (fp32 scalar, token-summed CE / divisor) and `logits` None (chunked loss, logits
            never materialised).

        Raises:
            ValueError: image-token count differs from the image features, or crops do not match image_sizes.
        """
        hidden = self.model(input_ids, pixel_values, image_sizes, position_ids, attention_mask, cu_seqlens, max_seqlen,
                            cache)
        if labels is None:
            return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, -logits_to_keep:]))  # the cache: updated in place
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # [B*T]: row ends predict nothing
        hidden = hidden.flatten(0, 1)  # [B*T, H]
        if self._use_liger(hidden):
            loss_sum = self.lm_head(hidden, labels=targets, ignore_index=IGNORE_INDEX)  # one call on every rank
            num_tokens = None
        else:
            loss_sum, num_tokens = chunked_cross_entropy(
                hidden,
                self.lm_head,
                targets,
                chunk_size=self.loss_chunk_size,
                ignore_index=IGNORE_INDEX,
                # ZeRO-3: all ranks must call lm_head equally often (one weight all-gather per call),
                # also when their rows differ in length (packing.padding=longest).
                skip_empty_chunks=not _is_multi_rank(),
                num_chunks=max_over_ranks(-(-hidden.shape[0] // self.loss_chunk_size), hidden.device),
            )
        if num_items_in_batch is None:
            if num_tokens is None:
                num_tokens = int((targets != IGNORE_INDEX).sum())  # device-to-host sync; pass num_items_in_batch
            num_items_in_batch = max(num_tokens, 1)
        return CausalLMOutputWithPast(loss=loss_sum / num_items_in_batch)

    def _use_liger(self, hidden: torch.Tensor) -> bool:
        if self.loss_impl not in ("auto", "chunked", "liger"):
            raise ValueError(f"loss_impl={self.loss_impl!r}: use 'auto', 'chunked' or 'liger'")
        if self.loss_impl == "liger" and not (hidden.is_cuda and liger_available()):
            raise RuntimeError("loss_impl='liger' needs the liger-kernel package and CUDA tensors; use 'chunked'")
        return self.loss_impl == "liger" or (self.loss_impl == "auto" and hidden.is_cuda and liger_available())

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        stop_token_ids: Iterable[int] = (32007, 32000),
    ) -> torch.Tensor:
        """Greedy decoding of ONE prompt without a KV cache (each step re-runs the decoder on the whole
        sequence; the image features are computed once). For evaluation of short answers, not for serving.

        Args:
            input_ids: [T] or [1, T] prompt ids (image positions hold `config.image_token_id`).
            pixel_values, image_sizes: the prompt's crops and image sizes, as in `forward`.
            max_new_tokens: the most tokens to generate.
            stop_token_ids: generation ends after any of these (default `<|end|>` 32007, `<|endoftext|>`).

        Returns:
            LongTensor [N] of the generated ids (N <= max_new_tokens), the stop token included when produced.
        """
        input_ids = input_ids.reshape(1, -1)
        stop = set(stop_token_ids)
        embeds = self.model.embed(input_ids, pixel_values, image_sizes)  # [1, T, H]; vision runs once
        new_ids: list[int] = []
        for _ in range(max_new_tokens):
            hidden = self.model.decode(embeds)  # [1, T', H]
            next_id = self.lm_head(hidden[:, -1]).argmax(dim=-1)  # [1]
            new_ids.append(int(next_id))  # device-to-host sync per generated token (stop check)
            if new_ids[-1] in stop:
                break
            embeds = torch.cat([embeds, self.model.embed_tokens(next_id)[:, None]], dim=1)
        return torch.tensor(new_ids, dtype=torch.long)


def expected_state_shapes(config: Phi3VConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a `Phi3VForCausalLM(config)` state dict (built on the meta device:
    no memory, about a second for the real 4.1B model). For the real configs: the 592 official names."""
    config = copy.deepcopy(config)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation_internal = "eager"  # shapes do not depend on it; flash may not be installed
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def apply_freezing(
    model: Phi3VForCausalLM, freeze_vision: bool = False, freeze_projector: bool = False, freeze_lm: bool = False
) -> dict[str, int]:
    """Set `requires_grad` of the three parameter groups (True for a group not frozen); returns the number of
    trainable parameters per group.

    Groups, chosen by module (not by name prefix):
    - vision: the CLIP tower `model.vision_embed_tokens.img_processor` (its last layer and post_layernorm
      always stay frozen: they are never run);
    - projector: `model.vision_embed_tokens.{img_projection, glb_GN, sub_GN}`;
    - lm: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`.
    The text embedding belongs to the LM only. The reference registers it a second time under
    `vision_embed_tokens.wte`, so "freeze vision_embed_tokens" in the public recipes freezes the text
    embedding too; here `model.embed_tokens` is frozen only by `freeze_lm`.
    Call before `deepspeed.initialize` and give the optimizer only parameters with requires_grad.

    Raises:
        ValueError: all three groups frozen (nothing to train).
    """
    if freeze_vision and freeze_projector and freeze_lm:
        raise ValueError("freeze_vision, freeze_projector and freeze_lm are all set: nothing would be trained")
    image = model.model.vision_embed_tokens
    tower = image.img_processor["vision_model"]
    groups = {
        "vision": (freeze_vision, list(tower.parameters())),
        "projector": (freeze_projector, [*image.img_projection.parameters(), image.glb_GN, image.sub_GN]),
        "lm": (
            freeze_lm,
            [
                *model.model.embed_tokens.parameters(),
                *model.model.layers.parameters(),
                *model.model.norm.parameters(),
                *model.lm_head.parameters(),
            ],
        ),
    }
    for frozen, params in groups.values():
        for param in params:
            param.requires_grad_(not frozen)
    never_run = [*tower.encoder.layers[-1].parameters(), *tower.post_layernorm.parameters()]
    for param in never_run:
        param.requires_grad_(False)
    assert model.model.embed_tokens.weight.requires_grad == (not freeze_lm)
    return {name: sum(p.numel() for p in params if p.requires_grad) for name, (_, params) in groups.items()}
