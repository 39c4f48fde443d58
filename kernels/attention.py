"""The explanation attention: a FlashAttention-2 style kernel family whose backward
also computes what the explanation methods read from Aˡ and Gˡ, with no N×N tensor.

PyTorch equivalents (oracles, full matrices; tests/attention_torch.py): ``attention_forward_torch``,
``attention_backward_torch`` and ``attention_rows_torch``. ``triton_attention()`` (at the end
of this module) gives them as the attention triple (``AttentionKernels``) that the flash path's autograd
Functions (``tokentm_fast.paths``) launch in a model.

Notation per image b and head h (d = head width, ``scale`` = the model's softmax scale)::

    S = scale · Q Kᵀ            ℓ[i] = log Σ_j exp(S[i, j])        P = exp(S − ℓ)   (= Aˡ_h)
    O = P V                     dP = dO Vᵀ  (= Gˡ_h = ∂s/∂P)       δ[i] = ⟨dO[i], O[i]⟩
    dS = P ⊙ (dP − δ)           dQ = scale · dS K                  dK = scale · dSᵀ Q      dV = Pᵀ dO

- ``flash_forward``   saves O and ℓ (program: a block of queries, loop over keys, online softmax);
- ``flash_backward``  recomputes P and dP tile by tile: the dK/dV program owns a block of keys and
  loops over all queries, which is exactly the loop of the row algorithm, so it also accumulates
  the TokenTM / GAE column sums ``t_h[j] = Σ_i s[i] · max(P[i, j] · dP[i, j], 0)`` for a given row
  ``s (B, N)``; a second program family computes dQ (a block of queries, loop over keys). With
  ``input_grads="v"`` only dV = Pᵀ dO is computed (the attention probabilities held constant, as
  conservative LRP's backward needs them: docs/methods.md §6.2): no δ, no dP / dS, no dQ program;
- ``attention_rows``  column sums of a row vector against P or max(dP, 0), recomputed from Q, K
  (and dO, V): ``Σ_i r[i] · P[i, j]`` (rollout) or ``Σ_i r[i] · max(dP[i, j], 0)`` (LeGrad).

An additive bias of the logits (BEiT's relative position bias; ``HAS_BIAS``): ``S = scale · Q Kᵀ + B`` with
``B[h, i, j] = table[idx(i, j), h]`` read from the ``(R, H)`` table inside each tile (``_bias_tile``: the index
from the tile's row and column offsets by the relative position on the ``(GH, GW)`` grid, the class-token
entries ``R − 3`` / ``R − 2`` / ``R − 1`` for the ``PREFIX`` rows / columns; one gather per tile, never an N×N
tensor; ``tokentm_fast.models.relative_bias`` writes the rule out). Every program that forms P adds it: the
forward, the dK/dV and dQ programs, ``attention_rows`` on P; the wrappers take ``bias`` (a
``RelativePositionBias``: ``table``, ``grid``, ``prefix``) or None.

Tiles are loaded with the tensors' own strides (the last dimension must be contiguous), tails of
N and of the head width are masked, inputs are float32 / bfloat16 / float16 and every sum is float32.
Products use ``tl.dot``. Float32 rule: TF32 tensor-core products only where torch's own switch
allows them for float32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` /
``torch.set_float32_matmul_precision("high")`` / ``torch.backends.cuda.matmul.fp32_precision = "tf32"``;
off by default, see ``kernels._utils.tf32_allowed``), full float32 otherwise: the callers pass
``ieee=not allowed`` and ``_dot_flags`` turns that into the ``IEEE`` constexpr (``input_precision="ieee"``)
for float32 inputs; bfloat16 / float16 tiles always use the tensor cores. (``matrix_update`` follows
the same rule through its ``allow_tf32`` argument.)

Launch configurations: an explicit table (``CONFIG_TABLE``) per kernel kind, dtype class (16-bit,
float32) and ``BLOCK_D`` (the head width padded to a power of two), at most 4 entries each (2–3: a
first call benchmarks few), chosen from the sm_90 compile audit (``benchmarks/compile_audit.py``,
results in ``benchmarks/results/compile-sm90/``): no entry spills registers or exceeds shared memory
on an H100; float32 gets smaller tiles and one stage, save the 128-wide backward's 16×16 tile over 2 stages. The autotuners' pruning hook picks the entries
of the call's class; tuning results are cached on disk (Triton's ``cache_results``, in Triton's cache
dir) and keyed on a power-of-two bucket of N, so a second process or a nearby sequence length
benchmarks nothing. The grid's second axis (images x heads) is kept <= 65535 by launching slices of
at most ``MAX_GRID_Y // H`` images.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ._utils import MAX_HEAD_DIM, AttentionKernels, interpreter_enabled, tf32_allowed, tuning_configs

#: log2(e): the kernels work in log2 units (``exp2``), the wrappers pass ``scale · LOG2E``
LOG2E = 1.4426950408889634

#: accumulator codes of the dK/dV program
ACC_NONE = 0  # plain attention backward
ACC_GAE = 1  # t_h[j] += Σ_i s[i] · max(P ⊙ dP, 0)

#: input-gradient codes of the dK/dV program
GRADS_NONE = 0  # no input gradients (the lowest explained layer: t alone)
GRADS_V = 1  # dV = Pᵀ dO alone (P held constant: no dP, no dS)
GRADS_KV = 2  # dK and dV (with the dQ program: the full backward)

#: what ``attention_rows`` sums
ROWS_PROBS = 0  # Σ_i r[i] · P[i, j]
ROWS_RELU_GRAD = 1  # Σ_i r[i] · max(dP[i, j], 0)

# The constants above as Triton constants, for the kernels (jit code reads only ``tl.constexpr``
# globals); the wrappers pass the plain numbers.
_LOG2E = tl.constexpr(LOG2E)
_ACC_GAE = tl.constexpr(ACC_GAE)
_GRADS_NONE = tl.constexpr(GRADS_NONE)
_GRADS_KV = tl.constexpr(GRADS_KV)
_ROWS_PROBS = tl.constexpr(ROWS_PROBS)


#: (kind, dtype class, BLOCK_D) -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)], from the sm_90 audit.
#: kind: "fwd" (forward), "bwd" (dK/dV and attention_rows: a key block per program), "dq", and the relevance
#: programs' "rel_kv" / "rel_q" (kernels/attention_relevance.py).
#: Issue 25: entries that spilled once compiled as real launches specialise them (HEAD_D a multiple of 16 with
#: N not, or a head width that is not) were replaced by their nearest clean neighbour: 16-bit bwd/128 one
#: stage; float32 bwd/32 16×32, bwd/64 4 warps, bwd/128 4 warps (16×16 with 2 stages), dq/128 16×32.
CONFIG_TABLE = {
    ("fwd", "16", 32): [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 3)],
    ("fwd", "16", 64): [(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
    ("fwd", "16", 128): [(64, 64, 4, 2), (64, 32, 4, 2)],
    ("bwd", "16", 32): [(64, 64, 4, 2), (32, 64, 4, 2)],
    ("bwd", "16", 64): [(64, 64, 4, 2), (32, 64, 4, 2)],
    ("bwd", "16", 128): [(32, 32, 4, 1), (64, 32, 4, 1)],
    ("dq", "16", 32): [(64, 64, 4, 2), (64, 32, 4, 2)],
    ("dq", "16", 64): [(64, 64, 4, 2), (64, 32, 4, 2)],
    ("dq", "16", 128): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("fwd", "32", 32): [(32, 32, 4, 1), (64, 32, 4, 1)],
    ("fwd", "32", 64): [(32, 32, 4, 1), (64, 32, 8, 1)],
    ("fwd", "32", 128): [(16, 16, 4, 1), (32, 16, 8, 1)],
    ("bwd", "32", 32): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("bwd", "32", 64): [(16, 32, 4, 1), (32, 32, 4, 1)],
    ("bwd", "32", 128): [(16, 16, 4, 2), (32, 16, 4, 1)],
    ("dq", "32", 32): [(32, 32, 8, 1), (64, 32, 4, 1)],
    ("dq", "32", 64): [(32, 16, 4, 1), (32, 32, 8, 1)],
    ("dq", "32", 128): [(16, 32, 4, 1), (32, 16, 8, 1)],
    # the relevance programs (kernels/attention_relevance.py): "rel_kv" a key block per program (as "bwd"),
    # "rel_q" a query block (as "dq"). Every product is IEEE float32 on the FMA units for every dtype, so the
    # 16-bit and float32 entries are alike: small tiles, 8 warps where 4 spill (sm_90 audit, issue 28)
    ("rel_kv", "16", 32): [(32, 16, 8, 1), (16, 32, 4, 1)],
    ("rel_kv", "16", 64): [(16, 16, 8, 1), (32, 16, 8, 1)],
    ("rel_kv", "16", 128): [(16, 16, 8, 1)],
    ("rel_q", "16", 32): [(32, 32, 8, 1), (16, 32, 8, 1)],
    ("rel_q", "16", 64): [(32, 32, 8, 1), (32, 16, 8, 1)],
    ("rel_q", "16", 128): [(32, 32, 8, 1), (16, 32, 8, 1)],
    ("rel_kv", "32", 32): [(16, 16, 4, 1), (32, 16, 8, 1)],
    ("rel_kv", "32", 64): [(16, 16, 8, 1), (16, 32, 8, 1)],
    ("rel_kv", "32", 128): [(16, 16, 8, 1), (16, 16, 4, 1)],
    ("rel_q", "32", 32): [(32, 16, 8, 1), (16, 32, 8, 1)],
    ("rel_q", "32", 64): [(32, 32, 8, 1), (32, 16, 8, 1)],
    ("rel_q", "32", 128): [(32, 32, 8, 1), (16, 32, 8, 1)],
}
#: BEiT's bias read inside the tiles (HAS_BIAS: an index tile and a gather per tile) costs registers: the entries of
#: ``CONFIG_TABLE`` whose biased programs spilled in the sm_90 audit (issue 29 item 2), left out for them (kind
#: "<kind>+bias" in ``table_configs``: the same entries less these; every class keeps a clean one)
BIAS_SPILLS = {
    ("fwd", "16", 32): [(128, 64, 4, 3)],
    ("fwd", "16", 128): [(64, 64, 4, 2)],
    ("bwd", "16", 32): [(64, 64, 4, 2)],
    ("bwd", "16", 64): [(64, 64, 4, 2)],
    ("bwd", "16", 128): [(64, 32, 4, 1)],
    ("bwd", "32", 128): [(32, 16, 4, 1)],
    ("dq", "16", 128): [(64, 32, 4, 2)],
    ("dq", "32", 64): [(32, 16, 4, 1)],
    ("rel_kv", "16", 32): [(16, 32, 4, 1)],
    ("rel_kv", "32", 32): [(16, 16, 4, 1)],
    ("rel_q", "32", 64): [(32, 16, 8, 1)],
}
#: the largest second grid axis CUDA accepts
MAX_GRID_Y = 65535


def _dtype_class(dtype) -> str:
    return "32" if str(dtype) in ("torch.float32", "fp32") else "16"


def table_configs(kind: str, dtype, block_d: int):
    """``[(BLOCK_M, BLOCK_N, num_warps, num_stages)]`` the autotuner may choose for a call of this
    class (``dtype``: a torch dtype or "bf16" / "fp16" / "fp32"; ``block_d``: 32, 64 or 128); ``kind`` with
    the suffix "+bias": a launch with BEiT's bias (``BIAS_SPILLS`` left out)."""
    base = kind[:-5] if kind.endswith("+bias") else kind
    key = (base, _dtype_class(dtype), min(max(block_d, 32), MAX_HEAD_DIM))
    dropped = BIAS_SPILLS.get(key, ()) if base != kind else ()
    return [e for e in CONFIG_TABLE[key] if e not in dropped]


#: the interpreter pays per operation: one big tile, nothing to tune
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def _configs(kind: str):
    """Every table entry of ``kind`` (each once) on the GPU; ``INTERPRETER_CONFIG`` under the interpreter."""
    seen = {}
    for (k, _, _), entries in CONFIG_TABLE.items():
        if k == kind:
            for m, n, w, st in entries:
                seen.setdefault((m, n, w, st), triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st))
    return tuning_configs(list(seen.values()), INTERPRETER_CONFIG)


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        """Keep the table's entries for the call's (dtype class, BLOCK_D; with a bias: less ``BIAS_SPILLS``)."""
        if interpreter_enabled():
            return configs
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        ref = named_args.get("q_ptr", named_args.get("do_ptr"))
        bias = kwargs.get("HAS_BIAS", named_args.get("HAS_BIAS", False))
        wanted = set(table_configs(kind + "+bias" if bias else kind, ref.dtype, d))
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return kept or configs[:1]
    return prune


_FWD_CONFIGS = _configs("fwd")
_BWD_CONFIGS = _configs("bwd")
_DQ_CONFIGS = _configs("dq")
#: autotune key: N bucketed to a power of two (a new sequence length in the bucket re-uses the tuning)
_KEY = ["N_BUCKET", "BLOCK_D", "BH_BUCKET"]


# --------------------------------------------------------------------------- forward
@triton.jit
def _image_head(H):
    """``(b·H + h, b, h)`` of the program's (image, head), as int64 for the offsets."""
    bh = tl.program_id(1).to(tl.int64)
    return bh, bh // H, bh % H


@triton.jit
def _tile(base, offs_r, stride_r, offs_d, mask):
    """Rows ``offs_r`` (all ``BLOCK_D`` columns) of one (image, head)'s ``(N, d)`` matrix at ``base``; 0 outside."""
    return tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask, GH, GW, PREFIX):
    """``B[h, i, j] · log2(e)`` ``(BLOCK_M, BLOCK_N)`` float32 for the rows ``offs_m`` and columns ``offs_n``,
    gathered from the ``(R, H)`` table at ``bias_ptr`` (strides ``sb_r``, ``sb_h``) by the relative position on
    the ``(GH, GW)`` grid (patch p = token − PREFIX at (p // GW, p % GW)); 0 outside ``mask``::

        idx = (yi − yj + GH − 1)·(2GW − 1) + (xi − xj + GW − 1);  R − 3 (i < PREFIX ≤ j), R − 2 (j < PREFIX ≤ i),
        R − 1 (both < PREFIX),  R = (2GH − 1)(2GW − 1) + 3
    """
    wide = 2 * GW - 1
    r = (2 * GH - 1) * wide + 3
    pi = tl.maximum(offs_m - PREFIX, 0)
    pj = tl.maximum(offs_n - PREFIX, 0)
    idx = ((pi // GW)[:, None] - (pj // GW)[None, :] + GH - 1) * wide + ((pi % GW)[:, None] - (pj % GW)[None, :] + GW - 1)
    qi = (offs_m < PREFIX)[:, None]
    kj = (offs_n < PREFIX)[None, :]
    idx = tl.where(qi & (offs_n >= PREFIX)[None, :], r - 3, idx)
    idx = tl.where((offs_m >= PREFIX)[:, None] & kj, r - 2, idx)
    idx = tl.where(qi & kj, r - 1, idx)
    b = tl.load(bias_ptr + idx.to(tl.int64) * sb_r + h * sb_h, mask=mask, other=0.0)
    return b.to(tl.float32) * _LOG2E


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with a float32 accumulator. IEEE: full float32 products (no tf32); UPCAST: cast
    the operands to float32 first (Triton's interpreter cannot multiply bfloat16 tiles)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")},
                 cache_results=True)
@triton.jit
def _flash_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sb_r, sb_h,
    H, N_CTX, HEAD_D, qk_scale,  # qk_scale = scale · log2(e)
    GH, GW, PREFIX,  # the bias's grid and prefix (HAS_BIAS)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O and ℓ for a block of queries of one (image, head), online softmax over key blocks (S + B with a bias):

        m_i ← max(m_i, max_j S_ij);   l_i ← l_i · 2^(m_old − m_i) + Σ_j 2^(S_ij − m_i)
        acc_i ← acc_i · 2^(m_old − m_i) + Σ_j 2^(S_ij − m_i) v_j
        O_i = acc_i / l_i,   ℓ_i = (m_i + log2 l_i) · ln 2          (S in log2 units)
    """
    pid_m = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_D
    q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_n, offs_d, mask_m[:, None] & mask_d[None, :])
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N_CTX, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _tile(k_base, offs_n, sk_n, offs_d, kv_mask)
        v = _tile(v_base, offs_n, sv_n, offs_d, kv_mask)
        s = _mm(q, tl.trans(k), IEEE, UPCAST) * qk_scale
        if HAS_BIAS:
            s += _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], GH, GW, PREFIX)
        s = tl.where(mask_n[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(l_i)) / _LOG2E
    tl.store(lse_ptr + bh * N_CTX + offs_m, lse, mask=mask_m)


# --------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_n, sd_b, sd_h, sd_n, H, N_CTX, HEAD_D,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """δ[i] = ⟨dO[i], O[i]⟩ in float32, for a block of rows of one (image, head)."""
    pid_m = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_CTX) & (offs_d[None, :] < HEAD_D)
    o = _tile(o_ptr + b * so_b + h * so_h, offs_m, so_n, offs_d, mask)
    do = _tile(do_ptr + b * sd_b + h * sd_h, offs_m, sd_n, offs_d, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh * N_CTX + offs_m, delta, mask=offs_m < N_CTX)


@triton.jit
def _probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                bias_ptr, sb_r, sb_h, h, offs_m, offs_n, GH, GW, PREFIX, HAS_BIAS: tl.constexpr):
    """P[i, j] of one (BLOCK_M, BLOCK_N) tile from Q_i, K_j, ℓ_i (log2 units) and, with a bias, its tile
    (``_bias_tile``); 0 outside N."""
    s = _mm(q, tl.trans(k), IEEE, UPCAST)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        p = tl.exp2(s * qk_scale + _bias_tile(bias_ptr, sb_r, sb_h, h, offs_m, offs_n, mask, GH, GW, PREFIX)
                    - lse2[:, None])
    else:
        p = tl.exp2(s * qk_scale - lse2[:, None])
    return tl.where(mask, p, 0.0)


@triton.jit
def _grad_probs_tile(do, v, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """dP[i, j] = ⟨dO[i], V[j]⟩ of one tile (= ∂s/∂P: the attention gradient Gˡ_h)."""
    return _mm(do, tl.trans(v), IEEE, UPCAST)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["ACC", "GRADS", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _pruner("bwd")}, cache_results=True)
@triton.jit
def _flash_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, row_ptr,
    dk_ptr, dv_ptr, t_ptr, bias_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, sg_b, sg_h, sg_n, sb_r, sb_h,
    H, N_CTX, HEAD_D, scale, qk_scale,
    GH, GW, PREFIX,  # the bias's grid and prefix (HAS_BIAS)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, GRADS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of keys j of one (image, head), looping over every query block i:

        dV_j = Σ_i P_ijᵀ dO_i            dK_j = scale · Σ_i (P ⊙ (dP − δ))_ijᵀ Q_i
        t_h[j] = Σ_i s[i] · max(P_ij · dP_ij, 0)        (ACC = ACC_GAE; s = the row of docs/methods.md §3.1)

    The input gradients (GRADS) and t (ACC) are independent switches: the lowest layer of an
    explanation needs only t (GRADS_NONE), a plain backward only dK/dV (GRADS_KV), a backward with the
    attention probabilities held constant only dV (GRADS_V: dP is then formed only for t, δ and dS
    never). ``t`` is written per head, ``(B, H, N)``; dK and dV share the strides ``sg_*``.
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
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sd_b + h * sd_h
    for m0 in range(0, N_CTX, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        qm = mask_m[:, None] & mask_d[None, :]
        q = _tile(q_base, offs_m, sq_n, offs_d, qm)
        lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
        p = _probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE, UPCAST,
                        bias_ptr, sb_r, sb_h, h, offs_m, offs_n, GH, GW, PREFIX, HAS_BIAS)
        do = _tile(do_base, offs_m, sd_n, offs_d, qm)
        if ACC == _ACC_GAE or GRADS == _GRADS_KV:
            dp = _grad_probs_tile(do, v, IEEE, UPCAST)
        if ACC == _ACC_GAE:
            s_row = tl.load(row_ptr + b * N_CTX + offs_m, mask=mask_m, other=0.0)
            t += tl.sum(s_row[:, None] * tl.maximum(p * dp, 0.0), axis=0)
        if GRADS == _GRADS_KV:
            delta = tl.load(delta_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0)
            ds = p * (dp - delta[:, None])
        if GRADS != _GRADS_NONE:
            dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
        if GRADS == _GRADS_KV:
            dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE, UPCAST)
    if GRADS == _GRADS_KV:
        tl.store(dk_ptr + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_d[None, :],
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    if GRADS != _GRADS_NONE:
        tl.store(dv_ptr + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if ACC == _ACC_GAE:
        tl.store(t_ptr + bh * N_CTX + offs_n, t, mask=mask_n)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY + ["HAS_BIAS"], prune_configs_by={"early_config_prune": _pruner("dq")},
                 cache_results=True)
@triton.jit
def _flash_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bias_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, sg_b, sg_h, sg_n, sb_r, sb_h,
    H, N_CTX, HEAD_D, scale, qk_scale,
    GH, GW, PREFIX,  # the bias's grid and prefix (HAS_BIAS)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ_i = scale · Σ_j (P ⊙ (dP − δ))_ij K_j for one block of queries, looping over key blocks."""
    pid_m = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_D
    qm = mask_m[:, None] & mask_d[None, :]
    q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_n, offs_d, qm)
    do = _tile(do_ptr + b * sd_b + h * sd_h, offs_m, sd_n, offs_d, qm)
    lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for n0 in range(0, N_CTX, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _tile(k_base, offs_n, sk_n, offs_d, kv_mask)
        v = _tile(v_base, offs_n, sv_n, offs_d, kv_mask)
        p = _probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE, UPCAST,
                        bias_ptr, sb_r, sb_h, h, offs_m, offs_n, GH, GW, PREFIX, HAS_BIAS)
        dp = _grad_probs_tile(do, v, IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE, UPCAST)
    tl.store(dq_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qm)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["MODE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _pruner("bwd")}, cache_results=True)
@triton.jit
def _attention_rows_kernel(
    q_ptr, k_ptr, lse_ptr, do_ptr, v_ptr, row_ptr, t_ptr, bias_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sd_b, sd_h, sd_n, sv_b, sv_h, sv_n, sb_r, sb_h,
    H, N_CTX, HEAD_D, qk_scale,
    GH, GW, PREFIX,  # the bias's grid and prefix (HAS_BIAS, MODE = ROWS_PROBS)
    BH_BUCKET, N_BUCKET,  # autotune keys only
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums of a row vector r (B, N) against one head's P or max(dP, 0), for a key block j:

        MODE = ROWS_PROBS:      t_h[j] = Σ_i r[i] · P[i, j]          (P from Q, K, ℓ)
        MODE = ROWS_RELU_GRAD:  t_h[j] = Σ_i r[i] · max(dP[i, j], 0)  (dP from dO, V)
    """
    pid_n = tl.program_id(0)
    bh, b, h = _image_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_CTX
    mask_d = offs_d < HEAD_D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if MODE == _ROWS_PROBS:
        k = _tile(k_ptr + b * sk_b + h * sk_h, offs_n, sk_n, offs_d, kv_mask)
    else:
        v = _tile(v_ptr + b * sv_b + h * sv_h, offs_n, sv_n, offs_d, kv_mask)
    for m0 in range(0, N_CTX, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        qm = mask_m[:, None] & mask_d[None, :]
        r = tl.load(row_ptr + b * N_CTX + offs_m, mask=mask_m, other=0.0)
        if MODE == _ROWS_PROBS:
            q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_n, offs_d, qm)
            lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=mask_m, other=0.0) * _LOG2E
            f = _probs_tile(q, k, lse2, mask_m, mask_n, qk_scale, IEEE, UPCAST,
                            bias_ptr, sb_r, sb_h, h, offs_m, offs_n, GH, GW, PREFIX, HAS_BIAS)
        else:
            do = _tile(do_ptr + b * sd_b + h * sd_h, offs_m, sd_n, offs_d, qm)
            f = tl.maximum(_grad_probs_tile(do, v, IEEE, UPCAST), 0.0)
        t += tl.sum(r[:, None] * f, axis=0)
    tl.store(t_ptr + bh * N_CTX + offs_n, t, mask=mask_n)


# --------------------------------------------------------------------------- wrappers
def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_flags(t: torch.Tensor, ieee: bool) -> dict:
    """constexpr switches of ``_mm``: full float32 for float32 inputs unless tf32 is allowed; under
    the interpreter bfloat16 tiles are multiplied as float32 (same values: bf16 ⊂ fp32)."""
    return {"IEEE": bool(ieee and t.dtype == torch.float32),
            "UPCAST": bool(t.device.type == "cpu" and t.dtype == torch.bfloat16)}


def _shape_args(q: torch.Tensor) -> Tuple[int, int, int, int, int, Tuple[int, int]]:
    """``(B, H, N, d, BLOCK_D, (BH_BUCKET, N_BUCKET))`` of a ``(B, H, N, d)`` tensor."""
    b, h, n, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    bh_bucket = min(triton.next_power_of_2(b * h), 1024)  # autotune key: the grid's second axis
    n_bucket = triton.next_power_of_2(max(n, 1))  # autotune key: N rounded up to a power of two
    return b, h, n, d, block_d, (bh_bucket, n_bucket)


def _bias_args(bias, dummy: torch.Tensor) -> Tuple[tuple, dict]:
    """The kernels' bias arguments: ``(table, sb_r, sb_h)``, then ``(GH, GW, PREFIX)`` and ``HAS_BIAS``, of a
    ``RelativePositionBias`` (``table (R, H)``, ``grid``, ``prefix``) or None (``dummy`` as the pointer)."""
    if bias is None:
        return (dummy, 0, 0), (1, 1, 0), False
    table = bias.table.detach().to(torch.float32)  # (R, H): a model in 16 bits holds it so; exact in float32
    return (table, table.stride(0), table.stride(1)), (int(bias.grid[0]), int(bias.grid[1]), int(bias.prefix)), True


def _image_slices(b: int, h: int):
    """Image ranges ``[b0, b1)`` whose launches keep the grid's second axis ``(b1 − b0)·H ≤ MAX_GRID_Y``."""
    step = max(1, MAX_GRID_Y // max(h, 1))
    return [(b0, min(b, b0 + step)) for b0 in range(0, b, step)] or [(0, 0)]


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  ieee: bool = True, bias=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``O (B, H, N, d)`` in q's dtype and ``ℓ (B, H, N)`` float32 of ``softmax(scale·QKᵀ + B) V``.

    q, k, v: ``(B, H, N, d)`` on one device, one dtype (float32 / bfloat16 / float16), last dim
    contiguous (any other strides); ``bias``: None or a ``RelativePositionBias`` (B read from its table inside
    the tiles). Inputs are trusted (checked at the public entry).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        parts = [flash_forward(q[b0:b1], k[b0:b1], v[b0:b1], scale, ieee, bias)
                 for b0, b1 in _image_slices(*q.shape[:2])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    b, h, n, d, block_d, bucket = _shape_args(q)
    o = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    (table, *sb), layout, has_bias = _bias_args(bias, lse)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
    _flash_fwd_kernel[grid](
        q, k, v, o, lse, table, *_strides(q), *_strides(k), *_strides(v), *_strides(o), *sb,
        h, n, d, scale * LOG2E, *layout, *bucket, BLOCK_D=block_d, HAS_BIAS=has_bias, **_dot_flags(q, ieee),
    )
    return o, lse


def _grads_mode(input_grads: Union[bool, str]) -> int:
    """The dK/dV program's ``GRADS`` code of ``input_grads``: True (dQ, dK, dV), False (none) or "v" (dV alone)."""
    if input_grads == "v":
        return GRADS_V
    if isinstance(input_grads, bool):
        return GRADS_KV if input_grads else GRADS_NONE
    raise ValueError(f"input_grads must be True, False or 'v', got {input_grads!r}")


def flash_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, scale: float, row: Optional[torch.Tensor] = None, input_grads: Union[bool, str] = True,
    ieee: bool = True, bias=None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of ``flash_forward`` (``bias``: the forward's, or None) plus the TokenTM/GAE column sums.

    Returns ``(dq, dk, dv, t)``: the input gradients ``(B, H, N, d)`` in q's dtype and, when
    ``row (B, N)`` float32 is given, ``t (B, H, N)`` float32 with
    ``t[b, h, j] = Σ_i row[b, i] · max(P[b,h,i,j] · dP[b,h,i,j], 0)`` (None otherwise).
    ``input_grads``: True gives dq, dk, dv; False none of them; ``"v"`` only ``dv = Pᵀ dO``, the
    gradient with the attention probabilities held constant (dq = dk = None: no δ kernel, no dQ
    program, no dP / dS in the dK/dV program unless ``row`` asks for t).
    """
    grads = _grads_mode(input_grads)
    q, k, v, o, do = (_last_dim_contiguous(t) for t in (q, k, v, o, do))
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        parts = [flash_backward(q[b0:b1], k[b0:b1], v[b0:b1], o[b0:b1], lse[b0:b1], do[b0:b1], scale,
                                None if row is None else row[b0:b1], input_grads, ieee, bias)
                 for b0, b1 in _image_slices(*q.shape[:2])]
        return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts))
    b, h, n, d, block_d, bucket = _shape_args(q)
    flags = _dot_flags(q, ieee)
    acc = ACC_GAE if row is not None else ACC_NONE
    dq = dk = dv = t = None
    delta = lse  # placeholder pointer when δ is not needed (no dS)
    if grads == GRADS_KV:
        delta = torch.empty_like(lse)
        blk = 32  # 64 rows spill on sm_90 for float16 at BLOCK_D = 64 (benchmarks/compile_audit.py)
        _delta_kernel[(triton.cdiv(n, blk), b * h)](o, do, delta, *_strides(o), *_strides(do), h, n, d,
                                                    BLOCK_M=blk, BLOCK_D=block_d)
        dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
    if grads != GRADS_NONE:
        dv = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    if acc != ACC_NONE:
        row = row.contiguous()
        t = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if grads == GRADS_NONE and acc == ACC_NONE:
        return dq, dk, dv, t
    dummy = lse
    (table, *sb), layout, has_bias = _bias_args(bias, dummy)
    gk = dk if dk is not None else (dv if dv is not None else q)  # dK and dV share the strides sg_*
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _flash_bwd_dkdv_kernel[grid_n](
        q, k, v, do, lse, delta, row if row is not None else dummy,
        gk, dv if dv is not None else q, t if t is not None else dummy, table,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(gk), *sb,
        h, n, d, scale, scale * LOG2E, *layout, *bucket,
        BLOCK_D=block_d, ACC=acc, GRADS=grads, HAS_BIAS=has_bias, **flags,
    )
    if grads == GRADS_KV:
        grid_m = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
        _flash_bwd_dq_kernel[grid_m](
            q, k, v, do, lse, delta, dq, table,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *sb,
            h, n, d, scale, scale * LOG2E, *layout, *bucket, BLOCK_D=block_d, HAS_BIAS=has_bias, **flags,
        )
    return dq, dk, dv, t


def attention_rows(
    row: torch.Tensor, scale: float, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, do: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
    ieee: bool = True, bias=None,
) -> torch.Tensor:
    """``(B, H, N)`` float32 column sums of ``row (B, N)`` against each head's P (give q, k, lse, and the
    forward's ``bias`` if any) or against max(dP, 0) (give do, v): ``t[b,h,j] = Σ_i row[b,i] · F[b,h,i,j]``."""
    probs = q is not None
    ref = q if probs else do
    ref_k = k if probs else v
    ref, ref_k = _last_dim_contiguous(ref), _last_dim_contiguous(ref_k)
    if ref.shape[0] * ref.shape[1] > MAX_GRID_Y:
        def part(x, b0, b1):
            return None if x is None else x[b0:b1]
        return torch.cat([attention_rows(row[b0:b1], scale, q=part(q, b0, b1), k=part(k, b0, b1), lse=part(lse, b0, b1),
                                         do=part(do, b0, b1), v=part(v, b0, b1), ieee=ieee, bias=bias)
                          for b0, b1 in _image_slices(*ref.shape[:2])])
    b, h, n, d, block_d, bucket = _shape_args(ref)
    row = row.to(torch.float32).contiguous()
    t = torch.empty((b, h, n), dtype=torch.float32, device=ref.device)
    dummy = lse if lse is not None else t
    (table, *sb), layout, has_bias = _bias_args(bias if probs else None, dummy)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _attention_rows_kernel[grid](
        ref, ref_k, dummy, ref, ref_k, row, t, table,
        *_strides(ref), *_strides(ref_k), *_strides(ref), *_strides(ref_k), *sb,
        h, n, d, scale * LOG2E, *layout, *bucket,
        BLOCK_D=block_d, **_dot_flags(ref, ieee),
        MODE=ROWS_PROBS if probs else ROWS_RELU_GRAD, HAS_BIAS=has_bias,
    )
    return t



# --------------------------------------------------------------------------- the attention triple
def triton_attention() -> AttentionKernels:
    """The Triton kernels of this module as an ``AttentionKernels``, with the relevance programs of
    ``kernels.attention_relevance`` as ``relevance`` (imported at the first call). Float32 products follow
    torch's own TF32 switch at each call (``tf32_allowed``: full float32 unless torch allows TF32), save the
    relevance programs', which are IEEE float32 always (they divide by Z)."""

    def fwd(q, k, v, scale, bias=None):
        return flash_forward(q, k, v, scale, ieee=not tf32_allowed(), bias=bias)

    def bwd(q, k, v, o, lse, do, scale, row=None, input_grads=True, bias=None):
        """``flash_backward``; ``input_grads="v"``: dV alone (dq = dk = None), the attention held constant."""
        return flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=input_grads,
                              ieee=not tf32_allowed(), bias=bias)

    def rows(row, scale, q=None, k=None, lse=None, do=None, v=None, bias=None):
        return attention_rows(row, scale, q=q, k=k, lse=lse, do=do, v=v, ieee=not tf32_allowed(), bias=bias)

    from .attention_relevance import attention_relevance  # the relevance programs, built at first use

    return AttentionKernels(fwd, bwd, rows, attention_relevance)
