"""tokentm_fast/capture.py: ``prepared_model`` puts the model back exactly as it was, also when the call
raises (through ``explain``, and directly); ``LayerRecorder`` records each chosen block's tensors as an
independent float64 forward (tests/spec_oracle.py) computes them."""
import types
from contextlib import nullcontext

import pytest
import torch
from model_families import assert_same, snapshot
from spec_oracle import run_vit

import tokentm_fast as tf
from tokentm_fast.capture import LayerRecorder, prepared_model
from tokentm_fast.models import adapt


@pytest.fixture
def mixed_model(make_model):
    """``mixed_model(train_mode)``: timm vit_tiny at 64x64 (16x16 patches, 3 blocks, dropout 0.1) with a mix
    of fused and explicit attention, a frozen head weight and per-module training modes."""
    def build(train_mode):
        model = make_model("timm_tiny", img_size=64, patch_size=16, depth=3, drop_rate=0.1, attn_drop_rate=0.1)
        for i, blk in enumerate(model.blocks):
            blk.attn.fused_attn = i % 2 == 0  # a mix of fused and explicit attention
        model.head.weight.requires_grad_(False)  # a frozen parameter must stay frozen
        model.train(train_mode)
        model.blocks[1].eval()  # mixed per-module modes are restored one by one
        return model
    return build


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", tf.METHODS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_restored(mixed_model, make_images, method, backend, train_mode):
    model = mixed_model(train_mode)
    snap = snapshot(model)
    images = make_images(size=64)
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
def test_model_restored_when_call_raises(mixed_model, make_images, method, backend):
    model = mixed_model(True)
    real_head = model.head
    model.head = Boom()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        tf.explain(model, make_images(batch=1, size=64), method, backend=backend)
    assert_same(model, snap)
    model.head = real_head


def test_fused_attention_model_gives_same_map_as_explicit(mixed_model, make_images):
    model = mixed_model(False)
    images = make_images(size=64)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    a = tf.explain(model, images, "tokentm", backend="torch")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    b = tf.explain(model, images, "tokentm", backend="torch")
    assert torch.equal(a, b)
    assert all(not blk.attn.fused_attn for blk in model.blocks)


def test_works_under_no_grad_and_inference_of_caller(mixed_model, make_images):
    model = mixed_model(False)
    images = make_images(batch=1, size=64)
    ref = tf.explain(model, images, "tokentm", backend="torch")
    with torch.no_grad():
        assert torch.equal(tf.explain(model, images, "tokentm", backend="torch"), ref)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ["tokentm", "legrad"])
def test_a_users_own_forward_override_is_put_back(mixed_model, make_images, method):
    """The attention call-site hook replaces an instance-level forward and restores the one that was there."""
    model = mixed_model(False)
    attn = model.blocks[1].attn
    calls = []

    def user_forward(self, x, **kwargs):
        calls.append(1)
        return type(self).forward(self, x, **kwargs)

    attn.forward = types.MethodType(user_forward, attn)
    own = attn.__dict__["forward"]
    snap = snapshot(model)
    tf.explain(model, make_images(batch=1, size=64), method, backend="torch")
    assert_same(model, snap)
    assert attn.__dict__["forward"] is own
    model(make_images(batch=1, size=64))
    assert calls == [1]


# -- prepared_model, directly ------------------------------------------------------------------------
class Handle:
    """A ``.remove()``-able handle that logs its removal."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def remove(self):
        self.log.append(self.name)


@pytest.mark.parametrize("raises", [False, True])
def test_prepared_model_sets_up_and_restores(mixed_model, raises):
    model = mixed_model(True)
    snap = snapshot(model)
    removed = []
    with pytest.raises(RuntimeError, match="inside") if raises else nullcontext():
        with prepared_model(adapt(model)) as handles:
            assert not any(m.training for m in model.modules())
            assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
            assert not any(p.requires_grad for p in model.parameters())
            handles += [Handle(removed, "first"), Handle(removed, "second")]
            if raises:
                raise RuntimeError("inside")
    assert removed == ["second", "first"]          # last added, first removed
    assert_same(model, snap)


def test_prepared_model_takes_a_bare_module(mixed_model):
    model = mixed_model(False)
    snap = snapshot(model)
    with prepared_model(model) as handles:
        assert handles == [] and not any(p.requires_grad for p in model.parameters())
    assert_same(model, snap)


# -- LayerRecorder against an independent float64 forward ------------------------------------------------
@pytest.fixture(scope="module")
def recorded_setup(make_model, make_images):
    """A float64 timm ViT with LayerScale (3 blocks, sharpened weights) and its images."""
    model = make_model("timm_tiny", depth=3, init_values=0.3, sharp=True).double().eval()
    return model, make_images(batch=2).double()


def record(model, images, layers, **kwargs):
    """``LayerRecorder(adapt(model), layers, **kwargs)`` over one forward; the recorder and the output."""
    vit = adapt(model)
    recorder = LayerRecorder(vit, layers, **kwargs)
    with prepared_model(vit) as handles, torch.set_grad_enabled(kwargs.get("grad_from") is not None):
        recorder.install(handles)
        out = vit.forward(images)
    return recorder, out


def test_records_match_the_oracle_forward(recorded_setup):
    model, images = recorded_setup
    snap = snapshot(model)
    logits, spec, x0, model64 = run_vit(model, images)
    recorder, out = record(model, images, [0, 2])
    assert_same(model, snap)
    assert torch.allclose(out, logits.detach(), rtol=0, atol=1e-12)
    assert sorted(recorder.records) == [0, 2]
    assert torch.equal(recorder.first_input, x0)
    for l, rec in recorder.records.items():
        ref = spec[l]
        assert set(rec) == set(LayerRecorder.ALL_KEYS)
        blk = model64.blocks[l]
        b, n, _ = rec["x_in"].shape
        h = blk.attn.num_heads
        v = rec["values"].reshape(b, n, h, -1).transpose(1, 2)               # (B, H, N, d)
        expected = {
            "x_in": ref["x_in"], "attn": ref["attn"].detach(), "y": ref["y"], "mlp_out": ref["m"],
            "x_out": ref["x_out"].detach(),
            "attn_out": (ref["attn"].detach() @ v).transpose(1, 2).reshape(b, n, -1),
        }
        for key, want in expected.items():
            assert rec[key].shape == want.shape, (l, key)
            assert torch.allclose(rec[key], want, rtol=1e-12, atol=1e-12), (l, key)
        # the values, projected and scaled by LayerScale, are the oracle's x̃ of the attention sub-layer
        x_tilde = (rec["values"] @ blk.attn.proj.weight.T + blk.attn.proj.bias) * blk.ls1.gamma
        assert torch.allclose(x_tilde, ref["x_tilde"], rtol=1e-12, atol=1e-12), l


def test_grad_from_makes_the_graph_start_there(recorded_setup):
    model, images = recorded_setup
    recorder, out = record(model, images, [0, 1, 2], grad_from=1)
    recs = recorder.records
    assert not recs[0]["attn"].requires_grad                 # before the leaf: no graph
    assert recs[1]["attn"].requires_grad and recs[2]["x_out"].requires_grad
    assert not any(recs[l][k].requires_grad for l in recs for k in ("x_in", "values", "y", "mlp_out"))
    g1, g2 = torch.autograd.grad(out[:, 3].sum(), [recs[1]["attn"], recs[2]["attn"]])
    assert g1.abs().max() > 0 and g2.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())


def test_on_layer_keys_and_a_custom_core(recorded_setup):
    model, images = recorded_setup
    seen = []

    def on_layer(l, rec):
        seen.append((l, sorted(rec)))
        rec.pop("values")                                      # a fast path drops what it has reduced

    recorder, _ = record(model, images, [2, 0], on_layer=on_layer, keys=("values", "attn_out", "x_out"))
    assert seen == [(0, ["attn_out", "values", "x_out"]), (2, ["attn_out", "values", "x_out"])]
    assert all(sorted(rec) == ["attn_out", "x_out"] for rec in recorder.records.values())

    calls = []

    def core(l, q, k, v, scale):
        calls.append(l)
        return torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v

    full, out = record(model, images, [1])
    custom, out_core = record(model, images, [1], keys=("values", "attn_out"), core=core)
    assert calls == [1] and torch.equal(out_core, out)
    assert torch.allclose(custom.records[1]["attn_out"], full.records[1]["attn_out"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="does not expose the attention probabilities"):
        LayerRecorder(adapt(model), [1], core=core)
