"""The batched perturbation test (``max_forward_batch``) equals the per-fraction one on the shipped model."""
import pytest
import torch

from tokentm_fast import Explainer
from tokentm_fast.evaluation import EvalDataset, Preprocess, SyntheticSource, collate, model_data_config
from tokentm_fast.metrics import PerturbationMetric
from tokentm_fast.synthetic import create_synthetic_vit


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
def batch():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = create_synthetic_vit(pretrained=True).eval()
    pre = Preprocess(model_data_config(model))
    b = collate([EvalDataset(SyntheticSource("test", size=6), pre)[i] for i in range(6)])
    maps = Explainer(model, method="tokentm")(b["images"])
    yield model, pre, b, maps
    torch.set_num_threads(n)


@pytest.mark.parametrize("budget, passes", [(None, [6] * 19), (6 * 19, [114]), (16, [16] * 7 + [2])])
def test_batched_equals_per_fraction(batch, budget, passes):
    model, pre, b, maps = batch
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


def test_forward_passes_run_in_the_model_dtype(batch):
    model, pre, b, maps = batch
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


def test_max_forward_batch_is_checked(batch):
    model, pre, _, _ = batch
    with pytest.raises(ValueError, match="max_forward_batch must be >= 1"):
        PerturbationMetric(model, pre.normalize, max_forward_batch=0)
