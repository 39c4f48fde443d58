"""The literal reference of the LRP family: ``lrp``, ``partial_lrp``, ``transformer_attribution``
(docs/methods.md §6.3), float64, every N×N matrix formed.

Written from docs/methods.md §6.3 alone; it shares no rule and no step of the pass with the fast
relevance pass (``tokentm_fast.methods.relevance``, ``lrp_rules``), which it is the oracle of. What it
shares is model plumbing (see ``tokentm_fast.reference``): the adapter protocol names the linear maps
whose inputs the rules read (``relevance_linears``, ``head_linears``, ``pool_linears``,
``embedding_points``) and ``tokentm_fast.capture`` records those inputs and each block's tensors on one
forward of the (float64 copy of the) model.

The rules, each mapping the relevance R at an operation's output to its inputs (§6.3's table):

====================================  ===========================================================
linear z = W x + b                    ``"ours"``: x⁺ ⊙ W⁺ᵀs + x⁻ ⊙ W⁻ᵀs, s = R / (W⁺x⁺ + W⁻x⁻);
                                      ``"classic"``: x⁺ ⊙ W⁺ᵀ(R / W⁺x⁺) + x⁻ ⊙ W⁻ᵀ(R / W⁻x⁻)
residual a + b                        a ⊙ R/(a+b), b ⊙ R/(a+b); ``"ours"`` rescales them per image to
                                      the ratio |Σa| : |Σb| with the sum ΣR
products A·V, q·kᵀ                    z-rule over both operands, each halved (q·kᵀ unscaled)
a block input used twice              x ⊙ (R₁/x + R₂/x)
class-token selection                 x_cls ⊙ R/x_cls on the class row, 0 elsewhere
mean over n rows                      x_j ⊙ (R / mean x) / n
class token ⊕ mean (``"token_avg"``)   R split at D: the class-token selection, then the mean rule on LN(Xᴸ)
patch embedding                       zβ, each image's lowest / highest pixel as the bounds, no bias
norms, softmax, GELU, LayerScale      unchanged
====================================  ===========================================================

Every division is ``a / (b + 1e-9)``, 0 where ``b = 0``. The class-token selection's x_cls is the class
token as the head's first linear map reads it (where the head has none, R itself: the library's
convention); the mean pooling reads the last block's output Xᴸ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .capture import LayerRecorder, PointRecorder, PoolRecorder, prepared_model
from .models.protocol import LinearPoint, ViTAdapter, merge_heads, no_relevance_pass, split_heads
from .targets import resolve_target, target_score

#: the stabiliser of every division (docs/methods.md §6.3)
STABILISER = 1e-9


# --------------------------------------------------------------------------- the rules
def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, and 0 where ``b = 0`` (a denominator that lands on 0 is taken as 1e-9)."""
    den = b + STABILISER
    quotient = a / torch.where(den == 0, torch.full_like(den, STABILISER), den)
    return torch.where(b == 0, torch.zeros_like(quotient), quotient)


def _linear_rule(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, rules: str) -> torch.Tensor:
    """Relevance at ``x (..., in)`` of ``z = W x + b`` (``W (out, in)``) from ``r (..., out)``; the bias is
    left out of the denominators."""
    w = w.to(x.dtype)
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z_pos = x_pos @ w_pos.T                       # W⁺x⁺ (..., out)
    z_neg = x_neg @ w_neg.T                       # W⁻x⁻ (..., out)
    if rules == "classic":
        return x_pos * (_div(r, z_pos) @ w_pos) + x_neg * (_div(r, z_neg) @ w_neg)
    s = _div(r, z_pos + z_neg)
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


def _image_sum(t: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (B, 1, ..., 1)``: the sum over everything but the image."""
    return t.flatten(1).sum(1).reshape((-1,) + (1,) * (t.dim() - 1))


def _add_rule(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, rules: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the operands of ``a + b`` (``b`` broadcast to ``a``) from ``r``."""
    b = b.expand_as(a)
    share = _div(r, a + b)
    r_a, r_b = a * share, b * share
    if rules == "classic":
        return r_a, r_b
    sum_a, sum_b, total = _image_sum(r_a), _image_sum(r_b), _image_sum(r)
    both = sum_a.abs() + sum_b.abs()
    want_a = _div(sum_a.abs(), both) * total      # |Σa| : |Σb|, adding up to ΣR
    want_b = _div(sum_b.abs(), both) * total
    return r_a * _div(want_a, sum_a), r_b * _div(want_b, sum_b)


def _product_rule(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the operands of ``z = a @ b`` from ``r`` (like z): the z-rule over both, each halved."""
    s = _div(r, a @ b)
    r_a = a * (s @ b.transpose(-1, -2))
    r_b = b * (a.transpose(-1, -2) @ s)
    return r_a / 2, r_b / 2


def _clone_rule(x: torch.Tensor, r_1: torch.Tensor, r_2: torch.Tensor) -> torch.Tensor:
    """Relevance at ``x`` used twice (the residual and the branch)."""
    return x * (_div(r_1, x) + _div(r_2, x))


def _class_row_rule(x_cls: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Relevance at the N tokens ``(B, N, D)`` from ``r (B, D)`` at their class row (row 0), whose value the
    selection passes on is ``x_cls (B, D)``."""
    out = r.new_zeros(r.shape[0], n, r.shape[-1])
    out[:, 0] = x_cls * _div(r, x_cls)
    return out


def _mean_rule(tokens: torch.Tensor, r: torch.Tensor, rows: slice) -> torch.Tensor:
    """Relevance at ``tokens (B, N, D)`` from ``r (B, D)`` at their mean over ``rows``."""
    picked = tokens[:, rows]
    n = picked.shape[1]
    out = torch.zeros_like(tokens)
    out[:, rows] = picked * _div(r, picked.mean(1))[:, None, :] / n
    return out


def _patch_rule(images: torch.Tensor, conv: torch.nn.Conv2d, r: torch.Tensor) -> torch.Tensor:
    """zβ at the pixels ``(B, C, H, W)`` from ``r (B, D, gh, gw)`` at the patch convolution's output (bias left
    out): every patch unfolded into a column, ``z = W p − W⁺ low − W⁻ high + 1e-9`` (a plain division, as
    the authors'), ``R_p = p ⊙ Wᵀs − low ⊙ W⁺ᵀs − high ⊙ W⁻ᵀs`` with ``s = r / z``, folded back."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding == "same":
        raise no_relevance_pass(f"a patch convolution with groups={conv.groups}, dilation={conv.dilation}, "
                                f"padding={conv.padding!r}")
    padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
    shape = dict(kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride), padding=padding)
    low = images.amin(dim=(1, 2, 3), keepdim=True).expand_as(images)
    high = images.amax(dim=(1, 2, 3), keepdim=True).expand_as(images)
    p, p_low, p_high = (F.unfold(t, **shape) for t in (images, low, high))     # (B, C·k·k, gh·gw)
    w = conv.weight.to(images.dtype).flatten(1)                                # (D, C·k·k)
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    z = w @ p - w_pos @ p_low - w_neg @ p_high + STABILISER                    # (B, D, gh·gw)
    s = r.flatten(2) / z
    r_cols = p * (w.T @ s) - p_low * (w_pos.T @ s) - p_high * (w_neg.T @ s)    # (B, C·k·k, gh·gw)
    return F.fold(r_cols, output_size=tuple(images.shape[-2:]), **shape)


# --------------------------------------------------------------------------- one forward's tensors
#: the attention pool's points the rules read (``PoolLinears`` fields)
_POOL_POINTS = ("kv", "proj", "latent", "fc1", "fc2", "mlp")
_BLOCK_POINTS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class Forward:
    """What the rules read from one forward (docs/methods.md §6.3): per block the records of
    ``LayerRecorder`` (x_in, q, k, values, attn, attn_out, y, mlp_out) and the attention branch
    γ₁ ⊙ proj(o) (``branches``), the input of every linear map (``inputs[key]``) and its weight, the
    attention pool's record, and for the pixels the prefix tokens ``(P, D)`` and the patch convolution."""

    vit: ViTAdapter
    images: torch.Tensor
    output: torch.Tensor
    layers: List[int]
    blocks: Dict[int, Dict[str, torch.Tensor]]
    branches: Dict[int, torch.Tensor]
    inputs: Dict[Any, torch.Tensor]
    weights: Dict[Any, torch.Tensor]
    num_head: int
    pool: Optional[Dict[str, torch.Tensor]] = None
    prefix: Optional[torch.Tensor] = None
    conv: Optional[torch.nn.Conv2d] = None


def _points(vit: ViTAdapter, layers: Sequence[int], pixels: bool) -> Tuple[Dict[Any, LinearPoint], Any]:
    """Where each linear map of the pass reads its input (the adapter's protocol)."""
    points: Dict[Any, LinearPoint] = {("head", i): p for i, p in enumerate(vit.head_linears())}
    if vit.attention_pool is not None:
        pool = vit.pool_linears()
        points.update({("pool", name): getattr(pool, name) for name in _POOL_POINTS
                       if getattr(pool, name) is not None})
    for l in layers:
        lin = vit.relevance_linears(l)
        points.update({(l, name): getattr(lin, name) for name in _BLOCK_POINTS})
    emb = None
    if pixels:
        emb = vit.embedding_points()
        points["conv_in"] = LinearPoint(emb.conv, emb.conv.weight)
        points["conv_out"] = LinearPoint(emb.conv, emb.conv.weight, output=True)
        points["tokens"] = emb.tokens
    return points, emb


def run_forward(vit: ViTAdapter, images: torch.Tensor, layers: Sequence[int], grads: bool = False,
                pixels: bool = False) -> Forward:
    """Record, on one forward of ``vit`` (inside ``prepared_model``), what the rules read for the blocks
    ``layers``; ``grads``: the attention probabilities stay in the graph (for ∇Aˡ); ``pixels``: also the
    patch embedding's input and output and the tokens after the position embedding. The recorders are
    removed before the attention branches are recomputed from the records."""
    layers = sorted(layers)
    points, emb = _points(vit, layers, pixels)
    keys = ("x_in", "q", "k", "bias", "values", "attn", "attn_out", "y", "mlp_out")
    recorder = LayerRecorder(vit, layers, grad_from=layers[0] if grads else None, keys=keys)
    point_rec = PointRecorder(points)
    pool = PoolRecorder(vit, queries_keys=True) if vit.attention_pool is not None else None
    hooks: list = []
    try:
        recorder.install(hooks)
        point_rec.install(hooks)
        if pool is not None:
            pool.install(hooks)
        output = vit.forward(images)
    finally:
        for h in reversed(hooks):
            h.remove()
    inputs = point_rec.values
    if pixels and inputs["conv_in"].shape != images.shape:
        raise no_relevance_pass("this patch embedding: its convolution does not read the pixels")
    with torch.no_grad():
        branches = {l: vit.attn_output(l, recorder.records[l]["attn_out"]) for l in layers}     # γ₁ ⊙ proj(o)
    num_head = sum(1 for key in points if isinstance(key, tuple) and key[0] == "head")
    return Forward(vit, images, output, layers, recorder.records, branches, inputs,
                   {key: p.weight for key, p in points.items()}, num_head,
                   pool.last if pool is not None else None,
                   emb.prefix if emb is not None else None, emb.conv if emb is not None else None)


# --------------------------------------------------------------------------- the pass, top-down
def start_relevance(output: torch.Tensor, target) -> torch.Tensor:
    """R at the model output ``(B, K)``: ∂s/∂y (a class target: its one-hot vector; a score function: its
    gradient)."""
    y = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (r,) = torch.autograd.grad(target_score(y, resolve_target(target, y)), [y])
    return r


def _last_tokens(fw: Forward) -> torch.Tensor:
    """Xᴸ, the last block's output ``(B, N, D)``."""
    rec = fw.blocks[fw.vit.num_layers - 1]
    return (rec["y"] + rec["mlp_out"]).detach()


def head_relevance(fw: Forward, r: torch.Tensor, rules: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From R ``(B, K)`` at the output to Xᴸ ``(B, N, D)``: the head's linear maps in reverse, then the
    token pooling (class row, mean of the pooled rows) or the attention pool; with a pool also R^{A_pool}
    of its first latent over the N tokens ``(B, H, N)``."""
    vit = fw.vit
    pooled = [fw.inputs[("head", i)] for i in range(fw.num_head)]
    pooled = [vit.pool_tokens(x) if x.dim() == 3 else x for x in pooled]
    for x, i in zip(reversed(pooled), reversed(range(fw.num_head))):
        r = _linear_rule(x, fw.weights[("head", i)], r, rules)
    tokens = _last_tokens(fw)
    if fw.pool is not None:
        return _pool_relevance(fw, r, tokens.shape[1], rules)
    if vit.pooling == "token":
        # x_cls: the class token as the head's first linear map reads it (after the final norms); a head
        # without one (the output is the class token): the library's convention x_cls = R, which passes R on
        # (up to the stabiliser), as the fast pass does
        x_cls = pooled[0] if pooled else r
        return _class_row_rule(x_cls, r, tokens.shape[1]), None
    if vit.pooling == "token_avg":
        return _class_and_mean_rule(fw, r), None
    return _mean_rule(tokens, r, vit.pooled_rows(tokens.shape[1])), None


def _class_and_mean_rule(fw: Forward, r: torch.Tensor) -> torch.Tensor:
    """``"token_avg"``: the head reads ``concat(X̂_cls, mean_{j ≥ P} X̂_j)`` ``(B, 2·D)``, X̂ = LN(Xᴸ) the tokens
    its linear map reads. R ``(B, 2·D)`` at that concatenation: its first D entries to the class row by the
    class-token selection (x_cls = X̂_cls), its last D over the patch rows by the mean rule on X̂; the final
    norm passes the sum on unchanged."""
    normed = fw.inputs[("head", 0)]                                       # X̂ (B, N, D)
    if normed.dim() != 3:
        raise no_relevance_pass("a 'token_avg' head whose linear map does not read the tokens")
    n, width = normed.shape[1], normed.shape[-1]
    r_cls, r_mean = r[:, :width], r[:, width:]
    return _class_row_rule(normed[:, 0], r_cls, n) + _mean_rule(normed, r_mean, fw.vit.pooled_rows(n))


def _pool_relevance(fw: Forward, r: torch.Tensor, n: int, rules: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention pool backwards as a block whose queries are its learned latents, from R ``(B, E)`` at
    its first latent (0 at the others): the residual MLP where it has one, proj, A·V and q·kᵀ (the queries'
    share stays with the latents), the key / value projection. R at the N tokens ``(B, N, D)`` (0 off the
    pool's columns) and R^{A_pool} of latent 0 ``(B, H, N)``."""
    vit, rec, inputs, weights = fw.vit, fw.pool, fw.inputs, fw.weights
    attn = rec["attn"].detach()                                           # (B, H, Lq, M)
    b, heads, lq = attn.shape[:3]
    r_lat = r.new_zeros(b, lq, r.shape[-1])
    r_lat[:, 0] = r
    if ("pool", "mlp") in inputs:                                         # latents + mlp(norm(latents))
        lat, mlp = inputs[("pool", "latent")], inputs[("pool", "mlp")]
        r_a, r_m = _add_rule(lat, mlp, r_lat, rules)
        r_hidden = _linear_rule(inputs[("pool", "fc2")], weights[("pool", "fc2")], r_m, rules)
        r_normed = _linear_rule(inputs[("pool", "fc1")], weights[("pool", "fc1")], r_hidden, rules)
        r_lat = _clone_rule(lat, r_a, r_normed)
    r_o = _linear_rule(inputs[("pool", "proj")], weights[("pool", "proj")], r_lat, rules)     # (B, Lq, E)
    v = split_heads(rec["values"], heads)                                 # (B, H, M, d)
    r_attn, r_v = _product_rule(attn, v, split_heads(r_o, heads))
    _, r_kt = _product_rule(rec["q"], rec["k"].transpose(-1, -2), r_attn)
    r_kv = torch.cat([merge_heads(r_kt.transpose(-1, -2)), merge_heads(r_v)], dim=-1)        # (B, M, 2·E)
    r_read = _linear_rule(inputs[("pool", "kv")], weights[("pool", "kv")], r_kv, rules)       # (B, M, D)
    cols = vit.pool_columns(n)
    r_tokens = r_read.new_zeros(b, n, r_read.shape[-1])
    r_tokens[:, cols] = r_read
    r_attn0 = r_attn.new_zeros(b, heads, n)
    r_attn0[:, :, cols] = r_attn[:, :, 0]
    return r_tokens, r_attn0


def block_relevance(fw: Forward, l: int, r: torch.Tensor, rules: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block l backwards from R ``(B, N, D)`` at its output Xˡ: R at its input Xˡ⁻¹ ``(B, N, D)`` and R^{Aˡ}
    ``(B, H, N, N)`` (after the halving). Xˡ = Yˡ + M, M = γ₂ ⊙ fc2(act(fc1(LN₂(Yˡ)))),
    Yˡ = Xˡ⁻¹ + γ₁ ⊙ proj(concat_h(A_h V_h)), A_h = softmax(scale · q_h k_hᵀ (+ B_h, BEiT)), (q | k | v) = qkv(LN₁(Xˡ⁻¹))."""
    vit, rec, inputs, weights = fw.vit, fw.blocks[l], fw.inputs, fw.weights
    heads = vit.num_heads
    x_in, y, m, branch = rec["x_in"], rec["y"], rec["mlp_out"], fw.branches[l]
    # Xˡ = Yˡ + M; LayerScale, GELU, LN₂ unchanged
    r_y, r_m = _add_rule(y, m, r, rules)
    r_hidden = _linear_rule(inputs[(l, "fc2")], weights[(l, "fc2")], r_m, rules)
    r_normed2 = _linear_rule(inputs[(l, "fc1")], weights[(l, "fc1")], r_hidden, rules)
    r = _clone_rule(y, r_y, r_normed2)
    # Yˡ = Xˡ⁻¹ + γ₁ ⊙ proj(o)
    r_x, r_branch = _add_rule(x_in, branch, r, rules)
    r_o = split_heads(_linear_rule(inputs[(l, "proj")], weights[(l, "proj")], r_branch, rules), heads)
    # o_h = A_h V_h, then the logits q_h k_hᵀ (softmax and its scale unchanged)
    attn, v = rec["attn"].detach(), split_heads(rec["values"], heads)
    r_attn, r_v = _product_rule(attn, v, r_o)
    r_logits = r_attn                                                     # softmax: unchanged
    if "bias" in rec:
        # BEiT: logits / scale = q_h k_hᵀ + B_h / scale (the record is B / scale): the residual rule between the
        # two terms; the bias's share is dropped
        r_logits, _ = _add_rule(rec["q"] @ rec["k"].transpose(-1, -2), rec["bias"], r_attn, rules)
    r_q, r_kt = _product_rule(rec["q"], rec["k"].transpose(-1, -2), r_logits)
    r_qkv = torch.cat([merge_heads(r_q), merge_heads(r_kt.transpose(-1, -2)), merge_heads(r_v)], dim=-1)
    r_normed1 = _linear_rule(inputs[(l, "qkv")], weights[(l, "qkv")], r_qkv, rules)
    return _clone_rule(x_in, r_x, r_normed1), r_attn


def pixel_relevance(fw: Forward, r: torch.Tensor, rules: str) -> torch.Tensor:
    """From R ``(B, N, D)`` at the first block's input to the pixels, summed over the colour channels
    ``(B, H, W)``: the position-embedding residual (tokens + position), the prefix tokens' share dropped, the
    patch embedding by zβ."""
    p = fw.vit.num_prefix_tokens
    z = fw.inputs["tokens"]                                               # after the position embedding
    patches = fw.inputs["conv_out"]                                       # (B, D, gh, gw)
    b = patches.shape[0]
    before = torch.cat([fw.prefix.to(z.dtype).expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    r_before, _ = _add_rule(before, z - before, r, rules)                 # the position embedding's share dropped
    r_patch = r_before[:, p:].transpose(1, 2).reshape(patches.shape)
    return _patch_rule(fw.images, fw.conv, r_patch).sum(1)


def read_rows(vit: ViTAdapter, b: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` weights of the rows the relevance enters the last block at: row cls for token pooling, else
    the mean over the pooled rows (a mean-pooled head with a class token leaves row cls empty, §6.3);
    ``"token_avg"``: half of each, ½ on row cls and ½ spread evenly over the pooled rows."""
    if vit.pooling == "token":
        return vit.query_vector(b, n, dtype=like.dtype, device=like.device)
    rows = vit.pooled_rows(n)
    q = torch.zeros(b, n, dtype=like.dtype, device=like.device)
    q[:, rows] = 1.0 / (rows.stop - rows.start)
    if vit.pooling == "token_avg":
        cls = torch.zeros_like(q)
        cls[:, 0] = 1.0
        q = (q + cls) / 2
    return q


# --------------------------------------------------------------------------- the methods
def lrp(vit: ViTAdapter, x: torch.Tensor, target, options: Dict[str, Any]) -> torch.Tensor:
    """Full LRP: R from the output down to the pixels, summed over the colour channels ``(B, H, W)``."""
    rules = options["rules"]
    with prepared_model(vit), torch.no_grad():
        fw = run_forward(vit, x, range(vit.num_layers), pixels=True)
        r, _ = head_relevance(fw, start_relevance(fw.output, target), rules)
        for l in reversed(fw.layers):
            r, _ = block_relevance(fw, l, r, rules)
        return pixel_relevance(fw, r, rules)


def partial_lrp(vit: ViTAdapter, x: torch.Tensor, target, options: Dict[str, Any]) -> torch.Tensor:
    """Partial LRP: ``mean_h max(R^{Aᴸ}, 0)`` read on the head's rows, patch columns; with an attention pool
    ``mean_h max(R^{A_pool}, 0)`` of its first latent (the pool is the last attention)."""
    rules, top, p = options["rules"], vit.num_layers - 1, vit.num_prefix_tokens
    with prepared_model(vit), torch.no_grad():
        fw = run_forward(vit, x, [top])
        r, r_pool = head_relevance(fw, start_relevance(fw.output, target), rules)
        if r_pool is not None:
            return r_pool.clamp(min=0).mean(1)[:, p:]
        _, r_attn = block_relevance(fw, top, r, rules)
        fused = r_attn.clamp(min=0).mean(1)                               # (B, N, N)
        q = read_rows(vit, fused.shape[0], fused.shape[-1], fused)
        return torch.einsum("bi,bij->bj", q, fused)[:, p:]


def transformer_attribution(vit: ViTAdapter, x: torch.Tensor, target, options: Dict[str, Any]) -> torch.Tensor:
    """Transformer Attribution: ``Āˡ = mean_h max(∇Aˡ ⊙ R^{Aˡ}, 0)``, ``C = Π_l (Āˡ + I)`` from ``start_layer``
    (top block leftmost, no row normalisation), read on the head's rows; with an attention pool the row is
    ``mean_h max(∇A_pool ⊙ R^{A_pool}, 0)`` of its first latent."""
    layers = list(range(options["start_layer"], vit.num_layers))
    with prepared_model(vit):
        with torch.enable_grad():
            fw = run_forward(vit, x, layers, grads=True)
            t = resolve_target(target, fw.output)
            attns = [fw.blocks[l]["attn"] for l in layers]
            pool_attn = [fw.pool["attn"]] if fw.pool is not None else []
            grads = torch.autograd.grad(target_score(fw.output, t), attns + pool_attn)
        return _attribution_rows(fw, layers, start_relevance(fw.output, t), [g.detach() for g in grads])


def _attribution_rows(fw: Forward, layers: List[int], r_out: torch.Tensor, grads: List[torch.Tensor]
                      ) -> torch.Tensor:
    """Transformer Attribution's product and read-out from R ``(B, K)`` at the output and the gradients ∇Aˡ
    ``(B, H, N, N)`` of ``layers`` (then ∇A_pool ``(B, H, Lq, M)`` with an attention pool)."""
    vit, x, p = fw.vit, fw.images, fw.vit.num_prefix_tokens
    with torch.no_grad():
        r, r_pool = head_relevance(fw, r_out, "ours")
        b, n = x.shape[0], grads[0].shape[-1]
        eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
        c = eye.clone()
        for l, g in zip(reversed(layers), reversed(grads[:len(layers)])):
            r, r_attn = block_relevance(fw, l, r, "ours")
            a_bar = (g * r_attn).clamp(min=0).mean(1)                     # (B, N, N)
            c = c @ (a_bar + eye)                                         # C = Âᴸ ⋯ Âˡ
        if r_pool is not None:
            g_pool = grads[-1][:, :, 0]                                   # (B, H, M), latent 0
            g0 = g_pool.new_zeros(b, g_pool.shape[1], n)
            g0[:, :, vit.pool_columns(n)] = g_pool
            q = (g0 * r_pool).clamp(min=0).mean(1)
        else:
            q = read_rows(vit, b, n, x)
        return torch.einsum("bi,bij->bj", q, c)[:, p:]
