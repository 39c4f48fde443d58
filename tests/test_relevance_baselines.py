"""Conservative LRP and ATTCAT, the gradient × activation baselines of tokentm_fast/methods/relevance.py
(docs/methods.md §6.2), against the independent oracle (tests/spec_oracle.py, float64) on every backend and
both attention paths, and several targets. The module's LRP relevance pass: tests/test_relevance_lrp.py."""
from __future__ import annotations

import model_families as mf
import pytest
import torch
from helpers import rel_err_l2
from spec_oracle import explain as oracle

import tokentm_fast as tf

METHODS = ("conservative_lrp", "attcat")
MODELS = {
    "class_token": lambda: mf.timm_vit(),
    "mean_pooled_no_cls": lambda: mf.timm_vit(global_pool="avg", class_token=False),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend,attention", [("reference", "auto"), ("torch", "auto"),
                                               ("triton", "materialized"), ("triton", "flash")])
def test_matches_the_oracle(name, method, backend, attention, device):
    model, images = MODELS[name]().eval(), mf.images()
    ref = oracle(model, images, method, target=torch.tensor([1, 3]))
    assert ref.abs().max() > 0 and ref.std() > 0
    if backend == "reference" or backend == "torch":
        model_d, images_d, target = model, images, torch.tensor([1, 3])
    else:
        model_d, images_d, target = model.to(device), images.to(device), torch.tensor([1, 3]).to(device)
    out = tf.explain(model_d, images_d, method, target=target, backend=backend, attention=attention).cpu()
    assert rel_err_l2(out, ref.reshape(out.shape)).max() < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_several_targets_from_one_forward(method):
    """A (B, K) target: map k equals a call with target k (one forward, K backward passes)."""
    model, images = MODELS["class_token"]().eval(), mf.images()
    got = tf.explain(model, images, method, target=torch.tensor([[0, 1], [2, 0]]), backend="torch")
    want = torch.stack([tf.explain(model, images, method, target=torch.tensor([0, 2]), backend="torch"),
                        tf.explain(model, images, method, target=torch.tensor([1, 0]), backend="torch")], dim=1)
    assert want.abs().max() > 0 and not torch.equal(want[:, 0], want[:, 1])
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 2.0 ** -23 * float(want.abs().max()))


def test_conservative_lrp_holds_attention_and_layer_norm():
    """Not plain gradient × input: holding A and the LayerNorm normalisation changes the map."""
    model, images = MODELS["class_token"]().eval(), mf.images()
    got = tf.explain(model, images, "conservative_lrp", target=1, backend="torch")
    leaf = {}

    def grab(module, args):
        leaf["x"] = args[0].detach().requires_grad_(True)
        return (leaf["x"],) + tuple(args[1:])

    h = model.blocks[0].register_forward_pre_hook(grab)
    try:
        out = model(images)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[:, 1].sum(), [leaf["x"]])
    plain = (leaf["x"] * g).sum(-1)[:, 1:].reshape(got.shape)
    assert rel_err_l2(got, plain).min() > 1e-2
