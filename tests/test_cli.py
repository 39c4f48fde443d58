"""Tests of the command line (``tokentm-fast`` / ``python -m tokentm_fast``)."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from tokentm_fast import METHODS
from tokentm_fast.cli import main

SUBCOMMANDS = ("explain", "evaluate", "bench", "demo")
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2)
    p = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(m.state_dict(), p)
    return p


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """Random-init weights of the synthetic-model architecture (stand-in for the shipped weights)."""
    from safetensors.torch import save_file

    from tokentm_fast.synthetic import create_synthetic_vit

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("syn") / "synthetic_random.safetensors"
    save_file(create_synthetic_vit(pretrained=False).state_dict(), str(p))
    return p


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 50), (64, 64)]):
        p = d / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    jpg = d / "pic2.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(jpg)
    paths.append(jpg)
    bad = d / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing useful")
    return paths, bad


def run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_clean_error(rc, err, *needles):
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith("tokentm-fast")
    for n in needles:
        assert n in err, err


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("sub", (None,) + SUBCOMMANDS)
def test_help(sub, capsys):
    argv = ([sub] if sub else []) + ["--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokentm-fast")
    expected = {
        None: SUBCOMMANDS,
        "explain": ("IMAGE", "--methods", "--out", "--model", "--checkpoint"),
        "evaluate": ("--data", "--methods", "--metrics", "--limit", "--output", "--restart", "--workers",
                     "--batch-size", "--device"),
        "bench": ("--json", "--model", "--batch", "--device"),
        "demo": ("--num-images", "--out"),
    }[sub]
    for word in expected:
        assert word in out
    assert "--stop-after-batches" not in out


def test_console_script_and_module_entry_points():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tokentm_fast", "demo", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "usage: tokentm-fast demo" in r.stdout
    exe = shutil.which("tokentm-fast")
    if exe is None:
        pytest.skip("console script tokentm-fast not on PATH (package not installed)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "explain" in r.stdout and "evaluate" in r.stdout


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "x.png", "--methods", "tokentm,magic"])
    assert e.value.code == 2
    assert "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- explain
def test_explain_writes_overlays_and_grid(tmp_path, pictures, tiny_ckpt, capsys):
    paths, _ = pictures
    out = tmp_path / "out"
    rc, stdout, err = run_main(["explain", *paths, *TINY, "--checkpoint", tiny_ckpt,
                                "--methods", "tokentm,legrad,rollout", "--out", out], capsys)
    assert rc == 0, err
    for p in paths:
        for m in ("tokentm", "legrad", "rollout"):
            f = out / f"{p.name}_{m}.png"  # the file name, extension kept
            assert f.is_file()
            im = np.asarray(Image.open(f).convert("RGB"))
            assert min(im.shape[:2]) >= 224 and im.std() > 5
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB")).astype(np.float32)
    assert grid.shape[1] > grid.shape[0] * 1.0 and grid.std() > 10  # 4 columns x 3 rows, not blank
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [f"{p.name}_{m}.png" for p in paths for m in ("tokentm", "legrad", "rollout")] + ["grid.png"])
    assert "predicted" in stdout


def test_explain_synthetic_model_every_method(tmp_path, synthetic_ckpt, capsys):
    from tokentm_fast.synthetic import save_folder

    files = save_folder(tmp_path / "imgs", "test", 2)
    out = tmp_path / "out"
    rc, stdout, err = run_main(["explain", *files, "--checkpoint", synthetic_ckpt, "--out", out], capsys)
    assert rc == 0, err
    assert len(list(out.glob("*.png"))) == 2 * len(METHODS) + 1


def test_explain_errors_are_clean(tmp_path, pictures, tiny_ckpt, capsys):
    paths, bad = pictures
    out = tmp_path / "o"
    missing = tmp_path / "does_not_exist.png"
    rc, _, err = run_main(["explain", paths[0], missing, *TINY, "--checkpoint", tiny_ckpt, "--out", out], capsys)
    assert_clean_error(rc, err, "image file not found", "does_not_exist.png")

    rc, _, err = run_main(["explain", bad, *TINY, "--checkpoint", tiny_ckpt, "--out", out], capsys)
    assert_clean_error(rc, err, "cannot read image", "corrupt.png")

    rc, _, err = run_main(["explain", paths[0], "--model", "vit_does_not_exist_patch16", "--checkpoint", tiny_ckpt,
                           "--out", out], capsys)
    assert_clean_error(rc, err, "unknown model", "vit_does_not_exist_patch16")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", junk, "--out", out], capsys)
    assert_clean_error(rc, err, "cannot read checkpoint", "junk.pth")

    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x01\x02")
    rc, _, err = run_main(["explain", paths[0], "--checkpoint", junk_st, "--out", out], capsys)
    assert_clean_error(rc, err, "junk.safetensors")

    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", tmp_path / "nope.pth", "--out", out], capsys)
    assert_clean_error(rc, err, "checkpoint file not found", "nope.pth")

    rc, _, err = run_main(["explain", paths[0], "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_ckpt,
                           "--out", out], capsys)
    assert_clean_error(rc, err, "does not fit", "--model-kwargs")
    assert not out.exists()  # nothing written on error


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_cli_prints_table(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "res.json"
    curves = tmp_path / "curves.png"
    rc, stdout, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", "synthetic", "--size", "4",
                                "--methods", "gae,raw_attention", "--batch-size", "2", "--workers", "0",
                                "--output", out, "--curves", curves], capsys)
    assert rc == 0, err
    assert "| gae |" in stdout and "| raw_attention |" in stdout and "mIoU" in stdout and "AOPC" in stdout
    res = json.loads(out.read_text())
    assert len(res["records"]) == 4
    assert res["command"][:2] == ["tokentm-fast", "evaluate"]
    assert curves.is_file() and curves.stat().st_size > 1000
    assert "img/s" in err  # the progress bar


def test_evaluate_cli_errors(tmp_path, tiny_ckpt, capsys):
    rc, _, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", f"folder:{tmp_path / 'nope'}",
                           "--output", tmp_path / "r.json"], capsys)
    assert_clean_error(rc, err, "not found", "nope")
    rc, _, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", "imagenet",
                           "--output", tmp_path / "r.json"], capsys)
    assert_clean_error(rc, err, "folder:PATH")
    rc, _, err = run_main(["evaluate", "--model", "not_a_model", "--checkpoint", tiny_ckpt,
                           "--output", tmp_path / "r.json"], capsys)
    assert_clean_error(rc, err, "unknown model")


# ----------------------------------------------------------------------------- bench
def test_bench_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokentm_fast.benchtable", None)  # import fails
    rc, _, err = run_main(["bench"], capsys)
    assert_clean_error(rc, err, "tokentm_fast.benchtable")


def test_bench_calls_the_table_module(monkeypatch, tmp_path, capsys):
    calls = {}
    fake = types.ModuleType("tokentm_fast.benchtable")
    fake.table_from_json = lambda path: calls.setdefault("json", path) and "| from json |"
    fake.quick_bench = lambda **kw: calls.setdefault("quick", kw) and "| quick |"
    monkeypatch.setitem(sys.modules, "tokentm_fast.benchtable", fake)
    bj = tmp_path / "bench.json"
    bj.write_text("{}")
    rc, out, _ = run_main(["bench", "--json", bj], capsys)
    assert rc == 0 and "| from json |" in out and calls["json"] == str(bj)
    rc, out, _ = run_main(["bench", "--model", "vit_small_patch16_224", "--batch", "2", "--device", "cpu",
                           "--backends", "torch", "--methods", "tokentm,legrad"], capsys)
    assert rc == 0 and "| quick |" in out
    assert calls["quick"] == dict(model="vit_small_patch16_224", batch=2, methods=("tokentm", "legrad"),
                                  backends=("torch",), device="cpu", repeats=3)
    rc, _, err = run_main(["bench", "--json", tmp_path / "missing.json"], capsys)
    assert_clean_error(rc, err, "missing.json")


# ----------------------------------------------------------------------------- demo
def _check_demo_output(out, stdout, n_images):
    assert (out / "demo_grid.png").is_file() and (out / "demo_curves.png").is_file()
    grid = np.asarray(Image.open(out / "demo_grid.png").convert("RGB")).astype(np.float32)
    assert grid.std() > 10
    res = json.loads((out / "demo_results.json").read_text())
    metrics = {(r["method"], r["metric"]) for r in res["records"]}
    assert {(m, k) for m in METHODS for k in ("segmentation", "perturbation")} <= metrics
    assert res["counts"]["images_evaluated"] == n_images
    for m in METHODS:
        assert f"| {m} |" in stdout
    for col in ("mIoU", "Pos. AUC", "Neg. AUC", "AOPC", "LOdds"):
        assert col in stdout
    return res


def test_demo_end_to_end(tmp_path, synthetic_ckpt, capsys):
    out = tmp_path / "demo"
    rc, stdout, err = run_main(["demo", "--checkpoint", synthetic_ckpt, "--num-images", "4", "--num-explain", "2",
                                "--sanity-images", "2", "--batch-size", "4", "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    res = _check_demo_output(out, stdout, 4)
    assert ("tokentm", "sanity") in {(r["method"], r["metric"]) for r in res["records"]}


def test_demo_with_the_shipped_weights(tmp_path, capsys):
    from tokentm_fast.synthetic.model import WEIGHTS_PATH

    if not WEIGHTS_PATH.is_file():
        pytest.skip(f"shipped synthetic weights not present yet ({WEIGHTS_PATH})")
    out = tmp_path / "demo"
    rc, stdout, err = run_main(["demo", "--num-images", "8", "--num-explain", "2", "--sanity-images", "0",
                                "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    res = _check_demo_output(out, stdout, 8)
    # a trained model: removing the most relevant pixels hurts more than removing the least relevant ones
    tok = {r["metric"]: r["values"] for r in res["records"] if r["method"] == "tokentm"}
    assert tok["perturbation"]["pos_auc_predicted"] < tok["perturbation"]["neg_auc_predicted"]


def test_demo_without_weights_is_a_clean_error(tmp_path, capsys):
    rc, _, err = run_main(["demo", "--checkpoint", tmp_path / "none.safetensors", "--out", tmp_path / "d"], capsys)
    assert_clean_error(rc, err, "none.safetensors")
