"""Perturbation test (docs/evaluation.md §2) and AOPC / LOdds (§3).

Per image the map is upsampled bilinearly (``align_corners=False``) to the
input size and the ``N = H·W`` pixels are ranked by relevance **once**, with a
deterministic order: a stable sort of ``−relevance``, so among equal relevance
the pixel with the smaller flat (row-major) index ranks first. For a fraction
``f`` the number of removed pixels is ``k = ⌊f·N + ½⌋`` (round half up, with
``f·N`` first rounded to 6 decimals so that e.g. ``0.3·N`` is not hurt by binary
floating point). The positive test zeroes the first ``k`` pixels of the ranking
(most relevant), the negative test the last ``k`` (least relevant), in all
channels of the unnormalized ``[0, 1]`` image; the image is then normalized and
classified.

* acc(f): fraction of images whose class is still the clean prediction
  ("predicted"; acc(0) = 1) or the label ("target"; acc(0) = clean accuracy).
* AUC = ``numpy.trapezoid(acc, dx=0.1)`` over ``f ∈ {0, 0.1, …, 0.9}``
  (for custom fractions, the trapezoid over ``x = [0, *fractions]``).
* AOPC = mean over images of mean_f (p₀ − p_f), LOdds = mean over images of
  mean_f log(p_f / p₀), probabilities clamped to ≥ 1e-12; p is the softmax
  probability of the clean predicted class, p_f after the positive test.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .segmentation import upsample_maps

__all__ = ["PerturbationMetric", "DEFAULT_FRACTIONS", "num_removed", "relevance_ranks", "auc"]

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_EPS = 1e-12

_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def num_removed(fraction: float, n: int) -> int:
    """Number of pixels removed for ``fraction`` of ``n``: ``⌊f·n + ½⌋`` (round half up)."""
    return int(math.floor(round(fraction * n, 6) + 0.5))


def relevance_ranks(relevance: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel, ``(B, N) -> (B, N)`` long, 0 = most relevant.

    Stable sort of ``−relevance``: ties are broken by the smaller flat index first.
    """
    order = torch.sort(-relevance, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def auc(acc: Sequence[float], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> float:
    """Trapezoid of ``acc`` over ``[0, *fractions]`` (``dx = 0.1`` for the default fractions)."""
    if tuple(fractions) == DEFAULT_FRACTIONS:
        return float(_trapezoid(np.asarray(acc, dtype=np.float64), dx=0.1))
    return float(_trapezoid(np.asarray(acc, dtype=np.float64), x=np.asarray([0.0, *fractions])))


class PerturbationMetric:
    """Streaming perturbation test (§2) with AOPC / LOdds (§3).

    Args:
        classifier: normalized images ``(B, C, H, W)`` -> logits ``(B, K)``.
        normalize: ``[0, 1]`` images -> the classifier's input normalization.
        fractions: removed fractions ``f`` (default 0.1 … 0.9).

    ``update(images01 (B, C, H, W), maps (B, gh, gw), labels (B,) or None)``;
    ``compute()`` returns AUCs, ``aopc``, ``lodds`` and the accuracy ``curves``
    (``[acc(0), acc(f₁), …]``). Forward passes run under ``torch.no_grad`` with
    one batch of ``B`` images at a time (clean, then per fraction positive and
    negative), so memory is bounded by the caller's batch size.
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        normalize: Callable[[torch.Tensor], torch.Tensor],
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ) -> None:
        self.classifier = classifier
        self.normalize = normalize
        self.fractions = tuple(float(f) for f in fractions)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        m = len(self.fractions) + 1
        self.n = 0
        self.n_target = 0
        self.correct = {k: [0] * m for k in ("positive_predicted", "negative_predicted", "positive_target", "negative_target")}
        self.aopc_sum = 0.0
        self.lodds_sum = 0.0

    def _classify(self, images01: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.normalize(images01))
        return logits if logits.is_floating_point() and logits.element_size() >= 4 else logits.float()

    @torch.no_grad()
    def update(self, images01: torch.Tensor, maps: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Accumulate a batch: ``images01 (B, C, H, W)`` in [0, 1], ``maps (B, gh, gw)``, ``labels (B,)``."""
        b, _, h, w = images01.shape
        if maps.shape[0] != b:
            raise ValueError("maps and images01 must have the same batch size")
        n_pix = h * w
        rel = upsample_maps(maps.to(images01.device), (h, w)).reshape(b, n_pix)
        ranks = relevance_ranks(rel).reshape(b, 1, h, w)

        logits0 = self._classify(images01)
        pred = logits0.argmax(dim=1)
        p0 = torch.softmax(logits0.double(), dim=1).gather(1, pred[:, None])[:, 0]
        has_target = labels is not None
        if has_target:
            labels = labels.to(pred.device).long().reshape(b)
            clean_ok = int((pred == labels).sum())
            self.correct["positive_target"][0] += clean_ok
            self.correct["negative_target"][0] += clean_ok
        self.correct["positive_predicted"][0] += b
        self.correct["negative_predicted"][0] += b

        aopc = torch.zeros(b, dtype=torch.float64, device=pred.device)
        lodds = torch.zeros_like(aopc)
        for i, f in enumerate(self.fractions, start=1):
            k = num_removed(f, n_pix)
            for test, removed in (("positive", ranks < k), ("negative", ranks >= n_pix - k)):
                logits = self._classify(images01 * (~removed).to(images01.dtype))
                pred_f = logits.argmax(dim=1)
                self.correct[f"{test}_predicted"][i] += int((pred_f == pred).sum())
                if has_target:
                    self.correct[f"{test}_target"][i] += int((pred_f == labels).sum())
                if test == "positive":
                    pf = torch.softmax(logits.double(), dim=1).gather(1, pred[:, None])[:, 0]
                    aopc += p0 - pf
                    lodds += torch.log(pf.clamp_min(_EPS) / p0.clamp_min(_EPS))
        m = max(len(self.fractions), 1)
        self.aopc_sum += float(aopc.sum()) / m
        self.lodds_sum += float(lodds.sum()) / m
        self.n += b
        if has_target:
            self.n_target += b

    def compute(self) -> Dict[str, object]:
        """AUCs, AOPC, LOdds and curves (target entries only when labels were seen)."""
        nan = float("nan")
        out: Dict[str, object] = {}
        curves: Dict[str, List[float]] = {}
        variants = ["predicted"] + (["target"] if self.n_target else [])
        for v in variants:
            n = self.n if v == "predicted" else self.n_target
            for test in ("positive", "negative"):
                key = f"{test}_{v}"
                acc = [c / n if n else nan for c in self.correct[key]]
                curves[key] = acc
                out[f"{test[:3]}_auc_{v}"] = auc(acc, self.fractions)
        out["aopc"] = self.aopc_sum / self.n if self.n else nan
        out["lodds"] = self.lodds_sum / self.n if self.n else nan
        out["curves"] = curves
        return out

    def state_dict(self) -> Dict[str, object]:
        """Plain-python (JSON-serialisable) accumulator state."""
        return {
            "fractions": list(self.fractions),
            "n": self.n,
            "n_target": self.n_target,
            "correct": {k: list(v) for k, v in self.correct.items()},
            "aopc_sum": self.aopc_sum,
            "lodds_sum": self.lodds_sum,
        }

    def load_state_dict(self, d: Dict[str, object]) -> None:
        """Restore a state from :meth:`state_dict` (the fractions must match)."""
        if tuple(float(f) for f in d["fractions"]) != self.fractions:
            raise ValueError(f"state fractions {d['fractions']} != metric fractions {list(self.fractions)}")
        self.n = int(d["n"])
        self.n_target = int(d["n_target"])
        self.correct = {k: [int(c) for c in v] for k, v in d["correct"].items()}
        self.aopc_sum = float(d["aopc_sum"])
        self.lodds_sum = float(d["lodds_sum"])
