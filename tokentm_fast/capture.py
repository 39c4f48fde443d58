"""Capture of per-layer tensors from a timm ViT (docs/methods.md §1–§2).

``explicit_attention(model)`` prepares a model for one explanation call and
puts it back exactly as it was, also when the call raises: eval mode, explicit
(non-fused) attention so that the probabilities exist as tensors, parameters
frozen so that no parameter gradient is ever computed, hooks removed.

``LayerRecorder`` installs forward hooks that record, for each chosen block l
(0-based), a ``dict`` with

====================  ============  ==========================================
key                   shape         meaning
====================  ============  ==========================================
``x_in``              (B, N, D)     Xˡ⁻¹, the residual stream entering the block
``values``            (B, N, H·d)   v_j = concat_h V_h[j]
``attn``              (B, H, N, N)  Aˡ, post-softmax (graph-attached)
``attn_out``          (B, N, H·d)   o = concat_h(A_h V_h), before norm/proj
``y``                 (B, N, D)     Yˡ
``mlp_out``           (B, N, D)     γ₂ ⊙ MLP(LN₂(Yˡ))
``x_out``             (B, N, D)     Xˡ (graph-attached)
====================  ============  ==========================================

and calls ``on_layer(l, record)`` when block l has finished, so that a fast
path can reduce the record (e.g. to the (B, N) transformation weights) and
drop the large tensors at once. ``grad_from=k`` makes the input of block k a
leaf that requires grad: the graph (and the backward pass) then starts there.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

LayerRecord = Dict[str, torch.Tensor]


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[List[torch.utils.hooks.RemovableHandle]]:
    """Eval mode, explicit attention, frozen parameters; restore everything on exit.

    Yields a list to which callers append hook handles; they are removed on exit.
    """
    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    handles: List[torch.utils.hooks.RemovableHandle] = []
    try:
        model.eval()
        for m, _ in fused:
            m.fused_attn = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield handles
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
        for m, flag in fused:
            m.fused_attn = flag
        for p, flag in grads:
            p.requires_grad_(flag)


class LayerRecorder:
    """Forward hooks recording the tensors of chosen blocks (see module docstring).

    Args:
        blocks: the model's blocks, in order.
        layers: 0-based indices of the blocks to record.
        grad_from: 0-based block whose input becomes a grad-requiring leaf, or None
            (no graph is built: use under ``torch.no_grad``).
        on_layer: called as ``on_layer(l, record)`` after block l; may drop keys.
        keys: which record keys to keep (default: all).
    """

    ALL_KEYS = ("x_in", "values", "attn", "attn_out", "y", "mlp_out", "x_out")

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        layers: Sequence[int],
        grad_from: Optional[int] = None,
        on_layer: Optional[Callable[[int, LayerRecord], None]] = None,
        keys: Sequence[str] = ALL_KEYS,
    ) -> None:
        self.blocks = list(blocks)
        self.layers = sorted(set(layers))
        self.grad_from = grad_from
        self.on_layer = on_layer
        self.keys = set(keys)
        self.records: Dict[int, LayerRecord] = {}
        self.first_input: Optional[torch.Tensor] = None

    def install(self, handles: List[torch.utils.hooks.RemovableHandle]) -> None:
        """Register the hooks; the handles go into ``handles`` (removed by the caller)."""
        handles.append(self.blocks[0].register_forward_pre_hook(self._first_input))
        if self.grad_from is not None:
            handles.append(self.blocks[self.grad_from].register_forward_pre_hook(self._make_leaf))
        for l in self.layers:
            blk = self.blocks[l]
            attn = blk.attn
            hooks = [
                (blk, "pre", "x_in"), (attn.qkv, "post", "values"), (attn.attn_drop, "post", "attn"),
                (attn.norm, "pre", "attn_out"), (blk.norm2, "pre", "y"), (blk.ls2, "post", "mlp_out"),
            ]
            for module, kind, key in hooks:
                if key not in self.keys:
                    continue
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(self._pre(l, key)))
                else:
                    handles.append(module.register_forward_hook(self._post(l, key)))
            handles.append(blk.register_forward_hook(self._block_end(l)))

    # -- hooks -------------------------------------------------------------
    def _first_input(self, module, args):
        self.first_input = args[0].detach()

    def _make_leaf(self, module, args):
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

    def _store(self, l: int, key: str, tensor: torch.Tensor) -> None:
        if key == "values":  # qkv output (B, N, 3·H·d): the values are the last third
            tensor = tensor[..., 2 * (tensor.shape[-1] // 3):]
        keep_graph = key in ("attn", "x_out")
        self.records.setdefault(l, {})[key] = tensor if keep_graph else tensor.detach()

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
                rec["x_out"] = output
            if self.on_layer is not None:
                self.on_layer(l, rec)
        return hook
