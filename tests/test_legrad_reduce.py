"""tokentm_fast/torch_ops/legrad_reduce.py: LeGrad's per-layer reduction (docs/methods.md §6),
``eˡ_j = mean_h mean_{i=1..N} max(G̃ˡ_h[i, j], 0)``, against a loop written from the formula; only the rows
that can be non-zero may be passed, the mean still divides by the full token count."""
import pytest
import torch

from tokentm_fast.torch_ops.legrad_reduce import legrad_reduce


def gradient(b=2, h=3, q=5, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, q, n, generator=g, dtype=torch.float64).to(dtype)


def loop_reduce(grad, num_rows):
    """Σ_h Σ_i max(G[b, h, i, j], 0) / (H · num_rows), one entry at a time, float64."""
    b, h, q, n = grad.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        for j in range(n):
            out[bi, j] = sum(max(float(grad[bi, hi, i, j]), 0.0) for hi in range(h) for i in range(q))
    return out / (h * num_rows)


def test_matches_the_formula():
    grad = gradient()
    e = legrad_reduce(grad)
    assert e.shape == (2, 5) and e.dtype == torch.float64 and e.abs().max() > 0
    torch.testing.assert_close(e, loop_reduce(grad, 5), rtol=1e-12, atol=1e-15)


def test_passing_only_the_rows_that_can_be_non_zero():
    """With class-token pooling only the class row of G̃ is non-zero: passing that row with ``num_rows=N``
    gives the reduction of the full matrix."""
    full = gradient(q=7, n=7, seed=1)
    full[:, :, 1:] = -full[:, :, 1:].abs()              # every other row is clipped away by max(·, 0)
    torch.testing.assert_close(legrad_reduce(full[:, :, :1], num_rows=7), legrad_reduce(full),
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(legrad_reduce(full[:, :, :1], num_rows=7), loop_reduce(full[:, :, :1], 7),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_accumulates_in_float32_at_least(dtype, tol):
    grad = gradient(q=3, n=6, seed=2, dtype=dtype)
    e = legrad_reduce(grad, num_rows=6)
    assert e.dtype == torch.float32
    want = loop_reduce(grad, 6)
    assert ((e.double() - want).abs().max() / want.abs().max()) <= tol


def test_input_is_not_modified():
    grad = gradient(dtype=torch.float32)
    before = grad.clone()
    legrad_reduce(grad)
    assert torch.equal(grad, before)
