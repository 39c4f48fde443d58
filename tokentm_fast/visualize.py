"""Pictures: heat-map overlays, method x image grids and perturbation curves.

Everything draws with matplotlib's non-interactive Agg backend (no display
needed) and accepts torch tensors or numpy arrays.

* :func:`normalize_map` -- min-max to ``[0, 1]`` (a constant map -> zeros);
* :func:`overlay` -- an image ``(3, H, W)`` in ``[0, 1]`` blended with the
  bilinearly upsampled, normalized map through a colormap -> ``(H, W, 3)``;
* :func:`save_overlay` -- one overlay as a PNG;
* :func:`save_grid` -- rows = images, columns = the image + one per method;
* :func:`plot_perturbation_curves` -- accuracy vs. fraction of pixels removed
  (positive and negative perturbation tests), one line per method.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["normalize_map", "overlay", "save_overlay", "save_grid", "plot_perturbation_curves"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _figure(figsize):
    """A matplotlib figure drawn by the Agg canvas, without pyplot (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def normalize_map(m: ArrayLike) -> np.ndarray:
    """Min-max normalize ``m`` (any shape) to ``[0, 1]`` as float32; constant (or empty) -> zeros.

    Non-finite entries are ignored for the min / max and become 0.
    """
    a = _np(m)
    out = np.zeros_like(a, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return out
    lo = float(a[finite].min())
    hi = float(a[finite].max())
    if hi > lo:
        out[finite] = (a[finite] - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


def _image_hwc(image: ArrayLike) -> np.ndarray:
    img = _np(image)
    if img.ndim != 3:
        raise ValueError(f"image must be (3, H, W), got shape {img.shape}")
    if img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    elif img.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def _upsample(m: ArrayLike, size) -> np.ndarray:
    a = torch.from_numpy(np.ascontiguousarray(_np(m)))
    if a.dim() != 2:
        raise ValueError(f"map must be (gh, gw), got shape {tuple(a.shape)}")
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if tuple(a.shape) == tuple(size):
        return a.numpy()
    return F.interpolate(a[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: ArrayLike, m: ArrayLike, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend ``image (3, H, W)`` in ``[0, 1]`` with the heat map of ``m (gh, gw)``.

    The map is upsampled bilinearly (``align_corners=False``, as the metrics do)
    to ``(H, W)``, min-max normalized and colored with ``cmap``; the result
    ``(1 - alpha) * image + alpha * colors`` is an ``(H, W, 3)`` float32 array in ``[0, 1]``.
    """
    import matplotlib

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_hwc(image)
    heat = normalize_map(_upsample(m, img.shape[:2]))
    colors = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * img + alpha * colors, 0.0, 1.0).astype(np.float32)


def _display_scale(h: int, w: int, min_side: int) -> int:
    return max(1, int(math.ceil(min_side / max(1, min(h, w)))))


def _enlarge(image: ArrayLike, scale: int) -> torch.Tensor:
    """Upscale ``(3, H, W)`` by an integer factor (nearest: crisp pixels for small inputs)."""
    x = torch.as_tensor(_np(image))
    if scale == 1:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]


def save_overlay(image: ArrayLike, m: ArrayLike, path: Union[str, os.PathLike], cmap: str = "jet",
                 alpha: float = 0.5, min_side: int = 224) -> Path:
    """Write the overlay of ``m`` on ``image`` as a PNG (small images are enlarged to ``min_side``)."""
    from PIL import Image

    img = _np(image)
    scale = _display_scale(img.shape[-2], img.shape[-1], min_side)
    ov = overlay(_enlarge(img, scale), m, cmap=cmap, alpha=alpha)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(ov * 255).astype(np.uint8)).save(p)
    return p


def save_grid(
    images: ArrayLike,
    maps_by_method: Mapping[str, ArrayLike],
    path: Union[str, os.PathLike],
    titles: Optional[Sequence[str]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_inches: float = 1.9,
    dpi: int = 110,
    image_title: str = "image",
    masks: Optional[ArrayLike] = None,
) -> Path:
    """Save a grid: rows = images, columns = the image itself + one overlay per method.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps_by_method: ``{method name: maps (B, gh, gw)}``, columns in dict order.
        path: the PNG to write (folders are created).
        titles: optional row labels (one per image), e.g. ``"circle (pred circle)"``.
        masks: optional ``(B, H, W)`` ground-truth masks, outlined in white on the image column.
    """
    imgs = _np(images)
    if imgs.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {imgs.shape}")
    b = imgs.shape[0]
    methods = list(maps_by_method)
    for name in methods:
        n = maps_by_method[name].shape[0]
        if n != b:
            raise ValueError(f"maps of {name!r} hold {n} images, expected {b}")
    if titles is not None and len(titles) != b:
        raise ValueError(f"{len(titles)} titles for {b} images")
    if masks is not None:
        masks = _np(masks)
        if masks.shape != (b, *imgs.shape[-2:]):
            raise ValueError(f"masks must be (B, H, W) = {(b, *imgs.shape[-2:])}, got {masks.shape}")
    scale = _display_scale(imgs.shape[-2], imgs.shape[-1], 160)
    ncols = 1 + len(methods)
    fig = _figure((cell_inches * ncols, cell_inches * b + 0.35))
    axes = fig.subplots(b, ncols, squeeze=False)
    for i in range(b):
        big = _enlarge(imgs[i], scale)
        axes[i, 0].imshow(_image_hwc(big), interpolation="nearest")
        if masks is not None and masks[i].any() and not masks[i].all():
            mk = np.kron(masks[i] > 0.5, np.ones((scale, scale))).astype(np.float32)
            axes[i, 0].contour(mk, levels=[0.5], colors="white", linewidths=0.9)
        for j, name in enumerate(methods, start=1):
            axes[i, j].imshow(overlay(big, maps_by_method[name][i], cmap=cmap, alpha=alpha),
                              interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[i, 0].set_ylabel(str(titles[i]), fontsize=8)
    for j, name in enumerate([image_title] + methods):
        axes[0, j].set_title(name, fontsize=10)
    fig.tight_layout(pad=0.3)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    return p


def _curves_of(entry: Mapping[str, Any]) -> Mapping[str, Sequence[float]]:
    """Accept either a ``curves`` dict or a whole ``PerturbationMetric.compute()`` result."""
    if "curves" in entry and isinstance(entry["curves"], Mapping):
        return entry["curves"]
    return entry


def plot_perturbation_curves(
    curves_by_method: Mapping[str, Mapping[str, Any]],
    path: Union[str, os.PathLike],
    fractions: Optional[Sequence[float]] = None,
    variant: str = "predicted",
    title: Optional[str] = None,
    dpi: int = 110,
) -> Path:
    """Accuracy vs. fraction of pixels removed, positive and negative tests, one line per method.

    Args:
        curves_by_method: ``{method: curves}`` where ``curves`` is the ``"curves"``
            dict of ``PerturbationMetric.compute()`` (keys ``positive_predicted``,
            ``negative_predicted`` and, with labels, ``*_target``; values
            ``[acc(0), acc(f1), ...]``) or the whole ``compute()`` result.
        path: the PNG to write.
        fractions: the removed fractions (default 0.1 … 0.9; x = ``[0, *fractions]``).
        variant: ``"predicted"`` or ``"target"``.
    """
    from .metrics.perturbation import DEFAULT_FRACTIONS, auc

    fr = tuple(fractions) if fractions is not None else DEFAULT_FRACTIONS
    x = [0.0, *fr]
    fig = _figure((10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    plotted = 0
    for ax, test, better in ((axes[0], "positive", "lower is better"), (axes[1], "negative", "higher is better")):
        for name, entry in curves_by_method.items():
            curve = _curves_of(entry).get(f"{test}_{variant}")
            if curve is None:
                continue
            y = [float("nan") if v is None else float(v) for v in curve]
            if len(y) != len(x):
                raise ValueError(f"curve {test}_{variant} of {name!r} has {len(y)} points, expected {len(x)}")
            ax.plot(x, y, marker="o", markersize=3, label=f"{name} (AUC {auc(y, fr):.3f})")
            plotted += 1
        ax.set_title(f"{test} perturbation ({better})", fontsize=10)
        ax.set_xlabel("fraction of pixels removed")
        ax.set_xlim(0, max(x))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if test == "positive" else "lower left")
    if not plotted:
        raise ValueError(f"no '{variant}' curves to plot")
    axes[0].set_ylabel(f"accuracy ({'clean prediction' if variant == 'predicted' else 'true label'} kept)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    return p
