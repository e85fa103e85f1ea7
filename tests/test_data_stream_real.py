"""The stream with the real RecordProcessor over real shards (Luma photos, tiny crops): predicted
lengths match, crops are written in place into one batch buffer (no copy) and equal a plain
encode of each sample, with and without worker processes."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from phi3v_train.data.process import RecordProcessor
from phi3v_train.data.shards import write_shards
from phi3v_train.data.stream import build_train_loader
from phi3v_train.model.processor import Phi3VProcessor

LUMA = Path(__file__).resolve().parents[1] / "data" / "luma"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    with open(LUMA / "products.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::7][:20]
    with open(root / "p.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    manifest = write_shards(root / "p.csv", LUMA, root / "shards", samples_per_shard=5, val_fraction=0.0,
                            num_crops=4, crop_size=56)
    urls = [str(root / "shards" / n) for n in manifest["splits"]["train"]["shards"]]
    raw = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    return urls, raw


@pytest.mark.parametrize("num_workers,dtype", [(0, torch.float32), (2, torch.bfloat16)])
def test_real_stream_crops_in_place_equal_encode(shards, num_workers, dtype):
    urls, raw = shards
    process = RecordProcessor(Phi3VProcessor.from_pretrained(num_crops=4, crop_size=56, pixel_dtype=dtype))
    loader = build_train_loader(urls, process, max_seq_len=400, micro_batch_size=2, rank=0, world_size=1,
                                num_workers=num_workers, seed=3, crop_size=56, shuffle_buffer=8)
    it = iter(loader)
    for _ in range(2):
        batch = next(it)
        pixels = batch["pixel_values"]
        assert pixels.dtype == dtype
        assert pixels.untyped_storage().nbytes() == pixels.numel() * pixels.element_size()  # the batch buffer itself
        offset = 0
        for key in batch["sample_keys"]:
            record = json.loads(raw[key]["json"])
            expected = process(record, Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB"))
            n = expected["pixel_values"].shape[0]
            assert torch.equal(pixels[offset:offset + n], expected["pixel_values"])
            offset += n
        assert offset == pixels.shape[0]
    if num_workers == 0:
        assert loader.stats.num_length_mismatch == 0 and loader.stats.num_bad_process == 0


def test_train_loader_from_config_rows_of_longest_pack_and_padding_images(shards):
    """The trainer's loader (train.build_loader) honours packing.padding / pad_to_multiple_of /
    pad_images_to / max_images_per_pack: same packs (same keys) as rows of max_seq_len, rows cut
    to a multiple of 16, every row padded to exactly 2 images."""
    from phi3v_train.config import REPO_ROOT, load_config
    from phi3v_train.model.config import load_model_config
    from phi3v_train.model.processor import num_image_tokens
    from phi3v_train.train import build_loader

    urls, _ = shards
    mcfg = load_model_config("tiny")
    base = ["packing.max_seq_len=400", "optim.micro_batch_size=2", "data.num_crops=4", "packing.pad_images_to=2"]
    batches = {}
    for padding in ("max_length", "longest"):
        cfg = load_config(str(REPO_ROOT / "configs/train/demo.yaml"),
                          [*base, f"packing.padding={padding}", "packing.pad_to_multiple_of=16"])
        it = iter(build_loader(cfg, mcfg, urls, rank=0, world_size=1))
        batches[padding] = [next(it) for _ in range(3)]
    pad_tokens = num_image_tokens(mcfg.crop_size, mcfg.crop_size, mcfg.crop_size, mcfg.patch_size)
    for full, short in zip(batches["max_length"], batches["longest"]):
        assert full["sample_keys"] == short["sample_keys"] and full["input_ids"].shape[1] == 400
        L = short["input_ids"].shape[1]
        assert L % 16 == 0 and L < 400
        assert torch.equal(short["input_ids"], full["input_ids"][:, :L])
        # 2 rows x 2 images, the real ones plus blank padding images of pad_tokens tokens each
        assert short["image_sizes"].shape[0] == 4 == short["num_images"] + short["num_pad_images"]
        assert short["num_tokens"] + short["num_pad_images"] * pad_tokens <= 2 * L
    # data.pixel_dtype=auto: float32 for an fp32 run (demo.yaml), bfloat16 for a bf16 one
    assert batches["longest"][0]["pixel_values"].dtype == torch.float32
    cfg = load_config(str(REPO_ROOT / "configs/train/demo.yaml"), [*base, "deepspeed.precision=bf16"])
    assert next(iter(build_loader(cfg, mcfg, urls, rank=0, world_size=1)))["pixel_values"].dtype == torch.bfloat16
