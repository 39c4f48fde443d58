"""An independent implementation of docs/methods.md, for tests only.

It shares no code with the package: it runs the timm ViT by hand from its
weights (float64), keeps every attention map in the autograd graph, and
evaluates each method with explicit loops and full matrices exactly as the
spec writes them. Used as the oracle for both the reference and the fast
paths.
"""
from __future__ import annotations

import copy
import math

import torch

EPS = 1e-6
#: the methods written out here (the LRP relevance pass: tests/lrp_oracle.py)
METHODS = ("tokentm", "gae", "rollout", "raw_attention", "attn_gradcam", "legrad", "conservative_lrp", "attcat")


def _ls(module, x):
    gamma = getattr(module, "gamma", None)
    return x if gamma is None else x * gamma


def held_layer_norm(mod, x):
    """LayerNorm ``mod`` with its mean and standard deviation held constant in the backward (LN-rule)."""
    if not isinstance(mod, torch.nn.LayerNorm):
        return mod(x)
    mean = x.mean(-1, keepdim=True).detach()
    var = x.var(-1, keepdim=True, unbiased=False).detach()
    return (x - mean) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def run_vit(model, images, held=False):
    """Manual forward of a timm VisionTransformer in float64.

    ``held``: conservative propagation (docs/methods.md §6.2): every LayerNorm's normalisation and the
    attention probabilities are constants of the backward.

    Returns (logits, per-layer list of dicts with x_in (and x_in_graph, in the graph), v, attn, y, m, x_out),
    x0, model64.
    """
    m = copy.deepcopy(model).double().eval()
    if held:
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.forward = (lambda mod: lambda x: held_layer_norm(mod, x))(mod)
    for p in m.parameters():
        p.requires_grad_(False)
    x = images.double()
    t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    x0 = t
    t = t.detach().requires_grad_(True)
    layers = []
    for blk in m.blocks:
        a_mod = blk.attn
        b, n, _ = t.shape
        h, d = a_mod.num_heads, a_mod.head_dim
        z = blk.norm1(t)
        qkv = z @ a_mod.qkv.weight.T
        if a_mod.qkv.bias is not None:
            qkv = qkv + a_mod.qkv.bias
        qkv = qkv.reshape(b, n, 3, h, d)
        q = a_mod.q_norm(qkv[:, :, 0].transpose(1, 2))
        k = a_mod.k_norm(qkv[:, :, 1].transpose(1, 2))
        v = qkv[:, :, 2].transpose(1, 2)                                   # (B, H, N, d)
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        if held:
            attn = attn.detach()
        o = (attn @ v).transpose(1, 2).reshape(b, n, h * d)

        def proj(u):
            u = a_mod.norm(u) @ a_mod.proj.weight.T
            return u + a_mod.proj.bias if a_mod.proj.bias is not None else u

        y = t + _ls(blk.ls1, proj(o))
        mlp = _ls(blk.ls2, blk.mlp(blk.norm2(y)))
        x_out = y + mlp
        v_cat = v.transpose(1, 2).reshape(b, n, h * d).detach()
        layers.append(dict(x_in_graph=t, x_in=t.detach(), x_tilde=_ls(blk.ls1, proj(v_cat)).detach(), attn=attn,
                           y=y.detach(), m=mlp.detach(), x_out=x_out))
        t = x_out
    return head(m, t), layers, x0.detach(), m


def head(m, tokens):
    """final norm → pooling (class token or mean of patch tokens) → fc norm → classifier."""
    z = m.norm(tokens)
    if getattr(m, "head_dist", None) is not None:  # distilled DeiT: mean of the two heads (eval)
        return (m.head(z[:, 0]) + m.head_dist(z[:, 1])) / 2
    if m.global_pool == "token":
        z = z[:, 0]
    else:
        z = z[:, m.num_prefix_tokens:].mean(1)
    return m.head(m.fc_norm(z))


def pooled_head(m, v):
    """A pooled (B, D) vector through final norm → fc norm → classifier (distilled DeiT: both heads' mean)."""
    z = m.fc_norm(m.norm(v))
    if getattr(m, "head_dist", None) is not None:
        return (m.head(z) + m.head_dist(z)) / 2
    return m.head(z)


def weights(x, xt, use_length=True, use_necc=True):
    """docs/methods.md §2: w_i = |x̃_i| / max(|x_i|, ε) · exp(cos_i) / Σ_k exp(cos_k)."""
    lx = torch.sqrt((x * x).sum(-1))
    lt = torch.sqrt((xt * xt).sum(-1))
    cos = (x * xt).sum(-1) / (torch.maximum(lx, torch.tensor(EPS)) * torch.maximum(lt, torch.tensor(EPS)))
    n = x.shape[1]
    necc = torch.exp(cos) / torch.exp(cos).sum(-1, keepdim=True) if use_necc else torch.full_like(cos, 1.0 / n)
    ratio = lt / torch.maximum(lx, torch.tensor(EPS)) if use_length else torch.ones_like(cos)
    return ratio * necc


def query(m, b, n):
    """cls row, or (no class token) the mean over the pooled patch rows."""
    q = torch.zeros(b, n, dtype=torch.float64)
    if m.cls_token is not None:
        q[:, 0] = 1
    else:
        q[:, m.num_prefix_tokens:] = 1.0 / (n - m.num_prefix_tokens)
    return q


def explain(model, images, method, target=None, full=False, head_fusion="gae", use_length=True,
            use_necc=True, init="length", start_layer=None, chosen=None, layer_pooling="mean"):
    """Oracle explanation: ``(B, N−P)`` float64 (or ``(B, N, N)`` with full).

    ``layer_pooling`` (LeGrad, docs/methods.md §6): ``"mean"``, block l's score from the mean of its
    tokens over all N (prefix included), then final norm → fc norm → classifier; ``"head"``, the model's
    own head on block l's tokens.

    ``chosen`` (LeGrad, rollout, TokenTM; the option ``layers``, docs/methods.md "Layer choice"): the blocks
    summed / multiplied, in increasing order; overrides ``start_layer``."""
    if method not in METHODS:
        raise ValueError(f"spec_oracle writes out {METHODS}; {method!r} has its own oracle (tests/lrp_oracle.py)")
    logits, layers, x0, m = run_vit(model, images)
    b = images.shape[0]
    if target is None:
        target = logits.argmax(1)
    elif isinstance(target, int):
        target = torch.full((b,), target)
    P = m.num_prefix_tokens
    L = len(layers)
    n = x0.shape[1]
    s = logits[torch.arange(b), target].sum()
    q = query(m, b, n)
    eye = torch.eye(n, dtype=torch.float64).expand(b, n, n)

    if method == "legrad":
        k = (-2 if start_layer is None else start_layer) % L
        e = 0
        for l in (range(k, L) if chosen is None else sorted(x % L for x in chosen)):
            x_l = layers[l]["x_out"]
            out = head(m, x_l) if layer_pooling == "head" else pooled_head(m, x_l.mean(1))
            s_l = out[torch.arange(b), target].sum()
            (g,) = torch.autograd.grad(s_l, layers[l]["attn"], retain_graph=True)
            e = e + g.clamp(min=0).mean(dim=2).mean(dim=1)
        return e[:, P:]

    if method == "attcat":
        # §6.2: e_j = Σ_l mean_h (Aˡ_h[q, j] · Σ_{c in group h} ∇hˡ_{j,c} hˡ_{j,c}), hˡ the tokens leaving block l
        hs = [lay["x_out"] for lay in layers]
        grads = torch.autograd.grad(s, hs, retain_graph=True)
        e = 0
        for lay, h_l, g_l in zip(layers, hs, grads):
            heads = lay["attn"].shape[1]
            a_q = torch.einsum("bi,bhij->bhj", q, lay["attn"].detach())
            cam = (g_l * h_l.detach()).reshape(b, n, heads, -1).sum(-1).transpose(1, 2)
            e = e + (a_q * cam).mean(1)
        return e[:, P:]
    if method == "conservative_lrp":
        # §6.2: gradient × input at the tokens entering block 1, attention and LayerNorm normalisation held
        held_logits, held_layers, _, _ = run_vit(model, images, held=True)
        leaf = held_layers[0]["x_in_graph"]
        (g,) = torch.autograd.grad(held_logits[torch.arange(b), target].sum(), [leaf])
        return (leaf.detach() * g).sum(-1)[:, P:]

    A = [lay["attn"].detach() for lay in layers]
    if method in ("raw_attention", "rollout"):
        grads = None
    else:
        grads = torch.autograd.grad(s, [lay["attn"] for lay in layers], retain_graph=True)
    if method == "raw_attention":
        return torch.einsum("bi,bij->bj", q, A[-1].mean(1))[:, P:]
    if method == "attn_gradcam":
        aq = torch.einsum("bi,bhij->bhj", q, A[-1])
        gq = torch.einsum("bi,bhij->bhj", q, grads[-1])
        alpha = gq[:, :, P:].mean(-1, keepdim=True)
        return (alpha * aq).mean(1).clamp(min=0)[:, P:]
    if method == "rollout":
        k = start_layer or 0
        r = eye.clone()
        for l in (range(k, L) if chosen is None else sorted(x % L for x in chosen)):
            r = (0.5 * A[l].mean(1) + 0.5 * eye) @ r
        c = r
    elif method == "gae":
        c = eye.clone()
        for l in range(L):
            a_bar = torch.clamp(A[l] * grads[l], min=0).mean(1)
            c = c + a_bar @ c
    else:  # tokentm
        k = start_layer or 0
        c = torch.diag_embed(x0.norm(dim=-1)) if init == "length" else eye.clone()
        # layer choice (docs/methods.md): a block not chosen leaves C as it is (its U is the identity)
        for l in (range(k, L) if chosen is None else sorted(x % L for x in chosen)):
            if head_fusion == "gae":
                a_bar = torch.clamp(A[l] * grads[l], min=0).mean(1)
            else:
                a_bar = A[l].mean(1) * torch.clamp(grads[l], min=0).mean(1)
            w_attn = weights(layers[l]["x_in"], layers[l]["x_tilde"], use_length, use_necc)
            w_mlp = weights(layers[l]["y"], layers[l]["m"], use_length, use_necc)
            u = (eye + torch.diag_embed(w_mlp)) @ (eye + a_bar @ torch.diag_embed(w_attn))
            c = u @ c
    if full:
        return c
    return torch.einsum("bi,bij->bj", q, c)[:, P:]
