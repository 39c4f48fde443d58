"""LeGrad's per-layer score (tokentm_fast/methods/tails.py, docs/methods.md §6): ``layer_pooling="mean"``
(the default, the authors' pooling: the mean of Xˡ over all tokens, then the final norm and the
projection / classifier) and ``"head"`` (the model's own head on Xˡ), against a literal implementation
of §6 written here, on every backend, both attention paths and every family."""
from __future__ import annotations

import model_families as mf
import pytest
import torch
from helpers import literal_legrad, rel_err_l2

import tokentm_fast as tf

TARGET = torch.tensor([1, 3])
MODELS = {
    "class_token": lambda: mf.timm_vit(),
    "mean_pooled": lambda: mf.timm_vit(global_pool="avg"),      # the head: mean of the patch tokens
    "deeper": lambda: mf.timm_vit(depth=3),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_default_is_the_mean_over_all_tokens(name, backend):
    model, images = MODELS[name]().eval(), mf.images()
    ref = literal_legrad(model, images, TARGET)
    head = literal_legrad(model, images, TARGET, "head")
    assert ref.abs().max() > 0 and rel_err_l2(head, ref).min() > 1e-3     # the two poolings differ here
    out = tf.explain(model, images, "legrad", target=TARGET, backend=backend)
    assert rel_err_l2(out, ref.reshape(out.shape)).max() < 1e-5
    assert torch.equal(out, tf.explain(model, images, "legrad", target=TARGET, backend=backend,
                                       layer_pooling="mean"))
    got = tf.explain(model, images, "legrad", target=TARGET, backend=backend, layer_pooling="head")
    assert rel_err_l2(got, head.reshape(got.shape)).max() < 1e-5


@pytest.mark.parametrize("attention", ["materialized", "flash"])
@pytest.mark.parametrize("layer_pooling", ["mean", "head"])
def test_triton_paths(attention, layer_pooling, device):
    """The flash path reads every query row of G̃ for the mean pooling (the tiled row reduction), only
    the prefix rows for the class-token head."""
    model, images = MODELS["class_token"]().eval(), mf.images()
    ref = literal_legrad(model, images, TARGET, layer_pooling)
    out = tf.explain(model.to(device), images.to(device), "legrad", target=TARGET.to(device), backend="triton",
                     attention=attention, layer_pooling=layer_pooling, start_layer=0).cpu()
    ref = literal_legrad(model.cpu(), images, TARGET, layer_pooling, start_layer=0)
    assert ref.abs().max() > 0 and rel_err_l2(out, ref.reshape(out.shape)).max() < 1e-5


@pytest.mark.parametrize("family", ["hf_vit", "torchvision", "open_clip", "open_clip_avg", "hf_clip"])
def test_every_family_pools_as_the_spec(family):
    """The same weights in each family (converted from timm, written independently of the adapters)
    give the literal §6 mean-pooling map of the timm model, by default."""
    if family in ("hf_vit", "torchvision"):
        src = mf.timm_vit().eval()
        dst = mf.timm_to_hf_vit(src) if family == "hf_vit" else mf.timm_to_torchvision(src)
        target = TARGET
    else:
        pool = dict(global_pool="avg", class_token=True) if family == "open_clip_avg" else {}
        src = mf.timm_clip(**pool).eval()
        dst = mf.timm_to_hf_clip(src) if family == "hf_clip" else mf.timm_to_open_clip(src)
        target = tf.class_logit(TARGET)
    images = mf.images()
    ref = literal_legrad(src, images, TARGET)
    assert ref.abs().max() > 0
    for backend in ("torch", "reference"):
        out = tf.explain(dst.eval(), images, "legrad", target=target, backend=backend)
        assert rel_err_l2(out, ref.reshape(out.shape)).max() < 1e-5, backend


def test_layer_pooling_is_checked():
    model = MODELS["class_token"]()
    with pytest.raises(ValueError, match=r"option layer_pooling='cls' for 'legrad'; expected one of \('mean', 'head'\)"):
        tf.Explainer(model, "legrad", layer_pooling="cls")
    with pytest.raises(ValueError, match="unknown option"):
        tf.Explainer(model, "tokentm", layer_pooling="mean")
