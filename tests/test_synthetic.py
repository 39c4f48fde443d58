"""Tests of the synthetic localization benchmark and its shipped model."""
from __future__ import annotations

import colorsys
import hashlib
import json

import numpy as np
import pytest
import torch

from tokentm_fast.synthetic import shapes
from tokentm_fast.synthetic.shapes import (
    CLASS_NAMES,
    DISTRACTOR_NAMES,
    SyntheticShapes,
    generate,
    generate_arrays,
    generate_uint8,
    rasterize,
    render,
    sample_params,
    save_folder,
)


# --------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------
def test_classes_and_labels():
    assert len(CLASS_NAMES) >= 6
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert not set(CLASS_NAMES) & set(DISTRACTOR_NAMES)
    labels = [generate_uint8("val", i)[2] for i in range(2 * len(CLASS_NAMES))]
    assert sorted(set(labels)) == list(range(len(CLASS_NAMES)))
    for i in range(len(CLASS_NAMES) * 2):
        assert sample_params("val", i)["object"]["kind"] == CLASS_NAMES[labels[i]]


def test_sample_format():
    img, mask, label = generate("test", 3)
    assert img.shape == (3, 64, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert isinstance(label, int) and 0 <= label < len(CLASS_NAMES)
    u8, mask2, label2 = generate_uint8("test", 3)
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8.astype(np.float32) / 255.0, img)
    np.testing.assert_array_equal(mask, mask2)
    assert label == label2
    # other image sizes work, shapes scale with the image
    img96, mask96, _ = generate("test", 3, image_size=96)
    assert img96.shape == (3, 96, 96) and mask96.shape == (96, 96) and mask96.any()


def test_determinism_and_random_access():
    a = generate_uint8("test", 17, seed=0)
    # generate lots of other samples / splits in between
    for split in ("train", "val", "test"):
        for i in range(5):
            generate_uint8(split, i, seed=0)
    np.random.seed(123)  # global numpy state must not matter
    torch.manual_seed(5)
    b = generate_uint8("test", 17, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    # array generation == per-index generation, with any start offset
    xs, ms, ys = generate_arrays("test", 4, seed=0, start=15)
    np.testing.assert_array_equal(xs[2], a[0])
    np.testing.assert_array_equal(ms[2], a[1])
    assert ys[2] == a[2]


def test_splits_and_seeds_differ():
    imgs = {s: generate_uint8(s, 0, seed=0)[0] for s in ("train", "val", "test")}
    assert not np.array_equal(imgs["train"], imgs["val"])
    assert not np.array_equal(imgs["train"], imgs["test"])
    assert not np.array_equal(imgs["val"], imgs["test"])
    assert not np.array_equal(generate_uint8("test", 0, seed=1)[0], imgs["test"])
    with pytest.raises(ValueError):
        generate("holdout", 0)


def test_dataset_matches_generator():
    ds = SyntheticShapes("val", size=10, seed=0)
    assert len(ds) == 10
    x, m, y = ds[4]
    img, mask, label = generate("val", 4, seed=0)
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert m.dtype == torch.bool
    np.testing.assert_array_equal(x.numpy(), img)
    np.testing.assert_array_equal(m.numpy(), mask)
    assert y == label
    x2, y2 = SyntheticShapes("val", 10, return_mask=False)[-6]
    np.testing.assert_array_equal(x2.numpy(), img)
    with pytest.raises(IndexError):
        ds[10]
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    xb, mb, yb = next(iter(loader))
    assert xb.shape == (5, 3, 64, 64) and mb.shape == (5, 64, 64) and yb.shape == (5,)


def test_mask_is_exact():
    """The mask is the object's rasterization, and exactly the pixels of the object colour."""
    for i in range(60):
        p = sample_params("test", i)
        img, mask, label = render(p)
        o = p["object"]
        assert o["kind"] == CLASS_NAMES[label]
        assert mask.any() and not mask.all()
        # re-rasterize the same shape
        again = rasterize(o["kind"], o["cx"], o["cy"], o["r"], o["angle"], p["image_size"])
        np.testing.assert_array_equal(mask, again)
        # the object lies fully inside the image (nothing cut at the border)
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        # mask == set of pixels having the object colour (clutter and background never do)
        color = shapes._to_u8(o["color"])
        same = (img == color[:, None, None]).all(axis=0)
        np.testing.assert_array_equal(same, mask)
        # and the same through the public API
        img2, mask2, _ = generate_uint8("test", i)
        np.testing.assert_array_equal(img2, img)
        np.testing.assert_array_equal(mask2, mask)


def test_clutter_present_and_uninformative():
    n = 400
    obj_hsv, clut_hsv, obj_r, clut_r = [], [], [], []
    clutter_count = np.zeros(len(CLASS_NAMES))
    for i in range(n):
        p = sample_params("train", i)
        assert 1 <= len(p["clutter"]) <= 3
        o = p["object"]
        obj_hsv.append(colorsys.rgb_to_hsv(*o["color"]))
        obj_r.append(o["r"])
        for c in p["clutter"]:
            assert c["kind"] in DISTRACTOR_NAMES and c["kind"] not in CLASS_NAMES
            h = colorsys.rgb_to_hsv(*c["color"])
            clut_hsv.append(h)
            clut_r.append(c["r"])
            # clutter colour differs from the object colour (hue distance >= 60 deg)
            dh = abs(h[0] - obj_hsv[-1][0]) % 1.0
            assert min(dh, 1 - dh) >= 1 / 6 - 1e-6
        clutter_count[p["label"]] += len(p["clutter"])
    obj_hsv, clut_hsv = np.array(obj_hsv), np.array(clut_hsv)
    # same colour distribution: hue histogram (6 bins) and saturation/value moments
    ho = np.histogram(obj_hsv[:, 0], bins=6, range=(0, 1))[0] / len(obj_hsv)
    hc = np.histogram(clut_hsv[:, 0], bins=6, range=(0, 1))[0] / len(clut_hsv)
    assert np.abs(ho - 1 / 6).max() < 0.08 and np.abs(hc - 1 / 6).max() < 0.08
    for k in (1, 2):
        assert abs(obj_hsv[:, k].mean() - clut_hsv[:, k].mean()) < 0.03
        assert abs(obj_hsv[:, k].std() - clut_hsv[:, k].std()) < 0.03
    # same size distribution
    assert abs(np.mean(obj_r) - np.mean(clut_r)) < 0.6
    assert abs(np.std(obj_r) - np.std(clut_r)) < 0.6
    # clutter in every class, about equally often
    per_class = clutter_count / (n / len(CLASS_NAMES))
    assert per_class.min() > 1.5 and per_class.max() < 2.5
    # clutter is visible in the rendered images
    visible = 0
    for i in range(40):
        p = sample_params("train", i)
        img, mask, _ = render(p)
        for c in p["clutter"]:
            cm = rasterize(c["kind"], c["cx"], c["cy"], c["r"], c["angle"], 64, c["extra"])
            visible += int((cm & ~mask).sum() > 5)
            break
    assert visible >= 36


def test_save_folder(tmp_path):
    from PIL import Image

    paths = save_folder(tmp_path / "val", "val", 12, save_masks=True)
    assert len(paths) == 12
    assert sorted(d.name for d in (tmp_path / "val").iterdir()) == sorted(CLASS_NAMES)
    for i, p in enumerate(paths):
        img, mask, label = generate_uint8("val", i)
        assert p.parent.name == CLASS_NAMES[label]
        arr = np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(arr, img)  # PNG round trip is lossless
        m = np.asarray(Image.open(p.with_name(p.stem + "_mask.png"))) > 127
        np.testing.assert_array_equal(m, mask)


# --------------------------------------------------------------------------
# shipped model
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from tokentm_fast.synthetic.model import create_synthetic_vit

    return create_synthetic_vit(pretrained=True)


def test_shipped_files():
    from tokentm_fast.synthetic.model import METADATA_PATH, WEIGHTS_PATH

    assert WEIGHTS_PATH.is_file() and METADATA_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size <= 5 * 1024 * 1024
    meta = json.loads(METADATA_PATH.read_text())
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["command"].startswith("python -m tokentm_fast.synthetic.train")
    assert "--seed" in meta["command"] and isinstance(meta["seed"], int)
    assert meta["val_accuracy"] >= 0.95 and meta["test_accuracy"] >= 0.95
    assert meta["image_size"] == 64 and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3
    assert meta["weights_sha256"] == hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()
    for key in ("torch_version", "timm_version", "train_time_s", "timm_config"):
        assert key in meta


def test_shipped_model_structure(model):
    from timm.data import resolve_data_config
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(model, VisionTransformer)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.cls_token is not None and model.num_prefix_tokens == 1
    assert model.global_pool == "token"
    gh, gw = model.patch_embed.grid_size
    assert gh >= 8 and gw >= 8
    assert model.pos_embed.shape[1] == gh * gw + 1
    assert model.head.out_features == len(CLASS_NAMES)
    cfg = resolve_data_config(model=model)
    assert tuple(cfg["input_size"]) == (3, 64, 64)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)


def test_shipped_model_accuracy(model):
    x, _, y = generate_arrays("test", 320, seed=0)
    x = (torch.from_numpy(x).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        pred = torch.cat([model(x[s:s + 160]).argmax(-1) for s in range(0, len(x), 160)])
    acc = (pred == torch.from_numpy(y)).float().mean().item()
    assert acc >= 0.95, acc


def test_missing_weights_error(tmp_path):
    from tokentm_fast.synthetic.model import create_synthetic_vit, synthetic_data_config

    with pytest.raises(FileNotFoundError, match="synthetic_vit"):
        create_synthetic_vit(weights=tmp_path / "synthetic_vit.safetensors")
    m = create_synthetic_vit(pretrained=False)
    assert m.pretrained_cfg["input_size"] == (3, 64, 64)
    cfg = synthetic_data_config()
    assert cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 64, 64)


# --------------------------------------------------------------------------
# training command
# --------------------------------------------------------------------------
def test_train_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from tokentm_fast.synthetic.train import build_parser, main

    assert "--seed" in build_parser().format_help()
    common = ["--seed", "3", "--epochs", "1", "--batch-size", "16", "--train-size", "48",
              "--val-size", "16", "--test-size", "16", "--threads", "1", "--log-every", "1000"]
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        m1 = main(common + ["--out", str(tmp_path / "a.safetensors")])
        m2 = main(common + ["--out", str(tmp_path / "b.safetensors")])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    a = load_file(str(tmp_path / "a.safetensors"))
    b = load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert m1["weights_sha256"] == m2["weights_sha256"]
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["seed"] == 3 and "--seed 3" in meta["command"]
