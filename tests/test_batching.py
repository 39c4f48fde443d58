"""tokentm_fast/batching.py (issue 15, Captum's internal_batch_size): ``explain(..., batch_size=k)`` explains
k images at a time (with their targets) and concatenates; the maps equal one call's. A tqdm bar on request."""
import io
import sys

import pytest
import torch

import tokentm_fast as tf
from tokentm_fast.targets import class_logit, cosine_similarity


@pytest.fixture(scope="module")
def model(make_model):
    """timm vit_tiny on 32x32 images, 3 blocks, 5 classes."""
    return make_model("timm_tiny", depth=3).eval()


@pytest.fixture(scope="module")
def images(make_images):
    """Five 32x32 images (the conftest ``images`` has two)."""
    return make_images(batch=5)


def _check_equal(chunked, whole, backend):
    assert chunked.shape == whole.shape
    assert whole.abs().max() > 0                      # real maps, not vacuous zeros
    if backend == "reference":
        # float64 computed, float32 returned: the per-image computation does not depend on the batch
        assert torch.equal(chunked, whole)
    else:
        # float32: a chunk of k images may take other matmul blockings than the whole batch; the rows
        # are computed independently, so they agree to a few float32 roundings of the map's scale
        scale = whole.abs().amax(dim=(1, 2), keepdim=True).clamp_min(whole.abs().max() * 1e-3)
        assert ((chunked - whole).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all()


TARGETS = {
    "none": lambda b: None,
    "int": lambda b: 3,
    "tensor": lambda b: torch.arange(b) % 5,
    "class_logit": lambda b: class_logit(torch.arange(b).flip(0) % 5),
    "lambda": lambda b: (lambda o: o[:, 1] - o[:, 2]),
}


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam", "rollout"])
@pytest.mark.parametrize("kind", list(TARGETS))
def test_chunks_equal_one_call(model, images, backend, method, kind):
    if backend != "torch" and kind not in ("tensor", "lambda"):
        pytest.skip("the other target kinds are covered on the torch backend")
    if backend == "reference" and method == "rollout":
        pytest.skip("rollout ignores the target")
    target = TARGETS[kind](images.shape[0])
    whole = tf.explain(model, images, method=method, target=target, backend=backend)
    if method != "attn_gradcam":                      # (its clamp may zero a whole image's map)
        assert whole.abs().amax(dim=(1, 2)).min() > 0
    for k in (2, 5, 7):                           # uneven chunks, one chunk, k > B
        chunked = tf.explain(model, images, method=method, target=target, backend=backend, batch_size=k)
        _check_equal(chunked, whole, backend)


def test_per_image_references_are_split_with_the_images(make_model, images):
    feat = make_model("timm_tiny", num_classes=0, seed=2).eval()
    refs = torch.randn(images.shape[0], feat.num_features)
    target = cosine_similarity(refs)
    whole = tf.explain(feat, images, target=target, backend="torch")
    _check_equal(tf.explain(feat, images, target=target, backend="torch", batch_size=2), whole, "torch")


def test_upsample_full_normalize_chunked(model, images):
    for opts in ({"upsample": True, "normalize": True}, {"full": True}):
        whole = tf.explain(model, images, backend="torch", **opts)
        chunked = tf.explain(model, images, backend="torch", batch_size=2, **opts)
        scale = whole.abs().amax(dim=tuple(range(1, whole.dim())), keepdim=True)
        assert scale.min() > 0
        assert ((chunked - whole).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all()


def test_targets_are_checked_for_the_whole_batch_before_any_chunk(model, images):
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        tf.explain(model, images, target=torch.tensor([0, 1]), backend="torch", batch_size=2)
    with pytest.raises(ValueError, match="out of range"):
        tf.explain(model, images, target=torch.tensor([0, 1, 2, 3, 9]), backend="torch", batch_size=2)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_batch_size(model, images, bad):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tf.explain(model, images, backend="torch", batch_size=bad)


def test_progress_bar(model, images, monkeypatch, capsys):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    tf.explain(model, images, backend="torch", batch_size=2, progress=True)
    shown = err.getvalue()
    assert "explain tokentm" in shown and "5/5" in shown
    for progress in (False, None):            # None: StringIO is not a terminal, so no bar
        err.seek(0)
        err.truncate()
        tf.explain(model, images, backend="torch", batch_size=2, progress=progress)
        assert err.getvalue() == ""
    with pytest.raises(TypeError, match="progress must be"):
        tf.explain(model, images, backend="torch", batch_size=2, progress="yes")
