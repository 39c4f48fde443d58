"""tokentm_fast/metrics: the evaluation metrics (docs/evaluation.md §1–§4) against plain-numpy references;
the batched perturbation test (``max_forward_batch``) equals the per-fraction one on the shipped model."""
import json
import math
from decimal import Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from tokentm_fast import Explainer
from tokentm_fast.evaluation import EvalDataset, Preprocess, SyntheticSource, collate, model_data_config
from tokentm_fast.metrics import (
    PerturbationMetric,
    SanityMetric,
    SegmentationMetric,
    average_precision,
    model_randomization_check,
    num_removed,
    spearman,
)
from tokentm_fast.synthetic import create_synthetic_vit

FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# --------------------------------------------------------------------------- references (numpy)
def ref_upsample(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of one (gh, gw) map with torch (allowed by the brief), as float32 numpy."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def ref_ap(score: np.ndarray, y: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score (binary), written out."""
    order = np.argsort(score, kind="mergesort")[::-1]
    s, y = score[order], y[order].astype(np.float64)
    distinct = np.where(np.diff(s))[0]
    thr = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[thr]
    fps = 1 + thr - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ref_segmentation(maps, masks):
    correct = labeled = 0
    inter = np.zeros(2)
    union = np.zeros(2)
    aps = []
    for m, g in zip(maps, masks):
        g = np.asarray(g).astype(bool)
        e = ref_upsample(m, *g.shape)
        lo, hi = e.min(), e.max()
        e = (e - lo) / (hi - lo) if hi > lo else np.zeros_like(e)
        pred = e > e.mean(dtype=np.float64)
        correct += np.sum(pred == g)
        labeled += g.size
        for c, (p, t) in enumerate(((~pred, ~g), (pred, g))):
            inter[c] += np.sum(p & t)
            union[c] += np.sum(p | t)
        per = []
        if g.any():
            per.append(ref_ap(e.ravel(), g.ravel()))
        if (~g).any():
            per.append(ref_ap((np.float32(1) - e).ravel(), (~g).ravel()))
        aps.append(np.mean(per))
    iou = inter / union
    return {
        "pixel_accuracy": correct / labeled,
        "iou_background": iou[0],
        "iou_foreground": iou[1],
        "miou": iou.mean(),
        "map": float(np.mean(aps)),
    }


def ref_removed(f: float, n: int) -> int:
    return int((Decimal(str(f)) * n + Decimal("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


def ref_perturbation(classifier, normalize, images, maps, labels, fractions=FRACTIONS):
    """Per-image loops; returns the same dict layout as PerturbationMetric.compute()."""
    images = np.asarray(images, dtype=np.float32)
    n_img, c, h, w = images.shape
    n = h * w

    def probs(x):
        with torch.no_grad():
            logit = classifier(normalize(torch.from_numpy(x)[None]))[0].double().numpy()
        z = np.exp(logit - logit.max())
        return z / z.sum()

    curves = {k: np.zeros(len(fractions) + 1) for k in ("positive_predicted", "negative_predicted", "positive_target", "negative_target")}
    aopc, lodds = [], []
    for i in range(n_img):
        rel = ref_upsample(maps[i], h, w).ravel()
        order = np.argsort(-rel, kind="stable")
        p_clean = probs(images[i])
        pred = int(np.argmax(p_clean))
        p0 = p_clean[pred]
        curves["positive_predicted"][0] += 1
        curves["negative_predicted"][0] += 1
        if labels is not None:
            curves["positive_target"][0] += pred == labels[i]
            curves["negative_target"][0] += pred == labels[i]
        d_aopc, d_lodds = [], []
        for j, f in enumerate(fractions, start=1):
            k = ref_removed(f, n)
            for test, removed in (("positive", order[:k]), ("negative", order[n - k:])):
                x = images[i].copy().reshape(c, n)
                x[:, removed] = 0
                p = probs(x.reshape(c, h, w))
                cls = int(np.argmax(p))
                curves[f"{test}_predicted"][j] += cls == pred
                if labels is not None:
                    curves[f"{test}_target"][j] += cls == labels[i]
                if test == "positive":
                    d_aopc.append(p0 - p[pred])
                    d_lodds.append(np.log(max(p[pred], 1e-12) / max(p0, 1e-12)))
        aopc.append(np.mean(d_aopc))
        lodds.append(np.mean(d_lodds))
    out = {"aopc": float(np.mean(aopc)), "lodds": float(np.mean(lodds)), "curves": {}}
    for v in ("predicted", "target") if labels is not None else ("predicted",):
        for test in ("positive", "negative"):
            acc = curves[f"{test}_{v}"] / n_img
            out["curves"][f"{test}_{v}"] = acc.tolist()
            s = sum((acc[j] + acc[j + 1]) / 2 * 0.1 for j in range(len(acc) - 1))  # trapezoid, dx = 0.1
            out[f"{test[:3]}_auc_{v}"] = s
    return out


def assert_close_dicts(a, b, tol=1e-9):
    assert set(a) == set(b), (set(a), set(b))
    for k in a:
        if isinstance(a[k], dict):
            assert_close_dicts(a[k], b[k], tol)
        else:
            np.testing.assert_allclose(np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64), rtol=0, atol=tol, err_msg=k)


def half_plane_masks(n_patch=4, patch=8):
    """Masks aligned to the patch grid.

    Half planes: the upsampled map is ≥ 0.5625 on foreground pixels and ≤ 0.4375 on
    background ones, and its mean is 0.5, so ``e > mean(e)`` is exact. (For e.g. a
    3/4 foreground the mean moves above the blurred boundary values: not perfect.)
    """
    size = n_patch * patch
    pm = torch.zeros(4, n_patch, n_patch)
    pm[0, :, : n_patch // 2] = 1  # left
    pm[1, : n_patch // 2] = 1  # top
    pm[2, :, n_patch // 2:] = 1  # right
    pm[3, n_patch // 2:] = 1  # bottom
    masks = pm.repeat_interleave(patch, 1).repeat_interleave(patch, 2).bool()
    assert masks.shape == (4, size, size)
    return pm, masks


# --------------------------------------------------------------------------- segmentation
def seg_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(10, 5, 6, generator=g)
    maps[3] = torch.randint(0, 3, (5, 6), generator=g).float()  # many ties
    maps[4] = 0.7  # constant map
    masks = torch.rand(10, 20, 24, generator=g) > 0.6
    masks[2] = False  # no foreground
    masks[5] = True  # no background
    masks[6, :, :10] = True
    return maps, masks


def test_average_precision_matches_sklearn_reference():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (7, 50), generator=g).float() / 5  # ties
    scores[0] = torch.rand(50, generator=g)
    y = torch.rand(7, 50, generator=g) > 0.5
    ap = average_precision(scores, y)
    for i in range(7):
        assert abs(float(ap[i]) - ref_ap(scores[i].numpy(), y[i].numpy())) < 1e-6
    assert torch.isnan(average_precision(scores[:1], torch.zeros(1, 50, dtype=torch.bool))).all()


def test_segmentation_matches_reference_and_streams():
    maps, masks = seg_data()
    ref = ref_segmentation(maps.numpy(), masks.numpy())
    whole = SegmentationMetric()
    whole.update(maps, masks)
    assert_close_dicts(whole.compute(), ref, tol=1e-9)

    stream = SegmentationMetric()
    for sl in (slice(0, 3), slice(3, 4), slice(4, 10)):
        stream.update(maps[sl], masks[sl].to(torch.uint8))
    assert_close_dicts(stream.compute(), whole.compute(), tol=1e-12)


def test_segmentation_mixed_sizes_matches_reference():
    maps, masks = seg_data(2)
    g = torch.Generator().manual_seed(3)
    maps2 = torch.rand(3, 4, 4, generator=g)
    masks2 = torch.rand(3, 16, 12, generator=g) > 0.3
    metric = SegmentationMetric()
    metric.update(maps, masks)
    metric.update(maps2, masks2[:, None])  # (B, 1, H, W) accepted
    ref = ref_segmentation(list(maps.numpy()) + list(maps2.numpy()), list(masks.numpy()) + list(masks2.numpy()))
    assert_close_dicts(metric.compute(), ref, tol=1e-9)


def test_segmentation_perfect_inverted_constant():
    pm, masks = half_plane_masks()
    perfect = SegmentationMetric()
    perfect.update(pm, masks)
    r = perfect.compute()
    assert r["pixel_accuracy"] == 1.0 and r["miou"] == 1.0 and r["map"] == pytest.approx(1.0, abs=1e-12)

    inverted = SegmentationMetric()
    inverted.update(1 - pm, masks)
    r = inverted.compute()
    assert r["pixel_accuracy"] == 0.0 and r["miou"] == 0.0

    const = SegmentationMetric()
    const.update(torch.full_like(pm, 3.0), masks)
    r = const.compute()
    fg = masks.float().mean().item()
    assert r["pixel_accuracy"] == pytest.approx(1 - fg)
    assert r["iou_foreground"] == 0.0 and r["iou_background"] == pytest.approx(1 - fg)
    # all scores tied: AP = prevalence of each class; per image (p + (1 − p)) / 2 = 0.5
    assert r["map"] == pytest.approx(0.5, abs=1e-12)

    empty = SegmentationMetric()  # no foreground: the foreground class is skipped for the AP
    empty.update(torch.zeros(1, 4, 4), torch.zeros(1, 32, 32, dtype=torch.bool))
    r = empty.compute()
    assert r["pixel_accuracy"] == 1.0 and r["map"] == 1.0 and r["iou_background"] == 1.0
    assert math.isnan(r["iou_foreground"])


def test_segmentation_state_dict_roundtrip():
    maps, masks = seg_data(4)
    a = SegmentationMetric()
    a.update(maps[:6], masks[:6])
    b = SegmentationMetric()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.compute() == a.compute()
    a.update(maps[6:], masks[6:])
    b.update(maps[6:], masks[6:])
    assert b.compute() == a.compute()


# --------------------------------------------------------------------------- perturbation
class LinearClassifier(torch.nn.Module):
    def __init__(self, c, h, w, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(k, c * h * w, generator=g) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(k, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.t() + self.bias


def normalize(x):
    return (x - 0.5) / 0.25


def pert_data(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 12, 10, generator=g)
    maps = torch.rand(n, 3, 5, generator=g)
    maps[1] = torch.randint(0, 2, (3, 5), generator=g).float()  # ties
    maps[2] = 1.0  # all tied
    labels = torch.randint(0, 5, (n,), generator=g)
    return images, maps, labels


def test_num_removed_rounding():
    assert [num_removed(f, 5) for f in FRACTIONS] == [ref_removed(f, 5) for f in FRACTIONS] == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert [num_removed(f, 120) for f in FRACTIONS] == [12, 24, 36, 48, 60, 72, 84, 96, 108]
    assert num_removed(0.1, 1024) == 102 and num_removed(0.3, 1024) == 307


def test_perturbation_matches_reference_and_streams():
    images, maps, labels = pert_data()
    clf = LinearClassifier(3, 12, 10, 5)
    ref = ref_perturbation(clf, normalize, images.numpy(), maps.numpy(), labels.numpy())
    whole = PerturbationMetric(clf, normalize)
    whole.update(images, maps, labels)
    got = whole.compute()
    assert_close_dicts(got, ref, tol=1e-6)
    assert got["curves"]["positive_predicted"][0] == 1.0
    # the reference must not be trivial
    assert min(got["curves"]["positive_predicted"]) < 1.0

    stream = PerturbationMetric(clf, normalize)
    stream.update(images[:3], maps[:3], labels[:3])
    stream.update(images[3:], maps[3:], labels[3:])
    assert_close_dicts(stream.compute(), got, tol=1e-9)


def test_perturbation_without_labels():
    images, maps, _ = pert_data(1, n=4)
    clf = LinearClassifier(3, 12, 10, 5, seed=1)
    metric = PerturbationMetric(clf, normalize, fractions=[0.25, 0.5])
    metric.update(images, maps)
    got = metric.compute()
    assert set(got) == {"pos_auc_predicted", "neg_auc_predicted", "aopc", "lodds", "curves"}
    assert set(got["curves"]) == {"positive_predicted", "negative_predicted"}
    ref = ref_perturbation(clf, normalize, images.numpy(), maps.numpy(), None, fractions=[0.25, 0.5])
    assert_close_dicts(got["curves"], ref["curves"], tol=1e-12)
    assert_close_dicts({"aopc": got["aopc"], "lodds": got["lodds"]}, {"aopc": ref["aopc"], "lodds": ref["lodds"]}, tol=1e-6)
    acc = got["curves"]["positive_predicted"]
    assert got["pos_auc_predicted"] == pytest.approx((acc[0] + acc[1]) / 2 * 0.25 + (acc[1] + acc[2]) / 2 * 0.25)


def quadrant_classifier(x):
    """Class 1 iff the top-left quadrant's mean intensity is above 1/2 (x is [0, 1], normalize = identity)."""
    h, w = x.shape[-2:]
    q = x[:, :, : h // 2, : w // 2].mean(dim=(1, 2, 3))
    return torch.stack([torch.zeros_like(q), 10 * (q - 0.5)], dim=1)


@pytest.mark.parametrize("patch_map", [False, True])
def test_perturbation_quadrant_toy(patch_map):
    # 20 x 20 image of ones, quadrant = 100 of 400 pixels (a quarter)
    images = torch.ones(2, 3, 20, 20)
    if patch_map:  # 2 x 2 patch map: bilinear upsampling still ranks the quadrant first
        maps = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(2, 2, 2)
    else:
        maps = torch.zeros(2, 20, 20)
        maps[:, :10, :10] = 1.0
    metric = PerturbationMetric(quadrant_classifier, lambda x: x)
    metric.update(images, maps, torch.tensor([1, 0]))
    r = metric.compute()
    # positive: f = 0.1 removes 40 quadrant pixels (q = 0.6, kept), f = 0.2 removes 80 (q = 0.2, lost)
    assert r["curves"]["positive_predicted"] == [1.0, 1.0] + [0.0] * 8
    # negative: the 300 other pixels go first; f = 0.8 removes 20 quadrant pixels (q = 0.8), f = 0.9 removes 60
    assert r["curves"]["negative_predicted"] == [1.0] * 9 + [0.0]
    assert r["curves"]["positive_target"] == [0.5, 0.5] + [0.5] * 8
    assert r["curves"]["negative_target"] == [0.5] * 9 + [0.5]
    assert r["pos_auc_predicted"] == pytest.approx(0.1 + 0.05)
    assert r["neg_auc_predicted"] == pytest.approx(0.8 + 0.05)
    assert r["pos_auc_target"] == pytest.approx(0.45)


def test_aopc_lodds_analytic():
    # logits [0, s·mean(x)]: p(class 1) = σ(s·a·(1 − f)) on an image of constant a with a fraction f zeroed
    s = 3.0
    amps = [1.0, 0.5]
    images = torch.stack([torch.full((1, 10, 10), a) for a in amps])
    maps = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(0))

    def clf(x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), s * m], dim=1).double()

    metric = PerturbationMetric(clf, lambda x: x)
    metric.update(images, maps)
    r = metric.compute()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    aopc = np.mean([np.mean([sig(s * a) - sig(s * a * (1 - f)) for f in FRACTIONS]) for a in amps])
    lodds = np.mean([np.mean([math.log(sig(s * a * (1 - f)) / sig(s * a)) for f in FRACTIONS]) for a in amps])
    assert r["aopc"] == pytest.approx(aopc, rel=1e-6)
    assert r["lodds"] == pytest.approx(lodds, rel=1e-6)
    assert r["curves"]["positive_predicted"] == [1.0] * 10


def test_perturbation_state_dict_roundtrip():
    images, maps, labels = pert_data(5)
    clf = LinearClassifier(3, 12, 10, 5, seed=2)
    a = PerturbationMetric(clf, normalize)
    a.update(images[:4], maps[:4], labels[:4])
    b = PerturbationMetric(clf, normalize)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.compute() == a.compute()
    a.update(images[4:], maps[4:], labels[4:])
    b.update(images[4:], maps[4:], labels[4:])
    assert b.compute() == a.compute()
    with pytest.raises(ValueError):
        PerturbationMetric(clf, normalize, fractions=[0.5]).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- batched perturbation
class Counting(torch.nn.Module):
    """The model, counting forward passes and the images in each."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.passes = []

    def forward(self, x):
        self.passes.append(x.shape[0])
        return self.model(x)


@pytest.fixture(scope="module")
def shipped_batch():
    """The shipped synthetic model, its preprocessing, 6 test images and their TokenTM maps."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = create_synthetic_vit(pretrained=True).eval()
    pre = Preprocess(model_data_config(model))
    b = collate([EvalDataset(SyntheticSource("test", size=6), pre)[i] for i in range(6)])
    maps = Explainer(model, method="tokentm")(b["images"])
    yield model, pre, b, maps
    torch.set_num_threads(n)


@pytest.mark.parametrize("budget, passes", [(None, [6] * 19), (6 * 19, [114]), (16, [16] * 7 + [2])])
def test_batched_equals_per_fraction(shipped_batch, budget, passes):
    model, pre, b, maps = shipped_batch
    per_fraction = PerturbationMetric(Counting(model), pre.normalize)
    per_fraction.update(b["images01"], maps, b["labels"])
    counting = Counting(model)
    batched = PerturbationMetric(counting, pre.normalize, max_forward_batch=budget)
    batched.update(b["images01"], maps, b["labels"])
    assert counting.passes == passes  # clean + 9 fractions x (positive, negative), packed into the budget
    assert batched.state_dict() == per_fraction.state_dict()  # the same counts and (exact) sums
    got = batched.compute()
    assert got == per_fraction.compute()
    # not vacuous: the perturbations change predictions and probabilities
    assert min(got["curves"]["positive_predicted"]) < 1.0 and got["aopc"] > 0.1


def test_forward_passes_run_in_the_model_dtype(shipped_batch):
    model, pre, b, maps = shipped_batch
    half = Counting(create_synthetic_vit(pretrained=True).eval().to(torch.bfloat16))
    seen = []
    half.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    metric = PerturbationMetric(half, pre.normalize, max_forward_batch=64)
    metric.update(b["images01"], maps, b["labels"])
    assert seen and set(seen) == {torch.bfloat16} and half.passes == [64, 50]
    f32 = PerturbationMetric(model, pre.normalize)
    f32.update(b["images01"], maps, b["labels"])
    # bfloat16 is close to float32 on this model (a few flips at most), not equal by construction
    assert abs(metric.compute()["pos_auc_predicted"] - f32.compute()["pos_auc_predicted"]) < 0.2


def test_max_forward_batch_is_checked(shipped_batch):
    model, pre, _, _ = shipped_batch
    with pytest.raises(ValueError, match="max_forward_batch must be >= 1"):
        PerturbationMetric(model, pre.normalize, max_forward_batch=0)


# --------------------------------------------------------------------------- sanity
def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=g).float()  # ties
    b = torch.randn(6, 40, generator=g)
    b[1] = a[1] * 2 + 1
    b[2] = torch.randint(0, 3, (40,), generator=g).float()
    got = spearman(a, b)
    for i in range(6):
        assert float(got[i]) == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-12)
    assert float(got[1]) == pytest.approx(1.0)
    c = torch.randn(3, 4, 5, generator=g)  # maps are flattened
    assert torch.allclose(spearman(c, -c), torch.full((3,), -1.0, dtype=torch.float64))
    assert torch.isnan(spearman(torch.ones(1, 10), torch.randn(1, 10))).all()


def grad_explain(model, images):
    """|input gradient| of the top logit, summed over channels, averaged per 8 x 8 patch: (B, 4, 4)."""
    x = images.clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    return F.avg_pool2d(x.grad.abs().sum(1, keepdim=True), 8)[:, 0]


def test_model_randomization_check_tiny_vit(make_model):
    model = make_model("timm_tiny", num_classes=4, embed_dim=48, num_heads=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = model_randomization_check(model, images, grad_explain, seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert [r["randomized_blocks"] for r in res] == [1, 2, 2]
    assert [r["embeddings"] for r in res] == [False, False, True]
    rhos = [r["spearman"] for r in res]
    assert all(-1.0 <= v <= 1.0 for v in rhos)
    assert rhos[-1] < 0.99  # the maps change once the model is randomized

    # streaming wrapper: the per-image mean over two batches (also shows the re-initialization is seeded:
    # the copies built in each call are identical)
    metric = SanityMetric(model, grad_explain, seed=0)
    metric.update(images[:2])
    metric.update(images[2:])
    r1 = model_randomization_check(model, images[:2], grad_explain, seed=0)
    r2 = model_randomization_check(model, images[2:], grad_explain, seed=0)
    stages = metric.compute()["stages"]
    assert len(stages) == 3
    for s, a, b in zip(stages, r1, r2):
        assert s["spearman"] == pytest.approx((a["spearman"] + b["spearman"]) / 2, abs=1e-12)
    restored = SanityMetric(model, grad_explain, seed=0)
    restored.load_state_dict(json.loads(json.dumps(metric.state_dict())))
    assert restored.compute() == metric.compute()


# --------------------------------------------------------------------------- exact, mergeable states
def test_exact_sum_is_order_independent_and_correctly_rounded():
    from fractions import Fraction

    from tokentm_fast.metrics import ExactSum

    g = torch.Generator().manual_seed(0)
    vals = (torch.randn(200, generator=g, dtype=torch.float64) * torch.logspace(-12, 12, 200, dtype=torch.float64)).tolist()
    vals += [1e16, 1.0, -1e16, 5e-324]  # cancellation and a subnormal: naive float sums get these wrong
    exact = sum(Fraction(v) for v in vals)
    fwd, rev = ExactSum().add(vals), ExactSum().add(vals[::-1])
    a, b = ExactSum().add(vals[:77]), ExactSum().add(torch.tensor(vals[77:], dtype=torch.float64))
    merged = ExactSum.from_state(json.loads(json.dumps(a.to_state()))).merge(b)
    assert fwd == rev == merged
    assert fwd.value == float(exact) and merged.mean(7) == float(exact / 7)
    assert sum(vals) != float(exact)  # the naive float sum is wrong on these values
    with pytest.raises(ValueError, match="non-finite"):
        ExactSum().add(float("nan"))


def test_states_of_shards_merge_exactly():
    """Two shards of the same batches, merged in either order == one pass (state dicts equal)."""
    images, maps, labels = pert_data(7, n=10)
    clf = LinearClassifier(3, 12, 10, 5, seed=3)
    whole = PerturbationMetric(clf, normalize)
    shard_a, shard_b = PerturbationMetric(clf, normalize), PerturbationMetric(clf, normalize)
    for s, shard in zip((slice(0, 4), slice(4, 10)), (shard_a, shard_b)):
        whole.update(images[s], maps[s], labels[s])
        shard.update(images[s], maps[s], labels[s])
    for first, second in ((shard_a, shard_b), (shard_b, shard_a)):
        merged = PerturbationMetric(clf, normalize)
        merged.merge_state_dict(json.loads(json.dumps(first.state_dict())))
        merged.merge_state_dict(second.state_dict())
        assert merged.state_dict() == whole.state_dict()
        assert merged.compute() == whole.compute()
    assert whole.compute()["aopc"] != 0 and min(whole.compute()["curves"]["positive_predicted"]) < 1

    smaps, masks = seg_data(3)
    seg_whole, seg_a, seg_b = SegmentationMetric(), SegmentationMetric(), SegmentationMetric()
    for s, shard in ((slice(0, 5), seg_a), (slice(5, None), seg_b)):
        seg_whole.update(smaps[s], masks[s])
        shard.update(smaps[s], masks[s])
    seg_b.merge_state_dict(seg_a.state_dict())
    assert seg_b.state_dict() == seg_whole.state_dict() and 0 < seg_whole.compute()["map"] < 1
