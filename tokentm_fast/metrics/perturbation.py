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
  probability of the clean predicted class, p_f after the positive test. The
  per-image sums over f are accumulated exactly, and the mean is the correctly
  rounded quotient (so any split of the images gives the same number).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .exact import ExactSum
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
        max_forward_batch: most images per forward pass. The clean batch and
            its ``2·len(fractions)`` perturbed copies are packed into as few
            passes of at most this many images as possible; ``None`` (default)
            gives one pass per perturbation of the ``B`` images.
        dtype: dtype of the classifier's input (default: the dtype of the
            classifier's first floating parameter if it is a module, else the
            images' dtype). Masking and normalization run in float32 first.

    ``update(images01 (B, C, H, W), maps (B, gh, gw), labels (B,) or None)``;
    ``compute()`` returns AUCs, ``aopc``, ``lodds`` and the accuracy ``curves``
    (``[acc(0), acc(f₁), …]``). Forward passes run under ``torch.no_grad``.
    The accumulated state is integers and exact sums
    (:class:`~tokentm_fast.metrics.exact.ExactSum`), so ``merge_state_dict``
    of the states of disjoint shards gives exactly the single-pass numbers.
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        normalize: Callable[[torch.Tensor], torch.Tensor],
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        max_forward_batch: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if max_forward_batch is not None and int(max_forward_batch) < 1:
            raise ValueError(f"max_forward_batch must be >= 1 or None, got {max_forward_batch}")
        self.classifier = classifier
        self.normalize = normalize
        self.fractions = tuple(float(f) for f in fractions)
        self.max_forward_batch = None if max_forward_batch is None else int(max_forward_batch)
        if dtype is None and isinstance(classifier, torch.nn.Module):
            dtype = next((p.dtype for p in classifier.parameters() if p.is_floating_point()), None)
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        m = len(self.fractions) + 1
        self.n = 0
        self.n_target = 0
        self.correct = {k: [0] * m for k in ("positive_predicted", "negative_predicted", "positive_target", "negative_target")}
        self.aopc_sum = ExactSum()  # Σ over images of Σ_f (p0 − p_f)
        self.lodds_sum = ExactSum()  # Σ over images of Σ_f log(p_f / p0)

    def _classify(self, images01: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images01)
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)
        logits = self.classifier(x)
        return logits if logits.is_floating_point() and logits.element_size() >= 4 else logits.float()

    def _all_logits(self, images01: torch.Tensor, ranks: torch.Tensor, kept: List[Optional[tuple]]) -> List[torch.Tensor]:
        """Logits ``(B, K)`` of every variant of the batch, in the order of ``kept``.

        ``kept[v]`` is ``None`` (the clean images) or ``(lo, hi)``: the pixels whose
        rank ``r`` has ``lo <= r < hi`` are kept, the others zeroed. The
        ``len(kept) · B`` rows go through the classifier in passes of at most
        ``max_forward_batch`` rows (variant-major, then image); the masked copies
        are built per pass, so memory is bounded by the budget.
        """
        b = images01.shape[0]
        budget = self.max_forward_batch or b
        rows = len(kept) * b
        out: List[torch.Tensor] = []
        for start in range(0, rows, budget):
            stop = min(start + budget, rows)
            parts = []
            for v in range(start // b, (stop - 1) // b + 1):
                i0, i1 = max(start - v * b, 0), min(stop - v * b, b)
                x = images01[i0:i1]
                if kept[v] is not None:
                    lo, hi = kept[v]
                    r = ranks[i0:i1]
                    x = x * ((r >= lo) & (r < hi)).to(x.dtype)
                parts.append(x)
            out.append(self._classify(parts[0] if len(parts) == 1 else torch.cat(parts)))
        logits = out[0] if len(out) == 1 else torch.cat(out)
        return list(logits.split(b))

    @torch.no_grad()
    def update(self, images01: torch.Tensor, maps: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Accumulate a batch: ``images01 (B, C, H, W)`` in [0, 1], ``maps (B, gh, gw)``, ``labels (B,)``."""
        b, _, h, w = images01.shape
        if maps.shape[0] != b:
            raise ValueError("maps and images01 must have the same batch size")
        n_pix = h * w
        rel = upsample_maps(maps.to(images01.device), (h, w)).reshape(b, n_pix)
        ranks = relevance_ranks(rel).reshape(b, 1, h, w)

        kept: List[Optional[tuple]] = [None]
        variants = []
        for i, f in enumerate(self.fractions, start=1):
            k = num_removed(f, n_pix)
            # positive: the k most relevant pixels (ranks < k) removed; negative: the k least relevant
            for test, keep in (("positive", (k, n_pix)), ("negative", (0, n_pix - k))):
                kept.append(keep)
                variants.append((i, test))
        logits_all = self._all_logits(images01, ranks, kept)

        logits0 = logits_all[0]
        pred = logits0.argmax(dim=1)
        p0 = torch.softmax(logits0.double(), dim=1).gather(1, pred[:, None])[:, 0]
        has_target = labels is not None
        if has_target:
            labels = labels.to(pred.device).long().reshape(b)
        aopc = torch.zeros(b, dtype=torch.float64, device=pred.device)
        lodds = torch.zeros_like(aopc)
        hits = []  # per variant: still the clean prediction, (still the label); counted on the device
        for (i, test), logits in zip(variants, logits_all[1:]):
            pred_f = logits.argmax(dim=1)
            hits.append((pred_f == pred).sum())
            if has_target:
                hits.append((pred_f == labels).sum())
            if test == "positive":
                pf = torch.softmax(logits.double(), dim=1).gather(1, pred[:, None])[:, 0]
                aopc += p0 - pf
                lodds += torch.log(pf.clamp_min(_EPS) / p0.clamp_min(_EPS))
        if has_target:
            hits.append((pred == labels).sum())
        counts = torch.stack(hits).tolist() if hits else []  # one device -> host copy per batch
        per = 2 if has_target else 1
        for v, (i, test) in enumerate(variants):
            self.correct[f"{test}_predicted"][i] += int(counts[per * v])
            if has_target:
                self.correct[f"{test}_target"][i] += int(counts[per * v + 1])
        self.correct["positive_predicted"][0] += b
        self.correct["negative_predicted"][0] += b
        if has_target:
            self.correct["positive_target"][0] += int(counts[-1])
            self.correct["negative_target"][0] += int(counts[-1])
        self.aopc_sum.add(aopc)
        self.lodds_sum.add(lodds)
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
        m = max(len(self.fractions), 1)
        out["aopc"] = self.aopc_sum.mean(self.n * m) if self.n else nan
        out["lodds"] = self.lodds_sum.mean(self.n * m) if self.n else nan
        out["curves"] = curves
        return out

    def state_dict(self) -> Dict[str, object]:
        """Plain-python (JSON-serialisable) accumulator state."""
        return {
            "fractions": list(self.fractions),
            "n": self.n,
            "n_target": self.n_target,
            "correct": {k: list(v) for k, v in self.correct.items()},
            "aopc_sum": self.aopc_sum.to_state(),
            "lodds_sum": self.lodds_sum.to_state(),
        }

    def load_state_dict(self, d: Dict[str, object]) -> None:
        """Restore a state from :meth:`state_dict` (the fractions must match)."""
        if tuple(float(f) for f in d["fractions"]) != self.fractions:
            raise ValueError(f"state fractions {d['fractions']} != metric fractions {list(self.fractions)}")
        self.n = int(d["n"])
        self.n_target = int(d["n_target"])
        self.correct = {k: [int(c) for c in v] for k, v in d["correct"].items()}
        self.aopc_sum = ExactSum.from_state(d["aopc_sum"])
        self.lodds_sum = ExactSum.from_state(d["lodds_sum"])

    def merge_state_dict(self, d: Dict[str, object]) -> None:
        """Add the state of another shard (same fractions): counts and exact sums add up."""
        if tuple(float(f) for f in d["fractions"]) != self.fractions:
            raise ValueError(f"state fractions {d['fractions']} != metric fractions {list(self.fractions)}")
        self.n += int(d["n"])
        self.n_target += int(d["n_target"])
        for k, v in d["correct"].items():
            self.correct[k] = [a + int(c) for a, c in zip(self.correct[k], v)]
        self.aopc_sum.merge(ExactSum.from_state(d["aopc_sum"]))
        self.lodds_sum.merge(ExactSum.from_state(d["lodds_sum"]))
