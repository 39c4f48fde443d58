"""Adapter for Hugging Face ``transformers`` BEiT and data2vec-vision models (pixel_values in).

Supported classes:

- ``BeitModel`` (with its pooling layer, the default) and ``BeitForImageClassification`` (transformers 5
  layout: ``beit.layers``, attention ``q_proj`` / ``k_proj`` (no bias) / ``v_proj`` / ``o_proj``, the
  relative position bias handed to the attention as its ``attention_mask``);
- ``Data2VecVisionModel`` (built with ``add_pooling_layer=True``) and ``Data2VecVisionForImageClassification``
  (the older BEiT layout transformers keeps for data2vec: ``encoder.layer``, self-attention ``query`` /
  ``key`` / ``value`` adding its relative position bias itself, ``attention.output.dense``,
  ``intermediate.dense`` / ``output.dense``).

Block (both layouts): ``x + λ₁ ⊙ attn(LN_before(x))``, then ``+ λ₂ ⊙ MLP(LN_after(x))`` (λ = ``lambda_1`` /
``lambda_2``, LayerScale; 1 when the config's ``layer_scale_init_value`` is 0). The attention logits are
``scale · Q Kᵀ + B``: ``B (1, H, N, N)`` the relative position bias, per head, gathered from a
``((2gh−1)(2gw−1)+3)``-entry table by the relative position of the two patches (three entries for the class
token's row, column and corner), per layer (``use_relative_position_bias``), shared by every layer
(``use_shared_relative_position_bias``), or both summed. The call site hands the core the bias in table form (``relative_bias.RelativePositionBias``: the table, the grid,
the class token; two tables summed where both exist), never the ``(1, H, N, N)`` bias the model gathers in its own
forward: the bias modules (the layer's ``relative_position_bias``, the model's ``shared_position_bias`` /
the encoder's ``relative_position_bias``) are bypassed while the adapter's attention runs (the shared one only when
every layer's attention is the adapter's; a layer left to the model's own attention gets the dense bias). At
another grid than the config's transformers resizes the table bilinearly (its ``(2gh−1)(2gw−1)`` entries; the
three class-token entries kept): the table form is that resized table, still a lookup by relative position. With
``interpolate_pos_encoding`` transformers resizes the ``(N, N)`` bias itself bilinearly, which is no table lookup:
the core then gets the dense bias, which the materialized path serves and the flash path refuses with the reason
(the adapter's own ``forward`` never asks for it). Both attention paths serve the model: the materialized one
writes the bias out (``RelativePositionBias.dense``), the flash kernels read the table inside their tiles.

Head: with ``use_mean_pooling`` (the BEiT classifiers) the mean of the patch tokens, then the pooler's
LayerNorm (the final ``layernorm`` is the identity): pooling ``"avg"``; otherwise the final ``layernorm``, then
the class token: pooling ``"token"``; then ``classifier`` for the ``...ForImageClassification`` classes (the
models output the ``pooler_output``, an embedding). A model without its pooling layer (its output the token
sequence) is refused.

The LRP relevance pass (docs/methods.md §6.3) takes the relative position bias: the logits scale·(QKᵀ + B/scale)
are split by the residual add rule between QKᵀ and the bias (the core records ``B / scale`` as ``"bias"``), the
q·kᵀ product rule then runs on QKᵀ's share; the bias's share is dropped.

Install with ``pip install "tokentm_fast[hf]"``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .protocol import (
    AttentionCore,
    BlockLinears,
    EmbeddingPoints,
    LinearPoint,
    PatchedForward,
    ViTAdapter,
    linear_point,
)
from .relative_bias import RelativePositionBias, bypass_bias_module, takes_table

#: model kind -> (transformers class name, attribute of the backbone inside it or "" for the backbone itself)
KINDS: Dict[str, Tuple[str, str]] = {
    "beit": ("BeitModel", ""),
    "beit_classifier": ("BeitForImageClassification", "beit"),
    "data2vec": ("Data2VecVisionModel", ""),
    "data2vec_classifier": ("Data2VecVisionForImageClassification", "data2vec_vision"),
}

def hf_table(module: nn.Module, grid: Tuple[int, int]) -> RelativePositionBias:
    """The table form of a transformers ``BeitRelativePositionBias`` / ``Data2VecVisionRelativePositionBias`` at
    ``grid`` (gh, gw): its table as the module resizes it (bilinear over the ``(2gh−1)(2gw−1)`` relative
    positions, laid out as transformers reads them; the three class-token entries kept; the table itself at the
    module's own grid)."""
    table = module.relative_position_bias_table
    old = tuple(module.window_size)
    if tuple(grid) != old:
        r_old = module.num_relative_distance
        new_h, new_w = 2 * grid[0] - 1, 2 * grid[1] - 1
        sub = table[: r_old - 3].reshape(1, 2 * old[1] - 1, 2 * old[0] - 1, -1).permute(0, 3, 1, 2)
        sub = nn.functional.interpolate(sub, size=(new_h, new_w), mode="bilinear")
        table = torch.cat([sub.permute(0, 2, 3, 1).reshape(new_h * new_w, -1), table[r_old - 3:]])
    return RelativePositionBias(table, (int(grid[0]), int(grid[1])), 1)


def _table_or_none(module: nn.Module):
    """``table(window_size, interpolate_pos_encoding=False, dim_size=None)``: the table form of the bias module's
    call, None where transformers resizes the (N, N) bias (no table lookup)."""
    def table(window_size, interpolate_pos_encoding: bool = False, dim_size=None):
        return None if interpolate_pos_encoding else hf_table(module, window_size)
    return table


def beit_classes() -> Dict[str, type]:
    """kind -> the transformers class (``KINDS``)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'Hugging Face models need transformers: pip install "tokentm_fast[hf]" ({e})') from e
    try:
        return {kind: getattr(transformers, name) for kind, (name, _) in KINDS.items()}
    except AttributeError as e:  # pragma: no cover - depends on the transformers version
        raise ImportError(f"this transformers has no BEiT / data2vec-vision classes ({e})") from e


def _kind(model: nn.Module) -> str:
    for kind, cls in beit_classes().items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"expected one of the transformers classes {', '.join(n for n, _ in KINDS.values())}, "
                    f"got {type(model).__name__}")


def _no_mask(kind: str) -> None:
    raise ValueError(f"explanations take unmasked attention (the {kind} attention got a mask besides its bias)")


def _beit_attention_forward(core: AttentionCore, l: int):
    """``BeitAttention.forward`` (transformers 5) with ``core`` in place of the attention interface; the
    model's ``attention_mask`` is the relative position bias (table form, or ``(1, H, N, N)`` where the model's own
    bias module ran; or None), handed to the core."""

    @takes_table
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            _no_mask("BEiT")
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        scale = float(self.scaling)
        o = core(l, q, k, v, scale) if attention_mask is None else core(l, q, k, v, scale, bias=attention_mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1)), None

    return forward


def _data2vec_attention_forward(core: AttentionCore, l: int):
    """``Data2VecVisionSelfAttention.forward`` (eager or SDPA) with ``core`` in place of softmax(·) V; the bias
    the layer's own table gives plus the shared one (either may be absent) handed to the core, in table form (the
    layer's table read here, not gathered into (1, H, N, N)) save where ``interpolate_pos_encoding`` resizes it."""

    @takes_table
    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False,
                relative_position_bias: Optional[torch.Tensor] = None, interpolate_pos_encoding: bool = False,
                resolution: Optional[Tuple[int, int]] = None):
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        bias = relative_position_bias
        if self.has_relative_position_bias:
            height, width = resolution
            grid = (height // self.config.patch_size, width // self.config.patch_size)
            own = (self.relative_position_bias(grid, interpolate_pos_encoding, dim_size=n) if interpolate_pos_encoding
                   else hf_table(self.relative_position_bias, grid))
            bias = own if bias is None else own + bias
        scale = float(self.attention_head_size) ** -0.5
        o = core(l, q, k, v, scale) if bias is None else core(l, q, k, v, scale, bias=bias)
        return (o.transpose(1, 2).reshape(b, n, -1),)

    return forward


class _Parts:
    """Where one layout keeps a block's parts: ``attention`` (the module whose forward is replaced), ``qkv``
    (the q, k, v linears), ``proj``, ``fc1``, ``fc2`` and the activation between them."""

    def __init__(self, blk: nn.Module, data2vec: bool) -> None:
        if data2vec:
            self.attention = blk.attention.attention
            a = self.attention
            self.qkv = (a.query, a.key, a.value)
            self.proj = blk.attention.output.dense
            self.fc1, self.act, self.fc2 = blk.intermediate.dense, blk.intermediate.intermediate_act_fn, blk.output.dense
        else:
            self.attention = a = blk.attention
            self.qkv = (a.q_proj, a.k_proj, a.v_proj)
            self.proj = a.o_proj
            self.fc1, self.act, self.fc2 = blk.mlp.fc1, blk.mlp.activation_fn, blk.mlp.fc2


def _scaled(gamma, x: torch.Tensor) -> torch.Tensor:
    """LayerScale ``γ ⊙ x``; ``gamma`` a parameter, or None / the float 1.0 of a model without LayerScale."""
    return x if gamma is None or (isinstance(gamma, float) and gamma == 1.0) else gamma * x


class HFBeit(ViTAdapter):
    """Adapter over a Hugging Face BEiT or data2vec-vision model (see the module docstring).

    Raises:
        TypeError: ``model`` is not one of the BEiT / data2vec-vision classes.
        ValueError: a part of the model is not supported (the message names it).
    """

    family = "hf_beit"
    block_input_kwarg = "hidden_states"

    def __init__(self, model: nn.Module) -> None:
        self.kind = _kind(model)
        self.model = model
        inner = KINDS[self.kind][1]
        self.base = getattr(model, inner) if inner else model
        self.classifies = self.kind.endswith("classifier")
        self.data2vec = self.kind.startswith("data2vec")
        name = type(model).__name__
        layers = getattr(getattr(self.base, "encoder", None), "layer", None) if self.data2vec else \
            getattr(self.base, "layers", None)
        if layers is None or not len(layers):
            raise ValueError(f"unsupported {name} layout: no list of blocks (this adapter follows transformers 5)")
        self.blocks = list(layers)
        try:
            self.parts = [_Parts(blk, self.data2vec) for blk in self.blocks]
        except AttributeError as e:
            raise ValueError(f"unsupported {name} layout: {e} (this adapter follows transformers 5)") from e
        if self.base.pooler is None:
            raise ValueError(f"unsupported model: {name} without its pooling layer outputs the token sequence, not "
                             f"a vector to explain; build it with add_pooling_layer=True")
        config = self.base.config
        self.num_heads = int(config.num_attention_heads)
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.mean_pooling = self.base.pooler.layernorm is not None
        self.pooling = "avg" if self.mean_pooling else "token"
        self.pool_include_prefix = False
        self.in_chans = int(config.num_channels)
        p = config.patch_size
        self.patch_size = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
        self.num_classes = int(config.num_labels) if self.classifies and isinstance(model.classifier, nn.Linear) \
            else None
        self.has_bias = bool(config.use_relative_position_bias or config.use_shared_relative_position_bias)
        self.flash_refusal = None

    # -- protocol ------------------------------------------------------------
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        """The adapter's attention forward on ``layers``, the bias in table form (module docstring): the layers'
        own bias modules (BEiT) bypassed, the shared one while every layer runs the adapter's attention."""
        make = _data2vec_attention_forward if self.data2vec else _beit_attention_forward
        for l in layers:
            handles.append(PatchedForward(self.parts[l].attention, make(core, l)))
            own = None if self.data2vec else self.blocks[l].relative_position_bias
            if own is not None:
                bypass_bias_module(own, _table_or_none(own), handles)
        shared = self.base.encoder.relative_position_bias if self.data2vec and \
            self.base.encoder.has_relative_position_bias else getattr(self.base, "shared_position_bias", None)
        if shared is not None:
            bypass_bias_module(shared, _table_or_none(shared), handles, [p.attention for p in self.parts])

    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        return _scaled(self.blocks[l].lambda_1, self.parts[l].proj(o))

    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        blk, part = self.blocks[l], self.parts[l]
        return _scaled(blk.lambda_2, part.fc2(part.act(part.fc1(blk.layernorm_after(y)))))

    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        """``layernorm_after`` (its input is Yˡ) and ``drop_path``: λ₂ is a parameter, not a module, so no
        module of the block outputs λ₂ ⊙ MLP but ``drop_path`` (the identity outside training), which the block
        calls on both scaled branches, the MLP's last: the record keeps the last call's output."""
        blk = self.blocks[l]
        return blk.layernorm_after, blk.drop_path

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, pooler (patch mean + its LayerNorm, or the class token), then the classifier."""
        out = self.base.pooler(self.base.layernorm(tokens))
        return self.model.classifier(out) if self.classifies else out

    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        x = self.base.layernorm(v)
        if self.mean_pooling:
            x = self.base.pooler.layernorm(x)
        return self.model.classifier(x) if self.classifies else x

    # -- the relevance pass ------------------------------------------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        part = self.parts[l]
        qkv = torch.cat([m.weight for m in part.qkv])
        return BlockLinears(LinearPoint(part.qkv[0], qkv), linear_point(part.proj), linear_point(part.fc1),
                            linear_point(part.fc2))

    def head_linears(self) -> List[LinearPoint]:
        return [linear_point(self.model.classifier)] if self.num_classes is not None else []

    def embedding_points(self) -> EmbeddingPoints:
        emb = self.base.embeddings
        conv = emb.patch_embeddings.projection
        return EmbeddingPoints(conv, LinearPoint(emb, conv.weight, output=True), emb.cls_token[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        return out.logits if self.classifies else out.pooler_output

    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        """Any size divisible by the patch size: transformers resizes the absolute position embedding
        (bicubic) and the relative position bias table (bilinear) to the grid."""
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw


def adapter_class(model: nn.Module):
    return HFBeit if isinstance(model, tuple(beit_classes().values())) else None
