"""The method registry (tokentm_fast/methods/): every method is one ``MethodSpec``, whose function runs
over either attention path, whose capabilities say what the entry then does, and a new method is a
registry entry plus one function."""
from __future__ import annotations

import lrp_oracle
import model_families as mf
import pytest
import torch
from helpers import rel_err_l2
from spec_oracle import explain as oracle
from spec_oracle import query, run_vit

import tokentm_fast as tf
from tokentm_fast.methods import REGISTRY, MethodSpec, get_method, resolve_options
from tokentm_fast.models import adapt
from tokentm_fast.paths import TORCH_KERNELS, Materialized


@pytest.fixture(scope="module")
def model64():
    return mf.timm_vit().double().eval()


#: the methods docs/methods.md defines (§3 to §6.3), written out, in the order ``tf.METHODS`` lists them
DOCUMENTED_METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp",
                      "attcat", "lrp", "partial_lrp", "transformer_attribution")


def test_the_registry_is_the_method_list():
    """The public method list is the documented one; each name looks up its own entry, which has a function;
    an unknown name is refused naming the known ones."""
    assert tf.METHODS == DOCUMENTED_METHODS
    for name in DOCUMENTED_METHODS:
        spec = get_method(name)
        assert spec.name == name and callable(spec.explain)
    with pytest.raises(ValueError, match="unknown method 'gradcam'; expected one of"):
        get_method("gradcam")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_entry_computes_its_method(model64, name):
    """A registry entry's function, called on the materialized path with its resolved defaults, is the
    method of docs/methods.md (the independent oracle, float64)."""
    vit = adapt(model64)
    images = mf.images().double()
    options = resolve_options(name, {}, vit.num_layers)
    (out,) = get_method(name).explain(vit, images, [torch.tensor([1, 3])], options, Materialized(TORCH_KERNELS))
    if name in lrp_oracle.METHODS:
        # the relevance pass (docs/methods.md §6.3) has its own literal oracle; (B, H, W) pixels for lrp
        ref = getattr(lrp_oracle, name)(model64, images, torch.tensor([1, 3])).reshape(out.shape)
    else:
        ref = oracle(model64, images, name, target=torch.tensor([1, 3]))
    assert ref.abs().max() > 0
    assert rel_err_l2(out, ref).max() < 1e-10


@pytest.mark.parametrize("name", list(REGISTRY))
def test_capabilities_are_what_the_entry_does(model64, name):
    spec = get_method(name)
    model, images = mf.timm_vit().eval(), mf.images()
    # full_matrix: the whole (B, N, N) matrix, or a refusal naming the methods that have one
    if spec.full_matrix:
        assert tf.explain(model, images, name, backend="torch", full=True).shape == (2, 17, 17)
    else:
        with pytest.raises(ValueError, match="full=True is available for"):
            tf.Explainer(model, name, full=True)
    # target_free: the same map for every target; the others depend on it
    a = tf.explain(model, images, name, target=0, backend="torch")
    b = tf.explain(model, images, name, target=1, backend="torch")
    assert torch.equal(a, b) == spec.target_free
    # layer_choice: end_layer / layers accepted, or refused as unknown options
    if spec.layer_choice:
        tf.Explainer(model, name, layers=[0])
    else:
        with pytest.raises(ValueError, match="unknown option"):
            tf.Explainer(model, name, layers=[0])
    # flash_refuses: every refused option value is refused by the entry with its reason
    for (option, value), why in spec.flash_refuses.items():
        with pytest.raises(ValueError, match=why.split(" per entry")[0].replace("(", r"\(").replace(")", r"\)")):
            tf.Explainer(model, name, backend="triton", attention="flash", **{option: value})


def _first_block_attention(vit, images, targets, options, path, full=False):
    """A new method for the test: raw attention of the *first* block, from the paths' own API (one map per
    target, the same for each)."""
    return [path.query_attention(vit, images, 0)[:, vit.num_prefix_tokens:]] * len(targets)


@pytest.mark.parametrize("backend,attention", [("torch", "auto"), ("triton", "materialized"), ("triton", "flash")])
def test_a_new_method_is_a_registry_entry_and_one_function(monkeypatch, backend, attention, device):
    """Registered, a method runs through the public entry on every path, options checked by its entry."""
    monkeypatch.setitem(REGISTRY, "first_block_attention",
                        MethodSpec("first_block_attention", _first_block_attention, needs_gradients=False,
                                   target_free=True))
    model, images = mf.timm_vit().eval(), mf.images()
    if backend == "torch" and device.type == "cuda":
        attention = "auto"
    out = tf.explain(model.to(device), images.to(device), "first_block_attention", backend=backend,
                     attention=attention).cpu()
    model, images = model.cpu(), images.cpu()
    _, layers, x0, m = run_vit(model.double(), images.double())
    q = query(m, 2, x0.shape[1])
    ref = torch.einsum("bi,bij->bj", q, layers[0]["attn"].detach().mean(1))[:, 1:].reshape(2, 4, 4)
    assert ref.std() > 0 and rel_err_l2(out, ref).max() < 1e-5
    # not the last block's (raw attention): the entry really ran the new function
    assert rel_err_l2(tf.explain(model.float(), images, "raw_attention", backend="torch"), ref).max() > 1e-3
    with pytest.raises(ValueError, match="unknown option"):
        tf.Explainer(model, "first_block_attention", start_layer=1)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_signed_flag_is_what_the_maps_do(name):
    """``signed=False``: the method's maps are never negative (what the pictures' one-sided colour map
    assumes); ``signed=True``: they take both signs (evidence for and against the target), on a random-init
    model, for every class as the target."""
    model, images = mf.timm_vit().eval(), mf.images()
    maps = torch.cat([tf.explain(model, images, name, target=t, backend="torch") for t in range(mf.CLASSES)])
    assert maps.shape == (2 * mf.CLASSES, 4, 4) and (maps > 0).any() and maps.std() > 0  # informative maps
    both_signs = [bool((m < 0).any() and (m > 0).any()) for m in maps]
    if get_method(name).signed:
        assert any(both_signs), f"{name} is flagged signed but gave no map with both signs"
    else:
        assert maps.min() >= 0, f"{name} is not flagged signed but gave {maps.min().item():g}"
