"""tokentm_fast/models (the adapters, issue 11 item 2): every family runs every method, the same weights
give the same maps across families (timm weights copied into Hugging Face ViT and CLIP, torchvision and
open_clip models by the converters of tests/model_families.py), the attention call-site hook is exact,
and every model comes back unchanged.

Every map a comparison reads is asserted informative first (tests/helpers.py): attention Grad-CAM takes, per
family, targets whose map its clamp does not zero (``GRADCAM_TARGETS``), and is asserted zero, as
docs/methods.md §5 says, where a class token is not what the model pools (``GRADCAM_ZERO``); Transformer
Attribution of such a mean-pooled model takes a scaled score (``LOUD``)."""
import lrp_oracle
import model_families as mf
import pytest
import torch
from helpers import assert_informative, rel_err_l2
from model_families import CLASSIFIERS, FAMILIES, assert_same, snapshot

import tokentm_fast as tf
from tokentm_fast.models import adapt


def softmax_core(l, q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v


@pytest.mark.parametrize("name", list(FAMILIES))
def test_replace_attention_is_exact_and_undone(make_model, images, name):
    model = make_model(name).eval()
    vit = adapt(model)
    x = images
    snap = snapshot(model)
    with torch.no_grad():
        before = vit.forward(x)
        calls, handles = [], []

        def core(l, q, k, v, scale):
            calls.append((l, tuple(q.shape), scale))
            return softmax_core(l, q, k, v, scale)

        vit.replace_attention(range(vit.num_layers), core, handles)
        patched = vit.forward(x)
        for h in handles:
            h.remove()
        after = vit.forward(x)
        # a wrong core changes the output: the hook is really on the call site
        handles = []
        vit.replace_attention([vit.num_layers - 1], lambda l, q, k, v, s: v, handles)
        wrong = vit.forward(x)
        for h in handles:
            h.remove()
    n = mf.SIZE // mf.PATCH
    tokens = n * n + vit.num_prefix_tokens
    d = mf.WIDTH // mf.HEADS
    assert calls == [(l, (2, mf.HEADS, tokens, d), pytest.approx(d ** -0.5)) for l in range(mf.DEPTH)]
    assert before.abs().max() > 1e-3
    assert (patched - before).abs().max() <= 1e-6 * before.abs().max()  # float32: a few ulps of the output
    assert torch.equal(after, before)
    assert (wrong - before).abs().max() > 1e-4
    assert_same(model, snap)
    assert not any("forward" in m.__dict__ for m in model.modules())


#: methods whose float32 maps cancel: signed sums of gradient × activation terms (docs/methods.md §6.2) and
#: the LRP rules' divisions by sums that cancel (§6.3, "Precision"); compared on float64 copies
SIGNED_SUMS = ("attcat", "conservative_lrp", "lrp", "partial_lrp", "transformer_attribution")
#: the relevance pass does not cover a distilled model's two heads (docs/methods.md §6.3; tests/test_relevance_lrp.py)
RELEVANCE_PASS = lrp_oracle.METHODS


def score_for(method: str, score):
    """The embedders' score ``out[:, 0] − out[:, 1]`` puts relevance summing to 0 at the output, which the
    relevance pass's rescaled residual rule passes on as 0 everywhere (docs/methods.md §6.3): those methods
    take ``out[:, 0] − ½ out[:, 1]``."""
    if score is None or method not in RELEVANCE_PASS:
        return score
    return lambda out: out[:, 0] - 0.5 * out[:, 1]


def methods_for(name: str) -> tuple:
    """The methods family ``name`` runs (the others refuse it with a message naming the part)."""
    return tuple(m for m in tf.METHODS if not (name == "hf_deit_teacher" and m in RELEVANCE_PASS))


#: families with a class token that pool the mean of the patch tokens: attention Grad-CAM reads the class
#: row, which never reaches the output, so its map is zero by definition (docs/methods.md §5)
GRADCAM_ZERO = ("open_clip_avg_ls",)
#: per image of ``make_images()``, a class (output channel for an embedder) whose attention Grad-CAM map is
#: informative (on these random models its clamp zeroes the map of many targets, the predicted class's
#: too) and well conditioned (heads of opposite α that nearly cancel leave a float32 map 1e-5 off,
#: tests/test_targets.py::gradcam_tolerance; these are within 1e-6)
GRADCAM_TARGETS = {"timm": [2, 3], "hf_vit": [3, 1], "hf_deit_teacher": [4, 3], "torchvision": [2, 4],
                   "timm_headless": [8, 9], "hf_vit_model": [9, 7], "hf_clip_proj": [2, 2], "hf_clip": [11, 11],
                   "open_clip": [3, 3]}
#: Transformer Attribution of a mean-pooled model with a class token is 1/n (the identity's share of the
#: pooled rows) plus the rolled-out mean_h max(∇A ⊙ R^A, 0), 1e-4 of it on the random models: its score is
#: multiplied by LOUD, which scales both R (the score's gradient) and ∇A, so that the map varies by 50 %+
LOUD = 1e3


def target_for(name: str, method: str, target):
    """The target family ``name``'s ``method`` map is compared under: ``target`` (None: the predicted class,
    or a score function), except for attention Grad-CAM (``GRADCAM_TARGETS``), the relevance pass on an
    embedder (:func:`score_for`) and Transformer Attribution on a mean-pooled model (× ``LOUD``)."""
    if method == "attn_gradcam" and name in GRADCAM_TARGETS:
        chosen = torch.tensor(GRADCAM_TARGETS[name])
        return chosen if name in CLASSIFIERS else tf.class_logit(chosen)
    score = score_for(method, target)
    if method == "transformer_attribution" and name in GRADCAM_ZERO:
        return lambda out: LOUD * score(out)
    return score


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_method_runs(make_model, images, name, backend):
    model = make_model(name)
    model.train()
    snap = snapshot(model)
    x = images
    n = mf.SIZE // mf.PATCH
    for method in methods_for(name):
        e = tf.explain(model, x, method, backend=backend)
        assert e.shape == (2, n, n) and e.dtype == torch.float32, method
        assert torch.isfinite(e).all(), method
        if method != "attn_gradcam":  # Grad-CAM may legitimately be all zero on a random model
            assert e.abs().max() > 0, method
    assert_same(model, snap)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reference_equals_torch(make_model, images, name):
    """The reference (float64, family-free) and the fast path agree for every family, on informative maps;
    attention Grad-CAM where it is zero by definition is zero on both."""
    model = make_model(name).train()
    snap = snapshot(model)
    x = images
    head = adapt(model).head
    target = None if name in CLASSIFIERS else (lambda out: out[:, 0] - out[:, 1])
    for method in methods_for(name):
        if method in SIGNED_SUMS:
            continue
        ref = tf.explain(model, x, method, backend="reference", target=target_for(name, method, target))
        fast = tf.explain(model, x, method, backend="torch", target=target_for(name, method, target))
        if method == "attn_gradcam" and name in GRADCAM_ZERO:
            assert ref.abs().max() == 0 and fast.abs().max() == 0, "§5: Grad-CAM of a mean-pooled model is 0"
            continue
        assert_informative(ref)
        scale = ref.abs().max()
        assert ((fast - ref).abs().max() / scale) <= 1e-5, (method, head)
    assert_same(model, snap)
    # gradient × activation maps are signed sums whose float32 cancellation depends on the model (the
    # random DeiT's ATTCAT map is 1e-9 of its terms): compared on a float64 copy, where nothing cancels away
    model64 = make_model(name).double()
    for method in (m for m in SIGNED_SUMS if m in methods_for(name)):
        ref = tf.explain(model64, x.double(), method, backend="reference", target=target_for(name, method, target))
        fast = tf.explain(model64, x.double(), method, backend="torch", target=target_for(name, method, target))
        assert_informative(ref)
        assert ((fast - ref).abs().max() / ref.abs().max()) <= 1e-10, (method, head)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_triton_backend(make_model, make_images, name, device):
    """The Triton backend on the suite's device (a copy of the model there) against the torch map on the CPU,
    two images, informative maps (attention Grad-CAM zero on both where it is so by definition)."""
    import copy

    model = make_model(name)
    x = make_images()
    on_device = copy.deepcopy(model).to(device)
    target = None if name in CLASSIFIERS else (lambda out: out[:, 0] - out[:, 1])
    # the torch map on the Triton call's path: on the CPU (interpreter) that is the materialized one, which the
    # torch backend leaves at this size for lrp and partial LRP (their flash twin differs by float32 rounding)
    same_path = {"attention": "materialized"} if torch.device(device).type == "cpu" else {}
    for method in methods_for(name):
        t = target_for(name, method, target)
        t_dev = t.to(device) if isinstance(t, torch.Tensor) else t
        tri = tf.explain(on_device, x.to(device), method, backend="triton", target=t_dev).cpu()
        ref = tf.explain(model, x, method, backend="torch", target=t, **same_path)
        assert tri.shape == ref.shape and torch.isfinite(tri).all(), method
        if method == "attn_gradcam" and name in GRADCAM_ZERO:
            assert ref.abs().max() == 0 and tri.abs().max() == 0, "§5: Grad-CAM of a mean-pooled model is 0"
            continue
        assert_informative(ref)
        assert ((tri - ref).abs().max() / ref.abs().max()) <= 1e-4, method


def test_same_weights_same_maps_across_families(make_model, images):
    """timm → Hugging Face ViTForImageClassification and torchvision VisionTransformer (converters in
    tests/model_families.py): identical logits and identical maps for every method and backend."""
    src = make_model("timm")
    others = {"hf": mf.timm_to_hf_vit(src), "torchvision": mf.timm_to_torchvision(src)}
    x = images
    with torch.no_grad():
        logits = src.eval()(x)
        assert logits.std() > 1e-3
        for name, m in others.items():
            assert (adapt(m).forward(x) - logits).abs().max() <= 1e-5, name
    target = torch.tensor([1, 3])                      # classes whose Grad-CAM maps are informative too
    for method in tf.METHODS:
        for backend in ("reference", "torch"):
            e = tf.explain(src, x, method, backend=backend, target=target)
            assert_informative(e)
            scale = e.abs().max()
            for name, m in others.items():
                e2 = tf.explain(m, x, method, backend=backend, target=target)
                assert (e2 - e).abs().max() <= 1e-5 * max(float(scale), 1.0), (method, backend, name)


# timm settings under which a timm ViT computes what each CLIP image tower computes (model_families.timm_clip),
# and the converter that copies its weights into that tower
CLIP_TOWERS = {
    "open_clip": (dict(act_layer="gelu"), mf.timm_to_open_clip),
    "open_clip_avg_ls": (dict(act_layer="gelu", global_pool="avg", init_values=0.3), mf.timm_to_open_clip),
    "hf_clip_proj": (dict(act_layer="quick_gelu"), mf.timm_to_hf_clip),
    "hf_clip": (dict(act_layer="quick_gelu", num_classes=0), mf.timm_to_hf_clip),
}


#: per tower, the seed of the (B, D') reference embeddings of the cosine-similarity target: one under which
#: attention Grad-CAM's map is informative for both images (its clamp zeroes it for others)
CLIP_COSINE_SEEDS = {"open_clip": 2, "open_clip_avg_ls": 2, "hf_clip_proj": 2, "hf_clip": 0}


@pytest.fixture(scope="module", params=list(CLIP_TOWERS))
def clip_tower(request, make_model, make_images):
    """``(tower name, timm model, CLIP tower with its weights, images)``, all float64."""
    timm_kwargs, convert = CLIP_TOWERS[request.param]
    src = make_model("timm_clip", **timm_kwargs).double().eval()
    return request.param, src, convert(src).double().eval(), make_images().double()


def tower_output(model, x):
    """The output as the CLIP library defines it (not through the adapters): open_clip's projected pooled
    token, Hugging Face's ``image_embeds`` (with projection) or ``pooler_output``."""
    if not hasattr(model, "config"):
        return model(x)
    out = model(pixel_values=x)
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


def test_clip_tower_computes_the_timm_function(clip_tower):
    """The converters are right: the same output from the timm model and the CLIP tower, float64."""
    _, src, tower, x = clip_tower
    with torch.no_grad():
        want = src(x)
        got = tower_output(tower, x)
        assert want.std() > 1e-2
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        assert (adapt(tower).forward(x) - got).abs().max() <= 1e-12 * want.abs().max()  # the adapter's output


@pytest.mark.parametrize("target_kind", ["class_logit", "cosine_similarity"])
def test_clip_tower_maps_equal_timm_maps(clip_tower, target_kind):
    """Every method's map through the open_clip / Hugging Face CLIP adapter equals the map through the timm
    adapter (float64 models: relative error < 1e-5), with a score function of the embedding: output channel
    3, or the cosine similarity to one reference embedding per image (``CLIP_COSINE_SEEDS``). Every map is
    informative, except attention Grad-CAM of the mean-pooled tower, zero on both by definition (§5);
    Transformer Attribution of that tower takes the score × ``LOUD``."""
    name, src, tower, x = clip_tower
    if target_kind == "class_logit":
        target = tf.class_logit(3)
    else:
        dim = src.num_classes or src.num_features
        g = torch.Generator().manual_seed(CLIP_COSINE_SEEDS[name])
        target = tf.cosine_similarity(torch.randn(x.shape[0], dim, dtype=torch.float64, generator=g))
    mean_pooled = src.global_pool == "avg"
    snap = snapshot(tower)
    for method in tf.METHODS:
        score = (lambda out: LOUD * target(out)) if mean_pooled and method == "transformer_attribution" else target
        want = tf.explain(src, x, method, backend="torch", target=score)
        got = tf.explain(tower, x, method, backend="torch", target=score)
        assert got.shape == want.shape == (2, mf.SIZE // mf.PATCH, mf.SIZE // mf.PATCH), method
        if mean_pooled and method == "attn_gradcam":
            assert want.abs().max() == 0 and got.abs().max() == 0, "§5: Grad-CAM of a mean-pooled model is 0"
            continue
        assert_informative(want)
        assert (rel_err_l2(got, want) <= 1e-5).all(), method
    assert_same(tower, snap)


def test_adapt_picks_by_class(make_model):
    from tokentm_fast.models.hf import HFViT
    from tokentm_fast.models.open_clip import OpenClipViT
    from tokentm_fast.models.timm import TimmViT
    from tokentm_fast.models.torchvision import TorchvisionViT

    expected = {"timm": TimmViT, "hf_vit": HFViT, "hf_deit_teacher": HFViT, "torchvision": TorchvisionViT,
                "hf_clip": HFViT, "open_clip": OpenClipViT}
    for name, cls in expected.items():
        vit = adapt(make_model(name))
        assert type(vit) is cls
        assert adapt(vit) is vit
    assert adapt(make_model("hf_deit_teacher")).num_prefix_tokens == 2
    assert adapt(make_model("open_clip")).num_classes is None
    assert adapt(make_model("timm_headless")).num_classes is None


def test_embedding_model_needs_a_score_function(make_model, images):
    model = make_model("hf_clip_proj")
    with pytest.raises(ValueError, match="no classifier"):
        tf.explain(model, images)


def test_restored_when_the_call_raises(make_model, images):
    model = make_model("torchvision").train()
    snap = snapshot(model)

    def bad_score(out):
        raise RuntimeError("boom")

    for method in ("tokentm", "legrad"):
        with pytest.raises(RuntimeError, match="boom"):
            tf.explain(model, images, method, target=bad_score)
        assert_same(model, snap)
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_missing_extra_is_named(monkeypatch):
    """A family whose package is not installed is named with its pip extra; a model of a family whose
    adapter cannot load gives an ImportError naming the extra."""
    import sys
    import types

    import tokentm_fast.models as models

    fake = models.Family("fake", "tokentm_fake_family_pkg", "no_such_adapter_module", "fake", "fake ViT")
    monkeypatch.setattr(models, "FAMILIES", models.FAMILIES + [fake])
    with pytest.raises(TypeError, match=r'tokentm_fake_family_pkg is not installed \(pip install "tokentm_fast\[fake\]"'):
        adapt(torch.nn.Linear(2, 2))
    monkeypatch.setitem(sys.modules, "tokentm_fake_family_pkg", types.ModuleType("tokentm_fake_family_pkg"))
    FakeViT = type("FakeViT", (torch.nn.Module,), {"__module__": "tokentm_fake_family_pkg.models"})
    with pytest.raises(ImportError, match=r'pip install "tokentm_fast\[fake\]"'):
        adapt(FakeViT())
