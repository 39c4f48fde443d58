"""LeGrad's per-layer gradient reduction (docs/methods.md §6) as a Triton kernel.

PyTorch equivalent::

    relu(grad_rows).sum(dim=2).mean(dim=1) / num_rows          # (B, H, Q, N) -> (B, N)

summed over layers for a 5-D ``(L, B, H, Q, N)`` input or a list of 4-D inputs.
docs/methods.md §6: ``eˡ_j = mean_h mean_{i=1..N} max(G̃ˡ_h[i, j], 0)``; rows of G̃ that are
identically zero need not be passed (with class-token pooling only row ``cls``
is non-zero, so Q = 1 and ``num_rows = N``), hence ``num_rows`` is separate
from Q.

Grid: ``(B, cdiv(N, BLOCK_J))`` column blocks; when they are too few to fill
the GPU (one image, many rows: mean pooling, Q = N) the rows are split over
more programs, whose partial sums a small kernel adds in a fixed order
(deterministic, no atomics). Tiles and warps are autotuned per shape.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ._utils import batch_bucket, contiguous, interpreted, num_splits, tuning_configs

#: (BLOCK_R, BLOCK_J, num_warps) timed on the GPU.
GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_J": bj}, num_warps=w, num_stages=2)
    for br, bj, w in [(8, 128, 4), (16, 128, 4), (32, 128, 8), (8, 256, 4)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_R": 16, "BLOCK_J": 128}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    """No row tile taller than the rows of a layer, no column tile wider than N."""
    r, n = named_args["R"], named_args["N"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_R"] <= max(4, triton.next_power_of_2(r))
        and c.kwargs["BLOCK_J"] <= max(128, triton.next_power_of_2(n))
    ]
    return kept or configs[:1]


@triton.autotune(
    cache_results=True,  # the chosen config is stored in Triton's cache dir: a second process benchmarks nothing
    configs=tuning_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N_BUCKET", "R", "L", "B_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],  # ACCUMULATE adds into out: every timed run must start from it
)
@triton.jit
def _legrad_reduce_kernel(
    g_ptr,  # (L, B, R, N) contiguous, R = H·Q rows per (layer, image)
    out_ptr,  # (B, N) float32
    part_ptr,  # (SPLIT, B, N) float32 workspace (dummy unless SPLIT_OUT)
    L,
    B,
    R,
    N,
    r_per_split,  # rows of each layer per split, a multiple of ROW_UNIT
    B_BUCKET,  # autotune key only
    N_BUCKET,  # autotune key only: N rounded up to a power of two (a new N in the bucket re-uses the tuning)
    scale,  # 1 / (H · num_rows)
    ACCUMULATE: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Columns ``j ∈ j-block`` of image b (docs/methods.md §6):

        out_j (+)= Σ_l Σ_{h,q} max(G[l, b, h, q, j], 0) / (H · num_rows)

    i.e. Σ_l mean_h (Σ_q relu(G) / num_rows). grid = (B, cdiv(N, BLOCK_J), SPLIT):
    split k sums rows ``k·r_per_split`` onwards of every layer into an fp32
    ``(BLOCK_R, BLOCK_J)`` accumulator, reduced over rows once at the end, and
    writes out (SPLIT = 1) or its partial sum (the finalize kernel adds them).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    r_start = tl.program_id(2) * r_per_split
    r_end = tl.minimum(r_start + r_per_split, R)
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
    for l in range(L):
        base = g_ptr + (l * B + b) * R * N  # int64 (b is): L·B·H·Q·N may exceed 2³¹
        for r0 in range(r_start, r_end, BLOCK_R):
            offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)  # R·N may exceed 2³¹
            mask = (offs_r[:, None] < r_end) & mask_j[None, :]
            g = tl.load(base + offs_r[:, None] * N + offs_j[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.maximum(g, 0.0)
    res = tl.sum(acc, axis=0) * scale
    if SPLIT_OUT:
        tl.store(part_ptr + (tl.program_id(2) * B + b) * N + offs_j, res, mask=mask_j)
    else:
        if ACCUMULATE:
            res += tl.load(out_ptr + b * N + offs_j, mask=mask_j, other=0.0)
        tl.store(out_ptr + b * N + offs_j, res, mask=mask_j)


@triton.jit
def _legrad_finalize_kernel(part_ptr, out_ptr, B, N, SPLIT, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[b, j] (+)= Σ_k part[k, b, j]``, splits summed in order (deterministic);
    grid = (B, cdiv(N, BLOCK))."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    res = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(SPLIT):
        res += tl.load(part_ptr + (k * B + b) * N + offs, mask=mask, other=0.0)
    if ACCUMULATE:
        res += tl.load(out_ptr + b * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, res, mask=mask)


#: Granularity of the row split: a multiple of every BLOCK_R.
ROW_UNIT = 64


def _launch(g: torch.Tensor, num_rows: Optional[int], out: Optional[torch.Tensor], accumulate: bool):
    """One launch over a 5-D ``(L, B, H, Q, N)`` tensor."""
    L, B, H, Q, N = g.shape
    if num_rows is None:
        num_rows = Q
    if out is None:
        out = torch.empty((B, N), dtype=torch.float32, device=g.device)
    if out.numel() == 0:
        return out
    if H == 0 or Q == 0 or L == 0:
        if not accumulate:
            out.zero_()
        return out
    g = contiguous(g)
    R = H * Q
    units = triton.cdiv(R, ROW_UNIT)
    split = num_splits(B * triton.cdiv(N, 128), units, g.device)  # reference width 128
    r_per_split = triton.cdiv(units, split) * ROW_UNIT
    split = triton.cdiv(R, r_per_split)
    part = torch.empty((split, B, N), dtype=torch.float32, device=g.device) if split > 1 else out
    _legrad_reduce_kernel[lambda meta: (B, triton.cdiv(N, meta["BLOCK_J"]), split)](
        g, out, part, L, B, R, N, r_per_split, batch_bucket(B), triton.next_power_of_2(N), 1.0 / (H * num_rows),
        ACCUMULATE=bool(accumulate), SPLIT_OUT=split > 1,
    )
    if split > 1:
        block = 512 if interpreted(g.device) else 128
        _legrad_finalize_kernel[(B, triton.cdiv(N, block))](
            part, out, B, N, split, ACCUMULATE=bool(accumulate), BLOCK=block, num_warps=4,
        )
    return out


def legrad_reduce(
    grad_rows: Union[torch.Tensor, Sequence[torch.Tensor]],
    num_rows: Optional[Union[int, Sequence[int]]] = None,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """LeGrad map of one or several layers: ``Σ_l relu(G̃ˡ).sum(2).mean(1) / num_rows``.

    Inputs are trusted (checked at the public entries, ``tokentm_fast.ops`` and
    ``torch.ops.tokentm.legrad_reduce``).

    Args:
        grad_rows: ``(B, H, Q, N)`` gradient rows of one layer, a stacked
            ``(L, B, H, Q, N)`` tensor (one launch), or a list of ``(B, H_l, Q_l, N)``
            tensors (one launch per layer, accumulating). float32 / bfloat16 / float16.
        num_rows: the divisor of the row mean (default Q: the rows passed); a positive
            int, or for a list one int per layer.
        out: optional ``(B, N)`` float32 contiguous output.
        accumulate: True adds into ``out`` (summing layers over several calls)
            instead of overwriting it; needs ``out``.

    Returns:
        ``(B, N)`` float32.
    """
    if isinstance(grad_rows, torch.Tensor):
        g = grad_rows if grad_rows.dim() == 5 else grad_rows.unsqueeze(0)
        return _launch(g, num_rows, out, accumulate)
    per_layer = list(num_rows) if isinstance(num_rows, (list, tuple)) else [num_rows] * len(grad_rows)
    for idx, g in enumerate(grad_rows):
        out = _launch(g.unsqueeze(0), per_layer[idx], out, accumulate or idx > 0)
    return out
