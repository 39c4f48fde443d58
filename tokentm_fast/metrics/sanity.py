"""Sanity check: cascading model randomization (docs/evaluation.md §4, Adebayo et al. 2018).

A deep copy of the model (the caller's model is never touched) is randomized
from the top down: stage ``k = 1 … L`` re-initializes the head modules (by
default ``norm``, ``fc_norm``, ``head`` where present) and the top ``k`` of the
``L`` blocks; a last stage re-initializes every parameter of the model
(embeddings included). At each stage the maps of ``explain_fn`` are compared
with the trained model's maps by the Spearman rank correlation per image; a
faithful method's correlation drops.

Re-initialization (seeded ``torch.Generator`` on the CPU, so identical on every
device): parameters named ``*bias`` → 0; weights of normalization layers
(LayerNorm, GroupNorm, BatchNorm, RMSNorm) → 1; every other parameter →
``trunc_normal_(std=0.02)``. Cascading: already randomized layers keep their
random weights at later stages (the last stage re-initializes only what is left).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from .exact import ExactSum

__all__ = ["spearman", "rankdata", "model_randomization_check", "SanityMetric"]

ExplainFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties get the mean of their ranks) along the last dim of ``(B, M)``; float64."""
    s, order = torch.sort(x, dim=1, stable=True)
    b, m = s.shape
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    gid = torch.cumsum(new.long(), dim=1) - 1
    pos = torch.arange(m, device=x.device, dtype=torch.float64).expand(b, m)
    first = torch.full((b, m), float(m), dtype=torch.float64, device=x.device).scatter_reduce(1, gid, pos, "amin")
    last = torch.full((b, m), -1.0, dtype=torch.float64, device=x.device).scatter_reduce(1, gid, pos, "amax")
    avg = (torch.gather(first, 1, gid) + torch.gather(last, 1, gid)) / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row: ``(B, M), (B, M) -> (B,)`` float64.

    Average ranks for ties (as ``scipy.stats.spearmanr``); a constant row gives ``NaN``.
    Inputs with more than two dims are flattened to ``(B, -1)``.
    """
    a = a.detach().reshape(a.shape[0], -1)
    b = b.detach().reshape(b.shape[0], -1).to(a.device)
    ra, rb = rankdata(a), rankdata(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    num = (ra * rb).sum(dim=1)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, float("nan")))


def _get_attr(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def _reinit_(module: nn.Module, gen: torch.Generator, done: set) -> None:
    """Re-initialize every parameter of ``module`` not in ``done`` (ids) from ``gen``; add them to ``done``."""
    for mod in module.modules():
        is_norm = isinstance(mod, _NORMS)
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if name.endswith("bias"):
                p.zero_()
            elif is_norm:
                p.fill_(1.0)
            else:
                t = torch.empty(p.shape, dtype=torch.float32)
                nn.init.trunc_normal_(t, std=0.02, generator=gen)
                p.copy_(t)


def _cascade(
    model: nn.Module, blocks_attr: str, head_attrs: Sequence[str], seed: int
) -> Iterator[Tuple[Dict[str, object], nn.Module]]:
    """Yield ``(info, randomized_copy)`` per stage; the copy is the same object, randomized further."""
    work = copy.deepcopy(model)
    blocks = list(_get_attr(work, blocks_attr))
    n_blocks = len(blocks)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    done: set = set()
    for attr in head_attrs:
        mod = getattr(work, attr, None)
        if isinstance(mod, nn.Module):
            _reinit_(mod, gen, done)
    for k in range(1, n_blocks + 1):
        _reinit_(blocks[n_blocks - k], gen, done)
        yield {"randomized_blocks": k, "embeddings": False}, work
    _reinit_(work, gen, done)  # the rest: embeddings, tokens, anything else
    yield {"randomized_blocks": n_blocks, "embeddings": True}, work


def _maps(explain_fn: ExplainFn, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = explain_fn(model, images)
    return out.detach().reshape(out.shape[0], -1)


def _per_image_correlations(
    model: nn.Module,
    images: torch.Tensor,
    explain_fn: ExplainFn,
    blocks_attr: str,
    head_attrs: Sequence[str],
    seed: int,
) -> List[Tuple[Dict[str, object], torch.Tensor]]:
    trained = _maps(explain_fn, copy.deepcopy(model), images)
    return [(info, spearman(trained, _maps(explain_fn, m, images))) for info, m in _cascade(model, blocks_attr, head_attrs, seed)]


def model_randomization_check(
    model: nn.Module,
    images: torch.Tensor,
    explain_fn: ExplainFn,
    blocks_attr: str = "blocks",
    seed: int = 0,
    head_attrs: Sequence[str] = ("norm", "fc_norm", "head"),
) -> List[Dict[str, object]]:
    """Cascading model randomization on one batch.

    Args:
        model: the trained model (left unchanged; all work is on deep copies).
        images: model inputs ``(B, C, H, W)``.
        explain_fn: ``(model, images) -> maps (B, gh, gw)``.
        blocks_attr: (dotted) attribute holding the ordered blocks, bottom first.
        seed: seed of the re-initialization generator.
        head_attrs: modules above the blocks randomized from the first stage on.

    Returns:
        ``L + 1`` dicts ``{"randomized_blocks": k, "embeddings": bool, "spearman": float}``:
        ``k = 1 … L`` (head + top ``k`` blocks), then the fully randomized model
        (``randomized_blocks = L, embeddings = True``). ``spearman`` is the mean over
        images of the per-image correlation with the trained maps (images whose
        correlation is undefined, a constant map, are left out; NaN if all are).
    """
    out = []
    for info, r in _per_image_correlations(model, images, explain_fn, blocks_attr, head_attrs, seed):
        out.append({**info, "spearman": float(torch.nanmean(r))})
    return out


class SanityMetric:
    """Streaming model-randomization check: ``update(images)`` per batch, ``compute()`` per stage.

    The randomized copies are rebuilt on every update from the same seed, so every
    batch sees the same randomized weights and only one copy is alive at a time.
    ``compute()`` returns ``{"stages": [{"randomized_blocks", "embeddings", "spearman"}, ...]}``
    with the mean correlation over all images with a defined correlation.
    """

    def __init__(
        self,
        model: nn.Module,
        explain_fn: ExplainFn,
        blocks_attr: str = "blocks",
        seed: int = 0,
        head_attrs: Sequence[str] = ("norm", "fc_norm", "head"),
    ) -> None:
        self.model = model
        self.explain_fn = explain_fn
        self.blocks_attr = blocks_attr
        self.seed = int(seed)
        self.head_attrs = tuple(head_attrs)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.stages: List[Dict[str, object]] = []
        self.sums: List[ExactSum] = []  # per stage: Σ of the per-image correlations, exact
        self.counts: List[int] = []

    def update(self, images: torch.Tensor) -> None:
        """Accumulate the per-image correlations of a batch ``(B, C, H, W)``."""
        results = _per_image_correlations(self.model, images, self.explain_fn, self.blocks_attr, self.head_attrs, self.seed)
        if not self.stages:
            self.stages = [dict(info) for info, _ in results]
            self.sums = [ExactSum() for _ in results]
            self.counts = [0] * len(results)
        for i, (_, r) in enumerate(results):
            ok = ~torch.isnan(r)
            self.sums[i].add(r[ok])
            self.counts[i] += int(ok.sum())

    def compute(self) -> Dict[str, object]:
        """Mean correlation per stage."""
        return {
            "stages": [
                {**info, "spearman": s.mean(c) if c else float("nan")}
                for info, s, c in zip(self.stages, self.sums, self.counts)
            ]
        }

    def state_dict(self) -> Dict[str, object]:
        """Plain-python (JSON-serialisable) accumulator state."""
        return {"seed": self.seed, "stages": [dict(s) for s in self.stages], "sums": [s.to_state() for s in self.sums],
                "counts": list(self.counts)}

    def load_state_dict(self, d: Dict[str, object]) -> None:
        """Restore a state from :meth:`state_dict` (the seed must match)."""
        if int(d["seed"]) != self.seed:
            raise ValueError(f"state seed {d['seed']} != metric seed {self.seed}")
        self.stages = [dict(s) for s in d["stages"]]
        self.sums = [ExactSum.from_state(v) for v in d["sums"]]
        self.counts = [int(v) for v in d["counts"]]

    def merge_state_dict(self, d: Dict[str, object]) -> None:
        """Add the state of another shard (same seed): per-stage counts and exact sums add up."""
        if int(d["seed"]) != self.seed:
            raise ValueError(f"state seed {d['seed']} != metric seed {self.seed}")
        if not d["stages"]:
            return
        if not self.stages:
            self.load_state_dict(d)
            return
        if [dict(s) for s in d["stages"]] != self.stages:
            raise ValueError("cannot merge sanity states of different randomization stages")
        for s, v in zip(self.sums, d["sums"]):
            s.merge(ExactSum.from_state(v))
        self.counts = [a + int(c) for a, c in zip(self.counts, d["counts"])]
