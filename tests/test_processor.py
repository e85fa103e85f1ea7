"""Tests for model/processor.py against the facts in shared/docs/PHI3V_SPEC.md."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v_train.model.processor import (
    CLIP_MEAN,
    CLIP_STD,
    END_TOKEN_ID,
    IMAGE_TOKEN_ID,
    Phi3VProcessor,
    hd_size,
    hd_transform,
    num_image_tokens,
)

LUMA = Path(__file__).resolve().parents[1] / "data" / "luma"
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
WHITE = (1 - MEAN) / STD  # normalised white, [3, 1, 1]
BLACK = -MEAN / STD


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor.from_pretrained()


def luma_images(n):
    """The first n Luma photos (sorted), both sizes present (413x512 portrait, 512x512)."""
    paths = sorted((LUMA / "images").glob("*.jpg"))
    square = [p for p in paths if Image.open(p).size == (512, 512)][:2]
    return [Image.open(p) for p in paths[: n - len(square)] + square]


def reassemble(pixel_values, hd_hw, crop):
    """Inverse of the crop layout: sub-crops (row-major, after the global view) -> [3, H, W]."""
    hc, wc = hd_hw[0] // crop, hd_hw[1] // crop
    crops = pixel_values[1:].reshape(hc, wc, 3, crop, crop)
    return crops.permute(2, 0, 3, 1, 4).reshape(3, hc * crop, wc * crop)


# --- image tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "width,height,num_crops,expected",
    [(500, 500, 16, 2509), (400, 300, 16, 1921), (1600, 900, 16, 2353), (900, 1600, 16, 2377),
     (500, 500, 4, 757), (500, 500, 1, 313), (1600, 900, 1, 313), (90, 1600, 1, 313)],
)
def test_reference_token_counts(width, height, num_crops, expected):
    assert num_image_tokens(*hd_size(width, height, num_crops)) == expected


SIZES = [(500, 500), (400, 300), (1600, 900), (900, 1600), (1, 1), (413, 512), (5000, 10), (10, 5000),
         (20000, 1), (337, 336)]


@pytest.mark.parametrize("num_crops", [16, 4, 1])
@pytest.mark.parametrize("width,height", SIZES)
def test_transform_size_equals_hd_size(width, height, num_crops):
    image = Image.new("RGB", (width, height), (12, 34, 56))
    pixels, (H, W) = hd_transform(image, num_crops)
    assert (H, W) == hd_size(width, height, num_crops)
    assert H % 336 == 0 and W % 336 == 0 and (H // 336) * (W // 336) <= num_crops
    assert pixels.shape == (1 + (H // 336) * (W // 336), 3, 336, 336)
    assert pixels.dtype == torch.float32


def test_tiny_crop_formula():
    # crop 56, patch 14: grid 4 -> 2x2 = 4 tokens per crop, rows of 2 (+1 sub_GN): 17*4 + 1 + 5*2
    assert num_image_tokens(224, 224, crop_size=56, patch_size=14) == 79
    assert num_image_tokens(56, 56, crop_size=56, patch_size=14) == 2 * 4 + 1 + 2 * 2
    with pytest.raises(ValueError):
        num_image_tokens(300, 336)  # not a multiple of 336
    with pytest.raises(ValueError):
        num_image_tokens(42, 42, crop_size=42, patch_size=14)  # odd patch grid


# --- pixels -----------------------------------------------------------------------------------

def test_crop_order_and_global_view():
    # 2x2 quadrants of distinct colours; at num_crops=4 a 672x672 image is not resized.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    image = Image.new("RGB", (672, 672))
    for i, colour in enumerate(colours):
        image.paste(colour, (336 * (i % 2), 336 * (i // 2), 336 * (i % 2 + 1), 336 * (i // 2 + 1)))
    pixels, size = hd_transform(image, num_crops=4)
    assert size == (672, 672) and pixels.shape == (5, 3, 336, 336)
    for i, colour in enumerate(colours):
        expected = (torch.tensor(colour).view(3, 1, 1) / 255 - MEAN) / STD
        torch.testing.assert_close(pixels[1 + i], expected.expand(3, 336, 336))
    hd = reassemble(pixels, size, 336)
    torch.testing.assert_close(pixels[0], F.interpolate(hd[None], size=(336, 336), mode="bicubic")[0],
                               rtol=0, atol=0)


def test_real_photo_hd_tensor_and_global_view():
    # 413x512 portrait at 16 crops: transposed 512x413, scale 4 -> 1344 x int(1344*413/512)=1084,
    # padded with white to 1344 (130 px each side), transposed back.
    image = Image.open(LUMA / "images" / "mh01-gray_main.jpg")
    assert image.size == (413, 512)
    pixels, size = hd_transform(image, num_crops=16)
    assert size == (1344, 1344) and pixels.shape == (17, 3, 336, 336)
    hd = reassemble(pixels, size, 336)
    canvas = Image.new("RGB", (1344, 1344), "white")
    canvas.paste(image.transpose(Image.Transpose.TRANSPOSE).resize((1344, 1084), Image.Resampling.BILINEAR), (0, 130))
    expected = torch.from_numpy(np.array(canvas.transpose(Image.Transpose.TRANSPOSE))).permute(2, 0, 1)
    expected = (expected.float() / 255 - MEAN) / STD
    torch.testing.assert_close(hd, expected)
    torch.testing.assert_close(pixels[0], F.interpolate(hd[None], size=(336, 336), mode="bicubic")[0],
                               rtol=0, atol=0)


def test_padding_is_white_and_centred():
    # 500x100 at 16 crops: scale 8 -> 2688 x int(2688/5)=537, padded to 672: 67 rows on top, 68 below.
    pixels, size = hd_transform(Image.new("RGB", (500, 100), (0, 0, 0)), num_crops=16)
    assert size == (672, 2688)
    hd = reassemble(pixels, size, 336)
    torch.testing.assert_close(hd[:, :67], WHITE.expand(3, 67, 2688))
    torch.testing.assert_close(hd[:, 67:604], BLACK.expand(3, 537, 2688))
    torch.testing.assert_close(hd[:, 604:], WHITE.expand(3, 68, 2688))


def test_portrait_pads_columns_and_transparent_input_becomes_rgb():
    # Transparent RGBA (colour black) -> RGB black; portrait: the padding is on the left and right.
    image = Image.new("RGBA", (100, 500), (0, 0, 0, 0))
    pixels, size = hd_transform(image, num_crops=16)
    assert size == (2688, 672) and pixels.shape[1] == 3
    hd = reassemble(pixels, size, 336)
    torch.testing.assert_close(hd[:, :, :67], WHITE.expand(3, 2688, 67))
    torch.testing.assert_close(hd[:, :, 67:604], BLACK.expand(3, 2688, 537))
    torch.testing.assert_close(hd[:, :, 604:], WHITE.expand(3, 2688, 68))


# --- tokens and labels ------------------------------------------------------------------------

def test_special_token_ids(processor):
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<s>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|image|>"]}
    assert ids == {"<s>": 1, "<|user|>": 32010, "<|assistant|>": 32001, "<|end|>": 32007,
                   "<|endoftext|>": 32000, "<|image|>": 32044}
    # The original tokenizer.json pipeline (as the reference loads it): "<|end|>\n" -> 32007, "▁", "\n".
    assert tok("<|user|>\nWhat<|end|>\n<|assistant|>\n").input_ids == [
        1, 32010, 29871, 13, 5618, 32007, 29871, 13, 32001]


def test_render_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|image_1|>Hi"}]
    assert Phi3VProcessor.render_prompt(messages, add_generation_prompt=True) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>Hi<|end|>\n<|assistant|>\n")
    assert Phi3VProcessor.render_prompt(messages, add_generation_prompt=False).endswith("Hi<|end|>\n")


def test_reference_sample_labels_and_bos(processor):
    record = {"key": "mh01", "title": "Chaz Kangeroo Hoodie", "category": "HOODIES & SWEATSHIRTS",
              "full_price": 52.0}
    sample = processor.encode_reference_sample(record, Image.open(LUMA / "images" / "mh01-gray_main.jpg"))
    ids, labels = sample["input_ids"], sample["labels"]
    answer = "Product: Chaz Kangeroo Hoodie, Category: HOODIES & SWEATSHIRTS, Full Price: 52.0"
    answer_ids = processor.tokenizer(answer, add_special_tokens=False).input_ids
    labelled = labels != -100
    assert labelled.sum() == len(answer_ids) + 1
    assert labelled[-(len(answer_ids) + 1):].all()  # a contiguous suffix
    assert torch.equal(labels[labelled], ids[labelled])
    assert labels[-1] == END_TOKEN_ID
    assert processor.tokenizer.decode(labels[labelled][:-1]) == answer
    # Layout: <s><|user|>\n [2509 x <|image|>] <s>What is shown ...<|end|>\n<|assistant|> answer <|end|>
    image_pos = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    assert ids[:4].tolist() == [1, 32010, 29871, 13] and image_pos[0] == 4
    assert len(image_pos) == 2509 and sample["image_sizes"].tolist() == [[1344, 1344]]
    assert ids[image_pos[-1] + 1] == 1  # BOS right after the image
    assert (ids == 1).sum() == 2
    prompt_end = len(ids) - len(answer_ids) - 1
    assert ids[prompt_end - 4: prompt_end].tolist() == [32007, 29871, 13, 32001]
    assert sample["pixel_values"].shape == (17, 3, 336, 336) and sample["key"] == "mh01"


def test_two_images_and_text_only(processor):
    images = [Image.new("RGB", (400, 300)), Image.new("RGB", (300, 400))]
    prompt = processor.render_prompt([{"role": "user", "content": "<|image_1|>\n<|image_2|>\nCompare."}])
    sample = processor.encode(prompt, images, "Same.")
    ids = sample["input_ids"]
    is_image = (ids == IMAGE_TOKEN_ID).int()
    ends = ((is_image[:-1] == 1) & (is_image[1:] == 0)).nonzero().flatten() + 1  # first token after each image
    assert ids[0] == 1 and [ids[i].item() for i in ends] == [1, 1]
    assert is_image.sum() == 1921 + 1933  # 4:3 and 3:4 at 16 crops
    assert sample["image_sizes"].tolist() == [[1008, 1344], [1344, 1008]]
    assert sample["pixel_values"].shape[0] == (1 + 12) * 2
    text = processor.encode(processor.render_prompt([{"role": "user", "content": "Hi"}]), [])
    assert text["pixel_values"].shape == (0, 3, 336, 336) and text["image_sizes"].shape == (0, 2)
    assert (text["labels"] == -100).all() and text["input_ids"][0] == 1


@pytest.mark.parametrize("content,num_images", [
    ("<|image_1|>x", 0), ("<|image_2|>x", 1), ("<|image_1|><|image_1|>x", 1),
    ("<|image_2|><|image_1|>x", 2), ("<|image_1|>x", 2), ("x", 1),
])
def test_image_tag_mismatch_raises(processor, content, num_images):
    prompt = processor.render_prompt([{"role": "user", "content": content}])
    with pytest.raises(ValueError, match="image tags"):
        processor.encode(prompt, [Image.new("RGB", (8, 8))] * num_images)


@pytest.mark.parametrize("config", [dict(num_crops=16), dict(num_crops=4), dict(num_crops=16, crop_size=56)])
def test_sample_length_equals_encode(processor, config):
    proc = Phi3VProcessor(processor.tokenizer, **config)
    for i, image in enumerate(luma_images(6)):
        record = {"key": f"k{i}", "title": f"Item {i}", "category": "TEES", "full_price": 10.5 * i,
                  "image_width": image.width, "image_height": image.height}
        sample = proc.encode_reference_sample(record, image)
        assert proc.record_length(record) == len(sample["input_ids"])
        messages, answer = proc.reference_messages(record)
        prompt = proc.render_prompt(messages)
        assert proc.sample_length(image.width, image.height, prompt, answer) == len(sample["input_ids"])
        assert sample["pixel_values"].shape[-1] == proc.crop_size


def test_transform_into_a_given_buffer_and_crop_count(processor):
    image = Image.new("RGB", (400, 300), (200, 10, 30))
    expected, size = hd_transform(image, 16)
    assert processor.image_crop_count(400, 300) == expected.shape[0] == 13
    buffer = torch.full((20, 3, 336, 336), 7.0)
    prompt = processor.render_prompt([{"role": "user", "content": "<|image_1|>Hi"}])
    sample = processor.encode(prompt, [image], "ok", pixel_out=buffer[3:16])
    assert sample["pixel_values"].data_ptr() == buffer[3].data_ptr()  # written in place, no copy
    assert torch.equal(buffer[3:16], expected) and (buffer[:3] == 7).all() and (buffer[16:] == 7).all()
    with pytest.raises(ValueError, match="pixel_out has 14 crops, the images need 13"):
        processor.encode(prompt, [image], "ok", pixel_out=buffer[:14])
    with pytest.raises(ValueError, match="out has shape"):
        hd_transform(image, 16, out=buffer[:5])


def test_bfloat16_pixels_are_the_rounded_float32_ones(processor):
    image = Image.open(LUMA / "images" / "mh01-gray_main.jpg")
    fp32, size = hd_transform(image, 4)
    bf16, size16 = hd_transform(image, 4, dtype=torch.bfloat16)
    assert size == size16 and bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.to(torch.bfloat16))
    proc = Phi3VProcessor(processor.tokenizer, num_crops=4, pixel_dtype=torch.bfloat16)
    prompt = proc.render_prompt([{"role": "user", "content": "<|image_1|>Hi"}])
    assert proc.encode(prompt, [image], "ok")["pixel_values"].dtype == torch.bfloat16
