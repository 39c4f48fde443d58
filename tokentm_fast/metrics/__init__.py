"""Evaluation metrics for explanation maps (docs/evaluation.md §1–§4).

Every metric is a streaming accumulator: ``update(...)`` per batch,
``compute()`` -> dict, ``state_dict()`` / ``load_state_dict()`` with plain
JSON-serialisable python numbers (to save partial results and resume), and
``merge_state_dict()`` to add the state of another shard: counts are integers
and sums exact (:class:`ExactSum`), so merged shards give exactly the numbers
of one pass over the whole data set.
"""
from .exact import ExactSum
from .perturbation import DEFAULT_FRACTIONS, PerturbationMetric, auc, num_removed, relevance_ranks
from .sanity import SanityMetric, model_randomization_check, rankdata, spearman
from .segmentation import SegmentationMetric, average_precision, minmax_normalize, upsample_maps

__all__ = [
    "ExactSum",
    "SegmentationMetric",
    "PerturbationMetric",
    "SanityMetric",
    "model_randomization_check",
    "spearman",
    "rankdata",
    "average_precision",
    "minmax_normalize",
    "upsample_maps",
    "num_removed",
    "relevance_ranks",
    "auc",
    "DEFAULT_FRACTIONS",
]
