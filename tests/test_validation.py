"""The index rule of the public entries (tokentm_fast/validation.py, ``check_index``) and its use for the
methods' block options (tokentm_fast/methods/options.py; issue 26 item 4).

One rule for every method and entry, Python's: an index in ``[-n, n)``, ``-k`` the k-th from the end.
Before issue 26, ``start_layer=-2`` was refused for TokenTM, rollout and transformer attribution
("expected 0 <= start_layer < L") while LeGrad and ``layers=`` took negatives.

- ``check_index`` against Python's own indexing of a list of n items (the oracle);
- ``start_layer=-2`` against the float64 spec oracle given the blocks ``[L-2, L-1]`` explicitly, and equal
  bit for bit to ``start_layer=L-2`` (TokenTM, rollout, LeGrad; transformer attribution against its
  LRP oracle), on maps that are informative and that the option changes;
- ``layers=[-1]`` equal to ``layers=[L-1]``; out-of-range values refused for every method, naming the range;
- ``tokentm_fast.ops``' ``query_index`` follows the same rule.
"""
import pytest
import torch
from helpers import rel_err_l2
from spec_oracle import explain as oracle

import tokentm_fast as tf
from tokentm_fast.methods import REGISTRY
from tokentm_fast.validation import api_query_index, check_index

L = 4  # blocks of the test model


@pytest.fixture(scope="module")
def layered(make_model, make_images):
    """timm vit_tiny with L blocks, 7 classes, sharpened (every term of every method matters), two images."""
    return make_model("timm_tiny", num_classes=7, depth=L, sharp=True).eval(), make_images()


# --------------------------------------------------------------------------- check_index
@pytest.mark.parametrize("n", [1, 3, 5])
def test_check_index_is_pythons_rule(n):
    items = list(range(n))
    for value in range(-n - 3, n + 3):
        try:
            want = items[value]             # Python's own indexing is the oracle
        except IndexError:
            with pytest.raises(ValueError, match=rf"expected {-n} <= i < {n}; negative values count from the end"):
                check_index("i", value, n, f"{n} things")
        else:
            assert check_index("i", value, n, f"{n} things") == want


@pytest.mark.parametrize("bad", [1.0, True, "1", None])
def test_check_index_refuses_non_ints(bad):
    with pytest.raises(TypeError, match="option start_layer must be an int"):
        check_index("option start_layer", bad, 4, "a model with 4 blocks")


def test_query_index_of_the_operators_follows_the_same_rule():
    n = 5
    for value in range(-n - 2, n + 2):
        try:
            want = check_index("query_index", value, n, "N tokens")
        except ValueError:
            with pytest.raises(ValueError, match=rf"query_index {value} is out of range.*{-n} <= query_index < {n}"):
                api_query_index(value, n)
        else:
            assert api_query_index(value, n) == want


# --------------------------------------------------------------------------- start_layer / layers of the methods
START_METHODS = sorted(m for m, spec in REGISTRY.items() if "start_layer" in spec.defaults)


def test_the_methods_with_start_layer():
    assert START_METHODS == ["legrad", "rollout", "tokentm", "transformer_attribution"]


def _map(model, images, method, **opts):
    return tf.explain(model, images, method, target=3, backend="torch", **opts)


@pytest.mark.parametrize("method", ["tokentm", "rollout", "legrad"])
def test_negative_start_layer_counts_from_the_end(layered, method):
    model, images = layered
    e = _map(model, images, method, start_layer=-2)
    ref = oracle(model, images, method, target=3, chosen=[L - 2, L - 1])
    assert (rel_err_l2(e, ref.reshape(e.shape)) <= 1e-5).all()       # the float32 bound of tests/test_api.py
    assert torch.equal(e, _map(model, images, method, start_layer=L - 2))
    # informative, and the option is not ignored: all blocks give another map
    assert (e.flatten(1).amax(1) > e.flatten(1).amin(1)).all()
    assert (rel_err_l2(e, _map(model, images, method, start_layer=0)) > 1e-3).all()


def test_negative_start_layer_of_transformer_attribution(layered):
    import lrp_oracle

    model, images = layered
    e = _map(model, images, "transformer_attribution", start_layer=-2)
    ref = lrp_oracle.transformer_attribution(model, images, torch.tensor([3, 3]), start_layer=L - 2)
    tol = REGISTRY["transformer_attribution"].float32_tolerance
    assert (rel_err_l2(e, ref.reshape(e.shape)) <= tol).all()
    assert torch.equal(e, _map(model, images, "transformer_attribution", start_layer=L - 2))
    assert (e.flatten(1).amax(1) > e.flatten(1).amin(1)).all()


@pytest.mark.parametrize("method", ["tokentm", "rollout", "legrad"])
def test_layers_minus_one_is_the_last_block(layered, method):
    model, images = layered
    e = _map(model, images, method, layers=[-1])
    assert torch.equal(e, _map(model, images, method, layers=[L - 1]))
    ref = oracle(model, images, method, target=3, chosen=[L - 1])
    assert (rel_err_l2(e, ref.reshape(e.shape)) <= 1e-5).all()
    assert (e.flatten(1).amax(1) > e.flatten(1).amin(1)).all()


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("value", [-L - 1, L])
def test_out_of_range_start_layer_names_the_range_for_every_method(layered, method, value):
    model, _ = layered
    with pytest.raises(ValueError, match=rf"start_layer={value} out of range for a model with {L} blocks "
                                         rf"\(expected {-L} <= start_layer < {L}"):
        tf.Explainer(model, method=method, start_layer=value)


@pytest.mark.parametrize("method", START_METHODS)
def test_every_start_layer_in_range_is_accepted(layered, method):
    model, _ = layered
    for value in range(-L, L):
        assert tf.Explainer(model, method=method, start_layer=value).options["start_layer"] == value % L


def test_out_of_range_layers_name_the_entry_and_the_range(layered):
    model, _ = layered
    with pytest.raises(ValueError, match=rf"option layers\[1\]={-L - 1} out of range .*expected {-L} <= l < {L}"):
        tf.Explainer(model, method="tokentm", layers=[0, -L - 1])
