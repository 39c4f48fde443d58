"""tokentm_fast/torch_ops/transform_weights.py (with compute_dtype / token_lengths of tokentm_fast/precision.py and
the kernels' ε): the token transformation weight ``w`` of docs/methods.md §2, against the
independent implementation of tests/spec_oracle.py (float64), and its dtype and ε rules."""
import pytest
import torch
from spec_oracle import weights as oracle_weights

from tokentm_fast.kernels._utils import EPS
from tokentm_fast.precision import compute_dtype, token_lengths
from tokentm_fast.torch_ops.transform_weights import transform_weights

FLAGS = [(True, True), (True, False), (False, True), (False, False)]


def tokens(b=2, n=7, d=12, seed=0, dtype=torch.float64):
    """``(x, x̃)`` of shape ``(b, n, d)``; token 1 of x̃ is zero and token 2 of x is zero (the ε clamps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    xt = 0.5 * x + torch.randn(b, n, d, generator=g, dtype=torch.float64)
    xt[:, 1] = 0
    x[:, 2] = 0
    return x.to(dtype), xt.to(dtype)


@pytest.mark.parametrize("use_length,use_necc", FLAGS)
def test_matches_the_oracle_in_float64(use_length, use_necc):
    x, xt = tokens()
    w = transform_weights(x, xt, use_length=use_length, use_necc=use_necc)
    want = oracle_weights(x, xt, use_length=use_length, use_necc=use_necc)
    assert w.dtype == torch.float64 and w.shape == (2, 7)
    assert torch.isfinite(w).all() and w.abs().max() > 0
    # the oracle's ε is a float32 scalar (1e-6 rounded to float32: relative 3e-9), which the zero token
    # divides by; every other token agrees to float64 rounding
    torch.testing.assert_close(w, want, rtol=1e-8, atol=0)
    keep = [i for i in range(x.shape[1]) if i != 2]
    torch.testing.assert_close(w[:, keep], want[:, keep], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_give_float32_weights(dtype, tol):
    """float32 at least: half inputs are promoted, the result is float32 and close to the float64 weights
    of the same (rounded) inputs."""
    x, xt = tokens(dtype=dtype)
    w = transform_weights(x, xt)
    assert w.dtype == torch.float32
    want = oracle_weights(x.double(), xt.double())
    assert ((w.double() - want).abs().max() / want.abs().max()) <= tol


def test_the_parts_of_the_weight():
    x, xt = tokens()
    n = x.shape[1]
    necc = transform_weights(x, xt, use_length=False)
    torch.testing.assert_close(necc.sum(-1), torch.ones(2, dtype=torch.float64))   # a softmax over tokens
    assert (necc > 0).all()
    flat = transform_weights(x, xt, use_length=False, use_necc=False)
    assert torch.equal(flat, torch.full_like(flat, 1.0 / n))
    ratio = transform_weights(x, xt, use_necc=False) * n                             # |x̃| / max(|x|, ε)
    torch.testing.assert_close(ratio, xt.norm(dim=-1) / x.norm(dim=-1).clamp_min(EPS))
    assert (ratio[:, 1] == 0).all()                                                  # x̃ = 0: nothing moved
    torch.testing.assert_close(transform_weights(x, xt), ratio / n * necc * n)


def test_joint_scaling_leaves_the_weight_unchanged():
    """w depends on x and x̃ through |x̃|/|x| and their cosine: scaling both by one factor changes nothing
    (away from the ε clamps)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(transform_weights(7.5 * x, 7.5 * xt), transform_weights(x, xt), rtol=1e-12, atol=0)


def test_inputs_are_not_modified():
    x, xt = tokens(dtype=torch.float32)
    x0, xt0 = x.clone(), xt.clone()
    transform_weights(x, xt)
    assert torch.equal(x, x0) and torch.equal(xt, xt0)


def test_token_lengths_and_compute_dtype():
    x, _ = tokens(dtype=torch.bfloat16)
    lengths = token_lengths(x)
    assert lengths.dtype == torch.float32 and lengths.shape == (2, 7)
    torch.testing.assert_close(lengths, x.float().norm(dim=-1))
    assert compute_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)) == torch.float32
    assert compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert compute_dtype() == torch.float32
