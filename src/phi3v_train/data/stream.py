"""Stream WebDataset shards into packed, collated micro-batches.

    shards --(resampled | split by rank/worker)--> tar samples --shuffle--> decode (json + PIL)
      --process_fn--> samples --Packer--> packs --collate_packs--> batches

Train: every (rank, worker) draws shards with replacement from the whole list with its own
seeded RNG (WebDataset's ``ResampledShards`` idea), so the stream never ends and no rank runs out:
the trainer runs a fixed number of steps. Eval: shards are split between all ranks x workers and
read once. Rank and world size are passed in; this module never reads the environment.

Bad samples (unreadable json/image, ``process_fn`` errors) and unreadable shards are skipped,
logged with their key and counted in the loader's ``stats`` (:class:`StreamStats`), shared by the
DataLoader's worker processes.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import braceexpand
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from phi3v_train.data.collate import PAD_TOKEN_ID, collate_packs
from phi3v_train.data.pack import Packer, sample_num_tokens

log = logging.getLogger(__name__)

# process_fn(record, image) -> sample: record is the shard's parsed ``{key}.json`` dict, image a
# PIL RGB image (None when the sample has no image file); the sample follows docs/architecture.md.
ProcessFn = Callable[[dict, Any], dict]

IMAGE_EXTENSIONS = frozenset(wds.autodecode.IMAGE_EXTENSIONS)
_decode_pil = wds.imagehandler("pil")  # RGB PIL.Image
MAX_CONSECUTIVE_ERRORS = 1000  # a stream failing this often in a row is broken, not noisy


class StreamStats:
    """Counters shared across DataLoader worker processes (``multiprocessing.Value``).

    Fields: ``num_read`` tar samples read, ``num_bad_decode`` json/image decode failures,
    ``num_bad_process`` ``process_fn`` failures, ``num_dropped`` samples dropped by the packer
    (longer than ``max_seq_len`` or over the image cap), ``num_bad_shards`` unreadable shards.
    """

    FIELDS = ("num_read", "num_bad_decode", "num_bad_process", "num_dropped", "num_bad_shards")

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


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs into a list of shard paths/URLs, in order.

    Args:
        urls: a path, a glob (``/data/train-*.tar``), a brace pattern
            (``/data/train-{000000..000099}.tar``), or a list of any of these.

    Returns:
        The expanded list; globs are sorted, the rest keep their order.

    Raises:
        ValueError: nothing matched, or local paths that do not exist.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(os.fspath(item)):
            out += sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
    if not out:
        raise ValueError(f"no shards match {urls!r}")
    local = [u for u in out if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) not found, e.g. {missing[0]!r} (from {urls!r})")
    return out


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
    exts = sorted(k for k in raw if k.lower() in IMAGE_EXTENSIONS)
    image = _decode_pil(exts[0], raw[exts[0]]) if exts else None
    return record, image


def _stream_seed(*parts: int) -> random.Random:
    """An RNG seeded from ints; string seeding is stable across processes and Python runs."""
    return random.Random("/".join(str(p) for p in parts))


class PackedStream(IterableDataset):
    """Iterable of collated micro-batches (see :func:`build_train_loader`); has ``stats``."""

    def __init__(self, urls: list[str], process_fn: ProcessFn, *, train: bool, max_seq_len: int,
                 micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 buffer_size: int, shuffle_buffer: int, crop_size: int,
                 max_images_per_pack: int | None, pad_token_id: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.urls, self.process_fn, self.train = urls, process_fn, train
        self.max_seq_len, self.micro_batch_size = max_seq_len, micro_batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.buffer_size, self.shuffle_buffer = buffer_size, shuffle_buffer
        self.crop_size = crop_size
        self.max_images_per_pack, self.pad_token_id = max_images_per_pack, pad_token_id
        self.stats = StreamStats()
        self._errors_in_row = 0

    def _shards(self, worker: int, num_workers: int) -> Iterator[dict]:
        if self.train:  # resampled, infinite
            rng = _stream_seed(self.seed, self.epoch, self.rank, worker, 0)
            return (dict(url=rng.choice(self.urls)) for _ in itertools.count())
        reader, num_readers = self.rank * num_workers + worker, self.world_size * num_workers
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

    def _process(self, raw: dict) -> dict | None:
        key = raw.get("__key__")
        self.stats.add("num_read")
        try:
            record, image = decode_raw(raw)
        except Exception as exn:  # noqa: BLE001 - any corrupt bytes
            self._error("num_bad_decode", f"sample {key!r} in {raw.get('__url__')} (decode)", exn)
            return None
        try:
            sample = self.process_fn(record, image)
        except Exception as exn:  # noqa: BLE001 - any record the processor rejects
            self._error("num_bad_process", f"sample {key!r} (process_fn)", exn)
            return None
        self._errors_in_row = 0
        sample.setdefault("key", record.get("key", key))
        return sample

    def _on_drop(self, sample: dict) -> None:
        self.stats.add("num_dropped")
        log.warning("dropping sample %r: %d tokens > max_seq_len %d (or over the image cap)",
                    sample.get("key"), sample_num_tokens(sample), self.max_seq_len)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self._shards(worker, num_workers)
        raw = wds.tarfile_to_samples(handler=self._on_shard_error)(shards)
        if self.train:
            rng = _stream_seed(self.seed, self.epoch, self.rank, worker, 1)
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(raw)
        samples = (s for s in map(self._process, raw) if s is not None)
        packer = Packer(samples, self.max_seq_len, self.buffer_size, self.max_images_per_pack,
                        on_drop=self._on_drop)
        packs: list[list[dict]] = []
        for pack in packer:
            packs.append(pack)
            if len(packs) == self.micro_batch_size:
                yield collate_packs(packs, self.max_seq_len, self.pad_token_id, self.crop_size)
                packs = []
        if packs:  # eval only: the train stream never ends
            yield collate_packs(packs, self.max_seq_len, self.pad_token_id, self.crop_size)


def _loader(stream: PackedStream, num_workers: int, pin_memory: bool):
    if num_workers == 0:
        return stream
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    loader.stats = stream.stats
    return loader


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
    epoch_shuffle: int = 0,
    shuffle_buffer: int = 1000,
    max_images_per_pack: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    pin_memory: bool = False,
) -> Iterable[dict]:
    """An endless, reproducible stream of packed micro-batches for one rank.

    Each (rank, worker) resamples shards with replacement from all ``urls`` with an RNG seeded
    by (seed, epoch_shuffle, rank, worker), shuffles tar samples in a ``shuffle_buffer``,
    decodes json + PIL image, runs ``process_fn``, packs with :class:`Packer` and collates
    ``micro_batch_size`` packs per batch. The same arguments give the same batches; another
    rank (or another ``num_workers``) gives another order. Every rank can draw any shard, so
    the step count, not the data, decides when training ends: run a fixed number of steps.

    Args:
        urls: shards: a list of paths, a glob or a brace pattern (see :func:`expand_urls`).
        process_fn: ``(record: dict, image: PIL.Image | None) -> sample`` (docs/architecture.md);
            it must be picklable when ``num_workers > 0`` with a spawn start method.
        max_seq_len: L, tokens per pack/row.
        micro_batch_size: B, packs per batch.
        rank, world_size: this process's global rank and the number of ranks.
        num_workers: DataLoader worker processes (0: iterate in this process).
        seed: base seed, shared by all ranks.
        buffer_size: Packer buffer, in samples.
        crop_size: S, pixels; shape of the empty ``pixel_values`` [0, 3, S, S].
        epoch_shuffle: an epoch / restart counter mixed into every seed. Pass e.g. the number
            of times the run was resumed so a restart draws a fresh (still reproducible) stream
            instead of replaying the first samples; WebDataset has no exact mid-stream resume.
        shuffle_buffer: tar samples (undecoded bytes) held for shuffling per worker.
        max_images_per_pack: optional cap on images per pack.
        pad_token_id: padding id.
        pin_memory: pin batch tensors (DataLoader workers only).

    Returns:
        An iterable of batch dicts (docs/architecture.md) that never ends: the ``PackedStream``
        itself when ``num_workers == 0``, else a ``DataLoader(batch_size=None)`` over it. Both
        have ``.stats`` (:class:`StreamStats`) with the skip/drop counters.

    Raises:
        ValueError: no shards match, a local shard is missing, ``rank`` outside
            ``[0, world_size)``, or ``micro_batch_size < 1``.
    """
    stream = PackedStream(
        expand_urls(urls), process_fn, train=True, max_seq_len=max_seq_len,
        micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
        epoch=epoch_shuffle, buffer_size=buffer_size, shuffle_buffer=shuffle_buffer,
        crop_size=crop_size, max_images_per_pack=max_images_per_pack, pad_token_id=pad_token_id)
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
            "or lower num_workers")
    stream = PackedStream(
        shards, process_fn, train=False, max_seq_len=max_seq_len,
        micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=0, epoch=0,
        buffer_size=buffer_size, shuffle_buffer=0, crop_size=crop_size,
        max_images_per_pack=max_images_per_pack, pad_token_id=pad_token_id)
    return _loader(stream, num_workers, pin_memory)
