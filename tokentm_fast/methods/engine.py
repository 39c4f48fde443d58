"""TokenTM, GAE and rollout: one aggregation engine with three sets of constants (docs/methods.md §3, §4).

Every one of them is the product of the per-layer update maps
``Uˡ = (I + diag(w_mlp)) · (I + Āˡ · diag(w_attn))`` applied to ``C⁰`` (``tokentm_fast.aggregation``);
the rows of ``Cᴸ`` are carried top-down through the chosen blocks by the attention path
(``tokentm_fast.paths``: materialized or flash), then multiplied by ``diag(C⁰)``. TokenTM's weights are
the transformation weights of §2 and its C⁰ is diag(|X⁰|) or I; GAE's and rollout's constants are
``tokentm_fast.aggregation``'s table (``GAE``, ``ROLLOUT``).

With an attention-pool head (``vit.attention_pool``) the rows start at the pool (docs/methods.md §6.1,
``methods.pool.PoolStart``) instead of at the query row.

Each function takes a sequence of targets and returns, per target, the explanation over the patch tokens
``(B, N−P)`` (``(B, N, N)`` with ``full``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..aggregation import GAE, ROLLOUT, finish_rows
from ..models.protocol import ViTAdapter
from ..precision import token_lengths
from .options import chosen_layers
from .pool import PoolStart, pool_transform_weights

#: the record keys TokenTM's transformation weights read (``tokentm_fast.capture.LayerRecorder``)
WEIGHT_KEYS = ("x_in", "values", "y", "mlp_out")


def _finish(vit: ViTAdapter, rows: torch.Tensor, c0: Optional[torch.Tensor], full: bool) -> torch.Tensor:
    """``rows · diag(C⁰)``, then the patch tokens of the query row (or the whole matrix for ``full``)."""
    rows = finish_rows(rows, c0)
    return rows if full else rows[:, 0, vit.num_prefix_tokens:]


def tokentm(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
            full: bool = False) -> List[torch.Tensor]:
    """TokenTM: the transformation weights of docs/methods.md §2 per layer (computed in the forward from
    the block's tokens, which are then dropped), the chosen head fusion, ``C⁰ = diag(|X⁰|)`` or I."""
    transform_weights = path.kernels.transform_weights
    use = dict(use_length=options["use_length"], use_necc=options["use_necc"])

    def weigh(l: int, rec: Dict[str, torch.Tensor]):
        with torch.no_grad():
            x_tilde = vit.value_tokens(l, rec["values"])
            return (transform_weights(rec["x_in"], x_tilde, **use),
                    transform_weights(rec["y"], rec["mlp_out"], **use))

    layers = chosen_layers(options, vit.num_layers)
    start = None
    if vit.attention_pool is not None:   # the first row at the pool, times its transformation weights (§6.1)
        start = PoolStart(vit, "tokentm", lambda x, x_tilde: pool_transform_weights(x, x_tilde, transform_weights, **use))
    rows, first_input = path.gradient_rows(vit, images, targets, layers, weigh, WEIGHT_KEYS,
                                           options["head_fusion"], full, start)
    c0 = token_lengths(first_input) if options["init"] == "length" else None
    return [_finish(vit, r, c0, full) for r in rows]


def gae(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
        full: bool = False) -> List[torch.Tensor]:
    """GAE: every block, ``w_attn = 1``, ``w_mlp = 0``, ``C⁰ = I``."""
    def weigh(l: int, rec: Dict[str, torch.Tensor]):
        return GAE.w_attn, GAE.w_mlp

    layers = list(range(vit.num_layers))
    start = PoolStart(vit, "gae") if vit.attention_pool is not None else None
    rows, _ = path.gradient_rows(vit, images, targets, layers, weigh, (), GAE.fusion, full, start)
    return [_finish(vit, r, None, full) for r in rows]


def rollout(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
            full: bool = False) -> List[torch.Tensor]:
    """Rollout: ``Cᴸ = Π_l (½ mean_h Aˡ + ½ I)`` over the chosen blocks, no gradient: one map, the same for
    every target."""
    start = PoolStart(vit, "probs") if vit.attention_pool is not None else None
    rows = path.constant_rows(vit, images, chosen_layers(options, vit.num_layers), ROLLOUT, full, start)
    return [_finish(vit, rows, None, full)] * len(targets)
