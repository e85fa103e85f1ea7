"""Official checkpoints in and out: names and shapes, sharded loading with strict key checks, export, round trip.

Checkpoints here are tiny (hidden 96 with one head, so head_dim = 96 and the official 48-entry longrope
factor lists apply unchanged; tiny CLIP), written with the official names and, for the "official layout"
test, split into shards exactly as the released index assigns each name.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi3v_train.model.config import Phi3VConfig, load_model_config
from phi3v_train.model.export import export_hf, load_state_dict_into, parse_size
from phi3v_train.model.keys import index_key_names
from phi3v_train.model.modeling import Phi3VForCausalLM, expected_state_shapes
from phi3v_train.model.processor import load_tokenizer
from test_model import alone, make_sample

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/phi3v_train/assets"
INDEX = ROOT / "tests/fixtures/phi3v_model.safetensors.index.json"
TINY_VISION = json.loads((ROOT / "configs/model/tiny.json").read_text())["vision_config"]
TINY_TEXT = {"hidden_size": 96, "num_attention_heads": 1, "num_key_value_heads": 1, "num_hidden_layers": 1,
             "intermediate_size": 64}  # fmt: skip


def tiny_official(variant: str) -> dict:
    """The released config.json of `variant` ("phi3v" or "phi3_5v") with tiny sizes (official keys kept)."""
    return json.loads((ASSETS / variant / "config.json").read_text()) | TINY_TEXT | {"vision_config": TINY_VISION}


def random_model(config: Phi3VConfig, seed: int = 0) -> Phi3VForCausalLM:
    torch.manual_seed(seed)
    model = Phi3VForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in (model.model.vision_embed_tokens.glb_GN, model.model.vision_embed_tokens.sub_GN):
            p.normal_()
    return model


def write_official_layout(directory: Path, variant: str, state: dict[str, torch.Tensor], config_json: dict) -> None:
    """A checkpoint directory as released: shards assigned like the official index, index, config, tokenizer,
    preprocessor config."""
    directory.mkdir(parents=True, exist_ok=True)
    assignment = json.loads(INDEX.read_text())["weight_map"]
    shards: dict[str, dict] = {}
    for name, tensor in state.items():
        shards.setdefault(assignment[name], {})[name] = tensor.contiguous()
    for file, tensors in shards.items():
        save_file(tensors, directory / file, metadata={"format": "pt"})
    weight_map = {name: assignment[name] for name in state}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config_json))
    shutil.copyfile(ASSETS / variant / "preprocessor_config.json", directory / "preprocessor_config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(ASSETS / "phi3v" / f, directory / f)


def test_real_architecture_has_the_index_names_and_byte_size():
    index = json.loads(INDEX.read_text())
    for name in ("phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"):
        shapes = expected_state_shapes(load_model_config(name))
        assert sorted(shapes) == index_key_names(INDEX)  # the 592 names
        assert sum(torch.Size(s).numel() for s in shapes.values()) * 2 == index["metadata"]["total_size"]  # bf16
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (9216, 3072)
    assert shapes["model.vision_embed_tokens.sub_GN"] == (1, 1, 1, 4096)


@pytest.mark.parametrize("variant, num_crops, window", [("phi3v", 16, 131072), ("phi3_5v", 4, 262144)])
def test_official_layout_checkpoint_loads_strictly(tmp_path, variant, num_crops, window):
    official = tiny_official(variant)
    model = random_model(Phi3VConfig.from_official(official))
    write_official_layout(tmp_path, variant, model.state_dict(), official)
    assert len(list(tmp_path.glob("model-0000*-of-00002.safetensors"))) == 2

    loaded, info = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"])
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    config = loaded.config
    rope = config.text_config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == official["rope_scaling"]["long_factor"]
    assert loaded.model.rotary_emb.attention_scaling == pytest.approx(1.1902, abs=1e-4)
    assert (config.num_crops, config.text_config.sliding_window) == (num_crops, window)  # num_crops: preprocessor

    # Wrong names and shapes: one clear error listing all of them, before any weight is read.
    shard = tmp_path / "model-00002-of-00002.safetensors"
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop("lm_head.weight")
    tensors["model.vision_embed_tokens.extra_GN"] = torch.zeros(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("lm_head.weight")
    index["weight_map"]["model.vision_embed_tokens.extra_GN"] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"1 missing \['lm_head.weight'\], 1 unexpected \['model.vision_embed_tokens"):
        Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_export_round_trip_gives_identical_logits(tmp_path, tiny_config):
    model = random_model(tiny_config, seed=1)
    sample = make_sample(tiny_config, [(1, 2), (2, 1)], seed=3)
    batch = {k: v for k, v in alone(sample).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits

    out = export_hf(model, tiny_config, tmp_path / "export", max_shard_size="5MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(model.state_dict())  # official names, nothing else
    assert not any("wte" in k for k in index["weight_map"])  # one copy of the text embedding
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "phi3_v" and "text_config" not in config_json
    assert config_json["rope_scaling"]["type"] == "su" and config_json["torch_dtype"] == "float32"
    assert json.loads((out / "preprocessor_config.json").read_text())["num_crops"] == tiny_config.num_crops
    assert load_tokenizer(out).convert_tokens_to_ids("<|image|>") == 32044

    loaded = Phi3VForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert loaded.config.to_official() == tiny_config.to_official()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)

    again = export_hf(loaded.state_dict(), loaded.config, tmp_path / "again", max_shard_size="5MB")
    for shard in shards:
        with safe_open(shard, "pt") as a, safe_open(again / shard.name, "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    bf16 = export_hf(model, tiny_config, tmp_path / "bf16", dtype=torch.bfloat16)  # one 2GB shard
    assert [p.name for p in bf16.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_state_dict_names_are_checked_and_normalised(tmp_path, tiny_config):
    model = random_model(tiny_config, seed=2)
    state = model.state_dict()
    # a DeepSpeed-wrapped state dict with the reference's duplicate embedding exports to the same names
    wrapped = {"module." + k: v for k, v in state.items()}
    wrapped["module.model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"]
    out = export_hf(wrapped, tiny_config, tmp_path / "wrapped")
    assert index_key_names(out / "model.safetensors.index.json") == sorted(state)

    broken = dict(state)
    broken.pop("model.norm.weight")
    broken["model.vision_embed_tokens.glb_GN"] = torch.zeros(1, 1, 8)
    with pytest.raises(KeyError, match=r"1 missing \['model.norm.weight'\].* 1 with a different shape"):
        export_hf(broken, tiny_config, tmp_path / "broken")
    bad_alias = dict(state, **{"model.vision_embed_tokens.wte.weight": torch.zeros_like(state["lm_head.weight"])})
    with pytest.raises(ValueError, match="differs"):
        export_hf(bad_alias, tiny_config, tmp_path / "alias")

    target = random_model(tiny_config, seed=3)
    load_state_dict_into(target, wrapped)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), target.state_dict().values()))
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_state_dict_into(target, {k: v for k, v in state.items() if k != "model.norm.weight"})
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(7) == 7


@pytest.fixture(scope="module")
def tiny_config() -> Phi3VConfig:
    return load_model_config("tiny")
