"""The PyTorch equivalents of ``tokentm_fast.kernels.attention``, with full matrices: a test oracle (it lives in
tests/, not in the wheel).

``attention_forward_torch``, ``attention_backward_torch`` and ``attention_rows_torch`` compute what
``flash_forward``, ``flash_backward`` and ``attention_rows`` compute, from the full ``(B, H, N, N)``
logits (small N only): they are the oracles of the kernel tests (``tests/test_attention_kernels.py``).
Notation as in ``kernels/attention.py``: ``P = softmax(scale·QKᵀ)``, ``dP = dO Vᵀ`` (docs/methods.md §8).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def attention_forward_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``O = softmax(scale·QKᵀ) V`` ``(B, H, N, d)`` in q's dtype and ``ℓ (B, H, N)`` float32.

    Computed in float32 at least (float64 stays float64), with full ``(B, H, N, N)`` logits.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    s = scale * q.to(acc) @ k.to(acc).transpose(-1, -2)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ v.to(acc)
    return o.to(q.dtype), lse.to(torch.float32) if acc == torch.float32 else lse


def attention_backward_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, scale: float,
    row: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dq, dk, dv, t)`` of the flash backward with full matrices (see ``kernels/attention.py``).

    q, k, v, do: ``(B, H, N, d)``; lse: ``(B, H, N)``. ``t (B, H, N)`` = Σ_i row[b, i] · max(P ⊙ dP, 0)[b, h, i, j]
    when ``row (B, N)`` is given (None otherwise).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, do = (x.to(acc) for x in (q, k, v, do))
    p = torch.exp(scale * q @ k.transpose(-1, -2) - lse.to(acc)[..., None])
    dp = do @ v.transpose(-1, -2)
    o = p @ v
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq, dk, dv = scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
    t = None
    if row is not None:
        t = torch.einsum("bi,bhij->bhj", row.to(acc), (p * dp).clamp_min(0))
    return dq, dk, dv, t


def attention_rows_torch(
    row: torch.Tensor, scale: float, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(B, H, N)``: Σ_i row[b, i] · P[b, h, i, j] (q, k, lse given) or · max(dP, 0) (do, v given);
    row ``(B, N)``."""
    if q is not None:
        acc = torch.promote_types(q.dtype, torch.float32)
        f = torch.exp(scale * q.to(acc) @ k.to(acc).transpose(-1, -2) - lse.to(acc)[..., None])
    else:
        acc = torch.promote_types(do.dtype, torch.float32)
        f = (do.to(acc) @ v.to(acc).transpose(-1, -2)).clamp_min(0)
    return torch.einsum("bi,bhij->bhj", row.to(acc), f)
