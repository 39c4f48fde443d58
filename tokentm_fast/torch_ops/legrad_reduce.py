"""LeGrad's per-layer reduction (docs/methods.md §6).

``eˡ_j = mean_h mean_{i=1..N} max(G̃ˡ_h[i, j], 0)``. Fast paths pass only the
rows of G̃ that can be non-zero (with class-token pooling: the class row), so
the mean over i divides by the full token count ``num_rows``, not by the rows
passed. The PyTorch twin of ``tokentm_fast.kernels.legrad_reduce`` (same file name): its
oracle and CPU fallback.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..precision import compute_dtype


def legrad_reduce(grad_rows: torch.Tensor, num_rows: Optional[int] = None) -> torch.Tensor:
    """``(B, H, Q, N) -> (B, N)``: ``relu(G).sum(rows).mean(heads) / num_rows`` (default Q)."""
    num_rows = grad_rows.shape[-2] if num_rows is None else num_rows
    g = grad_rows.to(compute_dtype(grad_rows))
    return legrad_columns(g.clamp_min(0).sum(-2), num_rows)


def legrad_columns(column_sums: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(B, H, N) -> (B, N)``: the reduction's last step, ``mean_h(t) / num_rows`` of the per-head column
    sums ``t_h[j] = Σ_i max(G̃_h[i, j], 0)`` (formed tile by tile on the flash path)."""
    return column_sums.mean(1) / num_rows
