import json

import pytest
import yaml

from phi3v_train.config import (REPO_ROOT, ConfigError, build_deepspeed_config, load_config, lr_at, save_config,
                                validate_for_launch)


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
    with pytest.raises(ConfigError, match="packing.padding='pad': use longest or max_length"):
        load_config(None, ["packing.padding=pad"])
    with pytest.raises(ConfigError, match="pad_to_multiple_of must be >= 1"):
        load_config(None, ["packing.pad_to_multiple_of=0"])
    with pytest.raises(ConfigError, match="packing.pad_images_to must be >= 1"):
        load_config(None, ["packing.pad_images_to=0"])


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


def test_list_fields_and_fault_config():
    cfg = load_config(None, ["debug.nan_loss_steps=[2,5]", "debug.signal=SIGTERM", "debug.signal_step=3"])
    assert cfg.debug.nan_loss_steps == [2, 5] and cfg.debug.signal == "SIGTERM"
    assert load_config(None, ["debug.nan_loss_steps=4"]).debug.nan_loss_steps == [4]
    assert load_config(None).requeue_on_preemption is True and load_config(None).process_group_timeout_s == 600
    with pytest.raises(ConfigError, match="debug.nan_loss_steps: expected int"):
        load_config(None, ["debug.nan_loss_steps=[x]"])
    with pytest.raises(ConfigError, match="debug.signal="):
        load_config(None, ["debug.signal=SIGKILL"])
    with pytest.raises(ConfigError, match="wandb_mode"):
        load_config(None, ["logging.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match="max_nonfinite_steps_in_row"):
        load_config(None, ["optim.max_nonfinite_steps_in_row=0"])
    with pytest.raises(ConfigError, match="keep_last"):
        load_config(None, ["checkpoint.keep_last=0"])


def test_deepspeed_json_that_disagrees_with_the_tree(tmp_path):
    offload = REPO_ROOT / "configs/deepspeed/zero3_offload.json"
    with pytest.raises(ConfigError, match="set deepspeed.offload_optimizer=true"):
        build_deepspeed_config(load_config(None, [f"deepspeed.config={offload}"]), world_size=2)
    ds = build_deepspeed_config(load_config(None, [f"deepspeed.config={offload}", "deepspeed.offload_optimizer=true"]), 2)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ConfigError, match="does not exist"):
        build_deepspeed_config(load_config(None, [f"deepspeed.config={tmp_path / 'nope.json'}"]), world_size=1)


def _tiny_shards(tmp_path, width=400, height=400, answer="short"):
    """A manifest + one tar of JSON records (the length check reads no image bytes)."""
    import tarfile
    import io

    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "train-000000.tar", "w") as tar:
        for i in range(3):
            rec = {"key": f"k{i}", "prompt": "<|image_1|>What is shown in this image?", "answer": answer * (i + 1),
                   "image_width": width, "image_height": height}
            data = json.dumps(rec).encode()
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (d / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["train-000000.tar"]}}}))
    return d


def test_validate_for_launch_says_what_to_fix(tmp_path):
    shards = _tiny_shards(tmp_path)
    ok = load_config(None, [f"data.shards={shards}", "packing.max_seq_len=512", "deepspeed.precision=fp32"])
    assert validate_for_launch(ok, world_size=2)["train_batch_size"] == 2
    # max_seq_len vs the longest record (the tiny model: 4 crops of 56 px); k2 is the longest.
    with pytest.raises(ConfigError, match=r"sample 'k2' needs \d+ tokens .* > packing.max_seq_len=32: raise"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", "packing.max_seq_len=32"]), 1)
    validate_for_launch(load_config(None, [f"data.shards={shards}", "packing.max_seq_len=32",
                                           "packing.check_sample_lengths=0"]), 1)
    with pytest.raises(ConfigError, match="data.shards=.*no manifest.json"):
        validate_for_launch(load_config(None, [f"data.shards={tmp_path}"]), 1)
    with pytest.raises(ConfigError, match="data.shards=.*no shards match"):
        validate_for_launch(load_config(None, [f"data.shards={tmp_path}/nope-*.tar"]), 1)
    with pytest.raises(ConfigError, match="data.shards=.*not found"):
        validate_for_launch(load_config(None, [f"data.shards={tmp_path}/nope.tar"]), 1)
    with pytest.raises(ConfigError, match="split_shards_by_rank needs >= 2 shards"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", "data.split_shards_by_rank=true"]), 2)
    with pytest.raises(ConfigError, match="model.pretrained=.*no config.json"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", f"model.pretrained={tmp_path}"]), 1)
    with pytest.raises(ConfigError, match="model.name='nosuch'"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", "model.name=nosuch"]), 1)
    with pytest.raises(ConfigError, match="global_batch_size=3"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", "optim.global_batch_size=3"]), 2)
    # 2 blank 336-px images of 313 tokens do not leave room in a pack of 512
    with pytest.raises(ConfigError, match=r"pad_images_to=2 blank images of 313 tokens fill a pack of packing.max_seq_len=512"):
        validate_for_launch(load_config(None, [f"data.shards={shards}", "packing.max_seq_len=512",
                                               "model.name=phi-3-vision-128k-instruct", "packing.pad_images_to=2"]), 1)
