"""Adapter for Hugging Face ``transformers`` vision models (pixel_values in).

Supported classes (transformers 5 layout: ``q_proj/k_proj/v_proj`` and
``o_proj``/``out_proj`` attention, an ``mlp`` per layer):

- ``ViTModel``, ``DeiTModel``: output the ``pooler_output`` (or the
  normalised class token when built without a pooler), an embedding;
- ``ViTForImageClassification``, ``DeiTForImageClassification``: logits of
  the class token; ``DeiTForImageClassificationWithTeacher``: the mean of the
  class-token and distillation-token classifiers;
- ``CLIPVisionModel`` (``pooler_output``), ``CLIPVisionModelWithProjection``
  (``image_embeds``): embeddings;
- ``SiglipVisionModel`` (also ``SiglipModel.vision_model``): the ``pooler_output``
  of its attention-pool head (``SiglipMultiheadAttentionPoolingHead``: a learned
  probe attends to the final, normalised tokens in an ``nn.MultiheadAttention``,
  then a residual LayerNorm + MLP), an embedding. No class token; the
  explanations start at the pool's probe (docs/methods.md §6.1). A model built
  with ``vision_use_head=False`` has no pooled output and is refused.

Install with ``pip install "tokentm_fast[hf]"``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._mha import check_mha, mha_cross_attention, mha_key_value_weight
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


def hf_classes():
    try:
        from transformers import (
            CLIPVisionModel,
            CLIPVisionModelWithProjection,
            DeiTForImageClassification,
            DeiTForImageClassificationWithTeacher,
            DeiTModel,
            SiglipVisionModel,
            ViTForImageClassification,
            ViTModel,
        )
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'Hugging Face models need transformers: pip install "tokentm_fast[hf]" ({e})') from e
    return dict(
        vit=ViTModel, vit_cls=ViTForImageClassification, deit=DeiTModel, deit_cls=DeiTForImageClassification,
        deit_teacher=DeiTForImageClassificationWithTeacher, clip=CLIPVisionModel,
        clip_proj=CLIPVisionModelWithProjection, siglip=SiglipVisionModel,
    )


def _attention_forward(core: AttentionCore, l: int, out_name: str, scale_name: str):
    """transformers' ViT / CLIP attention ``forward`` with ``core`` in place of the attention interface."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None:
            raise ValueError("explanations take unmasked attention (an attention_mask was given)")
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        o = core(l, q, k, v, float(getattr(self, scale_name)))
        out = getattr(self, out_name)(o.transpose(1, 2).reshape(b, n, -1))
        return out, None

    return forward


def _siglip_pool_forward(core):
    """``SiglipMultiheadAttentionPoolingHead.forward`` with ``core(q, k, v, scale)`` in place of
    softmax(scale · q kᵀ) v: probe → attention over the tokens → + mlp(layernorm(·)) → the probe's row."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(hidden_state.shape[0], -1, -1)
        x = mha_cross_attention(self.attention, probe, hidden_state, core)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]

    return forward


class HFViT(ViTAdapter):
    """Adapter over a Hugging Face ViT / DeiT / CLIP / SigLIP vision model (see the module docstring)."""

    family = "hf"
    block_input_kwarg = "hidden_states"

    def __init__(self, model: nn.Module) -> None:
        c = hf_classes()
        kinds = [k for k, cls in c.items() if isinstance(model, cls)]
        if not kinds:
            names = ", ".join(cls.__name__ for cls in c.values())
            raise TypeError(f"expected one of the transformers classes {names}, got {type(model).__name__}")
        self.kind = kinds[0]
        self.model = model
        self.clip = self.kind.startswith("clip") or self.kind == "siglip"    # CLIP's layer layout
        if self.clip:
            base = model
            while hasattr(base, "vision_model"):
                base = base.vision_model
            self.base = base
            layers = base.encoder.layers
            self.final_norm = base.post_layernorm
        else:
            base = getattr(model, "vit", None) or getattr(model, "deit", None) or model
            self.base = base
            layers = getattr(base, "layers", None)
            self.final_norm = base.layernorm
        if layers is None or not len(layers):
            raise ValueError(
                f"unsupported {type(model).__name__} layout: no list of layers found (this adapter follows the "
                f"transformers 5 layout, `model.layers`)"
            )
        self.blocks = list(layers)
        names = ("layer_norm1", "self_attn", "layer_norm2", "mlp") if self.clip else \
            ("layernorm_before", "attention", "layernorm_after", "mlp")
        self._ln1, self._attn, self._ln2, self._mlp = names
        for i, blk in enumerate(self.blocks):
            missing = [n for n in names if not hasattr(blk, n)]
            attn = getattr(blk, self._attn, None)
            if attn is not None:
                missing += [n for n in ("q_proj", "k_proj", "v_proj") if not hasattr(attn, n)]
            if missing:
                raise ValueError(
                    f"unsupported {type(model).__name__} layout: block {i} has no {missing} (this adapter "
                    f"follows the transformers 5 layout)"
                )
        attn0 = getattr(self.blocks[0], self._attn)
        self._out_name = "out_proj" if self.clip else "o_proj"
        self._scale_name = "scale" if self.clip else "scaling"
        self.num_heads = int(getattr(attn0, "num_heads", None) or attn0.num_attention_heads)
        config = model.config
        self.num_prefix_tokens = 2 if self.kind.startswith("deit") else 1
        self.has_class_token = True
        self.pooling = "token"
        if self.kind == "siglip":
            self.attention_pool = self._siglip_head(self.base)
            self.num_prefix_tokens = 0
            self.has_class_token = False
            self.pooling = "map"
        self.in_chans = int(config.num_channels)
        size = config.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        p = config.patch_size
        self.patch_size = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
        self.num_classes = int(config.num_labels) if self.kind in ("vit_cls", "deit_cls", "deit_teacher") else None

    @staticmethod
    def _siglip_head(base: nn.Module) -> nn.Module:
        """The attention-pool head of a SigLIP tower, checked."""
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

        head = getattr(base, "head", None)
        if not getattr(base, "use_head", head is not None) or head is None:
            raise ValueError(
                f"unsupported {type(base).__name__}: built with vision_use_head=False, it has no attention-pool "
                f"head (its pooler_output is None)"
            )
        if type(head).forward is not SiglipMultiheadAttentionPoolingHead.forward:
            raise ValueError(f"unsupported {type(base).__name__}: its head is a {type(head).__name__}; only "
                             f"SiglipMultiheadAttentionPoolingHead is supported")
        check_mha(head.attention, "the pooling head's attention")
        if not head.attention.batch_first:
            raise ValueError("unsupported model: the pooling head's attention has batch_first=False")
        return head

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        for l in layers:
            attn = getattr(self.blocks[l], self._attn)
            handles.append(PatchedForward(attn, _attention_forward(core, l, self._out_name, self._scale_name)))

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        return getattr(getattr(self.blocks[l], self._attn), self._out_name)(o)

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[l]
        return getattr(blk, self._mlp)(getattr(blk, self._ln2)(y))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        blk = self.blocks[l]
        return getattr(blk, self._ln2), getattr(blk, self._mlp)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        m, kind = self.model, self.kind
        if kind == "siglip":
            return self.attention_pool(self.final_norm(tokens))
        if self.clip:
            pooled = self.final_norm(tokens[:, 0])
            return m.visual_projection(pooled) if kind == "clip_proj" else pooled
        x = self.final_norm(tokens)
        if kind in ("vit_cls", "deit_cls"):
            return m.classifier(x[:, 0])
        if kind == "deit_teacher":
            return (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2
        return self.base.pooler(x) if self.base.pooler is not None else x[:, 0]

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        """The final norm, then the projection / classifier (SigLIP: ``post_layernorm`` only; with its
        attention pool the methods go through ``pool_head`` instead)."""
        m, kind = self.model, self.kind
        x = self.final_norm(v)
        if self.clip:
            return m.visual_projection(x) if kind == "clip_proj" else x
        if kind in ("vit_cls", "deit_cls"):
            return m.classifier(x)
        if kind == "deit_teacher":
            return (m.cls_classifier(x) + m.distillation_classifier(x)) / 2
        return self.base.pooler(x[:, None]) if self.base.pooler is not None else x

    # -- the attention pool (SigLIP) ---------------------------------------------
    def replace_pool_attention(self, core, handles: list) -> None:
        handles.append(PatchedForward(self.attention_pool, _siglip_pool_forward(core)))

    def pool_value_tokens(self, values: torch.Tensor) -> torch.Tensor:
        return self.attention_pool.attention.out_proj(values)

    def pool_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooling head on ``tokens (B, N, D)`` (no ``post_layernorm`` before it: §6): the probe's row."""
        return self.attention_pool(tokens)

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        blk = self.blocks[l]
        attn, mlp = getattr(blk, self._attn), getattr(blk, self._mlp)
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        return BlockLinears(LinearPoint(attn.q_proj, qkv), linear_point(getattr(attn, self._out_name)),
                            linear_point(mlp.fc1), linear_point(mlp.fc2))

    def pool_linears(self) -> PoolLinears:
        """SigLIP's ``SiglipMultiheadAttentionPoolingHead``: keys and values from the tokens it receives,
        ``out_proj``, then the residual MLP ``x + mlp(layernorm(x))``."""
        head = self.attention_pool
        mha, mlp = head.attention, head.mlp
        return PoolLinears(LinearPoint(head, mha_key_value_weight(mha)), linear_point(mha.out_proj),
                           LinearPoint(head.layernorm, mha.out_proj.weight), linear_point(mlp.fc1),
                           linear_point(mlp.fc2), LinearPoint(mlp, mlp.fc2.weight, output=True))

    def head_linears(self) -> List[LinearPoint]:
        m, kind = self.model, self.kind
        if kind == "deit_teacher":
            raise no_relevance_pass("a distilled model's two classifier heads")
        if kind in ("vit_cls", "deit_cls"):
            return [linear_point(m.classifier)]
        if kind == "clip_proj":
            return [linear_point(m.visual_projection)]
        if not self.clip and self.base.pooler is not None:
            return [linear_point(self.base.pooler.dense)]
        return []

    def embedding_points(self) -> EmbeddingPoints:
        emb = self.base.embeddings
        if self.kind == "siglip":   # no class token, no norm before the blocks: the embeddings' output
            conv = emb.patch_embedding
            return EmbeddingPoints(conv, LinearPoint(emb, conv.weight, output=True), conv.weight.new_zeros(0, conv.out_channels))
        if self.clip:
            return EmbeddingPoints(emb.patch_embedding, LinearPoint(self.base.pre_layrnorm, emb.patch_embedding.weight),
                                   emb.class_embedding[None])
        conv = emb.patch_embeddings.projection
        prefix = [emb.cls_token[0]] + ([emb.distillation_token[0]] if hasattr(emb, "distillation_token") else [])
        return EmbeddingPoints(conv, LinearPoint(emb, conv.weight, output=True), torch.cat(prefix))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        if self.kind == "clip_proj":
            return out.image_embeds
        if self.kind in ("vit_cls", "deit_cls", "deit_teacher"):
            return out.logits
        if self.clip or self.base.pooler is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        if (h, w) != self.image_size:
            raise ValueError(f"images are {h}x{w}, the model expects {self.image_size[0]}x{self.image_size[1]}")
        return h // self.patch_size[0], w // self.patch_size[1]


def adapter_class(model: nn.Module):
    return HFViT if isinstance(model, tuple(hf_classes().values())) else None
