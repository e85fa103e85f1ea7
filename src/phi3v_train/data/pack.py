"""Sequence packing: group variable-length samples into packs of at most ``max_seq_len`` tokens.

Offline part: :func:`best_fit_decreasing` and :func:`best_fill` pack a list of lengths (optionally
with a second cap on images per pack). Online part: :class:`Packer` packs a stream through a
bounded buffer; :func:`simulate_packing` runs it on lengths alone.

Two streaming strategies, both deterministic:

- ``"best_fill"`` (default): whenever the buffer holds >= ``buffer_size`` items and two packs'
  worth of tokens, emit the one subset of the buffer that fills a pack best (exact subset sum,
  a bitset dynamic programme; ties go to older items); an item that has waited ``wait_factor``
  x the buffer length in arrivals is forced into the next pack, so no length starves.
- ``"bfd"``: each round packs the whole buffer best-fit-decreasing, emits every pack but the
  least full and keeps that one's items (the TRL / axolotl family).

Phi-3-V samples are large next to a pack (one image is 313..2509 tokens at num_crops 1..16), where
greedy BFD leaves a gap in every pack that exact filling closes. Measured steady-state slot use
(``simulate_packing``, buffer_size=64, 4000 lengths; 4K / 8K / 16K / 32K / 128K):

- uniform 300..3000 tokens: bfd 97.5 / 99.1 / 99.6 / 99.8 / 99.9%;
  best_fill 98.4 / 100.0 / 100.0 / 100.0 / 100.0%.
- product photos of mixed aspect ratios at num_crops=16 (1658..2563 tokens): bfd 74.4 / 91.2 /
  96.3 / 97.7 / 99.4%; best_fill 74.7 / 93.8 / 99.99 / 100.0 / 100.0%.
- the bundled Luma shards at num_crops=16 (every photo 413x512 or 512x512: 2509 image tokens,
  2546..2563 tokens per sample): both 62.4 / 93.5 / 93.5 / 93.5 / 99.4%, which is the bound for
  whole samples (at most floor(L / 2546) samples per pack: 1 at 4K, 3 at 8K, 6 at 16K, 12 at
  32K, 51 at 128K); no packer can do better without splitting samples. What that room costs is
  decided at collate time: with ``packing.padding=longest`` (the default) a micro batch's rows are
  only as long as its longest pack (rounded up to 64 tokens), so the slots computed are 99.6%
  real tokens at 8K..128K (``phi3v-train bench data``); ``max_length`` rows compute the empty room.

Cost: best_fill spends 15..120 us per sample in Python (a DP over the buffer per pack), bfd
~5 us; both are noise next to decoding and the HD transform (~25 ms per sample). The buffer holds
undecoded records in the stream (data/stream.py packs on predicted lengths), so its host memory
is raw bytes, not crops. A sample waits on average about one buffer's worth of arrivals.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# A processor output: input_ids [T], labels [T], pixel_values [C,3,S,S], image_sizes [I,2], key.
Sample = dict
STRATEGIES = ("best_fill", "bfd")


def best_fit_decreasing(
    lengths: Sequence[int],
    max_len: int,
    max_images_per_pack: int | None = None,
    images: Sequence[int] | None = None,
) -> list[list[int]]:
    """Pack items into bins of capacity ``max_len`` tokens by best-fit-decreasing.

    Items are placed longest first (ties: lower index first) into the open pack with the least
    room left that still fits them, else into a new pack. Deterministic for a given input.

    Args:
        lengths: tokens per item.
        max_len: token capacity of a pack.
        max_images_per_pack: optional second cap, images per pack (needs ``images``).
        images: images per item, same length as ``lengths``.

    Returns:
        Indices into ``lengths`` per pack; every index appears exactly once, indices within a
        pack are ascending (arrival order), packs are in the order they were opened.

    Raises:
        ValueError: an item is longer than ``max_len`` or has more images than the cap, or
            ``images`` is missing / has the wrong length while a cap is set.
    """
    if max_images_per_pack is not None and (images is None or len(images) != len(lengths)):
        raise ValueError("max_images_per_pack needs images= with one count per length")
    img = list(images) if images is not None else [0] * len(lengths)
    img_cap = max_images_per_pack if max_images_per_pack is not None else float("inf")
    for i, (n, k) in enumerate(zip(lengths, img)):
        if n > max_len or k > img_cap:
            raise ValueError(f"item {i} ({n} tokens, {k} images) exceeds a pack "
                             f"({max_len} tokens, {max_images_per_pack} images); drop it first")

    packs: list[list[int]] = []
    room: list[int] = []  # tokens left per pack
    img_room: list[float] = []  # images left per pack
    by_room: list[tuple[int, int]] = []  # (tokens left, pack) sorted: best fit = first that fits
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        best = -1
        for pos in range(bisect.bisect_left(by_room, (lengths[i], -1)), len(by_room)):
            if img_room[by_room[pos][1]] >= img[i]:  # least room left that fits, ties: oldest pack
                best = by_room.pop(pos)[1]
                break
        if best < 0:
            packs.append([])
            room.append(max_len)
            img_room.append(img_cap)
            best = len(packs) - 1
        packs[best].append(i)
        room[best] -= lengths[i]
        img_room[best] -= img[i]
        bisect.insort(by_room, (room[best], best))
    return [sorted(p) for p in packs]


MAX_DP_BYTES = 256 << 20  # best_fill's table (items x images x tokens bits) above this: BFD round


def best_fill(
    lengths: Sequence[int],
    max_len: int,
    max_images_per_pack: int | None = None,
    images: Sequence[int] | None = None,
    forced: int | None = None,
) -> list[int] | None:
    """The subset of items that fills one pack best: most tokens <= ``max_len`` (exact subset sum).

    A bitset dynamic programme over prefix sums (Python ints as bitsets: one shift-or per item
    and image count). Among equally full subsets it takes the one that uses the oldest (lowest
    index) items. With an image cap it tracks images too (one bitset per image count).

    Args:
        lengths: tokens per item (>= 0; each <= ``max_len``).
        max_len: token capacity.
        max_images_per_pack: optional image cap (needs ``images``).
        images: images per item.
        forced: an index that must be in the subset (it must fit alone).

    Returns:
        Ascending indices of the subset, or None when the table would exceed ``MAX_DP_BYTES``
        (the caller falls back to :func:`best_fit_decreasing`).
    """
    n = len(lengths)
    img = list(images) if images is not None else [0] * n
    cap_tokens, cap_images = max_len, max_images_per_pack
    others = [i for i in range(n) if i != forced]
    if forced is not None:
        cap_tokens -= lengths[forced]
        cap_images = None if cap_images is None else cap_images - img[forced]
    if cap_images is not None and sum(img[i] for i in others) <= cap_images:
        cap_images = None  # the image cap cannot bind: a 1-D programme
    num_c = 1 if cap_images is None else cap_images + 1
    if len(others) * num_c * (cap_tokens + 1) // 8 > MAX_DP_BYTES:
        return None
    mask = (1 << (cap_tokens + 1)) - 1
    reach = [[1] + [0] * (num_c - 1)]  # reach[j][c]: bit t set <=> t tokens, c images reachable with others[:j]
    for i in others:
        prev, k = reach[-1], (img[i] if cap_images is not None else 0)
        row = list(prev)
        for c in range(k, num_c):
            if prev[c - k]:
                row[c] |= (prev[c - k] << lengths[i]) & mask
        reach.append(row)
    best_t, best_c = -1, 0
    for c in range(num_c):
        t = reach[-1][c].bit_length() - 1
        if t > best_t:
            best_t, best_c = t, c
    chosen = [] if forced is None else [forced]
    t, c = best_t, best_c
    for j in range(len(others) - 1, -1, -1):  # skip an item whenever the older ones reach (t, c)
        if (reach[j][c] >> t) & 1:
            continue
        i = others[j]
        chosen.append(i)
        t -= lengths[i]
        c -= img[i] if cap_images is not None else 0
    return sorted(chosen)


def packing_efficiency(pack_num_tokens: Sequence[int], max_len: int) -> float:
    """Fraction of token slots holding real tokens: ``sum(pack_num_tokens) / (len * max_len)``.

    Args:
        pack_num_tokens: real (non-padding) tokens per pack.
        max_len: slots per pack (``max_seq_len``).

    Returns:
        A float in [0, 1]; 0.0 for no packs.
    """
    if not pack_num_tokens:
        return 0.0
    return sum(pack_num_tokens) / (len(pack_num_tokens) * max_len)


def sample_num_tokens(sample: Sample) -> int:
    """Tokens in a sample: ``len(sample["input_ids"])``."""
    return int(sample["input_ids"].shape[0])


def sample_num_images(sample: Sample) -> int:
    """Images in a sample: rows of ``sample["image_sizes"]`` (0 when absent)."""
    sizes = sample.get("image_sizes")
    return 0 if sizes is None else int(sizes.shape[0])


class Packer:
    """Streaming packer: iterate it to get packs (lists of items) of <= ``max_seq_len`` tokens.

    Buffering (see the module docstring for the efficiency/latency numbers): whenever the buffer
    holds ``buffer_size`` items it is packed with :func:`best_fit_decreasing`, every pack but
    the least full one is emitted, and the least full pack's items stay in the buffer. When the
    input ends, the rest is packed and emitted (flush). Items with 0 tokens, more than
    ``max_seq_len`` tokens or more than ``max_images_per_pack`` images are dropped and counted
    in ``num_dropped``.

    Items are samples (``input_ids`` [T], optional ``image_sizes`` [I, 2]) by default, or
    anything with a ``size`` function: the stream packs undecoded records by their predicted
    length, so only what goes into an emitted pack is ever decoded.

    Deterministic for a given input order. Items in a pack keep their arrival order.

    Attributes:
        num_dropped: items dropped as too long / empty / too many images.
        num_samples: items emitted in packs.
        num_packs: packs emitted (``num_flushed`` of them by the final flush).
        num_tokens: real tokens emitted.
    """

    def __init__(
        self,
        samples: Iterable[Any],
        max_seq_len: int,
        buffer_size: int = 64,
        max_images_per_pack: int | None = None,
        on_drop: Callable[[Any], None] | None = None,
        size: Callable[[Any], tuple[int, int]] | None = None,
        pad_images_to: int | None = None,
        pad_image_tokens: int = 0,
        strategy: str = "best_fill",
        wait_factor: int = 4,
    ):
        """Args:
            samples: items to pack (processor outputs unless ``size`` is given).
            max_seq_len: token capacity of a pack.
            buffer_size: items to gather before packing a round (at least 1).
            max_images_per_pack: optional cap on images per pack (None: no cap).
            on_drop: called with every dropped item (e.g. to log its key).
            size: item -> (tokens, images); default ``sample_num_tokens``/``sample_num_images``.
            pad_images_to: collate will pad every pack to exactly this many images (equal
                vision work per micro-batch, see :func:`collate_packs`): packs hold at most this
                many images and keep room for the padding images' tokens.
            pad_image_tokens: tokens of one padding image (``num_image_tokens(S, S)``).
            strategy: ``"best_fill"`` (default: one exact-subset-sum pack per round) or
                ``"bfd"`` (best-fit-decreasing rounds); see the module docstring.
            wait_factor: best_fill only: an item that has waited ``wait_factor`` x the buffer's
                length in arrivals goes into the next pack (bounds the wait of awkward lengths).

        Raises:
            ValueError: ``max_seq_len`` or ``buffer_size`` below 1, or padding images that
                alone do not fit a pack.
        """
        if max_seq_len < 1 or buffer_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and buffer_size ({buffer_size}) "
                             "must be >= 1")
        if strategy not in STRATEGIES or wait_factor < 1:
            raise ValueError(f"strategy={strategy!r} (use one of {STRATEGIES}), wait_factor={wait_factor} (>= 1)")
        if pad_images_to is not None:
            if pad_images_to < 1 or pad_images_to * pad_image_tokens >= max_seq_len:
                raise ValueError(f"pad_images_to={pad_images_to} padding images of {pad_image_tokens} "
                                 f"tokens must leave room in a pack of {max_seq_len}")
            cap = pad_images_to if max_images_per_pack is None else min(max_images_per_pack, pad_images_to)
            max_images_per_pack = cap
        self.samples = samples
        self.max_seq_len = max_seq_len
        self.buffer_size = buffer_size
        self.max_images_per_pack = max_images_per_pack
        self.on_drop = on_drop
        self.size = size or (lambda s: (sample_num_tokens(s), sample_num_images(s)))
        self.pad_images_to = pad_images_to
        self.pad_image_tokens = pad_image_tokens if pad_images_to is not None else 0
        self.strategy, self.wait_factor = strategy, wait_factor
        self.num_dropped = 0
        self.num_samples = 0
        self.num_packs = 0
        self.num_flushed = 0
        self.num_tokens = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots over the packs emitted so far."""
        return self.num_tokens / (self.num_packs * self.max_seq_len) if self.num_packs else 0.0

    def _fits(self, num_tokens: int, num_images: int) -> bool:
        cap = self.max_images_per_pack
        if not (0 < num_tokens <= self.max_seq_len and (cap is None or num_images <= cap)):
            return False
        if self.pad_images_to is None:
            return True
        return num_tokens + (self.pad_images_to - num_images) * self.pad_image_tokens <= self.max_seq_len

    def _packing_space(self, lengths: list[int], images: list[int]) -> tuple[list[int], int]:
        """Lengths and capacity with the padding images' room folded in:
        pack tokens + (K - images) * p <= L  <=>  sum(tokens - images * p) <= L - K * p."""
        if self.pad_images_to is None:
            return lengths, self.max_seq_len
        p = self.pad_image_tokens
        return ([max(0, n - k * p) for n, k in zip(lengths, images)],
                self.max_seq_len - self.pad_images_to * p)

    def _pack(self, lengths: list[int], images: list[int]) -> list[list[int]]:
        sizes, cap = self._packing_space(lengths, images)
        return best_fit_decreasing(sizes, cap, self.max_images_per_pack, images)

    def _fill(self, lengths: list[int], images: list[int], forced: int | None) -> list[int]:
        """One best-filled pack from the buffer (``forced`` in it); a BFD pack if too large."""
        sizes, cap = self._packing_space(lengths, images)
        idx = best_fill(sizes, cap, self.max_images_per_pack, images, forced)
        if idx is None:  # table too large: the BFD pack that holds the oldest item
            idx = next(p for p in self._pack(lengths, images) if 0 in p)
        if not idx:  # only zero-size items (padding-image space): take the oldest
            idx = best_fill(sizes, cap, self.max_images_per_pack, images, 0) or [0]
        return idx

    def _emit(self, pack: list[Any], lengths: list[int]) -> list[Any]:
        self.num_packs += 1
        self.num_samples += len(pack)
        self.num_tokens += sum(lengths)
        return pack

    def __iter__(self) -> Iterator[list[Any]]:
        if self.strategy == "bfd":
            yield from self._iter_bfd()
            return
        buf: list[Any] = []
        lengths: list[int] = []
        images: list[int] = []
        arrival: list[int] = []
        buffered_tokens = 0
        for t, sample in enumerate(self.samples):
            if (size := self._admit(sample)) is None:
                continue
            n, k = size
            buf.append(sample)
            lengths.append(n)
            images.append(k)
            arrival.append(t)
            buffered_tokens += n
            # a round needs buffer_size items and two packs' worth of tokens to choose from
            while len(buf) >= self.buffer_size and buffered_tokens >= 2 * self.max_seq_len:
                forced = 0 if t - arrival[0] >= self.wait_factor * len(buf) else None
                idx = self._fill(lengths, images, forced)
                yield self._emit([buf[i] for i in idx], [lengths[i] for i in idx])
                buffered_tokens -= sum(lengths[i] for i in idx)
                keep = sorted(set(range(len(buf))) - set(idx))
                buf, lengths = [buf[i] for i in keep], [lengths[i] for i in keep]
                images, arrival = [images[i] for i in keep], [arrival[i] for i in keep]
        while buf:  # flush: best fills until empty
            idx = self._fill(lengths, images, None)
            self.num_flushed += 1
            yield self._emit([buf[i] for i in idx], [lengths[i] for i in idx])
            keep = sorted(set(range(len(buf))) - set(idx))
            buf, lengths, images = [buf[i] for i in keep], [lengths[i] for i in keep], [images[i] for i in keep]

    def _admit(self, sample: Any) -> tuple[int, int] | None:
        """(tokens, images) of a sample that fits a pack; None for one that cannot (dropped and counted)."""
        n, k = self.size(sample)
        if self._fits(n, k):
            return n, k
        self.num_dropped += 1
        if self.on_drop is not None:
            self.on_drop(sample)
        return None

    def _iter_bfd(self) -> Iterator[list[Any]]:
        buf: list[Any] = []
        lengths: list[int] = []
        images: list[int] = []
        for sample in self.samples:
            if (size := self._admit(sample)) is None:
                continue
            n, k = size
            buf.append(sample)
            lengths.append(n)
            images.append(k)
            if len(buf) < self.buffer_size:
                continue
            packs = self._pack(lengths, images)
            fill = [sum(lengths[i] for i in p) for p in packs]
            keep = min(range(len(packs)), key=lambda p: (fill[p], -p))  # least full; ties: newest
            for p, idx in enumerate(packs):
                if p != keep:
                    yield self._emit([buf[i] for i in idx], [lengths[i] for i in idx])
            idx = packs[keep]
            buf, lengths = [buf[i] for i in idx], [lengths[i] for i in idx]
            images = [images[i] for i in idx]
        if buf:  # flush
            for idx in self._pack(lengths, images):
                self.num_flushed += 1
                yield self._emit([buf[i] for i in idx], [lengths[i] for i in idx])

    def singletons(self) -> Iterator[list[Any]]:
        """One item per pack, in arrival order (no packing: the unpacked baseline); items that do
        not fit a pack alone are dropped as in ``__iter__``."""
        for item in self.samples:
            n, k = self.size(item)
            if not self._fits(n, k):
                self.num_dropped += 1
                if self.on_drop is not None:
                    self.on_drop(item)
                continue
            yield self._emit([item], [n])


def simulate_packing(
    lengths: Sequence[int],
    max_seq_len: int,
    buffer_size: int = 64,
    images: Sequence[int] | None = None,
    max_images_per_pack: int | None = None,
    strategy: str = "best_fill",
) -> tuple[list[int], int]:
    """Run :class:`Packer` over a stream of lengths only (no tensors).

    Returns:
        (real tokens per pack in emission order, number of packs from the final flush). The
        steady-state efficiency of a long stream is ``packing_efficiency(fills[:-num_flushed])``.
    """
    imgs = images if images is not None else [0] * len(lengths)
    packer = Packer(range(len(lengths)), max_seq_len, buffer_size, max_images_per_pack,
                    size=lambda i: (lengths[i], imgs[i]), strategy=strategy)
    fills = [sum(lengths[i] for i in pack) for pack in packer]
    return fills, packer.num_flushed
