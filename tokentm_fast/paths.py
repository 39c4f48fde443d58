"""The two attention paths, as strategies the methods run over (docs/methods.md §3.1, §6, §8).

A method (``tokentm_fast.methods``) says *what* it computes — which blocks, which per-layer
weights, how the rows are finished, Grad-CAM's α — and asks its path for the per-layer quantities
that involve the attention. This module is the only place where the two paths differ:

- ``Materialized(kernels)``: the attention probabilities ``Aˡ (B, H, N, N)`` (and their gradients) are
  captured as tensors by an explicit softmax, then reduced by the PyTorch functions or the fused
  Triton kernels of ``Kernels``. TokenTM / GAE run the row update *inside the backward pass*:
  autograd delivers ∂s/∂Aᴸ first and ∂s/∂A¹ last; a hook on each layer's attention updates the rows
  as that gradient arrives and lets it go, so no two layers' gradients are alive together.
- ``Flash(kernels, attention)``: the adapter's attention call runs the explanation attention
  kernels (``tokentm_fast.kernels.attention``): the forward keeps O(N·D) per layer (Q, K, V, O and the
  row log-sum-exp ℓ); TokenTM / GAE advance a ``RowState`` inside each layer's attention backward;
  rollout and raw attention recompute rows of P tile by tile; no N×N tensor exists.

Both give the engine rows as ``(B, Q, N)`` (Q = 1 for the row algorithm, N for the whole matrix).

Every quantity that depends on the target takes ``targets``, a sequence of K ≥ 1 targets
(``tokentm_fast.targets``), and returns a list over them: each path decides how the K targets share the
work (one forward and K backward passes where it can; ``tokentm_fast.multi_target`` says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .aggregation import (
    EngineConstants,
    RowState,
    check_layer_order,
    initial_rows,
    query_support,
)
from .capture import LayerRecorder, held_attention, hold_layer_norms, prepared_model
from .kernels._utils import MAX_HEAD_DIM
from .methods import lrp_rules
from .models.protocol import ViTAdapter, split_heads
from .models.relative_bias import RelativePositionBias
from .precision import compute_dtype
from .targets import resolve_target, target_score
from .torch_ops import head_fusion, legrad_reduce, row_update, transform_weights
from .torch_ops.row_update import add_update, scale_rows

#: ``weigh(l, record) -> (w_attn, w_mlp)``: a method's per-layer weights from block l's record
Weigh = Callable[[int, Dict[str, torch.Tensor]], Tuple[Any, Any]]
#: ``grad_hook(l, grad)``: called when the backward reaches layer l's attention (∇Aˡ, or dOˡ on the flash path)
GradHook = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Kernels:
    """One implementation of each fused operation (PyTorch or Triton)."""

    transform_weights: Callable
    fuse_heads: Callable
    row_update: Callable
    matrix_update: Callable
    legrad_reduce: Callable


TORCH_KERNELS = Kernels(
    transform_weights=transform_weights.transform_weights,
    fuse_heads=head_fusion.fuse_heads,
    row_update=row_update.row_update,
    matrix_update=row_update.row_update,
    legrad_reduce=legrad_reduce.legrad_reduce,
)


def triton_kernels() -> Kernels:
    from . import kernels as k

    return Kernels(k.transform_weights, k.fuse_heads, k.row_update, _matrix_update_as_torch, k.legrad_reduce)


def _matrix_update_as_torch(*args, **kwargs):
    """``kernels.matrix_update`` with TF32 products only where torch's own switch allows them
    (``kernels._utils.tf32_allowed``, off by default), as the flash attention kernels do."""
    from . import kernels as k
    from .kernels._utils import tf32_allowed

    kwargs.setdefault("allow_tf32", tf32_allowed())
    return k.matrix_update(*args, **kwargs)


def head_width(vit: ViTAdapter) -> Optional[int]:
    """The widest attention head of the model (``None`` when a block's attention does not say).

    The supported attention modules name it ``head_dim`` (timm ``Attention``, Hugging Face CLIP,
    ``nn.MultiheadAttention`` of torchvision and open_clip) or ``attention_head_size`` (Hugging Face
    ViT / DeiT); the entry (``tokentm_fast.api``) routes heads wider than ``MAX_HEAD_DIM`` to the
    materialized path before the call.
    """
    widths = []
    for blk in vit.blocks:
        width = next((w for m in blk.modules() for w in (getattr(m, "head_dim", None),
                                                          getattr(m, "attention_head_size", None))
                      if isinstance(w, int) and w > 0), None)
        if width is None:
            return None
        widths.append(width)
    return max(widths) if widths else None


def heads_fit(width: Optional[int]) -> bool:
    """Whether the flash kernels take heads ``width`` wide (unknown: yes, the call checks them)."""
    return width is None or width <= MAX_HEAD_DIM


class TailCapture(NamedTuple):
    """What the block-tail methods (LeGrad, attention Grad-CAM) read of a forward pass.

    ``d_outs``: per target, the list over the layers of the ``(B, R, H·d)`` gradients ``∂s_l/∂o_l``;
    ``rows``: the slice R of rows they cover; ``records``: block l's
    ``values`` (B, N, H·d) (and on the materialized path ``attn``); ``num_tokens``: N.
    """

    d_outs: list
    rows: slice
    records: Dict[int, Dict[str, torch.Tensor]]
    num_tokens: int


def block_tail_grads(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, layers: Sequence[int], recs,
                     layer_pooling: str = "head") -> tuple:
    """The model's forward without autograd, then ``dO_l = ∂s_l/∂o_l`` of every layer in ``layers``
    from one backward through the re-run block tails (proj, MLP, head; docs/methods.md §6).

    ``layer_pooling``: how s_l reads layer l's tokens Xˡ: ``"head"``, the model's own head
    (``vit.head``); ``"mean"``, the mean over all tokens, then ``vit.pooled_head`` (final norm,
    projection / classifier).

    ``recs[l]`` must hold ``x_in`` and ``attn_out`` (a ``LayerRecorder`` installed for the forward).
    Returns, per target, the list of ``(B, R, H·d)`` gradients, and the slice of rows R they cover: when s_l reads
    only the prefix rows of Xˡ (the model's head with token pooling: the class token; distilled DeiT
    also its distillation token) only those rows of the tails are re-run, since everything after the
    attention mixing is token-wise (dO is zero elsewhere); otherwise every row.

    The one forward serves every target; the block tails are re-run once and back-propagated once per
    target (``retain_graph``).
    """
    with torch.no_grad():
        output = vit.forward(images)
    targets = [resolve_target(t, output) for t in targets]
    by_head = layer_pooling == "head"
    rows = slice(0, vit.num_prefix_tokens) if by_head and vit.pooling == "token" else slice(None)

    def output(tokens: torch.Tensor) -> torch.Tensor:
        return vit.head(tokens) if by_head else vit.pooled_head(tokens.mean(1))

    with torch.enable_grad():
        leaves = [recs[l]["attn_out"][:, rows].detach().requires_grad_(True) for l in layers]
        outs = [output(vit.block_tail(l, recs[l]["x_in"][:, rows], o)) for l, o in zip(layers, leaves)]
        grads = [list(torch.autograd.grad(sum(target_score(out, t) for out in outs), leaves,
                                          retain_graph=k < len(targets) - 1))
                 for k, t in enumerate(targets)]
        return grads, rows


# --------------------------------------------------------------------------- materialized
class Materialized:
    """Attention probabilities and gradients captured as ``(B, H, N, N)`` tensors, reduced by ``kernels``."""

    name = "materialized"

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def gradient_rows(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence, layers: List[int],
                      weigh: Weigh, weight_keys: Sequence[str], fusion_mode: str, full: bool, start=None) -> tuple:
        """The engine's rows ``(B, Q, N)`` per target after the chosen ``layers`` (top-down from the query
        row, or the identity for ``full``), weighted per layer by ``weigh`` and fused by ``fusion_mode``,
        the row update run inside the backward pass; and the first block's input tokens ``(B, N, D)``.
        One forward, one backward per target through the kept graph. ``start``: the first row at an
        attention pool (``methods.pool.PoolStart``), set when the score's gradient reaches the pool."""
        first, top_layer = layers[0], layers[-1]
        below = dict(zip(layers[1:], layers[:-1]))   # the chosen block whose gradient comes next
        attns: Dict[int, torch.Tensor] = {}
        weights: Dict[int, tuple] = {}

        def on_layer(l: int, rec: Dict[str, torch.Tensor]) -> None:
            attns[l] = rec.pop("attn")
            weights[l] = weigh(l, rec)
            rec.clear()

        recorder = LayerRecorder(vit, layers, grad_from=first, on_layer=on_layer,
                                 keys=tuple(weight_keys) + ("attn",))
        update = self.kernels.matrix_update if full else self.kernels.row_update
        pool = start is not None and not full
        with prepared_model(vit) as handles, torch.enable_grad():
            recorder.install(handles)
            if pool:
                start.install(handles)
            logits = vit.forward(images)
            targets = [resolve_target(t, logits) for t in targets]
            keep = len(targets) > 1          # the attentions and weights serve every backward
            b, n = logits.shape[0], attns[top_layer].shape[-1]
            dtype = compute_dtype(images)
            state: Dict[str, Any] = {}
            if pool:                         # the first row is set by the pool's gradient (dense)
                query, top = torch.zeros(b, n, dtype=dtype, device=images.device), {}
                start.on_gradient(n, lambda r0: state.update(rows=r0[:, None].to(dtype)))
            else:
                query = vit.query_vector(b, n, dtype=dtype, device=images.device)
                top = {} if full else {"support": query_support(vit.query_vector(1, n))}  # host-side: no sync

            def layer_hook(l: int):
                def hook(grad: torch.Tensor) -> None:
                    check_layer_order(l, state["next"])
                    w_attn, w_mlp = weights[l] if keep else weights.pop(l)
                    state["rows"] = update(state["rows"], attns[l] if keep else attns.pop(l), grad, w_attn,
                                           w_mlp, mode=fusion_mode, **(top if l == top_layer else {}))
                    state["next"] = below.get(l)
                return hook

            for l in layers:
                attns[l].register_hook(layer_hook(l))
            leaf = attns[first]
            finished = []
            for k, t in enumerate(targets):
                state.update(rows=initial_rows(query, full), next=top_layer)
                torch.autograd.grad(target_score(logits, t), [leaf], retain_graph=k < len(targets) - 1)
                finished.append(state["rows"])
        attns.clear()
        weights.clear()
        return finished, recorder.first_input

    def constant_rows(self, vit: ViTAdapter, images: torch.Tensor, layers: List[int], consts: EngineConstants,
                      full: bool, start=None) -> torch.Tensor:
        """The engine with constant weights and a gradient-free fusion (rollout): ``mean_h Aˡ`` per chosen
        layer in the forward, then the row update top-down; ``(B, Q, N)``. ``start``: the first row at an
        attention pool (``methods.pool.PoolStart``) instead of the query row."""
        fused: Dict[int, torch.Tensor] = {}

        def on_layer(l, rec):
            fused[l] = self.kernels.fuse_heads(rec.pop("attn"), None, consts.fusion)[:, None]  # (B, 1, N, N)

        recorder = LayerRecorder(vit, layers, on_layer=on_layer, keys=("attn",))
        pool = start is not None and not full
        with prepared_model(vit) as handles, torch.no_grad():
            recorder.install(handles)
            if pool:
                start.install(handles)
            vit.forward(images)
            b, n = images.shape[0], fused[layers[-1]].shape[-1]
            dtype = compute_dtype(images)
            if pool:
                rows, top = initial_rows(start.row(n).to(dtype), full), {}
            else:
                rows = initial_rows(vit.query_vector(b, n, dtype=dtype, device=images.device), full)
                top = {} if full else {"support": query_support(vit.query_vector(1, n))}
            update = self.kernels.matrix_update if full else self.kernels.row_update
            for l in reversed(layers):
                rows = update(rows, fused.pop(l), None, consts.w_attn, consts.w_mlp, mode=consts.fusion,
                              **(top if l == layers[-1] else {}))
        return rows

    def held_input_gradients(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence) -> tuple:
        """``(X⁰, [∂s/∂X⁰ per target])`` ``(B, N, D)`` with the attention probabilities (the pool's too) and
        every LayerNorm's normalisation held constant in the backward."""
        recorder = LayerRecorder(vit, range(vit.num_layers), grad_from=0, keys=(),
                                 core=lambda l, q, k, v, scale, bias=None: held_attention(q, k, v, scale, bias))
        return _input_gradients(vit, images, targets, recorder, held_attention)

    def block_output_gradients(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence) -> tuple:
        """Per layer: Xˡ ``(B, N, D)``, ``∂s/∂Xˡ`` (a list over the layers per target) and the query row of
        Aˡ ``(B, H, N)``."""
        recorder = LayerRecorder(vit, range(vit.num_layers), grad_from=0, keys=("attn", "x_out"))
        with prepared_model(vit) as handles, torch.enable_grad():
            recorder.install(handles)
            output = vit.forward(images)
            recs = [recorder.records[l] for l in range(vit.num_layers)]
            acc = compute_dtype(images)
            n = recs[0]["attn"].shape[-1]
            q = vit.query_vector(images.shape[0], n, dtype=acc, device=images.device)
            a_q = [torch.einsum("bi,bhij->bhj", q, r["attn"].detach().to(acc)) for r in recs]
            grads = _output_gradients(vit, output, targets, [r["x_out"] for r in recs], acc)
        return [r["x_out"].detach().to(acc) for r in recs], grads, a_q

    def block_outputs(self, vit: ViTAdapter, images: torch.Tensor, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """``{l: Xˡ (B, N, D)}`` of ``layers`` from one forward without autograd (the model's own attention)."""
        recorder = LayerRecorder(vit, layers, keys=("x_out",))
        with prepared_model(vit) as handles, torch.no_grad():
            recorder.install(handles)
            vit.forward(images)
        return {l: recorder.records[l]["x_out"] for l in layers}

    def query_attention(self, vit: ViTAdapter, images: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, N)``: mean_h Σ_i query[i] · Aˡ_h[i, :] of one layer (raw attention)."""
        recorder = LayerRecorder(vit, [layer], keys=("attn",))
        with prepared_model(vit) as handles, torch.no_grad():
            recorder.install(handles)
            vit.forward(images)
            a = recorder.records[layer]["attn"]
            acc = compute_dtype(a)
            q = vit.query_vector(a.shape[0], a.shape[-1], dtype=acc, device=a.device)
            return torch.einsum("bi,bhij->bj", q, a.to(acc)) / a.shape[1]

    def tail_capture(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence, layers: List[int],
                     query_layers: Sequence[int], layer_pooling: str = "head") -> TailCapture:
        """Block-tail gradients of ``layers`` per target (``block_tail_grads``), keeping Aˡ of ``query_layers``."""
        keys = ("x_in", "values", "attn_out") + (("attn",) if query_layers else ())
        recorder = LayerRecorder(vit, layers, keys=keys)
        with prepared_model(vit) as handles:
            recorder.install(handles)
            d_outs, rows = block_tail_grads(vit, images, targets, layers, recorder.records, layer_pooling)
        recs = recorder.records
        return TailCapture(d_outs, rows, recs, recs[layers[0]]["values"].shape[1])

    def positive_grad_means(self, vit: ViTAdapter, cap: TailCapture, d_outs: list, layers: List[int],
                            images: torch.Tensor) -> List[torch.Tensor]:
        """Per layer of ``layers``, ``(B, N)``: mean_h (1/N) Σ_i max(G̃ˡ_h[i, :], 0) (the ``legrad_reduce``
        kernel family), ``G̃ = dO_l Vᵀ`` formed per layer from its gradient ``d_outs[l]``."""
        n, heads, acc = cap.num_tokens, vit.num_heads, compute_dtype(images)
        return [self.kernels.legrad_reduce(self._grad_rows(cap, l, d_out, heads, acc), n).to(acc)
                for l, d_out in zip(layers, d_outs)]

    @staticmethod
    def _grad_rows(cap: TailCapture, l: int, d_out: torch.Tensor, heads: int, acc) -> torch.Tensor:
        v = cap.records[l]["values"].to(acc).unflatten(-1, (heads, -1)).transpose(1, 2)    # (B, H, N, d)
        d = d_out.to(acc).unflatten(-1, (heads, -1)).transpose(1, 2)                        # (B, H, Q, d)
        return d @ v.transpose(-1, -2)                                                      # (B, H, Q, N)

    def query_rows(self, vit: ViTAdapter, cap: TailCapture, d_out: torch.Tensor, layer: int,
                   images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, N)`` query rows of Aˡ_h and of the gradient G̃ˡ_h = dO Vᵀ."""
        b, n, acc = images.shape[0], cap.num_tokens, compute_dtype(images)
        g_rows = self._grad_rows(cap, layer, d_out, vit.num_heads, acc)
        a = cap.records[layer]["attn"].to(acc)
        q = vit.query_vector(b, n, dtype=acc, device=images.device)
        a_q = torch.einsum("bi,bhij->bhj", q, a)
        g_q = torch.einsum("bi,bhij->bhj", q[:, cap.rows], g_rows)
        return a_q, g_q


    # -- the relevance pass (methods/relevance.py) ----------------------------------------------------
    def record_relevance(self, vit: ViTAdapter, layers: Sequence[int], keys: Sequence[str], handles: list,
                         grad_hook: Optional[GradHook] = None) -> LayerRecorder:
        """Install (into ``handles``) a ``LayerRecorder`` of ``keys`` over ``layers`` that also records Aˡ
        ``(B, H, N, N)`` for ``attention_relevance``. ``grad_hook(l, ∇Aˡ)``: called when the backward from
        a score reaches Aˡ (block ``layers[0]``'s input is the recorder's leaf)."""
        def on_layer(l: int, rec: Dict[str, torch.Tensor]) -> None:
            rec["attn"].register_hook(lambda grad: grad_hook(l, grad))

        recorder = LayerRecorder(vit, layers, grad_from=min(layers) if grad_hook else None, keys=(*keys, "attn"),
                                 on_layer=on_layer if grad_hook else None)
        recorder.install(handles)
        return recorder

    def attention_relevance(self, rec: Dict[str, Any], r_o: torch.Tensor, rows: Optional[torch.Tensor] = None,
                            grad: Optional[torch.Tensor] = None, logits: Optional[Callable] = None,
                            rules: Optional[str] = None) -> tuple:
        """The relevance at q, k, v ``(B, H, N, d)`` of one block from ``r_o`` ``(B, H, N, d)`` at its
        attention output (docs/methods.md §6.3): the product rule through ``O = A V`` (``R^A`` ``(B, H, N, N)``)
        and through ``Q Kᵀ``, ``logits(R^A)`` the share of ``Q Kᵀ`` where the logits have more terms (None:
        all of it; ``rules`` is the flash path's, which cannot call ``logits``: unused here). With ``rows`` ``(B, N)`` also ``t`` ``(B, N)`` = Σ_i rows_i mean_h max(R^A_ij · ∇A_ij, 0)
        (``grad`` = ∇A) or max(R^A_ij, 0) (no ``grad``); else ``t`` is None."""
        acc = r_o.dtype
        attn = rec["attn"].detach().to(acc)
        v = split_heads(rec["values"].to(acc), r_o.shape[1])
        q, k = rec["q"].to(acc), rec["k"].to(acc)
        r_attn, r_v = lrp_rules.product(attn, v, r_o)
        r_q, r_kt = lrp_rules.product(q, k.transpose(-1, -2), r_attn if logits is None else logits(r_attn))
        t = None
        if rows is not None:
            fused = (r_attn.clamp(min=0).mean(1) if grad is None
                     else self.kernels.fuse_heads(r_attn, grad.to(acc), "gae").to(acc))       # (B, N, N)
            t = torch.einsum("bi,bij->bj", rows, fused)
        return r_q, r_kt.transpose(-1, -2), r_v, t


def _output_gradients(vit: ViTAdapter, output: torch.Tensor, targets: Sequence, tensors: list, acc) -> list:
    """``[[∂s_t/∂x for x in tensors] for each target t]``."""
    targets = [resolve_target(t, output) for t in targets]
    return [[g.to(acc) for g in torch.autograd.grad(target_score(output, t), tensors,
                                                    retain_graph=k < len(targets) - 1)]
            for k, t in enumerate(targets)]


def _input_gradients(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, recorder: LayerRecorder,
                     pool_core) -> tuple:
    """One forward with LayerNorms held (and the recorder's attention core), then ∂s/∂X⁰ per target."""
    with prepared_model(vit) as handles, torch.enable_grad():
        hold_layer_norms(vit, handles)
        recorder.install(handles)
        if vit.attention_pool is not None:
            vit.replace_pool_attention(pool_core, handles)
        output = vit.forward(images)
        acc = compute_dtype(images)
        grads = [g[0] for g in _output_gradients(vit, output, targets, [recorder.leaf], acc)]
    return recorder.leaf.detach().to(acc), grads


class Saved(NamedTuple):
    """What the flash forward keeps of a layer for recomputing P: q, k ``(B, H, N, d)``, ℓ ``(B, H, N)``, the
    scale and the bias of the logits in table form (``RelativePositionBias``; None without one)."""

    q: torch.Tensor
    k: torch.Tensor
    lse: torch.Tensor
    scale: float
    bias: Optional[RelativePositionBias] = None


def _with_bias(bias: Optional[RelativePositionBias]) -> dict:
    """The ``bias`` keyword of the attention kernels' calls: absent without a bias (any ``AttentionKernels``
    serves a bias-free model)."""
    return {} if bias is None else {"bias": bias}


class _FlashAttention(torch.autograd.Function):
    """The flash attention forward, differentiable through the flash backward; ``hold=True`` holds the
    attention probabilities constant (only dV flows: the backward kernel forms neither dS nor dQ, dK). ``keep``
    receives ``Saved(q, k, ℓ, scale, bias)`` of the layer; ``on_grad(layer, dO)``, if given, is called with the
    gradient ``dO (B, H, N, d)`` at the layer's output when the backward reaches it (∇A = dO Vᵀ, never formed).
    ``bias``: the logits' bias in table form (BEiT), read inside the kernels' tiles (not differentiated)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, attention, hold: bool, keep: dict, layer: int, on_grad=None,
                bias=None):
        o, lse = attention.forward(q, k, v, scale, **_with_bias(bias))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.attention, ctx.hold, ctx.layer, ctx.on_grad = scale, attention, hold, layer, on_grad
        ctx.bias = None if bias is None else bias.detach()
        keep[layer] = Saved(q.detach(), k.detach(), lse, scale, ctx.bias)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if ctx.on_grad is not None:
            ctx.on_grad(ctx.layer, do)
        # held (conservative LRP): dV = Pᵀ dO alone, no softmax backward (dQ = dK = None)
        grads = "v" if ctx.hold else True
        dq, dk, dv, _ = ctx.attention.backward(q, k, v, o, lse, do, ctx.scale, row=None, input_grads=grads,
                                               **_with_bias(ctx.bias))
        return dq, dk, dv, None, None, None, None, None, None, None


class ExplanationAttention(torch.autograd.Function):
    """``o = softmax(scale·QKᵀ) V`` whose backward also advances a ``RowState`` (docs/methods.md §8).

    Per layer l and head h, ``P = softmax(scale·QKᵀ)`` is never stored: the forward keeps Q, K, V, O and
    the row log-sum-exp ℓ, and the backward recomputes P and G = dP = dO Vᵀ tile by tile. While doing so,
    the dK/dV program accumulates

        t_h[j] = Σ_i s[i] · max(P_h[i, j] · G_h[i, j], 0),     s = r ⊙ (1 + w_mlp^l)  (``state.scaled_row``)

    and ``state.update`` makes the row ``r ← s + mean_h(t_h) ⊙ w_attn^l`` before autograd reaches the
    layer below. Autograd visits the layers top-down, so the state flows exactly as in the row algorithm
    and no layer's Aˡ or Gˡ ever exists. BEiT's relative position bias (``bias``, table form) is added to
    scale·QKᵀ inside the kernels' tiles, in the forward and wherever the backward recomputes P. A layer outside the state's layer choice gets no row
    (``scaled_row`` is None): its backward computes dQ, dK, dV only.

    ``anchor`` is a 0-d tensor that requires grad: every layer's output depends on it, so
    ``torch.autograd.grad(score, anchor)`` runs every layer's backward (its gradient is 0). Layers whose
    q, k, v need no gradient (the lowest explained layer) compute only the explanation sums.
    """

    @staticmethod
    def forward(ctx, q, k, v, anchor, scale: float, layer: int, state: RowState, kernels, bias=None):
        o, lse = kernels.forward(q, k, v, scale, **_with_bias(bias))
        ctx.save_for_backward(q, k, v, o, lse, anchor)
        ctx.scale, ctx.layer, ctx.state, ctx.kernels = scale, layer, state, kernels
        ctx.bias = None if bias is None else bias.detach()
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, anchor = ctx.saved_tensors
        state = ctx.state
        input_grads = any(ctx.needs_input_grad[:3])
        row = state.scaled_row(ctx.layer)  # None: a layer that leaves the row as it is
        dq, dk, dv, t = ctx.kernels.backward(q, k, v, o, lse, do, ctx.scale, row=row, input_grads=input_grads,
                                             **_with_bias(ctx.bias))
        state.update(ctx.layer, t)
        return dq, dk, dv, torch.zeros_like(anchor), None, None, None, None, None


# --------------------------------------------------------------------------- flash
#: why a dense bias cannot reach the flash kernels
DENSE_BIAS_REFUSAL = ("the flash attention kernels read an additive bias of the logits from its table (BEiT's relative "
                      "position bias, RelativePositionBias), never as an (N, N) tensor; this bias came dense (Hugging "
                      "Face BEiT with interpolate_pos_encoding=True resizes the (N, N) bias bilinearly, which is no "
                      "table lookup): use attention='materialized'")


def _table_bias(bias) -> Optional[RelativePositionBias]:
    """``bias`` as the flash kernels take it: None or a table-form ``RelativePositionBias`` (read inside the
    tiles); a dense bias raises (``DENSE_BIAS_REFUSAL``)."""
    if bias is None or isinstance(bias, RelativePositionBias):
        return bias
    raise ValueError(DENSE_BIAS_REFUSAL)


def _plain_core(attention):
    """The flash forward alone (layers whose attention the method does not read)."""
    def core(l, q, k, v, scale, bias=None):
        return attention.forward(q, k, v, scale, **_with_bias(_table_bias(bias)))[0]
    return core


def _saving_core(fwd, keep: Dict[int, Saved], layers):
    """An attention core that runs the flash forward and keeps ``Saved(q, k, ℓ, scale, bias)`` of ``layers``."""
    layers = set(layers)

    def core(l, q, k, v, scale, bias=None):
        bias = _table_bias(bias)
        o, lse = fwd(q, k, v, scale, **_with_bias(bias))
        if l in layers:
            keep[l] = Saved(q, k, lse, scale, None if bias is None else bias.detach())
        return o
    return core


class Flash:
    """The explanation attention kernels at the adapter's attention call site: no N×N tensor.

    ``kernels``: the ``Kernels`` set (for the transformation weights); ``attention``: the attention
    triple, the Triton kernels (``tokentm_fast.kernels.attention.triton_attention()``) or their PyTorch
    twin (``tokentm_fast.torch_ops.attention.torch_attention()``, the CPU fallback, any head width:
    ``max_head_dim=None``)."""

    name = "flash"

    def __init__(self, kernels: Kernels, attention, max_head_dim: Optional[int] = MAX_HEAD_DIM) -> None:
        self.kernels = kernels
        self.attention = self._head_width_checked(attention) if max_head_dim is not None else attention

    @staticmethod
    def _head_width_checked(attention):
        """The kernels take heads up to ``MAX_HEAD_DIM`` wide (tails of 80, 96, ... are masked). The entry
        routes wider heads away (``head_width``); this check guards models whose width it cannot read."""
        def forward(q, k, v, scale, **bias):
            if q.shape[-1] > MAX_HEAD_DIM:
                raise ValueError(f"the flash attention kernels take heads up to {MAX_HEAD_DIM} wide; this "
                                 f"model's heads are {q.shape[-1]} wide: use attention='materialized'")
            return attention.forward(q, k, v, scale, **bias)
        return attention._replace(forward=forward)

    def gradient_rows(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence, layers: List[int],
                      weigh: Weigh, weight_keys: Sequence[str], fusion_mode: str, full: bool, start=None) -> tuple:
        """As ``Materialized.gradient_rows`` for ``full=False``, with the row update inside the flash
        attention backward (``ExplanationAttention``); the fusion is ``max(P ⊙ G, 0)``. One forward per
        target: the custom backward frees each layer's saved tiles as it goes, so a forward serves one
        backward."""
        runs = [self._gradient_row(vit, images, t, layers, weigh, weight_keys, start) for t in targets]
        return [rows for rows, _ in runs], runs[-1][1]

    def _gradient_row(self, vit: ViTAdapter, images: torch.Tensor, target, layers: List[int], weigh: Weigh,
                      weight_keys: Sequence[str], start) -> tuple:
        """One target's ``(B, 1, N)`` row and the first block's input tokens."""
        L = vit.num_layers
        first = layers[0]
        contiguous = layers == list(range(first, L))
        state = RowState(first, L - 1, None if contiguous else layers)
        chosen = set(layers)
        anchor = torch.zeros((), dtype=torch.float32, device=images.device, requires_grad=True)
        attention = self.attention

        def core(l, q, k, v, scale, bias=None):
            return ExplanationAttention.apply(q, k, v, anchor, scale, l, state, attention, _table_bias(bias))

        def on_layer(l, rec):
            if l in chosen:           # a block between the chosen ones: no weights, the row passes
                state.weights[l] = weigh(l, rec)
            rec.clear()

        recorder = LayerRecorder(vit, range(first, L), on_layer=on_layer, keys=tuple(weight_keys), core=core)
        with prepared_model(vit) as handles, torch.enable_grad():
            vit.replace_attention(range(first), _plain_core(attention), handles)  # below the aggregation
            recorder.install(handles)
            if start is not None:
                start.install(handles)
            output = vit.forward(images)
            target = resolve_target(target, output)
            n = recorder.first_input.shape[1]
            if start is not None:            # the first row is set by the pool's gradient
                start.on_gradient(n, state.start)
            else:
                state.start(vit.query_vector(images.shape[0], n, dtype=compute_dtype(images), device=images.device))
            torch.autograd.grad(target_score(output, target), [anchor])
        return state.rows[:, None], recorder.first_input

    def constant_rows(self, vit: ViTAdapter, images: torch.Tensor, layers: List[int], consts: EngineConstants,
                      full: bool, start=None) -> torch.Tensor:
        """The engine's update with constant weights (rollout: s = ½ r, r ← s + Σ_i s[i] mean_h P[i, :]),
        top-down from the query row, P recomputed tile by tile from the saved Q, K and ℓ; ``(B, 1, N)``."""
        L = vit.num_layers
        keep: Dict[int, tuple] = {}
        attention = self.attention
        with prepared_model(vit) as handles, torch.no_grad():
            vit.replace_attention(range(L), _saving_core(attention.forward, keep, layers), handles)
            if start is not None:
                start.install(handles)
            vit.forward(images)
            n = keep[layers[-1]][0].shape[2]
            r = (start.row(n) if start is not None
                 else vit.query_vector(images.shape[0], n, dtype=compute_dtype(images), device=images.device))
            for l in reversed(layers):
                q, k, lse, scale, bias = keep.pop(l)
                s = scale_rows(r, consts.w_mlp)
                r = add_update(s, attention.rows(s, scale, q=q, k=k, lse=lse, **_with_bias(bias)).mean(1),
                               consts.w_attn)
        return r[:, None]

    def _query_probs(self, vit: ViTAdapter, q, k, lse, scale, bias=None) -> torch.Tensor:
        """``(B, H, N)``: Σ_i query[i] · P[i, :] of one layer — row cls alone when there is a class token (plus
        its row of the bias, gathered from the table: ``(H, 1, N)``)."""
        b, _, n, _ = q.shape
        acc = compute_dtype(q)
        if vit.has_class_token:  # one row: (B, H, 1, d) · (B, H, d, N), no tile loop needed
            s = scale * (q[:, :, :1].to(acc) @ k.to(acc).transpose(-1, -2))[:, :, 0]
            if bias is not None:
                s = s + bias.tile(torch.zeros(1, dtype=torch.long, device=q.device))[:, 0].to(acc)
            return torch.exp(s - lse[:, :, :1])
        return self.attention.rows(vit.query_vector(b, n, dtype=acc, device=q.device), scale, q=q, k=k, lse=lse,
                                   **_with_bias(bias))

    def _differentiable_core(self, hold: bool, keep: dict):
        attention = self.attention

        def core(l, q, k, v, scale, bias=None):
            return _FlashAttention.apply(q, k, v, scale, attention, hold, keep, l, None, _table_bias(bias))
        return core

    def held_input_gradients(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence) -> tuple:
        """As ``Materialized.held_input_gradients``: the flash backward with dQ = dK = 0 (no N×N tensor);
        the pool (one row per latent) held as the blocks' attention."""
        recorder = LayerRecorder(vit, range(vit.num_layers), grad_from=0, keys=(),
                                 core=self._differentiable_core(True, {}))
        return _input_gradients(vit, images, targets, recorder, held_attention)

    def block_output_gradients(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence) -> tuple:
        """As ``Materialized.block_output_gradients``, the query rows recomputed from q, k and ℓ."""
        keep: Dict[int, tuple] = {}
        recorder = LayerRecorder(vit, range(vit.num_layers), grad_from=0, keys=("x_out",),
                                 core=self._differentiable_core(False, keep))
        with prepared_model(vit) as handles, torch.enable_grad():
            recorder.install(handles)
            output = vit.forward(images)
            xs = [recorder.records[l]["x_out"] for l in range(vit.num_layers)]
            acc = compute_dtype(images)
            a_q = [self._query_probs(vit, *keep.pop(l)) for l in range(vit.num_layers)]
            grads = _output_gradients(vit, output, targets, xs, acc)
        return [x.detach().to(acc) for x in xs], grads, a_q

    def block_outputs(self, vit: ViTAdapter, images: torch.Tensor, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """``{l: Xˡ (B, N, D)}`` of ``layers`` from one forward without autograd (flash attention forward)."""
        recorder = LayerRecorder(vit, layers, keys=("x_out",), core=_plain_core(self.attention))
        others = [l for l in range(vit.num_layers) if l not in set(layers)]
        with prepared_model(vit) as handles, torch.no_grad():
            vit.replace_attention(others, _plain_core(self.attention), handles)
            recorder.install(handles)
            vit.forward(images)
        return {l: recorder.records[l]["x_out"] for l in layers}

    def query_attention(self, vit: ViTAdapter, images: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, N)``: mean_h of the query row of Pˡ, from q_cls, K and ℓ[cls]."""
        keep: Dict[int, tuple] = {}
        with prepared_model(vit) as handles, torch.no_grad():
            vit.replace_attention(range(vit.num_layers), _saving_core(self.attention.forward, keep, [layer]),
                                  handles)
            vit.forward(images)
            return self._query_probs(vit, *keep.pop(layer)).mean(1)

    def tail_capture(self, vit: ViTAdapter, images: torch.Tensor, targets: Sequence, layers: List[int],
                     query_layers: Sequence[int], layer_pooling: str = "head") -> TailCapture:
        """Block-tail gradients of ``layers`` per target, keeping (q, k, ℓ, scale) of ``query_layers``."""
        keep: Dict[int, tuple] = {}
        core = _saving_core(self.attention.forward, keep, query_layers)
        recorder = LayerRecorder(vit, layers, keys=("x_in", "values", "attn_out"), core=core)
        others = [l for l in range(vit.num_layers) if l not in set(layers)]
        with prepared_model(vit) as handles:
            vit.replace_attention(others, _plain_core(self.attention), handles)
            recorder.install(handles)
            d_outs, rows = block_tail_grads(vit, images, targets, layers, recorder.records, layer_pooling)
        recs = recorder.records
        for l, saved in keep.items():
            recs[l]["saved"] = saved
        return TailCapture(d_outs, rows, recs, recorder.first_input.shape[1])

    def positive_grad_means(self, vit: ViTAdapter, cap: TailCapture, d_outs: list, layers: List[int],
                            images: torch.Tensor) -> List[torch.Tensor]:
        """As ``Materialized.positive_grad_means``, all layers in one reduction: G̃ formed over the prefix
        rows when the score reads only those, else the tiled ``Σ_i max(G̃[i, j], 0)`` over every query row."""
        b, n, heads = images.shape[0], cap.num_tokens, vit.num_heads
        recs = cap.records
        v_all = torch.cat([split_heads(recs[l]["values"], heads) for l in layers])            # (L'·B, H, N, d)
        do_all = torch.cat([split_heads(d.to(v_all.dtype), heads) for d in d_outs])           # (L'·B, H, R, d)
        acc = compute_dtype(v_all)
        if cap.rows != slice(None):
            e = legrad_reduce.legrad_reduce(do_all.to(acc) @ v_all.to(acc).transpose(-1, -2), n)      # G̃: (L'·B, H, P, N)
        else:
            ones = torch.ones(do_all.shape[0], n, dtype=acc, device=images.device)
            e = legrad_reduce.legrad_columns(self.attention.rows(ones, 1.0, do=do_all, v=v_all), n)   # t: (L'·B, H, N)
        return list(e.unflatten(0, (len(layers), b)).unbind(0))

    def query_rows(self, vit: ViTAdapter, cap: TailCapture, d_out: torch.Tensor, layer: int,
                   images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, N)`` query rows of Pˡ_h (recomputed from q, k, ℓ) and of G̃ˡ_h = dO Vᵀ (formed from
        the query-weighted dO alone)."""
        b, n, heads = images.shape[0], cap.num_tokens, vit.num_heads
        q, k, lse, scale, bias = cap.records[layer]["saved"]
        acc = compute_dtype(images)
        v = split_heads(cap.records[layer]["values"], heads).to(acc)
        do = split_heads(d_out.to(acc), heads)                                                   # (B, H, R, d)
        query = vit.query_vector(b, n, dtype=acc, device=images.device)[:, cap.rows]
        g_q = (torch.einsum("br,bhrd->bhd", query, do)[:, :, None] @ v.transpose(-1, -2))[:, :, 0]  # (B, H, N)
        return self._query_probs(vit, q, k, lse, scale, bias), g_q

    # -- the relevance pass (methods/relevance.py) ----------------------------------------------------
    def record_relevance(self, vit: ViTAdapter, layers: Sequence[int], keys: Sequence[str], handles: list,
                         grad_hook: Optional[GradHook] = None) -> LayerRecorder:
        """As ``Materialized.record_relevance``, with the flash forward: each record of ``layers`` gets
        ``saved`` = ``Saved(q, k, ℓ, scale, bias)`` instead of Aˡ (and a table-form bias recorded as such,
        ``"bias"`` = B/scale in table form); the other layers run the flash forward alone.
        ``grad_hook(l, dOˡ)``: called with the gradient at the attention output ``(B, H, N, d)`` when the
        flash backward reaches layer l (∇Aˡ = dOˡ Vᵀ is formed in the relevance programs' tiles)."""
        attention, keep, chosen = self.attention, {}, set(layers)

        def core(l, q, k, v, scale, bias=None):
            bias = _table_bias(bias)
            if grad_hook is not None:
                return _FlashAttention.apply(q, k, v, scale, attention, False, keep, l, grad_hook, bias)
            o, lse = attention.forward(q, k, v, scale, **_with_bias(bias))
            keep[l] = Saved(q, k, lse, scale, None if bias is None else bias.detach())
            return o

        def on_layer(l: int, rec: Dict[str, Any]) -> None:
            rec["saved"] = keep.pop(l)

        vit.replace_attention([l for l in range(vit.num_layers) if l not in chosen], _plain_core(attention), handles)
        recorder = LayerRecorder(vit, layers, grad_from=min(layers) if grad_hook else None, keys=keys,
                                 on_layer=on_layer, core=core, dense_bias=False)
        recorder.install(handles)
        return recorder

    def attention_relevance(self, rec: Dict[str, Any], r_o: torch.Tensor, rows: Optional[torch.Tensor] = None,
                            grad: Optional[torch.Tensor] = None, logits: Optional[Callable] = None,
                            rules: Optional[str] = None) -> tuple:
        """As ``Materialized.attention_relevance`` (``grad`` = dOˡ ``(B, H, N, d)``), by the relevance
        programs of the attention kernels: P, Z = Q Kᵀ and ∇A recomputed tile by tile, no N×N tensor.
        ``logits`` (a function of the whole R^A) is not called: with BEiT's bias (``Saved.bias``) the relevance
        programs split R^A between Z and B/scale by the add rule of the rule set ``rules`` themselves (per-image
        sums over the tiles first for ``"ours"``; docs/methods.md §6.3)."""
        q, k, lse, scale, bias = rec["saved"]
        heads = r_o.shape[1]
        v, o = split_heads(rec["values"], heads), split_heads(rec["attn_out"], heads)
        extra = {} if bias is None else {"bias": bias, "rules": rules}
        r_q, r_k, r_v, t = self.attention.relevance(q, k, v, o, lse, r_o, scale, row=rows, do=grad, **extra)
        return r_q, r_k, r_v, None if t is None else t.mean(1)

