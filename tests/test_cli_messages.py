"""Issue 15, item 9 (the command line's part): messages a new user trips on.

* a corrupt checkpoint (random bytes) is "not a readable checkpoint", named,
  with the format expected, and never torch's advice to use
  ``weights_only=False``;
* under ``torchrun`` an error every rank meets alike is printed once, by rank 0;
* the class-folder warning is printed once.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import subprocess_env
from PIL import Image

TINY_KWARGS = dict(img_size=32, patch_size=8, depth=2)
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import timm

    d = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    random_bytes = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    random_bytes = b"\x80\xf1" + random_bytes[2:]  # a pickle-like start, as in the report (protocol 241)
    for name in ("random.pth", "random.pt", "random.safetensors", "random.bin"):
        (d / name).write_bytes(random_bytes)
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_KWARGS)
    torch.save(m, d / "whole_model.pth")  # a pickled module, not a state dict
    good = d / "good.pth"
    torch.save(m.state_dict(), good)
    (d / "truncated.pth").write_bytes(good.read_bytes()[:4000])
    return d


@pytest.mark.parametrize("name", ["random.pth", "random.pt", "random.safetensors", "random.bin", "truncated.pth"])
@pytest.mark.parametrize("model", ["timm", "synthetic"])
def test_a_corrupt_checkpoint_is_named_without_torch_advice(checkpoints, name, model, tmp_path, run_main):
    ck = checkpoints / name
    argv = ["evaluate", *(TINY if model == "timm" else ["--model", "synthetic"]), "--checkpoint", ck,
            "--size", "2", "--output", tmp_path / "r.json", "--no-progress", "--workers", "0"]
    rc, _, err = run_main(argv)
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    assert str(ck) in err and "--checkpoint" in err and "not a readable checkpoint" in err, err
    assert ".safetensors" in err and ("torch.save" in err or model == "synthetic"), err  # the format expected
    assert "weights_only" not in err and "arbitrary code" not in err and "Weights only load failed" not in err


def test_a_pickled_model_is_refused_with_the_reason(checkpoints, tmp_path, run_main):
    ck = checkpoints / "whole_model.pth"
    rc, _, err = run_main(["explain", "x.png", *TINY, "--checkpoint", ck, "--out", tmp_path / "o"])
    assert rc == 2  # the image is missing: files first
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    rc, _, err = run_main(["explain", img, *TINY, "--checkpoint", ck, "--out", tmp_path / "o"])
    assert rc == 2 and str(ck) in err and "--checkpoint" in err
    assert "VisionTransformer" in err and "state_dict" in err and "weights_only" not in err, err
    # a good state dict still loads (the checks did not break the normal case)
    rc, _, err = run_main(["explain", img, *TINY, "--checkpoint", checkpoints / "good.pth", "--out",
                           tmp_path / "o", "--methods", "rollout"])
    assert rc == 0, err


# ----------------------------------------------------------------------------- the class-folder warning
def test_the_class_folder_warning_is_printed_once(tmp_path, run_main):
    import timm

    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "emu"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / c / "a.png")
    torch.manual_seed(0)
    ck = tmp_path / "five.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_KWARGS).state_dict(),
               ck)
    rc, out, err = run_main(["evaluate", *TINY, "--checkpoint", ck, "--data", f"folder:{tmp_path / 'data'}",
                             "--methods", "rollout", "--metrics", "perturbation", "--output", tmp_path / "r.json",
                             "--no-progress", "--workers", "0", "--threads", "1"])
    assert rc == 0, err
    said = (out + err).count("3 class folders but the model has 5 classes")
    assert said == 1, out + err
    assert "| rollout |" in out  # the run really ran and printed its table


# ----------------------------------------------------------------------------- rank 0 alone (torchrun)
def test_who_reports_an_error(monkeypatch):
    from tokentm_fast.cli import CLIError, reports_error
    from tokentm_fast.evaluation import EvaluationError

    shared = EvaluationError("the same on every rank")
    shared.every_rank = True
    own = EvaluationError("this rank's partial file")
    cases = [CLIError("bad option"), shared, own, OSError("disk")]
    for env in ({}, {"WORLD_SIZE": "1", "RANK": "0"}, {"WORLD_SIZE": "4", "RANK": "0"}):
        for k in ("WORLD_SIZE", "RANK"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert all(reports_error(e) for e in cases)  # one process, or rank 0: always
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert [reports_error(e) for e in cases] == [False, False, True, True]


def test_errors_every_rank_meets_are_marked():
    """What ``reports_error`` relies on: errors before the ranks can talk, and agreed errors, are ``every_rank``."""
    from tokentm_fast.evaluation import EvaluationError, evaluate
    from tokentm_fast.evaluation.distributed import DistContext

    with pytest.raises(EvaluationError) as e:
        evaluate("synthetic", "synthetic", methods="magic", output=None, progress=False)
    assert e.value.every_rank
    with pytest.raises(EvaluationError) as e:
        evaluate("synthetic", "synthetic", device="no_such_device", output=None, progress=False)
    assert e.value.every_rank
    with pytest.raises(EvaluationError) as e:
        DistContext().agree("a corrupt checkpoint")
    assert e.value.every_rank and str(e.value) == "a corrupt checkpoint"
    assert not EvaluationError("x").every_rank


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tokentm_fast", "evaluate", "--size", "4", "--batch-size", "2", "--methods", "rollout",
            "--metrics", "segmentation", "--workers", "0", "--threads", "1", "--no-progress", *map(str, args)]


def test_torchrun_reports_a_shared_error_once(checkpoints, tmp_path):
    """A corrupt checkpoint under torchrun (2 ranks, gloo): one message, from rank 0; no rank hangs."""
    r = subprocess.run(_torchrun("--checkpoint", checkpoints / "random.safetensors", "--output", tmp_path / "r.json"),
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("tokentm-fast")]
    assert len(ours) == 1, r.stderr
    assert "not a readable checkpoint" in ours[0] and "random.safetensors" in ours[0]
    assert "[rank 0]" in ours[0]
    assert not list(tmp_path.glob("r.json*"))


def test_torchrun_without_cuda_says_it_once(tmp_path):
    no_gpu = dict(subprocess_env(), CUDA_VISIBLE_DEVICES="")  # the ranks see no CUDA device, on any machine
    r = subprocess.run(_torchrun("--device", "cuda", "--output", tmp_path / "r.json"), cwd=tmp_path, env=no_gpu,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("tokentm-fast")]
    assert len(ours) == 1 and "CUDA is not available" in ours[0], r.stderr
