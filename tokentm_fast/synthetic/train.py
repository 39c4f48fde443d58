"""Train the synthetic-benchmark ViT on the CPU (deterministic given the seed).

Reproduce the shipped weights with::

    python -m tokentm_fast.synthetic.train --seed 0 --out tokentm_fast/assets/synthetic_vit.safetensors

The training set (``--train-size`` images of split "train") is generated once
into memory; every epoch visits it in an order drawn from a ``torch.Generator``
seeded with ``(seed, epoch)`` (no augmentation by default; ``--augment
dihedral`` adds random flips / 90-degree rotations, which only suits rotated
objects).  AdamW (no weight decay on biases, norms, position embedding and
class token), linear warm-up then cosine decay per step, gradient clipping.
``torch.use_deterministic_algorithms(True)`` and a fixed thread count make the
run bit-reproducible on the same machine / torch build (a different thread
count or CPU instruction set may change the float rounding).  The default is
one thread: on a shared CPU a single thread is far faster than two fighting
for cores.

Writes the weights (safetensors, float32) to ``--out`` and the metadata
(seed, exact command, model config, data config, accuracies, wall time,
versions) to the same path with suffix ``.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .model import SYNTHETIC_VIT_CONFIG, create_synthetic_vit, synthetic_data_config
from .shapes import CLASS_NAMES, IMAGE_SIZE, MEAN, STD, generate_arrays

DEFAULTS = dict(
    seed=0,
    epochs=4,
    batch_size=64,
    lr=2e-3,
    min_lr=1e-5,
    weight_decay=0.05,
    warmup_epochs=1.0,
    label_smoothing=0.0,
    grad_clip=1.0,
    augment="none",
    train_size=40000,
    val_size=2000,
    test_size=5000,
    threads=1,
    gen_workers=1,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokentm_fast.synthetic.train",
        description="Train the small ViT of the synthetic localization benchmark on the CPU "
                    "(deterministic given --seed and --threads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the data generator (all splits) and of torch")
    p.add_argument("--out", type=str, required=True,
                   help="output .safetensors path (metadata goes to the same path with .json)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="training batch size")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=DEFAULTS["min_lr"], help="final learning rate")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                   help="AdamW weight decay (weights only)")
    p.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"],
                   help="linear learning-rate warm-up length")
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"],
                   help="cross-entropy label smoothing")
    p.add_argument("--grad-clip", type=float, default=DEFAULTS["grad_clip"],
                   help="max gradient norm (0 disables)")
    p.add_argument("--augment", choices=("none", "dihedral"), default=DEFAULTS["augment"],
                   help="training augmentation: none, or a random flip / 90-degree rotation")
    p.add_argument("--train-size", type=int, default=DEFAULTS["train_size"],
                   help="number of training images (generated once, kept in memory)")
    p.add_argument("--val-size", type=int, default=DEFAULTS["val_size"],
                   help="validation images (split \"val\", indices 0..n-1)")
    p.add_argument("--test-size", type=int, default=DEFAULTS["test_size"],
                   help="test images (split \"test\", indices 0..n-1)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help="torch intra-op threads (fixed for reproducibility)")
    p.add_argument("--gen-workers", type=int, default=DEFAULTS["gen_workers"],
                   help="processes generating the data (does not change the data)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="abort with an error if training exceeds this many minutes (0: no limit)")
    return p


def _log(msg: str) -> None:
    print(msg, flush=True)


def _normalize(x_u8: torch.Tensor) -> torch.Tensor:
    x = x_u8.to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply one random element of the dihedral group D4 to each image."""
    t = torch.randint(0, 8, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for k in range(8):
        idx = (t == k).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        y = x[idx]
        if k >= 4:
            y = torch.flip(y, dims=(-1,))
        y = torch.rot90(y, k % 4, dims=(-2, -1))
        out[idx] = y
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        logits = model(_normalize(images_u8[s:s + batch_size]))
        correct += int((logits.argmax(-1) == labels[s:s + batch_size]).sum())
    return correct / max(1, len(labels))


def _lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def _command_line(argv: Optional[List[str]]) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "python -m tokentm_fast.synthetic.train " + " ".join(shlex.quote(a) for a in args)


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = True
    except Exception:  # pragma: no cover
        deterministic = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = _command_line(argv)
    _log(f"[train] {command}")
    _log(f"[train] torch {torch.__version__}, threads {torch.get_num_threads()}, "
         f"deterministic algorithms: {deterministic}")

    # ---- data -------------------------------------------------------------
    t0 = time.time()
    xs, _, ys = generate_arrays("train", args.train_size, args.seed, IMAGE_SIZE,
                                workers=args.gen_workers)
    xv, _, yv = generate_arrays("val", args.val_size, args.seed, IMAGE_SIZE,
                                workers=args.gen_workers)
    xt, _, yt = generate_arrays("test", args.test_size, args.seed, IMAGE_SIZE,
                                workers=args.gen_workers)
    xs, ys = torch.from_numpy(xs), torch.from_numpy(ys)
    xv, yv = torch.from_numpy(xv), torch.from_numpy(yv)
    xt, yt = torch.from_numpy(xt), torch.from_numpy(yt)
    t_data = time.time() - t0
    _log(f"[train] generated train/val/test {len(ys)}/{len(yv)}/{len(yt)} images in {t_data:.1f}s")

    # ---- model / optimiser -------------------------------------------------
    torch.manual_seed(args.seed)
    model = create_synthetic_vit(pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999),
    )
    steps_per_epoch = len(ys) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    _log(f"[train] model {n_params / 1e6:.3f}M params, {steps_per_epoch} steps/epoch, "
         f"{total} steps")

    # ---- training ------------------------------------------------------------
    t1 = time.time()
    step = 0
    history = []
    for epoch in range(args.epochs):
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1000003 + epoch)
        perm = torch.randperm(len(ys), generator=g)
        run_loss, run_correct, run_n = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = _normalize(xs[idx])
            if args.augment == "dihedral":
                x = _dihedral(x, g)
            y = ys[idx]
            lr = _lr_at(step, total, warmup, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            run_loss += loss.item() * len(y)
            run_correct += int((logits.argmax(-1) == y).sum())
            run_n += len(y)
            if step % args.log_every == 0:
                el = time.time() - t1
                _log(f"[train] epoch {epoch + 1}/{args.epochs} step {step}/{total} "
                     f"lr {lr:.2e} loss {run_loss / run_n:.4f} acc {run_correct / run_n:.4f} "
                     f"{el:.0f}s (eta {el / step * (total - step):.0f}s)")
            if args.max_minutes > 0 and time.time() - t1 > 60 * args.max_minutes:
                raise SystemExit(f"training exceeded --max-minutes {args.max_minutes}")
        val_acc = evaluate(model, xv, yv)
        history.append(dict(epoch=epoch + 1, train_loss=run_loss / max(1, run_n),
                            train_acc=run_correct / max(1, run_n), val_acc=val_acc,
                            elapsed_s=round(time.time() - t1, 1)))
        _log(f"[train] epoch {epoch + 1} done: train loss {run_loss / max(1, run_n):.4f} "
             f"train acc {run_correct / max(1, run_n):.4f} val acc {val_acc:.4f} "
             f"({time.time() - t1:.0f}s)")
    t_train = time.time() - t1

    # ---- evaluation and export ------------------------------------------------
    model.eval()
    val_acc = evaluate(model, xv, yv)
    test_acc = evaluate(model, xt, yt)
    _log(f"[train] final val acc {val_acc:.4f}  test acc {test_acc:.4f}")

    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    # The header holds nothing run-specific (not even --out) and a single
    # metadata entry (safetensors writes a multi-key metadata map in a random
    # order), so two runs that produce the same weights give byte-identical files.
    save_file(state, str(out), metadata={"format": "pt"})
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    import timm

    meta = dict(
        description="Small ViT of the tokentm_fast synthetic localization benchmark",
        seed=args.seed,
        command=command,
        args={k: v for k, v in vars(args).items()},
        timm_class="timm.models.vision_transformer.VisionTransformer",
        timm_config=SYNTHETIC_VIT_CONFIG,
        num_params=n_params,
        dtype="float32",
        image_size=IMAGE_SIZE,
        patch_grid=[IMAGE_SIZE // SYNTHETIC_VIT_CONFIG["patch_size"]] * 2,
        data_config=synthetic_data_config(),
        mean=list(MEAN),
        std=list(STD),
        class_names=list(CLASS_NAMES),
        dataset=dict(generator="tokentm_fast.synthetic.shapes", seed=args.seed,
                     train=dict(split="train", indices=[0, args.train_size]),
                     val=dict(split="val", indices=[0, args.val_size]),
                     test=dict(split="test", indices=[0, args.test_size])),
        val_accuracy=val_acc,
        test_accuracy=test_acc,
        history=history,
        train_time_s=round(t_train, 1),
        data_time_s=round(t_data, 1),
        total_time_s=round(time.time() - t_start, 1),
        total_cpu_time_s=round(time.process_time() - cpu_start, 1),
        deterministic_algorithms=deterministic,
        torch_version=torch.__version__,
        timm_version=timm.__version__,
        numpy_version=np.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        threads=torch.get_num_threads(),
        weights_file=out.name,
        weights_sha256=sha,
    )
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _log(f"[train] wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {sha[:16]}...) "
         f"and {meta_path}; total {time.time() - t_start:.0f}s")
    return meta


if __name__ == "__main__":
    main()
