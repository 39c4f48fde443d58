"""Attention-pool heads (tokentm_fast/methods/pool.py, docs/methods.md §6.1) beyond the timm model that
tests/test_attention_pool.py checks against its literal oracle: open_clip's TimmModel wrapper (open_clip's
SigLIP towers) and LeGrad's neutral-prompt correction."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err_l2
from torch import nn

import tokentm_fast as tf

METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp", "attcat",
           "lrp", "partial_lrp", "transformer_attribution")


def map_vit(num_classes=0, seed=0):
    """A SigLIP-like timm ViT (attention pool, no class token), its pool made non-degenerate."""
    import timm

    torch.manual_seed(seed)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=num_classes,
        global_pool="map", class_token=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        pool = m.attn_pool
        pool.latent.copy_(torch.randn(pool.latent.shape, generator=g))
        pool.q.weight.mul_(3.0)
        pool.kv.weight.mul_(3.0)
    return m.eval()


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_open_clip_timm_model_is_its_trunk_and_projection():
    """open_clip's TimmModel(trunk, proj) explains as the timm model whose classifier is that projection."""
    pytest.importorskip("open_clip")
    from open_clip.timm_model import TimmModel

    bare = map_vit(num_classes=16)
    with torch.no_grad():
        bare.head.bias.zero_()
    wrapped = TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=32, pool="token", proj="linear")
    wrapped.trunk = map_vit(num_classes=0)
    wrapped.trunk.load_state_dict({k: v for k, v in bare.state_dict().items() if not k.startswith("head.")})
    wrapped.head.proj = nn.Linear(48, 16, bias=False)
    with torch.no_grad():
        wrapped.head.proj.weight.copy_(bare.head.weight)
    wrapped.eval()
    x = images()
    torch.testing.assert_close(wrapped(x), bare(x))
    assert type(tf.models.adapt(wrapped)).__name__ == "OpenClipTimmViT"
    target = tf.class_logit(torch.tensor([3, 7]))
    for method in METHODS:
        for backend in ("torch", "reference"):
            want = tf.explain(bare, x, method, target=target, backend=backend)
            got = tf.explain(wrapped, x, method, target=target, backend=backend)
            assert want.shape == (2, 4, 4)
            if method != "attn_gradcam":
                assert want.std() > 0, method
            assert rel_err_l2(got, want).max() < 1e-6, (method, backend)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_neutral_prompt_correction(backend):
    """§6: the map is zeroed where the min–max map of the neutral prompt's embedding exceeds the threshold."""
    model, x = map_vit(), images()
    g = torch.Generator().manual_seed(5)
    text, neutral = torch.randn(48, generator=g), torch.randn(48, generator=g)
    plain = tf.explain(model, x, "legrad", target=tf.cosine_similarity(text), backend=backend)
    e_n = tf.explain(model, x, "legrad", target=tf.cosine_similarity(neutral), backend=backend).flatten(1)
    lo, hi = e_n.min(1, keepdim=True).values, e_n.max(1, keepdim=True).values
    mask = ((e_n - lo) / (hi - lo) > 0.5).reshape(plain.shape)
    assert mask.any() and (~mask).any() and (plain[mask] != 0).any()
    got = tf.explain(model, x, "legrad", target=tf.cosine_similarity(text), backend=backend,
                     neutral_prompt=neutral, correction_threshold=0.5)
    assert torch.equal(got[mask], torch.zeros_like(got[mask]))
    assert torch.equal(got[~mask], plain[~mask])


def test_neutral_prompt_options_are_checked():
    model = map_vit()
    with pytest.raises(TypeError, match="neutral_prompt must be None or a \\(D',\\) floating embedding"):
        tf.Explainer(model, "legrad", neutral_prompt=torch.ones(2, 48))
    with pytest.raises(ValueError, match=r"correction_threshold must be a number in \[0, 1\]"):
        tf.Explainer(model, "legrad", neutral_prompt=torch.ones(48), correction_threshold=2)
