"""Tests of the pictures: normalized maps, overlays, grids and perturbation curves."""
import numpy as np
import pytest
import torch
from PIL import Image

from tokentm_fast.visualize import normalize_map, overlay, plot_perturbation_curves, save_grid, save_overlay


def test_normalize_map_properties():
    m = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    n = normalize_map(m)
    assert isinstance(n, np.ndarray) and n.dtype == np.float32 and n.shape == (2, 2)
    assert n.min() == 0.0 and n.max() == 1.0
    np.testing.assert_allclose(n, [[0.0, 0.5], [0.25, 1.0]])
    # order preserved, shift / scale invariant
    np.testing.assert_allclose(normalize_map(m * 7 - 3), n, atol=1e-6)
    # constant and non-finite
    np.testing.assert_array_equal(normalize_map(np.full((3, 4), 2.5)), np.zeros((3, 4)))
    np.testing.assert_array_equal(normalize_map(np.zeros((0,))), np.zeros((0,)))
    x = normalize_map(np.array([0.0, np.nan, 2.0]))
    np.testing.assert_array_equal(x, [0.0, 0.0, 1.0])


def test_overlay_shape_range_and_alpha():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 32, 48, generator=g)
    m = torch.randn(4, 6, generator=g)
    ov = overlay(img, m)
    assert ov.shape == (32, 48, 3) and ov.dtype == np.float32
    assert ov.min() >= 0.0 and ov.max() <= 1.0
    np.testing.assert_allclose(overlay(img, m, alpha=0.0), img.permute(1, 2, 0).numpy(), atol=1e-6)
    # alpha = 1: pure colormap of the bilinearly upsampled map; the hottest pixel is where the map peaks
    spot = torch.zeros(4, 6)
    spot[1, 4] = 5.0
    heat = overlay(torch.zeros(3, 32, 48), spot, alpha=1.0, cmap="gray")[..., 0]
    hot = np.argwhere(heat == heat.max())
    assert (hot[:, 0] // 8 == 1).all() and (hot[:, 1] // 8 == 4).all()  # inside cell (1, 4) of 8 x 8 px
    assert heat.max() == pytest.approx(1.0) and heat.min() == pytest.approx(0.0)
    assert heat[:, :16].max() == pytest.approx(0.0)  # far from the spot: the low end
    # a constant map gives the colormap's low end everywhere
    flat = overlay(img, torch.ones(4, 6), alpha=1.0, cmap="gray")
    np.testing.assert_allclose(flat, 0.0, atol=1e-6)
    with pytest.raises(ValueError):
        overlay(img, m, alpha=1.5)
    with pytest.raises(ValueError):
        overlay(img, torch.randn(2, 4, 6))


def test_save_overlay_and_grid_write_nonblank_pngs(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 16, generator=g)
    maps = {"tokentm": torch.randn(2, 4, 4, generator=g), "legrad": torch.randn(2, 4, 4, generator=g)}
    p = save_overlay(images[0], maps["tokentm"][0], tmp_path / "sub" / "one.png")
    im = np.asarray(Image.open(p).convert("RGB"))
    assert im.shape[0] >= 224 and im.shape[1] >= 224 and im.std() > 5

    p = save_grid(images, maps, tmp_path / "grid.png", titles=["a", "b"])
    im = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
    h, w, _ = im.shape
    assert w > h  # 3 columns x 2 rows
    assert im.std() > 10  # not blank
    non_white = (im < 250).any(axis=2)
    assert non_white.mean() > 0.3  # the cells are drawn
    # each of the 3 columns holds something
    for k in range(3):
        assert non_white[:, k * w // 3:(k + 1) * w // 3].mean() > 0.2
    with pytest.raises(ValueError):
        save_grid(images, {"x": torch.randn(3, 4, 4)}, tmp_path / "bad.png")
    # with mask outlines on the image column
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    p = save_grid(images, maps, tmp_path / "grid_masks.png", masks=masks)
    with_masks = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
    assert with_masks.shape == im.shape and np.abs(with_masks - im).max() > 0
    with pytest.raises(ValueError, match="masks"):
        save_grid(images, maps, tmp_path / "bad.png", masks=masks[:, :8])


def test_plot_perturbation_curves(tmp_path):
    curves = {
        "tokentm": {"positive_predicted": [1.0, 0.6, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],
                    "negative_predicted": [1.0, 1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5]},
        "rollout": {"curves": {"positive_predicted": [1.0] * 10, "negative_predicted": [1.0] * 10}},
    }
    p = plot_perturbation_curves(curves, tmp_path / "curves.png")
    im = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
    assert im.shape[1] > im.shape[0] and im.std() > 10
    # colored line pixels exist (not only black text / gray grid)
    sat = im.max(axis=2) - im.min(axis=2)
    assert (sat > 80).sum() > 200
    with pytest.raises(ValueError, match="no 'target' curves"):
        plot_perturbation_curves(curves, tmp_path / "t.png", variant="target")


# ----------------------------------------------------------------------------- issue 8: readable pictures
def _texts(fig):
    from matplotlib.text import Text

    return " ".join(t.get_text() for t in fig.findobj(Text))


def test_grid_has_colorbar_and_states_the_normalisation(tmp_path):
    import matplotlib

    from tokentm_fast.visualize import DEFAULT_CMAP, NORMALIZATION_NOTE, grid_figure

    # perceptually uniform by default (matplotlib's uniform sequential maps), not jet
    assert DEFAULT_CMAP in ("viridis", "inferno", "magma", "plasma", "cividis")
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g)
    maps = {"tokentm": torch.randn(2, 4, 4, generator=g), "legrad": torch.randn(2, 4, 4, generator=g)}
    fig = grid_figure(images, maps, titles=["a", "b"])
    cbars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(cbars) == 1
    cb = cbars[0]._colorbar
    assert cb.cmap.name == DEFAULT_CMAP and (cb.vmin, cb.vmax) == (0.0, 1.0)
    assert len(fig.axes) == 2 * 3 + 1  # the cells and the colour bar
    text = _texts(fig)
    assert NORMALIZATION_NOTE in text and "min–max normalised" in text
    assert "normalised relevance" in text and "map min" in text and "map max" in text
    # the cells use the colormap the bar shows: at alpha 1 every overlay pixel is a colour of the map
    fig1 = grid_figure(images, maps, alpha=1.0, cmap="viridis")
    cell = fig1.axes[1].get_images()[0].get_array()
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    dist = np.abs(cell.reshape(-1, 1, 3) - lut[None]).sum(-1).min(1)
    assert dist.max() < 1e-5
    assert [ax for ax in fig1.axes if getattr(ax, "_colorbar", None) is not None][0]._colorbar.cmap.name == "viridis"


def test_constant_maps_warn_with_method_and_image(tmp_path):
    import warnings

    from tokentm_fast.visualize import ConstantMapWarning, is_constant_map

    assert is_constant_map(torch.zeros(3, 3)) and is_constant_map(np.full((2, 2), 4.0))
    assert is_constant_map(np.array([np.nan, np.inf])) and not is_constant_map(np.array([0.0, 1e-9]))
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=g)
    flat = torch.randn(2, 4, 4, generator=g)
    flat[1] = 0.0  # image 1: all zeros
    maps = {"tokentm": torch.randn(2, 4, 4, generator=g), "attn_gradcam": flat}
    with pytest.warns(ConstantMapWarning) as rec:
        save_grid(images, maps, tmp_path / "g.png", titles=["cat.png\npred 1", "dog.jpg\npred 2"])
    msgs = [str(w.message) for w in rec if issubclass(w.category, ConstantMapWarning)]
    assert len(msgs) == 1
    assert msgs[0].startswith("attn_gradcam:") and "'dog.jpg'" in msgs[0] and "cat.png" not in msgs[0]
    assert "every value 0" in msgs[0] and "flat colour" in msgs[0]
    with pytest.warns(ConstantMapWarning, match=r"legrad: the map of 'x\.png' is constant \(every value 2\.5\)"):
        save_overlay(images[0], torch.full((4, 4), 2.5), tmp_path / "o.png", method="legrad", image_name="x.png")
    # no warning for maps that vary
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantMapWarning)
        save_grid(images, {"tokentm": maps["tokentm"]}, tmp_path / "ok.png")
        save_overlay(images[0], maps["tokentm"][0], tmp_path / "ok1.png", method="tokentm")
