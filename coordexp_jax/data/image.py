"""Image inputs exactly as Qwen3-VL's processor makes them (`../shared/reference/qwen3vl_spec.md` §5).

Qwen3-VL reuses the Qwen2-VL image processor with patch 16, merge 2, temporal patch 2 and mean = std = 0.5.
The steps, each a small pure function so training, rollout and evaluation share them:

1. `load_image`: decode to RGB uint8 `[H, W, 3]`, turned upright by the file's EXIF orientation tag (as
   transformers' `load_image` does: `PIL.ImageOps.exif_transpose`); transparency is composited onto white (as the
   processor's `convert_to_rgb` does). Training, evaluation and predict all load images through it, and
   `read_image_size` reports the size of this upright image, so a record's `width`/`height` and boxes always
   refer to the image as a viewer shows it.
2. `smart_resize`: the target size, both sides multiples of `factor = patch * merge = 32`, pixel count in
   `[min_pixels, max_pixels]`, Python `round` (half to even) as in the reference.
3. `resize_image`: PIL bicubic on the uint8 image (the PIL-backend path of transformers).
4. `normalize`: `x / 255` computed in float64 then cast to float32, then `(x - mean) / std` in float32.
5. `patchify`: `[3, H, W]` -> `[gh * gw, 3 * T * p * p]` in spatial-merge-block order, the frame repeated T times;
   `grid_thw = (1, gh, gw)` in patches.

Boxes are stored normalised to the image (`coord/codec.py`), so resizing never changes the targets.
`processing_problem` says, from the size alone, whether the processor will refuse an image (aspect ratio over
200, more patches than a fixed slot holds, a size that needs a forbidden resize), so validation can refuse it
before any worker decodes it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageOps

from coordexp_jax.errors import CoordExpError

# Released Qwen3-VL preprocessor settings (qwen3vl_spec.md §1.4 / §5).
QWEN3VL_MIN_PIXELS = 65536
QWEN3VL_MAX_PIXELS = 16777216
MAX_ASPECT_RATIO = 200  # smart_resize refuses max(h, w) / min(h, w) above this (transformers' Qwen2-VL rule)
EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5..8 turn the image by a quarter (width and height swap)


class ImageLoadError(CoordExpError, ValueError):
    """An image file is missing, truncated or cannot be decoded."""


class ImageSizeError(CoordExpError, ValueError):
    """An image's size is refused: an aspect ratio over 200 (smart_resize), or not the size the configuration
    requires (runtime resizing forbidden)."""


class ImageConfigError(CoordExpError, ValueError):
    """An `ImageConfig` value is invalid (non-positive size, min_pixels > max_pixels); the message names the key."""


class ImageSizeMismatchError(ImageLoadError):
    """The decoded image's size differs from the size its record declares (the record's boxes would be wrong)."""


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images become `pixel_values`. Defaults are the released Qwen3-VL settings.

    `allow_resize=False` forbids runtime resizing: an image whose size is not already the smart_resize target
    raises `ImageSizeError` (use it when a dataset was resized offline and must not be touched again).
    """

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = QWEN3VL_MIN_PIXELS
    max_pixels: int = QWEN3VL_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    allow_resize: bool = True

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 * T * p * p (1536 for Qwen3-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def __post_init__(self):
        for k in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if int(getattr(self, k)) <= 0:
                raise ImageConfigError(f"ImageConfig.{k} must be positive, got {getattr(self, k)}")
        if self.min_pixels > self.max_pixels:
            raise ImageConfigError(f"ImageConfig.min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = QWEN3VL_MIN_PIXELS,
                 max_pixels: int = QWEN3VL_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' Qwen2-VL `smart_resize` (Python `round` is half-to-even: 48/32 = 1.5 -> 2,
    80/32 = 2.5 -> 2). Raises `ImageSizeError` (a ValueError) for an aspect ratio above 200 or a non-positive side.
    """
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image size must be positive, got {height}x{width} (HxW)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
                             f"{max(height, width) / min(height, width):g} for a {height}x{width} (HxW) image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """smart_resize with the config's factor and pixel limits."""
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def num_patches(height: int, width: int, cfg: ImageConfig) -> int:
    """Number of patches (rows of `pixel_values`) of an image of this original size."""
    h, w = target_size(height, width, cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size)


def processing_problem(height: int, width: int, cfg: ImageConfig | None = None,
                       patches_per_slot: int | None = None) -> str | None:
    """Why the processor would refuse an image of this original size (pixels), or None when it takes it.

    Without `cfg`: the size-only rules of smart_resize (non-positive side, aspect ratio over 200). With `cfg`:
    also a size that needs a resize when `cfg.allow_resize` is False, and, with `patches_per_slot` (the fixed
    patch capacity of one image slot of a batch), more patches than the slot holds (smart_resize can exceed
    `max_pixels` for very elongated images: the min-pixels upscale is applied after the rounding).
    """
    try:
        h, w = smart_resize(height, width, *((cfg.factor, cfg.min_pixels, cfg.max_pixels) if cfg else ()))
    except ImageSizeError as e:
        return str(e)
    if cfg is None:
        return None
    if (h, w) != (height, width) and not cfg.allow_resize:
        return (f"image is {width}x{height} (WxH) but runtime resizing is forbidden and the processor needs {w}x{h}; "
                f"resize the data offline")
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    if patches_per_slot is not None and n > patches_per_slot:
        return (f"a {width}x{height} (WxH) image is resized to {w}x{h}: {n} patches, more than the "
                f"{patches_per_slot} of an image slot (aspect ratio {max(h, w) / min(h, w):g})")
    return None


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 (upright) when absent or unreadable.

    Read from the header without decoding, except that a PNG's eXIf chunk is only seen when it precedes the pixel
    data (where PIL and most writers put it); a PNG with a late one is seen once decoded.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        o = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: PIL raises various types; treated as absent
        return 1
    return o if 1 <= o <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation (`PIL.ImageOps.exif_transpose`, as transformers' `load_image`);
    the same object when there is nothing to turn."""
    return ImageOps.exif_transpose(img) if exif_orientation(img) != 1 else img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image -> RGB uint8 `[H, W, 3]`; transparency composited onto white, as transformers' convert_to_rgb."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img).convert("RGB")
    else:
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied, as `load_image` returns it) from the file
    header, without decoding the pixels. Raises ImageLoadError naming the path."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if exif_orientation(img) >= 5 else (w, h)
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: image file not found") from e
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageLoadError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e


def load_image(path: str) -> np.ndarray:
    """Decodes an image file fully to upright RGB uint8 `[H, W, 3]` (EXIF orientation applied, as transformers'
    `load_image`). Truncated or corrupt files raise ImageLoadError naming the path."""
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode: a truncated JPEG fails here, not at open()
            return to_rgb_array(upright(img))
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: image file not found") from e
    except Exception as e:
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` -> `[height, width, 3]` with PIL bicubic (identity when the size already matches)."""
    if img.shape[0] == height and img.shape[1] == width:
        return img
    out = Image.fromarray(img).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def normalize(img: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[3, H, W]`: x/255 (in float64, then float32), then (x - mean)/std in float32."""
    if img.dtype == np.uint8:
        # A per-channel lookup table of the same float32 arithmetic: bit-identical and ~10x faster on big images.
        lut = _normalize_lut(tuple(float(v) for v in mean), tuple(float(v) for v in std))  # [3, 256]
        hwc = np.moveaxis(img, -1, 0)  # [3, H, W] view
        return np.stack([lut[c][hwc[c]] for c in range(hwc.shape[0])])
    x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = np.moveaxis(x, -1, 0)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return (x - m) / s


@functools.lru_cache(maxsize=8)
def _normalize_lut(mean: tuple, std: tuple) -> np.ndarray:
    v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return np.stack([(v - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)]).astype(np.float32)


def patchify(img: np.ndarray, patch_size: int = 16, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 `[C, H, W]` -> (`pixel_values [gh*gw, C*T*p*p]` in merge-block order, `grid_thw (1, gh, gw)`).

    Row order: block row R, block col C, in-block row i, in-block col j (spec §2.1); each row is the patch in
    (channel, t, y, x) order with the single frame repeated T times.
    """
    c, h, w = img.shape
    p, m = patch_size, merge_size
    if h % (p * m) or w % (p * m):
        raise ImageSizeError(f"image of {h}x{w} is not a multiple of patch*merge = {p * m}")
    gh, gw = h // p, w // p
    x = img.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * p * p), dtype=np.float32), (1, gh, gw)


def process_image(img: np.ndarray, cfg: ImageConfig = ImageConfig(), *, name: str = "image"):
    """RGB uint8 `[H, W, 3]` -> (`pixel_values [N, 1536] float32`, `grid_thw (1, gh, gw)`, `(height, width)` resized).

    Raises ImageSizeError naming `name` for an aspect ratio over 200, and with `cfg.allow_resize=False` for an
    image not already at its smart_resize size.
    """
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{name}: expected an RGB uint8 [H, W, 3] array, got {img.dtype} {img.shape}")
    h0, w0 = img.shape[:2]
    try:
        h, w = target_size(h0, w0, cfg)
    except ImageSizeError as e:
        raise ImageSizeError(f"{name}: {e}") from None
    if (h, w) != (h0, w0):
        if not cfg.allow_resize:
            raise ImageSizeError(
                f"{name}: image is {w0}x{h0} (WxH) but runtime resizing is forbidden and the processor needs {w}x{h} "
                f"(multiples of {cfg.factor}, {cfg.min_pixels}..{cfg.max_pixels} pixels); resize the data offline")
        img = resize_image(img, h, w)
    pv, grid = patchify(normalize(img, cfg.image_mean, cfg.image_std), cfg.patch_size, cfg.merge_size,
                        cfg.temporal_patch_size)
    return pv, grid, (h, w)


def hf_processor_kwargs(cfg: ImageConfig = ImageConfig()) -> dict:
    """Keyword arguments that configure transformers' Qwen2-VL image processor like `cfg` (for parity checks)."""
    return dict(patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size,
                image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
                size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
