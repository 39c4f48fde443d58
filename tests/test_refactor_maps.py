"""The maps of every method, backend, attention path and model family, compared with maps saved
before the one-definition-per-method reorganisation (issue 17): the reorganisation moved code, it
must not have changed a single bit of any map on the deterministic CPU paths.

``tests/data/refactor_maps.pt`` holds, written by ``python tests/test_refactor_maps.py --write`` at
commit 344debd (before the change):

- the weights of each test model (so that a newer timm / transformers initialising differently does
  not change the models), and the input images;
- for every case (family, method, backend, attention path, options), the float32 map.

Bit-identity is a property of one platform: the same torch build on the same CPU kernels. When the
torch version or the CPU capability (``torch.backends.cpu.get_cpu_capability()``) differ from the ones
recorded in the file, the test compares with the tolerance of the oracle tests (``rel_err`` below
``TOL``) instead and says so in its name; it never skips.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import model_families as mf

DATA = Path(__file__).resolve().parent / "data" / "refactor_maps.pt"
#: the float32 tolerance of the oracle tests (tests/spec_oracle.py rel_err), for another platform
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


def key_name(key) -> str:
    """A case as the file names it: ``family|method|options|backend|attention|full``."""
    return "|".join(str(part) for part in key)


def _options(opt: str) -> dict:
    if not opt or opt.startswith("targets"):
        return {}
    return {k: v for k, v in (_parse(item) for item in opt.split(","))}


def _parse(item: str):
    name, value = item.split("=", 1)
    return name, eval(value, {})  # the option values written by case_keys (ints, bools, names, lists)


def compute(models: dict, images: torch.Tensor, key) -> torch.Tensor:
    import tokentm_fast as tf

    family, method, opt, backend, attention, full = key
    embedder = family in EMBEDDERS
    if opt.startswith("targets"):
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


@pytest.fixture(scope="module")
def saved():
    return torch.load(DATA, weights_only=True)


@pytest.fixture(scope="module")
def models(saved):
    return build_models(saved["state"])


def test_saved_file_covers_every_case(saved):
    assert set(saved["maps"]) == {key_name(k) for k in case_keys()}
    # not vacuous: almost no map is constant (all zero included). The few that are, are so for a
    # reason of the random models: the random-init HF DeiT's first attention is uniform (rollout over
    # that block alone is constant); with open_clip's mean pooling the class token's row of the last
    # block does not reach the output (TokenTM from the last block alone is zero); Grad-CAM's ReLU.
    maps = saved["maps"]
    constant = [key for key, m in maps.items() if m.std() == 0]
    assert len(constant) <= len(maps) // 20, constant


@pytest.mark.parametrize("key", case_keys(), ids=lambda k: "-".join(str(p) for p in k if p != ""))
def test_map_unchanged_by_the_reorganisation(saved, models, key, device):
    if device.type != "cpu":
        pytest.skip("the saved maps are the deterministic CPU paths'")
    expected = saved["maps"][key_name(key)]
    out = compute(models, saved["images"], key)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if saved["platform"] == platform():
        assert torch.equal(out, expected), f"max |diff| = {(out - expected).abs().max():.3g}"
    else:
        scale = expected.abs().max().clamp_min(1e-30)
        assert ((out - expected).abs().max() / scale) < TOL


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_refactor_maps.py --write   (only before a reorganisation)")
    _write()
