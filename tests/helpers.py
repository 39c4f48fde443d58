"""What several test modules share, in one place; for tests only.

- Errors: :func:`rel_err_l2` (relative L2 per image, docs/methods.md §7), :func:`max_rel_err_l2` (its worst
  image, a float), :func:`rel_err_max` (max-abs relative per image).
- Guards: :func:`assert_informative`, what a map must be before two maps are compared (not all zero, not
  constant), so that an equality is not the vacuous one of two flat maps.
- Float32 bounds: :func:`float32_bound`, derived per image from the measured condition of the map.
- Literal oracles: :func:`literal_legrad`, LeGrad (docs/methods.md §6) written out with autograd.
- The no-N×N recorder of the flash path: :class:`ShapeRecorder`, :func:`n_by_n`, :func:`attention_tile`,
  the sizes ``N65`` and the methods ``FLASH_METHODS``.

Importing this module imports nothing of the package.
- Subprocesses: :func:`subprocess_env`, the environment of a CLI / torchrun child.

Float32 bounds. A float32 run rounds the result of every operation to a relative error of at most
u = 2⁻²⁴. To first order, each rounding moves the final map as much as a relative perturbation of size u of
the operation's inputs would, and the rest of the computation amplifies it by the map's condition number κ.
The LRP relevance pass (docs/methods.md §6.3) divides by sums that cancel, so κ depends on the model and the
image, and a fixed bound is either loose or wrong; here κ is measured instead, per image, on the
independent float64 oracle:

    κ = max over draws of rel_err_l2(map(W ⊙ (1 + u·r), x ⊙ (1 + u·r')), map(W, x)) / u,

r, r' uniform in [−1, 1] for every weight and pixel (the perturbation a float32 rounding of them would make).
Each attention layer puts about ``ROUNDINGS_PER_LAYER`` roundings on a relevance's path (8 operations of
the forward: norm, qkv, q·kᵀ, softmax, A·V, proj, residual add, MLP; as many rules back), so the float32
map is within ``ROUNDINGS_PER_LAYER · layers · max(κ, 1) · u`` of the float64 one (κ at least 1: the float32
output is itself rounded). On the models of tests/test_relevance_lrp.py this bound is 2.5 to 45 times the float32
error of the torch and Triton backends and 8 to 200 times below what a stabiliser of 1e-5 instead of 1e-9
costs (test_relevance_lrp.py checks the latter; the 2e-2 used before was 270 to 19 000 times the error and let it pass).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# --------------------------------------------------------------------------- errors


def rel_err_l2(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per image, ``(B,)`` float64: ‖e − ref‖₂ / ‖ref‖₂ over each image's ``(...)``
    (docs/methods.md §7); where ``ref`` is exactly zero, the absolute ‖e‖₂. ``e``, ``ref``: ``(B, ...)`` of
    equal size; ``ref`` is moved to ``e``'s device."""
    e = e.detach().double().reshape(e.shape[0], -1)
    ref = ref.detach().double().reshape(ref.shape[0], -1).to(e.device)
    num = (e - ref).norm(dim=1)
    den = ref.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), num)


def max_rel_err_l2(e: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst image's :func:`rel_err_l2`, a Python float (NaN where ``e`` is not finite)."""
    return rel_err_l2(e, ref).max().item()


def rel_err_max(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Max-abs relative error per image, ``(B,)`` float64: max |e − ref| / max |ref| over each image's
    ``(...)`` (the denominator clamped at 1e-300)."""
    b = ref.shape[0]
    diff = (e.detach().double() - ref.detach().double()).reshape(b, -1).abs().amax(dim=1)
    return diff / ref.detach().double().reshape(b, -1).abs().amax(dim=1).clamp(min=1e-300)


# --------------------------------------------------------------------------- guards


def assert_informative(e: torch.Tensor, spread: float = 1e-3) -> None:
    """Every image's map of ``e (B, ...)`` is finite and varies: max − min > ``spread`` · max |e|."""
    e = e.detach().flatten(1)
    assert torch.isfinite(e).all(), "a map is not finite"
    top = e.abs().amax(1)
    assert (top > 0).all(), f"a map is all zeros (images {torch.nonzero(top == 0).flatten().tolist()})"
    flat = (e.amax(1) - e.amin(1)) <= spread * top
    assert not flat.any(), f"a map is constant to {spread:g} of its largest value (images {torch.nonzero(flat).flatten().tolist()})"


# --------------------------------------------------------------------------- float32 bounds (module docstring)

#: float32's unit roundoff
UNIT_ROUNDOFF = 2.0 ** -24
#: roundings on a relevance's path per attention layer (block or attention pool): ~8 forward, ~8 rules back
ROUNDINGS_PER_LAYER = 16


def perturbed(model: nn.Module, images: torch.Tensor, seed: int, size: float = UNIT_ROUNDOFF):
    """A float64 copy of ``model`` and of ``images (B, C, H, W)``, every parameter and pixel multiplied by
    ``1 + size·r`` with r uniform in [−1, 1] (a generator seeded ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model).double()

    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + size * (2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1))

    with torch.no_grad():
        for p in m.parameters():
            p.copy_(jitter(p))
    return m, jitter(images.double())


def condition(evaluate: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module,
              images: torch.Tensor, draws: int = 3) -> torch.Tensor:
    """κ per image, (B,): the largest relative change of ``evaluate``'s float64 map (a ``(B, ...)`` tensor)
    under :func:`perturbed` copies of the weights and pixels, over ``draws`` draws, divided by u."""
    base = evaluate(copy.deepcopy(model).double(), images.double())
    changes = [rel_err_l2(evaluate(*perturbed(model, images, seed)), base) for seed in range(draws)]
    return torch.stack(changes).amax(0) / UNIT_ROUNDOFF


def float32_bound(evaluate: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module,
                  images: torch.Tensor, layers: int, draws: int = 3) -> torch.Tensor:
    """Per-image bound, (B,), on the relative L2 error of a float32 run of the map ``evaluate`` computes in
    float64: ``ROUNDINGS_PER_LAYER · layers · max(κ, 1) · u`` (module docstring); ``layers`` counts the
    attention layers (blocks, plus one for an attention pool)."""
    kappa = condition(evaluate, model, images, draws).clamp_min(1.0)
    return ROUNDINGS_PER_LAYER * layers * kappa * UNIT_ROUNDOFF


# --------------------------------------------------------------------------- literal oracles

#: a target: class indices ``(B,)``, or a score function of the model output ``(B, C) -> (B,)``
Target = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def literal_legrad(model: nn.Module, images: torch.Tensor, target: Target, layer_pooling: str = "mean",
                   start_layer: int = -2) -> torch.Tensor:
    """LeGrad, docs/methods.md §6, literally, float64, on a timm VisionTransformer: for each block l from
    ``start_layer`` on, the score s_l of block l's tokens Xˡ, G̃ˡ = ∂s_l/∂Aˡ by autograd over the full graph,
    eˡ = mean_h mean_i max(G̃ˡ, 0); e = Σ_l eˡ, ``(B, patches)``.

    ``layer_pooling="mean"`` (the default, the authors' pooling): the mean of Xˡ over all tokens, then the
    final norm, fc norm and classifier (a distilled DeiT: the mean of its two heads); ``"head"``: the model's
    own pooling (final norm, then class token or patch mean, fc norm, classifier). ``target``: class
    indices ``(B,)`` (s_l = the target logit) or a score function of that output (s_l = its value)."""
    from spec_oracle import pooled_head, run_vit

    _, layers, _, m = run_vit(model, images)
    b, depth, prefix = images.shape[0], len(layers), m.num_prefix_tokens
    e = 0
    for l in range(start_layer % depth, depth):
        x = layers[l]["x_out"]
        if layer_pooling == "mean":
            out = pooled_head(m, x.mean(1))
        elif layer_pooling == "head":
            z = m.norm(x)
            z = z[:, 0] if m.global_pool == "token" else z[:, prefix:].mean(1)
            out = m.head(m.fc_norm(z))
        else:
            raise ValueError(f"docs/methods.md §6 has no layer pooling {layer_pooling!r}")
        s = target(out) if callable(target) else out[torch.arange(b), target]
        (g,) = torch.autograd.grad(s.sum(), layers[l]["attn"], retain_graph=True)   # (B, H, N, N)
        e = e + g.clamp_min(0).mean(2).mean(1)
    return e[:, prefix:].detach()


# --------------------------------------------------------------------------- the no-N×N recorder


class ShapeRecorder(TorchDispatchMode):
    """Every tensor shape an operator returns during the mode, in ``shapes``."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def attention_tile(device: torch.device) -> int:
    """The largest attention tile a kernel may pad N to: the interpreter's, or the GPU table's largest."""
    from tokentm_fast.kernels.attention import CONFIG_TABLE, INTERPRETER_CONFIG

    if device.type != "cuda":
        return max(INTERPRETER_CONFIG.kwargs["BLOCK_M"], INTERPRETER_CONFIG.kwargs["BLOCK_N"])
    return max(max(m, n) for entries in CONFIG_TABLE.values() for m, n, _, _ in entries)


def n_by_n(shapes: Sequence[Tuple[int, ...]], n: int, tile: int, images: tuple = ()) -> list:
    """The recorded shapes that could hold an N×N tensor in any layout: two or more dimensions, two of them
    in [N, N + tile] (N×N, or padded to a tile), or one of N² or more (flattened); the images' shape excluded."""
    def suspect(s):
        near = sum(n <= d <= n + tile for d in s)
        return len(s) >= 2 and s != tuple(images) and (near >= 2 or any(d >= n * n for d in s))
    return [s for s in shapes if suspect(s)]


#: the recorder's model sizes: N = 65 tokens (8×8 patches of 64-px images, plus a class token or a register),
#: so that no legitimate dimension of the flash path lands in [65, 65 + tile] (129 on the CPU, 193 on the
#: GPU's table) or at 65² = 4225 or more: batch 2, two targets, 3 heads 64 wide, widths 192 (qkv 576,
#: MLP 768), grid 8, B·N = 130, B·H·N = 390, 5 classes or 16 embedding channels. The input images
#: (2, 3, 64, 64) are excluded from the check (an explanation may read them, it does not build them).
N65: Dict[str, int] = dict(size=64, patch=8, width=192, heads=3, mlp=768, depth=2)


def __getattr__(name: str):
    """``FLASH_METHODS``: the methods the flash path serves (``MethodSpec.materialized_only`` unset: since
    issue 28 every method), from the registry. Looked up on first use, so that importing this module imports
    nothing of the package (tests/spec_oracle.py, independent of it, imports ``rel_err_l2`` from here)."""
    if name == "FLASH_METHODS":
        import tokentm_fast as tf

        return [m for m in tf.METHODS if not tf.methods.get_method(m).materialized_only]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- subprocesses

#: what a child must not inherit: a parent's torchrun rank and rendezvous (the child would join it), and
#: the package's debug switch (it changes the error messages the CLI tests read)
INHERITED_KEYS_DROPPED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "TOKENTM_FAST_DEBUG")


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment of a CLI or torchrun child: this process's, one thread each (OMP, MKL: the CPU is
    shared by the ranks), without ``INHERITED_KEYS_DROPPED``, plus ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in INHERITED_KEYS_DROPPED:
        env.pop(k, None)
    env.update(extra)
    return env


#: the methods whose maps are signed sums (cancellations: compared on float64 copies, docs/methods.md §7)
SIGNED_SUMS = ("attcat", "conservative_lrp", "lrp", "partial_lrp", "transformer_attribution")
#: two float64 computations of one map agree to float64 rounding, but ``explain`` returns float32 maps: each
#: element rounded to a relative 2⁻²⁴, so the relative L2 error is at most 2⁻²⁴ on each side
FLOAT32_OUTPUT = 2.0 ** -23


def reference_pair(method: str, model, x, model64, x64, attention: str, target, on_backend: Callable,
                   backend: str, gradcam_tol: float) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """``(ref, got, tol)``, §7 as tests/test_models.py holds it, for a model family's every-backend test:
    float32 maps (``on_backend()``: the call on the backend and path under test) within 1e-5 of the float64
    reference (attention Grad-CAM within ``gradcam_tol``); the signed sums on float64 copies within the
    maps' float32 rounding (torch). Triton (float32 only): on the materialized path within 1e-4 of the float32
    torch map (the same products in the same order); on the flash path against the float64 reference within
    ``1e-4 + 2·e`` per image, ``e`` the float32 error of the PyTorch twin's map on the same path (the tiled
    sums and the divisions by O and Z round differently in the kernels and in the twin: two float32 runs of
    an ill-conditioned map differ by about the sum of their errors, measured 2·10⁻⁵ to 5·10⁻⁴ on the test
    models where the twin's own error is 3·10⁻⁴ to 1.6·10⁻²)."""
    from tokentm_fast import explain as tf_explain  # here: importing helpers imports nothing of the package

    if method in SIGNED_SUMS:
        if backend == "torch":
            return (tf_explain(model64, x64, method, backend="reference", target=target),
                    tf_explain(model64, x64, method, backend="torch", attention=attention, target=target),
                    FLOAT32_OUTPUT)
        twin = tf_explain(model, x, method, backend="torch", attention=attention, target=target)
        if attention != "flash":
            return twin, on_backend(), 1e-4
        ref = tf_explain(model64, x64, method, backend="reference", target=target)
        return ref, on_backend(), 1e-4 + 2 * rel_err_l2(twin, ref)
    return (tf_explain(model64, x64, method, backend="reference", target=target), on_backend(),
            gradcam_tol if method == "attn_gradcam" else 1e-5)

