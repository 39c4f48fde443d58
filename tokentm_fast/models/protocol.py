"""The adapter protocol: one family of ViTs mapped onto the notation of the method docs.

Every explanation method sees a model only through a ``ViTAdapter``. The
capture, the reference and the fast path are family-free: what differs
between timm, Hugging Face, torchvision and open_clip is which module plays
which part of a pre-norm block

    Yˡ = Xˡ⁻¹ + γ₁ ⊙ proj(concat_h(Aˡ_h V_h)),   Aˡ_h = softmax(scale · Q_h K_hᵀ)
    Xˡ = Yˡ + γ₂ ⊙ MLP(LN₂(Yˡ))

and how the model's head maps the last tokens ``Xᴸ`` to its output. An
adapter provides exactly that:

====================================  =========================================================
``blocks``                            the L blocks in order (their input is Xˡ⁻¹, output Xˡ)
``replace_attention(layers, core)``   the attention call site: ``o = core(l, q, k, v, scale)``, or
                                      ``core(l, q, k, v, scale, bias=B)`` where the logits get an additive bias
``attn_output(l, o)``                 γ₁ ⊙ proj(o) for mixed heads ``o`` (B, N, H·d)
``mlp_branch(l, y)``                  γ₂ ⊙ MLP(LN₂(y)) (no residual)
``mlp_points(l)``                     (module whose first input is Yˡ, module whose output is γ₂ ⊙ MLP)
``head(tokens)``                      the model's head on (B, N, D) tokens → output (B, K) or (B, D')
``pooled_head(v)``                    the head after its token pooling, on a (B, D) vector (final norm, proj)
``forward(images)``                   the model's output for (B, C, H, W) images
``check_image_size(h, w)``            the patch grid (gh, gw) of an accepted image size
====================================  =========================================================

and, for the relevance pass of the LRP family (docs/methods.md §6.3), where the block's linear
layers read their inputs: ``relevance_linears(l)``, ``head_linears()`` and ``embedding_points()``.

plus the token layout (``num_prefix_tokens``, ``has_class_token``,
``pooling``, one of ``POOLINGS``) and ``num_classes`` (``None`` when the output is an embedding).

A family whose attention adds a bias to the logits (BEiT's relative position bias) hands the core that bias
in table form (``relative_bias.RelativePositionBias``: the table, the grid, the prefix) where it is a table
lookup, or ``bias (1 or B, H, N, N)`` where it is not (Hugging Face's ``interpolate_pos_encoding``): the
materialized path computes ``softmax(scale · Q Kᵀ + bias)`` (writing a table out), the flash kernels read the
table inside their tiles and refuse a dense bias with the reason.
"""
from __future__ import annotations

import abc
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

#: ``core(l, q, k, v, scale, bias=None) -> o``; q, k, v, o: (B, H, N, d); bias: None, a ``RelativePositionBias`` (the
#: table form) or (1 or B, H, N, N), added to the logits ``scale · Q Kᵀ`` before the softmax. A call site passes
#: ``bias`` only when its model has one, so a core of a bias-free model may take five arguments.
AttentionCore = Callable[..., torch.Tensor]

_MISSING = object()

#: how a head pools the last tokens ``(B, N, D)`` before its norm / projection / classifier
#: (``ViTAdapter.pooling``; ``pool_tokens`` computes it, ``pooled_rows`` names the averaged rows):
POOLINGS = {
    "token": "the class token, row 0",
    "avg": "the mean of the pooled rows (the patch rows, or all rows with pool_include_prefix)",
    "map": "an attention pool (attention_pool): a learned latent attends to the tokens, its first latent",
    "token_avg": "the class token concatenated with the mean of the pooled rows, (B, 2·D) (Hugging Face "
                 "Dinov2ForImageClassification)",
}


@dataclass(frozen=True)
class LinearPoint:
    """A linear map ``z = W x (+ b)`` of the model and where its input ``x`` can be read.

    ``module``: a module whose first input (``output=False``) or output (``output=True``) is ``x``
    ``(B, N, in)`` or ``(B, in)``; ``weight``: ``W (out, in)``.
    """

    module: nn.Module
    weight: torch.Tensor
    output: bool = False


@dataclass(frozen=True)
class BlockLinears:
    """The linear maps of a pre-norm block: ``qkv`` (weight ``(3·H·d, D)``, rows ordered q | k | v, each
    ``(H, d)`` head-major), ``proj`` ``(D, H·d)``, ``fc1`` ``(F, D)``, ``fc2`` ``(D, F)``."""

    qkv: LinearPoint
    proj: LinearPoint
    fc1: LinearPoint
    fc2: LinearPoint


@dataclass(frozen=True)
class PoolLinears:
    """The linear maps of an attention pool, for the relevance pass (docs/methods.md §6.3): ``kv`` (weight
    ``(2·E, D)``: the key rows, then the value rows, each ``(H, d)`` head-major; its input the tokens the
    pool reads after any norm of its own, ``(B, M, D)``) and ``proj`` ``(E, E)`` (its input the heads
    merged, ``(B, Lq, E)``). A pool with a residual MLP after its attention (timm ``"map"``, SigLIP; not
    CoCa) also gives ``latent``, where the latents entering that residual are read (weight unused),
    ``fc1`` ``(F, E)``, ``fc2`` ``(E, F)`` and ``mlp``, where the MLP's output is read (weight unused)."""

    kv: LinearPoint
    proj: LinearPoint
    latent: Optional[LinearPoint] = None
    fc1: Optional[LinearPoint] = None
    fc2: Optional[LinearPoint] = None
    mlp: Optional[LinearPoint] = None


@dataclass(frozen=True)
class EmbeddingPoints:
    """The token embedding: ``conv`` the patch embedding on the pixels (kernel = stride = patch),
    ``tokens`` where the tokens after the position embedding ``(B, N, D)`` can be read (its ``weight`` is
    unused), ``prefix`` the learned prefix tokens ``(P, D)`` in the order they are concatenated."""

    conv: nn.Conv2d
    tokens: LinearPoint
    prefix: torch.Tensor


class PatchedForward:
    """Handle of an instance-level ``forward`` override; ``remove()`` puts the old one back."""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward", _MISSING)
        module.forward = types.MethodType(forward, module)

    def remove(self) -> None:
        if self.module is None:
            return
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous
        self.module = None


def no_relevance_pass(what: str) -> ValueError:
    """The error of a model part the LRP relevance pass (docs/methods.md §6.3) does not cover."""
    return ValueError(f"the LRP relevance pass (lrp, partial_lrp, transformer_attribution) does not cover {what}")


def linear_point(module: nn.Module) -> LinearPoint:
    """The point of an ``nn.Linear`` (its input, its weight)."""
    return LinearPoint(module, module.weight)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d) -> (B, N, H·d)``."""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H·d) -> (B, H, N, d)``."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


class ViTAdapter(abc.ABC):
    """One model family in the notation of the method docs (see the module docstring).

    Subclasses set, in ``__init__``: ``model``, ``blocks``, ``num_heads``,
    ``num_prefix_tokens``, ``has_class_token``, ``pooling`` (a key of
    ``POOLINGS``), ``pool_include_prefix``, ``num_classes`` (``None``: the output
    is an embedding), ``in_chans``; and implement the abstract methods.
    """

    family: str = ""
    #: keyword under which a block may receive its input tokens instead of positionally
    block_input_kwarg: str = "hidden_states"

    model: nn.Module
    blocks: List[nn.Module]
    num_heads: int
    num_prefix_tokens: int
    has_class_token: bool
    pooling: str
    pool_include_prefix: bool = False
    #: the head's attention pool (a learned latent query attending to the final tokens: timm
    #: ``global_pool="map"``), or None; with one, ``replace_pool_attention``, ``pool_value_tokens`` and
    #: ``pool_head`` are implemented and the explanations start at the pool (docs/methods.md §6.1)
    attention_pool: Optional[nn.Module] = None
    num_classes: Optional[int]
    in_chans: int
    #: why the flash path cannot serve this model (None: it can); the entry (``tokentm_fast.api``) refuses
    #: ``attention="flash"`` with it and resolves ``"auto"`` to the materialized path
    flash_refusal: Optional[str] = None

    # -- the parts of a block ------------------------------------------------
    @abc.abstractmethod
    def replace_attention(self, layers: Sequence[int], core: AttentionCore, handles: list) -> None:
        """Make block l's attention (for each l in layers) compute ``o = core(l, q, k, v, scale)``
        instead of ``softmax(scale · q kᵀ) v`` (``core(l, q, k, v, scale, bias=B)`` instead of
        ``softmax(scale · q kᵀ + B) v`` where the model adds a bias to the logits: a ``RelativePositionBias``
        where it is a table lookup, else ``B (1 or B, H, N, N)``).

        q, k, v: ``(B, H, N, d)`` after any q/k normalisation and before scaling;
        scale: the model's own softmax scale (float); o: ``(B, H, N, d)`` in q's
        dtype. Everything else (merging heads, any output norm, proj,
        LayerScale, MLP) is unchanged. Appends to ``handles`` objects with a
        ``.remove()`` method that undo the change.
        """

    @abc.abstractmethod
    def attn_output(self, l: int, o: torch.Tensor) -> torch.Tensor:
        """``γ₁ ⊙ proj(o)`` of block l for mixed heads ``o (B, N, H·d)`` → ``(B, N, D)``."""

    @abc.abstractmethod
    def mlp_branch(self, l: int, y: torch.Tensor) -> torch.Tensor:
        """``γ₂ ⊙ MLP(LN₂(y))`` of block l, ``(B, N, D) → (B, N, D)`` (no residual)."""

    @abc.abstractmethod
    def mlp_points(self, l: int) -> Tuple[nn.Module, nn.Module]:
        """Hook points of block l: (module whose first input is Yˡ, module whose output is γ₂ ⊙ MLP)."""

    @abc.abstractmethod
    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's head on ``(B, N, D)`` tokens of any layer → output ``(B, K)`` (or ``(B, D')``)."""

    @abc.abstractmethod
    def pooled_head(self, v: torch.Tensor) -> torch.Tensor:
        """The part of the head after the token pooling, on a pooled vector ``v (B, D)``: the model's final
        norm, then its projection / classifier (timm: ``norm``, ``fc_norm``, ``head``; CLIP towers:
        the final norm, then ``proj``) → output ``(B, K)`` (or ``(B, D')``). LeGrad's
        ``layer_pooling="mean"`` scores layer l as ``pooled_head(mean over all tokens of Xˡ)``
        (docs/methods.md §6)."""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output (logits or embedding) for ``images (B, C, H, W)``."""

    @abc.abstractmethod
    def check_image_size(self, h: int, w: int) -> Tuple[int, int]:
        """Raise ``ValueError`` if the model does not take ``h × w`` images; else the grid ``(gh, gw)``."""

    # -- attention-pool heads (adapters whose ``attention_pool`` is set) -------
    def replace_pool_attention(self, core: Callable, handles: list) -> None:
        """Make the pool's attention compute ``o = core(q, k, v, scale)``: q ``(B, H, Lq, d)`` of the
        latents, k, v ``(B, H, M, d)`` of the M tokens the pool reads (``pool_columns``), o ``(B, H, Lq, d)``."""
        raise NotImplementedError(f"{type(self).__name__} has no attention pool")

    def pool_value_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """x̃ of the pool: its output projection of the value tokens ``(B, M, H·d)`` → ``(B, M, D')``, D' the
        width of the pool's latents (D' = D but for a pool narrower than the blocks, as in CoCa)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention pool")

    def pool_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's head from the pool on: the pool applied to ``tokens (B, N, D)`` of any layer (no final
        norm before it), its first latent, then the projection / classifier → output."""
        raise NotImplementedError(f"{type(self).__name__} has no attention pool")

    def pool_columns(self, num_tokens: int) -> slice:
        """The tokens the attention pool reads (all, or the patch tokens without the prefix)."""
        return slice(0 if self.pool_include_prefix else self.num_prefix_tokens, num_tokens)

    # -- the relevance pass (LRP family, docs/methods.md §6.3) ---------------------
    def relevance_linears(self, l: int) -> BlockLinears:
        """Block l's linear maps and where their inputs are read (``BlockLinears``)."""
        raise NotImplementedError(f"the {self.family} adapter has no relevance pass")

    def head_linears(self) -> List[LinearPoint]:
        """The head's linear maps after its token pooling, in forward order (empty when the output is the
        pooled vector). A point whose input is read as tokens ``(B, N, D)`` is pooled by ``pool_tokens``."""
        raise NotImplementedError(f"the {self.family} adapter has no relevance pass")

    def embedding_points(self) -> EmbeddingPoints:
        """The patch embedding, the tokens after the position embedding and the prefix tokens."""
        raise NotImplementedError(f"the {self.family} adapter has no relevance pass")

    def pool_linears(self) -> PoolLinears:
        """The attention pool's linear maps and where their inputs are read (``PoolLinears``)."""
        raise no_relevance_pass(f"the attention pool of the {self.family} adapter")

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's token pooling of ``(B, N, D)`` tokens → ``(B, D)`` (class token, or the mean of the
        pooled rows; ``"token_avg"``: both concatenated, ``(B, 2·D)``); after an attention pool, of its
        ``(B, Lq, E)`` latents: the first latent."""
        if self.pooling == "token" or self.attention_pool is not None:
            return tokens[:, 0]
        mean = tokens[:, self.pooled_rows(tokens.shape[1])].mean(1)
        return torch.cat([tokens[:, 0], mean], dim=-1) if self.pooling == "token_avg" else mean

    # -- shared ----------------------------------------------------------------
    def with_model(self, model: nn.Module) -> "ViTAdapter":
        """The same adapter over another instance (e.g. a float64 copy) of the model."""
        return type(self)(model)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def value_tokens(self, l: int, values: torch.Tensor) -> torch.Tensor:
        """x̃ of the attention sub-layer: ``γ₁ ⊙ proj(v_j)`` for values ``(B, N, H·d)``."""
        return self.attn_output(l, values)

    def block_tail(self, l: int, x_in: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Block output ``Xˡ`` from its input ``Xˡ⁻¹`` and the mixed heads ``o (B, N, H·d)``."""
        y = x_in + self.attn_output(l, o)
        return y + self.mlp_branch(l, y)

    def block_input(self, args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
        """The tokens ``Xˡ⁻¹`` among a block's call arguments."""
        return args[0] if args else kwargs[self.block_input_kwarg]

    def with_block_input(self, args: tuple, kwargs: Dict[str, Any], x: torch.Tensor) -> Tuple[tuple, Dict[str, Any]]:
        """The call arguments with the tokens replaced by ``x``."""
        if args:
            return (x,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.block_input_kwarg: x}

    @staticmethod
    def block_output(output: Any) -> torch.Tensor:
        """The tokens ``Xˡ`` in a block's return value (a tensor, or a tuple starting with it)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def check_images(self, images: torch.Tensor) -> Tuple[int, int]:
        """Validate the layout of an image batch ``(B, C, H, W)`` (no data read); the grid ``(gh, gw)``."""
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
            hint = ""
            if images.shape[-1] == self.in_chans:
                hint = (f" (are they channels-last (B, H, W, C)? shape {tuple(images.shape)}: "
                        f"pass images.permute(0, 3, 1, 2))")
            raise ValueError(f"images have {c} channels, the model expects {self.in_chans}{hint}")
        return tuple(int(g) for g in self.check_image_size(h, w))

    def pooled_rows(self, num_tokens: int) -> slice:
        """Rows of the last layer the head reads (token pooling: the class token); the averaged rows of
        ``"avg"`` and ``"token_avg"`` (whose class row is read besides them)."""
        if self.pooling == "token":
            return slice(0, 1)
        return slice(0 if self.pool_include_prefix else self.num_prefix_tokens, num_tokens)

    def query_vector(self, batch: int, num_tokens: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """``(B, N)`` weights of the output rows an explanation reads.

        With a class token: ``one_hot(cls = 0)`` (whatever the pooling, ``"token_avg"`` included).
        Without one, the mean over the rows the pooling reads (documented choice: ``cls`` does not exist
        there, and those rows are what the head sees).
        """
        q = torch.zeros(batch, num_tokens, dtype=dtype, device=device)
        if self.has_class_token:
            q[:, 0] = 1.0
        else:
            rows = self.pooled_rows(num_tokens)
            q[:, rows] = 1.0 / (rows.stop - rows.start)
        return q
