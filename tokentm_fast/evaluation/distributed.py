"""``torch.distributed`` for the evaluation runner: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node=N -m tokentm_fast evaluate ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; :func:`setup` joins the
process group (``nccl`` for CUDA devices, ``gloo`` on the CPU) and puts each
rank on the device of its ``LOCAL_RANK``. Without those variables (a plain
``python -m tokentm_fast evaluate``) it returns a one-process context whose
collectives are no-ops, so the runner has one code path.

The runner uses the collectives for small things only: the number of steps of
the loop, one integer pair per step for the global progress, an agreement on
errors before the loop (so that every rank stops with the same message), and
the final gather of the metric states (a few numbers per method and metric).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from .errors import EvaluationError

__all__ = ["DistContext", "setup", "default_workers"]


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        raise EvaluationError(f"environment variable {name}={v!r} is not an integer") from None


@dataclass
class DistContext:
    """Where this process stands in the run: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group
    owns_group: bool = False  # this context initialized the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist

        return dist

    def _tensor(self, values: Sequence[int]) -> torch.Tensor:
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(list(values), dtype=torch.int64, device=dev)

    def all_sum(self, values: Sequence[int]) -> List[int]:
        """Element-wise sum of integer lists over the ranks."""
        if not self.distributed:
            return [int(v) for v in values]
        t = self._tensor(values)
        self._dist().all_reduce(t, op=self._dist().ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def all_max(self, value: int) -> int:
        """Largest ``value`` over the ranks."""
        if not self.distributed:
            return int(value)
        t = self._tensor([value])
        self._dist().all_reduce(t, op=self._dist().ReduceOp.MAX)
        return int(t.item())

    def all_gather(self, obj: Any) -> List[Any]:
        """``obj`` of every rank (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        self._dist().all_gather_object(out, obj)
        return out

    def agree(self, error: Optional[str]) -> None:
        """Raise :class:`EvaluationError` on every rank if any rank has an ``error`` (message of the first)."""
        errors = self.all_gather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, e = bad[0]
            err = EvaluationError(e if not self.distributed or r == 0 else f"rank {r}: {e}")
            err.every_rank = True  # the same message on every rank: rank 0 alone needs to say it
            raise err

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                self._dist().barrier(device_ids=[self.device.index])
            else:
                self._dist().barrier()

    def close(self) -> None:
        """Leave the process group if this context joined it."""
        if self.owns_group:
            dist = self._dist()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device) -> DistContext:
    """The context of this process; joins the ``torchrun`` process group when there is one.

    Args:
        device: the requested device (``cpu`` or ``cuda``). Under ``torchrun``
            with a CUDA device each rank takes ``cuda:LOCAL_RANK`` (an explicit
            index is refused: it would put every rank on one GPU).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=device)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device.type == "cuda":
        if device.index is not None:
            raise EvaluationError(
                f"--device {device} under torchrun: give --device cuda, every rank then uses cuda:LOCAL_RANK"
            )
        if local_rank >= torch.cuda.device_count():
            raise EvaluationError(
                f"rank {rank} has LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise EvaluationError(f"distributed evaluation runs on cpu (gloo) or cuda (nccl), not on {device}")
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise EvaluationError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank} / WORLD_SIZE={world}"
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                       device=device, backend=backend, owns_group=owns)


def default_workers(local_world_size: int = 1) -> int:
    """``DataLoader`` workers of one rank: the CPU cores available to this process divided among the local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(local_world_size)))
