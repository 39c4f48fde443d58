"""LeGrad and attention Grad-CAM: methods read off the gradient of the score at each block's mixed heads
(docs/methods.md §5, §6).

The attention path (``tokentm_fast.paths``) runs the model's forward once and one backward through the
re-run block tails (proj, MLP, head) from the mixed heads ``o = concat_h(A_h V_h)``, giving
``dO_l = ∂s_l/∂o_l`` and ``G̃ˡ_h[i, j] = ⟨dO_l,h[i], V_h[j]⟩`` (``TailCapture``); the methods reduce it:

- LeGrad: ``e = Σ_l mean_h (1/N) Σ_i max(G̃ˡ_h[i, :], 0)`` over the chosen blocks, s_l being the target
  score of layer l's tokens pooled by ``layer_pooling`` (the mean over all tokens by default);
- attention Grad-CAM: ``α_h = mean_{j ≥ P} G̃ᴸ_h[q, j]`` and ``e = max(mean_h α_h Aᴸ_h[q, :], 0)`` for the
  query row q of the last block.

Each takes a sequence of targets and returns a ``(B, N−P)`` map per target.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..maps import minmax_normalize
from ..models.protocol import ViTAdapter
from ..targets import CosineSimilarity
from . import pool
from .options import chosen_layers


def check_neutral_prompt(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1 or not len(value):
        raise TypeError(f"option neutral_prompt must be None or a (D',) floating embedding (e.g. the text "
                        f"embedding of 'a photo of a'), got {value!r}")
    if not torch.isfinite(value).all():
        raise ValueError("option neutral_prompt contains NaN or Inf")


def check_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"option correction_threshold must be a number in [0, 1], got {value!r}")


def _neutral_correction(e: torch.Tensor, neutral: torch.Tensor, threshold: float) -> torch.Tensor:
    """The authors' SigLIP correction (docs/methods.md §6): zero the map where the min–max normalised map of
    the neutral prompt exceeds ``threshold``."""
    return torch.where(minmax_normalize(neutral) > threshold, torch.zeros_like(e), e)


def legrad(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
           full: bool = False) -> List[torch.Tensor]:
    """LeGrad (``_legrad``), with the neutral-prompt correction when ``options["neutral_prompt"]`` is given:
    the map of ``cosine_similarity(neutral_prompt)`` is computed too, and the explanation zeroed where its
    min–max normalised map exceeds ``correction_threshold``."""
    neutral = options.get("neutral_prompt")
    if neutral is None:
        return _legrad(vit, images, targets, options, path)
    *maps, e_neutral = _legrad(vit, images, [*targets, CosineSimilarity(neutral)], options, path)
    return [_neutral_correction(e, e_neutral, options["correction_threshold"]) for e in maps]


def _legrad(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any],
            path) -> List[torch.Tensor]:
    """LeGrad over the chosen blocks (``start_layer`` .. L−1, by default the last two), each block's score
    read through ``layer_pooling``: ``"mean"`` (the default, the authors' code: the mean of Xˡ over all
    tokens, then the final norm and projection / classifier) or ``"head"`` (the model's own head on Xˡ)."""
    prefix = vit.num_prefix_tokens
    if vit.attention_pool is not None:     # through the pool's attention (§6)
        return [e[:, prefix:] for e in pool.legrad_layer_maps(vit, images, targets, options, path)]
    layers = chosen_layers(options, vit.num_layers)
    cap = path.tail_capture(vit, images, targets, layers, query_layers=(), layer_pooling=options["layer_pooling"])
    # e = Σ_l mean_h (1/N) Σ_i max(G̃ˡ_h[i, :], 0) over the chosen blocks
    return [sum(path.positive_grad_means(vit, cap, d_outs, layers, images))[:, prefix:] for d_outs in cap.d_outs]


def attn_gradcam(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
                 full: bool = False) -> List[torch.Tensor]:
    """Attention Grad-CAM of the last block's query row (with an attention-pool head: of the pool's first
    latent, §6.1): the head weights α_h are the mean gradient over the patches,
    ``e = max(mean_h α_h A_h[q, :], 0)``."""
    prefix = vit.num_prefix_tokens
    if vit.attention_pool is not None:
        rows = pool.query_rows(vit, images, targets, path)
    else:
        last = vit.num_layers - 1
        cap = path.tail_capture(vit, images, targets, [last], query_layers=[last])
        rows = [path.query_rows(vit, cap, d_outs[0], last, images) for d_outs in cap.d_outs]
    maps = []
    for a_q, g_q in rows:                                                       # (B, H, N) each
        alpha = g_q[:, :, prefix:].mean(-1, keepdim=True)                      # α_h
        maps.append((alpha * a_q).mean(1).clamp_min(0)[:, prefix:])
    return maps
