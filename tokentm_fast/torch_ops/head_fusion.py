"""Head fusion of attention and gradient (docs/methods.md §3, §4).

``attn, grad (B, H, N, N) -> Ā (B, N, N)``:

- ``"gae"``:       Ā = mean_h max(A_h ⊙ G_h, 0)           (TokenTM default, GAE)
- ``"decoupled"``: Ā = mean_h(A_h) ⊙ mean_h max(G_h, 0)
- ``"mean"``:      Ā = mean_h A_h                          (no gradient)

The modes are the kernels' (``tokentm_fast.kernels._utils.FUSION_TABLE``). The PyTorch twin of
``tokentm_fast.kernels.head_fusion`` (same file name): its oracle and CPU fallback. Accumulates in
float32 at least.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..precision import compute_dtype


def fuse_heads(attn: torch.Tensor, grad: Optional[torch.Tensor] = None, mode: str = "gae") -> torch.Tensor:
    """Fuse the heads of one layer: ``(B, H, N, N) -> (B, N, N)``.

    Arguments are trusted (the public entries check them, ``tokentm_fast.validation``): ``mode`` is one
    of ``kernels._utils.FUSION_MODES`` and ``grad`` is given for its ``GRADIENT_MODES``.
    """
    dtype = compute_dtype(attn) if grad is None else compute_dtype(attn, grad)
    a = attn.to(dtype)
    inv_h = 1.0 / attn.shape[1]  # sum(1) * 1/H: a mean without mean()'s slower reduction path
    if mode == "gae":
        return torch.mul(a, grad.to(dtype)).relu_().sum(1).mul_(inv_h)
    if mode == "decoupled":
        return a.sum(1).mul_(inv_h * inv_h).mul_(grad.to(dtype).clamp_min(0).sum(1))
    return a.sum(1).mul_(inv_h)
