"""A literal float64 oracle of the LRP family (full LRP, partial LRP, Transformer Attribution), for tests only.

It shares no code with the package. It runs a timm ``VisionTransformer`` by hand from its weights in float64,
records every activation the rules need, and propagates relevance with the rules of Chefer, Gur & Wolf
(CVPR 2021), read from their public code (``modules/layers_ours.py``, ``baselines/ViT/ViT_LRP.py``; the older
rules: ``modules/layers_lrp.py``, ``baselines/ViT/ViT_orig_LRP.py``) and written again here with closed forms
instead of their ``autograd.grad`` calls. Every sum a rule takes is PER IMAGE (the authors run batch 1 and sum
over the whole tensor). The methods are those of docs/methods.md §6.3.

The "ours" rules (``rules="ours"``, the default; ``safe_divide(a, b)`` = ``a / (b + 1e-9)``, 0 where b == 0,
written exactly as the authors' two clamps):

* start: R = one_hot(target) at the logits (1 at the target class), target default = argmax per image;
* Linear (classifier, qkv, proj, fc1, fc2), α = 1, β = 0: with x⁺/x⁻ and W⁺/W⁻ the clamped input and weight,
  Z₁ = x⁺W⁺ᵀ, Z₂ = x⁻W⁻ᵀ (no bias), S = safe_divide(R, Z₁ + Z₂), R_in = x⁺ ⊙ (S W⁺) + x⁻ ⊙ (S W⁻)
  (their β term is multiplied by β = 0 and left out here);
* LayerNorm (norm_pre, norm1, norm2, norm, fc_norm, q/k norms), GELU, softmax, dropout, LayerScale: relevance
  unchanged;
* class-token selection (IndexSelect): row 0 gets X₀ ⊙ safe_divide(R, X₀), the other rows 0, X = the output of
  the final norm; mean pooling (``global_pool="avg"``, AdaptiveAvgPool-like z-rule): pooled row j gets
  X_j ⊙ safe_divide(R, mean_j X) / n, the prefix rows 0;
* residual Add(a, b): z-rule shares a ⊙ S, b ⊙ S with S = safe_divide(R, a + b), then each operand rescaled:
  a ← a · safe_divide(safe_divide(|Σa|, |Σa| + |Σb|) · ΣR, Σa) (b alike; Σa, Σb the sums of the z-shares),
  sums per image (the share of an operand whose z-shares sum to a negative number flips sign). Used for both residuals
  of every block and for the position embedding, whose operands are (tokens after the class token is
  concatenated, position embedding broadcast to the batch);
* Clone(x) → (x, x) with relevances r₁, r₂: R = x ⊙ (safe_divide(r₁, x) + safe_divide(r₂, x));
* matmuls A·V and Q·Kᵀ (their einsum, RelPropSimple): Z = a b, S = safe_divide(R, Z), R_a = a ⊙ (S bᵀ),
  R_b = b ⊙ (aᵀ S), then both halved (their Attention.relprop); Q·Kᵀ uses the UNSCALED q kᵀ (the softmax
  scale is applied after their matmul1, and relevance passes the scale unchanged). R^{A_l} = the halved
  relevance at block l's attention probabilities (their ``save_attn_cam``);
* patch embedding (3-channel Conv2d, zβ rule, no bias): L / H = each image's min / max over (C, H, W),
  Z = conv(X, W) − conv(L, W⁺) − conv(H, W⁻) + 1e-9 (plain division, not safe_divide),
  R_in = X ⊙ convᵀ(R/Z, W) − L ⊙ convᵀ(R/Z, W⁺) − H ⊙ convᵀ(R/Z, W⁻).

The "classic" rules (``rules="classic"``: ``layers_lrp.py`` + ``ViT_orig_LRP.py``) differ in exactly two rules;
everything else in those two files is the same text as in the "ours" files:

1. Linear (every Linear: classifier head, qkv, proj, fc1, fc2): separate denominators,
   R_in = x⁺ ⊙ (safe_divide(R, Z₁) W⁺) + x⁻ ⊙ (safe_divide(R, Z₂) W⁻), i.e. each of the two positive terms
   receives the whole R (not conservative: ΣR_in ≈ 2ΣR where both Z₁ and Z₂ are non-zero);
2. Add (both residuals of every block and the position-embedding Add): the plain z-rule of RelPropSimple,
   R_a = a ⊙ S, R_b = b ⊙ S with S = safe_divide(R, a + b), no rescaling to |Σa| : |Σb|.

Identical in both: safe_divide, the one-hot start (the explanation generator is shared), IndexSelect, Clone,
einsum (z-rule over both operands, halved in Attention.relprop), LayerNorm / GELU / softmax / dropout
(identity), the 3-channel zβ patch rule, the order of the backward pass and every method's read-out
(``ViT_orig_LRP.relprop`` names Transformer Attribution ``"grad"``; it computes the same thing, with the same
un-normalised ``compute_rollout_attention``). (Both files' non-3-channel Conv2d rule also uses separate
denominators; it is unused here since the patch embedding must have 3 input channels.)

Supported: timm ``VisionTransformer`` with a class token (no register tokens, position embedding added after the
concatenation), ``global_pool`` ``"token"`` or ``"avg"`` (patch rows only), qkv bias on or off, LayerScale on or
off, ``norm_pre`` and q/k norms Identity or LayerNorm, GELU-type activations, a Linear classifier; or, with
``global_pool="map"`` (SigLIP's attention pool, ``AttentionPoolLatent`` without a position embedding of its own),
no class token and a Linear classifier or none. Anything else is refused with an assertion.

The attention pool (docs/methods.md §6.3, the library's choice: the authors' code has no pool) is run backwards
with the rules above, over all its latents, from R at the first latent (the one the head reads; its selection
passes R unchanged) and 0 at the others: the MLP residual Add (latents, mlp(norm(latents))), fc2, fc1 and the
Clone of the latents as in a block; proj; A·V and Q·Kᵀ (unscaled) as in a block, halved, the queries' share
staying with the learned latent; the key / value projection ``kv``; the final norm unchanged. R^{A_pool} is the
halved relevance at the pool's attention probabilities. Partial LRP reads mean_h max(R^{A_pool}, 0) of the first
latent; Transformer Attribution starts its row at mean_h max(∇A_pool ⊙ R^{A_pool}, 0) of the first latent.

Read-out of partial LRP and Transformer Attribution: row cls, patch columns. With ``global_pool="avg"`` the class
row of the last block receives no relevance, so (docs/methods.md §6.3, the library's choice, not the authors')
the read-out is the mean over the pooled rows instead of row cls.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-9
RULES = ("ours", "classic")
Target = Optional[Union[int, torch.Tensor]]


# -- the rules ---------------------------------------------------------------------------------------------
def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The authors' safe_divide: ``a / (b + 1e-9)`` (a denominator that lands on exactly 0 gets another 1e-9),
    and 0 wherever ``b == 0``."""
    den = b.clamp(min=EPS) + b.clamp(max=EPS)
    den = den + den.eq(0).to(den.dtype) * EPS
    return a / den * b.ne(0).to(b.dtype)


def linear_relevance(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, rules: str = "ours") -> torch.Tensor:
    """α = 1, β = 0 rule of a Linear layer, bias excluded. x (..., I), weight (O, I), r (..., O) → (..., I).

    ``ours``: one denominator Z₁ + Z₂; ``classic``: Z₁ for the x⁺W⁺ term and Z₂ for the x⁻W⁻ term."""
    assert rules in RULES, rules
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z_pos = x_pos @ w_pos.T                                     # (..., O), >= 0
    z_neg = x_neg @ w_neg.T                                     # (..., O), >= 0
    if rules == "ours":
        s_pos = s_neg = safe_divide(r, z_pos + z_neg)
    else:
        s_pos, s_neg = safe_divide(r, z_pos), safe_divide(r, z_neg)
    return x_pos * (s_pos @ w_pos) + x_neg * (s_neg @ w_neg)


def matmul_relevance(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """z-rule over both operands of z = a @ b (the authors' einsum relprop, not halved here).

    a (..., I, J), b (..., J, K), r (..., I, K) → (r_a (..., I, J), r_b (..., J, K))."""
    s = safe_divide(r, a @ b)
    return a * (s @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ s)


def _per_image_sum(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, 1, ..., 1): the sum over everything but the batch."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True)


def add_relevance(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor,
                  rules: str = "ours") -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance of ``a + b`` split between its operands, all (B, ...) (b already broadcast).

    ``ours``: z-rule shares rescaled so that Σr_a : Σr_b = |Σa-share| : |Σb-share| and Σr_a + Σr_b = ΣR
    per image; ``classic``: the z-rule shares as they are."""
    assert rules in RULES, rules
    s = safe_divide(r, a + b)
    r_a, r_b = a * s, b * s
    if rules == "classic":
        return r_a, r_b
    a_sum, b_sum, total = _per_image_sum(r_a), _per_image_sum(r_b), _per_image_sum(r)
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    return r_a * safe_divide(a_fact, a_sum), r_b * safe_divide(b_fact, b_sum)


def clone_relevance(x: torch.Tensor, r_first: torch.Tensor, r_second: torch.Tensor) -> torch.Tensor:
    """The authors' Clone rule for x → (x, x): x ⊙ (safe_divide(r₁, x) + safe_divide(r₂, x))."""
    return x * (safe_divide(r_first, x) + safe_divide(r_second, x))


def class_token_relevance(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """IndexSelect of row 0: x (B, N, D), r (B, D) → (B, N, D), row 0 = x₀ ⊙ safe_divide(r, x₀), others 0."""
    out = torch.zeros_like(x)
    out[:, 0] = x[:, 0] * safe_divide(r, x[:, 0])
    return out


def mean_pool_relevance(x: torch.Tensor, r: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean over rows ``prefix:`` (z-rule): x (B, N, D), r (B, D) → (B, N, D), prefix rows 0."""
    rows = x[:, prefix:]
    n = rows.shape[1]
    s = safe_divide(r, rows.mean(dim=1))                        # (B, D)
    out = torch.zeros_like(x)
    out[:, prefix:] = rows * (s / n).unsqueeze(1)
    return out


def patch_relevance(pixels: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, patch: Tuple[int, int]
                    ) -> torch.Tensor:
    """zβ rule of the patch projection (3 input channels, no bias), bounds L / H = each image's min / max.

    pixels (B, C, H, W), weight (D, C, p, q), r (B, D, H/p, W/q) → (B, C, H, W)."""
    low = pixels.amin(dim=(1, 2, 3), keepdim=True).expand_as(pixels)
    high = pixels.amax(dim=(1, 2, 3), keepdim=True).expand_as(pixels)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = (F.conv2d(pixels, weight, stride=patch) - F.conv2d(low, w_pos, stride=patch)
         - F.conv2d(high, w_neg, stride=patch) + EPS)
    s = r / z

    def back(w: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(s, w, stride=patch)

    return pixels * back(weight) - low * back(w_pos) - high * back(w_neg)


# -- the model, run by hand --------------------------------------------------------------------------------
def _is_identity(mod: Optional[nn.Module]) -> bool:
    return mod is None or isinstance(mod, nn.Identity)


def _activation_ok(mod: nn.Module) -> bool:
    return isinstance(mod, nn.GELU) or type(mod).__name__ in ("QuickGELU", "GELUTanh")


def check_supported(m: nn.Module) -> None:
    """Assert that ``m`` is a timm ViT this oracle's rules cover (see the module docstring)."""
    from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer

    assert isinstance(m, VisionTransformer), type(m)
    assert m.pos_embed is not None and not m.no_embed_class and not m.dynamic_img_size
    if m.global_pool == "map":
        pool = m.attn_pool
        assert m.cls_token is None and m.reg_token is None and m.num_prefix_tokens == 0, "no prefix tokens"
        assert pool.pos_embed is None and pool.pool == "token" and type(pool.mlp) is Mlp
        assert _is_identity(pool.mlp.norm) and _activation_ok(pool.mlp.act) and isinstance(pool.norm, nn.LayerNorm)
        assert isinstance(m.head, nn.Linear) or _is_identity(m.head)
    else:
        assert m.cls_token is not None and m.reg_token is None and m.num_prefix_tokens == 1, "class token only"
        assert m.global_pool in ("token", "avg") and m.attn_pool is None, m.global_pool
        assert m.global_pool == "token" or not getattr(m, "pool_include_prefix", False)
        assert isinstance(m.head, nn.Linear), "a Linear classifier is needed"
    assert getattr(m, "head_dist", None) is None, "distilled heads are not covered"
    proj = m.patch_embed.proj
    assert isinstance(proj, nn.Conv2d) and proj.in_channels == 3, "the zβ rule needs 3 input channels"
    assert tuple(proj.kernel_size) == tuple(proj.stride) and tuple(proj.padding) == (0, 0)
    assert _is_identity(m.patch_embed.norm) and _is_identity(getattr(m, "patch_drop", None))
    assert getattr(m.patch_embed, "flatten", True), "tokens as (B, N, D)"
    assert _is_identity(m.norm_pre) or isinstance(m.norm_pre, nn.LayerNorm)
    assert _is_identity(m.norm) or isinstance(m.norm, nn.LayerNorm)
    assert _is_identity(m.fc_norm) or isinstance(m.fc_norm, nn.LayerNorm)
    for blk in m.blocks:
        assert type(blk) is Block, type(blk)
        attn, mlp = blk.attn, blk.mlp
        assert type(attn) is Attention and getattr(attn, "gate", None) is None
        assert all(_is_identity(n) or isinstance(n, nn.LayerNorm) for n in (attn.q_norm, attn.k_norm))
        assert _is_identity(attn.norm)
        assert type(mlp) is Mlp and _is_identity(mlp.norm) and _activation_ok(mlp.act), type(mlp.act)
        for ls in (blk.ls1, blk.ls2):
            assert _is_identity(ls) or hasattr(ls, "gamma"), type(ls)
        assert isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)


def _linear(x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    y = x @ mod.weight.T
    return y if mod.bias is None else y + mod.bias


def _layer_scale(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if _is_identity(mod) else x * mod.gamma


@dataclass
class BlockTrace:
    """What one block's rules read. B images, N tokens, D width, H heads of width d, F hidden width."""
    x: torch.Tensor         # (B, N, D) block input (the first Clone's input, the first Add's a)
    z1: torch.Tensor        # (B, N, D) norm1 output (qkv input)
    q: torch.Tensor         # (B, H, N, d) after q_norm, unscaled
    k: torch.Tensor         # (B, H, N, d) after k_norm
    v: torch.Tensor         # (B, H, N, d)
    attn: torch.Tensor      # (B, H, N, N) attention probabilities, in the autograd graph
    o: torch.Tensor         # (B, N, H·d) heads merged (proj input)
    branch1: torch.Tensor   # (B, N, D) ls1(proj(o)) (the first Add's b)
    y: torch.Tensor         # (B, N, D) after the first residual (second Clone's input, second Add's a)
    z2: torch.Tensor        # (B, N, D) norm2 output (fc1 input)
    hidden: torch.Tensor    # (B, N, F) act(fc1(z2)) (fc2 input)
    branch2: torch.Tensor   # (B, N, D) ls2(fc2(hidden)) (the second Add's b)


@dataclass
class PoolTrace:
    """What the attention pool's rules read (timm ``AttentionPoolLatent``). Lq latents of width E = D."""
    q: torch.Tensor         # (B, H, Lq, d) the latents' queries after q_norm, unscaled
    k: torch.Tensor         # (B, H, N, d) after k_norm
    v: torch.Tensor         # (B, H, N, d)
    attn: torch.Tensor      # (B, H, Lq, N) attention probabilities, in the autograd graph
    o: torch.Tensor         # (B, Lq, E) heads merged (proj input)
    latents: torch.Tensor   # (B, Lq, E) proj output (the MLP Add's a, its Clone's input)
    z: torch.Tensor         # (B, Lq, E) pool.norm output (fc1 input)
    hidden: torch.Tensor    # (B, Lq, F) act(fc1(z)) (fc2 input)
    branch: torch.Tensor    # (B, Lq, E) fc2 output (the MLP Add's b)


@dataclass
class Trace:
    """The whole forward: pixels (B, 3, H, W) requiring grad, the position-embedding Add's operands
    (B, N, D) each, the blocks, the final norm's output (B, N, D), the classifier input (B, D), logits (B, K);
    with ``global_pool="map"`` the attention pool."""
    model: nn.Module
    pixels: torch.Tensor
    tokens_cat: torch.Tensor
    pos: torch.Tensor
    blocks: List[BlockTrace]
    normed: torch.Tensor
    head_in: torch.Tensor
    logits: torch.Tensor
    pool: Optional[PoolTrace] = None


def run_model(model: nn.Module, images: torch.Tensor) -> Trace:
    """Manual float64 forward of a timm VisionTransformer, keeping the attention maps in the graph."""
    m = copy.deepcopy(model).double().eval()
    check_supported(m)
    for p in m.parameters():
        p.requires_grad_(False)
    pixels = images.detach().double().clone().requires_grad_(True)
    proj = m.patch_embed.proj
    assert pixels.shape[2] % proj.stride[0] == 0 and pixels.shape[3] % proj.stride[1] == 0
    with torch.enable_grad():
        patches = F.conv2d(pixels, proj.weight, proj.bias, stride=proj.stride)       # (B, D, gh, gw)
        patches = patches.flatten(2).transpose(1, 2)                                  # (B, Np, D)
        b = patches.shape[0]
        prefix = [] if m.cls_token is None else [m.cls_token.expand(b, -1, -1)]
        tokens_cat = torch.cat(prefix + [patches], dim=1)                             # (B, N, D)
        pos = m.pos_embed.expand_as(tokens_cat)
        x = m.norm_pre(tokens_cat + pos)
        blocks = []
        for blk in m.blocks:
            a_mod = blk.attn
            n, h, d = x.shape[1], a_mod.num_heads, a_mod.head_dim
            z1 = blk.norm1(x)
            qkv = _linear(z1, a_mod.qkv).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
            q, k, v = a_mod.q_norm(qkv[0]), a_mod.k_norm(qkv[1]), qkv[2]
            attn = torch.softmax((q @ k.transpose(-1, -2)) * a_mod.scale, dim=-1)
            o = (attn @ v).transpose(1, 2).reshape(b, n, h * d)
            branch1 = _layer_scale(blk.ls1, _linear(o, a_mod.proj))
            y = x + branch1
            z2 = blk.norm2(y)
            hidden = blk.mlp.act(_linear(z2, blk.mlp.fc1))
            branch2 = _layer_scale(blk.ls2, _linear(hidden, blk.mlp.fc2))
            blocks.append(BlockTrace(x, z1, q, k, v, attn, o, branch1, y, z2, hidden, branch2))
            x = y + branch2
        normed = m.norm(x)
        pool = None
        if m.global_pool == "map":
            pool = _run_pool(m.attn_pool, normed)
            pooled = (pool.latents + pool.branch)[:, 0]
        elif m.global_pool == "token":
            pooled = normed[:, 0]
        else:
            pooled = normed[:, m.num_prefix_tokens:].mean(dim=1)
        head_in = m.fc_norm(pooled)
        logits = head_in if _is_identity(m.head) else _linear(head_in, m.head)
    return Trace(m, pixels, tokens_cat, pos, blocks, normed, head_in, logits, pool)


def _run_pool(p: nn.Module, x: torch.Tensor) -> PoolTrace:
    """timm ``AttentionPoolLatent`` on tokens x (B, N, D) by hand: latents attend to x, proj, + mlp(norm(·))."""
    b, n, e = x.shape
    h, d, lq = p.num_heads, p.head_dim, p.latent_len
    q = p.q_norm(_linear(p.latent.expand(b, -1, -1), p.q).reshape(b, lq, h, d).transpose(1, 2))
    kv = _linear(x, p.kv).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
    k, v = p.k_norm(kv[0]), kv[1]
    attn = torch.softmax((q @ k.transpose(-1, -2)) * p.scale, dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(b, lq, e)
    latents = _linear(o, p.proj)
    z = p.norm(latents)
    hidden = p.mlp.act(_linear(z, p.mlp.fc1))
    return PoolTrace(q, k, v, attn, o, latents, z, hidden, _linear(hidden, p.mlp.fc2))


def one_hot(logits: torch.Tensor, target: Target = None) -> torch.Tensor:
    """(B, K) float64 one-hot of ``target`` (None: argmax per image; an int: that class for every image;
    a (B,) tensor: per image)."""
    b, k = logits.shape
    if target is None:
        idx = logits.detach().argmax(dim=-1)
    else:
        idx = torch.as_tensor(target).long().reshape(-1).expand(b)
    return F.one_hot(idx, k).double()


# -- the backward pass -------------------------------------------------------------------------------------
def _detached(t: Trace) -> Trace:
    """The trace with every tensor detached (the rules need values only)."""
    blocks = [BlockTrace(*(getattr(bt, f).detach() for f in BlockTrace.__dataclass_fields__)) for bt in t.blocks]
    pool = None if t.pool is None else PoolTrace(*(getattr(t.pool, f).detach() for f in PoolTrace.__dataclass_fields__))
    return Trace(t.model, t.pixels.detach(), t.tokens_cat.detach(), t.pos.detach(), blocks, t.normed.detach(),
                 t.head_in.detach(), t.logits.detach(), pool)


def _block_relevance(blk: nn.Module, bt: BlockTrace, r: torch.Tensor, rules: str
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block backwards (their Block.relprop): r (B, N, D) at the output → (relevance at the input (B, N, D),
    R^A (B, H, N, N) after the halving)."""
    a_mod = blk.attn
    b, n, _ = r.shape
    h, d = a_mod.num_heads, a_mod.head_dim
    # x_out = y + branch2; ls2, dropout: unchanged; Mlp; norm2: unchanged; Clone of y
    r_y, r_branch2 = add_relevance(bt.y, bt.branch2, r, rules)
    r_hidden = linear_relevance(bt.hidden, blk.mlp.fc2.weight, r_branch2, rules)
    r_z2 = linear_relevance(bt.z2, blk.mlp.fc1.weight, r_hidden, rules)
    r = clone_relevance(bt.y, r_y, r_z2)
    # y = x + branch1; ls1: unchanged; Attention; norm1: unchanged; Clone of x
    r_x, r_branch1 = add_relevance(bt.x, bt.branch1, r, rules)
    r_o = linear_relevance(bt.o, a_mod.proj.weight, r_branch1, rules)
    r_o = r_o.reshape(b, n, h, d).transpose(1, 2)                                   # (B, H, N, d)
    r_attn, r_v = matmul_relevance(bt.attn, bt.v, r_o)
    r_attn, r_v = r_attn / 2, r_v / 2
    r_q, r_kt = matmul_relevance(bt.q, bt.k.transpose(-1, -2), r_attn)             # softmax: unchanged
    r_q, r_k = r_q / 2, r_kt.transpose(-1, -2) / 2                                # q/k norms: unchanged
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * d)
    r_z1 = linear_relevance(bt.z1, a_mod.qkv.weight, r_qkv, rules)
    return clone_relevance(bt.x, r_x, r_z1), r_attn


def _propagate(trace: Trace, start: torch.Tensor, rules: str) -> Dict[str, object]:
    """Relevance from ``start`` (B, K) at the logits down to the pixels (their relprop, method="full")."""
    assert rules in RULES, rules
    t, m = _detached(trace), trace.model
    r = start if _is_identity(m.head) else linear_relevance(t.head_in, m.head.weight, start, rules)   # (B, D)
    pool_attn = None                                                                # fc_norm: unchanged
    if m.global_pool == "map":
        r, pool_attn = _pool_relevance(m.attn_pool, t.pool, t.normed, r, rules)
    elif m.global_pool == "token":
        r = class_token_relevance(t.normed, r)
    else:
        r = mean_pool_relevance(t.normed, r, m.num_prefix_tokens)
    attn: List[torch.Tensor] = [None] * len(t.blocks)                               # type: ignore[list-item]
    tokens: List[torch.Tensor] = [None] * len(t.blocks)                             # type: ignore[list-item]
    for i in reversed(range(len(t.blocks))):                                        # final norm: unchanged
        r, attn[i] = _block_relevance(m.blocks[i], t.blocks[i], r, rules)
        tokens[i] = r
    r_cat, r_pos = add_relevance(t.tokens_cat, t.pos, r, rules)                      # norm_pre: unchanged
    p = m.num_prefix_tokens
    r_patch = r_cat[:, p:]                                                          # (B, Np, D)
    proj = m.patch_embed.proj
    grid = (t.pixels.shape[2] // proj.stride[0], t.pixels.shape[3] // proj.stride[1])
    r_patch = r_patch.transpose(1, 2).reshape(r_patch.shape[0], r_patch.shape[2], *grid)
    pixels = patch_relevance(t.pixels, proj.weight, r_patch, tuple(proj.stride))
    return dict(pixels=pixels, attn=attn, tokens=tokens, tokens0=tokens[0], tokens_cat=r_cat,
                pos_share=r_pos.sum(dim=(1, 2)), prefix_share=r_cat[:, :p].sum(dim=(1, 2)), pool_attn=pool_attn)


def _pool_relevance(p: nn.Module, pt: PoolTrace, x: torch.Tensor, r: torch.Tensor, rules: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention pool backwards: r (B, E) at its first latent → (relevance at its input tokens x (B, N, D),
    R^{A_pool} (B, H, Lq, N) after the halving)."""
    b, lq, e = pt.latents.shape
    h, d, n = p.num_heads, p.head_dim, x.shape[1]
    r_out = torch.zeros(b, lq, e, dtype=r.dtype)
    r_out[:, 0] = r                                                                  # the other latents: 0
    r_lat, r_branch = add_relevance(pt.latents, pt.branch, r_out, rules)
    r_hidden = linear_relevance(pt.hidden, p.mlp.fc2.weight, r_branch, rules)
    r_z = linear_relevance(pt.z, p.mlp.fc1.weight, r_hidden, rules)                 # pool.norm: unchanged
    r = clone_relevance(pt.latents, r_lat, r_z)
    r_o = linear_relevance(pt.o, p.proj.weight, r, rules).reshape(b, lq, h, d).transpose(1, 2)
    r_attn, r_v = matmul_relevance(pt.attn, pt.v, r_o)
    r_attn, r_v = r_attn / 2, r_v / 2
    _, r_kt = matmul_relevance(pt.q, pt.k.transpose(-1, -2), r_attn)               # the latent keeps R_q
    r_k = r_kt.transpose(-1, -2) / 2
    r_kv = torch.stack([r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 2 * h * d)
    return linear_relevance(x, p.kv.weight, r_kv, rules), r_attn


def relevance(model: nn.Module, images: torch.Tensor, target: Target = None, rules: str = "ours"
              ) -> Dict[str, object]:
    """Every relevance the pass computes, float64.

    Keys: ``pixels`` (B, C, H, W); ``attn`` list of (B, H, N, N), R^{A_l} per block (after the halving);
    ``tokens`` list of (B, N, D), the relevance at each block's input (``tokens0`` = block 1's); ``tokens_cat``
    (B, N, D), the share of the position-embedding Add that goes to the tokens; ``pos_share`` (B,), the share of
    the position embedding; ``prefix_share`` (B,), what the class token row keeps; ``logits`` (B, K); ``start``
    (B, K), the one-hot start; ``probs`` list of (B, H, N, N), the attention probabilities."""
    trace = run_model(model, images)
    start = one_hot(trace.logits, target)
    out = _propagate(trace, start, rules)
    out.update(logits=trace.logits.detach(), start=start, probs=[bt.attn.detach() for bt in trace.blocks])
    return out


def attention_gradients(trace: Trace, start: torch.Tensor) -> List[torch.Tensor]:
    """∂(Σ_b start_b · logits_b)/∂A_l for every block: the plain gradient of each image's target logit with
    respect to its attention probabilities, list of (B, H, N, N); with an attention pool, ∂/∂A_pool
    (B, H, Lq, N) last."""
    attns = [bt.attn for bt in trace.blocks] + ([] if trace.pool is None else [trace.pool.attn])
    with torch.enable_grad():
        score = (trace.logits * start).sum()
        grads = torch.autograd.grad(score, attns)
    return [g.detach() for g in grads]


# -- the methods -------------------------------------------------------------------------------------------
#: the methods this oracle writes out (each a function of this module)
METHODS = ("lrp", "partial_lrp", "transformer_attribution")


def lrp(model: nn.Module, images: torch.Tensor, target: Target = None, rules: str = "ours") -> torch.Tensor:
    """Full LRP: the relevance at the pixels summed over channels, (B, H, W) float64."""
    return relevance(model, images, target, rules)["pixels"].sum(dim=1)


def partial_lrp(model: nn.Module, images: torch.Tensor, target: Target = None, rules: str = "ours"
                ) -> torch.Tensor:
    """Partial LRP (their "last_layer"): mean over heads of max(R^{A_L}, 0), class row (see :func:`read_out`),
    patch columns, (B, N−P) float64."""
    rel = relevance(model, images, target, rules)
    if model.global_pool == "map":                                                  # the pool's first latent
        return rel["pool_attn"][:, :, 0].clamp(min=0).mean(dim=1)
    return read_out(model, rel["attn"][-1].clamp(min=0).mean(dim=1))


def read_out(model: nn.Module, joint: torch.Tensor) -> torch.Tensor:
    """(B, N, N) → (B, N−P): row cls, patch columns; the mean over the pooled rows for ``global_pool="avg"``."""
    p = model.num_prefix_tokens
    return joint[:, 0, p:] if model.global_pool == "token" else joint[:, p:, p:].mean(dim=1)


def rollout_without_normalisation(maps: List[torch.Tensor], start_layer: int = 0) -> torch.Tensor:
    """Their ViT_LRP.compute_rollout_attention: Âˡ = Āˡ + I (rows NOT renormalised), product Âᴸ ⋯ Â^{start+1}.

    maps: list of (B, N, N) → (B, N, N)."""
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype)
    joint = maps[start_layer] + eye
    for a in maps[start_layer + 1:]:
        joint = (a + eye) @ joint
    return joint


def transformer_attribution(model: nn.Module, images: torch.Tensor, target: Target = None, start_layer: int = 0,
                            rules: str = "ours") -> torch.Tensor:
    """Transformer Attribution: Āˡ = mean_h max(∇Aˡ ⊙ R^{Aˡ}, 0), rolled out without row normalisation from
    ``start_layer``; class row (see :func:`read_out`), patch columns, (B, N−P) float64."""
    trace = run_model(model, images)
    start = one_hot(trace.logits, target)
    grads = attention_gradients(trace, start)
    rel = _propagate(trace, start, rules)
    maps = [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(grads, rel["attn"])]   # the blocks' (zip stops)
    joint = rollout_without_normalisation(maps, start_layer)
    if model.global_pool == "map":                      # the row starts at the pool's first latent
        row = (grads[-1] * rel["pool_attn"]).clamp(min=0).mean(dim=1)[:, 0]
        return torch.einsum("bi,bij->bj", row, joint)
    return read_out(model, joint)


__all__ = ["METHODS", "EPS", "RULES", "safe_divide", "linear_relevance", "matmul_relevance", "add_relevance",
           "clone_relevance", "class_token_relevance", "mean_pool_relevance", "patch_relevance", "check_supported",
           "run_model", "one_hot", "relevance", "attention_gradients", "lrp", "partial_lrp", "read_out",
           "rollout_without_normalisation", "transformer_attribution"]
