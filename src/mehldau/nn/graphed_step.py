"""The one-token step recorded as a CUDA graph and replayed with one launch (sampling only).

Why: on a GPU, a step of the base preset is about a hundred small kernels (products of one row,
layer norms, a softmax over a few hundred keys); each runs for a few microseconds and takes as
long again to launch from Python, so at batch 1 the GPU mostly waits for the host. A CUDA
graph records the kernels once and replays all of them from one call. A graph replays fixed
shapes at fixed addresses, so this step differs from `FusedStep` (whose weights and layers it
uses) in two ways:
- each layer attends over its cache's whole capacity, the new token's position read from a
  device tensor and the keys past it masked out (-inf, so weight 0 after the softmax); the
  relative term is gathered from the table by distance, 0 beyond its reach, as the plain path
  adds nothing there;
- the caches live in buffers the graph owns: a decoder's freshly built `StaticKV`s (after a
  prefill or a rebuild) are copied in on their first step and then point at those buffers.
Sampling (the draw, the grammar mask) stays outside the graph, in the loop that every path
shares.

The same masked step runs without a graph (`capture=False`, and on devices other than CUDA):
the reference a graph is tested against, itself tested to sample what the plain path does.
`torch.compile(mode="reduce-overhead")` records graphs too, but it would trace our step again
for every cached length unless the step took this masked form anyway; by hand the graph is a
dozen lines and needs no compiler at run time. `MEHLDAU_CUDA_GRAPH=0` turns graphs off.
On one H200 (bf16) the graph ran the base presets' sampling 3.8-3.9x faster than the same
step launched kernel by kernel at batch 1, and 3.0-3.3x at batch 8 (`benchmarks/sampling.py
--device cuda --dtype bf16`).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn

from mehldau.nn.fused_step import FusedStep, _Layer
from mehldau.nn.relative_attention import StaticKV

GRAPH_ENV = "MEHLDAU_CUDA_GRAPH"


def graphs_wanted(device: torch.device) -> bool:
    """Whether a decoder on `device` records its step as a CUDA graph by default."""
    return device.type == "cuda" and os.environ.get(GRAPH_ENV, "1") != "0"


def attend_masked(layer: _Layer, q: Tensor, k: Tensor, v: Tensor, dist: Tensor) -> Tensor:
    """q (B, H, Dh) against a whole cache k, v (B, H, N, Dh) whose key j lies `dist[j]` tokens
    before the new one (negative: not written yet, masked): (B*H, 1, Dh)."""
    qh = q.flatten(0, 1).unsqueeze(1)  # (B*H, 1, Dh)
    scores = torch.bmm(qh, k.flatten(0, 1).mT)  # (B*H, 1, N)
    if layer.rel is not None:
        R = layer.rel.shape[1]
        rel = layer.relative(q)  # (B*H, 1, R): row R-1-d holds distance d
        idx = (R - 1 - dist).clamp(0, R - 1).expand(rel.shape[0], 1, -1)
        within = (dist >= 0) & (dist < R)
        scores = scores + torch.where(within, rel.gather(-1, idx), 0.0)
    scores = scores.masked_fill(dist < 0, float("-inf"))
    return torch.bmm(scores.softmax(-1), v.flatten(0, 1))  # (B*H, 1, Dh)


class GraphedStep:
    """Next-token logits (B, V) for one new token per row, the `FusedStep` call, over caches
    of fixed `capacities` (one per layer), as one CUDA graph where `capture`."""

    def __init__(self, step: FusedStep, capacities: list[int], capture: bool = True) -> None:
        if len(capacities) != len(step.layers):
            raise ValueError(f"{len(step.layers)} layers but {len(capacities)} capacities")
        self.step, self.capacities = step, list(capacities)
        B, emb = step.rows, step.embed
        self.k = [emb.new_zeros(B, layer.heads, n, layer.head_dim)  # zeros: a masked key's
                  for layer, n in zip(step.layers, capacities)]  # weight 0 times NaN is NaN
        self.v = [torch.zeros_like(k) for k in self.k]
        self.token = torch.zeros(B, dtype=torch.long, device=emb.device)
        self.pos = torch.zeros(len(capacities), 1, dtype=torch.long, device=emb.device)
        self.keys = {n: torch.arange(n, device=emb.device) for n in set(capacities)}
        self.loaded: list[StaticKV] | None = None
        self.owner: weakref.ref | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    @torch.no_grad()
    def _run(self) -> Tensor:
        s = self.step
        x = s.embed[self.token]  # (B, C)
        for i, layer in enumerate(s.layers):
            qkv = layer.project(x)  # (B, H, 3, Dh)
            pos = self.pos[i]  # (1,): where the new token's key goes
            self.k[i].index_copy_(2, pos, qkv[:, :, 1:2])
            self.v[i].index_copy_(2, pos, qkv[:, :, 2:3])
            dist = pos - self.keys[self.capacities[i]]  # (N,)
            x = layer.finish(x, attend_masked(layer, qkv[:, :, 0], self.k[i], self.v[i], dist))
        logits = s.logits(x)  # (B, V)
        self.pos.add_(1)
        return logits

    def claim(self, owner: object) -> bool:
        """Whether `owner` (a decoder) may use this step: it is free or already `owner`'s. One
        decoder at a time, since the graph's buffers hold that decoder's caches."""
        held = self.owner() if self.owner is not None else None
        if held is not None and held is not owner:
            return False
        self.owner = weakref.ref(owner)
        return True

    def _load(self, caches: list[StaticKV]) -> None:
        """A decoder's new caches into the graph's buffers, which they then point at."""
        for i, (c, n) in enumerate(zip(caches, self.capacities)):
            if c.k.shape[2] != n:
                raise ValueError(f"layer {i}'s cache holds {c.k.shape[2]} positions, the "
                                 f"graph {n}")
            if c.k is not self.k[i]:
                self.k[i][:, :, :c.length] = c.k[:, :, :c.length]
                self.v[i][:, :, :c.length] = c.v[:, :, :c.length]
                c.k, c.v = self.k[i], self.v[i]
        self.pos.copy_(torch.tensor([[c.length] for c in caches]))
        self.loaded = caches

    @torch.no_grad()
    def __call__(self, token: Tensor, caches: list[StaticKV]) -> Tensor:
        if any(c.length >= n for c, n in zip(caches, self.capacities)):
            raise ValueError("a cache is full; rebuild it first")
        if caches is not self.loaded:
            self._load(caches)
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # the graph overwrites its output at the next replay
        else:
            logits = self._run()
        for c in caches:
            c.length += 1
        return logits


# Kept beside the model, per batch size, as `FusedStep`'s copies are, and dropped with them.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[FusedStep, dict]]] = (
    weakref.WeakKeyDictionary())


def graphed_step_for(model: nn.Module, rows: int, capacities: list[int], owner: object,
                     capture: bool = True) -> GraphedStep | None:
    """The graphed step of `model` at `rows` rows over caches of `capacities`, recorded once
    and kept while `FusedStep.for_model` keeps its step (a recording costs a few warm-up
    steps; a comparison alternating batch sizes records each once); None while another live
    decoder holds it (the caller then steps through `FusedStep`)."""
    step = FusedStep.for_model(model, rows)
    kept = _GRAPHS.setdefault(model, {})
    live = {id(s) for s in FusedStep.kept(model)}
    for r in [r for r, (s, _) in kept.items() if id(s) not in live]:
        del kept[r]  # its step was rebuilt or dropped: so are its graphs and their buffers
    if rows not in kept:
        kept[rows] = (step, {})
    graphs = kept[rows][1]
    key = (tuple(capacities), capture)
    if key not in graphs:
        graphs[key] = GraphedStep(step, capacities, capture)
    graphed = graphs[key]
    return graphed if graphed.claim(owner) else None
