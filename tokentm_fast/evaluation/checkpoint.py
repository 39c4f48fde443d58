"""Model loading for the evaluation runner: device, checkpoint files, timm / synthetic models.

``load_model("synthetic")`` is the shipped synthetic-benchmark ViT;
``load_model("vit_base_patch16_224", checkpoint="vit_b16.pth")`` a timm model
with local weights (nothing is downloaded); a module is used as is. The
returned description (name, checkpoint path / size / mtime, or a hash of a
module's weights) enters the fingerprint of the resumable state.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import EvaluationError

__all__ = ["resolve_device", "read_checkpoint", "checkpoint_format", "load_model", "resolve_dtype", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype among those) -> torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise EvaluationError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def resolve_device(name) -> torch.device:
    """``torch.device(name)``, with a clear error for a bad name or a missing CUDA device."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise EvaluationError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {name!r} requested but CUDA is not available")
    return dev


_EXPECTED = "expected a .safetensors file or a state dict saved with torch.save (.pth / .pt)"


def checkpoint_format(path: Union[str, os.PathLike]) -> Optional[str]:
    """``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` by the file's first bytes, or None (neither)."""
    import struct
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if zipfile.is_zipfile(path):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle (torch's legacy format)
        return "torch-legacy"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch ``.pth`` / ``.pt`` file.

    Torch files may wrap the weights in ``{"state_dict": …}``, ``{"model": …}``
    (or the ``*_ema`` variants); a ``module.`` prefix (DataParallel) is removed.
    Missing or unreadable files raise :class:`EvaluationError` naming the file
    and the format expected. Torch files are read with ``weights_only=True``: a
    file holding other Python objects (a whole pickled model) is refused, never
    unpickled (that could run code from it).
    """
    import warnings

    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise EvaluationError(f"checkpoint is not a file: {p}")
    try:
        kind = checkpoint_format(p)
    except OSError as e:
        raise EvaluationError(f"cannot read checkpoint {p} (--checkpoint): {e.strerror or e}") from None
    if kind is None:
        raise EvaluationError(f"cannot read checkpoint {p} (--checkpoint): it is not a readable checkpoint, its "
                              "content is neither safetensors nor a complete torch.save file (random, corrupt or "
                              f"truncated); {_EXPECTED}")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's business
                warnings.simplefilter("ignore")
                state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        detail = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in text.splitlines()
                       if "WeightsUnpickler error:" in ln), "")
        if "Unsupported global" in text:
            import re

            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f"a {found.group(1)}" if found else "not only tensors"
            raise EvaluationError(
                f"cannot read checkpoint {p} (--checkpoint): it holds Python objects besides tensors ({what}), "
                "for example a whole pickled model; it is not loaded, since unpickling it could run code from the "
                "file. Save the weights alone (torch.save(model.state_dict(), ...) or safetensors) and give that file"
            ) from None
        why = detail or ("" if "weights_only" in text else _first_line(e))
        raise EvaluationError(f"cannot read checkpoint {p} (--checkpoint): it is not a readable checkpoint"
                              f"{f' ({why})' if why else ' (corrupt or truncated)'}; {_EXPECTED}") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"checkpoint {p} does not hold a state dict of tensors")
    out = {}
    for k, v in state.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _state_dict_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """A short description of how ``state`` does not fit ``expected`` ('' if it fits)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for what, items in (("missing key", missing), ("unexpected key", unexpected), ("shape mismatch", shapes)):
        if items:
            eg = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
            parts.append(f"{len(items)} {what}{'es' if what.endswith('h') and len(items) > 1 else ('s' if len(items) > 1 else '')} ({eg})")
    return "; ".join(parts)


def _file_fingerprint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _module_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _unknown_model_message(name: str) -> str:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    return f"unknown model {name!r}: not 'synthetic' and not a timm model name{hint}"


def load_model(
    model: Union[str, nn.Module] = "synthetic",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model to explain; returns ``(model in eval mode, description)``.

    * ``"synthetic"``: the shipped synthetic-benchmark ViT (or its architecture
      with the safetensors weights ``checkpoint``).
    * a timm model name: ``timm.create_model(name, pretrained=False,
      num_classes=…, **model_kwargs)`` with the weights of ``checkpoint``
      (required: nothing is downloaded). ``num_classes`` defaults to the rows
      of the checkpoint's ``head.weight``.
    * an ``nn.Module``: used as is.
    """
    if isinstance(model, nn.Module):
        return model.eval(), {"name": type(model).__name__, "checkpoint": None, "sha256": _module_fingerprint(model)}
    if not isinstance(model, str) or not model:
        raise EvaluationError(f"model must be 'synthetic', a timm model name or an nn.Module, got {model!r}")
    kwargs = dict(model_kwargs or {})
    if model == "synthetic":
        from ..synthetic.model import WEIGHTS_PATH, create_synthetic_vit

        if kwargs or num_classes is not None:
            raise EvaluationError("the synthetic model takes no num_classes / model arguments")
        path = Path(checkpoint) if checkpoint is not None else WEIGHTS_PATH
        if checkpoint is not None and not path.is_file():
            raise EvaluationError(f"checkpoint file not found: {path}")
        if checkpoint is not None and checkpoint_format(path) != "safetensors":
            raise EvaluationError(f"cannot read checkpoint {path} (--checkpoint): it is not a readable checkpoint for "
                                  "the synthetic model, expected the synthetic ViT's weights as a .safetensors file")
        try:
            m = create_synthetic_vit(pretrained=True, weights=checkpoint)
        except FileNotFoundError as e:
            raise EvaluationError(str(e)) from None
        except Exception as e:
            raise EvaluationError(f"cannot load synthetic-model weights from {path}: {_first_line(e)}") from None
        return m.eval(), {"name": "synthetic", "checkpoint": _file_fingerprint(path)}

    import timm

    if not timm.is_model(model):
        raise EvaluationError(_unknown_model_message(model))
    if checkpoint is None:
        raise EvaluationError(
            f"model {model!r} needs a local checkpoint file (--checkpoint FILE): no weights are downloaded"
        )
    state = read_checkpoint(checkpoint)
    if num_classes is None:
        head = state.get("head.weight")
        if head is not None and head.dim() == 2:
            num_classes = int(head.shape[0])
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        m = timm.create_model(model, pretrained=False, **kwargs)
    except TypeError as e:
        raise EvaluationError(f"cannot build timm model {model!r} with arguments {kwargs}: {e}") from None
    problems = _state_dict_mismatch(m.state_dict(), state)
    if problems:
        raise EvaluationError(
            f"checkpoint {checkpoint} does not fit timm model {model!r} (model arguments {kwargs}): "
            f"{problems}; give the architecture with --model-kwargs (model_kwargs), e.g. img_size=...,depth=..."
        )
    m.load_state_dict(state, strict=True)
    info = {"name": model, "checkpoint": _file_fingerprint(checkpoint), "model_kwargs": kwargs}
    return m.eval(), info
