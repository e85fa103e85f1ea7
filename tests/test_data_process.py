"""data/process.py: the trainer's process_fn, its pixel-free length, and text truncation."""

import pytest
import torch
from PIL import Image

from phi3v_train.data.collate import IMAGE_TOKEN_ID, image_token_runs
from phi3v_train.data.process import RecordProcessor, truncate_sample
from phi3v_train.model.processor import Phi3VProcessor


@pytest.fixture(scope="module")
def process():
    return RecordProcessor(Phi3VProcessor.from_pretrained(num_crops=4, crop_size=56))


RECORD = {"key": "k1", "title": "Crème Tee", "category": "TEES", "full_price": 19.5,
          "prompt": "<|image_1|>What is shown in this image?", "answer": "Product: Crème Tee, Full Price: 19.5",
          "image_width": 120, "image_height": 90}


@pytest.mark.parametrize("size", [(120, 90), (90, 120), (56, 56), (300, 40)])
def test_num_tokens_equals_the_processed_length(process, size):
    record = dict(RECORD, image_width=size[0], image_height=size[1])
    sample = process(record, Image.new("RGB", size, (3, 4, 5)))
    assert process.num_tokens(record, size) == len(sample["input_ids"]) and sample["key"] == "k1"
    assert len(image_token_runs(sample["input_ids"])) == 1


def test_text_only_record(process):
    sample = process(RECORD, None)
    assert process.num_tokens(RECORD, None) == len(sample["input_ids"])
    assert sample["image_sizes"].shape == (0, 2) and not (sample["input_ids"] == IMAGE_TOKEN_ID).any()
    assert (sample["labels"] != -100).sum() > 0


def test_truncate_never_cuts_inside_an_image(process):
    sample = process(RECORD, Image.new("RGB", (120, 90)))
    (start, end), = image_token_runs(sample["input_ids"])
    T = len(sample["input_ids"])
    assert truncate_sample(sample, T) is sample  # short enough: unchanged
    after = truncate_sample(sample, end + 3)  # cut in the text after the image: image kept
    assert len(after["input_ids"]) == end + 3 and torch.equal(after["pixel_values"], sample["pixel_values"])
    assert torch.equal(after["labels"], sample["labels"][: end + 3])
    inside = truncate_sample(sample, (start + end) // 2)  # cut inside the image: before it
    assert len(inside["input_ids"]) == start and inside["image_sizes"].shape == (0, 2)
    assert inside["pixel_values"].shape[0] == 0


def test_truncate_keeps_whole_leading_images():
    S = 4
    ids = torch.tensor([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 1, 7, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 1, 9])
    sample = {"input_ids": ids, "labels": ids.clone(), "key": "two",
              "pixel_values": torch.arange(2 + 3).float().view(5, 1, 1, 1).expand(5, 3, S, S),
              "image_sizes": torch.tensor([[S, S], [S, 2 * S]])}  # crops 1 + 1 and 1 + 2
    cut = truncate_sample(sample, 7)
    assert cut["input_ids"].tolist() == ids[:5].tolist()  # the second image (5..7) would be cut
    assert cut["image_sizes"].tolist() == [[S, S]] and cut["pixel_values"][:, 0, 0, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="image-token runs"):
        truncate_sample(dict(sample, image_sizes=sample["image_sizes"][:1]), 7)
