"""tokentm_fast/torch_ops/head_fusion.py: head fusion of attention and gradient (docs/methods.md §3, §4),
``(B, H, N, N) -> (B, N, N)``, against per-head loops written from the formulas, and the table of modes
(``tokentm_fast.kernels._utils.FUSION_TABLE``)."""
import pytest
import torch

from tokentm_fast.kernels._utils import FUSION_MODES, FUSION_TABLE, GRADIENT_MODES
from tokentm_fast.torch_ops.head_fusion import fuse_heads


def attention_and_gradient(b=2, h=3, n=6, seed=0, dtype=torch.float64):
    """Row-stochastic ``A`` and a signed ``G``, ``(b, h, n, n)``."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(2 * torch.randn(b, h, n, n, generator=g, dtype=torch.float64), dim=-1)
    grad = torch.randn(b, h, n, n, generator=g, dtype=torch.float64)
    return attn.to(dtype), grad.to(dtype)


def loop_fusion(attn, grad, mode):
    """The formulas of docs/methods.md, one head at a time, float64."""
    a, g = attn.double(), None if grad is None else grad.double()
    h = a.shape[1]
    if mode == "gae":                                   # mean_h max(A_h ⊙ G_h, 0)
        return sum((a[:, i] * g[:, i]).clamp(min=0) for i in range(h)) / h
    if mode == "decoupled":                             # mean_h(A_h) ⊙ mean_h max(G_h, 0)
        return (sum(a[:, i] for i in range(h)) / h) * (sum(g[:, i].clamp(min=0) for i in range(h)) / h)
    if mode == "mean":                                  # mean_h A_h
        return sum(a[:, i] for i in range(h)) / h
    raise ValueError(f"docs/methods.md has no head fusion {mode!r}")


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_matches_the_per_head_formula(mode):
    attn, grad = attention_and_gradient()
    fused = fuse_heads(attn, grad if mode in GRADIENT_MODES else None, mode)
    want = loop_fusion(attn, grad, mode)
    assert fused.shape == (2, 6, 6) and fused.dtype == torch.float64
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["mean"])
def test_gradient_free_modes_ignore_the_gradient(mode):
    attn, grad = attention_and_gradient(seed=1)
    assert torch.equal(fuse_heads(attn, grad, mode), fuse_heads(attn, None, mode))
    # row-stochastic heads give a row-stochastic fusion
    torch.testing.assert_close(fuse_heads(attn, None, mode).sum(-1), torch.ones(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mode", FUSION_MODES)
def test_accumulates_in_float32_at_least(mode, dtype, tol):
    attn, grad = attention_and_gradient(seed=2, dtype=dtype)
    fused = fuse_heads(attn, grad if mode in GRADIENT_MODES else None, mode)
    assert fused.dtype == torch.float32
    want = loop_fusion(attn, grad, mode)               # the same rounded inputs, float64
    assert ((fused.double() - want).abs().max() / want.abs().max()) <= tol


def test_inputs_are_not_modified():
    attn, grad = attention_and_gradient(dtype=torch.float32)
    a0, g0 = attn.clone(), grad.clone()
    for mode in FUSION_MODES:
        fuse_heads(attn, grad, mode)
    assert torch.equal(attn, a0) and torch.equal(grad, g0)


def test_the_table_of_modes():
    """The modes are the head fusions docs/methods.md §3, §4 defines (gae, decoupled, mean: rollout is the
    engine constants on "mean", not a fusion of its own), each known to the per-head loop above, with
    distinct kernel codes 0, 1, …"""
    assert set(FUSION_MODES) == {"gae", "decoupled", "mean"}
    attn, grad = attention_and_gradient()
    for mode in FUSION_MODES:
        loop_fusion(attn, grad, mode)                   # raises for a mode the formulas do not define
    with pytest.raises(ValueError):
        loop_fusion(attn, grad, "rollout")
    assert sorted(m.code for m in FUSION_TABLE) == list(range(len(FUSION_TABLE)))   # distinct kernel codes


@pytest.mark.parametrize("mode", FUSION_TABLE, ids=lambda m: m.name)
def test_needs_gradient_is_what_the_fusion_reads(mode):
    """A mode's ``needs_gradient`` flag is what its fusion does: the fused map changes with the gradient G
    (same attention, another G) exactly for the modes whose flag is set."""
    attn, grad = attention_and_gradient(seed=3)
    _, other = attention_and_gradient(seed=4)
    changed = not torch.equal(fuse_heads(attn, grad, mode.name), fuse_heads(attn, other, mode.name))
    assert changed == mode.needs_gradient
