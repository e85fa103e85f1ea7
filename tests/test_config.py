import json

import pytest
import yaml

from phi3v_train.config import (ConfigError, build_deepspeed_config, load_config, lr_at, save_config)


def test_defaults_yaml_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "max_steps": 7}, "packing": {"max_seq_len": 1024}}))
    cfg = load_config(recipe, ["optim.lr=5e-4", "model.attn_implementation=eager", "data.num_crops=4"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.max_steps == 7
    assert cfg.packing.max_seq_len == 1024 and cfg.model.attn_implementation == "eager" and cfg.data.num_crops == 4
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key.*optim\.lrr.*valid keys.*optim\.lr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["nosuch.section=1"])


def test_bad_values_say_what_to_fix():
    with pytest.raises(ConfigError, match="attn_implementation"):
        load_config(None, ["model.attn_implementation=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["deepspeed.precision=fp8"])


def test_deepspeed_dict_derived_from_tree(tmp_path):
    cfg = load_config(None, ["optim.micro_batch_size=2", "optim.gradient_accumulation_steps=3",
                             "deepspeed.precision=bf16", "optim.grad_clip=0.5"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    cfg = load_config(None, ["optim.global_batch_size=10"])
    with pytest.raises(ConfigError, match="global_batch_size=10"):
        build_deepspeed_config(cfg, world_size=4)
    clash = tmp_path / "ds.json"
    clash.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 8}))
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_deepspeed_config(load_config(None, [f"deepspeed.config={clash}"]), world_size=1)


def test_lr_schedule_warmup_then_cosine():
    o = load_config(None, ["optim.warmup_steps=4", "optim.max_steps=20", "optim.min_lr_ratio=0.1"]).optim
    lrs = [lr_at(s, o) for s in range(20)]
    assert lrs[0] < lrs[1] < lrs[3] <= 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(20, o) == pytest.approx(0.1)


def test_types_are_checked_and_coerced():
    cfg = load_config(None, ["optim.lr=5e-4", "optim.max_steps=3", "model.pretrained=null", "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="optim.max_steps: expected int"):
        load_config(None, ["optim.max_steps=ten"])
    with pytest.raises(ConfigError, match="logging.wandb: expected bool"):
        load_config(None, ["logging.wandb=maybe"])
