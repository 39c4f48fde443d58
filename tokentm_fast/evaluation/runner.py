"""The evaluation runner: every method x every metric over a data set, resumable, on one or many processes.

``evaluate(model, data, methods, metrics, ...)`` loads the model
(:mod:`.checkpoint`), reads the data (:mod:`.data`) with a ``DataLoader``
(decoding in the workers), explains each batch **once** per method and feeds
that map to every metric (:mod:`.loop`), keeps a resumable state
(:mod:`.state`) and writes a results JSON with one record per (method,
metric) (:mod:`.report`).

One process, or ``torchrun --nproc_per_node=N -m tokentm_fast evaluate ...``
(:mod:`.distributed`): each rank evaluates a deterministic shard of the
global batches and keeps its own resumable state; rank 0 merges the metric
states (integer counts and exact sums) into exactly the numbers of one
process and writes the results.

Resuming: after every ``save_every`` batches (and on Ctrl-C) the state of a
rank is written atomically to ``<output>.partial`` (one process) or
``<output>.partial.rank<r>-of-<W>``. The same command started again
continues after the batches already done and ends with exactly the numbers
of an uninterrupted run; another configuration or another number of
processes is refused unless ``restart=True``. The partial states are removed
once the results are written.

A sample that fails to load (a corrupt image) is logged as
``skipped <id>: <error>``, left out and listed in the results.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union
from warnings import catch_warnings, simplefilter

import torch
from torch import nn

from ..api import Explainer
from ..maps import ConstantMapWarning
from ..methods import METHODS, check_method
from . import distributed
from .checkpoint import DTYPES, load_model, read_checkpoint, resolve_device, resolve_dtype
from .data import PREPROCESS_MODES, DataError, EvalDataset, Preprocess, make_source, model_data_config
from .errors import EvaluationError, EvaluationInterrupted
from .loop import Schedule, run_loop
from .outputs import OutputError, OutputLock, refuse_link
from .report import build_results, format_table, merge_rank_states
from .state import (
    STATE_VERSION,
    RankState,
    atomic_write_json,
    check_world_size,
    config_fingerprint,
    discard_partials,
    jsonable,
    load_state,
    partial_path,
    save_state,
)

__all__ = [
    "EvaluationError",
    "EvaluationInterrupted",
    "METRICS",
    "DTYPES",
    "evaluate",
    "load_model",
    "read_checkpoint",
    "resolve_device",
    "format_table",
    "atomic_write_json",
    "partial_path",
]

METRICS = ("segmentation", "perturbation", "sanity")
DEFAULT_MAX_FORWARD_BATCH = 256


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


def _class_mapping_warning(source: Any, net: nn.Module) -> Optional[str]:
    """A warning if a labelled folder has fewer classes than the model (an error if it has more)."""
    classes = getattr(source, "classes", None)
    k = getattr(net, "num_classes", None)
    if not classes or not isinstance(k, int) or k <= 0 or len(classes) == k:
        return None
    shown = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:5])) + (", ..." if len(classes) > 5 else "")
    if len(classes) > k:
        raise EvaluationError(
            f"the data has {len(classes)} class folders but the model has {k} classes: labels {k}..{len(classes) - 1} "
            f"cannot be right; the labels are the positions of the sorted folder names ({shown})"
        )
    return (f"the data has {len(classes)} class folders but the model has {k} classes: label i is the i-th folder "
            f"name in sorted order ({shown}); the 'target' metrics are right only if these are the model's class "
            "indices (the mapping is in the results under data.class_to_idx)")


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
    dtype: Optional[Union[str, torch.dtype]] = None,
    limit: Optional[int] = None,
    output: Optional[Union[str, os.PathLike]] = "results.json",
    backend: str = "auto",
    num_workers: Optional[int] = None,
    max_forward_batch: Optional[int] = DEFAULT_MAX_FORWARD_BATCH,
    progress: bool = True,
    restart: bool = False,
    save_every: int = 1,
    method_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    target: str = "predicted",
    sanity_images: Optional[int] = 32,
    sanity_seed: int = 0,
    command: Optional[Sequence[str]] = None,
    log: Optional[Callable[[str], None]] = None,
    preprocess: str = "crop",
) -> Dict[str, Any]:
    """Evaluate ``methods`` x ``metrics`` on a data set; returns (and writes) the results.

    Args:
        model: ``"synthetic"``, a timm model name (with ``checkpoint``) or a module.
        data: ``"synthetic"`` (``split``, ``size``, ``seed``), ``"folder:PATH"``
            (ImageNet-style folder), ``"mat:PATH"`` (``gtsegs_ijcv.mat``) or a source
            object from :mod:`tokentm_fast.evaluation.data`.
        methods: names from ``tokentm_fast.METHODS`` (list or comma-separated string).
        metrics: ``"segmentation"`` (needs masks), ``"perturbation"`` (AUCs, AOPC,
            LOdds, curves), ``"sanity"`` (model randomization, on the good images
            among the first ``sanity_images`` samples; ``None`` = all).
        batch_size, device, backend: batching, where to run (under ``torchrun``
            ``"cuda"`` means each rank's ``cuda:LOCAL_RANK``), explanation backend.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the model is cast to
            it (explanations and perturbation forward passes run in it; a module
            passed as ``model`` is copied first). ``None`` (default): the model's own
            dtype (float32 for a loaded checkpoint).
        num_workers: ``DataLoader`` workers (decoding and preprocessing); default:
            the CPU cores available to the process divided among the local ranks.
        max_forward_batch: most images per forward pass of the perturbation test
            (the clean batch and its 18 perturbed copies are packed into passes of
            this size); ``None``: one pass per perturbation.
        limit: evaluate only the first ``limit`` samples.
        output: results JSON path (``None``: nothing written, no resume).
        restart: discard a partial state left by an interrupted run of another
            configuration (or another number of processes).
        save_every: save the partial state every this many batches.
        method_options: per-method options, e.g. ``{"tokentm": {"start_layer": 1}}``.
        target: explain the ``"predicted"`` class (default) or the ``"label"``.
        preprocess: ``"crop"`` (default: timm's evaluation transform, resize and centre
            crop) or ``"resize"`` (the whole image resized to the model's input size);
            recorded in the results under ``preprocessing``.
        log: where messages go (default: stderr; ranks other than 0 prefix ``[rank r]``).

    Returns:
        The results dict (also written to ``output`` by rank 0): ``records`` (one
        per method x metric with its ``values``), ``model``, ``data``, ``command``,
        ``versions``, ``counts``, ``skipped``, ``unavailable``, ``warnings``,
        ``world_size``, ``ranks`` (samples and images per rank), ``run``.

    Output files: a symbolic link at ``output``, at a partial-state file or at the
    lock file is refused; every file is written to a temporary file and renamed
    over the target (:mod:`.outputs`). While it runs, the evaluation holds an
    exclusive lock on ``<output>.lock`` (rank 0 under ``torchrun``): a second
    evaluation of the same ``output`` stops at once, naming the process that
    holds it.

    Raises:
        EvaluationError: a problem with the arguments, the data or the resume state,
            or another evaluation holding the lock of ``output``.
        OutputError: an output file cannot be written (a full disk...); the
            message names the file, the last saved state is intact.
        EvaluationInterrupted: Ctrl-C; the state was saved and the same call resumes it.
    """
    t_start = time.time()
    try:
        return _checked_evaluate(t_start, model, data, methods, metrics, checkpoint=checkpoint,
                                 num_classes=num_classes, model_kwargs=model_kwargs, split=split, size=size,
                                 seed=seed, batch_size=batch_size, device=device, dtype=dtype, limit=limit,
                                 output=output, backend=backend, num_workers=num_workers,
                                 max_forward_batch=max_forward_batch, progress=progress, restart=restart,
                                 save_every=save_every, method_options=method_options, target=target,
                                 sanity_images=sanity_images, sanity_seed=sanity_seed, command=command, log=log,
                                 preprocess=preprocess)
    except _EveryRank as e:  # raised before the ranks could talk: the same on every rank
        err = e.error
        err.every_rank = True
        raise err from None


class _EveryRank(Exception):
    """Carries an error that every rank raises alike (checks of the arguments, the device, joining the group)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _checked_evaluate(t_start, model, data, methods, metrics, *, checkpoint, num_classes, model_kwargs, split, size,
                      seed, batch_size, device, dtype, limit, output, backend, num_workers, max_forward_batch,
                      progress, restart, save_every, method_options, target, sanity_images, sanity_seed, command,
                      log, preprocess) -> Dict[str, Any]:
    try:
        methods, metrics, torch_dtype, requested, method_options = _check_arguments(
            methods, metrics, target, batch_size, limit, save_every, max_forward_batch, num_workers, dtype, device,
            method_options, preprocess)
        ctx = distributed.setup(requested)
    except ValueError as e:
        raise _EveryRank(e) from None
    try:
        return _evaluate(ctx, t_start, requested, torch_dtype, model, data, methods, metrics, checkpoint=checkpoint,
                         num_classes=num_classes, model_kwargs=model_kwargs, split=split, size=size, seed=seed,
                         batch_size=int(batch_size), limit=limit, output=output, backend=backend,
                         num_workers=num_workers, max_forward_batch=max_forward_batch, progress=progress,
                         restart=restart, save_every=int(save_every), method_options=method_options,
                         target=target, sanity_images=sanity_images, sanity_seed=sanity_seed, command=command,
                         log=log, preprocess=preprocess)
    finally:
        ctx.close()


def _check_arguments(methods, metrics, target, batch_size, limit, save_every, max_forward_batch, num_workers, dtype,
                     device, method_options, preprocess):
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
    if max_forward_batch is not None and int(max_forward_batch) < 1:
        raise EvaluationError(f"max_forward_batch must be >= 1 (or None), got {max_forward_batch}")
    if num_workers is not None and int(num_workers) < 0:
        raise EvaluationError(f"num_workers must be >= 0, got {num_workers}")
    if preprocess not in PREPROCESS_MODES:
        raise EvaluationError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    torch_dtype = None if dtype is None else resolve_dtype(dtype)
    requested = resolve_device(device)
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    for k in method_options:
        check_method(k)
    return methods, metrics, torch_dtype, requested, method_options


def _resume(ctx: distributed.DistContext, output, ppath: Optional[Path], restart: bool, fingerprint: str,
            config: Mapping[str, Any], schedule: Schedule, accs: Mapping[str, Mapping[str, Any]],
            log: Callable[[str], None], info: Callable[[str], None]) -> RankState:
    """This rank's state: resumed from its partial file (metric states loaded into ``accs``) or a new one.

    Every rank checks its own file; an error on any rank (another configuration,
    another world size, a shorter ``--limit``, an unreadable file) is raised on all.
    """
    state: Optional[RankState] = None
    error: Optional[str] = None
    if ppath is not None and ppath.is_symlink():
        error = str(OutputError(f"the resumable state {ppath} (--output) is a symbolic link to {os.readlink(ppath)}; "
                                "refusing to use it: remove the link"))
    elif output is not None:
        if restart:
            removed = discard_partials(output)
            if removed:
                log(f"--restart: discarded the partial state {', '.join(map(str, removed))}")
            ctx.barrier()  # nobody writes a new state before every old one is gone
        else:
            error = check_world_size(output, ctx.world_size)
            if error is None:
                state, error = load_state(ppath, fingerprint, config, ctx.rank, ctx.world_size)
            if state is not None and (state.batches > len(schedule.batches())
                                      or schedule.samples(state.batches) != state.done):
                error = (f"refusing to resume from {ppath}: it has already evaluated {state.done} samples, "
                         f"more than (or not the batches of) the {schedule.n} asked for now (--limit); "
                         "use --restart to start over")
    ctx.agree(error)
    if state is not None:
        try:
            for m, per_metric in accs.items():
                for k, acc in per_metric.items():
                    acc.load_state_dict(state.states[m][k])
        except (KeyError, TypeError, ValueError) as e:
            error = f"the partial state {ppath} does not fit this run ({type(e).__name__}: {e}); use --restart"
    ctx.agree(error)
    resumed = state is not None
    if state is None:
        state = RankState(states={m: {k: acc.state_dict() for k, acc in pm.items()} for m, pm in accs.items()})
    done, images = ctx.all_sum([state.done, state.images])
    if ctx.all_max(int(resumed)):
        where = ppath if not ctx.distributed else f"{output}.partial.rank*-of-{ctx.world_size}"
        info(f"resuming from {where}: {done} of {schedule.n} samples already done ({images} images evaluated)")
    return state


def _evaluate(ctx: distributed.DistContext, t_start: float, requested: torch.device, dtype: Optional[torch.dtype],
              model: Any, data: Any, methods: List[str], metrics: List[str], *, checkpoint, num_classes,
              model_kwargs, split, size, seed, batch_size: int, limit, output, backend, num_workers,
              max_forward_batch, progress, restart, save_every: int, method_options, target, sanity_images,
              sanity_seed, command, log, preprocess) -> Dict[str, Any]:
    if log is None:
        prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""

        def log(msg: str) -> None:
            print(prefix + msg, file=sys.stderr, flush=True)

    # ---------------- the lock of the output (rank 0 takes it for the run) ----------------
    lock: Optional[OutputLock] = None
    error: Optional[str] = None
    if output is not None and ctx.is_main:
        try:
            refuse_link(output, "--output", "results file")
            lock = OutputLock(output, "--output").acquire()
            if lock.unsupported:
                log(f"note: {output} is not locked against a second evaluation: {lock.unsupported}")
        except OutputError as e:
            error = str(e)
    try:
        ctx.agree(error)
        return _evaluate_locked(ctx, t_start, requested, dtype, model, data, methods, metrics,
                                checkpoint=checkpoint, num_classes=num_classes, model_kwargs=model_kwargs,
                                split=split, size=size, seed=seed, batch_size=batch_size, limit=limit, output=output,
                                backend=backend, num_workers=num_workers, max_forward_batch=max_forward_batch,
                                progress=progress, restart=restart, save_every=save_every,
                                method_options=method_options, target=target, sanity_images=sanity_images,
                                sanity_seed=sanity_seed, command=command, log=log, preprocess=preprocess)
    finally:
        if lock is not None:
            lock.release()


def _evaluate_locked(ctx: distributed.DistContext, t_start: float, requested: torch.device,
                     dtype: Optional[torch.dtype], model: Any, data: Any, methods: List[str], metrics: List[str], *,
                     checkpoint, num_classes, model_kwargs, split, size, seed, batch_size: int, limit, output,
                     backend, num_workers, max_forward_batch, progress, restart, save_every: int, method_options,
                     target, sanity_images, sanity_seed, command, log, preprocess) -> Dict[str, Any]:
    info: Callable[[str], None] = log if ctx.is_main else (lambda msg: None)  # said once, by rank 0
    dev = ctx.device

    def prepare():
        # ---------------- model, data, metrics ----------------
        nonlocal dtype, metrics
        net, model_info = load_model(model, checkpoint=checkpoint, num_classes=num_classes,
                                     model_kwargs=model_kwargs)
        own = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        if dtype is not None and dtype != own:
            if isinstance(model, nn.Module):
                net = copy.deepcopy(net)  # never change the caller's module
            net = net.to(dtype)
        dtype = dtype or own
        net = net.to(dev).eval()
        explainers = {m: Explainer(net, method=m, backend=backend, **method_options.get(m, {})) for m in methods}
        data_config = model_data_config(net)
        pre = Preprocess(data_config, preprocess)
        try:
            source = make_source(data, split=split, size=size, seed=seed)
        except DataError as e:
            raise EvaluationError(str(e)) from None
        n_total = len(source)
        n_eval = min(n_total, int(limit)) if limit is not None else n_total

        warnings: List[str] = []
        unavailable: Dict[str, str] = {}
        if "segmentation" in metrics and not source.has_masks:
            unavailable["segmentation"] = f"the {source.kind} data source has no masks"
            info(f"segmentation metric unavailable: the {source.kind} data source has no masks; skipping it")
            metrics = [m for m in metrics if m != "segmentation"]
        if target == "label" and not source.has_labels:
            raise EvaluationError(f"target='label' needs labels, and the {source.kind} data source has none")
        if not metrics:
            raise EvaluationError("no metric left to compute: "
                                  + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
        warning = _class_mapping_warning(source, net)
        if warning:
            warnings.append(warning)
            info(f"warning: {warning}")

        from ..metrics import PerturbationMetric, SanityMetric, SegmentationMetric

        def make_metric(method: str, metric: str):
            if metric == "segmentation":
                return SegmentationMetric()
            if metric == "perturbation":
                return PerturbationMetric(net, pre.normalize, max_forward_batch=max_forward_batch)
            opts = method_options.get(method, {})

            def explain_fn(m: nn.Module, images: torch.Tensor) -> torch.Tensor:
                # the sanity check's randomised models give constant maps by design: not worth a warning
                with catch_warnings():
                    simplefilter("ignore", ConstantMapWarning)
                    return Explainer(m, method=method, backend=backend, **opts)(images)

            return SanityMetric(net, explain_fn, seed=sanity_seed)

        accs = {m: {k: make_metric(m, k) for k in metrics} for m in methods}

        config = jsonable({
            "version": STATE_VERSION,
            "model": dict(model_info),
            "data": source.describe(),
            "data_config": {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct",
                                                        "crop_mode") if k in data_config},
            "methods": list(methods),
            "method_options": {m: explainers[m].options for m in methods},
            "metrics": list(metrics),
            "backend": backend,
            "batch_size": batch_size,
            "device": str(requested),
            "dtype": str(dtype).replace("torch.", ""),
            "target": target,
            "sanity": {"images": sanity_images, "seed": sanity_seed} if "sanity" in metrics else None,
            # only when not the default, so that the states of earlier versions still resume
            **({"preprocess": preprocess} if preprocess != "crop" else {}),
        })
        fingerprint = config_fingerprint(config)
        return (net, model_info, dtype, explainers, data_config, pre, source, n_total, n_eval, metrics, warnings,
                unavailable, make_metric, accs, config, fingerprint)

    if ctx.distributed:
        # an error of the set-up (a corrupt checkpoint, a missing folder) is agreed on by every rank, so that
        # rank 0 alone reports it and no rank waits for the others in a collective
        try:
            prepared, error = prepare(), None
        except Exception as e:
            prepared, error = None, (str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}")
        ctx.agree(error)
    else:
        prepared = prepare()
    (net, model_info, dtype, explainers, data_config, pre, source, n_total, n_eval, metrics, warnings, unavailable,
     make_metric, accs, config, fingerprint) = prepared

    # ---------------- resume state ----------------
    schedule = Schedule(n_eval, batch_size, ctx.rank, ctx.world_size)
    ppath = partial_path(output, ctx.rank, ctx.world_size) if output is not None else None
    state = _resume(ctx, output, ppath, restart, fingerprint, config, schedule, accs, log, info)

    def save() -> None:
        if ppath is not None:
            save_state(ppath, fingerprint, config, ctx.rank, ctx.world_size, state)

    # ---------------- the loop ----------------
    elapsed_before = state.elapsed_s
    resumed_from = ctx.all_sum([state.done])[0]
    workers = distributed.default_workers(ctx.local_world_size) if num_workers is None else int(num_workers)
    stats = run_loop(
        ctx=ctx, schedule=schedule, state=state, dataset=EvalDataset(source, pre), methods=methods,
        metrics=metrics, explainers=explainers, accs=accs, target=target,
        sanity_limit=None if sanity_images is None else int(sanity_images), num_workers=workers,
        save_every=save_every, save=save, partial_paths=[ppath] if ppath is not None else [], log=log,
        progress=progress,
    )

    # ---------------- merge and report ----------------
    mine = {"states": state.states, "samples": state.done, "images": state.images,
            "sanity_images": state.sanity_images, "skipped": state.skipped, "device": str(dev),
            "elapsed_before_s": elapsed_before, "batches_this_run": stats.batches}
    ranks = ctx.all_gather(mine)
    merged = merge_rank_states(make_metric, methods, metrics, [r["states"] for r in ranks])
    elapsed = time.time() - t_start
    run = {
        "resumed_from": resumed_from,
        "images_this_run": stats.images,
        "batches_this_run": sum(r["batches_this_run"] for r in ranks),
        "elapsed_s": elapsed,
        "total_elapsed_s": elapsed + max(r["elapsed_before_s"] for r in ranks),
        "images_per_s": stats.images / stats.seconds if stats.seconds > 0 else None,
        "workers_per_rank": workers,
    }
    results = build_results(
        accs=merged, methods=methods, metrics=metrics, config=config, fingerprint=fingerprint,
        model_info=model_info, data_info=source.describe(), unavailable=unavailable, warnings=warnings,
        ranks=ranks, n_total=n_total, command=command, run=run,
        extra={"max_forward_batch": max_forward_batch, "preprocessing": pre.describe()},
    )
    if output is not None:
        if ctx.is_main:
            atomic_write_json(output, results, option="--output", what="results")
        ctx.barrier()  # the results are on disk before any state is removed
        if ppath is not None and ppath.exists():
            ppath.unlink()
    return results
