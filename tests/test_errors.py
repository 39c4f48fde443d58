"""Bad input gets a clear error that names the problem (issue: foundation, item 5)."""
import os

import pytest
import timm
import torch

import tokentm_fast as tf


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32)


def test_not_a_vit(images):
    with pytest.raises(TypeError, match="VisionTransformer"):
        tf.explain(torch.nn.Linear(3, 3), images)


def test_unsupported_parts(images):
    post = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(ValueError, match="block 0 is a ResPostBlock"):
        tf.explain(post, images)
    mapped = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                               depth=2, global_pool="map")
    with pytest.raises(ValueError, match="map"):
        tf.explain(mapped, images)
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                                 depth=2)
    with pytest.raises(ValueError, match="no classifier"):  # a feature model needs a score function
        tf.explain(headless, images)


def test_unsupported_class_names_the_supported_classes(images):
    relpos = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=5, img_size=32,
                               patch_size=8, depth=2)
    with pytest.raises(TypeError, match="VisionTransformerRelPos") as err:
        tf.explain(relpos, images)
    for name in ("timm VisionTransformer", "ViTForImageClassification", "CLIPVisionModel", "torchvision",
                 "open_clip"):
        assert name in str(err.value)


def test_hybrid_vit_is_supported():
    """vit_tiny_r_s16_p8_224 (HybridEmbed: a ResNet stem, then the projection): 3-channel images in, the
    patch grid is the backbone's feature map."""
    torch.manual_seed(0)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=5, img_size=64, depth=2)
    x = torch.randn(1, 3, 64, 64)
    grid = tuple(hybrid.patch_embed.grid_size)
    for method in ("tokentm", "legrad"):
        ref = tf.explain(hybrid, x, method, backend="reference")
        fast = tf.explain(hybrid, x, method, backend="torch")
        assert ref.shape == (1, *grid) and ref.abs().max() > 0
        assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="expects 64x64"):
        tf.explain(hybrid, torch.randn(1, 3, 32, 32))


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


def test_meta_images(model, images):
    with pytest.raises(ValueError, match="images must be on the model's device"):
        tf.explain(model, images.to("meta"))
    meta_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                   patch_size=8, depth=2).to("meta")
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


def test_non_finite_model_output_is_an_error_not_a_nan_map(images):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2)
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
