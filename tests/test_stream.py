"""WebDataset streaming (stream.py) over tiny tars written here, with a fake process_fn."""

import io
import json
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image

from phi3v_train.data.stream import build_eval_loader, build_train_loader, expand_urls

S = 4  # crop size
L = 64  # max_seq_len
NUM_SHARDS, PER_SHARD = 4, 6
CORRUPT_KEY = "s2-003"


class FakeProcess:
    """Stand-in for RecordProcessor: length from the record, one image token (a run of one) at
    position 1, one crop valued by the pixel. Counts its calls (in this process)."""

    def __init__(self):
        self.calls = 0

    def num_tokens(self, record: dict, image_size) -> int:
        return record["num_tokens"]

    def __call__(self, record: dict, image) -> dict:
        self.calls += 1
        if record.get("fail"):
            raise ValueError("processor rejects this record")
        n = record["num_tokens"]
        ids = torch.full((n,), 7, dtype=torch.long)
        ids[1] = 32044
        labels = ids.clone()
        labels[: n // 2] = -100
        pixel = float(image.getpixel((0, 0))[0])
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.full((1, 3, S, S), pixel),
                "image_sizes": torch.tensor([[S, S]]), "key": record["key"]}


fake_process = FakeProcess()


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards x 6 samples; one corrupt image, one too long, one the processor rejects."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(NUM_SHARDS):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as tar:
            for i in range(PER_SHARD):
                key = f"s{s}-{i:03d}"
                record = {"key": key, "prompt": "p", "answer": "a", "title": "t",
                          "num_tokens": 5 + (7 * s + 3 * i) % 20}
                if key == "s1-002":
                    record["num_tokens"] = L + 1
                if key == "s3-004":
                    record["fail"] = True
                image = b"not an image" if key == CORRUPT_KEY else png(10 * s + i)
                tar.write({"__key__": key, "png": image, "json": json.dumps(record).encode()})
    return root


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def train_loader(shards, **kw):
    args = dict(max_seq_len=L, micro_batch_size=2, rank=0, world_size=2, num_workers=0, seed=1,
                buffer_size=8, crop_size=S, shuffle_buffer=10)
    args.update(kw)
    process_fn = args.pop("process_fn", fake_process)
    return build_train_loader(str(shards / "train-{000000..000003}.tar"), process_fn, **args)


def keys(batches):
    return [k for b in batches for k in b["sample_keys"]]


def test_train_batches_follow_the_contract(shards):
    batch = take(train_loader(shards), 1)[0]
    assert batch["input_ids"].shape == (2, L)
    assert batch["pixel_values"].shape == (batch["num_samples"], 3, S, S)
    assert batch["cu_seqlens"][-1] == 2 * L


def test_ranks_differ_and_same_seed_repeats(shards):
    r0 = keys(take(train_loader(shards, rank=0), 6))
    r1 = keys(take(train_loader(shards, rank=1), 6))
    assert r0 != r1
    assert r0 == keys(take(train_loader(shards, rank=0), 6))
    assert r0 != keys(take(train_loader(shards, rank=0, seed=2), 6))


def test_same_seed_same_batches_with_workers(shards):
    loader = train_loader(shards, num_workers=2)
    a = take(loader, 4)
    b = take(train_loader(shards, num_workers=2), 4)
    assert loader.stats.num_read > 0  # counters are shared with the worker processes
    for x, y in zip(a, b):
        assert x["sample_keys"] == y["sample_keys"]
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixel_values"], y["pixel_values"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_one_pass_split_by_rank_and_bad_samples_counted(shards, caplog, num_workers):
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    seen, stats = [], []
    with caplog.at_level(logging.WARNING, logger="phi3v_train.data.stream"):
        for rank in range(2):
            loader = build_eval_loader(urls, fake_process, max_seq_len=L, rank=rank,
                                       world_size=2, num_workers=num_workers, crop_size=S)
            seen.append(keys(list(loader)))
            stats.append(loader.stats.as_dict())
    everything = {f"s{s}-{i:03d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD)}
    bad = {CORRUPT_KEY, "s1-002", "s3-004"}
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == everything - bad
    assert len(seen[0]) + len(seen[1]) == len(everything - bad)
    total = {k: stats[0][k] + stats[1][k] for k in stats[0]}
    assert total == {"num_read": 24, "num_bad_decode": 1, "num_bad_process": 1, "num_overlong": 1,
                     "num_truncated": 0, "num_dropped": 0, "num_length_mismatch": 0,
                     "num_bad_shards": 0, "num_skipped_batches": 0}
    if num_workers == 0:  # worker processes log to their own stderr
        assert all(k in caplog.text for k in (CORRUPT_KEY, "s3-004", "s1-002"))


def test_corrupt_image_skipped_in_train_stream(shards):
    loader = train_loader(shards)
    batches = take(loader, 20)
    assert CORRUPT_KEY not in keys(batches)
    assert loader.stats.num_bad_decode >= 1


def test_eval_with_too_few_shards_raises(shards):
    with pytest.raises(ValueError, match="4 shard.* 6 readers"):
        build_eval_loader(str(shards / "train-*.tar"), fake_process, max_seq_len=L, rank=0,
                          world_size=2, num_workers=3)


def test_expand_urls(shards):
    by_glob = expand_urls(str(shards / "train-*.tar"))
    assert by_glob == expand_urls(str(shards / "train-{000000..000003}.tar"))
    assert by_glob == expand_urls(by_glob) and len(by_glob) == NUM_SHARDS
    with pytest.raises(ValueError, match="no shards match"):
        expand_urls(str(shards / "val-*.tar"))
    with pytest.raises(ValueError, match="not found"):
        expand_urls(str(shards / "train-{000000..000009}.tar"))


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x["sample_keys"] == y["sample_keys"]
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_sizes"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("workers,resume_workers,rank,starts",
                         [(0, 0, 0, (5,)), (2, 2, 0, (3, 4)), (2, 1, 1, (3,)), (0, 4, 0, (6,))])
def test_resume_yields_the_uninterrupted_batches(shards, workers, resume_workers, rank, starts):
    """Restart at micro-batch k == the uninterrupted run from k on (2 ranks x 2 workers included),
    also when the restart has another number of workers (the order depends on num_streams only)."""
    total = 9
    full = take(train_loader(shards, num_workers=workers, rank=rank, num_streams=4), total)
    for k in starts:
        resumed = take(train_loader(shards, num_workers=resume_workers, rank=rank, num_streams=4, start_batch=k),
                       total - k)
        assert_same_batches(full[k:], resumed)


def test_workers_must_divide_num_streams(shards):
    with pytest.raises(ValueError, match="num_workers=3 must divide num_streams=8"):
        train_loader(shards, num_workers=3)


def test_only_packed_samples_are_processed_and_replay_processes_nothing(shards):
    proc = FakeProcess()
    loader = train_loader(shards, start_batch=9, process_fn=proc, num_streams=2)
    batches = take(loader, 2)
    # process_fn ran once per sample of the two emitted batches (+ the ones it rejected), never
    # for the 4 + 5 replayed batches of the two sub-streams or the samples still waiting in the buffers
    assert proc.calls == sum(b["num_samples"] for b in batches) + loader.stats.num_bad_process
    assert loader.stats.num_skipped_batches == 9


def test_pipe_urls_and_overlong_truncation(shards):
    urls = [f"pipe:cat {p}" for p in sorted(shards.glob("train-*.tar"))]
    loader = build_eval_loader(urls, fake_process, max_seq_len=L, rank=0, world_size=1, num_workers=0,
                               crop_size=S, overlong="truncate")
    batches = list(loader)
    lengths = {k: int(n) for b in batches for k, n in zip(b["sample_keys"], torch.diff(b["cu_seqlens"]).tolist())}
    assert lengths["s1-002"] == L  # L + 1 tokens cut to L (its image token at 1 kept)
    assert loader.stats.num_truncated == 1 and loader.stats.num_overlong == 0
    assert len(lengths) == NUM_SHARDS * PER_SHARD - 2  # the corrupt image and the rejected record
    assert expand_urls("pipe:cat /x/a-{0..2}.tar") == [f"pipe:cat /x/a-{i}.tar" for i in range(3)]
    assert expand_urls("pipe:ls /x/*.tar") == ["pipe:ls /x/*.tar"]  # no globbing of commands


def test_pad_images_to_gives_equal_image_counts(shards):
    batches = take(train_loader(shards, pad_images_to=3, pad_image_tokens=4), 6)
    for b in batches:
        assert b["image_sizes"].shape[0] == 2 * 3 == b["num_images"] + b["num_pad_images"]
        assert b["pixel_values"].shape[0] == b["num_images"] + 2 * b["num_pad_images"]
        assert b["image_positions"].shape == (6, 2)
        # every image position holds an image token; padding images are unlabelled
        rows, cols = b["image_positions"].unbind(1)
        assert b["input_ids"][rows, cols].eq(32044).all()
    assert sum(b["num_pad_images"] for b in batches) > 0


def test_unpacked_baseline_one_sample_per_row(shards):
    batches = take(train_loader(shards, pack=False), 4)
    assert all(1 <= b["num_samples"] <= 2 for b in batches)  # B = 2 rows, at most one sample each
    # per row: the sample and the padding tail (a sample the processor rejects leaves a padding row)
    assert all(len(b["cu_seqlens"]) - 1 == b["num_samples"] + 2 for b in batches)
