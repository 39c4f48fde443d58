"""Token transformation weights (docs/methods.md §2) as two Triton kernels.

PyTorch equivalent (oracle and CPU fallback): ``tokentm_fast.torch_ops.transform_weights.transform_weights``.

The work is spread over ``(image, token block)`` programs, so that even a
batch of one fills the GPU:

1. ``_transform_weights_kernel``, grid ``(B, cdiv(N, BLOCK_N))``: each program
   streams its ``(BLOCK_N, D)`` slices of ``x`` and ``x̃`` once, in
   ``(BLOCK_N, BLOCK_D)`` tiles, with three fp32 running sums per token
   (``|x|²``, ``|x̃|²``, ``<x, x̃>``), and writes the *unnormalised* weight
   ``exp(cos_i) · ratio_i`` and ``exp(cos_i)`` itself.
2. ``_necc_normalize_kernel``, grid ``(B, cdiv(N, BLOCK))``: each program sums
   ``exp(cos)`` over the N tokens of its image, chunk by chunk in a fixed
   order (every program of an image gets the same sum, and every run the same
   bits: no atomics), and divides its block of weights by it.

NECC is a softmax over the tokens of one image, but ``|cos_i| ≤ 1``
(Cauchy–Schwarz; the ε clamps only shrink it), so ``exp(cos_i) ∈ [1/e, e]``
needs no running maximum and no rescaling between blocks. With
``use_necc=False`` the first kernel writes the final weights and the second
is not launched.

Launch settings: ``triton.autotune`` over tile sizes and warps, keyed on N's
power-of-two bucket, D and a batch bucket (and the input dtypes); under Triton's
interpreter one small configuration.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import EPS, batch_bucket, contiguous, interpreted, tuning_configs

#: (BLOCK_N, BLOCK_D, num_warps, num_stages) timed on the GPU (at most 4: a first call benchmarks few;
#: every one audited for sm_90 by benchmarks/compile_audit.py).
GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bd, w, s in [(8, 128, 2, 3), (16, 128, 4, 3), (16, 256, 4, 2), (32, 128, 8, 2)]
]
#: The interpreter's configuration: small enough that the tests see several token blocks.
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1)
#: Tokens per program (and per summed chunk) of the normalisation pass.
NORM_BLOCK_GPU = 1024
NORM_BLOCK_INTERPRETER = 64


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than D or taller than N (they only add masked lanes)."""
    n, d = named_args["N"], named_args["D"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_D"] <= max(64, triton.next_power_of_2(d))
        and c.kwargs["BLOCK_N"] <= max(8, triton.next_power_of_2(n))
    ]
    return kept or configs[:1]


@triton.autotune(
    cache_results=True,  # the chosen config is stored in Triton's cache dir: a second process benchmarks nothing
    configs=tuning_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N_BUCKET", "D", "B_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _transform_weights_kernel(
    x_ptr,  # (B, N, D) tokens entering the sub-layer, contiguous
    t_ptr,  # (B, N, D) transformed tokens x̃, contiguous
    out_ptr,  # (B, N) float32: final weights, or unnormalised ones when USE_NECC
    e_ptr,  # (B, N) float32: exp(cos_i) (written only when USE_NECC)
    N,
    D,
    eps,
    inv_n,  # 1 / N, the NECC of the use_necc=False ablation
    B_BUCKET,  # autotune key only
    N_BUCKET,  # autotune key only: N rounded up to a power of two (a new N in the bucket re-uses the tuning)
    USE_LENGTH: tl.constexpr,
    USE_NECC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tokens ``i ∈ n-block`` of image ``b`` (docs/methods.md §2), grid ``(B, cdiv(N, BLOCK_N))``:

        len_i  = |x_i|₂,  len~_i = |x̃_i|₂
        cos_i  = <x_i, x̃_i> / (max(len_i, ε) · max(len~_i, ε))
        e_i    = exp(cos_i)                                 (USE_NECC)
        out_i  = e_i · len~_i / max(len_i, ε)               (USE_NECC; e_i when USE_LENGTH is off)
        out_i  = 1/N · len~_i / max(len_i, ε)               (not USE_NECC: final)

    All sums are fp32, accumulated in ``(BLOCK_N, BLOCK_D)`` registers and
    reduced over D once at the end.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row = b * N * D + offs_n.to(tl.int64) * D
    acc_xx = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_tt = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_xt = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        offs = row[:, None] + offs_d[None, :]
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tv = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_xx += xv * xv
        acc_tt += tv * tv
        acc_xt += xv * tv
    len_x = tl.maximum(tl.sqrt(tl.sum(acc_xx, axis=1)), eps)
    len_t = tl.sqrt(tl.sum(acc_tt, axis=1))
    o_offs = b * N + offs_n
    if USE_NECC:
        cos = tl.sum(acc_xt, axis=1) / (len_x * tl.maximum(len_t, eps))
        val = tl.exp(cos)
        tl.store(e_ptr + o_offs, val, mask=mask_n)
    else:
        val = tl.zeros((BLOCK_N,), dtype=tl.float32) + inv_n
    if USE_LENGTH:
        val = val * (len_t / len_x)
    tl.store(out_ptr + o_offs, val, mask=mask_n)


@triton.jit
def _necc_normalize_kernel(
    e_ptr,  # (B, N) float32 exp(cos_i)
    out_ptr,  # (B, N) float32 unnormalised weights, divided in place
    N,
    BLOCK: tl.constexpr,
):
    """``out[b, block] /= Σ_k e[b, k]`` (the NECC softmax denominator), grid ``(B, cdiv(N, BLOCK))``.

    Every program sums the whole row of its image in the same fixed order
    (chunks of BLOCK, each reduced by ``tl.sum``), so all programs of an image
    divide by the same number and repeated runs give the same bits.
    """
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    chunk = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        chunk += tl.load(e_ptr + base + offs, mask=offs < N, other=0.0)
    inv_total = 1.0 / tl.sum(chunk, axis=0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < N
    val = tl.load(out_ptr + base + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + base + offs_n, val * inv_total, mask=mask_n)


def transform_weights(
    x: torch.Tensor,
    x_tilde: torch.Tensor,
    use_length: bool = True,
    use_necc: bool = True,
    eps: float = EPS,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Transformation weights ``w`` of docs/methods.md §2: two launches (one with ``use_necc=False``).

    Inputs are trusted (checked at the public entries, ``tokentm_fast.ops`` and
    ``torch.ops.tokentm.transform_weights``).

    Args:
        x: ``(B, N, D)`` tokens entering the sub-layer (float32 / bfloat16 / float16).
        x_tilde: ``(B, N, D)`` transformed tokens (same shape and device; dtype may differ from ``x``).
        use_length: False replaces the length ratio by 1 (ablation, TokenTM Table 6).
        use_necc: False replaces NECC by 1/N (ablation).
        eps: ε of the norm clamps.
        out: optional ``(B, N)`` float32 contiguous output, fully overwritten.

    Returns:
        ``(B, N)`` float32, equal to ``tokentm_fast.torch_ops.transform_weights.transform_weights``.
    """
    B, N, D = x.shape
    if out is None:
        out = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    x = contiguous(x)
    x_tilde = contiguous(x_tilde)
    exp_cos = torch.empty((B, N), dtype=torch.float32, device=x.device) if use_necc else out
    _transform_weights_kernel[lambda meta: (B, triton.cdiv(N, meta["BLOCK_N"]))](
        x, x_tilde, out, exp_cos, N, D, float(eps), 1.0 / N, batch_bucket(B), triton.next_power_of_2(N),
        USE_LENGTH=bool(use_length), USE_NECC=bool(use_necc),
    )
    if use_necc:
        block = NORM_BLOCK_INTERPRETER if interpreted(x.device) else NORM_BLOCK_GPU
        block = min(block, max(16, triton.next_power_of_2(N)))
        _necc_normalize_kernel[(B, triton.cdiv(N, block))](exp_cos, out, N, BLOCK=block, num_warps=4)
    return out
