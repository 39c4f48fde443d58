"""Command line: ``tokentm-fast`` (or ``python -m tokentm_fast``).

Subcommands::

    tokentm-fast explain IMAGE [IMAGE ...] --model synthetic --methods tokentm,legrad --out DIR
    tokentm-fast evaluate --data synthetic|folder:PATH|mat:PATH --model NAME --checkpoint FILE ...
    tokentm-fast bench --model vit_base_patch16_224 --batch 8 --backends torch,triton --device cuda
    tokentm-fast demo [--num-images 64] [--out demo_out]

Errors in what the user gave (missing file, unreadable image or checkpoint,
unknown model...) print one line ``tokentm-fast: error: …`` on stderr and exit
with code 2 (set ``TOKENTM_FAST_DEBUG=1`` to see the traceback). Under
``torchrun`` an error that every process meets alike (an argument, a missing
device, a corrupt checkpoint) is printed by rank 0 alone; the other ranks exit
with the same code without a word.

Every file is written through :mod:`tokentm_fast.evaluation.outputs`: a
symbolic link at an output path is refused (naming the file and the option),
files are written to a temporary file in the same folder and renamed over the
target, and a failed write (a full disk) names the file and leaves the last
good state in place. The output locations are checked there too, before any
work; the results table is rendered by :mod:`tokentm_fast.evaluation.report`
and ``bench`` times with :mod:`tokentm_fast.timing`. This module holds the
parser and the subcommands.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PROG = "tokentm-fast"
EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------
# argument helpers
# ----------------------------------------------------------------------------

def _methods(value: str) -> List[str]:
    from .methods import METHODS

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
    from .evaluation.runner import METRICS

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
    from .api import BACKENDS

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


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = _Parser(
        prog=PROG,
        description="Fast, faithful explanations for Vision Transformers: explain images, evaluate "
                    "explanation methods (segmentation, perturbation AUC, AOPC, LOdds, sanity), benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # ---- explain
    p = sub.add_parser(
        "explain", help="explain images and write overlay PNGs and a grid",
        description="Explain IMAGE(s) with each method; writes one overlay PNG per image per method "
                    "(<image file name>_<method>.png, e.g. photo.jpg_tokentm.png) and a grid (rows = images, "
                    "columns = image + methods, with a colour bar) to --out. Every map is min-max normalised "
                    "on its own. Output locations are checked before the model runs.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    _add_model_args(p)
    p.add_argument("--methods", type=_methods, default=list(METHODS), metavar="M1,M2,...",
                   help=f"comma-separated methods from {', '.join(METHODS)}, or 'all' (default: all)")
    p.add_argument("--out", default="explain_out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--target", type=_nonneg_int, default=None, metavar="CLASS",
                   help="class index to explain (default: the predicted class of each image)")
    p.add_argument("--cmap", default="inferno",
                   help="matplotlib colormap; perceptually uniform ones read best (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in [0, 1] (default: %(default)s)")
    p.add_argument("--grid-name", default="grid.png",
                   help="file name of the grid inside --out; the suffix picks the format, e.g. grid.pdf "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images explained at once (default: %(default)s)")
    _add_resize_arg(p)
    p.add_argument("--save-maps", metavar="FILE.npz",
                   help="also save the raw maps (float32, one (images, gh, gw) array per method, named by the "
                        "method) with the image names, sizes, classes and the method options (key 'info', JSON) "
                        "to this .npz file (numpy.load reads it)")
    _add_run_args(p)
    p.set_defaults(func=cmd_explain)

    # ---- evaluate
    p = sub.add_parser(
        "evaluate", help="evaluate methods with the segmentation / perturbation / sanity metrics",
        description="Run every method x every metric over a data set, save the results JSON (resumable: "
                    "an interrupted run continues where it stopped when started again with the same "
                    "arguments) and print the results table. Several processes: torchrun --nproc_per_node=N "
                    "-m tokentm_fast evaluate ... (gloo on cpu, nccl on cuda; each rank evaluates a shard, "
                    "rank 0 merges the results).",
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
                   help="cast the model to this dtype for the explanations and the forward passes "
                        "(default: %(default)s; bfloat16 for GPU runs)")
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
    g = p.add_argument_group("output")
    g.add_argument("--output", default="results.json", metavar="FILE",
                   help="results JSON (default: %(default)s); while the run lasts it holds an exclusive lock on "
                        "FILE.lock: a second evaluate of the same FILE stops at once, naming the process")
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
        "bench", help="time explain per method and backend against a forward+backward",
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
    p.set_defaults(func=cmd_bench)

    # ---- demo
    p = sub.add_parser(
        "demo", help="explain + evaluate every method on the shipped synthetic benchmark (about a minute on a CPU)",
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
    from .evaluation.runner import resolve_device

    return resolve_device(name)


def _load_model(args: argparse.Namespace):
    from .evaluation.runner import load_model

    model, info = load_model(args.model, checkpoint=args.checkpoint, num_classes=getattr(args, "num_classes", None),
                             model_kwargs=getattr(args, "model_kwargs", None))
    return model, info


def _class_names(model_name: str, num_classes: int) -> Optional[List[str]]:
    if model_name == "synthetic":
        from .synthetic import CLASS_NAMES

        return list(CLASS_NAMES)
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(1000)]
        except Exception:
            return None
    return None


def _load_images(paths: Sequence[str]):
    """The pictures as 8-bit RGB PIL images, read as the evaluation's data sources read them (16-bit rescaled)."""
    from .evaluation.data import load_image

    images = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CLIError(f"image file not found: {p}")
        if not path.is_file():
            raise CLIError(f"not an image file: {p}")
        try:
            images.append(load_image(path))
        except Exception as e:
            raise CLIError(f"cannot read image {p}: {e}") from None
    return images


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


def _report_warnings(caught, command: str) -> None:
    """Print warnings caught during drawing as ``tokentm-fast <command>: warning: …`` lines (once each)."""
    seen = set()
    for w in caught:
        msg = str(w.message)
        if msg not in seen:
            seen.add(msg)
            print(f"{PROG} {command}: warning: {msg}", file=sys.stderr)


def _explain_all(model, x, methods, backend, target=None) -> Dict[str, Any]:
    from .api import Explainer

    return {m: Explainer(model, method=m, backend=backend)(x, target) for m in methods}


# ----------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np
    import torch

    from .evaluation.data import Preprocess, model_data_config
    from .evaluation.outputs import check_no_link, check_output_dir, check_output_file, output_inside
    from .visualize import ConstantMapWarning, save_grid, save_overlay_figure

    _setup_threads(args)
    images = _load_images(args.images)  # files first: a typo fails fast
    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise CLIError(f"unknown colormap {args.cmap!r}")
    # every output location is checked before the model runs (a symbolic link at any of them is refused)
    out = check_output_dir(args.out, "--out")
    grid_path = output_inside(out, args.grid_name, "--grid-name")
    _grid_format(args.grid_name, "--grid-name")
    names = output_names(args.images)
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
        for m, v in _explain_all(model, x, args.methods, args.backend, args.target).items():
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConstantMapWarning)
        with warnings.catch_warnings():  # the grid reports constant maps once per method
            warnings.simplefilter("ignore", ConstantMapWarning)
            written = []
            for (i, m), path in overlay_paths.items():
                original = torch.from_numpy(np.asarray(images[i], dtype=np.float32) / 255.0).permute(2, 0, 1)
                written.append(save_overlay_figure(
                    original, maps[m][i], path, box=plans[i]["box"], cmap=args.cmap, alpha=args.alpha,
                    title=f"{m} — {names[i]} (pred {cls[i]})", option="--out"))
        grid = save_grid(torch.stack(x01s), maps, grid_path, titles=titles, cmap=args.cmap, alpha=args.alpha,
                         image_names=names, option="--grid-name")
    _report_warnings([w for w in caught if issubclass(w.category, ConstantMapWarning)], "explain")
    for w in caught:
        if not issubclass(w.category, ConstantMapWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if maps_path is not None:
        _save_maps(maps_path, args, model, model_info, pre, maps, names, plans, pred)
    h, w = pre.input_size
    for name, path, c, plan in zip(names, args.images, cls, plans):
        H, W = plan["original"]
        how = "resized" if pre.mode == "resize" else "resized and centre-cropped"
        geometry = "" if (H, W) == (h, w) and plan["resized"] == (h, w) else f"; {W}×{H} px {how} to {w}×{h}"
        print(f"{name}: predicted {c}" + ("" if name == Path(path).name else f" ({path})") + geometry)
    print(f"wrote {len(written)} overlays (<image file name>_<method>.png, at the images' own size) and the grid "
          f"{grid} (the model's {w}×{h} px inputs) to {out}" + (f"; raw maps: {maps_path}" if maps_path else ""))
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


def _save_maps(path: Path, args: argparse.Namespace, model, model_info, pre, maps, names, plans, pred) -> Path:
    """``--save-maps``: the raw maps and what produced them, as an .npz written through the safe writer."""
    import json

    import numpy as np
    import torch

    from . import __version__
    from .api import Explainer
    from .evaluation.outputs import open_output
    from .evaluation.state import jsonable

    explained = [args.target if args.target is not None else p for p in pred]
    info = {
        "format": "tokentm-fast explain --save-maps, version 1",
        "methods": list(args.methods),
        "method_options": {m: Explainer(model, method=m, backend=args.backend).options for m in args.methods},
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
        image_paths=np.array([str(p) for p in args.images]),
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
    from .evaluation.errors import EvaluationInterrupted
    from .evaluation.outputs import check_output_file
    from .evaluation.report import print_results
    from .evaluation.runner import evaluate

    _setup_threads(args)
    check_output_file(args.output, "--output")  # before any work: a bad location fails fast
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
            command=[PROG, *args.argv], preprocess="resize" if args.resize else "crop",
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


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _plot_curves(results: Dict[str, Any], path: str, option: str = "--curves") -> Optional[Path]:
    from .visualize import plot_perturbation_curves

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

    from . import BACKENDS
    from .timing import format_timings, random_batch, time_explain

    _setup_threads(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise CLIError(f"unknown backend(s) {', '.join(bad) or repr(args.backends)}; choose from {', '.join(BACKENDS)}")
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model == "synthetic":
        from .synthetic import create_synthetic_vit

        model, weights = create_synthetic_vit(), "shipped weights"
    else:
        import timm

        if not timm.is_model(args.model):
            raise CLIError(f"unknown model {args.model!r}: not 'synthetic' and not a timm model name")
        torch.manual_seed(0)
        model, weights = timm.create_model(args.model, pretrained=False, **(args.model_kwargs or {})), "random init"
    model = model.eval().to(device=device, dtype=dtype)
    images, target = random_batch(model, args.batch, device, dtype)
    rows = time_explain(model, images, target, args.methods, backends, args.repeats, device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{args.model} ({weights}), batch {args.batch}, {args.dtype}, {device}{threads}, torch {torch.__version__}; "
          f"median of {args.repeats} calls after 1 warm-up")
    for line in format_timings(rows):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.data import Preprocess, SyntheticSource, model_data_config
    from .evaluation.runner import evaluate, load_model
    import warnings

    from .synthetic import CLASS_NAMES
    from .visualize import ConstantMapWarning, save_grid

    from .evaluation.outputs import check_no_link, check_output_dir, write_text
    from .evaluation.report import print_results, table_markdown

    _setup_threads(args)
    t0 = time.time()
    out = check_output_dir(args.out, "--out")
    for name in ("demo_grid.png", "demo_results.json", "demo_table.md", "demo_curves.png"):
        check_no_link(out / name, "--out")  # before any work
    device = _device(args.device)
    model, info = load_model("synthetic", checkpoint=args.checkpoint)
    model = model.to(device)
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
    maps = {m: v.cpu() for m, v in _explain_all(model, x, args.methods, args.backend).items()}
    titles = [f"{CLASS_NAMES[lab]} (pred {CLASS_NAMES[p]})" for (_, _, lab), p in zip(samples, pred)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConstantMapWarning)
        grid = save_grid(torch.stack(x01s), maps, out / "demo_grid.png", titles=titles, masks=torch.stack(gt),
                         image_title="image (mask outlined)",
                         image_names=[f"test image {i}" for i in range(len(samples))], option="--out")
    _report_warnings([w for w in caught if issubclass(w.category, ConstantMapWarning)], "demo")
    print(f"explanation grid: {grid}")

    # 2. the evaluation on a synthetic test subset
    metrics = ["segmentation", "perturbation"] + (["sanity"] if args.sanity_images else [])
    results = evaluate(
        "synthetic", SyntheticSource("test", size=args.num_images), methods=args.methods, metrics=metrics,
        checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device,
        output=str(out / "demo_results.json"), backend=args.backend, num_workers=args.workers,
        progress=not args.no_progress, restart=True, sanity_images=args.sanity_images or None,
        command=[PROG, *args.argv],
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
    from .evaluation.data import DataError
    from .evaluation.runner import EvaluationError

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
