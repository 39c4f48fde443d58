"""Reading pictures (tokentm_fast/evaluation/data.py: ``to_rgb`` / ``load_image``, the one code path of the
CLI's ``explain`` and of every data source): transparency (issue 26 item 5).

``convert("RGB")`` dropped the alpha channel without a word: a transparent pixel showed the colour stored
under it (often black). A picture with transparent pixels is now composited over white, as image viewers
show it, and a UserWarning says so once per call site; an opaque picture with an alpha channel is read
as its RGB, without a warning. The expected pixels are written out here from the compositing formula
``round(c · a/255 + 255 · (1 − a/255))``.
"""
import warnings

import numpy as np
import pytest
from PIL import Image

from tokentm_fast.evaluation.data import load_image


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The oracle: ``rgb (H, W, 3)`` uint8 with ``alpha (H, W)`` uint8 over white, as 8-bit integers."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.int64)


def rgba_picture():
    """16x16: left half opaque colours, right half transparent black (alpha 0), one row at alpha 128."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 0                                    # what convert("RGB") shows: black
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:, 8:] = 0
    alpha[3] = 128
    return rgb, alpha


def transparency_warnings(records):
    return [w for w in records if "transparent pixels" in str(w.message)]


def test_rgba_is_composited_over_white_and_said_once(tmp_path):
    rgb, alpha = rgba_picture()
    path = tmp_path / "a.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        got = [np.asarray(load_image(path)).astype(np.int64) for _ in range(3)]
    want = over_white(rgb, alpha)
    assert (want[:, 8:][alpha[:, 8:] == 0] == 255).all()            # transparent: white, not black
    for g in got:
        assert g.shape == (16, 16, 3)
        assert np.abs(g - want).max() <= 1                          # PIL's integer compositing: ±1
    said = transparency_warnings(rec)
    assert len(said) == 1 and "composited over white" in str(said[0].message)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes(tmp_path, mode):
    rgb, alpha = rgba_picture()
    gray = rgb[..., 0]
    path = tmp_path / "b.png"
    if mode == "LA":
        Image.fromarray(np.dstack([gray, alpha]), "LA").save(path)
        want = over_white(np.repeat(gray[..., None], 3, -1), alpha)
    else:                                             # a palette with one entry marked transparent
        index = np.where(alpha == 0, 0, 1 + gray % 200).astype(np.uint8)     # entry 0: transparent
        pal = Image.fromarray(index, "P")
        colours = [0, 0, 0] + [v for i in range(255) for v in (i, 255 - i, (3 * i) % 256)]
        pal.putpalette(colours)
        pal.save(path, transparency=0)
        table = np.array(colours, dtype=np.uint8).reshape(-1, 3)
        want = over_white(table[index], np.where(index == 0, 0, 255).astype(np.uint8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = np.asarray(load_image(path)).astype(np.int64)
    assert np.abs(got - want).max() <= 1
    assert len(transparency_warnings(rec)) == 1


def test_opaque_alpha_is_read_as_rgb_without_a_word(tmp_path):
    rgb, _ = rgba_picture()
    path = tmp_path / "c.png"
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)]), "RGBA").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.asarray(load_image(path))
    np.testing.assert_array_equal(got, rgb)
