"""Token transformation measurement (docs/methods.md §2).

For a sub-layer that maps token ``x_i`` to ``x̃_i`` (both in the residual
stream space R^D)::

    cos_i  = <x_i, x̃_i> / (max(|x_i|, eps) * max(|x̃_i|, eps))
    NECC_i = exp(cos_i) / sum_k exp(cos_k)          (softmax over the N tokens)
    w_i    = |x̃_i| / max(|x_i|, eps) * NECC_i

This is the PyTorch implementation: the CPU fallback of the Triton kernel
``tokentm_fast.kernels.transform_weights`` and the oracle it is tested against.
"""
from __future__ import annotations

import torch

#: ε of the norm clamps, here and in the Triton kernel (``tokentm_fast.kernels.transform_weights`` imports it)
EPS = 1e-6


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least: float64 stays float64, half types are promoted."""
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def token_lengths(x: torch.Tensor) -> torch.Tensor:
    """L2 length of every token. ``(B, N, D) -> (B, N)``, float32 at least."""
    return torch.linalg.vector_norm(x.to(compute_dtype(x)), dim=-1)


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
