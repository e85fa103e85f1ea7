"""Phi-3-Vision processor: HD transform, image-token count, chat template, tokens and labels.

A native re-implementation of the behaviour of the reference `processing_phi3_v.py` /
`image_processing_phi3_v.py` (microsoft/Phi-3-vision-128k-instruct); every fact it must match
is listed in `shared/docs/PHI3V_SPEC.md` ("Image processing", "Image tokens", "Prompt, tokens
and the chat template"). Differences from the reference, all by design:

- image positions hold `<|image|>` (32044) instead of negative ids; the sequence is otherwise
  token for token the reference's;
- `pixel_values` holds only the real crops ([C, 3, S, S], no zero padding to num_crops + 1);
- the answer and its `<|end|>` are appended here and labelled; everything else is -100.

Output of `Phi3VProcessor.encode` (the sample contract of docs/architecture.md):
`input_ids` [T], `labels` [T], `pixel_values` [C, 3, S, S] float32, `image_sizes` [I, 2] (H, W).
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Token ids of the Phi-3-V tokenizer (spec: "Prompt, tokens and the chat template").
BOS_TOKEN_ID = 1  # <s>
PAD_TOKEN_ID = 32000  # <|endoftext|>
ASSISTANT_TOKEN_ID = 32001  # <|assistant|>
SYSTEM_TOKEN_ID = 32006  # <|system|>
END_TOKEN_ID = 32007  # <|end|>: ends every turn (config.json's eos 2 is not used)
USER_TOKEN_ID = 32010  # <|user|>
IMAGE_TOKEN_ID = 32044  # <|image|>: one per image token
IGNORE_INDEX = -100

# CLIP ViT-L/14-336 normalisation (spec: "Image processing", step 4).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference training task (spec: "the seed's training target").
REFERENCE_PROMPT = "<|image_1|>What is shown in this image?"
REFERENCE_ANSWER = "Product: {title}, Category: {category}, Full Price: {price}"

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "phi3v"
_IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def hd_size(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """HD size (H, W) in pixels that `hd_transform` gives an image of `width` x `height`.

    Computed from the size alone (spec "Image processing", steps 1-3): portrait images are
    transposed; `scale` is the largest integer with `scale * ceil(scale / ratio) <= num_crops`
    (ratio = long / short side); the long side becomes `crop_size * scale`, the short side
    `int(long / ratio)`, padded up to a multiple of `crop_size`. Both results are multiples
    of `crop_size`. One deviation: a short side that would round to 0 px (aspect ratios beyond
    ~crop_size * scale : 1, where the reference crashes) is kept at 1 px.

    Raises:
        ValueError: a non-positive size or num_crops.
    """
    if width < 1 or height < 1 or num_crops < 1:
        raise ValueError(f"need width, height, num_crops >= 1, got {width}, {height}, {num_crops}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_w = crop_size * scale
    new_h = max(1, int(new_w / ratio))
    padded_h = math.ceil(new_h / crop_size) * crop_size
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def num_image_tokens(hd_height: int, hd_width: int, crop_size: int = 336, patch_size: int = 14) -> int:
    """Number of `<|image|>` tokens for an image of HD size `hd_height` x `hd_width`.

    `(hc*wc + 1)*t + 1 + (hc + 1)*r` with hc, wc = crops per column/row, r = crop_size/patch_size/2
    (token rows per crop after the 2x2 merge), t = r*r (tokens per crop): the hc*wc sub-crops
    plus the global view, one `sub_GN` "newline" per token row of the sub-crop grid and of the
    global view, and one `glb_GN` (spec "Image tokens"). At 336/14: r=12, t=144; e.g. 2509 for a
    square image at num_crops=16, 313 for any image at num_crops=1.

    Raises:
        ValueError: sizes not multiples of crop_size, or a patch grid that is not even.
    """
    grid = crop_size // patch_size
    if crop_size % patch_size or grid % 2:
        raise ValueError(f"crop_size/patch_size must be an even integer, got {crop_size}/{patch_size}")
    if hd_height % crop_size or hd_width % crop_size or hd_height < 1 or hd_width < 1:
        raise ValueError(f"HD size {hd_height}x{hd_width} is not a positive multiple of {crop_size}")
    hc, wc = hd_height // crop_size, hd_width // crop_size
    rows = grid // 2
    return (hc * wc + 1) * rows * rows + 1 + (hc + 1) * rows


def hd_transform(image: Image.Image, num_crops: int, crop_size: int = 336, out: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, tuple[int, int]]:
    """HD transform of one image into its global view and sub-crops (spec "Image processing").

    RGB conversion; portrait images transposed; bilinear resize (PIL) to the size of `hd_size`;
    height padded with white, centred (extra row at the bottom); transposed back; scaled to
    [0, 1] and normalised with CLIP mean/std. The global view is the bicubic
    `torch.nn.functional.interpolate` (align_corners=False, no antialias) of the normalised HD
    tensor to `crop_size` x `crop_size`, as in the reference.

    The arithmetic is float32 throughout; `dtype` is only the output's (bfloat16 halves the bytes
    to move; the values are then the float32 ones rounded, exactly what a bf16 model's first
    cast would make of them). `out` ([1 + hc*wc, 3, S, S] of `dtype`) receives the result in place.

    Returns:
        pixel_values: `dtype` [1 + hc*wc, 3, S, S] (S = crop_size): the global view, then the
            sub-crops row-major (top row left to right). Only real crops, no zero padding.
        (H, W): the HD size in pixels, equal to `hd_size(*image.size, num_crops, crop_size)`.
    """
    image = image.convert("RGB")
    out_h, out_w = hd_size(image.width, image.height, num_crops, crop_size)
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        out_h, out_w = out_w, out_h
    ratio = image.width / image.height
    new_h = max(1, int(out_w / ratio))  # same rounding as hd_size
    resized = np.asarray(image.resize((out_w, new_h), Image.Resampling.BILINEAR))  # [new_h, out_w, 3] uint8
    canvas = np.full((out_h, out_w, 3), 255, dtype=np.uint8)  # white padding, image centred
    top = (out_h - new_h) // 2
    canvas[top:top + new_h] = resized
    hwc = canvas.transpose(1, 0, 2) if transposed else canvas  # [H, W, 3]: a view, transposed back
    # Normalise through a 256-entry table per channel: bit-identical to (x / 255 - mean) / std in
    # float32, one gather pass instead of four passes over the HD image (int32 indices, planar).
    height, width = hwc.shape[:2]
    index, hd = _workspace(3 * height * width)
    index = index.view(3, height, width)  # [3, H, W] int32
    index.copy_(torch.from_numpy(hwc).permute(2, 0, 1))  # one strided pass: transpose + widen
    lut = _normalisation_table()  # [3, 256]
    hd = hd.view(3, height, width)  # [3, H, W] float32
    for c in range(3):
        torch.index_select(lut[c], 0, index[c].view(-1), out=hd[c].view(-1))
    hc, wc = height // crop_size, width // crop_size
    if out is None:
        out = torch.empty(1 + hc * wc, 3, crop_size, crop_size, dtype=dtype)  # [C, 3, S, S]
    elif out.shape != (1 + hc * wc, 3, crop_size, crop_size) or out.dtype != dtype:
        raise ValueError(f"out has shape {tuple(out.shape)} {out.dtype}, this image needs "
                         f"({1 + hc * wc}, 3, {crop_size}, {crop_size}) {dtype}")
    out[0] = F.interpolate(hd[None], size=(crop_size, crop_size), mode="bicubic")[0]  # global view
    out[1:].view(hc, wc, 3, crop_size, crop_size).copy_(
        hd.view(3, hc, crop_size, wc, crop_size).permute(1, 3, 0, 2, 4))  # sub-crops, row-major
    return out, (height, width)


_NORM_TABLE: torch.Tensor | None = None
_WORKSPACE = threading.local()


def _workspace(numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int32 and float32 scratch tensors of at least `numel` elements, kept per thread and
    reused: fresh 20 MB buffers per image cost ~10k page faults (kernel time) each."""
    have = getattr(_WORKSPACE, "buffers", None)
    if have is None or have[0].numel() < numel:
        have = (torch.empty(numel, dtype=torch.int32), torch.empty(numel, dtype=torch.float32))
        _WORKSPACE.buffers = have
    return have[0][:numel], have[1][:numel]


def _normalisation_table() -> torch.Tensor:
    """[3, 256] float32: (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c] with the float32 ops of the spec."""
    global _NORM_TABLE
    if _NORM_TABLE is None:
        v = torch.arange(256, dtype=torch.float32).div(255).view(1, 256)
        _NORM_TABLE = v.sub(torch.tensor(CLIP_MEAN).view(3, 1)).div(torch.tensor(CLIP_STD).view(3, 1)).contiguous()
    return _NORM_TABLE


def load_tokenizer(path: str | Path | None = None):
    """Load the Phi-3-V tokenizer from `path` (default: the bundled copy in assets/phi3v).

    Loads `tokenizer.json` verbatim through `PreTrainedTokenizerFast`. Not `LlamaTokenizer`:
    in transformers 5 it rebuilds the pre-tokenizer and drops the "▁" (29871) that the
    original pipeline puts before "\\n" after `<|end|>`/`<|user|>`. Not `AutoTokenizer`: it
    reads the folder's config.json `auto_map` and prompts for trust_remote_code.

    Raises:
        ValueError: the tokenizer's special-token ids differ from the Phi-3-V ids.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path or DEFAULT_TOKENIZER_DIR))
    expected = {"<s>": BOS_TOKEN_ID, "<|endoftext|>": PAD_TOKEN_ID, "<|assistant|>": ASSISTANT_TOKEN_ID,
                "<|end|>": END_TOKEN_ID, "<|user|>": USER_TOKEN_ID, "<|image|>": IMAGE_TOKEN_ID}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected}
    if got != expected:
        raise ValueError(f"not a Phi-3-V tokenizer ({path}): special ids {got}, expected {expected}")
    return tokenizer


class Phi3VProcessor:
    """Turns (prompt, images, answer) into one training sample (docs/architecture.md).

    Args:
        tokenizer: the Phi-3-V tokenizer (see `load_tokenizer`).
        num_crops: HD crop budget per image (16 for Phi-3-V, 4 for Phi-3.5-V).
        crop_size: CLIP input size S in pixels (336; small values for tiny test models).
        patch_size: CLIP patch size in pixels (14).
        pixel_dtype: dtype of `pixel_values` (float32; bfloat16 for a bf16 model halves the host
            memory traffic and the host-to-device copy, with the same values after its cast).
    """

    def __init__(self, tokenizer, num_crops: int = 16, crop_size: int = 336, patch_size: int = 14,
                 pixel_dtype: torch.dtype = torch.float32):
        num_image_tokens(crop_size, crop_size, crop_size, patch_size)  # validates crop/patch
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.tokenizer = tokenizer
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.patch_size = patch_size
        self.pixel_dtype = pixel_dtype

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs: Any) -> Phi3VProcessor:
        """Processor with the tokenizer in `path` (default: bundled); kwargs go to `__init__`."""
        return cls(load_tokenizer(path), **kwargs)

    @staticmethod
    def render_prompt(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Phi-3 chat template: `<|{role}|>\\n{content}<|end|>\\n` per message, then
        `<|assistant|>\\n` if `add_generation_prompt` (and the last turn is not the assistant's).
        No BOS: `encode` adds it to every text chunk."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            text += "<|assistant|>\n"
        return text

    def image_crop_count(self, width: int, height: int) -> int:
        """Crops (`pixel_values` rows) of an image of `width` x `height`: the global view + hc*wc."""
        hd_h, hd_w = hd_size(width, height, self.num_crops, self.crop_size)
        return 1 + (hd_h // self.crop_size) * (hd_w // self.crop_size)

    def image_token_count(self, width: int, height: int) -> int:
        """`<|image|>` tokens for an image of `width` x `height` pixels with this processor's config."""
        hd_h, hd_w = hd_size(width, height, self.num_crops, self.crop_size)
        return num_image_tokens(hd_h, hd_w, self.crop_size, self.patch_size)

    @staticmethod
    def _split_prompt(prompt: str, num_images: int) -> list[str]:
        """Text chunks around the `<|image_N|>` tags (num_images + 1 of them).

        Raises:
            ValueError: tags not exactly `<|image_1|>` .. `<|image_{num_images}|>`, once each, in order.
        """
        chunks = _IMAGE_TAG.split(prompt)
        tags = [int(n) for n in chunks[1::2]]
        if tags != list(range(1, num_images + 1)):
            raise ValueError(
                f"image tags {[f'<|image_{n}|>' for n in tags]} do not match {num_images} image(s): "
                "use <|image_1|> .. <|image_N|>, each once, in order, one per image")
        return chunks[0::2]

    def _token_ids(self, texts: list[str], image_token_counts: list[int],
                   answer: str | None) -> tuple[list[int], int]:
        """(ids, number of labelled tokens at the end); shared by `encode` and `sample_length`."""
        ids: list[int] = []
        for i, text in enumerate(texts):
            ids += self.tokenizer(text).input_ids  # default special tokens: BOS on every chunk
            if i < len(image_token_counts):
                ids += [IMAGE_TOKEN_ID] * image_token_counts[i]
        if answer is None:
            return ids, 0
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids + [END_TOKEN_ID]
        return ids + answer_ids, len(answer_ids)

    def encode(self, prompt: str, images: list[Image.Image], answer: str | None = None,
               pixel_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode a rendered prompt (from `render_prompt`), its images and an optional answer.

        The prompt is split on `<|image_N|>` tags; each text chunk is tokenised on its own with
        BOS (as the reference does, so the chunk after an image starts with BOS too); image `N`
        becomes `num_image_tokens` copies of 32044. The answer is tokenised without special
        tokens and followed by `<|end|>` (32007); only those tokens are labelled.

        Returns:
            input_ids: int64 [T]; labels: int64 [T] (-100 except the answer and its `<|end|>`);
            pixel_values: float32 [C, 3, S, S], C = sum of 1 + hc*wc over images ([0, 3, S, S]
            without images); image_sizes: int64 [I, 2], HD (H, W) per image. With ``pixel_out``
            (float32 [C, 3, S, S], e.g. a slice of a batch buffer) the crops are written there and
            ``pixel_values`` is that tensor: no copy.

        Raises:
            ValueError: image tags not numbered 1..N in order or N != len(images), or a
                ``pixel_out`` of the wrong shape.
        """
        texts = self._split_prompt(prompt, len(images))
        crops, sizes, offset = [], [], 0
        for image in images:
            target = None
            if pixel_out is not None:
                n = self.image_crop_count(image.width, image.height)
                target, offset = pixel_out[offset:offset + n], offset + n
            pixels, size = hd_transform(image, self.num_crops, self.crop_size, out=target, dtype=self.pixel_dtype)
            crops.append(pixels)
            sizes.append(size)
        if pixel_out is not None and offset != pixel_out.shape[0]:
            raise ValueError(f"pixel_out has {pixel_out.shape[0]} crops, the images need {offset}")
        counts = [num_image_tokens(h, w, self.crop_size, self.patch_size) for h, w in sizes]
        ids, num_labels = self._token_ids(texts, counts, answer)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if num_labels:
            labels[-num_labels:] = input_ids[-num_labels:]
        S = self.crop_size
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": (pixel_out if pixel_out is not None else crops[0] if len(crops) == 1
                             else torch.cat(crops) if crops else torch.zeros(0, 3, S, S, dtype=self.pixel_dtype)),
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        }

    def sample_length(self, width: int, height: int, prompt: str, answer: str | None = None) -> int:
        """Tokens `encode(prompt, [image], answer)` gives for one `width` x `height` image, without
        decoding or transforming pixels (text tokens + `num_image_tokens(hd_size(...))`).

        Raises:
            ValueError: the prompt does not hold exactly the tag `<|image_1|>`.
        """
        return self.encoded_length(prompt, [(width, height)], answer)

    def encoded_length(self, prompt: str, image_sizes: list[tuple[int, int]], answer: str | None = None) -> int:
        """Tokens `encode(prompt, images, answer)` gives for images of these (width, height) sizes
        (none for a text-only prompt), without touching pixels: text tokens + image tokens.

        Raises:
            ValueError: the prompt's image tags do not match the number of images.
        """
        texts = self._split_prompt(prompt, len(image_sizes))
        ids, _ = self._token_ids(texts, [self.image_token_count(w, h) for w, h in image_sizes], answer)
        return len(ids)

    @staticmethod
    def reference_messages(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
        """(messages, answer) of the reference task for a shard record (data/shards.py's JSON):
        user content `record["prompt"]` (default `<|image_1|>What is shown in this image?`),
        answer `record["answer"]`, else `Product: {title}, Category: {category}, Full Price: {price}`
        from `title`, `category`, `full_price`."""
        prompt = record.get("prompt") or REFERENCE_PROMPT
        answer = record.get("answer") or REFERENCE_ANSWER.format(
            title=record["title"], category=record["category"], price=record["full_price"])
        return [{"role": "user", "content": prompt}], answer

    def encode_reference_sample(self, record: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        """`encode` of the reference task (see `reference_messages`) plus `key` (record["key"])."""
        messages, answer = self.reference_messages(record)
        sample = self.encode(self.render_prompt(messages, add_generation_prompt=True), [image], answer)
        sample["key"] = str(record.get("key", ""))
        return sample

    def record_length(self, record: dict[str, Any]) -> int:
        """`sample_length` of `encode_reference_sample(record, image)` from the record's
        `image_width`/`image_height`, without decoding the image."""
        messages, answer = self.reference_messages(record)
        prompt = self.render_prompt(messages, add_generation_prompt=True)
        return self.sample_length(int(record["image_width"]), int(record["image_height"]), prompt, answer)
