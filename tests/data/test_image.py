"""Image inputs: parity with transformers' Qwen2-VL PIL image processor configured with Qwen3-VL's settings."""
import math

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import image as I


@pytest.fixture(scope="module")
def hf_proc():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**I.hf_processor_kwargs(I.ImageConfig()))


def _smart_resize_ref(h, w, factor, lo, hi):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)


# (height, width): tiny, odd, square, very wide, very tall, large (downscaled by max_pixels in the small-limit case)
SIZES = [(1, 3), (7, 5), (64, 96), (100, 100), (250, 333), (17, 3000), (2000, 31), (480, 640), (37, 1201)]


@pytest.mark.parametrize("hw", SIZES)
def test_processor_parity_released_settings(hf_proc, hw):
    rng = np.random.default_rng(sum(hw))
    arr = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    ref = hf_proc(images=Image.fromarray(arr), return_tensors="np")
    pv, grid, _ = I.process_image(arr, I.ImageConfig())
    np.testing.assert_array_equal(np.asarray(ref["image_grid_thw"])[0], grid)
    assert pv.dtype == np.float32 and pv.shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(pv, ref["pixel_values"])  # bit-identical


def test_processor_parity_small_limits_and_alpha():
    """A demo-like config (small min/max pixels) and an RGBA image (composited on white in both)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = I.ImageConfig(min_pixels=32 * 32, max_pixels=256 * 256)
    proc = Qwen2VLImageProcessorPil(**I.hf_processor_kwargs(cfg))
    rng = np.random.default_rng(0)
    for hw in [(128, 128), (300, 700), (1024, 768), (9, 40)]:
        rgba = rng.integers(0, 256, size=(*hw, 4), dtype=np.uint8)
        img = Image.fromarray(rgba, "RGBA")
        ref = proc(images=img, return_tensors="np")
        pv, grid, _ = I.process_image(I.to_rgb_array(img), cfg)
        np.testing.assert_array_equal(np.asarray(ref["image_grid_thw"])[0], grid)
        np.testing.assert_array_equal(pv, ref["pixel_values"])


def test_smart_resize_matches_reference_and_invariants():
    rng = np.random.default_rng(1)
    cases = [(h, w) for h in (1, 15, 16, 48, 80, 112, 333, 1000) for w in (1, 17, 48, 80, 640, 4000)]
    cases += [tuple(rng.integers(1, 5000, 2)) for _ in range(200)]
    for h, w in cases:
        h, w = int(h), int(w)
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                I.smart_resize(h, w)
            continue
        for lo, hi in [(65536, 16777216), (1024, 65536), (4096, 4096 * 4)]:
            got = I.smart_resize(h, w, 32, lo, hi)
            assert got == _smart_resize_ref(h, w, 32, lo, hi)
            assert got[0] % 32 == 0 and got[1] % 32 == 0


def test_smart_resize_half_to_even():
    # 48/32 = 1.5 rounds to 2 (even), 80/32 = 2.5 rounds to 2 (even), 112/32 = 3.5 -> 4
    assert I.smart_resize(48 * 8, 80 * 8, 32, 1, 1 << 30) == (384, 640)
    assert I.smart_resize(48, 80, 32, 1, 1 << 30) == (64, 64)
    assert I.smart_resize(112, 112, 32, 1, 1 << 30) == (128, 128)


def test_patchify_block_order_against_bruteforce():
    """Row r of pixel_values is the patch at raster (R*m+i, C*m+j), flattened (c, t, y, x), frame repeated."""
    rng = np.random.default_rng(2)
    p, m, T = 4, 2, 2
    img = rng.standard_normal((3, 4 * p, 6 * p)).astype(np.float32)
    pv, grid = I.patchify(img, p, m, T)
    gh, gw = grid[1], grid[2]
    assert grid == (1, 4, 6)
    r = 0
    for R in range(gh // m):
        for C in range(gw // m):
            for i in range(m):
                for j in range(m):
                    y, x = (R * m + i) * p, (C * m + j) * p
                    patch = img[:, y:y + p, x:x + p]  # [c, p, p]
                    want = np.stack([patch] * T, axis=1).reshape(-1)
                    np.testing.assert_array_equal(pv[r], want)
                    r += 1
    assert r == pv.shape[0]


def test_no_resize_option():
    cfg = I.ImageConfig(min_pixels=32 * 32, max_pixels=512 * 512, allow_resize=False)
    ok = np.zeros((96, 128, 3), np.uint8)
    pv, grid, hw = I.process_image(ok, cfg)
    assert hw == (96, 128) and grid == (1, 6, 8) and pv.shape == (48, 1536)
    with pytest.raises(I.ImageSizeError, match=r"img7.*100x96.*forbidden.*96x96"):
        I.process_image(np.zeros((96, 100, 3), np.uint8), cfg, name="img7")


def test_load_image_errors(tmp_path):
    good = tmp_path / "a.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=95)
    assert I.load_image(str(good)).shape == (200, 300, 3)
    assert I.read_image_size(str(good)) == (300, 200)
    trunc = tmp_path / "t.jpg"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert I.read_image_size(str(trunc)) == (300, 200)  # header still readable
    with pytest.raises(I.ImageLoadError, match="t.jpg"):
        I.load_image(str(trunc))
    with pytest.raises(I.ImageLoadError, match="not found"):
        I.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(I.ImageLoadError, match="junk.png"):
        I.read_image_size(str(tmp_path / "junk.png"))
