"""Issue 15: layer choice beyond start_layer for the methods that aggregate over blocks (rollout's
product, LeGrad's sum, TokenTM's depth ablation: only the chosen blocks update C): end_layer= and
layers=[...], on every backend and path, against the float64
spec oracle (tests/spec_oracle.py, written from docs/methods.md)."""
import pytest
import timm
import torch

import tokentm_fast as tf
from spec_oracle import explain as oracle
from spec_oracle import rel_err

L = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8,
                              depth=L).eval()
    with torch.no_grad():                      # as tests/test_explain.py: every term matters
        for n, p in model.named_parameters():
            if "qkv.weight" in n:
                p.mul_(2.0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images


# option selection -> the blocks it chooses
SELECTIONS = [
    ({"layers": [0, 2]}, [0, 2]),
    ({"layers": [3, -4]}, [0, 3]),
    ({"layers": [1]}, [1]),
    ({"start_layer": 1, "end_layer": 3}, [1, 2]),
    ({"end_layer": -1}, None),                 # None: from the method's default start to L-1 exclusive
]
PATHS = [("reference", "auto"), ("torch", "auto"), ("triton", "materialized"), ("triton", "flash")]
# float32 paths vs the float64 oracle: the bound tests/test_explain.py uses (1e-5); the reference computes
# in float64 and returns float32, so only the final rounding (relative 2^-24 per entry) remains
TOL = {"reference": 2 * 2.0 ** -24, "torch": 1e-5, "triton": 1e-5}


@pytest.mark.parametrize("backend,attention", PATHS)
@pytest.mark.parametrize("method", ["rollout", "legrad", "tokentm"])
@pytest.mark.parametrize("sel", range(len(SELECTIONS)))
def test_layer_choice_matches_the_oracle(setup, method, backend, attention, sel):
    model, images = setup
    opts, blocks = SELECTIONS[sel]
    if blocks is None:
        start = {"rollout": 0, "legrad": L - 2, "tokentm": 0}[method]
        blocks = list(range(start, L - 1))
    e_ref = oracle(model, images, method, target=3, chosen=blocks)
    assert e_ref.abs().max() > 0
    e = tf.explain(model, images, method=method, target=3, backend=backend, attention=attention, **opts)
    err = rel_err(e, e_ref.reshape(e.shape))
    assert (err <= TOL[backend]).all(), err
    # the choice matters: another selection gives another map (guards against an ignored option)
    other = [l for l in range(L) if l not in blocks][:1] or [0]
    if other != blocks:
        e_other = oracle(model, images, method, target=3, chosen=other)
        assert (rel_err(e, e_other.reshape(e.shape)) > 100 * TOL[backend]).all()


@pytest.mark.parametrize("method,start", [("rollout", 1), ("legrad", -3), ("legrad", 0), ("tokentm", 0),
                                          ("tokentm", 2)])
def test_full_range_equals_the_default_bit_for_bit(setup, method, start):
    model, images = setup
    default = tf.explain(model, images, method=method, target=3, backend="torch", start_layer=start)
    first = start % L
    assert torch.equal(tf.explain(model, images, method=method, target=3, backend="torch",
                                  layers=range(first, L)), default)
    assert torch.equal(tf.explain(model, images, method=method, target=3, backend="torch",
                                  start_layer=start, end_layer=L), default)


@pytest.mark.parametrize("opts,match", [
    ({"layers": []}, "layers is empty"),
    ({"layers": [0, 0]}, r"block\(s\) \[0\] more than once"),
    ({"layers": [1, -3]}, r"block\(s\) \[1\] more than once"),
    ({"layers": [L]}, "out of range"),
    ({"layers": [-L - 1]}, "out of range"),
    ({"end_layer": L + 1}, "end_layer=5 out of range"),
    ({"start_layer": 2, "end_layer": 2}, "greater than start_layer"),
    ({"start_layer": 1, "layers": [2]}, "either layers"),
    ({"end_layer": 3, "layers": [2]}, "either layers"),
])
def test_bad_layer_choices_are_refused(setup, opts, match):
    model, _ = setup
    with pytest.raises(ValueError, match=match):
        tf.Explainer(model, method="rollout", **opts)


def test_layer_choice_types_and_methods(setup):
    model, _ = setup
    with pytest.raises(TypeError, match="layers must hold ints"):
        tf.Explainer(model, method="legrad", layers=[1.0])
    with pytest.raises(TypeError, match="list of block indices"):
        tf.Explainer(model, method="legrad", layers=2)
    with pytest.raises(TypeError, match="end_layer must be an int"):
        tf.Explainer(model, method="legrad", end_layer="3")
    for method in ("gae", "attn_gradcam", "raw_attention"):
        with pytest.raises(ValueError, match="unknown option"):
            tf.Explainer(model, method=method, layers=[1])
