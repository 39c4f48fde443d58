"""LeGrad's per-layer gradient reduction (docs/methods.md §6) as a Triton kernel.

PyTorch equivalent::

    relu(grad_rows).sum(dim=2).mean(dim=1) / num_rows          # (B, H, Q, N) -> (B, N)

summed over layers for a 5-D ``(L, B, H, Q, N)`` input or a list of 4-D inputs.
docs/methods.md §6: ``eˡ_j = mean_h mean_{i=1..N} max(G̃ˡ_h[i, j], 0)``; rows of G̃ that are
identically zero need not be passed (with class-token pooling only row ``cls``
is non-zero, so Q = 1 and ``num_rows = N``), hence ``num_rows`` is separate
from Q.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ._utils import check_out, check_tensor, contiguous, require_triton


@triton.jit
def _legrad_reduce_kernel(
    g_ptr,  # (L, B, R, N) contiguous, R = H·Q rows per (layer, image)
    out_ptr,  # (B, N) float32
    L,
    B,
    R,
    N,
    scale,  # 1 / (H · num_rows)
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Columns ``j ∈ j-block`` of image b (docs/methods.md §6):

        out_j (+)= Σ_l Σ_{h,q} max(G[l, b, h, q, j], 0) / (H · num_rows)

    i.e. Σ_l mean_h (Σ_q relu(G) / num_rows). grid = (B, cdiv(N, BLOCK_J));
    fp32 ``(BLOCK_R, BLOCK_J)`` accumulator reduced over rows once at the end.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
    for l in range(L):
        base = g_ptr + (l * B + b) * R * N
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask = (offs_r[:, None] < R) & mask_j[None, :]
            g = tl.load(base + offs_r[:, None] * N + offs_j[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.maximum(g, 0.0)
    res = tl.sum(acc, axis=0) * scale
    if ACCUMULATE:
        res += tl.load(out_ptr + b * N + offs_j, mask=mask_j, other=0.0)
    tl.store(out_ptr + b * N + offs_j, res, mask=mask_j)


def _launch(g: torch.Tensor, num_rows: Optional[int], out: Optional[torch.Tensor], accumulate: bool, name: str):
    """One launch over a 5-D ``(L, B, H, Q, N)`` tensor."""
    L, B, H, Q, N = g.shape
    if num_rows is None:
        num_rows = Q
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
        raise ValueError(f"num_rows for {name} must be a positive int (rows of G̃ the mean runs over), got {num_rows!r}")
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into out, so out must be given")
    out = check_out(out, (B, N), g.device, "(B, N)")
    if out.numel() == 0:
        return out
    if H == 0 or Q == 0 or L == 0:
        if not accumulate:
            out.zero_()
        return out
    g = contiguous(g)
    R = H * Q
    block_j = 128 if N > 64 else 64
    block_r = min(triton.next_power_of_2(R), 16)
    _legrad_reduce_kernel[(B, triton.cdiv(N, block_j))](
        g, out, L, B, R, N, 1.0 / (H * num_rows),
        ACCUMULATE=bool(accumulate), BLOCK_R=block_r, BLOCK_J=block_j, num_warps=4,
    )
    return out


def legrad_reduce(
    grad_rows: Union[torch.Tensor, Sequence[torch.Tensor]],
    num_rows: Optional[Union[int, Sequence[int]]] = None,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """LeGrad map of one or several layers: ``Σ_l relu(G̃ˡ).sum(2).mean(1) / num_rows``.

    Args:
        grad_rows: ``(B, H, Q, N)`` gradient rows of one layer, a stacked
            ``(L, B, H, Q, N)`` tensor (one launch), or a list of ``(B, H_l, Q_l, N)``
            tensors (one launch per layer, accumulating). float32 / bfloat16 / float16.
        num_rows: the divisor of the row mean (default Q: the rows passed); an int,
            or for a list one int per layer.
        out: optional ``(B, N)`` float32 contiguous output.
        accumulate: True adds into ``out`` (summing layers over several calls)
            instead of overwriting it; needs ``out``.

    Returns:
        ``(B, N)`` float32.
    """
    if isinstance(grad_rows, torch.Tensor):
        check_tensor(grad_rows, "grad_rows", (4, 5))
        require_triton(grad_rows)
        if isinstance(num_rows, (list, tuple)):
            raise TypeError("num_rows must be an int or None for a tensor grad_rows (a list is for a list of layers)")
        g = grad_rows if grad_rows.dim() == 5 else grad_rows.unsqueeze(0)
        return _launch(g, num_rows, out, accumulate, "grad_rows")
    if not isinstance(grad_rows, (list, tuple)):
        raise TypeError(f"grad_rows must be a tensor or a list of tensors, got {type(grad_rows).__name__}")
    if len(grad_rows) == 0:
        raise ValueError("grad_rows is an empty list; pass at least one layer")
    if num_rows is None or isinstance(num_rows, int):
        per_layer = [num_rows] * len(grad_rows)
    else:
        per_layer = list(num_rows)
        if len(per_layer) != len(grad_rows):
            raise ValueError(f"num_rows has {len(per_layer)} entries but grad_rows has {len(grad_rows)} layers")
    first = None
    for idx, g in enumerate(grad_rows):
        check_tensor(g, f"grad_rows[{idx}]", 4)
        if first is None:
            first = g
            require_triton(g)
        else:
            if g.shape[0] != first.shape[0] or g.shape[3] != first.shape[3]:
                raise ValueError(
                    f"grad_rows[{idx}] has shape {tuple(g.shape)}, which does not match (B, ·, ·, N) = "
                    f"({first.shape[0]}, ·, ·, {first.shape[3]}) of grad_rows[0]"
                )
            if g.device != first.device:
                raise ValueError(f"grad_rows[{idx}] is on {g.device} but grad_rows[0] is on {first.device}")
    for idx, g in enumerate(grad_rows):
        out = _launch(g.unsqueeze(0), per_layer[idx], out, accumulate or idx > 0, f"grad_rows[{idx}]")
    return out
