"""Evaluation runner: every explanation method x every metric over a data set.

``evaluate(model, data, methods, metrics, ...)`` (see :mod:`.runner`) with the
data sources of :mod:`.data` (synthetic benchmark, ImageNet-style folder,
``gtsegs_ijcv.mat``); ``format_table(results)`` prints the results.
"""
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
from .runner import METRICS, EvaluationError, evaluate, format_table, load_model, partial_path, read_checkpoint

__all__ = [
    "evaluate",
    "format_table",
    "load_model",
    "read_checkpoint",
    "partial_path",
    "METRICS",
    "EvaluationError",
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
