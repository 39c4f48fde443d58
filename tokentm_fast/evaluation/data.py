"""Data sources of the evaluation runner.

Three sources, all read in a deterministic order and preprocessed exactly as
the timm model's own evaluation transform (``timm.data.resolve_data_config``
-> resize / center-crop to the input size; masks with nearest interpolation
and the same geometry):

* :class:`SyntheticSource` -- the shipped synthetic shapes benchmark (exact
  masks and labels);
* :class:`FolderSource` -- an ImageNet-style folder (one sub-folder per class,
  labels from the sorted folder names, as torchvision's ``ImageFolder``; no
  masks);
* :class:`MatSource` -- the ImageNet-segmentation file ``gtsegs_ijcv.mat``
  (MATLAB v7.3 = HDF5) with datasets ``value/img`` and ``value/gt`` holding
  object references to per-image arrays (images stored transposed as
  ``(3, W, H)`` uint8, masks as ``(W, H)``; a mask reference may point to a
  cell holding a second reference, as in the real file); no labels.

Every item is a dict ``{"image", "image01", "mask", "label", "id"}``:
``image`` the normalized model input ``(3, H, W)``, ``image01`` the same
picture un-normalized in ``[0, 1]`` (the perturbation test needs it), ``mask``
a bool ``(H, W)`` tensor (or ``None``), ``label`` an int (``-1`` when
unknown) and ``id`` a stable sample id (the file name).  A sample that fails
to load becomes ``{"id", "error"}``; :func:`collate` keeps such failures
apart so that the runner can report and skip them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "Preprocess",
    "model_data_config",
    "EvalDataset",
    "SyntheticSource",
    "FolderSource",
    "MatSource",
    "parse_data_spec",
    "make_source",
    "collate",
    "IMG_EXTENSIONS",
    "PREPROCESS_MODES",
    "to_rgb",
    "load_image",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data source cannot be used (missing path, wrong layout...); the message says why."""


# ----------------------------------------------------------------------------
# reading pictures (one code path for ``explain`` and every data source)
# ----------------------------------------------------------------------------

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image):
    """A PIL image as 8-bit RGB, rescaled by its bit depth.

    PIL's own ``convert("RGB")`` clips 16-bit pictures (modes ``I;16*``, and
    ``I``, which is how some PIL versions open a 16-bit grayscale PNG or TIFF)
    at 255: almost every pixel becomes white. Here integer pictures are scaled
    by their range, ``v / 65535`` (then to 8 bits: ``round(v / 65535 * 255)``),
    and float pictures (mode ``F``) are taken as values in ``[0, 1]`` (clipped).
    16-bit RGB PNGs are already scaled by PIL (it keeps the high byte).
    A picture with transparency (an alpha channel, or a palette / colour key
    marked transparent) is composited over white, as image viewers show it
    (``convert("RGB")`` would drop the alpha and show the colours hidden under
    transparent pixels); a ``UserWarning`` says so once. Everything else goes
    through ``convert("RGB")``.
    """
    from PIL import Image

    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        a = np.asarray(image).astype(np.float64) / 65535.0
    elif image.mode == "F":
        a = np.asarray(image).astype(np.float64)
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(image)
    else:
        return image if image.mode == "RGB" else image.convert("RGB")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    g = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(g[..., None], 3, axis=-1)))


#: PIL modes with an alpha channel (premultiplied ones included)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _over_white(image):
    """An image with transparency as 8-bit RGB composited over white (nothing changes where it is opaque)."""
    import warnings

    from PIL import Image

    rgba = image.convert("RGBA")
    if int(np.asarray(rgba)[..., 3].min()) == 255:      # every pixel opaque: nothing to composite
        return rgba.convert("RGB")
    warnings.warn("a picture has transparent pixels: it is composited over white, as image viewers show it "
                  "(the model takes RGB; the colours stored under transparent pixels are not used)",
                  UserWarning, stacklevel=3)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def load_image(path: Union[str, os.PathLike]):
    """Open the picture at ``path`` as 8-bit RGB (see :func:`to_rgb`); PIL's errors propagate."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


# ----------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------

def model_data_config(model: torch.nn.Module) -> Dict[str, Any]:
    """The timm evaluation data config of ``model`` (input size, interpolation, crop, mean, std).

    ``resolve_data_config`` reads the model's ``pretrained_cfg``; a model built
    with another ``img_size`` than its registered default (for example
    ``timm.create_model("vit_tiny_patch16_224", img_size=32)``) keeps the default
    input size there, so the size the patch embedding really expects wins.
    """
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config({}, model=model))
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is not None and not getattr(pe, "dynamic_img_size", False):
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        c = cfg["input_size"][0]
        if (h, w) != tuple(cfg["input_size"][1:]):
            cfg["input_size"] = (c, int(h), int(w))
    cfg["mean"] = tuple(float(m) for m in cfg["mean"])
    cfg["std"] = tuple(float(s) for s in cfg["std"])
    return cfg


PREPROCESS_MODES = ("crop", "resize")


class Preprocess:
    """The model's evaluation transform, split into geometry and normalization.

    ``__call__(pil_image, mask=None)`` -> ``(image, image01, mask)`` with the
    picture brought to the model's input size, ``image01`` in ``[0, 1]``,
    ``image`` normalized with the config's mean / std, and the mask (a bool /
    0-1 array ``(H, W)``) resized with nearest interpolation and the same geometry.

    ``mode="crop"`` (default): as ``timm.data.create_transform(**cfg,
    is_training=False)`` does it (the shorter side resized to ``input / crop_pct``,
    then the centre cropped: the borders are not seen by the model).
    ``mode="resize"``: the whole picture resized to the input size (the aspect
    ratio is not kept, nothing is cut off). :meth:`plan` says where the model's
    input lies in a picture of a given size, :meth:`describe` says it in words.
    """

    def __init__(self, data_config: Dict[str, Any], mode: str = "crop") -> None:
        from timm.data import create_transform

        if mode not in PREPROCESS_MODES:
            raise DataError(f"preprocessing mode must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
        self.mode = mode
        self.config = dict(data_config)
        interpolation = self.config.get("interpolation", "bilinear")
        if mode == "resize":
            from timm.data.transforms import MaybePILToTensor, str_to_interp_mode
            from torchvision import transforms

            size = list(self.input_size)
            self.geometry = transforms.Compose([
                transforms.Resize(size, interpolation=str_to_interp_mode(interpolation)), MaybePILToTensor()])
            self.mask_geometry = transforms.Compose([
                transforms.Resize(size, interpolation=str_to_interp_mode("nearest")), MaybePILToTensor()])
        else:
            common = dict(
                input_size=tuple(self.config["input_size"]),
                crop_pct=self.config.get("crop_pct"),
                crop_mode=self.config.get("crop_mode", "center"),
                is_training=False,
                normalize=False,
            )
            self.geometry = create_transform(interpolation=interpolation, **common)
            self.mask_geometry = create_transform(interpolation="nearest", **common)
        self.mean = torch.tensor(self.config["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(self.config["std"], dtype=torch.float32).view(-1, 1, 1)

    def _crop_pct(self) -> float:
        from timm.data import DEFAULT_CROP_PCT

        return float(self.config.get("crop_pct") or DEFAULT_CROP_PCT)

    def plan(self, width: int, height: int) -> Dict[str, Any]:
        """Where the model's input lies in a picture of ``width x height`` pixels.

        Returns ``mode``, ``original`` ``(H, W)``, ``model`` ``(h, w)``,
        ``resized`` ``(H', W')`` (the picture after the resize step), ``crop``
        ``(top, left)`` of the ``h x w`` window in the resized picture (negative:
        padding) and ``box`` ``(x0, y0, x1, y1)``: that window in the original
        picture's pixel coordinates (floats; the whole picture for ``resize``).
        The arithmetic is timm's / torchvision's (checked against the transform
        in the tests).
        """
        import math

        H, W = int(height), int(width)
        h, w = self.input_size
        if self.mode == "resize":
            rh, rw, top, left = h, w, 0, 0
        else:
            pct = self._crop_pct()
            sh, sw = math.floor(h / pct), math.floor(w / pct)
            crop_mode = self.config.get("crop_mode") or "center"
            if crop_mode == "squash":
                rh, rw = sh, sw
            elif crop_mode == "border" or sh != sw:  # timm's ResizeKeepRatio (longest edge for 'border')
                ratio = max(H / sh, W / sw) if crop_mode == "border" else min(H / sh, W / sw)
                rh, rw = round(H / ratio), round(W / ratio)
            elif W <= H:  # torchvision Resize(int): the shorter side to sh
                rw, rh = sh, int(sh * H / W)
            else:
                rh, rw = sh, int(sh * W / H)
            top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
        sx, sy = W / rw, H / rh
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return {"mode": self.mode, "original": (H, W), "model": (h, w), "resized": (rh, rw), "crop": (top, left),
                "box": box}

    def describe(self, width: Optional[int] = None, height: Optional[int] = None) -> str:
        """The preprocessing in words: in general, or what happens to a ``width x height`` picture."""
        h, w = self.input_size
        interp = self.config.get("interpolation", "bilinear")
        if width is None or height is None:
            if self.mode == "resize":
                return (f"resize: every image resized to the model's {w}×{h} px ({interp}); the aspect ratio is not "
                        "kept, nothing is cut off")
            import math

            pct = self._crop_pct()
            return (f"crop: the shorter side of every image resized ({interp}) to {math.floor(min(h, w) / pct)} px, "
                    f"then the centre {w}×{h} px (the model's input) cropped (crop_pct {pct:g}, timm's evaluation "
                    "transform): what lies outside that centre is not seen by the model (--resize: the whole image "
                    "instead)")
        p = self.plan(width, height)
        rh, rw = p["resized"]
        if self.mode == "resize":
            return f"{width}×{height} px resized to the model's {w}×{h} px ({interp}, aspect ratio not kept)"
        x0, y0, x1, y1 = p["box"]
        pad = " (padded)" if p["crop"][0] < 0 or p["crop"][1] < 0 else ""
        return (f"{width}×{height} px resized to {rw}×{rh} px ({interp}), centre {w}×{h} px cropped{pad}: the model "
                f"sees the region x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} of the original (--resize: the whole "
                "image)")

    @property
    def input_size(self) -> Tuple[int, int]:
        return tuple(self.config["input_size"][1:])  # type: ignore[return-value]

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """``(…, 3, H, W)`` in [0, 1] -> normalized model input (same device)."""
        return (images01 - self.mean.to(images01.device)) / self.std.to(images01.device)

    def __call__(self, image, mask: Optional[np.ndarray] = None):
        from PIL import Image

        image = to_rgb(image)
        x = self.geometry(image)
        if x.dtype == torch.uint8:
            x01 = x.to(torch.float32) / 255.0
        else:  # a float ToTensor (already scaled)
            x01 = x.to(torch.float32)
        m = None
        if mask is not None:
            mimg = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
            mt = self.mask_geometry(mimg)
            m = (torch.as_tensor(np.asarray(mt)) > 0).reshape(mt.shape[-2:])
        return self.normalize(x01), x01, m


# ----------------------------------------------------------------------------
# sources: a list of raw samples (PIL image, mask or None, label, id)
# ----------------------------------------------------------------------------

class SyntheticSource:
    """The synthetic shapes benchmark, samples ``0 … size-1`` of ``split``."""

    kind = "synthetic"
    has_masks = True
    has_labels = True

    def __init__(self, split: str = "test", size: int = 1000, seed: int = 0, image_size: Optional[int] = None) -> None:
        from ..synthetic import IMAGE_SIZE, SPLIT_IDS

        if split not in SPLIT_IDS:
            raise DataError(f"synthetic split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        if int(size) < 1:
            raise DataError(f"synthetic data size must be >= 1, got {size}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = int(image_size or IMAGE_SIZE)

    def __len__(self) -> int:
        return self.size

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "size": self.size, "seed": self.seed,
                "image_size": self.image_size}

    def sample_id(self, index: int) -> str:
        return f"synthetic/{self.split}/{index:06d}"

    def load(self, index: int):
        from PIL import Image

        from ..synthetic import generate_uint8

        img, mask, label = generate_uint8(self.split, index, self.seed, self.image_size)
        pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
        return pil, mask, int(label)


class FolderSource:
    """An ImageNet-style folder: ``root/<class>/<image>``; labels from the sorted class names.

    Files are listed once, sorted by (class, relative path), so the order is
    deterministic.  There are no masks.
    """

    kind = "folder"
    has_masks = False
    has_labels = True

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise DataError(f"not a folder: {self.root} (expected an ImageNet-style folder with one sub-folder per class)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class sub-folders in {self.root} (expected root/<class>/<image>, as ImageFolder)")
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            cdir = self.root / name
            files = []
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames.sort()
                for f in filenames:
                    if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                        files.append(os.path.relpath(os.path.join(dirpath, f), self.root))
            self.samples.extend((rel, label) for rel in sorted(files))
        if not self.samples:
            raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in the class folders of {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root.resolve()), "size": len(self.samples),
                "classes": len(self.classes), "class_to_idx": self.class_to_idx}

    @property
    def class_to_idx(self) -> Dict[str, int]:
        """Folder name -> label (the position of the name in the sorted list, as ``ImageFolder``)."""
        return {name: i for i, name in enumerate(self.classes)}

    def sample_id(self, index: int) -> str:
        return self.samples[index][0].replace(os.sep, "/")

    def load(self, index: int):
        rel, label = self.samples[index]
        return load_image(self.root / rel), None, label


class MatSource:
    """The ImageNet-segmentation masks file ``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5).

    Layout (as read by Chefer et al.): ``value/img`` and ``value/gt`` are
    ``(N, 1)`` (or ``(1, N)``) datasets of object references; ``value/img[i]``
    points to a ``(3, W, H)`` uint8 array (MATLAB's column-major storage of an
    ``H x W x 3`` image), ``value/gt[i]`` to a ``(W, H)`` mask -- or to a cell
    holding a reference to it.  The file has no class labels.  The HDF5 file
    is opened lazily in every process that reads it (h5py handles do not
    survive ``fork``).
    """

    kind = "mat"
    has_masks = True
    has_labels = False

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"segmentation .mat file not found: {self.path}")
        try:
            import h5py

            with h5py.File(self.path, "r") as f:
                if "value/img" not in f or "value/gt" not in f:
                    raise DataError(
                        f"{self.path}: expected the gtsegs_ijcv.mat layout with datasets value/img and value/gt"
                    )
                n_img = self._count(f["value/img"])
                n_gt = self._count(f["value/gt"])
        except DataError:
            raise
        except Exception as e:  # not HDF5, truncated...
            raise DataError(f"cannot read {self.path} as a MATLAB v7.3 (HDF5) file: {e}") from None
        if n_img != n_gt:
            raise DataError(f"{self.path}: value/img has {n_img} entries but value/gt has {n_gt}")
        self.size = n_img
        self._file = None
        self._pid = None

    @staticmethod
    def _count(ds) -> int:
        return int(np.prod(ds.shape)) if len(ds.shape) else 1

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_file"] = None
        d["_pid"] = None
        return d

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "size": self.size}

    def sample_id(self, index: int) -> str:
        return f"{self.path.name}#{index:05d}"

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    @staticmethod
    def _entry(ds, index: int):
        shape = ds.shape
        if len(shape) == 2 and shape[0] == 1 and shape[1] != 1:
            return ds[0, index]
        if len(shape) == 2:
            return ds[index, 0]
        return ds[index]

    def _deref(self, f, ref):
        import h5py

        obj = f[ref]
        while isinstance(obj, h5py.Dataset) and obj.dtype == h5py.ref_dtype:
            obj = f[np.asarray(obj).reshape(-1)[0]]
        return np.asarray(obj)

    def load(self, index: int):
        from PIL import Image

        f = self._h5()
        img = self._deref(f, self._entry(f["value/img"], index))
        gt = self._deref(f, self._entry(f["value/gt"], index))
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image array has shape {img.shape}, expected (3, W, H)")
        img = np.ascontiguousarray(img.transpose(2, 1, 0))  # (H, W, 3)
        if img.dtype == np.uint16:  # 16-bit: scaled by its range, as to_rgb does
            img = np.round(img.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
        elif img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        mask = np.ascontiguousarray(gt.T) > 0  # (H, W)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} != image shape {img.shape[:2]}")
        return Image.fromarray(img), mask, -1


Source = Union[SyntheticSource, FolderSource, MatSource]


def parse_data_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"synthetic"`` / ``"folder:PATH"`` / ``"mat:PATH"`` -> ``(kind, path)``."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data must be 'synthetic', 'folder:PATH' or 'mat:PATH', got {spec!r}")
    if spec == "synthetic":
        return "synthetic", None
    kind, sep, path = spec.partition(":")
    if sep and kind in ("folder", "mat") and path:
        return kind, path
    raise DataError(f"data must be 'synthetic', 'folder:PATH' or 'mat:PATH', got {spec!r}")


def make_source(spec: Union[str, Source], split: str = "test", size: int = 1000, seed: int = 0) -> Source:
    """A data source from a spec string (or a source object, returned as is)."""
    if not isinstance(spec, str):
        if all(hasattr(spec, a) for a in ("load", "sample_id", "describe", "__len__")):
            return spec
        raise DataError(f"unsupported data source {type(spec).__name__}")
    kind, path = parse_data_spec(spec)
    if kind == "synthetic":
        return SyntheticSource(split=split, size=size, seed=seed)
    if kind == "folder":
        return FolderSource(path)
    return MatSource(path)


class EvalDataset(Dataset):
    """Preprocessed items of a source (see the module docstring); failures become ``{"id", "error"}``."""

    def __init__(self, source: Source, preprocess: Preprocess) -> None:
        self.source = source
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sid = self.source.sample_id(index)
        try:
            pil, mask, label = self.source.load(index)
            image, image01, m = self.preprocess(pil, mask)
        except Exception as e:  # a corrupt file: reported and skipped by the runner
            return {"id": sid, "index": int(index), "error": f"{type(e).__name__}: {e}"}
        return {"image": image, "image01": image01, "mask": m, "label": int(label), "id": sid, "index": int(index)}


def collate(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack the good items of a batch; failures go to ``batch["failures"]`` as ``(id, error)``.

    ``batch["n"]`` is the number of samples consumed (good and failed), so the
    runner can count its position in the data set; ``indices`` and
    ``failure_indices`` are the data-set indices of the good and failed items.  ``masks`` is ``None``
    unless every good item has one, ``labels`` is ``None`` unless every good
    item has a known label (``>= 0``).
    """
    good = [it for it in items if "error" not in it]
    failures = [(it["id"], it["error"]) for it in items if "error" in it]
    batch: Dict[str, Any] = {"n": len(items), "failures": failures, "ids": [it["id"] for it in good],
                             "indices": [it.get("index", -1) for it in good],
                             "failure_indices": [it.get("index", -1) for it in items if "error" in it]}
    if not good:
        batch.update(images=None, images01=None, masks=None, labels=None)
        return batch
    batch["images"] = torch.stack([it["image"] for it in good])
    batch["images01"] = torch.stack([it["image01"] for it in good])
    masks = [it["mask"] for it in good]
    batch["masks"] = torch.stack(masks) if all(m is not None for m in masks) else None
    labels = [it["label"] for it in good]
    batch["labels"] = torch.tensor(labels, dtype=torch.long) if all(l >= 0 for l in labels) else None
    return batch
