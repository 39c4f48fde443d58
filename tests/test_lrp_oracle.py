"""Self-checks of the LRP-family oracle (tests/lrp_oracle.py): conservation, per-image independence, the
method read-outs against the relevance they are made of, the attention gradients against timm's own autograd,
and single rules worked out by hand."""
from __future__ import annotations

import copy

import lrp_oracle as lo
import model_families as mf
import pytest
import torch
from helpers import rel_err_max

pytestmark = pytest.mark.usefixtures("one_thread")


def biased_model(**kwargs) -> torch.nn.Module:
    """timm_narrow (3 blocks, width 32, 2 heads) with every bias, the position embedding and the class token
    drawn at random, random LayerNorm affines, LayerScale on unless told otherwise."""
    kw = dict(qkv_bias=True, init_values=0.5)
    kw.update(kwargs)
    model = mf.random_affine(mf.timm_narrow(qkv_scale=2.0, head_scale=5.0, **kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name or name == "pos_embed":
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def total(rel) -> torch.Tensor:
    """(B,): the relevance at the pixels + what the position embedding and the class token row keep."""
    return rel["pixels"].sum(dim=(1, 2, 3)) + rel["pos_share"] + rel["prefix_share"]


MODELS = {
    "token_ls_qkvbias": lambda: biased_model(),
    "token_no_ls_no_qkvbias": lambda: biased_model(qkv_bias=False, init_values=None),
    "avg_pool": lambda: biased_model(global_pool="avg"),
    "qk_norm": lambda: biased_model(qk_norm=True),
}


@pytest.fixture(scope="module")
def model():
    return biased_model()


def _model64(model):
    return copy.deepcopy(model).double().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_the_manual_forward_is_the_model(name):
    model, x = MODELS[name](), mf.images()
    ref = _model64(model)(x.double())
    assert torch.allclose(lo.relevance(model, x)["logits"], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_conservation(name, monkeypatch):
    """Σ pixels + pos share + class-token share = 1 per image (the start), and at every block input; exact up
    to float64 rounding when the rules' 1e-9 stabiliser is made negligible, and to ~1e-7 with it (the
    stabiliser leaks R·1e-9/z wherever a z is small: Q·Kᵀ and A·V entries, Clone inputs; 2e-8 to 7e-8 here)."""
    model, x = MODELS[name](), mf.images()
    rel = lo.relevance(model, x)
    assert rel["pixels"].abs().amax(dim=(1, 2, 3)).min() > 1e-6         # not all zeros, in either image
    assert (rel["pos_share"].abs() > 1e-6).all() and (rel["prefix_share"].abs() > 1e-6).all()
    assert (total(rel) - 1).abs().max() < 1e-6
    monkeypatch.setattr(lo, "EPS", 1e-30)
    rel = lo.relevance(model, x)
    assert (total(rel) - 1).abs().max() < 1e-11
    for r in rel["tokens"]:
        assert (r.sum(dim=(1, 2)) - 1).abs().max() < 1e-11


def test_classic_rules_are_different_and_not_conservative(model):
    x = mf.images()
    ours, classic = lo.relevance(model, x), lo.relevance(model, x, rules="classic")
    assert (total(classic) - 1).abs().min() > 1e-2
    assert rel_err_max(classic["pixels"], ours["pixels"]).min() > 1e-2
    for a, b in zip(classic["attn"], ours["attn"]):
        assert rel_err_max(a, b).min() > 1e-2


@pytest.mark.parametrize("rules", lo.RULES)
def test_per_image_independence(model, rules):
    """Explaining [a, b] together equals explaining a and b alone (every sum of a rule is per image)."""
    x = mf.images()
    both = lo.relevance(model, x, rules=rules)
    for i in range(2):
        one = lo.relevance(model, x[i:i + 1], rules=rules)
        assert torch.allclose(one["pixels"][0], both["pixels"][i], rtol=1e-10, atol=1e-14)
        assert torch.allclose(one["pos_share"][0], both["pos_share"][i], rtol=1e-10, atol=1e-14)
        assert torch.allclose(one["prefix_share"][0], both["prefix_share"][i], rtol=1e-10, atol=1e-14)
        for a, b in zip(one["attn"], both["attn"]):
            assert torch.allclose(a[0], b[i], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(both["pixels"][0], both["pixels"][1])


def test_targets(model):
    x = mf.images()
    rel = lo.relevance(model, x)
    assert torch.equal(rel["start"].argmax(-1), rel["logits"].argmax(-1))
    a = lo.lrp(model, x, target=torch.tensor([1, 3]))
    assert torch.equal(a[1], lo.lrp(model, x, target=3)[1]) and torch.equal(a[0], lo.lrp(model, x, target=1)[0])
    assert not torch.allclose(a[0], lo.lrp(model, x, target=3)[0])


@pytest.mark.parametrize("rules", lo.RULES)
def test_partial_lrp_is_the_last_attention_relevance(model, rules):
    x = mf.images()
    rel = lo.relevance(model, x, rules=rules)
    want = rel["attn"][-1].clamp(min=0).mean(dim=1)[:, 0, 1:]
    got = lo.partial_lrp(model, x, rules=rules)
    assert got.shape == (2, 16) and rel["attn"][-1][:, :, 0, 1:].abs().min() > 0
    if rules == "ours":  # (the classic rules leave this model's last class row negative: all clamped away)
        assert want.abs().min() > 0
    assert torch.equal(got, want)
    assert torch.equal(lo.lrp(model, x, rules=rules), rel["pixels"].sum(dim=1))


def test_mean_pooled_read_out():
    """global_pool="avg": the last class row gets no relevance; partial LRP reads the mean of the pooled rows."""
    model, x = MODELS["avg_pool"](), mf.images()
    rel = lo.relevance(model, x)
    assert torch.equal(rel["attn"][-1][:, :, 0], torch.zeros_like(rel["attn"][-1][:, :, 0]))
    last = rel["attn"][-1].clamp(min=0).mean(dim=1)
    got = lo.partial_lrp(model, x)
    assert got.abs().max() > 0 and torch.equal(got, last[:, 1:, 1:].mean(dim=1))


def timm_attention_gradients(model, images, target):
    """The target logit's gradient at every block's attention probabilities, read with hooks from timm's own
    (non-fused) forward in float64."""
    m = _model64(model)
    probs = []

    def keep(mod, inp, out):
        out.retain_grad()
        probs.append(out)

    handles = []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(keep))
    logits = m(images.double())
    logits.gather(1, target[:, None]).sum().backward()
    for h in handles:
        h.remove()
    return [p.grad for p in probs]


def test_attention_gradients_match_timm(model):
    x, target = mf.images(), torch.tensor([2, 0])
    trace = lo.run_model(model, x)
    got = lo.attention_gradients(trace, lo.one_hot(trace.logits, target))
    want = timm_attention_gradients(model, x, target)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and torch.allclose(g, w, rtol=1e-9, atol=1e-14)


def test_transformer_attribution(model):
    """start_layer = L−1: Ā^L[cls, 1:] (the identity adds nothing to the patch columns); start_layer = 0: the
    un-normalised product (Ā³+I)(Ā²+I)(Ā¹+I), row cls, patch columns."""
    x, target = mf.images(), torch.tensor([2, 0])
    rel = lo.relevance(model, x, target=target)
    grads = timm_attention_gradients(model, x, target)
    maps = [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(grads, rel["attn"])]
    last = lo.transformer_attribution(model, x, target=target, start_layer=2)
    assert maps[-1][:, 0, 1:].abs().max() > 0
    assert torch.allclose(last, maps[-1][:, 0, 1:], rtol=1e-9, atol=1e-14)
    eye = torch.eye(17, dtype=torch.float64)
    joint = (maps[2] + eye) @ (maps[1] + eye) @ (maps[0] + eye)
    full = lo.transformer_attribution(model, x, target=target)
    assert torch.allclose(full, joint[:, 0, 1:], rtol=1e-9, atol=1e-14)
    assert (full.sum(-1) > last.sum(-1)).all()            # rows not renormalised: the product only adds


def test_linear_rule_by_hand():
    """x = (2, −1), W = [[1, −2], [3, 1]], R = (1, 3): W⁺ = [[1, 0], [3, 1]], W⁻ = [[0, −2], [0, 0]],
    x⁺ = (2, 0), x⁻ = (0, −1); Z₁ = x⁺W⁺ᵀ = (2, 6), Z₂ = x⁻W⁻ᵀ = (2, 0).
    ours: S = R/(Z₁+Z₂) = (1/4, 1/2); x⁺ ⊙ SW⁺ = (2·(1/4 + 3/2), 0) = (3.5, 0); x⁻ ⊙ SW⁻ = (0, −1·(−1/2)) = (0, 0.5)
    → (3.5, 0.5), sum 4 = ΣR. classic: S₁ = R/Z₁ = (1/2, 1/2), S₂ = R/Z₂ = (1/2, 0) (0 where Z₂ = 0);
    x⁺ ⊙ S₁W⁺ = (2·(1/2 + 3/2), 0) = (4, 0); x⁻ ⊙ S₂W⁻ = (0, −1·(−1)) = (0, 1) → (4, 1), sum 5 ≠ 4."""
    x = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    ours = lo.linear_relevance(x, w, r)
    classic = lo.linear_relevance(x, w, r, rules="classic")
    assert torch.allclose(ours, torch.tensor([[3.5, 0.5]], dtype=torch.float64), rtol=0, atol=1e-8)
    assert torch.allclose(classic, torch.tensor([[4.0, 1.0]], dtype=torch.float64), rtol=0, atol=1e-8)
    assert not torch.equal(ours, torch.tensor([[3.5, 0.5]], dtype=torch.float64))   # the 1e-9 is there


def test_add_rule_by_hand():
    """a = (1, −2), b = (1, 4), R = (1, 1): z = (2, 2), S = (1/2, 1/2); z-shares a: (1/2, −1), Σ = −1/2;
    b: (1/2, 2), Σ = 5/2. ours: a gets |−1/2| / 3 · 2 = 1/3 in all, so a ← a-share · (1/3)/(−1/2) = (−1/3, 2/3)
    (the sign flips), b gets 5/3: b ← b-share · (5/3)/(5/2) = (1/3, 4/3). classic: the z-shares as they are."""
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    a, b, r = t(1.0, -2.0), t(1.0, 4.0), t(1.0, 1.0)
    ra, rb = lo.add_relevance(a, b, r)
    assert torch.allclose(ra, t(-1 / 3, 2 / 3), rtol=0, atol=1e-8)
    assert torch.allclose(rb, t(1 / 3, 4 / 3), rtol=0, atol=1e-8)
    ra, rb = lo.add_relevance(a, b, r, rules="classic")
    assert torch.allclose(ra, t(0.5, -1.0), rtol=0, atol=1e-8) and torch.allclose(rb, t(0.5, 2.0), rtol=0, atol=1e-8)


def test_safe_divide_is_the_authors():
    a = torch.ones(4, dtype=torch.float64)
    b = torch.tensor([2.0, 0.0, -1e-9, -3.0], dtype=torch.float64)
    got = lo.safe_divide(a, b)
    want = torch.tensor([1 / (2 + 1e-9), 0.0, 1 / 1e-9, 1 / (-3 + 1e-9)], dtype=torch.float64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs", [dict(class_token=False, global_pool="avg"), dict(reg_tokens=1),
                                    dict(global_pool="map")])
def test_refuses_other_models(kwargs):
    model = mf.timm_narrow(depth=1, **kwargs)
    with pytest.raises(AssertionError):
        lo.relevance(model, mf.images())
