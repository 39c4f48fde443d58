"""tokentm_fast/paths.py: the flash explanation path (``attention="flash"``, the ``Flash`` path) end to end
under Triton's interpreter, and the choice between it and the materialized path.

Every method against the independent float64 oracle of ``tests/spec_oracle.py``
(docs/methods.md tolerances: 1e-5 for float32 — the interpreter multiplies in
full float32 —, 2e-2 for bfloat16), on small timm models that cover what the
kernels must handle: odd N (37, 49, 197), head widths 32 and 64, register
tokens, LayerScale, mean pooling without a class token. Then: no N×N tensor in
any layout exists during a flash call (tests/helpers.py's recorder: two
dimensions within a tile of N, or one of N² or more), for every method the
flash path serves, with layer choice and several targets, on every model
family and an attention pool; the model is left exactly as it was; which path
``Explainer`` picks, and what the flash path refuses.

The device is the suite's (``device`` fixture, tests/conftest.py): the models and images are built on the
CPU, the float64 oracle runs there on them, and the flash call gets a copy of the model and the images on
the device (CPU: the interpreter; CUDA: the compiled kernels, with TF32 off so that 1e-5 still holds).
"""
from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
from helpers import FLASH_METHODS, N65, ShapeRecorder, attention_tile, n_by_n, rel_err_l2
from spec_oracle import explain as oracle

import tokentm_fast as tf
from tokentm_fast.kernels import triton_available

_SUITE_DEVICE = os.environ.get("TOKENTM_TEST_DEVICE", "cpu")  # set by tests/conftest.py
pytestmark = pytest.mark.skipif(not triton_available(_SUITE_DEVICE),
                                reason=f"Triton cannot run on {_SUITE_DEVICE} here (cpu: TRITON_INTERPRET=1)")

# name -> (create_model kwargs, image size, batch); N = tokens per image
MODELS = {
    # N = 37 (6×6 + cls), heads 32 wide
    "n37_d32": (dict(img_size=48, patch_size=8, embed_dim=64, num_heads=2, depth=3), 48, 2),
    # N = 54 (7×7 + cls + 4 registers), heads 64 wide
    "n54_d64_registers": (dict(img_size=56, patch_size=8, embed_dim=128, num_heads=2, depth=2, reg_tokens=4), 56, 2),
    # N = 197 (14×14 + cls), LayerScale, q/k norms
    "n197_layerscale": (dict(img_size=112, patch_size=8, embed_dim=64, num_heads=2, depth=2, init_values=0.3,
                             qk_norm=True), 112, 1),
    # N = 49, mean pooling, no class token (LeGrad's tiled reduction over all rows)
    "n49_avg_pool": (dict(img_size=56, patch_size=8, embed_dim=64, num_heads=2, depth=2, class_token=False,
                          global_pool="avg", fc_norm=True), 56, 2),
}


def make(name: str, seed: int = 0):
    kwargs, size, batch = MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # spread the weights so every term of every method matters
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.1)
            elif "qkv.weight" in n:
                p.mul_(2.0)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


def on_device(model, device, dtype=None):
    """A copy of ``model`` on ``device`` (the CPU original stays the oracle's input)."""
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def flash(model, images, method, device, dtype=None, **options):
    return tf.explain(on_device(model, device, dtype), images.to(device), method, backend="triton",
                      attention="flash", **options).cpu()


def _check(e, e_ref, tol):
    assert torch.isfinite(e).all()
    assert e_ref.abs().max() > 0, "vacuous: the oracle map is zero"
    err = rel_err_l2(e, e_ref.reshape(e.shape))
    assert (err <= tol).all(), err


TOKENTM_OPTIONS = [
    {},
    {"use_length": False},
    {"use_necc": False},
    {"init": "identity"},
    {"start_layer": 1},
]


@pytest.mark.parametrize("options", TOKENTM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_tokentm_options_match_oracle(options, device):
    model, images = make("n37_d32")
    _check(flash(model, images, "tokentm", device, **options), oracle(model, images, "tokentm", **options), 1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["tokentm", "gae"])
def test_row_methods_match_oracle(name, method, device):
    model, images = make(name)
    _check(flash(model, images, method, device), oracle(model, images, method), 1e-5)


@pytest.mark.parametrize("name", ["n37_d32", "n49_avg_pool"])
@pytest.mark.parametrize("method", ["rollout", "raw_attention", "attn_gradcam", "legrad"])
def test_other_methods_match_oracle(name, method, device):
    model, images = make(name)
    if method == "attn_gradcam":  # Grad-CAM clamps at 0: pick a target whose map is not all zero
        target = _gradcam_target(model, images)
        _check(flash(model, images, method, device, target=target.to(device)),
               oracle(model, images, method, target=target), 1e-5)
        return
    _check(flash(model, images, method, device), oracle(model, images, method), 1e-5)


def _gradcam_target(model, images) -> torch.Tensor:
    b = images.shape[0]
    norms = torch.stack([oracle(model, images, "attn_gradcam", target=torch.full((b,), c)).norm(dim=1)
                         for c in range(5)])  # (classes, B)
    return norms.argmax(0)


def test_rollout_start_layer_and_legrad_all_layers(device):
    model, images = make("n37_d32")
    _check(flash(model, images, "rollout", device, start_layer=1),
           oracle(model, images, "rollout", start_layer=1), 1e-5)
    _check(flash(model, images, "legrad", device, start_layer=0),
           oracle(model, images, "legrad", start_layer=0), 1e-5)


@pytest.mark.parametrize("method,dtype", [("tokentm", torch.bfloat16), ("gae", torch.bfloat16),
                                          ("tokentm", torch.float16)])
def test_half_precision_model(method, dtype, device):
    """bf16 / fp16 Q, K, V, dO and tokens into the kernels, float32 sums (tolerance 2e-2)."""
    model, images = make("n37_d32", seed=3)
    e_ref = oracle(model, images, method)
    _check(flash(model, images, method, device, dtype=dtype), e_ref, 2e-2)


def n65_model(family: str):
    """A random-init model of ``family`` (timm, timm_map: a SigLIP-style attention pool behind one register
    token, hf_vit, torchvision, open_clip) with the sizes of ``N65``."""
    import model_families as mf

    s = N65
    torch.manual_seed(0)
    if family in ("timm", "timm_map"):
        pool = dict(global_pool="map", class_token=False, reg_tokens=1) if family == "timm_map" else {}
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=s["size"],
                                  patch_size=s["patch"], embed_dim=s["width"], num_heads=s["heads"],
                                  mlp_ratio=s["mlp"] / s["width"], depth=s["depth"], **pool)
    elif family == "hf_vit":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(
            hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
            intermediate_size=s["mlp"], image_size=s["size"], patch_size=s["patch"], num_labels=5))
    elif family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=s["size"], patch_size=s["patch"], num_layers=s["depth"],
                                  num_heads=s["heads"], hidden_dim=s["width"], mlp_dim=s["mlp"], num_classes=5)
        with torch.no_grad():  # torchvision initialises the classifier to zero
            model.heads.head.weight.normal_(0.0, 0.2)
    else:
        assert family == "open_clip", family
        model = mf.open_clip_visual(image_size=s["size"], patch_size=s["patch"], width=s["width"],
                                    layers=s["depth"], heads=s["heads"], mlp_ratio=s["mlp"] / s["width"])
    return mf.spread(model).eval()


def n65_images() -> torch.Tensor:
    return torch.randn(2, 3, N65["size"], N65["size"], generator=torch.Generator().manual_seed(1))


def two_targets(family: str):
    """Two targets per image, ``(B, K)``: classes, or for an embedder two output channels."""
    return [tf.class_logit(0), tf.class_logit(3)] if family == "open_clip" else torch.tensor([[0, 1], [2, 3]])


def flash_calls(method: str, family: str) -> list:
    """``(options, target)`` of the calls the recorder watches: the defaults with the default target, two
    targets per image, and for a method with layer choice ``layers=[1]`` and ``start_layer=1``."""
    default = tf.class_logit(torch.tensor([3, 5])) if family == "open_clip" else None
    calls = [({}, default), ({}, two_targets(family))]
    if tf.methods.get_method(method).layer_choice:
        calls += [({"layers": [1]}, default), ({"start_layer": 1}, two_targets(family))]
    return calls


#: the backends with a flash path: the Triton kernels, and their PyTorch twin (tokentm_fast.torch_ops.attention)
FLASH_BACKENDS = ("triton", "torch")


@pytest.fixture
def small_torch_blocks(monkeypatch):
    """The PyTorch twin bounds its ``(B, H, Q_blk, N)`` blocks by bytes (``BLOCK_BYTES``), not by N: on small
    models one block is every query row, N×N. With a budget of one byte each block is ``MIN_BLOCK`` = 32
    query rows, fewer than N = 65, so an N×N tensor formed anywhere else still shows."""
    from tokentm_fast.torch_ops import attention

    assert attention.MIN_BLOCK < 65
    monkeypatch.setattr(attention, "BLOCK_BYTES", 1)


def _record_flash(family: str, method: str, device, calls, backend: str) -> tuple:
    from tokentm_fast.models import adapt

    model, images = n65_model(family), n65_images()
    n = (N65["size"] // N65["patch"]) ** 2 + adapt(model).num_prefix_tokens
    assert n == 65, n
    model, images = on_device(model, device), images.to(device)  # copies made outside the recorder
    with ShapeRecorder() as rec:
        for options, target in calls:
            out = tf.explain(model, images, method, backend=backend, attention="flash", target=target, **options)
            assert out.shape[-2:] == (8, 8) and torch.isfinite(out).all()
    return rec.shapes, n, tuple(images.shape)


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("method", FLASH_METHODS)
def test_no_n_by_n_tensor_on_the_flash_path(method, backend, device, small_torch_blocks):
    """Every method the flash path serves, on each backend's flash path, on the N = 65 timm model: its
    defaults, two targets per image, and (layer choice) ``layers=[1]`` / ``start_layer=1``; no recorded
    tensor could hold an N×N matrix."""
    shapes, n, images = _record_flash("timm", method, device, flash_calls(method, "timm"), backend)
    assert len(shapes) > 50, "the recorder saw nothing: the test would be vacuous"
    flagged = n_by_n(shapes, n, attention_tile(device), images)
    assert not flagged, flagged[:5]


def family_methods(family: str, backend: str) -> list:
    """The methods recorded through ``family``: all of them through the attention pool (each has its own pool
    step) and on the fast PyTorch twin; on the interpreted Triton kernels, through the other adapters, whose
    attention call site does not depend on the method, TokenTM (the attention backward) and LeGrad (the
    forward and the block tails)."""
    return FLASH_METHODS if family == "timm_map" or backend == "torch" else ["tokentm", "legrad"]


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("family", ["timm_map", "hf_vit", "torchvision", "open_clip"])
def test_no_n_by_n_tensor_in_any_family(family, backend, device, small_torch_blocks):
    """The flash methods (``family_methods``), with two targets per image, on each backend's flash path,
    through each family's adapter (its attention call site) and through an attention pool (timm
    ``global_pool="map"``)."""
    flagged = {}
    for method in family_methods(family, backend):
        shapes, n, images = _record_flash(family, method, device, [({}, two_targets(family))], backend)
        assert len(shapes) > 50, "the recorder saw nothing: the test would be vacuous"
        flagged[method] = n_by_n(shapes, n, attention_tile(device), images)[:5]
    assert not any(flagged.values()), flagged


def test_the_recorder_flags_an_n_by_n_tensor_in_any_layout(device):
    """The check can fail: (B·H, N·N), (B, H, N, N) and a tile-padded (B·H, N + 5, N + 5) built inside the
    recorder are flagged, the legitimate shapes of the N = 65 models are not, and the materialized path's
    (B, H, N, N) attention is."""
    n, b, h, tile = 65, 2, N65["heads"], attention_tile(device)
    with ShapeRecorder() as rec:
        torch.empty(b * h, n * n, device=device)
        torch.zeros(b, h, n, n, device=device)
        torch.zeros(b * h, n + 5, n + 5, device=device)
    assert n_by_n(rec.shapes, n, tile) == rec.shapes
    legit = [(b, n, N65["width"]), (b * n, N65["width"]), (b, h, n, 64), (b * h * n, 64), (b, n, 3 * N65["width"]),
             (b, n, N65["mlp"]), (b, 2, 8, 8), (b, 3, N65["size"], N65["size"])]
    assert not n_by_n(legit, n, tile, images=(b, 3, N65["size"], N65["size"]))
    model, images = on_device(n65_model("timm"), device), n65_images().to(device)
    with ShapeRecorder() as rec:
        tf.explain(model, images, "tokentm", backend="triton", attention="materialized")
    assert (b, h, n, n) in n_by_n(rec.shapes, n, tile, tuple(images.shape))


def test_model_restored_after_flash_calls(device):
    model, images = make("n54_d64_registers")
    model, images = model.to(device), images.to(device)  # in place: the calls must restore this very model
    model.train()
    model.blocks[0].attn.fused_attn = True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("tokentm", "legrad", "rollout"):
        tf.explain(model, images, method, backend="triton", attention="flash")
    assert model.training and all(m.training for m in model.modules())
    assert model.blocks[0].attn.fused_attn is True
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for blk in model.blocks:
        assert "forward" not in blk.attn.__dict__, "the attention forward override was not removed"
        assert not blk._forward_hooks and not blk._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_flash_choice_and_refusals(device):
    model, images = make("n37_d32")
    model, images = model.to(device), images.to(device)
    with pytest.raises(ValueError, match="full=True"):
        tf.explain(model, images, "tokentm", backend="triton", attention="flash", full=True)
    with pytest.raises(ValueError, match="decoupled"):
        tf.explain(model, images, "tokentm", backend="triton", attention="flash", head_fusion="decoupled")
    with pytest.raises(ValueError, match="backend='reference'"):   # the oracle always materializes
        tf.explain(model, images, "tokentm", backend="reference", attention="flash")
    with pytest.raises(ValueError, match="unknown attention"):
        tf.explain(model, images, "tokentm", attention="fast")
    explainer = tf.Explainer(model, "tokentm", backend="triton")
    assert explainer.attention_for(images, "triton") == ("flash" if device.type == "cuda" else "materialized")
    assert tf.Explainer(model, "tokentm", backend="triton", full=True).attention_for(images, "triton") == "materialized"
    assert explainer.attention_for(images, "torch") == "materialized"


@pytest.mark.parametrize("family", ["hf_vit", "hf_deit_teacher", "torchvision", "hf_clip_proj", "open_clip",
                                    "open_clip_avg_ls", "timm_headless"])
def test_flash_path_serves_every_model_family(family, device):
    """Through each adapter's attention call site: the flash maps equal the materialized torch maps."""
    import model_families as mf
    from model_families import CLASSIFIERS, FAMILIES

    model = FAMILIES[family]()
    x = mf.images(batch=1)
    target = None if family in CLASSIFIERS else (lambda out: out[:, 0] - out[:, 1])
    for method in ("tokentm", "legrad"):  # the attention backward, and the forward + block tails
        got = tf.explain(on_device(model, device), x.to(device), method, backend="triton", attention="flash",
                         target=target).cpu()
        ref = tf.explain(model, x, method, backend="torch", target=target)
        assert ref.abs().max() > 0, method
        assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-5, (family, method)
