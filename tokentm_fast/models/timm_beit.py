"""Adapter for timm ``Beit`` (``beit_*``, ``beitv2_*``: BEiT and BEiT v2 as timm builds them).

Block ``timm.models.beit.Block``: ``x + γ₁ ⊙ attn(norm1(x), shared_rel_pos_bias)``, then
``+ γ₂ ⊙ mlp(norm2(x))`` (γ = ``gamma_1`` / ``gamma_2``, parameters, 1 when None). Attention
``timm.models.beit.Attention``: q, k, v from the fused ``qkv`` weight with separate ``q_bias`` / ``v_bias`` (and
a zero ``k_bias``) applied through ``F.linear`` (module hooks on ``qkv`` never fire); the logits
``scale · Q Kᵀ + B``, ``B (1, H, N, N)`` the relative position bias gathered from the block's
``((2gh−1)(2gw−1)+3)``-entry table (``use_rel_pos_bias``) by ``relative_position_index``, plus the model's
shared one (``use_shared_rel_pos_bias``, ``model.rel_pos_bias``) when it has one. The call site hands the core the
bias in table form (``relative_bias.RelativePositionBias``: the block's table, plus the shared table where both
exist), never the ``(1, H, N, N)`` bias timm gathers: the block's table is read here, and the shared module
(``model.rel_pos_bias``, whose forward gathers the dense bias once per forward) is bypassed while every block runs
the adapter's attention (a block left to timm's own attention gets the dense bias). Both attention paths serve the
model: the materialized one writes the bias out, the flash kernels read the table inside their tiles.

Poolings: ``"avg"`` (the patch mean, then ``fc_norm``; ``norm`` is the identity) and ``"token"`` (``norm``, then
the class token); ``global_pool=""`` (the output is the token sequence) is refused. Image size: the model's own
(its bias table is built for one grid; ``set_input_size`` changes it). The LRP relevance pass (docs/methods.md
§6.3) runs with timm's two-layer ``Mlp`` (it refuses the SwiGLU MLP, naming why); the relative position bias
takes the add rule between QKᵀ and B/scale (the bias's share dropped), as in hf_beit.py.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .protocol import (
    AttentionCore,
    BlockLinears,
    EmbeddingPoints,
    LinearPoint,
    PatchedForward,
    linear_point,
    no_relevance_pass,
)
from .relative_bias import RelativePositionBias, bypass_bias_module, takes_table
from .timm import GammaBlocks, TimmViT, fused_qkv, scaled

SUPPORTED_POOLING = ("token", "avg")


def beit_classes():
    from timm.models.beit import Attention, Beit, Block

    return Beit, Block, Attention


def _attention_forward(core: AttentionCore, l: int):
    """timm Beit's ``Attention.forward`` with ``core`` in place of softmax(scale · q kᵀ + B) v; the block's bias
    (its table, in table form) plus the shared one (table form, or dense where timm gathered it) handed to the
    core."""

    @takes_table
    def forward(self, x: torch.Tensor, shared_rel_pos_bias=None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = fused_qkv(self, x)
        bias = shared_rel_pos_bias
        if self.relative_position_bias_table is not None:
            own = table_form(self)
            bias = own if bias is None else own + bias
        scale = float(self.scale)
        o = core(l, q, k, v, scale) if bias is None else core(l, q, k, v, scale, bias=bias)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, -1)))

    return forward


def table_form(module: nn.Module) -> RelativePositionBias:
    """The table form of a timm Beit ``Attention``'s or shared ``RelativePositionBias``'s bias (its table, its
    ``window_size``, the class token)."""
    gh, gw = module.window_size
    return RelativePositionBias(module.relative_position_bias_table, (int(gh), int(gw)), 1)


class TimmBeit(GammaBlocks, TimmViT):
    """Adapter over a timm ``Beit`` (see the module docstring); head and image sizes as for timm's
    ``VisionTransformer`` (``TimmViT``).

    Raises:
        TypeError: ``model`` is not a timm Beit.
        ValueError: a part of the model is not supported (the message names it).
    """

    family = "timm_beit"
    block_input_kwarg = "x"

    def __init__(self, model: nn.Module) -> None:
        Beit, Block, Attention = beit_classes()
        if not isinstance(model, Beit):
            raise TypeError(f"expected a timm Beit, got {type(model).__name__}")
        self.model = self.trunk = model
        self.blocks = list(model.blocks)
        if not self.blocks:
            raise ValueError("model has no transformer blocks")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not Block.forward:
                raise ValueError(f"unsupported model: block {i} is a {type(blk).__name__}; only timm's Beit `Block` "
                                 f"(x + γ₁ attn(norm1(x)), then + γ₂ mlp(norm2(x))) is supported")
            if type(blk.attn).forward is not Attention.forward:
                raise ValueError(f"unsupported model: block {i} attention is a {type(blk.attn).__name__}; only "
                                 f"timm's Beit `Attention` is supported")
        if model.global_pool not in SUPPORTED_POOLING:
            raise ValueError(f"unsupported model: global_pool={model.global_pool!r} (the output is the token "
                             f"sequence); supported: {SUPPORTED_POOLING}")
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_class_token = True
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pooling = model.global_pool
        self.pool_include_prefix = False
        self.attention_pool = None
        pe = model.patch_embed
        self.in_chans = int(pe.proj.in_channels)
        self.patch_size = tuple(pe.patch_size)
        self.num_classes = int(model.num_classes) if model.num_classes > 0 else None
        self.has_bias = model.rel_pos_bias is not None or any(
            blk.attn.relative_position_bias_table is not None for blk in self.blocks)
        self.flash_refusal = None

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        """The adapter's attention forward on ``layers``; the shared bias module bypassed (table form) while every
        block runs it (module docstring)."""
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].attn, _attention_forward(core, l)))
        shared = self.model.rel_pos_bias
        if shared is not None:
            bypass_bias_module(shared, lambda: table_form(shared), handles, [blk.attn for blk in self.blocks])

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return scaled(blk.gamma_1, blk.attn.proj(o))

    def relevance_linears(self, l: int) -> BlockLinears:
        from timm.layers import Mlp

        blk = self.blocks[l]
        if type(blk.mlp) is not Mlp:
            raise no_relevance_pass(
                f"block {l}'s MLP, a {type(blk.mlp).__name__} (the SwiGLU gate multiplies two operands; the rules "
                f"cover timm's two-layer `Mlp`: fc1, activation, fc2)")
        attn = blk.attn
        # F.linear reads qkv's weight directly: the input is read where it enters the attention module
        return BlockLinears(LinearPoint(attn, attn.qkv.weight), linear_point(attn.proj), linear_point(blk.mlp.fc1),
                            linear_point(blk.mlp.fc2))

    def head_linears(self) -> List[LinearPoint]:
        return super().head_linears()

    def embedding_points(self) -> EmbeddingPoints:
        """The patch embedding's convolution, the tokens after the position embedding (``pos_drop``'s input) and
        the class token."""
        m = self.trunk
        conv = m.patch_embed.proj
        if not isinstance(m.patch_embed.norm, nn.Identity):
            raise no_relevance_pass("a patch embedding with a norm after its convolution")
        return EmbeddingPoints(conv, LinearPoint(m.pos_drop, conv.weight), m.cls_token[0])


def adapter_class(model: nn.Module):
    """``TimmBeit`` if ``model`` is a timm ``Beit`` (exact class or subclass), else None."""
    Beit, _, _ = beit_classes()
    return TimmBeit if isinstance(model, Beit) else None
