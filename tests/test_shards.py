"""Tests for data/shards.py: bad rows skipped with reasons, tars readable, deterministic split."""

import csv
import hashlib
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from phi3v_train.data.shards import DEFAULT_PROMPT, sanitize_key, write_shards

LUMA = Path(__file__).resolve().parents[1] / "data" / "luma"


def luma_rows():
    with open(LUMA / "products.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def small_source(tmp_path):
    """8 good Luma rows (images copied under tmp_path/images) + 6 bad rows, shuffled."""
    good = luma_rows()[::23][:8]
    (tmp_path / "images").mkdir()
    for row in good:
        shutil.copy(LUMA / row["imageurl"], tmp_path / row["imageurl"])
    corrupt = (LUMA / good[0]["imageurl"]).read_bytes()
    (tmp_path / "images" / "corrupt.jpg").write_bytes(corrupt[: len(corrupt) // 2])
    bad = [
        dict(good[1], product_code="BAD-MISSING", imageurl="images/nope.jpg"),
        dict(good[1], product_code="BAD-CORRUPT", imageurl="images/corrupt.jpg"),
        dict(good[2], product_code="BAD-PRICE", full_price="n/a"),
        dict(good[2], product_code="BAD-NOPRICE", full_price=""),
        dict(good[3], product_code="BAD-TITLE", title="  "),
        dict(good[4], title="A duplicate of an earlier product code"),
    ]
    rows = good + bad
    write_csv(tmp_path / "products.csv", rows)
    return tmp_path, good, bad


def read_split(out_dir, manifest, split):
    urls = [str(out_dir / name) for name in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")) if urls else []


def test_small_csv_with_bad_rows(small_source, tmp_path):
    root, good, bad = small_source
    out = tmp_path / "shards"
    manifest = write_shards(root / "products.csv", root, out, val_fraction=0.25, samples_per_shard=3)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["created_by"] == "phi3v-train"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["num_samples"] + val["num_samples"] == 8 and val["num_samples"] >= 1
    assert train["shards"][0] == "train-000000.tar" and val["shards"][0] == "val-000000.tar"
    assert len(train["shards"]) == -(-train["num_samples"] // 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(train["shards"] + val["shards"] + ["manifest.json"])

    reasons = {s["key"]: (s["row"], s["reason"]) for s in manifest["skipped"]}
    assert manifest["num_skipped"] == 6 and len(reasons) == 6
    assert reasons["bad-missing"][1].startswith("missing image file: ") and reasons["bad-missing"][0] == 8
    assert reasons["bad-corrupt"][1].startswith("corrupt image file: ")
    assert reasons["bad-price"][1] == "non-numeric full_price: 'n/a'"
    assert reasons["bad-noprice"][1] == "missing full_price"
    assert reasons["bad-title"][1] == "empty title"
    dup = sanitize_key(good[4]["product_code"])
    assert reasons[dup] == (13, f"duplicate key '{dup}' (kept row 4)")

    samples = read_split(out, manifest, "train") + read_split(out, manifest, "val")
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == sorted(sanitize_key(r["product_code"]) for r in good)
    for row in good:
        sample = by_key[sanitize_key(row["product_code"])]
        record, image = sample["json"], sample["jpg"]
        assert record["key"] == sample["__key__"] and record["product_code"] == row["product_code"]
        # titles are stripped (one Luma title ends with a space)
        assert record["title"] == row["title"].strip() and record["category"] == row["category3_code"]
        assert record["category1"] == row["category1_code"] and record["currency"] == "USD"
        assert record["full_price"] == float(row["full_price"]) and isinstance(record["full_price"], float)
        assert record["prompt"] == DEFAULT_PROMPT
        assert record["answer"] == (f"Product: {row['title'].strip()}, Category: {row['category3_code']}, "
                                    f"Full Price: {float(row['full_price'])}")
        assert image.size == (record["image_width"], record["image_height"])
    # The image member holds the original file's bytes.
    with tarfile.open(out / train["shards"][0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        row = next(r for r in good if sanitize_key(r["product_code"]) == member.name[:-4])
        assert tar.extractfile(member).read() == (root / row["imageurl"]).read_bytes()


def test_split_is_deterministic_and_independent_of_row_order(small_source, tmp_path):
    root, good, bad = small_source
    first = write_shards(root / "products.csv", root, tmp_path / "a", val_fraction=0.3, samples_per_shard=2)
    rows = good + bad[:-1]  # without the duplicate: which copy is kept depends on row order
    random.Random(1).shuffle(rows)
    write_csv(root / "shuffled.csv", [r for r in rows if r["product_code"] != "BAD-MISSING"])
    second = write_shards(root / "shuffled.csv", root, tmp_path / "b", val_fraction=0.3, samples_per_shard=2)
    assert first["splits"] == second["splits"]

    def digest(folder, manifest):
        return [hashlib.sha1((folder / n).read_bytes()).hexdigest()
                for split in manifest["splits"].values() for n in split["shards"]]

    assert digest(tmp_path / "a", first) == digest(tmp_path / "b", second)  # byte-identical tars
    # Rewriting into the same folder with bigger shards removes the stale ones.
    third = write_shards(root / "products.csv", root, tmp_path / "a", val_fraction=0.3, samples_per_shard=64)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "train-000000.tar", "val-000000.tar"]
    assert third["splits"]["train"]["num_samples"] == first["splits"]["train"]["num_samples"]


def test_bad_arguments(small_source, tmp_path):
    root, _, _ = small_source
    with pytest.raises(ValueError):
        write_shards(root / "products.csv", root, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(ValueError, match="image_1"):
        write_shards(root / "products.csv", root, tmp_path / "o", prompt_template="no tag")
    with pytest.raises(KeyError, match="not a column"):
        write_shards(root / "products.csv", root, tmp_path / "o", answer_template="{colour}")


def test_full_luma_csv(tmp_path):
    manifest = write_shards(LUMA / "products.csv", LUMA, tmp_path)
    splits = manifest["splits"]
    assert manifest["num_skipped"] == 0 and manifest["skipped"] == []
    assert splits["train"]["num_samples"] + splits["val"]["num_samples"] == 183
    assert 5 <= splits["val"]["num_samples"] <= 35  # ~10 %
    samples = read_split(tmp_path, manifest, "val")
    assert len(samples) == splits["val"]["num_samples"]
    assert all(s["jpg"].size == (s["json"]["image_width"], s["json"]["image_height"]) for s in samples)


def test_shard_records_feed_the_processor(small_source, tmp_path):
    from phi3v_train.model.processor import Phi3VProcessor

    root, _, _ = small_source
    manifest = write_shards(root / "products.csv", root, tmp_path / "s")
    processor = Phi3VProcessor.from_pretrained(num_crops=4, crop_size=56)
    for sample in read_split(tmp_path / "s", manifest, "train")[:3]:
        encoded = processor.encode_reference_sample(sample["json"], sample["jpg"])
        assert len(encoded["input_ids"]) == processor.record_length(sample["json"])
        answer = processor.tokenizer.decode(encoded["labels"][encoded["labels"] != -100][:-1])
        assert answer == sample["json"]["answer"] and encoded["key"] == sample["__key__"]
