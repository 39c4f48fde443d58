"""Public API: ``explain`` and the reusable ``Explainer``.

Checks everything up front (model, method, options, backend, images, target),
then dispatches to the literal reference or to the fast path with the PyTorch
or Triton kernels, and returns a float32 map ``(B, gh, gw)`` of raw values
(optionally at the input resolution and/or min–max normalised per image).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from .maps import ConstantMapWarning, constant_rows, minmax_normalize, patch_sums, upsample_maps
from .methods import REGISTRY, check_method, get_method, resolve_options
from .models import adapt
from .multi_target import image_major
from .paths import MAX_HEAD_DIM, TORCH_KERNELS, Flash, Materialized, head_width, heads_fit, triton_kernels
from .reference import explain_reference
from .targets import Target, TargetList, check_targets

BACKENDS = ("auto", "reference", "torch", "triton")
ATTENTION_PATHS = ("auto", "flash", "materialized")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``."""
    from .kernels import triton_available

    return triton_available(device)


def triton_unusable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can): the kernels' own words."""
    from .kernels._utils import triton_unusable_reason as reason

    return reason(device)


class Explainer:
    """Explain many batches with one model, method and backend.

    Args:
        model: a supported ViT: timm ``VisionTransformer``, Hugging Face ViT / DeiT / CLIP vision
            models, torchvision ``VisionTransformer`` or open_clip ``VisionTransformer``
            (``tokentm_fast.models.adapt`` picks the adapter).
        method: one of ``tokentm_fast.METHODS``: ``"tokentm"``, ``"gae"``, ``"rollout"``,
            ``"raw_attention"``, ``"attn_gradcam"``, ``"legrad"``, ``"conservative_lrp"``, ``"attcat"``,
            ``"lrp"``, ``"partial_lrp"``, ``"transformer_attribution"`` (docs/methods.md; ``lrp``'s map is at the
            pixels: the patch grid sums it, ``upsample=True`` returns the pixels themselves).
        backend: ``"auto"`` (Triton for float32/bfloat16/float16 models on CUDA, else PyTorch;
            a ``UserWarning``, once per Explainer, when a CUDA call cannot use Triton), ``"reference"``,
            ``"torch"`` or ``"triton"``.
        full: return the whole ``(B, N, N)`` contribution matrix (TokenTM, GAE, rollout).
        upsample: return maps at the input resolution ``(B, H, W)`` (bilinear,
            ``align_corners=False``) instead of the patch grid ``(B, gh, gw)``.
        normalize: min–max normalise each image's map to [0, 1] (after
            ``upsample``; a constant map becomes all zeros). Default: raw values.
        attention: which attention path the Triton backend takes (docs/methods.md §8, the flash
            formulation): ``"flash"`` (the explanation attention kernels, no N×N tensor),
            ``"materialized"`` (attention probabilities and gradients captured as tensors, then the
            fused aggregation kernels) or ``"auto"``: flash on CUDA, materialized otherwise and for
            ``full=True``, ``head_fusion="decoupled"`` (which need whole matrices) and heads wider than 128
            (``tokentm_fast.paths.MAX_HEAD_DIM``); the PyTorch backend takes its flash twin above a memory
            budget (``TORCH_FLASH_BYTES``). The
            ``reference`` and ``torch`` backends always materialize.
        **options: method options (``tokentm_fast.methods.REGISTRY[method].defaults`` lists them).
    """

    def __init__(self, model: nn.Module, method: str = "tokentm", backend: str = "auto",
                 full: bool = False, upsample: bool = False, normalize: bool = False,
                 attention: str = "auto", **options: Any) -> None:
        self.vit = adapt(model)
        self.method = check_method(method)
        self.spec = get_method(method)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.backend = backend
        if full and not self.spec.full_matrix:
            full_matrix = tuple(m for m, spec in REGISTRY.items() if spec.full_matrix)
            raise ValueError(f"full=True is available for {full_matrix}, not for {method!r}")
        self.full = bool(full)
        self.upsample, self.normalize = _check_output_options(upsample, normalize, self.full)
        self.options = resolve_options(method, options, self.vit.num_layers)
        self.head_width = head_width(self.vit)
        self.attention = _check_attention(attention, backend, self.full, self.flash_refusal(), self.head_width)
        self._warned_no_triton = False
        self._in_chunks = False

    def backend_for(self, images: torch.Tensor) -> str:
        """The concrete backend used for ``images`` (resolves ``"auto"``)."""
        if self.backend == "auto":
            # float64 has no Triton kernels; CPU tensors take PyTorch (the interpreter is for tests)
            if not images.is_cuda or images.dtype == torch.float64:
                return "torch"
            if triton_usable(images.device):
                return "triton"
            if not self._warned_no_triton:
                self._warned_no_triton = True
                warnings.warn(f"backend='auto' runs this CUDA call on the PyTorch backend (materialized "
                              f"attention, slower and larger): {triton_unusable_reason(images.device)}",
                              UserWarning, stacklevel=3)
            return "torch"
        if self.backend == "triton" and not triton_usable(images.device):
            raise ValueError(
                f"backend='triton' cannot run on {images.device.type} tensors: "
                f"{triton_unusable_reason(images.device)}; use backend='torch'"
            )
        if self.backend == "triton" and images.dtype == torch.float64:
            raise ValueError("backend='triton' takes float32/bfloat16/float16 models; use backend='torch' for float64")
        return self.backend

    def flash_refusal(self) -> Optional[str]:
        """Why the flash path cannot serve this call: the method with its options (``MethodSpec.flash_refusal``),
        then the model (``ViTAdapter.flash_refusal``); None: it can."""
        return self.spec.flash_refusal(self.options) or self.vit.flash_refusal

    def attention_for(self, images: torch.Tensor, backend: str) -> str:
        """The attention path (``"flash"`` or ``"materialized"``) of a call on ``backend``.

        ``attention="auto"``: on the Triton backend the flash kernels (CUDA, heads up to ``MAX_HEAD_DIM``);
        on the PyTorch backend its flash twin (``tokentm_fast.torch_ops.attention``) once the materialized
        path would keep more than ``TORCH_FLASH_BYTES`` of attention probabilities (``materialized_bytes``),
        the materialized path below that (as fast or faster at small N, docs/methods.md §8), except for the
        methods whose ``MethodSpec.torch_flash`` says the twin is as fast or faster at every size on the CPU (lrp, partial LRP)."""
        if self.attention == "flash":
            _check_flash_heads(backend, self.head_width)   # backend="auto" resolved: Triton or not
            return "flash"
        if self.attention == "materialized" or self.full or self.flash_refusal() is not None:
            return "materialized"
        if backend == "torch":
            always = self.spec.torch_flash and images.device.type == "cpu"        # measured on the CPU
            big = always or materialized_bytes(self.vit, images) > TORCH_FLASH_BYTES
            return "flash" if big else "materialized"
        return "flash" if images.is_cuda and heads_fit(self.head_width) else "materialized"

    def __call__(self, images: torch.Tensor, target: Target = None, batch_size: Optional[int] = None,
                 progress: Optional[bool] = None) -> torch.Tensor:
        """Explain ``images (B, C, H, W)``; returns ``(B, gh, gw)`` float32 (``(B, N, N)`` with full,
        ``(B, H, W)`` with upsample). ``target``: see ``tokentm_fast.targets``; a ``(B, K)`` integer
        tensor or a list of K score functions gives ``(B, K, ...)`` (``tokentm_fast.multi_target``).

        ``batch_size=k``: explain ``k`` images (and their targets) at a time and concatenate (the
        same maps as one call; peak memory of ``k`` images). ``progress``: a tqdm bar over the
        chunks; ``None`` (default) shows it when there is more than one chunk and stderr is a
        terminal.

        A map that comes out constant (all zeros, say) raises a ``ConstantMapWarning`` once per call
        site (``explain``'s docstring)."""
        if self._in_chunks:         # one chunk of explain_in_chunks: the whole result is checked once
            return self._explain(images, target)
        if torch.is_inference_mode_enabled():
            # Explanations need autograd, which inference mode switches off: run with it
            # switched back on, on copies of the (inference) input tensors.
            with torch.inference_mode(False):
                images = images.clone() if isinstance(images, torch.Tensor) else images
                target = target.clone() if isinstance(target, torch.Tensor) else target
                if isinstance(target, TargetList):
                    target = TargetList(t.clone() if isinstance(t, torch.Tensor) else t for t in target)
                return self(images, target, batch_size, progress)
        if batch_size is not None or progress:
            from .batching import explain_in_chunks
            self._in_chunks = True
            try:
                out = explain_in_chunks(self, images, target, batch_size, progress)
            finally:
                self._in_chunks = False
        else:
            out = self._explain(images, target)
        self._check_constant(out, images)
        return out

    def _explain(self, images: torch.Tensor, target: Target) -> torch.Tensor:
        """One call's maps (``__call__`` without the chunks and the constant-map check)."""
        gh, gw = self.vit.check_images(images)
        param = next(self.vit.model.parameters())
        if param.device.type == "meta":
            raise ValueError("the model's parameters are on the meta device (no data): load its weights first")
        if images.device != param.device:
            raise ValueError(
                f"images must be on the model's device: images are on {images.device}, the model is on "
                f"{param.device} (move them with images.to({str(param.device)!r}))"
            )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values")
        if images.dtype == torch.float64 and param.dtype != torch.float64:
            say_once("float64 images", UserWarning, lambda: (
                f"the images are float64 but the model is {_dtype_name(param.dtype)}: they are rounded to "
                f"{_dtype_name(param.dtype)}, the model's dtype, before the explanation (for a float64 "
                f"explanation, cast the model: model.double())"))
        images = images.to(param.dtype)
        target = check_targets(target, images.shape[0], self.vit.num_classes)
        many = isinstance(target, TargetList)     # below here: always a list of K ≥ 1 targets
        targets = target if many else TargetList([target])
        backend = self.backend_for(images)
        if backend == "reference":                # the literal oracle: one call per target
            maps = [explain_reference(self.vit, images, self.method, t, self.options, self.full) for t in targets]
        else:
            kernels = TORCH_KERNELS if backend == "torch" else triton_kernels()
            if self.attention_for(images, backend) == "materialized":
                path = Materialized(kernels)
            elif backend == "torch":
                path = Flash(kernels, _torch_attention(), max_head_dim=None)
            else:
                path = Flash(kernels, _triton_attention())
            maps = self.spec.explain(self.vit, images, targets, self.options, path, self.full)
        out = image_major(maps) if many else maps[0]    # K targets: (B·K, ...), (B, K, ...) at the end
        out = out.detach().to(torch.float32)
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"the {self.method} explanation contains NaN or Inf: the model produced non-finite "
                f"activations or gradients for these images"
            )
        if self.spec.pixel_map:        # relevance at the pixels: the patch grid sums it, upsample keeps it
            out = out if self.upsample else patch_sums(out, (gh, gw))
        elif not self.full:
            out = out.reshape(out.shape[0], gh, gw)
            if self.upsample:
                out = upsample_maps(out, tuple(images.shape[-2:]))
        out = minmax_normalize(out) if self.normalize else out
        return out.unflatten(0, (images.shape[0], len(target))) if many else out

    def _check_constant(self, out: torch.Tensor, images: torch.Tensor) -> None:
        """Say once per call site (``say_once``) which maps of ``out`` are constant and the likely cause
        (``_constant_cause``). One host synchronisation; nothing for ``full=True`` (the whole matrix is
        never constant)."""
        if self.full:
            return
        b = images.shape[0]
        rows = out.reshape(-1, *out.shape[-2:])                    # (B·K, h, w), image-major
        const, first = torch.stack([constant_rows(rows).to(rows.dtype), rows.flatten(1)[:, 0]]).tolist()
        hit = [r for r, c in enumerate(const) if c]
        if not hit:
            return
        k = rows.shape[0] // b
        say_once(self.method, ConstantMapWarning,
                 lambda: _constant_head(self.method, hit, [first[r] for r in hit], b, k, self.normalize),
                 lambda: _constant_cause(self))


def _triton_attention():
    from .kernels.attention import triton_attention

    return triton_attention()


def _torch_attention():
    from .torch_ops.attention import torch_attention

    return torch_attention()


#: attention probabilities the PyTorch backend's materialized path may keep before ``attention="auto"``
#: takes its flash twin instead (every layer's ``(B, H, N, N)`` is alive until the backward reaches it)
TORCH_FLASH_BYTES = 1 << 30


def materialized_bytes(vit, images: torch.Tensor) -> int:
    """Bytes of every layer's attention probabilities ``L·B·H·N²`` in the compute dtype: what the
    materialized path keeps alive at once (the gradient methods; a lower bound for the others)."""
    from .precision import compute_dtype

    gh, gw = vit.check_images(images)
    n = gh * gw + vit.num_prefix_tokens
    item = torch.finfo(compute_dtype(images)).bits // 8
    return vit.num_layers * images.shape[0] * vit.num_heads * n * n * item


# --------------------------------------------------------------------------- warnings, once per call site
#: the modules of the explain machinery: a warning is located at the first frame outside them (the
#: user's call of ``explain`` / ``Explainer``, or of ``explain(..., batch_size=k)``)
_MACHINERY = frozenset({__name__, "tokentm_fast.batching"})
#: the call sites (and kinds) already warned about under the "default" / "module" / "once" actions
_said: set = set()


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by ``say_once``: the first frame outside ``_MACHINERY``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__") in _MACHINERY:
        frame, level = frame.f_back, level + 1
    return level


def _filter_action(category: type, text: str, module: str, lineno: int) -> str:
    """The action the warnings filters give this warning (the first matching filter, as ``warnings``
    matches them)."""
    for action, msg, cat, mod, line in warnings.filters:
        if ((msg is None or msg.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module)) and (line == 0 or line == lineno)):
            return action
    return warnings.defaultaction


def say_once(kind: str, category: type, head: Callable[[], str], cause: Optional[Callable[[], str]] = None) -> None:
    """``warnings.warn(head() + cause(), category)`` at the user's call, once per call site and ``kind``.

    The warnings machinery's default shows a warning once per location *and text*; the texts here name
    images, so they vary from batch to batch: a loop would repeat them. Under the "default" and "module"
    actions this says each ``kind`` once per call site (per process; "once": once in all), under
    "always" / "error" every time, under "ignore" never. ``cause`` (which may cost a forward and
    backward pass) runs only when the warning is said; the filters are matched on ``head()``.
    """
    level = _user_stacklevel()
    frame = sys._getframe(level - 1)          # level 1 is this function's frame
    module = frame.f_globals.get("__name__", "<string>")
    text = head()
    action = _filter_action(category, text, module, frame.f_lineno)
    if action == "ignore":
        return
    if action in ("default", "module", "once"):
        site = {"default": (frame.f_code.co_filename, frame.f_lineno), "module": (module,), "once": ()}[action]
        key = (action, *site, category, kind)
        if key in _said:
            return
        _said.add(key)
    warnings.warn(text + (cause() if cause is not None else ""), category, stacklevel=level)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _listed(items: Sequence[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "")


def _constant_head(method: str, hit: List[int], values: List[float], b: int, k: int, normalized: bool) -> str:
    """``"<method>: the maps of images 0, 2 (of 4) are constant (all zeros)"`` for the constant rows
    ``hit`` of a ``(B·K, ...)`` result (image-major)."""
    if len(hit) == b * k:
        whose = ("the map is" if b * k == 1 else
                 f"the maps of all {b} images are" if k == 1 else f"the maps of all {b}×{k} (image, target) pairs are")
    elif k == 1:
        whose = (f"the map of image {hit[0]} (of {b}) is" if len(hit) == 1
                 else f"the maps of images {_listed([str(r) for r in hit])} (of {b}) are")
    else:
        pairs = _listed([f"({r // k}, {r % k})" for r in hit])
        whose = f"the maps of (image, target) {pairs} (of {b} images × {k} targets) are"
    if all(v == 0 for v in values):
        value = "all zeros"
    elif len(set(values)) == 1:
        value = f"every value {values[0]:g}"
    else:
        value = "each a single value"
    note = ", after normalize=True" if normalized else ""
    return f"{method}: {whose} constant ({value}{note}): {'it ranks' if len(hit) == 1 else 'they rank'} nothing"


def _constant_cause(explainer: "Explainer") -> str:
    """Why maps are constant, as far as the model's parameters tell (no forward pass: a forward hook of
    the user's would see it, and a test counting them)."""
    spec = explainer.spec
    if not spec.needs_gradients:
        return (f". {spec.name} does not use the score: the attention it reads gives every patch the same "
                f"weight (an untrained model's, for one)")
    head = _zero_head(explainer.vit)
    if head is not None:
        return (f". The model's classifier head is all zeros ({head}), so the gradient of every score of its "
                f"output is exactly zero and every gradient-based method gives a constant map: an untrained or "
                f"zero-initialised head (torchvision's VisionTransformer starts with one); load trained weights")
    hint = _NO_RELEVANCE.get(spec.name, "its terms are zero or clipped to zero for these images")
    return (f". Either the gradient of the explained score is zero for these images (an untrained head, or a "
            f"score function, target=..., that does not depend on the model output), or {spec.name} found no "
            f"relevance there ({hint})")


#: why a method finds no relevance although the score's gradient is not zero
_NO_RELEVANCE = {
    "attn_gradcam": ("attention Grad-CAM keeps only the positive part of the class token's gradient-weighted "
                     "attention, which is all zero when the head does not read the class token, as with average "
                     "pooling, or when every head's evidence is negative"),
    "legrad": "LeGrad keeps only the positive part of each layer's attention gradient",
}


def _zero_head(vit) -> Optional[str]:
    """``"weight (K, D)"`` when the last linear map of the model's head (``adapter.head_linears()``) has
    an all-zero weight, else None (also when the adapter does not name its head's linear maps)."""
    try:
        points = vit.head_linears()
    except (NotImplementedError, ValueError):
        return None
    if not points:
        return None
    w = points[-1].weight
    return f"weight {tuple(w.shape)}" if w.numel() and not bool(w.detach().any()) else None


def _check_attention(attention: Any, backend: str, full: bool, flash_refusal: Optional[str],
                     width: Optional[int] = None) -> str:
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention={attention!r}; expected one of {ATTENTION_PATHS}")
    if attention == "flash":
        if backend == "reference":
            raise ValueError("attention='flash': backend='reference' is the literal oracle and always "
                             "materializes the attention (use backend='torch' or 'triton')")
        if full:
            raise ValueError("attention='flash' gives the explanation row; full=True needs the whole matrix "
                             "(use attention='materialized' or 'auto')")
        if flash_refusal is not None:
            raise ValueError(f"{flash_refusal}: use attention='materialized' or 'auto'")
        _check_flash_heads(backend, width)
    return attention


def _check_flash_heads(backend: str, width: Optional[int]) -> None:
    """The Triton flash kernels take heads up to ``MAX_HEAD_DIM`` wide (the PyTorch twin any width)."""
    if backend == "triton" and not heads_fit(width):
        raise ValueError(f"attention='flash': the Triton flash kernels take heads up to {MAX_HEAD_DIM} "
                         f"wide; this model's heads are {width} wide: use backend='torch' or "
                         f"attention='materialized'")


def _check_output_options(upsample: Any, normalize: Any, full: bool) -> tuple:
    for name, value in (("upsample", upsample), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if upsample and full:
        raise ValueError("upsample=True makes image-sized maps; it cannot be combined with full=True")
    return upsample, normalize


def explain(model: nn.Module, images: torch.Tensor, method: str = "tokentm", target: Target = None,
            backend: str = "auto", full: bool = False, upsample: bool = False, normalize: bool = False,
            attention: str = "auto", batch_size: Optional[int] = None, progress: Optional[bool] = None,
            **options: Any) -> torch.Tensor:
    """Explain ``images (B, C, H, W)`` for ``target`` with ``method``.

    Returns a float32 ``(B, gh, gw)`` map of raw (unnormalized) relevance of
    every patch, or with ``full=True`` (TokenTM, GAE, rollout) the whole
    ``(B, N, N)`` matrix ``Cᴸ``; ``upsample=True``: ``(B, H, W)`` at the input
    resolution (bilinear); ``normalize=True``: min–max normalised per image.
    ``target``: None (the predicted class), an int, a ``(B,)`` integer tensor,
    or a score function of the model output (``tokentm_fast.targets``);
    several targets per image — a ``(B, K)`` integer tensor or a list of K
    score functions — give ``(B, K, gh, gw)`` (``(B, K, ...)`` with the other
    options), map ``[:, k]`` for target k, from one forward pass where the path
    allows (``tokentm_fast.multi_target``).
    ``batch_size=k``: ``k`` images at a time, results concatenated (equal to
    one call); ``progress``: a tqdm bar over the chunks (None: shown when there
    is more than one chunk and stderr is a terminal). See ``Explainer`` for the
    other arguments.

    Block options (``start_layer``, ``end_layer``, ``layers``) follow Python's
    rule for every method: block ``-k`` is the k-th from the end (``-1`` the
    last), the valid range is ``-L <= l < L`` for a model with L blocks.

    What the call does to its inputs, said here once:

    - the model is explained in eval mode (dropout off, normalisation layers on
      their running statistics) with its parameters frozen; its mode and
      ``requires_grad`` flags are restored afterwards, also when the call raises;
    - the images are cast to the model's dtype; float64 images given to a
      narrower model raise a ``UserWarning`` (once per call site), since they
      lose their precision before the explanation (``model.double()`` for a
      float64 one);
    - pictures read from files (the CLI, the evaluation's data sources) with
      transparent pixels are composited over white
      (``tokentm_fast.evaluation.data.to_rgb``).

    A constant map (all zeros, say: it ranks nothing, and ``normalize=True``
    keeps it all zeros) raises a ``tokentm_fast.ConstantMapWarning`` naming the
    images, the method and the likely cause (an all-zero classifier head, as
    an untrained torchvision ViT has: the score's gradient is exactly zero; a
    score function that ignores the output; or a method that clips
    everything, such as attention Grad-CAM on an average-pooled model). It is
    said once per call site and method, also in a loop
    (``warnings.simplefilter("always", tf.ConstantMapWarning)`` says it every
    time, ``"error"`` raises it, ``"ignore"`` silences it). Finding it costs
    one host synchronisation on the final map, and no extra forward pass.
    """
    return Explainer(model, method=method, backend=backend, full=full, upsample=upsample,
                     normalize=normalize, attention=attention, **options)(images, target, batch_size, progress)
