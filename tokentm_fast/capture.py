"""Capture of per-layer tensors through the adapter protocol (family-free).

``prepared_model(vit)`` prepares a model for one explanation call and
puts it back exactly as it was, also when the call raises: eval mode,
parameters frozen so that no parameter gradient is ever computed, fused
attention flags off, and every hook or patched forward that callers add to
the yielded ``handles`` list removed.

``LayerRecorder`` records, for each chosen block l (0-based), a ``dict`` with

====================  ============  ==========================================
key                   shape         meaning
====================  ============  ==========================================
``x_in``              (B, N, D)     Xˡ⁻¹, the residual stream entering the block
``values``            (B, N, H·d)   v_j = concat_h V_h[j]
``attn``              (B, H, N, N)  Aˡ, post-softmax (graph-attached)
``attn_out``          (B, N, H·d)   o = concat_h(A_h V_h), before proj
``y``                 (B, N, D)     Yˡ
``mlp_out``           (B, N, D)     γ₂ ⊙ MLP(LN₂(Yˡ))
``x_out``             (B, N, D)     Xˡ (graph-attached)
``q``, ``k``          (B, H, N, d)  queries and keys as the attention core gets them
====================  ============  ==========================================

(``q`` and ``k`` only when asked for: the relevance pass reads them.)

and calls ``on_layer(l, record)`` when block l has finished, so that a fast
path can reduce the record (e.g. to the (B, N) transformation weights) and
drop the large tensors at once. ``grad_from=k`` makes the input of block k a
leaf that requires grad: the graph (and the backward pass) then starts there.
The attention of the recorded blocks runs through the adapter's
``replace_attention`` with an explicit softmax (so that ``attn`` exists), or
through a caller's ``core`` (then ``attn`` is not recorded).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .models.protocol import AttentionCore, LinearPoint, ViTAdapter, merge_heads
from .models.relative_bias import RelativePositionBias

LayerRecord = Dict[str, torch.Tensor]


def dense_bias(bias):
    """``bias`` as a tensor: a table-form ``RelativePositionBias`` written out ``(1, H, N, N)``, else as given."""
    return bias.dense() if isinstance(bias, RelativePositionBias) else bias


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
    """``softmax(scale·Q Kᵀ + bias)`` ``(B, H, Nq, Nk)``: the explicit attention of the materialized path, the
    attention pools and the held attention. ``bias``: None, an additive bias of the logits broadcast to
    ``(B, H, Nq, Nk)`` (``(1, H, N, N)``), or BEiT's relative position bias in table form (written out here)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + dense_bias(bias).to(logits.dtype)
    return logits.softmax(dim=-1)


def held_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
    """``softmax(scale·Q Kᵀ + bias) V`` with the probabilities held constant in the backward (only dV flows:
    the AH-rule of conservative LRP)."""
    return attention_probs(q, k, scale, bias).detach() @ v


def _model_of(vit) -> nn.Module:
    return vit.model if isinstance(vit, ViTAdapter) else vit


@contextmanager
def prepared_model(vit) -> Iterator[list]:
    """Eval mode, frozen parameters, fused attention off; restore everything on exit.

    ``vit``: an adapter (or a bare ``nn.Module``). Yields a list to which
    callers append handles (hooks, ``replace_attention`` patches); each is
    ``.remove()``-d on exit, last added first.
    """
    model = _model_of(vit)
    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    handles: list = []
    try:
        model.eval()
        for m, _ in fused:
            m.fused_attn = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield handles
    finally:
        for h in reversed(handles):
            h.remove()
        for m, flag in modes:
            m.training = flag
        for m, flag in fused:
            m.fused_attn = flag
        for p, flag in grads:
            p.requires_grad_(flag)


class LayerRecorder:
    """Hooks recording the tensors of chosen blocks (see module docstring).

    Args:
        vit: the model's adapter.
        layers: 0-based indices of the blocks to record.
        grad_from: 0-based block whose input becomes a grad-requiring leaf, or None
            (no graph is built: use under ``torch.no_grad``).
        on_layer: called as ``on_layer(l, record)`` after block l; may drop keys.
        keys: which record keys to keep (default: all).
        core: attention core of the recorded blocks (default: explicit softmax, which
            records ``attn``); with another core ``attn`` is not recorded.
        dense_bias: record ``"bias"`` written out ``(1 or B, H, N, N)`` (the materialized path); False keeps a
            table-form bias (``RelativePositionBias``, BEiT) in table form, scaled (the flash path: no N×N tensor).
    """

    ALL_KEYS = ("x_in", "values", "attn", "attn_out", "y", "mlp_out", "x_out")
    #: ``"bias"``: the additive bias of the logits divided by the scale, ``B / scale`` ``(1 or B, H, N, N)``, so
    #: that the logits are ``scale · (q kᵀ + B / scale)`` (recorded only where the model has a bias; with
    #: ``dense_bias=False`` a table-form bias stays a ``RelativePositionBias`` of the table divided by the scale)
    CORE_KEYS = frozenset({"values", "attn", "attn_out", "q", "k", "bias"})

    def __init__(
        self,
        vit: ViTAdapter,
        layers: Sequence[int],
        grad_from: Optional[int] = None,
        on_layer: Optional[Callable[[int, LayerRecord], None]] = None,
        keys: Sequence[str] = ALL_KEYS,
        core: Optional[AttentionCore] = None,
        dense_bias: bool = True,
    ) -> None:
        self.vit = vit
        self.blocks = list(vit.blocks)
        self.layers = sorted(set(layers))
        self.grad_from = grad_from
        self.on_layer = on_layer
        self.keys = set(keys)
        self.core = core
        self.dense_bias = dense_bias
        if core is not None and "attn" in self.keys:
            raise ValueError("a custom attention core does not expose the attention probabilities ('attn')")
        self.records: Dict[int, LayerRecord] = {}
        self.first_input: Optional[torch.Tensor] = None
        #: the grad-requiring input of block ``grad_from`` (set by the forward)
        self.leaf: Optional[torch.Tensor] = None

    def install(self, handles: list) -> None:
        """Register the hooks and the attention core; the handles go into ``handles``."""
        vit = self.vit
        handles.append(self.blocks[0].register_forward_pre_hook(self._first_input, with_kwargs=True))
        if self.grad_from is not None:
            handles.append(self.blocks[self.grad_from].register_forward_pre_hook(self._make_leaf, with_kwargs=True))
        for l in self.layers:
            blk = self.blocks[l]
            if "x_in" in self.keys:
                handles.append(blk.register_forward_pre_hook(self._x_in(l), with_kwargs=True))
            y_at, mlp_out_at = vit.mlp_points(l)
            if "y" in self.keys:
                handles.append(y_at.register_forward_pre_hook(self._pre(l, "y")))
            if "mlp_out" in self.keys:
                handles.append(mlp_out_at.register_forward_hook(self._post(l, "mlp_out")))
            handles.append(blk.register_forward_hook(self._block_end(l)))
        if self.keys & self.CORE_KEYS or self.core is not None:
            vit.replace_attention(self.layers, self._core, handles)

    # -- attention core ------------------------------------------------------
    def _core(self, l: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              bias=None) -> torch.Tensor:
        if "values" in self.keys:
            self._store(l, "values", merge_heads(v))
        for key, t in (("q", q), ("k", k)):
            if key in self.keys:
                self._store(l, key, t)
        if bias is not None and "bias" in self.keys:
            table = isinstance(bias, RelativePositionBias) and not self.dense_bias
            self._store(l, "bias", bias.scaled(1.0 / scale) if table else dense_bias(bias) / scale)
        if self.core is not None:   # the bias only where the model has one: bias-free cores take five arguments
            o = self.core(l, q, k, v, scale) if bias is None else self.core(l, q, k, v, scale, bias=bias)
        else:
            attn = attention_probs(q, k, scale, bias)
            if "attn" in self.keys:
                self._store(l, "attn", attn)
            o = attn @ v
        if "attn_out" in self.keys:
            self._store(l, "attn_out", merge_heads(o))
        return o

    # -- hooks -------------------------------------------------------------
    def _first_input(self, module, args, kwargs):
        self.first_input = self.vit.block_input(args, kwargs).detach()

    def _make_leaf(self, module, args, kwargs):
        x = self.vit.block_input(args, kwargs).detach().requires_grad_(True)
        self.leaf = x
        return self.vit.with_block_input(args, kwargs, x)

    def _store(self, l: int, key: str, tensor: torch.Tensor) -> None:
        keep_graph = key in ("attn", "x_out")
        self.records.setdefault(l, {})[key] = tensor if keep_graph else tensor.detach()

    def _x_in(self, l: int):
        def hook(module, args, kwargs):
            self._store(l, "x_in", self.vit.block_input(args, kwargs))
        return hook

    def _pre(self, l: int, key: str):
        def hook(module, args):
            self._store(l, key, args[0])
        return hook

    def _post(self, l: int, key: str):
        def hook(module, args, output):
            self._store(l, key, output)
        return hook

    def _block_end(self, l: int):
        def hook(module, args, output):
            rec = self.records.setdefault(l, {})
            if "x_out" in self.keys:
                rec["x_out"] = self.vit.block_output(output)
            if self.on_layer is not None:
                self.on_layer(l, rec)
        return hook


class PointRecorder:
    """Records, on each forward, the tensor read at each ``LinearPoint`` (``tokentm_fast.models.protocol``):
    a module's first input, or its output; ``values[key]`` (detached) for ``points[key]``."""

    def __init__(self, points: Dict[object, LinearPoint]) -> None:
        self.points = points
        self.values: Dict[object, torch.Tensor] = {}

    def install(self, handles: list) -> None:
        for key, point in self.points.items():
            if point.output:
                handles.append(point.module.register_forward_hook(self._output(key)))
            else:
                handles.append(point.module.register_forward_pre_hook(self._input(key)))

    def _input(self, key):
        def hook(module, args):
            self.values[key] = args[0].detach()
        return hook

    def _output(self, key):
        def hook(module, args, output):
            self.values[key] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        return hook


class PoolRecorder:
    """Records the attention pool of the head (adapters with ``attention_pool``; docs/methods.md §6.1):
    on each run of the pool, ``attn`` ``(B, H, Lq, M)`` (its attention probabilities over the M tokens it
    reads), ``values`` ``(B, M, H·d)`` and ``x_in`` ``(B, M, D)`` (the tokens it reads).

    ``leaf=True``: ``attn`` is made a leaf that requires grad (the gradient of a score w.r.t. the pool's
    attention, without a graph through the blocks); otherwise it stays in the model's graph.
    ``queries_keys=True`` also records ``q`` ``(B, H, Lq, d)`` and ``k`` ``(B, H, M, d)`` (unscaled; the
    relevance pass's Q·Kᵀ rule).
    """

    def __init__(self, vit: ViTAdapter, leaf: bool = False, queries_keys: bool = False) -> None:
        self.vit = vit
        self.leaf = leaf
        self.queries_keys = queries_keys
        self.records: List[LayerRecord] = []

    def install(self, handles: list) -> None:
        self.vit.replace_pool_attention(self._core, handles)
        handles.append(self.vit.attention_pool.register_forward_pre_hook(self._x_in))

    def _x_in(self, module, args):
        self.records.append({"x_in": args[0].detach()})

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
        attn = attention_probs(q, k, scale, bias)
        if self.leaf:
            attn = attn.detach().requires_grad_(True)
        rec = self.records[-1]
        rec["attn"], rec["values"] = attn, merge_heads(v).detach()
        if self.queries_keys:
            rec["q"], rec["k"] = q.detach(), k.detach()
        return attn @ v

    @property
    def last(self) -> LayerRecord:
        return self.records[-1]


def _layer_norm_held(self, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm.forward`` with the normalisation (mean and standard deviation) held constant in the
    backward: the gradient flows through ``x − mean`` scaled by a constant ``1/σ`` (the LN-rule)."""
    dims = tuple(range(-len(self.normalized_shape), 0))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dims, keepdim=True).detach()
    var = xf.var(dims, keepdim=True, unbiased=False).detach()
    y = (xf - mean) / torch.sqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y.to(x.dtype)


def hold_layer_norms(vit, handles: list) -> None:
    """Every ``nn.LayerNorm`` of the model (blocks, final norm, head) with its normalisation held constant
    in the backward (conservative propagation's LN-rule); undone by the ``handles``."""
    from .models.protocol import PatchedForward

    for m in _model_of(vit).modules():
        if isinstance(m, nn.LayerNorm):
            handles.append(PatchedForward(m, _layer_norm_held))
