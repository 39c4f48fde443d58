"""One layer of the engine for many rows (the full matrix Cᴸ) as a fused batched matmul.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.torch_ops.row_update.row_update``
(same contract as ``tokentm_fast.kernels.row_update``; this kernel is for large Q,
typically Q = N for ``explain(full=True)``).

docs/methods.md §3 defines ``Cᴸ = Uᴸ ⋯ U¹ · C⁰`` with ``Uˡ = (I + diag(w_mlp))(I + Āˡ diag(w_attn))``.
Read from the left, starting with ``R = I`` at the top layer, the same product
streams in backward order (Gᴸ arrives first) as a sequence of right
multiplications of the rows ``R (B, Q, N)``::

    S = R · diag(1 + w_mlp)               # prologue (column scaling of R)
    T = S · Ā                             # tl.dot, Ā tiles fused in the prologue
    R ← S + T · diag(w_attn)              # epilogue

This is the left-multiplication form of the §3 matrix update (the §3.1 remark on
the full matrix fuses the head fusion into the product Āˡ·(diag(w_attn) Cˡ⁻¹);
here the transposed association ``(R·Ā)·diag(w_attn)`` is used so the top layer
is processed first). Ā is never stored: each ``(BLOCK_K, BLOCK_N)`` tile of Ā
is built in registers from the A/G tiles of all heads and fed to ``tl.dot``.
Tiles, warps and stages are autotuned per shape (N's power-of-two bucket, H, Q,
batch bucket, mode, tf32); the split-K plan is shared with ``row_update``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import batch_bucket, tuning_configs
from .head_fusion import _fused_tile_sum, fusion_scale
from .row_update import Weight, _scaled_rows, _update_epilogue, launch_finalize, plan_split, prepare_update_args

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) timed on the GPU; every BLOCK_K divides
#: ``row_update.SPLIT_UNIT``.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(32, 64, 32, 8, 2), (128, 64, 32, 8, 2)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    """No row tile taller than Q, no column tile wider than N (beyond tl.dot's minimum of 16)."""
    q, n = named_args["Q"], named_args["N"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(q))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
    ]
    return kept or configs[:1]


@triton.autotune(
    cache_results=True,  # the chosen config is stored in Triton's cache dir: a second process benchmarks nothing
    configs=tuning_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N_BUCKET", "H", "Q", "B_BUCKET", "MODE", "ALLOW_TF32"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _matrix_update_kernel(
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
    k_per_split,  # multiple of BLOCK_K
    B_BUCKET,  # autotune key only
    N_BUCKET,  # autotune key only: N rounded up to a power of two (a new N in the bucket re-uses the tuning)
    scale,
    w_attn_c,
    w_mlp_c,
    MODE: tl.constexpr,
    W_ATTN_TENSOR: tl.constexpr,
    W_MLP_TENSOR: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Output tile ``(m-block, n-block)`` of image b (docs/methods.md §3, left-multiplication form):

        S_mk   = R_mk (1 + w_mlp_k)                          (prologue)
        Ā_kn   = head fusion of A[b,:,k,n], G[b,:,k,n]        (prologue, registers)
        T_mn   = Σ_{k ∈ split} S_mk Ā_kn                     (tl.dot, fp32 accumulator)
        out_mn = S_mn + T_mn w_attn_n                        (epilogue; or partial T out)

    grid = (B · cdiv(Q, BLOCK_M), cdiv(N, BLOCK_N), SPLIT). ALLOW_TF32 picks
    ``input_precision="tf32"`` (tensor cores) or ``"ieee"`` (exact fp32).
    """
    num_m_blocks = tl.cdiv(Q, BLOCK_M)
    pid0 = tl.program_id(0)
    b = (pid0 // num_m_blocks).to(tl.int64)
    offs_m = (pid0 % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    mask_m = offs_m < Q
    mask_n = offs_n < N
    NN = N * N
    head0 = b * H * NN
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < N
        s = _scaled_rows(rows_ptr, w_mlp_ptr, b, offs_m, offs_k, Q, N, w_mlp_c, W_MLP_TENSOR)
        tile = offs_k[:, None] * N + offs_n[None, :]
        fused = _fused_tile_sum(
            attn_ptr + head0 + tile, grad_ptr + head0 + tile,
            mask_k[:, None] & mask_n[None, :], H, NN, MODE,
        )
        if ALLOW_TF32:
            acc = tl.dot(s, fused, acc, input_precision="tf32")
        else:
            acc = tl.dot(s, fused, acc, input_precision="ieee")

    if SPLIT_OUT:
        offs = (split * B + b) * Q * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + offs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        _update_epilogue(
            acc, rows_ptr, w_attn_ptr, w_mlp_ptr, out_ptr, b, offs_m, offs_n, Q, N,
            scale, w_attn_c, w_mlp_c, MODE, W_ATTN_TENSOR, W_MLP_TENSOR,
        )


def matrix_update(
    rows: torch.Tensor,
    attn: torch.Tensor,
    grad: Optional[torch.Tensor],
    w_attn: Weight,
    w_mlp: Weight,
    mode: str = "gae",
    allow_tf32: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One layer of the engine for many rows: ``R ← S + (S·Ā) ⊙ w_attn``, ``S = R ⊙ (1 + w_mlp)``.

    Same contract as ``row_update`` but for large Q (Q = N: the full matrix, whose
    rows are dense, so there is no ``support``). Inputs are trusted (checked at the
    public entries, ``tokentm_fast.ops`` and ``torch.ops.tokentm.matrix_update``).

    Args:
        rows: ``(B, Q, N)`` rows of the running product (float32; bfloat16 / float16 read as float32).
        attn: ``(B, H, N, N)`` attention probabilities of the layer, H ≥ 1.
        grad: ``(B, H, N, N)`` gradient w.r.t. ``attn``; may be None for "mean".
        w_attn, w_mlp: ``(B, N)`` weights or Python floats.
        mode: head fusion, "gae" | "decoupled" | "mean".
        allow_tf32: True uses tf32 tensor cores (err ≤ 5e-3, docs/methods.md §7); False keeps
            exact fp32 products (err ≤ 1e-5).
        out: optional ``(B, Q, N)`` float32 contiguous output; must not overlap ``rows``.

    Returns:
        ``(B, Q, N)`` float32, equal to ``tokentm_fast.torch_ops.row_update.row_update``.
    """
    rows, attn, grad, wa, wm, code, out = prepare_update_args(rows, attn, grad, w_attn, w_mlp, mode, out)
    B, H, N, _ = attn.shape
    Q = rows.shape[1]
    if out.numel() == 0:
        return out
    ref_tiles = B * triton.cdiv(Q, 64) * triton.cdiv(N, 64)
    split, k_per_split = plan_split(ref_tiles, N, attn.device)
    part = torch.empty((split, B, Q, N), dtype=torch.float32, device=attn.device) if split > 1 else out
    scale = fusion_scale(code, H)

    def grid(meta):
        return (B * triton.cdiv(Q, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)

    _matrix_update_kernel[grid](
        rows, attn, grad if grad is not None else attn,
        wa[0] if wa[0] is not None else rows, wm[0] if wm[0] is not None else rows,
        out, part, B, Q, N, H, k_per_split, batch_bucket(B), triton.next_power_of_2(N), scale, wa[1], wm[1],
        MODE=code, W_ATTN_TENSOR=wa[0] is not None, W_MLP_TENSOR=wm[0] is not None,
        SPLIT_OUT=split > 1, ALLOW_TF32=bool(allow_tf32),
    )
    if split > 1:
        launch_finalize(part, rows, wa, wm, out, split, B, Q, N, scale, code)
    return out
