"""The literal reference: every method exactly as docs/methods.md writes it.

Full N×N matrices, every product formed, float64 throughout (a float64 copy of
the model; the caller's model is never touched). This is the oracle the fast
paths are tested against, not a path to use for speed.

All functions return the explanation over the patch tokens, ``(B, N−P)``, or
for ``full=True`` the whole ``(B, N, N)`` matrix ``Cᴸ``; ``lrp`` its pixel map
``(B, H, W)``.

**Its own method math.** The transformation weights (§2: length ratio, NECC),
the head fusions (§3, §4), the engine products (§3, §4), raw attention,
attention Grad-CAM, LeGrad, the attention-pool starts (§6.1), conservative
LRP and ATTCAT (§6.2) are written out below; the LRP relevance pass (§6.3:
its rules "ours" and "classic", the blocks, the head, the attention pools,
the pixels) in ``tokentm_fast.reference_relevance``. Nothing is imported from
the fast paths (``fusion``, ``transform``, ``aggregation``, ``legrad``,
``lrp_rules``, ``paths``, ``methods.engine`` / ``tails`` / ``relevance`` /
``pool`` / ``raw``, ``kernels``): ``tests/test_reference.py`` checks it.

**What it shares, and why that is not method math** (model plumbing):

- ``models.protocol``: the adapter, which says which module of a model family
  plays which part of the block of docs/methods.md §1 (``value_tokens`` /
  ``attn_output`` = γ₁ ⊙ proj, the model's own head, its pool, the rows the
  head reads as ``query_vector`` / ``pooled_rows`` / ``pool_columns``, and
  where each linear map reads its input for the relevance pass). It runs the
  model's own modules; it computes no explanation.
- ``capture``: ``prepared_model`` (eval mode, frozen parameters, fused
  attention off, every hook removed afterwards); ``LayerRecorder``,
  ``PoolRecorder``, ``PointRecorder`` (hooks that record the tensors of one
  forward: block inputs, q, k, v, the attention probabilities
  softmax(scale · q kᵀ) the model computes, branch outputs, the inputs of the
  linear maps); ``hold_layer_norms`` (the model's LayerNorms with their
  statistics held, the model change conservative LRP's LN-rule asks for; the
  gradient × input itself is computed here).
- ``targets``: checking and resolving the target, the explained score s.
- ``methods``: the registry, for a method's flags (``get_method``: needs a
  backward, takes a layer choice) and the resolved layer option
  (``chosen_layers``); option checking happens before the reference is called.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from . import reference_relevance
from .capture import LayerRecorder, PoolRecorder, hold_layer_norms, prepared_model
from .methods import chosen_layers, get_method
from .models.protocol import ViTAdapter
from .targets import CosineSimilarity, resolve_target, target_score

#: ε of the norm clamps of the transformation weights (docs/methods.md §2)
EPS = 1e-6


def _eye(b: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).expand(b, n, n)


def _diag(w: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(w)


# --------------------------------------------------------------------------- §2 transformation weights
def _lengths(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖₂ of every token: ``(B, N, D) -> (B, N)``."""
    return (x * x).sum(-1).sqrt()


def _transformation_weights(x: torch.Tensor, x_tilde: torch.Tensor, use_length: bool, use_necc: bool
                            ) -> torch.Tensor:
    """docs/methods.md §2: ``w_i = ‖x̃_i‖ / max(‖x_i‖, ε) · NECC_i``, NECC the softmax over the N tokens of
    ``cos_i = ⟨x_i, x̃_i⟩ / (max(‖x_i‖, ε) max(‖x̃_i‖, ε))``; ``use_length=False``: the ratio is 1,
    ``use_necc=False``: NECC is 1/N. ``x, x_tilde (B, N, D)`` → ``(B, N)``."""
    len_x, len_t = _lengths(x), _lengths(x_tilde)
    n = x.shape[-2]
    if use_necc:
        cos = (x * x_tilde).sum(-1) / (len_x.clamp_min(EPS) * len_t.clamp_min(EPS))
        necc = cos.exp() / cos.exp().sum(-1, keepdim=True)
    else:
        necc = torch.full_like(len_x, 1.0 / n)
    ratio = len_t / len_x.clamp_min(EPS) if use_length else torch.ones_like(len_x)
    return ratio * necc


def _pool_weights(x: torch.Tensor, x_tilde: torch.Tensor, use_length: bool, use_necc: bool) -> torch.Tensor:
    """w^pool (docs/methods.md §6.1): §2 where the pool keeps the width; a pool narrower than the blocks: no
    angle, NECC = 1/M, the length ratio (``use_length=False``: 1/M). ``(B, M, D)``, ``(B, M, D')`` → ``(B, M)``."""
    if x.shape[-1] == x_tilde.shape[-1]:
        return _transformation_weights(x, x_tilde, use_length, use_necc)
    len_x = _lengths(x)
    ratio = _lengths(x_tilde) / len_x.clamp_min(EPS) if use_length else torch.ones_like(len_x)
    return ratio / x.shape[-2]


# --------------------------------------------------------------------------- §3 / §4 head fusion
def _head_fusion(attn: torch.Tensor, grad: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """Āˡ of one layer, ``(B, H, N, N) -> (B, N, N)``: ``"gae"`` mean_h max(A_h ⊙ G_h, 0), ``"decoupled"``
    mean_h A_h ⊙ mean_h max(G_h, 0) (docs/methods.md §3), ``"mean"`` mean_h A_h (rollout, §4)."""
    if mode == "gae":
        return (attn * grad).clamp_min(0).mean(1)
    if mode == "decoupled":
        return attn.mean(1) * grad.clamp_min(0).mean(1)
    if mode == "mean":
        return attn.mean(1)
    raise ValueError(f"unknown head fusion {mode!r}")


def explain_reference(
    vit: ViTAdapter,
    images: torch.Tensor,
    method: str,
    target: Optional[torch.Tensor],
    options: Dict[str, Any],
    full: bool = False,
) -> torch.Tensor:
    """Reference explanation of ``images (B, C, H, W)``; float64 result."""
    if method == "legrad" and options.get("neutral_prompt") is not None:
        # docs/methods.md §6, the SigLIP correction: zero where the neutral prompt's min–max map exceeds the threshold
        plain = {**options, "neutral_prompt": None}
        e = explain_reference(vit, images, method, target, plain, full)
        e_n = explain_reference(vit, images, method, CosineSimilarity(options["neutral_prompt"]), plain, full)
        lo = e_n.amin(dim=1, keepdim=True)
        span = e_n.amax(dim=1, keepdim=True) - lo
        normalised = torch.where(span > 0, (e_n - lo) / torch.where(span > 0, span, 1.0), 0.0)
        return torch.where(normalised > options["correction_threshold"], 0.0, e)
    model = copy.deepcopy(vit.model).double()
    vit = vit.with_model(model)
    x = images.to(torch.float64)
    L, P = vit.num_layers, vit.num_prefix_tokens
    if method in ("attcat", "conservative_lrp"):
        return _gradient_times_activation(vit, x, method, target)
    if method in ("lrp", "partial_lrp", "transformer_attribution"):
        return getattr(reference_relevance, method)(vit, x, target, options)
    spec = get_method(method)
    uses_grad = spec.needs_gradients
    # first block used: start_layer where the method has it, all blocks for GAE, the last otherwise
    first = options.get("start_layer", 0 if method == "gae" else L - 1)
    layers = list(range(first, L))
    if spec.layer_choice:     # LeGrad's sum / rollout's product over the chosen blocks only
        layers = chosen_layers(options, L)
        first = layers[0]
    recorder = LayerRecorder(vit, layers, grad_from=first if uses_grad else None)
    pooled = vit.attention_pool is not None
    pool = PoolRecorder(vit)
    with prepared_model(vit) as handles, torch.set_grad_enabled(uses_grad):
        recorder.install(handles)
        if pooled:
            pool.install(handles)
        logits = vit.forward(x)
        target = resolve_target(target, logits)
        recs = recorder.records
        b, n = x.shape[0], recs[layers[-1]]["attn"].shape[-1]
        q = vit.query_vector(b, n, dtype=torch.float64, device=x.device) if not pooled else None
        if method == "legrad":
            if pooled:
                return _legrad_at_pool(vit, recs, layers, target, n)
            return _legrad(vit, recs, layers, target, P, options["layer_pooling"])
        grads = {}
        if uses_grad:
            needed = layers if method != "attn_gradcam" or pooled else [L - 1]
            if method == "attn_gradcam" and pooled:
                needed = []
            at = [recs[l]["attn"] for l in needed] + ([pool.last["attn"]] if pooled else [])
            g = torch.autograd.grad(target_score(logits, target), at)
            grads = dict(zip(needed, g))
            if pooled:
                grads["pool"] = g[-1]

    with torch.no_grad():
        if pooled:   # docs/methods.md §6.1: the row starts at the pool's first latent (over all N tokens)
            a_pool = _latent0(vit, pool.last["attn"], n)                   # (B, H, N)
            g_pool = _latent0(vit, grads["pool"], n) if "pool" in grads else None
            if method == "raw_attention":
                return a_pool.mean(1)[:, P:]
            if method == "attn_gradcam":
                alpha = g_pool[:, :, P:].mean(-1, keepdim=True)
                return (alpha * a_pool).mean(1).clamp_min(0)[:, P:]
            if method == "rollout":
                q = a_pool.mean(1)
            else:
                q = (a_pool * g_pool).clamp_min(0).mean(1)
                if method == "tokentm":
                    rec = pool.last
                    w_pool = _pool_weights(rec["x_in"], vit.pool_value_tokens(rec["values"]),
                                           options["use_length"], options["use_necc"])
                    q = q * _latent0(vit, w_pool[:, None, None, :], n)[:, 0]
        if method == "raw_attention":
            a = recs[L - 1]["attn"].mean(1)
            return torch.einsum("bi,bij->bj", q, a)[:, P:]
        if method == "attn_gradcam":
            a, g = recs[L - 1]["attn"], grads[L - 1]                       # (B, H, N, N)
            a_q = torch.einsum("bi,bhij->bhj", q, a)                        # row cls of A_h
            g_q = torch.einsum("bi,bhij->bhj", q, g)                        # row cls of G_h
            alpha = g_q[:, :, P:].mean(-1, keepdim=True)                    # α_h
            return (alpha * a_q).mean(1).clamp_min(0)[:, P:]

        # TokenTM, GAE, rollout: C ← Uˡ C with the full matrices of docs/methods.md §3/§4.
        eye = _eye(b, n, x)
        if method == "tokentm" and options["init"] == "length":
            c = _diag(_lengths(recorder.first_input))
        else:
            c = eye.clone()
        for l in layers:
            rec = recs[l]
            if method == "rollout":    # Âˡ = ½ mean_h Aˡ_h + ½ I
                c = (0.5 * _head_fusion(rec["attn"], None, "mean") + 0.5 * eye) @ c
                continue
            if method == "gae":        # Rˡ = Rˡ⁻¹ + Āˡ Rˡ⁻¹
                c = c + _head_fusion(rec["attn"], grads[l], "gae") @ c
                continue
            use = (options["use_length"], options["use_necc"])
            w_attn = _transformation_weights(rec["x_in"], vit.value_tokens(l, rec["values"]), *use)
            w_mlp = _transformation_weights(rec["y"], rec["mlp_out"], *use)
            a_bar = _head_fusion(rec["attn"], grads[l], options["head_fusion"])
            u_attn = eye + a_bar @ _diag(w_attn)
            u_mlp = eye + _diag(w_mlp)
            c = u_mlp @ u_attn @ c
        if full:
            return c
        return torch.einsum("bi,bij->bj", q, c)[:, P:]


def _held_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
    logits = (q * scale) @ k.transpose(-2, -1)
    return (logits if bias is None else logits + bias).softmax(dim=-1).detach() @ v


def _gradient_times_activation(vit: ViTAdapter, x: torch.Tensor, method: str, target) -> torch.Tensor:
    """docs/methods.md §6.2 literally. conservative_lrp: Σ_d X⁰ ∂s/∂X⁰ with the attention probabilities and
    the LayerNorms' normalisation constants of the backward; attcat: Σ_l mean_h Aˡ_h[q, j] Σ_{c in head h}
    ∇hˡ_{j,c} hˡ_{j,c} over the tokens hˡ leaving each block."""
    L, P, conservative = vit.num_layers, vit.num_prefix_tokens, method == "conservative_lrp"
    core = (lambda l, q, k, v, scale, bias=None: _held_attention(q, k, v, scale, bias)) if conservative else None
    recorder = LayerRecorder(vit, range(L), grad_from=0, core=core,
                             keys=() if conservative else ("attn", "x_out"))
    with prepared_model(vit) as handles, torch.enable_grad():
        if conservative:
            hold_layer_norms(vit, handles)
            if vit.attention_pool is not None:
                vit.replace_pool_attention(_held_attention, handles)
        recorder.install(handles)
        logits = vit.forward(x)
        s = target_score(logits, resolve_target(target, logits))
        if conservative:
            (g,) = torch.autograd.grad(s, [recorder.leaf])
            return (recorder.leaf * g).sum(-1).detach()[:, P:]
        recs = [recorder.records[l] for l in range(L)]
        grads = torch.autograd.grad(s, [r["x_out"] for r in recs])
    b, n = x.shape[0], recs[0]["attn"].shape[-1]
    q = vit.query_vector(b, n, dtype=torch.float64, device=x.device)
    e = 0
    for r, g in zip(recs, grads):
        heads = r["attn"].shape[1]
        a_q = torch.einsum("bi,bhij->bhj", q, r["attn"].detach())
        cam = (g * r["x_out"].detach()).unflatten(-1, (heads, -1)).sum(-1).transpose(1, 2)   # (B, H, N)
        e = e + (a_q * cam).mean(1)
    return e[:, P:]


def _latent0(vit: ViTAdapter, t: torch.Tensor, n: int) -> torch.Tensor:
    """Latent 0 of a pool tensor ``(B, H, Lq, M)`` as ``(B, H, N)``: zeros off the tokens the pool reads."""
    out = torch.zeros(t.shape[0], t.shape[1], n, dtype=t.dtype, device=t.device)
    out[:, :, vit.pool_columns(n)] = t[:, :, 0]
    return out


def _legrad_at_pool(vit: ViTAdapter, recs, layers, target, n: int) -> torch.Tensor:
    """docs/methods.md §6 for an attention-pool head: s_l from the pool applied to Xˡ, its gradient w.r.t.
    that application's pool attention, eˡ = mean_h max(G̃[h, 0, :], 0)."""
    e = 0
    for l in layers:
        pool, handles = PoolRecorder(vit), []
        pool.install(handles)
        try:
            s_l = target_score(vit.pool_head(recs[l]["x_out"]), target)
        finally:
            for h in reversed(handles):
                h.remove()
        (g,) = torch.autograd.grad(s_l, pool.last["attn"], retain_graph=True)
        e = e + _latent0(vit, g, n).clamp_min(0).mean(1)
    return e.detach()[:, vit.num_prefix_tokens:]


def _legrad(vit: ViTAdapter, recs, layers, target: torch.Tensor, P: int, layer_pooling: str) -> torch.Tensor:
    """docs/methods.md §6 literally: one autograd call per layer on the full graph; s_l from layer l's
    tokens by the mean over all of them, the final norm and projection / classifier (``"mean"``), or by
    the model's own head (``"head"``)."""
    e = 0
    for l in layers:
        x_l = recs[l]["x_out"]
        out = vit.head(x_l) if layer_pooling == "head" else vit.pooled_head(x_l.mean(1))
        s_l = target_score(out, target)
        (g,) = torch.autograd.grad(s_l, recs[l]["attn"], retain_graph=True)  # (B, H, N, N)
        e = e + g.clamp_min(0).mean(2).mean(1)
    return e.detach()[:, P:]
