"""Gradient × activation baselines of the TokenTM paper: ``conservative_lrp`` and ``attcat`` (docs/methods.md
§6.2). Both are one forward and one backward, O(N·D) per layer beyond what the attention path keeps.

- ``conservative_lrp`` (Ali et al. 2022): gradient × input at the tokens entering block 1,
  ``e_j = Σ_d X⁰_{j,d} ∂s/∂X⁰_{j,d}``, with a backward in which the attention probabilities (AH-rule) and
  every LayerNorm's normalisation (LN-rule) are held constant.
- ``attcat`` (Qiang et al. 2022): with hˡ the tokens leaving block l and ∇hˡ = ∂s/∂hˡ, the D channels
  split into the H heads' groups: ``e_j = Σ_l mean_h (Aˡ_h[q, j] · Σ_{c ∈ group h} ∇hˡ_{j,c} hˡ_{j,c})``, with
  Aˡ_h[q, :] the query row (row cls; without a class token the mean over the pooled rows).

Each returns ``(B, N−P)`` (a list over the targets for a ``TargetList``).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..models.protocol import ViTAdapter
from ..targets import TargetList


def conservative_lrp(vit: ViTAdapter, images: torch.Tensor, target, options: Dict[str, Any], path,
                     full: bool = False):
    x0, grads = path.held_input_gradients(vit, images, target)
    maps = [(x0 * g).sum(-1)[:, vit.num_prefix_tokens:] for g in grads]
    return maps if isinstance(target, TargetList) else maps[0]


def attcat(vit: ViTAdapter, images: torch.Tensor, target, options: Dict[str, Any], path, full: bool = False):
    heads, prefix = vit.num_heads, vit.num_prefix_tokens
    outs, grads, a_q = path.block_output_gradients(vit, images, target)   # per layer (B, N, D), (B, H, N)

    def reduce(g_list):
        e = 0
        for h_l, g_l, a_l in zip(outs, g_list, a_q):
            cam = (g_l * h_l).unflatten(-1, (heads, -1)).sum(-1).transpose(1, 2)     # (B, H, N)
            e = e + (a_l * cam).mean(1)
        return e[:, prefix:]

    maps = [reduce(g) for g in grads]
    return maps if isinstance(target, TargetList) else maps[0]
