"""Check and repair one image for the shards: every bad input is a reason, never a crash.

:func:`prepare_image` decodes the image fully (catching truncated and corrupt files) and returns
the bytes to store with their extension and final size. The bytes are the original file's when
nothing needs repair; otherwise the repaired image is re-encoded (JPEG quality 95 when the source
was a JPEG, else PNG) and every repair is named:

- ``exif_rotated``: the EXIF orientation is applied (the training-time decoder ignores EXIF);
- ``alpha_on_white``: RGBA / LA / palette or RGB with transparency composited on white (a plain
  RGB conversion would put transparent pixels on black);
- ``cmyk_to_rgb``: CMYK converted to RGB;
- ``16bit_to_8bit``: 16/32-bit integer or float grey scaled to 8 bits (a plain conversion clips);
- ``reencoded``: a format the WebDataset decoder does not know, stored as PNG;
- ``downscaled``: larger than the largest size the HD transform resizes to (``downscale_for``),
  downscaled to exactly that size, keeping the HD size and the image-token count.

Unrecoverable inputs raise :class:`BadImage` with the reason: zero bytes, not an image, corrupt or
truncated, or more pixels than ``max_pixels`` (Pillow's decompression-bomb guard, as a skip).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phi3v_train.model.processor import hd_size

# Extensions the training-time decoder (webdataset's PIL handler) reads.
DECODABLE = frozenset(("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm"))
_EXT = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tiff"}  # PIL format -> extension, else format.lower()
_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(ValueError):
    """An image that cannot be used; ``str(e)`` is the reason recorded in the manifest."""


@dataclass
class PreparedImage:
    """What goes into the shard: ``data`` bytes with extension ``ext``, final size, repairs."""
    data: bytes
    ext: str
    width: int
    height: int
    repairs: list[str] = field(default_factory=list)


def hd_resize_size(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(width, height) the HD transform resizes an image to before padding (no padding)."""
    out_h, out_w = hd_size(width, height, num_crops, crop_size)
    if width < height:  # portrait: transposed, the padding goes to the width
        return max(1, int(out_h / (height / width))), out_h
    return out_w, max(1, int(out_w / (width / height)))


def _open(data: bytes, what: str, max_pixels: int | None) -> Image.Image:
    if not data:
        raise BadImage(f"zero-byte image file: {what}")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError as e:
                raise BadImage(f"not an image: {what}: {e}") from None
            image.load()  # full decode: catches truncated and corrupt files
            return image
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"image too large: {what}: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise BadImage(f"corrupt image file: {what}: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image).astype(np.float64)
    top = 1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else (255.0 if array.max(initial=0) <= 255 else 65535.0)
    return Image.fromarray(np.clip(np.rint(array / top * 255), 0, 255).astype(np.uint8), "L")


def prepare_image(
    data: bytes,
    what: str = "image",
    *,
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    downscale_for: tuple[int, int] | None = None,
) -> PreparedImage:
    """Check, repair and (optionally) downscale one image (see the module docstring).

    Args:
        data: the image file's bytes.
        what: how to name the image in reasons (its path or row).
        max_pixels: larger images are rejected (Pillow's MAX_IMAGE_PIXELS); None: no limit.
        downscale_for: (num_crops, crop_size): downscale images larger than the HD transform
            uses at this crop budget (None: keep the size).

    Raises:
        BadImage: zero bytes, not an image, corrupt or truncated, or too many pixels.
    """
    image = _open(data, what, max_pixels)
    fmt = image.format or ""
    ext = _EXT.get(fmt, fmt.lower())
    repairs: list[str] = []
    if image.getexif().get(_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
        repairs.append("exif_rotated")
    if image.mode in _SIXTEEN_BIT:
        image = _to_8bit(image)
        repairs.append("16bit_to_8bit")
    elif _has_transparency(image):
        image = _on_white(image)
        repairs.append("alpha_on_white")
    elif image.mode == "CMYK":
        image = image.convert("RGB")
        repairs.append("cmyk_to_rgb")
    if ext not in DECODABLE:
        repairs.append("reencoded")
    if downscale_for is not None:
        num_crops, crop_size = downscale_for
        target = hd_resize_size(image.width, image.height, num_crops, crop_size)
        if (image.width > target[0] and image.height > target[1]
                and hd_size(*target, num_crops, crop_size) == hd_size(image.width, image.height, num_crops, crop_size)):
            image = image.convert("RGB") if image.mode not in ("RGB", "L") else image
            image = image.resize(target, Image.Resampling.BILINEAR)
            repairs.append("downscaled")
    if not repairs:
        return PreparedImage(data, ext, image.width, image.height)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    if ext == "jpg":
        image.save(out, format="JPEG", quality=95)
    else:
        image.save(out, format="PNG")
        ext = "png"
    return PreparedImage(out.getvalue(), ext, image.width, image.height, repairs)
