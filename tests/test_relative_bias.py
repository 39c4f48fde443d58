"""BEiT's relative position bias in table form (tokentm_fast/models/relative_bias.py) and the relevance twin through
it (tokentm_fast/torch_ops/attention_relevance.py with ``bias``; issue 29 item 2).

- The index rule against timm's ``relative_position_index`` buffer and transformers' index helper, on square and
  non-square grids; ``dense()`` against the gather through timm's buffer; two tables summed = the two dense biases
  summed; layouts that differ refused.
- The relevance twin with a bias (float64) against the materialized rules written with ``lrp_rules`` on full
  matrices (P with the dense bias, ``lrp_rules.add`` between QKᵀ and B/scale with either rule set, then
  ``lrp_rules.product``), on tiles smaller than one head (the per-image sums of ``"ours"`` taken over every tile);
  the split informative: the maps differ between the rule sets and from giving all of R^A to QKᵀ.
"""
from __future__ import annotations

import pytest
import torch

from tokentm_fast.methods import lrp_rules
from tokentm_fast.models.relative_bias import RelativePositionBias, relative_index
from tokentm_fast.torch_ops.attention import flash_forward
from tokentm_fast.torch_ops.attention_relevance import attention_relevance

GRIDS = [(3, 4), (4, 4), (2, 5), (1, 3)]


def _table(grid, heads: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    r = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    return torch.randn(r, heads, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("grid", GRIDS)
def test_the_index_rule_is_timms_and_transformers(grid):
    from timm.models.beit import Attention, gen_relative_position_index

    n = grid[0] * grid[1] + 1
    mine = relative_index(torch.arange(n), torch.arange(n), grid, 1)
    attn = Attention(dim=8, num_heads=2, window_size=grid)            # its buffer, as a model holds it
    assert torch.equal(mine, attn.relative_position_index)
    assert torch.equal(mine, gen_relative_position_index(grid))
    r = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    assert mine[0, 1:].eq(r - 3).all() and mine[1:, 0].eq(r - 2).all() and mine[0, 0] == r - 1
    if n > 2:        # the patch block holds every relative offset; the diagonal is the zero offset
        assert mine[1:, 1:].unique().numel() == r - 3
        assert mine[1:, 1:].diagonal().eq((grid[0] - 1) * (2 * grid[1] - 1) + grid[1] - 1).all()


@pytest.mark.parametrize("grid", [(3, 4), (2, 5)])
def test_transformers_index_helper(grid):
    modeling = pytest.importorskip("transformers.models.beit.modeling_beit")
    n = grid[0] * grid[1] + 1
    mine = relative_index(torch.arange(n), torch.arange(n), grid, 1)
    assert torch.equal(mine, modeling.BeitRelativePositionBias.generate_relative_position_index(grid))


@pytest.mark.parametrize("grid", GRIDS)
def test_dense_is_the_gather_through_timms_buffer_and_tables_add(grid):
    from timm.models.beit import gen_relative_position_index

    t1, t2 = _table(grid, 3, 1), _table(grid, 3, 2)
    a, b = RelativePositionBias(t1, grid, 1), RelativePositionBias(t2, grid, 1)
    n = a.num_tokens
    want = t1[gen_relative_position_index(grid).view(-1)].view(n, n, 3).permute(2, 0, 1)[None]
    assert a.dense().shape == (1, 3, n, n)
    assert torch.equal(a.dense(), want)
    assert torch.equal((a + b).dense(), a.dense() + b.dense())
    assert torch.equal((torch.ones(1, 3, n, n, dtype=torch.float64) + a), 1 + want)   # a tensor plus a table: dense
    rows = torch.tensor([0, n - 1])
    assert torch.equal(a.tile(rows, heads=torch.tensor([2, 0])), want[0][[2, 0]][:, rows])
    with pytest.raises(ValueError, match="different layouts"):
        a + RelativePositionBias(_table((grid[0] + 1, grid[1]), 3), (grid[0] + 1, grid[1]), 1)


# --------------------------------------------------------------------------- the relevance twin through the bias
def _materialized(q, k, v, r_o, scale, bias, rules, row, do):
    """The relevance through one biased attention on full float64 matrices, by ``lrp_rules`` (as the materialized
    path's ``RelevancePass`` composes them): R_Q, R_K, R_V and t per head."""
    z = q @ k.transpose(-1, -2)
    b_s = bias.dense() / scale
    p = torch.softmax(scale * (z + b_s), -1)
    r_attn, r_v = lrp_rules.product(p, v, r_o)
    r_logits = lrp_rules.add(z, b_s, r_attn, rules)[0]
    r_q, r_kt = lrp_rules.product(q, k.transpose(-1, -2), r_logits)
    grad = do @ v.transpose(-1, -2)
    t = torch.einsum("bi,bhij->bhj", row, (r_attn * grad).clamp(min=0))
    return r_q, r_kt.transpose(-1, -2), r_v, t


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, grid, d = 2, 3, (3, 4), 8
    n = grid[0] * grid[1] + 1
    q, k, v, r_o, do = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(5))
    bias = RelativePositionBias(_table(grid, h, 5) * 2.0, grid, 1)
    row = torch.rand(b, n, generator=g, dtype=torch.float64)
    return q, k, v, r_o, do, bias, row


@pytest.mark.parametrize("rules", ["ours", "classic"])
@pytest.mark.parametrize("block", [None, 4])
def test_relevance_twin_through_the_bias_equals_the_rules_on_full_matrices(rules, block):
    q, k, v, r_o, do, bias, row = _inputs()
    scale = 0.4
    o, lse = flash_forward(q, k, v, scale, bias=bias)
    got = attention_relevance(q, k, v, o, lse, r_o, scale, row=row, do=do, block=block, bias=bias, rules=rules)
    want = _materialized(q, k, v, r_o, scale, bias, rules, row, do)
    for name, a, w in zip(("r_q", "r_k", "r_v", "t"), got, want):
        assert w.norm() > 1e-3, name
        assert ((a - w).norm() / w.norm()).item() <= 1e-10, (name, rules, block)


def test_the_split_through_the_bias_is_informative():
    """The rule sets give other R_Q / R_K (the ``"ours"`` factor is not 1 on these inputs), and both differ from
    handing all of R^A to QKᵀ (the bias-free product rule on the biased P)."""
    q, k, v, r_o, do, bias, row = _inputs(1)
    scale = 0.4
    o, lse = flash_forward(q, k, v, scale, bias=bias)
    ours = attention_relevance(q, k, v, o, lse, r_o, scale, bias=bias, rules="ours")
    classic = attention_relevance(q, k, v, o, lse, r_o, scale, bias=bias, rules="classic")
    p = torch.softmax(scale * (q @ k.transpose(-1, -2) + bias.dense() / scale), -1)
    r_attn, _ = lrp_rules.product(p, v, r_o)
    whole, _ = lrp_rules.product(q, k.transpose(-1, -2), r_attn)
    for a, b in ((ours[0], classic[0]), (ours[0], whole), (classic[0], whole)):
        assert ((a - b).norm() / b.norm()).item() > 1e-3
    assert torch.equal(ours[2], classic[2])            # R_V is above the logits: no split


def test_a_bias_without_its_rule_set_is_refused():
    q, k, v, r_o, do, bias, row = _inputs()
    o, lse = flash_forward(q, k, v, 0.4, bias=bias)
    with pytest.raises(ValueError, match="needs the rule set"):
        attention_relevance(q, k, v, o, lse, r_o, 0.4, bias=bias)
