"""The fast path: capture → transform weights → aggregation → map, streamed.

The same code runs with two kernel sets: the PyTorch functions
(``backend="torch"``, the CPU fallback) and the Triton kernels
(``backend="triton"``). Differences from the reference (docs/methods.md §3.1, §6):

- TokenTM / GAE: the row algorithm, run *inside the backward pass*. Autograd
  delivers ∂s/∂Aᴸ first and ∂s/∂A¹ last; a hook on each layer's attention
  updates the query row as that gradient arrives and lets it go, so no two
  layers' gradients are alive together. The (B, N) transformation weights are
  computed in the forward hooks; the (B, N, D) tokens are dropped at once.
- Rollout / raw attention: one forward without autograd.
- LeGrad / attention Grad-CAM: one forward without autograd, then for each
  layer the tail of its block (proj, MLP, head) is re-run from the mixed heads
  ``o = concat_h(A_h V_h)``; a single backward gives ∂s_l/∂o and
  ``G̃_h[i, j] = ⟨∂s_l/∂o_h[i], V_h[j]⟩``. With token pooling only the
  prefix rows are re-run. No ``create_graph``, no per-layer backward of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from . import aggregation, fusion, legrad, transform
from .aggregation import GAE, ROLLOUT, EngineConstants, finish_rows, initial_rows, query_support
from .models.protocol import ViTAdapter
from .capture import LayerRecorder, explicit_attention
from .methods import chosen_layers
from .targets import TargetList, resolve_target, target_score
from .transform import compute_dtype


@dataclass(frozen=True)
class Kernels:
    """One implementation of each fused operation (PyTorch or Triton)."""

    transform_weights: Callable
    fuse_heads: Callable
    row_update: Callable
    matrix_update: Callable
    legrad_reduce: Callable


TORCH_KERNELS = Kernels(
    transform_weights=transform.transform_weights,
    fuse_heads=fusion.fuse_heads,
    row_update=aggregation.row_update,
    matrix_update=aggregation.row_update,
    legrad_reduce=legrad.legrad_reduce,
)


def triton_kernels() -> Kernels:
    from . import kernels as k

    return Kernels(k.transform_weights, k.fuse_heads, k.row_update, _matrix_update_as_torch, k.legrad_reduce)


def _matrix_update_as_torch(*args, **kwargs):
    """``kernels.matrix_update`` with TF32 products only where torch's own switch allows them
    (``torch.backends.cuda.matmul.allow_tf32``, off by default), as the flash attention kernels do."""
    from . import kernels as k

    kwargs.setdefault("allow_tf32", bool(torch.backends.cuda.matmul.allow_tf32))
    return k.matrix_update(*args, **kwargs)


def explain_fast(
    vit: ViTAdapter,
    images: torch.Tensor,
    method: str,
    target: Optional[torch.Tensor],
    options: Dict[str, Any],
    kernels: Kernels,
    full: bool = False,
) -> torch.Tensor:
    """Explanation over the patch tokens ``(B, N−P)`` (or ``(B, N, N)`` with ``full``).

    ``target`` a ``TargetList`` of K targets (TokenTM, GAE, LeGrad, attention Grad-CAM): the list of
    the K explanations from one forward pass (``tokentm_fast.multi_target``)."""
    if method == "tokentm":
        consts = EngineConstants(options["head_fusion"], None, None)
        return _gradient_engine(vit, images, target, consts, options, kernels, full)
    if method == "gae":
        return _gradient_engine(vit, images, target, GAE, {"start_layer": 0, "init": "identity"}, kernels, full)
    if method == "rollout":
        return _rollout(vit, images, chosen_layers(options, vit.num_layers), kernels, full)
    if method == "raw_attention":
        return _raw_attention(vit, images)
    if method in ("legrad", "attn_gradcam"):
        return _tail_gradient_method(vit, images, target, method, options, kernels)
    raise ValueError(f"unknown method {method!r}")


def _patch_part(vit: ViTAdapter, rows: torch.Tensor, full: bool) -> torch.Tensor:
    return rows if full else rows[:, 0, vit.num_prefix_tokens:]


def _gradient_engine(vit, images, target, consts: EngineConstants, options, kernels: Kernels, full: bool):
    """TokenTM / GAE: forward with hooks, then the row update inside the backward pass.

    Only the chosen blocks (``chosen_layers``: ``start_layer`` .. L−1, or TokenTM's ``layers``)
    update the row; the others leave it as it is (docs/methods.md, "Layer choice")."""
    L = vit.num_layers
    layers = chosen_layers(options, L)
    first, top_layer = layers[0], layers[-1]
    below = dict(zip(layers[1:], layers[:-1]))   # the chosen block whose gradient comes next
    with_weights = consts.w_attn is None
    attns: Dict[int, torch.Tensor] = {}
    weights: Dict[int, tuple] = {}

    def on_layer(l: int, rec: Dict[str, torch.Tensor]) -> None:
        attns[l] = rec.pop("attn")
        if with_weights:
            use = dict(use_length=options["use_length"], use_necc=options["use_necc"])
            with torch.no_grad():
                x_tilde = vit.value_tokens(l, rec["values"])
                weights[l] = (
                    kernels.transform_weights(rec["x_in"], x_tilde, **use),
                    kernels.transform_weights(rec["y"], rec["mlp_out"], **use),
                )
        else:
            weights[l] = (consts.w_attn, consts.w_mlp)
        rec.clear()

    keys = ("x_in", "values", "attn", "y", "mlp_out") if with_weights else ("attn",)
    recorder = LayerRecorder(vit, layers, grad_from=first, on_layer=on_layer, keys=keys)
    update = kernels.matrix_update if full else kernels.row_update
    with explicit_attention(vit) as handles, torch.enable_grad():
        recorder.install(handles)
        logits = vit.forward(images)
        # several targets (a TargetList): one forward, one backward per target through the kept graph
        many = isinstance(target, TargetList)
        targets = [resolve_target(t, logits) for t in (target if many else [target])]
        keep = len(targets) > 1          # the attentions and weights serve every backward
        b, n = logits.shape[0], attns[top_layer].shape[-1]
        query = vit.query_vector(b, n, dtype=compute_dtype(images), device=images.device)
        state: Dict[str, Any] = {}
        top = {} if full else {"support": query_support(vit.query_vector(1, n))}  # host-side: no sync

        def layer_hook(l: int):
            def hook(grad: torch.Tensor) -> None:
                if state["next"] != l:
                    raise RuntimeError(f"attention gradients arrived out of order (layer {l}, expected {state['next']})")
                w_attn, w_mlp = weights[l] if keep else weights.pop(l)
                state["rows"] = update(state["rows"], attns[l] if keep else attns.pop(l), grad, w_attn, w_mlp,
                                       mode=consts.fusion, **(top if l == top_layer else {}))
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
    c0 = None
    if with_weights and options["init"] == "length":
        c0 = transform.token_lengths(recorder.first_input)
    out = [_patch_part(vit, finish_rows(rows, c0), full) for rows in finished]
    return out if many else out[0]


def _rollout(vit, images, layers, kernels: Kernels, full: bool):
    """Rollout: mean_h Aˡ per chosen layer in the forward, then the engine with rollout's constants."""
    fused: Dict[int, torch.Tensor] = {}

    def on_layer(l, rec):
        fused[l] = kernels.fuse_heads(rec.pop("attn"), None, "mean")[:, None]  # (B, 1, N, N)

    recorder = LayerRecorder(vit, layers, on_layer=on_layer, keys=("attn",))
    with explicit_attention(vit) as handles, torch.no_grad():
        recorder.install(handles)
        vit.forward(images)
        b, n = images.shape[0], fused[layers[-1]].shape[-1]
        rows = initial_rows(vit.query_vector(b, n, dtype=compute_dtype(images), device=images.device), full)
        update = kernels.matrix_update if full else kernels.row_update
        top = {} if full else {"support": query_support(vit.query_vector(1, n))}
        for l in reversed(layers):
            rows = update(rows, fused.pop(l), None, ROLLOUT.w_attn, ROLLOUT.w_mlp, mode=ROLLOUT.fusion,
                          **(top if l == layers[-1] else {}))
    return _patch_part(vit, rows, full)


def _raw_attention(vit, images):
    """mean_h Aᴸ[cls, P:] (docs/methods.md §4)."""
    last = vit.num_layers - 1
    recorder = LayerRecorder(vit, [last], keys=("attn",))
    with explicit_attention(vit) as handles, torch.no_grad():
        recorder.install(handles)
        vit.forward(images)
        a = recorder.records[last]["attn"]
        acc = compute_dtype(a)
        q = vit.query_vector(a.shape[0], a.shape[-1], dtype=acc, device=a.device)
        e = torch.einsum("bi,bhij->bj", q, a.to(acc)) / a.shape[1]
    return e[:, vit.num_prefix_tokens:]


def block_tail_grads(vit, images, target, layers, recs):
    """The model's forward without autograd, then ``dO_l = ∂s_l/∂o_l`` of every layer in ``layers``
    from one backward through the re-run block tails (proj, MLP, head; docs/methods.md §6).

    ``recs[l]`` must hold ``x_in`` and ``attn_out`` (a ``LayerRecorder`` installed for the forward).
    Returns the list of ``(B, R, H·d)`` gradients and the slice of rows R they cover: with token
    pooling s_l reads only the prefix rows of Xˡ (the class token; distilled DeiT also its
    distillation token), and everything after the attention mixing is token-wise, so only those
    rows of the tails are re-run (dO is zero elsewhere).

    Several targets (a ``TargetList``): the one forward serves them all; the block tails are re-run
    once and back-propagated once per target (``retain_graph``), and the first result is the list
    over the targets of the gradient lists.
    """
    with torch.no_grad():
        output = vit.forward(images)
    many = isinstance(target, TargetList)
    targets = [resolve_target(t, output) for t in (target if many else [target])]
    rows = slice(0, vit.num_prefix_tokens) if vit.pooling == "token" else slice(None)
    with torch.enable_grad():
        leaves = [recs[l]["attn_out"][:, rows].detach().requires_grad_(True) for l in layers]
        if not many:
            score = sum(target_score(vit.head(vit.block_tail(l, recs[l]["x_in"][:, rows], o)), targets[0])
                        for l, o in zip(layers, leaves))
            return list(torch.autograd.grad(score, leaves)), rows
        outs = [vit.head(vit.block_tail(l, recs[l]["x_in"][:, rows], o)) for l, o in zip(layers, leaves)]
        grads = [list(torch.autograd.grad(sum(target_score(out, t) for out in outs), leaves,
                                          retain_graph=k < len(targets) - 1))
                 for k, t in enumerate(targets)]
        return grads, rows


def _tail_gradient_method(vit, images, target, method: str, options, kernels: Kernels):
    """LeGrad (docs/methods.md §6) and attention Grad-CAM (§5) from ∂s_l/∂o of each layer's block tail."""
    L, P = vit.num_layers, vit.num_prefix_tokens
    layers = chosen_layers(options, L) if method == "legrad" else [L - 1]
    keys = ("x_in", "values", "attn_out") + (("attn",) if method == "attn_gradcam" else ())
    recorder = LayerRecorder(vit, layers, keys=keys)
    with explicit_attention(vit) as handles:
        recorder.install(handles)
        d_outs, rows = block_tail_grads(vit, images, target, layers, recorder.records)
    recs = recorder.records
    b, n = images.shape[0], recs[layers[0]]["values"].shape[1]
    heads, acc = vit.num_heads, compute_dtype(images)

    def reduce(d_outs):
        e = torch.zeros(b, n, dtype=acc, device=images.device)
        for l, d_out in zip(layers, d_outs):
            v = recs[l]["values"].to(acc).unflatten(-1, (heads, -1)).transpose(1, 2)    # (B, H, N, d)
            d = d_out.to(acc).unflatten(-1, (heads, -1)).transpose(1, 2)                 # (B, H, Q, d)
            g_rows = d @ v.transpose(-1, -2)                                             # (B, H, Q, N)
            if method == "legrad":
                e += kernels.legrad_reduce(g_rows, n).to(acc)
                continue
            a = recs[l]["attn"].to(acc)
            q = vit.query_vector(b, n, dtype=acc, device=images.device)
            a_q = torch.einsum("bi,bhij->bhj", q, a)
            g_q = torch.einsum("bi,bhij->bhj", q[:, rows], g_rows)
            alpha = g_q[:, :, P:].mean(-1, keepdim=True)
            e = (alpha * a_q).mean(1).clamp_min(0)
        return e[:, P:]

    # several targets: one gradient list per target, from the one forward (block_tail_grads)
    return [reduce(d) for d in d_outs] if isinstance(target, TargetList) else reduce(d_outs)
