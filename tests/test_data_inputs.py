"""Bad input to `phi3v-train shards`: one test per kind, all from one write_shards run.

Every kind is either skipped with its reason in the manifest or repaired (and listed), never a
crash; repaired images are checked as the trainer decodes them (webdataset's PIL handler, RGB).
"""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from phi3v_train.data.shards import sanitize_key, write_shards
from phi3v_train.model.processor import hd_size

LUMA = Path(__file__).resolve().parents[1] / "data" / "luma"
GOOD = dict(title="Plain Tee", full_price="20.0", category3_code="TEES", currency_code="USD")
NUM_CROPS = 4  # the run's HD budget: a 1200x800 image is larger than its 672x448 resize size
MAX_PIXELS = 1_000_000


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def half_transparent(mode: str) -> Image.Image:
    """40x30: left half fully transparent (colour black), right half opaque red / grey."""
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (20, 0, 40, 30))
    return rgba if mode == "RGBA" else rgba.convert(mode)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.paste(1, (20, 0, 40, 30))
    return save(image, "PNG", transparency=0)


def exif_rotated() -> bytes:
    """60x40 stored, EXIF orientation 6 (display rotated 90 degrees clockwise: 40x60)."""
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 40))  # a red stripe on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(image, "JPEG", exif=exif.tobytes(), quality=95)


def corrupt_png() -> bytes:
    data = bytearray(save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG"))
    data[200:260] = b"\x00" * 60  # inside the compressed pixel data
    return bytes(data)


luma_jpeg = (LUMA / "images" / "mh01-gray_main.jpg").read_bytes()
IMAGES = {  # name -> file bytes (None: no file)
    "good": save(Image.new("RGB", (64, 48), (10, 120, 30)), "JPEG"),
    "missing": None,
    "zero": b"",
    "truncated": luma_jpeg[: len(luma_jpeg) // 2],
    "corrupt": corrupt_png(),
    "notimage": b"<html>not an image</html>",
    "huge": save(Image.new("RGB", (1500, 1000), (1, 2, 3)), "PNG"),
    "rgba": save(half_transparent("RGBA"), "PNG"),
    "la": save(half_transparent("LA"), "PNG"),
    "palette": palette_with_transparency(),
    "cmyk": save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),  # red
    "gray16": save(Image.fromarray(np.full((30, 40), 32768, np.uint16)), "PNG"),
    "exif": exif_rotated(),
    "big": save(Image.new("RGB", (1200, 800), (90, 90, 90)), "JPEG"),
}
ROWS = [  # (product_code, image name, overrides)
    ("GOOD-1", "good", {}),
    ("MISSING", "missing", {}),
    ("ZERO", "zero", {}),
    ("TRUNCATED", "truncated", {}),
    ("CORRUPT", "corrupt", {}),
    ("NOTIMAGE", "notimage", {}),
    ("HUGE", "huge", {}),
    ("RGBA", "rgba", {}),
    ("LA", "la", {}),
    ("PALETTE", "palette", {}),
    ("CMYK", "cmyk", {}),
    ("GRAY16", "gray16", {}),
    ("EXIF", "exif", {}),
    ("BIG", "big", {}),
    ("NOPRICE", "good", {"full_price": ""}),
    ("BADPRICE", "good", {"full_price": "call us"}),
    ("NOTITLE", "good", {"title": "   "}),
    ("GOOD-1", "good", {"title": "Same product id again"}),
    ("ÉTÉ-01", "good", {"title": "Café Crème — 東京 ✓", "category3_code": "ÉTÉ"}),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    rows = []
    for code, name, overrides in ROWS:
        ext = "png" if name in ("huge", "rgba", "la", "palette", "gray16", "corrupt") else "jpg"
        rel = f"images/{name}.{ext}"
        if IMAGES[name] is not None:
            (root / rel).write_bytes(IMAGES[name])
        rows.append(dict(GOOD, product_code=code, imageurl=rel, **overrides))
    with open(root / "products.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = root / "shards"
    manifest = write_shards(root / "products.csv", root, out, val_fraction=0.0, num_crops=NUM_CROPS,
                            downscale=True, max_image_pixels=MAX_PIXELS)
    urls = [str(out / n) for n in manifest["splits"]["train"]["shards"]]
    decoded = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")}
    return manifest, decoded


def skip_reason(manifest, code):
    rows = [i for i, (c, _, _) in enumerate(ROWS) if c == code]
    hits = [s for s in manifest["skipped"] if s["row"] in rows]
    assert len(hits) == 1, hits
    return hits[0]["reason"]


def repairs(manifest, code):
    return {r["key"]: r["repairs"] for r in manifest["repaired"]}.get(sanitize_key(code), [])


@pytest.mark.parametrize("code,reason", [
    ("MISSING", "missing image file: "),
    ("ZERO", "zero-byte image file: "),
    ("TRUNCATED", "corrupt image file: "),
    ("CORRUPT", "corrupt image file: "),
    ("NOTIMAGE", "not an image: "),
    ("HUGE", "image too large: "),
    ("NOPRICE", "missing full_price"),
    ("BADPRICE", "non-numeric full_price: 'call us'"),
    ("NOTITLE", "empty title"),
])
def test_skipped_with_reason(run, code, reason):
    manifest, decoded = run
    assert skip_reason(manifest, code).startswith(reason)
    if code != "NOTITLE":
        assert sanitize_key(code) not in decoded


def test_duplicate_product_id_keeps_the_first(run):
    manifest, decoded = run
    dup_row = len(ROWS) - 2
    reason = next(s["reason"] for s in manifest["skipped"] if s["row"] == dup_row)
    assert reason == "duplicate key 'good-1' (kept row 0)"
    assert decoded["good-1"]["json"]["title"] == "Plain Tee"


def white_left_half(image):
    pixels = np.asarray(image)
    return (pixels[:, :20] == 255).all(), pixels[:, 20:]


@pytest.mark.parametrize("code", ["RGBA", "LA", "PALETTE"])
def test_transparency_composited_on_white(run, code):
    manifest, decoded = run
    assert repairs(manifest, code) == ["alpha_on_white"]
    image = decoded[sanitize_key(code)]["png"]
    assert image.mode == "RGB" and image.size == (40, 30)
    is_white, right = white_left_half(image)
    assert is_white  # not black
    assert (right != 255).any()  # the opaque half kept its colour


def test_cmyk_converted(run):
    manifest, decoded = run
    assert repairs(manifest, "CMYK") == ["cmyk_to_rgb"]
    r, g, b = np.asarray(decoded["cmyk"]["jpg"]).reshape(-1, 3).mean(0)
    assert r > 200 and g < 40 and b < 40  # C=0 M=Y=255: red


def test_16bit_scaled_not_clipped(run):
    manifest, decoded = run
    assert repairs(manifest, "GRAY16") == ["16bit_to_8bit"]
    assert np.asarray(decoded["gray16"]["png"]).mean() == pytest.approx(128, abs=1)


def test_exif_orientation_applied(run):
    manifest, decoded = run
    assert repairs(manifest, "EXIF") == ["exif_rotated"]
    sample = decoded["exif"]
    image = sample["jpg"]
    assert image.size == (40, 60) == (sample["json"]["image_width"], sample["json"]["image_height"])
    top = np.asarray(image)[:8].reshape(-1, 3).mean(0)  # the stored left stripe is now on top
    assert top[0] > 180 and top[2] < 80


def test_big_image_downscaled_to_the_hd_resize_size(run):
    manifest, decoded = run
    assert repairs(manifest, "BIG") == ["downscaled"]
    sample = decoded["big"]
    assert sample["jpg"].size == (672, 448)
    assert hd_size(672, 448, NUM_CROPS) == hd_size(1200, 800, NUM_CROPS)  # same crops, same tokens
    entry = manifest["splits"]["train"]["samples"]
    assert entry["image_size"][entry["key"].index("big")] == [672, 448]


def test_non_ascii_text_kept(run):
    manifest, decoded = run
    key = sanitize_key("ÉTÉ-01")
    assert key.startswith("_t_-01-") and len(key) == len("_t_-01-") + 8
    record = decoded[key]["json"]
    assert record["title"] == "Café Crème — 東京 ✓" and record["product_code"] == "ÉTÉ-01"
    assert record["category"] == "ÉTÉ" and "Café Crème — 東京 ✓" in record["answer"]


def test_good_image_stored_verbatim_and_counts(run):
    manifest, decoded = run
    assert "good-1" in decoded and repairs(manifest, "GOOD-1") == []
    kept = {"good-1", "rgba", "la", "palette", "cmyk", "gray16", "exif", "big", sanitize_key("ÉTÉ-01")}
    assert set(decoded) == kept
    assert manifest["num_skipped"] == len(ROWS) - len(kept) and manifest["num_repaired"] == 7
    assert json.loads(json.dumps(manifest)) == manifest
