"""docs/methods.md §2–§5 written out with full N×N matrices over a forward written out in a test, for the
literal oracles of the model-family tests (tests/test_models_dinov2.py, tests/test_models_eva.py); for
tests only, sharing nothing with the package.

A test's forward gives, per block, ``dict(x_in, attn, y, m, xt)``: the block input Xˡ⁻¹, the attention
probabilities ``(B, H, N, N)`` (retaining their gradient), Yˡ, the MLP branch γ₂ ⊙ MLP(LN₂(Yˡ)) and x̃ of the
attention sub-layer (γ₁ ⊙ proj(v_j), any output norm applied to v_j), plus X⁰ and the prefix count P.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

EPS = 1e-6


def transformation_weights(x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """§2: ``w_i = ‖x̃_i‖ / max(‖x_i‖, ε) · softmax_i(cos_i)``, ``(B, N)``."""
    nx, nxt = x.norm(dim=-1), xt.norm(dim=-1)
    cos = (x * xt).sum(-1) / (nx.clamp_min(EPS) * nxt.clamp_min(EPS))
    return nxt / nx.clamp_min(EPS) * torch.softmax(cos, -1)


def maps(out: torch.Tensor, layers: List[dict], x0: torch.Tensor, p: int,
         score: Callable[[torch.Tensor], torch.Tensor], query: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Raw attention, rollout, GAE, TokenTM (default options) and attention Grad-CAM ``(B, N − P)`` of the
    score ``score(out) (B,)``, read on the query weights ``query (B, N)`` (default: row cls), and
    ``gradcam_condition`` (B,), the condition of Grad-CAM's head sum (tests/test_targets.py::gradcam_tolerance).
    Runs the backward of ``score(out)``."""
    score(out).sum().backward()
    b, n = x0.shape[:2]
    if query is None:
        query = torch.zeros(b, n, dtype=x0.dtype)
        query[:, 0] = 1.0
    eye = torch.eye(n, dtype=x0.dtype)
    rollout = gae = eye
    tokentm = torch.diag_embed(x0.detach().norm(dim=-1))
    for layer in layers:
        a, g = layer["attn"].detach(), layer["attn"].grad
        fused = (a * g).clamp(min=0).mean(1)
        rollout = (0.5 * a.mean(1) + 0.5 * eye) @ rollout
        gae = gae + fused @ gae
        w_attn = transformation_weights(layer["x_in"].detach(), layer["xt"].detach())
        w_mlp = transformation_weights(layer["y"].detach(), layer["m"].detach())
        tokentm = (eye + torch.diag_embed(w_mlp)) @ (eye + fused @ torch.diag_embed(w_attn)) @ tokentm

    def row(c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,bij->bj", query, c)[:, p:]

    last = layers[-1]["attn"]
    a_q = torch.einsum("bi,bhij->bhj", query, last.detach())[:, :, p:]          # (B, H, N − P)
    g_q = torch.einsum("bi,bhij->bhj", query, last.grad)[:, :, p:]
    alpha = g_q.mean(-1, keepdim=True)
    gradcam = (alpha * a_q).mean(1).clamp(min=0)
    condition = ((g_q.abs().mean(-1, keepdim=True) + alpha.abs()) * a_q).mean(1).norm(dim=-1) / gradcam.norm(dim=-1)
    return {"raw_attention": a_q.mean(1), "rollout": row(rollout), "gae": row(gae), "tokentm": row(tokentm),
            "attn_gradcam": gradcam, "gradcam_condition": condition}
