"""Raw attention: ``mean_h Aᴸ[q, P:]``, the last block's attention of the query row (docs/methods.md §4)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..models.protocol import ViTAdapter
from . import pool


def raw_attention(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
                  full: bool = False) -> List[torch.Tensor]:
    """``(B, N−P)``, no gradient: one map, the same for every target. With an attention-pool head:
    mean_h A_pool[h, 0, :] (§6.1)."""
    if vit.attention_pool is not None:
        e = pool.raw_attention(vit, images, path)
    else:
        e = path.query_attention(vit, images, vit.num_layers - 1)[:, vit.num_prefix_tokens:]
    return [e] * len(targets)
