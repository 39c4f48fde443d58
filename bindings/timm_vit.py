"""Model adapter for timm ``VisionTransformer``: which module is which.

Everything the capture and the methods need to know about a timm ViT lives
here: the checks that a model is supported (with an error naming the part that
is not), the image checks, the patch grid, and the three pieces of the block
that the spec names (METHODS.md §1, §2, §6):

- ``value_tokens``  x̃ʲ = γ₁ ⊙ proj(v_j): what token j writes when every head
  attends to it alone;
- ``block_tail``    the rest of a block after the attention mixing
  (``Y = X + γ₁ ⊙ proj(o)``, ``X' = Y + γ₂ ⊙ MLP(LN₂(Y))``);
- ``head_logits``   the model's own head on any layer's tokens
  (final norm, pooling, fc norm, classifier).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

SUPPORTED_POOLING = ("token", "avg")


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


class TimmViT:
    """Adapter over a timm ``VisionTransformer`` (pre-norm blocks, explicit-able attention).

    Raises:
        TypeError: ``model`` is not a timm VisionTransformer.
        ValueError: a part of the model is not supported (the message names it).
    """

    def __init__(self, model: nn.Module) -> None:
        VisionTransformer, Block, Attention = _timm_classes()
        if not isinstance(model, VisionTransformer):
            raise TypeError(
                f"expected a timm VisionTransformer (vit_*, deit_*, deit3_*, ...), got {type(model).__name__}"
            )
        self.model = model
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
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("unsupported model: attention-pooling head (global_pool='map')")
        if model.global_pool not in SUPPORTED_POOLING:
            raise ValueError(
                f"unsupported model: global_pool={model.global_pool!r}; supported: {SUPPORTED_POOLING}"
            )
        self.has_class_token = bool(getattr(model, "has_class_token", model.cls_token is not None))
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pooling = model.global_pool
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        patch_embed = model.patch_embed
        self.in_chans = patch_embed.proj.in_channels
        self.patch_size = tuple(patch_embed.patch_size)
        self.num_classes = int(model.num_classes)
        if self.num_classes <= 0:
            raise ValueError("unsupported model: no classifier head (num_classes=0)")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].attn.num_heads

    def check_images(self, images: torch.Tensor) -> Tuple[int, int]:
        """Validate an image batch ``(B, C, H, W)``; return the patch grid ``(gh, gw)``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have rank 4 (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating point tensor, got dtype {images.dtype}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if c != self.in_chans:
            raise ValueError(f"images have {c} channels, the model expects {self.in_chans}")
        pe = self.model.patch_embed
        dynamic = bool(getattr(self.model, "dynamic_img_size", False))
        if pe.img_size is not None and getattr(pe, "strict_img_size", True) and not dynamic:
            if (h, w) != tuple(pe.img_size):
                raise ValueError(
                    f"images are {h}x{w}, the model expects {pe.img_size[0]}x{pe.img_size[1]} "
                    f"(create it with img_size=... or dynamic_img_size=True for other sizes)"
                )
        elif not getattr(pe, "dynamic_img_pad", False):
            ph, pw = self.patch_size
            if h % ph or w % pw:
                raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values")
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size((h, w)))
        return h // self.patch_size[0], w // self.patch_size[1]

    def pooled_rows(self, num_tokens: int) -> slice:
        """Rows of the last layer the classifier reads (token pooling: the class token)."""
        if self.pooling == "token":
            return slice(0, 1)
        return slice(0 if self.pool_include_prefix else self.num_prefix_tokens, num_tokens)

    def query_vector(self, batch: int, num_tokens: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """``(B, N)`` weights of the output rows an explanation reads.

        With a class token: ``one_hot(cls = 0)`` (spec §1). Without one, the
        mean over the rows the pooling reads (documented choice: the spec's
        ``cls`` does not exist there, and those rows are what the head sees).
        """
        q = torch.zeros(batch, num_tokens, dtype=dtype, device=device)
        if self.has_class_token:
            q[:, 0] = 1.0
        else:
            rows = self.pooled_rows(num_tokens)
            q[:, rows] = 1.0 / (rows.stop - rows.start)
        return q

    @staticmethod
    def value_tokens(block: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """x̃ of the attention sub-layer (spec §2): ``γ₁ ⊙ proj(norm(v_j))``, ``(B, N, D)``."""
        attn = block.attn
        return block.ls1(attn.proj(attn.norm(values)))

    @staticmethod
    def block_tail(block: nn.Module, x_in: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Block output ``Xˡ`` from its input ``Xˡ⁻¹`` and the mixed heads ``o = concat_h(A_h V_h)``."""
        attn = block.attn
        y = x_in + block.ls1(attn.proj(attn.norm(attn_out)))
        return y + block.ls2(block.mlp(block.norm2(y)))

    def head_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's head on ``(B, N, D)`` tokens of any layer → ``(B, K)`` logits."""
        return self.model.forward_head(self.model.norm(tokens))
