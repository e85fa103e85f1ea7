"""Numerics of the native Phi-3-V against an independent re-implementation of the reference.

The reference (`modeling_phi3_v.py` / `image_embedding_phi3_v.py` of microsoft/Phi-3-vision-128k-instruct)
cannot run on transformers 5, so its behaviour is re-implemented here from the spec, deliberately
unvectorised: CLIP on every crop of the zero-padded [num_crops + 1] stack, hidden_states[-2] without CLS,
each image token built from its 2x2 patch block in loops, sub_GN after every row, glb_GN, then the global
view, the MLP projection by explicit formulas, the language model = transformers' `Phi3ForCausalLM`
(eager, fp32, whose longrope switch is the reference's `max(position_ids) + 1 > original`), and longrope
cos/sin from the closed-form formula.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from phi3v_train.model.config import Phi3VConfig, load_model_config
from phi3v_train.model.modeling import Phi3VForCausalLM, Phi3VRotaryEmbedding, document_max_position
from test_model import IMG, make_sample

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 32  # original_max_position_embeddings of the test config: long factors past 32 positions


def small_context_config() -> Phi3VConfig:
    """The tiny config with longrope switching at 32 positions (max 1024): cheap to cross the threshold."""
    official = json.loads((ROOT / "configs/model/tiny.json").read_text())
    official |= {"original_max_position_embeddings": ORIGINAL, "max_position_embeddings": 32 * ORIGINAL}
    return Phi3VConfig.from_official(official)


def random_model(config: Phi3VConfig, seed: int = 0) -> Phi3VForCausalLM:
    torch.manual_seed(seed)
    model = Phi3VForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    image = model.model.vision_embed_tokens
    with torch.no_grad():  # the separators are zeros at init: make them visible
        image.glb_GN.normal_()
        image.sub_GN.normal_()
    return model


def longrope_cos_sin(positions: torch.Tensor, factors: list[float], head_dim: int, theta: float, scale: float):
    """Closed form: inv_freq_i = 1 / (factor_i * theta^(2i / d)); cos/sin of [p * inv_freq, p * inv_freq] * scale."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponent)
    angles = positions.float()[:, None] * inv_freq[None]  # [T, d/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def reference_input_embeds(model: Phi3VForCausalLM, sample: dict, num_crops: int) -> torch.Tensor:
    """The reference's `Phi3ImageEmbedding.forward` for one sequence, written as loops. Returns [1, T, H]."""
    config = model.config
    size, grid = config.crop_size, config.crop_size // config.patch_size
    half = grid // 2
    image = model.model.vision_embed_tokens
    clip = CLIPVisionModel(config.vision_config).eval()
    clip.load_state_dict(image.img_processor["vision_model"].state_dict())  # transformers 5: no `vision_model.`

    # The reference processor's pixel_values: [num_images, num_crops + 1, 3, S, S], zero padded.
    sizes = sample["image_sizes"].tolist()
    padded = torch.zeros(len(sizes), num_crops + 1, 3, size, size)
    first = 0
    for i, (h, w) in enumerate(sizes):
        count = 1 + (h // size) * (w // size)
        padded[i, :count] = sample["pixel_values"][first : first + count]
        first += count
    with torch.no_grad():
        hidden = clip(padded.flatten(0, 1), output_hidden_states=True).hidden_states[-2]  # CLIP on ALL crops
    features = hidden[:, 1:].reshape(len(sizes), num_crops + 1, grid * grid, -1)  # CLS dropped

    def token(crop: torch.Tensor, row: int, col: int) -> torch.Tensor:  # 2x2 merge: (i, j, channel) order
        return torch.cat([crop[(2 * row + i) * grid + 2 * col + j] for i in range(2) for j in range(2)])

    sub, glb = image.sub_GN.reshape(-1), image.glb_GN.reshape(-1)
    tokens = []
    for i, (h, w) in enumerate(sizes):
        hc, wc = h // size, w // size
        for row in range(hc * half):  # the sub-crop grid, one sub_GN column at the end of every row
            for col in range(wc * half):
                crop = 1 + (row // half) * wc + col // half
                tokens.append(token(features[i, crop], row % half, col % half))
            tokens.append(sub)
        tokens.append(glb)
        for row in range(half):  # the global view (crop 0), also with sub_GN per row
            tokens += [token(features[i, 0], row, col) for col in range(half)] + [sub]
    x = torch.stack(tokens)
    p0, p2 = image.img_projection[0], image.img_projection[2]
    projected = F.gelu(x @ p0.weight.T + p0.bias) @ p2.weight.T + p2.bias  # Linear -> GELU -> Linear

    ids = sample["input_ids"]
    embeds = model.model.embed_tokens.weight[ids].clone()
    positions = (ids == IMG).nonzero().flatten().tolist()
    assert len(positions) == len(projected)
    for n, pos in enumerate(positions):  # image features in the order the image tokens appear
        embeds[pos] = projected[n]
    return embeds[None]


def reference_lm(model: Phi3VForCausalLM) -> Phi3ForCausalLM:
    """transformers' Phi-3 LM with the model's language weights (the same 195 names as the reference LM)."""
    lm = Phi3ForCausalLM._from_config(model.config.text_config, attn_implementation="eager", dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if "vision_embed_tokens" not in k}
    lm.load_state_dict(state, strict=True)
    return lm.eval()


def test_forward_equals_reference_image_path_and_lm():
    config = small_context_config()
    model = random_model(config)
    lm = reference_lm(model)
    cases = {
        "short (short factors)": make_sample(config, [(1, 1)], seed=5),
        "long (long factors)": make_sample(config, [(1, 2), (2, 1)], seed=6),
    }
    lengths = {name: len(s["input_ids"]) for name, s in cases.items()}
    assert lengths["short (short factors)"] <= ORIGINAL < lengths["long (long factors)"], lengths
    for name, sample in cases.items():
        ref_embeds = reference_input_embeds(model, sample, num_crops=config.num_crops)
        with torch.no_grad():
            embeds = model.model.embed(sample["input_ids"][None], sample["pixel_values"], sample["image_sizes"])
            torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=1e-5, msg=name)
            logits = model(sample["input_ids"][None], pixel_values=sample["pixel_values"],
                           image_sizes=sample["image_sizes"]).logits  # fmt: skip
            ref_logits = lm(inputs_embeds=ref_embeds).logits
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5, msg=name)


def test_vision_tower_runs_once_on_real_crops_only():
    config = small_context_config()
    model = random_model(config)
    samples = [make_sample(config, crops, seed=20 + i) for i, crops in enumerate([[(1, 2)], [(2, 1), (1, 1)]])]
    calls = []
    tower = model.model.vision_embed_tokens.img_processor["vision_model"]
    tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    ids = torch.cat([s["input_ids"] for s in samples])[None]
    positions = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None]
    with torch.no_grad():
        model(ids, position_ids=positions, pixel_values=torch.cat([s["pixel_values"] for s in samples]),
              image_sizes=torch.cat([s["image_sizes"] for s in samples]))  # fmt: skip
    assert calls == [3 + 3 + 2]  # one call, 8 real crops (the reference would run 3 x (num_crops + 1) = 15)


def test_longrope_cos_sin_real_config_switch_at_4096_and_scale():
    config = load_model_config("phi-3-vision-128k-instruct").text_config
    rope = config.rope_parameters
    scale = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert scale == pytest.approx(1.1902, abs=1e-4)
    rotary = Phi3VRotaryEmbedding(config)
    assert rotary.attention_scaling == pytest.approx(scale, rel=1e-12)
    x = torch.zeros(1, dtype=torch.float32)
    for length, factors in [(4096, rope["short_factor"]), (4097, rope["long_factor"])]:
        positions = torch.arange(length)
        cos, sin = rotary(x, positions[None])
        ref_cos, ref_sin = longrope_cos_sin(positions, factors, 96, 10000.0, scale)
        torch.testing.assert_close(cos[0], ref_cos, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin[0], ref_sin, rtol=1e-6, atol=1e-6)
        # for one sequence the per-document rule is transformers' (= the reference's) per-batch rule
        hf_cos, hf_sin = Phi3RotaryEmbedding(config)(x, positions[None])
        torch.testing.assert_close((cos, sin), (hf_cos, hf_sin), rtol=0, atol=0)


def test_longrope_switch_is_per_document_in_a_packed_row():
    config = load_model_config("phi-3-vision-128k-instruct").text_config
    rope = config.rope_parameters
    scale = Phi3VRotaryEmbedding(config).attention_scaling
    long_doc, short_doc = torch.arange(4100), torch.arange(300)
    positions = torch.cat([short_doc, long_doc, short_doc])[None]
    assert document_max_position(positions)[0, [0, 299, 300, 4399, 4400]].tolist() == [299, 299, 4099, 4099, 299]
    cos, _ = Phi3VRotaryEmbedding(config)(torch.zeros(1), positions)
    short_cos, _ = longrope_cos_sin(short_doc, rope["short_factor"], 96, 10000.0, scale)
    long_cos, _ = longrope_cos_sin(long_doc, rope["long_factor"], 96, 10000.0, scale)
    torch.testing.assert_close(cos[0], torch.cat([short_cos, long_cos, short_cos]), rtol=1e-6, atol=1e-6)
    # transformers' (and the reference's) per-batch rule would give the short documents the long factors
    hf_cos, _ = Phi3RotaryEmbedding(config)(torch.zeros(1), positions)
    assert not torch.allclose(hf_cos[0, :300], short_cos)
