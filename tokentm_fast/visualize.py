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
ranking to show; it is drawn without heat (the image alone) and a
:class:`ConstantMapWarning` names the method and the image.

Signed maps (the methods whose registry entry has ``signed=True``: ``lrp``,
``attcat``, ``conservative_lrp``) are not min-max normalised: min-max would put
their zero somewhere in the middle of a one-sided colormap, where nothing marks
it. They are divided by their largest ``|value|`` (symmetric limits, -1 ... 1)
and drawn with the diverging :data:`SIGNED_CMAP`, whose centre (value 0) is a
neutral grey: one colour for evidence for the target, another against it
(:data:`SIGNED_NOTE`).

Blending: the colour is laid over the image with a per-pixel opacity taken from
the map, ``alpha * relevance`` (``alpha * |relevance|`` for signed maps, both
scaled to [0, 1] as above; ``alpha`` = :data:`DEFAULT_ALPHA` by default, the
opacity at the most relevant pixel), not a uniform 50/50 blend. Where nothing is
relevant the image shows unchanged, so a red object is not mistaken for a hot
region and the low end of the colormap does not darken the picture; the heat
covers the image only where the map is high. (Chosen over a map beside the
image: the grid already has the image alone as its first column, and a map on
the image keeps every region's relevance on the region itself.)

Perturbation curves: each method has its own colour and marker, the same in
every plot (:func:`curve_style`), and the legend lies outside the axes.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Collection, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .maps import ConstantMapWarning, minmax_normalize, upsample_maps  # one warning class for maps and pictures

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_CMAP", "SIGNED_CMAP", "NORMALIZATION_NOTE", "SIGNED_NOTE", "NOTE_GID", "CURVE_COLORS",
    "ConstantMapWarning", "is_constant_map", "is_signed_method", "normalize_map", "signed_scale", "map_colors",
    "overlay", "save_overlay", "overlay_figure", "save_overlay_figure", "grid_figure", "save_grid", "curve_style",
    "perturbation_curves_figure", "plot_perturbation_curves",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Default colormap: perceptually uniform, dark = low relevance, bright = high.
DEFAULT_CMAP = "inferno"
#: How every drawn map is scaled; written on the grid figures.
NORMALIZATION_NOTE = (
    "Each map is min–max normalised on its own: 0 = its lowest value, 1 = its highest "
    "(colours compare locations within a map, not values across maps)."
)


#: The heat's opacity where the map is most relevant (blended by relevance: 0 where nothing is).
DEFAULT_ALPHA = 0.8
#: Colormap of signed maps: diverging (ColorBrewer RdBu, reversed: red = positive), its centre a neutral grey.
SIGNED_CMAP = "RdBu_r"
#: How signed maps are scaled; ``{methods}`` is filled with the signed columns of a figure.
SIGNED_NOTE = (
    "Signed maps ({methods}): divided by their largest |value| (−1 … 1), not min–max normalised; 0 = no "
    "relevance (the neutral centre of the diverging colour map), + = evidence for the target, − = against it."
)


#: The ``gid`` of the normalisation note on the figures: ``fig.findobj(lambda a: a.get_gid() == NOTE_GID)``.
NOTE_GID = "normalization-note"




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


def signed_scale(m: ArrayLike) -> np.ndarray:
    """``m / max|m|`` (any shape) in ``[-1, 1]`` as float32: 0 stays 0, ``v`` and ``-v`` stay mirrored.

    The scaling of signed maps (symmetric limits, no shift). Non-finite entries
    become 0; a map without a non-zero finite value gives zeros.
    """
    a = _np(m)
    a = np.where(np.isfinite(a), a, 0.0).astype(np.float32)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if peak == 0.0:
        return np.zeros(a.shape, dtype=np.float32)
    return np.clip(a / peak, -1.0, 1.0).astype(np.float32)


def is_signed_method(method: Optional[str]) -> bool:
    """Whether ``method``'s maps are signed (its registry entry's ``signed``); unknown names and None: False."""
    from .methods import REGISTRY

    spec = REGISTRY.get(method) if isinstance(method, str) else None
    return bool(spec is not None and spec.signed)


def _signed_flag(method: Optional[str], signed: Optional[bool]) -> bool:
    """``signed`` if given, else the registry's flag of ``method``."""
    if signed is None:
        return is_signed_method(method)
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be True, False or None, got {signed!r}")
    return bool(signed)


def _colormap(name: str, signed: bool):
    """The matplotlib colormap ``name`` (``ValueError`` if unknown); signed: resampled to an odd number of
    colours, so that 0.5 (a map value of 0) falls on the centre colour and ``0.5 ± t`` on mirrored entries."""
    import matplotlib

    if not isinstance(name, str) or name not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {name!r}")
    cm = matplotlib.colormaps[name]
    return cm.resampled(255) if signed else cm


def map_colors(m: ArrayLike, signed: bool = False, cmap: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The colours and the opacity weights of a map, as the pictures draw it: ``(colors (..., 3), weight (...))``.

    One-sided (``signed=False``): ``v`` = :func:`normalize_map` (min-max to ``[0, 1]``),
    colour ``cmap(v)``, weight ``v``. Signed: ``s`` = :func:`signed_scale` (``m / max|m|``),
    colour ``cmap(0.5 + s / 2)`` (value 0 on the colormap's centre, ``±v`` on mirrored
    colours), weight ``|s|``. A constant map gets weight 0 everywhere (it has no ranking
    to show). ``cmap`` defaults to :data:`DEFAULT_CMAP` / :data:`SIGNED_CMAP`.
    """
    cm = _colormap(cmap if cmap is not None else (SIGNED_CMAP if signed else DEFAULT_CMAP), signed)
    if signed:
        s = signed_scale(m)
        pos, weight = 0.5 + 0.5 * s, np.abs(s)
    else:
        pos = normalize_map(m)
        weight = pos
    colors = cm(pos)[..., :3].astype(np.float32)
    if is_constant_map(m):
        weight = np.zeros_like(weight)
    return colors, weight.astype(np.float32)


def _blend(img: np.ndarray, colors: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - a) * img + a * colors`` with the per-pixel opacity ``a = alpha * weight``."""
    a = float(alpha) * weight[..., None]
    return np.clip((1.0 - a) * img + a * colors, 0.0, 1.0).astype(np.float32)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


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
        f"{who}{what} ({example}); it has no ranking to show and is drawn without heat (the image alone). The "
        f"method found "
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


def overlay(image: ArrayLike, m: ArrayLike, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
            method: Optional[str] = None, signed: Optional[bool] = None,
            signed_cmap: str = SIGNED_CMAP) -> np.ndarray:
    """Blend ``image (3, H, W)`` in ``[0, 1]`` with the heat map of ``m (gh, gw)``.

    The map is upsampled bilinearly (``align_corners=False``, as the metrics do)
    to ``(H, W)`` and coloured by :func:`map_colors`: min-max normalised through
    ``cmap``, or, for a signed map, divided by ``max|m|`` through the diverging
    ``signed_cmap`` (0 on its neutral centre). ``signed=None`` takes the flag of
    ``method``'s registry entry (False for no method or an unknown name).

    The colour is laid over the image with the per-pixel opacity ``alpha * w``,
    ``w`` the map's weight in ``[0, 1]`` (the normalised value; ``|m| / max|m|``
    for a signed map): ``(1 - alpha * w) * image + alpha * w * colour``, an
    ``(H, W, 3)`` float32 array in ``[0, 1]``. Where the map is 0 (signed) or at
    its minimum (one-sided) the image shows unchanged, so only relevant regions
    are tinted (see the module's note on blending).
    """
    _check_alpha(alpha)
    is_signed = _signed_flag(method, signed)
    img = _image_hwc(image)
    colors, weight = map_colors(_upsample(m, img.shape[:2]), is_signed, signed_cmap if is_signed else cmap)
    return _blend(img, colors, weight, alpha)


def _display_scale(h: int, w: int, min_side: int) -> int:
    return max(1, int(math.ceil(min_side / max(1, min(h, w)))))


def _enlarge(image: ArrayLike, scale: int) -> torch.Tensor:
    """Upscale ``(3, H, W)`` by an integer factor (nearest: crisp pixels for small inputs)."""
    x = torch.as_tensor(_np(image))
    if scale == 1:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]


def save_overlay(image: ArrayLike, m: ArrayLike, path: Union[str, os.PathLike], cmap: str = DEFAULT_CMAP,
                 alpha: float = DEFAULT_ALPHA, min_side: int = 224, method: Optional[str] = None,
                 image_name: Optional[str] = None, option: Optional[str] = None, signed: Optional[bool] = None,
                 signed_cmap: str = SIGNED_CMAP) -> Path:
    """Write the overlay of ``m`` on ``image`` as a PNG (small images are enlarged to ``min_side``).

    The map is min-max normalised (:data:`NORMALIZATION_NOTE`), or scaled by
    ``max|m|`` through ``signed_cmap`` when ``method`` is signed (or ``signed``
    says so; :func:`overlay`). A constant map raises a :class:`ConstantMapWarning`
    naming ``method`` and ``image_name`` (default: the file name of ``path``). A
    symbolic link at ``path`` is refused (the error names ``option``).
    :func:`save_overlay_figure` adds a colour bar and the note.
    """
    import io

    from PIL import Image

    from .evaluation.outputs import write_bytes

    if is_constant_map(m):
        _warn_constant(method, [repr(image_name if image_name is not None else Path(path).name)],
                       _constant_value(m), 1)
    img = _np(image)
    scale = _display_scale(img.shape[-2], img.shape[-1], min_side)
    ov = overlay(_enlarge(img, scale), m, cmap=cmap, alpha=alpha, method=method, signed=signed,
                 signed_cmap=signed_cmap)
    buf = io.BytesIO()
    Image.fromarray(np.round(ov * 255).astype(np.uint8)).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue(), option=option, what="overlay", durable=False)


def _place_map(m: ArrayLike, height: int, width: int, box, signed: bool,
               cmap: str) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """The map upsampled onto ``box`` (x0, y0, x1, y1) of a ``height x width`` picture and coloured there
    (:func:`map_colors`, scaled over the box): ``(colors (h, w, 3), weight (h, w), inside (h, w))``.

    Outside the box the weight is 0; ``inside`` is the bool mask of the pixels the box covers.
    """
    x0, y0, x1, y1 = box
    bw, bh = max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))
    up_colors, up_weight = map_colors(_upsample(m, (bh, bw)), signed, cmap)
    colors = np.zeros((height, width, 3), np.float32)
    weight = np.zeros((height, width), np.float32)
    inside = np.zeros((height, width), bool)
    top, left = int(round(y0)), int(round(x0))
    ys, xs = slice(max(0, top), min(height, top + bh)), slice(max(0, left), min(width, left + bw))
    if ys.start < ys.stop and xs.start < xs.stop:
        src = (slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left))
        colors[ys, xs] = up_colors[src]
        weight[ys, xs] = up_weight[src]
        inside[ys, xs] = True
    return colors, weight, inside


def _scale_note(signed_methods: Sequence[str], any_one_sided: bool) -> str:
    """The normalisation sentence(s) of a figure: the min-max note, the signed note, or both."""
    parts = [NORMALIZATION_NOTE] if any_one_sided or not signed_methods else []
    if signed_methods:
        parts.append(SIGNED_NOTE.format(methods=", ".join(signed_methods)))
    return " ".join(parts)


def _blend_note(alpha: float, cmap: Optional[str], signed_cmap: Optional[str]) -> str:
    """How the overlay is blended (``cmap`` / ``signed_cmap``: the colormaps in use, None if unused)."""
    maps = " / ".join(c for c in (cmap, signed_cmap) if c)
    weight = {(True, False): "relevance", (False, True): "|relevance|",
              (True, True): "relevance (|relevance| if signed)"}[(cmap is not None, signed_cmap is not None)]
    return (f"Overlay: colour ({maps}) over the image with opacity {alpha:.2g} × {weight}; "
            f"where nothing is relevant the image shows unchanged.")


_SIGNED_TICKS = (-1.0, 0.0, 1.0)
_SIGNED_LABELS = ("−max|map|", "0", "+max|map|")


def overlay_figure(image: ArrayLike, m: ArrayLike, box=None, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
                   title: Optional[str] = None, min_side: int = 224, max_side: int = 4096, dpi: int = 100,
                   method: Optional[str] = None, signed: Optional[bool] = None, signed_cmap: str = SIGNED_CMAP):
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
        method, signed, signed_cmap: a signed map (``signed``, or by default
            ``method``'s registry flag) is drawn with the diverging ``signed_cmap``
            centred at 0 and a colour bar from −max|map| to +max|map| (:func:`overlay`).

    The picture is drawn pixel for pixel (one figure pixel per image pixel at
    ``dpi``), blended by relevance as :func:`overlay`; the note is wrapped to the figure's width.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    _check_alpha(alpha)
    is_signed = _signed_flag(method, signed)
    used = signed_cmap if is_signed else cmap
    cm = _colormap(used, is_signed)
    img = _np(image)
    if img.ndim != 3:
        raise ValueError(f"image must be (3, H, W), got shape {img.shape}")
    H, W = img.shape[-2:]
    scale = max(1, min(_display_scale(H, W, min_side), max_side // max(H, W)))
    big = _image_hwc(_enlarge(img, scale))
    hd, wd = big.shape[:2]
    full = (0.0, 0.0, float(W), float(H))
    b = full if box is None else tuple(float(v) for v in box)
    colors, weight, inside = _place_map(m, hd, wd, tuple(v * scale for v in b), is_signed, used)
    picture = np.where(inside[..., None], _blend(big, colors, weight, alpha), 0.35 * big + 0.65 * 0.5)
    picture = np.clip(picture, 0.0, 1.0)

    margin, bar, bar_labels = 8, 14, 62
    if is_signed:  # room for the longer tick labels
        bar_labels = max(bar_labels, 20 + max(_text_width(_figure((1.0, 1.0)), t, 7) * dpi / 100
                                              for t in _SIGNED_LABELS))
    fig_w = wd + bar + bar_labels + 3 * margin
    fig = _figure((fig_w / dpi, 1.0))
    fig.set_dpi(dpi)
    cropped = box is not None and (b[0] > 0.5 or b[1] > 0.5 or b[2] < W - 0.5 or b[3] < H - 0.5)
    note = _scale_note([method or "this map"] if is_signed else [], not is_signed)
    note += " " + _blend_note(alpha, None if is_signed else cmap, signed_cmap if is_signed else None)
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
    if is_signed:
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=cm), cax=cax)
        cbar.set_ticks(_SIGNED_TICKS, labels=list(_SIGNED_LABELS))
    else:
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cm), cax=cax)
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
                        cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, title: Optional[str] = None,
                        min_side: int = 224, max_side: int = 4096, dpi: int = 100, method: Optional[str] = None,
                        image_name: Optional[str] = None, option: Optional[str] = None,
                        signed: Optional[bool] = None, signed_cmap: str = SIGNED_CMAP) -> Path:
    """Write :func:`overlay_figure` to ``path`` (the suffix picks the format; a link there is refused).

    ``method`` picks the colour scale (signed methods: diverging, centred at 0) and names the map in
    warnings: a constant map raises a :class:`ConstantMapWarning` naming ``method`` and ``image_name``.
    """
    if is_constant_map(m):
        _warn_constant(method, [repr(image_name if image_name is not None else Path(path).name)],
                       _constant_value(m), 1)
    fig = overlay_figure(image, m, box=box, cmap=cmap, alpha=alpha, title=title, min_side=min_side,
                         max_side=max_side, dpi=dpi, method=method, signed=signed, signed_cmap=signed_cmap)
    return _save_figure(fig, path, dpi, option, "overlay")


def _signed_columns(methods: Sequence[str], signed: Optional[Collection[str]]) -> Dict[str, bool]:
    """Per column: drawn signed? ``signed`` names the signed columns; None: each method's registry flag."""
    if signed is None:
        return {name: is_signed_method(name) for name in methods}
    if isinstance(signed, str):
        raise TypeError(f"signed must be a collection of column names, not the string {signed!r}")
    unknown = sorted(set(signed) - set(methods))
    if unknown:
        raise ValueError(f"signed names {unknown} that are not columns of the grid ({list(methods)})")
    return {name: name in signed for name in methods}


def grid_figure(
    images: ArrayLike,
    maps_by_method: Mapping[str, ArrayLike],
    titles: Optional[Sequence[str]] = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    cell_inches: float = 1.9,
    image_title: str = "image",
    masks: Optional[ArrayLike] = None,
    image_names: Optional[Sequence[str]] = None,
    signed: Optional[Collection[str]] = None,
    signed_cmap: str = SIGNED_CMAP,
):
    """The grid as a matplotlib ``Figure`` (see :func:`save_grid` for the arguments).

    Besides the cells the figure holds a colour bar (normalised relevance 0 to 1
    in ``cmap``) and, below the cells, the normalisation (:data:`NORMALIZATION_NOTE`)
    with the overlay opacity. Signed columns (methods whose registry entry is
    ``signed``, or the names in ``signed``) are drawn with the diverging
    ``signed_cmap`` centred at 0 and get their own colour bar (−1 to 1 of
    max|map|) and :data:`SIGNED_NOTE`; a grid of signed columns only has that bar
    alone. Constant maps raise one :class:`ConstantMapWarning` per method, naming
    the images (``image_names``, else the first line of ``titles``, else ``image <i>``).
    """
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
    _check_alpha(alpha)
    is_signed = _signed_columns(methods, signed)
    signed_methods = [name for name in methods if is_signed[name]]
    one_sided = not signed_methods or len(signed_methods) < len(methods)
    cm, signed_cm = _colormap(cmap, False), _colormap(signed_cmap, True)
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
    bars = int(one_sided) + int(bool(signed_methods))
    fig = _figure((cell_inches * ncols + 0.9 * bars, cell_inches * b + 0.75))
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    axes = fig.subplots(b, ncols, squeeze=False)
    for i in range(b):
        big = _enlarge(imgs[i], scale)
        axes[i, 0].imshow(_image_hwc(big), interpolation="nearest")
        if masks is not None and masks[i].any() and not masks[i].all():
            mk = np.kron(masks[i] > 0.5, np.ones((scale, scale))).astype(np.float32)
            axes[i, 0].contour(mk, levels=[0.5], colors="white", linewidths=0.9)
        for j, name in enumerate(methods, start=1):
            axes[i, j].imshow(overlay(big, maps_by_method[name][i], cmap=cmap, alpha=alpha, signed=is_signed[name],
                                      signed_cmap=signed_cmap), interpolation="nearest")
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
    shrink = min(1.0, 0.5 + 0.25 * b)
    if one_sided:
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cm), ax=axes, location="right",
                            shrink=shrink, aspect=25, pad=0.01)
        cbar.set_label("normalised relevance", fontsize=8)
        cbar.set_ticks([0.0, 0.5, 1.0], labels=["0\nmap min", "0.5", "1\nmap max"])
        cbar.ax.tick_params(labelsize=7)
    if signed_methods:
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=signed_cm), ax=axes, location="right",
                            shrink=shrink, aspect=25, pad=0.01)
        cbar.set_label("signed relevance / max|map|", fontsize=8)
        cbar.set_ticks(_SIGNED_TICKS, labels=["−1\n−max|map|", "0", "+1\n+max|map|"])
        cbar.ax.tick_params(labelsize=7)
    note = (f"{_scale_note(signed_methods, one_sided)}\n"
            f"{_blend_note(alpha, cmap if one_sided else None, signed_cmap if signed_methods else None)}")
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
    alpha: float = DEFAULT_ALPHA,
    cell_inches: float = 1.9,
    dpi: int = 110,
    image_title: str = "image",
    masks: Optional[ArrayLike] = None,
    image_names: Optional[Sequence[str]] = None,
    option: Optional[str] = None,
    signed: Optional[Collection[str]] = None,
    signed_cmap: str = SIGNED_CMAP,
) -> Path:
    """Save a grid: rows = images, columns = the image itself + one overlay per method.

    Every map is min-max normalised on its own, except signed methods' maps
    (divided by their max|map|, diverging ``signed_cmap`` centred at 0); the
    figure carries a colour bar per scale and states the normalisation. Each
    overlay is blended by relevance (:func:`overlay`). Constant maps raise a
    :class:`ConstantMapWarning`.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps_by_method: ``{method name: maps (B, gh, gw)}``, columns in dict order.
        path: the image file to write (folders are created); its suffix picks the format (png, pdf, svg...).
        titles: optional row labels (one per image), e.g. ``"circle (pred circle)"``.
        masks: optional ``(B, H, W)`` ground-truth masks, outlined in white on the image column.
        image_names: how warnings name the images (default: first line of each title).
        option: the command-line option of ``path``, named in errors (a symbolic link
            at ``path`` is refused, see :mod:`tokentm_fast.evaluation.outputs`).
        signed: the columns drawn as signed maps (default: the methods whose registry entry is signed).
        signed_cmap: the diverging colormap of the signed columns.
    """
    fig = grid_figure(images, maps_by_method, titles=titles, cmap=cmap, alpha=alpha, cell_inches=cell_inches,
                      image_title=image_title, masks=masks, image_names=image_names, signed=signed,
                      signed_cmap=signed_cmap)
    return _save_figure(fig, path, dpi, option, "grid")


def _curves_of(entry: Mapping[str, Any]) -> Mapping[str, Sequence[float]]:
    """Accept either a ``curves`` dict or a whole ``PerturbationMetric.compute()`` result."""
    if "curves" in entry and isinstance(entry["curves"], Mapping):
        return entry["curves"]
    return entry


#: The curve colours: matplotlib's ten ``tab10`` colours and black, eleven distinct hues.
CURVE_COLORS: Tuple[str, ...] = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                                 "#7f7f7f", "#bcbd22", "#17becf", "#000000")
_CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
_CURVE_STYLES = ("-", "--", ":", "-.")


def curve_style(name: str) -> Dict[str, Any]:
    """The line style of method ``name`` in every curves plot: ``{"color", "linestyle", "marker"}``.

    The registry's methods take colour k of :data:`CURVE_COLORS` (k = their
    position in ``tokentm_fast.METHODS``; all eleven solid, each its own colour
    and marker); past the palette a method goes on with the next line style.
    Any other name gets a dashed, dotted or dash-dotted style from a hash of the
    name (stable across runs; two such names may share a style).
    """
    from .methods import METHODS

    if name in METHODS:
        k = METHODS.index(name)
    else:
        n = len(CURVE_COLORS)
        k = n + zlib.crc32(str(name).encode("utf-8")) % (n * (len(_CURVE_STYLES) - 1))
    n = len(CURVE_COLORS)
    return {"color": CURVE_COLORS[k % n], "linestyle": _CURVE_STYLES[(k // n) % len(_CURVE_STYLES)],
            "marker": _CURVE_MARKERS[k % len(_CURVE_MARKERS)]}


def perturbation_curves_figure(
    curves_by_method: Mapping[str, Mapping[str, Any]],
    fractions: Optional[Sequence[float]] = None,
    variant: str = "predicted",
    title: Optional[str] = None,
):
    """The figure of :func:`plot_perturbation_curves` (a ``Figure``; see there for the arguments).

    Two panels (positive, negative test) share one legend to their right,
    outside the axes: one entry per method with both areas under the curves.
    """
    from .metrics.perturbation import DEFAULT_FRACTIONS, auc

    if variant not in ("predicted", "target"):
        raise ValueError(f"variant must be 'predicted' or 'target', got {variant!r}")
    fr = tuple(fractions) if fractions is not None else DEFAULT_FRACTIONS
    x = [0.0, *fr]
    fig = _figure((12.5, 4.2))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 2, sharey=True)
    handles, labels = [], []
    for name, entry in curves_by_method.items():
        aucs, line = [], None
        for ax, test in ((axes[0], "positive"), (axes[1], "negative")):
            curve = _curves_of(entry).get(f"{test}_{variant}")
            if curve is None:
                continue
            y = [float("nan") if v is None else float(v) for v in curve]
            if len(y) != len(x):
                raise ValueError(f"curve {test}_{variant} of {name!r} has {len(y)} points, expected {len(x)}")
            line = ax.plot(x, y, markersize=4, linewidth=1.4, label=name, **curve_style(name))[0]
            aucs.append(f"{test[:3]}. {auc(y, fr):.3f}")
        if line is not None:
            handles.append(line)
            labels.append(f"{name} (AUC {', '.join(aucs)})")
    if not handles:
        raise ValueError(f"no '{variant}' curves to plot")
    for ax, test, better in ((axes[0], "positive", "lower is better"), (axes[1], "negative", "higher is better")):
        ax.set_title(f"{test} perturbation ({better})", fontsize=10)
        ax.set_xlabel("fraction of pixels removed")
        ax.set_xlim(0, max(x))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"accuracy ({'clean prediction' if variant == 'predicted' else 'true label'} kept)")
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="method (area under curve)",
               title_fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


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

    Each method keeps its colour and marker in every plot (:func:`curve_style`);
    the legend lies right of the panels, never over a curve.

    Args:
        curves_by_method: ``{method: curves}`` where ``curves`` is the ``"curves"``
            dict of ``PerturbationMetric.compute()`` (keys ``positive_predicted``,
            ``negative_predicted`` and, with labels, ``*_target``; values
            ``[acc(0), acc(f1), ...]``) or the whole ``compute()`` result.
        path: the PNG to write (a symbolic link there is refused; ``option`` is named in errors).
        fractions: the removed fractions (default 0.1 … 0.9; x = ``[0, *fractions]``).
        variant: ``"predicted"`` or ``"target"``.
    """
    fig = perturbation_curves_figure(curves_by_method, fractions=fractions, variant=variant, title=title)
    return _save_figure(fig, path, dpi, option, "curves plot")
