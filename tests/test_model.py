"""Tests for the native Phi-3-V model: config translation, official names, image layout, packing, loss.

Everything runs on CPU in fp32 with the tiny config (configs/model/tiny.json); the real configs are
only built on the meta device. Image inputs are random crops with the right counts (no processor).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import CLIPVisionModel

from phi3v_train.model.config import Phi3VConfig, load_model_config
from phi3v_train.model.keys import check_keys, index_key_names
from phi3v_train.model.loss import chunked_cross_entropy
from phi3v_train.model.modeling import Phi3VForCausalLM, hd_layout

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "tests" / "fixtures" / "phi3v_model.safetensors.index.json"
IMG, BOS, USER, ASSISTANT, END, PAD = 32044, 1, 32010, 32001, 32007, 32000


def num_tokens(hc: int, wc: int, grid: int) -> int:
    """Image tokens for an hc x wc crop image, CLIP grid `grid` (spec "Image tokens")."""
    h = grid // 2
    return (hc * wc + 1) * h * h + 1 + (hc + 1) * h


@pytest.fixture(scope="module")
def tiny_config() -> Phi3VConfig:
    return load_model_config("tiny")


def tiny_model(attn: str = "eager", seed: int = 0) -> Phi3VForCausalLM:
    torch.manual_seed(seed)
    config = load_model_config("tiny")
    return Phi3VForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def make_sample(config: Phi3VConfig, crops: list[tuple[int, int]], seed: int) -> dict:
    """One sample: prompt with one image slot per (hc, wc) entry, an answer, labels on the answer only."""
    gen = torch.Generator().manual_seed(seed)
    size, grid = config.crop_size, config.crop_size // config.patch_size
    words = lambda n: torch.randint(100, 32000, (n,), generator=gen).tolist()  # noqa: E731
    ids = [BOS, USER]
    for hc, wc in crops:
        ids += [IMG] * num_tokens(hc, wc, grid) + words(2)
    ids += [END, ASSISTANT]
    num_prompt = len(ids)
    ids += words(4) + [END]
    labels = [-100] * num_prompt + ids[num_prompt:]
    num_crops = sum(1 + hc * wc for hc, wc in crops)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.randn(num_crops, 3, size, size, generator=gen),
        "image_sizes": torch.tensor([[hc * size, wc * size] for hc, wc in crops], dtype=torch.long).view(-1, 2),
    }


def alone(sample: dict) -> dict:
    """A batch of one unpacked sample (text-only samples pass no pixel_values)."""
    batch = {"input_ids": sample["input_ids"][None], "labels": sample["labels"][None]}
    if sample["image_sizes"].shape[0]:
        batch |= {"pixel_values": sample["pixel_values"], "image_sizes": sample["image_sizes"]}
    return batch


# --- config and checkpoint names -------------------------------------------------------------------


def test_real_configs_build_with_official_names_and_size():
    expected = index_key_names(INDEX)
    assert len(expected) == 592
    config = load_model_config("phi-3-vision-128k-instruct")
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440  # spec "Parameters"
    state = model.state_dict()
    check_keys(state.keys(), expected)
    shapes = {
        "model.layers.0.self_attn.qkv_proj.weight": (9216, 3072),
        "model.layers.31.mlp.gate_up_proj.weight": (16384, 3072),
        "model.vision_embed_tokens.glb_GN": (1, 1, 4096),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4096),
        "model.vision_embed_tokens.img_projection.0.weight": (3072, 4096),
        "model.vision_embed_tokens.img_projection.2.weight": (3072, 3072),
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight": (577, 1024),
        "lm_head.weight": (32064, 3072),
        "model.embed_tokens.weight": (32064, 3072),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1.1902, abs=1e-4)  # spec: longrope scale

    config_35 = load_model_config("phi-3.5-vision-instruct")
    assert (config_35.num_crops, config.num_crops, config_35.text_config.sliding_window) == (4, 16, 262144)
    with torch.device("meta"):
        check_keys(Phi3VForCausalLM(config_35).state_dict().keys(), expected)


def test_official_config_round_trip(tiny_config):
    official = json.loads((ROOT / "src/phi3v_train/assets/phi3v/config.json").read_text())
    config = Phi3VConfig.from_official(official)
    assert config.text_config.rope_parameters["rope_type"] == "longrope"
    assert config.vision_config.num_hidden_layers == 24 and config.crop_size == 336 and config.patch_size == 14
    back = config.to_official()
    assert {k: v for k, v in official.items() if back.get(k) != v} == {
        "_name_or_path": "Phi-3-vision-128k-instruct",
        "transformers_version": "4.38.1",
        "_attn_implementation": "flash_attention_2",
    }
    assert Phi3VConfig.from_official(back).to_dict() == config.to_dict()
    assert Phi3VConfig.from_official(tiny_config.to_official()).to_dict() == tiny_config.to_dict()
    assert load_model_config(ROOT / "src/phi3v_train/assets/phi3_5v").num_crops == 4  # a dir + preprocessor


def test_image_token_formula(tiny_config):
    config = load_model_config("phi-3-vision-128k-instruct")
    size = config.crop_size
    # spec reference values, num_crops=16: square, 4:3, 16:9, 9:16; then 1 crop
    assert [config.num_image_tokens(h * size, w * size) for h, w in [(4, 4), (3, 4), (3, 5), (5, 3), (1, 1)]] == [
        2509, 1921, 2353, 2377, 313
    ]  # fmt: skip
    assert tiny_config.num_image_tokens(56, 112) == num_tokens(1, 2, 4) == 17


def test_save_and_load_keep_official_names(tmp_path, tiny_config):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # one embedding copy, no `vision_model.` stripping
    # An official-layout config.json next to the weights, as in the released checkpoints.
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_official()))
    loaded, info = Phi3VForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


# --- image features ---------------------------------------------------------------------------------


def test_hd_layout_matches_token_by_token_reference():
    size, grid, dim = 56, 4, 3
    half = grid // 2
    sizes = torch.tensor([[size, 2 * size], [2 * size, size]])
    crops = [(1, 2), (2, 1)]
    features = torch.randn(sum(1 + hc * wc for hc, wc in crops), grid * grid, dim)
    glb, sub = torch.randn(1, 1, 4 * dim), torch.randn(1, 1, 1, 4 * dim)

    def block(crop: int, row: int, col: int) -> torch.Tensor:  # a 2x2 patch block, (row, col, dim) order
        patches = [(2 * row + i) * grid + 2 * col + j for i in range(2) for j in range(2)]
        return features[crop, patches].reshape(-1)

    expected, first = [], 0
    for hc, wc in crops:
        for r in range(hc * half):
            expected += [block(first + 1 + (r // half) * wc + c // half, r % half, c % half) for c in range(wc * half)]
            expected.append(sub.reshape(-1))
        expected.append(glb.reshape(-1))
        for r in range(half):
            expected += [block(first, r, c) for c in range(half)] + [sub.reshape(-1)]
        first += 1 + hc * wc
    out = hd_layout(features, sizes, size, glb, sub)
    assert out.shape == (num_tokens(1, 2, grid) + num_tokens(2, 1, grid), 4 * dim)
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)
    with pytest.raises(ValueError, match="crops"):
        hd_layout(features[:-1], sizes, size, glb, sub)


def test_clip_tower_equals_transformers_second_to_last_layer(tiny_config):
    tower = tiny_model().model.vision_embed_tokens.img_processor["vision_model"]
    clip = CLIPVisionModel(tiny_config.vision_config).eval()
    clip.load_state_dict(tower.state_dict())
    pixels = torch.randn(3, 3, tiny_config.crop_size, tiny_config.crop_size)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), clip(pixels, output_hidden_states=True).hidden_states[-2])


# --- forward / backward -----------------------------------------------------------------------------


def test_forward_backward_two_aspect_ratios_and_checkpointing(tiny_config):
    sample = make_sample(tiny_config, [(1, 2), (2, 1)], seed=1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(**alone(sample), num_tokens=1, num_label_tokens=1, num_samples=1, sample_keys=["a"])
        assert out.logits is None and torch.isfinite(out.loss)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    vision = "model.vision_embed_tokens."
    for name in [
        vision + "glb_GN",
        vision + "sub_GN",
        vision + "img_projection.0.weight",
        vision + "img_projection.2.weight",
        vision + "img_processor.vision_model.embeddings.patch_embedding.weight",
        vision + "img_processor.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "lm_head.weight",
    ]:
        assert grads[0][name] is not None and grads[0][name].abs().sum() > 0, name
    # hidden_states[-2]: the last CLIP layer and post_layernorm are never used
    assert grads[0][vision + "img_processor.vision_model.post_layernorm.weight"] is None
    for name, grad in grads[0].items():
        if grad is not None:
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_text_only_batch_still_runs_the_vision_path(tiny_config):
    model = tiny_model().train()
    sample = make_sample(tiny_config, [], seed=2)
    out = model(**alone(sample))
    out.loss.backward()
    # ZeRO-3: the same parameters get gradients (zeros here) with and without images
    for name in ["glb_GN", "sub_GN", "img_projection.2.bias", "img_processor.vision_model.pre_layrnorm.weight"]:
        grad = model.get_parameter("model.vision_embed_tokens." + name).grad
        assert grad is not None and not grad.any(), name


def test_image_token_count_mismatch_raises(tiny_config):
    model = tiny_model()
    batch = alone(make_sample(tiny_config, [(1, 1)], seed=3))
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[IMG]])], dim=1)
    with pytest.raises(ValueError, match="14 image tokens .* 13 features"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch["input_ids"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_row_equals_samples_alone(attn, tiny_config):
    model = tiny_model(attn)
    samples = [make_sample(tiny_config, crops, seed=10 + i) for i, crops in enumerate([[(1, 2)], [], [(2, 1), (1, 1)]])]
    pad = 5
    ids = torch.cat([s["input_ids"] for s in samples] + [torch.full((pad,), PAD)])[None]
    positions = torch.cat([torch.arange(len(s["input_ids"])) for s in samples] + [torch.arange(pad)])[None]
    pixels = torch.cat([s["pixel_values"] for s in samples])
    sizes = torch.cat([s["image_sizes"] for s in samples])
    packed = dict(input_ids=ids, position_ids=positions, pixel_values=pixels, image_sizes=sizes)
    with torch.no_grad():
        logits = model(**packed).logits
        start = 0
        for i, sample in enumerate(samples):
            end = start + len(sample["input_ids"])
            batch = alone(sample)
            single_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            torch.testing.assert_close(logits[0, start:end], single_logits[0], rtol=0, atol=1e-5)
            # this sample's summed loss, from the packed row (its labels only, first token -100)
            labels = torch.full_like(ids, -100)
            labels[0, start + 1 : end] = sample["labels"][1:]
            packed_loss = model(**packed, labels=labels, num_items_in_batch=1).loss
            single_loss = model(**batch, num_items_in_batch=1).loss
            torch.testing.assert_close(packed_loss, single_loss, rtol=0, atol=1e-5)
            start = end


# --- loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_empty_chunks", [True, False])
def test_chunked_loss_equals_full_cross_entropy(skip_empty_chunks):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 40, (50,))
    labels[::3] = -100
    labels[8:16] = -100  # one whole chunk without labels
    loss, count = chunked_cross_entropy(hidden, head, labels, chunk_size=8, skip_empty_chunks=skip_empty_chunks)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    full = F.cross_entropy(head(hidden), labels, ignore_index=-100, reduction="sum")
    full.backward()
    assert count == int((labels != -100).sum())
    for a, b in zip(got, (full.detach(), hidden.grad, head.weight.grad)):
        torch.testing.assert_close(a, b)
    empty, zero = chunked_cross_entropy(hidden, head, torch.full((50,), -100), chunk_size=8)
    empty.backward()  # no labels at all: still a graph, zero gradient
    assert zero == 0 and empty.item() == 0.0


def test_chunked_loss_runs_the_chunk_count_asked_for():
    """num_chunks (the largest count over ZeRO-3 ranks): extra lm_head calls on empty slices, in the
    forward and again in the backward (recompute), the same loss and gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    hidden, labels = torch.randn(20, 16, requires_grad=True), torch.randint(0, 40, (20,))
    loss, _ = chunked_cross_entropy(hidden, head, labels, chunk_size=8, skip_empty_chunks=False)
    forward_calls = list(calls)
    more, _ = chunked_cross_entropy(hidden, head, labels, chunk_size=8, skip_empty_chunks=False, num_chunks=5)
    assert forward_calls == [8, 8, 4] and calls[3:] == [8, 8, 4, 0, 0]
    calls.clear()
    more.backward()
    assert sorted(calls) == [0, 0, 4, 8, 8]  # the checkpointed chunks recompute: same calls in backward
    torch.testing.assert_close(more, loss)
    with pytest.raises(ValueError, match="num_chunks=2 < 3 chunks"):
        chunked_cross_entropy(hidden, head, labels, chunk_size=8, num_chunks=2)
