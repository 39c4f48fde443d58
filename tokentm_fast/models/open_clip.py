"""Adapter for open_clip ``VisionTransformer`` (a CLIP model's ``model.visual``).

``ResidualAttentionBlock``: ``x + ls_1(attn(ln_1(x)))`` (an
``nn.MultiheadAttention``), then ``x + ls_2(mlp(ln_2(x)))``. Head: class-token
or average pooling with ``ln_post`` (before or after the pooling), then
``@ proj``; the output is the image embedding ``(B, D')``, so an explanation
needs a callable target (e.g. the cosine similarity to a text embedding).
Install with ``pip install "tokentm_fast[clip]"``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from ._mha import check_mha, mha_forward
from .protocol import AttentionCore, PatchedForward, ViTAdapter

POOL_TYPES = {"tok": "token", "avg": "avg"}


def open_clip_classes():
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'open_clip models need open_clip_torch: pip install "tokentm_fast[clip]" ({e})') from e
    return VisionTransformer, ResidualAttentionBlock


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
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("unsupported model: attentional pooling head (attentional_pool=True)")
        if model.pool_type not in POOL_TYPES:
            raise ValueError(f"unsupported model: pool_type={model.pool_type!r}; supported: {tuple(POOL_TYPES)}")
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_class_token = True
        self.num_prefix_tokens = 1
        self.pooling = POOL_TYPES[model.pool_type]
        self.in_chans = int(model.conv1.in_channels)
        self.num_classes = None

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

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        pooled = m.ln_post(self._pool(tokens)) if m.final_ln_after_pool else self._pool(m.ln_post(tokens))
        return pooled @ m.proj if m.proj is not None else pooled

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        m = self.model
        v = m.ln_post(v)
        return v @ m.proj if m.proj is not None else v

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
