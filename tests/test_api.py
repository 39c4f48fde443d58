"""tokentm_fast's entry point, ``explain`` / ``Explainer`` (tokentm_fast/api.py).

- every backend against the independent float64 spec oracle (tests/spec_oracle.py, written from
  docs/methods.md), on timm models of every supported kind, with the methods' options;
- ``backend="triton"`` end to end on the suite's device (``device`` fixture, tests/conftest.py: the CPU
  under Triton's interpreter, or CUDA). Models and images are built on the CPU, where the float64 oracle
  runs on them; the explanation gets a copy of the model and the images on the device. On CUDA the suite
  switches TF32 off, so torch's matmuls, cuDNN's convolutions and the attention kernels multiply in full
  float32 and the float32 tolerances are those of the CPU;
- the layer choice beyond ``start_layer`` (issue 15) for the methods that aggregate over blocks
  (rollout's product, LeGrad's sum, TokenTM's depth ablation: only the chosen blocks update C):
  ``end_layer=`` and ``layers=[...]``, on every backend and path, against the oracle;
- bad input gets a clear error that names the problem (issue: foundation, item 5);
- clear messages for a meta-device target and a score function that mixes images; compiled /
  DataParallel models are unwrapped and explained as the underlying model (issue 15 item 9);
- issue 26: a constant map raises a ConstantMapWarning (images, method, cause) once per call site; a
  model in train mode is explained in eval mode and restored; float64 images to a float32 model are said.
"""
import copy
import os
import warnings

import pytest
import torch
from helpers import rel_err_l2
from spec_oracle import METHODS as ORACLE_METHODS
from spec_oracle import explain as oracle
from timm.models.vision_transformer import ResPostBlock

import tokentm_fast as tf
from tokentm_fast.kernels import triton_available
from tokentm_fast.methods import REGISTRY
from tokentm_fast.models import adapt, unwrap

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


@pytest.fixture(scope="module")
def spec_case(make_model, make_images):
    """``spec_case(name) -> (model, images)`` of the ``MODELS`` table, 7 classes.

    Random init leaves LayerScale at 1e-6 and attention nearly uniform; the weights are sharpened
    (model_families.sharpen) so that every term of every method matters. (Much sharper attention makes
    the *model's own* float32 forward differ from its float64 forward by more than 1e-5 after Grad-CAM's
    cancellations; the float64 test below checks the algorithm itself without that noise.)"""
    def build(name):
        timm_name, kwargs, size, batch = MODELS[name]
        model = make_model("timm_model", name=timm_name, num_classes=7, sharp=True, **kwargs)
        return model, make_images(batch=batch, size=size)
    return build


#: the methods tests/spec_oracle.py writes out; the LRP relevance pass has its own oracle (tests/lrp_oracle.py,
#: tests/test_relevance_lrp.py), and test_every_method_has_an_oracle keeps the two lists covering tf.METHODS
CASES = [(m, meth) for m in MODELS for meth in ORACLE_METHODS]


def test_every_method_has_an_oracle():
    import lrp_oracle

    relevance_pass = {m for m in tf.METHODS if hasattr(lrp_oracle, m)}
    assert relevance_pass == {"lrp", "partial_lrp", "transformer_attribution"}
    assert set(ORACLE_METHODS) | relevance_pass == set(tf.METHODS)
    assert not set(ORACLE_METHODS) & relevance_pass


@pytest.mark.parametrize("model_name,method", CASES)
def test_backends_match_oracle(spec_case, model_name, method):
    model, images = spec_case(model_name)
    e_ref = oracle(model, images, method)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method=method, backend=backend)
        assert e.dtype == torch.float32
        gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
        assert e.shape == (images.shape[0], gh, gw)
        assert torch.isfinite(e).all()
        err = rel_err_l2(e, e_ref.reshape(e.shape))
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
                assert (rel_err_l2(e, e_t.reshape(e.shape)) <= TOL["torch"]).all()
        assert nonzero > 0
    else:
        assert e_ref.abs().max() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("model_name", ["vit_tiny_b3", "avg_pool_no_cls"])
@pytest.mark.parametrize("method", ORACLE_METHODS)
def test_float64_model_is_exact(spec_case, model_name, method):
    """With a float64 model the fast path has no float32 noise left: it is the spec to ~1e-12."""
    model, images = spec_case(model_name)
    model = model.double()
    e_ref = oracle(model, images, method)
    e = tf.Explainer(model, method, backend="torch")
    out = e(images.double())
    assert (rel_err_l2(out, e_ref.reshape(out.shape)) <= 1e-6).all()  # output is float32: 6e-8 rounding


@pytest.mark.parametrize("options", [
    {"head_fusion": "decoupled"},
    {"use_length": False},
    {"use_necc": False},
    {"use_length": False, "use_necc": False, "init": "identity"},
    {"start_layer": 5},
])
def test_tokentm_options(spec_case, options):
    model, images = spec_case("vit_tiny")
    e_ref = oracle(model, images, "tokentm", **options)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, "tokentm", backend=backend, **options)
        assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@pytest.mark.parametrize("method,options", [("rollout", {"start_layer": 3}), ("legrad", {"start_layer": 0}),
                                            ("legrad", {"start_layer": -5}), ("legrad", {"start_layer": 11})])
def test_start_layer_options(spec_case, method, options):
    model, images = spec_case("vit_tiny")
    e_ref = oracle(model, images, method, **options)
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method, backend=backend, **options)
        assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@pytest.mark.parametrize("target", [3, torch.tensor([0, 6]), torch.tensor(5)])
@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam", "gae"])
def test_explicit_targets(spec_case, method, target):
    model, images = spec_case("registers")
    e_ref = oracle(model, images, method, target=target if not isinstance(target, torch.Tensor) or target.dim()
                   else int(target))
    for backend in ("reference", "torch"):
        e = tf.explain(model, images, method, target=target, backend=backend)
        assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all()


def test_target_changes_the_map(spec_case):
    model, images = spec_case("vit_tiny")
    a = tf.explain(model, images, "tokentm", target=1, backend="torch")
    b = tf.explain(model, images, "tokentm", target=2, backend="torch")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["tokentm", "gae", "rollout"])
def test_full_matrix(spec_case, method):
    model, images = spec_case("avg_pool_cls")
    c_ref = oracle(model, images, method, full=True)
    for backend in ("reference", "torch"):
        c = tf.explain(model, images, method, backend=backend, full=True)
        n = c_ref.shape[-1]
        assert c.shape == (images.shape[0], n, n)
        assert (rel_err_l2(c, c_ref) <= 1e-5).all()
    # the row the map reads is row cls of the full matrix
    row = tf.explain(model, images, method, backend="torch")
    assert torch.allclose(row.flatten(1), c[:, 0, model.num_prefix_tokens:], rtol=1e-5, atol=1e-7)


def test_batch_independence(spec_case):
    """Explaining a batch equals explaining each image alone."""
    model, images = spec_case("vit_tiny")
    batch = tf.explain(model, images, "tokentm", backend="torch")
    for i in range(images.shape[0]):
        one = tf.explain(model, images[i:i + 1], "tokentm", backend="torch")
        assert (rel_err_l2(one, batch[i:i + 1]) <= 1e-5).all()


def test_dynamic_image_size(make_model, make_images):
    model = make_model("timm_model", dynamic_img_size=True, depth=3)
    images = make_images(size=(64, 96))
    e = tf.explain(model, images, "tokentm", backend="torch")
    assert e.shape == (2, 4, 6)
    assert (rel_err_l2(e, oracle(model, images, "tokentm").reshape(e.shape)) <= 1e-5).all()


def test_explainer_reuse_matches_explain(spec_case):
    model, images = spec_case("vit_tiny")
    ex = tf.Explainer(model, method="legrad", backend="torch")
    assert torch.equal(ex(images), tf.explain(model, images, "legrad", backend="torch"))
    assert torch.equal(ex(images[:1]), tf.explain(model, images[:1], "legrad", backend="torch"))


def test_auto_backend_on_cpu_is_torch(spec_case):
    model, images = spec_case("vit_tiny")
    assert tf.Explainer(model, backend="auto").backend_for(images) == "torch"


# -- backend="triton" end to end -----------------------------------------------------------------------
_SUITE_DEVICE = os.environ.get("TOKENTM_TEST_DEVICE", "cpu")  # set by tests/conftest.py
needs_triton = pytest.mark.skipif(not triton_available(_SUITE_DEVICE),
                                  reason=f"Triton cannot run on {_SUITE_DEVICE} here (cpu: TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def small_model(make_model):
    """``small_model(**kw)``: timm vit_tiny on 40x40 images (8x8 patches), 3 blocks, 6 classes, qkv doubled."""
    return lambda **kwargs: make_model("timm_tiny", num_classes=6, img_size=40, depth=3, sharp=True, **kwargs)


def triton_explain(model, images, method, device, dtype=None, **kwargs):
    """``explain(backend="triton")`` of a copy of the (CPU) model on ``device``; the map back on the CPU."""
    on_device = copy.deepcopy(model).to(device=device, dtype=dtype)
    return tf.explain(on_device, images.to(device), method, backend="triton", **kwargs).cpu()


@needs_triton
@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}])
@pytest.mark.parametrize("method", ORACLE_METHODS)
def test_triton_backend_matches_oracle(small_model, make_images, method, kwargs, device):
    model = small_model(**kwargs)
    images = make_images(size=40)
    e_ref = oracle(model, images, method)
    e = triton_explain(model, images, method, device)
    assert torch.isfinite(e).all()
    assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@needs_triton
@pytest.mark.parametrize("method", ["tokentm", "gae", "rollout"])
def test_triton_full_matrix(small_model, make_images, method, device):
    model = small_model()
    images = make_images(seed=2, size=40)
    c_ref = oracle(model, images, method, full=True)
    c = triton_explain(model, images, method, device, full=True)
    # kernels.matrix_update multiplies in TF32 only where torch's switch allows it (the fast path passes
    # torch.backends.cuda.matmul.allow_tf32, which the suite keeps off on CUDA): full float32 on both devices.
    tol = 1e-5
    assert (rel_err_l2(c, c_ref) <= tol).all()


@needs_triton
def test_triton_tokentm_options(small_model, make_images, device):
    model = small_model()
    images = make_images(batch=1, size=40)
    opts = {"head_fusion": "decoupled", "use_length": False, "start_layer": 1}
    e_ref = oracle(model, images, "tokentm", **opts)
    e = triton_explain(model, images, "tokentm", device, **opts)
    assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@needs_triton
def test_triton_bf16_model(small_model, make_images, device):
    """bf16 model → bf16 A, G and tokens into the kernels, fp32 accumulation (spec §7: 2e-2)."""
    model = small_model()
    images = make_images(seed=3, size=40)
    e_ref = oracle(model, images, "tokentm")
    e = triton_explain(model, images, "tokentm", device, dtype=torch.bfloat16)
    assert (rel_err_l2(e, e_ref.reshape(e.shape)) <= 2e-2).all()


# -- layer choice: end_layer= and layers=[...] ----------------------------------------------------------
L = 4  # blocks of the layer-choice model


@pytest.fixture(scope="module")
def layered(make_model, make_images):
    """timm vit_tiny with L blocks, 7 classes, sharpened as the oracle tests above (every term matters)."""
    return make_model("timm_tiny", num_classes=7, depth=L, sharp=True).eval(), make_images()


# option selection -> the blocks it chooses
SELECTIONS = [
    ({"layers": [0, 2]}, [0, 2]),
    ({"layers": [3, -4]}, [0, 3]),
    ({"layers": [1]}, [1]),
    ({"start_layer": 1, "end_layer": 3}, [1, 2]),
    ({"end_layer": -1}, None),                 # None: from the method's default start to L-1 exclusive
]
PATHS = [("reference", "auto"), ("torch", "auto"), ("triton", "materialized"), ("triton", "flash")]
# float32 paths vs the float64 oracle: the bound of the oracle tests above (1e-5); the reference computes
# in float64 and returns float32, so only the final rounding (relative 2^-24 per entry) remains
LAYER_TOL = {"reference": 2 * 2.0 ** -24, "torch": 1e-5, "triton": 1e-5}


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("method", ["rollout", "legrad", "tokentm"])
@pytest.mark.parametrize("sel", range(len(SELECTIONS)))
def test_layer_choice_matches_the_oracle(layered, method, backend, attention, sel):
    model, images = layered
    opts, blocks = SELECTIONS[sel]
    if blocks is None:
        start = {"rollout": 0, "legrad": L - 2, "tokentm": 0}[method]
        blocks = list(range(start, L - 1))
    e_ref = oracle(model, images, method, target=3, chosen=blocks)
    assert e_ref.abs().max() > 0
    e = tf.explain(model, images, method=method, target=3, backend=backend, attention=attention, **opts)
    err = rel_err_l2(e, e_ref.reshape(e.shape))
    assert (err <= LAYER_TOL[backend]).all(), err
    # the choice matters: another selection gives another map (guards against an ignored option)
    other = [l for l in range(L) if l not in blocks][:1] or [0]
    if other != blocks:
        e_other = oracle(model, images, method, target=3, chosen=other)
        assert (rel_err_l2(e, e_other.reshape(e.shape)) > 100 * LAYER_TOL[backend]).all()


@pytest.mark.parametrize("method,start", [("rollout", 1), ("legrad", -3), ("legrad", 0), ("tokentm", 0),
                                          ("tokentm", 2)])
def test_full_range_equals_the_default_bit_for_bit(layered, method, start):
    model, images = layered
    default = tf.explain(model, images, method=method, target=3, backend="torch", start_layer=start)
    first = start % L
    assert torch.equal(tf.explain(model, images, method=method, target=3, backend="torch",
                                  layers=range(first, L)), default)
    assert torch.equal(tf.explain(model, images, method=method, target=3, backend="torch",
                                  start_layer=start, end_layer=L), default)


@pytest.mark.parametrize("opts,match", [
    ({"layers": []}, "layers is empty"),
    ({"layers": [0, 0]}, r"block\(s\) \[0\] more than once"),
    ({"layers": [1, -3]}, r"block\(s\) \[1\] more than once"),
    ({"layers": [L]}, "out of range"),
    ({"layers": [-L - 1]}, "out of range"),
    ({"end_layer": L + 1}, "end_layer=5 out of range"),
    ({"start_layer": 2, "end_layer": 2}, "greater than start_layer"),
    ({"start_layer": 1, "layers": [2]}, "either layers"),
    ({"end_layer": 3, "layers": [2]}, "either layers"),
])
def test_bad_layer_choices_are_refused(layered, opts, match):
    model, _ = layered
    with pytest.raises(ValueError, match=match):
        tf.Explainer(model, method="rollout", **opts)


def test_layer_choice_types_and_methods(layered):
    model, _ = layered
    with pytest.raises(TypeError, match="layers must hold ints"):
        tf.Explainer(model, method="legrad", layers=[1.0])
    with pytest.raises(TypeError, match="list of block indices"):
        tf.Explainer(model, method="legrad", layers=2)
    with pytest.raises(TypeError, match="end_layer must be an int"):
        tf.Explainer(model, method="legrad", end_layer="3")
    for method in ("gae", "attn_gradcam", "raw_attention"):
        with pytest.raises(ValueError, match="unknown option"):
            tf.Explainer(model, method=method, layers=[1])


# -- bad input gets a clear error ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(make_model):
    """timm vit_tiny on 32x32 images, 2 blocks, 5 classes (``images``: two 32x32 images, tests/conftest.py)."""
    return make_model("timm_tiny").eval()


def test_not_a_vit(images):
    with pytest.raises(TypeError, match="VisionTransformer"):
        tf.explain(torch.nn.Linear(3, 3), images)


def test_unsupported_parts(make_model, images):
    post = make_model("timm_tiny", block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="block 0 is a ResPostBlock"):
        tf.explain(post, images)
    mapped = make_model("timm_tiny", global_pool="map")     # attention pools are explained (§6.1) ...
    mapped.attn_pool.pool = "avg"                            # ... from their first latent: a mean of them is not
    with pytest.raises(ValueError, match="attention pool with pool_type='avg'"):
        tf.explain(mapped, images)
    headless = make_model("timm_tiny", num_classes=0)
    with pytest.raises(ValueError, match="no classifier"):  # a feature model needs a score function
        tf.explain(headless, images)


def test_unsupported_class_names_the_supported_classes(make_model, images):
    relpos = make_model("timm_tiny", name="vit_relpos_small_patch16_224")
    with pytest.raises(TypeError, match="VisionTransformerRelPos") as err:
        tf.explain(relpos, images)
    for name in ("timm VisionTransformer", "ViTForImageClassification", "CLIPVisionModel", "torchvision",
                 "open_clip"):
        assert name in str(err.value)


def test_hybrid_vit_is_supported(make_model, make_images):
    """vit_tiny_r_s16_p8_224 (HybridEmbed: a ResNet stem, then the projection): 3-channel images in, the
    patch grid is the backbone's feature map."""
    hybrid = make_model("timm_model", name="vit_tiny_r_s16_p8_224", img_size=64, depth=2)
    x = make_images(batch=1, size=64)
    grid = tuple(hybrid.patch_embed.grid_size)
    for method in ("tokentm", "legrad"):
        ref = tf.explain(hybrid, x, method, backend="reference")
        fast = tf.explain(hybrid, x, method, backend="torch")
        assert ref.shape == (1, *grid) and ref.abs().max() > 0
        assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="expects 64x64"):
        tf.explain(hybrid, make_images(batch=1))


@pytest.mark.parametrize("method", ["tokentm", "legrad", "rollout"])
def test_works_under_inference_mode(model, images, method):
    expected = tf.explain(model, images, method, target=torch.tensor([1, 2]) if method == "legrad" else None)
    with torch.inference_mode():
        x = images.clone()  # an inference tensor
        target = torch.tensor([1, 2]) if method == "legrad" else None
        got = tf.explain(model, x, method, target=target)
        assert torch.is_inference_mode_enabled()
    assert torch.equal(got, expected)
    assert all(p.grad is None for p in model.parameters())


def test_meta_images(make_model, model, images):
    with pytest.raises(ValueError, match="images must be on the model's device"):
        tf.explain(model, images.to("meta"))
    meta_model = make_model("timm_tiny").to("meta")
    with pytest.raises(ValueError, match="meta device"):
        tf.explain(meta_model, images.to("meta"))


def test_channels_last_images_get_a_hint(model):
    with pytest.raises(ValueError, match=r"32 channels, the model expects 3 \(are they channels-last"):
        tf.explain(model, torch.randn(2, 32, 32, 3))


@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(3, 32, 32), ValueError, "rank 4"),
    (torch.randn(2, 1, 32, 32), ValueError, "1 channels"),
    (torch.randn(2, 3, 48, 32), ValueError, "48x32"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.long), TypeError, "floating point"),
    (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_images(model, bad, err, match):
    with pytest.raises(err, match=match):
        tf.explain(model, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_non_finite_images(model, images, value, backend):
    images[1, 0, 3, 4] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        tf.explain(model, images, backend=backend)


def test_non_finite_model_output_is_an_error_not_a_nan_map(make_model, images):
    m = make_model("timm_tiny")
    with torch.no_grad():
        m.blocks[0].mlp.fc2.weight[0, 0] = float("inf")
    for method in ("tokentm", "rollout", "legrad"):
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            tf.explain(m, images, method, backend="torch")


@pytest.mark.parametrize("target,err,match", [
    (5, ValueError, "out of range"),
    (-1, ValueError, "out of range"),
    (torch.tensor([0, 9]), ValueError, "out of range"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer dtype"),
    (1.5, TypeError, "target must be"),
    (True, TypeError, "bool"),
])
def test_bad_target(model, images, target, err, match):
    with pytest.raises(err, match=match):
        tf.explain(model, images, target=target)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"method": "gradcam++"}, ValueError, "unknown method"),
    ({"backend": "cuda"}, ValueError, "unknown backend"),
    ({"method": "tokentm", "fusion": "gae"}, ValueError, "unknown option"),
    ({"method": "gae", "start_layer": 1}, ValueError, "unknown option"),
    ({"method": "tokentm", "head_fusion": "max"}, ValueError, "head_fusion"),
    ({"method": "tokentm", "init": "ones"}, ValueError, "init"),
    ({"method": "tokentm", "use_necc": 1}, TypeError, "use_necc"),
    ({"method": "tokentm", "start_layer": 2}, ValueError, "start_layer=2 out of range"),
    ({"method": "legrad", "start_layer": -3}, ValueError, "out of range"),
    ({"method": "rollout", "start_layer": 1.0}, TypeError, "start_layer"),
    ({"method": "legrad", "full": True}, ValueError, "full=True"),
])
def test_bad_method_backend_options(model, images, kwargs, err, match):
    with pytest.raises(err, match=match):
        tf.explain(model, images, **kwargs)


def test_triton_backend_where_it_cannot_run(model, images, monkeypatch):
    import tokentm_fast.kernels  # noqa: F401  (imported as the rest of the suite sees it, interpreter on)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
        tf.explain(model, images, backend="triton")
    assert os.environ.get("TRITON_INTERPRET") is None


# -- messages, wrapped models ----------------------------------------------------------------------------
@pytest.fixture
def three_images(make_images):
    """Three 3x32x32 images (seed 1)."""
    return make_images(batch=3)


def test_meta_target_names_target_and_device(model, three_images):
    with pytest.raises(ValueError, match=r"target .*meta device"):
        tf.explain(model, three_images, target=torch.tensor([1, 2, 3], device="meta"), backend="torch")


@pytest.mark.parametrize("wrap", ["data_parallel", "compile", "compiled_data_parallel"])
def test_wrapped_models_are_explained_as_the_underlying_model(model, three_images, wrap):
    if wrap == "data_parallel":
        wrapped = torch.nn.DataParallel(model)
    elif wrap == "compile":
        wrapped = torch.compile(model)
    else:
        wrapped = torch.compile(torch.nn.DataParallel(model))
    assert unwrap(wrapped) is model
    assert adapt(wrapped).model is model
    want = tf.explain(model, three_images, target=2, backend="torch")
    assert want.abs().max() > 0                     # a real map, not a vacuous all-zero one
    got = tf.explain(wrapped, three_images, target=2, backend="torch")
    assert torch.equal(got, want)


def test_ddp_is_unwrapped(model):
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)   # no process group needed to unwrap
    torch.nn.Module.__init__(ddp)
    ddp.module = model
    assert unwrap(ddp) is model


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam"])
def test_score_function_that_mixes_images_is_refused(model, three_images, method, backend):
    with pytest.raises(ValueError, match="mixes the images of the batch.*independently"):
        tf.explain(model, three_images, method=method, target=lambda o: o[:, 3] + o[:, 3].sum(),
                   backend=backend)
    # mixing that only reaches the last image is caught too
    with pytest.raises(ValueError, match="mixes the images"):
        tf.explain(model, three_images, method=method, target=lambda o: o[:, 3] + o[:, 3].cumsum(0),
                   backend=backend)


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_independent_score_functions_pass_the_check(model, three_images, method):
    got = tf.explain(model, three_images, method=method, target=lambda o: o[:, 3] * o.softmax(-1)[:, 1],
                     backend="torch")
    assert got.abs().max() > 0
    one = tf.explain(model, three_images, method=method, target=3, backend="torch")
    fn = tf.explain(model, three_images, method=method, target=lambda o: o[:, 3], backend="torch")
    assert torch.equal(fn, one)
    # a single image cannot mix: the check is not needed (and the function is accepted)
    assert tf.explain(model, three_images[:1], method=method, target=lambda o: o[:, 3] + o[:, 3].sum(),
                      backend="torch").shape == (1, 4, 4)


# -- issue 26: constant maps are said, conversions are said or restored -----------------------------------
# Item 1: a gradient method on a model whose classifier head is zero (torchvision initialises it so)
# returned all-zero maps without a word. Now a ConstantMapWarning names the images, the method and the
# cause, once per call site (also in a loop), at the user's line.
GRADIENT_METHODS = [m for m in tf.METHODS if REGISTRY[m].needs_gradients]


def zero_head_vit():
    """torchvision's VisionTransformer as torchvision builds it (zero classifier head), 32x32 images,
    16x16 patches, 2 blocks, 64 wide, 5 classes."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=5).eval()


def constant_warnings(records):
    return [w for w in records if issubclass(w.category, tf.ConstantMapWarning)]


def call_line(fn) -> int:
    """The line of ``fn``'s source holding the explain call (marked ``# <- call``)."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, ln in enumerate(lines) if "# <- call" in ln)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_zero_head_warns_once_per_call_site_in_a_loop(images, method):
    model = zero_head_vit()
    assert model.heads.head.weight.abs().max() == 0              # the cause, as torchvision leaves it

    def loop():
        maps = []
        for _ in range(3):
            maps.append(tf.explain(model, images, method))     # <- call
        for _ in range(3):
            maps.append(tf.explain(model, images, method, normalize=True, upsample=True))
        return maps

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")                         # the machinery's default action
        maps = loop()
    assert all(not m.any() for m in maps)                        # the issue: exactly zero, even normalized
    said = constant_warnings(rec)
    assert len(said) == 2, [str(w.message) for w in rec]         # one per call site, not one per call
    first = call_line(loop)
    assert [(w.filename, w.lineno) for w in said] == [(__file__, first), (__file__, first + 2)]
    for w in said:
        msg = str(w.message)
        assert msg.startswith(f"{method}: the maps of all 2 images are constant (all zeros")
        assert "classifier head is all zeros (weight (5, 64)), so the gradient of every score" in msg
        assert "exactly zero" in msg and "zero-initialised head" in msg


def test_the_cause_costs_no_forward_pass(images):
    """The warning's cause comes from the parameters: the model runs once per call, as without it (a
    forward hook of the user's sees one call)."""
    model = zero_head_vit()
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            tf.explain(model, images, "tokentm", backend="torch")
    finally:
        handle.remove()
    assert len(constant_warnings(rec)) == 1 and len(forwards) == 1


def test_explainer_loop_and_chunks_warn_once_naming_the_whole_batch(make_images):
    model = zero_head_vit()
    x = make_images(batch=3)
    ex = tf.Explainer(model, "tokentm")

    def run():
        for _ in range(4):
            ex(x, batch_size=1)                                  # <- call

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        run()
    said = constant_warnings(rec)
    assert len(said) == 1
    assert (said[0].filename, said[0].lineno) == (__file__, call_line(run))     # the user's line, not batching.py
    assert "the maps of all 3 images" in str(said[0].message)                 # the batch, not a chunk of it


def test_a_loop_whose_constant_images_change_is_not_flooded(make_model, make_images):
    """The machinery's default dedupes by text and location; the text names the images, so a loop whose
    batches have other constant images would repeat it. It is said once per call site all the same."""
    model = make_model("torchvision")
    x = make_images(batch=3)
    masks = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])]

    def loop():
        maps = []
        for mask in masks:
            maps.append(tf.explain(model, x, "legrad", target=lambda o, m=mask: o[:, 1] * m))   # <- call
        return maps

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        maps = loop()
    for e, mask in zip(maps, masks):       # each batch: exactly the masked image's map is constant
        assert [bool(r.max() == r.min()) for r in e] == (mask == 0).tolist()
    said = constant_warnings(rec)
    assert len(said) == 1 and said[0].lineno == call_line(loop)
    assert str(said[0].message).startswith("legrad: the map of image 1 (of 3) is constant (all zeros)")


def test_always_filter_says_it_every_time_error_raises_ignore_silences(images):
    model = zero_head_vit()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            tf.explain(model, images, "legrad")
    assert len(constant_warnings(rec)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", tf.ConstantMapWarning)
        with pytest.raises(tf.ConstantMapWarning, match="legrad: the maps of all 2 images"):
            tf.explain(model, images, "legrad")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", tf.ConstantMapWarning)
        tf.explain(model, images, "legrad")
    assert not constant_warnings(rec)


@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam", "rollout", "lrp"])
def test_informative_maps_do_not_warn(make_model, images, method):
    model = make_model("torchvision")         # the same family with a trained-like (non-zero) head
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = tf.explain(model, images, method, target=1)
    assert (e.flatten(1).amax(1) > e.flatten(1).amin(1)).all()   # informative for every image
    assert not constant_warnings(rec)


def test_the_warning_names_the_constant_images_only(make_model, make_images):
    """A score that is zero for image 1 alone (a constant score function there): image 1's map is zero,
    images 0 and 2 are informative; the message names image 1 and the possible causes."""
    model = make_model("torchvision")
    x = make_images(batch=3)
    mask = torch.tensor([1.0, 0.0, 1.0])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = tf.explain(model, x, "tokentm", target=lambda o: o[:, 1] * mask)
    assert not e[1].any() and (e[[0, 2]].flatten(1).amax(1) > 0).all()
    (w,) = constant_warnings(rec)
    msg = str(w.message)
    assert msg.startswith("tokentm: the map of image 1 (of 3) is constant (all zeros)")
    assert "gradient of the explained score is zero" in msg and "does not depend on the model output" in msg
    assert "classifier head is all zeros" not in msg          # the head is not zero here


def test_several_targets_name_image_and_target(make_model, images):
    model = make_model("torchvision")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = tf.explain(model, images, "gae", target=[lambda o: o[:, 2], lambda o: 0.0 * o[:, 0]])
    assert e.shape[:2] == (2, 2) and not e[:, 1].any() and (e[:, 0].flatten(1).amax(1) > 0).all()
    (w,) = constant_warnings(rec)
    assert str(w.message).startswith("gae: the maps of (image, target) (0, 1), (1, 1) (of 2 images × 2 targets)")


def test_clipped_maps_with_a_live_gradient_name_the_method(make_model, images):
    """Attention Grad-CAM reads the class token's row; a model that pools by averaging gives it no
    gradient, so its map is zero although the score's gradient is not (the issue's open_clip case): the
    message names the method's own reason."""
    model = make_model("open_clip_avg_ls").eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = tf.explain(model, images[:1], "attn_gradcam", target=lambda o: o[:, 0])
        informative = tf.explain(model, images[:1], "tokentm", target=lambda o: o[:, 0])
    assert not e.any() and informative.abs().max() > 0
    (w,) = constant_warnings(rec)
    msg = str(w.message)
    assert msg.startswith("attn_gradcam: the map is constant (all zeros): it ranks nothing")
    assert "or attn_gradcam found no relevance there (attention Grad-CAM keeps only the positive part" in msg
    assert "average pooling" in msg


# Item 5: conversions. Train mode: the model is explained in eval mode and put back (documented);
# float64 images to a narrower model: said once per call site.
def test_train_mode_is_explained_in_eval_mode_and_restored(make_model, images):
    model = make_model("timm_tiny", drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5)
    want = tf.explain(model.eval(), images, "tokentm", target=1)
    assert want.abs().max() > 0
    model.train()
    got = tf.explain(model, images, "tokentm", target=1)
    assert torch.equal(got, want)               # dropout off: the eval-mode map, not a random one
    assert all(m.training for m in model.modules())
    def failing_score(output):
        raise ZeroDivisionError("a score function that fails")

    with pytest.raises(ZeroDivisionError):      # restored also when the call raises
        tf.explain(model, images, "tokentm", target=failing_score)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_float64_images_to_a_float32_model_are_said_once(model, images):
    def loop():
        for _ in range(3):
            out = tf.explain(model, images.double(), "tokentm", target=1)    # <- call
        return out

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        got = loop()
    said = [w for w in rec if "float64" in str(w.message)]
    assert len(said) == 1 and (said[0].filename, said[0].lineno) == (__file__, call_line(loop))
    assert "images are float64 but the model is float32" in str(said[0].message)
    assert torch.equal(got, tf.explain(model, images, "tokentm", target=1))     # what was explained
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # same dtypes: nothing to say
        tf.explain(model, images, "tokentm", target=1)
        tf.explain(copy.deepcopy(model).double(), images.double(), "tokentm", target=1)
