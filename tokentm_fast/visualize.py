"""Pictures: heat-map overlays, method x image grids and perturbation curves.

Everything draws with matplotlib's non-interactive Agg backend (no display
needed) and accepts torch tensors or numpy arrays.

* :func:`normalize_map` -- min-max to ``[0, 1]`` (a constant map -> zeros);
* :func:`overlay` -- an image ``(3, H, W)`` in ``[0, 1]`` blended with the
  bilinearly upsampled, normalized map through a colormap -> ``(H, W, 3)``;
* :func:`save_overlay` -- one overlay as a PNG (pixels only);
* :func:`overlay_figure` / :func:`save_overlay_figure` -- one overlay at the
  original image size (the map placed on the region the model saw), with a
  colour bar and the normalisation note (what ``tokentm-fast explain`` writes);
* :func:`grid_figure` / :func:`save_grid` -- rows = images, columns = the
  image + one per method, with a colour bar and the normalisation written on
  the figure;
* :func:`plot_perturbation_curves` -- accuracy vs. fraction of pixels removed
  (positive and negative perturbation tests), one line per method.

Files are written through :mod:`tokentm_fast.evaluation.outputs`: a
symbolic link at the target is refused and the file appears only once it is
complete (temporary file in the same folder, then renamed over the target).

Colours: the default colormap is ``inferno`` (perceptually uniform: equal steps
in relevance look like equal steps in lightness, and it reads in grayscale).
Every map is min-max normalised on its own (:data:`NORMALIZATION_NOTE`), so
colours compare locations within one map, not values across maps. A constant
map (for example all zeros: attention Grad-CAM on an untrained model) has no
ranking to show; it is drawn as one flat colour and a
:class:`ConstantMapWarning` names the method and the image.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .maps import minmax_normalize, upsample_maps

__all__ = [
    "DEFAULT_CMAP", "NORMALIZATION_NOTE", "NOTE_GID", "ConstantMapWarning", "is_constant_map", "normalize_map",
    "overlay", "save_overlay", "overlay_figure", "save_overlay_figure", "grid_figure", "save_grid",
    "plot_perturbation_curves",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Default colormap: perceptually uniform, dark = low relevance, bright = high.
DEFAULT_CMAP = "inferno"
#: How every drawn map is scaled; written on the grid figures.
NORMALIZATION_NOTE = (
    "Each map is min–max normalised on its own: 0 = its lowest value, 1 = its highest "
    "(colours compare locations within a map, not values across maps)."
)


#: The ``gid`` of the normalisation note on the figures: ``fig.findobj(lambda a: a.get_gid() == NOTE_GID)``.
NOTE_GID = "normalization-note"


class ConstantMapWarning(UserWarning):
    """A map to draw is constant (e.g. all zeros): it carries no ranking and is drawn as one flat colour."""


def _figure(figsize):
    """A matplotlib figure drawn by the Agg canvas, without pyplot (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Union[str, os.PathLike], dpi: int, option: Optional[str], what: str,
                 **kwargs: Any) -> Path:
    """``fig.savefig`` into a temporary file renamed over ``path`` (a link at ``path`` is refused)."""
    from .evaluation.outputs import open_output

    p = Path(path)
    fmt = p.suffix.lower().lstrip(".") or "png"
    with open_output(p, option=option, what=what, durable=False) as f:
        fig.savefig(f, format=fmt, dpi=dpi, **kwargs)
    return p


def _text_width(fig, text: str, fontsize: float) -> float:
    from matplotlib.text import Text

    probe = Text(0, 0, text, fontsize=fontsize)
    probe.set_figure(fig)
    return probe.get_window_extent(fig.canvas.get_renderer()).width


@functools.lru_cache(maxsize=None)
def _layout_measures_wrapped_text() -> bool:
    """Whether this matplotlib measures a ``wrap=True`` text wrapped (so layout engines make room for it)."""
    fig = _figure((1.0, 1.0))
    t = fig.text(0.5, 0.5, " ".join(["word"] * 40), ha="center", wrap=True)
    return t.get_window_extent(fig.canvas.get_renderer()).width <= fig.bbox.width + 1


def wrap_to_width(fig, text: str, fontsize: float, max_px: float) -> str:
    """``text`` with line breaks so that every line is at most ``max_px`` display pixels wide in ``fig``.

    Measured with the figure's renderer (the ratio to the figure's width does
    not depend on the dpi it is saved with). Existing line breaks are kept; a
    single word wider than ``max_px`` stays on its own line.
    """
    import textwrap

    out = []
    for para in text.split("\n"):
        if not para or _text_width(fig, para, fontsize) <= max_px:
            out.append(para)
            continue
        lo, hi = 1, len(para)  # the largest line length (in characters) whose lines all fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if max(_text_width(fig, ln, fontsize) for ln in textwrap.wrap(para, mid)) <= max_px:
                lo = mid
            else:
                hi = mid - 1
        out.append("\n".join(textwrap.wrap(para, lo)))
    return "\n".join(out)


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def normalize_map(m: ArrayLike) -> np.ndarray:
    """Min-max normalize ``m`` (any shape) to ``[0, 1]`` as float32; constant (or empty) -> zeros.

    Non-finite entries are ignored for the min / max and become 0.
    """
    a = torch.from_numpy(np.ascontiguousarray(_np(m)))
    finite = torch.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.float32)
    filled = torch.where(finite, a, a[finite].min())     # non-finite entries take the minimum: 0 after
    return minmax_normalize(filled.reshape(1, -1)).reshape(a.shape).clamp(0.0, 1.0).numpy()


def is_constant_map(m: ArrayLike) -> bool:
    """True when ``m`` has no two different finite values (all equal, all non-finite, or empty)."""
    a = _np(m)
    finite = a[np.isfinite(a)]
    return finite.size == 0 or bool(finite.max() == finite.min())


def _constant_value(m: ArrayLike) -> str:
    a = _np(m)
    finite = a[np.isfinite(a)]
    return "no finite value" if finite.size == 0 else f"every value {float(finite.flat[0]):g}"


def _warn_constant(method: Optional[str], images: Sequence[str], example: str, total: int) -> None:
    who = f"{method}: " if method else ""
    if len(images) == 1 and total == 1:
        what = f"the map of {images[0]} is constant"
    else:
        what = f"{len(images)} of {total} maps are constant ({', '.join(images)})"
    warnings.warn(
        f"{who}{what} ({example}); it has no ranking to show and is drawn as one flat colour. The method found "
        f"no positive relevance there (attention Grad-CAM, for one, clips negative evidence to 0 and is often "
        f"all zeros on an untrained model).",
        ConstantMapWarning,
        stacklevel=3,
    )


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
    return upsample_maps(a[None], size)[0].numpy()


def overlay(image: ArrayLike, m: ArrayLike, cmap: str = DEFAULT_CMAP, alpha: float = 0.5) -> np.ndarray:
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


def save_overlay(image: ArrayLike, m: ArrayLike, path: Union[str, os.PathLike], cmap: str = DEFAULT_CMAP,
                 alpha: float = 0.5, min_side: int = 224, method: Optional[str] = None,
                 image_name: Optional[str] = None, option: Optional[str] = None) -> Path:
    """Write the overlay of ``m`` on ``image`` as a PNG (small images are enlarged to ``min_side``).

    The map is min-max normalised (:data:`NORMALIZATION_NOTE`). A constant map
    raises a :class:`ConstantMapWarning` naming ``method`` and ``image_name``
    (default: the file name of ``path``). A symbolic link at ``path`` is
    refused (the error names ``option``). :func:`save_overlay_figure` adds a
    colour bar and the note.
    """
    import io

    from .evaluation.outputs import write_bytes

    from PIL import Image

    if is_constant_map(m):
        _warn_constant(method, [repr(image_name if image_name is not None else Path(path).name)],
                       _constant_value(m), 1)
    img = _np(image)
    scale = _display_scale(img.shape[-2], img.shape[-1], min_side)
    ov = overlay(_enlarge(img, scale), m, cmap=cmap, alpha=alpha)
    buf = io.BytesIO()
    Image.fromarray(np.round(ov * 255).astype(np.uint8)).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue(), option=option, what="overlay", durable=False)


def _place_map(m: ArrayLike, height: int, width: int, box) -> "tuple[np.ndarray, np.ndarray]":
    """The map upsampled onto ``box`` (x0, y0, x1, y1) of a ``height x width`` picture: ``(heat, inside)``.

    ``heat`` is the min-max normalised map (0 outside the box), ``inside`` the
    bool mask of the pixels the box covers.
    """
    x0, y0, x1, y1 = box
    bw, bh = max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))
    up = normalize_map(_upsample(m, (bh, bw)))
    heat = np.zeros((height, width), np.float32)
    inside = np.zeros((height, width), bool)
    top, left = int(round(y0)), int(round(x0))
    ys, xs = slice(max(0, top), min(height, top + bh)), slice(max(0, left), min(width, left + bw))
    if ys.start < ys.stop and xs.start < xs.stop:
        heat[ys, xs] = up[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left]
        inside[ys, xs] = True
    return heat, inside


def overlay_figure(image: ArrayLike, m: ArrayLike, box=None, cmap: str = DEFAULT_CMAP, alpha: float = 0.5,
                   title: Optional[str] = None, min_side: int = 224, max_side: int = 4096, dpi: int = 100):
    """One overlay at the image's own size, with a colour bar and the normalisation note (a ``Figure``).

    Args:
        image: the original picture ``(3, H, W)`` in ``[0, 1]`` (any size).
        m: the map ``(gh, gw)`` of the model's input.
        box: ``(x0, y0, x1, y1)``, where the model's input lies in ``image``
            (``Preprocess.plan(...)["box"]``): the map is upsampled (bilinear) onto
            that region; outside it (cut off by a centre crop) the picture is dimmed
            and a dashed frame marks the region. ``None``: the whole picture.
        min_side, max_side: small pictures are enlarged by an integer factor (nearest)
            until their shorter side reaches ``min_side``, never beyond ``max_side``.

    The picture is drawn pixel for pixel (one figure pixel per image pixel at
    ``dpi``); the note is wrapped to the figure's width.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {cmap!r}")
    img = _np(image)
    if img.ndim != 3:
        raise ValueError(f"image must be (3, H, W), got shape {img.shape}")
    H, W = img.shape[-2:]
    scale = max(1, min(_display_scale(H, W, min_side), max_side // max(H, W)))
    big = _image_hwc(_enlarge(img, scale))
    hd, wd = big.shape[:2]
    full = (0.0, 0.0, float(W), float(H))
    b = full if box is None else tuple(float(v) for v in box)
    heat, inside = _place_map(m, hd, wd, tuple(v * scale for v in b))
    colors = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    picture = np.where(inside[..., None], (1.0 - alpha) * big + alpha * colors, 0.35 * big + 0.65 * 0.5)
    picture = np.clip(picture, 0.0, 1.0)

    margin, bar, bar_labels = 8, 14, 62
    fig_w = wd + bar + bar_labels + 3 * margin
    fig = _figure((fig_w / dpi, 1.0))
    fig.set_dpi(dpi)
    cropped = box is not None and (b[0] > 0.5 or b[1] > 0.5 or b[2] < W - 0.5 or b[3] < H - 0.5)
    note = f"{NORMALIZATION_NOTE} Overlay: {1 - alpha:.2g} × image + {alpha:.2g} × colour ({cmap})."
    if cropped:
        note += (" Outside the dashed frame (dimmed): cut off by the centre crop, not seen by the model "
                 "(--resize: the whole image).")
    note = wrap_to_width(fig, note, 7, fig_w - 2 * margin)
    note_h = _text_height(fig, note, 7)
    title_h = 0.0
    if title:
        title = wrap_to_width(fig, title, 9, fig_w - 2 * margin)
        title_h = _text_height(fig, title, 9) + margin
    fig_h = hd + note_h + title_h + 3 * margin
    fig.set_size_inches(fig_w / dpi, fig_h / dpi)
    bottom = note_h + 2 * margin
    ax = fig.add_axes((margin / fig_w, bottom / fig_h, wd / fig_w, hd / fig_h))
    ax.imshow(picture, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    if cropped:
        x0, y0, x1, y1 = (v * scale for v in b)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                               linestyle="--", linewidth=1.0))
        ax.set_xlim(-0.5, wd - 0.5)
        ax.set_ylim(hd - 0.5, -0.5)
    cax = fig.add_axes(((2 * margin + wd) / fig_w, bottom / fig_h, bar / fig_w, hd / fig_h))
    cbar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
    cbar.set_ticks([0.0, 0.5, 1.0], labels=["0 map min", "0.5", "1 map max"])
    cbar.ax.tick_params(labelsize=7)
    fig.text(0.5, margin / fig_h, note, ha="center", va="bottom", fontsize=7, gid=NOTE_GID)
    if title:
        fig.text(0.5, 1.0 - margin / fig_h, title, ha="center", va="top", fontsize=9)
    return fig


def _text_height(fig, text: str, fontsize: float) -> float:
    from matplotlib.text import Text

    probe = Text(0, 0, text, fontsize=fontsize)
    probe.set_figure(fig)
    return probe.get_window_extent(fig.canvas.get_renderer()).height


def save_overlay_figure(image: ArrayLike, m: ArrayLike, path: Union[str, os.PathLike], box=None,
                        cmap: str = DEFAULT_CMAP, alpha: float = 0.5, title: Optional[str] = None,
                        min_side: int = 224, max_side: int = 4096, dpi: int = 100, method: Optional[str] = None,
                        image_name: Optional[str] = None, option: Optional[str] = None) -> Path:
    """Write :func:`overlay_figure` to ``path`` (the suffix picks the format; a link there is refused).

    A constant map raises a :class:`ConstantMapWarning` naming ``method`` and ``image_name``.
    """
    if is_constant_map(m):
        _warn_constant(method, [repr(image_name if image_name is not None else Path(path).name)],
                       _constant_value(m), 1)
    fig = overlay_figure(image, m, box=box, cmap=cmap, alpha=alpha, title=title, min_side=min_side,
                         max_side=max_side, dpi=dpi)
    return _save_figure(fig, path, dpi, option, "overlay")


def grid_figure(
    images: ArrayLike,
    maps_by_method: Mapping[str, ArrayLike],
    titles: Optional[Sequence[str]] = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    cell_inches: float = 1.9,
    image_title: str = "image",
    masks: Optional[ArrayLike] = None,
    image_names: Optional[Sequence[str]] = None,
):
    """The grid as a matplotlib ``Figure`` (see :func:`save_grid` for the arguments).

    Besides the cells the figure holds a colour bar (normalised relevance 0 to 1
    in ``cmap``) and, below the cells, the normalisation (:data:`NORMALIZATION_NOTE`)
    with the overlay opacity. Constant maps raise one :class:`ConstantMapWarning`
    per method, naming the images (``image_names``, else the first line of
    ``titles``, else ``image <i>``).
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
    if image_names is not None and len(image_names) != b:
        raise ValueError(f"{len(image_names)} image names for {b} images")
    if masks is not None:
        masks = _np(masks)
        if masks.shape != (b, *imgs.shape[-2:]):
            raise ValueError(f"masks must be (B, H, W) = {(b, *imgs.shape[-2:])}, got {masks.shape}")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {cmap!r}")
    if image_names is None:
        image_names = ([str(t).split("\n")[0] for t in titles] if titles is not None
                       else [f"image {i}" for i in range(b)])
    for name in methods:
        const = [i for i in range(b) if is_constant_map(maps_by_method[name][i])]
        if const:
            _warn_constant(name, [repr(str(image_names[i])) for i in const],
                           _constant_value(maps_by_method[name][const[0]]), b)

    scale = _display_scale(imgs.shape[-2], imgs.shape[-1], 160)
    ncols = 1 + len(methods)
    fig = _figure((cell_inches * ncols + 0.9, cell_inches * b + 0.75))
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
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
            if is_constant_map(maps_by_method[name][i]):
                axes[i, j].text(0.5, 0.5, "constant map\n(no ranking)", transform=axes[i, j].transAxes,
                                ha="center", va="center", fontsize=7, color="white",
                                bbox=dict(boxstyle="round", facecolor="black", alpha=0.6, linewidth=0))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[i, 0].set_ylabel(str(titles[i]), fontsize=8)
    for j, name in enumerate([image_title] + methods):
        axes[0, j].set_title(name, fontsize=10)
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    cbar = fig.colorbar(mappable, ax=axes, location="right", shrink=min(1.0, 0.5 + 0.25 * b), aspect=25, pad=0.01)
    cbar.set_label("normalised relevance", fontsize=8)
    cbar.set_ticks([0.0, 0.5, 1.0], labels=["0\nmap min", "0.5", "1\nmap max"])
    cbar.ax.tick_params(labelsize=7)
    note = f"{NORMALIZATION_NOTE}\nOverlay: {1 - alpha:.2g} × image + {alpha:.2g} × colour ({cmap})."
    # wrapped to the figure's width: a grid of a few columns is narrower than the sentence. Where matplotlib
    # measures wrapped text (its layout engine then reserves the wrapped height) it wraps at draw time and the
    # text stays one string; elsewhere the line breaks are put in here.
    if _layout_measures_wrapped_text():
        fig.supxlabel(note, fontsize=7, gid=NOTE_GID, wrap=True)
    else:  # pragma: no cover - older matplotlib
        fig.supxlabel(wrap_to_width(fig, note, 7, 0.96 * fig.bbox.width), fontsize=7, gid=NOTE_GID)
    return fig


def save_grid(
    images: ArrayLike,
    maps_by_method: Mapping[str, ArrayLike],
    path: Union[str, os.PathLike],
    titles: Optional[Sequence[str]] = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    cell_inches: float = 1.9,
    dpi: int = 110,
    image_title: str = "image",
    masks: Optional[ArrayLike] = None,
    image_names: Optional[Sequence[str]] = None,
    option: Optional[str] = None,
) -> Path:
    """Save a grid: rows = images, columns = the image itself + one overlay per method.

    Every map is min-max normalised on its own; the figure carries a colour bar
    and states that normalisation. Constant maps raise a :class:`ConstantMapWarning`.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps_by_method: ``{method name: maps (B, gh, gw)}``, columns in dict order.
        path: the image file to write (folders are created); its suffix picks the format (png, pdf, svg...).
        titles: optional row labels (one per image), e.g. ``"circle (pred circle)"``.
        masks: optional ``(B, H, W)`` ground-truth masks, outlined in white on the image column.
        image_names: how warnings name the images (default: first line of each title).
        option: the command-line option of ``path``, named in errors (a symbolic link
            at ``path`` is refused, see :mod:`tokentm_fast.evaluation.outputs`).
    """
    fig = grid_figure(images, maps_by_method, titles=titles, cmap=cmap, alpha=alpha, cell_inches=cell_inches,
                      image_title=image_title, masks=masks, image_names=image_names)
    return _save_figure(fig, path, dpi, option, "grid")


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
    option: Optional[str] = None,
) -> Path:
    """Accuracy vs. fraction of pixels removed, positive and negative tests, one line per method.

    Args:
        curves_by_method: ``{method: curves}`` where ``curves`` is the ``"curves"``
            dict of ``PerturbationMetric.compute()`` (keys ``positive_predicted``,
            ``negative_predicted`` and, with labels, ``*_target``; values
            ``[acc(0), acc(f1), ...]``) or the whole ``compute()`` result.
        path: the PNG to write (a symbolic link there is refused; ``option`` is named in errors).
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
    return _save_figure(fig, path, dpi, option, "curves plot")
