"""explain(backend="triton") end to end on the suite's device (``device`` fixture, tests/conftest.py: the CPU
under Triton's interpreter, or CUDA), against the spec oracle.

Models and images are built on the CPU, where the float64 oracle runs on them; the explanation gets a copy
of the model and the images on the device. On CUDA the suite switches TF32 off, so torch's matmuls, cuDNN's
convolutions and the attention kernels multiply in full float32 and the float32 tolerances are those of
the CPU.
"""
import copy
import os

import pytest
import timm
import torch

import tokentm_fast as tf
from spec_oracle import explain as oracle
from spec_oracle import rel_err
from tokentm_fast.kernels import triton_available

_SUITE_DEVICE = os.environ.get("TOKENTM_TEST_DEVICE", "cpu")  # set by tests/conftest.py
pytestmark = pytest.mark.skipif(not triton_available(_SUITE_DEVICE),
                                reason=f"Triton cannot run on {_SUITE_DEVICE} here (cpu: TRITON_INTERPRET=1)")


def small_model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=40, patch_size=8,
                              depth=3, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "qkv.weight" in n:
                p.mul_(2.0)
    return model


def triton_explain(model, images, method, device, dtype=None, **kwargs):
    """``explain(backend="triton")`` of a copy of the (CPU) model on ``device``; the map back on the CPU."""
    on_device = copy.deepcopy(model).to(device=device, dtype=dtype)
    return tf.explain(on_device, images.to(device), method, backend="triton", **kwargs).cpu()


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}])
@pytest.mark.parametrize("method", tf.METHODS)
def test_triton_backend_matches_oracle(method, kwargs, device):
    model = small_model(**kwargs)
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    e_ref = oracle(model, images, method)
    e = triton_explain(model, images, method, device)
    assert torch.isfinite(e).all()
    assert (rel_err(e, e_ref.reshape(e.shape)) <= 1e-5).all()


@pytest.mark.parametrize("method", ["tokentm", "gae", "rollout"])
def test_triton_full_matrix(method, device):
    model = small_model()
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    c_ref = oracle(model, images, method, full=True)
    c = triton_explain(model, images, method, device, full=True)
    # kernels.matrix_update multiplies in TF32 only where torch's switch allows it (the fast path passes
    # torch.backends.cuda.matmul.allow_tf32, which the suite keeps off on CUDA): full float32 on both devices.
    tol = 1e-5
    assert (rel_err(c, c_ref) <= tol).all()


def test_triton_tokentm_options(device):
    model = small_model()
    images = torch.randn(1, 3, 40, 40)
    opts = {"head_fusion": "decoupled", "use_length": False, "start_layer": 1}
    e_ref = oracle(model, images, "tokentm", **opts)
    e = triton_explain(model, images, "tokentm", device, **opts)
    assert (rel_err(e, e_ref.reshape(e.shape)) <= 1e-5).all()


def test_triton_bf16_model(device):
    """bf16 model → bf16 A, G and tokens into the kernels, fp32 accumulation (spec §7: 2e-2)."""
    model = small_model()
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    e_ref = oracle(model, images, "tokentm")
    e = triton_explain(model, images, "tokentm", device, dtype=torch.bfloat16)
    assert (rel_err(e, e_ref.reshape(e.shape)) <= 2e-2).all()
