"""Issue 15 item 9: clear messages for a meta-device target and a score function that mixes images;
compiled / DataParallel models are unwrapped and explained as the underlying model."""
import pytest
import timm
import torch

import tokentm_fast as tf
from tokentm_fast.models import adapt, unwrap


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_meta_target_names_target_and_device(model, images):
    with pytest.raises(ValueError, match=r"target .*meta device"):
        tf.explain(model, images, target=torch.tensor([1, 2, 3], device="meta"), backend="torch")


@pytest.mark.parametrize("wrap", ["data_parallel", "compile", "compiled_data_parallel"])
def test_wrapped_models_are_explained_as_the_underlying_model(model, images, wrap):
    if wrap == "data_parallel":
        wrapped = torch.nn.DataParallel(model)
    elif wrap == "compile":
        wrapped = torch.compile(model)
    else:
        wrapped = torch.compile(torch.nn.DataParallel(model))
    assert unwrap(wrapped) is model
    assert adapt(wrapped).model is model
    want = tf.explain(model, images, target=2, backend="torch")
    assert want.abs().max() > 0                     # a real map, not a vacuous all-zero one
    got = tf.explain(wrapped, images, target=2, backend="torch")
    assert torch.equal(got, want)


def test_ddp_is_unwrapped(model):
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)   # no process group needed to unwrap
    torch.nn.Module.__init__(ddp)
    ddp.module = model
    assert unwrap(ddp) is model


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["tokentm", "legrad", "attn_gradcam"])
def test_score_function_that_mixes_images_is_refused(model, images, method, backend):
    with pytest.raises(ValueError, match="mixes the images of the batch.*independently"):
        tf.explain(model, images, method=method, target=lambda o: o[:, 3] + o[:, 3].sum(), backend=backend)
    # mixing that only reaches the last image is caught too
    with pytest.raises(ValueError, match="mixes the images"):
        tf.explain(model, images, method=method, target=lambda o: o[:, 3] + o[:, 3].cumsum(0), backend=backend)


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_independent_score_functions_pass_the_check(model, images, method):
    got = tf.explain(model, images, method=method, target=lambda o: o[:, 3] * o.softmax(-1)[:, 1], backend="torch")
    assert got.abs().max() > 0
    one = tf.explain(model, images, method=method, target=3, backend="torch")
    fn = tf.explain(model, images, method=method, target=lambda o: o[:, 3], backend="torch")
    assert torch.equal(fn, one)
    # a single image cannot mix: the check is not needed (and the function is accepted)
    assert tf.explain(model, images[:1], method=method, target=lambda o: o[:, 3] + o[:, 3].sum(),
                      backend="torch").shape == (1, 4, 4)
