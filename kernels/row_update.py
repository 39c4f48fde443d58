"""One layer of the row algorithm (docs/methods.md §3.1) as a fused Triton kernel.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.torch_ops.row_update.row_update``.

For a small block of rows ``R (B, Q, N)`` (Q = 1 for an explanation)::

    s = R ⊙ (1 + w_mlp)                 # column scaling
    t = s · Ā                           # t_qj = Σ_i s_qi Ā_ij
    R ← s + t ⊙ w_attn

Ā (the head fusion of §3) is never written to memory: each program owns a
block of output columns j, streams the column strip ``A[b, :, :, j-block]``
and ``G[b, :, :, j-block]`` once in ``(BLOCK_I, BLOCK_J)`` tiles, fuses the
product, clamp and head sum in registers and accumulates Σ_i s_qi Ā_ij with
plain fp32 FMAs (no ``tl.dot``, so the result is within 1e-5 of fp32). The
cost is one read of A and G: O(H·N²) per layer; when the caller knows that
the rows are zero outside columns ``lo:hi`` (``support``: the query at the top
layer), only rows ``lo:hi`` of A and G are read.

When the batch gives too few column strips to fill a GPU, the i range is
split over several programs (deterministic split-K): each writes its partial
``Σ_i`` to a workspace and a small finalize kernel sums the partials in a
fixed order and applies the epilogue. The split is planned in units of
``SPLIT_UNIT`` rows, so the tiles and warps can be autotuned per shape
(keyed on N's power-of-two bucket, H, Q, the batch bucket, the support width
and the mode). One row per program (``BLOCK_Q = 1``): wider row blocks spill
registers on sm_90.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._utils import (
    GRADIENT_MODES,
    MODE_CODES,
    batch_bucket,
    contiguous,
    interpreted,
    num_splits,
    support_bounds,
    tuning_configs,
    weight_arg,
)
from .head_fusion import _fused_tile_sum, fusion_scale

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
        t_qj   = scale · acc_qj
        out_qj = s_qj + t_qj · w_attn_j
    """
    mask_j = offs_j < N
    mask = (offs_q[:, None] < Q) & mask_j[None, :]
    offs = b * Q * N + offs_q[:, None] * N + offs_j[None, :]
    s = _scaled_rows(rows_ptr, w_mlp_ptr, b, offs_q, offs_j, Q, N, w_mlp_c, W_MLP_TENSOR)
    t = acc * scale
    if W_ATTN_TENSOR:
        wa = tl.load(w_attn_ptr + b * N + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        res = s + t * wa[None, :]
    else:
        res = s + t * w_attn_c
    tl.store(out_ptr + offs, res, mask=mask)


def _prune_row_configs(configs, named_args, **kwargs):
    """Keep tiles whose ``(BLOCK_Q, BLOCK_I, BLOCK_J)`` product fits the registers and whose
    BLOCK_J is not wider than N."""
    n = named_args["N"]
    bq = kwargs.get("BLOCK_Q", 1)
    kept = [
        c for c in configs
        if bq * c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_J"] <= 8192
        and c.kwargs["BLOCK_J"] <= max(32, triton.next_power_of_2(n))
    ]
    return kept or configs[:1]


#: (BLOCK_I, BLOCK_J, num_warps, num_stages) timed on the GPU; every BLOCK_I divides SPLIT_UNIT.
ROW_GPU_CONFIGS = [
    triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=w, num_stages=st)
    for bi, bj, w, st in [(32, 64, 4, 2), (16, 128, 4, 2), (32, 64, 8, 2)]
]
ROW_INTERPRETER_CONFIG = triton.Config({"BLOCK_I": 128, "BLOCK_J": 256}, num_warps=4, num_stages=1)
#: Granularity of the split of the i range over programs (split-K): a multiple of every BLOCK_I /
#: BLOCK_K, so that tiles never straddle two splits whatever configuration the autotuner picks.
SPLIT_UNIT = 128


@triton.autotune(
    cache_results=True,  # the chosen config is stored in Triton's cache dir: a second process benchmarks nothing
    configs=tuning_configs(ROW_GPU_CONFIGS, ROW_INTERPRETER_CONFIG),
    key=["N_BUCKET", "H", "Q", "B_BUCKET", "SPAN", "MODE"],
    prune_configs_by={"early_config_prune": _prune_row_configs},
)
@triton.jit
def _row_update_kernel(
    rows_ptr,  # (B, Q, N) contiguous
    attn_ptr,  # (B, H, N, N) contiguous
    grad_ptr,  # (B, H, N, N) contiguous (dummy for mean)
    w_attn_ptr,  # (B, N) or dummy
    w_mlp_ptr,  # (B, N) or dummy
    out_ptr,  # (B, Q, N) float32
    part_ptr,  # (SPLIT, B, Q, N) float32 workspace (dummy unless SPLIT_OUT)
    B,
    Q,
    N,
    H,
    i_lo,  # rows i_lo:i_lo+SPAN of A and G are read (the support of the rows)
    SPAN,
    i_per_split,  # multiple of SPLIT_UNIT
    B_BUCKET,  # autotune key only
    N_BUCKET,  # autotune key only: N rounded up to a power of two (a new N in the bucket re-uses the tuning)
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

    grid = (B · cdiv(Q, BLOCK_Q), cdiv(N, BLOCK_J), SPLIT); the i range of split
    k is ``i_lo + k·i_per_split`` onwards, clipped to the support ``i_lo + SPAN``.
    Ā_ij is built per ``(BLOCK_I, BLOCK_J)`` tile in registers by
    ``_fused_tile_sum`` (head loop inside) and consumed at once; nothing of size
    N×N is stored.
    """
    num_q_blocks = tl.cdiv(Q, BLOCK_Q)
    pid0 = tl.program_id(0)
    b = (pid0 // num_q_blocks).to(tl.int64)
    offs_q = (pid0 % num_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = tl.program_id(2)
    mask_q = offs_q < Q
    mask_j = offs_j < N
    NN = N * N
    head0 = b * H * NN
    i_start = i_lo + split * i_per_split
    i_end = tl.minimum(i_start + i_per_split, i_lo + SPAN)

    acc = tl.zeros((BLOCK_Q, BLOCK_J), dtype=tl.float32)
    for i0 in range(i_start, i_end, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < i_end
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


def prepare_update_args(rows, attn, grad, w_attn, w_mlp, mode, out):
    """Launch form of trusted ``row_update`` / ``matrix_update`` arguments (no checks: the public
    entries check them): tensors made contiguous where they are not, the weights as
    ``(tensor or None, constant)``, the mode as its code, ``out`` allocated if None.

    Returns ``(rows, attn, grad, (wa, wa_c), (wm, wm_c), code, out)``.
    """
    code = MODE_CODES[mode]
    grad = contiguous(grad) if (grad is not None and mode in GRADIENT_MODES) else None
    B, _, N, _ = attn.shape
    if out is None:
        out = torch.empty((B, rows.shape[1], N), dtype=torch.float32, device=attn.device)
    return contiguous(rows), contiguous(attn), grad, weight_arg(w_attn), weight_arg(w_mlp), code, out


def plan_split(num_tiles: int, span: int, device: torch.device):
    """``(split, i_per_split)`` for a reduction over ``span`` rows: ``i_per_split`` is a multiple
    of ``SPLIT_UNIT`` (so any autotuned tile divides it) and ``split · i_per_split ≥ span``.
    ``num_tiles``: output tiles of the launch at the reference width 64 (what fills the device)."""
    units = max(1, triton.cdiv(span, SPLIT_UNIT))
    split = num_splits(num_tiles, units, device)
    i_per_split = triton.cdiv(units, split) * SPLIT_UNIT
    return max(1, triton.cdiv(span, i_per_split)), i_per_split


def launch_finalize(part, rows, wa, wm, out, split, B, Q, N, scale, code):
    """Σ over the split-K partials (fixed order) and the residual epilogue."""
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
    support: Optional[slice] = None,
) -> torch.Tensor:
    """One layer of the engine for a few rows: ``R ← s + (s·Ā) ⊙ w_attn``, ``s = R ⊙ (1 + w_mlp)``.

    Inputs are trusted (checked at the public entries, ``tokentm_fast.ops`` and
    ``torch.ops.tokentm.row_update``); nothing here reads device memory back to
    the host, so it can run inside backward hooks without a synchronisation.

    Args:
        rows: ``(B, Q, N)`` rows of the running product, small Q (typically 1).
            float32 (bfloat16 / float16 accepted, read as float32).
        attn: ``(B, H, N, N)`` attention probabilities of the layer, H ≥ 1.
        grad: ``(B, H, N, N)`` gradient w.r.t. ``attn``; may be None for "mean".
        w_attn, w_mlp: ``(B, N)`` weights (any supported float dtype) or Python floats
            (GAE: 1.0 / 0.0, rollout: 1.0 / -0.5); floats are passed as kernel scalars.
        mode: head fusion, "gae" | "decoupled" | "mean".
        out: optional ``(B, Q, N)`` float32 contiguous output; must not overlap ``rows``.
        support: step-1 ``slice`` of the columns outside which ``rows`` is zero, known to
            the caller (the query at the top layer); only rows ``lo:hi`` of A and G are
            read. None: all N.

    Returns:
        ``(B, Q, N)`` float32, equal to ``tokentm_fast.torch_ops.row_update.row_update``.
    """
    rows, attn, grad, wa, wm, code, out = prepare_update_args(rows, attn, grad, w_attn, w_mlp, mode, out)
    B, H, N, _ = attn.shape
    Q = rows.shape[1]
    if out.numel() == 0:
        return out
    lo, hi = support_bounds(support, N)
    span = hi - lo
    # one row per program: the (BLOCK_Q, BLOCK_I, BLOCK_J) product tile of BLOCK_Q = 2 or 4 spills registers on
    # sm_90 (benchmarks/compile_audit.py); many rows (Q ~ N) belong to matrix_update
    block_q = 1
    num_q_blocks = triton.cdiv(Q, block_q)
    split, i_per_split = plan_split(B * num_q_blocks * triton.cdiv(N, 64), span, attn.device)
    part = torch.empty((split, B, Q, N), dtype=torch.float32, device=attn.device) if split > 1 else out
    scale = fusion_scale(code, H)

    def grid(meta):
        return (B * num_q_blocks, triton.cdiv(N, meta["BLOCK_J"]), split)

    _row_update_kernel[grid](
        rows, attn, grad if grad is not None else attn,
        wa[0] if wa[0] is not None else rows, wm[0] if wm[0] is not None else rows,
        out, part, B, Q, N, H, lo, span, i_per_split, batch_bucket(B), triton.next_power_of_2(N), scale, wa[1], wm[1],
        MODE=code, W_ATTN_TENSOR=wa[0] is not None, W_MLP_TENSOR=wm[0] is not None,
        SPLIT_OUT=split > 1, BLOCK_Q=block_q,
    )
    if split > 1:
        launch_finalize(part, rows, wa, wm, out, split, B, Q, N, scale, code)
    return out
