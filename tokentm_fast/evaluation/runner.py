"""The evaluation runner: every method x every metric over a data set, resumable.

``evaluate(model, data, methods, metrics, ...)`` loads the model (a timm model
name + local checkpoint, ``"synthetic"`` for the shipped synthetic ViT, or a
module), reads the data in a deterministic order with a ``DataLoader``,
explains each batch **once** per method and feeds that map to every metric
(docs/evaluation.md §1-§4), and writes a results JSON with one record per
(method, metric).

Resuming: after every ``save_every`` batches the accumulated metric states,
the number of samples done and a fingerprint of the configuration are written
atomically (tmp file + ``os.replace``) to ``<output>.partial``.  A run started
again with the same configuration continues after the samples already done
(``DataLoader`` over a ``Subset`` starting there) and ends with exactly the
numbers of an uninterrupted run; a different configuration is refused unless
``restart=True``.  The partial file is removed once the results are written.

A sample that fails to load (a corrupt image) is logged as
``skipped <id>: <error>``, left out and listed in the results.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..api import Explainer
from ..methods import METHODS, check_method
from .data import DataError, EvalDataset, Preprocess, collate, make_source, model_data_config

__all__ = [
    "EvaluationError",
    "METRICS",
    "evaluate",
    "load_model",
    "read_checkpoint",
    "format_table",
    "atomic_write_json",
    "partial_path",
]

METRICS = ("segmentation", "perturbation", "sanity")
STATE_VERSION = 1


class EvaluationError(ValueError):
    """A problem with the user's input (model, checkpoint, data, resume state); the message says what."""


def resolve_device(name) -> torch.device:
    """``torch.device(name)``, with a clear error for a bad name or a missing CUDA device."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise EvaluationError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {name!r} requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------
# model loading
# ----------------------------------------------------------------------------

def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch ``.pth`` / ``.pt`` file.

    Torch files may wrap the weights in ``{"state_dict": …}``, ``{"model": …}``
    (or the ``*_ema`` variants); a ``module.`` prefix (DataParallel) is removed.
    Missing or unreadable files raise :class:`EvaluationError` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise EvaluationError(f"checkpoint is not a file: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationError(f"cannot read checkpoint {p}: {msg}") from None
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
        try:
            m = create_synthetic_vit(pretrained=True, weights=checkpoint)
        except FileNotFoundError as e:
            raise EvaluationError(str(e)) from None
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvaluationError(f"cannot load synthetic-model weights from {path}: {msg}") from None
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


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def partial_path(output: Union[str, os.PathLike]) -> Path:
    """Where the resumable partial state of ``output`` lives."""
    return Path(str(output) + ".partial")


def _jsonable(x: Any) -> Any:
    """Plain JSON (NaN / Inf -> None, tuples -> lists, tensors -> numbers)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _jsonable(x.item())
    return x


def atomic_write_json(path: Union[str, os.PathLike], obj: Any) -> None:
    """Write JSON to ``path`` atomically (tmp file in the same folder, fsync, ``os.replace``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def _versions() -> Dict[str, str]:
    import timm

    from .. import __version__

    return {"tokentm_fast": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _check_list(name: str, values: Union[str, Sequence[str]], allowed: Sequence[str]) -> List[str]:
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    values = list(values)
    if not values:
        raise EvaluationError(f"no {name} given; choose from {', '.join(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise EvaluationError(f"unknown {name} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise EvaluationError(f"duplicate {name} in {values}")
    return values


def _summarize_sanity(values: Dict[str, Any]) -> Dict[str, Any]:
    stages = values.get("stages") or []
    out = dict(values)
    if stages:
        out["spearman_top_block"] = stages[0]["spearman"]
        out["spearman_full_random"] = stages[-1]["spearman"]
    return out


# ----------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------

def evaluate(
    model: Union[str, nn.Module] = "synthetic",
    data: Any = "synthetic",
    methods: Union[str, Sequence[str]] = METHODS,
    metrics: Union[str, Sequence[str]] = ("segmentation", "perturbation"),
    *,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    split: str = "test",
    size: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
    limit: Optional[int] = None,
    output: Optional[Union[str, os.PathLike]] = "results.json",
    backend: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    restart: bool = False,
    save_every: int = 1,
    method_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    target: str = "predicted",
    sanity_images: Optional[int] = 32,
    sanity_seed: int = 0,
    command: Optional[Sequence[str]] = None,
    stop_after_batches: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Evaluate ``methods`` x ``metrics`` on a data set; returns (and writes) the results.

    Args:
        model: ``"synthetic"``, a timm model name (with ``checkpoint``) or a module.
        data: ``"synthetic"`` (``split``, ``size``, ``seed``), ``"folder:PATH"``
            (ImageNet-style folder), ``"mat:PATH"`` (``gtsegs_ijcv.mat``) or a source
            object from :mod:`tokentm_fast.evaluation.data`.
        methods: names from ``tokentm_fast.METHODS`` (list or comma-separated string).
        metrics: ``"segmentation"`` (needs masks), ``"perturbation"`` (AUCs, AOPC,
            LOdds, curves), ``"sanity"`` (model randomization, on the first
            ``sanity_images`` images; ``None`` = all).
        batch_size, device, backend, num_workers: batching, where to run, explanation
            backend, ``DataLoader`` workers.
        limit: evaluate only the first ``limit`` samples.
        output: results JSON path (``None``: nothing written, no resume).
        restart: discard a partial state left by an interrupted run of another configuration.
        save_every: save the partial state every this many batches.
        method_options: per-method options, e.g. ``{"tokentm": {"start_layer": 1}}``.
        target: explain the ``"predicted"`` class (default) or the ``"label"``.
        stop_after_batches: testing aid -- end the process abruptly (``os._exit``)
            after this many batches of this run, as a kill would.
        log: where messages go (default: stderr).

    Returns:
        The results dict (also written to ``output``): ``records`` (one per
        method x metric with its ``values``), ``model``, ``data``, ``command``,
        ``versions``, ``counts``, ``skipped``, ``unavailable``, ``run``.
    """
    t_start = time.time()
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    methods = _check_list("method(s)", methods, METHODS)
    metrics = _check_list("metric(s)", metrics, METRICS)
    if target not in ("predicted", "label"):
        raise EvaluationError(f"target must be 'predicted' or 'label', got {target!r}")
    if int(batch_size) < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise EvaluationError(f"limit must be >= 1, got {limit}")
    if int(save_every) < 1:
        raise EvaluationError(f"save_every must be >= 1, got {save_every}")
    dev = resolve_device(device)
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    for k in method_options:
        check_method(k)

    net, model_info = load_model(model, checkpoint=checkpoint, num_classes=num_classes, model_kwargs=model_kwargs)
    net = net.to(dev).eval()
    explainers = {m: Explainer(net, method=m, backend=backend, **method_options.get(m, {})) for m in methods}
    data_config = model_data_config(net)
    preprocess = Preprocess(data_config)
    try:
        source = make_source(data, split=split, size=size, seed=seed)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    n_total = len(source)
    n_eval = min(n_total, int(limit)) if limit is not None else n_total

    unavailable: Dict[str, str] = {}
    if "segmentation" in metrics and not source.has_masks:
        unavailable["segmentation"] = f"the {source.kind} data source has no masks"
        log(f"segmentation metric unavailable: the {source.kind} data source has no masks; skipping it")
        metrics = [m for m in metrics if m != "segmentation"]
    if target == "label" and not source.has_labels:
        raise EvaluationError(f"target='label' needs labels, and the {source.kind} data source has none")
    if not metrics:
        raise EvaluationError("no metric left to compute: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))

    from ..metrics import PerturbationMetric, SanityMetric, SegmentationMetric

    def make_metric(method: str, metric: str):
        if metric == "segmentation":
            return SegmentationMetric()
        if metric == "perturbation":
            return PerturbationMetric(net, preprocess.normalize)
        opts = method_options.get(method, {})

        def explain_fn(m: nn.Module, images: torch.Tensor) -> torch.Tensor:
            return Explainer(m, method=method, backend=backend, **opts)(images)

        return SanityMetric(net, explain_fn, seed=sanity_seed)

    accs = {m: {k: make_metric(m, k) for k in metrics} for m in methods}

    config = {
        "version": STATE_VERSION,
        "model": {k: v for k, v in model_info.items()},
        "data": source.describe(),
        "data_config": {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in data_config},
        "methods": list(methods),
        "method_options": {m: explainers[m].options for m in methods},
        "metrics": list(metrics),
        "backend": backend,
        "batch_size": int(batch_size),
        "device": str(dev),
        "target": target,
        "sanity": {"images": sanity_images, "seed": sanity_seed} if "sanity" in metrics else None,
    }
    config = _jsonable(config)
    fingerprint = _fingerprint(config)

    # ---------------- resume ----------------
    done, images_done, sanity_done, batches_done = 0, 0, 0, 0
    skipped: List[Dict[str, str]] = []
    elapsed_before = 0.0
    ppath = partial_path(output) if output is not None else None
    resumed_from = 0
    if ppath is not None and ppath.exists():
        if restart:
            ppath.unlink()
            log(f"--restart: discarded the partial state {ppath}")
        else:
            try:
                state = json.loads(ppath.read_text(encoding="utf-8"))
                ok = isinstance(state, dict) and "fingerprint" in state
            except Exception as e:
                raise EvaluationError(
                    f"cannot read the partial state {ppath} ({e}); remove it or use --restart"
                ) from None
            if not ok:
                raise EvaluationError(f"{ppath} is not a partial state of this runner; remove it or use --restart")
            if state["fingerprint"] != fingerprint:
                diff = _config_diff(state.get("config", {}), config)
                raise EvaluationError(
                    f"refusing to resume from {ppath}: it was written by a different configuration"
                    + (f" ({'; '.join(diff[:6])})" if diff else "")
                    + ". Use --restart (restart=True) to discard it and start over, or run the original configuration"
                )
            if int(state["done"]) > n_eval:
                raise EvaluationError(
                    f"refusing to resume from {ppath}: it has already evaluated {state['done']} samples, "
                    f"more than the {n_eval} asked for now (--limit); use --restart to start over"
                )
            done = int(state["done"])
            images_done = int(state["images"])
            sanity_done = int(state.get("sanity_images_done", 0))
            batches_done = int(state.get("batches", 0))
            skipped = list(state.get("skipped", []))
            elapsed_before = float(state.get("elapsed_s", 0.0))
            for m in methods:
                for k in metrics:
                    accs[m][k].load_state_dict(state["states"][m][k])
            resumed_from = done
            log(f"resuming from {ppath}: {done} of {n_eval} samples already done ({images_done} images evaluated)")

    def save_partial() -> None:
        if ppath is None:
            return
        atomic_write_json(ppath, _jsonable({
            "fingerprint": fingerprint,
            "config": config,
            "done": done,
            "images": images_done,
            "sanity_images_done": sanity_done,
            "batches": batches_done,
            "skipped": skipped,
            "elapsed_s": elapsed_before + (time.time() - t_start),
            "states": {m: {k: accs[m][k].state_dict() for k in metrics} for m in methods},
        }))

    # ---------------- the loop ----------------
    dataset = EvalDataset(source, preprocess)
    remaining = Subset(dataset, range(done, n_eval))
    loader = DataLoader(remaining, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                        collate_fn=collate, drop_last=False)
    images_this_run = 0
    batches_this_run = 0
    t_loop = time.time()
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n_eval, initial=done, unit="img", desc="evaluate", dynamic_ncols=True,
                    file=sys.stderr, smoothing=0.1)
    try:
        if done < n_eval:
            for batch in loader:
                for sid, err in batch["failures"]:
                    log(f"skipped {sid}: {err}")
                    skipped.append({"id": sid, "error": err})
                if batch["images"] is not None:
                    x = batch["images"].to(dev)
                    x01 = batch["images01"].to(dev)
                    masks = batch["masks"].to(dev) if batch["masks"] is not None else None
                    labels = batch["labels"].to(dev) if batch["labels"] is not None else None
                    if target == "label" and labels is None:
                        raise EvaluationError("target='label' but a batch has samples without a label")
                    b = x.shape[0]
                    n_sanity = 0
                    if "sanity" in metrics:
                        n_sanity = b if sanity_images is None else max(0, min(b, int(sanity_images) - sanity_done))
                    for m in methods:
                        maps = explainers[m](x, labels if target == "label" else None)
                        for k in metrics:
                            acc = accs[m][k]
                            if k == "segmentation":
                                acc.update(maps, masks)
                            elif k == "perturbation":
                                acc.update(x01, maps, labels)
                            elif n_sanity:
                                acc.update(x[:n_sanity])
                    sanity_done += n_sanity
                    images_done += b
                    images_this_run += b
                done += batch["n"]
                batches_done += 1
                batches_this_run += 1
                if batches_this_run % int(save_every) == 0 or done >= n_eval:
                    save_partial()
                if pbar is not None:
                    pbar.update(batch["n"])
                    if skipped:
                        pbar.set_postfix(skipped=len(skipped))
                if stop_after_batches is not None and batches_this_run >= int(stop_after_batches) and done < n_eval:
                    if pbar is not None:
                        pbar.close()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(75)  # testing aid: an abrupt end, as a kill
    finally:
        if pbar is not None:
            pbar.close()
    loop_s = time.time() - t_loop

    # ---------------- results ----------------
    records = []
    for m in methods:
        for k in metrics:
            values = accs[m][k].compute()
            if k == "sanity":
                values = _summarize_sanity(values)
            records.append({"method": m, "metric": k, "values": values})
    data_info = dict(source.describe())
    results = {
        "records": records,
        "model": model_info,
        "data": data_info,
        "data_config": config["data_config"],
        "methods": list(methods),
        "metrics": list(metrics),
        "unavailable": unavailable,
        "method_options": config["method_options"],
        "backend": backend,
        "device": str(dev),
        "batch_size": int(batch_size),
        "target": target,
        "command": list(command) if command is not None else list(sys.argv),
        "versions": _versions(),
        "counts": {
            "samples_in_data": n_total,
            "samples": n_eval,
            "images_evaluated": images_done,
            "skipped": len(skipped),
            "sanity_images": sanity_done if "sanity" in metrics else 0,
        },
        "skipped": skipped,
        "fingerprint": fingerprint,
        "run": {
            "resumed_from": resumed_from,
            "images_this_run": images_this_run,
            "batches_this_run": batches_this_run,
            "elapsed_s": time.time() - t_start,
            "total_elapsed_s": elapsed_before + (time.time() - t_start),
            "images_per_s": images_this_run / loop_s if loop_s > 0 else None,
        },
    }
    results = _jsonable(results)
    if output is not None:
        atomic_write_json(output, results)
        if ppath is not None and ppath.exists():
            ppath.unlink()
    return results


# ----------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------

_COLUMNS = (
    ("segmentation", "pixel_accuracy", "Pixel acc ↑"),
    ("segmentation", "miou", "mIoU ↑"),
    ("segmentation", "map", "mAP ↑"),
    ("perturbation", "pos_auc_predicted", "Pos. AUC ↓"),
    ("perturbation", "neg_auc_predicted", "Neg. AUC ↑"),
    ("perturbation", "pos_auc_target", "Pos. AUC tgt ↓"),
    ("perturbation", "neg_auc_target", "Neg. AUC tgt ↑"),
    ("perturbation", "aopc", "AOPC ↑"),
    ("perturbation", "lodds", "LOdds ↓"),
    ("sanity", "spearman_full_random", "Rand. ρ ↓"),
)


def format_table(results: Mapping[str, Any], digits: int = 4) -> str:
    """A markdown table (methods x metric values) of a results dict."""
    records = results["records"]
    methods: List[str] = []
    values: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in records:
        if r["method"] not in methods:
            methods.append(r["method"])
        values[(r["method"], r["metric"])] = r["values"]
    cols = [(metric, key, title) for metric, key, title in _COLUMNS
            if any(key in values.get((m, metric), {}) for m in methods)]

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    header = "| Method | " + " | ".join(t for _, _, t in cols) + " |"
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    rows = [header, sep]
    for m in methods:
        cells = [fmt(values.get((m, metric), {}).get(key)) for metric, key, _ in cols]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
