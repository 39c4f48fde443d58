"""Exceptions of the evaluation runner."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["EvaluationError", "EvaluationInterrupted"]


class EvaluationError(ValueError):
    """A problem with the user's input (model, checkpoint, data, resume state); the message says what.

    ``every_rank`` is True when every process of a ``torchrun`` run raises the
    same error (an argument, a missing device, an error the ranks agreed on):
    the command line then lets rank 0 alone report it.
    """

    every_rank: bool = False


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`~tokentm_fast.evaluation.evaluate`, after the resumable state was saved.

    Attributes:
        partial_paths: the partial-state file(s) of this process (one per rank).
        done: samples of this process's shard already evaluated (saved).
        total: samples of this process's shard.
    """

    def __init__(self, partial_paths: Sequence[Path], done: int, total: int) -> None:
        self.partial_paths = [Path(p) for p in partial_paths]
        self.done = int(done)
        self.total = int(total)
        where = ", ".join(str(p) for p in self.partial_paths) or "nowhere (no output file)"
        super().__init__(f"interrupted after {self.done} of {self.total} samples; state saved in {where}")
