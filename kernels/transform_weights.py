"""Token transformation weights (docs/methods.md §2) as one Triton kernel.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.transform.transform_weights``.

One program per image streams the ``(N, D)`` tokens of ``x`` and ``x̃`` once,
in ``(BLOCK_N, BLOCK_D)`` tiles, and keeps three fp32 running sums per token
(``|x|²``, ``|x̃|²``, ``<x, x̃>``). Then the NECC softmax over the N tokens of
the image is finished with a second, tiny pass over the ``(N,)`` output row.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import check_out, check_shape, check_tensor, contiguous, require_triton

EPS = 1e-6


@triton.jit
def _transform_weights_kernel(
    x_ptr,  # (B, N, D) tokens entering the sub-layer, contiguous
    t_ptr,  # (B, N, D) transformed tokens x̃, contiguous
    out_ptr,  # (B, N) float32
    N,
    D,
    eps,
    inv_n,  # 1 / N, the NECC of the use_necc=False ablation
    USE_LENGTH: tl.constexpr,
    USE_NECC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Transformation weight of every token of image ``b = program_id(0)`` (docs/methods.md §2).

        len_i  = |x_i|₂,  len~_i = |x̃_i|₂
        cos_i  = <x_i, x̃_i> / (max(len_i, ε) · max(len~_i, ε))
        NECC_i = exp(cos_i) / Σ_k exp(cos_k)              (1/N when USE_NECC is off)
        w_i    = len~_i / max(len_i, ε) · NECC_i          (NECC_i when USE_LENGTH is off)

    |cos_i| ≤ 1 (Cauchy–Schwarz; the ε clamps only shrink it), so exp(cos_i)
    lies in [1/e, e] and the softmax needs no running max: pass 1 writes the
    unnormalised ``exp(cos_i) · ratio_i`` and sums ``exp(cos_i)``; pass 2
    divides the row by that sum. All sums are fp32.
    """
    b = tl.program_id(0).to(tl.int64)
    x_base = x_ptr + b * N * D
    t_base = t_ptr + b * N * D
    o_base = out_ptr + b * N
    exp_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        sq_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sq_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_n[:, None] & (offs_d[None, :] < D)
            offs = offs_n[:, None] * D + offs_d[None, :]
            xv = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
            tv = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32)
            sq_x += tl.sum(xv * xv, axis=1)
            sq_t += tl.sum(tv * tv, axis=1)
            dot += tl.sum(xv * tv, axis=1)
        len_x = tl.maximum(tl.sqrt(sq_x), eps)
        len_t = tl.sqrt(sq_t)
        if USE_NECC:
            cos = dot / (len_x * tl.maximum(len_t, eps))
            val = tl.where(mask_n, tl.exp(cos), 0.0)
            exp_sum += val
        else:
            val = tl.zeros((BLOCK_N,), dtype=tl.float32) + inv_n
        if USE_LENGTH:
            val = val * (len_t / len_x)
        tl.store(o_base + offs_n, val, mask=mask_n)

    if USE_NECC:
        inv_total = 1.0 / tl.sum(exp_sum, axis=0)
        # Pass 2 reads back what this program wrote (same offsets, same layout).
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            val = tl.load(o_base + offs_n, mask=mask_n, other=0.0)
            tl.store(o_base + offs_n, val * inv_total, mask=mask_n)


def transform_weights(
    x: torch.Tensor,
    x_tilde: torch.Tensor,
    use_length: bool = True,
    use_necc: bool = True,
    eps: float = EPS,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Transformation weights ``w`` of docs/methods.md §2, fused in one kernel launch.

    Args:
        x: ``(B, N, D)`` tokens entering the sub-layer (float32 / bfloat16 / float16).
        x_tilde: ``(B, N, D)`` transformed tokens (same shape; dtype may differ from ``x``).
        use_length: False replaces the length ratio by 1 (ablation, TokenTM Table 6).
        use_necc: False replaces NECC by 1/N (ablation).
        eps: ε of the norm clamps.
        out: optional ``(B, N)`` float32 contiguous output, fully overwritten.

    Returns:
        ``(B, N)`` float32, equal to ``tokentm_fast.transform.transform_weights``.
    """
    check_tensor(x, "x", 3)
    check_tensor(x_tilde, "x_tilde", 3)
    check_shape(x_tilde, "x_tilde", x.shape, "(B, N, D) of x")
    if x_tilde.device != x.device:
        raise ValueError(f"x_tilde is on {x_tilde.device} but x is on {x.device}")
    require_triton(x)
    B, N, D = x.shape
    out = check_out(out, (B, N), x.device, "(B, N)")
    if out.numel() == 0:
        return out
    x = contiguous(x)
    x_tilde = contiguous(x_tilde)
    block_d = min(128, triton.next_power_of_2(max(D, 1)))
    block_n = max(16, min(triton.next_power_of_2(N), 4096 // block_d))
    _transform_weights_kernel[(B,)](
        x, x_tilde, out, N, D, float(eps), 1.0 / N,
        USE_LENGTH=bool(use_length), USE_NECC=bool(use_necc),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out
