"""Dispatch decisions of ``tokentm_fast.api`` (issue 16 item 4), made at the entry and testable without a GPU.

``Explainer.backend_for`` / ``attention_for`` read only the images' device and dtype, so a stand-in
``SimpleNamespace(device=torch.device("cuda"), dtype=...)`` asks them what a CUDA call would do;
whether Triton can run is one function (``api.triton_usable``), replaced where a test needs a working
GPU Triton. The rules:

- ``backend="auto"``: Triton for float32 / bfloat16 / float16 on CUDA, PyTorch for float64 (the kernels
  do not compile for it) and on the CPU; a CUDA call that cannot use Triton (not importable, or the CPU
  interpreter switched on) takes PyTorch and warns once per Explainer, naming why. The interpreter never
  runs on CUDA tensors; ``backend="triton"`` refuses instead.
- ``attention="auto"``: heads wider than ``MAX_HEAD_DIM`` take the materialized path, decided before the
  call from the adapter's head width; ``attention="flash"`` refuses them when the Explainer is built.
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import timm
import torch

import tokentm_fast as tf
from tokentm_fast import api
from tokentm_fast.capture import prepared_model
from tokentm_fast.models import adapt
from tokentm_fast.paths import MAX_HEAD_DIM, head_width

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


def on(device, dtype=torch.float32):
    """What backend_for / attention_for read of a batch of images."""
    device = torch.device(device)
    return SimpleNamespace(device=device, is_cuda=device.type == "cuda", dtype=dtype)


def vit(embed_dim=64, num_heads=2, depth=1):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8,
                             embed_dim=embed_dim, num_heads=num_heads, depth=depth).eval()


@pytest.fixture(scope="module")
def model():
    return vit()


@pytest.fixture
def gpu_triton(monkeypatch):
    """Triton usable on CUDA (as on a GPU machine), on the CPU as the suite has it."""
    real = api.triton_usable
    monkeypatch.setattr(api, "triton_usable", lambda d: torch.device(d).type == "cuda" or real(d))


@pytest.fixture
def interpreter_on(monkeypatch):
    """The process as the CPU suite has it (TRITON_INTERPRET=1: Triton runs on CPU tensors only), on any
    machine: on a GPU run of the suite the real check would let CUDA through."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(api, "triton_usable", lambda d: torch.device(d).type == "cpu")


# --------------------------------------------------------------------------- float64 under auto
@pytest.mark.parametrize("dtype,want", [(torch.float32, "triton"), (torch.bfloat16, "triton"),
                                        (torch.float16, "triton"), (torch.float64, "torch")])
def test_auto_backend_on_cuda_by_dtype(model, gpu_triton, dtype, want):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float64 model is a rule, not a failure: no warning
        assert tf.Explainer(model, backend="auto").backend_for(on("cuda", dtype)) == want


def test_explicit_triton_refuses_float64(model, gpu_triton):
    with pytest.raises(ValueError, match="float64"):
        tf.Explainer(model, backend="triton").backend_for(on("cuda", torch.float64))


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched while the test runs, interpreted (CPU) or compiled (CUDA):
    every launch goes through ``InterpretedFunction.run`` or ``JITFunction.run``, whatever module holds the
    kernel."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []
    for cls in (InterpretedFunction, JITFunction):
        def run(self, *args, _real=cls.run, **kwargs):
            launched.append(self.fn.__name__)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return launched


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auto_runs_the_backend_it_must_choose(device, triton_launches, dtype):
    """The call itself on the suite's device (on CUDA, float64 is the case that used to reach the flash
    kernels): ``backend="auto"`` launches Triton kernels exactly where the rules say it takes Triton (float32
    on CUDA with a usable Triton; never for float64, never on the CPU), recorded at Triton's launch, and its
    map is the float64 oracle's (tests/spec_oracle.py), without a warning."""
    from helpers import rel_err_l2
    from spec_oracle import explain as oracle

    model = vit(depth=2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = oracle(model, x, "tokentm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tf.explain(model.to(device, dtype), x.to(device, dtype), "tokentm", backend="auto").cpu()
    must_take_triton = dtype != torch.float64 and device.type == "cuda" and api.triton_usable(device)
    assert bool(triton_launches) == must_take_triton, triton_launches
    assert want.abs().max() > 0 and want.std() > 0
    assert rel_err_l2(got, want.reshape(got.shape)).max() < 1e-5


def test_the_launch_recorder_sees_the_triton_backend(model, device, triton_launches):
    """Not vacuous: the same recorder sees the kernels of an explicit ``backend="triton"`` call."""
    if not api.triton_usable(device):
        pytest.skip("Triton cannot run on the suite's device here")
    tf.explain(model.to(device), torch.randn(1, 3, 16, 16).to(device), "tokentm", backend="triton")
    model.cpu()
    assert triton_launches


def test_flash_with_float64_takes_the_pytorch_twin(model, gpu_triton):
    """float64 has no Triton kernels: under backend='auto' it takes PyTorch, whose flash formulation
    (tokentm_fast.torch_ops.attention) serves attention='flash'; backend='triton' still refuses float64."""
    ex = tf.Explainer(model, backend="auto", attention="flash")
    x = on("cuda", torch.float64)
    backend = ex.backend_for(x)
    assert backend == "torch" and ex.attention_for(x, backend) == "flash"


# --------------------------------------------------------------------------- CUDA without a usable Triton
def test_interpreter_is_never_used_for_cuda_tensors():
    """This process imported the kernels for the interpreter (tests/conftest.py): CUDA is refused."""
    from tokentm_fast.kernels._utils import kernels_interpreted

    if not kernels_interpreted():
        pytest.skip("this run compiles the kernels for the GPU (--device cuda): no interpreter to refuse")
    assert not api.triton_usable(CUDA)
    assert "TRITON_INTERPRET=1" in api.triton_unusable_reason(CUDA)
    assert api.triton_usable(torch.device("cpu"))  # where the interpreter does run
    assert not api.triton_unusable_reason(torch.device("cpu"))


def test_auto_on_cuda_with_the_interpreter_warns_once_per_explainer(model, interpreter_on):
    ex = tf.Explainer(model, backend="auto")
    with pytest.warns(UserWarning, match=r"PyTorch backend .*TRITON_INTERPRET=1") as rec:
        assert ex.backend_for(on("cuda")) == "torch"
        assert ex.backend_for(on("cuda")) == "torch"
        assert ex.backend_for(on("cuda", torch.bfloat16)) == "torch"
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    with pytest.warns(UserWarning, match="TRITON_INTERPRET"):  # a new Explainer says it again
        tf.Explainer(model, backend="auto").backend_for(on("cuda"))


def test_explicit_triton_on_cuda_with_the_interpreter_is_refused(model, interpreter_on):
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cuda tensors: .*TRITON_INTERPRET"):
        tf.Explainer(model, backend="triton").backend_for(on("cuda"))


def test_auto_on_cuda_without_triton_warns(model, monkeypatch):
    from tokentm_fast.kernels import _utils

    monkeypatch.setattr(_utils, "triton_importable", lambda: False)  # what triton_available and the reason read
    assert not api.triton_usable(CUDA)
    with pytest.warns(UserWarning, match="Triton is not installed"):
        assert tf.Explainer(model, backend="auto").backend_for(on("cuda")) == "torch"
    with pytest.raises(ValueError, match="not installed"):
        tf.Explainer(model, backend="triton").backend_for(on("cuda"))


def test_auto_on_cpu_is_silent(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tf.Explainer(model, backend="auto").backend_for(on("cpu")) == "torch"


# --------------------------------------------------------------------------- head width
@pytest.mark.parametrize("embed_dim,heads", [(64, 2), (320, 2), (96, 1), (256, 2)])
def test_head_width_from_the_adapter(embed_dim, heads):
    assert head_width(adapt(vit(embed_dim, heads))) == embed_dim // heads


def test_head_width_of_every_family():
    """The width the entry reads is the one each adapter's attention call site passes to the core."""
    import model_families as mf
    from model_families import FAMILIES

    for name, build in FAMILIES.items():
        a = adapt(build())
        d = head_width(a)
        seen = []

        def core(l, q, k, v, scale):
            seen.append(q.shape[-1])
            return torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v

        with prepared_model(a) as handles, torch.no_grad():
            a.replace_attention(range(a.num_layers), core, handles)
            a.forward(mf.images(batch=1))
        assert d is not None and seen and set(seen) == {d}, (name, seen, d)


def test_wide_heads_take_the_materialized_path_under_auto(gpu_triton):
    wide, narrow = vit(320, 2), vit(256, 2)  # heads 160 and 128 wide
    assert head_width(adapt(wide)) > MAX_HEAD_DIM >= head_width(adapt(narrow))
    for backend in ("auto", "triton"):
        for m, want in ((wide, "materialized"), (narrow, "flash")):
            ex = tf.Explainer(m, backend=backend)
            assert ex.attention_for(on("cuda"), ex.backend_for(on("cuda"))) == want, (backend, want)


def test_flash_refuses_wide_heads_when_built():
    with pytest.raises(ValueError, match=r"heads up to 128 wide; this model's heads are 160 wide"):
        tf.Explainer(vit(320, 2), backend="triton", attention="flash")
    tf.Explainer(vit(256, 2), backend="triton", attention="flash")  # 128 is served


def test_wide_heads_explained_under_auto_on_the_triton_backend(device):
    """End to end on the suite's device (CPU: the interpreter; CUDA: where the 160-wide heads used to reach
    the flash kernels and raise mid-call): backend='triton' takes the materialized path and equals the torch
    map (computed on the CPU)."""
    import copy

    m = vit(320, 2)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    m_dev, x_dev = copy.deepcopy(m).to(device), x.to(device)
    assert tf.Explainer(m_dev, backend="triton").attention_for(x_dev, "triton") == "materialized"
    got = tf.explain(m_dev, x_dev, "tokentm", backend="triton").cpu()
    ref = tf.explain(m, x, "tokentm", backend="torch")
    assert ref.abs().max() > 0
    assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-5
