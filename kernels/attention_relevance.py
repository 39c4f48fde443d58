"""The relevance pass through one attention (the LRP family on the flash path; docs/methods.md §6.3), as
two Triton programs beside the flash attention kernels, with no N×N tensor.

PyTorch twin (the contract, and the CPU / float64 path): ``tokentm_fast.torch_ops.attention_relevance``.
Per image b and head h, with the forward's ``O = P V``, its row log-sum-exp ℓ and the relevance ``R_O``
at O, the rules of ``lrp_rules.product`` applied to ``O = P V`` and to the logits ``Z = Q Kᵀ`` (the softmax
passes relevance on unchanged)::

    S_O    = R_O ⊘ O                                  (N, d)    elementwise, on load
    P_ij   = exp(scale · Z_ij − ℓ_i),   Z_ij = Q_i · K_j          recomputed tile by tile
    R^A_ij = P_ij (S_O,i · V_j) / 2                   tile      (the flash backward's P ⊙ dP, dO → S_O)
    S_Z,ij = R^A_ij ⊘ Z_ij                            tile
    R_V,j  = V_j ⊙ Σ_i P_ij S_O,i / 2                 key sum   (its dV)       } the key program
    R_K,j  = K_j ⊙ Σ_i S_Z,ij Q_i / 2                 key sum   (its dK)       } (a block of keys,
    t_j    = Σ_i row_i · max(R^A_ij · G_ij, 0)        key sum, G_ij = dO_i · V_j  } loop over queries)
             (``do`` given: transformer attribution; without ``do``: max(R^A_ij, 0), partial LRP)
    R_Q,i  = Q_i ⊙ Σ_j S_Z,ij K_j / 2                 query sum (its dQ): the query program

``⊘`` is Chefer et al.'s safe division ``a / (b + ε)``, ε = ``STABILISER`` (1e-9), 0 where b = 0 exactly, and
the denominator ε where ``b + ε`` rounds to 0 (``_safe_div``; IEEE-rounded division, as the twin's).

Tiles and products: the tiles of the attention backward (``kernels/attention.py``: the key program is its
dK/dV program, the query program its dQ program), ``(BLOCK_M, BLOCK_N)`` query × key tiles over a head
width padded to ``BLOCK_D`` (32, 64, 128; N and the head width masked). The rules divide by Z, so Z (and
P) is computed exactly as the inputs allow, never with TF32: IEEE float32 products for float32 inputs, the
16-bit operands' exact products with float32 sums for bfloat16 / float16 (their tensor-core product).
Every product with a relevance operand (S_O, S_Z, P as the weight of S_O) takes float32 operands (the
16-bit tile upcast, which is exact) and IEEE float32 products for every input dtype: S_O and S_Z are
ratios that span many orders of magnitude, and rounding them to 16 bits (or TF32) would cost 2⁻⁹ (2⁻¹¹)
of every term against the twin's float32 (issue 28). ∇A = dO Vᵀ (only inside ``max(·, 0)``) is formed
as the flash backward forms dP. Outputs are float32.

Launch configurations: ``CONFIG_TABLE``'s kinds ``"rel_kv"`` and ``"rel_q"`` in ``kernels/attention.py``
(at most 4 per (dtype class, BLOCK_D), chosen by the sm_90 compile audit, ``benchmarks/compile_audit.py``:
no spills), pruned by the attention kernels' hook, cached on disk on the same keys.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import STABILISER
from .attention import (
    _KEY,
    LOG2E,
    MAX_GRID_Y,
    _configs,
    _dot_flags,
    _image_head,
    _image_slices,
    _last_dim_contiguous,
    _mm,
    _pruner,
    _shape_args,
    _strides,
    _tile,
)

#: what the key program accumulates besides R_K and R_V (its ``ROW`` constexpr)
ROWS_NONE = 0  # nothing: lrp
ROWS_RELEVANCE = 1  # t_j = Σ_i row_i · max(R^A_ij, 0): partial LRP's row sum
ROWS_GRAD = 2  # t_j = Σ_i row_i · max(R^A_ij · ∇A_ij, 0), ∇A = dO Vᵀ: transformer attribution's row update

_LOG2E = tl.constexpr(LOG2E)
_STABILISER = tl.constexpr(STABILISER)
_ROWS_NONE = tl.constexpr(ROWS_NONE)
_ROWS_GRAD = tl.constexpr(ROWS_GRAD)


# --------------------------------------------------------------------------- tiles
@triton.jit
def _safe_div(a, b):
    """``a ⊘ b`` elementwise, float32::

        a / (b + ε)   where b ≠ 0 and b + ε ≠ 0
        a / ε         where b + ε == 0 (b = −ε)
        0             where b == 0

    ε = 1e-9 (``STABILISER``); the division rounded as IEEE's (``div_rn``), as torch's."""
    den = b + _STABILISER
    den = tl.where(den == 0.0, _STABILISER, den)
    return tl.where(b == 0.0, 0.0, tl.math.div_rn(a, den))


@triton.jit
def _scaled_output_tile(o_base, r_base, offs_m, so_n, sr_n, offs_d, mask):
    """``S_O,i = R_O,i ⊘ O_i`` for the rows ``offs_m`` (``(BLOCK_M, BLOCK_D)`` float32; 0 outside N and d)."""
    o = _tile(o_base, offs_m, so_n, offs_d, mask).to(tl.float32)
    r = _tile(r_base, offs_m, sr_n, offs_d, mask).to(tl.float32)
    return _safe_div(r, o)


@triton.jit
def _logits_probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``(Z, P)`` of one ``(BLOCK_M, BLOCK_N)`` tile::

        Z_ij = Q_i · K_j                       (IEEE float32 for float32 inputs; exact 16-bit products)
        P_ij = 2^(Z_ij · scale · log2 e − ℓ_i · log2 e) = exp(scale · Z_ij − ℓ_i),   0 outside N

    (``_probs_tile`` of the attention kernels, keeping Z: the rules divide by it). Z is 0 outside N."""
    z = _mm(q, tl.trans(k), IEEE, UPCAST)
    p = tl.exp2(z * qk_scale - lse2[:, None])
    return z, tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _attention_relevance_tile(s_o, v32, p):
    """``R^A_ij = P_ij (S_O,i · V_j) / 2`` of one tile (float32 operands, IEEE products)."""
    return p * _mm(s_o, tl.trans(v32), True, False) * 0.5


# --------------------------------------------------------------------------- the key program
@triton.autotune(configs=_configs("rel_kv"), key=_KEY + ["ROW"], prune_configs_by={"early_config_prune": _pruner("rel_kv")},
                 cache_results=True)
@triton.jit
def _relevance_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ro_ptr, lse_ptr, do_ptr, row_ptr,
    rk_ptr, rv_ptr, t_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sr_b, sr_h, sr_n, sd_b, sd_h, sd_n,
    sg_b, sg_h, sg_n,
    H, N_CTX, HEAD_D, qk_scale,  # qk_scale = scale · log2(e)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of keys j of one (image, head), looping over every query block i::

        S_O,i  = R_O,i ⊘ O_i                    Z, P of the tile (``_logits_probs_tile``)
        a_j   += Σ_i P_ijᵀ S_O,i                R^A = P ⊙ (S_O V_jᵀ) / 2
        S_Z    = R^A ⊘ Z                        c_j += Σ_i S_Z,ijᵀ Q_i
        t_j   += Σ_i row_i · max(R^A_ij · G_ij, 0),  G = dO_i V_jᵀ      (ROW = ROWS_GRAD)
        t_j   += Σ_i row_i · max(R^A_ij, 0)                             (ROW = ROWS_RELEVANCE)

    then ``R_V,j = V_j ⊙ a_j / 2`` and ``R_K,j = K_j ⊙ c_j / 2`` (float32, strides ``sg_*``) and ``t (B, H, N)``.
    """
    pid_n = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_CTX
    mask_d = offs_d < HEAD_D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = _tile(k_ptr + b * sk_b + h * sk_h, offs_n, sk_n, offs_d, kv_mask)
    v = _tile(v_ptr + b * sv_b + h * sv_h, offs_n, sv_n, offs_d, kv_mask)
    v32 = v.to(tl.float32)
    acc_v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    o_base = o_ptr + b * so_b + h * so_h
    r_base = ro_ptr + b * sr_b + h * sr_h
    do_base = do_ptr + b * sd_b + h * sd_h
    for m0 in range(0, N_CTX, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        qm = mask_m[:, None] & mask_d[None, :]
        q = _tile(q_base, offs_m, sq_n, offs_d, qm)
        lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
        s_o = _scaled_output_tile(o_base, r_base, offs_m, so_n, sr_n, offs_d, qm)
        z, p = _logits_probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE, UPCAST)
        acc_v += _mm(tl.trans(p), s_o, True, False)
        ra = _attention_relevance_tile(s_o, v32, p)
        if ROW != _ROWS_NONE:
            s_row = tl.load(row_ptr + b * N_CTX + offs_m, mask=mask_m, other=0.0)
            if ROW == _ROWS_GRAD:
                do = _tile(do_base, offs_m, sd_n, offs_d, qm)
                f = tl.maximum(ra * _mm(do, tl.trans(v), IEEE, UPCAST), 0.0)
            else:
                f = tl.maximum(ra, 0.0)
            t += tl.sum(s_row[:, None] * f, axis=0)
        s_z = _safe_div(ra, z)
        acc_k += _mm(tl.trans(s_z), q.to(tl.float32), True, False)
    out = offs_n[:, None] * sg_n + offs_d[None, :]
    tl.store(rk_ptr + b * sg_b + h * sg_h + out, acc_k * k.to(tl.float32) * 0.5, mask=kv_mask)
    tl.store(rv_ptr + b * sg_b + h * sg_h + out, acc_v * v32 * 0.5, mask=kv_mask)
    if ROW != _ROWS_NONE:
        tl.store(t_ptr + bh * N_CTX + offs_n, t, mask=mask_n)


# --------------------------------------------------------------------------- the query program
@triton.autotune(configs=_configs("rel_q"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("rel_q")},
                 cache_results=True)
@triton.jit
def _relevance_q_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ro_ptr, lse_ptr, rq_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sr_b, sr_h, sr_n, sg_b, sg_h, sg_n,
    H, N_CTX, HEAD_D, qk_scale,  # qk_scale = scale · log2(e)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of queries i of one (image, head), looping over every key block j::

        S_O,i = R_O,i ⊘ O_i  (once)        R^A = P ⊙ (S_O,i V_jᵀ) / 2,   S_Z = R^A ⊘ Z
        c_i  += Σ_j S_Z,ij K_j

    then ``R_Q,i = Q_i ⊙ c_i / 2`` (float32, strides ``sg_*``)."""
    pid_m = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_D
    qm = mask_m[:, None] & mask_d[None, :]
    q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_n, offs_d, qm)
    s_o = _scaled_output_tile(o_ptr + b * so_b + h * so_h, ro_ptr + b * sr_b + h * sr_h, offs_m, so_n, sr_n,
                              offs_d, qm)
    lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
    acc_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for n0 in range(0, N_CTX, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _tile(k_base, offs_n, sk_n, offs_d, kv_mask)
        v = _tile(v_base, offs_n, sv_n, offs_d, kv_mask)
        z, p = _logits_probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE, UPCAST)
        ra = _attention_relevance_tile(s_o, v.to(tl.float32), p)
        acc_q += _mm(_safe_div(ra, z), k.to(tl.float32), True, False)
    tl.store(rq_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :],
             acc_q * q.to(tl.float32) * 0.5, mask=qm)


# --------------------------------------------------------------------------- wrapper
def _row_mode(row: Optional[torch.Tensor], do: Optional[torch.Tensor]) -> int:
    """The key program's ``ROW`` code: no t without ``row``; with it, ∇A from ``do`` or R^A alone."""
    if row is None:
        return ROWS_NONE
    return ROWS_GRAD if do is not None else ROWS_RELEVANCE


def attention_relevance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, r_o: torch.Tensor,
    scale: float, row: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(R_Q, R_K, R_V, t)`` of one attention (module docstring): the twin's contract.

    Args (trusted: checked at the public entry, or built by the flash path):
        q, k, v, o: ``(B, H, N, d)`` as the flash forward had them (``o`` its output), d ≤ 128, one dtype
            (float32 / bfloat16 / float16), last dimension contiguous (any other strides).
        lse: ``(B, H, N)`` float32, the forward's row log-sum-exp ℓ.
        r_o: ``(B, H, N, d)`` float32, the relevance at ``o``.
        scale: the logits' factor (P = softmax(scale · Q Kᵀ)).
        row: ``(B, N)`` float32 weights of the query rows for ``t``, or None (no ``t``).
        do: ``(B, H, N, d)`` ∂s/∂O of the gradient backward (``t`` with ∇A = dO Vᵀ), or None.

    Returns:
        ``R_Q, R_K, R_V`` ``(B, H, N, d)`` float32 and ``t`` ``(B, H, N)`` float32 (None without ``row``).
        Two launches, no host synchronisation.
    """
    q, k, v, o, r_o = (_last_dim_contiguous(x) for x in (q, k, v, o, r_o))
    do = _last_dim_contiguous(do) if do is not None else None
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        def part(x, b0, b1):
            return None if x is None else x[b0:b1]
        parts = [attention_relevance(q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1], lse[b0:b1], r_o[b0:b1], scale,
                                     row=part(row, b0, b1), do=part(do, b0, b1))
                 for b0, b1 in _image_slices(*q.shape[:2])]
        return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts))
    b, h, n, d, block_d, bucket = _shape_args(q)
    flags = _dot_flags(q, ieee=True)  # Z never in TF32
    mode = _row_mode(row, do)
    lse = lse.contiguous()
    r_q, r_k, r_v = (torch.empty((b, h, n, d), dtype=torch.float32, device=q.device) for _ in range(3))
    t = torch.empty((b, h, n), dtype=torch.float32, device=q.device) if mode != ROWS_NONE else None
    row = row.to(torch.float32).contiguous() if mode != ROWS_NONE else lse  # lse: a float32 placeholder
    do = do if mode == ROWS_GRAD else q  # q: a placeholder in the model's dtype (the audit's pointer types)
    qk_scale = scale * LOG2E
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _relevance_kv_kernel[grid_n](
        q, k, v, o, r_o, lse, do, row, r_k, r_v, t if t is not None else lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(r_o), *_strides(do), *_strides(r_k),
        h, n, d, qk_scale, *bucket, BLOCK_D=block_d, ROW=mode, **flags,
    )
    grid_m = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
    _relevance_q_kernel[grid_m](
        q, k, v, o, r_o, lse, r_q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(r_o), *_strides(r_q),
        h, n, d, qk_scale, *bucket, BLOCK_D=block_d, **flags,
    )
    return r_q, r_k, r_v, t
