"""Adapter for timm ``VisionTransformer`` (classifiers and ``num_classes=0`` feature models).

Block ``timm.models.vision_transformer.Block``:
``x + ls1(attn(norm1(x)))``, then ``+ ls2(mlp(norm2(x)))``; attention
``timm.layers.Attention`` (fused qkv, optional q/k norm, optional ``attn.norm``
before ``proj``). Patch embeddings: ``PatchEmbed`` or a CNN ``HybridEmbed``
(the patch grid is then the backbone's feature map).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import (
    AttentionCore,
    BlockLinears,
    EmbeddingPoints,
    LinearPoint,
    PatchedForward,
    PoolLinears,
    ViTAdapter,
    linear_point,
    no_relevance_pass,
)

SUPPORTED_POOLING = ("token", "avg", "map")


def timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def _attention_forward(core: AttentionCore, l: int):
    """``timm.layers.Attention.forward`` (timm 1.0) with ``core`` in place of softmax(q kᵀ) v."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("explanations take unmasked, non-causal attention (attn_mask / is_causal given)")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = core(l, q, k, v, float(self.scale))
        x = o.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


def _pool_forward(core):
    """``timm.layers.AttentionPoolLatent.forward`` with ``core(q, k, v, scale)`` in place of softmax(q kᵀ) v."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        if attn_mask is not None:
            raise ValueError("explanations take an unmasked attention pool (attn_mask given)")
        b, n, c = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, self.latent_len, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = core(q, k, v, float(self.scale))
        x = self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, self.latent_len, c)))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x

    return forward


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, N, d)`` from the fused ``qkv`` weight of timm's Beit / Eva attention, with its separate
    ``q_bias`` / ``k_bias`` / ``v_bias`` when it has them (applied through ``F.linear``, or added after the product
    with ``qkv_bias_separate``), for the attention input ``x (B, N, D)``."""
    b, n, _ = x.shape
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
    return qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def scaled(gamma: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``γ ⊙ x`` for a LayerScale parameter γ (timm's ``gamma_1`` / ``gamma_2``; None: x)."""
    return x if gamma is None else gamma * x


class GammaBlocks:
    """The MLP sub-layer of timm's Beit / Eva blocks, ``x + γ₂ ⊙ mlp(norm2(x))`` with γ₂ = ``gamma_2`` a bare
    parameter (a mixin of their adapters)."""

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return scaled(blk.gamma_2, blk.mlp(blk.norm2(y)))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        """``norm2`` (its input is Yˡ) and ``drop_path2``, whose input and (outside training) output is
        γ₂ ⊙ MLP: γ₂ is a parameter, not a module, so no module of the block outputs the scaled branch."""
        blk = self.blocks[l]
        return blk.norm2, blk.drop_path2


class TimmViT(ViTAdapter):
    """Adapter over a timm ``VisionTransformer``.

    Raises:
        TypeError: ``model`` is not a timm VisionTransformer.
        ValueError: a part of the model is not supported (the message names it).
    """

    family = "timm"
    block_input_kwarg = "x"

    def __init__(self, model: nn.Module) -> None:
        VisionTransformer, Block, Attention = timm_classes()
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        self.model = model
        self.trunk = model       # the timm VisionTransformer (open_clip's TimmModel wraps one: OpenClipTimmViT)
        self.blocks = list(model.blocks)
        if not self.blocks:
            raise ValueError("model has no transformer blocks")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not Block.forward:
                raise ValueError(
                    f"unsupported model: block {i} is a {type(blk).__name__}; only timm's pre-norm "
                    f"`Block` (x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))) is supported"
                )
            attn = blk.attn
            if type(attn).forward is not Attention.forward:
                raise ValueError(
                    f"unsupported model: block {i} attention is a {type(attn).__name__}; only timm's "
                    f"`Attention` (fused qkv, softmax attention) is supported"
                )
            if getattr(attn, "gate", None) is not None:
                raise ValueError(f"unsupported model: block {i} uses gated attention (attn.gate)")
            if attn.proj.out_features != attn.qkv.in_features:
                raise ValueError(f"unsupported model: block {i} attention changes the width (dim_out != dim)")
        pool = getattr(model, "attn_pool", None)
        if pool is not None and pool.pool != "token":
            raise ValueError(f"unsupported model: an attention pool with pool_type={pool.pool!r} (the explanation "
                             f"reads its first latent: pool_type='token')")
        if model.global_pool not in SUPPORTED_POOLING:
            raise ValueError(
                f"unsupported model: global_pool={model.global_pool!r}; supported: {SUPPORTED_POOLING}"
            )
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_class_token = bool(getattr(model, "has_class_token", model.cls_token is not None))
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pooling = model.global_pool
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        self.attention_pool = pool
        pe = model.patch_embed
        self.in_chans = int(getattr(pe, "in_chans", None) or pe.proj.in_channels)
        self.patch_size = tuple(pe.patch_size)
        self.num_classes = int(model.num_classes) if model.num_classes > 0 else None

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].attn, _attention_forward(core, l)))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.ls1(blk.attn.proj(blk.attn.norm(o)))

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.ls2(blk.mlp(blk.norm2(y)))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        blk = self.blocks[l]
        return blk.norm2, blk.ls2

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.norm(tokens))

    def replace_pool_attention(self, core, handles: list) -> None:
        handles.append(PatchedForward(self.attention_pool, _pool_forward(core)))

    def pool_value_tokens(self, values: torch.Tensor) -> torch.Tensor:
        return self.attention_pool.proj(values)

    def pool_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(tokens)

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        m = self.trunk
        z = m.head_drop(m.fc_norm(m.norm(v)))
        if getattr(m, "head_dist", None) is not None:   # distilled DeiT (eval): the mean of its two heads
            return (m.head(z) + m.head_dist(z)) / 2
        return m.head(z)

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        from timm.layers import Mlp

        blk = self.blocks[l]
        if type(blk.mlp) is not Mlp:
            raise no_relevance_pass(f"block {l}'s MLP, a {type(blk.mlp).__name__} (only timm's two-layer `Mlp`: "
                                    f"fc1, activation, fc2)")
        attn = blk.attn
        return BlockLinears(linear_point(attn.qkv), linear_point(attn.proj), linear_point(blk.mlp.fc1),
                            linear_point(blk.mlp.fc2))

    def pool_linears(self) -> PoolLinears:
        """timm's ``AttentionPoolLatent``: ``kv`` on the tokens, ``proj``, then (with one) the residual MLP
        ``x + mlp(norm(x))``."""
        from timm.layers import Mlp

        pool = self.attention_pool
        if pool.pos_embed is not None:
            raise no_relevance_pass("an attention pool with a position embedding of its own")
        kv, proj = linear_point(pool.kv), linear_point(pool.proj)
        mlp = pool.mlp
        if mlp is None:
            return PoolLinears(kv, proj)
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            raise no_relevance_pass(f"the attention pool's MLP, a {type(mlp).__name__} (only timm's two-layer "
                                    f"`Mlp`: fc1, activation, fc2)")
        return PoolLinears(kv, proj, LinearPoint(pool.norm, proj.weight), linear_point(mlp.fc1),
                           linear_point(mlp.fc2), LinearPoint(mlp, mlp.fc2.weight, output=True))

    def head_linears(self) -> List[LinearPoint]:
        m = self.trunk
        if getattr(m, "head_dist", None) is not None:
            raise no_relevance_pass("a distilled model's two classifier heads")
        return [linear_point(m.head)] if isinstance(m.head, nn.Linear) else []

    def embedding_points(self) -> EmbeddingPoints:
        m = self.trunk
        pe = m.patch_embed
        conv = getattr(pe, "proj", None)
        if not isinstance(conv, nn.Conv2d) or hasattr(pe, "backbone") or not isinstance(pe.norm, nn.Identity):
            raise no_relevance_pass(f"this patch embedding ({type(pe).__name__}): lrp needs one convolution on "
                                    f"the pixels, without a norm after it")
        prefix = [t[0] for t in (m.cls_token, getattr(m, "dist_token", None), m.reg_token) if t is not None]
        width = conv.out_channels
        prefix = torch.cat(prefix) if prefix else conv.weight.new_zeros(0, width)
        return EmbeddingPoints(conv, LinearPoint(m.norm_pre, conv.weight), prefix)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        pe = self.trunk.patch_embed
        dynamic = bool(getattr(self.trunk, "dynamic_img_size", False))
        if pe.img_size is not None and getattr(pe, "strict_img_size", True) and not dynamic:
            if (h, w) != tuple(pe.img_size):
                raise ValueError(
                    f"images are {h}x{w}, the model expects {pe.img_size[0]}x{pe.img_size[1]} "
                    f"(create it with img_size=... or dynamic_img_size=True for other sizes)"
                )
        elif not getattr(pe, "dynamic_img_pad", False):
            if hasattr(pe, "feat_ratio"):
                ph, pw = pe.feat_ratio(as_scalar=False)
            else:
                ph, pw = self.patch_size
            if h % ph or w % pw:
                raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size((h, w)))
        return h // self.patch_size[0], w // self.patch_size[1]


class OpenClipTimmViT(TimmViT):
    """open_clip's ``TimmModel`` (``open_clip.timm_model``, e.g. the image tower of open_clip's SigLIP
    models): a timm ``VisionTransformer`` trunk, then ``head`` (a projection, or nothing). The trunk is
    explained as ``TimmViT`` explains it; the output is the wrapper's (an embedding)."""

    family = "open_clip"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.trunk)
        self.model = model
        self.num_classes = None
        for name, part in model.head.named_children():
            if not isinstance(part, (nn.Dropout, nn.Identity, nn.Linear)):
                raise ValueError(f"unsupported model: TimmModel head part {name!r} is a {type(part).__name__} "
                                 f"(supported: a linear projection, proj='linear' or 'none')")

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.head(super().head(tokens))

    def head_linears(self) -> List[LinearPoint]:
        return super().head_linears() + [linear_point(p) for p in self.model.head.children()
                                         if isinstance(p, nn.Linear)]

    def pool_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.head(super().pool_head(tokens))

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        return self.model.head(super().pooled_head(v))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def is_open_clip_timm_model(model: nn.Module, trunk_class: Optional[type] = None) -> bool:
    """Whether ``model`` is open_clip's ``TimmModel`` around a ``trunk_class`` (default: timm's
    ``VisionTransformer``)."""
    if trunk_class is None:
        trunk_class = timm_classes()[0]
    return (type(model).__name__ == "TimmModel" and type(model).__module__.startswith("open_clip")
            and isinstance(getattr(model, "trunk", None), trunk_class))


def adapter_class(model: nn.Module):
    """``TimmViT`` if ``model`` is a timm ``VisionTransformer`` (exact class or subclass),
    ``OpenClipTimmViT`` for open_clip's ``TimmModel`` around one, else None."""
    VisionTransformer, _, _ = timm_classes()
    if isinstance(model, VisionTransformer):
        return TimmViT
    return OpenClipTimmViT if is_open_clip_timm_model(model) else None
