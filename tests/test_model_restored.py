"""The model comes back exactly as it was, also when the call raises (issue: capture)."""
import pytest
import timm
import torch

import tokentm_fast as tf


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "fused": {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        # instance-level forward overrides (the attention call-site hook) must all be gone
        "patched": {n: m.__dict__.get("forward") for n, m in model.named_modules() if "forward" in m.__dict__},
    }


def assert_same(model, snap):
    now = snapshot(model)
    assert now["training"] == snap["training"]
    assert now["fused"] == snap["fused"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["hooks"] == snap["hooks"]
    assert now["patched"] == snap["patched"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were computed"


def make_model(train_mode):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, depth=3,
                              drop_rate=0.1, attn_drop_rate=0.1)
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = i % 2 == 0  # a mix of fused and explicit attention
    model.head.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    model.train(train_mode)
    model.blocks[1].eval()  # mixed per-module modes are restored one by one
    return model


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", tf.METHODS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_restored(method, backend, train_mode):
    model = make_model(train_mode)
    snap = snapshot(model)
    images = torch.randn(2, 3, 64, 64)
    e1 = tf.explain(model, images, method, backend=backend)
    assert_same(model, snap)
    # explanations are computed in eval mode: dropout never makes them random
    e2 = tf.explain(model, images, method, backend=backend)
    assert torch.equal(e1, e2)


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", tf.METHODS)
def test_model_restored_when_call_raises(method, backend):
    model = make_model(True)
    real_head = model.head
    model.head = Boom()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        tf.explain(model, torch.randn(1, 3, 64, 64), method, backend=backend)
    assert_same(model, snap)
    model.head = real_head


def test_fused_attention_model_gives_same_map_as_explicit():
    model = make_model(False)
    images = torch.randn(2, 3, 64, 64)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    a = tf.explain(model, images, "tokentm", backend="torch")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    b = tf.explain(model, images, "tokentm", backend="torch")
    assert torch.equal(a, b)
    assert all(not blk.attn.fused_attn for blk in model.blocks)


def test_works_under_no_grad_and_inference_of_caller():
    model = make_model(False)
    images = torch.randn(1, 3, 64, 64)
    ref = tf.explain(model, images, "tokentm", backend="torch")
    with torch.no_grad():
        assert torch.equal(tf.explain(model, images, "tokentm", backend="torch"), ref)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_a_users_own_forward_override_is_put_back(method):
    """The attention call-site hook replaces an instance-level forward and restores the one that was there."""
    import types

    model = make_model(False)
    attn = model.blocks[1].attn
    calls = []

    def user_forward(self, x, **kwargs):
        calls.append(1)
        return type(self).forward(self, x, **kwargs)

    attn.forward = types.MethodType(user_forward, attn)
    own = attn.__dict__["forward"]
    snap = snapshot(model)
    tf.explain(model, torch.randn(1, 3, 64, 64), method, backend="torch")
    assert_same(model, snap)
    assert attn.__dict__["forward"] is own
    model(torch.randn(1, 3, 64, 64))
    assert calls == [1]
