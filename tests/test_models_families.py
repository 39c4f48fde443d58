"""Model adapters (issue 11 item 2): every family runs every method, the same weights give the same
maps across families, the attention call-site hook is exact, and every model comes back unchanged."""
import pytest
import torch

import model_families as mf
import tokentm_fast as tf
from test_model_restored import assert_same, snapshot
from tokentm_fast.models import adapt

CLASSIFIERS = {
    "timm": mf.timm_vit,
    "hf_vit": mf.hf_vit_classifier,
    "hf_deit_teacher": mf.hf_deit_teacher,
    "torchvision": mf.torchvision_vit,
}
EMBEDDERS = {
    "timm_headless": lambda: mf.timm_vit(num_classes=0),
    "hf_vit_model": mf.hf_vit_model,
    "hf_clip_proj": mf.hf_clip_vision,
    "hf_clip": lambda: mf.hf_clip_vision(projection=False),
    "open_clip": mf.open_clip_visual,
    "open_clip_avg_ls": lambda: mf.open_clip_visual(pool_type="avg", ls_init_value=0.3, final_ln_after_pool=True),
}
FAMILIES = {**CLASSIFIERS, **EMBEDDERS}


def softmax_core(l, q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v


@pytest.mark.parametrize("name", list(FAMILIES))
def test_replace_attention_is_exact_and_undone(name):
    model = FAMILIES[name]().eval()
    vit = adapt(model)
    x = mf.images()
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


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_method_runs(name, backend):
    model = CLASSIFIERS[name]()
    model.train()
    snap = snapshot(model)
    x = mf.images()
    n = mf.SIZE // mf.PATCH
    for method in tf.METHODS:
        e = tf.explain(model, x, method, backend=backend)
        assert e.shape == (2, n, n) and e.dtype == torch.float32, method
        assert torch.isfinite(e).all(), method
        if method != "attn_gradcam":  # Grad-CAM may legitimately be all zero on a random model
            assert e.abs().max() > 0, method
    assert_same(model, snap)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reference_equals_torch(name):
    """The reference (float64, family-free) and the fast path agree for every family."""
    model = FAMILIES[name]().train()
    snap = snapshot(model)
    x = mf.images()
    head = adapt(model).head
    target = None if name in CLASSIFIERS else (lambda out: out[:, 0] - out[:, 1])
    for method in tf.METHODS:
        ref = tf.explain(model, x, method, backend="reference", target=target)
        fast = tf.explain(model, x, method, backend="torch", target=target)
        if method != "attn_gradcam":
            assert ref.abs().max() > 0, method
        scale = ref.abs().max().clamp_min(1e-12)
        assert ((fast - ref).abs().max() / scale) <= 1e-5, (method, head)
    assert_same(model, snap)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_triton_backend(name, device):
    """The Triton backend on the suite's device (a copy of the model there) against the torch map on the CPU."""
    import copy

    model = FAMILIES[name]()
    x = mf.images(batch=1)
    on_device = copy.deepcopy(model).to(device)
    target = None if name in CLASSIFIERS else (lambda out: out[:, 0] - out[:, 1])
    for method in tf.METHODS:
        tri = tf.explain(on_device, x.to(device), method, backend="triton", target=target).cpu()
        ref = tf.explain(model, x, method, backend="torch", target=target)
        assert tri.shape == ref.shape and torch.isfinite(tri).all(), method
        if method == "attn_gradcam" and ref.abs().max() == 0:
            assert tri.abs().max() == 0
            continue
        assert ref.abs().max() > 0, method
        assert ((tri - ref).abs().max() / ref.abs().max()) <= 1e-4, method


def test_same_weights_same_maps_across_families():
    """timm → Hugging Face ViTForImageClassification and torchvision VisionTransformer (converters in
    tests/model_families.py): identical logits and identical maps for every method and backend."""
    src = mf.timm_vit()
    others = {"hf": mf.timm_to_hf_vit(src), "torchvision": mf.timm_to_torchvision(src)}
    x = mf.images()
    with torch.no_grad():
        logits = src.eval()(x)
        assert logits.std() > 1e-3
        for name, m in others.items():
            assert (adapt(m).forward(x) - logits).abs().max() <= 1e-5, name
    target = torch.tensor([1, 3])
    for method in tf.METHODS:
        for backend in ("reference", "torch"):
            e = tf.explain(src, x, method, backend=backend, target=target)
            scale = e.abs().max()
            if method != "attn_gradcam":
                assert scale > 0
            for name, m in others.items():
                e2 = tf.explain(m, x, method, backend=backend, target=target)
                assert (e2 - e).abs().max() <= 1e-5 * max(float(scale), 1.0), (method, backend, name)


def test_adapt_picks_by_class():
    from tokentm_fast.models.hf import HFViT
    from tokentm_fast.models.open_clip import OpenClipViT
    from tokentm_fast.models.timm import TimmViT
    from tokentm_fast.models.torchvision import TorchvisionViT

    expected = {"timm": TimmViT, "hf_vit": HFViT, "hf_deit_teacher": HFViT, "torchvision": TorchvisionViT,
                "hf_clip": HFViT, "open_clip": OpenClipViT}
    for name, cls in expected.items():
        vit = adapt(FAMILIES[name]())
        assert type(vit) is cls
        assert adapt(vit) is vit
    assert adapt(FAMILIES["hf_deit_teacher"]()).num_prefix_tokens == 2
    assert adapt(FAMILIES["open_clip"]()).num_classes is None
    assert adapt(FAMILIES["timm_headless"]()).num_classes is None


def test_embedding_model_needs_a_score_function():
    model = mf.hf_clip_vision()
    with pytest.raises(ValueError, match="no classifier"):
        tf.explain(model, mf.images())


def test_restored_when_the_call_raises():
    model = mf.torchvision_vit().train()
    snap = snapshot(model)

    def bad_score(out):
        raise RuntimeError("boom")

    for method in ("tokentm", "legrad"):
        with pytest.raises(RuntimeError, match="boom"):
            tf.explain(model, mf.images(), method, target=bad_score)
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
