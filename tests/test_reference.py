"""The literal reference (tokentm_fast/reference.py, tokentm_fast/reference_relevance.py) is separate from
the fast paths it is the oracle of, and its own formulas are those of docs/methods.md.

- Its imports, read from the source (``ast``), name none of the fast paths' modules (the head fusion, the
  transformation weights, the aggregation, LeGrad's reduction, the LRP rules, the attention paths, the method
  families, the kernels), and only the model plumbing it is allowed to share.
- At run time, every method (and ``full=True``, an attention-pool model, both LRP rule sets) executes no
  Python function of a fast-path file: a profiler records the file of every Python frame the reference enters.
- Its transformation weights, head fusion and relevance rules give the values docs/methods.md §2, §3 and
  §6.3 define, on inputs small enough to work out by hand.

How the reference's maps agree with the fast paths and with tests/lrp_oracle.py is tested in test_api,
test_methods, test_tails, test_relevance_lrp, test_models, test_models_pools, test_attention_pool and
test_relevance_baselines.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import sys
from pathlib import Path
from typing import Iterator, List, Set

import model_families as mf
import pytest
import torch

import tokentm_fast
import tokentm_fast.kernels
from tokentm_fast import reference, reference_relevance
from tokentm_fast.methods import METHODS, resolve_options
from tokentm_fast.models import adapt
from tokentm_fast.targets import check_target, class_logit

PACKAGE = Path(tokentm_fast.__file__).resolve().parent
KERNELS = Path(tokentm_fast.kernels.__path__[0]).resolve()
#: the reference's own files
REFERENCE_FILES = [PACKAGE / "reference.py", PACKAGE / "reference_relevance.py"]

#: fast-path modules the reference must not import (issue 27, item 4), and everything under them
FORBIDDEN = (
    "tokentm_fast.fusion", "tokentm_fast.transform", "tokentm_fast.aggregation", "tokentm_fast.legrad",
    "tokentm_fast.lrp_rules", "tokentm_fast.methods.lrp_rules", "tokentm_fast.methods.engine",
    "tokentm_fast.methods.tails", "tokentm_fast.methods.relevance", "tokentm_fast.methods.pool",
    "tokentm_fast.methods.raw", "tokentm_fast.paths", "tokentm_fast.kernels", "tokentm_fast.torch_ops",
)
#: the package modules it may import: model plumbing and option resolution (reference.py's docstring)
ALLOWED = {
    "tokentm_fast", "tokentm_fast.reference_relevance", "tokentm_fast.capture", "tokentm_fast.models.protocol",
    "tokentm_fast.targets", "tokentm_fast.methods",
}
#: package files a reference call may run Python code of: its own, the plumbing, the registry's look-ups
ALLOWED_AT_RUN_TIME = {
    "reference.py", "reference_relevance.py", "capture.py", "targets.py", "methods/__init__.py",
    "methods/registry.py", "methods/options.py",
}


def imported_modules(source: str, module: str) -> Set[str]:
    """Every module an ``import`` / ``from ... import`` in ``source`` (anywhere, functions included) may load,
    absolute; ``module`` is the dotted name of the file, for the relative imports. ``from a import b`` gives
    both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def forbidden_in(modules: Set[str]) -> List[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
                  or m == "kernels" or m.startswith("kernels."))


def _module_name(path: Path) -> str:
    return "tokentm_fast." + path.stem


def test_import_checker_sees_imports():
    """The checker resolves relative imports, submodules named in ``from`` and imports inside functions (the
    old reference imported the relevance pass inside a function)."""
    src = ("from .fusion import fuse_heads\nfrom .methods import relevance, get_method\n"
           "def f():\n    from .methods.relevance import RelevancePass\n    import tokentm_fast.kernels.row_update\n"
           "from . import transform\nfrom .capture import LayerRecorder\n")
    bad = forbidden_in(imported_modules(src, "tokentm_fast.reference"))
    assert bad == ["tokentm_fast.fusion", "tokentm_fast.fusion.fuse_heads", "tokentm_fast.kernels.row_update",
                   "tokentm_fast.methods.relevance", "tokentm_fast.methods.relevance.RelevancePass",
                   "tokentm_fast.transform"]


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: p.name)
def test_reference_imports_no_fast_path(path):
    """reference.py and reference_relevance.py import none of the fast paths' modules, and of the package
    only the plumbing and the registry (the checker is not vacuous: it finds the package imports)."""
    modules = imported_modules(path.read_text(), _module_name(path))
    assert forbidden_in(modules) == []
    ours = {m for m in modules if m.startswith("tokentm_fast")}
    assert ours, "no package import found: the parser missed them"
    # ``from .capture import LayerRecorder`` names the module and its attribute: keep the module part
    top = {m for m in ours if _is_module(m)}
    assert top <= ALLOWED, sorted(top - ALLOWED)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------- what runs
def _traced_files(call) -> Set[Path]:
    """Files of every Python frame entered while ``call()`` runs."""
    seen: Set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_filename)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return {Path(f).resolve() for f in seen if not f.startswith("<")}


def _package_files(files: Set[Path]) -> Set[str]:
    """The package / kernel files among ``files``, relative to their root."""
    out = set()
    for f in files:
        for root, prefix in ((PACKAGE, ""), (KERNELS, "kernels/")):
            if root in f.parents:
                out.add(prefix + f.relative_to(root).as_posix())
    return out


def _cases() -> Iterator[tuple]:
    for method in METHODS:
        yield "timm", method, {}, False
    for method in ("tokentm", "gae", "rollout"):
        yield "timm", method, {}, True
    yield "timm", "tokentm", {"head_fusion": "decoupled"}, False
    yield "timm", "lrp", {"rules": "classic"}, False
    yield "timm", "partial_lrp", {"rules": "classic"}, False
    for method in METHODS:
        yield "siglip", method, {}, False


MODELS = {"timm": lambda: mf.timm_vit(), "siglip": lambda: mf.timm_siglip()}


@pytest.fixture(scope="module")
def models():
    return {name: adapt(make().eval()) for name, make in MODELS.items()}


@pytest.mark.parametrize("family,method,options,full", list(_cases()),
                         ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_reference_runs_no_fast_path_code(models, family, method, options, full):
    """A reference call enters no Python function of a fast-path file (nothing outside the reference, the
    capture, the adapters, the targets and the registry's look-ups), and returns an informative map."""
    vit = models[family]
    images = mf.images()
    # output channels 2 and 7 of the pool model: every method's map informative there (Grad-CAM's ReLU)
    target = torch.tensor([1, 3]) if vit.num_classes else class_logit(torch.tensor([2, 7]))
    resolved = resolve_options(method, options, vit.num_layers)
    checked = check_target(target, images.shape[0], vit.num_classes)
    out = {}

    def call():
        out["map"] = reference.explain_reference(vit, images, method, checked, resolved, full)

    files = _package_files(_traced_files(call))
    allowed = {f for f in files if f in ALLOWED_AT_RUN_TIME or f.startswith("models/")}
    assert files - allowed == set()
    expect = "reference_relevance.py" if method in ("lrp", "partial_lrp", "transformer_attribution") else "reference.py"
    assert expect in files                          # the trace is not vacuous
    e = out["map"]
    assert e.dtype == torch.float64 and torch.isfinite(e).all()
    assert (e.flatten(1).std(1) > 0).all(), "a constant map proves nothing here"


# --------------------------------------------------------------------------- its own formulas
def test_transformation_weights_by_hand():
    """docs/methods.md §2 on two tokens: x₁ = (3, 4) → x̃₁ = (6, 8) (same direction, twice as long: cos 1),
    x₂ = (1, 0) → x̃₂ = (0, 2) (orthogonal: cos 0, twice as long). NECC = (e, 1) / (e + 1), ratio 2."""
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]], dtype=torch.float64)
    xt = torch.tensor([[[6.0, 8.0], [0.0, 2.0]]], dtype=torch.float64)
    e = math.e
    want = torch.tensor([[2 * e / (e + 1), 2 / (e + 1)]], dtype=torch.float64)
    assert torch.allclose(reference._transformation_weights(x, xt, True, True), want, rtol=1e-15, atol=0)
    assert torch.allclose(reference._transformation_weights(x, xt, False, True), want / 2, rtol=1e-15, atol=0)
    assert torch.equal(reference._transformation_weights(x, xt, True, False),
                       torch.tensor([[1.0, 1.0]], dtype=torch.float64))                 # ratio 2 · 1/N
    # a zero token: its length is clamped to ε (10⁻⁶), the cosine is 0
    z = torch.zeros(1, 2, 2, dtype=torch.float64)
    w = reference._transformation_weights(z, xt, True, True)
    assert torch.allclose(w, torch.tensor([[10 / 1e-6 / 2, 2 / 1e-6 / 2]], dtype=torch.float64), rtol=1e-12)


def test_head_fusion_by_hand():
    """docs/methods.md §3: two heads, one query row. gae: mean_h max(A ⊙ G, 0); decoupled:
    mean_h A ⊙ mean_h max(G, 0); §4 rollout's mean_h A."""
    a = torch.tensor([[[[0.25, 0.75]], [[0.5, 0.5]]]], dtype=torch.float64)       # (B=1, H=2, 1, 2)
    g = torch.tensor([[[[4.0, -1.0]], [[-2.0, 2.0]]]], dtype=torch.float64)
    gae = reference._head_fusion(a, g, "gae")
    assert torch.equal(gae, torch.tensor([[[(1.0 + 0.0) / 2, (0.0 + 1.0) / 2]]], dtype=torch.float64))
    dec = reference._head_fusion(a, g, "decoupled")
    assert torch.equal(dec, torch.tensor([[[0.375 * 2.0, 0.625 * 1.0]]], dtype=torch.float64))
    assert torch.equal(reference._head_fusion(a, None, "mean"), torch.tensor([[[0.375, 0.625]]], dtype=torch.float64))


def test_relevance_rules_by_hand():
    """docs/methods.md §6.3: the stabilised division (0 where the denominator is 0), the α1β0 linear rule of
    "ours" (conserves R without bias) and of "classic" (each part gets all of R), the residual rule's
    rescaling to |Σa| : |Σb| and the halved z-rule of a product."""
    rr = reference_relevance
    f64 = dict(dtype=torch.float64)
    assert torch.equal(rr._div(torch.tensor([1.0, 2.0], **f64), torch.tensor([0.0, 1.0], **f64)),
                       torch.tensor([0.0, 2.0 / (1.0 + 1e-9)], **f64))
    # z = W x with x = (1, −1), W = [[2, 1]]: W⁺x⁺ = 2, W⁻x⁻ = 0 → all of R to x₁
    x, w, r = torch.tensor([[1.0, -1.0]], **f64), torch.tensor([[2.0, 1.0]], **f64), torch.tensor([[3.0]], **f64)
    assert torch.allclose(rr._linear_rule(x, w, r, "ours"), torch.tensor([[3.0, 0.0]], **f64), rtol=1e-8)
    # W = [[2, −1]]: W⁺x⁺ = 2, W⁻x⁻ = 1 → "ours" shares R as 2 : 1, "classic" gives each part all of R
    w = torch.tensor([[2.0, -1.0]], **f64)
    assert torch.allclose(rr._linear_rule(x, w, r, "ours"), torch.tensor([[2.0, 1.0]], **f64), rtol=1e-8)
    assert torch.allclose(rr._linear_rule(x, w, r, "classic"), torch.tensor([[3.0, 3.0]], **f64), rtol=1e-8)
    # a + b with a = (1, 3), b = (1, −1), R = (2, 4): z-shares a: (1, 6), b: (1, −2); |Σa| : |Σb| = 7 : 1 of ΣR = 6
    a, b, r = torch.tensor([[1.0, 3.0]], **f64), torch.tensor([[1.0, -1.0]], **f64), torch.tensor([[2.0, 4.0]], **f64)
    r_a, r_b = rr._add_rule(a, b, r, "ours")
    assert torch.allclose(r_a.sum(), torch.tensor(6.0 * 7 / 8, **f64), rtol=1e-8)
    assert torch.allclose(r_b.sum(), torch.tensor(6.0 * 1 / 8, **f64), rtol=1e-8)
    assert torch.allclose(r_a, torch.tensor([[1.0, 6.0]], **f64) * (5.25 / 7), rtol=1e-8)
    c_a, c_b = rr._add_rule(a, b, r, "classic")
    assert torch.allclose(c_a, torch.tensor([[1.0, 6.0]], **f64), rtol=1e-8)
    assert torch.allclose(c_b, torch.tensor([[1.0, -2.0]], **f64), rtol=1e-8)
    # a @ b = 1·2 + 1·3 = 5 with R = 10: the z-rule's shares (4, 6), halved, for each operand
    pa, pb = rr._product_rule(torch.tensor([[1.0, 1.0]], **f64), torch.tensor([[2.0], [3.0]], **f64),
                              torch.tensor([[10.0]], **f64))
    assert torch.allclose(pa, torch.tensor([[2.0, 3.0]], **f64), rtol=1e-8)
    assert torch.allclose(pb, torch.tensor([[2.0], [3.0]], **f64), rtol=1e-8)
