"""Adapter for Hugging Face ``transformers`` DINOv2 models (pixel_values in).

Supported classes (transformers 5 layout):

- ``Dinov2Model``, ``Dinov2WithRegistersModel``: output the ``pooler_output``, the class token after the
  final ``layernorm`` (an embedding); pooling ``"token"``;
- ``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification``: logits of
  ``classifier(concat(cls, mean of the patch tokens))`` after the final ``layernorm``, the register
  tokens left out of the mean: pooling ``"token_avg"`` (``protocol.POOLINGS``).

Block ``Dinov2Layer``: ``x + layer_scale1(attention(norm1(x)))``, then
``+ layer_scale2(mlp(norm2(x)))``: LayerScale γ₁ = ``layer_scale1.lambda1``, γ₂ = ``layer_scale2.lambda1``;
attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` and ``o_proj``; the MLP ``fc1``, GELU,
``fc2`` or (``use_swiglu_ffn``, the giant models) a SwiGLU FFN. Embeddings: the class token and the patch
embedding plus a position embedding interpolated (bicubic) to the image's grid, then the register tokens
(no position embedding) after the class token: prefix = class token, registers.

The LRP relevance pass (docs/methods.md §6.3) covers the two-layer MLP, class-token pooling and the
``"token_avg"`` head (the classifier's input relevance split at D: the class row, then the mean rule over the
patch rows); it refuses the SwiGLU FFN (a product of two operands), naming why. Every other method runs on
every class.

Install with ``pip install "tokentm_fast[hf]"``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .hf import _attention_forward
from .protocol import (
    AttentionCore,
    BlockLinears,
    EmbeddingPoints,
    LinearPoint,
    PatchedForward,
    ViTAdapter,
    linear_point,
    no_relevance_pass,
)

#: model kind -> (transformers class name, attribute of the backbone inside it or "" for the backbone itself)
KINDS: Dict[str, Tuple[str, str]] = {
    "model": ("Dinov2Model", ""),
    "classifier": ("Dinov2ForImageClassification", "dinov2"),
    "registers": ("Dinov2WithRegistersModel", ""),
    "registers_classifier": ("Dinov2WithRegistersForImageClassification", "dinov2_with_registers"),
}


def dinov2_classes() -> Dict[str, type]:
    """kind -> the transformers class (``KINDS``)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'Hugging Face models need transformers: pip install "tokentm_fast[hf]" ({e})') from e
    try:
        return {kind: getattr(transformers, name) for kind, (name, _) in KINDS.items()}
    except AttributeError as e:  # pragma: no cover - depends on the transformers version
        raise ImportError(f"this transformers has no DINOv2 classes ({e}); install transformers >= 5") from e


def _kind(model: nn.Module) -> str:
    for kind, cls in dinov2_classes().items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"expected one of the transformers classes {', '.join(n for n, _ in KINDS.values())}, "
                    f"got {type(model).__name__}")


class HFDinov2(ViTAdapter):
    """Adapter over a Hugging Face DINOv2 model (see the module docstring).

    Raises:
        TypeError: ``model`` is not one of the DINOv2 classes.
        ValueError: a part of the model is not supported (the message names it).
    """

    family = "hf_dinov2"
    block_input_kwarg = "hidden_states"

    def __init__(self, model: nn.Module) -> None:
        self.kind = _kind(model)
        self.model = model
        inner = KINDS[self.kind][1]
        self.base = getattr(model, inner) if inner else model
        self.classifies = self.kind.endswith("classifier")
        layers = getattr(getattr(self.base, "encoder", None), "layer", None)
        if layers is None or not len(layers):
            raise ValueError(f"unsupported {type(model).__name__} layout: no encoder.layer list of blocks")
        self.blocks = list(layers)
        for i, blk in enumerate(self.blocks):
            missing = [n for n in ("norm1", "attention", "layer_scale1", "norm2", "mlp", "layer_scale2")
                       if not hasattr(blk, n)]
            missing += [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
                        if not hasattr(getattr(blk, "attention", None), n)]
            if missing:
                raise ValueError(f"unsupported {type(model).__name__} layout: block {i} has no {missing} (this "
                                 f"adapter follows the transformers 5 layout)")
        config = self.base.config
        self.num_heads = int(config.num_attention_heads)
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = 1 + self.num_registers
        self.has_class_token = True
        self.pooling = "token_avg" if self.classifies else "token"
        self.pool_include_prefix = False
        self.in_chans = int(config.num_channels)
        p = config.patch_size
        self.patch_size = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
        labels = int(config.num_labels) if self.classifies else 0
        self.num_classes = labels if self.classifies and isinstance(model.classifier, nn.Linear) else None
        self.final_norm = self.base.layernorm

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            handles.append(PatchedForward(self.blocks[l].attention, _attention_forward(core, l, "o_proj", "scaling")))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.layer_scale1(blk.attention.o_proj(o))

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return blk.layer_scale2(blk.mlp(blk.norm2(y)))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        blk = self.blocks[l]
        return blk.norm2, blk.layer_scale2

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, then the class token (``pooler_output``) or ``classifier(concat(cls, patch mean))``."""
        x = self.final_norm(tokens)
        if not self.classifies:
            return x[:, 0]
        return self.model.classifier(self.pool_tokens(x))

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        """The head on ``v (B, D)`` standing for every token: final norm, then (classifier) the class part and
        the mean part are both ``v``: ``classifier(concat(LN(v), LN(v)))``."""
        x = self.final_norm(v)
        return self.model.classifier(torch.cat([x, x], dim=-1)) if self.classifies else x

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        blk = self.blocks[l]
        attn, mlp = blk.attention, blk.mlp
        if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")):
            raise no_relevance_pass(f"block {l}'s MLP, a {type(mlp).__name__} (the SwiGLU FFN multiplies two "
                                    f"operands, act(gate_proj(x)) ⊙ up_proj(x); the rules cover fc1, activation, fc2)")
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        return BlockLinears(LinearPoint(attn.q_proj, qkv), linear_point(attn.o_proj), linear_point(mlp.fc1),
                            linear_point(mlp.fc2))

    def head_linears(self) -> List[LinearPoint]:
        """The classifier, its input read as the tokens after the final ``layernorm`` ``(B, N, D)`` (pooled by
        ``pool_tokens`` into ``concat(cls, patch mean)``; the relevance pass splits it, docs/methods.md §6.3);
        none for the embedding models (their output is the class token)."""
        if self.classifies:
            classifier = self.model.classifier
            if not isinstance(classifier, nn.Linear):
                raise no_relevance_pass(f"a classifier that is a {type(classifier).__name__}, not an nn.Linear")
            return [LinearPoint(self.final_norm, classifier.weight, output=True)]
        return []

    def embedding_points(self) -> EmbeddingPoints:
        emb = self.base.embeddings
        conv = emb.patch_embeddings.projection
        prefix = [emb.cls_token[0]] + ([emb.register_tokens[0]] if self.num_registers else [])
        return EmbeddingPoints(conv, LinearPoint(emb, conv.weight, output=True), torch.cat(prefix))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        return out.logits if self.classifies else out.pooler_output

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        """Any size divisible by the patch size: the position embedding is interpolated to the grid."""
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw


def adapter_class(model: nn.Module):
    return HFDinov2 if isinstance(model, tuple(dinov2_classes().values())) else None
