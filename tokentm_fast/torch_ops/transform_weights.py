"""Token transformation measurement (docs/methods.md §2).

For a sub-layer that maps token ``x_i`` to ``x̃_i`` (both in the residual
stream space R^D)::

    cos_i  = <x_i, x̃_i> / (max(|x_i|, eps) * max(|x̃_i|, eps))
    NECC_i = exp(cos_i) / sum_k exp(cos_k)          (softmax over the N tokens)
    w_i    = |x̃_i| / max(|x_i|, eps) * NECC_i

The PyTorch twin of the Triton kernel ``tokentm_fast.kernels.transform_weights`` (same file name): its
CPU fallback and the oracle it is tested against. ε is the kernel's (``tokentm_fast.kernels._utils.EPS``).
"""
from __future__ import annotations

import torch

from ..kernels._utils import EPS
from ..precision import compute_dtype


def transform_weights(
    x: torch.Tensor,
    x_tilde: torch.Tensor,
    use_length: bool = True,
    use_necc: bool = True,
    eps: float = EPS,
) -> torch.Tensor:
    """Transformation weight ``w`` of docs/methods.md §2.

    Args:
        x: tokens entering the sub-layer, ``(B, N, D)``.
        x_tilde: transformed tokens, ``(B, N, D)``.
        use_length: False replaces the length ratio by 1 (ablation).
        use_necc: False replaces NECC by 1/N (ablation).

    Returns:
        ``(B, N)`` weights, float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(x, x_tilde)
    x = x.to(dtype)
    x_tilde = x_tilde.to(dtype)
    n = x.shape[-2]
    len_x = torch.linalg.vector_norm(x, dim=-1)
    len_t = torch.linalg.vector_norm(x_tilde, dim=-1)
    if use_necc:
        cos = (x * x_tilde).sum(-1) / (len_x.clamp_min(eps) * len_t.clamp_min(eps))
        necc = torch.softmax(cos, dim=-1)
    else:
        necc = torch.full_like(len_x, 1.0 / n)
    if use_length:
        return len_t / len_x.clamp_min(eps) * necc
    return necc
