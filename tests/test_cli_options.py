"""Issue 26, item 6 (and item 5's help): method options on the command line, and what the help says.

* ``--option [METHOD.]NAME=VALUE`` (repeatable) reaches the methods: the maps of ``explain --backend
  reference`` with options equal those of the Python API's PyTorch backend with the same options (two
  implementations), and differ from the default maps;
* a wrong option is refused with the Python API's own message, exit code 2, in explain, evaluate,
  bench and demo;
* the options listed in ``--help`` come from the method registry: an option added there appears by itself;
* the help says how images are converted (alpha dropped), eval mode and the dtype, and the RGBA claim holds.
"""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tokentm_fast.cli import main, method_options

pytestmark = pytest.mark.usefixtures("one_thread")

SYN = ["--model", "synthetic", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tokentm_fast.synthetic import save_folder

    return save_folder(tmp_path_factory.mktemp("imgs"), "test", 2)


def _inputs(files):
    from tokentm_fast.evaluation.data import Preprocess, load_image, model_data_config
    from tokentm_fast.synthetic import create_synthetic_vit

    model = create_synthetic_vit()
    pre = Preprocess(model_data_config(model))
    return model, torch.stack([pre(load_image(f))[0] for f in files])


def _api_error(model, method, **options):
    """The message of the Python API's refusal of ``options`` for ``method``."""
    from tokentm_fast.api import Explainer

    with pytest.raises((ValueError, TypeError)) as e:
        Explainer(model, method=method, **options)
    return str(e.value)


def _help(argv):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])


# ----------------------------------------------------------------------------- the options reach the methods
def test_options_reach_each_method(tmp_path, files, run_main):
    from tokentm_fast import explain
    from tokentm_fast.methods import REGISTRY

    maps_file = tmp_path / "maps.npz"
    rc, _, err = run_main(["explain", *files, *SYN, "--methods", "tokentm,legrad,rollout,gae", "--backend",
                           "reference", "--out", tmp_path / "o", "--save-maps", maps_file,
                           "--option", "start_layer=1",                 # every method that takes it
                           "--option", "legrad.layer_pooling=head",     # legrad alone
                           "--option", "tokentm.use_necc=false",        # a bool in shell spelling
                           "--option", "rollout.start_layer=2",         # wins over start_layer=1
                           "--option", "rollout.end_layer=-1"])         # negative: from the end
    assert rc == 0, err
    expected = {"tokentm": {"start_layer": 1, "use_necc": False},
                "legrad": {"start_layer": 1, "layer_pooling": "head"},
                "rollout": {"start_layer": 2, "end_layer": -1},
                "gae": {}}                                              # takes no option: untouched
    model, x = _inputs(files)
    with np.load(maps_file, allow_pickle=False) as d:
        info = json.loads(str(d["info"]))
        for m, opts in expected.items():
            ours = torch.from_numpy(d[m])
            ref = explain(model, x, method=m, backend="torch", **opts)   # the other implementation
            scale = ref.abs().amax(dim=(1, 2), keepdim=True)
            assert (scale > 0).all(), m
            # each float32 backend meets the method's float32 bound against float64: together at most twice it
            assert ((ours - ref).abs() / scale).max() <= 2 * REGISTRY[m].float32_tolerance, m
            if opts:
                default = explain(model, x, method=m, backend="torch")
                assert ((default - ref).abs() / scale).max() > 1e-2, m   # the options changed the map
        assert info["method_options"]["rollout"]["layers"] == [2]       # blocks 2 .. L-1 (exclusive), L = 4
        assert info["method_options"]["tokentm"]["use_necc"] is False


def test_method_options_are_spread_by_name():
    given = [(None, "start_layer", 1, "start_layer=1"), ("legrad", "start_layer", -1, "legrad.start_layer=-1"),
             (None, "rules", "classic", "rules=classic")]
    assert method_options(["gae", "legrad", "tokentm", "lrp"], given) == {
        "legrad": {"start_layer": -1}, "tokentm": {"start_layer": 1}, "lrp": {"rules": "classic"}}
    # a name no method of the list takes goes to all of them: the API then refuses it
    assert method_options(["gae", "attcat"], given[:1]) == {"gae": {"start_layer": 1}, "attcat": {"start_layer": 1}}


# ----------------------------------------------------------------------------- a wrong option: the API's message
@pytest.mark.parametrize("option, method, api_options", [
    ("start_layer=1", "gae", {"start_layer": 1}),                     # gae takes no option
    ("tokentm.head_fusion=magic", "tokentm", {"head_fusion": "magic"}),
    ("start_layer=7", "rollout", {"start_layer": 7}),                  # the model has 4 blocks
    ("legrad.correction_threshold=2", "legrad", {"correction_threshold": 2}),
    ("tokentm.use_length=maybe", "tokentm", {"use_length": "maybe"}),
])
def test_explain_refuses_a_wrong_option_with_the_api_message(option, method, api_options, tmp_path, files,
                                                            run_main):
    from tokentm_fast.synthetic import create_synthetic_vit

    message = _api_error(create_synthetic_vit(), method, **api_options)
    rc, _, err = run_main(["explain", files[0], *SYN, "--methods", method, "--option", option,
                           "--out", tmp_path / "o"])
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("tokentm-fast explain: error: ")
    assert message in err, (message, err)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_evaluate_bench_and_demo_refuse_a_wrong_option_with_the_api_message(tmp_path, run_main, monkeypatch):
    import tokentm_fast.evaluation.loop as loop
    from tokentm_fast.synthetic import create_synthetic_vit

    def boom(*a, **k):
        raise AssertionError("evaluated a batch with a refused option")

    monkeypatch.setattr(loop, "_process_batch", boom)
    message = _api_error(create_synthetic_vit(), "gae", start_layer=1)
    for argv in (["evaluate", *SYN, "--data", "synthetic", "--size", "2", "--methods", "gae", "--workers", "0",
                  "--output", tmp_path / "r.json", "--no-progress"],
                 ["bench", *SYN, "--batch", "1", "--methods", "gae", "--repeats", "1"],
                 ["demo", "--methods", "gae", "--out", tmp_path / "demo", "--no-progress"]):
        rc, out, err = run_main([*argv, "--option", "start_layer=1"])
        assert rc == 2, err
        assert message in err and "Traceback" not in err, err
        assert "ms" not in out  # bench: refused before any timing
    assert not (tmp_path / "r.json").exists()


def test_option_syntax_and_method_errors(tmp_path, files, run_main, capsys):
    for bad, said in (("start_layer", "[METHOD.]NAME=VALUE"), ("magic.start_layer=1", "unknown method 'magic'"),
                      ("=1", "[METHOD.]NAME=VALUE"), ("x=@missing.npy", "missing.npy")):
        with pytest.raises(SystemExit) as e:
            main(["explain", str(files[0]), "--option", bad])
        assert e.value.code == 2
        assert said in capsys.readouterr().err
    rc, _, err = run_main(["explain", files[0], *SYN, "--methods", "tokentm", "--option", "rollout.start_layer=1",
                           "--out", tmp_path / "o"])
    assert rc == 2 and "rollout is not among --methods" in err, err


def test_an_array_option_from_a_npy_file(tmp_path, files, run_main):
    """``@FILE.npy``: a tensor option (LeGrad's neutral prompt), as the API takes it."""
    from tokentm_fast import explain

    model, x = _inputs(files)
    prompt = np.random.default_rng(0).standard_normal(model.num_classes).astype(np.float32)
    np.save(tmp_path / "p.npy", prompt)
    maps_file = tmp_path / "m.npz"
    rc, _, err = run_main(["explain", *files, *SYN, "--methods", "legrad", "--backend", "torch", "--out",
                           tmp_path / "o", "--save-maps", maps_file, "--option", "correction_threshold=0.3",
                           "--option", f"neutral_prompt=@{tmp_path / 'p.npy'}"])
    assert rc == 0, err
    ref = explain(model, x, method="legrad", backend="torch", neutral_prompt=torch.from_numpy(prompt),
                  correction_threshold=0.3)
    plain = explain(model, x, method="legrad", backend="torch")
    with np.load(maps_file, allow_pickle=False) as d:
        np.testing.assert_array_equal(d["legrad"], ref.numpy())
    assert not torch.equal(ref, plain)  # the prompt changed the map


# ----------------------------------------------------------------------------- the help
def _flat(text):
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("sub", ["explain", "evaluate", "bench", "demo"])
def test_help_lists_the_registry_options(sub, capsys, monkeypatch):
    from tokentm_fast.methods import REGISTRY

    _help([sub])
    out = _flat(capsys.readouterr().out)
    assert "--option [METHOD.]NAME=VALUE" in out
    for name, spec in REGISTRY.items():
        for opt, default in spec.defaults.items():
            shown = default if isinstance(default, str) else repr(default)
            assert f"{opt}={shown}" in out, (name, opt)
    # an option added to the registry appears by itself
    rollout = REGISTRY["rollout"]
    monkeypatch.setitem(REGISTRY, "rollout", dataclasses.replace(
        rollout, defaults={**rollout.defaults, "new_knob": 3}, choices={"new_knob": (3, 5)}))
    _help([sub])
    assert "rollout: start_layer=0, new_knob=3 {3|5}, end_layer, layers" in _flat(capsys.readouterr().out)


def test_help_says_how_images_reach_the_model(capsys):
    for sub in ("explain", "evaluate"):
        _help([sub])
        out = _flat(capsys.readouterr().out)
        assert "a picture with transparency (RGBA, LA, a transparent palette) is composited over white" in out
        assert "eval mode" in out and "cast to the model's dtype" in out and "the maps are float32" in out
    _help(["explain"])
    out = _flat(capsys.readouterr().out)
    assert "exit status: 0 every image explained; 1 some IMAGE files could not be read" in out


def test_rgba_transparency_is_composited_over_white_as_the_help_says(tmp_path, run_main):
    """An RGBA picture is explained as it looks over white: its maps equal those of the RGB picture with
    white where it is transparent, not those of its colour channels alone (alpha dropped)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    alpha = np.where(rng.random((64, 64)) < 0.5, 0, 255).astype(np.uint8)   # half the pixels transparent
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8), "RGB").save(tmp_path / "white.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "dropped.png")
    rc, _, err = run_main(["explain", tmp_path / "a.png", tmp_path / "white.png", tmp_path / "dropped.png", *SYN,
                           "--methods", "rollout", "--out", tmp_path / "o", "--save-maps", tmp_path / "m.npz"])
    assert rc == 0, err
    with np.load(tmp_path / "m.npz", allow_pickle=False) as d:
        a, white, dropped = d["rollout"]
    # the same input as the picture over white (the rows of one batch may differ by float32 rounding: a few ulp)
    np.testing.assert_allclose(a, white, rtol=1e-5, atol=0)
    assert np.abs(a - dropped).max() > 0.05 * np.abs(a).max()   # the colours under transparency are not used
    said = [ln for ln in err.splitlines() if "transparent" in ln]
    assert len(said) == 1 and str(tmp_path / "a.png") in said[0], err   # one warning, naming the file
