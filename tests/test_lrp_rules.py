"""The linear rule of ``rules="ours"`` in three products (tokentm_fast/methods/lrp_rules.py, issue 28 item 1,
docs/methods.md §6.3) against the four-product formula written out here:

    z⁺ = x⁺W⁺ᵀ + x⁻W⁻ᵀ,   S = R / (z⁺ + 1e-9) (0 where z⁺ = 0),   R_in = x⁺ ⊙ (S W⁺) + x⁻ ⊙ (S W⁻).

The rule computes 2z⁺ = xWᵀ + |x||W|ᵀ from the forward's own output less its bias, so in float64 every
relevance tensor of the pass stays the same to 1e-12, and the float32 maps move by rounding only, within a
bound derived from what is computed (:func:`identity_bound`).
"""
from __future__ import annotations

import copy

import model_families as mf
import pytest
import torch
from helpers import UNIT_ROUNDOFF, assert_informative, float32_bound, rel_err_l2

import tokentm_fast as tf
from tokentm_fast.methods import lrp_rules, relevance
from tokentm_fast.models import adapt


def four_products(x, weight, r, rules="ours", xw=None, bias=None, scratch=None):
    """The α1β0 rule with one shared denominator, as docs/methods.md §6.3 writes it (four products)."""
    if rules != "ours":
        return ORIGINAL(x, weight, r, rules)
    w = weight.to(x.dtype)
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    z = xp @ wp.T + xn @ wn.T
    s = torch.where(z == 0, torch.zeros_like(z), r / (z + 1e-9))
    return xp * (s @ wp) + xn * (s @ wn)


ORIGINAL = lrp_rules.linear

#: families with a class head, with an embedding head, and with an attention pool (MLP: SigLIP; none: CoCa)
MODELS = {
    "timm": (mf.timm_vit, False),
    "hf_vit": (mf.hf_vit_classifier, False),
    "torchvision": (mf.torchvision_vit, False),
    "open_clip": (mf.open_clip_visual, True),
    "timm_siglip": (mf.timm_siglip, True),
    "coca": (mf.open_clip_coca, True),
}
PASS_METHODS = ("lrp", "partial_lrp", "transformer_attribution")


def _target(embedder: bool):
    return tf.class_logit(torch.tensor([3, 5])) if embedder else torch.tensor([1, 3])


def _pass_tensors(monkeypatch, model, images, method, target, rule):
    """Every tensor the relevance pass returns (head, pool, blocks, pixels) in one ``explain`` call whose
    linear rule is ``rule``; and the map."""
    seen = []

    def spy(name):
        original = getattr(relevance.RelevancePass, name)

        def wrapped(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append((name, t.clone()))
            return out
        return wrapped

    with monkeypatch.context() as m:
        m.setattr(lrp_rules, "linear", rule)
        for name in ("head", "attention_pool", "block", "pixels"):
            m.setattr(relevance.RelevancePass, name, spy(name))
        e = tf.explain(model, images, method, target=target, backend="torch")
    return seen, e


def test_rule_equals_the_four_products_with_exact_zeros():
    """Unit: float64, x Wᵀ handed over as a biased layer's output less its bias. Rows where z⁺ = 0 exactly
    (x ≥ 0 against a W row ≤ 0, and an all-zero x row) give S = 0, although the identity alone leaves
    rounding noise there (asserted: the case is exercised)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=g)
    w = torch.randn(32, 64, dtype=torch.float64, generator=g)
    b = 10 * torch.randn(32, dtype=torch.float64, generator=g)
    r = torch.randn(2, 5, 32, dtype=torch.float64, generator=g)
    x[0, 1] = x[0, 1].abs() + 0.1                # x ≥ 0 ...
    w[:16] = -w[:16].abs()                       # ... against W rows ≤ 0: z⁺ = 0 exactly at (0, 1, :16)
    x[1, 2] = 0                                  # a zero row: z⁺ = 0 for every output
    xw = torch.nn.functional.linear(x, w, b) - b
    noise = xw + x.abs() @ w.abs().T
    assert (noise[0, 1, :16] != 0).any()         # the identity alone: rounding noise, not 0
    got = lrp_rules.linear(x, w, r, "ours", xw=xw, bias=b)
    want = four_products(x, w, r)
    assert got[0, 1].abs().max() > 0 and want[1, 2].abs().max() == 0
    assert got[1, 2].abs().max() == 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))
    # without the forward's product the rule computes x Wᵀ itself: same result
    torch.testing.assert_close(lrp_rules.linear(x, w, r, "ours"), want, rtol=0, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("method", PASS_METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_float64_pass_unchanged(monkeypatch, name, method):
    """On each test model, float64: every relevance tensor of the pass (before the map) with the three-product
    rule equals the one with the four-product formula to 1e-12 of its largest entry."""
    make, embedder = MODELS[name]
    model, images = make().eval().double(), mf.images().double()
    target = _target(embedder)
    new, _ = _pass_tensors(monkeypatch, model, images, method, target, ORIGINAL)
    old, _ = _pass_tensors(monkeypatch, model, images, method, target, four_products)
    assert [n for n, _ in new] == [n for n, _ in old] and len(new) >= 2
    informative = 0
    for (kind, a), (_, b) in zip(new, old):
        scale = float(b.abs().max())
        informative += scale > 0 and float(b.std()) > 0
        assert (a - b).abs().max() <= 1e-12 * scale, (kind, float((a - b).abs().max()), scale)
    assert informative >= 2


def identity_bound(model, images, method, target, layers: int) -> torch.Tensor:
    """Per-image bound on rel_err_l2(float32 map with three products, float32 map with four products).

    Each map is within ``float32_bound`` of the float64 one (tests/helpers.py: 16 roundings per attention layer
    times the measured condition κ). The identity adds, per linear map, the rounding of xWᵀ and |x||W|ᵀ
    amplified by c = (|x||W|ᵀ + |b|) / z⁺ (docs/methods.md §6.3); weighted by where the relevance is, a linear
    map then counts as 2ĉ roundings, ĉ = Σ|R_j| c_j / Σ|R_j| (measured here on the float64 pass, largest over
    the linear maps). Four linear maps per layer: 16 + 8ĉ roundings for the new map, 16 for the old one."""
    worst = []

    def measure(x, weight, r, rules="ours", xw=None, bias=None, scratch=None):
        w = weight.to(x.dtype)
        z = x.clamp(min=0) @ w.clamp(min=0).T + x.clamp(max=0) @ w.clamp(max=0).T
        m = x.abs() @ w.abs().T + (0 if bias is None else bias.to(x.dtype).abs())
        c = torch.where(z > 0, m / z.clamp_min(1e-300), torch.zeros_like(z))
        worst.append(float((r.abs() * c).sum() / r.abs().sum().clamp_min(1e-300)))
        return ORIGINAL(x, weight, r, rules, xw=xw, bias=bias, scratch=scratch)

    def evaluate(m, x):
        return tf.explain(m, x, method, target=target, backend="torch")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lrp_rules, "linear", measure)
        evaluate(copy.deepcopy(model).double(), images.double())
        mp.setattr(lrp_rules, "linear", four_products)             # κ of the map, not of the code under test
        base = float32_bound(evaluate, model, images, layers)        # 16 · layers · κ · u
    c_hat = max(worst)
    return base * (2 + c_hat / 2), c_hat


@pytest.mark.parametrize("method", PASS_METHODS)
@pytest.mark.parametrize("name", ["timm", "open_clip", "timm_siglip"])
def test_float32_maps_within_the_derived_bound(monkeypatch, name, method):
    """float32 maps with three products against four products: informative, different by rounding only,
    within :func:`identity_bound`."""
    make, embedder = MODELS[name]
    model, images = make().eval(), mf.images()
    target = _target(embedder)
    _, new = _pass_tensors(monkeypatch, model, images, method, target, ORIGINAL)
    _, old = _pass_tensors(monkeypatch, model, images, method, target, four_products)
    assert_informative(old)
    vit = adapt(model)
    layers = vit.num_layers + (vit.attention_pool is not None)
    bound, c_hat = identity_bound(model, images, method, target, layers)
    err = rel_err_l2(new, old)
    assert (err <= bound).all(), (err.tolist(), bound.tolist(), c_hat)
    assert (bound < 1e-2).all()                 # the bound is a rounding bound, not a loose one
    assert err.max() >= UNIT_ROUNDOFF / 4 or torch.equal(new, old)


def test_scratch_reuses_buffers_without_changing_any_result():
    """One ``Scratch`` over a block's four linear maps, twice round (the shapes of fc2, fc1, proj and qkv at
    width 8, a bias each): every result equals the rule without scratch bit for bit, the earlier results are
    untouched by the later calls (no result aliases a kept buffer), and the buffers were reused."""
    g = torch.Generator().manual_seed(5)
    shapes = [(32, 8), (8, 32), (8, 8), (24, 8)]                      # (out, in) of W
    scratch = lrp_rules.Scratch()
    results, wants = [], []
    for _ in range(2):
        for out_f, in_f in shapes:
            x = torch.randn(2, 5, in_f, generator=g)
            w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
            r = torch.randn(2, 5, out_f, generator=g)
            xw = torch.nn.functional.linear(x, w, b) - b
            wants.append(lrp_rules.linear(x, w, r, "ours", xw=xw, bias=b))
            results.append(lrp_rules.linear(x, w, r, "ours", xw=xw.clone(), bias=b, scratch=scratch))
            assert torch.equal(results[-1], wants[-1])
            assert wants[-1].abs().max() > 0
    for got, want in zip(results, wants):
        assert torch.equal(got, want)
    kept = [t for ts in scratch.free.values() for t in ts]
    assert len(kept) >= 3 and len({t.data_ptr() for t in kept}) == len(kept)
    assert not any(t.data_ptr() == r.data_ptr() for t in kept for r in results)
