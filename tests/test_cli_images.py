"""Issue 15, items 4, 5 and ``--save-maps``: how ``explain`` reads, preprocesses and draws images.

* 16-bit PNGs are rescaled by their bit depth (not clipped to white), in
  ``explain`` and in the evaluation's data sources (one code path);
* the preprocessing (resize, centre crop, original size -> model size) is said
  once on stderr, per image on stdout and in the results JSON; ``--resize``
  resizes the whole image;
* overlays are drawn at the image's own size with the map on the region the
  model saw, with a colour bar and the normalisation note; the note of a narrow
  grid lies inside the figure;
* ``--save-maps`` writes the raw maps, equal to ``tokentm_fast.explain``.
"""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image


def _png16_rgb(arr, path):
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _gradient16(h=64, w=64):
    return np.round(np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


# ----------------------------------------------------------------------------- 16-bit images (item 4)
def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    from tokentm_fast.evaluation.data import load_image

    g16 = _gradient16()
    p = tmp_path / "g16.png"
    Image.fromarray(g16).save(p)
    assert Image.open(p).mode in ("I;16", "I")  # really a 16-bit picture for PIL
    rgb = np.asarray(load_image(p))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(g16 / 65535.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)  # by the bit depth: 65535 -> 255, 32768 -> 128
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") makes 99 % of it white
    # 16-bit RGB: PIL gives 8-bit RGB already scaled; it stays so
    rgb16 = np.stack([g16, g16[::-1], np.full_like(g16, 30000)], axis=-1)
    p3 = tmp_path / "rgb16.png"
    _png16_rgb(rgb16, p3)
    x = np.asarray(load_image(p3)).astype(int)
    assert np.abs(x - np.round(rgb16 / 257.0)).max() <= 1


def test_sixteen_bit_image_is_explained_as_its_eight_bit_version(tmp_path, run_main):
    g16 = _gradient16()
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(np.round(g16 / 65535.0 * 255.0).astype(np.uint8)).convert("RGB").save(tmp_path / "g8.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "white.png")
    rc, _, err = run_main(["explain", tmp_path / "g16.png", tmp_path / "g8.png", tmp_path / "white.png",
                           "--model", "synthetic", "--methods", "tokentm", "--out", tmp_path / "o",
                           "--save-maps", tmp_path / "maps.npz", "--threads", "1"])
    assert rc == 0, err
    maps = np.load(tmp_path / "maps.npz")["tokentm"]
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-6 * float(np.abs(maps[1]).max()))
    assert np.abs(maps[0] - maps[2]).max() > 1e-3 * float(np.abs(maps[2]).max())  # not the white image


def test_folder_source_reads_sixteen_bit_like_explain(tmp_path):
    from tokentm_fast.evaluation.data import FolderSource

    (tmp_path / "c").mkdir()
    Image.fromarray(_gradient16()).save(tmp_path / "c" / "g16.png")
    pil, _, _ = FolderSource(tmp_path).load(0)
    assert pil.mode == "RGB" and (np.asarray(pil) == 255).mean() < 0.01


# ----------------------------------------------------------------------------- preprocessing (item 4)
def _tiny_cfg(**kw):
    cfg = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.9, crop_mode="center",
               mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("cfg", [_tiny_cfg(), _tiny_cfg(input_size=(3, 32, 48), interpolation="bilinear"),
                                 _tiny_cfg(crop_pct=1.0, interpolation="bilinear"), _tiny_cfg(crop_mode="squash")])
@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_preprocess_plan_is_what_the_transform_does(cfg, mode):
    """``plan`` (used to describe the preprocessing and to place the map) against the transform itself."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import functional as TF

    from tokentm_fast.evaluation.data import Preprocess

    pre = Preprocess(cfg, mode)
    rng = np.random.default_rng(0)
    for h, w in [(40, 50), (50, 40), (64, 4000), (30, 30), (32, 32), (17, 91)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _, x01, _ = pre(im)
        p = pre.plan(w, h)
        assert p["original"] == (h, w) and p["model"] == tuple(cfg["input_size"][1:])
        (rh, rw), (top, left), (mh, mw) = p["resized"], p["crop"], p["model"]
        y = TF.crop(TF.resize(im, [rh, rw], interpolation=str_to_interp_mode(cfg["interpolation"])), top, left, mh, mw)
        y = torch.from_numpy(np.array(y)).permute(2, 0, 1).float() / 255
        assert torch.equal(y, x01), (cfg, mode, h, w, p)
        x0, y0, x1, y1 = p["box"]
        if mode == "resize":
            assert (x0, y0, x1, y1) == (0.0, 0.0, w, h)
        else:
            assert -1e-9 <= x0 < x1 <= w + 1e-9 and -1e-9 <= y0 < y1 <= h + 1e-9
            if cfg["crop_mode"] == "center":  # the centre crop keeps the aspect ratio (up to the pixel rounding)
                assert (x1 - x0) / (y1 - y0) == pytest.approx(mw / mh, rel=0.1)


def test_explain_says_the_preprocessing_and_resize_changes_it(tmp_path, run_main):
    from tokentm_fast import explain
    from tokentm_fast.evaluation.data import Preprocess, model_data_config
    from tokentm_fast.synthetic import create_synthetic_vit

    rng = np.random.default_rng(1)
    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    Image.fromarray(rng.integers(0, 256, (40, 120, 3), dtype=np.uint8)).save(wide)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(square)
    common = [square, wide, "--model", "synthetic", "--methods", "rollout", "--threads", "1"]
    rc, out, err = run_main(["explain", *common, "--out", tmp_path / "crop", "--save-maps", tmp_path / "c.npz"])
    assert rc == 0, err
    said = [ln for ln in err.splitlines() if "preprocessing" in ln]
    assert len(said) == 1, err  # once, on the first image that is changed
    assert "wide.png" in said[0] and "120×40" in said[0] and "64×64" in said[0] and "crop" in said[0]
    assert "wide.png: predicted" in out and "120×40 px resized and centre-cropped to 64×64" in out
    assert "square.png: predicted" in out and "square.png: predicted" in out.splitlines()[0]
    assert "64×64 px" not in out.splitlines()[0]  # the square image of the model's size: nothing done

    rc, out, err = run_main(["explain", *common, "--out", tmp_path / "resize", "--resize",
                             "--save-maps", tmp_path / "r.npz"])
    assert rc == 0, err
    said = [ln for ln in err.splitlines() if "preprocessing" in ln]
    assert len(said) == 1 and "120×40 px resized to the model's 64×64" in said[0] and "aspect" in said[0]
    assert "120×40 px resized to 64×64" in out
    crop, resized = np.load(tmp_path / "c.npz"), np.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(crop["rollout"][0], resized["rollout"][0])  # the square one: the same
    assert np.abs(crop["rollout"][1] - resized["rollout"][1]).max() > 0  # the wide one: another input
    np.testing.assert_allclose(resized["boxes"][1], [0, 0, 120, 40])
    np.testing.assert_allclose(crop["boxes"][1], [40, 0, 80, 40])  # the centre 40 x 40 square of 120 x 40
    # the resized input is the whole picture at the model's size
    model = create_synthetic_vit()
    pre = Preprocess(model_data_config(model), "resize")
    x = pre(Image.open(wide).convert("RGB"))[0][None]
    torch.testing.assert_close(torch.from_numpy(resized["rollout"][1:]), explain(model, x, method="rollout"))
    info = json.loads(str(resized["info"]))
    assert info["preprocessing"].startswith("resize")
    assert json.loads(str(crop["info"]))["preprocessing"].startswith("crop")


def test_evaluate_records_the_preprocessing(tmp_path):
    from tokentm_fast.evaluation import evaluate

    common = dict(methods=["raw_attention"], metrics="segmentation", size=2, batch_size=2, progress=False,
                  num_workers=0)
    crop = evaluate("synthetic", "synthetic", output=tmp_path / "c.json", **common)
    resized = evaluate("synthetic", "synthetic", output=tmp_path / "r.json", preprocess="resize", **common)
    for res, path, word in ((crop, "c.json", "crop"), (resized, "r.json", "resize")):
        assert res["preprocessing"].startswith(word)
        assert json.loads((tmp_path / path).read_text())["preprocessing"] == res["preprocessing"]
    assert crop["fingerprint"] != resized["fingerprint"]  # a partial state of one does not resume the other
    with pytest.raises(ValueError, match="preprocess must be one of"):
        evaluate("synthetic", "synthetic", output=None, preprocess="stretch", **common)


# ----------------------------------------------------------------------------- overlays at the image's size
def _note_inside(fig):
    from tokentm_fast.visualize import NOTE_GID

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    notes = fig.findobj(lambda a: a.get_gid() == NOTE_GID)
    assert len(notes) == 1
    bb = notes[0].get_window_extent(r)
    fb = fig.bbox
    assert bb.width > 0.3 * fb.width  # a real, visible note
    assert bb.x0 >= fb.x0 - 0.5 and bb.x1 <= fb.x1 + 0.5 and bb.y0 >= fb.y0 - 0.5 and bb.y1 <= fb.y1 + 0.5, (bb, fb)
    lowest_axes = min(ax.get_window_extent(r).y0 for ax in fig.axes)
    assert bb.y1 <= lowest_axes + 0.5, (bb, lowest_axes)  # below the cells, not over them
    return notes[0]


@pytest.mark.parametrize("n_methods", [0, 1, 2, 5])
@pytest.mark.parametrize("dpi", [100, 110])
def test_grid_note_lies_inside_the_figure(n_methods, dpi):
    from tokentm_fast.visualize import NORMALIZATION_NOTE, grid_figure

    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 16, 16, generator=g)
    maps = {f"m{i}": torch.randn(1, 4, 4, generator=g) for i in range(n_methods)}
    fig = grid_figure(images, maps)
    fig.set_dpi(dpi)
    note = _note_inside(fig)
    assert NORMALIZATION_NOTE in note.get_text()


@pytest.mark.parametrize("hw", [(40, 50), (120, 30), (30, 400), (300, 300)])
def test_overlay_is_drawn_at_the_image_size_with_colour_bar_and_note(hw):
    import matplotlib

    from tokentm_fast.visualize import NORMALIZATION_NOTE, normalize_map, overlay_figure

    h, w = hw
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, h, w, generator=g)
    m = torch.randn(4, 4, generator=g)
    box = (w * 0.25, 0.0, w * 0.75, float(h))  # the model saw the middle half
    fig = overlay_figure(img, m, box=box, cmap="gray", alpha=1.0)
    note = _note_inside(fig)
    assert NORMALIZATION_NOTE.split(":")[0] in note.get_text().replace("\n", " ")
    assert "dashed frame" in note.get_text().replace("\n", " ")
    cbars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(cbars) == 1 and cbars[0]._colorbar.cmap.name == "gray"
    ax = next(a for a in fig.axes if a.get_images() and getattr(a, "_colorbar", None) is None)
    picture = ax.get_images()[0].get_array()
    scale = max(1, -(-224 // min(h, w)))
    scale = max(1, min(scale, 4096 // max(h, w)))
    assert picture.shape[:2] == (h * scale, w * scale)  # the original size (enlarged by an integer factor)
    ext = ax.get_window_extent(fig.canvas.get_renderer())
    assert ext.width == pytest.approx(w * scale, abs=1) and ext.height == pytest.approx(h * scale, abs=1)
    # inside the box: the map (gray, alpha 1) upsampled onto the box and blended by relevance,
    # (1 - r) * image + r * r: the image unchanged where the map is lowest (r = 0), pure heat (1) where it
    # is highest (r = 1); outside: the dimmed picture, no heat
    x0, x1 = int(round(w * 0.25 * scale)), int(round(w * 0.75 * scale))
    big = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(picture[:, :x0], 0.35 * big[:, :x0] + 0.325, atol=1e-5)
    heat = picture[:, x0:x1, 0]
    assert heat.max() == pytest.approx(1.0, abs=1e-6)
    assert np.abs(heat - big[:, x0:x1, 0]).min() == pytest.approx(0.0, abs=1e-6)
    spot = torch.zeros(4, 4)
    spot[0, 0] = 1.0  # the hottest patch, top left of the map: top left of the box, not of the picture
    pic = overlay_figure(img, spot, box=box, cmap="gray", alpha=1.0).axes[0].get_images()[0].get_array()
    hot = np.argwhere(pic[..., 0] == pic[:, x0:x1, 0].max())
    assert (hot[:, 1] >= x0).all() and (hot[:, 1] < x0 + (x1 - x0) // 4 + 1).all()
    assert matplotlib.colormaps["gray"](normalize_map(np.array([0.0, 1.0])))[1, 0] == 1.0


def test_explain_writes_overlays_at_the_image_size(tmp_path, run_main):
    rng = np.random.default_rng(2)
    p = tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 256, (300, 90, 3), dtype=np.uint8)).save(p)
    rc, out, err = run_main(["explain", p, "--model", "synthetic", "--methods", "rollout", "--out", tmp_path / "o",
                             "--threads", "1"])
    assert rc == 0, err
    ov = Image.open(tmp_path / "o" / "tall.png_rollout.png")
    # 90 x 300 enlarged 3x (shorter side to >= 224): 270 x 900 px of picture, plus the bar and the note
    assert ov.size[0] > 270 and ov.size[1] > 900
    assert ov.size[1] > ov.size[0]  # tall like the picture, not the model's square
    assert "at the images' own size" in out


# ----------------------------------------------------------------------------- --save-maps
def test_save_maps_holds_the_raw_maps_of_explain(tmp_path, run_main):
    from tokentm_fast import METHODS, explain
    from tokentm_fast.api import Explainer
    from tokentm_fast.evaluation.data import Preprocess, load_image, model_data_config
    from tokentm_fast.synthetic import create_synthetic_vit, save_folder

    files = save_folder(tmp_path / "imgs", "test", 3)
    maps_file = tmp_path / "sub" / "maps.npz"
    rc, out, err = run_main(["explain", *files, "--model", "synthetic", "--out", tmp_path / "o", "--save-maps",
                             maps_file, "--threads", "1", "--backend", "torch"])
    assert rc == 0, err
    assert f"raw maps: {maps_file}" in out
    model = create_synthetic_vit()
    pre = Preprocess(model_data_config(model))
    x = torch.stack([pre(load_image(f))[0] for f in files])
    with np.load(maps_file, allow_pickle=False) as d:
        assert list(d["methods"]) == list(METHODS)
        assert list(d["image_names"]) == [f.name for f in files]
        assert list(d["image_paths"]) == [str(f) for f in files]
        info = json.loads(str(d["info"]))
        with torch.no_grad():
            pred = model(x).argmax(1)
        assert d["predicted"].tolist() == pred.tolist() == d["explained"].tolist()
        for m in METHODS:
            a = d[m]
            assert a.dtype == np.float32 and a.shape == (3, 8, 8)
            ref = explain(model, x, method=m, backend="torch").numpy()
            np.testing.assert_array_equal(a, ref)  # the same computation, bit for bit
            assert np.abs(ref).max() > 0
            assert info["method_options"][m] == json.loads(json.dumps(Explainer(model, method=m).options))
    assert info["backend"] == "torch" and info["model"]["name"] == "synthetic"
    assert info["preprocessing"].startswith("crop")
    rc, _, err = run_main(["explain", files[0], "--model", "synthetic", "--methods", "rollout", "--out",
                           tmp_path / "o2", "--save-maps", tmp_path / "maps.txt"])
    assert rc == 2 and "--save-maps" in err and ".npz" in err
