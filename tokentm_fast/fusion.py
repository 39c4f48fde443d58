"""Head fusion of attention and gradient (docs/methods.md §3, §4).

``attn, grad (B, H, N, N) -> Ā (B, N, N)``:

- ``"gae"``:       Ā = mean_h max(A_h ⊙ G_h, 0)           (TokenTM default, GAE)
- ``"decoupled"``: Ā = mean_h(A_h) ⊙ mean_h max(G_h, 0)
- ``"mean"``:      Ā = mean_h A_h                          (no gradient)
- ``"rollout"``:   Ā = ½ mean_h A_h + ½ I                  (no gradient)

PyTorch implementation, oracle and CPU fallback of
``tokentm_fast.kernels.head_fusion``. Accumulates in float32 at least.
"""
from __future__ import annotations

from typing import Optional

import torch

from .transform import compute_dtype

FUSION_MODES = ("gae", "decoupled", "mean", "rollout")
GRADIENT_MODES = ("gae", "decoupled")


def check_fusion_mode(mode: str) -> None:
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown head fusion mode {mode!r}; expected one of {FUSION_MODES}")


def fuse_heads(attn: torch.Tensor, grad: Optional[torch.Tensor] = None, mode: str = "gae") -> torch.Tensor:
    """Fuse the heads of one layer: ``(B, H, N, N) -> (B, N, N)``."""
    check_fusion_mode(mode)
    if mode in GRADIENT_MODES and grad is None:
        raise ValueError(f"head fusion {mode!r} needs the attention gradient, got grad=None")
    dtype = compute_dtype(attn) if grad is None else compute_dtype(attn, grad)
    a = attn.to(dtype)
    inv_h = 1.0 / attn.shape[1]  # sum(1) * 1/H: a mean without mean()'s slower reduction path
    if mode == "gae":
        return torch.mul(a, grad.to(dtype)).relu_().sum(1).mul_(inv_h)
    if mode == "decoupled":
        return a.sum(1).mul_(inv_h * inv_h).mul_(grad.to(dtype).clamp_min(0).sum(1))
    fused = a.sum(1).mul_(inv_h)
    if mode == "rollout":
        eye = torch.eye(fused.shape[-1], dtype=dtype, device=fused.device)
        fused = 0.5 * fused + 0.5 * eye
    return fused
