"""The evaluation loop: the shard of this rank, its ``DataLoader``, one explanation per batch and method.

The ``n`` samples are cut into global batches of ``batch_size`` consecutive
samples (the batches of a one-process run); rank ``r`` of ``W`` takes the
batches ``r, r + W, r + 2W, …``. Every image is therefore explained and
perturbed in exactly the batch it has in a one-process run, so its per-image
numbers are the same, and the merged metric states (integer counts, exact
sums) equal those of one process.

The loop runs in lock-step steps (one batch per rank per step) with one
``all_reduce`` of three integers per step (samples, images, skipped), which
gives rank 0 the global counts for its progress bar; a rank whose shard is
done takes part with zeros.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from .data import EvalDataset, collate
from .distributed import DistContext
from .errors import EvaluationError, EvaluationInterrupted
from .state import RankState

__all__ = ["Schedule", "make_loader", "run_loop", "LoopStats"]


@dataclass(frozen=True)
class Schedule:
    """Global batches of ``batch_size`` consecutive samples of ``n``, dealt round-robin to the ranks."""

    n: int
    batch_size: int
    rank: int = 0
    world_size: int = 1

    @property
    def num_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self) -> List[int]:
        """Global indices of this rank's batches, in order."""
        return list(range(self.rank, self.num_batches, self.world_size))

    def bounds(self, j: int) -> Tuple[int, int]:
        """Sample range ``[start, stop)`` of global batch ``j``."""
        return j * self.batch_size, min((j + 1) * self.batch_size, self.n)

    def samples(self, k: Optional[int] = None) -> int:
        """Samples in the first ``k`` batches of this rank (all of them for ``None``)."""
        mine = self.batches()
        return sum(b - a for a, b in (self.bounds(j) for j in mine[: len(mine) if k is None else k]))


def make_loader(dataset: EvalDataset, schedule: Schedule, first: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    """A ``DataLoader`` over this rank's batches from its ``first``-th on (decoding in the workers)."""
    batches = [list(range(*schedule.bounds(j))) for j in schedule.batches()[first:]]
    kwargs: Dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
    return DataLoader(dataset, batch_sampler=batches, num_workers=int(num_workers), collate_fn=collate,
                      pin_memory=pin_memory, **kwargs)


@dataclass
class LoopStats:
    """What this run (not earlier runs) did: global images, own batches, loop seconds."""

    images: int = 0  # images evaluated by all ranks in this run
    batches: int = 0  # batches of this rank in this run
    seconds: float = 0.0


def _process_batch(batch: Mapping[str, Any], device: torch.device, methods: Sequence[str], metrics: Sequence[str],
                   explainers: Mapping[str, Any], accs: Mapping[str, Mapping[str, Any]], target: str,
                   sanity_limit: Optional[int]) -> Tuple[int, int]:
    """Explain a batch once per method and feed every metric; returns ``(images, sanity images)``."""
    if batch["images"] is None:
        return 0, 0
    nb = device.type == "cuda"
    x = batch["images"].to(device, non_blocking=nb)
    x01 = batch["images01"].to(device, non_blocking=nb)
    masks = batch["masks"].to(device, non_blocking=nb) if batch["masks"] is not None else None
    labels = batch["labels"].to(device, non_blocking=nb) if batch["labels"] is not None else None
    if target == "label" and labels is None:
        raise EvaluationError("target='label' but a batch has samples without a label")
    b = x.shape[0]
    n_sanity = 0
    if "sanity" in metrics:  # the good images among the first `sanity_limit` samples of the data
        n_sanity = b if sanity_limit is None else sum(1 for i in batch["indices"] if i < sanity_limit)
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
    return b, n_sanity


def run_loop(
    *,
    ctx: DistContext,
    schedule: Schedule,
    state: RankState,
    dataset: EvalDataset,
    methods: Sequence[str],
    metrics: Sequence[str],
    explainers: Mapping[str, Any],
    accs: Mapping[str, Mapping[str, Any]],
    target: str,
    sanity_limit: Optional[int],
    num_workers: int,
    save_every: int,
    save: Callable[[], None],
    partial_paths: Sequence[Any],
    log: Callable[[str], None],
    progress: bool,
) -> LoopStats:
    """Evaluate the rest of this rank's shard, updating ``state`` (and saving it) after every batch.

    ``state.states`` always holds the metric states of the last completed
    batch, so Ctrl-C (``KeyboardInterrupt``) at any moment saves a consistent
    state and raises :class:`EvaluationInterrupted`; any other exception saves
    it too before it propagates.
    """
    stats = LoopStats()
    mine = schedule.batches()[state.batches:]
    steps = ctx.all_max(len(mine))
    global_done = ctx.all_sum([state.done])[0]
    pbar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        desc = "evaluate" if ctx.world_size == 1 else f"evaluate ({ctx.world_size} ranks)"
        pbar = tqdm(total=schedule.n, initial=global_done, unit="img", desc=desc, dynamic_ncols=True,
                    file=sys.stderr, smoothing=0.1)
    loader: Optional[Iterator[Dict[str, Any]]] = None
    if mine:
        loader = iter(make_loader(dataset, schedule, state.batches, num_workers,
                                  pin_memory=ctx.device.type == "cuda"))
    unsaved = 0
    skipped_total = ctx.all_sum([len(state.skipped)])[0] if pbar is not None or ctx.distributed else 0
    t0 = time.time()
    elapsed_before = state.elapsed_s
    try:
        for step in range(steps):
            consumed = images = 0
            n_skip = 0
            if step < len(mine):
                batch = next(loader)  # type: ignore[arg-type]
                for idx, (sid, err) in zip(batch["failure_indices"], batch["failures"]):
                    log(f"skipped {sid}: {err}")
                    state.skipped.append({"index": idx, "id": sid, "error": err})
                n_skip = len(batch["failures"])
                images, n_sanity = _process_batch(batch, ctx.device, methods, metrics, explainers, accs, target,
                                                  sanity_limit)
                # the batch is complete: commit it to the state
                state.states = {m: {k: accs[m][k].state_dict() for k in metrics} for m in methods}
                state.images += images
                state.sanity_images += n_sanity
                state.done += batch["n"]
                state.batches += 1
                state.elapsed_s = elapsed_before + (time.time() - t0)
                consumed = batch["n"]
                stats.batches += 1
                unsaved += 1
                if unsaved >= save_every or step == len(mine) - 1:
                    save()
                    unsaved = 0
            counts = ctx.all_sum([consumed, images, n_skip])
            stats.images += counts[1]
            skipped_total += counts[2]
            if pbar is not None:
                pbar.update(counts[0])
                if skipped_total:
                    pbar.set_postfix(skipped=skipped_total)
    except KeyboardInterrupt:
        if unsaved:
            save()
        if pbar is not None:
            pbar.close()
            pbar = None
        raise EvaluationInterrupted(partial_paths, state.done, schedule.samples()) from None
    except BaseException:  # e.g. a peer rank gone: keep the batches completed here
        if unsaved:
            try:
                save()
            except Exception:
                pass
        raise
    finally:
        if pbar is not None:
            pbar.close()
    stats.seconds = time.time() - t0
    return stats
