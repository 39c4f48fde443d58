"""Targets: which score an explanation explains (the score s of every method).

A target is one of

- ``None``: the predicted class, the argmax of each image's logits
  (classifiers only);
- an ``int`` or a ``(B,)`` integer tensor: that class's logit;
- a **score function**: a callable mapping the model output — ``(B, K)``
  logits, or the ``(B, D')`` embedding of a feature model — to one score per
  image, a ``(B,)`` floating tensor differentiable in the output. Ready-made:
  :func:`class_logit` and :func:`cosine_similarity`;
- **several targets per image** (one call, ``(B, K, ...)`` maps, map ``[:, k]``
  for target k): a ``(B, K)`` integer tensor (K classes per image) or a list of
  K score functions (:func:`check_targets`).

TokenTM, GAE and attention Grad-CAM explain ``s = score(output)``; LeGrad's
per-layer score is ``s_l = score(head(Xˡ))``, the model's own head applied to
layer l's tokens and then the same function (so a function that picks a class
from its input, e.g. its argmax, picks it per layer, whereas ``target=None``
uses the final prediction for every layer). Rollout and raw attention do not
use the target.

A score function must treat the images of the batch independently (image b's
score reads only row b of the output): the explanation of a batch is computed
from the sum of its scores. This is checked at the first call of each score
function on a batch of B > 1 images (one extra backward of the first and the
last image's score to the model output, whose gradient on every other row must
be exactly zero); a function that mixes images is refused with a ``ValueError``.
The ready-made functions are independent by construction and are not checked. It receives the output in the dtype the backend
runs in (float64 for ``backend="reference"``), so a function that captures
tensors should cast them to ``output.dtype`` and ``output.device`` — the
ready-made ones do.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Union

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Target = Optional[Union[int, torch.Tensor, ScoreFn]]
CheckedTarget = Optional[Union[torch.Tensor, "ScoreFunction"]]
#: several targets per image (``explain`` returns ``(B, K, ...)``): a ``(B, K)`` integer tensor or a
#: list / tuple of K score functions
Targets = Union[Target, torch.Tensor, "list", "tuple"]

__all__ = [
    "Target",
    "ScoreFunction",
    "ClassLogit",
    "CosineSimilarity",
    "class_logit",
    "cosine_similarity",
    "check_target",
    "check_targets",
    "TargetList",
    "resolve_target",
    "target_rows",
    "target_score",
]

_KINDS = "None, an int, a (B,) integer tensor or a score function (a callable output -> (B,) scores)"


class ScoreFunction:
    """A score function whose every result is checked: ``(B,)``, floating, differentiable.

    ``explain`` wraps any callable target in one; the ready-made targets are
    subclasses. Calling it on an output ``(B, ...)`` returns the ``(B,)`` scores.
    """

    def __init__(self, fn: Optional[ScoreFn] = None, name: Optional[str] = None) -> None:
        if fn is None and type(self).score is ScoreFunction.score:
            raise TypeError("ScoreFunction needs a callable (or a subclass that defines score)")
        if fn is not None and not callable(fn):
            raise TypeError(f"a score function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self._rows_checked = False
        self.name = name or getattr(fn, "__name__", type(fn if fn is not None else self).__name__)

    #: True for functions that treat the images independently by construction (not checked per call).
    independent_rows = False

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """The unchecked scores of ``output``; subclasses override this."""
        return self.fn(output)

    def _check_rows(self, output: torch.Tensor, s: torch.Tensor) -> None:
        """Image b's score must read only row b of ``output``: the gradient of the first (and the
        last) image's score on every other row is exactly zero. One small backward each, to the
        output only (not into the model); done once per score function."""
        batch = output.shape[0]
        for b in sorted({0, batch - 1}):
            (g,) = torch.autograd.grad(s[b], output, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            others = torch.cat([g[:b], g[b + 1:]])
            if bool((others != 0).any()):
                raise ValueError(
                    f"the score function {self.name} mixes the images of the batch: image {b}'s score "
                    f"depends on other images' outputs (its gradient on rows other than {b} is not zero). "
                    f"A score function must treat the images independently — image b's score reads only "
                    f"row b of the output (e.g. lambda o: o[:, 3], not o[:, 3] + o[:, 3].sum()); the "
                    f"explanation of a batch is computed from the sum of its scores"
                )
        self._rows_checked = True

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        s = self.score(output)
        batch = output.shape[0]
        if not isinstance(s, torch.Tensor):
            raise TypeError(
                f"the score function {self.name} returned a {type(s).__name__}; it must return a (B,) = "
                f"({batch},) floating tensor"
            )
        if tuple(s.shape) != (batch,):
            raise ValueError(
                f"the score function {self.name} returned shape {tuple(s.shape)} for a model output of "
                f"shape {tuple(output.shape)}; it must return one score per image, shape ({batch},)"
            )
        if not s.is_floating_point():
            raise TypeError(
                f"the score function {self.name} returned dtype {s.dtype}; it must return a floating "
                f"tensor (a score, not an index)"
            )
        if output.requires_grad and not s.requires_grad:
            raise ValueError(
                f"the score function {self.name} returned scores that do not depend differentiably on "
                f"the model output (detached, or computed without autograd)"
            )
        if (batch > 1 and not self.independent_rows and not getattr(self, "_rows_checked", False) and output.requires_grad
                and s.requires_grad and torch.is_grad_enabled()):
            self._check_rows(output, s)
        return s

    def __repr__(self) -> str:
        return f"ScoreFunction({self.name})" if type(self) is ScoreFunction else self.name


class ClassLogit(ScoreFunction):
    """The logit of class ``c``: ``output[b, c[b]]`` (see :func:`class_logit`)."""

    independent_rows = True

    def __init__(self, c: Union[int, torch.Tensor]) -> None:
        if isinstance(c, bool) or not isinstance(c, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"class_logit takes an int or a (B,) integer tensor, got {type(c).__name__}")
        if isinstance(c, numbers.Integral):
            c = int(c)
        if isinstance(c, torch.Tensor):
            if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool or c.dim() > 1:
                raise TypeError(
                    f"class_logit takes an int or a (B,) integer tensor, got a {c.dtype} tensor of shape "
                    f"{tuple(c.shape)}"
                )
            c = c.detach().to(torch.long).reshape(-1) if c.dim() == 1 else int(c)
        if isinstance(c, int) and c < 0:
            raise ValueError(f"class_logit: class {c} is negative")
        if isinstance(c, torch.Tensor) and bool((c < 0).any()):
            raise ValueError(f"class_logit: class {int(c[c < 0][0])} is negative")
        self.c = c
        self.c_max = c if isinstance(c, int) else int(c.max())   # checked against K at each call, no device sync
        if isinstance(c, int):
            shown = str(c)
        else:
            shown = str(tuple(c.tolist())) if c.numel() <= 8 else f"a tensor of shape {tuple(c.shape)}"
        super().__init__(name=f"class_logit({shown})")

    def score(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2:
            raise ValueError(f"class_logit needs a (B, K) model output, got shape {tuple(output.shape)}")
        b, k = output.shape
        if isinstance(self.c, int):
            idx = torch.full((b, 1), self.c, dtype=torch.long, device=output.device)
        else:
            if self.c.shape[0] != b:
                raise ValueError(f"class_logit has {self.c.shape[0]} classes for a batch of {b} images")
            idx = self.c.to(output.device)[:, None]
        if self.c_max >= k:
            raise ValueError(f"class_logit: class {self.c_max} out of range for an output with {k} entries")
        return output.gather(1, idx)[:, 0]


class CosineSimilarity(ScoreFunction):
    """Cosine similarity of the output with reference embeddings (see :func:`cosine_similarity`)."""

    independent_rows = True

    def __init__(self, embeddings: torch.Tensor, eps: float = 1e-8) -> None:
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"cosine_similarity takes a (D',) or (B, D') tensor, got {type(embeddings).__name__}")
        if not embeddings.is_floating_point():
            raise TypeError(f"cosine_similarity: embeddings must be floating, got {embeddings.dtype}")
        if embeddings.dim() not in (1, 2) or embeddings.shape[-1] == 0:
            raise ValueError(
                f"cosine_similarity takes embeddings of shape (D',) or (B, D'), got {tuple(embeddings.shape)}"
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError("cosine_similarity: embeddings contain NaN or Inf")
        self.embeddings = embeddings.detach()
        self.eps = float(eps)
        super().__init__(name=f"cosine_similarity(shape {tuple(embeddings.shape)})")

    def score(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2:
            raise ValueError(f"cosine_similarity needs a (B, D') model output, got shape {tuple(output.shape)}")
        ref = self.embeddings.to(device=output.device, dtype=output.dtype)
        if ref.shape[-1] != output.shape[-1]:
            raise ValueError(
                f"cosine_similarity: the model output has {output.shape[-1]} features, the reference "
                f"embeddings {ref.shape[-1]}"
            )
        if ref.dim() == 2 and ref.shape[0] != output.shape[0]:
            raise ValueError(
                f"cosine_similarity: {ref.shape[0]} reference embeddings for a batch of {output.shape[0]} "
                f"images (pass one per image, or a single (D',) embedding shared by all)"
            )
        return torch.nn.functional.cosine_similarity(output, ref.expand_as(output), dim=-1, eps=self.eps)


def class_logit(c: Union[int, torch.Tensor]) -> ClassLogit:
    """Score function: the logit of class ``c``, ``output[b, c[b]]``.

    Args:
        c: an int (the same class for every image) or a ``(B,)`` integer tensor.

    The same score as ``target=c``, as a function (e.g. to combine with
    others, or to pick one channel of an embedding).
    """
    return ClassLogit(c)


def cosine_similarity(embeddings: torch.Tensor, eps: float = 1e-8,
                      per_prompt: bool = False) -> Union[CosineSimilarity, List[CosineSimilarity]]:
    """Score function: cosine similarity of the model output with reference embeddings.

    Args:
        embeddings: ``(B, D')`` (one reference per image) or ``(D',)`` (one
            shared by every image), e.g. the text embedding of a CLIP prompt;
            with ``per_prompt=True``: ``(K, D')``, K prompts for every image.
        eps: lower bound on the norms (as ``torch.nn.functional.cosine_similarity``).
        per_prompt: explain every image for each of the K prompts: returns the
            list of the K score functions ``cos(output_b, embeddings[k])``, a
            target that gives ``(B, K, gh, gw)`` maps (map ``[:, k]`` for prompt k)
            from one forward pass where the path allows (LeGrad and attention
            Grad-CAM on every path; ``tokentm_fast.multi_target``), where
            LeGrad's own code repeats each image K times.

    Scores: ``cos(output_b, embeddings_b)``, shape ``(B,)``. The references are
    cast to the output's dtype and device when called (float64 on the
    reference backend); no gradient flows into them.
    """
    if not isinstance(per_prompt, bool):
        raise TypeError(f"cosine_similarity: per_prompt must be True or False, got {per_prompt!r}")
    if per_prompt:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] == 0:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"cosine_similarity(per_prompt=True) takes K >= 1 prompt embeddings of shape "
                             f"(K, D'), got {shape}")
        return [CosineSimilarity(e, eps) for e in embeddings]
    return CosineSimilarity(embeddings, eps)


def check_target(target: Target, batch: int, num_classes: Optional[int]) -> CheckedTarget:
    """Validate a target before any work.

    Args:
        target: see the module docstring.
        batch: B, the number of images.
        num_classes: K of a classifier; ``None`` or ``0`` for a model whose
            output is an embedding (it needs a score function).

    Returns:
        None (resolved to the argmax after the forward), a ``(B,)`` long tensor,
        or a :class:`ScoreFunction`.
    """
    classifier = num_classes is not None and num_classes > 0
    if callable(target) and not isinstance(target, torch.Tensor):
        return target if isinstance(target, ScoreFunction) else ScoreFunction(target)
    if not classifier and (target is None or isinstance(target, (numbers.Integral, torch.Tensor))):
        given = "no target" if target is None else f"target {target!r}"
        raise ValueError(
            f"the model has no classifier (e.g. timm num_classes=0, a feature or CLIP vision model): its "
            f"output is an embedding, so the target must be a score function mapping it to (B,) scores, "
            f"e.g. tokentm_fast.targets.cosine_similarity(reference_embeddings), or class_logit(c) for "
            f"output channel c; got {given}"
        )
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"target must be {_KINDS}, got a bool")
    if isinstance(target, numbers.Integral):
        t = torch.full((batch,), int(target), dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.device.type == "meta":
            raise ValueError(
                "target is a tensor on the meta device (a shape without data): pass class indices with "
                "values, e.g. torch.tensor([...]) on the CPU or on the model's device"
            )
        if target.dim() == 0:
            target = target.expand(batch)
        if tuple(target.shape) != (batch,):
            raise ValueError(f"target must have shape ({batch},) for a batch of {batch}, got {tuple(target.shape)}")
        t = target.to(torch.long)
    else:
        raise TypeError(f"target must be {_KINDS}, got {type(target).__name__}")
    bad = (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"target {t[bad][0].item()} out of range for a model with {num_classes} classes")
    return t


class TargetList(tuple):
    """K checked targets of one batch (see :func:`check_targets`): the explanation of target k is
    map ``[:, k]`` of the ``(B, K, ...)`` result."""

    def __repr__(self) -> str:
        return f"TargetList({list(self)!r})"


def check_targets(target: Targets, batch: int, num_classes: Optional[int]) -> Union[CheckedTarget, TargetList]:
    """:func:`check_target`, and several targets per image in one call.

    - a ``(B, K)`` integer tensor: column k holds target k's class of every image;
    - a list or tuple of K score functions (each as for one target).

    Both give a :class:`TargetList` of K checked targets (``K >= 1``; a ``(B, 1)`` tensor or a list
    of one function still gives ``(B, 1, ...)`` maps). Every target is checked before any work.
    """
    if isinstance(target, TargetList):
        return target
    if isinstance(target, torch.Tensor) and target.dim() == 2:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.shape[0] != batch or target.shape[1] == 0:
            raise ValueError(f"a 2-D target holds K >= 1 classes per image and must have shape ({batch}, K) for "
                             f"a batch of {batch}, got {tuple(target.shape)}")
        return TargetList(check_target(target[:, k], batch, num_classes) for k in range(target.shape[1]))
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError("target is an empty list: give K >= 1 score functions, or a (B, K) integer tensor")
        for i, t in enumerate(target):
            if not callable(t) or isinstance(t, torch.Tensor):
                raise TypeError(
                    f"a list target holds K score functions (one map per function), but element {i} is a "
                    f"{type(t).__name__}: for K classes per image pass a (B, K) integer tensor, for one "
                    f"class per image an int or a (B,) tensor"
                )
        return TargetList(check_target(t, batch, num_classes) for t in target)
    return check_target(target, batch, num_classes)


def target_rows(target: CheckedTarget, start: int, stop: int) -> CheckedTarget:
    """The checked target of images ``start:stop`` (for ``explain(..., batch_size=k)``).

    None stays None; class indices are sliced; ``class_logit`` of a ``(B,)`` tensor and
    ``cosine_similarity`` of ``(B, D')`` references are sliced too. Any other score function is
    applied to each chunk's output as it is (it must not hold per-image data of the whole batch).
    """
    if target is None:
        return None
    if isinstance(target, TargetList):
        return TargetList(target_rows(t, start, stop) for t in target)
    if isinstance(target, torch.Tensor):
        return target[start:stop]
    if type(target) is ClassLogit and isinstance(target.c, torch.Tensor):
        return ClassLogit(target.c[start:stop])
    if type(target) is CosineSimilarity and target.embeddings.dim() == 2:
        return CosineSimilarity(target.embeddings[start:stop], target.eps)
    return target


def resolve_target(target: CheckedTarget, logits: torch.Tensor) -> Union[torch.Tensor, ScoreFunction]:
    """The checked target on the output's device, the argmax of the logits, or the score function."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, ScoreFunction):
        return target
    return target.to(logits.device)


def target_score(output: torch.Tensor, target: Union[torch.Tensor, ScoreFunction]) -> torch.Tensor:
    """Sum over the batch of each image's score (images are independent).

    ``output``: the model output ``(B, K)`` or ``(B, D')`` (or the head applied
    to an inner layer, for LeGrad); ``target``: a resolved target.
    """
    if isinstance(target, ScoreFunction):
        return target(output).sum()
    return output.gather(1, target[:, None]).sum()
