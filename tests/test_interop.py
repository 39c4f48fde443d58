"""tokentm_fast/interop.py: output options of explain (upsample, normalize) and the Quantus / Captum-style
entry points; ``TokenTMAttribution.attribute(..., additional_forward_args=...)`` as Captum has it (issue 15):
None or empty is accepted (same maps), non-empty is refused with a clear message, not silently dropped."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokentm_fast as tf
from tokentm_fast.api import minmax_normalize
from tokentm_fast.interop import TokenTMAttribution, explain_func


@pytest.fixture(scope="module")
def vit(make_model, make_images):
    """A non-square tiny ViT (32 x 48 images, a 4 x 6 grid): H and W cannot be swapped unnoticed."""
    model = make_model("timm_narrow", img_size=(32, 48), depth=2, num_classes=4, head_scale=10.0)
    return model, make_images(batch=3, size=(32, 48))


def _spread(maps):
    flat = maps.reshape(maps.shape[0], -1)
    return flat.amax(1) - flat.amin(1)


# --------------------------------------------------------------------------- explain options


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_upsample_is_bilinear_to_the_input_size(vit, method):
    model, images = vit
    grid = tf.explain(model, images, method, target=1)
    assert grid.shape == (3, 4, 6) and (_spread(grid) > 0).all()
    up = tf.explain(model, images, method, target=1, upsample=True)
    assert up.shape == (3, 32, 48) and up.dtype == torch.float32
    torch.testing.assert_close(up, F.interpolate(grid[:, None], size=(32, 48), mode="bilinear",
                                                 align_corners=False)[:, 0])
    # bilinear between patch centres: every pixel lies within the range of its image's grid values
    assert (up.flatten(1).amin(1) >= grid.flatten(1).amin(1) - 1e-7).all()
    assert (up.flatten(1).amax(1) <= grid.flatten(1).amax(1) + 1e-7).all()


@pytest.mark.parametrize("upsample", [False, True])
def test_normalize_is_per_image_min_max(vit, upsample):
    model, images = vit
    raw = tf.explain(model, images, "gae", target=2, upsample=upsample)
    e = tf.explain(model, images, "gae", target=2, upsample=upsample, normalize=True)
    assert e.shape == raw.shape
    flat, rflat = e.flatten(1), raw.flatten(1)
    assert (_spread(raw) > 0).all()
    torch.testing.assert_close(flat.amin(1), torch.zeros(3))
    torch.testing.assert_close(flat.amax(1), torch.ones(3))
    lo, hi = rflat.amin(1, keepdim=True), rflat.amax(1, keepdim=True)
    torch.testing.assert_close(flat, (rflat - lo) / (hi - lo))


def test_normalize_constant_map_is_zero_not_nan():
    maps = torch.stack([torch.full((2, 3), 5.0), torch.arange(6.0).reshape(2, 3)])
    out = minmax_normalize(maps)
    assert torch.equal(out[0], torch.zeros(2, 3))
    torch.testing.assert_close(out[1], torch.arange(6.0).reshape(2, 3) / 5)


def test_output_options_are_checked(vit):
    model, images = vit
    with pytest.raises(ValueError, match="upsample=True.*full=True"):
        tf.explain(model, images, "tokentm", full=True, upsample=True)
    with pytest.raises(TypeError, match="upsample must be True or False"):
        tf.explain(model, images, "tokentm", upsample="input")
    with pytest.raises(TypeError, match="normalize must be True or False"):
        tf.Explainer(model, normalize=1)


# --------------------------------------------------------------------------- Quantus convention


def test_explain_func_numpy_in_numpy_out(vit):
    model, images = vit
    expected = tf.explain(model, images, "legrad", target=torch.tensor([0, 3, 1]), upsample=True)
    x = images.numpy().astype(np.float64)                  # Quantus perturbations are often float64
    a = explain_func(model, x, np.array([0, 3, 1]), method="legrad", device="cpu")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (3, 1, 32, 48)
    np.testing.assert_allclose(a[:, 0], expected.numpy(), rtol=1e-6, atol=0)
    # torch in, list targets, (B, H, W) out
    b = explain_func(model, images, [0, 3, 1], method="legrad", channel=False)
    assert b.shape == (3, 32, 48)
    np.testing.assert_allclose(b, expected.numpy(), rtol=1e-6, atol=0)


def test_explain_func_kwargs(vit):
    model, images = vit
    x = images.numpy()
    for targets in (2, np.int64(2), np.array([2, 2, 2]), torch.tensor([2, 2, 2])):
        a = explain_func(model, x, targets, method="tokentm", backend="reference", normalize=True)
        e = tf.explain(model, images, "tokentm", target=2, backend="reference", upsample=True, normalize=True)
        np.testing.assert_allclose(a[:, 0], e.numpy(), rtol=1e-6, atol=1e-7)
    a = explain_func(model, x, None, method="rollout", start_layer=1)
    np.testing.assert_allclose(a[:, 0], tf.explain(model, images, "rollout", start_layer=1, upsample=True).numpy(),
                               rtol=1e-6)
    a = explain_func(model, x, tf.targets.class_logit(1), method="gae")
    np.testing.assert_allclose(a[:, 0], tf.explain(model, images, "gae", target=1, upsample=True).numpy(),
                               rtol=1e-6)


def test_explain_func_errors(vit):
    model, images = vit
    with pytest.raises(ValueError, match="device='cuda:1' but the model is on cpu"):
        explain_func(model, images.numpy(), None, device="cuda:1")
    with pytest.raises(TypeError, match="floating point array"):
        explain_func(model, images.numpy().astype(np.int64), None)
    with pytest.raises(TypeError, match="integer class indices"):
        explain_func(model, images.numpy(), np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown method"):
        explain_func(model, images.numpy(), None, method="magic")


def test_explain_func_unwraps_a_model_wrapper(vit):
    model, images = vit

    class Wrapper:  # the shape of Quantus' ModelInterface: get_model() returns the torch module
        def get_model(self):
            return model

    np.testing.assert_array_equal(explain_func(Wrapper(), images.numpy(), 1), explain_func(model, images.numpy(), 1))


# --------------------------------------------------------------------------- Captum-style class


def test_tokentm_attribution(vit):
    model, images = vit
    attr = TokenTMAttribution(model, method="tokentm", head_fusion="decoupled")
    out = attr.attribute(images, target=[1, 0, 3])
    assert out.shape == (3, 1, 32, 48) and out.dtype == torch.float32
    expected = tf.explain(model, images, "tokentm", target=torch.tensor([1, 0, 3]), head_fusion="decoupled",
                          upsample=True)
    torch.testing.assert_close(out[:, 0], expected)
    norm = attr.attribute(images, target=torch.tensor([1, 0, 3]), normalize=True)
    torch.testing.assert_close(norm[:, 0], minmax_normalize(expected))
    assert (out * images).shape == images.shape                     # broadcasts against the inputs
    assert attr.has_convergence_delta() is False and attr.forward_func is model
    with pytest.raises(TypeError, match="torch.Tensor"):
        attr.attribute(images.numpy())


@pytest.fixture(scope="module")
def tiny_vit(make_model):
    """timm vit_tiny on 32x32 images, 2 blocks, 5 classes."""
    return make_model("timm_tiny").eval()


def test_empty_forward_args_give_the_same_maps(tiny_vit, make_images):
    x = make_images()
    attr = TokenTMAttribution(tiny_vit, backend="torch")
    want = attr.attribute(x, target=1)
    assert want.shape == (2, 1, 32, 32) and want.abs().max() > 0
    for args in (None, (), []):
        assert torch.equal(attr.attribute(x, target=1, additional_forward_args=args), want)
    assert torch.equal(attr.attribute(x, 1, None), want)       # Captum's positional order


@pytest.mark.parametrize("args", [(torch.ones(1),), [0.5, "x"], torch.ones(2)])
def test_non_empty_forward_args_are_refused(tiny_vit, images, args):
    attr = TokenTMAttribution(tiny_vit, backend="torch")
    with pytest.raises(ValueError, match=r"additional_forward_args: VisionTransformer .*images only"):
        attr.attribute(images, target=1, additional_forward_args=args)


# --------------------------------------------------------------------------- a real Quantus metric


def _synthetic_batch(n=12):
    from tokentm_fast.synthetic import MEAN, STD, generate_arrays

    x_u8, masks, labels = generate_arrays("test", n)
    mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(STD, dtype=np.float32)[:, None, None]
    return (x_u8.astype(np.float32) / 255.0 - mean) / std, masks, labels


def test_quantus_pointing_game_on_the_shipped_model():
    quantus = pytest.importorskip("quantus")
    from tokentm_fast.evaluation.runner import load_model

    model, _ = load_model("synthetic")
    x, masks, y = _synthetic_batch()
    s = masks[:, None].astype(np.float32)

    def pointing_game(explain, **kwargs):
        metric = quantus.PointingGame(normalise=False, disable_warnings=True, display_progressbar=False)
        return np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=s, explain_func=explain,
                                 explain_func_kwargs=kwargs, device="cpu"), dtype=float)

    hits = pointing_game(explain_func, method="tokentm")
    # Quantus scored our maps: the same hits computed here from explain's own maps
    e = tf.explain(model, torch.from_numpy(x), "tokentm", target=torch.from_numpy(y), upsample=True).numpy()
    at_max = e.reshape(len(x), -1) == e.reshape(len(x), -1).max(1, keepdims=True)
    np.testing.assert_array_equal(hits, (at_max & masks.reshape(len(x), -1)).any(1).astype(float))
    # and they localise the shape: far above a random explanation on the same images
    assert hits.mean() >= 0.75

    def random_explain(model, inputs, targets, **kwargs):
        rng = np.random.default_rng(0)
        return rng.random((inputs.shape[0], 1) + inputs.shape[2:]).astype(np.float32)

    assert pointing_game(random_explain).mean() <= 0.5


# --------------------------------------------------------------------------- the README examples


def test_readme_section_runs():
    """The examples of README's "Using tokentm_fast from other libraries" run as written."""
    import re
    from pathlib import Path

    pytest.importorskip("quantus")
    pytest.importorskip("open_clip")
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using tokentm_fast from other libraries", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    ns = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), ns)   # noqa: S102 - our own documentation
    torch.testing.assert_close(ns["a"], ns["b"])                # the callable and the integer target agree
    assert ns["d"].shape == ns["e"].shape == (2, 4, 4)
    assert ns["maps"].shape == (2, 64, 64) and float(ns["maps"].min()) == 0.0 and float(ns["maps"].max()) == 1.0
    assert len(ns["hits"]) == 8 and ns["attr"].shape == (8, 1, 64, 64)
