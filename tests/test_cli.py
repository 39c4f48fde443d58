"""Tests of the command line (``tokentm-fast`` / ``python -m tokentm_fast``)."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tokentm_fast import METHODS
from tokentm_fast.cli import main

SUBCOMMANDS = ("explain", "evaluate", "bench", "demo")
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


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
        "bench": ("--model", "--batch", "--backends", "--device"),
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
def test_explain_writes_overlays_and_grid(tmp_path, pictures, tiny_ckpt, run_main):
    paths, _ = pictures
    out = tmp_path / "out"
    rc, stdout, err = run_main(["explain", *paths, *TINY, "--checkpoint", tiny_ckpt,
                                "--methods", "tokentm,legrad,rollout", "--out", out])
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


def test_explain_overlays_draw_signed_methods_centred_and_blend_at_the_library_alpha(tmp_path, pictures, tiny_ckpt,
                                                                                      run_main, monkeypatch):
    """Each overlay is drawn knowing its method (the signed ones get the diverging map centred at 0), at the
    pictures' default opacity unless --alpha says otherwise."""
    import tokentm_fast.visualize as vis

    seen = []
    original = vis.save_overlay_figure

    def spy(*args, **kwargs):
        seen.append((kwargs.get("method"), kwargs.get("alpha")))
        return original(*args, **kwargs)

    monkeypatch.setattr(vis, "save_overlay_figure", spy)
    paths, _ = pictures
    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", tiny_ckpt, "--methods", "lrp,tokentm",
                           "--out", tmp_path / "out"])
    assert rc == 0, err
    assert sorted(seen) == sorted([("lrp", vis.DEFAULT_ALPHA), ("tokentm", vis.DEFAULT_ALPHA)])
    seen.clear()
    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", tiny_ckpt, "--methods", "lrp",
                           "--alpha", "0.3", "--out", tmp_path / "out2"])
    assert rc == 0 and seen == [("lrp", 0.3)], err


def test_explain_synthetic_model_every_method(tmp_path, synthetic_ckpt, run_main):
    from tokentm_fast.synthetic import save_folder

    files = save_folder(tmp_path / "imgs", "test", 2)
    out = tmp_path / "out"
    rc, stdout, err = run_main(["explain", *files, "--checkpoint", synthetic_ckpt, "--out", out])
    assert rc == 0, err
    assert len(list(out.glob("*.png"))) == 2 * len(METHODS) + 1


def test_explain_errors_are_clean(tmp_path, pictures, tiny_ckpt, run_main):
    paths, bad = pictures
    out = tmp_path / "o"
    missing = tmp_path / "does_not_exist.png"
    rc, _, err = run_main(["explain", missing, *TINY, "--checkpoint", tiny_ckpt, "--out", out])
    assert_clean_error(rc, err, "image file not found", "does_not_exist.png", "no IMAGE could be read")

    rc, _, err = run_main(["explain", bad, missing, *TINY, "--checkpoint", tiny_ckpt, "--out", out])
    assert_clean_error(rc, err, "cannot read image", "corrupt.png", "does_not_exist.png", "2 files skipped")

    rc, _, err = run_main(["explain", paths[0], "--model", "vit_does_not_exist_patch16", "--checkpoint", tiny_ckpt,
                           "--out", out])
    assert_clean_error(rc, err, "unknown model", "vit_does_not_exist_patch16")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", junk, "--out", out])
    assert_clean_error(rc, err, "cannot read checkpoint", "junk.pth")

    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x01\x02")
    rc, _, err = run_main(["explain", paths[0], "--checkpoint", junk_st, "--out", out])
    assert_clean_error(rc, err, "junk.safetensors")

    rc, _, err = run_main(["explain", paths[0], *TINY, "--checkpoint", tmp_path / "nope.pth", "--out", out])
    assert_clean_error(rc, err, "checkpoint file not found", "nope.pth")

    rc, _, err = run_main(["explain", paths[0], "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_ckpt,
                           "--out", out])
    assert_clean_error(rc, err, "does not fit", "--model-kwargs")
    assert not out.exists()  # nothing written on error


def test_explain_skips_unreadable_images_and_exits_1(tmp_path, pictures, tiny_ckpt, run_main):
    """Issue 26, item 6: a corrupt or missing IMAGE is skipped and named with its reason, the others are
    explained and written, and the exit code says that something was skipped."""
    paths, bad = pictures
    missing = tmp_path / "gone.png"
    folder = tmp_path / "a_folder.png"
    folder.mkdir()
    out = tmp_path / "o"
    rc, stdout, err = run_main(["explain", bad, paths[0], missing, folder, paths[1], *TINY, "--checkpoint",
                                tiny_ckpt, "--methods", "rollout", "--out", out, "--save-maps", tmp_path / "m.npz"])
    assert rc == 1, err
    assert "Traceback" not in err and "error" not in err
    lines = err.splitlines()
    skipped = [ln for ln in lines if ln.startswith("tokentm-fast explain: skipped ")]
    assert len(skipped) == 3, err
    assert str(bad) in skipped[0] and "cannot read image" in skipped[0]
    assert str(missing) in skipped[1] and "not found" in skipped[1]
    assert str(folder) in skipped[2] and "not an image file" in skipped[2]
    assert lines[-1].startswith("tokentm-fast explain: 3 of 5 IMAGE files could not be read") and "exit code 1" in \
        lines[-1] and all(str(p) in lines[-1] for p in (bad, missing, folder))   # said again at the end
    assert sorted(f.name for f in out.iterdir()) == sorted([f"{paths[0].name}_rollout.png",
                                                            f"{paths[1].name}_rollout.png", "grid.png"])
    with np.load(tmp_path / "m.npz", allow_pickle=False) as d:
        assert list(d["image_paths"]) == [str(paths[0]), str(paths[1])]
        assert d["rollout"].shape[0] == 2 and np.ptp(d["rollout"][0]) > 0
    assert f"{paths[0].name}: predicted" in stdout and f"{paths[1].name}: predicted" in stdout


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_cli_prints_table(tmp_path, tiny_ckpt, run_main):
    out = tmp_path / "res.json"
    curves = tmp_path / "curves.png"
    rc, stdout, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", "synthetic", "--size", "4",
                                "--methods", "gae,raw_attention", "--batch-size", "2", "--workers", "0",
                                "--output", out, "--curves", curves])
    assert rc == 0, err
    assert "| gae |" in stdout and "| raw_attention |" in stdout and "mIoU" in stdout and "AOPC" in stdout
    res = json.loads(out.read_text())
    assert len(res["records"]) == 4
    assert res["command"][:2] == ["tokentm-fast", "evaluate"]
    assert curves.is_file() and curves.stat().st_size > 1000
    assert "img/s" in err  # the progress bar


def test_evaluate_cli_errors(tmp_path, tiny_ckpt, run_main):
    rc, _, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", f"folder:{tmp_path / 'nope'}",
                           "--output", tmp_path / "r.json"])
    assert_clean_error(rc, err, "not found", "nope")
    rc, _, err = run_main(["evaluate", *TINY, "--checkpoint", tiny_ckpt, "--data", "imagenet",
                           "--output", tmp_path / "r.json"])
    assert_clean_error(rc, err, "folder:PATH")
    rc, _, err = run_main(["evaluate", "--model", "not_a_model", "--checkpoint", tiny_ckpt,
                           "--output", tmp_path / "r.json"])
    assert_clean_error(rc, err, "unknown model")


# ----------------------------------------------------------------------------- bench
def test_bench_table_columns_line_up_with_long_method_names():
    """Issue 26, item 6: every column of the bench table starts (text) or ends (numbers) at one place, with the
    longest method names of the package."""
    from tokentm_fast.cli.timing import format_timings

    longest = max(METHODS, key=len)
    rows = [("forward+backward", "-", 0.0123), (longest, "reference", 1.5), ("conservative_lrp", "torch", 12.25),
            ("gae", "triton", 0.0004)]
    lines = format_timings(rows)
    assert len(lines) == 5
    backend_at = {ln.index(cell) for ln, cell in zip(lines, ["backend", "-", "reference", "torch", "triton"])}
    assert len(backend_at) == 1 and backend_at.pop() > len(longest)        # one column, after the longest name
    ms_end = {ln.index(cell) + len(cell) for ln, cell in zip(lines, ["ms", "12.3", "1500.0", "12250.0", "0.4"])}
    assert len(ms_end) == 1                                                # numbers right-aligned at one place
    assert {len(ln) for ln in lines} == {len(lines[0])}                    # the ratio column ends at one place
    assert lines[2].split() == [longest, "reference", "1500.0", f"{1.5 / 0.0123:.2f}"]


def _bench_table(out):
    """The rows of ``tokentm-fast bench``: {(run, backend): (ms, ratio to forward+backward)}."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("forward+backward", *METHODS):
            rows[(parts[0], parts[1])] = (float(parts[2]), float(parts[3]))
    return rows


def test_bench_times_explain_against_forward_backward(run_main):
    rc, out, _ = run_main(["bench", *TINY, "--batch", "2", "--methods", "tokentm,rollout", "--backends", "reference,torch",
                           "--repeats", "1", "--threads", "1"])
    assert rc == 0, out
    rows = _bench_table(out)
    assert set(rows) == {("forward+backward", "-"), ("tokentm", "reference"), ("tokentm", "torch"),
                         ("rollout", "reference"), ("rollout", "torch")}
    base_ms = rows[("forward+backward", "-")][0]
    assert rows[("forward+backward", "-")][1] == 1.0
    for (run, backend), (ms, ratio) in rows.items():
        assert ms > 0
        assert abs(ratio - ms / base_ms) <= 0.02 * ratio + 0.01, (run, backend, ms, ratio)
    assert "vit_tiny_patch16_224 (random init), batch 2, float32" in out and "median of 1 calls" in out


def test_bench_is_not_tooling():
    """The benchmark tables (git calls, issue targets) live in benchmarks/, not in the package."""
    import importlib.util

    assert importlib.util.find_spec("tokentm_fast.benchtable") is None


def test_bench_errors(run_main):
    rc, _, err = run_main(["bench", *TINY, "--backends", "torch,cuda_magic"])
    assert_clean_error(rc, err, "cuda_magic", "reference")
    rc, _, err = run_main(["bench", "--model", "not_a_model"])
    assert_clean_error(rc, err, "unknown model")


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


def test_demo_end_to_end(tmp_path, synthetic_ckpt, run_main):
    out = tmp_path / "demo"
    rc, stdout, err = run_main(["demo", "--checkpoint", synthetic_ckpt, "--num-images", "4", "--num-explain", "2",
                                "--sanity-images", "2", "--batch-size", "4", "--out", out, "--no-progress"])
    assert rc == 0, err
    res = _check_demo_output(out, stdout, 4)
    assert ("tokentm", "sanity") in {(r["method"], r["metric"]) for r in res["records"]}


def test_demo_with_the_shipped_weights(tmp_path, run_main):
    from tokentm_fast.synthetic.model import WEIGHTS_PATH

    if not WEIGHTS_PATH.is_file():
        pytest.skip(f"shipped synthetic weights not present yet ({WEIGHTS_PATH})")
    out = tmp_path / "demo"
    rc, stdout, err = run_main(["demo", "--num-images", "8", "--num-explain", "2", "--sanity-images", "0",
                                "--out", out, "--no-progress"])
    assert rc == 0, err
    res = _check_demo_output(out, stdout, 8)
    # a trained model: removing the most relevant pixels hurts more than removing the least relevant ones
    tok = {r["metric"]: r["values"] for r in res["records"] if r["method"] == "tokentm"}
    assert tok["perturbation"]["pos_auc_predicted"] < tok["perturbation"]["neg_auc_predicted"]


def test_demo_constant_map_warning_does_not_blame_the_trained_model(tmp_path, run_main):
    """Issue 26, item 6: attention Grad-CAM's map of the shipped (trained) demo model's test image 3 is all
    zeros (every head's gradient-weighted evidence is negative there and is clipped at 0); the warning names
    that cause and does not blame an untrained model, once."""
    from tokentm_fast import explain
    from tokentm_fast.evaluation.data import Preprocess, SyntheticSource, model_data_config
    from tokentm_fast.synthetic import create_synthetic_vit
    from tokentm_fast.synthetic.model import WEIGHTS_PATH

    if not WEIGHTS_PATH.is_file():
        pytest.skip(f"shipped synthetic weights not present ({WEIGHTS_PATH})")
    # the premise, independently of the command: image 3's map is constant, the others are not
    model = create_synthetic_vit()
    pre = Preprocess(model_data_config(model))
    src = SyntheticSource("test", size=4)
    x = torch.stack([pre(*src.load(i)[:2])[0] for i in range(4)])
    maps = explain(model, x, method="attn_gradcam", backend="torch").flatten(1)
    constant = (maps.amax(1) == maps.amin(1)).tolist()
    assert constant == [False, False, False, True]
    with warnings.catch_warnings(record=True) as caught:          # what Python's warnings would print too
        warnings.simplefilter("always")
        rc, _, err = run_main(["demo", "--methods", "attn_gradcam,rollout", "--num-explain", "4", "--num-images",
                               "2", "--sanity-images", "0", "--out", tmp_path / "d", "--no-progress"])
    assert rc == 0, err
    said = [ln for ln in err.splitlines() if "constant" in ln]
    assert len(said) == 1, err                                   # once: the drawing's and the API's held back
    assert not [w for w in caught if "constant" in str(w.message)], [str(w.message) for w in caught]
    assert said[0].startswith("tokentm-fast demo: warning: attn_gradcam: 1 of 4 maps are constant (test image 3)")
    assert "untrained" not in err
    assert "keeps only positive evidence" in said[0] and "weighed against the class" in said[0]


def test_demo_without_weights_is_a_clean_error(tmp_path, run_main):
    rc, _, err = run_main(["demo", "--checkpoint", tmp_path / "none.safetensors", "--out", tmp_path / "d"])
    assert_clean_error(rc, err, "none.safetensors")


# ----------------------------------------------------------------------------- output names and locations (issue 8)
def _no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model or evaluating."""
    import tokentm_fast.cli as cli
    import tokentm_fast.evaluation.runner as runner

    def boom(*a, **k):
        raise AssertionError("the command computed before checking its output location")

    monkeypatch.setattr(cli, "_load_model", boom)
    monkeypatch.setattr(runner, "evaluate", boom)
    monkeypatch.setattr(runner, "load_model", boom)


def test_output_names_keep_the_extension():
    from tokentm_fast.cli import output_names

    assert output_names(["d/photo.png", "d/photo.jpg"]) == ["photo.png", "photo.jpg"]
    assert output_names(["a/photo.png", "b/photo.png"]) == ["a_photo.png", "b_photo.png"]
    names = output_names(["photo.png", "photo.png", "x/photo.jpg"])
    assert len(set(names)) == 3 and names[2] == "photo.jpg"


def test_explain_same_stem_different_extensions(tmp_path, tiny_ckpt, run_main):
    rng = np.random.default_rng(3)
    png, jpg = tmp_path / "photo.png", tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(jpg)  # a different picture
    out = tmp_path / "new" / "deeper" / "out"  # missing parents are created
    rc, stdout, err = run_main(["explain", png, jpg, *TINY, "--checkpoint", tiny_ckpt, "--methods", "rollout",
                                "--out", out, "--grid-name", "figs/grid.pdf"])
    assert rc == 0, err
    assert sorted(f.name for f in out.iterdir()) == ["figs", "photo.jpg_rollout.png", "photo.png_rollout.png"]
    assert (out / "figs" / "grid.pdf").read_bytes().startswith(b"%PDF")
    assert "photo.png: predicted" in stdout and "photo.jpg: predicted" in stdout
    a = np.asarray(Image.open(out / "photo.png_rollout.png"))
    b = np.asarray(Image.open(out / "photo.jpg_rollout.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # each file holds its own image


@pytest.mark.parametrize("name", ["../../escape.png", "../escape.png", "sub/../../escape.png", "ABS"])
def test_grid_name_cannot_escape_the_output_folder(tmp_path, pictures, name, monkeypatch, run_main):
    paths, _ = pictures
    _no_model(monkeypatch)
    out = tmp_path / "a" / "b" / "out"
    if name == "ABS":
        name = str(tmp_path / "escape.png")
    rc, _, err = run_main(["explain", paths[0], "--out", out, "--grid-name", name])
    assert_clean_error(rc, err, "--grid-name", "output folder")
    assert not list(tmp_path.rglob("escape.png"))
    assert not out.exists()


def test_grid_name_through_a_link_is_refused(tmp_path, pictures, monkeypatch, run_main):
    paths, _ = pictures
    _no_model(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    rc, _, err = run_main(["explain", paths[0], "--out", out, "--grid-name", "link/escape.png"])
    assert_clean_error(rc, err, "--grid-name", "outside the output folder")
    rc, _, err = run_main(["explain", paths[0], "--out", out, "--grid-name", "grid.unknownformat"])
    assert_clean_error(rc, err, "--grid-name", "format")


def test_output_errors_before_computing(tmp_path, pictures, monkeypatch, run_main):
    paths, _ = pictures
    _no_model(monkeypatch)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    # --out is an existing file
    for cmd in (["explain", paths[0]], ["demo"]):
        rc, _, err = run_main([*cmd, "--out", a_file])
        assert_clean_error(rc, err, "--out", "a_file.txt", "is an existing file")
    # a parent that cannot be created: it is a file
    for cmd in (["explain", paths[0]], ["demo"]):
        rc, _, err = run_main([*cmd, "--out", a_file / "sub" / "out"])
        assert_clean_error(rc, err, "--out", "a_file.txt is a file")
    rc, _, err = run_main(["evaluate", "--output", a_file / "r.json"])
    assert_clean_error(rc, err, "--output", "a_file.txt is a file")
    rc, _, err = run_main(["evaluate", "--output", tmp_path / "r.json", "--curves", a_file / "c.png"])
    assert_clean_error(rc, err, "--curves", "a_file.txt is a file")
    # a file option given an existing folder
    rc, _, err = run_main(["evaluate", "--output", a_dir])
    assert_clean_error(rc, err, "--output", "is an existing folder")
    assert a_file.read_text() == "x" and not list(a_dir.iterdir())


def test_output_in_a_location_reported_not_writable(tmp_path, pictures, monkeypatch, run_main):
    """The check itself: a folder that os.access reports unwritable (read-only fs, permissions) is refused."""
    paths, _ = pictures
    _no_model(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access

    def access(p, mode, *a, **k):
        if os.path.abspath(p) == str(ro) and mode & os.W_OK:
            return False
        return real_access(p, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    cases = ((["explain", paths[0], "--out", ro], "--out"), (["explain", paths[0], "--out", ro / "x"], "--out"),
             (["demo", "--out", ro / "x" / "y"], "--out"), (["evaluate", "--output", ro / "r.json"], "--output"))
    for argv, opt in cases:
        rc, _, err = run_main(argv)
        assert_clean_error(rc, err, opt, "not writable", str(ro))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 555 folder anyway; the check is covered by "
                           "test_output_in_a_location_reported_not_writable")
def test_output_in_a_read_only_folder(tmp_path, pictures, monkeypatch, run_main):
    paths, _ = pictures
    _no_model(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = run_main(["explain", paths[0], "--out", ro / "out"])
        assert_clean_error(rc, err, "--out", "not writable")
        rc, _, err = run_main(["evaluate", "--output", ro / "r.json"])
        assert_clean_error(rc, err, "--output", "not writable")
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- constant maps and n/a (issue 8)
def test_explain_warns_about_a_constant_map(tmp_path, pictures, tiny_ckpt, monkeypatch, run_main):
    import tokentm_fast.cli as cli

    real = cli._explain_all

    def zero_gradcam(explainers, x, target=None):
        maps = real(explainers, x, target)
        maps["attn_gradcam"] = torch.zeros_like(maps["attn_gradcam"])  # what a random model often gives
        return maps

    monkeypatch.setattr(cli, "_explain_all", zero_gradcam)
    paths, _ = pictures
    rc, _, err = run_main(["explain", paths[0], paths[2], *TINY, "--checkpoint", tiny_ckpt,
                           "--methods", "rollout,attn_gradcam", "--out", tmp_path / "o"])
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warn) == 1, err  # one line for the method, none for rollout
    assert "attn_gradcam" in warn[0] and "constant" in warn[0]
    assert paths[0].name in warn[0] and paths[2].name in warn[0]
    assert "rollout" not in warn[0]


def test_na_cells_get_a_footnote():
    from tokentm_fast.evaluation.report import table_footnotes
    from tokentm_fast.evaluation.runner import format_table

    records = [
        {"method": "tokentm", "metric": "sanity", "values": {"spearman_full_random": 0.12}},
        {"method": "attn_gradcam", "metric": "sanity", "values": {"spearman_full_random": None}},
    ]
    table = format_table({"records": records})
    assert "n/a" in table  # the runner prints n/a for an undefined value
    notes = table_footnotes(table)
    assert len(notes) == 1
    assert "attn_gradcam" in notes[0] and "tokentm" not in notes[0]
    assert "Spearman" in notes[0] and "constant" in notes[0]
    records[1]["values"]["spearman_full_random"] = 0.3
    assert table_footnotes(format_table({"records": records})) == []


def test_print_results_explains_na(capsys):
    from tokentm_fast.evaluation.report import print_results

    results = {
        "records": [{"method": "attn_gradcam", "metric": "sanity", "values": {"spearman_full_random": None}},
                    {"method": "gae", "metric": "sanity", "values": {"spearman_full_random": 0.5}}],
        "counts": {"images_evaluated": 2, "skipped": 0}, "run": {"resumed_from": 0},
        "data": {"kind": "synthetic"}, "model": {"name": "synthetic"},
    }
    print_results(results, None)
    out = capsys.readouterr().out
    table_end = out.index("| gae |")
    assert "n/a" in out[:table_end + 40]
    assert "n/a in Rand. ρ" in out[table_end:] and "undefined for a constant map" in out
