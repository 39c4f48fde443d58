"""Models whose head is an attention pool (docs/methods.md §6.1): a learned latent query
attends to the final tokens (timm ``global_pool="map"``, as in SigLIP). The explanations start at the
pool instead of at row cls of the last block:

- raw attention: ``e = mean_h A_pool[h, 0, :]``;
- rollout: ``r⁰ = mean_h A_pool[h, 0, :]``, then the engine over the blocks;
- GAE: ``r⁰ = mean_h max(A_pool ⊙ G_pool, 0)[h, 0, :]``; TokenTM: that row ⊙ ``w^pool``, the transformation
  weights (§2) of the pool's value tokens (x = the pool's input tokens, x̃ = proj_pool(v); a pool narrower
  than the blocks: :func:`pool_transform_weights`);
- attention Grad-CAM: §5 with A_pool and G_pool in place of the last block's row cls (:func:`query_rows`);
- LeGrad: s_l = the target score of the pool applied to Xˡ (its first latent, then the projection /
  classifier), and ``eˡ_j = mean_h max(∂s_l/∂A_pool^{(l)}[h, 0, j], 0)`` (:func:`legrad_layer_maps`).

``A_pool`` (B, H, latents, M) covers the M tokens the pool reads (``vit.pool_columns``); rows over all N
tokens have zeros elsewhere. Everything here is O(N·D): the pool's attention is one row per latent.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..capture import PoolRecorder, prepared_model
from ..kernels._utils import EPS
from ..models.protocol import ViTAdapter
from ..precision import compute_dtype, token_lengths
from ..targets import resolve_target, target_score
from ..torch_ops.head_fusion import fuse_heads
from ..torch_ops.legrad_reduce import legrad_reduce
from .options import chosen_layers


def pool_transform_weights(x: torch.Tensor, x_tilde: torch.Tensor, weigh: Callable, use_length: bool = True,
                           use_necc: bool = True) -> torch.Tensor:
    """``w^pool`` (§9): the transformation weights (§2) of the pool's value tokens, ``(B, M)`` float32 at
    least, from ``x (B, M, D)`` the tokens the pool reads and ``x_tilde (B, M, D')`` = proj_pool(v).

    ``weigh(x, x_tilde, use_length=, use_necc=)`` computes §2 where both have the same width. A pool
    narrower than the blocks (D' ≠ D: CoCa ViT-B/32 reads 768-wide tokens into 512-wide latents) maps
    each token into another space, where the angle between x_j and x̃_j, and with it NECC, is undefined:
    NECC is then 1/M, its value when it carries no direction (``use_necc=False``), and the length ratio
    ``|x̃_j| / max(|x_j|, ε)`` stays (docs/methods.md §6.1: the spec's §2 assumes one width)."""
    if x_tilde.shape[-1] == x.shape[-1]:
        return weigh(x, x_tilde, use_length=use_length, use_necc=use_necc)
    lengths = token_lengths(x)
    necc = torch.full_like(lengths, 1.0 / x.shape[-2])
    return token_lengths(x_tilde) / lengths.clamp_min(EPS) * necc if use_length else necc


def first_latent(vit: ViTAdapter, pool_tensor: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, H, Lq, M)`` of the pool → ``(B, H, N)``: latent 0 over all N tokens (zeros off the pool's columns)."""
    b, h = pool_tensor.shape[:2]
    out = pool_tensor.new_zeros(b, h, num_tokens)
    out[:, :, vit.pool_columns(num_tokens)] = pool_tensor[:, :, 0]
    return out


def fused_first_latent(vit: ViTAdapter, attn: torch.Tensor, grad: Optional[torch.Tensor], mode: str,
                       num_tokens: int) -> torch.Tensor:
    """``(B, N)``: the head fusion ``mode`` (the ``head_fusion`` twin: "mean" or "gae") of the pool's first
    latent row, ``attn`` and ``grad`` ``(B, H, Lq, M)``, over all N tokens (zeros off the pool's columns)."""
    fused = fuse_heads(attn[:, :, :1], None if grad is None else grad[:, :, :1], mode)          # (B, 1, M)
    return first_latent(vit, fused[:, None], num_tokens)[:, 0]


class PoolStart:
    """The engine's first row at the attention pool (§6.1), for the attention paths (``tokentm_fast.paths``).

    ``kind``: ``"probs"`` (rollout: mean_h A_pool), ``"gae"`` (mean_h max(A_pool ⊙ G_pool, 0)) or
    ``"tokentm"`` (the GAE row ⊙ ``w^pool``, from ``weigh(x_in, x̃)``: :func:`pool_transform_weights`).
    """

    def __init__(self, vit: ViTAdapter, kind: str, weigh: Optional[Callable] = None) -> None:
        self.vit, self.kind, self.weigh = vit, kind, weigh
        self.recorder = PoolRecorder(vit)

    def install(self, handles: list) -> None:
        self.recorder.install(handles)

    def row(self, num_tokens: int) -> torch.Tensor:
        """``(B, N)`` float32 at least, after the forward (``kind="probs"``)."""
        return fused_first_latent(self.vit, self.recorder.last["attn"].detach(), None, "mean", num_tokens)

    def on_gradient(self, num_tokens: int, set_row: Callable[[torch.Tensor], None]) -> None:
        """After the forward: ``set_row(r⁰)`` each time the score's gradient reaches the pool's attention
        (before any block's: the pool is above them), r⁰ ``(B, N)`` float32 at least."""
        rec = self.recorder.last
        a = rec["attn"]
        acc = compute_dtype(a)
        w = None
        if self.kind == "tokentm":
            with torch.no_grad():
                w = self.weigh(rec["x_in"], self.vit.pool_value_tokens(rec["values"]))      # (B, M)
            w = first_latent(self.vit, w[:, None, None, :], num_tokens)[:, 0].to(acc)

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                r = fused_first_latent(self.vit, a.detach(), grad, "gae", num_tokens)
                set_row(r if w is None else r * w)

        a.register_hook(hook)


def _pool_output(vit: ViTAdapter, tokens: torch.Tensor, head: Callable, target) -> tuple:
    """``head(tokens)`` with the pool's attention a grad-requiring leaf; (output, its pool record)."""
    recorder = PoolRecorder(vit, leaf=True)
    handles: list = []
    try:
        recorder.install(handles)
        with torch.enable_grad():
            out = head(tokens)
    finally:
        for h in reversed(handles):
            h.remove()
    return out, recorder.last


def raw_attention(vit: ViTAdapter, images: torch.Tensor, path) -> torch.Tensor:
    """``(B, N−P)``: mean_h A_pool[h, 0, :]."""
    last = vit.num_layers - 1
    x = path.block_outputs(vit, images, [last])[last]
    with prepared_model(vit), torch.no_grad():
        _, rec = _pool_output(vit, x, vit.head, None)
    e = fused_first_latent(vit, rec["attn"].detach(), None, "mean", x.shape[1])
    return e[:, vit.num_prefix_tokens:]


def query_rows(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, path) -> List[tuple]:
    """Per target, ``(A_pool[:, :, 0, :], G_pool[:, :, 0, :])`` over all N tokens, ``(B, H, N)`` each: the
    pool's first latent row of its attention and of the score's gradient with respect to it."""
    last = vit.num_layers - 1
    x = path.block_outputs(vit, images, [last])[last]
    n = x.shape[1]
    rows = []
    with prepared_model(vit):
        out, rec = _pool_output(vit, x, vit.head, None)
        a = rec["attn"]
        acc = compute_dtype(a)
        for t in targets:
            t = resolve_target(t, out.detach())
            (g,) = torch.autograd.grad(target_score(out, t), [a], retain_graph=True)
            rows.append((first_latent(vit, a.detach().to(acc), n), first_latent(vit, g.to(acc), n)))
    return rows


def legrad_layer_maps(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict, path) -> list:
    """§6 at the pool, per target ``(B, N)``: Σ over the chosen blocks of ``mean_h max(∂s_l/∂A_pool[h, 0, :], 0)``
    (the ``legrad_reduce`` reduction over the one latent row), s_l = score(pool_head(Xˡ)) with the pool's
    attention of that application of the pool."""
    layers = chosen_layers(options, vit.num_layers)
    xs = path.block_outputs(vit, images, layers)
    n = xs[layers[0]].shape[1]
    with prepared_model(vit):
        with torch.no_grad():
            output = vit.head(xs[vit.num_layers - 1]) if vit.num_layers - 1 in xs else vit.forward(images)
        targets = [resolve_target(t, output) for t in targets]
        maps: List = [0] * len(targets)
        for l in layers:
            out, rec = _pool_output(vit, xs[l], vit.pool_head, None)
            a = rec["attn"]
            for k, t in enumerate(targets):
                (g,) = torch.autograd.grad(target_score(out, t), [a], retain_graph=k < len(targets) - 1)
                e = legrad_reduce(g[:, :, :1], num_rows=1)                             # (B, M)
                maps[k] = maps[k] + first_latent(vit, e[:, None, None], n)[:, 0]
    return maps
