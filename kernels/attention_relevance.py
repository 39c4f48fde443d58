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

BEiT's relative position bias (``bias``, a ``RelativePositionBias``: the logits ``scale · (Z + B/scale)``; both
programs with ``HAS_BIAS``): P carries the bias tile read from the table (``attention._bias_tile``), and R^A is
split between Z and ``B' = B/scale`` by the add rule before the product rule, as the twin does::

    s_ij = R^A_ij ⊘ (Z_ij + B'_ij),    S_Z,ij = (c_b · Z_ij s_ij) ⊘ Z_ij

``c_b`` per image: 1 for ``rules="classic"``; for ``"ours"`` ``|a_b| / (|a_b| + |b_b|) · Σ R^A ⊘ a_b`` with
``a_b = Σ Z⊙s``, ``b_b = Σ B'⊙s`` over every head and tile, which a first program (``_relevance_sums_kernel``,
a key block per program, the key program's loop without its products over the query block) writes as partial
sums per key block; the wrapper adds them up and forms c on the device (no host synchronisation).

``⊘`` is Chefer et al.'s safe division ``a / (b + ε)``, ε = ``STABILISER`` (1e-9), 0 where b = 0 exactly, and
the denominator ε where ``b + ε`` rounds to 0 (``_safe_div``).

Tiles and products: the tiles of the attention backward (``kernels/attention.py``: the key program is its
dK/dV program, the query program its dQ program), ``(BLOCK_M, BLOCK_N)`` query × key tiles over a head
width padded to ``BLOCK_D`` (32, 64, 128; N and the head width masked). Every product is an IEEE float32
``tl.dot`` of float32 tiles (16-bit inputs upcast on load, which is exact), never TF32 whatever torch's
switch says: the rules divide by Z, and TF32 noise in Z alone moved R_q by 86 % in a trial (issue 28); S_O
and S_Z span many orders of magnitude, and rounding them to 16 bits or TF32 would cost 2⁻⁹ or 2⁻¹¹ of every
term against the twin's float32. For 16-bit inputs Z is thus the exact products summed in float32, as the
twin has it. Float32 products run on the FMA units, whose ``tl.dot`` holds both operands' rows over the
whole reduced dimension in every thread: the three products over the head width (Z = Q Kᵀ, S_O Vᵀ, dO Vᵀ)
are summed in slices of ``CHUNK`` columns loaded from memory (cache) in a loop (``_rows_dot``), and only
the accumulators live across the programs' loops; K, V (key program) and Q, S_O (query program) are loaded
again where needed. Outputs are float32.

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
    _bias_args,
    _bias_tile,
    _configs,
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
#: the rule sets of the logits' add rule with a bias (``lrp_rules.add``)
LOGIT_RULES = ("ours", "classic")
#: columns of the head width per slice of the products over it (``_rows_dot``)
CHUNK = 16
_CHUNK = tl.constexpr(CHUNK)


# --------------------------------------------------------------------------- tiles
@triton.jit
def _safe_div(a, b):
    """``a ⊘ b`` elementwise, float32::

        a / (b + ε)   where b ≠ 0 and b + ε ≠ 0
        a / ε         where b + ε == 0 (b = −ε)
        0             where b == 0

    ε = 1e-9 (``STABILISER``). The division is the GPU's full-range float32 division (``div.full.f32``,
    within 2 ulp), not IEEE-rounded ``div_rn``, whose slow path took registers enough to spill every tile."""
    den = b + _STABILISER
    den = tl.where(den == 0.0, _STABILISER, den)
    return tl.where(b == 0.0, 0.0, a / den)


@triton.jit
def _tile32(base, offs_r, stride_r, offs_d, mask):
    """``_tile`` (rows ``offs_r`` of one (image, head)'s ``(N, d)`` matrix, 0 outside) in float32 (exact for
    16-bit inputs)."""
    return _tile(base, offs_r, stride_r, offs_d, mask).to(tl.float32)


@triton.jit
def _dot32(a, b):
    """``a @ b`` of float32 tiles with IEEE float32 products and sums (never TF32)."""
    return _mm(a, b, True, False)


@triton.jit
def _scaled_output_tile(o_base, r_base, offs_m, so_n, sr_n, offs_d, mask):
    """``S_O,i = R_O,i ⊘ O_i`` for the rows ``offs_m`` and columns ``offs_d`` (float32; 0 outside ``mask``)."""
    return _safe_div(_tile32(r_base, offs_m, sr_n, offs_d, mask), _tile32(o_base, offs_m, so_n, offs_d, mask))


@triton.jit
def _rows_dot(a_base, sa_n, offs_a, mask_a, b_base, sb_n, offs_b, mask_b, HEAD_D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``A_a · B_b`` for the rows ``offs_a`` of A and ``offs_b`` of B (two ``(N, d)`` matrices of one (image, head)),
    a ``(BLOCK_A, BLOCK_B)`` float32 tile::

        Σ_c A[a, c] B[b, c] = Σ_slices A[a, slice] · B[b, slice]       (slices of ``CHUNK`` columns)

    The head width is summed in slices loaded from memory (cache) in a loop (not unrolled: the unrolled
    slices' loads were scheduled together and spilled), with IEEE float32 products: a whole-width float32
    ``tl.dot`` holds both operands' rows in every thread and spills at head width 128."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for c0 in range(0, BLOCK_D, _CHUNK):
        offs_c = c0 + tl.arange(0, _CHUNK)
        mask_c = offs_c < HEAD_D
        a = _tile32(a_base, offs_a, sa_n, offs_c, mask_a[:, None] & mask_c[None, :])
        b = _tile32(b_base, offs_b, sb_n, offs_c, mask_b[:, None] & mask_c[None, :])
        acc += _dot32(a, tl.trans(b))
    return acc


@triton.jit
def _scaled_rows_dot(o_base, so_n, r_base, sr_n, offs_m, mask_m, v_base, sv_n, offs_n, mask_n, HEAD_D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``S_O,i · V_j`` (``(BLOCK_M, BLOCK_N)`` float32), ``S_O = R_O ⊘ O`` formed slice by slice, as ``_rows_dot``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, BLOCK_D, _CHUNK):
        offs_c = c0 + tl.arange(0, _CHUNK)
        mask_c = offs_c < HEAD_D
        s_o = _scaled_output_tile(o_base, r_base, offs_m, so_n, sr_n, offs_c, mask_m[:, None] & mask_c[None, :])
        v = _tile32(v_base, offs_n, sv_n, offs_c, mask_n[:, None] & mask_c[None, :])
        acc += _dot32(s_o, tl.trans(v))
    return acc


@triton.jit
def _probs(z, lse2, mask_m, mask_n, qk_scale):
    """``P_ij = 2^(Z_ij · scale · log2 e − ℓ_i · log2 e) = exp(scale · Z_ij − ℓ_i)`` of one tile, 0 outside N
    (``_probs_tile`` of the attention kernels, from the Z the rules divide by)."""
    p = tl.exp2(z * qk_scale - lse2[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _biased_probs(z, bl2, lse2, mask_m, mask_n, qk_scale):
    """``P_ij = exp(scale · Z_ij + B_ij − ℓ_i)`` of one tile from Z and the bias tile ``bl2 = B · log2 e``."""
    p = tl.exp2(z * qk_scale + bl2 - lse2[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _logit_share(ra, z, bl2, qk_scale, c_b):
    """Z's share of R^A by the add rule between Z and ``B' = B / scale = bl2 / (scale · log2 e)``:
    ``c_b · Z ⊙ (R^A ⊘ (Z + B'))`` (the twin's order of operations)."""
    return _safe_div(ra, z + bl2 / qk_scale) * z * c_b


# --------------------------------------------------------------------------- the key program
@triton.autotune(configs=_configs("rel_kv"), key=_KEY + ["ROW", "HAS_BIAS"], prune_configs_by={"early_config_prune": _pruner("rel_kv")},
                 cache_results=True)
@triton.jit
def _relevance_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ro_ptr, lse_ptr, do_ptr, row_ptr,
    rk_ptr, rv_ptr, t_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sr_b, sr_h, sr_n, sd_b, sd_h, sd_n,
    sg_b, sg_h, sg_n,
    H, N_CTX, HEAD_D, qk_scale,  # qk_scale = scale · log2(e)
    bias_ptr, c_ptr, sb_r, sb_h, GH, GW, PREFIX,  # the bias (HAS_BIAS): table, per-image share c, grid, prefix
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of keys j of one (image, head), looping over every query block i::

        Z = Q_i K_jᵀ,  P = 2^(Z · scale · log2 e − ℓ_i log2 e)         S_O,i = R_O,i ⊘ O_i
        a_j += Σ_i P_ijᵀ S_O,i                   R^A = P ⊙ (S_O,i V_jᵀ) / 2
        c_j += Σ_i S_Z,ijᵀ Q_i,   S_Z = R^A ⊘ Z
        t_j += Σ_i row_i · max(R^A_ij · G_ij, 0),  G = dO_i V_jᵀ      (ROW = ROWS_GRAD)
        t_j += Σ_i row_i · max(R^A_ij, 0)                             (ROW = ROWS_RELEVANCE)

    then ``R_V,j = V_j ⊙ a_j / 2`` and ``R_K,j = K_j ⊙ c_j / 2`` (float32, strides ``sg_*``) and ``t (B, H, N)``.
    With a bias (HAS_BIAS) P carries it and S_Z is formed from Z's share of R^A (module docstring).
    Only a_j, c_j and t live across the loop; the products over the head width (Z, S_O Vᵀ, dO Vᵀ) take their
    operands slice by slice from memory (``_rows_dot``), the two over the query block whole tiles.
    """
    pid_n = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_CTX
    mask_d = offs_d < HEAD_D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    q_base = q_ptr + b * sq_b + h * sq_h
    o_base = o_ptr + b * so_b + h * so_h
    r_base = ro_ptr + b * sr_b + h * sr_h
    do_base = do_ptr + b * sd_b + h * sd_h
    acc_v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        c_b = tl.load(c_ptr + b)
    for m0 in range(0, N_CTX, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        qm = mask_m[:, None] & mask_d[None, :]
        lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
        z = _rows_dot(q_base, sq_n, offs_m, mask_m, k_base, sk_n, offs_n, mask_n, HEAD_D, BLOCK_M, BLOCK_N, BLOCK_D)
        if HAS_BIAS:
            bl2 = _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], GH, GW, PREFIX)
            p = _biased_probs(z, bl2, lse2, mask_m, mask_n, qk_scale)
        else:
            p = _probs(z, lse2, mask_m, mask_n, qk_scale)
        acc_v += _dot32(tl.trans(p), _scaled_output_tile(o_base, r_base, offs_m, so_n, sr_n, offs_d, qm))
        ra = p * _scaled_rows_dot(o_base, so_n, r_base, sr_n, offs_m, mask_m, v_base, sv_n, offs_n, mask_n, HEAD_D,
                                  BLOCK_M, BLOCK_N, BLOCK_D) * 0.5
        if ROW != _ROWS_NONE:
            s_row = tl.load(row_ptr + b * N_CTX + offs_m, mask=mask_m, other=0.0)
            if ROW == _ROWS_GRAD:
                g = _rows_dot(do_base, sd_n, offs_m, mask_m, v_base, sv_n, offs_n, mask_n, HEAD_D,
                              BLOCK_M, BLOCK_N, BLOCK_D)
                f = tl.maximum(ra * g, 0.0)
            else:
                f = tl.maximum(ra, 0.0)
            t += tl.sum(s_row[:, None] * f, axis=0)
        if HAS_BIAS:
            ra = _logit_share(ra, z, bl2, qk_scale, c_b)
        acc_k += _dot32(tl.trans(_safe_div(ra, z)), _tile32(q_base, offs_m, sq_n, offs_d, qm))
    out = offs_n[:, None] * sg_n + offs_d[None, :]
    tl.store(rk_ptr + b * sg_b + h * sg_h + out, acc_k * _tile32(k_base, offs_n, sk_n, offs_d, kv_mask) * 0.5,
             mask=kv_mask)
    tl.store(rv_ptr + b * sg_b + h * sg_h + out, acc_v * _tile32(v_base, offs_n, sv_n, offs_d, kv_mask) * 0.5,
             mask=kv_mask)
    if ROW != _ROWS_NONE:
        tl.store(t_ptr + bh * N_CTX + offs_n, t, mask=mask_n)


# --------------------------------------------------------------------------- the query program
@triton.autotune(configs=_configs("rel_q"), key=_KEY + ["HAS_BIAS"], prune_configs_by={"early_config_prune": _pruner("rel_q")},
                 cache_results=True)
@triton.jit
def _relevance_q_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ro_ptr, lse_ptr, rq_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sr_b, sr_h, sr_n, sg_b, sg_h, sg_n,
    H, N_CTX, HEAD_D, qk_scale,  # qk_scale = scale · log2(e)
    bias_ptr, c_ptr, sb_r, sb_h, GH, GW, PREFIX,  # the bias (HAS_BIAS): table, per-image share c, grid, prefix
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of queries i of one (image, head), looping over every key block j::

        Z = Q_i K_jᵀ,  P as in the key program,   R^A = P ⊙ (S_O,i V_jᵀ) / 2,   S_Z = R^A ⊘ Z
        c_i += Σ_j S_Z,ij K_j

    then ``R_Q,i = Q_i ⊙ c_i / 2`` (float32, strides ``sg_*``). Only c_i and ℓ_i live across the loop. With a
    bias (HAS_BIAS) P carries it and S_Z is formed from Z's share of R^A, as in the key program."""
    pid_m = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_D
    qm = mask_m[:, None] & mask_d[None, :]
    q_base = q_ptr + b * sq_b + h * sq_h
    o_base = o_ptr + b * so_b + h * so_h
    r_base = ro_ptr + b * sr_b + h * sr_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
    acc_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        c_b = tl.load(c_ptr + b)
    for n0 in range(0, N_CTX, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        z = _rows_dot(q_base, sq_n, offs_m, mask_m, k_base, sk_n, offs_n, mask_n, HEAD_D, BLOCK_M, BLOCK_N, BLOCK_D)
        if HAS_BIAS:
            bl2 = _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], GH, GW, PREFIX)
            p = _biased_probs(z, bl2, lse2, mask_m, mask_n, qk_scale)
        else:
            p = _probs(z, lse2, mask_m, mask_n, qk_scale)
        ra = p * _scaled_rows_dot(o_base, so_n, r_base, sr_n, offs_m, mask_m, v_base, sv_n, offs_n, mask_n, HEAD_D,
                                  BLOCK_M, BLOCK_N, BLOCK_D) * 0.5
        if HAS_BIAS:
            ra = _logit_share(ra, z, bl2, qk_scale, c_b)
        acc_q += _dot32(_safe_div(ra, z), _tile32(k_base, offs_n, sk_n, offs_d, mask_n[:, None] & mask_d[None, :]))
    tl.store(rq_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :],
             acc_q * _tile32(q_base, offs_m, sq_n, offs_d, qm) * 0.5, mask=qm)


# --------------------------------------------------------------------------- the add rule's per-image sums
#: the narrowest key block of the "rel_kv" configurations: the sums program's partial-sum slots per (image, head)
SUMS_MIN_BLOCK = 16


@triton.autotune(configs=_configs("rel_kv"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("rel_kv")},
                 cache_results=True)
@triton.jit
def _relevance_sums_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ro_ptr, lse_ptr, sums_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sr_b, sr_h, sr_n,
    H, N_CTX, HEAD_D, qk_scale, SLOTS, PLANE,  # SLOTS: partial sums per (image, head); PLANE = B·H·SLOTS
    bias_ptr, sb_r, sb_h, GH, GW, PREFIX,
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The ``"ours"`` add rule's sums over one block of keys j of one (image, head), looping over every query
    block i (the key program's tiles)::

        s = R^A ⊘ (Z + B'),   Σ Z ⊙ s,   Σ B' ⊙ s,   Σ R^A          (B' = B / scale)

    written to ``sums[k, b·H + h, pid]`` (k = 0, 1, 2; ``SLOTS`` ≥ the number of key blocks; the wrapper adds
    the slots up)."""
    pid_n = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_CTX
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    q_base = q_ptr + b * sq_b + h * sq_h
    o_base = o_ptr + b * so_b + h * so_h
    r_base = ro_ptr + b * sr_b + h * sr_h
    sum_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, N_CTX, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
        z = _rows_dot(q_base, sq_n, offs_m, mask_m, k_base, sk_n, offs_n, mask_n, HEAD_D, BLOCK_M, BLOCK_N, BLOCK_D)
        bl2 = _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], GH, GW, PREFIX)
        p = _biased_probs(z, bl2, lse2, mask_m, mask_n, qk_scale)
        ra = p * _scaled_rows_dot(o_base, so_n, r_base, sr_n, offs_m, mask_m, v_base, sv_n, offs_n, mask_n, HEAD_D,
                                  BLOCK_M, BLOCK_N, BLOCK_D) * 0.5
        b_s = bl2 / qk_scale
        s = _safe_div(ra, z + b_s)
        sum_a += tl.sum(z * s, axis=0)
        sum_b += tl.sum(b_s * s, axis=0)
        sum_r += tl.sum(ra, axis=0)
    slot = sums_ptr + bh * SLOTS + pid_n
    tl.store(slot, tl.sum(sum_a, axis=0))
    tl.store(slot + PLANE, tl.sum(sum_b, axis=0))
    tl.store(slot + 2 * PLANE, tl.sum(sum_r, axis=0))


def _safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``lrp_rules.safe_divide`` on the device: ``a / (b + ε)``, ε where that denominator is 0, 0 where b = 0."""
    den = b + STABILISER
    den = torch.where(den == 0, torch.full_like(den, STABILISER), den)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def _shares(q, k, v, o, r_o, lse, scale: float, bias, rules: str, bias_args: tuple) -> torch.Tensor:
    """``c (B,)`` float32: Z's per-image factor of the add rule (module docstring), 1 for ``"classic"``."""
    b, h, n, d, block_d, bucket = _shape_args(q)
    if rules == "classic":
        return torch.ones(b, dtype=torch.float32, device=q.device)
    (table, *sb), layout = bias_args
    slots = triton.cdiv(triton.cdiv(n, SUMS_MIN_BLOCK), 16) * 16  # a multiple of 16: one specialisation for every N
    sums = torch.zeros((3, b * h, slots), dtype=torch.float32, device=q.device)
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _relevance_sums_kernel[grid_n](
        q, k, v, o, r_o, lse, sums,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(r_o),
        h, n, d, scale * LOG2E, slots, b * h * slots, table, *sb, *layout, *bucket, BLOCK_D=block_d,
    )
    sa, sb_, total = sums.view(3, b, h * slots).sum(-1)
    fa = _safe_divide(sa.abs(), sa.abs() + sb_.abs()) * total
    return _safe_divide(fa, sa)


# --------------------------------------------------------------------------- wrapper
def _row_mode(row: Optional[torch.Tensor], do: Optional[torch.Tensor]) -> int:
    """The key program's ``ROW`` code: no t without ``row``; with it, ∇A from ``do`` or R^A alone."""
    if row is None:
        return ROWS_NONE
    return ROWS_GRAD if do is not None else ROWS_RELEVANCE


def attention_relevance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, r_o: torch.Tensor,
    scale: float, row: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, bias=None,
    rules: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(R_Q, R_K, R_V, t)`` of one attention (module docstring): the twin's contract, without a bias.

    Args (trusted: checked at the public entry, or built by the flash path):
        q, k, v, o: ``(B, H, N, d)`` as the flash forward had them (``o`` its output), d ≤ 128, one dtype
            (float32 / bfloat16 / float16), last dimension contiguous (any other strides).
        lse: ``(B, H, N)`` float32, the forward's row log-sum-exp ℓ.
        r_o: ``(B, H, N, d)`` float32, the relevance at ``o``.
        scale: the logits' factor (P = softmax(scale · Q Kᵀ)).
        row: ``(B, N)`` float32 weights of the query rows for ``t``, or None (no ``t``).
        do: ``(B, H, N, d)`` ∂s/∂O of the gradient backward (``t`` with ∇A = dO Vᵀ), or None.
        bias: the forward's bias of the logits in table form (``RelativePositionBias``, BEiT), or None.
        rules: with a bias, the add rule's rule set between Z and B/scale, ``"ours"`` or ``"classic"``.

    Returns:
        ``R_Q, R_K, R_V`` ``(B, H, N, d)`` float32 and ``t`` ``(B, H, N)`` float32 (None without ``row``).
        Two launches (three with a bias and ``"ours"``: the per-image sums first), no host synchronisation.
    """
    if bias is not None and rules not in LOGIT_RULES:
        raise ValueError(f"the relevance through a bias of the logits needs the rule set, one of {LOGIT_RULES}; "
                         f"got {rules!r}")
    q, k, v, o, r_o = (_last_dim_contiguous(x) for x in (q, k, v, o, r_o))
    do = _last_dim_contiguous(do) if do is not None else None
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        def part(x, b0, b1):
            return None if x is None else x[b0:b1]
        parts = [attention_relevance(q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1], lse[b0:b1], r_o[b0:b1], scale,
                                     row=part(row, b0, b1), do=part(do, b0, b1), bias=bias, rules=rules)
                 for b0, b1 in _image_slices(*q.shape[:2])]
        return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts))
    b, h, n, d, block_d, bucket = _shape_args(q)
    mode = _row_mode(row, do)
    lse = lse.contiguous()
    r_q, r_k, r_v = (torch.empty((b, h, n, d), dtype=torch.float32, device=q.device) for _ in range(3))
    t = torch.empty((b, h, n), dtype=torch.float32, device=q.device) if mode != ROWS_NONE else None
    row = row.to(torch.float32).contiguous() if mode != ROWS_NONE else lse  # lse: a float32 placeholder
    do = do if mode == ROWS_GRAD else q  # q: a placeholder in the model's dtype (the audit's pointer types)
    qk_scale = scale * LOG2E
    (table, *sb), layout, has_bias = _bias_args(bias, lse)
    c = _shares(q, k, v, o, r_o, lse, scale, bias, rules, ((table, *sb), layout)) if has_bias else lse
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _relevance_kv_kernel[grid_n](
        q, k, v, o, r_o, lse, do, row, r_k, r_v, t if t is not None else lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(r_o), *_strides(do), *_strides(r_k),
        h, n, d, qk_scale, table, c, *sb, *layout, *bucket, BLOCK_D=block_d, ROW=mode, HAS_BIAS=has_bias,
    )
    grid_m = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
    _relevance_q_kernel[grid_m](
        q, k, v, o, r_o, lse, r_q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(r_o), *_strides(r_q),
        h, n, d, qk_scale, table, c, *sb, *layout, *bucket, BLOCK_D=block_d, HAS_BIAS=has_bias,
    )
    return r_q, r_k, r_v, t
