"""Evaluation runner: every explanation method x every metric over a data set.

``evaluate(model, data, methods, metrics, ...)`` (see :mod:`.runner`) with the
data sources of :mod:`.data` (synthetic benchmark, ImageNet-style folder,
``gtsegs_ijcv.mat``); ``format_table(results)`` prints the results.

Modules: :mod:`.checkpoint` (device, checkpoint files, models), :mod:`.data`
(sources, preprocessing), :mod:`.state` (the resumable per-rank state),
:mod:`.loop` (shards, ``DataLoader``, the batch loop), :mod:`.distributed`
(``torchrun`` / ``torch.distributed``), :mod:`.report` (merging, results,
table), :mod:`.runner` (``evaluate``, which ties them together).
"""
from .checkpoint import load_model, read_checkpoint, resolve_device
from .data import (
    DataError,
    EvalDataset,
    FolderSource,
    MatSource,
    Preprocess,
    SyntheticSource,
    collate,
    make_source,
    model_data_config,
    parse_data_spec,
)
from .errors import EvaluationError, EvaluationInterrupted
from .report import format_table
from .runner import METRICS, evaluate
from .state import partial_path

__all__ = [
    "evaluate",
    "format_table",
    "load_model",
    "read_checkpoint",
    "partial_path",
    "METRICS",
    "EvaluationError",
    "EvaluationInterrupted",
    "resolve_device",
    "DataError",
    "EvalDataset",
    "Preprocess",
    "SyntheticSource",
    "FolderSource",
    "MatSource",
    "collate",
    "make_source",
    "model_data_config",
    "parse_data_spec",
]
