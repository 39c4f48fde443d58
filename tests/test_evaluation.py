"""tokentm_fast/evaluation: the evaluation runner and its data sources (tiny models, tiny data)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tokentm_fast.evaluation import (
    EvaluationError,
    FolderSource,
    MatSource,
    Preprocess,
    SyntheticSource,
    evaluate,
    format_table,
    load_model,
    model_data_config,
    partial_path,
    read_checkpoint,
)
from tokentm_fast.evaluation.data import EvalDataset, collate

TINY_KWARGS = dict(img_size=32, patch_size=8, depth=2)
TINY_KWARGS_CLI = "img_size=32,patch_size=8,depth=2"
METHODS2 = ["tokentm", "rollout"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vit(make_model):
    """``tiny_vit(num_classes=8, seed=0)``: timm vit_tiny built with ``TINY_KWARGS`` (the model ``load_model``
    rebuilds from a checkpoint), in eval mode."""
    return lambda num_classes=8, seed=0: make_model("timm_model", num_classes=num_classes, seed=seed,
                                                    **TINY_KWARGS).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_vit):
    p = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(tiny_vit().state_dict(), p)
    return p


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """3 classes x 2 images of 40 x 36 px, plus one corrupt .png."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "emu"):
        (root / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"img{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"this is not a png")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    return root


def write_mat(path, images, masks, double_ref_every=2, layout="N1"):
    """A stand-in of gtsegs_ijcv.mat: value/img and value/gt hold object references.

    images (H, W, 3) uint8 are stored transposed as (3, W, H), masks (H, W) as (W, H);
    every ``double_ref_every``-th mask reference points to a cell holding the reference
    (as in the real file).
    """
    n = len(images)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs, gt_refs = [], []
        for i, (img, m) in enumerate(zip(images, masks)):
            img_refs.append(refs.create_dataset(f"img{i}", data=np.ascontiguousarray(img.transpose(2, 1, 0))).ref)
            g = refs.create_dataset(f"gt{i}", data=np.ascontiguousarray(m.T.astype(np.uint8)))
            if double_ref_every and i % double_ref_every == 1:
                cell = refs.create_dataset(f"cell{i}", data=np.array([[g.ref]], dtype=h5py.ref_dtype))
                gt_refs.append(cell.ref)
            else:
                gt_refs.append(g.ref)
        shape = (n, 1) if layout == "N1" else (1, n)
        v = f.create_group("value")
        v.create_dataset("img", data=np.array(img_refs, dtype=h5py.ref_dtype).reshape(shape))
        v.create_dataset("gt", data=np.array(gt_refs, dtype=h5py.ref_dtype).reshape(shape))


def mat_arrays(n=4, seed=0):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        h, w = 34 + i, 40
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        m = np.zeros((h, w), dtype=bool)
        m[5:20, 3 + i:25] = True
        masks.append(m)
    return images, masks


@pytest.fixture(scope="module")
def tiny_mat(tmp_path_factory):
    p = tmp_path_factory.mktemp("mat") / "gtsegs_ijcv.mat"
    write_mat(p, *mat_arrays())
    return p


# ----------------------------------------------------------------------------- data sources
def test_mat_source_reads_reference_layout(tmp_path):
    images, masks = mat_arrays(3)
    for layout in ("N1", "1N"):
        p = tmp_path / f"seg_{layout}.mat"
        write_mat(p, images, masks, layout=layout)
        src = MatSource(p)
        assert len(src) == 3
        for i in range(3):
            pil, m, label = src.load(i)
            np.testing.assert_array_equal(np.asarray(pil), images[i])
            np.testing.assert_array_equal(m, masks[i])
            assert label == -1
        assert src.sample_id(2) == f"{p.name}#00002"


def test_mat_source_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MatSource(tmp_path / "missing.mat")
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(ValueError, match="bad.mat"):
        MatSource(bad)
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="value/img"):
        MatSource(tmp_path / "other.mat")


def test_folder_source_order_labels_and_failures(tiny_folder, tiny_vit):
    src = FolderSource(tiny_folder)
    assert src.classes == ["cat", "dog", "emu"]
    ids = [src.sample_id(i) for i in range(len(src))]
    assert ids == ["cat/img0.png", "cat/img1.png", "dog/broken.png", "dog/img0.png", "dog/img1.png",
                   "emu/img0.png", "emu/img1.png"]
    assert [lab for _, lab in src.samples] == [0, 0, 1, 1, 1, 2, 2]
    ds = EvalDataset(src, Preprocess(model_data_config(tiny_vit())))
    items = [ds[i] for i in range(len(ds))]
    assert "error" in items[2] and items[2]["id"] == "dog/broken.png"
    batch = collate(items)
    assert batch["n"] == 7 and len(batch["failures"]) == 1 and batch["failures"][0][0] == "dog/broken.png"
    assert batch["images"].shape == (6, 3, 32, 32) and batch["masks"] is None
    assert batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert 0.0 <= float(batch["images01"].min()) and float(batch["images01"].max()) <= 1.0


def test_preprocess_follows_model_config_and_masks_nearest(tiny_vit):
    model = tiny_vit()
    cfg = model_data_config(model)
    assert tuple(cfg["input_size"]) == (3, 32, 32)  # the real img_size, not the registered 224
    pre = Preprocess(cfg)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mask = np.zeros((50, 70), bool)
    mask[:, 35:] = True
    x, x01, m = pre(img, mask)
    assert x.shape == x01.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.bool
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    torch.testing.assert_close(x, (x01 - mean) / std)
    assert m[:, :14].sum() == 0 and m[:, 18:].all()  # a vertical edge near the middle survives


def test_synthetic_source_is_exact_for_the_synthetic_model():
    from tokentm_fast.synthetic import create_synthetic_vit, generate

    pre = Preprocess(model_data_config(create_synthetic_vit(pretrained=False)))
    src = SyntheticSource("test", size=3)
    item = EvalDataset(src, pre)[1]
    img, mask, label = generate("test", 1)
    np.testing.assert_array_equal(item["image01"].numpy(), img)
    np.testing.assert_array_equal(item["mask"].numpy(), mask)
    assert item["label"] == label and item["id"] == "synthetic/test/000001"


# ----------------------------------------------------------------------------- model loading
def test_load_model_errors(tmp_path, tiny_ckpt):
    with pytest.raises(EvaluationError, match="unknown model 'vit_nonexistent_model'"):
        load_model("vit_nonexistent_model", checkpoint=tiny_ckpt)
    with pytest.raises(EvaluationError, match="needs a local checkpoint"):
        load_model("vit_tiny_patch16_224")
    with pytest.raises(EvaluationError, match="not found: .*missing.pth"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(EvaluationError, match="garbage.safetensors"):
        read_checkpoint(garbage)
    with pytest.raises(EvaluationError, match="does not fit"):
        load_model("vit_tiny_patch16_224", checkpoint=tiny_ckpt)  # wrong architecture arguments


def test_load_model_checkpoint_formats(tmp_path, tiny_ckpt, tiny_vit):
    from safetensors.torch import save_file

    ref = tiny_vit()
    st = tmp_path / "tiny.safetensors"
    save_file(ref.state_dict(), str(st))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}, wrapped)
    x = torch.randn(2, 3, 32, 32)
    for ck in (tiny_ckpt, st, wrapped):
        m, info = load_model("vit_tiny_patch16_224", checkpoint=ck, model_kwargs=TINY_KWARGS)
        assert m.num_classes == 8 and not m.training  # num_classes from head.weight
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x))
        assert info["checkpoint"]["path"] == str(Path(ck).resolve())


# ----------------------------------------------------------------------------- evaluate
def _records(results):
    return {(r["method"], r["metric"]): r["values"] for r in results["records"]}


def test_evaluate_folder_skips_corrupt_file(tiny_folder, tiny_ckpt, tmp_path):
    logs = []
    out = tmp_path / "folder.json"
    res = evaluate("vit_tiny_patch16_224", f"folder:{tiny_folder}", methods=METHODS2,
                   metrics=("segmentation", "perturbation"), checkpoint=tiny_ckpt, model_kwargs=TINY_KWARGS,
                   batch_size=3, output=out, num_workers=2, progress=False, log=logs.append)
    assert any(l.startswith("skipped dog/broken.png:") for l in logs)
    assert any("segmentation metric unavailable" in l for l in logs)
    on_disk = json.loads(out.read_text())
    for r in (res, on_disk):
        assert [s["id"] for s in r["skipped"]] == ["dog/broken.png"]
        assert r["counts"] == {"samples_in_data": 7, "samples": 7, "images_evaluated": 6, "skipped": 1,
                               "sanity_images": 0}
        assert "segmentation" in r["unavailable"]
        assert sorted((x["method"], x["metric"]) for x in r["records"]) == [
            ("rollout", "perturbation"), ("tokentm", "perturbation")]
        for key in ("model", "data", "command", "versions"):
            assert key in r
        assert set(r["versions"]) >= {"tokentm_fast", "torch", "timm"}
    vals = _records(res)[("tokentm", "perturbation")]
    assert {"pos_auc_predicted", "neg_auc_predicted", "pos_auc_target", "aopc", "lodds", "curves"} <= set(vals)
    assert not partial_path(out).exists()  # removed once the results are written
    # 3 class folders against an 8-class model: a warning, and the mapping in the results
    assert sum("warning: the data has 3 class folders but the model has 8 classes" in l for l in logs) == 1
    for r in (res, on_disk):
        assert r["data"]["class_to_idx"] == {"cat": 0, "dog": 1, "emu": 2}
        assert len(r["warnings"]) == 1 and "cat=0, dog=1, emu=2" in r["warnings"][0]
    table = format_table(res)
    assert "| tokentm |" in table and "Pos. AUC" in table


def test_evaluate_mat_all_methods_and_limit(tiny_mat, tiny_ckpt, tmp_path):
    from tokentm_fast import METHODS

    out = tmp_path / "mat.json"
    res = evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", methods=METHODS, checkpoint=tiny_ckpt,
                   model_kwargs=TINY_KWARGS, batch_size=2, output=out, limit=3, progress=False)
    recs = _records(json.loads(out.read_text()))
    assert set(recs) == {(m, k) for m in METHODS for k in ("segmentation", "perturbation")}
    assert res["counts"]["images_evaluated"] == 3 and res["counts"]["samples"] == 3
    seg = recs[("tokentm", "segmentation")]
    assert 0.0 <= seg["pixel_accuracy"] <= 1.0 and 0.0 <= seg["miou"] <= 1.0 and 0.0 <= seg["map"] <= 1.0
    assert "pos_auc_target" not in recs[("tokentm", "perturbation")]  # the .mat file has no labels


def test_evaluate_explains_once_per_batch_and_method(tiny_mat, tiny_ckpt, monkeypatch):
    from tokentm_fast import api

    calls = []
    orig = api.Explainer.__call__

    def counting(self, images, target=None):
        calls.append((self.method, images.shape[0]))
        return orig(self, images, target)

    monkeypatch.setattr(api.Explainer, "__call__", counting)
    evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", methods=METHODS2, checkpoint=tiny_ckpt,
             model_kwargs=TINY_KWARGS, batch_size=2, output=None, progress=False)
    assert calls == [("tokentm", 2), ("rollout", 2), ("tokentm", 2), ("rollout", 2)]


def test_evaluate_sanity_metric(tiny_mat, tiny_ckpt):
    res = evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", methods=["rollout"], metrics="sanity",
                   checkpoint=tiny_ckpt, model_kwargs=TINY_KWARGS, batch_size=3, output=None,
                   sanity_images=2, progress=False)
    vals = _records(res)[("rollout", "sanity")]
    assert len(vals["stages"]) == 3  # 2 blocks + fully random
    assert res["counts"]["sanity_images"] == 2
    assert "spearman_full_random" in vals


def test_evaluate_folder_with_more_classes_than_the_model(tiny_folder, tmp_path, tiny_vit):
    ckpt = tmp_path / "two.pth"
    torch.save(tiny_vit(num_classes=2).state_dict(), ckpt)
    with pytest.raises(EvaluationError, match="3 class folders but the model has 2 classes"):
        evaluate("vit_tiny_patch16_224", f"folder:{tiny_folder}", methods=["raw_attention"], metrics="perturbation",
                 checkpoint=ckpt, model_kwargs=TINY_KWARGS, output=None, progress=False, num_workers=0)


def test_evaluate_dtype_casts_a_copy_of_a_module(tiny_mat, tiny_vit):
    model = tiny_vit()
    res = evaluate(model, f"mat:{tiny_mat}", methods=["rollout"], metrics="perturbation", dtype="bfloat16",
                   batch_size=2, limit=2, output=None, progress=False, num_workers=0)
    assert res["dtype"] == "bfloat16" and res["counts"]["images_evaluated"] == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's module is untouched
    with pytest.raises(EvaluationError, match="dtype must be one of"):
        evaluate(model, f"mat:{tiny_mat}", dtype="float8", output=None, progress=False)


def test_evaluate_bad_inputs(tiny_folder, tiny_ckpt, tmp_path):
    common = dict(checkpoint=tiny_ckpt, model_kwargs=TINY_KWARGS, output=None, progress=False)
    with pytest.raises(EvaluationError, match="no metric left"):
        evaluate("vit_tiny_patch16_224", f"folder:{tiny_folder}", metrics="segmentation", **common)
    with pytest.raises(ValueError, match="not found"):
        evaluate("vit_tiny_patch16_224", f"folder:{tmp_path / 'nope'}", **common)
    with pytest.raises(ValueError, match="folder:PATH"):
        evaluate("vit_tiny_patch16_224", "imagenet", **common)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate("vit_tiny_patch16_224", "synthetic", methods="tokentm,magic", **common)


# ----------------------------------------------------------------------------- resume
def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tokentm_fast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _run_until(cmd, partial, min_done, cwd, sig=None, timeout=240):
    """Start ``cmd``; once ``partial`` records ``min_done`` samples, send ``sig`` (SIGKILL) and wait."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def default_sigint():
        # as from a terminal: a child inherits an ignored SIGINT (an earlier test's library may have set
        # SIG_IGN in this process), and Python then never raises KeyboardInterrupt in it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if partial.exists():
            try:
                if json.loads(partial.read_text())["done"] >= min_done:
                    break
            except (ValueError, KeyError):  # never expected (atomic replace); retry
                pass
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL if sig is None else sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigkilled_run_resumes_exactly(tiny_ckpt, tmp_path, capsys):
    """A real SIGKILL mid-run: the state is intact, another configuration is refused, the rerun is exact."""
    from tokentm_fast.cli import main

    def command(methods, output):
        return ["evaluate", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt),
                "--model-kwargs", TINY_KWARGS_CLI, "--data", "synthetic", "--size", "24", "--batch-size", "3",
                "--methods", methods, "--workers", "0", "--threads", "1", "--no-progress", "--output", str(output)]

    killed = tmp_path / "killed.json"
    # killed for real (SIGKILL) once some batches are saved
    rc, _ = _run_until([sys.executable, "-m", "tokentm_fast", *command("tokentm,gae", killed)],
                       partial_path(killed), 3, tmp_path)
    assert rc == -9
    assert not killed.exists()
    state = json.loads(partial_path(killed).read_text())
    assert 3 <= state["done"] < 24 and state["done"] % 3 == 0 and state["images"] == state["done"]

    # a different configuration refuses to resume, and says how to start over
    assert main(command("tokentm", killed)) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "--restart" in err and "Traceback" not in err
    assert json.loads(partial_path(killed).read_text())["done"] == state["done"]  # untouched

    # the same command resumes after the samples done
    r = _cli(command("tokentm,gae", killed), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    resumed = json.loads(killed.read_text())
    assert resumed["run"]["resumed_from"] == state["done"]
    assert resumed["run"]["images_this_run"] == 24 - state["done"]
    assert not partial_path(killed).exists()

    # an uninterrupted run (one thread, as the subprocesses) gives exactly the same numbers
    full = tmp_path / "full.json"
    assert main(command("tokentm,gae", full)) == 0
    uninterrupted = json.loads(full.read_text())
    assert uninterrupted["run"]["resumed_from"] == 0 and uninterrupted["run"]["images_this_run"] == 24
    assert resumed["records"] == uninterrupted["records"]  # exactly equal
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["fingerprint"] == uninterrupted["fingerprint"]
    assert uninterrupted["world_size"] == 1 and uninterrupted["ranks"][0]["images"] == 24


def test_ctrl_c_says_where_the_state_is_and_how_to_resume(tiny_ckpt, tmp_path):
    import signal

    out = tmp_path / "ctrlc.json"
    cmd = [sys.executable, "-m", "tokentm_fast", "evaluate", "--model", "vit_tiny_patch16_224",
           "--checkpoint", str(tiny_ckpt), "--model-kwargs", TINY_KWARGS_CLI, "--data", "synthetic",
           "--size", "400", "--batch-size", "2", "--methods", "rollout", "--metrics", "segmentation",
           "--workers", "0", "--threads", "1", "--no-progress", "--save-every", "5", "--output", str(out)]
    # Ctrl-C (SIGINT) once the loop runs: the state of the last completed batch is saved, even between saves
    pp = partial_path(out)
    rc, err = _run_until(cmd, pp, 10, tmp_path, sig=signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err
    state = json.loads(pp.read_text())
    assert 10 <= state["done"] < 400 and state["done"] % 2 == 0
    assert f"the state is saved in {pp}" in err
    assert "run the same command again to resume it" in err
    assert f"interrupted after {state['done']} of 400 samples" in err


def test_restart_discards_partial_state(tiny_mat, tiny_ckpt, tmp_path):
    out = tmp_path / "r.json"
    pp = partial_path(out)
    pp.write_text(json.dumps({"fingerprint": "something else", "config": {}, "done": 1}))
    common = dict(checkpoint=tiny_ckpt, model_kwargs=TINY_KWARGS, output=out, progress=False,
                  methods=["raw_attention"], batch_size=4)
    with pytest.raises(EvaluationError, match="restart"):
        evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", **common)
    res = evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", restart=True, **common)
    assert res["run"]["resumed_from"] == 0 and res["counts"]["images_evaluated"] == 4
    pp.write_text("{ truncated")
    with pytest.raises(EvaluationError, match="cannot read the partial state"):
        evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", **common)


NEW_BASELINES = ("conservative_lrp", "attcat", "lrp", "partial_lrp", "transformer_attribution")


def test_evaluate_scores_each_new_baseline(tiny_mat, tiny_ckpt):
    """Issue 19's methods through the runner: one segmentation and one perturbation record each, in range,
    and not the same numbers for every method (each is scored on its own maps)."""
    res = evaluate("vit_tiny_patch16_224", f"mat:{tiny_mat}", methods=NEW_BASELINES,
                   metrics="segmentation,perturbation", checkpoint=tiny_ckpt, model_kwargs=TINY_KWARGS,
                   batch_size=2, output=None, limit=2, progress=False)
    recs = _records(res)
    seg = {m: recs[(m, "segmentation")] for m in NEW_BASELINES}
    for m, vals in seg.items():
        for key in ("pixel_accuracy", "miou", "map"):
            assert 0.0 <= vals[key] <= 1.0, (m, key)
        pert = recs[(m, "perturbation")]
        assert all(np.isfinite(v) for v in pert.values() if isinstance(v, float)), m
    assert len({round(v["map"], 12) for v in seg.values()}) > 1
