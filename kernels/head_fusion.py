"""Head fusion of attention and gradient (docs/methods.md §3, §4) as a Triton kernel.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.torch_ops.head_fusion.fuse_heads``.

The tile helper ``_fused_tile_sum`` is shared with the aggregation kernels
(``row_update``, ``matrix_update``), which build Ā tiles in registers and
never write Ā to memory; ``fuse_heads`` itself materialises Ā for callers
that want the ``(B, N, N)`` map (tiles and warps autotuned per shape).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    GRADIENT_MODES,
    MODE_CODES,
    MODE_DECOUPLED,
    MODE_GAE,
    batch_bucket,
    contiguous,
    tuning_configs,
)

#: The mode codes as Triton constants, for the kernels' ``MODE == ...`` branches (jit code reads only
#: ``tl.constexpr`` globals); the wrappers pass the plain ints of ``MODE_CODES``.
_MODE_GAE = tl.constexpr(MODE_GAE)
_MODE_DECOUPLED = tl.constexpr(MODE_DECOUPLED)

#: (BLOCK_I, BLOCK_J, num_warps, num_stages) timed on the GPU.
GPU_CONFIGS = [
    triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=w, num_stages=st)
    for bi, bj, w, st in [(32, 64, 4, 2), (16, 128, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_I": 128, "BLOCK_J": 128}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    """No tile wider or taller than the N×N map needs."""
    n = max(32, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_I"] <= n and c.kwargs["BLOCK_J"] <= n]
    return kept or configs[:1]


@triton.jit
def _fused_tile_sum(
    a_ptrs,  # (BLOCK_I, BLOCK_J) pointers into head 0 of A[b]
    g_ptrs,  # same for G[b] (ignored unless MODE is gae / decoupled)
    mask,
    H,
    NN,  # head stride N*N
    MODE: tl.constexpr,
):
    """Unnormalised head fusion of one ``(BLOCK_I, BLOCK_J)`` tile, fp32 (docs/methods.md §3, §4).

        gae:        Σ_h max(A_h ⊙ G_h, 0)             (Ā = this / H)
        decoupled:  (Σ_h A_h) ⊙ (Σ_h max(G_h, 0))     (Ā = this / H²)
        mean:       Σ_h A_h                           (Ā = this / H)

    The caller applies the scale (see ``fusion_scale``), so that linear
    consumers can apply it once, after their reduction over i.
    """
    acc = tl.zeros(a_ptrs.shape, dtype=tl.float32)
    g_acc = tl.zeros(a_ptrs.shape, dtype=tl.float32)
    for _h in range(H):
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        if MODE == _MODE_GAE:
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.maximum(a * g, 0.0)
        elif MODE == _MODE_DECOUPLED:
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += a
            g_acc += tl.maximum(g, 0.0)
        else:  # mean
            acc += a
        a_ptrs += NN
        g_ptrs += NN
    if MODE == _MODE_DECOUPLED:
        acc = acc * g_acc
    return acc


def fusion_scale(mode_code: int, num_heads: int) -> float:
    """Factor that turns ``_fused_tile_sum`` into Ā."""
    if mode_code == MODE_DECOUPLED:
        return 1.0 / (num_heads * num_heads)
    return 1.0 / num_heads


@triton.autotune(
    cache_results=True,  # the chosen config is stored in Triton's cache dir: a second process benchmarks nothing
    configs=tuning_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N_BUCKET", "H", "B_BUCKET", "MODE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _fuse_heads_kernel(
    attn_ptr,  # (B, H, N, N) contiguous
    grad_ptr,  # (B, H, N, N) contiguous, or a dummy pointer for mean
    out_ptr,  # (B, N, N) float32
    N,
    H,
    B_BUCKET,  # autotune key only
    N_BUCKET,  # autotune key only: N rounded up to a power of two (a new N in the bucket re-uses the tuning)
    scale,
    MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """One ``(BLOCK_I, BLOCK_J)`` tile of Ā[b] (docs/methods.md §3, §4 head fusion):

        gae:        Ā_ij = mean_h max(A_hij · G_hij, 0)
        decoupled:  Ā_ij = mean_h A_hij · mean_h max(G_hij, 0)
        mean:       Ā_ij = mean_h A_hij

    grid = (B, cdiv(N, BLOCK_I), cdiv(N, BLOCK_J)); heads are looped inside.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    tile = offs_i[:, None] * N + offs_j[None, :]
    NN = N * N
    head0 = b * H * NN
    fused = _fused_tile_sum(attn_ptr + head0 + tile, grad_ptr + head0 + tile, mask, H, NN, MODE) * scale
    tl.store(out_ptr + b * NN + tile, fused, mask=mask)


def fuse_heads(
    attn: torch.Tensor,
    grad: Optional[torch.Tensor] = None,
    mode: str = "gae",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fuse the heads of one layer: ``(B, H, N, N) -> (B, N, N)`` float32.

    Inputs are trusted (checked at the public entries, ``tokentm_fast.ops`` and
    ``torch.ops.tokentm.fuse_heads``).

    Args:
        attn: ``(B, H, N, N)`` attention probabilities (float32 / bfloat16 / float16), H ≥ 1.
        grad: ``(B, H, N, N)`` gradient w.r.t. ``attn``; required for "gae" and
            "decoupled", ignored for "mean".
        mode: "gae" | "decoupled" | "mean" (docs/methods.md §3, §4).
        out: optional ``(B, N, N)`` float32 contiguous output, fully overwritten.

    Returns:
        ``(B, N, N)`` float32 Ā, equal to ``tokentm_fast.torch_ops.head_fusion.fuse_heads``.
    """
    code = MODE_CODES[mode]
    B, H, N, _ = attn.shape
    if out is None:
        out = torch.empty((B, N, N), dtype=torch.float32, device=attn.device)
    if out.numel() == 0:
        return out
    attn = contiguous(attn)
    grad = contiguous(grad) if mode in GRADIENT_MODES else attn  # mean never reads it

    def grid(meta):
        return (B, triton.cdiv(N, meta["BLOCK_I"]), triton.cdiv(N, meta["BLOCK_J"]))

    _fuse_heads_kernel[grid](attn, grad, out, N, H, batch_bucket(B), triton.next_power_of_2(N), fusion_scale(code, H),
                             MODE=code)
    return out


__all__ = ["fuse_heads", "fusion_scale"]
