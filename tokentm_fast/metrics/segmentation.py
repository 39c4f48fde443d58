"""Localization: the segmentation test (docs/evaluation.md §1, Chefer et al. protocol).

Per image the patch map ``e (gh, gw)`` is upsampled bilinearly to the mask size
``(H, W)`` and min–max normalized to ``[0, 1]`` (a constant map becomes all
zeros). Foreground is predicted where ``e > mean(e)``.

* pixel accuracy: Σ correct / Σ labeled pixels over the whole data set
  (every mask pixel is labeled);
* IoU of background and of foreground, each Σ intersection / Σ union over the
  whole data set; mIoU is their mean;
* mAP: per image, the average precision (as ``sklearn.metrics.
  average_precision_score``) of the normalized map as score for the foreground
  mask and of ``1 − map`` for the background, averaged over the two classes;
  mAP is the mean over images. **A class with no pixel in an image's mask
  (no foreground, or no background) has no defined AP; it is skipped for that
  image**, whose AP is then the AP of the other class alone.

Everything is batched torch on the tensors' device; the accumulator keeps only
integers and an exact sum of the per-image APs, so a data set of any size
streams through in constant memory, and the states of disjoint shards merge
(``merge_state_dict``) into exactly the numbers of one pass.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..maps import minmax_normalize, upsample_maps
from .exact import ExactSum

__all__ = ["SegmentationMetric", "upsample_maps", "minmax_normalize", "average_precision"]


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision per row, as ``sklearn.metrics.average_precision_score``.

    Args:
        scores: ``(B, N)`` real scores (higher = more likely positive).
        targets: ``(B, N)`` bool / 0-1 labels.

    Returns:
        ``(B,)`` float64 AP; ``NaN`` for a row without positives.

    Step-wise: ``AP = Σ_t (R_t − R_{t−1}) P_t`` over the distinct score thresholds
    taken in decreasing order; pixels with equal scores enter together (one
    threshold). Equivalently ``AP = (1/P) Σ_j y_j · P(end of j's tie group)``.
    """
    s, order = torch.sort(scores, dim=1, descending=True, stable=True)
    y = torch.gather(targets.to(torch.float64), 1, order)
    n = s.shape[1]
    tp = torch.cumsum(y, dim=1)
    pos = torch.arange(1, n + 1, device=s.device, dtype=torch.float64)
    precision = tp / pos
    # index of the last element of each tie group, propagated to every element of the group
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    idx = torch.arange(n, device=s.device).expand_as(s)
    end_idx = torch.where(is_end, idx, torch.full_like(idx, n - 1))
    end_idx = torch.flip(torch.cummin(torch.flip(end_idx, dims=[1]), dim=1).values, dims=[1])
    p_end = torch.gather(precision, 1, end_idx)
    n_pos = tp[:, -1]
    return (y * p_end).sum(dim=1) / n_pos  # NaN (0/0) where a row has no positive


class SegmentationMetric:
    """Streaming segmentation test (§1): pixel accuracy, per-class IoU, mIoU, mAP.

    ``update(maps (B, gh, gw), masks (B, H, W) bool/0-1)``; ``compute()`` returns
    ``{"pixel_accuracy", "miou", "map", "iou_background", "iou_foreground"}``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.correct = 0
        self.labeled = 0
        self.intersection = [0, 0]  # background, foreground
        self.union = [0, 0]
        self.ap_sum = ExactSum()  # per-image APs, summed exactly (mergeable)
        self.ap_count = 0

    @torch.no_grad()
    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Accumulate a batch: ``maps (B, gh, gw)``, ``masks (B, H, W)`` (or ``(B, 1, H, W)``)."""
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != maps.shape[0]:
            raise ValueError(f"masks must be (B, H, W) matching maps, got {tuple(masks.shape)}")
        gt = masks.to(device=maps.device) > 0
        b = gt.shape[0]
        e = minmax_normalize(upsample_maps(maps, tuple(gt.shape[-2:]))).reshape(b, -1)
        gt = gt.reshape(b, -1)
        pred = e > e.mean(dim=1, keepdim=True)

        self.correct += int((pred == gt).sum())
        self.labeled += gt.numel()
        for c, (p, g) in enumerate(((~pred, ~gt), (pred, gt))):
            self.intersection[c] += int((p & g).sum())
            self.union[c] += int((p | g).sum())

        ap_fg = average_precision(e, gt)
        ap_bg = average_precision(1.0 - e, ~gt)
        ap = torch.stack([ap_bg, ap_fg], dim=1)
        valid = ~torch.isnan(ap)
        per_image = torch.where(valid, ap, torch.zeros_like(ap)).sum(1) / valid.sum(1).clamp_min(1)
        has_any = valid.any(dim=1)
        self.ap_sum.add(per_image[has_any])
        self.ap_count += int(has_any.sum())

    def compute(self) -> Dict[str, float]:
        """The data-set metrics (NaN where nothing was accumulated)."""
        nan = float("nan")
        iou = [i / u if u > 0 else nan for i, u in zip(self.intersection, self.union)]
        return {
            "pixel_accuracy": self.correct / self.labeled if self.labeled else nan,
            "iou_background": iou[0],
            "iou_foreground": iou[1],
            "miou": (iou[0] + iou[1]) / 2,
            "map": self.ap_sum.mean(self.ap_count) if self.ap_count else nan,
        }

    def state_dict(self) -> Dict[str, object]:
        """Plain-python (JSON-serialisable) accumulator state."""
        return {
            "correct": self.correct,
            "labeled": self.labeled,
            "intersection": list(self.intersection),
            "union": list(self.union),
            "ap_sum": self.ap_sum.to_state(),
            "ap_count": self.ap_count,
        }

    def load_state_dict(self, d: Dict[str, object]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.correct = int(d["correct"])
        self.labeled = int(d["labeled"])
        self.intersection = [int(v) for v in d["intersection"]]
        self.union = [int(v) for v in d["union"]]
        self.ap_sum = ExactSum.from_state(d["ap_sum"])
        self.ap_count = int(d["ap_count"])

    def merge_state_dict(self, d: Dict[str, object]) -> None:
        """Add the state of another shard: integer counts and exact sums add up."""
        self.correct += int(d["correct"])
        self.labeled += int(d["labeled"])
        self.intersection = [a + int(v) for a, v in zip(self.intersection, d["intersection"])]
        self.union = [a + int(v) for a, v in zip(self.union, d["union"])]
        self.ap_sum.merge(ExactSum.from_state(d["ap_sum"]))
        self.ap_count += int(d["ap_count"])
