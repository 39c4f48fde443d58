"""Memory accounting of the benchmark suite: peak trackers, live-memory probes, estimates.

- ``PeakTracker`` / ``measure_peak(fn, device)``: the peak tensor memory a call
  adds. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated
  before (``reset_peak_memory_stats`` first). CPU: a ``TorchDispatchMode``
  that adds the bytes of every new storage an operator returns and subtracts
  them when the storage is freed (a weakref finalizer) — the CPU counterpart of
  the CUDA allocator's statistics, exact for tensor storage.
- ``live_tensor_bytes()`` (storages reachable from Python tensors) and
  ``malloc_in_use()`` (glibc ``mallinfo2``: every byte the process holds from
  ``malloc``, torch's CPU allocations included): what the cleanup test reads
  before and after each case.
- ``aggregation_peak`` and ``explain_peak``: the peak memory of a case, derived
  from what the code allocates (the formulas are checked against
  ``measure_peak`` on small CPU sizes in ``tests/test_benchmarks_memory.py``); the
  size filter leaves out cases whose estimate does not fit.
"""
from __future__ import annotations

import ctypes
import gc
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# --------------------------------------------------------------------------- measuring


class PeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by operators run inside the mode.

    Storages that exist before an operator (its inputs, views, in-place results)
    are not counted again; a storage's bytes are subtracted when it is freed.
    ``current`` is what is still alive of what was allocated inside, ``peak`` its
    high-water mark.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: Dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat_in = tree_flatten((args, kwargs or {}))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:
                continue
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self._alive[key] = weakref.finalize(st, self._freed, key, nbytes)
        return out


def measure_peak(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, int]:
    """``(fn(), peak bytes the call added above what was allocated before it)``."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - before)
    tracker = PeakTracker()
    with tracker:
        out = fn()
    return out, int(tracker.peak)


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor reachable by the garbage collector."""
    gc.collect()
    seen: Dict[Tuple[str, int], int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensor subclasses without storage
            continue
        seen[(str(obj.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def malloc_in_use() -> Optional[int]:
    """Bytes the process holds from glibc ``malloc`` (heap in use + mmapped blocks); None elsewhere."""
    if _LIBC is None:
        return None
    gc.collect()
    m = _LIBC.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def device_memory_in_use(device: torch.device) -> int:
    """What the cleanup compares: CUDA allocated bytes, or on CPU the live tensor bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()
        return int(torch.cuda.memory_allocated(device))
    return live_tensor_bytes()


def release(device: torch.device) -> None:
    """Free what nothing references any more: garbage cycles, and the CUDA cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- estimates
#
# Units (bytes): act = B·N·D·s (one residual-stream tensor), layer = B·H·N²·s (one
# layer's attention or gradient), bn2 = B·N²·s (one head-fused N×N matrix), img =
# B·3·h·w·s (the images), wt = D²·s (one D×D weight: the LRP rules split a linear
# map's weight into W⁺ and W⁻, fc1/fc2's being 4·D² each), with s the item size the
# code computes in: 8 for the float64 reference, the model's for the other paths. The
# one-off terms of the methods in ``_FLOAT32_TRANSIENTS`` use max(s, 4): their
# transients are float32 at least for half-precision models. ``ell`` = the blocks a
# method records (L for tokentm/gae/rollout/the LRP family with start_layer 0, 2 for
# legrad's default start_layer −2, 1 for raw_attention/attn_gradcam/partial_lrp).
#
# The coefficients come from reading the code (what each path keeps alive per
# block and the transients of the last block and of the aggregation) and are set
# as upper bounds of the peaks measured with ``PeakTracker`` on 20 small CPU
# configurations (L 2–12, N 10–401, D 32–768, H 2–12, B 1–4); with MARGIN the
# estimates are 1.1–2.0 × the measured peaks (``python benchmarks/calibrate_memory.py``
# re-measures eight of them). Per block, the
# float64 reference keeps about 13 stream tensors of its autograd graph and records
# (LN, qkv, q·scale, head outputs, proj, MLP hidden ×2 (4 each), ...) and, for the
# gradient methods, the attention and its gradient: 2 layers + their products.

# Every estimate is multiplied by MARGIN: the tightest measured ratios (float64
# copies of parameter-dominated models) are 1.00–1.03, and a CUDA allocator rounds
# blocks up and fragments.
MARGIN = 1.1

_EXPLAIN_COEFFS: Dict[Tuple[str, str], Dict[str, float]] = {
    # (method, path): per-recorded-block terms (ell_*) and one-off terms
    ("tokentm", "reference"): dict(ell_layer=2.25, ell_act=13.0, layer=3.0, act=11.0, bn2=4.0, img=4.0),
    ("gae", "reference"): dict(ell_layer=2.25, ell_act=14.5, layer=3.0, act=11.0, bn2=4.0, img=4.0),
    ("rollout", "reference"): dict(ell_layer=1.25, ell_act=8.0, layer=1.0, act=7.0, bn2=7.0, img=1.0),
    ("legrad", "reference"): dict(ell_layer=1.75, ell_act=20.0, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    ("raw_attention", "reference"): dict(ell_layer=1.75, ell_act=18.5, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    ("attn_gradcam", "reference"): dict(ell_layer=2.5, ell_act=25.5, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    ("tokentm", "fast"): dict(ell_layer=1.0, ell_act=10.75, layer=2.0, act=6.0, bn2=0.0, img=1.0),
    ("gae", "fast"): dict(ell_layer=1.0, ell_act=10.75, layer=2.0, act=6.0, bn2=0.0, img=1.0),
    ("rollout", "fast"): dict(ell_layer=0.25, ell_act=0.0, layer=1.5, act=12.0, bn2=1.75, img=1.0),
    ("legrad", "fast"): dict(ell_layer=1.0, ell_act=10.5, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    ("raw_attention", "fast"): dict(ell_layer=2.0, ell_act=12.0, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    ("attn_gradcam", "fast"): dict(ell_layer=1.75, ell_act=16.0, layer=0.0, act=0.0, bn2=0.0, img=1.0),
    # Measured with PeakTracker (CPU) on 18 ViTs (L 2–12, N 10–577, D 32–768, H 2–12, B 1–8; the fast
    # path in float32 and, on 5 of them, bfloat16): estimate ÷ measured 1.02–1.20 (conservative_lrp),
    # 1.02–1.29 (attcat), 1.00–1.29 (lrp), 1.00–1.36 (partial_lrp), 1.00–1.26 (transformer_attribution).
    # conservative_lrp / attcat (docs/methods.md §6.2): one forward with the graph, one backward; attcat
    # also keeps every layer's query row and output, and its bfloat16 peaks need the one-off terms in float32.
    ("conservative_lrp", "reference"): dict(ell_layer=1.0, ell_act=2.75, layer=0.75, act=7.0, bn2=0.75, img=1.75),
    ("attcat", "reference"): dict(ell_layer=1.25, ell_act=7.25, layer=1.5, act=6.25, bn2=1.0, img=0.75),
    ("conservative_lrp", "fast"): dict(ell_layer=1.0, ell_act=3.75, layer=1.0, act=7.75, bn2=0.0, img=0.0, wt=0.5),
    ("attcat", "fast"): dict(ell_layer=1.25, ell_act=9.5, layer=1.5, act=4.5, bn2=0.0, img=0.0, wt=0.25),
    # The LRP relevance pass (docs/methods.md §6.3): per recorded block x_in, q/k/v, A, the branch outputs
    # and the linear maps' inputs (about 12 act + 1 layer); then one block at a time top-down, the MLP's
    # (B, N, 4D) inputs split into positive and negative parts, a few (B, H, N, N) products and W⁺/W⁻ of
    # one linear map (with its float32 copy for half models). transformer_attribution keeps the graph
    # (and ∇A) of the recorded blocks as well; lrp adds the pixels.
    ("lrp", "reference"): dict(ell_layer=1.25, ell_act=12.0, layer=5.75, act=33.0, bn2=0.0, img=0.0, wt=4.5),
    ("partial_lrp", "reference"): dict(ell_layer=1.0, ell_act=12.0, layer=5.0, act=23.25, bn2=0.0, img=1.5, wt=11.0),
    ("transformer_attribution", "reference"): dict(ell_layer=1.75, ell_act=13.25, layer=6.5, act=34.0, bn2=0.0,
                                                   img=0.0, wt=4.25),
    ("lrp", "fast"): dict(ell_layer=1.0, ell_act=12.5, layer=6.5, act=36.25, bn2=0.0, img=0.75, wt=11.25),
    ("partial_lrp", "fast"): dict(ell_layer=1.0, ell_act=12.0, layer=5.5, act=36.75, bn2=0.0, img=0.0, wt=11.25),
    ("transformer_attribution", "fast"): dict(ell_layer=1.25, ell_act=18.75, layer=5.75, act=35.0, bn2=0.0,
                                              img=0.0, wt=11.25),
}

RECORDED_BLOCKS = {"legrad": 2, "raw_attention": 1, "attn_gradcam": 1, "partial_lrp": 1}

# methods whose one-off transients are in the compute dtype (float32 at least), not the model's
_FLOAT32_TRANSIENTS = frozenset({"attcat", "lrp", "partial_lrp", "transformer_attribution"})


def explain_peak(method: str, backend: str, *, L: int, H: int, N: int, D: int, B: int, params: int,
                 image_pixels: int, itemsize: int) -> int:
    """Estimated peak bytes one ``explain`` call adds (the model itself not counted).

    ``backend="reference"`` computes in float64 on a float64 copy of the model
    (8·params more); ``"literal"`` (``bench_models.literal_explain``) keeps the
    same tensors in the model's dtype (``itemsize``); ``torch`` / ``triton``
    (materialized attention) use the fast path's coefficients.
    """
    ref = backend == "reference"
    s = 8 if ref else itemsize
    literal_like = backend in ("reference", "literal")  # every layer's A and G kept, N×N products
    c = _EXPLAIN_COEFFS[(method, "reference" if literal_like else "fast")]
    ell = min(L, RECORDED_BLOCKS.get(method, L))
    acc = max(s, 4) if method in _FLOAT32_TRANSIENTS else s   # item size of the one-off transients
    recorded = ell * (c["ell_layer"] * B * H * N * N + c["ell_act"] * B * N * D) * s
    one_off = (c["layer"] * B * H * N * N + c["act"] * B * N * D + c["bn2"] * B * N * N
               + c["img"] * B * 3 * image_pixels + c.get("wt", 0.0) * D * D) * acc
    total = recorded + one_off
    return int(MARGIN * (total + (8 * params if ref else 0)))


def step_peak(*, L: int, H: int, N: int, D: int, B: int, params: int, image_pixels: int, itemsize: int,
              fused: bool) -> int:
    """Estimated peak of one training step (forward, backward with parameter gradients).

    Parameter gradients (params·itemsize) plus the autograd graph: about 12 stream
    tensors per block with fused attention (LN, qkv, attention output, proj, MLP
    hidden ×2) and, with explicit attention, a few more and the stored
    probabilities and their gradient (2 layers).
    """
    s = itemsize
    act, layer = B * N * D * s, B * H * N * N * s
    per_block = (12 if fused else 16) * act + (0 if fused else 2 * layer)
    # fused attention (SDPA) keeps the log-sum-exp (B·H·N floats) and its backward scratch
    lse = B * H * N * 4 * (3 if fused else 0)
    return int(MARGIN * (params * s + L * (per_block + lse) + 8 * act + 2 * layer * (0 if fused else 1)
                         + 2 * B * 3 * image_pixels * s))


def aggregation_peak(suite: str, backend: str, *, L: int, H: int, N: int, B: int, D: int, itemsize: int,
                     ref_itemsize: int = 8, Q: int = 1) -> int:
    """Estimated peak of one case of ``test_bench_aggregation.py`` (data, oracle and the timed call).

    The data (A and G of L layers in the case's dtype) is made per case; its
    float64 oracle needs 4 float64 layers at a time (two conversions, the
    product and its clamp). The reference case converts A and G to
    ``ref_itemsize`` (another 2·L layers) and forms N×N products; torch/triton
    need a few layer-sized float32 temporaries at most.
    """
    s = itemsize
    layer = B * H * N * N
    bn2 = B * N * N
    if suite in ("aggregation", "aggregation_full"):
        data = 2 * L * layer * s + 3 * L * B * N * 4
        make = data + max(2 * layer * 4 + layer * s, 4 * layer * 8 + 8 * bn2 * 8)
        run = {
            "reference": 2 * L * layer * ref_itemsize + layer * ref_itemsize + 10 * bn2 * ref_itemsize,
            "torch": 3 * layer * 4 + 8 * bn2 * 4,
            "triton": 4 * bn2 * 4 + B * N * 16,
        }[backend]
        oracle = (bn2 if suite == "aggregation_full" else B * N) * 8
        return int(MARGIN * max(make, data + oracle + run))
    if suite == "head_fusion":
        data = 2 * layer * s
        return int(MARGIN * (data + max(4 * layer * 8 + bn2 * 8, bn2 * 8 + 3 * layer * 4 + bn2 * 4)))
    if suite == "transform_weights":
        return int(MARGIN * (2 * B * N * D * s + 8 * B * N * D * 8))
    if suite == "legrad_reduce":
        return int(MARGIN * (B * H * Q * N * s + 3 * B * H * Q * N * 8))
    raise ValueError(f"unknown suite {suite!r}")
