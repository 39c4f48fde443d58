"""Gradient × activation baselines of the TokenTM paper: ``conservative_lrp`` and ``attcat`` (docs/methods.md
§6.2). Both are one forward and one backward, O(N·D) per layer beyond what the attention path keeps.

- ``conservative_lrp`` (Ali et al. 2022): gradient × input at the tokens entering block 1,
  ``e_j = Σ_d X⁰_{j,d} ∂s/∂X⁰_{j,d}``, with a backward in which the attention probabilities (AH-rule) and
  every LayerNorm's normalisation (LN-rule) are held constant.
- ``attcat`` (Qiang et al. 2022): with hˡ the tokens leaving block l and ∇hˡ = ∂s/∂hˡ, the D channels
  split into the H heads' groups: ``e_j = Σ_l mean_h (Aˡ_h[q, j] · Σ_{c ∈ group h} ∇hˡ_{j,c} hˡ_{j,c})``, with
  Aˡ_h[q, :] the query row (row cls; without a class token the mean over the pooled rows).

The LRP family (docs/methods.md §6.3; Chefer et al. 2021's rules, ``tokentm_fast.methods.lrp_rules``): one forward
records what the rules read (``RelevancePass``), then the relevance runs top-down from ``∂s/∂y`` at the output:

- ``lrp``: down to the pixels, summed over the colour channels, ``(B, H, W)``;
- ``partial_lrp``: ``mean_h max(R^{A_L}, 0)`` on the rows the head reads (``head_rows``);
- ``transformer_attribution``: ``Āˡ = mean_h max(∇Aˡ ⊙ R^{Aˡ}, 0)``, ``C = Π_l (Āˡ + I)`` from ``start_layer``.

An attention-pool head (SigLIP, CoCa) is run backwards with the same rules (``RelevancePass.attention_pool``);
partial LRP then reads R^{A_pool} and transformer attribution starts its row at the pool (docs/methods.md §6.3).

Each takes a sequence of targets and returns a ``(B, N−P)`` map per target (``lrp``: ``(B, H, W)``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..aggregation import check_layer_order
from ..capture import LayerRecorder, PointRecorder, PoolRecorder, prepared_model
from ..models.protocol import LinearPoint, ViTAdapter, merge_heads, no_relevance_pass, split_heads
from ..precision import compute_dtype
from ..targets import resolve_target, target_score
from ..torch_ops.head_fusion import fuse_heads
from . import lrp_rules
from .pool import first_latent

#: the attention pool's points the relevance pass reads (``PoolLinears`` fields)
POOL_POINTS = ("kv", "proj", "latent", "fc1", "fc2", "mlp")


def conservative_lrp(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
                     full: bool = False) -> List[torch.Tensor]:
    x0, grads = path.held_input_gradients(vit, images, targets)
    return [(x0 * g).sum(-1)[:, vit.num_prefix_tokens:] for g in grads]


def attcat(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
           full: bool = False) -> List[torch.Tensor]:
    heads, prefix = vit.num_heads, vit.num_prefix_tokens
    outs, grads, a_q = path.block_output_gradients(vit, images, targets)  # per layer (B, N, D), (B, H, N)

    def reduce(g_list):
        e = 0
        for h_l, g_l, a_l in zip(outs, g_list, a_q):
            cam = (g_l * h_l).unflatten(-1, (heads, -1)).sum(-1).transpose(1, 2)     # (B, H, N)
            e = e + (a_l * cam).mean(1)
        return e[:, prefix:]

    return [reduce(g) for g in grads]


# --------------------------------------------------------------------------- the LRP relevance pass
class RelevancePass:
    """One forward's tensors and the relevance rules applied to them top-down (docs/methods.md §6.3).

    The forward records, for each block in ``layers``, its input, queries, keys, values, attention
    probabilities, the attention branch and the MLP branch, and the inputs of its four linear maps
    (``vit.relevance_linears``; where a map is an ``nn.Linear`` of its own, also its output less the bias,
    ``x Wᵀ``, which spares the linear rule a product); the head's linear inputs (``vit.head_linears``); with ``pixels`` the
    patch embedding's input and output and the tokens after the position embedding
    (``vit.embedding_points``). The attention path (``path``: ``tokentm_fast.paths``) records what its
    ``attention_relevance`` reads (Aˡ, or the flash forward's q, k, ℓ) and runs the rules through the
    attention. ``grad_hook(l, grad)``: the forward builds a graph (block ``layers[0]``'s input is the leaf,
    ``recorder.leaf``) and the path calls the hook with layer l's attention gradient (∇Aˡ, or dOˡ on the
    flash path) as the backward reaches it. Nothing of the model is copied.
    """

    def __init__(self, vit: ViTAdapter, images: torch.Tensor, layers: Sequence[int], rules: str, path,
                 grad_hook=None, pixels: bool = False) -> None:
        self.vit, self.images, self.layers, self.rules = vit, images, list(layers), rules
        self.path, self.grad_hook = path, grad_hook
        self.acc = compute_dtype(images)
        head = vit.head_linears()
        points: Dict[Any, LinearPoint] = {("head", i): p for i, p in enumerate(head)}
        self.pool = None
        if vit.attention_pool is not None:
            pool = vit.pool_linears()
            self.pool = PoolRecorder(vit, queries_keys=True)
            self.pool_mlp = pool.mlp is not None
            points.update({("pool", name): getattr(pool, name) for name in POOL_POINTS
                           if getattr(pool, name) is not None})
        for l in self.layers:
            lin = vit.relevance_linears(l)
            points.update({(l, name): getattr(lin, name) for name in ("qkv", "proj", "fc1", "fc2")})
        if pixels:
            emb = vit.embedding_points()
            self.embedding = emb
            points.update({"conv_in": LinearPoint(emb.conv, emb.conv.weight),
                           "conv_out": LinearPoint(emb.conv, emb.conv.weight, output=True),
                           "tokens": emb.tokens})
        self.num_head = len(head)
        self.head_weights = [p.weight for p in head]
        self.weights = {key: p.weight for key, p in points.items()}
        self.keys = ("x_in", "q", "k", "bias", "values", "attn_out", "y", "mlp_out")
        self.recorder: Optional[LayerRecorder] = None
        self.points = PointRecorder(points)
        #: the linear maps whose output the forward records, less the bias: ``x Wᵀ`` without a product
        self.linears = {key: p.module for key, p in points.items() if _is_linear_module(p)}
        self.outputs: Dict[Any, Tuple[torch.Tensor, int]] = {}
        #: the linear rule's temporaries, reused from layer to layer (``lrp_rules.Scratch``)
        self.scratch = lrp_rules.Scratch()
        self.handles: list = []

    def forward(self, handles: list) -> torch.Tensor:
        """Install the recorders (undone by ``handles``) and run the model; its output ``(B, K)``."""
        self.recorder = self.path.record_relevance(self.vit, self.layers, self.keys, handles, self.grad_hook)
        self.points.install(handles)
        for key, module in self.linears.items():
            handles.append(module.register_forward_hook(self._record_output(key)))
        if self.pool is not None:
            self.pool.install(handles)
        output = self.vit.forward(self.images)
        if "conv_in" in self.points.values and self.points.values["conv_in"].shape != self.images.shape:
            raise no_relevance_pass("this patch embedding: its convolution does not read the pixels")
        return output

    def _value(self, key) -> torch.Tensor:
        return self.points.values[key].to(self.acc)

    def _record_output(self, key):
        """A forward hook keeping ``(output, its version)`` of linear ``key``, if the forward runs in the compute
        dtype (a half-precision output is too coarse for the rule's denominator). ``x Wᵀ`` = output − bias is
        formed when the rule runs: no second (…, out) tensor per linear (a fused qkv's output is alive anyway,
        through the q, k, v views the attention keeps), and the version tells whether the model changed the
        output in place since."""
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.dtype == self.acc:
                out = output.detach()
                self.outputs[key] = (out, out._version)
        return hook

    def _linear(self, key, r: torch.Tensor, x: Optional[torch.Tensor] = None, row: Optional[int] = None) -> torch.Tensor:
        """The linear rule at linear ``key`` (``lrp_rules.linear``) from ``r`` at its output: ``x`` its input
        (default: as recorded), ``row``: only that row of dimension 1 (the pool's first latent). Hands the
        rule the forward's ``x Wᵀ`` where it was recorded for this ``x`` and not changed in place since."""
        x = self._value(key) if x is None else x
        xw, bias = None, None
        if key in self.outputs:
            out, version = self.outputs[key]
            out = out if row is None else out[:, row]
            if out._version == version and out.shape == x.shape[:-1] + r.shape[-1:] and out.dtype == x.dtype:
                bias = self.linears[key].bias
                xw = out if bias is None else torch.sub(out, bias.detach(), out=self.scratch.take(out.shape, out))
        x = x if row is None else x[:, row]
        r_in = lrp_rules.linear(x, self.weights[key], r, self.rules, xw=xw, bias=bias, scratch=self.scratch)
        if bias is not None and xw is not None:
            self.scratch.give(xw)
        return r_in

    def head(self, r_out: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Relevance at the last block's output ``(B, N, D)`` from ``r_out`` ``(B, K)`` at the model output;
        with an attention-pool head also R^{A_pool} of its first latent over the N tokens ``(B, H, N)``
        (:meth:`attention_pool`), else None."""
        vit, r = self.vit, r_out.to(self.acc)
        inputs = []
        for i in range(self.num_head):
            x = self._value(("head", i))
            inputs.append(vit.pool_tokens(x) if x.dim() == 3 else x)
        for i in reversed(range(self.num_head)):
            r = self._linear(("head", i), r, inputs[i])
        rec = self.recorder.records[self.layers[-1]]
        tokens = (rec["y"] + rec["mlp_out"]).to(self.acc)          # the last block's output, which the head pools
        if self.pool is not None:
            return self.attention_pool(r, tokens.shape[1])
        if vit.pooling == "token":
            pooled = inputs[0] if inputs else r_out.to(self.acc)
            return lrp_rules.select_row(pooled, r, tokens.shape[1]), None
        if vit.pooling == "token_avg":
            return self._token_avg(r, inputs[0]), None
        return lrp_rules.mean_rows(tokens, r, vit.pooled_rows(tokens.shape[1])), None

    def _token_avg(self, r: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``"token_avg"`` (``concat(X̂_cls, mean_{j ∈ pooled rows} X̂_j)``, X̂ the tokens the head's first
        linear map reads as ``(B, N, D)``, after the final norm): ``r (B, 2·D)`` split at D, the class-row
        selection on the first half, the mean rule over the pooled rows (registers excluded) on the second;
        their sum at the tokens ``(B, N, D)`` (the final norm passes it on unchanged)."""
        normed = self._value(("head", 0))
        if normed.dim() != 3:
            raise no_relevance_pass(f"a 'token_avg' head whose first linear map of the {self.vit.family} adapter "
                                    f"does not read the tokens (B, N, D)")
        n, width = normed.shape[1], normed.shape[-1]
        out = lrp_rules.select_row(pooled[:, :width], r[:, :width], n)
        return out.add_(lrp_rules.mean_rows(normed, r[:, width:], self.vit.pooled_rows(n)))

    def attention_pool(self, r: torch.Tensor, num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The attention pool backwards from ``r`` ``(B, E)`` at its first latent (the only one the head
        reads; the selection passes relevance unchanged): the residual MLP (if any) as in a block, ``proj``,
        A·V and Q·Kᵀ as in a block (the queries' share stays with the learned latent, like a bias's), the
        key / value projection, the pool's norm unchanged. Relevance at the last block's output
        ``(B, N, D)`` (zero off the pool's columns) and R^{A_pool} of the first latent ``(B, H, N)``."""
        rec, acc, rules = self.pool.last, self.acc, self.rules
        attn = rec["attn"].detach()[:, :, :1].to(acc)                              # (B, H, 1, M)
        heads = attn.shape[1]
        if self.pool_mlp:
            a, m = self._value(("pool", "latent"))[:, 0], self._value(("pool", "mlp"))[:, 0]
            r_a, r_m = lrp_rules.add(a, m, r, rules)
            r_hidden = self._linear(("pool", "fc2"), r_m, row=0)
            r_norm = self._linear(("pool", "fc1"), r_hidden, row=0)
            r = lrp_rules.clone(a, r_a, r_norm)
        r_o = self._linear(("pool", "proj"), r, row=0)
        r_o = r_o.unflatten(-1, (heads, -1))[:, :, None]                            # (B, H, 1, d)
        v = split_heads(rec["values"].to(acc), heads)
        r_attn, r_v = lrp_rules.product(attn, v, r_o)
        _, r_kt = lrp_rules.product(rec["q"][:, :, :1].to(acc), rec["k"].to(acc).transpose(-1, -2), r_attn)
        r_kv = torch.cat([merge_heads(r_kt.transpose(-1, -2)), merge_heads(r_v)], dim=-1)   # (B, M, 2·E)
        r_read = self._linear(("pool", "kv"), r_kv)
        r_tokens = r_read.new_zeros(r_read.shape[0], num_tokens, r_read.shape[-1])
        r_tokens[:, self.vit.pool_columns(num_tokens)] = r_read
        return r_tokens, first_latent(self.vit, r_attn, num_tokens)

    def block(self, l: int, r: torch.Tensor, rows: Optional[torch.Tensor] = None,
              grad: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Block l: relevance at its input ``(B, N, D)`` from the relevance ``r`` at its output, and with
        ``rows`` ``(B, N)`` the sums ``t_j = Σ_i rows_i mean_h max(R^A_ij [· ∇A_ij], 0)`` ``(B, N)`` of its
        attention's relevance R^A (``grad``: the layer's attention gradient as the path delivers it; the
        path's ``attention_relevance``), else None."""
        rec, vit, acc, rules = self.recorder.records[l], self.vit, self.acc, self.rules
        heads = vit.num_heads
        x_in, y, m = (rec[key].to(acc) for key in ("x_in", "y", "mlp_out"))
        with torch.no_grad():
            a = vit.attn_output(l, rec["attn_out"]).to(acc)
        r_y, r_m = lrp_rules.add(y, m, r, rules)
        r_hidden = self._linear((l, "fc2"), r_m)
        r_norm2 = self._linear((l, "fc1"), r_hidden)
        r_x, r_a = lrp_rules.add(x_in, a, lrp_rules.clone(y, r_y, r_norm2), rules)
        r_o = split_heads(self._linear((l, "proj"), r_a), heads)
        logits = (lambda r_attn: self._logits(rec, r_attn)) if "bias" in rec else None
        r_q, r_k, r_v, t = self.path.attention_relevance(rec, r_o, rows=rows, grad=grad, logits=logits,
                                                          rules=self.rules)
        r_qkv = torch.cat([merge_heads(r_q), merge_heads(r_k), merge_heads(r_v)], dim=-1)
        r_norm1 = self._linear((l, "qkv"), r_qkv)
        return lrp_rules.clone(x_in, r_x, r_norm1), t

    def _logits(self, rec: Dict[str, torch.Tensor], r_attn: torch.Tensor) -> torch.Tensor:
        """The relevance of q kᵀ ``(B, H, N, N)`` from ``r_attn`` at the logits (the softmax passes it on)
        with BEiT's relative position bias: logits = scale · (q kᵀ + B/scale), the add rule's share of q kᵀ
        (the bias's share is dropped, like the position embedding's)."""
        q, k = rec["q"].to(self.acc), rec["k"].to(self.acc)
        return lrp_rules.add(q @ k.transpose(-1, -2), rec["bias"].to(self.acc), r_attn, self.rules)[0]

    def pixels(self, r0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Relevance at the pixels summed over the colour channels ``(B, H, W)`` from ``r0`` at the first
        block's input, and what the position embedding and the prefix tokens keep (``(B,)`` each)."""
        emb, prefix = self.embedding, self.vit.num_prefix_tokens
        z = self._value("tokens")
        patches = self._value("conv_out")                                      # (B, D, gh, gw)
        b = z.shape[0]
        e = torch.cat([emb.prefix.to(self.acc).expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        r_e, r_pos = lrp_rules.add(e, z - e, r0, self.rules)
        r_patch = r_e[:, prefix:].transpose(1, 2).reshape(patches.shape)
        r_pixels = lrp_rules.patch_embedding(self.images.to(self.acc), emb.conv, r_patch)
        shares = {"position": r_pos.sum((1, 2)), "prefix": r_e[:, :prefix].sum((1, 2))}
        return r_pixels.sum(1), shares


def _is_linear_module(point: LinearPoint) -> bool:
    """Whether ``point`` reads the input of a ``nn.Linear`` with the point's weight (its output is ``W x + b``)."""
    return not point.output and isinstance(point.module, nn.Linear) and point.module.weight is point.weight


def head_rows(vit: ViTAdapter, b: int, n: int, dtype, device) -> torch.Tensor:
    """``(B, N)`` weights of the rows the head reads, where the relevance enters the last block: the class
    token for token pooling, else ``1/n`` on the pooled rows (``vit.query_vector`` for every model but a
    mean-pooled one with a class token, whose class row receives no relevance); ``"token_avg"`` (class
    token ⊕ patch mean): ``½ one_hot(cls) + ½ · 1/n`` on the pooled rows (docs/methods.md §6.3)."""
    if vit.pooling == "token":
        return vit.query_vector(b, n, dtype=dtype, device=device)
    q = torch.zeros(b, n, dtype=dtype, device=device)
    rows = vit.pooled_rows(n)
    q[:, rows] = 1.0 / (rows.stop - rows.start)
    if vit.pooling == "token_avg":
        q.mul_(0.5)[:, 0] += 0.5
    return q


def _output_relevances(output: torch.Tensor, targets: Sequence) -> list:
    """The relevance at the model output per target: ``∂s/∂y`` (a class target: ``one_hot``, the authors'
    start; a score function: its gradient)."""
    y = output.detach().requires_grad_(True)
    with torch.enable_grad():
        return [torch.autograd.grad(target_score(y, resolve_target(t, y)), [y])[0] for t in targets]


def _finish_rows(vit: ViTAdapter, e: torch.Tensor) -> torch.Tensor:
    return e[:, vit.num_prefix_tokens:]


def lrp(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
        full: bool = False) -> List[torch.Tensor]:
    """Full LRP: the relevance pass down to the pixels, summed over the colour channels, ``(B, H, W)``."""
    run = RelevancePass(vit, images, range(vit.num_layers), options["rules"], path, pixels=True)
    with prepared_model(vit) as handles, torch.no_grad():
        output = run.forward(handles)
        maps = []
        for r_out in _output_relevances(output, targets):
            r, _ = run.head(r_out)
            for l in reversed(run.layers):
                r, _ = run.block(l, r)
            maps.append(run.pixels(r)[0])
    return maps


def partial_lrp(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any], path,
                full: bool = False) -> List[torch.Tensor]:
    """Partial LRP: ``e = mean_h max(R^{A_L}, 0)`` on the query row; with an attention-pool head
    ``mean_h max(R^{A_pool}, 0)`` of its first latent (the pool is the last attention)."""
    top = vit.num_layers - 1
    run = RelevancePass(vit, images, [top], options["rules"], path)
    with prepared_model(vit) as handles, torch.no_grad():
        output = run.forward(handles)
        b, n = images.shape[0], run.recorder.first_input.shape[1]
        maps = []
        for r_out in _output_relevances(output, targets):
            r, r_pool = run.head(r_out)
            if r_pool is not None:
                maps.append(_finish_rows(vit, r_pool.clamp(min=0).mean(1)))
                continue
            _, t = run.block(top, r, rows=head_rows(vit, b, n, run.acc, images.device))
            maps.append(_finish_rows(vit, t))
    return maps


def transformer_attribution(vit: ViTAdapter, images: torch.Tensor, targets: Sequence, options: Dict[str, Any],
                            path, full: bool = False) -> List[torch.Tensor]:
    """Transformer Attribution: ``Āˡ = mean_h max(∇Aˡ ⊙ R^{Aˡ}, 0)``, ``C = Π (Āˡ + I)`` over the blocks from
    ``start_layer`` (no row normalisation): GAE's row update with R^{Aˡ} in place of Aˡ, ``r ← r + r Āˡ``,
    run inside the backward pass as each layer's attention gradient arrives (∇Aˡ, or dOˡ on the flash path),
    the relevance pass one block ahead of it. With an attention-pool head the row starts at
    ``mean_h max(∇A_pool ⊙ R^{A_pool}, 0)`` of its first latent, as GAE's does."""
    layers = list(range(options["start_layer"], vit.num_layers))
    state: Dict[str, Any] = {}

    def layer_hook(l: int, grad: torch.Tensor) -> None:
        check_layer_order(l, state["next"])
        with torch.no_grad():
            state["r"], t = run.block(l, state["r"], rows=state["rows"], grad=grad)
            state["rows"] = state["rows"] + t
        state["next"] = l - 1 if l > layers[0] else None

    def pool_hook(grad: torch.Tensor) -> None:
        with torch.no_grad():
            g = first_latent(vit, grad.to(run.acc), state["r_pool"].shape[-1])
            state["rows"] = fuse_heads(state["r_pool"], g, "gae")                       # mean_h max(R ⊙ ∇A, 0)

    run = RelevancePass(vit, images, layers, "ours", path, grad_hook=layer_hook)
    with prepared_model(vit) as handles, torch.enable_grad():
        output = run.forward(handles)
        if run.pool is not None:
            run.pool.last["attn"].register_hook(pool_hook)
        resolved = [resolve_target(t, output) for t in targets]
        leaf = run.recorder.leaf
        b, n = output.shape[0], leaf.shape[1]
        maps = []
        for i, (t, r_out) in enumerate(zip(resolved, _output_relevances(output, targets))):
            with torch.no_grad():
                r, r_pool = run.head(r_out)
                state.update(r=r, r_pool=r_pool, next=layers[-1],
                             rows=None if r_pool is not None else head_rows(vit, b, n, run.acc, images.device))
            torch.autograd.grad(target_score(output, t), [leaf], retain_graph=i < len(resolved) - 1)
            maps.append(_finish_rows(vit, state["rows"]))
    return maps
