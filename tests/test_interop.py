"""tokentm_fast/interop.py: output options of explain (upsample, normalize) and the Quantus / Captum-style
entry points. ``TokenTMAttribution`` follows Captum's conventions (issue 26): a tensor or a tuple in, the same
kind out, attributions shaped like the inputs, Captum's target kinds, ``additional_forward_args`` passed to the
model's forward; Captum's own ``sensitivity_max`` and ``infidelity`` run on it as Captum documents them, their
values checked against the formulas written out here."""
import copy
import warnings

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
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the documented cast to the model's dtype is silent
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


def _like_images(maps, channels):
    """Explain's (B, H, W) maps as Captum's (B, C, H, W): the same map in every channel."""
    return maps[:, None].repeat(1, channels, 1, 1)


def test_tokentm_attribution(vit):
    model, images = vit
    attr = TokenTMAttribution(model, method="tokentm", head_fusion="decoupled")
    out = attr.attribute(images, target=[1, 0, 3])
    assert isinstance(out, torch.Tensor) and out.shape == images.shape == (3, 3, 32, 48)
    assert out.dtype == torch.float32 and (_spread(out) > 0).all()
    expected = tf.explain(model, images, "tokentm", target=torch.tensor([1, 0, 3]), head_fusion="decoupled",
                          upsample=True)
    for c in range(3):                                              # every channel holds the image's map
        torch.testing.assert_close(out[:, c], expected, rtol=0, atol=0)
    norm = attr.attribute(images, target=torch.tensor([1, 0, 3]), normalize=True)
    torch.testing.assert_close(norm, _like_images(minmax_normalize(expected), 3))
    assert attr.has_convergence_delta() is False and attr.forward_func is model


@pytest.mark.parametrize("method", ["tokentm", "legrad", "rollout"])
def test_tuple_in_tuple_out_tensor_in_tensor_out(vit, method):
    """Captum's convention: a tuple of the inputs in, a tuple of attributions shaped like them out."""
    model, images = vit
    attr = TokenTMAttribution(model, method=method)
    single = attr.attribute(images, target=2)
    assert isinstance(single, torch.Tensor) and single.shape == images.shape and (_spread(single) > 0).all()
    both = attr.attribute((images.clone().requires_grad_(True),), target=2)   # Captum's examples: requires_grad
    assert isinstance(both, tuple) and len(both) == 1 and both[0].shape == images.shape
    torch.testing.assert_close(both[0], single, rtol=0, atol=0)
    want = tf.explain(model, images, method, target=2, upsample=True)
    torch.testing.assert_close(single, _like_images(want, 3), rtol=0, atol=0)


@pytest.mark.parametrize("target", [2, torch.tensor(2), torch.tensor([2]), (2,), [2, 2, 2], torch.tensor([2, 2, 2]),
                                    np.int64(2)], ids=["int", "0d", "1elem", "tuple1", "list", "tensor", "np"])
def test_captum_targets_one_class(vit, target):
    """Captum's target kinds: an int, a one-element tensor or tuple (that class for every image), B classes."""
    model, images = vit
    want = tf.explain(model, images, "gae", target=torch.tensor([2, 2, 2]), upsample=True)
    assert (_spread(want) > 0).all()
    out = TokenTMAttribution(model, method="gae").attribute(images, target=target)
    torch.testing.assert_close(out, _like_images(want, 3), rtol=0, atol=0)


def test_captum_targets_per_image(vit):
    model, images = vit
    want = tf.explain(model, images, "gae", target=torch.tensor([3, 0, 1]), upsample=True)
    attr = TokenTMAttribution(model, method="gae")
    for target in ([3, 0, 1], torch.tensor([3, 0, 1]), torch.tensor([[3], [0], [1]]), [(3,), (0,), (1,)]):
        torch.testing.assert_close(attr.attribute(images, target=target), _like_images(want, 3), rtol=0, atol=0)
    # not the same as one class for all: the target is read per image
    assert not torch.allclose(attr.attribute(images, target=3), attr.attribute(images, target=[3, 0, 1]))


def test_captum_attribution_errors(vit):
    model, images = vit
    attr = TokenTMAttribution(model)
    with pytest.raises(TypeError, match=r"torch.Tensor \(B, C, H, W\) or a tuple holding one"):
        attr.attribute(images.numpy())
    with pytest.raises(TypeError, match=r"torch.Tensor \(B, C, H, W\) or a tuple holding one"):
        attr.attribute([images])
    with pytest.raises(ValueError, match="tuple of 2 items.*additional_forward_args"):
        attr.attribute((images, images), target=1)
    with pytest.raises(TypeError, match="tuple holding a ndarray"):
        attr.attribute((images.numpy(),), target=1)
    with pytest.raises(ValueError, match=r"images must have rank 4"):
        attr.attribute(images[0], target=1)
    with pytest.raises(ValueError, match="one target per image"):
        attr.attribute(images, target=torch.tensor([[1, 2], [0, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        attr.attribute(images, target=[1, 2])
    with pytest.raises(TypeError, match="normalize must be True or False"):
        attr.attribute(images, target=1, normalize=1)


# --------------------------------------------------------------------------- additional_forward_args


@pytest.fixture(scope="module")
def tiny_vit(make_model):
    """timm vit_tiny on 32x32 images, 2 blocks, 5 classes."""
    return make_model("timm_tiny").eval()


def test_no_forward_args_give_the_same_maps(tiny_vit, make_images):
    x = make_images()
    attr = TokenTMAttribution(tiny_vit, backend="torch")
    want = attr.attribute(x, target=1)
    assert want.shape == (2, 3, 32, 32) and want.abs().max() > 0
    for args in (None, ()):                                    # Captum: None or an empty tuple, no argument
        assert torch.equal(attr.attribute(x, target=1, additional_forward_args=args), want)
    assert torch.equal(attr.attribute(x, 1, None), want)       # Captum's positional order


def test_an_attention_mask_argument_is_refused(tiny_vit, images):
    """timm's forward takes attn_mask after the images: it reaches the model, whose masked attention the
    explanation cannot take (an empty list is one argument to Captum, as here)."""
    attr = TokenTMAttribution(tiny_vit, backend="torch")
    for args in ((torch.zeros(17, 17, dtype=torch.bool),), []):
        with pytest.raises(ValueError, match="unmasked"):
            attr.attribute(images, target=1, additional_forward_args=args)


def _forward_with_args_model(model):
    """A copy of the timm ``model`` whose forward takes two more arguments, as a Captum user's model may:
    ``forward(x, shift, bias=None) = model(x + shift) + bias`` (an input transform and an output offset)."""
    from timm.models.vision_transformer import VisionTransformer

    class ShiftedViT(VisionTransformer):
        def forward(self, x, shift, bias=None):
            out = super().forward(x + shift)
            return out if bias is None else out + bias

    shifted = copy.deepcopy(model)
    shifted.__class__ = ShiftedViT          # the same modules and weights, the forward above
    return shifted


@pytest.fixture(scope="module")
def with_args(vit):
    """(plain model, model with forward(x, shift, bias), images, shift (B, C, H, W), bias (B, K) that makes
    the model predict class 3, 0, 2 whatever the images)."""
    model, images = vit
    shift = 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    bias = 1e3 * F.one_hot(torch.tensor([3, 0, 2]), 4).float()
    return model, _forward_with_args_model(model), images, shift, bias


@pytest.mark.parametrize("method", ["tokentm", "legrad", "gae"])
def test_additional_forward_args_reach_the_model(with_args, method):
    model, shifted, images, shift, bias = with_args
    with torch.no_grad():
        torch.testing.assert_close(shifted(images, shift, bias), model(images + shift) + bias)
    attr = TokenTMAttribution(shifted, method=method)
    # the shift reaches the forward: the maps are those of the plain model on the shifted images
    want = tf.explain(model, images + shift, method, target=1, upsample=True)
    assert (_spread(want) > 0).all()
    assert not torch.allclose(want, tf.explain(model, images, method, target=1, upsample=True), rtol=1e-2)
    out = attr.attribute(images, target=1, additional_forward_args=(shift, None))
    torch.testing.assert_close(out, _like_images(want, 3), rtol=1e-5, atol=1e-7)
    # one argument that is not a tuple is one argument (Captum's convention)
    torch.testing.assert_close(attr.attribute(images, target=1, additional_forward_args=shift), out,
                               rtol=0, atol=0)
    # the bias decides the predicted class, so target=None explains classes 3, 0, 2
    want = tf.explain(model, images + shift, method, target=torch.tensor([3, 0, 2]), upsample=True)
    assert not torch.equal(model(images + shift).argmax(1), torch.tensor([3, 0, 2]))
    out = attr.attribute(images, additional_forward_args=(shift, bias))
    torch.testing.assert_close(out, _like_images(want, 3), rtol=1e-5, atol=1e-7)
    # the model without its arguments cannot run: they are not dropped
    with pytest.raises(TypeError, match="shift"):
        attr.attribute(images, target=1)


def test_forward_args_reach_a_model_called_by_keyword(make_model, images):
    """Hugging Face models are called with pixel_values=images: Captum's positional arguments follow them
    (ViTForImageClassification.forward(pixel_values, labels, ...): labels add a loss, the logits stay)."""
    pytest.importorskip("transformers")
    model = make_model("hf_vit").eval()
    attr = TokenTMAttribution(model, backend="torch")
    want = attr.attribute(images, target=1)
    assert (_spread(want) > 0).all()
    torch.testing.assert_close(attr.attribute(images, target=1, additional_forward_args=(torch.tensor([1, 2]),)),
                               want, rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of bounds"):     # the labels reached the loss
        attr.attribute(images, target=1, additional_forward_args=(torch.tensor([99, 2]),))


# --------------------------------------------------------------------------- Captum's own metrics


def _noise(shape, scale, seed=3):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _max_sensitivity(explain, x, noise, n):
    """Captum's sensitivity_max written out: max over the n perturbations x + noise_k of image b of
    ||E(x_b) − E(x_b + noise_k)||_F / ||E(x_b)||_F, with explain(images) → (B', H, W) maps (the repeat
    over the channels scales both norms by √C)."""
    e = explain(x)
    e_pert = explain(x.repeat_interleave(n, 0) + noise).reshape(len(x), n, -1)
    num = (e.reshape(len(x), 1, -1) - e_pert).norm(dim=-1)
    return (num / e.reshape(len(x), 1, -1).norm(dim=-1)).amax(1)


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_captum_sensitivity_max(vit, method):
    sensitivity_max = pytest.importorskip("captum.metrics").sensitivity_max

    model, images = vit
    n = 3
    noise = _noise((len(images) * n,) + images.shape[1:], 0.1)

    def perturb(inputs, radius):                       # Captum's perturb_func(inputs, perturb_radius)
        assert isinstance(inputs, torch.Tensor) and inputs.shape == noise.shape
        return inputs + noise

    attr = TokenTMAttribution(model, method=method)
    for target in (2, [2, 2, 2], torch.tensor([2, 2, 2]), torch.tensor([2])):
        sens = sensitivity_max(attr.attribute, images, perturb_func=perturb, n_perturb_samples=n, target=target)
        want = _max_sensitivity(lambda z: tf.explain(model, z, method, target=2, upsample=True), images, noise, n)
        assert sens.shape == (3,) and (want > 1e-3).all()
        torch.testing.assert_close(sens, want, rtol=1e-4, atol=1e-6)
    # per-image targets are repeated with the images
    sens = sensitivity_max(attr.attribute, images, perturb_func=perturb, n_perturb_samples=n, target=[3, 0, 1])
    t = torch.tensor([3, 0, 1])
    want = _max_sensitivity(lambda z: tf.explain(model, z, method, target=t.repeat_interleave(len(z) // 3),
                                                 upsample=True), images, noise, n)
    torch.testing.assert_close(sens, want, rtol=1e-4, atol=1e-6)


def test_captum_sensitivity_max_as_documented(vit):
    """Captum's docstring call: ``sensitivity_max(saliency.attribute, input, target=3)`` (its default
    perturbation, a uniform draw in an L∞ ball; tuple inputs reach attribute)."""
    sensitivity_max = pytest.importorskip("captum.metrics").sensitivity_max

    model, images = vit
    torch.manual_seed(0)
    sens = sensitivity_max(TokenTMAttribution(model).attribute, images, target=3)
    assert sens.shape == (3,) and torch.isfinite(sens).all() and (sens > 0).all()


def test_captum_sensitivity_max_with_forward_args(with_args):
    sensitivity_max = pytest.importorskip("captum.metrics").sensitivity_max

    model, shifted, images, shift, bias = with_args
    n = 2
    noise = _noise((len(images) * n,) + images.shape[1:], 0.1)
    sens = sensitivity_max(TokenTMAttribution(shifted).attribute, images, perturb_func=lambda z: z + noise,
                           n_perturb_samples=n, additional_forward_args=(shift, bias))
    # Captum repeats the arguments with the images; the bias picks the class of each image
    t = torch.tensor([3, 0, 2])

    def explain(z):
        k = len(z) // 3
        return tf.explain(model, z + shift.repeat_interleave(k, 0), target=t.repeat_interleave(k), upsample=True)

    want = _max_sensitivity(explain, images, noise, n)
    assert (want > 1e-3).all()
    torch.testing.assert_close(sens, want, rtol=1e-4, atol=1e-6)


def _infidelity(forward, attributions, x, noise, target, n):
    """Captum's infidelity (normalize=False) written out: the mean over the n perturbations I_k of image b of
    (Σ attributions_b · I_k − (f(x_b) − f(x_b − I_k)))², f the target's output."""
    rows = torch.arange(len(x) * n)
    t = target.repeat_interleave(n)
    f_x = forward(x)[torch.arange(len(x)), target].repeat_interleave(n)
    f_pert = forward(x.repeat_interleave(n, 0) - noise)[rows, t]
    dot = (attributions.repeat_interleave(n, 0) * noise).flatten(1).sum(1)
    return ((dot - (f_x - f_pert)) ** 2).reshape(len(x), n).mean(1)


def test_captum_infidelity_as_documented(vit):
    """Captum's docstring call: ``infidelity(net, perturb_fn, input, attribution)`` with its perturb_fn
    returning (noise, inputs − noise); the attributions must be shaped like the inputs."""
    infidelity = pytest.importorskip("captum.metrics").infidelity

    model, images = vit
    n = 4
    noise = _noise((len(images) * n,) + images.shape[1:], 0.05)

    def perturb_fn(inputs):
        return noise, inputs - noise

    attribution = TokenTMAttribution(model).attribute(images, target=[1, 0, 3])
    assert (_spread(attribution) > 0).all()
    infid = infidelity(model, perturb_fn, images, attribution, target=[1, 0, 3], n_perturb_samples=n)
    with torch.no_grad():
        want = _infidelity(model, attribution, images, noise, torch.tensor([1, 0, 3]), n)
    assert infid.shape == (3,) and (want > 0).all()
    torch.testing.assert_close(infid, want, rtol=1e-4, atol=0)
    # the score reads the attributions: another map gives another infidelity
    other = TokenTMAttribution(model, method="rollout").attribute(images, target=[1, 0, 3])
    assert not torch.allclose(infidelity(model, perturb_fn, images, other, target=[1, 0, 3], n_perturb_samples=n),
                              infid, rtol=1e-3)


def test_captum_infidelity_with_forward_args_and_tuples(with_args):
    infidelity = pytest.importorskip("captum.metrics").infidelity

    model, shifted, images, shift, bias = with_args
    n = 3
    noise = _noise((len(images) * n,) + images.shape[1:], 0.05, seed=5)

    def perturb_fn(inputs):
        return (noise,), (inputs - noise,)

    (attribution,) = TokenTMAttribution(shifted, method="legrad").attribute((images,), target=torch.tensor([2, 2, 1]),
                                                                            additional_forward_args=(shift, bias))
    infid = infidelity(shifted, perturb_fn, (images,), (attribution,), additional_forward_args=(shift, bias),
                       target=torch.tensor([2, 2, 1]), n_perturb_samples=n)
    with torch.no_grad():
        # Captum repeats shift and bias with the perturbed images: f(z) = model(z + shift) + bias per image
        k = {len(images): 1, len(images) * n: n}

        def forward(z):
            return model(z + shift.repeat_interleave(k[len(z)], 0)) + bias.repeat_interleave(k[len(z)], 0)

        want = _infidelity(forward, attribution, images, noise, torch.tensor([2, 2, 1]), n)
    assert (want > 0).all()
    torch.testing.assert_close(infid, want, rtol=1e-4, atol=0)


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
    assert len(blocks) >= 3 and "sensitivity_max" in section
    pytest.importorskip("captum")
    ns = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), ns)   # noqa: S102 - our own documentation
    torch.testing.assert_close(ns["a"], ns["b"])                # the callable and the integer target agree
    assert ns["d"].shape == ns["e"].shape == (2, 4, 4)
    assert ns["maps"].shape == (2, 64, 64) and float(ns["maps"].min()) == 0.0 and float(ns["maps"].max()) == 1.0
    assert len(ns["hits"]) == 8 and ns["attr"].shape == (8, 3, 64, 64)
    # Captum's metrics, as Captum documents them
    assert ns["attribution"].shape == ns["inputs"].shape == (2, 3, 64, 64)
    assert ns["sens"].shape == ns["infid"].shape == (2,) and bool((ns["sens"] > 0).all())
    assert bool(torch.isfinite(ns["infid"]).all())
