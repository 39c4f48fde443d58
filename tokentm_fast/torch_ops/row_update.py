"""One layer of the engine for a block of rows (docs/methods.md §3.1): the PyTorch twin of the Triton kernels
``tokentm_fast.kernels.row_update`` (same file name) and ``kernels.matrix_update`` (the same update for
Q ≈ N rows): their oracle and CPU fallback.

For rows ``R (B, Q, N)`` of the running product::

    s = R ⊙ (1 + w_mlp)          # column scaling: R · U^{mlp}       (scale_rows)
    R = s + (s · Ā) ⊙ w_attn      # R · U^{attn}                      (add_update)

with Ā the head fusion of ``tokentm_fast.torch_ops.head_fusion``. The engine that runs it over the
layers (``aggregate_layers``, ``RowState``, the methods' constants) is ``tokentm_fast.aggregation``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..kernels._utils import support_bounds
from .head_fusion import fuse_heads

Weight = Union[torch.Tensor, float]


def scale_rows(rows: torch.Tensor, w_mlp: Weight) -> torch.Tensor:
    """The first half of the engine step, ``s = R ⊙ (1 + w_mlp)`` (``R · U^{mlp}``): rows ``(B, Q, N)``
    with a ``(B, N)`` weight or a float, or one row per image ``(B, N)`` with a ``(B, N)`` weight."""
    if isinstance(w_mlp, torch.Tensor):
        w = w_mlp.to(rows.dtype)
        w = w[:, None, :] if rows.dim() == 3 else w
    else:
        w = float(w_mlp)
    return rows * (1.0 + w)


def add_update(s: torch.Tensor, t: torch.Tensor, w_attn: Weight) -> torch.Tensor:
    """The second half of the engine step, ``R = s + t ⊙ w_attn`` with ``t = s · Ā`` (``s · U^{attn}``),
    shapes as in ``scale_rows``."""
    if isinstance(w_attn, torch.Tensor):
        w = w_attn.to(s.dtype)
        w = w[:, None, :] if s.dim() == 3 else w
    else:
        w = float(w_attn)
    return s + t * w


def _heads_folded(attn: torch.Tensor, grad: Optional[torch.Tensor], mode: str, dtype) -> torch.Tensor:
    """``(B, H·K, N)`` (K rows of each head) with Σ_h folded into the product: ``s·Ā = (s, …, s)/H · F``.

    ``F`` is ``max(A ⊙ G, 0)`` (gae) or ``A`` (mean), stacked over heads, so the
    head mean never needs its own pass over memory.
    """
    b, h, k, n = attn.shape
    a = attn.to(dtype)
    if mode == "gae":
        f = torch.mul(a, grad.to(dtype)).relu_()
    else:
        f = a
    return f.reshape(b, h * k, n)


def row_update(
    rows: torch.Tensor,
    attn: torch.Tensor,
    grad: Optional[torch.Tensor],
    w_attn: Weight,
    w_mlp: Weight,
    mode: str = "gae",
    support: Optional[slice] = None,
) -> torch.Tensor:
    """One layer of the engine: ``R ← s + (s·Ā) ⊙ w_attn`` with ``s = R ⊙ (1 + w_mlp)``.

    Args:
        rows: ``(B, Q, N)`` rows of the running product (float32 or float64).
        attn, grad: ``(B, H, N, N)`` attention and its gradient (grad may be None
            for ``mode="mean"``).
        w_attn, w_mlp: ``(B, N)`` weights or Python floats.
        mode: head fusion mode (see ``tokentm_fast.torch_ops.head_fusion``).
        support: the columns ``lo:hi`` (a step-1 ``slice``) outside which every
            row of ``rows`` is zero, as the caller knows it (at the top layer the
            query: ``slice(0, 1)`` for a class token, the pooled rows for mean
            pooling); None: dense. Only rows ``lo:hi`` of A and G are read then.

    Returns:
        new ``(B, Q, N)`` rows, same dtype as ``rows``.

    For a few rows (the row algorithm) the head mean is folded into one
    ``(B, Q, H·N) × (B, H·N, N)`` product, so Ā is never formed; for many rows
    (the full matrix) Ā is formed once and multiplied. Nothing here reads a
    value back to the host (no ``.nonzero()`` / ``.item()``): it runs inside
    backward hooks, where a device synchronisation would stall every layer.
    """
    s = scale_rows(rows, w_mlp)
    b, q, n = rows.shape
    h = attn.shape[1]
    if mode in ("gae", "mean") and q * 4 <= n:
        # Only rows i of A and G where s_qi can be non-zero contribute to t = s·Ā
        # (at the top layer s is the query: one row of A and G instead of N).
        s_rows = s
        lo, hi = support_bounds(support, n)
        if (hi - lo) * 4 <= n:
            s_rows, attn = s[..., lo:hi], attn[:, :, lo:hi]
            grad = None if grad is None else grad[:, :, lo:hi]
        t = torch.bmm(s_rows.repeat(1, 1, h), _heads_folded(attn, grad, mode, rows.dtype)) / h
    else:
        t = torch.bmm(s, fuse_heads(attn, grad, mode).to(rows.dtype))
    return add_update(s, t, w_attn)
