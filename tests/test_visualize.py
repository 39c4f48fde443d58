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
    # a constant map has no ranking: no heat, the image unchanged (blended by relevance)
    flat = overlay(img, torch.ones(4, 6), alpha=1.0, cmap="gray")
    np.testing.assert_allclose(flat, img.permute(1, 2, 0).numpy(), atol=1e-6)
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
    # the cells use the colormap the bar shows: at alpha 1 the most relevant pixel is the map's top colour
    # (16 x 16 images are enlarged x10 and the 4 x 4 map upsampled bilinearly to 160 x 160)
    fig1 = grid_figure(images, maps, alpha=1.0, cmap="viridis")
    cell = fig1.axes[1].get_images()[0].get_array()
    up = torch.nn.functional.interpolate(maps["tokentm"][:1, None], size=(160, 160), mode="bilinear",
                                         align_corners=False)[0, 0]
    top = np.unravel_index(int(up.argmax()), (160, 160))
    np.testing.assert_allclose(cell[top], matplotlib.colormaps["viridis"](1.0)[:3], atol=1e-6)
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
    assert "every value 0" in msgs[0] and "without heat" in msgs[0]
    with pytest.warns(ConstantMapWarning, match=r"legrad: the map of 'x\.png' is constant \(every value 2\.5\)"):
        save_overlay(images[0], torch.full((4, 4), 2.5), tmp_path / "o.png", method="legrad", image_name="x.png")
    # no warning for maps that vary
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantMapWarning)
        save_grid(images, {"tokentm": maps["tokentm"]}, tmp_path / "ok.png")
        save_overlay(images[0], maps["tokentm"][0], tmp_path / "ok1.png", method="tokentm")


# ----------------------------------------------------------------------------- issue 26: signed maps, blending, curves
def _rgb(name, x):
    import matplotlib

    return np.asarray(matplotlib.colormaps[name](x))[..., :3]


def _lut_step(name):
    """The largest colour change between neighbouring entries of the colormap's table (the tolerance of a
    lookup that may fall on the next entry)."""
    lut = _rgb(name, np.linspace(0.0, 1.0, 256))
    return float(np.abs(np.diff(lut, axis=0)).max())


def test_signed_colours_are_centred_at_zero_and_mirrored():
    from matplotlib.colors import to_rgb

    from tokentm_fast.visualize import SIGNED_CMAP, map_colors

    m = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5])
    colors, weight = map_colors(m, signed=True)
    # 0 is the neutral centre: achromatic, ColorBrewer RdBu's middle colour #f7f7f7; no opacity there
    assert SIGNED_CMAP == "RdBu_r"
    np.testing.assert_allclose(colors[2], to_rgb("#f7f7f7"), atol=1e-6)
    assert np.ptp(colors[2]) < 1e-6 and weight[2] == 0.0
    # symmetric limits ±max|m| = ±2: v sits at 0.5 + v / 4 of the colormap, -v at the mirrored 0.5 - v / 4
    step = _lut_step("RdBu_r")
    for i, pos in ((0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (5, 0.625)):
        np.testing.assert_allclose(colors[i], _rgb("RdBu_r", pos), atol=step)
    np.testing.assert_allclose(weight, [1.0, 0.5, 0.0, 0.5, 1.0, 0.25], atol=1e-7)
    assert colors[3][0] > colors[3][2] and colors[1][2] > colors[1][0]  # + red, - blue
    # a map that is only positive is not min-max normalised: its smallest value is not drawn as "against"
    pos_only, w = map_colors(np.array([0.5, 1.0]), signed=True)
    np.testing.assert_allclose(pos_only[0], _rgb("RdBu_r", 0.75), atol=step)
    assert pos_only[0][0] > pos_only[0][2] and w[0] == pytest.approx(0.5)
    # exactly mirrored with a colormap whose halves are mirror images (bwr: blue - white - red, R and B swapped)
    c, _ = map_colors(np.array([-3.0, -1.7, -0.4, 0.0, 0.4, 1.7, 3.0]), signed=True, cmap="bwr")
    np.testing.assert_array_equal(c[3], [1.0, 1.0, 1.0])
    for k in range(3):
        np.testing.assert_allclose(c[6 - k], c[k][::-1], atol=1e-7)
        assert not np.allclose(c[6 - k], c[k])


def test_the_one_sided_path_is_unchanged_for_unsigned_methods():
    from tokentm_fast.methods import REGISTRY
    from tokentm_fast.visualize import is_signed_method, map_colors

    g = torch.Generator().manual_seed(4)
    m = torch.randn(12, 12, generator=g)
    colors, weight = map_colors(m)
    a = m.numpy()
    n = (a - a.min()) / (a.max() - a.min())
    np.testing.assert_allclose(colors, _rgb("inferno", n), atol=1e-6)
    np.testing.assert_allclose(weight, n, atol=1e-6)
    img = torch.rand(3, 12, 12, generator=g)
    expected = (1 - 0.8 * n[..., None]) * img.permute(1, 2, 0).numpy() + 0.8 * n[..., None] * _rgb("inferno", n)
    for name in [k for k, spec in REGISTRY.items() if not spec.signed] + [None, "not_a_method"]:
        assert not is_signed_method(name)
        np.testing.assert_allclose(overlay(img, m, method=name, alpha=0.8), expected, atol=1e-6)
    assert is_signed_method("lrp") and is_signed_method("attcat") and is_signed_method("conservative_lrp")
    # a signed method's map is drawn otherwise
    assert np.abs(overlay(img, m, method="lrp", alpha=0.8) - expected).max() > 0.1


def test_overlay_blends_by_relevance():
    """Opacity alpha * weight per pixel: a region without relevance shows the image unchanged."""
    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 16, 16, generator=g)
    base = img.permute(1, 2, 0).numpy()
    m = torch.zeros(16, 16)  # the map at the image's size (no interpolation between its cells)
    m[2:6, 9:14] = 3.0
    m[10:14, 9:14] = -1.5
    for method in ("lrp", "tokentm"):  # signed (|m|) and one-sided (min-max: 0 is not the minimum here)
        ov = overlay(img, m, method=method, alpha=0.9)
        assert np.abs(ov[2:6, 9:14] - base[2:6, 9:14]).max(-1).min() > 0.05  # relevant pixels are tinted
    signed = overlay(img, m, method="lrp", alpha=0.9)
    np.testing.assert_allclose(signed[:, :8], base[:, :8], atol=1e-6)  # zero relevance: the image
    # at the largest |m| the opacity is alpha: 0.1 image + 0.9 colormap end; at -1.5 (half) 0.45
    np.testing.assert_allclose(signed[3, 10], 0.1 * base[3, 10] + 0.9 * _rgb("RdBu_r", 1.0), atol=1e-6)
    np.testing.assert_allclose(signed[11, 10], 0.55 * base[11, 10] + 0.45 * _rgb("RdBu_r", 0.25),
                               atol=0.45 * _lut_step("RdBu_r") + 1e-6)
    # one-sided: the minimum (-1.5) is the image unchanged, zero (a third of the range) gets opacity 0.3
    one = overlay(img, m, method="tokentm", alpha=0.9)
    np.testing.assert_allclose(one[11, 10], base[11, 10], atol=1e-6)
    np.testing.assert_allclose(one[0, 0], 0.7 * base[0, 0] + 0.3 * _rgb("inferno", 1 / 3), atol=1e-6)
    with pytest.raises(TypeError, match="signed must be"):
        overlay(img, m, signed="yes")
    with pytest.raises(ValueError, match="unknown colormap"):
        overlay(img, m, method="lrp", signed_cmap="no_such_map")


def test_grid_draws_signed_columns_with_their_own_centred_colour_bar():
    from tokentm_fast.visualize import NORMALIZATION_NOTE, SIGNED_NOTE, grid_figure

    g = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, 16, 16, generator=g)
    lrp = torch.randn(2, 4, 4, generator=g)
    assert (lrp < 0).any() and (lrp > 0).any()
    maps = {"tokentm": torch.rand(2, 4, 4, generator=g), "lrp": lrp}
    fig = grid_figure(images, maps, alpha=1.0)
    bars = {ax._colorbar.cmap.name: ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None}
    assert sorted(bars) == ["RdBu_r", "inferno"]
    assert (bars["RdBu_r"].vmin, bars["RdBu_r"].vmax) == (-1.0, 1.0)
    assert (bars["inferno"].vmin, bars["inferno"].vmax) == (0.0, 1.0)
    centre = bars["RdBu_r"].cmap(bars["RdBu_r"].norm(0.0))[:3]
    assert np.ptp(centre) < 1e-6 and min(centre) > 0.9  # the bar's 0 is the neutral light grey
    text = _texts(fig)
    assert NORMALIZATION_NOTE in text and SIGNED_NOTE.format(methods="lrp") in text.replace("\n", " ")
    # the lrp cell: its most negative pixel is the diverging map's blue end (was inferno after min-max)
    cell = fig.axes[2].get_images()[0].get_array()
    up = torch.nn.functional.interpolate(lrp[:1, None], size=(160, 160), mode="bilinear", align_corners=False)[0, 0]
    low = np.unravel_index(int(up.argmin()), (160, 160))
    expected = _rgb("RdBu_r", 0.5 + 0.5 * float(up.min() / up.abs().max()))
    np.testing.assert_allclose(cell[low], expected * float(up.min().abs() / up.abs().max())
                               + images[0].permute(1, 2, 0).numpy()[low[0] // 10, low[1] // 10]
                               * (1 - float(up.min().abs() / up.abs().max())), atol=_lut_step("RdBu_r"))
    assert cell[low][2] > cell[low][0]  # blue
    # only signed columns: only the signed bar; ``signed=`` chooses the columns by hand
    only = grid_figure(images, {"lrp": lrp})
    assert [ax._colorbar.cmap.name for ax in only.axes if getattr(ax, "_colorbar", None) is not None] == ["RdBu_r"]
    assert NORMALIZATION_NOTE not in _texts(only)
    forced = grid_figure(images, {"mine": lrp}, signed=["mine"])
    assert [ax._colorbar.cmap.name for ax in forced.axes if getattr(ax, "_colorbar", None) is not None] == ["RdBu_r"]
    with pytest.raises(ValueError, match="not columns of the grid"):
        grid_figure(images, {"mine": lrp}, signed=["lrp"])


def test_signed_overlay_figure_has_a_centred_bar_that_fits():
    from tokentm_fast.visualize import overlay_figure

    g = torch.Generator().manual_seed(7)
    img, m = torch.rand(3, 40, 50, generator=g), torch.randn(4, 4, generator=g)
    fig = overlay_figure(img, m, method="lrp")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    cb = next(ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None)._colorbar
    assert cb.cmap.name == "RdBu_r" and (cb.vmin, cb.vmax) == (-1.0, 1.0)
    labels = [t for t in cb.ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["−max|map|", "0", "+max|map|"]
    for t in labels:  # inside the figure, not cut off at its right edge
        assert t.get_window_extent(r).x1 <= fig.bbox.x1 + 0.5
    unsigned = overlay_figure(img, m, method="tokentm")
    cb = next(ax for ax in unsigned.axes if getattr(ax, "_colorbar", None) is not None)._colorbar
    assert cb.cmap.name == "inferno" and (cb.vmin, cb.vmax) == (0.0, 1.0)


def _eleven_curves(names):
    rng = np.random.default_rng(0)
    return {n: {"positive_predicted": list(np.sort(rng.random(10))[::-1]),
                "negative_predicted": list(np.sort(rng.random(10))[::-1])} for n in names}


def test_curves_have_one_colour_per_method_in_every_plot():
    from matplotlib.colors import to_rgb

    from tokentm_fast import METHODS
    from tokentm_fast.visualize import curve_style, perturbation_curves_figure

    assert len(METHODS) == 11
    fig = perturbation_curves_figure(_eleven_curves(METHODS))
    for ax in fig.axes:
        colours = {line.get_label(): to_rgb(line.get_color()) for line in ax.get_lines()}
        assert sorted(colours) == sorted(METHODS) and len(set(colours.values())) == 11
    assert curve_style("tokentm")["color"] != curve_style("transformer_attribution")["color"]
    # the same colour for a method in another plot, whatever the other methods and their order
    subset = ["transformer_attribution", "lrp", "tokentm"]
    other = perturbation_curves_figure(_eleven_curves(subset))
    for ax, ax_all in zip(other.axes, fig.axes):
        full = {line.get_label(): line.get_color() for line in ax_all.get_lines()}
        assert {line.get_label(): line.get_color() for line in ax.get_lines()} == {n: full[n] for n in subset}
    # names outside the registry still plot, with a line style no registered method uses
    extra = perturbation_curves_figure(_eleven_curves([*METHODS, "my_method"]))
    assert len(extra.axes[0].get_lines()) == 12 and curve_style("my_method")["linestyle"] != "-"
    assert curve_style("my_method") == curve_style("my_method")


def test_curves_legend_lies_outside_the_axes():
    from tokentm_fast import METHODS
    from tokentm_fast.visualize import perturbation_curves_figure

    fig = perturbation_curves_figure(_eleven_curves(METHODS), title="t")
    fig.canvas.draw()  # Agg canvas
    r = fig.canvas.get_renderer()
    legend = fig.legends[0]
    box = legend.get_window_extent(r)
    assert len(legend.get_texts()) == 11 and "AUC pos." in legend.get_texts()[0].get_text()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(r)), (box, ax.get_window_extent(r))
    fb = fig.bbox
    assert box.x0 >= fb.x0 and box.x1 <= fb.x1 + 0.5 and box.y0 >= fb.y0 - 0.5 and box.y1 <= fb.y1 + 0.5
    assert not [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]  # none inside a panel
