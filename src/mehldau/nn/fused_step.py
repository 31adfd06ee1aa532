"""One sampled token through a relative-attention decoder, with fused weights (sampling only).

A KV-cached step through the modules (`Block.forward`) is the plain path; this is the fast
one, tested to sample the same tokens. Per layer it does one fused q/k/v product, reads the
relative term for the single new query as a contiguous slice of the table, and skips what one
query at the end of the cache does not need (the causal mask: it may see every cached key;
the index gather of `relative_logits_gather`; dropout).

Why hand-written: no library we keep decodes Music Transformer relative attention, and how
the weights are stored matters on CPU. A step is a few products of a handful of rows with
every weight matrix, bound by reading the weights, and which layout reads them fastest
depends on the machine, so on CPU (fp32) the step is built in each of three, and each kind
of product (q/k/v, output projection, feed-forward up with its GELU, down with its residual
add, head) keeps the layout that ran it fastest there, timed when the step is built
(building the three and timing them took 0.1-0.4 s for the base presets here, once per model
and batch size):
- `onednn`: the weights reordered into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, the form torch.compile's CPU backend freezes
  weights into), multiplied by `torch.ops.mkldnn._linear_pointwise` with GELU and the residual
  add fused into the product;
- `blas`: the weights transposed once to (in, out), multiplied by `torch.addmm`;
- `dense`: the module's (out, in) weights through `F.linear`, the only kernel on other devices
  and dtypes.
On one 2-core CPU the base preset's 25 products per token took 3.8 ms through `onednn`
against 6.4 ms through `dense` at batch 1; on another of the same family (AVX-512, 260 MB of
L3), 1.95 ms through `onednn`, 1.38 ms through `dense` and 1.48 ms through `blas` at batch 1,
and 2.64, 3.14 and 1.86 ms at batch 8 (`benchmarks/sampling.py` prints the whole step). The
kernels round differently in the last bits, so on a near tie between two tokens' probabilities
a seed could sample differently on another machine; `MEHLDAU_STEP_KERNEL=onednn|blas|dense`
fixes the kernel.

The weights are copied from the model when the step is built, kept on the model for the
next sample, and copied again once any parameter has changed: LoRA must be merged first (the
generate path loads merged models). A model whose projections are not plain `nn.Linear`
(peft-wrapped, 4-bit) is refused by `FusedStep.supports`, and the caller keeps the plain
path.
"""

from __future__ import annotations

import copy
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mehldau.nn.relative_attention import StaticKV


def onednn_available(weight: Tensor) -> bool:
    """Whether `weight`'s products can run on oneDNN-packed copies (fp32 on CPU)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops: present in every oneDNN build of torch 2.x, checked all the same
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


KERNELS = ("onednn", "blas", "dense")
KERNEL_ENV = "MEHLDAU_STEP_KERNEL"
SLOTS = ("qkv", "o", "up", "down", "head")  # the kinds of product a step makes


def kernels_for(weight: Tensor) -> list[str]:
    """The kernels a step over weights like `weight` may use, the `MEHLDAU_STEP_KERNEL` one
    alone where it is set (and usable)."""
    usable = ["dense"]
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        usable = (["onednn"] if onednn_available(weight) else []) + ["blas", "dense"]
    forced = os.environ.get(KERNEL_ENV)
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"{KERNEL_ENV}={forced!r} is not a kernel; use one of "
                             f"{', '.join(KERNELS)} or unset it")
        return [forced] if forced in usable else ["dense"]
    return usable


def _pack(w: Tensor, b: Tensor | None, rows: int, kernel: str) -> tuple[Tensor, Tensor | None]:
    """w (out, in) in `kernel`'s layout."""
    if kernel == "onednn":
        # the reorder's batch hint picks oneDNN's blocking; packing for 1 row ran 1.5x slower
        # at 8 rows than packing for 8, so the copy is made for the rows it serves
        return torch.ops.mkldnn._reorder_linear_weight(w, rows), b
    if kernel == "blas":
        return w.t().contiguous(), b  # (in, out): a plain row-major product, no transpose
    return w, b


def _linear(x: Tensor, wb: tuple[Tensor, Tensor | None], kernel: str, gelu: bool = False,
            residual: Tensor | None = None) -> Tensor:
    """x W^T + b, then GELU, or plus `residual`. oneDNN fuses either into the product, which
    saves a pass over the activations and an operator call per use (each call costs
    microseconds that a 6-layer step repeats dozens of times); addmm takes an unbiased
    product's residual as its addend."""
    w, b = wb
    if kernel == "onednn":
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    if kernel == "blas":  # w: (in, out)
        if residual is not None and b is None:
            return torch.addmm(residual, x, w)
        y = torch.mm(x, w) if b is None else torch.addmm(b, x, w)
    else:  # w: (out, in)
        y = F.linear(x, w, b)
    if residual is not None:
        return residual + y
    return F.gelu(y) if gelu else y


class _Layer:
    """One block's weights for a step: fused q/k/v, the output projection, the feed-forward
    (gate and up fused for SwiGLU), the two norms and the relative table; each product in the
    layout of its slot's kernel."""

    def __init__(self, block: nn.Module, rows: int, kernels: dict[str, str]) -> None:
        a, m = block.attn, block.mlp
        self.heads, self.head_dim = a.n_heads, a.head_dim
        self.rel = a.rel_emb.detach() if a.impl != "sdpa" else None  # (H, R, Dh)
        self.ln1 = (block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_1.eps)
        self.ln2 = (block.ln_2.weight.detach(), block.ln_2.bias.detach(), block.ln_2.eps)
        self.swiglu = m.swiglu
        self.rows, self.kernels = rows, kernels
        self.w = {"qkv": self._pack_qkv(a), "o": self._pack("o", [a.o_proj]),
                  "up": self._pack("up", [m.gate_proj, m.up_proj] if m.swiglu else [m.up_proj]),
                  "down": self._pack("down", [m.down_proj])}

    def _pack(self, slot: str, linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
        w = torch.cat([lin.weight.detach() for lin in linears])  # (out, in)
        b = None
        if linears[0].bias is not None:
            b = torch.cat([lin.bias.detach() for lin in linears])
        return _pack(w, b, self.rows, self.kernels[slot])

    def _pack_qkv(self, a: nn.Module) -> tuple[Tensor, Tensor | None]:
        """q, k and v in one product whose output is head-major, (H, 3, Dh) per row: every
        head's q, k and v then sit at one stride apart across batch rows and heads, so the
        attention below views them as (B*H, Dh) without a copy. 1/sqrt(Dh) is folded into the
        q rows: a power of two for the presets' head sizes, so exact there."""
        H, Dh, C = self.heads, self.head_dim, a.d_model
        scale = [Dh**-0.5, 1.0, 1.0]
        projs = (a.q_proj, a.k_proj, a.v_proj)
        w = torch.stack([p.weight.detach() * s for p, s in zip(projs, scale)])  # (3, C, C)
        w = w.view(3, H, Dh, C).transpose(0, 1).reshape(3 * C, C)  # rows (H, 3, Dh)
        b = None
        if a.q_proj.bias is not None:
            b = torch.stack([p.bias.detach() * s for p, s in zip(projs, scale)])  # (3, C)
            b = b.view(3, H, Dh).transpose(0, 1).reshape(3 * C)
        return _pack(w, b, self.rows, self.kernels["qkv"])

    def linear(self, slot: str, x: Tensor, gelu: bool = False,
               residual: Tensor | None = None) -> Tensor:
        return _linear(x, self.w[slot], self.kernels[slot], gelu, residual)

    def __call__(self, x: Tensor, cache: StaticKV) -> Tensor:
        """x (B, C): the new token's hidden state; its keys and values join `cache`."""
        qkv = self.project(x)
        S = cache.append(qkv[:, :, 1], qkv[:, :, 2])  # keys 0..S-1, the new one last
        return self.finish(x, self.attend(qkv[:, :, 0], cache.k[:, :, :S], cache.v[:, :, :S]))

    def project(self, x: Tensor) -> Tensor:
        """x (B, C) -> q, k, v (B, H, 3, Dh), q already scaled."""
        B, C = x.shape
        h = F.layer_norm(x, (C,), *self.ln1[:2], self.ln1[2])
        return self.linear("qkv", h).view(B, self.heads, 3, self.head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, Dh) for the newest position against k, v (B, H, S, Dh), the new key last:
        (B*H, 1, Dh)."""
        S = k.shape[2]
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # (B*H, S, Dh): views of the cache
        qh = q.flatten(0, 1).unsqueeze(1)  # (B*H, 1, Dh)
        if self.rel is None:
            scores = torch.bmm(qh, k.mT)  # (B*H, 1, S)
        else:
            # Key j is at distance S-1-j; table row R-1-d holds distance d, so the keys within
            # reach (the last min(S, R)) read the table's last rows in order: a slice. Heads
            # are the batch of this product, so the table is read once for all B rows.
            R = self.rel.shape[1]
            n = min(S, R)
            rel = self.relative(q, R - n)  # (B*H, 1, n)
            if n == S:  # every key within reach: the term enters the q.k product
                scores = torch.baddbmm(rel, qh, k.mT)  # (B*H, 1, S)
            else:
                scores = torch.bmm(qh, k.mT)
                scores[:, :, S - n:] += rel
        return torch.bmm(scores.softmax(-1), v)  # (B*H, 1, Dh)

    def relative(self, q: Tensor, first: int = 0) -> Tensor:
        """q (B, H, Dh) against the relative table's rows `first`.. (distances R-1-first down
        to 0): (B*H, 1, R - first)."""
        B, H, _ = q.shape
        rel = torch.bmm(q.transpose(0, 1), self.rel[:, first:].mT)  # (H, B, n)
        return rel.transpose(0, 1).reshape(B * H, 1, rel.shape[-1]) if B > 1 else rel

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        """The rest of the block after attention: x (B, C), y (B*H, 1, Dh) -> (B, C)."""
        B, C = x.shape
        x = self.linear("o", y.view(B, C), residual=x)
        h = F.layer_norm(x, (C,), *self.ln2[:2], self.ln2[2])
        if self.swiglu:
            gate, up = self.linear("up", h).chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = self.linear("up", h, gelu=True)
        return self.linear("down", u, residual=x)


# Kept beside the model rather than on it: oneDNN-packed tensors can be neither deep-copied nor
# pickled, and a model that has sampled may be both (QLoRA's reference copy, torch.save).
_STEPS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[int, FusedStep]]] = (
    weakref.WeakKeyDictionary())


class FusedStep:
    """next-token logits (B, V) for one new token per row, against per-layer `StaticKV`s.

    For the models built by `mehldau.nn.blocks.decoder_parts` (the Music Transformer and
    Perceiver AR, whose cached step runs every layer as a plain causal block)."""

    KEEP = 4  # batch sizes whose copies `for_model` keeps per model

    def __init__(self, model: nn.Module, rows: int, kernel: str | dict[str, str] = "dense"
                 ) -> None:
        """`kernel`: one for every product, or one per slot (`SLOTS`)."""
        kernels = (dict.fromkeys(SLOTS, kernel) if isinstance(kernel, str)
                   else {slot: kernel[slot] for slot in SLOTS})
        ref = model.lm_head.weight
        self.embed = model.embed_tokens.weight.detach()  # (V, C)
        self.layers = [_Layer(block, rows, kernels) for block in model.layers]
        n = model.norm
        self.norm = (n.weight.detach(), n.bias.detach(), n.eps)
        self.rows, self.kernels = rows, kernels
        self.head = _pack(ref.detach(), None, rows, kernels["head"])
        self.seconds: dict[str, float] = {}  # each kernel's products, where they were timed

    @property
    def kernel(self) -> str:
        """The kernel's name, or each slot's where they differ."""
        names = set(self.kernels.values())
        if len(names) == 1:
            return names.pop()
        return ", ".join(f"{slot} {k}" for slot, k in self.kernels.items())

    @classmethod
    def fastest(cls, model: nn.Module, rows: int, rounds: int = 3) -> FusedStep:
        """The step whose every kind of product (`SLOTS`) runs in the kernel that ran it
        fastest here, with its GELU or residual add (`products`): each kernel's step built
        in turn, then timed in rounds that alternate between them (a slow spell of a shared
        machine falls on all), best of `rounds` after a warm-up. Timing the products bare
        chose `dense` at batch 8 on one host, where its unfused GELU made it the slowest."""
        steps = {k: cls(model, rows, k) for k in kernels_for(model.lm_head.weight)}
        if len(steps) == 1:
            return next(iter(steps.values()))
        best = {(k, slot): float("inf") for k in steps for slot in SLOTS}
        for r in range(rounds + 1):
            for k, step in steps.items():
                spent = step.products()
                if r:  # the first round is a warm-up
                    for slot, t in spent.items():
                        best[k, slot] = min(best[k, slot], t)
        chosen = {slot: min(steps, key=lambda k: best[k, slot]) for slot in SLOTS}
        step = steps[chosen["qkv"]]
        if len(set(chosen.values())) > 1:
            step = copy.copy(step)  # shares the chosen kernels' copies, copies nothing
            step.kernels, step.layers = chosen, []
            for i, layer in enumerate(steps[chosen["qkv"]].layers):
                mixed = copy.copy(layer)
                mixed.kernels = chosen
                mixed.w = {slot: steps[k].layers[i].w[slot] for slot, k in chosen.items()
                           if slot != "head"}
                step.layers.append(mixed)
            step.head = steps[chosen["head"]].head
        step.seconds = {k: sum(best[k, slot] for slot in SLOTS) for k in steps}
        return step

    @torch.no_grad()
    def products(self) -> dict[str, float]:
        """Every matrix product of one step, once, with its GELU or residual add, on scratch
        rows: what reading the weights costs, without attention or sampling (the kernel choice
        and the benchmark's bound). The seconds each slot's products took."""
        x: dict[int, Tensor] = {}

        def rows_of(n: int) -> Tensor:
            if n not in x:
                x[n] = torch.zeros(self.rows, n, dtype=self.embed.dtype,
                                   device=self.embed.device)
            return x[n]

        spent = dict.fromkeys(SLOTS, 0.0)
        work = [(slot, layer.w[slot], layer.swiglu) for layer in self.layers
                for slot in ("qkv", "o", "up", "down")] + [("head", self.head, False)]
        for slot, wb, swiglu in work:
            kernel = self.kernels[slot]
            w = wb[0]
            fan_in, fan_out = (w.shape if kernel == "blas" else w.shape[::-1])[:2]
            residual = rows_of(fan_out) if slot in ("o", "down") else None
            t0 = time.perf_counter()
            _linear(rows_of(fan_in), wb, kernel, gelu=slot == "up" and not swiglu,
                    residual=residual)
            spent[slot] += time.perf_counter() - t0
        return spent

    def logits(self, x: Tensor) -> Tensor:
        """The last hidden state (B, C) -> next-token logits (B, V)."""
        x = F.layer_norm(x, (x.shape[-1],), *self.norm[:2], self.norm[2])
        return _linear(x, self.head, self.kernels["head"])

    @classmethod
    def for_model(cls, model: nn.Module, rows: int) -> FusedStep:
        """The step for `model` at `rows` rows, built once and kept beside the model: building
        copies every weight (0.4-1.2 s for the base preset on a busy 2-core CPU), which would
        otherwise delay every sample's first note. One copy per batch size (a page at batch 1
        and a comparison at batch 8 do not rebuild in turn), the last `KEEP` of them. All are
        rebuilt once any parameter has changed, in place (its version counter) or replaced
        (its storage)."""
        weights = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
        kept = _STEPS.get(model)
        if kept is None or kept[0] != weights:
            kept = _STEPS[model] = (weights, {})
        steps = kept[1]
        if rows not in steps:
            if len(steps) >= cls.KEEP:
                del steps[next(iter(steps))]  # the oldest
            steps[rows] = cls.fastest(model, rows)
        return steps[rows]

    @staticmethod
    def kept(model: nn.Module) -> list[FusedStep]:
        """The steps `for_model` keeps for `model` now (those of its current weights)."""
        kept = _STEPS.get(model)
        return list(kept[1].values()) if kept is not None else []

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Plain linear projections, no dropout active: what the fused copy can stand for."""
        if model.training:
            return False
        for block in model.layers:
            parts = [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                     block.mlp.up_proj, block.mlp.down_proj]
            if block.mlp.swiglu:
                parts.append(block.mlp.gate_proj)
            if any(type(p) is not nn.Linear for p in parts):
                return False
        return type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding

    @torch.no_grad()
    def __call__(self, token: Tensor, caches: list[StaticKV]) -> Tensor:
        x = self.embed[token]  # (B, C)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache)
        return self.logits(x)  # (B, V)
