"""One layer of the row algorithm (docs/methods.md §3.1) as a fused Triton kernel.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.aggregation.row_update``.

For a small block of rows ``R (B, Q, N)`` (Q = 1 for an explanation)::

    s = R ⊙ (1 + w_mlp)                 # column scaling
    t = s · Ā                           # t_qj = Σ_i s_qi Ā_ij
    R ← s + t ⊙ w_attn

Ā (the head fusion of §3) is never written to memory: each program owns a
block of output columns j, streams the column strip ``A[b, :, :, j-block]``
and ``G[b, :, :, j-block]`` once in ``(BLOCK_I, BLOCK_J)`` tiles, fuses the
product, clamp and head sum in registers and accumulates Σ_i s_qi Ā_ij with
plain fp32 FMAs (no ``tl.dot``, so the result is within 1e-5 of fp32). The
cost is one read of A and G: O(H·N²) per layer.

When the batch gives too few column strips to fill a GPU, the i range is
split over several programs (deterministic split-K): each writes its partial
``Σ_i`` to a workspace and a small finalize kernel sums the partials in a
fixed order and applies the epilogue.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._utils import (
    check_out,
    check_tensor,
    check_weight,
    contiguous,
    interpreted,
    num_sms,
    require_triton,
)
from .head_fusion import _fused_tile_sum, check_attn_grad, fusion_scale

Weight = Union[torch.Tensor, float]


@triton.jit
def _scaled_rows(rows_ptr, w_mlp_ptr, b, offs_q, offs_i, Q, N, w_mlp_c, W_MLP_TENSOR: tl.constexpr):
    """``s_qi = R_qi · (1 + w_mlp_i)`` for one ``(BLOCK_Q, BLOCK_I)`` tile of image b, fp32
    (the column scaling ``R · U^{mlp}`` of docs/methods.md §3.1). Masked entries are 0."""
    mask_i = offs_i < N
    r = tl.load(
        rows_ptr + b * Q * N + offs_q[:, None] * N + offs_i[None, :],
        mask=(offs_q[:, None] < Q) & mask_i[None, :],
        other=0.0,
    ).to(tl.float32)
    if W_MLP_TENSOR:
        wm = tl.load(w_mlp_ptr + b * N + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        s = r * (1.0 + wm[None, :])
    else:
        s = r * (1.0 + w_mlp_c)
    return s


@triton.jit
def _update_epilogue(
    acc,  # (BLOCK_Q, BLOCK_J) fp32: Σ_i s_qi · (unnormalised fused sum)_ij
    rows_ptr,
    w_attn_ptr,
    w_mlp_ptr,
    out_ptr,
    b,
    offs_q,
    offs_j,
    Q,
    N,
    scale,
    w_attn_c,
    w_mlp_c,
    MODE: tl.constexpr,
    W_ATTN_TENSOR: tl.constexpr,
    W_MLP_TENSOR: tl.constexpr,
):
    """Residual epilogue shared by the row and matrix kernels (docs/methods.md §3.1):

        s_qj   = R_qj · (1 + w_mlp_j)
        t_qj   = scale · acc_qj  (+ ½ s_qj for rollout's ½ I)
        out_qj = s_qj + t_qj · w_attn_j
    """
    mask_j = offs_j < N
    mask = (offs_q[:, None] < Q) & mask_j[None, :]
    offs = b * Q * N + offs_q[:, None] * N + offs_j[None, :]
    s = _scaled_rows(rows_ptr, w_mlp_ptr, b, offs_q, offs_j, Q, N, w_mlp_c, W_MLP_TENSOR)
    t = acc * scale
    if MODE == 3:  # rollout: Ā = ½ mean_h A + ½ I
        t += 0.5 * s
    if W_ATTN_TENSOR:
        wa = tl.load(w_attn_ptr + b * N + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        res = s + t * wa[None, :]
    else:
        res = s + t * w_attn_c
    tl.store(out_ptr + offs, res, mask=mask)


@triton.jit
def _row_update_kernel(
    rows_ptr,  # (B, Q, N) contiguous
    attn_ptr,  # (B, H, N, N) contiguous
    grad_ptr,  # (B, H, N, N) contiguous (dummy for mean / rollout)
    w_attn_ptr,  # (B, N) or dummy
    w_mlp_ptr,  # (B, N) or dummy
    out_ptr,  # (B, Q, N) float32
    part_ptr,  # (SPLIT, B, Q, N) float32 workspace (dummy unless SPLIT_OUT)
    B,
    Q,
    N,
    H,
    num_q_blocks,
    i_per_split,  # multiple of BLOCK_I
    scale,
    w_attn_c,
    w_mlp_c,
    MODE: tl.constexpr,
    W_ATTN_TENSOR: tl.constexpr,
    W_MLP_TENSOR: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Rows ``q ∈ q-block`` and columns ``j ∈ j-block`` of image b (docs/methods.md §3.1):

        s_qi = R_qi (1 + w_mlp_i)
        t_qj = Σ_{i ∈ split} s_qi · Ā_ij,   Ā_ij = fusion of A[b,:,i,j], G[b,:,i,j] (§3)
        out_qj = s_qj + t_qj · w_attn_j    (or the partial Σ to the workspace)

    grid = (B · cdiv(Q, BLOCK_Q), cdiv(N, BLOCK_J), SPLIT). Ā_ij is built per
    ``(BLOCK_I, BLOCK_J)`` tile in registers by ``_fused_tile_sum`` (head loop
    inside) and consumed at once; nothing of size N×N is stored.
    """
    pid0 = tl.program_id(0)
    b = (pid0 // num_q_blocks).to(tl.int64)
    offs_q = (pid0 % num_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = tl.program_id(2)
    mask_q = offs_q < Q
    mask_j = offs_j < N
    NN = N * N
    head0 = b * H * NN
    i_start = split * i_per_split
    i_end = tl.minimum(i_start + i_per_split, N)

    acc = tl.zeros((BLOCK_Q, BLOCK_J), dtype=tl.float32)
    for i0 in range(i_start, i_end, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < N
        s = _scaled_rows(rows_ptr, w_mlp_ptr, b, offs_q, offs_i, Q, N, w_mlp_c, W_MLP_TENSOR)
        tile = offs_i[:, None] * N + offs_j[None, :]
        fused = _fused_tile_sum(
            attn_ptr + head0 + tile, grad_ptr + head0 + tile,
            mask_i[:, None] & mask_j[None, :], H, NN, MODE,
        )
        # Σ_i s_qi · F_ij with fp32 FMAs (no tensor cores).
        acc += tl.sum(s[:, :, None] * fused[None, :, :], axis=1)

    if SPLIT_OUT:
        offs = (split * B + b) * Q * N + offs_q[:, None] * N + offs_j[None, :]
        tl.store(part_ptr + offs, acc, mask=mask_q[:, None] & mask_j[None, :])
    else:
        _update_epilogue(
            acc, rows_ptr, w_attn_ptr, w_mlp_ptr, out_ptr, b, offs_q, offs_j, Q, N,
            scale, w_attn_c, w_mlp_c, MODE, W_ATTN_TENSOR, W_MLP_TENSOR,
        )


@triton.jit
def _update_finalize_kernel(
    part_ptr,  # (SPLIT, B, Q, N) float32 partial sums
    rows_ptr,
    w_attn_ptr,
    w_mlp_ptr,
    out_ptr,
    B,
    Q,
    N,
    SPLIT,
    num_q_blocks,
    scale,
    w_attn_c,
    w_mlp_c,
    MODE: tl.constexpr,
    W_ATTN_TENSOR: tl.constexpr,
    W_MLP_TENSOR: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """acc_qj = Σ_split part[split, b, q, j] (fixed order, deterministic), then the
    residual epilogue ``out = s + scale·acc·w_attn`` of docs/methods.md §3.1.
    grid = (B · cdiv(Q, BLOCK_Q), cdiv(N, BLOCK_J))."""
    pid0 = tl.program_id(0)
    b = (pid0 // num_q_blocks).to(tl.int64)
    offs_q = (pid0 % num_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (offs_q[:, None] < Q) & (offs_j[None, :] < N)
    offs = b * Q * N + offs_q[:, None] * N + offs_j[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_J), dtype=tl.float32)
    stride = B * Q * N
    for sp in range(SPLIT):
        acc += tl.load(part_ptr + sp * stride + offs, mask=mask, other=0.0)
    _update_epilogue(
        acc, rows_ptr, w_attn_ptr, w_mlp_ptr, out_ptr, b, offs_q, offs_j, Q, N,
        scale, w_attn_c, w_mlp_c, MODE, W_ATTN_TENSOR, W_MLP_TENSOR,
    )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        lo = t.data_ptr()
        extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
        return lo, lo + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_update_args(rows, attn, grad, w_attn, w_mlp, mode, out):
    """Shared validation of ``row_update`` / ``matrix_update`` arguments.

    Returns ``(rows, attn, grad, (wa, wa_c), (wm, wm_c), code, out)`` with the
    tensors made contiguous where needed and ``out`` validated or allocated.
    """
    attn, grad, code = check_attn_grad(attn, grad, mode)
    B, H, N, _ = attn.shape
    check_tensor(rows, "rows", 3)
    if rows.shape[0] != B or rows.shape[2] != N:
        raise ValueError(
            f"rows must be (B, Q, N) = ({B}, Q, {N}) to match attn {tuple(attn.shape)}, got {tuple(rows.shape)}"
        )
    if rows.device != attn.device:
        raise ValueError(f"rows is on {rows.device} but attn is on {attn.device}")
    if H == 0:
        raise ValueError("attn has no heads (H = 0); the head mean is undefined")
    wa = check_weight(w_attn, "w_attn", B, N, attn.device)
    wm = check_weight(w_mlp, "w_mlp", B, N, attn.device)
    Q = rows.shape[1]
    if isinstance(out, torch.Tensor) and _overlap(out, rows):
        raise ValueError("out must not alias rows: every program reads all of rows while others write out")
    out = check_out(out, (B, Q, N), attn.device, "(B, Q, N)")
    return contiguous(rows), attn, grad, wa, wm, code, out


def _num_splits(num_tiles: int, num_k_blocks: int, device: torch.device) -> int:
    """How many programs share the i (reduction) range of one output tile.

    1 under the interpreter and whenever ``num_tiles`` already fills the GPU
    (about 2 programs per SM); otherwise enough splits to get there.
    """
    if device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    if num_tiles >= target:
        return 1
    return max(1, min(num_k_blocks, triton.cdiv(target, num_tiles), 64))


def launch_finalize(part, rows, wa, wm, out, split, B, Q, N, scale, code):
    block_q = min(triton.next_power_of_2(Q), 16)
    block_j = 512 if interpreted(rows.device) else 128
    num_q_blocks = triton.cdiv(Q, block_q)
    _update_finalize_kernel[(B * num_q_blocks, triton.cdiv(N, block_j))](
        part, rows, wa[0] if wa[0] is not None else rows, wm[0] if wm[0] is not None else rows, out,
        B, Q, N, split, num_q_blocks, scale, wa[1], wm[1],
        MODE=code, W_ATTN_TENSOR=wa[0] is not None, W_MLP_TENSOR=wm[0] is not None,
        BLOCK_Q=block_q, BLOCK_J=block_j, num_warps=4,
    )


def row_update(
    rows: torch.Tensor,
    attn: torch.Tensor,
    grad: Optional[torch.Tensor],
    w_attn: Weight,
    w_mlp: Weight,
    mode: str = "gae",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One layer of the engine for a few rows: ``R ← s + (s·Ā) ⊙ w_attn``, ``s = R ⊙ (1 + w_mlp)``.

    Args:
        rows: ``(B, Q, N)`` rows of the running product, small Q (typically 1).
            float32 (bfloat16 / float16 accepted, read as float32).
        attn: ``(B, H, N, N)`` attention probabilities of the layer.
        grad: ``(B, H, N, N)`` gradient w.r.t. ``attn``; may be None for "mean" / "rollout".
        w_attn, w_mlp: ``(B, N)`` weights (any supported float dtype) or Python floats
            (GAE: 1.0 / 0.0, rollout: 1.0 / -0.5); floats are passed as kernel scalars.
        mode: head fusion, "gae" | "decoupled" | "mean" (| "rollout", as in the oracle).
        out: optional ``(B, Q, N)`` float32 contiguous output (must not alias ``rows``).

    Returns:
        ``(B, Q, N)`` float32, equal to ``tokentm_fast.aggregation.row_update``.
    """
    rows, attn, grad, wa, wm, code, out = check_update_args(rows, attn, grad, w_attn, w_mlp, mode, out)
    require_triton(attn)
    B, H, N, _ = attn.shape
    Q = rows.shape[1]
    if out.numel() == 0:
        return out
    block_q = min(triton.next_power_of_2(Q), 4)
    if interpreted(attn.device):
        block_i, block_j = 128, 256
    else:
        block_i, block_j = max(8, 32 // block_q), 64
    num_q_blocks = triton.cdiv(Q, block_q)
    num_j_blocks = triton.cdiv(N, block_j)
    num_i_blocks = triton.cdiv(N, block_i)
    split = _num_splits(B * num_q_blocks * num_j_blocks, num_i_blocks, attn.device)
    i_per_split = triton.cdiv(num_i_blocks, split) * block_i
    split = triton.cdiv(N, i_per_split)
    part = torch.empty((split, B, Q, N), dtype=torch.float32, device=attn.device) if split > 1 else out
    scale = fusion_scale(code, H)
    _row_update_kernel[(B * num_q_blocks, num_j_blocks, split)](
        rows, attn, grad if grad is not None else attn,
        wa[0] if wa[0] is not None else rows, wm[0] if wm[0] is not None else rows,
        out, part, B, Q, N, H, num_q_blocks, i_per_split, scale, wa[1], wm[1],
        MODE=code, W_ATTN_TENSOR=wa[0] is not None, W_MLP_TENSOR=wm[0] is not None,
        SPLIT_OUT=split > 1, BLOCK_Q=block_q, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
    if split > 1:
        launch_finalize(part, rows, wa, wm, out, split, B, Q, N, scale, code)
    return out
