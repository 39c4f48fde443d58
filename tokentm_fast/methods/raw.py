"""Raw attention: ``mean_h Aᴸ[q, P:]``, the last block's attention of the query row (docs/methods.md §4)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..models.protocol import ViTAdapter
from . import pool


def raw_attention(vit: ViTAdapter, images: torch.Tensor, target, options: Dict[str, Any], path,
                  full: bool = False) -> torch.Tensor:
    """``(B, N−P)``; no gradient, no target. With an attention-pool head: mean_h A_pool[h, 0, :] (§6.1)."""
    if vit.attention_pool is not None:
        return pool.raw_attention(vit, images, path)
    e = path.query_attention(vit, images, vit.num_layers - 1)
    return e[:, vit.num_prefix_tokens:]
