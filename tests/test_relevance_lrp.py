"""The LRP family (tokentm_fast/methods/relevance.py, tokentm_fast/methods/lrp_rules.py, docs/methods.md §6.3) against
the independent literal oracle of tests/lrp_oracle.py: every backend, every family (through weights copied
from one timm ViT), both rule sets, several targets, conservation, and the refusals. Float32 maps are held to
a bound derived per image from the condition of the map (tests/helpers.py), tight enough to catch a changed
stabiliser."""
from __future__ import annotations

import copy
from functools import lru_cache

import lrp_oracle
import model_families as mf
import pytest
import torch
from helpers import assert_informative, float32_bound, rel_err_l2
from model_families import assert_same, snapshot

import tokentm_fast as tf
from tokentm_fast.capture import prepared_model
from tokentm_fast.methods.relevance import RelevancePass
from tokentm_fast.models import adapt
from tokentm_fast.paths import TORCH_KERNELS, Flash, Materialized
from tokentm_fast.targets import class_logit
from tokentm_fast.torch_ops.attention import torch_attention

METHODS = lrp_oracle.METHODS
#: a float64 model against the float64 oracle: the same rules in another order of operations; the API returns
#: float32 maps, so the rounding of the output (6e-8) is what is left
F64_TOL = 1e-6


def _biased(model):
    """Every bias and LayerNorm shift drawn at random (the rules leave biases out of z: conservation must
    not depend on them being zero)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _loud_head(model, scale: float):
    """The classifier's weights × ``scale``. On a mean-pooled model Transformer Attribution's map is 1/n (the
    identity's share of the pooled rows) plus the rolled-out mean_h max(∇A ⊙ R^A, 0); with timm's small head
    init the second part is 1e-6 of the first, below what a float32 map of 1/n resolves. ∇A grows with the
    logits while R^A (a one-hot start) and the other methods' maps do not change: × 1e4 makes the map vary
    by 3 %."""
    with torch.no_grad():
        model.head.weight.mul_(scale)
    return model


MODELS = {
    "timm": lambda: _biased(mf.timm_vit()),
    "timm_layer_scale": lambda: _biased(mf.timm_vit(init_values=0.5)),
    # a class token and mean pooling: partial LRP and TA read the pooled rows (docs/methods.md §6.3)
    "timm_avg": lambda: _loud_head(_biased(mf.timm_vit(global_pool="avg")), 1e4),
    # SigLIP's attention pool (no class token) before a classifier: the pass runs through the pool
    "timm_map": lambda: _biased(mf.scale_pool(mf.random_affine(mf.timm_vit(global_pool="map", class_token=False)),
                                              latent=3.0, query_key=8.0)),
}


def _oracle(method, model, images, target, **options):
    if method == "lrp":
        return lrp_oracle.lrp(model, images, target, **options)
    if method == "partial_lrp":
        return lrp_oracle.partial_lrp(model, images, target, **options)
    return lrp_oracle.transformer_attribution(model, images, target, **options)


def _explain(model, images, method, target, **kw):
    if method == "lrp":
        kw["upsample"] = True          # the pixel map itself
    return tf.explain(model, images, method, target=target, **kw)


def _layers(model) -> int:
    """Attention layers on a relevance's path: the blocks, and the attention pool."""
    return len(model.blocks) + (model.global_pool == "map")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_float64_equals_the_oracle(name, method):
    """torch (both attention paths: the flash one runs the PyTorch twin of the relevance programs) and
    reference backends on a float64 model equal the oracle's map to 1e-6 (the float32 output's rounding), for
    every test model, the mean-pooled one included (partial LRP and Transformer Attribution read its pooled
    rows, docs/methods.md §6.3); every image's map is informative."""
    model, images = MODELS[name](), mf.images()
    target = torch.tensor([1, 3])
    want = _oracle(method, model, images, target)
    assert_informative(want)
    for backend, attention in (("torch", "materialized"), ("torch", "flash"), ("reference", "auto")):
        got = _explain(model.double(), images.double(), method, target, backend=backend, attention=attention)
        assert rel_err_l2(got, want.reshape(got.shape)).max() < F64_TOL, (backend, attention)
    model.float()


@pytest.mark.parametrize("method", ("lrp", "partial_lrp"))
def test_classic_rules_equal_the_oracle(method):
    model, images = MODELS["timm"](), mf.images()
    want = _oracle(method, model, images, torch.tensor([2, 0]), rules="classic")
    ours = _oracle(method, model, images, torch.tensor([2, 0]))
    assert rel_err_l2(want, ours).min() > 1e-3          # the two rule sets differ on this model
    for attention in ("materialized", "flash"):
        got = _explain(model.double(), images.double(), method, torch.tensor([2, 0]), backend="torch",
                       rules="classic", attention=attention)
        assert rel_err_l2(got, want.reshape(got.shape)).max() < F64_TOL, attention


@lru_cache(maxsize=None)
def _float32_case(name: str, method: str):
    """``(model, images, target, float64 oracle map, per-image float32 bound (B,))`` of a test model; the
    bound is tests/helpers.py's, from the oracle's measured condition (cached: three oracle runs)."""
    model, images = MODELS[name](), mf.images()
    target = torch.tensor([1, 3])
    want = _oracle(method, model, images, target)
    bound = float32_bound(lambda m, x: _oracle(method, m, x, target), model, images, _layers(model))
    return model, images, target, want, bound


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend,attention", [("reference", "auto"), ("torch", "materialized"), ("torch", "flash"),
                                               ("triton", "materialized"), ("triton", "flash")])
def test_float32_backends(name, method, backend, attention, device):
    """Every backend and attention path on a float32 model (Triton: the materialized attention's kernels, and
    the flash path's relevance programs; torch "flash": their PyTorch twin) against the float64 oracle, within
    the float32 bound derived from the map's condition (tests/helpers.py: 16 roundings per attention layer,
    each amplified by the measured κ). The flash path divides by the forward's O and by Z tiles where the
    materialized path divides by A·V and Q Kᵀ formed whole: float32 rounding of the same condition."""
    model, images, target, want, bound = _float32_case(name, method)
    assert_informative(want)
    if backend == "triton":
        if not tf.api.triton_usable(device):
            pytest.skip("Triton cannot run on the suite's device here")
        model, images, target = copy.deepcopy(model).to(device), images.to(device), target.to(device)
    got = _explain(model, images, method, target, backend=backend, attention=attention).cpu()
    assert got.dtype == torch.float32
    err = rel_err_l2(got, want.reshape(got.shape))
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_the_float32_bound_catches_a_changed_stabiliser(monkeypatch, name, method):
    """The derived bound is tight: the oracle with the stabiliser 1e-5 instead of the authors' 1e-9 (every
    division a / (b + ε), and the zβ rule's ε) moves each image's map by more than twice the bound, so a
    float32 run with that mistake (its own error at most one bound more) fails test_float32_backends."""
    model, images, target, want, bound = _float32_case(name, method)
    monkeypatch.setattr(lrp_oracle, "EPS", 1e-5)
    wrong = _oracle(method, model, images, target)
    assert (rel_err_l2(wrong, want) > 2 * bound).all(), (rel_err_l2(wrong, want), bound)


CONVERTED = {
    "hf_vit": (lambda: _biased(mf.timm_vit()), mf.timm_to_hf_vit),
    "torchvision": (lambda: _biased(mf.timm_vit()), mf.timm_to_torchvision),
    "open_clip": (lambda: mf.timm_clip(), mf.timm_to_open_clip),
    "hf_clip": (lambda: mf.timm_clip(), mf.timm_to_hf_clip),
    "hf_siglip": (lambda: mf.timm_siglip(), mf.timm_to_hf_siglip),
}


@pytest.mark.parametrize("family", list(CONVERTED))
@pytest.mark.parametrize("method", METHODS)
def test_every_family_equals_the_oracle(family, method):
    """The same weights in another family's model give the oracle's map: each adapter reads the right
    linear inputs, prefix tokens, position embedding and patch convolution."""
    make, convert = CONVERTED[family]
    src = make().eval()
    dst = convert(src).double().eval()
    images = mf.images()
    target = torch.tensor([1, 3])
    want = _oracle(method, src, images, target)
    assert want.abs().max() > 0
    score = target if adapt(dst).num_classes is not None else None
    snap = snapshot(dst)
    for attention in ("materialized", "flash"):     # flash: the relevance programs' PyTorch twin, no Aˡ
        if score is None:                # an embedding model: the target is output channel c (one-hot start)
            got = torch.stack([_explain(dst, images.double()[i:i + 1], method, class_logit(int(c)), backend="torch",
                                        attention=attention)[0] for i, c in enumerate(target)])
        else:
            got = _explain(dst, images.double(), method, score, backend="torch", attention=attention)
        assert rel_err_l2(got, want.reshape(got.shape)).max() < F64_TOL, attention
    assert_same(dst, snap)


@pytest.mark.parametrize("path", ["materialized", "flash"])
def test_conservation(path):
    """"ours": what reaches the pixels, plus what the position embedding and the class token keep, is the
    relevance put at the output (1: the one-hot start), up to the stabiliser's leak (a / (b + 1e-9) at every
    division: ~1e-7 here); "classic" does not conserve it (its linear and residual rules). On both attention
    paths (the flash one: the PyTorch twin of the relevance programs, no Aˡ)."""
    model, images = MODELS["timm"]().double(), mf.images().double()
    vit = adapt(model)
    totals = {}
    strategy = (Materialized(TORCH_KERNELS) if path == "materialized"
                else Flash(TORCH_KERNELS, torch_attention(), max_head_dim=None))
    for rules in ("ours", "classic"):
        run = RelevancePass(vit, images, range(vit.num_layers), rules, strategy, pixels=True)
        with prepared_model(vit) as handles, torch.no_grad():
            output = run.forward(handles)
            r, _ = run.head(torch.nn.functional.one_hot(torch.tensor([1, 3]), output.shape[-1]).double())
            if rules == "ours":          # the classifier's rule conserves too (classic's does not)
                assert torch.allclose(r.sum((1, 2)), torch.ones(2, dtype=torch.float64), atol=1e-6)
            for l in reversed(range(vit.num_layers)):
                r, _ = run.block(l, r)
            pixels, shares = run.pixels(r)
        totals[rules] = pixels.sum((1, 2)) + shares["position"] + shares["prefix"]
        assert pixels.abs().sum() > 0
    torch.testing.assert_close(totals["ours"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (totals["classic"] - 1).abs().min() > 1      # 25 to 87 instead of 1 (docs/methods.md §6.3)


def test_patch_grid_is_the_sum_of_the_pixel_map():
    model, images = MODELS["timm"](), mf.images()
    pixels = tf.explain(model, images, "lrp", target=1, backend="torch", upsample=True)
    grid = tf.explain(model, images, "lrp", target=1, backend="torch")
    assert pixels.shape == images.shape[:1] + images.shape[2:] and grid.shape == (2, 4, 4)
    torch.testing.assert_close(grid, pixels.reshape(2, 4, 8, 4, 8).sum((2, 4)))


@pytest.mark.parametrize("method", METHODS)
def test_several_targets_from_one_forward(method):
    model, images = MODELS["timm"](), mf.images()
    got = tf.explain(model, images, method, target=torch.tensor([[0, 1], [2, 0]]), backend="torch")
    want = torch.stack([tf.explain(model, images, method, target=torch.tensor([0, 2]), backend="torch"),
                        tf.explain(model, images, method, target=torch.tensor([1, 0]), backend="torch")], dim=1)
    assert not torch.equal(want[:, 0], want[:, 1])
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 2.0 ** -23 * float(want.abs().max()))


def test_start_layer_of_transformer_attribution():
    model, images = _biased(mf.timm_vit(depth=4)), mf.images()
    for k in (1, 3):
        want = lrp_oracle.transformer_attribution(model, images, torch.tensor([1, 3]), start_layer=k)
        got = tf.explain(model.double(), images.double(), "transformer_attribution", target=torch.tensor([1, 3]),
                         backend="torch", start_layer=k)
        model.float()
        assert rel_err_l2(got, want.reshape(got.shape)).max() < F64_TOL


def test_refusals():
    model, images = MODELS["timm"](), mf.images()
    with pytest.raises(ValueError, match="rules"):
        tf.explain(model, images, "partial_lrp", rules="newest")
    with pytest.raises(ValueError, match="full=True"):
        tf.explain(model, images, "transformer_attribution", full=True)
    pooled = mf.timm_vit(global_pool="map", class_token=False)
    pooled.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(16, mf.WIDTH))       # timm's pos_embed="abs"
    with pytest.raises(ValueError, match="position embedding of its own"):
        tf.explain(pooled, mf.images(), "partial_lrp", target=class_logit(0), backend="torch")
    with pytest.raises(ValueError, match="two classifier heads"):
        tf.explain(mf.make_model("hf_deit_teacher"), mf.images(), "lrp", backend="torch")
