"""Models, images and the baselines the benchmarks time explanations against.

- ``random_vit(name, device, dtype, fused_attn, **kwargs)``: a random-init timm
  ViT (qkv weights ×2 so that attention is not nearly uniform).
- ``random_images(model, batch, device)``: images of the model's input size and
  fixed random target classes.
- ``training_step``: the training-step baseline of the performance protocol
  (``benchmarks/README.md``) and of every suite
  that compares with a step (``test_bench_perf.py``, ``test_bench_explain.py``,
  ``peak_memory.py``): forward, target logit summed, backward with parameter
  gradients, fused attention on (timm's default: SDPA), then
  ``zero_grad(set_to_none=True)``.
- ``literal_explain``: TokenTM / GAE written the way the authors' code is
  written, in the model's own dtype: hooks record every layer's full
  ``(B, H, N, N)`` attention and its gradient, then the recursion
  ``C ← U C`` with full N×N matrices (docs/methods.md §3, §4).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Tuple, Union

import torch
from torch import nn

Device = Union[str, torch.device]


def random_vit(name: str, device: Device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               fused_attn: bool = False, **kwargs) -> nn.Module:
    """A random-init timm model in eval mode; ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size``).

    The qkv weights are scaled ×2 so that attention is not nearly uniform, as it
    is right after timm's init (the explanations then depend on every term).
    Much sharper attention (×4: attention logits ×16) makes the model's *own*
    float32 forward differ from its float64 forward by ~5e-4 at ViT-B depth,
    which no float32 path can beat. ``fused_attn`` sets every attention
    module's flag (explanation calls switch it off during the call themselves).
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "qkv.weight" in n:
                p.mul_(2.0)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused_attn
    return model.eval().to(device=device, dtype=dtype)


def random_images(model: nn.Module, batch: int, device: Device, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)``: random images of the model's input size and dtype, fixed random classes."""
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    dtype = next(model.parameters()).dtype
    images = torch.randn(batch, 3, *size, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return images, target


def model_shape(model: nn.Module) -> Dict[str, int]:
    """``L, H, D, N, params, image_pixels, itemsize`` of a timm ViT (for the memory estimates)."""
    blk = model.blocks[0]
    h, w = model.patch_embed.img_size
    n = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    p = next(model.parameters())
    return dict(L=len(model.blocks), H=blk.attn.num_heads, D=model.embed_dim, N=n,
                params=sum(t.numel() for t in model.parameters()), image_pixels=h * w, itemsize=p.element_size())


def _score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target[:, None]).sum()


@contextmanager
def _fused(model: nn.Module, flag: bool) -> Iterator[None]:
    mods = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in mods:
            m.fused_attn = flag
        yield
    finally:
        for m, old in mods:
            m.fused_attn = old


def training_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The training-step baseline of the performance protocol: forward, target logit summed, backward with
    parameter gradients (fused attention on, whatever the model's flags; they are restored), then
    ``zero_grad(set_to_none=True)``. Each call returns the (detached) score, for a finiteness check."""

    def step():
        with _fused(model, True):
            score = _score(model(images), target)
            score.backward()
        model.zero_grad(set_to_none=True)
        return score.detach()

    return step


def literal_explain(model: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str = "tokentm") -> torch.Tensor:
    """TokenTM (or GAE) the literal way, in the model's dtype: ``(B, N−P)`` (float32 result).

    Forward hooks save every block's attention probabilities ``(B, H, N, N)``
    (and a tensor hook their gradient) and the tokens of the transformation
    weights; the target logit is back-propagated (parameter gradients included,
    as the authors' code does; they are dropped afterwards); then per layer
    Ā = mean_h max(A ⊙ G, 0), U = (I + diag w_mlp)(I + Ā diag w_attn), C ← U C
    with N×N matrices, and the map is row ``cls`` of Cᴸ. GAE: w_attn = 1,
    w_mlp = 0, C⁰ = I. Only the weights (docs/methods.md §2) are computed in
    float32 (``tokentm_fast.torch_ops.transform_weights``), everything else in the model's dtype.
    """
    from tokentm_fast.precision import token_lengths
    from tokentm_fast.torch_ops.transform_weights import transform_weights

    if method not in ("tokentm", "gae"):
        raise ValueError(f"literal_explain: method must be 'tokentm' or 'gae', got {method!r}")
    recs: List[Dict[str, torch.Tensor]] = [dict() for _ in model.blocks]
    handles = []

    def block_hook(l):
        def hook(mod, args, out):
            recs[l]["x_in"] = args[0]
        return hook

    def attn_hook(l):
        def hook(mod, args, out):
            recs[l]["attn"] = out
            out.register_hook(lambda g: recs[l].__setitem__("grad", g))
        return hook

    def qkv_hook(l):
        def hook(mod, args, out):
            recs[l]["v"] = out[..., 2 * out.shape[-1] // 3:]
        return hook

    def norm2_hook(l):
        def hook(mod, args, out):
            recs[l]["y"] = args[0]
        return hook

    def ls2_hook(l):
        def hook(mod, args, out):
            recs[l]["mlp_out"] = out
        return hook

    for l, blk in enumerate(model.blocks):
        handles += [blk.register_forward_hook(block_hook(l)), blk.attn.attn_drop.register_forward_hook(attn_hook(l)),
                    blk.attn.qkv.register_forward_hook(qkv_hook(l)), blk.norm2.register_forward_hook(norm2_hook(l)),
                    blk.ls2.register_forward_hook(ls2_hook(l))]
    try:
        with _fused(model, False):
            _score(model(images), target).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        x0 = recs[0]["x_in"]
        b, n, _ = x0.shape
        dtype = x0.dtype
        eye = torch.eye(n, dtype=dtype, device=x0.device).expand(b, n, n)
        c = torch.diag_embed(token_lengths(x0).to(dtype)) if method == "tokentm" else eye.clone()
        for l, blk in enumerate(model.blocks):
            r = recs[l]
            a_bar = (r["attn"] * r["grad"]).clamp_min(0).mean(1)
            if method == "gae":
                c = c + a_bar @ c
                continue
            x_tilde = blk.ls1(blk.attn.proj(blk.attn.norm(r["v"])))
            w_attn = transform_weights(r["x_in"], x_tilde).to(dtype)
            w_mlp = transform_weights(r["y"], r["mlp_out"]).to(dtype)
            u_attn = eye + a_bar @ torch.diag_embed(w_attn)
            u_mlp = eye + torch.diag_embed(w_mlp)
            c = u_mlp @ (u_attn @ c)
            recs[l] = {}  # what the authors' code would keep is timed; the memory goes as it is used
        prefix = getattr(model, "num_prefix_tokens", 1)
        return c[:, 0, prefix:].float()
