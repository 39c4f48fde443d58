"""tokentm_fast/targets.py: score functions (callables of the model output), class_logit, cosine_similarity."""
import pytest
import torch
from helpers import literal_legrad, rel_err_l2
from spec_oracle import run_vit

import tokentm_fast as tf
from tokentm_fast.targets import ScoreFunction, class_logit, cosine_similarity

TARGET_METHODS = ("tokentm", "gae", "attn_gradcam", "legrad")   # the methods whose map depends on s
BACKENDS = ("torch", "reference")


@pytest.fixture(scope="module")
def vit(make_model, make_images):
    """timm's VisionTransformer, 32 wide, 3 blocks, 5 classes, with sharper attention and a larger head than
    timm's init (every term matters); seed 5: Grad-CAM (a clamped mean) is non-zero for the targets used."""
    return make_model("timm_narrow", seed=5, qkv_scale=2.0, head_scale=10.0), make_images(seed=6)


def _nonzero(e):
    return bool((e.flatten(1).abs().amax(1) > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", tf.METHODS)
def test_callable_returning_the_logit_equals_the_integer_target(vit, method, backend):
    model, images = vit
    c = torch.tensor([1, 4])
    by_int = tf.explain(model, images, method, target=c, backend=backend)
    assert torch.isfinite(by_int).all() and _nonzero(by_int)
    for target in (lambda out: out[torch.arange(out.shape[0]), c.to(out.device)], class_logit(c)):
        e = tf.explain(model, images, method, target=target, backend=backend)
        torch.testing.assert_close(e, by_int, rtol=1e-6, atol=0)
    e_int = tf.explain(model, images, method, target=4, backend=backend)
    assert _nonzero(e_int)
    torch.testing.assert_close(tf.explain(model, images, method, target=lambda o: o[:, 4], backend=backend), e_int,
                               rtol=1e-6, atol=0)
    if method != "legrad":  # (LeGrad applies a score function per layer: its argmax would be per layer)
        # the predicted class, chosen inside the score function, equals target=None
        pred = lambda o: o.gather(1, o.detach().argmax(1, keepdim=True))[:, 0]   # noqa: E731
        by_none = tf.explain(model, images, method, backend=backend)
        assert _nonzero(by_none)
        torch.testing.assert_close(tf.explain(model, images, method, target=pred, backend=backend), by_none,
                                   rtol=1e-6, atol=0)
    if method in TARGET_METHODS:  # non-vacuous: the target changes the map
        assert not torch.allclose(e_int, by_int, rtol=1e-3, atol=0)


@pytest.mark.parametrize("attention", ["materialized", "flash"])
def test_callable_target_on_triton(vit, attention, device):
    pytest.importorskip("triton")
    import copy

    model, images = copy.deepcopy(vit[0]).to(device), vit[1].to(device)  # the suite's device
    for method in ("tokentm", "legrad"):
        by_int = tf.explain(model, images, method, target=3, backend="triton", attention=attention)
        e = tf.explain(model, images, method, target=lambda o: o[:, 3], backend="triton", attention=attention)
        assert _nonzero(by_int)
        torch.testing.assert_close(e, by_int, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["hf_vit", "torchvision"])
def test_callable_equals_integer_target_on_other_families(make_model, images, family):
    """The score function sees the family's logits tensor (not its output object)."""
    model = make_model(family).eval()
    for method in ("tokentm", "legrad", "attn_gradcam"):
        by_int = tf.explain(model, images, method, target=torch.tensor([1, 3]))
        e = tf.explain(model, images, method, target=lambda out: out[:, [1, 3]].diagonal())
        torch.testing.assert_close(e, by_int, rtol=1e-6, atol=0)
        assert _nonzero(by_int)


# --------------------------------------------------------------------------- cosine similarity


def test_cosine_similarity_scores():
    out = torch.randn(3, 6, dtype=torch.float64)
    ref = torch.randn(3, 6)
    expected = (out * ref.double()).sum(1) / (out.norm(dim=1) * ref.double().norm(dim=1))
    s = cosine_similarity(ref)(out)
    assert s.dtype == torch.float64 and s.shape == (3,)
    torch.testing.assert_close(s, expected)
    shared = cosine_similarity(ref[1])(out)
    torch.testing.assert_close(shared, cosine_similarity(ref[1].expand(3, 6).clone())(out))
    assert not torch.allclose(shared, s)


@pytest.mark.parametrize("start_layer", [-2, 0])
def test_cosine_similarity_legrad_matches_literal_autograd(vit, start_layer):
    # The classifier's logits serve as the embedding (timm feature models: see below).
    model, images = vit
    ref = torch.randn(2, 5, generator=torch.Generator().manual_seed(7))
    target = cosine_similarity(ref)
    e_ref = literal_legrad(model, images, lambda out: torch.nn.functional.cosine_similarity(
        out, ref.double(), dim=-1), start_layer=start_layer)
    assert _nonzero(e_ref)
    for backend in BACKENDS:
        e = tf.explain(model, images, "legrad", target=target, backend=backend, start_layer=start_layer)
        err = rel_err_l2(e, e_ref.reshape(e.shape))
        assert (err <= 1e-5).all(), (backend, err)
    # a different reference embedding gives a different map
    other = tf.explain(model, images, "legrad", target=cosine_similarity(-ref), start_layer=start_layer)
    assert rel_err_l2(other, e_ref.reshape(other.shape)).min() > 1e-2


def test_cosine_similarity_on_a_feature_model_matches_literal_autograd(make_model, make_images):
    """A timm feature model (num_classes=0, the output is the pooled embedding), one reference per image."""
    pytest.importorskip("tokentm_fast.models")   # feature-model support lives in the model adapters
    model = make_model("timm_narrow", num_classes=0, seed=2, qkv_scale=2.0)
    images = make_images(seed=3)
    ref = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    e_ref = literal_legrad(model, images, lambda out: torch.nn.functional.cosine_similarity(
        out, ref.double(), dim=-1), start_layer=0)
    assert _nonzero(e_ref)
    for backend in BACKENDS:
        e = tf.explain(model, images, "legrad", target=cosine_similarity(ref), backend=backend, start_layer=0)
        assert e.shape == (2, 4, 4)
        assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all(), backend
    for method in ("tokentm", "gae"):
        e_ref = tf.explain(model, images, method, target=cosine_similarity(ref), backend="reference")
        e = tf.explain(model, images, method, target=cosine_similarity(ref), backend="torch")
        assert _nonzero(e_ref) and (rel_err_l2(e, e_ref) <= 1e-5).all(), method
    with pytest.raises(ValueError, match="no classifier"):
        tf.explain(model, images, "tokentm")
    with pytest.raises(ValueError, match="no classifier"):
        tf.explain(model, images, "tokentm", target=3)


def open_clip_layers(visual, images):
    """Manual float64 forward of an open_clip VisionTransformer (class-token pooling, no attention pool).

    Returns (output embedding, per-layer attention probabilities (B, H, N, N) and block outputs, LeGrad's
    layer pooling: ln_post of the mean over all tokens, then the projection).
    """
    import copy
    import math

    m = copy.deepcopy(visual).double().eval()   # parameters keep requires_grad: Aˡ stays in the graph
    x = m.conv1(images.double()).flatten(2).transpose(1, 2)
    x = torch.cat([m.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + m.positional_embedding
    x = m.ln_pre(x)
    attns, outs = [], []
    for blk in m.transformer.resblocks:
        mha = blk.attn
        b, n, dim = x.shape
        h = mha.num_heads
        qkv = blk.ln_1(x) @ mha.in_proj_weight.T + mha.in_proj_bias
        q, k, v = (t.reshape(b, n, h, dim // h).transpose(1, 2) for t in qkv.split(dim, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // h), dim=-1)
        y = x + blk.ls_1(mha.out_proj((a @ v).transpose(1, 2).reshape(b, n, dim)))
        x = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
        attns.append(a)
        outs.append(x)

    def head(tokens):   # ln_post, class token, projection
        return m.ln_post(tokens)[:, 0] @ m.proj

    def mean_pooled(tokens):   # LeGrad's layer score (the authors' compute_legrad_clip): mean of all tokens
        return m.ln_post(tokens.mean(1)) @ m.proj

    return head(x), attns, outs, mean_pooled


def test_cosine_similarity_legrad_on_open_clip_matches_literal_autograd(make_model, images):
    """LeGrad's home: open-vocabulary CLIP, s_l = cos(proj(ln_post(mean_i Xˡ[i])), text embedding)."""
    pytest.importorskip("tokentm_fast.models.open_clip")   # the open_clip adapter
    # in_proj weights doubled (model_families.spread)
    visual = make_model("open_clip", width=64, layers=3, heads=2, mlp_ratio=2).eval()
    text = torch.randn(16, generator=torch.Generator().manual_seed(2))            # one shared "prompt"
    out, attns, outs, mean_pooled = open_clip_layers(visual, images)
    torch.testing.assert_close(out.float(), visual(images), rtol=1e-4, atol=1e-5)  # the manual forward is the model
    for start_layer in (-2, 0):
        e_ref = 0
        for l in range(start_layer % 3, 3):
            s_l = torch.nn.functional.cosine_similarity(mean_pooled(outs[l]), text.double(), dim=-1).sum()
            (g,) = torch.autograd.grad(s_l, attns[l], retain_graph=True)
            e_ref = e_ref + g.clamp(min=0).mean(dim=2).mean(dim=1)
        e_ref = e_ref[:, 1:]
        assert _nonzero(e_ref)
        for backend in BACKENDS:
            e = tf.explain(visual, images, "legrad", target=cosine_similarity(text), backend=backend,
                           start_layer=start_layer)
            assert e.shape == (2, 4, 4)
            assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all(), (backend, start_layer)


FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def gradcam_tolerance(model, images, score) -> torch.Tensor:
    """Per-image float32 error bound of attention Grad-CAM (docs/methods.md §5), from what it computes.

    e = max(Σ_h α_h A_h, 0) / H with α_h the mean of the class row's gradient G_h. Each entry of A and G
    that a float32 forward and backward through L blocks produces carries a relative error of at most
    ε = 8·L·u (u = 2⁻²⁴: a few roundings per block, each of relative size u). The head sum amplifies them
    by its condition number κ = ‖Σ_h (mean|G_h| + |α_h|) A_h‖ / ‖max(Σ_h α_h A_h, 0)‖, large when heads
    of opposite α cancel (a mean of signed gradients is itself a cancelling sum). Bound: ε·κ, never below
    the 1e-5 of the well-conditioned maps (§7)."""
    logits, layers, _, _ = run_vit(model, images)
    attn = layers[-1]["attn"]
    (grad,) = torch.autograd.grad(score(logits).sum(), attn)
    p = model.num_prefix_tokens
    a, g = attn[:, :, 0, p:].detach(), grad[:, :, 0, p:]
    alpha = g.mean(-1, keepdim=True)
    value = (alpha * a).mean(1).clamp_min(0)
    kappa = ((g.abs().mean(-1, keepdim=True) + alpha.abs()) * a).mean(1).norm(dim=-1) / value.norm(dim=-1)
    eps = 8 * len(model.blocks) * FLOAT32_UNIT_ROUNDOFF
    return torch.clamp(eps * kappa, min=1e-5), (a, g)


@pytest.mark.parametrize("method", TARGET_METHODS)
def test_cosine_similarity_torch_matches_reference(vit, method):
    model, images = vit
    target = cosine_similarity(torch.randn(5, generator=torch.Generator().manual_seed(4)))
    e_ref = tf.explain(model, images, method, target=target, backend="reference")
    e = tf.explain(model, images, method, target=target, backend="torch")
    assert _nonzero(e_ref)
    bound = gradcam_tolerance(model, images, target)[0] if method == "attn_gradcam" else 1e-5
    assert (rel_err_l2(e, e_ref) <= bound).all(), (rel_err_l2(e, e_ref), bound)


def test_gradcam_tolerance_still_catches_a_wrong_map(vit):
    """The derived bound is loose only where the heads cancel, and still far below what a real mistake
    costs: α taken over the class column too (a plausible off-by-one), or the heads' weights dropped."""
    model, images = vit
    target = cosine_similarity(torch.randn(5, generator=torch.Generator().manual_seed(4)))
    bound, (a, g) = gradcam_tolerance(model, images, target)
    logits, layers, _, _ = run_vit(model, images)
    e_ref = tf.explain(model, images, "attn_gradcam", target=target, backend="reference")
    assert (bound < 1e-3).all(), bound  # the cancelling image of this model: κ ≈ 2e2
    (g_full,) = torch.autograd.grad(target(logits).sum(), layers[-1]["attn"])
    alpha_with_cls = g_full[:, :, 0, :].mean(-1, keepdim=True)
    wrong_alpha = (alpha_with_cls * a).mean(1).clamp_min(0)
    no_weights = a.mean(1)
    for wrong in (wrong_alpha, no_weights):
        assert (rel_err_l2(wrong.reshape(e_ref.shape), e_ref) > 10 * bound).all()


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("fn,error,match", [
    (lambda o: o[:, :1], ValueError, r"returned shape \(2, 1\).*shape \(2,\)"),
    (lambda o: o, ValueError, r"returned shape \(2, 5\)"),
    (lambda o: o.sum(), ValueError, r"returned shape \(\)"),
    (lambda o: o.argmax(1), TypeError, "dtype torch.int64"),
    (lambda o: o.detach()[:, 0], ValueError, "do not depend differentiably"),
    (lambda o: 1.0, TypeError, "returned a float"),
])
def test_bad_score_function_is_named(vit, fn, error, match):
    model, images = vit
    for method in ("tokentm", "legrad"):
        with pytest.raises(error, match=match):
            tf.explain(model, images, method, target=fn)


def test_ready_made_targets_check_their_arguments(vit):
    model, images = vit
    with pytest.raises(ValueError, match="out of range for an output with 5"):
        tf.explain(model, images, "tokentm", target=class_logit(5))
    with pytest.raises(ValueError, match="3 classes for a batch of 2"):
        tf.explain(model, images, "tokentm", target=class_logit(torch.tensor([0, 1, 2])))
    with pytest.raises(TypeError, match="integer tensor"):
        class_logit(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="negative"):
        class_logit(-1)
    with pytest.raises(ValueError, match="output has 5 features, the reference embeddings 4"):
        tf.explain(model, images, "legrad", target=cosine_similarity(torch.randn(4)))
    with pytest.raises(ValueError, match="3 reference embeddings for a batch of 2"):
        tf.explain(model, images, "gae", target=cosine_similarity(torch.randn(3, 5)))
    with pytest.raises(TypeError, match="floating"):
        cosine_similarity(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(D',\) or \(B, D'\)"):
        cosine_similarity(torch.randn(1, 2, 5))
    with pytest.raises(TypeError, match="score function"):
        tf.explain(model, images, "tokentm", target="cat")
    with pytest.raises(TypeError, match="bool"):
        tf.explain(model, images, "tokentm", target=True)


def test_score_function_wrapper_keeps_user_callable(vit):
    model, images = vit
    wrapped = ScoreFunction(lambda o: o[:, 4], name="logit 4")
    assert "logit 4" in repr(wrapped)
    torch.testing.assert_close(tf.explain(model, images, "legrad", target=wrapped),
                               tf.explain(model, images, "legrad", target=4), rtol=1e-6, atol=0)


def test_exports():
    assert tf.cosine_similarity is cosine_similarity and tf.class_logit is class_logit
    assert {"cosine_similarity", "class_logit"} <= set(tf.__all__)


@pytest.mark.parametrize("method", ["legrad", "attn_gradcam", "tokentm"])
def test_per_prompt_cosine_similarity_is_k_maps_from_one_forward(make_model, images, method):
    """``cosine_similarity(texts, per_prompt=True)`` with ``texts (K, D')``: ``(B, K, gh, gw)``, map k equal
    to a call with prompt k alone, from one forward pass of the model (the authors' code repeats the
    image K times)."""
    visual = make_model("open_clip").eval()
    texts = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    forwards = []
    handle = visual.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        got = tf.explain(visual, images, method, target=cosine_similarity(texts, per_prompt=True), backend="torch")
        one_forward = len(forwards)
        want = torch.stack([tf.explain(visual, images, method, target=cosine_similarity(t), backend="torch")
                            for t in texts], dim=1)
    finally:
        handle.remove()
    assert got.shape == (images.shape[0], 3, 4, 4)
    assert one_forward == 1 and len(forwards) == 4
    assert want.abs().amax(dim=(2, 3)).min() > 0 or method == "attn_gradcam"
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 2.0 ** -23 * float(want.abs().max()))
    assert not torch.equal(got[:, 0], got[:, 1])


def test_per_prompt_needs_k_prompts():
    with pytest.raises(ValueError, match=r"per_prompt=True\) takes K >= 1 prompt embeddings of shape \(K, D'\), got \(16,\)"):
        cosine_similarity(torch.randn(16), per_prompt=True)
    with pytest.raises(TypeError, match="per_prompt must be True or False"):
        cosine_similarity(torch.randn(2, 16), per_prompt="yes")
