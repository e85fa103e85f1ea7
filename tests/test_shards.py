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


def listing(folder):
    """File names in folder, without the hidden .state folder."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


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
    # at most 3 per shard (a shard planned with the corrupt image holds one sample less)
    counts = [i["num_samples"] for i in train["shard_info"]]
    assert sum(counts) == train["num_samples"] and all(1 <= c <= 3 for c in counts)
    assert [i["name"] for i in train["shard_info"]] == train["shards"]
    assert listing(out) == sorted(train["shards"] + val["shards"] + ["manifest.json"])

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
    assert listing(tmp_path / "a") == ["manifest.json", "train-000000.tar", "val-000000.tar"]
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


# --- sources, parallelism, shard size, re-runs, manifest lengths ------------------------------

def tar_digests(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_sources_tsv_jsonl_parquet_and_saved_dataset(small_source, tmp_path):
    """The same 8 products from four formats; images by path (tsv, jsonl) or embedded bytes
    (parquet, datasets.Image); custom field names and templates."""
    import datasets

    from phi3v_train.data.sources import FieldMap

    root, good, _ = small_source
    rows = [{"sku": r["product_code"], "name": r["title"], "usd": r["full_price"], "img": r["imageurl"],
             "cat": r["category3_code"]} for r in good]
    fields = FieldMap(key="sku", title="name", price="usd", image="img", category="cat")
    kw = dict(fields=fields, prompt_template="<|image_1|>Name and price?", answer_template="{title} costs {full_price}",
              val_fraction=0.0)
    with open(root / "p.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    (root / "p.jsonl").write_text("".join(json.dumps(dict(r, usd=float(r["usd"]))) + "\n" for r in rows))
    embedded = [dict(r, img=(root / r["img"]).read_bytes()) for r in rows]
    datasets.Dataset.from_list(embedded).to_parquet(str(root / "p.parquet"))
    ds = datasets.Dataset.from_list([dict(r, img=str(root / r["img"])) for r in rows])
    ds.cast_column("img", datasets.Image()).save_to_disk(str(root / "saved"))

    outputs = {}
    for name in ("p.tsv", "p.jsonl", "p.parquet", "saved"):
        manifest = write_shards(root / name, root, tmp_path / "out" / name, **kw)
        assert manifest["num_skipped"] == 0 and manifest["splits"]["train"]["num_samples"] == 8
        samples = read_split(tmp_path / "out" / name, manifest, "train")
        outputs[name] = {s["__key__"]: (s["json"]["answer"], s["json"]["full_price"]) for s in samples}
        assert samples[0]["json"]["prompt"] == "<|image_1|>Name and price?"
    assert all(o == outputs["p.tsv"] for o in outputs.values())
    r = good[0]
    assert outputs["p.tsv"][sanitize_key(r["product_code"])] == (f"{r['title'].strip()} costs {float(r['full_price'])}",
                                                                float(r["full_price"]))


def test_parallel_workers_write_the_same_bytes_and_shards_cut_by_bytes(small_source, tmp_path):
    root, good, _ = small_source
    one = write_shards(root / "products.csv", root, tmp_path / "one", samples_per_shard=2, val_fraction=0.2)
    two = write_shards(root / "products.csv", root, tmp_path / "two", samples_per_shard=2, val_fraction=0.2,
                       num_workers=2, progress=True)
    assert tar_digests(tmp_path / "one") == tar_digests(tmp_path / "two") and len(tar_digests(tmp_path / "one")) >= 4
    assert one["splits"] == two["splits"] and one["skipped"] == two["skipped"]

    sizes = {sanitize_key(r["product_code"]): (root / r["imageurl"]).stat().st_size for r in good}
    limit = 2 * max(sizes.values()) + 2000  # two or three images per shard
    manifest = write_shards(root / "products.csv", root, tmp_path / "bytes", samples_per_shard=100,
                            max_shard_bytes=limit, val_fraction=0.0)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) >= 3
    samples = train["samples"]
    for i, info in enumerate(train["shard_info"]):
        keys = [k for k, s in zip(samples["key"], samples["shard"]) if s == i]
        assert len(keys) == info["num_samples"]
        assert len(keys) == 1 or sum(sizes[k] + 1536 for k in keys) <= limit


def test_rerun_keeps_complete_shards_and_a_crash_leaves_no_partial_tar(small_source, tmp_path, monkeypatch):
    import phi3v_train.data.shards as shards_mod

    root, _, _ = small_source
    out = tmp_path / "out"
    kw = dict(samples_per_shard=2, val_fraction=0.0)
    first = write_shards(root / "products.csv", root, out, **kw)
    digests = tar_digests(out)
    names = first["splits"]["train"]["shards"]
    assert first["shards_kept"] == 0 and len(names) >= 3
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}

    # A crash in the middle of a shard: no tar under a final name is partial, no .tmp is left.
    (out / names[1]).unlink()
    (out / "manifest.json").unlink()
    calls = {"n": 0}
    real = shards_mod.prepare_image

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "prepare_image", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        write_shards(root / "products.csv", root, out, **kw)
    assert not list(out.glob("*.tmp")) and not (out / names[1]).exists()
    for name in names[2:]:
        with tarfile.open(out / name) as tar:  # complete and readable
            assert len(tar.getnames()) in (2, 4)  # image + json per sample
    monkeypatch.setattr(shards_mod, "prepare_image", real)

    # The re-run rewrites only the missing shard, byte-identical; the rest is kept untouched.
    (out / "train-000099.tar").write_bytes(b"stale")  # an old shard of ours: removed
    again = write_shards(root / "products.csv", root, out, **kw)
    assert again["shards_kept"] == len(names) - 1
    assert tar_digests(out) == digests
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in names if n != names[1])
    assert {k: v for k, v in again.items() if k != "shards_kept"} == {k: v for k, v in first.items() if k != "shards_kept"}
    # A changed option changes every fingerprint: nothing is kept.
    assert write_shards(root / "products.csv", root, out, downscale=True, **kw)["shards_kept"] == 0


def test_manifest_token_lengths_equal_the_processor(small_source, tmp_path):
    from phi3v_train.data.process import RecordProcessor
    from phi3v_train.model.processor import Phi3VProcessor

    root, _, _ = small_source
    manifest = write_shards(root / "products.csv", root, tmp_path / "s", num_crops=4, crop_size=56, val_fraction=0.0)
    processor = Phi3VProcessor.from_pretrained(num_crops=4, crop_size=56)
    columns = manifest["splits"]["train"]["samples"]
    lengths = dict(zip(columns["key"], columns["num_tokens"]))
    text = dict(zip(columns["key"], columns["num_text_tokens"]))
    assert manifest["lengths"]["num_crops"] == 4 and sum(lengths.values()) == manifest["splits"]["train"]["num_tokens"]
    for sample in read_split(tmp_path / "s", manifest, "train"):
        encoded = RecordProcessor(processor)(sample["json"], sample["jpg"])
        assert lengths[sample["__key__"]] == len(encoded["input_ids"])
        w, h = sample["jpg"].size
        assert text[sample["__key__"]] == len(encoded["input_ids"]) - processor.image_token_count(w, h)


def test_cli_shards_with_options(small_source, tmp_path, capsys):
    from phi3v_train.cli import main

    root, _, _ = small_source
    out = tmp_path / "cli"
    rc = main(["shards", "--source", str(root / "products.csv"), "--images-root", str(root), "--out", str(out),
               "--workers", "2", "--samples-per-shard", "3", "--max-shard-bytes", "60000", "--no-progress",
               "--field", "category=category2_code", "--answer-template", "{title} | {category}"])
    assert rc == 0 and "skipped 6" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fields"]["category"] == "category2_code" and manifest["max_shard_bytes"] == 60000
    sample = read_split(out, manifest, "train")[0]
    assert sample["json"]["answer"] == f"{sample['json']['title']} | {sample['json']['category']}"
