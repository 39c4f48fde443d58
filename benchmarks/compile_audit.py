"""Compile audit of every Triton kernel in ``kernels/`` for an H100 (sm_90), no GPU needed.

Every (kernel, constexpr variant the wrappers launch, dtype, head width) specialisation is compiled for
``GPUTarget("cuda", 90, 32)`` with each configuration its autotuner can choose *after pruning* and with every
*launch signature* a realistic call gives it (below), with Triton's bundled ptxas. Registers and spilled bytes
are read from ptxas' ``-v`` log (``n_spills`` / ``n_regs`` of the compiled kernel's metadata where the backend
fills them), shared memory from the compiled kernel's metadata; CTAs/SM follow from H100 limits (65,536
registers per SM allocated per warp in units of 256, 228 KB shared memory per SM with 1 KB reserved per CTA,
227 KB = 232,448 B per CTA at most, 2048 threads and 32 CTAs per SM).

    python benchmarks/compile_audit.py --jobs 2 --out benchmarks/results/compile-sm90   # the full audit
    python benchmarks/compile_audit.py --kernel forward --dtype bf16                    # a part of it
    python benchmarks/compile_audit.py --jobs 1 --kernel "relevance q" --out benchmarks/results/compile-sm90 --merge

``--merge`` replaces only the recompiled part's rows in the committed audit (``merged``: refused unless the rows it
keeps were compiled from the current sources of their kernel modules, with this Triton and torch).

Run without TRITON_INTERPRET; each compile uses its own temporary TRITON_CACHE_DIR; the compiles run in
parallel over ``--jobs`` processes (default: every core).

What is compiled (``jobs()``), kernel by kernel, is the set the wrappers launch, written out by hand from
the wrapper code below (``SPECS``) and checked against recorded launches of every method on both Triton
paths by ``tests/test_compile_audit.py`` (``recorded_launches``):

* pointer dtypes: the tensors the model's dtype reaches (q/k/v/o/dO, the attention maps, the token
  tensors, LeGrad's gradient rows) in bf16 / fp16 / fp32, every other pointer float32;
* attention kernels (``kernels/attention.py``): BLOCK_D = 32, 64, 128 (head widths 32, 64 and
  72 / 80 / 96 / 128), IEEE = True (float32, torch's default) and False (16-bit; float32 with TF32 allowed),
  UPCAST = False (it is True only under the interpreter), the forward, dK/dV plain (``ACC_NONE``: the
  blocks between chosen TokenTM layers) and with the GAE accumulator with and without input gradients,
  dV alone (``GRADS_V``: conservative LRP's backward with the attention held constant), dQ, both
  ``attention_rows`` modes, the δ kernel;
* the relevance programs (``kernels/attention_relevance.py``): the same BLOCK_D classes, bf16 / fp16 and float32
  with IEEE products only (they never use TF32), the key program without t (lrp), with partial LRP's row sum
  and with transformer attribution's (dO read), and the query program;
* BEiT's relative position bias (``HAS_BIAS``, the ``+bias`` kernels): each program above that forms P with the
  bias read from its table in the tiles, and the relevance programs' per-image sums (``relevance sums``,
  ``rules="ours"``), launched at the class-token token count (197: a 14 × 14 grid) with the (R, H) table as the
  adapters hand it (contiguous: its head stride 1, a constexpr);
* the other kernels: the head-fusion modes, weights as tensors or constants as the explain paths pass
  them, SPLIT_OUT both ways (chosen at run time from the device's SM count), LeGrad's accumulate flag,
  the NECC normalisation's block sizes and the finalize kernels' Q blocks.

Launch signatures. Triton compiles a kernel per *specialisation* of its non-constexpr arguments, read off the
values of each call (``native_specialize_impl`` in ``triton/runtime/jit.py``, mirrored by ``specialise``): an
integer equal to 1 becomes the constexpr 1, an integer that is a multiple of 16 gets ``tt.divisibility = 16``
(which lets the compiler vectorise loads and fold masks), one outside [-2³¹, 2³¹) becomes i64, a pointer gets
the divisibility when its data is 16-byte aligned. Different specialisations are different programs with
different register allocations, so the audit compiles the ones real calls produce: each wrapper is called on
meta tensors (``realistic_launches``) as the explain paths call it, for every combination of ``HEAD_WIDTHS``
(multiples of 16, and 72 for the widths that are not: SigLIP so400m, ViT-g), ``TOKENS`` (197 with a class
token, 256 without: N ∤ 16 and 16 | N), ``HEADS`` (12, 16) and ``BATCHES`` (1: B = 1 is a constexpr;
128: the split-K kernels do not split), q/k/v as timm / ``nn.MultiheadAttention`` and Hugging Face slice them,
dO as autograd returns it, with the kernels replaced by recorders; each launch's arguments are specialised as
Triton does (``launch_spec``), and every configuration of a variant is compiled with each distinct signature of
that variant. Two reductions leave the compiled code unchanged: an integer the body does not read once the
constexpr branches are folded (the autotune keys ``*_BUCKET``; B when SPLIT_OUT is off) is compiled as plain
i32, and the head count's divisibility (``DIVISIBILITY_INERT``) is dropped (both checked in the tests: the same
PTX). No realistic argument reaches 2³¹ (the largest, the batch stride 3·N·H·d of a fused qkv projection, stays below
2²⁷ at N = 16,385, H = 16, d = 128; products that can exceed 2³¹ are formed in int64 inside the kernels), so
every integer is i32.
Until issue 25 the audit typed every integer i32 and gave the strides divisibility 16 and N, HEAD_D none; a real
call passes HEAD_D = 64 or 128 (a multiple of 16: the head-width mask becomes vectorisable) with N = 197 (not):
that specialisation spilled in three float32-IEEE backward configurations the audit reported clean.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from functools import cache

REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 232448
THREADS_PER_SM = 2048
MAX_CTAS = 32
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # shared memory the system reserves per CTA (sm_80 and later)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DTYPES = ("bf16", "fp16", "fp32")
KERNEL_MODULES = ("attention", "transform_weights", "row_update", "matrix_update", "head_fusion", "legrad_reduce",
                  "attention_relevance")
#: default launch options of Triton's CUDA backend (kernels launched without a config)
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3


def _bools(*names):
    """Every combination of the boolean constexprs ``names``."""
    out = [{}]
    for n in names:
        out = [{**d, n: v} for d in out for v in (False, True)]
    return out


#: weights of the row / matrix updates as the explain paths pass them: (mode code, W_ATTN_TENSOR, W_MLP_TENSOR)
#: tokentm (gae, tensors), tokentm head_fusion="decoupled" (tensors), gae (gae, constants), rollout (mean
#: fusion with constants). The row update always launches one row per program (BLOCK_Q = 1).
_UPDATE_MODES = [(0, True, True), (1, True, True), (0, False, False), (2, False, False)]

#: the relevance programs' pointers in the model's dtype (R_O, ℓ, the row and the outputs are float32)
_RELEVANCE_MODEL = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr"}

#: name -> what the wrappers launch. "model": pointers in the model's dtype (all others float32);
#: "variants": constexpr dicts; "configs": "table:<kind>" (attention table), "module:<ATTR>" (the module's GPU
#: configurations, pruned by its own hook at a large shape) or a fixed list of (constexprs, warps, stages).
SPECS = {
    "forward": dict(module="attention", attr="_flash_fwd_kernel", model={"q_ptr", "k_ptr", "v_ptr", "o_ptr"},
                    variants=[{"HAS_BIAS": False}], configs="table:fwd"),
    "dkdv": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                 model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                 variants=[{"ACC": 0, "GRADS": 2, "HAS_BIAS": False}], configs="table:bwd"),
    "dkdv+gae": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                     model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                     variants=[{"ACC": 1, "GRADS": 2, "HAS_BIAS": False}], configs="table:bwd"),
    "dkdv gae-only": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                          model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                          variants=[{"ACC": 1, "GRADS": 0, "HAS_BIAS": False}], configs="table:bwd"),
    "dkdv v-only": dict(module="attention", attr="_flash_bwd_dkdv_kernel",
                        model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"},
                        variants=[{"ACC": 0, "GRADS": 1, "HAS_BIAS": False}], configs="table:bwd"),
    "dq": dict(module="attention", attr="_flash_bwd_dq_kernel", model={"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"},
               variants=[{"HAS_BIAS": False}], configs="table:dq"),
    "rows probs": dict(module="attention", attr="_attention_rows_kernel",
                       model={"q_ptr", "k_ptr", "do_ptr", "v_ptr"}, variants=[{"MODE": 0, "HAS_BIAS": False}], configs="table:bwd"),
    "rows relu-grad": dict(module="attention", attr="_attention_rows_kernel",
                           model={"q_ptr", "k_ptr", "do_ptr", "v_ptr"}, variants=[{"MODE": 1, "HAS_BIAS": False}], configs="table:bwd"),
    "delta": dict(module="attention", attr="_delta_kernel", model={"o_ptr", "do_ptr"}, variants=[{}],
                  configs="delta"),
    "transform_weights": dict(module="transform_weights", attr="_transform_weights_kernel", model={"x_ptr", "t_ptr"},
                              variants=_bools("USE_LENGTH", "USE_NECC"), configs="module:GPU_CONFIGS"),
    "necc_normalize": dict(module="transform_weights", attr="_necc_normalize_kernel", model=set(), variants=[{}],
                           configs=[({"BLOCK": 1 << k}, 4, DEFAULT_STAGES) for k in range(4, 11)]),
    "fuse_heads": dict(module="head_fusion", attr="_fuse_heads_kernel", model={"attn_ptr", "grad_ptr"},
                       variants=[{"MODE": m} for m in range(3)],  # the codes of kernels._utils.FUSION_TABLE
                       configs="module:GPU_CONFIGS"),
    "row_update": dict(module="row_update", attr="_row_update_kernel", model={"attn_ptr", "grad_ptr"},
                       variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w, "SPLIT_OUT": s, "BLOCK_Q": 1}
                                 for m, a, w in _UPDATE_MODES for s in (False, True)],
                       configs="module:ROW_GPU_CONFIGS"),
    "matrix_update": dict(module="matrix_update", attr="_matrix_update_kernel", model={"attn_ptr", "grad_ptr"},
                          variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w, "SPLIT_OUT": s,
                                     "ALLOW_TF32": t}
                                    for m, a, w in _UPDATE_MODES for s in (False, True) for t in (False, True)],
                          configs="module:GPU_CONFIGS"),
    "update_finalize": dict(module="row_update", attr="_update_finalize_kernel", model=set(),
                            variants=[{"MODE": m, "W_ATTN_TENSOR": a, "W_MLP_TENSOR": w} for m, a, w in _UPDATE_MODES],
                            configs=[({"BLOCK_Q": q, "BLOCK_J": 128}, 4, DEFAULT_STAGES) for q in (1, 2, 4, 8, 16)]),
    "legrad_reduce": dict(module="legrad_reduce", attr="_legrad_reduce_kernel", model={"g_ptr"},
                          variants=_bools("ACCUMULATE", "SPLIT_OUT"), configs="module:GPU_CONFIGS"),
    "legrad_finalize": dict(module="legrad_reduce", attr="_legrad_finalize_kernel", model=set(),
                            variants=_bools("ACCUMULATE"), configs=[({"BLOCK": 128}, 4, DEFAULT_STAGES)]),
    # the relevance programs (kernels/attention_relevance.py): the key program without t (lrp), with partial
    # LRP's row sum (ROW = 1) and with transformer attribution's (ROW = 2: ∇A from dO), and the query program
    "relevance kv": dict(module="attention_relevance", attr="_relevance_kv_kernel", model=_RELEVANCE_MODEL,
                         variants=[{"ROW": 0, "HAS_BIAS": False}], configs="table:rel_kv"),
    "relevance kv+rows": dict(module="attention_relevance", attr="_relevance_kv_kernel", model=_RELEVANCE_MODEL,
                              variants=[{"ROW": 1, "HAS_BIAS": False}], configs="table:rel_kv"),
    "relevance kv+grad rows": dict(module="attention_relevance", attr="_relevance_kv_kernel",
                                   model=_RELEVANCE_MODEL, variants=[{"ROW": 2, "HAS_BIAS": False}], configs="table:rel_kv"),
    "relevance q": dict(module="attention_relevance", attr="_relevance_q_kernel",
                        model={"q_ptr", "k_ptr", "v_ptr", "o_ptr"}, variants=[{"HAS_BIAS": False}],
                        configs="table:rel_q"),
}
#: BEiT's relative position bias read from its table inside the tiles (HAS_BIAS): every program that forms P, the
#: same kernels and tables with the bias arguments live; and the add rule's per-image sums (``"ours"``)
SPECS.update({f"{name}+bias": dict(SPECS[name], variants=[dict(v, HAS_BIAS=True) for v in SPECS[name]["variants"]],
                                   configs=SPECS[name]["configs"] + "+bias")      # the tables less BIAS_SPILLS
              for name in ("forward", "dkdv", "dkdv+gae", "dkdv gae-only", "dkdv v-only", "dq", "rows probs",
                           "relevance kv", "relevance kv+rows", "relevance kv+grad rows", "relevance q")})
SPECS["relevance sums"] = dict(module="attention_relevance", attr="_relevance_sums_kernel",
                               model={"q_ptr", "k_ptr", "v_ptr", "o_ptr"}, variants=[{}], configs="table:rel_kv")
ATTENTION_KERNELS = tuple(k for k, s in SPECS.items() if s["module"] == "attention")
#: the relevance programs: attention tiles (BLOCK_D classes); every product IEEE float32 on float32 tiles (16-bit
#: inputs upcast on load) whatever torch's TF32 switch says: one class per dtype, no IEEE / UPCAST constexprs
RELEVANCE_KERNELS = tuple(k for k, s in SPECS.items() if s["module"] == "attention_relevance")

#: a shape large enough that no pruning hook drops a configuration for its size
_LARGE = {"N": 1 << 16, "D": 1 << 16, "Q": 1 << 16, "R": 1 << 16, "H": 16, "B": 1, "L": 1}


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident CTAs per H100 SM, as CUDA's occupancy calculator counts them: registers are allocated per
    warp in units of 256 (``REG_UNIT``), every CTA reserves 1 KB of shared memory for the system
    (``SMEM_RESERVED``), at most 2048 threads and 32 CTAs per SM."""
    threads = 32 * num_warps
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED) if smem else MAX_CTAS
    if smem > SMEM_PER_CTA:
        by_smem = 0
    return min(by_regs, by_smem, THREADS_PER_SM // threads, MAX_CTAS)


def _module(name):
    """``tokentm_fast.kernels.<name>``. The package's wrappers are resolved first: it serves them lazily (module
    ``__getattr__``), and importing a kernel module before would leave the package attribute of the same name
    (``transform_weights``, ...) bound to the module, which the explain paths would then call."""
    import importlib

    kernels = importlib.import_module("tokentm_fast.kernels")
    for wrapper in getattr(kernels, "_WRAPPERS", ()):
        if not callable(kernels.__dict__.get(wrapper)):
            getattr(kernels, wrapper)
    return importlib.import_module("tokentm_fast.kernels." + name)


def _dtype_classes(kernel: str):
    """(dtype, IEEE) the wrappers pass: 16-bit inputs use tensor cores, float32 IEEE products (torch's
    default) or TF32 (when torch's switch allows it). Kernels without ``tl.dot`` on model tensors: the dtype."""
    if kernel in ATTENTION_KERNELS and kernel != "delta":
        return [("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False)]
    if not SPECS[kernel]["model"]:
        return [("fp32", None)]  # only float32 pointers: one specialisation
    return [(d, None) for d in DTYPES]


def _label(dt, ieee):
    return dt if ieee is None or dt != "fp32" else dt + (" ieee" if ieee else " tf32")


def kernel_configs(kernel: str, dt: str, block_d=None):
    """[(constexprs, num_warps, num_stages)] the kernel's autotuner can choose for this class after pruning."""
    spec = SPECS[kernel]
    cfg = spec["configs"]
    if isinstance(cfg, list):
        return cfg
    if cfg == "delta":
        return [({"BLOCK_M": 32}, DEFAULT_WARPS, DEFAULT_STAGES)]
    if cfg.startswith("table:"):
        A = _module("attention")
        return [({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in A.table_configs(cfg[6:], dt, block_d)]
    mod = _module(spec["module"])
    configs = getattr(mod, cfg[7:])
    prune = {"_row_update_kernel": "_prune_row_configs"}.get(spec["attr"], "_prune")  # the autotuner's hook
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs], prune


def _selectable(kernel, dt, variant, block_d=None):
    res = kernel_configs(kernel, dt, block_d)
    if isinstance(res, tuple):  # module configs: prune as the autotuner does, at a large shape
        import triton

        configs, prune_name = res
        mod = _module(SPECS[kernel]["module"])
        objs = [triton.Config(dict(k), num_warps=w, num_stages=s) for k, w, s in configs]
        kept = getattr(mod, prune_name)(objs, dict(_LARGE), **variant)
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]
    return res


# --------------------------------------------------------------------------- what a real launch specialises
#: The launches the audit specialises for: the wrappers called as the explain paths call them, on meta tensors
#: (no memory), for every combination of these shapes. Head widths: 32 / 64 / 80 / 96 / 128 are multiples of 16
#: (every stride of a (B, H, N, d) view and HEAD_D get Triton's divisibility); 72 (SigLIP so400m, 1152 / 16)
#: stands for the widths that are not (72, 88, 104: HEAD_D, the row stride of contiguous tensors and N·d for odd N
#: lose it). Tokens: 197 with a class token (16-pixel patches at 224²; like 257, 577, 729, 4097 not a multiple of
#: 16) and 256 without one, mean-pooled (16 x 16 patches: SigLIP at 256², /14 models at 224²; a multiple of 16,
#: like 576, 1024). Heads: 12 and 16 (ViT-L / H, so400m). Images per call: 1 (one explanation) and 128 (enough
#: output tiles that the split-K kernels do not split on an H100's 132 SMs).
HEAD_WIDTHS = (32, 64, 72, 80, 96, 128)
TOKENS = ((197, True), (256, False))  # (N, class token)
HEADS = (12, 16)
BATCHES = (1, 128)
#: the device the split-K wrappers plan for (``kernels._utils.num_splits``): an H100 SXM's SMs
H100_SMS = 132
#: integer arguments whose divisibility by 16 never changes the compiled code, only their value 1 does: the head
#: count H enters the (image, head) split of the program id and the head loop's trip count, never an address's
#: alignment or a mask (checked by tests/test_compile_audit.py: the same PTX with and without the attribute)
DIVISIBILITY_INERT = frozenset({"H"})


def specialise(value):
    """``(type, attribute)`` that Triton 3.8 gives one non-constexpr launch argument (``native_specialize_impl``
    in ``triton/runtime/jit.py``'s binder, for a parameter without ``do_not_specialize``): an int equal to 1
    becomes the constexpr 1; other ints are i32 in [-2³¹, 2³¹), i64 up to 2⁶³, u64 above, with the divisibility
    attribute ``"D"`` (16) when a multiple of 16 (0 included); a tensor is a pointer to its dtype, ``"D"`` when
    its data pointer is 16-byte aligned; a float is fp32, a bool u1, None the constexpr None."""
    import torch

    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        ty = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64" if -2 ** 63 <= value < 2 ** 63 else "u64"
        return ty, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[value.dtype]
        return "*" + name, "D" if value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"no specialisation rule for {type(value).__name__}")


def _const_value(node, consts: dict, module):
    """The value of a constexpr test (``ACC == _ACC_GAE``, ``not SPLIT_OUT``, ``MODE == 0``, ``A and B``) given
    the launch's constexprs and the module's ``tl.constexpr`` globals; ``KeyError`` when not known."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in consts:
            return consts[node.id]
        obj = getattr(module, node.id)  # AttributeError → KeyError below
        return getattr(obj, "value", obj)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _const_value(node.operand, consts, module)
    if isinstance(node, ast.BoolOp):
        vals = [_const_value(v, consts, module) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in (ast.Eq, ast.NotEq):
        a, b = _const_value(node.left, consts, module), _const_value(node.comparators[0], consts, module)
        return (a == b) if isinstance(node.ops[0], ast.Eq) else (a != b)
    raise KeyError(ast.dump(node))


@cache
def _body(fn):
    return ast.parse(_source(fn)).body[0].body


def live_names(fn, consts: dict, module) -> set:
    """Names the kernel body reads once the branches on constexprs are folded (``if SPLIT_OUT:`` with
    SPLIT_OUT = False drops its body), as Triton's code generator folds them. Conservative: a test it cannot
    evaluate keeps both branches; a name passed to a helper counts as read."""
    body = _body(fn)
    names = set()

    def visit(stmts):
        for st in stmts:
            if isinstance(st, ast.If):
                try:
                    taken = bool(_const_value(st.test, consts, module))
                except (KeyError, AttributeError, TypeError):
                    names.update(n.id for n in ast.walk(st.test) if isinstance(n, ast.Name))
                    visit(st.body)
                    visit(st.orelse)
                    continue
                visit(st.body if taken else st.orelse)
            else:
                names.update(n.id for n in ast.walk(st) if isinstance(n, ast.Name))
    visit(body)
    return names


def launch_spec(fn, module, args: dict, consts: dict) -> tuple:
    """The audit's signature of one launch: ``((name, type, attribute), …)`` for every non-constexpr argument,
    Triton's specialisation (``specialise``) of its value, pointers written ``*`` (the job gives the dtype).
    Integers the body does not read with these constexprs (the autotune keys, B when SPLIT_OUT is off, …)
    cannot change the code: plain i32, whatever Triton makes of them; so is the divisibility of
    ``DIVISIBILITY_INERT``."""
    live = _live(fn, tuple(sorted(consts.items())), module)
    out = []
    for name in fn.arg_names:
        if name in consts or name not in args:  # constexprs: given, or the autotuner's configuration
            continue
        ty, attr = specialise(args[name])
        if ty.startswith("*"):
            ty = "*"
        elif name not in live and (ty == "constexpr" or ty.startswith(("i", "u"))) and ty != "u1":
            ty, attr = "i32", ""
        elif name in DIVISIBILITY_INERT and attr == "D":
            attr = ""
        out.append((name, ty, attr))
    return tuple(out)


@cache
def _live(fn, consts: tuple, module) -> frozenset:
    return frozenset(live_names(fn, dict(consts), module))


class _Recorder:
    """Stands in for a kernel (``kernel[grid](*args, **constexprs)``): records the launch, runs nothing."""

    def __init__(self, attr, module, out):
        self.attr, self.module, self.out = attr, module, out
        self.fn = _jit_fn(getattr(module, attr))

    def __getitem__(self, grid):
        def launch(*args, **kw):
            bound = dict(zip(self.fn.arg_names, args))
            consts = {k: v for k, v in kw.items() if k in self.fn.arg_names}
            self.out.append({"attr": self.attr, "consts": consts,
                             "spec": launch_spec(self.fn, self.module, bound, consts)})
        return launch


@contextlib.contextmanager
def _recording(out):
    """Every audited kernel replaced by a ``_Recorder``; the split-K planners see an H100 (``H100_SMS``)."""
    import torch

    utils = _module("_utils")
    saved = [(_module(s["module"]), s["attr"]) for s in SPECS.values()]
    saved = [(m, a, getattr(m, a)) for m, a in dict.fromkeys(saved)]
    planners = [(m, m.num_splits) for m in (_module("row_update"), _module("legrad_reduce"))]
    num_sms = utils.num_sms
    try:
        for m, a, _ in saved:
            setattr(m, a, _Recorder(a, m, out))
        utils.num_sms = lambda device: H100_SMS
        for m, f in planners:
            m.num_splits = lambda tiles, units, device, f=f: f(tiles, units, torch.device("cuda"))
        yield out
    finally:
        for m, a, obj in saved:
            setattr(m, a, obj)
        for m, f in planners:
            m.num_splits = f
        utils.num_sms = num_sms


def _attention_calls(b, h, n, d, dtype):
    """The attention wrappers as the flash paths call them: q, k, v as timm / ``nn.MultiheadAttention`` slice
    them from one qkv projection, as Hugging Face views three projections, and contiguous (timm's q / k norm);
    dO as autograd hands it back through ``o.transpose(1, 2).reshape(B, N, C)``; the relevance pass's O, R_O
    and dO (``kernels.attention_relevance``)."""
    import torch

    A, R = _module("attention"), _module("attention_relevance")
    meta = {"device": "meta", "dtype": dtype}
    c = h * d
    qkv = torch.empty(b, n, 3 * c, **meta).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)

    def views():
        return torch.empty(b, n, c, **meta).view(b, n, h, d).transpose(1, 2)

    layouts = [qkv.unbind(0), (views(), views(), views())]
    do = views()
    row = torch.empty(b, n, device="meta", dtype=torch.float32)
    for q, k, v in layouts:
        for bias in (None, *_beit_biases(h, n)):
            kw = {} if bias is None else {"bias": bias}
            o, lse = A.flash_forward(q, k, v, 0.125, **kw)
            o, lse = torch.empty(b, h, n, d, **meta), torch.empty(b, h, n, device="meta", dtype=torch.float32)
            for r in (None, row):
                for grads in (True, False, "v"):
                    A.flash_backward(q, k, v, o, lse, do, 0.125, row=r, input_grads=grads, **kw)
            A.attention_rows(row, 0.125, q=q, k=k, lse=lse, **kw)
            A.attention_rows(row, 0.125, do=do, v=v)
            # the relevance pass: O and V as the flash path splits the block's tensors into heads, R_O float32 as
            # a view of (B, N, C) or contiguous; no t (lrp), partial LRP's t, transformer attribution's (dO); with
            # a bias both rule sets ("ours" first runs the per-image sums)
            o_heads = views()
            for r_o in (views().float(), torch.empty(b, h, n, d, device="meta", dtype=torch.float32)):
                for r, g in ((None, None), (row, None), (row, do)):
                    for rules in (("ours", "classic") if bias is not None else (None,)):
                        R.attention_relevance(q, k, v, o_heads, lse, r_o, 0.125, row=r, do=g,
                                              **dict(kw, rules=rules) if bias is not None else {})


def _beit_biases(h: int, n: int) -> list:
    """BEiT's relative position bias in table form as the adapters hand it (``RelativePositionBias``: an (R, H)
    float32 table, contiguous), where N is a class token and a square grid of patches; none otherwise."""
    import math

    import torch

    from tokentm_fast.models.relative_bias import RelativePositionBias

    side = math.isqrt(n - 1)
    if side * side != n - 1:
        return []
    table = torch.empty((2 * side - 1) ** 2 + 3, h, device="meta", dtype=torch.float32)
    return [RelativePositionBias(table, (side, side), 1)]


def _engine_calls(b, h, n, class_token, dtype):
    """The other wrappers as the explain paths call them: transformation weights of (B, N, C) tokens (C = 64·H)
    with every ablation, head fusion, the row update with the query's support at the top layer (the class
    token, ``0:1``; every row with mean pooling) and dense below, the full-matrix update (both on the H heads'
    maps, and with rollout's constants on the heads fused in the forward, H = 1, as ``Materialized.constant_rows``
    passes them, or on all H as the ``ops`` operators take them), LeGrad's reduction of one layer's rows (Q = 1:
    the class token's row; Q = N: mean pooling) alone and accumulated."""
    import torch

    meta = {"device": "meta", "dtype": dtype}
    TW, HF, RU, MU, LG = (_module(m) for m in ("transform_weights", "head_fusion", "row_update", "matrix_update",
                                                  "legrad_reduce"))
    x = torch.empty(b, n, 64 * h, **meta)
    for use_length in (False, True):
        for use_necc in (False, True):
            TW.transform_weights(x, x, use_length, use_necc)
    attn = torch.empty(b, h, n, n, **meta)
    for mode in ("gae", "decoupled", "mean"):
        HF.fuse_heads(attn, attn, mode)
    w = torch.empty(b, n, **meta)
    fused = torch.empty(b, 1, n, n, **meta)  # rollout's engine: the heads fused in the forward (H = 1)
    for mode, wa, wm, maps in (("gae", w, w, [attn]), ("decoupled", w, w, [attn]), ("gae", 1.0, 0.0, [attn]),
                               ("mean", 1.0, -0.5, [attn, fused])):
        for a in maps:
            for support in ((slice(0, 1) if class_token else None), None):
                RU.row_update(torch.empty(b, 1, n, device="meta"), a, a, wa, wm, mode, support=support)
            for tf32 in (False, True):
                MU.matrix_update(torch.empty(b, n, n, device="meta"), a, a, wa, wm, mode, allow_tf32=tf32)
    g = torch.empty(b, h, 1 if class_token else n, n, **meta)
    LG.legrad_reduce(g, n)
    LG.legrad_reduce([g, g], n)


@cache
def realistic_launches():
    """Every launch of the scenarios (``HEAD_WIDTHS`` x ``TOKENS`` x ``HEADS`` x ``BATCHES``, model tensors in
    bfloat16 and float32): ``[{"attr", "consts", "spec", "dtype", "width", "tokens"}]``."""
    import torch

    out = []
    with _recording([]) as rec:
        for dtype in (torch.bfloat16, torch.float32):
            for n, class_token in TOKENS:
                for h in HEADS:
                    for b in BATCHES:
                        for d in HEAD_WIDTHS:
                            start = len(rec)
                            _attention_calls(b, h, n, d, dtype)
                            out += [dict(r, dtype=str(dtype)[6:], width=d, tokens=n) for r in rec[start:]]
                        start = len(rec)
                        _engine_calls(b, h, n, class_token, dtype)
                        out += [dict(r, dtype=str(dtype)[6:], width=None, tokens=n) for r in rec[start:]]
    return out


def specs_for(attr, variant, block_d, dt, widths=None, tokens=None):
    """The distinct launch signatures (``launch_spec``) recorded for a kernel's constexpr variant, head-width
    class and dtype (16-bit or float32 model tensors), restricted to ``widths`` / ``tokens`` when given."""
    bits = "float32" if dt == "fp32" else "bfloat16"
    out = set()
    for r in realistic_launches():
        c = r["consts"]
        if (r["attr"] == attr and r["dtype"] == bits and all(c.get(k) == v for k, v in variant.items())
                and (block_d is None or c.get("BLOCK_D") == block_d)
                and (widths is None or r["width"] is None or r["width"] in widths)
                and (tokens is None or r["tokens"] in tokens)):
            out.add(r["spec"])
    return sorted(out)


def spec_label(spec) -> str:
    """The integers of a launch signature, compactly: ``N_CTX`` (i32), ``N_CTX%16`` (divisibility 16), ``B=1``
    (constexpr), ``(i64)``; the read-nothing keys left out, a pointer only when it is not 16-byte aligned."""
    parts = []
    for name, ty, attr in spec:
        if ty == "*":
            if attr != "D":
                parts.append(f"{name}(unaligned)")
        elif ty == "constexpr":
            parts.append(f"{name}=1")
        elif ty.startswith(("i", "u")) and not (ty == "i32" and not attr and name.endswith("BUCKET")):
            parts.append(name + ("%16" if attr == "D" else "") + ("" if ty == "i32" else f"({ty})"))
    return " ".join(parts)


def job_key(job) -> str:
    k, w, s = job["config"]
    return json.dumps([job["kernel"], job["dtype"], job.get("BLOCK_D"), sorted(job["consts"].items()),
                       sorted(k.items()), w, s, [list(x) for x in job["spec"]]])


def jobs(kernels=None, dtypes=None, widths=HEAD_WIDTHS, tokens=None):
    """Every (kernel, constexprs, configuration, launch signature) to compile: each configuration with every
    distinct signature (``specs_for``) the scenarios' launches of that variant give. ``widths`` / ``tokens``:
    only the launches at these head widths / token counts (the attention kernels' signatures)."""
    out = []
    for name, spec in SPECS.items():
        if kernels and name not in kernels:
            continue
        tiled = spec["module"] in ("attention", "attention_relevance")  # BLOCK_D classes
        blocks = sorted({max(16, _next_pow2(d)) for d in widths}) if tiled else [None]
        for dt, ieee in _dtype_classes(name):
            if dtypes and dt not in dtypes and spec["model"]:
                continue
            for bd in blocks:
                for variant in spec["variants"]:
                    consts = dict(variant)
                    if bd is not None:
                        consts["BLOCK_D"] = bd
                    if ieee is not None:
                        consts.update(IEEE=ieee, UPCAST=False)
                    sigs = specs_for(spec["attr"], variant, bd, dt, widths, tokens)
                    if not sigs:
                        raise RuntimeError(f"no scenario launches {name} {variant} (BLOCK_D {bd}, {dt}): "
                                           "extend the scenarios of compile_audit.realistic_launches")
                    for cfg in _selectable(name, dt, variant, bd):
                        for sig in sigs:
                            job = {"kernel": name, "module": spec["module"], "attr": spec["attr"],
                                   "dtype": _label(dt, ieee), "ptr": PTR[dt], "model": sorted(spec["model"]),
                                   "consts": consts, "config": cfg, "spec": sig}
                            if bd is not None:
                                job.update(BLOCK_D=bd, widths=[d for d in widths if max(16, _next_pow2(d)) == bd])
                            out.append(job)
    return out


def _next_pow2(n):
    return 1 << (max(n, 1) - 1).bit_length()


def _jit_fn(obj):
    """The ``@triton.jit`` function under an autotuner (an ``InterpretedFunction`` under the interpreter)."""
    while type(obj).__name__ not in ("JITFunction", "InterpretedFunction"):
        obj = obj.fn
    return obj


def _source(fn) -> str:
    """A kernel's source from ``def`` on (``JITFunction.src``; read from the function under the interpreter)."""
    if hasattr(fn, "src"):
        return fn.src
    import inspect

    src = textwrap.dedent(inspect.getsource(fn.fn))
    return src[re.search(r"^def\s+\w+\s*\(", src, re.MULTILINE).start():]


def signature(job):
    """``(fn, signature, constexprs, attributes)`` of a job for ``ASTSource``: the job's constexprs and
    configuration, its launch signature (``job["spec"]``: constexpr 1, i32 / i64, the divisibility attribute of
    integers and pointers as Triton specialises the recorded launch), pointers in the model's dtype or float32."""
    fn = _jit_fn(getattr(_module(job["module"]), job["attr"]))
    consts = {**job["consts"], **job["config"][0]}
    sig, attrs = {}, {}
    for name, ty, attr in job["spec"]:
        if ty == "constexpr":
            consts[name] = attr
        elif ty == "*":
            sig[name] = job["ptr"] if name in job["model"] else "*fp32"
        else:
            sig[name] = ty
        if attr == "D":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    missing = set(fn.arg_names) - set(sig)
    if missing:
        raise ValueError(f"{job['attr']}: no signature for {sorted(missing)}")
    return fn, {a: sig[a] for a in fn.arg_names}, consts, attrs


def compile_one(job: dict) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        knobs.nvidia.dump_ptxas_log = True
        fn, sig, consts, attrs = signature(job)
        _, w, s = job["config"]
        t0 = time.perf_counter()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": w, "num_stages": s})
        log = buf.getvalue()
        m = re.search(r"Used (\d+) registers", log)
        regs = int(m.group(1)) if m else int(getattr(k, "n_regs", 0) or 0)
        spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
        spills = max(spill_st, spill_ld, int(getattr(k, "n_spills", 0) or 0))
        smem = int(k.metadata.shared)
        res = {key: job[key] for key in ("kernel", "dtype", "BLOCK_D", "widths") if key in job}
        res.update(consts={k2: v for k2, v in job["consts"].items() if k2 not in ("BLOCK_D", "IEEE", "UPCAST")},
                   signature=spec_label(job["spec"]), config=job["config"][0], num_warps=w, num_stages=s, regs=regs, spills=spills, smem=smem,
                   ctas_per_sm=ctas_per_sm(regs, w, smem), compile_s=round(time.perf_counter() - t0, 2),
                   key=job_key(job))
        return res


def failures(rows):
    return [r for r in rows if r["spills"] > 0 or r["smem"] > SMEM_PER_CTA or r["ctas_per_sm"] < 1]


def run(jobs_list, workers=None):
    with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
        return list(ex.map(compile_one, jobs_list, chunksize=1))


def source_fingerprint(modules=KERNEL_MODULES) -> str:
    """sha256 of the source of every ``@triton.jit`` function in kernels/ (not the line numbers, not the
    wrappers): the committed audit is current when this matches. ``modules``: only these kernel modules (in
    this order; the jit helpers a module imports count as its own)."""
    h = hashlib.sha256()
    for name in modules:
        mod = _module(name)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            try:
                fn = _jit_fn(obj)
            except AttributeError:
                continue
            h.update(f"{name}.{attr}\n{_source(fn)}\n".encode())
    return h.hexdigest()


def versions():
    import torch
    import triton
    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def summary(rows):
    """Per (kernel, dtype, BLOCK_D) class: configs, launch signatures, max regs, max spills, max smem, min / max
    CTAs per SM."""
    out = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], r.get("BLOCK_D"))
        s = out.setdefault(key, {"compiles": 0, "configs": set(), "signatures": set(), "regs": 0, "spills": 0,
                                 "smem": 0, "ctas_min": 99, "ctas_max": 0})
        s["compiles"] += 1
        s["configs"].add(json.dumps([r["config"], r["num_warps"], r["num_stages"]], sort_keys=True))
        s["signatures"].add(r["signature"])
        s["regs"] = max(s["regs"], r["regs"])
        s["spills"] = max(s["spills"], r["spills"])
        s["smem"] = max(s["smem"], r["smem"])
        s["ctas_min"] = min(s["ctas_min"], r["ctas_per_sm"])
        s["ctas_max"] = max(s["ctas_max"], r["ctas_per_sm"])
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def module_fingerprints() -> dict:
    """``{kernel module: source_fingerprint of it alone}``: what a partial run (``merged``) checks the rows it
    keeps against."""
    return {m: source_fingerprint((m,)) for m in KERNEL_MODULES}


def _replaced(row, kernels, dtypes) -> bool:
    """Whether a committed row belongs to the part a run of ``jobs(kernels, dtypes)`` recompiles."""
    if row["kernel"] not in kernels:
        return False
    return not dtypes or not SPECS[row["kernel"]]["model"] or row["dtype"].split()[0] in dtypes


def merged(old: dict, rows, kernels, dtypes, command: str, seconds: float):
    """The committed audit ``old`` (``{"meta", "rows"}``) with the part a partial run recompiled (the rows of
    ``kernels``, of ``dtypes`` when given) replaced by ``rows``: ``(rows, meta)``.

    Refused (``ValueError``) unless the rows it keeps are current: made with this Triton and torch, and every
    kernel module they come from has the source it had when they were compiled (its entry of the committed
    ``module_fingerprints``; an audit from before those were recorded: its ``source_fingerprint`` over the
    modules its rows come from). The meta then carries the current fingerprints and the partial run in
    ``merges``."""
    now = versions()
    for key in ("triton", "torch"):
        if old["meta"].get(key) != now[key]:
            raise ValueError(f"the committed audit was made with {key} {old['meta'].get(key)}, this is "
                             f"{now[key]}: run the full audit")
    kept = [r for r in old["rows"] if not _replaced(r, kernels, dtypes)]
    modules = [m for m in KERNEL_MODULES if any(SPECS[r["kernel"]]["module"] == m for r in kept if r["kernel"] in SPECS)]
    if any(r["kernel"] not in SPECS for r in kept):
        raise ValueError(f"the committed audit has rows of kernels no longer audited: "
                         f"{sorted({r['kernel'] for r in kept if r['kernel'] not in SPECS})}; run the full audit")
    recorded = old["meta"].get("module_fingerprints")
    current = module_fingerprints()
    if recorded is not None:
        stale = [m for m in modules if recorded.get(m) != current[m]]
    else:
        stale = [] if old["meta"]["source_fingerprint"] == source_fingerprint(tuple(modules)) else modules
    if stale:
        raise ValueError(f"kernel sources changed since the committed rows of {stale} were compiled: re-run "
                         "those kernels too, or the full audit")
    order = {k: i for i, k in enumerate(SPECS)}
    rows = sorted(kept + list(rows), key=lambda r: order[r["kernel"]])  # stable: each part keeps its order
    meta = dict(old["meta"], source_fingerprint=source_fingerprint(), module_fingerprints=current,
                compile_s=round(sum(r["compile_s"] for r in rows), 1))
    meta["merges"] = list(old["meta"].get("merges", [])) + [
        {"command": command, "date": _now(), "kernels": sorted(kernels), "dtypes": sorted(dtypes or []),
         "rows": len(rows) - len(kept), "wall_s": round(seconds, 1)}]
    return rows, meta


def write(rows, out_dir, command, seconds, merge=None):
    """audit.json and audit.md in ``out_dir``. ``merge = (kernels, dtypes)``: a partial run, merged into the
    committed audit there (``merged``)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"command": command, "date": _now(), "target": "cuda sm_90 (H100), warp 32", "wall_s": round(seconds, 1),
            "compile_s": round(sum(r["compile_s"] for r in rows), 1),
            "source_fingerprint": source_fingerprint(), "module_fingerprints": module_fingerprints(), **versions()}
    if merge is not None:
        with open(os.path.join(out_dir, "audit.json")) as f:
            rows, meta = merged(json.load(f), rows, merge[0], merge[1], command, seconds)
        command = meta["command"]
    with open(os.path.join(out_dir, "audit.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=0)
    bad = failures(rows)
    versions_line = (f"Versions: Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}; "
                     f"{meta['machine']}; wall {meta['wall_s']} s (compiles summed: {meta['compile_s']} s)  ")
    lines = ["# Compile audit, sm_90 (H100), every kernel in kernels/\n",
             f"Regenerate: `{command}` (no GPU; Triton's bundled ptxas)  ", f"Date: {meta['date']}  ",
             versions_line,
             *[f"Merged: `{m['command']}` on {m['date']}: {m['rows']} rows of {', '.join(m['kernels'])}  "
               for m in meta.get("merges", [])],
             f"Compiles: {len(rows)}; failing (spills > 0, smem > 227 KB or < 1 CTA/SM): {len(bad)}\n",
             "Each configuration is compiled with every launch signature the scenarios of "
             "`compile_audit.realistic_launches` give its variant (Triton's specialisation of the call's integers: "
             "`X=1` a constexpr, `X%16` divisible by 16, `X` neither; pointers 16-byte aligned unless marked).\n",
             "## Per class\n",
             ("| kernel | dtype | BLOCK_D | compiles (variants x configs x signatures) | configs | signatures | "
              "max regs | max spills (B) | max smem (B) | CTAs/SM min-max |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kern, dt, bd), s in summary(rows).items():
        lines.append(f"| {kern} | {dt} | {bd if bd else '-'} | {s['compiles']} | {len(s['configs'])} | "
                     f"{len(s['signatures'])} | {s['regs']} | {s['spills']} | {s['smem']} | "
                     f"{s['ctas_min']}-{s['ctas_max']} |")
    lines += ["\n## Every compile\n",
              ("| kernel | dtype | head widths (BLOCK_D) | variant | config, warps, stages | signature | regs | "
               "spills (B) | smem (B) | CTAs/SM |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = f"{','.join(map(str, r['widths']))} ({r['BLOCK_D']})" if r.get("BLOCK_D") else "-"
        variant = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(r["consts"].items())) or "-"
        cfg = "×".join(str(v) for v in r["config"].values())
        lines.append(f"| {r['kernel']} | {r['dtype']} | {widths} | {variant} | {cfg}, {r['num_warps']}, "
                     f"{r['num_stages']} | {r['signature']} | {r['regs']} | {r['spills']} | {r['smem']} | "
                     f"{r['ctas_per_sm']} |")
    with open(os.path.join(out_dir, "audit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- recorded launches
@contextlib.contextmanager
def intercepted_launches(on_launch):
    """Under the interpreter: ``on_launch(fn, args, kwargs)`` for every kernel launch made inside the block
    (``fn`` the ``InterpretedFunction``), before the launch runs."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kw):
        on_launch(self, args, kw)
        return original(self, *args, **kw)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def recorded_launches(run_calls):
    """Under the interpreter (TRITON_INTERPRET=1 at import): call ``run_calls()`` and return the launches it
    made as ``{(kernel, constexprs, model pointers)}``, comparable with ``launch_keys(jobs(), dtype)``:
    constexprs without the autotuned ones, the fixed launch sizes and the interpreter-only UPCAST; model
    pointers: the pointer arguments whose tensors are not float32."""
    import torch

    drop = {"_delta_kernel": {"BLOCK_M"}, "_necc_normalize_kernel": {"BLOCK"},
            "_update_finalize_kernel": {"BLOCK_Q", "BLOCK_J"}, "_legrad_finalize_kernel": {"BLOCK"}}
    for name in KERNEL_MODULES:
        for obj in vars(_module(name)).values():
            if type(obj).__name__ == "Autotuner":
                drop[obj.fn.__name__] = set().union(*(c.kwargs for c in obj.configs))
    always = {"UPCAST", "num_warps", "num_stages", "grid", "warmup", "num_ctas", "maxnreg"}
    seen = set()

    def record(fn, args, kw):
        name = fn.fn.__name__
        model = tuple(sorted(n for n, a in zip(fn.arg_names, args)
                             if n.endswith("_ptr") and isinstance(a, torch.Tensor) and a.dtype != torch.float32))
        consts = tuple(sorted((k, v) for k, v in kw.items() if k not in always | drop.get(name, set())))
        seen.add((name, consts, model))

    with intercepted_launches(record):
        run_calls()
    return seen


def launch_keys(job_list):
    """The jobs as ``recorded_launches`` writes launches: model pointers named for 16-bit jobs (float32
    jobs have none: every pointer is float32)."""
    out = set()
    for j in job_list:
        consts = {k: v for k, v in j["consts"].items() if k != "UPCAST"}
        out.add((j["attr"], tuple(sorted(consts.items())), tuple(j["model"]) if j["ptr"] != PTR["fp32"] else ()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="write audit.md / audit.json here")
    p.add_argument("--kernel", action="append", choices=list(SPECS), help="only these kernels (repeatable)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    p.add_argument("--merge", action="store_true",
                   help="with --out and --kernel / --dtype: replace only those rows of the committed audit.json "
                        "there (refused when the rows it keeps are not current)")
    a = p.parse_args(argv)
    if a.merge and not (a.out and (a.kernel or a.dtype)):
        p.error("--merge needs --out and --kernel or --dtype")
    os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    todo = jobs(a.kernel, a.dtype)
    print(f"{len(todo)} compiles on {a.jobs} processes", file=sys.stderr, flush=True)
    rows = run(todo, a.jobs)
    dt = time.perf_counter() - t0
    bad = failures(rows)
    for r in bad:
        print("FAIL", json.dumps(r), file=sys.stderr)
    print(f"{len(rows)} compiles in {dt:.0f} s; {len(bad)} failing", file=sys.stderr)
    if a.out:
        write(rows, a.out, "python benchmarks/compile_audit.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              dt, merge=(a.kernel or list(SPECS), a.dtype) if a.merge else None)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
