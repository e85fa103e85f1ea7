"""Shard record -> training sample, and its token count without touching pixels.

:class:`RecordProcessor` is the ``process_fn`` the stream calls on every record it packs. Its
``num_tokens(record, image_size)`` predicts ``len(process_fn(record, image)["input_ids"])``
from the record's text and the image's (width, height) alone, so the stream can pack (and, on
resume, replay) records before decoding a single pixel; ``num_pixel_crops`` lets the stream
give it a slice of one batch buffer to write the crops into (no copy on the way to the trainer).
:func:`truncate_sample` cuts an overlong sample's text without cutting inside an image.
"""

from __future__ import annotations

from typing import Any

from phi3v_train.data.collate import IMAGE_TOKEN_ID, image_token_runs
from phi3v_train.model.processor import Phi3VProcessor

IMAGE_TAG = "<|image_1|>"


class RecordProcessor:
    """``process_fn`` for :func:`phi3v_train.data.stream.build_train_loader` (picklable).

    A record is a shard's parsed ``{key}.json`` (data/shards.py): the user message is
    ``record["prompt"]`` with its ``<|image_1|>`` tag, the labelled answer ``record["answer"]``
    (the reference template from title/category/full_price when absent). A record without an
    image file becomes a text-only sample (its tag removed).

    Args:
        processor: the Phi-3-V processor (HD transform, chat template, tokenizer).
    """

    def __init__(self, processor: Phi3VProcessor):
        self.processor = processor

    @property
    def pixel_dtype(self):
        """dtype of the samples' ``pixel_values`` (the processor's)."""
        return self.processor.pixel_dtype

    def _prompt_and_answer(self, record: dict[str, Any], has_image: bool) -> tuple[str, str]:
        messages, answer = self.processor.reference_messages(record)
        if not has_image:
            messages = [dict(messages[0], content=messages[0]["content"].replace(IMAGE_TAG, ""))]
        return self.processor.render_prompt(messages, add_generation_prompt=True), answer

    def __call__(self, record: dict[str, Any], image, pixel_out=None) -> dict[str, Any]:
        """record + PIL image (or None) -> sample (docs/architecture.md) with ``key``; the crops
        go into ``pixel_out`` when given (``num_pixel_crops`` rows, see the stream)."""
        prompt, answer = self._prompt_and_answer(record, image is not None)
        sample = self.processor.encode(prompt, [image] if image is not None else [], answer,
                                       pixel_out=pixel_out if image is not None else None)
        sample["key"] = str(record.get("key", ""))
        return sample

    def num_tokens(self, record: dict[str, Any], image_size: tuple[int, int] | None) -> int:
        """Tokens ``self(record, image)`` gives for an image of ``image_size`` = (width, height)
        (None: no image), without decoding or transforming pixels."""
        prompt, answer = self._prompt_and_answer(record, image_size is not None)
        return self.processor.encoded_length(prompt, [image_size] if image_size is not None else [], answer)


    def num_pixel_crops(self, record: dict[str, Any], image_size: tuple[int, int] | None) -> int:
        """Rows of the sample's ``pixel_values`` for an image of ``image_size`` (0 without)."""
        return 0 if image_size is None else self.processor.image_crop_count(*image_size)


def truncate_sample(sample: dict[str, Any], max_len: int, image_token_id: int = IMAGE_TOKEN_ID) -> dict[str, Any]:
    """Cut a sample to at most ``max_len`` tokens, never inside an image.

    Keeps the first ``max_len`` tokens; when that cut falls inside an image's tokens, cuts right
    before that image instead. Images whose tokens are cut off leave ``pixel_values`` and
    ``image_sizes`` too (their crops: 1 + (H/S)*(W/S) each). Labels are cut with the tokens, so
    a sample whose answer is cut away trains on nothing.

    Raises:
        ValueError: the image-token runs do not match ``image_sizes`` (one run per image).
    """
    ids = sample["input_ids"]  # [T]
    if ids.shape[0] <= max_len:
        return sample
    runs = image_token_runs(ids, image_token_id)
    sizes = sample.get("image_sizes")
    num_images = 0 if sizes is None else int(sizes.shape[0])
    if len(runs) != num_images:
        raise ValueError(f"sample {sample.get('key')!r}: {len(runs)} image-token runs, {num_images} images")
    cut, keep_images = max_len, 0
    for start, end in runs:
        if end <= cut:
            keep_images += 1
        else:
            cut = min(cut, start)
            break
    out = dict(sample, input_ids=ids[:cut], labels=sample["labels"][:cut])
    if num_images:
        S = sample["pixel_values"].shape[-1]
        crops = sum(1 + (int(h) // S) * (int(w) // S) for h, w in sizes[:keep_images].tolist())
        out["pixel_values"] = sample["pixel_values"][:crops]
        out["image_sizes"] = sizes[:keep_images]
    return out
