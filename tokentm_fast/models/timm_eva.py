"""Adapter for timm ``Eva`` (EVA-02, EVA-CLIP image towers as timm builds them, also inside open_clip's
``TimmModel``).

Block ``timm.models.eva.EvaBlock``: ``x + γ₁ ⊙ attn(norm1(x), rope)``, then ``+ γ₂ ⊙ mlp(norm2(x))``
(γ = ``gamma_1`` / ``gamma_2``, parameters, 1 when None). Attention ``EvaAttention``: q, k, v from a fused
``qkv`` weight with separate ``q_bias`` / ``v_bias`` (and a zero ``k_bias``) applied through ``F.linear``
(module hooks on ``qkv`` never fire), or from ``q_proj`` / ``k_proj`` / ``v_proj``; optional q/k norms; the
rotary position embedding (RoPE) applied to the patch rows of q and k (the prefix rows unrotated); softmax;
the heads merged, then an optional sub-LayerNorm ``attn.norm`` (``scale_attn_inner``), then ``proj``. The
MLP is timm's ``Mlp``, ``SwiGLU`` or ``GluMlp`` (SwiGLU with packed weights), optionally with a LayerNorm
inside (``scale_mlp``).

The attention call site hands the core the **rotated** q and k (RoPE is a fixed linear map per position
applied before the attention core), so both attention paths and every kernel see exactly the logits the
model computes. x̃ of the attention sub-layer (TokenTM, docs/methods.md §2) is γ₁ ⊙ proj(norm(v_j)): the
sub-LayerNorm applied to the value vector, what the block adds when every head attends to token j alone.

Poolings: ``"token"`` and ``"avg"`` (timm's ``global_pool``); the attention pool ``"map"`` is refused. The
LRP relevance pass (docs/methods.md §6.3) runs on blocks without RoPE and with timm's two-layer ``Mlp`` (a
sub-LayerNorm passes relevance unchanged, as every norm does; biases stay out of the denominators); it
refuses RoPE and the SwiGLU gate, naming why (every released EVA-02 has both).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .protocol import AttentionCore, BlockLinears, LinearPoint, PatchedForward, linear_point, no_relevance_pass
from .timm import GammaBlocks, OpenClipTimmViT, TimmViT, fused_qkv, is_open_clip_timm_model, scaled

SUPPORTED_POOLING = ("token", "avg")


def eva_classes():
    from timm.models.eva import Eva, EvaAttention, EvaBlock

    return Eva, EvaBlock, EvaAttention


def _qkv(attn: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, N, d)`` of an ``EvaAttention`` for its input ``x (B, N, D)`` (before q/k norms, RoPE)."""
    if attn.qkv is not None:
        return fused_qkv(attn, x)
    b, n, _ = x.shape
    return tuple(p(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
                 for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def _rotate(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """RoPE on the patch rows of ``t (B, H, N, d)`` (the prefix rows unrotated), as ``EvaAttention`` does."""
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(like)


def _attention_forward(core: AttentionCore, l: int):
    """``EvaAttention.forward`` (timm 1.0) with ``core`` in place of softmax(scale · q kᵀ) v; q and k rotated."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("explanations take unmasked, non-causal attention (attn_mask / is_causal given)")
        b, n, _ = x.shape
        q, k, v = _qkv(self, x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rotate(self, q, rope, v), _rotate(self, k, rope, v)
        o = core(l, q, k, v, float(self.scale))
        out = self.norm(o.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(self.proj(out))

    return forward


class TimmEva(GammaBlocks, TimmViT):
    """Adapter over a timm ``Eva`` (see the module docstring); head, embeddings and image sizes as for timm's
    ``VisionTransformer`` (``TimmViT``).

    Raises:
        TypeError: ``model`` is not a timm Eva.
        ValueError: a part of the model is not supported (the message names it).
    """

    family = "timm_eva"
    block_input_kwarg = "x"

    def __init__(self, model: nn.Module) -> None:
        Eva, EvaBlock, EvaAttention = eva_classes()
        if not isinstance(model, Eva):
            raise TypeError(f"expected a timm Eva, got {type(model).__name__}")
        self.model = self.trunk = model
        self.blocks = list(model.blocks)
        if not self.blocks:
            raise ValueError("model has no transformer blocks")
        if getattr(model, "rope_mixed", False):
            raise ValueError("unsupported model: depth-dependent (mixed) rotary embeddings (rope_mixed)")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not EvaBlock.forward:
                raise ValueError(f"unsupported model: block {i} is a {type(blk).__name__}; only timm's pre-norm "
                                 f"`EvaBlock` (x + γ₁ attn(norm1(x)), then + γ₂ mlp(norm2(x))) is supported")
            attn = blk.attn
            if type(attn).forward is not EvaAttention.forward:
                raise ValueError(f"unsupported model: block {i} attention is a {type(attn).__name__}; only timm's "
                                 f"`EvaAttention` is supported")
            if attn.gate is not None:
                raise ValueError(f"unsupported model: block {i} uses gated attention (attn.gate)")
            if attn.proj.out_features != blk.norm1.normalized_shape[-1]:
                raise ValueError(f"unsupported model: block {i} attention changes the width")
        if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLING:
            raise ValueError(f"unsupported model: global_pool={model.global_pool!r}; supported: {SUPPORTED_POOLING}")
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_class_token = model.cls_token is not None
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pooling = model.global_pool
        self.pool_include_prefix = False
        self.attention_pool = None
        pe = model.patch_embed
        self.in_chans = int(pe.proj.in_channels)
        self.patch_size = tuple(pe.patch_size)
        self.num_classes = int(model.num_classes) if model.num_classes > 0 else None

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].attn, _attention_forward(core, l)))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return scaled(blk.gamma_1, blk.attn.proj(blk.attn.norm(o)))

    def relevance_linears(self, l: int) -> BlockLinears:
        from timm.layers import Mlp

        blk = self.blocks[l]
        if self.trunk.rope is not None:
            raise no_relevance_pass(
                "the rotary position embedding (RoPE) of the timm Eva: the rules would have to pass the q·kᵀ "
                "relevance back through each position's rotation of q and k, which the pass does not do")
        if type(blk.mlp) is not Mlp:
            raise no_relevance_pass(
                f"block {l}'s MLP, a {type(blk.mlp).__name__} (the SwiGLU gate multiplies two operands, "
                f"act(x W_gate) ⊙ (x W_up); the rules cover timm's two-layer `Mlp`: fc1, activation, fc2)")
        attn = blk.attn
        if attn.qkv is not None:
            weight = attn.qkv.weight
        else:
            weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        # F.linear reads qkv's weight directly: the input is read where it enters the attention module
        return BlockLinears(LinearPoint(attn, weight), linear_point(attn.proj), linear_point(blk.mlp.fc1),
                            linear_point(blk.mlp.fc2))


class OpenClipTimmEva(OpenClipTimmViT, TimmEva):
    """open_clip's ``TimmModel`` around a timm ``Eva`` (the EVA-CLIP image towers open_clip builds with
    timm): the trunk explained as ``TimmEva`` explains it, then the wrapper's ``head`` (a linear projection,
    or nothing), as ``OpenClipTimmViT`` does for a ``VisionTransformer`` trunk; the output is an embedding."""


def adapter_class(model: nn.Module):
    """``TimmEva`` if ``model`` is a timm ``Eva`` (exact class or subclass), ``OpenClipTimmEva`` for open_clip's
    ``TimmModel`` around one, else None."""
    Eva, _, _ = eva_classes()
    if isinstance(model, Eva):
        return TimmEva
    return OpenClipTimmEva if is_open_clip_timm_model(model, Eva) else None
