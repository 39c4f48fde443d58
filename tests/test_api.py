"""explain(): reference and torch backends against the independent spec oracle."""
import pytest
import timm
import torch

import tokentm_fast as tf
from spec_oracle import explain as oracle
from spec_oracle import rel_err

TOL = {"reference": 1e-5, "torch": 1e-5}  # spec §7: float32 fast path vs float64 oracle

# name -> (timm name, kwargs, image size, batch)
MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", {}, 224, 1),
    "vit_tiny_b3": ("vit_tiny_patch16_224", {"img_size": 128, "depth": 6}, 128, 3),
    "deit3_small_layerscale": ("deit3_small_patch16_224", {"img_size": 96}, 96, 1),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4, "img_size": 112}, 112, 2),
    "avg_pool_cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "img_size": 64, "depth": 4}, 64, 2),
    "avg_pool_no_cls": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": True,
                                                 "reg_tokens": 2, "img_size": 80, "depth": 4}, 80, 3),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 3}, 64, 2),
    "non_square": ("vit_tiny_patch16_224", {"img_size": (96, 64), "depth": 3}, (96, 64), 2),
}


def make(name, seed=0):
    timm_name, kwargs, size, batch = MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, num_classes=7, **kwargs)
    # Random init leaves LayerScale at 1e-6 and attention nearly uniform;
    # spread the weights so that every term of every method matters. (Much
    # sharper attention makes the *model's own* float32 forward differ from its
    # float64 forward by more than 1e-5 after Grad-CAM's cancellations; the
    # float64 test below checks the algorithm itself without that noise.)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.1)
            elif "qkv.weight" in n:
                p.mul_(2.0)
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


CASES = [(m, meth) for m in MODELS for meth in tf.METHODS]


@pytest.mark.parametrize("model_name,method", CASES)
def test_backends_match_oracle(model_name, method):
    model, images = make(model_name)
    e_ref = oracle(model, images, method)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method=method, backend=backend)
        assert e.dtype == torch.float32
        gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
        assert e.shape == (images.shape[0], gh, gw)
        assert torch.isfinite(e).all()
        err = rel_err(e, e_ref.reshape(e.shape))
        assert (err <= TOL[backend]).all(), (backend, err)
    if (model_name, method) == ("avg_pool_cls", "attn_gradcam"):
        # mean pooling never reads the class token: its row of G is zero, so is the map (spec §5)
        assert e_ref.abs().max() == 0
    elif method == "attn_gradcam" and e_ref.abs().max() == 0:
        # Grad-CAM clips negative evidence: for some classes every patch is clipped.
        # Then compare on the classes whose map is not all zero (at least one must exist).
        nonzero = 0
        for t in range(7):
            e_t = oracle(model, images, method, target=t)
            if e_t.abs().max() > 0:
                nonzero += 1
                e = tf.explain(model, images, method, target=t, backend="torch")
                assert (rel_err(e, e_t.reshape(e.shape)) <= TOL["torch"]).all()
        assert nonzero > 0
    else:
        assert e_ref.abs().max() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("model_name", ["vit_tiny_b3", "avg_pool_no_cls"])
@pytest.mark.parametrize("method", tf.METHODS)
def test_float64_model_is_exact(model_name, method):
    """With a float64 model the fast path has no float32 noise left: it is the spec to ~1e-12."""
    model, images = make(model_name)
    model = model.double()
    e_ref = oracle(model, images, method)
    e = tf.Explainer(model, method, backend="torch")
    out = e(images.double())
    assert (rel_err(out, e_ref.reshape(out.shape)) <= 1e-6).all()  # output is float32: 6e-8 rounding


@pytest.mark.parametrize("options", [
    {"head_fusion": "decoupled"},
    {"use_length": False},
    {"use_necc": False},
    {"use_length": False, "use_necc": False, "init": "identity"},
    {"start_layer": 5},
])
def test_tokentm_options(options):
    model, images = make("vit_tiny")
    e_ref = oracle(model, images, "tokentm", **options)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, "tokentm", backend=backend, **options)
        assert (rel_err(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@pytest.mark.parametrize("method,options", [("rollout", {"start_layer": 3}), ("legrad", {"start_layer": 0}),
                                            ("legrad", {"start_layer": -5}), ("legrad", {"start_layer": 11})])
def test_start_layer_options(method, options):
    model, images = make("vit_tiny")
    e_ref = oracle(model, images, method, **options)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method, backend=backend, **options)
        assert (rel_err(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@pytest.mark.parametrize("target", [3, torch.tensor([0, 6]), torch.tensor(5)])
@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam", "gae"])
def test_explicit_targets(method, target):
    model, images = make("registers")
    e_ref = oracle(model, images, method, target=target if not isinstance(target, torch.Tensor) or target.dim()
                   else int(target))
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method, target=target, backend=backend)
        assert (rel_err(e, e_ref.reshape(e.shape)) <= 1e-5).all()


def test_target_changes_the_map():
    model, images = make("vit_tiny")
    a = tf.explain(model, images, "tokentm", target=1, backend="torch")
    b = tf.explain(model, images, "tokentm", target=2, backend="torch")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["tokentm", "gae", "rollout"])
def test_full_matrix(method):
    model, images = make("avg_pool_cls")
    c_ref = oracle(model, images, method, full=True)
    for backend in ("reference", "torch"):
        c = tf.explain(model, images, method, backend=backend, full=True)
        n = c_ref.shape[-1]
        assert c.shape == (images.shape[0], n, n)
        assert (rel_err(c, c_ref) <= 1e-5).all()
    # the row the map reads is row cls of the full matrix
    row = tf.explain(model, images, method, backend="torch")
    assert torch.allclose(row.flatten(1), c[:, 0, model.num_prefix_tokens:], rtol=1e-5, atol=1e-7)


def test_batch_independence():
    """Explaining a batch equals explaining each image alone."""
    model, images = make("vit_tiny")
    batch = tf.explain(model, images, "tokentm", backend="torch")
    for i in range(images.shape[0]):
        one = tf.explain(model, images[i:i + 1], "tokentm", backend="torch")
        assert (rel_err(one, batch[i:i + 1]) <= 1e-5).all()


def test_dynamic_image_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, dynamic_img_size=True, depth=3)
    images = torch.randn(2, 3, 64, 96)
    e = tf.explain(model, images, "tokentm", backend="torch")
    assert e.shape == (2, 4, 6)
    assert (rel_err(e, oracle(model, images, "tokentm").reshape(e.shape)) <= 1e-5).all()


def test_explainer_reuse_matches_explain():
    model, images = make("vit_tiny")
    ex = tf.Explainer(model, method="legrad", backend="torch")
    assert torch.equal(ex(images), tf.explain(model, images, "legrad", backend="torch"))
    assert torch.equal(ex(images[:1]), tf.explain(model, images[:1], "legrad", backend="torch"))


def test_auto_backend_on_cpu_is_torch():
    model, images = make("vit_tiny")
    assert tf.Explainer(model, backend="auto").backend_for(images) == "torch"
