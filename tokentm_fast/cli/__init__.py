"""Command line: ``tokentm-fast`` (or ``python -m tokentm_fast``).

Subcommands::

    tokentm-fast explain IMAGE [IMAGE ...] --model synthetic --methods tokentm,legrad --out DIR
    tokentm-fast evaluate --data synthetic|folder:PATH|mat:PATH --model NAME --checkpoint FILE ...
    tokentm-fast bench --model vit_base_patch16_224 --batch 8 --backends torch,triton --device cuda
    tokentm-fast demo [--num-images 64] [--out demo_out]

Method options: ``--option [METHOD.]NAME=VALUE`` (repeatable, every subcommand
that explains), listed in ``--help`` from the method registry and checked by
the Python API's own validator (``Explainer``): a wrong one stops the command
with the API's message, exit code 2.

Errors in what the user gave (missing checkpoint, unknown model, a bad option...)
print one line ``tokentm-fast: error: …`` on stderr and exit with code 2 (set
``TOKENTM_FAST_DEBUG=1`` to see the traceback). ``explain`` skips an IMAGE it
cannot read, names it with the reason, explains the others and exits with
code 1 (:data:`EXIT_SKIPPED`); 2 when no IMAGE can be read. ``evaluate`` does
not replace an existing results JSON without ``--overwrite`` (an interrupted
run still resumes). Under
``torchrun`` an error that every process meets alike (an argument, a missing
device, a corrupt checkpoint) is printed by rank 0 alone; the other ranks exit
with the same code without a word.

Every file is written through :mod:`tokentm_fast.evaluation.outputs`: a
symbolic link at an output path is refused (naming the file and the option),
files are written to a temporary file in the same folder and renamed over the
target, and a failed write (a full disk) names the file and leaves the last
good state in place. The output locations are checked there too, before any
work; the results table is rendered by :mod:`tokentm_fast.evaluation.report`
and ``bench`` times with :mod:`tokentm_fast.cli.timing`. This module holds the
parser and the subcommands.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

PROG = "tokentm-fast"
EXIT_USAGE = 2
#: ``explain``: some IMAGE files could not be read (each named on stderr); the others were written
EXIT_SKIPPED = 1


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------
# argument helpers
# ----------------------------------------------------------------------------

def _methods(value: str) -> List[str]:
    from ..methods import METHODS

    if value.strip() == "all":
        return list(METHODS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or repr(value)}; choose from {', '.join(METHODS)} (or 'all')"
        )
    return names


def _metrics(value: str) -> List[str]:
    from ..evaluation.runner import METRICS

    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in METRICS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(bad) or repr(value)}; choose from {', '.join(METRICS)}")
    return names


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def _nonneg_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return v


def _model_kwargs(value: str) -> Dict[str, Any]:
    """``"img_size=32,patch_size=8,depth=2"`` -> dict (values parsed as Python literals)."""
    out: Dict[str, Any] = {}
    for part in [p.strip() for p in value.split(",") if p.strip()]:
        key, sep, raw = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {part!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


# ---------------------------------------------------------------------------- method options (--option)

#: One ``--option``: (method or None for every method that takes the name, name, value, the text given).
MethodOption = Tuple[Optional[str], str, Any, str]


def _option_value(raw: str) -> Any:
    """``VALUE`` of ``--option``: a Python literal, ``true`` / ``false`` (any case), ``@FILE.npy`` (a float32
    tensor), else the word itself."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.startswith("@"):
        import numpy as np
        import torch

        try:
            return torch.from_numpy(np.asarray(np.load(raw[1:], allow_pickle=False), dtype=np.float32))
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"cannot read the array {raw[1:]!r} (a .npy file): {e}") from None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _method_option(value: str) -> MethodOption:
    """``[METHOD.]NAME=VALUE`` -> (METHOD or None, NAME, parsed VALUE, the text)."""
    from ..methods import METHODS

    key, sep, raw = value.partition("=")
    method, dot, name = key.strip().rpartition(".")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected [METHOD.]NAME=VALUE, e.g. start_layer=2 or legrad.start_layer=-3, "
                                         f"got {value!r}")
    if dot and method not in METHODS:
        raise argparse.ArgumentTypeError(f"{value!r}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return (method or None), name, _option_value(raw.strip()), value


def _accepted_options(method: str) -> List[str]:
    """The option names ``method`` takes, from its registry entry (``MethodSpec``)."""
    from ..methods import REGISTRY
    from ..methods.options import LAYER_OPTIONS

    spec = REGISTRY[method]
    return list(spec.defaults) + (list(LAYER_OPTIONS) if spec.layer_choice else [])


def _takers(name: str, methods: Sequence[str]) -> List[str]:
    return [m for m in methods if name in _accepted_options(m)]


def method_options(methods: Sequence[str], given: Optional[Sequence[MethodOption]]) -> Dict[str, Dict[str, Any]]:
    """The ``--option`` values as per-method options for the API (``explain(..., **options[method])``).

    ``NAME=VALUE`` goes to every method of ``methods`` that takes NAME; if none does, to all of them (the
    API's validator then refuses it, naming the method and its valid options). ``METHOD.NAME=VALUE`` goes
    to METHOD alone and wins over ``NAME=VALUE``; METHOD must be one of ``methods``. Later wins over earlier.
    The values are checked by the API's validator (``Explainer``), not here.
    """
    out: Dict[str, Dict[str, Any]] = {m: {} for m in methods}
    for method, name, value, _ in sorted(given or (), key=lambda o: o[0] is not None):  # stable: bare first
        if method is None:
            for m in _takers(name, methods) or methods:
                out[m][name] = value
        elif method not in methods:
            raise CLIError(f"--option {method}.{name}: {method} is not among --methods ({', '.join(methods)})")
        else:
            out[method][name] = value
    return {m: o for m, o in out.items() if o}


def _explainers(model, methods: Sequence[str], backend: str, options: Mapping[str, Mapping[str, Any]],
                given: Optional[Sequence[MethodOption]] = None) -> Dict[str, Any]:
    """One ``Explainer`` per method: the API's own check of the options (an error is a ``CLIError``
    with the API's message, and which methods take an option nobody of ``methods`` takes)."""
    from ..api import Explainer
    from ..methods import METHODS

    explainers = {}
    for m in methods:
        try:
            explainers[m] = Explainer(model, method=m, backend=backend, **options.get(m, {}))
        except (ValueError, TypeError) as e:
            hints = []
            for method, name, _, text in given or ():
                if method is None and not _takers(name, methods):
                    who = _takers(name, METHODS)
                    hints.append(f"--option {text}: no method of --methods takes {name}"
                                 + (f" ({', '.join(who)} do)" if who else ""))
            raise CLIError(f"{e}" + (f" [{'; '.join(hints)}]" if hints else " (--option)")) from None
    return explainers


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def options_table(width: int = 92) -> str:
    """Every method's options with their defaults and allowed values, from the method registry."""
    from ..methods import REGISTRY
    from ..methods.options import LAYER_OPTIONS

    lines: List[str] = []
    without: List[str] = []
    for name, spec in REGISTRY.items():
        accepted = _accepted_options(name)
        if not accepted:
            without.append(name)
            continue
        parts = []
        for opt in accepted:
            if opt in LAYER_OPTIONS and opt not in spec.defaults:
                parts.append(opt)  # no default: unset
                continue
            text = f"{opt}={_shown(spec.defaults[opt])}"
            if opt in spec.choices:
                text += " {" + "|".join(_shown(c) for c in spec.choices[opt]) + "}"
            parts.append(text)
        lines.append(textwrap.fill(f"{name}: " + ", ".join(parts), width, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    if without:
        lines.append(textwrap.fill(f"{', '.join(without)}: no options", width, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def _add_option_arg(p) -> None:
    p.add_argument("--option", action="append", type=_method_option, default=None, metavar="[METHOD.]NAME=VALUE",
                   help="a method option, repeatable (the options and their defaults are listed below): NAME=VALUE "
                        "sets NAME for every method of --methods that takes it, METHOD.NAME=VALUE for METHOD alone "
                        "(it wins over NAME=VALUE). VALUE: a Python literal (-2, 0.5, True, [9,10,11]), true/false, "
                        "@FILE.npy (an array, e.g. legrad's neutral_prompt) or a word (mean). Checked by the Python "
                        "API's validator, as explain(model, images, method, NAME=VALUE): a name the method does "
                        "not take or a bad value stops the command with the API's message (exit code 2)")


def _options_epilog() -> str:
    return ("method options (--option NAME=VALUE), with their defaults; end_layer (exclusive) or layers=[...] "
            "choose the blocks instead of start_layer..last (docs/methods.md, \"Layer choice\"):\n\n"
            + options_table())


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a paragraph of a description or epilog whose lines are indented
    is printed as it is (the options table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            if para.startswith(" "):
                out.append("\n".join(indent + line for line in para.splitlines()))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def _add_model_args(p: argparse.ArgumentParser, default_model: Optional[str] = "synthetic") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help="'synthetic' (the shipped synthetic-benchmark ViT) or a timm model name, "
                        "e.g. vit_base_patch16_224 (default: %(default)s)")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="local weights (.safetensors, or a torch .pth/.pt state dict); required for a timm "
                        "model (nothing is downloaded); for 'synthetic' replaces the shipped weights")
    g.add_argument("--num-classes", type=_positive_int, metavar="K",
                   help="classes of the timm model (default: rows of the checkpoint's head.weight)")
    g.add_argument("--model-kwargs", type=_model_kwargs, default=None, metavar="K=V,...",
                   help="extra timm.create_model arguments, e.g. img_size=32,patch_size=8,depth=2")


def _add_run_args(p: argparse.ArgumentParser, default_threads: Optional[int] = None) -> None:
    from ..api import BACKENDS

    g = p.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="explanation backend (default: %(default)s: Triton on CUDA, else PyTorch)")
    if default_threads is None:
        g.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch CPU threads (default: torch's choice; 1 is often fastest for small models "
                            "or on a busy machine)")
    else:
        g.add_argument("--threads", type=_positive_int, default=default_threads, metavar="N",
                       help="torch CPU threads (default: %(default)s: the synthetic model is tiny, more threads "
                            "gain little and cost a lot on a busy CPU)")


def _add_resize_arg(p) -> None:
    p.add_argument("--resize", action="store_true",
                   help="resize the whole image to the model's input size (the aspect ratio is not kept) instead "
                        "of the default: timm's evaluation transform, a resize and a centre crop that cuts off "
                        "the borders of a non-square image")


class _Parser(argparse.ArgumentParser):
    """Under ``torchrun`` only rank 0 prints a usage error (every rank has the same arguments)."""

    def error(self, message: str):  # type: ignore[override]
        if _quiet_rank():
            _wait_for_rank0()
            self.exit(EXIT_USAGE)
        super().error(message)


#: How the images reach the model (issue 26, item 5): said in the help of explain and evaluate.
_INPUTS_HELP = (
    "Images are read as 8-bit RGB: a picture with transparency (RGBA, LA, a transparent palette) is "
    "composited over white, as image viewers show it (the colours stored under transparent pixels are not "
    "used; a warning says so); grayscale is repeated to three channels; 16-bit pictures are scaled by "
    "their range. They are then resized and cropped (or, with "
    "--resize, resized) to the model's input size, scaled to [0, 1], normalised with the model's mean and std "
    "(timm's data config) and cast to the model's dtype. The model is put in eval mode (dropout and drop-path "
    "off) and explained in the dtype of its weights: float32 as loaded, or --dtype where the "
    "command has it; the maps are float32."
)

#: The exit status of ``explain`` (its help's epilog).
_EXPLAIN_EXIT_HELP = (
    f"exit status: 0 every image explained; {EXIT_SKIPPED} some IMAGE files could not be read (each is named on "
    f"stderr with the reason, the others were explained and written); {EXIT_USAGE} an error in the arguments or "
    "the inputs (no IMAGE readable, a bad --option, an unusable output location...); 130 interrupted."
)


def build_parser() -> argparse.ArgumentParser:
    from ..methods import METHODS
    from ..visualize import DEFAULT_ALPHA  # the pictures' own default (matplotlib is imported when drawing)

    parser = _Parser(
        prog=PROG, formatter_class=_HelpFormatter,
        description="Fast, faithful explanations for Vision Transformers: explain images, evaluate "
                    "explanation methods (segmentation, perturbation AUC, AOPC, LOdds, sanity), benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = _HelpFormatter

    # ---- explain
    p = sub.add_parser(
        "explain", help="explain images and write overlay PNGs and a grid", formatter_class=fmt,
        description="Explain IMAGE(s) with each method; writes one overlay PNG per image per method "
                    "(<image file name>_<method>.png, e.g. photo.jpg_tokentm.png) and a grid (rows = images, "
                    "columns = image + methods, with a colour bar) to --out. Every map is min-max normalised "
                    "on its own. Output locations are checked before the model runs.\n\n" + _INPUTS_HELP,
        epilog=_options_epilog() + "\n\n" + _EXPLAIN_EXIT_HELP,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (any format PIL reads); a file that cannot be read is skipped and named on "
                        "stderr, the others are explained (exit code 1 at the end)")
    _add_model_args(p)
    p.add_argument("--methods", type=_methods, default=list(METHODS), metavar="M1,M2,...",
                   help=f"comma-separated methods from {', '.join(METHODS)}, or 'all' (default: all)")
    p.add_argument("--out", default="explain_out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--target", type=_nonneg_int, default=None, metavar="CLASS",
                   help="class index to explain (default: the predicted class of each image)")
    p.add_argument("--cmap", default="inferno",
                   help="matplotlib colormap; perceptually uniform ones read best (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="opacity of the heat at the most relevant pixel, in [0, 1]; elsewhere it follows the "
                        "relevance (default: %(default)s)")
    p.add_argument("--grid-name", default="grid.png",
                   help="file name of the grid inside --out; the suffix picks the format, e.g. grid.pdf "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images explained at once (default: %(default)s)")
    _add_resize_arg(p)
    p.add_argument("--save-maps", metavar="FILE.npz",
                   help="also save the raw maps (float32, one (images, gh, gw) array per method, named by the "
                        "method) with the image names, sizes, classes and the method options (key 'info', JSON) "
                        "to this .npz file (numpy.load reads it)")
    _add_option_arg(p)
    _add_run_args(p)
    p.set_defaults(func=cmd_explain)

    # ---- evaluate
    p = sub.add_parser(
        "evaluate", help="evaluate methods with the segmentation / perturbation / sanity metrics",
        formatter_class=fmt,
        description="Run every method x every metric over a data set, save the results JSON (resumable: "
                    "an interrupted run continues where it stopped when started again with the same "
                    "arguments; an existing results JSON is not replaced without --overwrite) and print the "
                    "results table. Several processes: torchrun --nproc_per_node=N "
                    "-m tokentm_fast evaluate ... (gloo on cpu, nccl on cuda; each rank evaluates a shard, "
                    "rank 0 merges the results).\n\n" + _INPUTS_HELP,
        epilog=_options_epilog(),
    )
    _add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", metavar="SPEC",
                   help="'synthetic' (the shipped benchmark), 'folder:PATH' (ImageNet-style class folders) "
                        "or 'mat:PATH' (ImageNet-segmentation gtsegs_ijcv.mat) (default: %(default)s)")
    g.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="synthetic split (default: %(default)s)")
    g.add_argument("--size", type=_positive_int, default=1000, help="synthetic data set size (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="synthetic data seed (default: %(default)s)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N samples")
    g.add_argument("--workers", type=_nonneg_int, default=None, metavar="N",
                   help="DataLoader workers per process, decoding and preprocessing the images (default: the CPU "
                        "cores available to the process, divided among the processes of the machine)")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: %(default)s)")
    g.add_argument("--max-forward-batch", type=_positive_int, default=256, metavar="N",
                   help="most images per forward pass of the perturbation test: the clean batch and its 18 "
                        "perturbed copies go through the model in passes of this size (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="cast the model's weights to this dtype for the explanations and the forward passes; the "
                        "images are cast to it after normalisation, the maps are float32 (default: %(default)s; "
                        "bfloat16 for GPU runs)")
    _add_resize_arg(g)
    g = p.add_argument_group("evaluation")
    g.add_argument("--methods", type=_methods, default=list(METHODS), metavar="M1,M2,...",
                   help="comma-separated methods, or 'all' (default: all)")
    g.add_argument("--metrics", type=_metrics, default=["segmentation", "perturbation"], metavar="NAMES",
                   help="comma-separated from segmentation, perturbation, sanity (default: segmentation,perturbation)")
    g.add_argument("--target", choices=("predicted", "label"), default="predicted",
                   help="class to explain (default: %(default)s)")
    g.add_argument("--sanity-images", type=_positive_int, default=32, metavar="N",
                   help="images used by the (costly) sanity metric (default: %(default)s)")
    _add_option_arg(g)
    g = p.add_argument_group("output")
    g.add_argument("--output", default="results.json", metavar="FILE",
                   help="results JSON (default: %(default)s); while the run lasts it holds an exclusive lock on "
                        "FILE.lock: a second evaluate of the same FILE stops at once, naming the process. An "
                        "existing FILE is not replaced unless --overwrite is given (the partial state of an "
                        "interrupted run, FILE.partial, is resumed all the same)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output FILE (without it the command stops at once, exit code 2)")
    g.add_argument("--curves", metavar="PNG", help="also plot the perturbation curves to this PNG")
    g.add_argument("--restart", action="store_true",
                   help="discard a partial state left by an interrupted run instead of resuming it")
    g.add_argument("--save-every", type=_positive_int, default=1, metavar="K",
                   help="save the resumable partial state every K batches (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_run_args(p)
    p.set_defaults(func=cmd_evaluate)

    # ---- bench
    p = sub.add_parser(
        "bench", help="time explain per method and backend against a forward+backward", formatter_class=fmt,
        epilog=_options_epilog(),
        description="Time explain() per method and backend on a random-init timm model (or the shipped "
                    "synthetic model) and batch, against one forward+backward step with parameter gradients; "
                    "prints a plain table (median of --repeats calls after one warm-up call). "
                    "The benchmark suite with its tables lives in the repository's benchmarks/ folder.",
    )
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="timm model name (random init) or 'synthetic' (default: %(default)s)")
    p.add_argument("--model-kwargs", type=_model_kwargs, default=None, metavar="K=V,...",
                   help="extra timm.create_model arguments, e.g. img_size=384")
    p.add_argument("--batch", type=_positive_int, default=8, help="batch size (default: %(default)s)")
    p.add_argument("--methods", type=_methods, default=["tokentm"], metavar="M1,M2,...", help="methods (default: tokentm)")
    p.add_argument("--backends", default="reference,torch", metavar="B1,B2,...",
                   help="comma-separated backends among reference, torch, triton, auto (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model and image dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed calls per row (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads")
    _add_option_arg(p)
    p.set_defaults(func=cmd_bench)

    # ---- demo
    p = sub.add_parser(
        "demo", help="explain + evaluate every method on the shipped synthetic benchmark (about a minute on a CPU)",
        formatter_class=fmt, epilog=_options_epilog(),
        description="Load the shipped synthetic ViT (no network), explain a few synthetic test images with "
                    "every method (grid PNG), evaluate every method (segmentation, perturbation AUC, AOPC, "
                    "LOdds, sanity) on a synthetic test subset, print the table and plot the perturbation curves.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--num-images", type=_positive_int, default=64, metavar="N",
                   help="synthetic test images evaluated (default: %(default)s)")
    p.add_argument("--num-explain", type=_positive_int, default=6, metavar="N",
                   help="images shown in the grid (default: %(default)s)")
    p.add_argument("--sanity-images", type=_nonneg_int, default=16, metavar="N",
                   help="images for the sanity check, 0 to skip it (default: %(default)s)")
    p.add_argument("--methods", type=_methods, default=list(METHODS), metavar="M1,M2,...",
                   help="methods (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="synthetic-model weights (.safetensors) instead of the shipped ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_option_arg(p)
    _add_run_args(p, default_threads=1)
    p.set_defaults(func=cmd_demo)
    return parser


# ----------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------

def _setup_threads(args: argparse.Namespace) -> None:
    n = getattr(args, "threads", None)
    if n:
        import torch

        torch.set_num_threads(int(n))


def _device(name: str):
    from ..evaluation.runner import resolve_device

    return resolve_device(name)


def _load_model(args: argparse.Namespace):
    from ..evaluation.runner import load_model

    model, info = load_model(args.model, checkpoint=args.checkpoint, num_classes=getattr(args, "num_classes", None),
                             model_kwargs=getattr(args, "model_kwargs", None))
    return model, info


def _class_names(model_name: str, num_classes: int) -> Optional[List[str]]:
    if model_name == "synthetic":
        from ..synthetic import CLASS_NAMES

        return list(CLASS_NAMES)
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(1000)]
        except Exception:
            return None
    return None


def _load_images(paths: Sequence[str]) -> Tuple[List[Any], List[str], List[Tuple[str, str]]]:
    """The readable pictures as 8-bit RGB PIL images (read as the evaluation's data sources read them:
    :func:`~tokentm_fast.evaluation.data.to_rgb`), the paths they came from, and ``(path, reason)`` for each
    file that could not be read (missing, a folder, not a picture PIL reads)."""
    from ..evaluation.data import load_image

    images, kept, skipped = [], [], []
    for p in paths:
        path = Path(p)
        if not path.exists():
            skipped.append((str(p), "image file not found"))
        elif not path.is_file():
            skipped.append((str(p), "not an image file (a folder?)"))
        else:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    images.append(load_image(path))
                kept.append(str(p))
                for w in caught:  # e.g. transparency composited over white: said with the file's name
                    print(f"{PROG} explain: warning: {p}: {w.message}", file=sys.stderr)
            except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBomb...)
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                skipped.append((str(p), f"cannot read image: {reason}"))
    return images, kept, skipped


def output_names(paths: Sequence[str]) -> List[str]:
    """The name each input image goes by in output files: its file name, extension kept.

    ``photo.png`` and ``photo.jpg`` stay ``photo.png`` / ``photo.jpg`` (their
    overlays are ``photo.png_<method>.png`` and ``photo.jpg_<method>.png``).
    Equal file names from different folders get the parent folder in front
    (``a/photo.png`` -> ``a_photo.png``), and a number if that is still not enough.
    """
    files = [Path(p) for p in paths]
    names = [f.name for f in files]
    out = []
    for i, f in enumerate(files):
        name = names[i]
        if names.count(name) > 1 and f.parent.name:
            name = f"{f.parent.name}_{name}"
        out.append(name)
    return [n if out.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(out)]


def _grid_format(name: str, option: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    suffix = Path(name).suffix.lower().lstrip(".")
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in supported:
        raise CLIError(f"{option} {name!r}: unknown picture format {suffix or '(no extension)'!r}; "
                       f"use one of {', '.join(sorted(supported))}")


def _constant_map_warning_classes() -> List[type]:
    """The ``ConstantMapWarning`` classes of the package: the drawing functions' and the Python API's."""
    from .. import maps, visualize

    found = [getattr(maps, "ConstantMapWarning", None), getattr(visualize, "ConstantMapWarning", None)]
    return [c for i, c in enumerate(found) if c is not None and c not in found[:i]]


@contextmanager
def _constant_map_warnings_held() -> Iterator[None]:
    """Ignore every ``ConstantMapWarning`` raised inside (the drawing functions', and the Python API's):
    the command says each method's constant maps itself, once (:func:`constant_map_message`). Other
    warnings are untouched."""
    with warnings.catch_warnings():
        for category in _constant_map_warning_classes():
            warnings.filterwarnings("ignore", category=category)
        yield


def constant_map_message(method: str, images: Sequence[str], total: int, value: float) -> str:
    """What the command says of ``method``'s constant maps (of ``images``, among ``total``; every value
    ``value``): the fact, and the likely cause, whatever the model's training."""
    from ..methods import REGISTRY

    if len(images) == 1 and total == 1:
        what = f"the map of {images[0]} is constant"
    else:
        what = f"{len(images)} of {total} maps are constant ({', '.join(images)})"
    if not REGISTRY[method].needs_gradients:
        why = "the attention it reads gives every patch the same weight"
    elif value == 0:
        why = ("no patch has positive relevance for the explained class: either the method keeps only positive "
               "evidence (attention Grad-CAM clips at 0) and every patch weighed against the class, or the gradient "
               "of the explained score is zero (the score does not change with the input)")
    else:
        why = "the gradient of the explained score weighs every patch alike"
    return (f"{method}: {what}: every value {value:g}; it has no ranking to show. Likely cause: {why}. "
            f"Another method, or another --target, may show more.")


def _is_constant(m) -> bool:
    """Whether the map ``m`` (a tensor) has no two different finite values: it ranks nothing."""
    finite = m[m.isfinite()]
    return finite.numel() == 0 or bool(finite.max() == finite.min())


def _report_constant_maps(maps: Mapping[str, Any], names: Sequence[str], command: str) -> None:
    """``tokentm-fast <command>: warning: …`` on stderr, once per method with constant maps (``maps[m]``:
    ``(B, gh, gw)``, one per name)."""
    for m, v in maps.items():
        const = [i for i in range(len(names)) if _is_constant(v[i])]
        if const:
            value = float(v[const[0]].flatten()[0])
            msg = constant_map_message(m, [names[i] for i in const], len(names), value)
            print(f"{PROG} {command}: warning: {msg}", file=sys.stderr)


def _explain_all(explainers: Mapping[str, Any], x, target=None) -> Dict[str, Any]:
    """``{method: explainer(x, target)}``; a constant-map warning of the API is held back (the command
    reports constant maps itself)."""
    with _constant_map_warnings_held():
        return {m: e(x, target) for m, e in explainers.items()}


# ----------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    """``tokentm-fast explain``: 0, or :data:`EXIT_SKIPPED` when some IMAGE files could not be read."""
    import numpy as np
    import torch

    from ..evaluation.data import Preprocess, model_data_config
    from ..evaluation.outputs import check_no_link, check_output_dir, check_output_file, output_inside
    from ..visualize import save_grid, save_overlay_figure

    _setup_threads(args)
    images, paths, skipped = _load_images(args.images)  # files first: a typo is said at once
    for p, why in skipped:
        print(f"{PROG} explain: skipped {p}: {why}", file=sys.stderr)
    if not images:
        raise CLIError(f"no IMAGE could be read ({len(skipped)} file{'s' if len(skipped) > 1 else ''} skipped, "
                       "named above)")
    options = method_options(args.methods, args.option)
    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise CLIError(f"unknown colormap {args.cmap!r}")
    # every output location is checked before the model runs (a symbolic link at any of them is refused)
    out = check_output_dir(args.out, "--out")
    grid_path = output_inside(out, args.grid_name, "--grid-name")
    _grid_format(args.grid_name, "--grid-name")
    names = output_names(paths)
    overlay_paths = {(i, m): out / f"{name}_{m}.png" for i, name in enumerate(names) for m in args.methods}
    if grid_path in overlay_paths.values():
        raise CLIError(f"--grid-name {args.grid_name!r} is also the name of an overlay; choose another name")
    for path in overlay_paths.values():
        check_no_link(path, "--out", "overlay")
    maps_path = None
    if args.save_maps:
        maps_path = check_output_file(args.save_maps, "--save-maps")
        if maps_path.suffix.lower() != ".npz":
            raise CLIError(f"--save-maps {args.save_maps!r}: expected a file name ending in .npz")
    device = _device(args.device)
    model, model_info = _load_model(args)
    model = model.to(device)
    explainers = _explainers(model, args.methods, args.backend, options, args.option)  # the API's checks
    pre = Preprocess(model_data_config(model), "resize" if args.resize else "crop")
    plans = [pre.plan(*im.size) for im in images]
    _say_preprocessing(pre, images, names, plans)
    xs, x01s = zip(*[pre(im)[:2] for im in images])
    x_all = torch.stack(xs)
    pred: List[int] = []
    chunks: Dict[str, List[Any]] = {m: [] for m in args.methods}
    for start in range(0, len(images), args.batch_size):
        x = x_all[start:start + args.batch_size].to(device)
        with torch.no_grad():
            pred += model(x).argmax(dim=1).cpu().tolist()
        for m, v in _explain_all(explainers, x, args.target).items():
            chunks[m].append(v.cpu())
    maps = {m: torch.cat(v) for m, v in chunks.items()}
    out.mkdir(parents=True, exist_ok=True)
    classes = _class_names(args.model, int(getattr(model, "num_classes", 0) or 0))
    cls = [classes[c] if classes and c < len(classes) else str(c) for c in pred]
    if args.target is not None:
        tname = classes[args.target] if classes and args.target < len(classes) else str(args.target)
        titles = [f"{s}\npred {c}, expl. {tname}" for s, c in zip(names, cls)]
    else:
        titles = [f"{s}\npred {c}" for s, c in zip(names, cls)]
    with _constant_map_warnings_held():  # said once per method below
        written = []
        for (i, m), path in overlay_paths.items():
            original = torch.from_numpy(np.asarray(images[i], dtype=np.float32) / 255.0).permute(2, 0, 1)
            written.append(save_overlay_figure(
                original, maps[m][i], path, box=plans[i]["box"], cmap=args.cmap, alpha=args.alpha, method=m,
                title=f"{m} — {names[i]} (pred {cls[i]})", option="--out"))
        grid = save_grid(torch.stack(x01s), maps, grid_path, titles=titles, cmap=args.cmap, alpha=args.alpha,
                         image_names=names, option="--grid-name")
    _report_constant_maps(maps, names, "explain")
    if maps_path is not None:
        _save_maps(maps_path, args, explainers, model_info, pre, maps, names, paths, plans, pred)
    h, w = pre.input_size
    for name, path, c, plan in zip(names, paths, cls, plans):
        H, W = plan["original"]
        how = "resized" if pre.mode == "resize" else "resized and centre-cropped"
        geometry = "" if (H, W) == (h, w) and plan["resized"] == (h, w) else f"; {W}×{H} px {how} to {w}×{h}"
        print(f"{name}: predicted {c}" + ("" if name == Path(path).name else f" ({path})") + geometry)
    print(f"wrote {len(written)} overlays (<image file name>_<method>.png, at the images' own size) and the grid "
          f"{grid} (the model's {w}×{h} px inputs) to {out}" + (f"; raw maps: {maps_path}" if maps_path else ""))
    if skipped:
        print(f"{PROG} explain: {len(skipped)} of {len(args.images)} IMAGE files could not be read and were skipped "
              f"({', '.join(p for p, _ in skipped)}; the reasons are above): exit code {EXIT_SKIPPED}",
              file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def _say_preprocessing(pre, images, names, plans) -> None:
    """Say on stderr, once, what the first image that is resized / cropped went through."""
    h, w = pre.input_size
    for im, name, plan in zip(images, names, plans):
        if plan["original"] != (h, w) or plan["resized"] != (h, w):
            W, H = im.size
            more = " (the other images alike, each by its size)" if len(images) > 1 else ""
            print(f"{PROG} explain: preprocessing: {name}: {pre.describe(W, H)}{more}", file=sys.stderr)
            return


def _save_maps(path: Path, args: argparse.Namespace, explainers, model_info, pre, maps, names, paths, plans,
               pred) -> Path:
    """``--save-maps``: the raw maps and what produced them, as an .npz written through the safe writer."""
    import json

    import numpy as np
    import torch

    from .. import __version__
    from ..evaluation.outputs import open_output
    from ..evaluation.state import jsonable

    explained = [args.target if args.target is not None else p for p in pred]
    info = {
        "format": "tokentm-fast explain --save-maps, version 1",
        "methods": list(args.methods),
        "method_options": {m: explainers[m].options for m in args.methods},
        "backend": args.backend,
        "device": str(args.device),
        "model": model_info,
        "target": "predicted class" if args.target is None else int(args.target),
        "preprocessing": pre.describe(),
        "data_config": {k: v for k, v in pre.config.items() if k in ("input_size", "interpolation", "mean", "std",
                                                                    "crop_pct", "crop_mode")},
        "maps": "raw, unnormalised relevance of each patch: one float32 array (images, gh, gw) per method",
        "versions": {"tokentm_fast": __version__, "torch": torch.__version__},
    }
    arrays: Dict[str, Any] = {m: maps[m].detach().to("cpu", torch.float32).numpy() for m in args.methods}
    arrays.update(
        methods=np.array(list(args.methods)),
        image_names=np.array(list(names)),
        image_paths=np.array([str(p) for p in paths]),
        original_sizes=np.array([p["original"] for p in plans], dtype=np.int64),
        boxes=np.array([p["box"] for p in plans], dtype=np.float64),
        predicted=np.array(pred, dtype=np.int64),
        explained=np.array(explained, dtype=np.int64),
        info=np.array(json.dumps(jsonable(info), sort_keys=True)),
    )
    with open_output(path, "--save-maps", "maps file") as f:
        np.savez(f, **arrays)
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.errors import EvaluationInterrupted
    from ..evaluation.outputs import check_output_file
    from ..evaluation.report import print_results
    from ..evaluation.runner import evaluate

    _setup_threads(args)
    output = check_output_file(args.output, "--output")  # before any work: a bad location fails fast
    if not args.overwrite:
        _refuse_overwriting(output, args.restart)
    options = method_options(args.methods, args.option)
    if args.curves:
        check_output_file(args.curves, "--curves")
    try:
        results = evaluate(
            args.model, args.data, methods=args.methods, metrics=args.metrics,
            checkpoint=args.checkpoint, num_classes=args.num_classes, model_kwargs=args.model_kwargs,
            split=args.split, size=args.size, seed=args.seed, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, limit=args.limit, output=args.output, backend=args.backend, num_workers=args.workers,
            max_forward_batch=args.max_forward_batch, progress=not args.no_progress, restart=args.restart,
            save_every=args.save_every, target=args.target, sanity_images=args.sanity_images,
            command=[PROG, *args.argv], preprocess="resize" if args.resize else "crop", method_options=options,
        )
    except EvaluationInterrupted as e:
        where = ", ".join(str(p) for p in e.partial_paths)
        if where:
            msg = (f"interrupted after {e.done} of {e.total} samples; the state is saved in {where}: "
                   "run the same command again to resume it (or add --restart to start over)")
        else:
            msg = f"interrupted after {e.done} of {e.total} samples; nothing was saved (no --output)"
        print(f"{PROG} evaluate: {msg}", file=sys.stderr, flush=True)
        return 130
    if results.get("world_size", 1) > 1 and _rank() != 0:
        return 0  # rank 0 prints the merged results
    print_results(results, args.output)
    if args.curves:
        _plot_curves(results, args.curves)
    return 0


def _refuse_overwriting(output: Path, restart: bool) -> None:
    """``evaluate`` without ``--overwrite``: an existing results JSON is refused, unless an interrupted run
    of it is resumed (its partial state is there and ``--restart`` was not given)."""
    from ..evaluation.outputs import check_not_overwriting
    from ..evaluation.state import find_partials, partial_path

    partials = find_partials(output)
    if partials and not restart:
        return  # the resume machinery takes over (and refuses a partial state of another configuration)
    if partials:
        hint = "--restart discards the partial state and starts over, which would replace it"
    else:
        hint = (f"There is no interrupted run of it to resume (that would leave its state in "
                f"{partial_path(output)}, which the same command picks up)")
    check_not_overwriting(output, "--output", "--overwrite", "the results of an earlier evaluate", hint)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _plot_curves(results: Dict[str, Any], path: str, option: str = "--curves") -> Optional[Path]:
    from ..visualize import plot_perturbation_curves

    curves = {r["method"]: r["values"]["curves"] for r in results["records"] if r["metric"] == "perturbation"}
    if not curves:
        print("no perturbation curves to plot (the perturbation metric was not computed)", file=sys.stderr)
        return None
    title = f"perturbation test, {results['counts']['images_evaluated']} images"
    p = plot_perturbation_curves(curves, path, title=title, option=option)
    print(f"perturbation curves: {p}")
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """``tokentm-fast bench``: median time of explain per (method, backend) and of a forward+backward."""
    import torch

    from .. import BACKENDS
    from .timing import format_timings, random_batch, time_explain

    _setup_threads(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise CLIError(f"unknown backend(s) {', '.join(bad) or repr(args.backends)}; choose from {', '.join(BACKENDS)}")
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model == "synthetic":
        from ..synthetic import create_synthetic_vit

        model, weights = create_synthetic_vit(), "shipped weights"
    else:
        import timm

        if not timm.is_model(args.model):
            raise CLIError(f"unknown model {args.model!r}: not 'synthetic' and not a timm model name")
        torch.manual_seed(0)
        model, weights = timm.create_model(args.model, pretrained=False, **(args.model_kwargs or {})), "random init"
    model = model.eval().to(device=device, dtype=dtype)
    options = method_options(args.methods, args.option)
    _explainers(model, args.methods, "auto", options, args.option)  # the API's checks, before any timing
    images, target = random_batch(model, args.batch, device, dtype)
    rows = time_explain(model, images, target, args.methods, backends, args.repeats, device, options)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    given = "; ".join(f"{m}: " + ", ".join(f"{k}={_shown(v)}" for k, v in o.items()) for m, o in options.items())
    print(f"{args.model} ({weights}), batch {args.batch}, {args.dtype}, {device}{threads}, torch {torch.__version__}; "
          f"median of {args.repeats} calls after 1 warm-up" + (f"; options {given}" if given else ""))
    for line in format_timings(rows):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.data import Preprocess, SyntheticSource, model_data_config
    from ..evaluation.outputs import check_no_link, check_output_dir, write_text
    from ..evaluation.report import print_results, table_markdown
    from ..evaluation.runner import evaluate, load_model
    from ..synthetic import CLASS_NAMES
    from ..visualize import save_grid

    _setup_threads(args)
    t0 = time.time()
    options = method_options(args.methods, args.option)
    out = check_output_dir(args.out, "--out")
    for name in ("demo_grid.png", "demo_results.json", "demo_table.md", "demo_curves.png"):
        check_no_link(out / name, "--out")  # before any work
    device = _device(args.device)
    model, info = load_model("synthetic", checkpoint=args.checkpoint)
    model = model.to(device)
    explainers = _explainers(model, args.methods, args.backend, options, args.option)  # the API's checks
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: synthetic ViT ({info['checkpoint']['path']})")

    # 1. the picture: a few test images x every method
    pre = Preprocess(model_data_config(model))
    src = SyntheticSource("test", size=max(args.num_explain, args.num_images))
    samples = [src.load(i) for i in range(args.num_explain)]
    xs, x01s, gt = zip(*[pre(pil, mask) for pil, mask, _ in samples])
    x = torch.stack(xs).to(device)
    with torch.no_grad():
        pred = model(x).argmax(dim=1).cpu().tolist()
    maps = {m: v.cpu() for m, v in _explain_all(explainers, x).items()}
    titles = [f"{CLASS_NAMES[lab]} (pred {CLASS_NAMES[p]})" for (_, _, lab), p in zip(samples, pred)]
    names = [f"test image {i}" for i in range(len(samples))]
    with _constant_map_warnings_held():  # said once per method below
        grid = save_grid(torch.stack(x01s), maps, out / "demo_grid.png", titles=titles, masks=torch.stack(gt),
                         image_title="image (mask outlined)", image_names=names, option="--out")
    _report_constant_maps(maps, names, "demo")
    print(f"explanation grid: {grid}")

    # 2. the evaluation on a synthetic test subset
    metrics = ["segmentation", "perturbation"] + (["sanity"] if args.sanity_images else [])
    with _constant_map_warnings_held():  # said for the grid above; the sanity check's random models give them
        results = evaluate(
            "synthetic", SyntheticSource("test", size=args.num_images), methods=args.methods, metrics=metrics,
            checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device,
            output=str(out / "demo_results.json"), backend=args.backend, num_workers=args.workers,
            progress=not args.no_progress, restart=True, sanity_images=args.sanity_images or None,
            command=[PROG, *args.argv], method_options=options,
        )
    print_results(results, str(out / "demo_results.json"))
    write_text(out / "demo_table.md", table_markdown(results), option="--out", what="results table", durable=False)
    _plot_curves(results, str(out / "demo_curves.png"), option="--out")
    print(f"demo finished in {time.time() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage / input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..evaluation.data import DataError
    from ..evaluation.runner import EvaluationError

    try:
        args.argv = argv
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, EvaluationError, DataError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        if os.environ.get("TOKENTM_FAST_DEBUG"):
            raise
        if not reports_error(e):
            _wait_for_rank0()
            return EXIT_USAGE
        msg = str(e) or type(e).__name__
        where = f" [rank {_rank()}]" if _world_size() > 1 else ""
        print(f"{PROG} {args.command}{where}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def _world_size() -> int:
    """The number of processes under torchrun (1 otherwise)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _quiet_rank() -> bool:
    """True in the ranks other than 0 of a torchrun run: they leave the errors all ranks share to rank 0."""
    return _world_size() > 1 and _rank() != 0


#: Seconds a quiet rank waits before it exits, so that torchrun (which stops every rank as soon as one fails)
#: does not stop rank 0 before it has printed the message.
QUIET_RANK_DELAY_S = 3.0


def _wait_for_rank0() -> None:
    time.sleep(QUIET_RANK_DELAY_S)


def reports_error(e: BaseException) -> bool:
    """Whether this process prints the error ``e``.

    One process: always. Under ``torchrun``: rank 0 always; another rank only
    an error of its own (its shard, its partial file), not one that every rank
    meets alike: a usage error of the command line (:class:`CLIError`), or an
    error marked ``every_rank``: an output location refused before any work
    (:class:`~tokentm_fast.evaluation.outputs.OutputLocationError`), an
    evaluation error about the arguments, the device, joining the group, and
    every error the ranks agree on before the loop (a corrupt checkpoint, a
    missing folder, a lock held by another run...).
    """
    if not _quiet_rank():
        return True
    return not (isinstance(e, CLIError) or getattr(e, "every_rank", False))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
