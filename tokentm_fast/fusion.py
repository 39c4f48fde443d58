"""Head fusion of attention and gradient (docs/methods.md §3, §4).

``attn, grad (B, H, N, N) -> Ā (B, N, N)``:

- ``"gae"``:       Ā = mean_h max(A_h ⊙ G_h, 0)           (TokenTM default, GAE)
- ``"decoupled"``: Ā = mean_h(A_h) ⊙ mean_h max(G_h, 0)
- ``"mean"``:      Ā = mean_h A_h                          (no gradient)
- ``"rollout"``:   Ā = ½ mean_h A_h + ½ I                  (no gradient)

``FUSION_TABLE`` is the one list of these modes: the public checks
(``tokentm_fast.validation``), the kernels' mode codes (``tokentm_fast.kernels._utils.MODE_*``)
and the methods' ``head_fusion`` choices are all read off it.

PyTorch implementation, oracle and CPU fallback of
``tokentm_fast.kernels.head_fusion``. Accumulates in float32 at least.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .transform import compute_dtype


class FusionMode(NamedTuple):
    """One head-fusion mode: its name, the code the Triton kernels branch on, and whether it reads
    the attention gradient."""

    name: str
    code: int
    needs_gradient: bool


#: every head-fusion mode (docs/methods.md §3, §4)
FUSION_TABLE: Tuple[FusionMode, ...] = (
    FusionMode("gae", 0, True),
    FusionMode("decoupled", 1, True),
    FusionMode("mean", 2, False),
    FusionMode("rollout", 3, False),
)
FUSION_MODES: Tuple[str, ...] = tuple(m.name for m in FUSION_TABLE)
#: the modes that need ``grad`` (TokenTM's ``head_fusion`` choices)
GRADIENT_MODES: Tuple[str, ...] = tuple(m.name for m in FUSION_TABLE if m.needs_gradient)


def fuse_heads(attn: torch.Tensor, grad: Optional[torch.Tensor] = None, mode: str = "gae") -> torch.Tensor:
    """Fuse the heads of one layer: ``(B, H, N, N) -> (B, N, N)``.

    Arguments are trusted (the public entries check them, ``tokentm_fast.validation``): ``mode`` is one
    of ``FUSION_MODES`` and ``grad`` is given for the ``GRADIENT_MODES``.
    """
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
