"""``nn.MultiheadAttention`` with a replaceable core: self-attention in the blocks (torchvision, open_clip)
and cross-attention of attention-pool heads (open_clip CoCa, Hugging Face SigLIP)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import AttentionCore, merge_heads, split_heads


def check_mha(mha: nn.Module, where: str) -> None:
    """Refuse the ``nn.MultiheadAttention`` options the explanation does not model."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise ValueError(f"unsupported model: {where} is a {type(mha).__name__}, not nn.MultiheadAttention")
    if not mha._qkv_same_embed_dim:
        raise ValueError(f"unsupported model: {where} has separate kdim/vdim projections")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"unsupported model: {where} uses add_bias_kv / add_zero_attn")


def mha_forward(core: AttentionCore, l: int):
    """Instance ``forward`` of an ``nn.MultiheadAttention`` used as self-attention, with ``core`` inside."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("explanations take unmasked self-attention (a mask was given)")
        if not (key is query and value is query):
            raise ValueError("explanations take self-attention (query, key and value must be the same tensor)")
        x = query if self.batch_first else query.transpose(0, 1)               # (B, N, D)
        b, n, _ = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = core(l, q, k, v, float(self.head_dim) ** -0.5)
        out = self.out_proj(o.transpose(1, 2).reshape(b, n, heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    return forward


def check_pool_mha(mha: nn.Module, where: str) -> None:
    """Refuse the ``nn.MultiheadAttention`` options an attention pool's explanation does not model
    (separate key / value widths are fine: the pool's queries and tokens may differ in width)."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise ValueError(f"unsupported model: {where} is a {type(mha).__name__}, not nn.MultiheadAttention")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"unsupported model: {where} uses add_bias_kv / add_zero_attn")


def mha_key_value_weight(mha: nn.MultiheadAttention) -> torch.Tensor:
    """``(2·E, kdim)``: the key projection's rows, then the value projection's (the ``kv`` weight of
    ``PoolLinears``; kdim = vdim, which ``check_pool_mha`` leaves to the caller)."""
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight[mha.embed_dim:]
    return torch.cat([mha.k_proj_weight, mha.v_proj_weight])


def mha_cross_attention(mha: nn.MultiheadAttention, query: torch.Tensor, tokens: torch.Tensor,
                        core: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mha(query, tokens, tokens)[0]`` of a ``batch_first`` ``nn.MultiheadAttention`` with
    ``core(q, k, v, scale)`` in place of softmax(scale · q kᵀ) v.

    Args:
        mha: the attention (fused ``in_proj_weight``, or ``q/k/v_proj_weight`` when kdim / vdim differ).
        query: ``(B, Lq, E)`` latent queries.
        tokens: ``(B, M, kdim)`` the tokens attended to.
        core: ``core(q, k, v, scale) -> o``; q ``(B, H, Lq, d)``, k, v ``(B, H, M, d)``, o like q.

    Returns:
        ``(B, Lq, E)`` the output (after ``out_proj``).
    """
    e, heads = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.split(e)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq = bk = bv = None
    if mha.in_proj_bias is not None:
        bq, bk, bv = mha.in_proj_bias.split(e)
    q = split_heads(F.linear(query, wq, bq), heads)
    k = split_heads(F.linear(tokens, wk, bk), heads)
    v = split_heads(F.linear(tokens, wv, bv), heads)
    o = core(q, k, v, float(e // heads) ** -0.5)
    return mha.out_proj(merge_heads(o))
