"""Test configuration shared by every test module.

The device the suite runs on comes from one place: ``--device cpu|cuda`` on the
pytest command line, or the environment variable ``TOKENTM_TEST_DEVICE``
(default ``cpu``). On ``cpu`` the Triton kernels run under Triton's interpreter,
which must be switched on before triton is imported anywhere: ``pytest_configure``
runs before any test module is collected, and nothing imported here imports triton.
On ``cuda`` the kernels run on the GPU and float32 products use full float32
(TF32 switched off), so that float32 tolerances mean what they say.

Tests ask for the ``device`` fixture; module-level code (parametrisation, skip
marks) reads ``os.environ["TOKENTM_TEST_DEVICE"]``, which holds the same name.
"""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. From the repository root that makes the
# repository's kernels/ folder importable as a top-level `kernels`, which shadows the `kernels`
# distribution that transformers imports (Hugging Face's hub kernels): every HF model would then fail
# to build. The package is tested as installed (tokentm_fast.kernels), so the root is taken off the path.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE_ENV = "TOKENTM_TEST_DEVICE"
DEVICES = ("cpu", "cuda")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_addoption(parser):
    parser.addoption("--device", choices=DEVICES, default=None,
                     help=f"device of the test suite (default: ${DEVICE_ENV} or cpu); "
                          f"cpu runs the Triton kernels under TRITON_INTERPRET=1")


def choose_device(option, environ) -> str:
    """The suite's device from the ``--device`` option or the environment; refuses unknown names."""
    name = option or environ.get(DEVICE_ENV) or "cpu"
    if name not in DEVICES:
        raise pytest.UsageError(f"{DEVICE_ENV}={name!r}: expected one of {DEVICES}")
    return name


def configure_device(name: str, environ, cuda_available: bool) -> None:
    """Set up the process for ``name``: the interpreter on the CPU, TF32 off on CUDA."""
    if name == "cuda":
        if not cuda_available:
            raise pytest.UsageError("--device cuda (or TOKENTM_TEST_DEVICE=cuda) but torch sees no CUDA device")
        if environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError("--device cuda runs the Triton kernels on the GPU: unset TRITON_INTERPRET")
    else:
        environ.setdefault("TRITON_INTERPRET", "1")
    environ[DEVICE_ENV] = name


def pytest_configure(config):
    configure_device(choose_device(config.getoption("--device"), os.environ), os.environ,
                     torch.cuda.is_available())
    if os.environ[DEVICE_ENV] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def suite_device() -> torch.device:
    """The device every test runs on. Module-level code (parametrisation, skip marks) reads
    ``torch.device(os.environ["TOKENTM_TEST_DEVICE"])``, which ``pytest_configure`` has set;
    tests take the ``device`` fixture."""
    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return suite_device()


# ------------------------------------------------------------------------------------------------------
# small random-init models and images (tests/model_families.py holds the factories and the tables)
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def make_model():
    """``make_model(family, **kw)``: a fresh random-init model, the same weights for the same arguments.

    ``family`` is a key of ``model_families.MODELS``: one of ``model_families.FAMILIES`` (the 48-wide,
    2-block model of every supported family), ``"timm_tiny"`` (timm's ``vit_tiny`` on 32x32 images,
    8x8 patches, 2 blocks), ``"timm_model"`` (any timm model by ``name=``), ``"timm_narrow"`` (timm's
    ``VisionTransformer`` class, 32 wide, 2 heads) or ``"timm_clip"`` (a timm ViT computing what a CLIP
    image tower computes). Session-scoped: module fixtures may use it."""
    import model_families

    return model_families.make_model


@pytest.fixture(scope="session")
def make_images():
    """``make_images(batch=2, seed=1, size=32)``: ``(batch, 3, H, W)`` standard normal images from a
    generator seeded ``seed``; ``size`` is H = W or ``(H, W)``."""
    import model_families

    return model_families.images


@pytest.fixture
def images(make_images) -> torch.Tensor:
    """Two 3x32x32 images (``make_images()``), fresh for every test (a test may write into them)."""
    return make_images()


@pytest.fixture(autouse=True)
def _full_float32_on_cuda():
    """A test that switches TF32 on for itself does not leak it into the next one."""
    yield
    if suite_device().type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------------------
# the command line's tests (tests/test_cli*.py): one way to run `tokentm-fast` in the test's process
# ------------------------------------------------------------------------------------------------------

@pytest.fixture
def run_main(capsys):
    """``run_main(argv) -> (exit code, stdout, stderr)``: ``tokentm_fast.cli.main`` on ``argv`` (each item
    ``str()``-ed), its output captured by ``capsys``. Torch's thread count, which ``--threads`` sets for the
    process, is restored when the test ends."""
    from tokentm_fast.cli import main

    threads = torch.get_num_threads()

    def run(argv):
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops (faster, and immune to oversubscription on a busy CPU);
    the previous count afterwards. Modules ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
