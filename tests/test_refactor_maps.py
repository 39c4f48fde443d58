"""The maps of every method, backend, attention path and model family, compared with maps saved
before a reorganisation: the reorganisations move code, they must not change a single bit of any map on
the deterministic CPU paths.

``tests/data/refactor_maps.pt`` holds, written by ``python tests/test_refactor_maps.py --write`` at
commit 344debd (before the one-definition-per-method reorganisation, issue 17):

- the weights of each test model (so that a newer timm / transformers initialising differently does
  not change the models), and the input images;
- for every case of :func:`case_keys` (family, method, backend, attention path, options, targets), the
  float32 map.

Not every saved map witnesses anything: a map that is constant (all zero included) equals any other
constant map. 44 of the 504 saved cases have an image (or, with two targets, an image and target) whose
map is constant; they are listed, with the reason, in ``FLAT_BY_DESIGN`` and ``REPLACED`` and do not count
as coverage (:func:`test_saved_file_covers_every_case` checks that the list is exactly the flat ones):

- ``FLAT_BY_DESIGN`` (12): zero by the method's definition on that model (open_clip's mean pooling
  behind a class token: attention Grad-CAM and TokenTM from the last block alone read a class row that
  never reaches the output, docs/methods.md §5);
- ``REPLACED`` (32): flat for the images or targets chosen then (Grad-CAM's clamp on a random model's
  target; the random DeiT's uniform first attention). Each is replaced by the same case with targets or
  layers for which every map is informative, written by ``--write-added`` into
  ``tests/data/refactor_maps_added.pt`` from the models and images of the first file, at the commit that
  file records (588ebe9, before the reorganisation of issue 27; 344debd's code was not at hand to compute
  them, so for these cases bit-identity holds from 588ebe9 on).

Every compared map of the other cases is asserted informative before the comparison.

Bit-identity is a property of one platform: the same torch build on the same CPU kernels. When the
torch version or the CPU capability (``torch.backends.cpu.get_cpu_capability()``) differ from the ones
recorded in the file, the test compares with the tolerance of the oracle tests (``rel_err_l2`` below
``TOL``) instead; its failure message says which comparison failed. On a CUDA run of the suite
(``--device cuda``) the cases skip: the saved maps are the CPU paths'.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import model_families as mf
import pytest
import torch
from helpers import assert_informative

DATA = Path(__file__).resolve().parent / "data" / "refactor_maps.pt"
ADDED = Path(__file__).resolve().parent / "data" / "refactor_maps_added.pt"
#: the float32 tolerance of the oracle tests (tests/helpers.py rel_err_l2), for another platform
TOL = 1e-4

FAMILIES = {
    "timm": mf.timm_vit,
    "hf_vit": mf.hf_vit_classifier,
    "hf_deit_teacher": mf.hf_deit_teacher,
    "torchvision": mf.torchvision_vit,
    "hf_clip_proj": mf.hf_clip_vision,
    "open_clip": mf.open_clip_visual,
    "open_clip_avg_ls": lambda: mf.open_clip_visual(pool_type="avg", ls_init_value=0.3, final_ln_after_pool=True),
}
#: the families whose output is an embedding
EMBEDDERS = ("hf_clip_proj", "open_clip", "open_clip_avg_ls")

METHOD_CASES = [
    ("tokentm", {}),
    ("tokentm", {"head_fusion": "decoupled"}),
    ("tokentm", {"init": "identity", "use_necc": False}),
    ("tokentm", {"start_layer": 1}),
    ("gae", {}),
    ("rollout", {}),
    ("rollout", {"layers": [0]}),
    ("raw_attention", {}),
    ("attn_gradcam", {}),
    ("legrad", {}),
    ("legrad", {"start_layer": 0}),
]
FULL_METHODS = ("tokentm", "gae", "rollout")


def _paths(family: str, method: str, options: dict):
    """(backend, attention, full) triples saved for a case."""
    out = [("reference", "auto", False), ("torch", "auto", False)]
    if method in FULL_METHODS and not options:
        out += [("reference", "auto", True), ("torch", "auto", True)]
    # the Triton kernels (interpreted on the CPU): materialized and flash attention
    out.append(("triton", "materialized", False))
    if options.get("head_fusion") != "decoupled":
        out.append(("triton", "flash", False))
    if method in FULL_METHODS and not options:
        out.append(("triton", "materialized", True))
    return out


def case_keys():
    keys = []
    for family in FAMILIES:
        for method, options in METHOD_CASES:
            for backend, attention, full in _paths(family, method, options):
                opt = ",".join(f"{k}={v!r}" for k, v in sorted(options.items()))
                keys.append((family, method, opt, backend, attention, full))
        # several targets per image (one forward where the path allows)
        for method in ("tokentm", "legrad", "gae", "attn_gradcam", "rollout"):
            for backend, attention in (("reference", "auto"), ("torch", "auto"), ("triton", "materialized"),
                                       ("triton", "flash")):
                keys.append((family, method, "targets=(B,2)", backend, attention, False))
    return keys


#: saved cases whose maps are zero by the method's definition on that model: compared, not coverage
FLAT_BY_DESIGN = {
    ("open_clip_avg_ls", "attn_gradcam", ""): "mean pooling behind a class token: α from the class row is 0 (§5)",
    ("open_clip_avg_ls", "attn_gradcam", "targets=(B,2)"): "as above, for each target",
    ("open_clip_avg_ls", "tokentm", "start_layer=1"): "the last block's class row never reaches the output",
}
#: saved cases with a flat map for the images / targets chosen then → the informative case replacing them
#: (the same family, method and paths; ``target=[c_0, c_1]``: class or output channel c_b for image b;
#: ``targets=[[c_00, c_01], [c_10, c_11]]``: two per image)
REPLACED = {
    ("timm", "attn_gradcam", ""): "target=[0, 3]",
    ("hf_deit_teacher", "attn_gradcam", ""): "target=[3, 1]",
    ("hf_deit_teacher", "rollout", "layers=[0]"): "layers=[1]",      # the random DeiT's first attention is uniform
    ("hf_vit", "attn_gradcam", "targets=(B,2)"): "targets=[[0, 3], [1, 4]]",
    ("hf_deit_teacher", "attn_gradcam", "targets=(B,2)"): "targets=[[1, 3], [1, 2]]",
    ("torchvision", "attn_gradcam", "targets=(B,2)"): "targets=[[1, 2], [3, 4]]",
    ("hf_clip_proj", "attn_gradcam", "targets=(B,2)"): "targets=[[1, 3], [2, 5]]",
    ("open_clip", "attn_gradcam", "targets=(B,2)"): "targets=[[1, 3], [4, 5]]",
}


def added_case_keys():
    """The cases of ``tests/data/refactor_maps_added.pt``: each ``REPLACED`` case on the same paths."""
    keys = []
    for old in case_keys():
        new = REPLACED.get(old[:3])
        if new is not None:
            keys.append(old[:2] + (new,) + old[3:])
    return keys


def counts_as_coverage(key) -> bool:
    """A compared case whose every map is informative (not one of ``FLAT_BY_DESIGN`` / ``REPLACED``)."""
    return key[:3] not in FLAT_BY_DESIGN and key[:3] not in REPLACED


def maps_of(m: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw)`` or ``(B, K, gh, gw)`` → one row per image (and target), ``(B·K, gh·gw)``."""
    return m.reshape(-1, m.shape[-2] * m.shape[-1])


def key_name(key) -> str:
    """A case as the file names it: ``family|method|options|backend|attention|full``."""
    return "|".join(str(part) for part in key)


def _options(opt: str) -> dict:
    if not opt or opt.startswith("target"):
        return {}
    return {k: v for k, v in (_parse(item) for item in opt.split(","))}


def _parse(item: str):
    name, value = item.split("=", 1)
    return name, eval(value, {})  # the option values written by case_keys (ints, bools, names, lists)


def compute(models: dict, images: torch.Tensor, key) -> torch.Tensor:
    import tokentm_fast as tf

    family, method, opt, backend, attention, full = key
    embedder = family in EMBEDDERS
    if opt.startswith(("target=", "targets=[")):      # the added cases: classes (output channels) by image
        chosen = torch.tensor(eval(opt.split("=", 1)[1], {}))
        if not embedder:
            target = chosen
        elif chosen.dim() == 1:
            target = tf.class_logit(chosen)
        else:
            target = [tf.class_logit(column) for column in chosen.t()]
    elif opt.startswith("targets"):
        target = [tf.class_logit(0), tf.class_logit(3)] if embedder else torch.tensor([[0, 1], [2, 0]])
    else:
        # an embedding model has no predicted class: one of its output channels as the score
        target = tf.class_logit(torch.tensor([3, 5])) if embedder else None
    options = _options(opt)
    if method == "legrad":   # the saved maps are LeGrad's before layer_pooling existed: the model's head
        options.setdefault("layer_pooling", "head")
    return tf.explain(models[family], images, method=method, backend=backend, attention=attention, full=full,
                      target=target, **options)


def build_models(state: dict = None) -> dict:
    models = {}
    for name, make in FAMILIES.items():
        model = make().eval()
        if state is not None:
            model.load_state_dict(state[name])
        models[name] = model
    return models


def platform() -> dict:
    return {"torch": str(torch.__version__), "cpu": str(torch.backends.cpu.get_cpu_capability())}


def _write() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(2)
    models = build_models()
    images = mf.images()
    maps = {}
    for i, key in enumerate(case_keys()):
        maps[key_name(key)] = compute(models, images, key).clone()
        print(i, key_name(key), tuple(maps[key_name(key)].shape), flush=True)
    DATA.parent.mkdir(exist_ok=True)
    torch.save({"platform": platform(), "images": images,
                "state": {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()},
                "maps": maps}, DATA)


def _write_added(commit: str) -> None:
    """The maps of :func:`added_case_keys`, from the models and images of ``DATA``, by the package as it is
    at ``commit`` (run it on a checkout of that commit)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(2)
    first = torch.load(DATA, weights_only=True)
    models = build_models(first["state"])
    maps = {}
    for i, key in enumerate(added_case_keys()):
        maps[key_name(key)] = compute(models, first["images"], key).clone()
        print(i, key_name(key), tuple(maps[key_name(key)].shape), flush=True)
    torch.save({"platform": platform(), "commit": commit, "maps": maps}, ADDED)


@pytest.fixture(scope="module")
def saved():
    return torch.load(DATA, weights_only=True)


@pytest.fixture(scope="module")
def added():
    return torch.load(ADDED, weights_only=True)


@pytest.fixture(scope="module")
def models(saved):
    return build_models(saved["state"])


def _flat(m: torch.Tensor) -> torch.Tensor:
    """Which maps of ``m`` (one per image and target) are constant to 1e-3 of their largest value."""
    rows = maps_of(m).double()
    return (rows.amax(1) - rows.amin(1)) <= 1e-3 * rows.abs().amax(1)


def test_saved_file_covers_every_case(saved, added):
    """Both files hold exactly their cases; the saved cases with a constant map are exactly those listed
    (``FLAT_BY_DESIGN``: all zero, as the docs say; ``REPLACED``), every added map is informative, and what
    counts as coverage still spans every family, method, backend and attention path."""
    assert set(saved["maps"]) == {key_name(k) for k in case_keys()}
    assert set(added["maps"]) == {key_name(k) for k in added_case_keys()}
    flat = {key for key in case_keys() if _flat(saved["maps"][key_name(key)]).any()}
    assert flat == {key for key in case_keys() if not counts_as_coverage(key)}
    assert len(flat) == 44
    for key in flat:
        if key[:3] in FLAT_BY_DESIGN:
            assert saved["maps"][key_name(key)].abs().max() == 0, key
    for key in added_case_keys():
        assert_informative(maps_of(added["maps"][key_name(key)]))
    covered = [k for k in case_keys() if counts_as_coverage(k)] + added_case_keys()
    assert {k[0] for k in covered} == set(FAMILIES)
    assert {k[1] for k in covered} == {m for m, _ in METHOD_CASES}
    assert {k[3:5] for k in covered} == {k[3:5] for k in case_keys()}


@pytest.mark.parametrize("key", case_keys() + added_case_keys(),
                         ids=lambda k: "-".join(str(p) for p in k if p != ""))
def test_map_unchanged_by_the_reorganisation(saved, added, models, key, device):
    """The map of one saved case, computed now, is the saved map: bit for bit on the platform that wrote
    the file, within ``TOL`` elsewhere. A case that counts as coverage is asserted informative first (every
    image's, and target's, map varies); the listed flat cases are compared too, as they are."""
    if device.type != "cpu":
        pytest.skip("the saved maps are the deterministic CPU paths'")
    file = added if key in added_case_keys() else saved
    expected = file["maps"][key_name(key)]
    if counts_as_coverage(key):
        assert_informative(maps_of(expected))
    out = compute(models, saved["images"], key)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if file["platform"] == platform():
        assert torch.equal(out, expected), f"bit-identity: max |diff| = {(out - expected).abs().max():.3g}"
    else:
        scale = expected.abs().max().clamp_min(1e-30)
        assert ((out - expected).abs().max() / scale) < TOL, f"another platform ({file['platform']}): TOL"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _write()
    elif sys.argv[1:2] == ["--write-added"] and len(sys.argv) == 3:
        _write_added(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_refactor_maps.py --write | --write-added COMMIT   (only before a "
                 "reorganisation, on a checkout of COMMIT)")
