"""Issue 15: ``TokenTMAttribution.attribute(..., additional_forward_args=...)`` as Captum has it: None
or empty is accepted (same maps), non-empty is refused with a clear message, not silently dropped."""
import pytest
import timm
import torch

from tokentm_fast.interop import TokenTMAttribution


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2).eval()


def test_empty_forward_args_give_the_same_maps(vit):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    attr = TokenTMAttribution(vit, backend="torch")
    want = attr.attribute(x, target=1)
    assert want.shape == (2, 1, 32, 32) and want.abs().max() > 0
    for args in (None, (), []):
        assert torch.equal(attr.attribute(x, target=1, additional_forward_args=args), want)
    assert torch.equal(attr.attribute(x, 1, None), want)       # Captum's positional order


@pytest.mark.parametrize("args", [(torch.ones(1),), [0.5, "x"], torch.ones(2)])
def test_non_empty_forward_args_are_refused(vit, args):
    attr = TokenTMAttribution(vit, backend="torch")
    with pytest.raises(ValueError, match=r"additional_forward_args: VisionTransformer .*images only"):
        attr.attribute(torch.randn(2, 3, 32, 32), target=1, additional_forward_args=args)
