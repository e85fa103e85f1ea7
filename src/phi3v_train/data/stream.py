"""Stream WebDataset shards into packed, collated micro-batches, deterministically and resumably.

    shards --(resampled | split by rank/worker)--> tar samples --shuffle--> measure (json only:
      predicted tokens) --Packer (on lengths)--> planned packs --group B--> planned batches
      --(skip the first k: fast-forward)--> decode + process_fn + collate --> batches

Packing happens on *predicted* lengths, before any pixel is decoded: ``length_fn(record,
(width, height))`` (``RecordProcessor.num_tokens``: the text tokens plus the image tokens implied
by the image size and num_crops). Only samples of emitted packs are decoded and HD-transformed,
so host memory holds raw bytes in the buffers, never ``buffer_size`` x 23 MB of crops. The
crops of a batch are written in place into one float32 buffer (shared memory in a DataLoader
worker) that becomes the batch's ``pixel_values``: no concatenation, no copy to the trainer.

Determinism and resume. A rank's training stream is a fixed interleaving of ``S = num_streams``
sub-streams (``data.num_streams``, 8 by default): global batch ``n`` is the ``n // S``-th batch of
sub-stream ``n % S``. Each sub-stream is a pure function of (seed, rank, sub-stream, S, shard
contents): its shard draws, its shuffle and its packing decisions depend on nothing else, in
particular not on the number of DataLoader workers. ``W`` workers (``W`` must divide ``S``) share
the sub-streams: worker ``w`` makes global batches ``w, w + W, w + 2W, ...`` (a ``DataLoader`` over
an ``IterableDataset`` asks the workers in turn and keeps that order), i.e. the batches of the
``S / W`` sub-streams ``v = w (mod W)``, interleaved. ``start_batch=k`` (micro-batches this rank
already consumed) shifts this so that the first batch out is global batch ``k``, and every
sub-stream replays its planned batches before that point on lengths alone (tar read + json +
tokenising the text: no image decode, no HD transform, no collate), then continues for real. So
the batches from ``k`` on are exactly those of the uninterrupted run (same keys, same packs, same
tensors) for the same seed, rank, world_size and num_streams, whatever the number of workers of
either run. A sample that fails to decode or process is left out of its pack in both runs alike.
Memory: each sub-stream holds up to ``shuffle_buffer`` + ``buffer_size`` undecoded samples.
Start-up: a sub-stream's first packs come from a full, fresh buffer and fill better than its
steady state (e.g. 100% then ~95% at L=512 on the bundled photos), so the first S batches of a
run overstate the packing efficiency; benchmarks measure past them.

Train: every (rank, sub-stream) draws shards with replacement from the whole list with its own
seeded RNG (WebDataset's ``ResampledShards`` idea), so the stream never ends and no rank runs out:
the trainer runs a fixed number of steps. Eval: shards are split between all ranks x workers and
read once. Rank and world size are passed in; this module never reads the environment.

Overlong samples (predicted tokens > ``max_seq_len``): ``overlong="drop"`` drops and counts them;
``"truncate"`` keeps their first ``max_seq_len`` tokens, never cutting inside an image (see
:func:`phi3v_train.data.process.truncate_sample`).

Bad samples (unreadable json/image, ``process_fn`` errors) and unreadable shards are skipped,
logged with their key and counted in the loader's ``stats`` (:class:`StreamStats`), shared by the
DataLoader's worker processes (counts include records replayed to fast-forward).
"""

from __future__ import annotations

import ctypes
import glob
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from phi3v_train.data.collate import IMAGE_TOKEN_ID, PAD_TOKEN_ID, collate_packs, image_token_runs, row_length
from phi3v_train.data.pack import Packer, sample_num_images, sample_num_tokens
from phi3v_train.data.process import truncate_sample

log = logging.getLogger(__name__)

# process_fn(record, image) -> sample: record is the shard's parsed ``{key}.json`` dict, image a
# PIL RGB image (None when the sample has no image file); the sample follows docs/architecture.md.
ProcessFn = Callable[[dict, Any], dict]
# length_fn(record, (width, height) or None) -> len(process_fn(record, image)["input_ids"]).
LengthFn = Callable[[dict, "tuple[int, int] | None"], int]

IMAGE_EXTENSIONS = frozenset(wds.autodecode.IMAGE_EXTENSIONS)
_decode_pil = wds.imagehandler("pil")  # RGB PIL.Image
MAX_CONSECUTIVE_ERRORS = 1000  # a stream failing this often in a row is broken, not noisy
OVERLONG = ("drop", "truncate")


class StreamStats:
    """Counters shared across DataLoader worker processes (``multiprocessing.Value``).

    Fields: ``num_read`` tar samples read; ``num_bad_decode`` json/image decode failures (or a
    ``length_fn`` error); ``num_bad_process`` ``process_fn`` failures (or a sample whose image
    tokens do not match its images); ``num_overlong`` samples dropped as longer than
    ``max_seq_len``; ``num_truncated`` samples cut to ``max_seq_len``; ``num_dropped`` samples
    dropped by the packer (no tokens, over the image cap) or because their real length outgrew
    their pack; ``num_length_mismatch`` samples whose real length differs from ``length_fn``;
    ``num_bad_shards`` unreadable shards; ``num_skipped_batches`` batches replayed on lengths
    only to fast-forward to ``start_batch``.
    """

    FIELDS = ("num_read", "num_bad_decode", "num_bad_process", "num_overlong", "num_truncated",
              "num_dropped", "num_length_mismatch", "num_bad_shards", "num_skipped_batches")

    def __init__(self):
        self._values = {name: multiprocessing.Value("q", 0) for name in self.FIELDS}

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (process-safe)."""
        value = self._values[name]
        with value.get_lock():
            value.value += n

    def as_dict(self) -> dict[str, int]:
        """A snapshot of all counters."""
        return {name: v.value for name, v in self._values.items()}

    def __getattr__(self, name: str) -> int:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name].value
        raise AttributeError(name)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs into a list of shard paths/URLs, in order.

    Args:
        urls: a path, a glob (``/data/train-*.tar``), a brace pattern
            (``/data/train-{000000..000099}.tar``), a ``pipe:`` command that writes one tar to
            stdout (``pipe:aws s3 cp s3://b/train-{000000..000099}.tar -``: braces expand into
            one command per shard, globs are not applied), a URL, or a list of any of these.

    Returns:
        The expanded list; local globs are sorted, the rest keep their order.

    Raises:
        ValueError: nothing matched, or local paths that do not exist.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(os.fspath(item)):
            is_glob = not _is_remote(url) and any(c in url for c in "*?[")
            out += sorted(glob.glob(url)) if is_glob else [url]
    if not out:
        raise ValueError(f"no shards match {urls!r}")
    missing = [u for u in out if not _is_remote(u) and not os.path.exists(u)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) not found, e.g. {missing[0]!r} (from {urls!r})")
    return out


def _image_exts(raw: dict) -> list[str]:
    return sorted(k for k in raw if k.lower() in IMAGE_EXTENSIONS)


def decode_raw(raw: dict) -> tuple[dict, Any]:
    """Decode one WebDataset tar sample into ``(record, image)``.

    Args:
        raw: ``{"__key__": str, "json": bytes, "<ext>": bytes, ...}`` as read from the tar.

    Returns:
        The parsed json record and a PIL RGB image of the first image file by extension name
        (sorted), or None when there is none.

    Raises:
        KeyError: no ``json`` member; any PIL / json error for corrupt bytes.
    """
    record = json.loads(raw["json"])
    exts = _image_exts(raw)
    image = _decode_pil(exts[0], raw[exts[0]]) if exts else None
    return record, image


def raw_image_size(raw: dict, record: dict) -> tuple[int, int] | None:
    """(width, height) of the sample's image without decoding it: the record's ``image_width`` /
    ``image_height`` (written by data/shards.py), else the image header; None without an image."""
    exts = _image_exts(raw)
    if not exts:
        return None
    w, h = record.get("image_width"), record.get("image_height")
    if w and h:
        return int(w), int(h)
    with Image.open(io.BytesIO(raw[exts[0]])) as image:  # reads the header only
        return image.size


def _stream_seed(*parts: Any) -> random.Random:
    """An RNG seeded from a tuple; string seeding is stable across processes and Python runs."""
    return random.Random("/".join(str(p) for p in parts))


class _Item:
    """A tar sample planned by its predicted length, not yet decoded."""

    __slots__ = ("key", "raw", "record", "image_size", "num_tokens", "num_images", "overlong")

    def __init__(self, key, raw, record, image_size, num_tokens, num_images, overlong):
        self.key, self.raw, self.record, self.image_size = key, raw, record, image_size
        self.num_tokens, self.num_images, self.overlong = num_tokens, num_images, overlong


class PackedStream(IterableDataset):
    """Iterable of collated micro-batches (see :func:`build_train_loader`); has ``stats``."""

    def __init__(self, urls: list[str], process_fn: ProcessFn, *, length_fn: LengthFn, train: bool,
                 max_seq_len: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 num_streams: int, start_batch: int, buffer_size: int, shuffle_buffer: int,
                 crop_size: int, max_images_per_pack: int | None, pad_token_id: int, overlong: str,
                 pad_images_to: int | None, pad_image_tokens: int, pack: bool = True,
                 strategy: str = "best_fill", padding: str = "max_length", pad_to_multiple_of: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r}: use one of {OVERLONG}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        row_length([], max_seq_len, padding, pad_to_multiple_of)  # validates padding
        if pad_images_to is not None and pad_image_tokens < 1:
            raise ValueError("pad_images_to needs pad_image_tokens = num_image_tokens(S, S) >= 1")
        self.urls, self.process_fn, self.length_fn, self.train = urls, process_fn, length_fn, train
        self.max_seq_len, self.micro_batch_size = max_seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_streams, self.start_batch = num_streams, start_batch
        self.buffer_size, self.shuffle_buffer = buffer_size, shuffle_buffer
        self.crop_size, self.max_images_per_pack, self.pad_token_id = crop_size, max_images_per_pack, pad_token_id
        self.overlong, self.pad_images_to, self.pad_image_tokens = overlong, pad_images_to, pad_image_tokens
        self.pack, self.strategy = pack, strategy
        self.padding, self.pad_to_multiple_of = padding, pad_to_multiple_of
        self.stats = StreamStats()
        self._errors_in_row = 0

    # -- planning: json only ---------------------------------------------------------------

    def _shards(self, stream: int) -> Iterator[dict]:
        if self.train:  # resampled, infinite
            rng = _stream_seed(self.seed, self.rank, stream, self.num_streams, "shards")
            return (dict(url=rng.choice(self.urls)) for _ in itertools.count())
        reader, num_readers = self.rank * self.num_streams + stream, self.world_size * self.num_streams
        return (dict(url=u) for u in self.urls[reader::num_readers])

    def _error(self, counter: str, what: str, exn: Exception) -> None:
        self.stats.add(counter)
        self._errors_in_row += 1
        log.warning("skipping %s: %s: %s", what, type(exn).__name__, exn)
        if self._errors_in_row >= MAX_CONSECUTIVE_ERRORS:
            raise RuntimeError(f"{self._errors_in_row} data errors in a row, last: {what}: "
                               f"{exn!r}; check the shards and process_fn (warnings above)"
                               ) from exn

    def _on_shard_error(self, exn: Exception) -> bool:
        self._error("num_bad_shards", "shard", exn)
        return True  # continue with the next shard

    def _measure(self, raw: dict) -> _Item | None:
        key = raw.get("__key__")
        self.stats.add("num_read")
        try:
            record = json.loads(raw["json"])
            size = raw_image_size(raw, record)
            num_tokens = int(self.length_fn(record, size))
        except Exception as exn:  # noqa: BLE001 - any corrupt json / image header
            self._error("num_bad_decode", f"sample {key!r} in {raw.get('__url__')} (json/length)", exn)
            return None
        overlong = num_tokens > self.max_seq_len
        if overlong and self.overlong == "drop":
            self.stats.add("num_overlong")
            log.warning("dropping sample %r: %d tokens > max_seq_len %d", key, num_tokens, self.max_seq_len)
            return None
        return _Item(key, raw, record, size, min(num_tokens, self.max_seq_len), int(size is not None), overlong)

    def _on_drop(self, item: _Item) -> None:
        self.stats.add("num_dropped")
        log.warning("dropping sample %r: %d tokens, %d images do not fit a pack", item.key,
                    item.num_tokens, item.num_images)

    def _planned_batches(self, stream: int) -> Iterator[list[list[_Item]]]:
        raw = wds.tarfile_to_samples(handler=self._on_shard_error)(self._shards(stream))
        if self.train and self.shuffle_buffer > 1:
            rng = _stream_seed(self.seed, self.rank, stream, self.num_streams, "samples")
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(raw)
        items = (item for item in map(self._measure, raw) if item is not None)
        packer = Packer(items, self.max_seq_len, self.buffer_size if self.pack else 1, self.max_images_per_pack,
                        on_drop=self._on_drop, size=lambda it: (it.num_tokens, it.num_images),
                        pad_images_to=self.pad_images_to, pad_image_tokens=self.pad_image_tokens,
                        strategy=self.strategy)
        packs = iter(packer) if self.pack else packer.singletons()
        batch: list[list[_Item]] = []
        for pack in packs:
            batch.append(pack)
            if len(batch) == self.micro_batch_size:
                yield batch
                batch = []
        if batch:  # eval only: the train stream never ends
            yield batch

    # -- materialising: decode, process, collate -------------------------------------------

    def _pixel_buffers(self, planned: list[list[_Item]]) -> dict[int, Any]:
        """One float32 buffer for all crops of the batch (shared memory in a worker), sliced per
        item in collate order: the processor writes the crops in place, collate takes a view,
        the DataLoader sends it without a copy. Needs ``process_fn.num_pixel_crops``."""
        count = getattr(self.process_fn, "num_pixel_crops", None)
        if count is None:
            return {}
        try:
            rows = [(id(it), count(it.record, it.image_size)) for items in planned for it in items]
        except Exception:  # noqa: BLE001 - an odd size: process_fn then allocates (and reports) itself
            return {}
        total = sum(n for _, n in rows)
        if total == 0:
            return {}
        S, dtype = self.crop_size, getattr(self.process_fn, "pixel_dtype", torch.float32)
        if get_worker_info() is None:
            buffer = torch.empty(total, 3, S, S, dtype=dtype)
        else:
            empty = torch.empty(0, dtype=dtype)
            buffer = empty.new(empty._typed_storage()._new_shared(total * 3 * S * S)).view(total, 3, S, S)
        slices, offset = {}, 0
        for key, n in rows:
            if n:
                slices[key] = buffer[offset:offset + n]
            offset += n
        return slices

    def _process(self, item: _Item, pixel_out=None) -> dict | None:
        try:
            exts = _image_exts(item.raw)
            image = _decode_pil(exts[0], item.raw[exts[0]]) if exts else None
        except Exception as exn:  # noqa: BLE001 - any corrupt bytes
            self._error("num_bad_decode", f"sample {item.key!r} in {item.raw.get('__url__')} (image)", exn)
            return None
        try:
            if pixel_out is not None and image is not None and image.size == tuple(item.image_size):
                sample = self.process_fn(item.record, image, pixel_out=pixel_out)
            else:
                sample = self.process_fn(item.record, image)
            sample.setdefault("key", item.record.get("key", item.key))
            if item.overlong:
                sample = truncate_sample(sample, self.max_seq_len)
                self.stats.add("num_truncated")
            if len(image_token_runs(sample["input_ids"])) != sample_num_images(sample):
                raise ValueError("image-token runs do not match image_sizes (one run per image)")
        except Exception as exn:  # noqa: BLE001 - any record the processor rejects
            self._error("num_bad_process", f"sample {item.key!r} (process_fn)", exn)
            return None
        self._errors_in_row = 0
        return sample

    def _materialize(self, planned: list[list[_Item]]) -> dict:
        L, K, p = self.max_seq_len, self.pad_images_to, self.pad_image_tokens
        cap = self.max_images_per_pack if K is None else min(K, self.max_images_per_pack or K)
        buffers = self._pixel_buffers(planned)
        packs = []
        for items in planned:
            pack, used, images = [], 0, 0
            for item in items:
                sample = self._process(item, buffers.get(id(item)))
                if sample is None:
                    continue
                n, k = sample_num_tokens(sample), sample_num_images(sample)
                if n != item.num_tokens and not item.overlong:
                    self.stats.add("num_length_mismatch")
                    log.warning("sample %r: %d tokens, length_fn predicted %d", item.key, n, item.num_tokens)
                reserve = 0 if K is None else max(0, K - images - k) * p
                if n == 0 or used + n + reserve > L or (cap is not None and images + k > cap):
                    self._on_drop(item)
                    continue
                pack.append(sample)
                used, images = used + n, images + k
            packs.append(pack)
        return collate_packs(packs, L, self.pad_token_id, self.crop_size, pad_images_to=K,
                             pad_image_tokens=p, image_token_id=IMAGE_TOKEN_ID, padding=self.padding,
                             pad_to_multiple_of=self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.train:
            if num_workers != self.num_streams:
                raise RuntimeError(f"eval stream built for {self.num_streams} workers runs in {num_workers}: "
                                   "build it with build_eval_loader(num_workers=...)")
            for planned in self._planned_batches(worker):
                yield self._materialize(planned)
            return
        S = self.num_streams
        if S % num_workers:
            raise RuntimeError(f"{num_workers} DataLoader workers cannot share {S} sub-streams: use a "
                               f"num_workers that divides num_streams={S}")
        streams: dict[int, Iterator[list[list[_Item]]]] = {}
        n = self.start_batch + worker  # global batch n = batch n // S of sub-stream n % S
        while True:
            v, i = n % S, n // S
            if v not in streams:  # first visit: replay the batches before start_batch on lengths only
                streams[v] = self._planned_batches(v)
                for _ in range(i):
                    next(streams[v])
                    self.stats.add("num_skipped_batches")
            yield self._materialize(next(streams[v]))
            n += num_workers


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """glibc only: serve allocations below ``mmap_threshold`` bytes from the heap and keep freed
    memory in the process, so the HD transform's ~20 MB scratch buffers are re-used instead of
    being unmapped and page-faulted in again (measured: ~9k page faults and ~17 ms of kernel time
    per sample at num_crops=16 without it, none with it). The process keeps its peak heap.
    Returns False where ``mallopt`` is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def _worker_init(worker_id: int) -> None:
    retain_freed_memory()  # DataLoader workers only: the trainer process keeps its allocator


def _loader(stream: PackedStream, num_workers: int, pin_memory: bool):
    if num_workers == 0:
        return stream
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=_worker_init)
    loader.stats = stream.stats
    return loader


def _length_fn(process_fn: ProcessFn, length_fn: LengthFn | None) -> LengthFn:
    fn = length_fn or getattr(process_fn, "num_tokens", None)
    if fn is None:
        raise ValueError("the stream packs records by predicted length before decoding: pass "
                         "length_fn=(record, (width, height) | None) -> tokens, or a process_fn with "
                         "a num_tokens method (phi3v_train.data.process.RecordProcessor)")
    return fn


def build_train_loader(
    urls: str | Sequence[str],
    process_fn: ProcessFn,
    *,
    max_seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    buffer_size: int = 64,
    crop_size: int,
    start_batch: int = 0,
    shuffle_buffer: int = 1000,
    max_images_per_pack: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    pin_memory: bool = False,
    overlong: str = "drop",
    pad_images_to: int | None = None,
    pad_image_tokens: int = 0,
    length_fn: LengthFn | None = None,
    pack: bool = True,
    packing_strategy: str = "best_fill",
    padding: str = "max_length",
    pad_to_multiple_of: int = 1,
    num_streams: int = 8,
) -> Iterable[dict]:
    """An endless, deterministic, resumable stream of packed micro-batches for one rank.

    Each (rank, sub-stream) resamples shards with replacement from all ``urls`` with an RNG seeded
    by (seed, rank, sub-stream, num sub-streams), shuffles tar samples in a ``shuffle_buffer``,
    packs them on their predicted lengths (``length_fn``) with :class:`Packer`, then decodes and
    processes only what goes into the packs and collates ``micro_batch_size`` packs per batch.
    Every rank can draw any shard, so the step count, not the data, decides when training ends:
    run a fixed number of steps (every rank then runs the same number, none hangs).

    Resume: ``start_batch=k`` yields exactly the batches the uninterrupted run (same arguments,
    any ``num_workers`` that divides ``num_streams``) yielded from its k-th on; the skipped ones
    are replayed on lengths only (see the module docstring for the cost).

    Args:
        urls: shards: a list of paths, a glob, a brace pattern or ``pipe:`` commands (see
            :func:`expand_urls`).
        process_fn: ``(record: dict, image: PIL.Image | None) -> sample`` (docs/architecture.md);
            e.g. :class:`phi3v_train.data.process.RecordProcessor`. It must be picklable when
            ``num_workers > 0`` with a spawn start method.
        max_seq_len: L, tokens per pack/row.
        micro_batch_size: B, packs per batch.
        rank, world_size: this process's global rank and the number of ranks.
        num_workers: DataLoader worker processes (0: iterate in this process); must divide
            ``num_streams``; not part of the data order.
        seed: base seed, shared by all ranks.
        buffer_size: Packer buffer, in samples (undecoded).
        crop_size: S, pixels; shape of the empty ``pixel_values`` [0, 3, S, S].
        start_batch: micro-batches this rank already consumed (``step * grad_accum`` on resume).
        shuffle_buffer: tar samples (undecoded bytes) held for shuffling per worker.
        max_images_per_pack: optional cap on images per pack.
        pad_token_id: padding id.
        pin_memory: pin batch tensors (DataLoader workers only).
        overlong: ``"drop"`` (and count) or ``"truncate"`` samples longer than ``max_seq_len``.
        pad_images_to: pad every pack to this many images (equal vision work per micro-batch;
            see :func:`collate_packs`), None: off.
        pad_image_tokens: tokens of one padding image, ``num_image_tokens(S, S)`` (313 at 336 px).
        length_fn: ``(record, (width, height) | None) -> tokens``; default
            ``process_fn.num_tokens``.
        pack: False = one sample per row, padded to ``max_seq_len`` (the unpacked baseline).
        packing_strategy: ``"best_fill"`` or ``"bfd"`` (see :mod:`phi3v_train.data.pack`).
        padding: row length, ``"max_length"`` (every row ``max_seq_len``) or ``"longest"``
            (the batch's longest pack rounded up to ``pad_to_multiple_of``), see
            :func:`collate_packs`.
        pad_to_multiple_of: ``"longest"`` only: row-length granularity in tokens.
        num_streams: S, independent sub-streams per rank (part of the data order; each holds its
            own shuffle and packing buffers).

    Returns:
        An iterable of batch dicts (docs/architecture.md) that never ends: the ``PackedStream``
        itself when ``num_workers == 0``, else a ``DataLoader(batch_size=None)`` over it. Both
        have ``.stats`` (:class:`StreamStats`) with the skip/drop counters.

    Raises:
        ValueError: no shards match, a local shard is missing, ``rank`` outside
            ``[0, world_size)``, ``micro_batch_size < 1``, a bad ``overlong``, no length_fn, or
            ``num_workers`` that does not divide ``num_streams``.
    """
    if num_streams < 1 or num_streams % max(1, num_workers):
        raise ValueError(f"num_workers={num_workers} must divide num_streams={num_streams} (>= 1): the "
                         "workers share the sub-streams evenly")
    stream = PackedStream(
        expand_urls(urls), process_fn, length_fn=_length_fn(process_fn, length_fn), train=True,
        max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
        seed=seed, num_streams=num_streams, start_batch=start_batch, buffer_size=buffer_size,
        shuffle_buffer=shuffle_buffer, crop_size=crop_size, max_images_per_pack=max_images_per_pack,
        pad_token_id=pad_token_id, overlong=overlong, pad_images_to=pad_images_to,
        pad_image_tokens=pad_image_tokens, pack=pack, strategy=packing_strategy, padding=padding,
        pad_to_multiple_of=pad_to_multiple_of)
    return _loader(stream, num_workers, pin_memory)


def build_eval_loader(
    urls: str | Sequence[str],
    process_fn: ProcessFn,
    *,
    max_seq_len: int,
    rank: int,
    world_size: int,
    num_workers: int,
    micro_batch_size: int = 1,
    buffer_size: int = 64,
    crop_size: int = 336,
    max_images_per_pack: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    pin_memory: bool = False,
    overlong: str = "drop",
    length_fn: LengthFn | None = None,
    pack: bool = True,
    padding: str = "max_length",
    pad_to_multiple_of: int = 1,
) -> Iterable[dict]:
    """One pass over this rank's share of the eval shards, packed and collated, in file order.

    Shard ``i`` goes to reader ``i % (world_size * W)`` where reader ``rank * W + worker``
    and ``W = max(1, num_workers)``. No resampling, no shuffling; the last batch may hold fewer
    than ``micro_batch_size`` packs. Ranks may get different numbers of batches: under ZeRO-3
    the caller must keep ranks in step (e.g. all-reduce a "done" flag, run dummy batches).

    Args: as :func:`build_train_loader` (``micro_batch_size`` defaults to 1).

    Returns:
        A finite iterable of batch dicts with ``.stats`` (:class:`StreamStats`).

    Raises:
        ValueError: fewer shards than ``world_size * max(1, num_workers)`` readers (some
            would get nothing), no shards match, a local shard is missing, or a bad rank.
    """
    shards = expand_urls(urls)
    num_readers = world_size * max(1, num_workers)
    if len(shards) < num_readers:
        raise ValueError(
            f"eval has {len(shards)} shard(s) but world_size {world_size} x max(1, num_workers "
            f"{num_workers}) = {num_readers} readers; write at least {num_readers} eval shards "
            "(phi3v-train shards --samples-per-shard smaller) or lower num_workers")
    stream = PackedStream(
        shards, process_fn, length_fn=_length_fn(process_fn, length_fn), train=False,
        max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
        seed=0, num_streams=max(1, num_workers), start_batch=0, buffer_size=buffer_size,
        shuffle_buffer=0, crop_size=crop_size, max_images_per_pack=max_images_per_pack,
        pad_token_id=pad_token_id, overlong=overlong, pad_images_to=None, pad_image_tokens=0, pack=pack,
        padding=padding, pad_to_multiple_of=pad_to_multiple_of)
    return _loader(stream, num_workers, pin_memory)
