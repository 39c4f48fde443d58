"""The literal reference: every method exactly as docs/methods.md writes it.

Full N×N matrices, every product formed, float64 throughout (a float64 copy of
the model; the caller's model is never touched). This is the oracle the fast
paths are tested against, not a path to use for speed.

All functions return the explanation over the patch tokens, ``(B, N−P)``, or
for ``full=True`` the whole ``(B, N, N)`` matrix ``Cᴸ``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from .capture import LayerRecorder, PoolRecorder, hold_layer_norms, prepared_model
from .fusion import fuse_heads
from .methods import chosen_layers, get_method
from .targets import CosineSimilarity, resolve_target, target_score
from .transform import EPS, token_lengths, transform_weights
from .models.protocol import ViTAdapter


def _eye(b: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).expand(b, n, n)


def _diag(w: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(w)


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
        return _relevance_method(vit, x, method, target, options)
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
                    x_p, xt_p = rec["x_in"], vit.pool_value_tokens(rec["values"])
                    if x_p.shape[-1] == xt_p.shape[-1]:
                        w_pool = transform_weights(x_p, xt_p, use_length=options["use_length"],
                                                   use_necc=options["use_necc"])
                    else:   # a pool narrower than the blocks: no angle, NECC = 1/M, the length ratio (§6.1)
                        len_x, len_t = token_lengths(x_p), token_lengths(xt_p)
                        ratio = len_t / len_x.clamp_min(EPS) if options["use_length"] else torch.ones_like(len_x)
                        w_pool = ratio / x_p.shape[-2]
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
            c = _diag(token_lengths(recorder.first_input))
        else:
            c = eye.clone()
        for l in layers:
            rec = recs[l]
            if method == "rollout":
                c = fuse_heads(rec["attn"], None, "rollout") @ c
                continue
            if method == "gae":
                c = c + fuse_heads(rec["attn"], grads[l], "gae") @ c
                continue
            use = dict(use_length=options["use_length"], use_necc=options["use_necc"])
            w_attn = transform_weights(rec["x_in"], vit.value_tokens(l, rec["values"]), **use)
            w_mlp = transform_weights(rec["y"], rec["mlp_out"], **use)
            a_bar = fuse_heads(rec["attn"], grads[l], options["head_fusion"])
            u_attn = eye + a_bar @ _diag(w_attn)
            u_mlp = eye + _diag(w_mlp)
            c = u_mlp @ u_attn @ c
        if full:
            return c
        return torch.einsum("bi,bij->bj", q, c)[:, P:]


def _held_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach() @ v


def _gradient_times_activation(vit: ViTAdapter, x: torch.Tensor, method: str, target) -> torch.Tensor:
    """docs/methods.md §6.2 literally. conservative_lrp: Σ_d X⁰ ∂s/∂X⁰ with the attention probabilities and
    the LayerNorms' normalisation constants of the backward; attcat: Σ_l mean_h Aˡ_h[q, j] Σ_{c in head h}
    ∇hˡ_{j,c} hˡ_{j,c} over the tokens hˡ leaving each block."""
    L, P, conservative = vit.num_layers, vit.num_prefix_tokens, method == "conservative_lrp"
    core = (lambda l, q, k, v, scale: _held_attention(q, k, v, scale)) if conservative else None
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


def _relevance_method(vit: ViTAdapter, x: torch.Tensor, method: str, target, options: Dict[str, Any]) -> torch.Tensor:
    """docs/methods.md §6.3 with whole matrices: the relevance pass (``RelevancePass``, itself the rules
    written out; its independent oracle is tests/lrp_oracle.py) in float64, then for
    transformer_attribution every ∇Aˡ from one backward and the product ``Π_l (Āˡ + I)`` formed."""
    from .methods.relevance import RelevancePass, head_rows, lrp, partial_lrp

    if method == "lrp":
        return lrp(vit, x, target, options, None)
    if method == "partial_lrp":
        return partial_lrp(vit, x, target, options, None)
    L, P = vit.num_layers, vit.num_prefix_tokens
    layers = list(range(options["start_layer"], L))
    run = RelevancePass(vit, x, layers, grads=True)
    with prepared_model(vit) as handles, torch.enable_grad():
        output = run.forward(handles)
        t = resolve_target(target, output)
        attns = [run.recorder.records[l]["attn"] for l in layers]
        pooled = run.pool is not None
        grads = torch.autograd.grad(target_score(output, t), attns + ([run.pool.last["attn"]] if pooled else []))
        y = output.detach().requires_grad_(True)
        (r,) = torch.autograd.grad(target_score(y, t), [y])
    with torch.no_grad():
        r, r_pool = run.head(r)
        b, n = x.shape[0], attns[0].shape[-1]
        if pooled:   # the row starts at the pool's first latent: mean_h max(∇A_pool ⊙ R^{A_pool}, 0)
            q = (_latent0(vit, grads[-1], n) * r_pool).clamp(min=0).mean(1)
        else:
            q = head_rows(vit, b, n, torch.float64, x.device)
        c = _eye(b, n, x)
        for l, g in zip(reversed(layers), reversed(grads[:len(layers)])):
            r, r_attn = run.block(l, r)
            c = c @ ((g * r_attn).clamp(min=0).mean(1) + _eye(b, n, x))       # C = Âᴸ ⋯ Â^{k+1}, top leftmost
        return torch.einsum("bi,bij->bj", q, c)[:, P:]


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
