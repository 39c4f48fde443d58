"""The precision of the PyTorch paths: ``compute_dtype`` (float32 at least) and the token lengths at it.

Every PyTorch computation of the package accumulates in ``compute_dtype`` of its inputs: float64 stays
float64, half types are promoted to float32 (the Triton kernels accumulate in float32 likewise).
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least: float64 stays float64, half types are promoted."""
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def token_lengths(x: torch.Tensor) -> torch.Tensor:
    """L2 length of every token. ``(B, N, D) -> (B, N)``, float32 at least."""
    return torch.linalg.vector_norm(x.to(compute_dtype(x)), dim=-1)
