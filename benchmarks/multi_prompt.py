"""Many prompts per image: ``cosine_similarity(texts, per_prompt=True)`` (one call, one forward pass)
against K separate calls and against LeGrad's own way (each image repeated K times, one prompt per copy).

An open_clip ``VisionTransformer`` (``--family timm``: a timm ViT with a projection head to the embedding
width, the same computation) with random weights (no download), ``--batch`` images and ``--prompts``
random unit "text" embeddings; for each way the median of ``--repeats`` timed runs after one warm-up,
with the maps of the three ways checked equal first (float32 tolerance derived from the map's scale).

    python benchmarks/multi_prompt.py --out benchmarks/results/multi-prompt-cpu
    python benchmarks/multi_prompt.py --device cuda --model b16 --out DIR     # on a GPU machine

``--model small`` (CPU default): width 192, 6 blocks, 3 heads, 112 px images, patch 16 (50 tokens);
``b16``: ViT-B/16 at 224 px (CLIP's image tower, 197 tokens).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

MODELS = {
    "small": dict(image_size=112, patch_size=16, width=192, layers=6, heads=3, mlp_ratio=4.0, output_dim=128),
    "b16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default=None, choices=tuple(MODELS), help="default: small on cpu, b16 on cuda")
    p.add_argument("--method", default="legrad")
    p.add_argument("--family", default="open_clip", choices=("open_clip", "timm"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompts", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default: print only)")
    args = p.parse_args(argv)

    import tokentm_fast as tf

    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    name = args.model or ("b16" if device.type == "cuda" else "small")
    cfg = MODELS[name]
    torch.manual_seed(0)
    if args.family == "open_clip":
        import open_clip
        from open_clip.transformer import VisionTransformer

        model, version = VisionTransformer(**cfg), open_clip.__version__
    else:
        import timm

        model = timm.models.vision_transformer.VisionTransformer(
            img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["width"], depth=cfg["layers"],
            num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"], num_classes=cfg["output_dim"])
        version = timm.__version__
    model = model.eval().to(device, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, cfg["image_size"], cfg["image_size"], generator=g)
    images = images.to(device, getattr(torch, args.dtype))
    explainer = tf.Explainer(model, args.method)
    rows = []
    for k in args.prompts:
        texts = torch.nn.functional.normalize(torch.randn(k, cfg["output_dim"], generator=g), dim=-1).to(device)

        def one_call():
            return explainer(images, tf.cosine_similarity(texts, per_prompt=True))

        def k_calls():
            return torch.stack([explainer(images, tf.cosine_similarity(t)) for t in texts], dim=1)

        def repeated():   # LeGrad's own code: each image repeated K times, one prompt per copy
            many = images.repeat_interleave(k, dim=0)
            return explainer(many, tf.cosine_similarity(texts.repeat(args.batch, 1))).unflatten(0, (args.batch, k))

        maps = [one_call(), k_calls(), repeated()]
        # per (image, prompt) relative L2 against the K calls. per_prompt runs the same arithmetic as the K calls;
        # the repeated images are a K times larger batch, whose forward (cuBLAS, the kernels' tiles) rounds
        # differently in float32: the same maps up to the model's own float32 drift
        ref = maps[1].flatten(2).double()
        diff = [float(((m.flatten(2).double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) for m in maps]
        tol = 1e-5 if args.dtype == "float32" else 5e-2
        assert diff[0] <= tol and diff[2] <= 100 * tol, f"the three ways give different maps: relative L2 {diff}"
        t = {way: _median_seconds(fn, device, args.repeats)
             for way, fn in (("per_prompt", one_call), ("k_calls", k_calls), ("repeated_images", repeated))}
        rows.append(dict(prompts=k, **{f"{w}_s": v for w, v in t.items()},
                         speedup_vs_k_calls=t["k_calls"] / t["per_prompt"],
                         speedup_vs_repeated=t["repeated_images"] / t["per_prompt"],
                         max_rel_l2_vs_k_calls={"per_prompt": diff[0], "repeated_images": diff[2]}))
        print(rows[-1], flush=True)
    meta = dict(command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                date=datetime.date.today().isoformat(), device=(torch.cuda.get_device_name(device)
                                                                if device.type == "cuda" else platform.processor()
                                                                or platform.machine()),
                cpu_threads=torch.get_num_threads(), torch=torch.__version__, family=args.family,
                family_version=version,
                model=name, model_config=cfg, method=args.method, batch=args.batch, dtype=args.dtype,
                backend=explainer.backend_for(images),
                attention=explainer.attention_for(images, explainer.backend_for(images)), repeats=args.repeats)
    lines = [f"# {args.method}: K prompts per image, {args.batch} images, {args.family} {name} ({args.dtype}, "
             f"{meta['device']})", "",
             f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, {args.family} {version}, "
             f"backend {meta['backend']}, attention {meta['attention']}, median of {args.repeats} runs", "",
             "| K | per_prompt=True (s) | K calls (s) | images repeated K times (s) | vs K calls | vs repeated |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompts']} | {r['per_prompt_s']:.3f} | {r['k_calls_s']:.3f} | "
                     f"{r['repeated_images_s']:.3f} | {r['speedup_vs_k_calls']:.1f}× | {r['speedup_vs_repeated']:.1f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
