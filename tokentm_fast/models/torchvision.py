"""Adapter for torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ...).

``EncoderBlock``: ``x = input + self_attention(ln_1(input))`` (an
``nn.MultiheadAttention``), then ``x + mlp(ln_2(x))``; no LayerScale. Head:
``heads(encoder.ln(X)[:, 0])``. Install with ``pip install "tokentm_fast[torchvision]"``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from ._mha import check_mha, mha_forward
from .protocol import (
    AttentionCore,
    BlockLinears,
    EmbeddingPoints,
    LinearPoint,
    PatchedForward,
    ViTAdapter,
    linear_point,
)


def torchvision_classes():
    try:
        from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'torchvision models need torchvision: pip install "tokentm_fast[torchvision]" ({e})') from e
    return VisionTransformer, EncoderBlock


class TorchvisionViT(ViTAdapter):
    """Adapter over a torchvision ``VisionTransformer``."""

    family = "torchvision"
    block_input_kwarg = "input"

    def __init__(self, model: nn.Module) -> None:
        VisionTransformer, EncoderBlock = torchvision_classes()
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"expected a torchvision VisionTransformer, got {type(model).__name__}")
        self.model = model
        self.blocks = list(model.encoder.layers)
        if not self.blocks:
            raise ValueError("model has no transformer blocks")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not EncoderBlock.forward:
                raise ValueError(f"unsupported model: block {i} is a {type(blk).__name__}, not an EncoderBlock")
            check_mha(blk.self_attention, f"block {i} attention")
        self.num_heads = self.blocks[0].self_attention.num_heads
        self.has_class_token = True
        self.num_prefix_tokens = 1
        self.pooling = "token"
        self.in_chans = int(model.conv_proj.in_channels)
        self.num_classes = int(model.num_classes)

    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].self_attention, mha_forward(core, l)))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        return self.blocks[l].self_attention.out_proj(o)

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.mlp(blk.ln_2(y))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        blk = self.blocks[l]
        return blk.ln_2, blk.mlp

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.heads(self.model.encoder.ln(tokens)[:, 0])

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        return self.model.heads(self.model.encoder.ln(v))

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        blk = self.blocks[l]
        sa = blk.self_attention
        return BlockLinears(LinearPoint(blk.ln_1, sa.in_proj_weight, output=True), linear_point(sa.out_proj),
                            linear_point(blk.mlp[0]), linear_point(blk.mlp[3]))

    def head_linears(self) -> List[LinearPoint]:
        return [linear_point(m) for m in self.model.heads if isinstance(m, nn.Linear)]

    def embedding_points(self) -> EmbeddingPoints:
        m = self.model
        return EmbeddingPoints(m.conv_proj, LinearPoint(m.encoder.dropout, m.conv_proj.weight), m.class_token[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        size, p = self.model.image_size, self.model.patch_size
        if (h, w) != (size, size):
            raise ValueError(f"images are {h}x{w}, the model expects {size}x{size}")
        return h // p, w // p


def adapter_class(model: nn.Module):
    VisionTransformer, _ = torchvision_classes()
    return TorchvisionViT if isinstance(model, VisionTransformer) else None
