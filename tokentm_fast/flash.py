"""The flash explanation path: every method without an N×N tensor (docs/methods.md §8).

The adapter's attention call site (``replace_attention``) runs the explanation
attention instead of ``softmax(scale·QKᵀ)V``; the forward keeps per layer only
O(N·D) tensors (Q, K, V, O and the row log-sum-exp ℓ), and:

- TokenTM / GAE: the row algorithm runs inside the attention backward
  (``tokentm_fast.attention.ExplanationAttention``): the dK/dV program adds
  ``Σ_i s[i] · max(P ⊙ G, 0)`` for the row state s of the layer, and the state
  moves to the layer below as autograd reaches it. The (B, N) transformation
  weights are computed in the forward from the layer's tokens, which are then
  dropped.
- Rollout: the forward keeps Q, K and ℓ; a top-down pass recomputes P tile by
  tile: ``r ← ½ Σ_i r[i] · mean_h P[i, :] + ½ r``.
- Raw attention: row cls of Pᴸ from q_cls, K and ℓ[cls] (or the pooled rows' mean).
- Attention Grad-CAM and LeGrad: the forward keeps each layer's input, values and
  mixed heads; the tails of the blocks are re-run from the mixed heads ``o`` in
  one backward (as on the materialized path), giving ``dO = ∂s_l/∂o``, and
  ``G[i, j] = ⟨dO[i], v_j⟩`` is reduced without being formed: over the prefix
  rows with token pooling, by the tiled ``Σ_i max(G[i, j], 0)`` with mean pooling.

Which path runs when is decided in ``tokentm_fast.api`` (``attention=``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .aggregation import GAE, ROLLOUT, finish_rows
from .attention import AttentionKernels, ExplanationAttention, RowState
from .capture import LayerRecorder, explicit_attention
from .fast_path import block_tail_grads
from .methods import chosen_layers
from .models.protocol import ViTAdapter, split_heads
from .targets import TargetList, resolve_target, target_score
from .transform import token_lengths

#: head widths of the attention kernels (wider heads stay on the materialized path)
MAX_HEAD_DIM = 128


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


def explain_flash(vit: ViTAdapter, images: torch.Tensor, method: str, target, options: Dict[str, Any],
                  kernels, attention: AttentionKernels) -> torch.Tensor:
    """The explanation over the patch tokens ``(B, N−P)`` float32, without any N×N tensor.

    ``kernels``: the ``fast_path.Kernels`` set (for the transformation weights);
    ``attention``: the attention kernel pair (``tokentm_fast.attention.triton_attention()``).
    ``target`` a ``TargetList`` (LeGrad, attention Grad-CAM only): the list of the K explanations
    from one forward pass (``tokentm_fast.multi_target``).
    """
    attention = _head_width_checked(attention)
    if method == "tokentm":
        return _row_engine(vit, images, target, options, kernels, attention, with_weights=True)
    if method == "gae":
        return _row_engine(vit, images, target, {"start_layer": 0, "init": "identity"}, kernels, attention,
                           with_weights=False)
    if method == "rollout":
        return _rollout(vit, images, chosen_layers(options, vit.num_layers), attention)
    if method == "raw_attention":
        return _raw_attention(vit, images, attention)
    if method in ("legrad", "attn_gradcam"):
        return _tail_gradients(vit, images, target, method, options, attention)
    raise ValueError(f"the flash path does not serve method {method!r}")


def _head_width_checked(attention: AttentionKernels) -> AttentionKernels:
    """The kernels take heads up to ``MAX_HEAD_DIM`` wide (tails of 80, 96, ... are masked). The entry
    routes wider heads away (``head_width``); this check guards models whose width it cannot read."""
    def forward(q, k, v, scale):
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"the flash attention kernels take heads up to {MAX_HEAD_DIM} wide; this model's "
                             f"heads are {q.shape[-1]} wide: use attention='materialized'")
        return attention.forward(q, k, v, scale)
    return attention._replace(forward=forward)


class _ChosenRows(RowState):
    """A ``RowState`` for a layer choice (docs/methods.md, "Layer choice"): the blocks between the
    chosen ones run the same differentiable attention (the gradient flows through them) but leave
    the row as it is — their backward gets no row (``row=None``: dQ, dK, dV only)."""

    def __init__(self, layers) -> None:
        super().__init__(layers[0], layers[-1])
        self.chosen = frozenset(layers)
        self.below = dict(zip(layers[1:], layers[:-1]))

    def scaled_row(self, layer: int):
        return super().scaled_row(layer) if layer in self.chosen else None

    def update(self, layer: int, t_heads) -> None:
        if layer in self.chosen:
            nxt = self.below.get(layer)
            super().update(layer, t_heads)
            self.next = nxt


def _row_engine(vit, images, target, options, kernels, attention, with_weights: bool):
    """TokenTM / GAE: the row algorithm inside the flash attention backward."""
    L = vit.num_layers
    layers = chosen_layers(options, L)
    first = layers[0]
    contiguous = layers == list(range(first, L))
    state = RowState(first, L - 1) if contiguous else _ChosenRows(layers)
    chosen = set(layers)
    anchor = torch.zeros((), dtype=torch.float32, device=images.device, requires_grad=True)
    use = dict(use_length=options.get("use_length", True), use_necc=options.get("use_necc", True))

    def core(l, q, k, v, scale):
        return ExplanationAttention.apply(q, k, v, anchor, scale, l, state, attention)

    def on_layer(l, rec):
        if l not in chosen:           # a block between the chosen ones: no weights, the row passes
            pass
        elif with_weights:
            with torch.no_grad():
                x_tilde = vit.value_tokens(l, rec["values"])
                state.weights[l] = (kernels.transform_weights(rec["x_in"], x_tilde, **use),
                                    kernels.transform_weights(rec["y"], rec["mlp_out"], **use))
        else:
            state.weights[l] = (GAE.w_attn, GAE.w_mlp)
        rec.clear()

    keys = ("x_in", "values", "y", "mlp_out") if with_weights else ()
    recorder = LayerRecorder(vit, range(first, L), on_layer=on_layer, keys=keys, core=core)
    with explicit_attention(vit) as handles, torch.enable_grad():
        vit.replace_attention(range(first), _plain_core(attention), handles)  # below the aggregation
        recorder.install(handles)
        output = vit.forward(images)
        target = resolve_target(target, output)
        n = recorder.first_input.shape[1]
        state.start(vit.query_vector(images.shape[0], n, device=images.device))
        torch.autograd.grad(target_score(output, target), [anchor])
    c0 = token_lengths(recorder.first_input) if with_weights and options["init"] == "length" else None
    return finish_rows(state.rows[:, None], c0)[:, 0, vit.num_prefix_tokens:]


def _plain_core(attention: AttentionKernels):
    """The flash forward alone (layers whose attention the method does not read)."""
    def core(l, q, k, v, scale):
        return attention.forward(q, k, v, scale)[0]
    return core


def _saving_core(fwd, keep: Dict[int, tuple], layers):
    """An attention core that runs the flash forward and keeps (q, k, ℓ, scale) of ``layers``."""
    layers = set(layers)

    def core(l, q, k, v, scale):
        o, lse = fwd(q, k, v, scale)
        if l in layers:
            keep[l] = (q, k, lse, scale)
        return o
    return core


def _rollout(vit, images, layers, attention: AttentionKernels):
    """The engine's update with rollout's constants (s = ½ r, r ← s + Σ_i s[i] mean_h P[i, :]), top-down
    from the query row, P recomputed tile by tile from the saved Q, K and ℓ."""
    L = vit.num_layers
    keep: Dict[int, tuple] = {}
    with explicit_attention(vit) as handles, torch.no_grad():
        vit.replace_attention(range(L), _saving_core(attention.forward, keep, layers), handles)
        vit.forward(images)
        n = keep[layers[-1]][0].shape[2]
        r = vit.query_vector(images.shape[0], n, device=images.device)
        for l in reversed(layers):
            q, k, lse, scale = keep.pop(l)
            s = r * (1.0 + ROLLOUT.w_mlp)
            r = s + attention.rows(s, scale, q=q, k=k, lse=lse).mean(1) * ROLLOUT.w_attn
    return r[:, vit.num_prefix_tokens:]


def _query_probs(vit, attention: AttentionKernels, q, k, lse, scale) -> torch.Tensor:
    """``(B, H, N)``: Σ_i query[i] · P[i, :] of one layer — row cls alone when there is a class token."""
    b, _, n, _ = q.shape
    if vit.has_class_token:  # one row: (B, H, 1, d) · (B, H, d, N), no tile loop needed
        s = scale * (q[:, :, :1].float() @ k.float().transpose(-1, -2))[:, :, 0]
        return torch.exp(s - lse[:, :, :1])
    return attention.rows(vit.query_vector(b, n, device=q.device), scale, q=q, k=k, lse=lse)


def _raw_attention(vit, images, attention: AttentionKernels):
    """mean_h Aᴸ[cls, P:] from q_cls, K and ℓ[cls]."""
    keep: Dict[int, tuple] = {}
    last = vit.num_layers - 1
    with explicit_attention(vit) as handles, torch.no_grad():
        vit.replace_attention(range(vit.num_layers), _saving_core(attention.forward, keep, [last]), handles)
        vit.forward(images)
        e = _query_probs(vit, attention, *keep.pop(last)).mean(1)
    return e[:, vit.num_prefix_tokens:]


def _tail_gradients(vit, images, target, method: str, options, attention: AttentionKernels):
    """LeGrad (all of its layers in one reduction) and attention Grad-CAM from dO = ∂s_l/∂o."""
    L, P, heads = vit.num_layers, vit.num_prefix_tokens, vit.num_heads
    layers = chosen_layers(options, L) if method == "legrad" else [L - 1]
    keep: Dict[int, tuple] = {}
    core = _saving_core(attention.forward, keep, layers if method == "attn_gradcam" else ())
    recorder = LayerRecorder(vit, layers, keys=("x_in", "values", "attn_out"), core=core)
    others = [l for l in range(L) if l not in set(layers)]
    with explicit_attention(vit) as handles:
        vit.replace_attention(others, _plain_core(attention), handles)
        recorder.install(handles)
        # several targets (a TargetList): one gradient list per target from this one forward
        d_outs, rows = block_tail_grads(vit, images, target, layers, recorder.records)
    recs = recorder.records
    b, n = images.shape[0], recorder.first_input.shape[1]

    def gradcam(d_outs):
        l = layers[0]
        q, k, lse, scale = keep[l]
        v = split_heads(recs[l]["values"], heads).float()
        do = split_heads(d_outs[0].float(), heads)                                  # (B, H, R, d)
        query = vit.query_vector(b, n, device=images.device)[:, rows]
        g_q = (torch.einsum("br,bhrd->bhd", query, do)[:, :, None] @ v.transpose(-1, -2))[:, :, 0]  # (B, H, N)
        alpha = g_q[:, :, P:].mean(-1, keepdim=True)
        e = (alpha * _query_probs(vit, attention, q, k, lse, scale)).mean(1).clamp_min(0)
        return e[:, P:]

    def legrad(d_outs):
        # e_j = Σ_l mean_h (1/N) Σ_i max(⟨dO_l[i], v_j⟩, 0), all layers in one launch
        v_all = torch.cat([split_heads(recs[l]["values"], heads) for l in layers])            # (L'·B, H, N, d)
        if vit.pooling == "token":
            do_all = torch.cat([split_heads(d.to(v_all.dtype), heads) for d in d_outs])  # (L'·B, H, P, d)
            g = (do_all.float() @ v_all.float().transpose(-1, -2)).clamp_min(0)            # (L'·B, H, P, N)
            t = g.sum(2)
        else:
            do_all = torch.cat([split_heads(d.to(v_all.dtype), heads) for d in d_outs])  # (L'·B, H, N, d)
            ones = torch.ones(do_all.shape[0], n, device=images.device)
            t = attention.rows(ones, 1.0, do=do_all, v=v_all)                              # (L'·B, H, N)
        e = (t.mean(1) / n).unflatten(0, (len(layers), b)).sum(0)
        return e[:, P:]

    reduce = gradcam if method == "attn_gradcam" else legrad
    out = [reduce(d) for d in d_outs] if isinstance(target, TargetList) else reduce(d_outs)
    keep.clear()
    return out
