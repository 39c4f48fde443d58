"""tokentm_fast/multi_target.py and the API's target lists (issue 15): several targets per image in one
call. A ``(B, K)`` integer target or a list of K score functions gives ``(B, K, gh, gw)`` maps; map
``[:, k]`` equals a separate call with target k, on every backend and attention path
(tokentm_fast/multi_target.py says which paths share the forward pass).

Equality: on the CPU the shared-forward path runs the same float32 operations on the same tensors as a
separate call (the forward is deterministic, each backward is the one of a separate call), so the maps
are bit-identical; on CUDA a backward may reduce with atomics in another order, so there the bound is a
few float32 roundings of each map's scale (64 · 2⁻²³ · max|map|, as tests/test_batching.py).
"""
import copy
import os

import pytest
import timm
import torch

import tokentm_fast as tf
from tokentm_fast.kernels import triton_available
from tokentm_fast.methods import get_method
from tokentm_fast.paths import TORCH_KERNELS, Materialized
from tokentm_fast.targets import class_logit

_SUITE_DEVICE = os.environ.get("TOKENTM_TEST_DEVICE", "cpu")
METHODS = ["tokentm", "gae", "legrad", "attn_gradcam", "rollout", "raw_attention"]
GRADIENT_METHODS = ["tokentm", "gae", "legrad", "attn_gradcam"]
PATHS = [("reference", "auto"), ("torch", "auto"), ("triton", "materialized"), ("triton", "flash")]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=32, patch_size=8,
                              depth=3).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images


def _on(setup, backend, device):
    model, images = setup
    if backend == "triton":
        if not triton_available(_SUITE_DEVICE):
            pytest.skip(f"Triton cannot run on {_SUITE_DEVICE} here")
        return copy.deepcopy(model).to(device), images.to(device)
    return model, images


def _assert_same(got, want, device):
    assert got.shape == want.shape
    if device.type == "cpu":
        assert torch.equal(got, want)
    else:
        scale = want.abs().flatten(2).amax(-1)[..., None, None]
        assert ((got - want).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all()


TARGET = torch.tensor([[1, 4], [0, 5], [3, 3]])          # K = 2; image 2 twice the same class


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_b_by_k_target_equals_k_separate_calls(setup, device, method, backend, attention):
    model, images = _on(setup, backend, device)
    target = TARGET.to(images.device)
    got = tf.explain(model, images, method=method, target=target, backend=backend, attention=attention)
    assert got.shape == (3, 2, 4, 4) and got.dtype == torch.float32
    want = torch.stack([tf.explain(model, images, method=method, target=target[:, k], backend=backend,
                                   attention=attention) for k in range(2)], dim=1)
    peaks = want.abs().amax(dim=(2, 3))
    if method == "attn_gradcam":                           # its clamp may zero one image's whole map
        assert (peaks > 0).sum() >= 3
    else:
        assert peaks.min() > 0                             # every map is a real map, not all zeros
    _assert_same(got, want, images.device)
    if method in GRADIENT_METHODS:
        # the targets matter: the two classes of images 0 and 1 give other maps (guards against a result
        # that repeats one target's map); image 2 has the same class twice, so equal maps
        assert (got[:2, 0] != got[:2, 1]).any(dim=(1, 2)).all()
        assert torch.equal(got[2, 0], got[2, 1])


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_list_of_score_functions(setup, device, method, backend, attention):
    model, images = _on(setup, backend, device)
    fns = [lambda o: o[:, 2] - o[:, 1], class_logit(4), lambda o: o.softmax(-1)[:, 0]]
    got = tf.explain(model, images, method=method, target=fns, backend=backend, attention=attention)
    assert got.shape == (3, 3, 4, 4)
    want = torch.stack([tf.explain(model, images, method=method, target=f, backend=backend, attention=attention)
                        for f in fns], dim=1)
    peaks = want.abs().amax(dim=(2, 3))
    if method == "attn_gradcam":      # its clamp may zero maps: the first two functions give real ones
        assert (peaks[:, :2] > 0).any(dim=0).all()
    else:
        assert peaks.min() > 0
    _assert_same(got, want, images.device)
    assert (got[:, 0] != got[:, 1]).any()


@pytest.mark.parametrize("method,backend,attention,forwards", [
    ("tokentm", "torch", "auto", 1), ("gae", "torch", "auto", 1), ("legrad", "torch", "auto", 1),
    ("attn_gradcam", "torch", "auto", 1), ("legrad", "triton", "materialized", 1),
    ("legrad", "triton", "flash", 1), ("attn_gradcam", "triton", "flash", 1),
    ("tokentm", "triton", "flash", 2),             # one call per target there (multi_target.py says why)
    ("tokentm", "reference", "auto", 2),
])
def test_forward_passes_per_call(setup, device, monkeypatch, method, backend, attention, forwards):
    """K = 2 targets: the model's forward runs once where the path shares it, K times where it loops."""
    model, images = _on(setup, backend, device)
    calls = []
    adapter = tf.Explainer(model, method=method, backend="torch").vit
    forward = type(adapter).forward
    monkeypatch.setattr(type(adapter), "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    ex = tf.Explainer(adapter, method=method, backend=backend, attention=attention)
    ex(images, TARGET.to(images.device))
    assert len(calls) == forwards
    calls.clear()
    ex(images, TARGET[:, 0].to(images.device))
    assert len(calls) == 1                       # (the count is of the model's forward: one per call)


def test_options_and_chunks(setup):
    model, images = setup
    # (B, 1) and a list of one function: still a K axis
    assert tf.explain(model, images, target=TARGET[:, :1], backend="torch").shape == (3, 1, 4, 4)
    assert tf.explain(model, images, target=[lambda o: o[:, 1]], backend="torch").shape == (3, 1, 4, 4)
    # upsample + normalize per map, and full matrices
    up = tf.explain(model, images, target=TARGET, backend="torch", upsample=True, normalize=True)
    assert up.shape == (3, 2, 32, 32)
    assert torch.allclose(up.amax(dim=(2, 3)), torch.ones(3, 2)) and torch.equal(up.amin(dim=(2, 3)), torch.zeros(3, 2))
    full = tf.explain(model, images, target=TARGET, backend="torch", full=True)
    assert full.shape == (3, 2, 17, 17)
    assert torch.equal(full[:, 1], tf.explain(model, images, target=TARGET[:, 1], backend="torch", full=True))
    # batch_size: the targets are split with the images
    whole = tf.explain(model, images, target=TARGET, backend="torch")
    chunked = tf.explain(model, images, target=TARGET, backend="torch", batch_size=2)
    scale = whole.abs().flatten(2).amax(-1)[..., None, None]
    assert ((chunked - whole).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all()
    # inference mode
    with torch.inference_mode():
        assert torch.equal(tf.explain(model, images, target=TARGET, backend="torch"), whole)


@pytest.mark.parametrize("bad,err,match", [
    (torch.zeros(3, 0, dtype=torch.long), ValueError, r"shape \(3, K\)"),
    (torch.zeros(2, 2, dtype=torch.long), ValueError, r"shape \(3, K\)"),
    (torch.tensor([[0, 6], [0, 0], [0, 0]]), ValueError, "out of range"),
    (torch.zeros(3, 2), TypeError, "integer dtype"),
    ([], ValueError, "empty list"),
    ([1, 2], TypeError, r"\(B, K\) integer tensor"),
    ([lambda o: o[:, 0], torch.tensor([1, 2, 3])], TypeError, "element 1"),
    ([lambda o: o[:, 0], lambda o: o[:, 3] + o[:, 3].sum()], ValueError, "mixes the images"),
])
def test_bad_multi_targets(setup, bad, err, match):
    model, images = setup
    with pytest.raises(err, match=match):
        tf.explain(model, images, method="tokentm", target=bad, backend="torch")


def test_captum_interop_refuses_several_targets(setup):
    from tokentm_fast.interop import TokenTMAttribution
    model, images = setup
    with pytest.raises(ValueError, match="one target per image"):
        TokenTMAttribution(model).attribute(images, target=TARGET)


def test_materialized_path_returns_one_map_per_target(setup):
    """The list contract of a method's explain: a list of K targets in, one map per target out
    (tokentm_fast.multi_target)."""
    from tokentm_fast.targets import check_targets
    model, images = setup
    vit = tf.Explainer(model, backend="torch").vit
    targets = check_targets(TARGET, 3, 6)
    for method in GRADIENT_METHODS:
        opts = tf.Explainer(model, method=method, backend="torch").options
        out = get_method(method).explain(vit, images, targets, opts, Materialized(TORCH_KERNELS))
        assert isinstance(out, list) and len(out) == 2 and out[0].shape == (3, 16)


@pytest.mark.parametrize("method,opts", [("legrad", {"layers": [0, 2]}), ("rollout", {"end_layer": 2}),
                                         ("tokentm", {"start_layer": 1, "head_fusion": "decoupled"})])
def test_with_method_options(setup, method, opts):
    """The K targets take the method's options (layer choice, head fusion) as a single call does."""
    model, images = setup
    got = tf.explain(model, images, method=method, target=TARGET, backend="torch", **opts)
    want = torch.stack([tf.explain(model, images, method=method, target=TARGET[:, k], backend="torch", **opts)
                        for k in range(2)], dim=1)
    assert want.abs().amax(dim=(2, 3)).min() > 0
    assert torch.equal(got, want)
    # the options matter (guards against options dropped on the multi-target path)
    assert not torch.equal(got, tf.explain(model, images, method=method, target=TARGET, backend="torch"))
