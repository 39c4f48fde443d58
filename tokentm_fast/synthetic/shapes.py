"""Deterministic synthetic shapes benchmark with exact foreground masks.

Every image holds exactly one *object* whose shape decides the class, drawn on
a textured background together with 1-3 *clutter* shapes.  The design makes
the object's shape the only evidence for the class:

* **Classes** (:data:`CLASS_NAMES`): circle, square, triangle, plus, ring,
  star.  Each is placed upright (no rotation: in pilot runs random rotations
  made the task much slower to learn for a small ViT trained on a CPU, ~70 %
  vs ~89 % accuracy after the same 80k training samples) at a random
  position with a random size (circumradius ``r`` uniform in
  ``[SIZE_MIN, SIZE_MAX]`` = [12, 18] pixels at 64 px, scaled with
  ``image_size``), fully inside the image.  Classes are balanced.
* **Clutter** is drawn from a separate set of *distractor* shapes that are
  never class shapes -- thin bars, elongated ellipses and open arcs
  (:data:`DISTRACTOR_NAMES`) -- so clutter is present in every class and
  carries no class information.  Clutter sizes come from the same
  distribution as the object's size.  Clutter colours come from the same
  distribution as the object's colour (hue uniform on the colour circle,
  same saturation / value ranges); each clutter hue is the object hue plus a
  uniform offset in ``[60, 300]`` degrees, so a clutter shape always has a
  colour *other* than the object's while its marginal colour distribution is
  the same uniform one.  Neither colour nor size tells the class or which
  shape is the object.
* **Background**: a smooth texture (low-frequency noise, stripes or a linear
  gradient) mixing two random dull/dark colours, plus mild pixel noise.  Shape
  colours are bright and saturated, so every shape is visible.
* **Drawing order and mask**: background, then clutter, then the object on
  top.  Clutter is never drawn over the object, so the mask -- the object's
  visible pixels -- equals the object's full rasterization.  Rasterization is
  binary (pixel centres inside the shape, no anti-aliasing) and the object is
  painted with one flat colour, so ``image[:, mask]`` is exactly the object
  colour and the mask is exact by construction.  No other pixel has that
  colour either (background values stay below the shape value range, clutter
  hues differ by >= 60 degrees), so the mask is also exactly the set of
  pixels of the object colour.  Clutter positions are chosen (by seeded
  rejection sampling) to keep clutter mostly apart from the object; clutter
  may be cut by the image border, the object never is.

Determinism: sample ``index`` of ``split`` with seed ``seed`` is generated from
``numpy.random.default_rng([seed, SPLIT_IDS[split], index])`` only, so any
index can be generated alone, in any order and in any DataLoader worker, and
splits are independent.  Labels are balanced: ``label = index % num_classes``.

Images are quantized to 8 bits (``float = uint8 / 255``) so that saving them as
PNG (:func:`save_folder`) is lossless.
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DISTRACTOR_NAMES",
    "EXTRA_SHAPES",
    "SPLIT_IDS",
    "MEAN",
    "STD",
    "IMAGE_SIZE",
    "SyntheticShapes",
    "generate",
    "generate_uint8",
    "generate_arrays",
    "sample_params",
    "render",
    "rasterize",
    "save_folder",
]

CLASS_NAMES: Tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "star",
)
#: Further shapes the rasterizer knows, not used as classes (kept for experiments).
EXTRA_SHAPES: Tuple[str, ...] = ("heart", "lshape")
DISTRACTOR_NAMES: Tuple[str, ...] = ("bar", "ellipse", "arc")
SPLIT_IDS: Dict[str, int] = {"train": 1, "val": 2, "test": 3}

#: Normalisation used by the shipped model: ``(x - MEAN) / STD``.
MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_SIZE = 64

# Shape size (circumradius, pixels) at 64 px; scaled by image_size / 64.
SIZE_MIN = 12.0
SIZE_MAX = 18.0
# Colour distribution of every shape (object and clutter), HSV.
SHAPE_SAT = (0.55, 1.0)
SHAPE_VAL = (0.7, 1.0)
# Background colours, HSV.
BG_SAT = (0.0, 0.6)
BG_VAL = (0.08, 0.5)
BG_NOISE = 0.03
CLUTTER_COUNT = (1, 3)
# Rotation of the object (radians): none -- objects are upright (a random
# rotation made the task too slow to learn for a CPU-trained ViT); clutter is
# always rotated uniformly.
OBJECT_ROTATION = (0.0, 0.0)
CLUTTER_HUE_OFFSET = (1.0 / 6.0, 5.0 / 6.0)  # 60..300 degrees


# --------------------------------------------------------------------------
# rasterization
# --------------------------------------------------------------------------
def _grid(image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    c = np.arange(image_size, dtype=np.float64) + 0.5  # pixel centres
    return np.meshgrid(c, c, indexing="xy")  # xx[i, j] = j + .5, yy[i, j] = i + .5


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon for points (u, v); verts is (n, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x0, y0 = verts[k]
        x1, y1 = verts[(k + 1) % n]
        if y0 == y1:
            continue
        cond = (y0 > v) != (y1 > v)
        xint = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= cond & (u < xint)
    return inside


def _regular(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _shape_inside(kind: str, u: np.ndarray, v: np.ndarray, r: float, extra: float) -> np.ndarray:
    """Inside test in the shape's own (centred, unrotated) frame.

    ``r`` is the shape's size (circumradius); ``extra`` is a per-shape free
    parameter in [0, 1) (only used by distractors).
    """
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        h = r / math.sqrt(2.0)
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == "triangle":
        return _in_polygon(u, v, _regular(3, r))
    if kind == "plus":
        w = 0.36 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "star":
        outer = _regular(5, r)
        inner = _regular(5, 0.45 * r, phase=-math.pi / 2 + math.pi / 5)
        verts = np.empty((10, 2))
        verts[0::2] = outer
        verts[1::2] = inner
        return _in_polygon(u, v, verts)
    if kind == "heart":
        # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up; extent ~[-1.14, 1.14] x [-1, 1.25]
        s = r / 1.2
        x = u / s
        y = -v / s + 0.1
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    if kind == "lshape":
        # an L made of two thick arms, centred on its bounding box
        h = r / math.sqrt(2.0)
        w = 0.8 * h  # arm thickness
        x = u + h
        y = v + h  # box [0, 2h]^2
        inb = (x >= 0) & (x <= 2 * h) & (y >= 0) & (y <= 2 * h)
        return inb & ((x <= w) | (y >= 2 * h - w))
    # ---- distractors (never class shapes) ----
    if kind == "bar":
        w = (0.12 + 0.08 * extra) * r
        return (np.abs(u) <= r) & (np.abs(v) <= w)
    if kind == "ellipse":
        b = (0.22 + 0.1 * extra) * r
        return (u / r) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "arc":
        d = np.sqrt(u * u + v * v)
        half = math.radians(45.0 + 45.0 * extra)  # opening 90..180 degrees
        ang = np.abs(np.arctan2(v, u))
        return (d <= r) & (d >= 0.78 * r) & (ang <= half)
    raise ValueError(f"unknown shape kind {kind!r}")


def rasterize(kind: str, cx: float, cy: float, r: float, angle: float, image_size: int,
              extra: float = 0.0) -> np.ndarray:
    """Binary mask (image_size, image_size) of a shape: pixel centres inside it."""
    xx, yy = _grid(image_size)
    dx = xx - cx
    dy = yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx + s * dy  # rotate the grid by -angle = rotate the shape by +angle
    v = -s * dx + c * dy
    return _shape_inside(kind, u, v, r, extra)


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if index < 0:
        raise IndexError(f"index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def _shape_color(rng: np.random.Generator, hue: float) -> Tuple[float, float, float]:
    sat = rng.uniform(*SHAPE_SAT)
    val = rng.uniform(*SHAPE_VAL)
    return colorsys.hsv_to_rgb(hue % 1.0, sat, val)


def sample_params(split: str, index: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> dict:
    """All random choices of one sample (the recipe :func:`render` draws).

    The returned dict holds ``label``, ``object`` (kind, cx, cy, r, angle,
    color) and ``clutter`` (list of the same fields plus ``extra``) and the
    background description.
    """
    rng = _rng(seed, split, index)
    scale = image_size / 64.0
    label = int(index % len(CLASS_NAMES))

    # object
    r = rng.uniform(SIZE_MIN, SIZE_MAX) * scale
    margin = r + 1.0 * scale
    cx = rng.uniform(margin, image_size - margin)
    cy = rng.uniform(margin, image_size - margin)
    angle = rng.uniform(*OBJECT_ROTATION)
    hue = rng.uniform()
    obj = dict(kind=CLASS_NAMES[label], cx=cx, cy=cy, r=r, angle=angle,
               color=_shape_color(rng, hue), extra=0.0)

    # clutter: distractor shapes, same size and colour distributions
    n_clutter = int(rng.integers(CLUTTER_COUNT[0], CLUTTER_COUNT[1] + 1))
    clutter = []
    for _ in range(n_clutter):
        kind = DISTRACTOR_NAMES[int(rng.integers(len(DISTRACTOR_NAMES)))]
        cr = rng.uniform(SIZE_MIN, SIZE_MAX) * scale
        cangle = rng.uniform(0.0, 2.0 * math.pi)
        extra = rng.uniform()
        chue = hue + rng.uniform(*CLUTTER_HUE_OFFSET)
        color = _shape_color(rng, chue)
        # position: keep apart from the object (seeded rejection sampling);
        # the clutter may leave the image partly.
        best, best_d = None, -1.0
        for _try in range(20):
            px = rng.uniform(0.0, image_size)
            py = rng.uniform(0.0, image_size)
            d = math.hypot(px - cx, py - cy) - (r + 0.6 * cr)
            if d >= 0.0:
                best = (px, py)
                break
            if d > best_d:
                best, best_d = (px, py), d
        clutter.append(dict(kind=kind, cx=best[0], cy=best[1], r=cr, angle=cangle,
                            color=color, extra=extra))

    # background
    bg_kind = ("noise", "stripes", "gradient")[int(rng.integers(3))]
    c0 = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*BG_SAT), rng.uniform(*BG_VAL))
    c1 = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*BG_SAT), rng.uniform(*BG_VAL))
    if bg_kind == "noise":
        g = int(rng.integers(3, 8))
        bg_param = dict(grid=rng.uniform(size=(g, g)))
    elif bg_kind == "stripes":
        bg_param = dict(theta=rng.uniform(0, math.pi), period=rng.uniform(6.0, 20.0) * scale,
                        phase=rng.uniform(0, 2 * math.pi))
    else:
        bg_param = dict(theta=rng.uniform(0, 2 * math.pi))
    noise_seed = int(rng.integers(2 ** 31))
    return dict(label=label, object=obj, clutter=clutter, image_size=image_size,
                background=dict(kind=bg_kind, c0=c0, c1=c1, noise_seed=noise_seed, **bg_param))


def _bilinear_up(grid: np.ndarray, size: int) -> np.ndarray:
    g = grid.shape[0]
    # sample the (g, g) grid at size points spanning it end to end
    t = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.clip(np.floor(t).astype(int), 0, g - 2)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(bg: dict, image_size: int) -> np.ndarray:
    xx, yy = _grid(image_size)
    if bg["kind"] == "noise":
        t = _bilinear_up(bg["grid"], image_size)
    elif bg["kind"] == "stripes":
        p = xx * math.cos(bg["theta"]) + yy * math.sin(bg["theta"])
        t = 0.5 + 0.5 * np.sin(2 * math.pi * p / bg["period"] + bg["phase"])
    else:
        p = xx * math.cos(bg["theta"]) + yy * math.sin(bg["theta"])
        t = (p - p.min()) / max(p.max() - p.min(), 1e-9)
    c0 = np.asarray(bg["c0"])[:, None, None]
    c1 = np.asarray(bg["c1"])[:, None, None]
    img = c0 * (1 - t)[None] + c1 * t[None]
    noise = np.random.default_rng(bg["noise_seed"]).normal(0.0, BG_NOISE, size=img.shape)
    return np.clip(img + noise, 0.0, 1.0)


def _to_u8(c) -> np.ndarray:
    return np.round(np.clip(np.asarray(c, dtype=np.float64), 0, 1) * 255).astype(np.uint8)


def render(params: dict) -> Tuple[np.ndarray, np.ndarray, int]:
    """Draw a sample from its :func:`sample_params` recipe.

    Returns ``(image uint8 (3, H, W), mask bool (H, W), label)``.
    """
    size = params["image_size"]
    img = _to_u8(_background(params["background"], size))
    for c in params["clutter"]:
        m = rasterize(c["kind"], c["cx"], c["cy"], c["r"], c["angle"], size, c["extra"])
        img[:, m] = _to_u8(c["color"])[:, None]
    o = params["object"]
    mask = rasterize(o["kind"], o["cx"], o["cy"], o["r"], o["angle"], size, o["extra"])
    img[:, mask] = _to_u8(o["color"])[:, None]
    return img, mask, params["label"]


def generate_uint8(split: str, index: int, seed: int = 0,
                   image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray, int]:
    """One sample as ``(image uint8 (3, H, W), mask bool (H, W), label)``."""
    return render(sample_params(split, index, seed, image_size))


def generate(split: str, index: int, seed: int = 0,
             image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray, int]:
    """One sample as ``(image float32 (3, H, W) in [0, 1], mask bool (H, W), label)``."""
    img, mask, label = generate_uint8(split, index, seed, image_size)
    return img.astype(np.float32) / 255.0, mask, label


def _gen_range(args) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    split, start, stop, seed, image_size = args
    n = stop - start
    imgs = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    labels = np.empty((n,), dtype=np.int64)
    for k in range(n):
        imgs[k], masks[k], labels[k] = generate_uint8(split, start + k, seed, image_size)
    return imgs, masks, labels


def generate_arrays(split: str, n: int, seed: int = 0, image_size: int = IMAGE_SIZE,
                    start: int = 0, workers: int = 1
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``start .. start+n-1`` as arrays ``(uint8 (n,3,H,W), bool (n,H,W), int64 (n,))``.

    ``workers > 1`` generates chunks in a "spawn" process pool (a script that
    calls it must guard its entry point with ``if __name__ == "__main__"``);
    the result does not depend on ``workers``.
    """
    if workers <= 1 or n < 256:
        return _gen_range((split, start, start + n, seed, image_size))
    import multiprocessing as mp

    chunk = (n + workers - 1) // workers
    jobs = [(split, s, min(s + chunk, start + n), seed, image_size)
            for s in range(start, start + n, chunk)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_gen_range, jobs)
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


# --------------------------------------------------------------------------
# torch Dataset and folder export
# --------------------------------------------------------------------------
try:  # torch is a hard dependency of the package, but keep the generator importable alone
    from torch.utils.data import Dataset as _Dataset
except Exception:  # pragma: no cover
    _Dataset = object  # type: ignore[misc,assignment]


class SyntheticShapes(_Dataset):
    """Random-access torch ``Dataset`` over one split.

    ``ds[i]`` returns ``(image, mask, label)``: image a float32 tensor
    (3, H, W) in [0, 1] (un-normalised; apply ``transform`` or normalise with
    :data:`MEAN` / :data:`STD`), mask a bool tensor (H, W), label an int.
    With ``return_mask=False`` it returns ``(image, label)`` instead.
    """

    classes = list(CLASS_NAMES)

    def __init__(self, split: str, size: int, seed: int = 0, image_size: int = IMAGE_SIZE,
                 transform=None, return_mask: bool = True):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.transform = transform
        self.return_mask = return_mask

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        import torch

        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(index)
        img, mask, label = generate(self.split, index, self.seed, self.image_size)
        x = torch.from_numpy(img)
        if self.transform is not None:
            x = self.transform(x)
        if self.return_mask:
            return x, torch.from_numpy(mask), label
        return x, label


def save_folder(root: Union[str, Path], split: str, n: int, seed: int = 0,
                image_size: int = IMAGE_SIZE, save_masks: bool = False) -> List[Path]:
    """Write samples ``0..n-1`` as an ImageNet-style folder.

    Layout: ``root/<class_name>/<index:06d>.png`` (RGB, lossless); with
    ``save_masks`` also ``root/<class_name>/<index:06d>_mask.png`` (L, 0/255)
    -- do not enable it for a folder read by an ImageFolder-style loader.
    Every class directory is created even if empty.  Returns the image paths.
    """
    from PIL import Image

    root = Path(root)
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, mask, label = generate_uint8(split, i, seed, image_size)
        p = root / CLASS_NAMES[label] / f"{i:06d}.png"
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(p)
        if save_masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(p.with_name(f"{i:06d}_mask.png"))
        paths.append(p)
    return paths
