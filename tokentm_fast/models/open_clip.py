"""Adapter for open_clip ``VisionTransformer`` (a CLIP model's ``model.visual``).

``ResidualAttentionBlock``: ``x + ls_1(attn(ln_1(x)))`` (an
``nn.MultiheadAttention``), then ``x + ls_2(mlp(ln_2(x)))``. Head: class-token
or average pooling with ``ln_post`` (before or after the pooling), then
``@ proj``; the output is the image embedding ``(B, D')``, so an explanation
needs a callable target (e.g. the cosine similarity to a text embedding).

CoCa's towers (``attentional_pool=True``) pool with an ``AttentionalPooler``
instead: learned queries ``ln_q(query)`` attend to ``ln_k(X)`` over all N
tokens (class token included) in an ``nn.MultiheadAttention``; then
``ln_post`` and the first latent (``pool_type="tok"``), ``@ proj``. The
explanations start at that pool's first latent (docs/methods.md §6.1). The
``attentional_pool="parallel"`` / ``"cascade"`` variants (a second, contrastive
pool) are refused, as are ``pool_type="avg"`` / ``"none"`` after the pool.
Install with ``pip install "tokentm_fast[clip]"``.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from ._mha import check_mha, check_pool_mha, mha_cross_attention, mha_forward, mha_key_value_weight
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

POOL_TYPES = {"tok": "token", "avg": "avg"}


def open_clip_classes():
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'open_clip models need open_clip_torch: pip install "tokentm_fast[clip]" ({e})') from e
    return VisionTransformer, ResidualAttentionBlock


def _pooler_forward(core: Callable):
    """``open_clip.transformer.AttentionalPooler.forward`` with ``core(q, k, v, scale)`` inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return mha_cross_attention(self.attn, q.unsqueeze(0).expand(x.shape[0], -1, -1), x, core)

    return forward


class OpenClipViT(ViTAdapter):
    """Adapter over an open_clip ``VisionTransformer``."""

    family = "open_clip"
    block_input_kwarg = "q_x"

    def __init__(self, model: nn.Module) -> None:
        VisionTransformer, ResidualAttentionBlock = open_clip_classes()
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"expected an open_clip VisionTransformer (clip_model.visual), got {type(model).__name__}")
        self.model = model
        transformer = model.transformer
        if not getattr(transformer, "batch_first", True):
            raise ValueError("unsupported model: open_clip Transformer with batch_first=False")
        self.blocks = list(transformer.resblocks)
        if not self.blocks:
            raise ValueError("model has no transformer blocks")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not ResidualAttentionBlock.forward:
                raise ValueError(
                    f"unsupported model: block {i} is a {type(blk).__name__}; only open_clip's "
                    f"ResidualAttentionBlock (nn.MultiheadAttention) is supported"
                )
            if hasattr(blk, "ln_1_kv"):
                raise ValueError(f"unsupported model: block {i} is a cross-attention block")
            check_mha(blk.attn, f"block {i} attention")
        pool = getattr(model, "attn_pool", None)
        if pool is not None:
            self._check_attention_pool(model)
        elif model.pool_type not in POOL_TYPES:
            raise ValueError(f"unsupported model: pool_type={model.pool_type!r}; supported: {tuple(POOL_TYPES)}")
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_class_token = True
        self.num_prefix_tokens = 1
        self.attention_pool = pool
        self.pool_include_prefix = pool is not None     # the pool reads every token, the class token too
        self.pooling = "map" if pool is not None else POOL_TYPES[model.pool_type]
        self.in_chans = int(model.conv1.in_channels)
        self.num_classes = None

    @staticmethod
    def _check_attention_pool(model: nn.Module) -> None:
        """Accept CoCa's plain attentional pooling (``attentional_pool=True``, ``pool_type="tok"``) only."""
        from open_clip.transformer import AttentionalPooler

        variant = getattr(model, "attn_pool_type", "")
        if getattr(model, "attn_pool_contrastive", None) is not None or variant:
            raise ValueError(
                f"unsupported model: attentional_pool={variant!r} (a second, contrastive attention pool: the "
                f"'parallel' and 'cascade' variants are not supported; the plain attentional_pool=True is)"
            )
        if type(model.attn_pool).forward is not AttentionalPooler.forward:
            raise ValueError(f"unsupported model: the attention pool is a {type(model.attn_pool).__name__}; only "
                             f"open_clip's AttentionalPooler is supported")
        if model.pool_type != "tok":
            raise ValueError(
                f"unsupported model: pool_type={model.pool_type!r} after the attentional pool (the explanation "
                f"reads the pool's first latent: pool_type='tok')"
            )
        check_pool_mha(model.attn_pool.attn, "the attentional pool's attention")
        if not model.attn_pool.attn.batch_first:
            raise ValueError("unsupported model: the attentional pool's attention has batch_first=False")

    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].attn, mha_forward(core, l)))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.ls_1(blk.attn.out_proj(o))

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.ls_2(blk.mlp(blk.ln_2(y)))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        blk = self.blocks[l]
        return blk.ln_2, blk.ls_2

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pooling == "token" else tokens[:, 1:].mean(dim=1)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.model.proj
        return pooled @ proj if proj is not None else pooled

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.attention_pool is not None:        # CoCa: pool, ln_post on every latent, the first latent
            return self._project(m.ln_post(self.attention_pool(tokens))[:, 0])
        pooled = m.ln_post(self._pool(tokens)) if m.final_ln_after_pool else self._pool(m.ln_post(tokens))
        return self._project(pooled)

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        """``ln_post(v) @ proj``. With an attention pool, ``v`` is a pooled latent ``(B, output_dim)``
        (the methods go through ``pool_head`` there instead)."""
        return self._project(self.model.ln_post(v))

    # -- the attention pool (CoCa) ------------------------------------------------
    def replace_pool_attention(self, core: Callable, handles: list) -> None:
        handles.append(PatchedForward(self.attention_pool, _pooler_forward(core)))

    def pool_value_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """``out_proj`` of the pool's value vectors ``(B, M, output_dim)`` → ``(B, M, output_dim)``: the
        latents' width, which is narrower than the tokens' in released CoCa towers (TokenTM's weight of
        such a pool: ``methods.pool.pool_transform_weights``)."""
        return self.attention_pool.attn.out_proj(values)

    def pool_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pool on ``tokens (B, N, width)``, its first latent, ``@ proj`` (no ``ln_post``: §6)."""
        return self._project(self.attention_pool(tokens)[:, 0])

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        blk = self.blocks[l]
        return BlockLinears(LinearPoint(blk.ln_1, blk.attn.in_proj_weight, output=True),
                            linear_point(blk.attn.out_proj), linear_point(blk.mlp.c_fc), linear_point(blk.mlp.c_proj))

    def head_linears(self) -> List[LinearPoint]:
        proj = self.model.proj
        return [] if proj is None else [LinearPoint(self.model.ln_post, proj.t(), output=True)]

    def pool_linears(self) -> PoolLinears:
        """CoCa's ``AttentionalPooler``: keys and values from ``ln_k`` of the tokens, ``out_proj``, no MLP."""
        pool = self.attention_pool
        mha = pool.attn
        if mha.kdim != mha.vdim:
            raise no_relevance_pass("an attentional pool whose keys and values read different widths")
        return PoolLinears(LinearPoint(pool.ln_k, mha_key_value_weight(mha), output=True), linear_point(mha.out_proj))

    def embedding_points(self) -> EmbeddingPoints:
        m = self.model
        return EmbeddingPoints(m.conv1, LinearPoint(m.patch_dropout, m.conv1.weight), m.class_embedding[None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        size = tuple(self.model.image_size)
        if (h, w) != size:
            raise ValueError(f"images are {h}x{w}, the model expects {size[0]}x{size[1]}")
        ph, pw = self.model.patch_size
        return h // ph, w // pw


def adapter_class(model: nn.Module):
    VisionTransformer, _ = open_clip_classes()
    return OpenClipViT if isinstance(model, VisionTransformer) else None
