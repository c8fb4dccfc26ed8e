"""
What each decoding method's forwards cost at real model scale, next to the hardware's limit.

A diffusion LM's cache policy decides which tokens each forward pushes through the model: vanilla
LLaDA runs the whole canvas (prompt + G) at every step; Fast-dLLM's prefix cache (arXiv
2505.22618) runs the current block and the masked suffix against a cached prefix; DualCache runs
the block alone against a cache of everything else; dLLM-Cache (arXiv 2506.06295) feeds the whole
canvas but recomputes few tokens per layer and reuses cached attention and MLP outputs for the
rest. At real scale a forward's cost follows two numbers: the FLOPs of the tokens it computes, and
the bytes it must read (every weight once, plus the cached keys/values and features). This file
computes both from the shapes, times a few forwards of each
kind on a randomly initialised model of a named shape (LLaDA-8B, or smaller presets of the same
architecture), and prints each time next to the roofline bound max(FLOPs / peak FLOP/s,
bytes / bandwidth). A whole request (one token per step, G forwards) is extrapolated from the
timed forwards: with a fixed schedule the work per step does not depend on the weights.

Simplifications: FLOPs count matrix multiplies only (projections, attention scores and values,
MLP, LM head; norms, RoPE and softmax are a few percent at these sizes). Bytes count reads only:
every weight matrix once (the embedding only for the rows gathered), and the keys/values each
attention reads; activations are assumed to stay in cache or be fused. On CPU, peak memory is an
estimate (weights + KV cache + the largest activation set); on CUDA it is measured. On one CPU
thread, forwards are timed by the process's CPU time, so that other jobs on a shared machine do
not inflate them (the wall time is printed alongside). Each policy is one entry of POLICIES: a
schedule of Forward records (the request's forwards) and a runner that makes one such call.

Usage:
    python bench_scale.py                                   # llada-100m on CPU, a few minutes
    python bench_scale.py --preset llada-8b --dry-run       # the 8B's FLOPs, bytes and bounds, no run
    python bench_scale.py --preset llada-8b --device cuda --dtype bfloat16 --compile

Shape legend: B batch, P prompt, G generation, L = P + G canvas (= cache capacity), K block,
Q query tokens of a forward, C model dim, M MLP hidden dim, V vocabulary, N layers, H/Hkv heads,
D head dim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import decode
from cache import KVCache
from model import LLaDAModel, ModelConfig

# ---------------------------------------------------------------------------------------------
# Model shapes: the released LLaDA-8B and smaller presets of the same architecture
# ---------------------------------------------------------------------------------------------

# The released LLaDA-8B config.json. The small presets keep its head dim (128), MLP ratio
# (M = 3C) and RoPE base, and shrink the vocabulary with the model so the LM head keeps a share
# of the weights close to the 8B's 6.5% (with LLaDA's 126k vocabulary a 100M model would be
# mostly embedding table). Their special ids sit at the end of their vocabulary.
PRESETS = {
    "llada-8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                     vocab_size=126464, rope_theta=500000.0, max_sequence_length=4096,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "llada-1b": dict(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, mlp_hidden_size=6144,
                     vocab_size=32768, rope_theta=500000.0, max_sequence_length=4096),
    "llada-100m": dict(d_model=768, n_heads=6, n_kv_heads=6, n_layers=10, mlp_hidden_size=2304,
                       vocab_size=16384, rope_theta=500000.0, max_sequence_length=4096),
    # For the tests and a quick look: grouped-query attention, seconds on any CPU.
    "tiny": dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=192, vocab_size=512,
                 rope_theta=500000.0, max_sequence_length=4096),
}

# Flag name -> ModelConfig field, for the explicit --d-model/--layers/... form.
SHAPE_FLAGS = {"d_model": "d_model", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
               "mlp": "mlp_hidden_size", "vocab": "vocab_size"}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with any shape field overridden (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    raw = dict(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    if "n_heads" in overrides and overrides["n_heads"] is not None and overrides.get("n_kv_heads") is None:
        raw["n_kv_heads"] = raw["n_heads"]  # a new head count without a kv count means plain MHA
    V = raw["vocab_size"]
    # Special ids: the preset's own when they fit, else the last ids of the vocabulary.
    for name_, fallback in (("mask_token_id", V - 1), ("eos_token_id", V - 2), ("pad_token_id", V - 2)):
        if raw.get(name_) is None or raw[name_] >= V:
            raw[name_] = fallback
    return ModelConfig(**raw)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of LLaDAModel(cfg), from the shapes (model.py's table of weights)."""
    C, M, D = cfg.d_model, cfg.mlp_hidden_size, cfg.head_dim
    kv = cfg.n_kv_heads * D
    per_layer = C * C + 2 * C * kv + C * C + 3 * C * M + 2 * C  # q, k+v, out, SwiGLU, two norms
    if cfg.include_bias or cfg.include_qkv_bias:
        per_layer += C + 2 * kv
    if cfg.include_bias:
        per_layer += C + 2 * M + C
    head = 0 if cfg.weight_tying else cfg.embedding_size * (C + (1 if cfg.include_bias else 0))
    return cfg.embedding_size * C + cfg.n_layers * per_layer + C + head


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> LLaDAModel:
    """A randomly initialised LLaDAModel, built straight on `device` in `dtype`.

    The module is made on the meta device (no memory, no init), cast, then materialised once on
    the target device, so an 8B model never passes through host memory or float32. On "meta" it
    stays there: enough to count parameters. Matrices get normal(0, 0.02), norms ones; with a
    fixed one-token-per-step schedule the cost of a forward does not depend on the values.
    """
    with torch.device("meta"):
        model = LLaDAModel(cfg).to(dtype)
    if torch.device(device).type == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)  # norm scales (and biases, if any)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The forwards of a request, as decode.py makes them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """One model call: model(x[:, q0:q1], positions=arange(q0, q1), cache, logits_range=(c0-q0, e-q0))."""

    kind: str  # the row it is counted under ("full", "refresh", "dual step", ...)
    q0: int  # query window [q0, q1) of the canvas: the tokens pushed through the model
    q1: int
    c0: int  # the block [c0, e): the only positions that get logits (decode's logits_range)
    e: int
    cached: bool  # against the KV cache (attention reads all L cached positions) or alone
    # Feature-caching forwards (dLLM-Cache) take the whole canvas but recompute few tokens per
    # layer; the first layer always recomputes everything. Ordinary forwards leave these alone.
    recompute: int | None = None  # tokens each later layer recomputes (q/k/v, attention, MLP); None = all Q
    verify: int = 0  # tokens each later layer only projects to values (dLLM-Cache's V-verify)
    features: bool = False  # every layer reads each position's cached attention and MLP outputs
    t: int = 0  # forwards before this one in the request (dLLM-Cache's refresh schedule counts them)
    branches: int = 1  # rows this forward runs for one request (BlockBatch: one per block size)

    @property
    def q(self) -> int:
        return self.q1 - self.q0

    @property
    def rows(self) -> int:
        """Token-layer rows of one layer after the first: what this forward really recomputes."""
        return self.q if self.recompute is None else self.recompute

    @property
    def logits(self) -> int:
        return self.e - self.c0

    def keys(self, L: int) -> int:
        """Key positions each query attends over: the whole cache, or the window itself."""
        return L if self.cached else self.q


def fast_dllm_schedule(cache: str) -> Callable[[int, int, int], list[Forward]]:
    """The forwards of a request at one token per step (steps = G): K forwards per block.

    Fast-dLLM's policies (decode.py's query_window): 'none' runs the whole canvas every step;
    'prefix' and 'dual' refresh the whole canvas (and the cache) at a block's first step, then run
    block + suffix ('prefix') or the block alone ('dual') against the cache.
    """
    step_kind = {"prefix": "prefix step", "dual": "dual step"}.get(cache)

    def schedule(P: int, G: int, K: int) -> list[Forward]:
        L, out = P + G, []
        for s in range(P, L, K):
            e = s + K
            for step in range(K):
                if cache == "none":
                    out.append(Forward("full", 0, L, s, e, cached=False))
                elif step == 0:
                    out.append(Forward("refresh", 0, L, s, e, cached=True))
                else:
                    out.append(Forward(step_kind, s, L if cache == "prefix" else e, s, e, cached=True))
        return out

    return schedule


def dllm_schedule(P: int, G: int, K: int) -> list[Forward]:
    """dLLM-Cache's forwards at one token per step, with decode.py's default intervals.

    Every forward takes the whole canvas; forward t (from 0) refreshes the prompt's features when
    t % K_p == 0 and the response's when t % K_r == 0. Otherwise each layer after the first
    projects every response token to values (V-verify) and recomputes the int(rho * G) whose
    values moved most. The first layer always recomputes everything.
    """
    from decode import DecodeConfig

    defaults = DecodeConfig.__dataclass_fields__
    K_p, K_r = defaults["prompt_interval_steps"].default, defaults["gen_interval_steps"].default
    n = int(defaults["transfer_ratio"].default * G)
    L, out = P + G, []
    for t in range(G):
        s = P + (t // K) * K
        prompt, response = t % K_p == 0, t % K_r == 0
        if prompt and response:
            kind, rows, verify = "full refresh", None, 0
        elif prompt:
            kind, rows, verify = "prompt refresh", P + n, G if n else 0
        elif response:
            kind, rows, verify = "response refresh", G, 0
        else:
            kind, rows, verify = "V-verify step", n, G if n else 0
        out.append(Forward(kind, 0, L, s, s + K, cached=True, recompute=rows, verify=verify, features=True, t=t))
    return out


def blockbatch_branches(G: int) -> tuple[int, ...]:
    """BlockBatch's default block sizes that divide G: one branch each."""
    from blockbatch import BlockBatchConfig

    return tuple(b for b in BlockBatchConfig.__dataclass_fields__["block_sizes"].default if G % b == 0)


def blockbatch_schedule(P: int, G: int, K: int) -> list[Forward]:
    """BlockBatch's forwards under an assumed schedule: it has no fixed one (merges and syncs
    depend on what the model commits), so take one token per step in every branch and no merge.

    One full forward of the prompt's canvas starts it; then every step is one batched forward
    of all branches, each feeding its current block padded to the longest block (blockbatch.py
    pads with the cache's trash slot), with logits for the padded width; the bulk generator
    refreshes every branch with a batched full forward (logits for all of G) each time the
    branches have advanced refresh_block_size tokens.
    """
    from blockbatch import BlockBatchConfig

    sizes = blockbatch_branches(G)
    width, N = max(sizes), len(sizes)
    every = BlockBatchConfig.__dataclass_fields__["refresh_block_size"].default
    L, mid = P + G, P + G // 2
    out = [Forward("init forward", 0, L, P, L, cached=True)]
    for step in range(1, G + 1):
        out.append(Forward("batched block step", mid, mid + width, mid, mid + width, cached=True, branches=N))
        if step % every == 0 and step < G:
            out.append(Forward("batched refresh", 0, L, P, L, cached=True, branches=N))
    return out


# ---------------------------------------------------------------------------------------------
# Running a forward of each kind
# ---------------------------------------------------------------------------------------------


def run_forward(model, x: torch.Tensor, fwd: Forward, cache: KVCache | None) -> torch.Tensor:
    """The model call exactly as decode.py makes it for this window and block."""
    positions = torch.arange(fwd.q0, fwd.q1, device=x.device)  # (Q,)
    return model(x[:, fwd.q0:fwd.q1], positions=positions, cache=cache if fwd.cached else None,
                 logits_range=(fwd.c0 - fwd.q0, fwd.e - fwd.q0))  # (B, K, V)


def kv_runner(model, x: torch.Tensor, fwd: Forward, P: int, K: int, state: dict):
    """A plain model call. Cached kinds share one KVCache per request shape, filled by a
    refresh as a block start would; `state` keeps it between kinds."""
    cache = None
    if fwd.cached:
        if "kv" not in state:
            L = x.shape[1]
            state["kv"] = KVCache.for_model(model.config, batch=x.shape[0], capacity=L, device=x.device,
                                            dtype=model.dtype)
            with torch.no_grad():
                run_forward(model, x, Forward("refresh", 0, L, P, P + K, True), state["kv"])
        cache = state["kv"]
    return lambda: run_forward(model, x, fwd, cache)


def dllm_runner(model, x: torch.Tensor, fwd: Forward, P: int, K: int, state: dict):
    """decode.py's own dLLM-Cache forward on a request state whose forward counter selects the
    kind (its refresh schedule reads it); the features are filled by a first, full forward."""
    import decode

    L = x.shape[1]
    positions = torch.arange(L, device=x.device)  # (L,) every forward takes the whole canvas
    if "dllm" not in state:
        cfg = decode.DecodeConfig.for_model(model.config, gen_length=L - P, block_length=K, steps=L - P,
                                            cache="dllm")
        request = decode.setup(model, x[:, :P], cfg)
        with torch.no_grad():
            decode.dllm_forward(model, request, cfg, positions, (P, P + K))  # t = 0 refreshes everything
        state["dllm"] = (cfg, request)
    cfg, request = state["dllm"]

    def call():
        request.nfe = fwd.t  # dllm_forward counts this forward as t + 1
        return decode.dllm_forward(model, request, cfg, positions, (fwd.c0, fwd.e))

    return call


def blockbatch_runner(model, x: torch.Tensor, fwd: Forward, P: int, K: int, state: dict):
    """BlockBatch's batched forward: one row per branch, each at its own block (a block of its
    size near the middle of the answer), padded to the longest with the cache's trash slot, as
    blockbatch.block_positions does; a refresh runs every branch's whole canvas."""
    L, G = x.shape[1], x.shape[1] - P
    sizes = blockbatch_branches(G)
    if "bb" not in state:
        cache = KVCache.for_model(model.config, batch=len(sizes), capacity=L, device=x.device, dtype=model.dtype)
        with torch.no_grad():
            model(x[:1].expand(len(sizes), L), positions=torch.arange(L, device=x.device), cache=cache,
                  logits_range=(P, P + 1))  # fill every branch's cache row
        state["bb"] = cache
    cache, rows = state["bb"], x[:1].expand(fwd.branches, L)  # (N, L): the request's canvas per branch
    if fwd.q == L:  # a full forward of every branch (or of one, at init)
        return lambda: model(rows, positions=torch.arange(L, device=x.device),
                             cache=cache if fwd.branches == len(sizes) else None, logits_range=(fwd.c0, fwd.e))
    starts = torch.tensor([P + (G // 2) // b * b for b in sizes], device=x.device)  # (N,) block starts
    pos = starts[:, None] + torch.arange(fwd.q, device=x.device)  # (N, Q)
    pos = torch.where(pos < (starts + torch.tensor(sizes, device=x.device))[:, None], pos, cache.trash)  # (N, Q)
    inp = rows.gather(1, pos.clamp(max=L - 1))  # (N, Q); trash slots read any token
    return lambda: model(inp, positions=pos, cache=cache, logits_range=(0, fwd.q))


@dataclass(frozen=True)
class Policy:
    """A cache policy as the benchmark sees it: the forwards one request makes, and how to run one."""

    name: str
    schedule: Callable[[int, int, int], list[Forward]]  # (P, G, K) -> the request's forwards, in order
    block_length: int | None = None  # its own block length (None = --block-length)
    runner: Callable = kv_runner  # (model, x, forward, P, K, state) -> a call that runs that forward
    block_label: str | None = None  # what the table shows as its block when it has no single one


# One entry per decoding method; a new kind of forward is a new Forward.kind in its schedule.
POLICIES = {
    "none": Policy("none", fast_dllm_schedule("none")),
    "prefix": Policy("prefix", fast_dllm_schedule("prefix")),
    "dual": Policy("dual", fast_dllm_schedule("dual")),
}
if hasattr(decode, "dllm_forward"):  # dLLM-Cache runs 8-token blocks, as its paper does
    POLICIES["dllm"] = Policy("dllm", dllm_schedule, block_length=8, runner=dllm_runner)
if importlib.util.find_spec("blockbatch") is not None:  # its branches have their own block sizes
    POLICIES["blockbatch"] = Policy("blockbatch", blockbatch_schedule, runner=blockbatch_runner,
                                    block_label="4–128 (branches)")


def representative(forwards: list[Forward]) -> Forward:
    """The forward to time for a kind: its shape if all are alike, else one of the mean Q.

    A forward's cost is affine in Q (the linear layers are proportional to Q, attention to Q·L),
    so the mean cost over a kind whose Q varies (the prefix step: block + a shrinking suffix) is
    the cost of one forward of the mean Q. It is built by moving the window start of the longest
    one, keeping its block at the same offset and its window end.
    """
    qs = [f.q for f in forwards]
    if min(qs) == max(qs):
        return forwards[len(forwards) // 2]
    longest = max(forwards, key=lambda f: f.q)
    q = round(sum(qs) / len(qs))
    q0 = longest.q1 - q
    return Forward(longest.kind, q0, longest.q1, q0 + (longest.c0 - longest.q0), q0 + (longest.e - longest.q0),
                   longest.cached)


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes of one forward, from the shapes
# ---------------------------------------------------------------------------------------------


def layer_flops(cfg: ModelConfig, Q: int, S: int, verify: int = 0) -> int:
    """Matrix-multiply FLOPs of one layer for Q query tokens over S keys (a multiply-add counts 2),
    plus `verify` tokens projected to values only."""
    C, M, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.n_kv_heads * cfg.head_dim
    proj = 2 * Q * C * (C + 2 * kv + C)  # q, k, v and output projections
    attn = 2 * 2 * Q * S * cfg.n_heads * cfg.head_dim  # scores q·k and the weighted sum of values, every head
    mlp = 3 * 2 * Q * C * M  # SwiGLU: gate, up, down
    return proj + attn + mlp + 2 * verify * C * kv


def forward_flops(cfg: ModelConfig, fwd: Forward, L: int, batch: int = 1) -> int:
    """Matrix-multiply FLOPs of one forward: its layers, then the LM head over the block only
    (decode's logits_range). A feature-caching forward's first layer recomputes all Q tokens."""
    S = fwd.keys(L)
    layers = layer_flops(cfg, fwd.q, S) + (cfg.n_layers - 1) * layer_flops(cfg, fwd.rows, S, fwd.verify)
    head = 2 * fwd.logits * cfg.d_model * cfg.embedding_size
    return batch * fwd.branches * (layers + head)


def weight_bytes_read(cfg: ModelConfig, fwd: Forward, elem: int, batch: int = 1) -> int:
    """Bytes of weights one forward reads: every matrix once, the embedding only for the Q rows."""
    C = cfg.d_model
    gathered = min(batch * fwd.branches * fwd.q, cfg.embedding_size) * C  # rows of the embedding lookup
    # V-verify runs v_proj over the response, then again inside the chosen tokens' q/k/v.
    again = (cfg.n_layers - 1) * C * cfg.n_kv_heads * cfg.head_dim if fwd.verify else 0
    if cfg.weight_tying:  # the tied LM head reads the whole table anyway
        return (param_count(cfg) + again) * elem
    return (param_count(cfg) - cfg.embedding_size * C + gathered + again) * elem


def kv_bytes_read(cfg: ModelConfig, fwd: Forward, L: int, elem: int, batch: int = 1) -> int:
    """Bytes of keys and values the attention reads, all layers: cached or just computed. A
    feature-caching layer that recomputes no token runs no attention; V-verify also reads the
    cached values of the tokens it checks."""
    kv = cfg.n_kv_heads * cfg.head_dim
    attending = 1 + (cfg.n_layers - 1 if fwd.rows > 0 else 0)  # layers with queries to attend
    verify = (cfg.n_layers - 1) * fwd.verify * kv
    return batch * fwd.branches * (2 * attending * kv * fwd.keys(L) + verify) * elem


def feature_bytes_read(cfg: ModelConfig, fwd: Forward, L: int, elem: int, batch: int = 1) -> int:
    """Bytes of cached attention and MLP outputs a feature-caching forward reads: every layer
    adds both to the residual stream of all L positions."""
    return 2 * cfg.n_layers * batch * L * cfg.d_model * elem if fwd.features else 0


def forward_bytes(cfg: ModelConfig, fwd: Forward, L: int, elem: int, batch: int = 1) -> int:
    """Weights + keys/values (+ cached features) read by one forward (reads only; activations
    not counted)."""
    return (weight_bytes_read(cfg, fwd, elem, batch) + kv_bytes_read(cfg, fwd, L, elem, batch)
            + feature_bytes_read(cfg, fwd, L, elem, batch))


def cache_bytes(cfg: ModelConfig, L: int, elem: int, batch: int = 1, features: bool = False) -> int:
    """Size of a KVCache of capacity L: keys and values, (N, B, Hkv, L, D) each; a FeatureCache
    adds attention and MLP outputs, (N, B, L, C) each."""
    kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * L * cfg.head_dim * elem
    return kv + (2 * cfg.n_layers * batch * L * cfg.d_model * elem if features else 0)


def estimate_peak_bytes(cfg: ModelConfig, fwd: Forward, L: int, elem: int, batch: int, with_cache: bool) -> int:
    """CPU stand-in for a measured peak: weights + cache + the largest activation set of a forward.

    The largest set is either the MLP's (residual, its normed input and three (Q, M) tensors:
    gate after SiLU, up, their product) or the LM head's (residual and the (K, V) logits).
    """
    C, M, V = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    batch *= fwd.branches  # BlockBatch runs one row per branch
    mlp = batch * fwd.q * (2 * C + 3 * M)
    head = batch * (fwd.q * C + fwd.logits * V)
    weights = param_count(cfg) * elem
    cache = cache_bytes(cfg, L, elem, batch, fwd.features) if with_cache else 0
    return weights + cache + max(mlp, head) * elem


# ---------------------------------------------------------------------------------------------
# The hardware limit: published peaks for known GPUs, measured ones on CPU
# ---------------------------------------------------------------------------------------------


@dataclass
class Hardware:
    """Peak rates the roofline bound is computed from."""

    name: str  # device, as reported
    flops: float  # peak FLOP/s in the benchmark's dtype (dense, no sparsity)
    bandwidth: float  # memory bandwidth, bytes/s
    source: str  # where the figures come from


# Vendor datasheet figures: (name needles, excluded needles, label, bf16/fp16 dense tensor-core
# TFLOP/s, fp32 (no TF32) TFLOP/s, memory TB/s). First match wins, so variants come first.
# The RTX cards' bf16 figure is with float32 accumulation, which is what PyTorch uses.
GPU_PEAKS = [
    (("H100", "PCIE"), (), "H100 PCIe", 756.0, 51.2, 2.0),
    (("H100", "NVL"), (), "H100 NVL", 835.0, 60.0, 3.9),
    (("H100",), (), "H100 SXM", 989.4, 66.9, 3.35),
    (("H200", "NVL"), (), "H200 NVL", 835.0, 60.0, 4.8),
    (("H200",), (), "H200", 989.4, 66.9, 4.8),
    (("A100", "80GB", "PCIE"), (), "A100 80GB PCIe", 312.0, 19.5, 1.935),
    (("A100", "80GB"), (), "A100 80GB SXM", 312.0, 19.5, 2.039),
    (("A100",), (), "A100 40GB", 312.0, 19.5, 1.555),
    (("L40S",), (), "L40S", 362.05, 91.6, 0.864),
    (("RTX 4090",), (), "RTX 4090", 165.2, 82.6, 1.008),
    (("RTX 3090",), (), "RTX 3090", 71.0, 35.6, 0.936),
    (("L4",), ("L40",), "L4", 121.0, 30.3, 0.3),
    (("A10",), ("A100",), "A10", 125.0, 31.2, 0.6),
]


def published_peak(name: str, dtype: torch.dtype, memory_gib: float | None = None) -> Hardware | None:
    """The datasheet figures for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    upper = name.upper()
    if "A100" in upper and memory_gib is not None and memory_gib > 50 and "80GB" not in upper:
        upper += " 80GB"  # some A100 80GB report no size in their name
    for needles, excluded, label, tensor, fp32, tbs in GPU_PEAKS:
        if all(n in upper for n in needles) and not any(x in upper for x in excluded):
            flops = (fp32 if dtype == torch.float32 else tensor) * 1e12
            kind = "fp32" if dtype == torch.float32 else "bf16/fp16 dense tensor-core"
            return Hardware(name, flops, tbs * 1e12, f"published {label} figures ({kind}, HBM/GDDR bandwidth)")
    return None


def measure_cpu(dtype: torch.dtype, n: int = 1536, copy_mib: int = 256, repeats: int = 10) -> Hardware:
    """Measured CPU rates with torch's current threads: an n×n matmul, and a large tensor copy.

    The best of several runs is kept: on a machine shared with other jobs, the best run is the
    closest to what the hardware can do. The copy's bandwidth counts what it reads and what it
    writes, as STREAM's copy does.
    """
    clock = timing_clock(torch.device("cpu"))
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up (thread pool, packing buffers)
    best = min(_timed(lambda: a @ a, clock) for _ in range(repeats))
    flops = 2 * n ** 3 / best
    src = torch.ones(copy_mib * 2 ** 20 // 4)  # float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touch every page
    best = min(_timed(lambda: dst.copy_(src), clock) for _ in range(repeats))
    bandwidth = 2 * src.numel() * 4 / best
    name = f"CPU, {torch.get_num_threads()} thread(s)"
    what = "CPU time" if clock is time.process_time else "wall time"
    return Hardware(name, flops, bandwidth,
                    f"measured ({what}): {n}x{n} {_dtype_name(dtype)} matmul, {copy_mib} MiB copy")


def timing_clock(device: torch.device):
    """The clock forwards are timed with. On a CPU running torch on one thread: this process's
    CPU time, which leaves out the time other jobs held the core (this machine may be shared).
    Elsewhere (CUDA, or several threads whose CPU times would add up): wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def roofline(hw: Hardware, flops: int, nbytes: int) -> tuple[float, str]:
    """Lower bound on a forward's seconds, and which limit sets it."""
    compute, memory = flops / hw.flops, nbytes / hw.bandwidth
    return max(compute, memory), ("compute" if compute >= memory else "memory")


# ---------------------------------------------------------------------------------------------
# Timing forwards
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(call, device: torch.device, budget_s: float, max_repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of several calls of `call` after one warm-up call: by timing_clock, and by the wall.

    Timing stops once `budget_s` wall seconds are spent (at least one call is timed). A call
    whose warm-up took more than 4 budgets is not run again: the warm-up is the measurement
    (first-call overhead is negligible there).
    """
    clock = timing_clock(device)

    def timed_call():
        _sync(device)
        wall, cpu = time.perf_counter(), clock()
        call()
        _sync(device)
        return clock() - cpu, time.perf_counter() - wall

    first = timed_call()
    if first[1] > 4 * budget_s:
        return [first[0]], [first[1]]
    times, walls = [], []
    while len(times) < max_repeats and (not walls or sum(walls) < budget_s):
        t, w = timed_call()
        times.append(t)
        walls.append(w)
    return times, walls


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class ScaleSettings:
    """Settings of a scale benchmark run; the CLI reads its defaults from here."""

    preset: str = "llada-100m"  # model shape (PRESETS); the shape flags override its fields
    prompt_length: int = 512  # P, a few-shot GSM8K-like prompt
    gen_lengths: list[int] = field(default_factory=lambda: [256, 1024])  # G values, one table each
    block_length: int = 32  # K, for policies without their own
    policies: list[str] = field(default_factory=lambda: list(POLICIES))  # which cache policies
    batch: int = 1  # B, requests decoded together
    device: str | None = None  # cpu or cuda (default: cuda when available)
    dtype: str | None = None  # float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)
    threads: int = 1  # torch CPU threads (1 by default: the machine is shared)
    time_budget: float = 2.0  # seconds of timing per forward kind (at least one timed call)
    max_repeats: int = 20  # most timed calls per kind
    compile: bool = False  # also time the cached steps captured with torch.compile
    compile_mode: str | None = None  # torch.compile mode (default: reduce-overhead on CUDA, default on CPU)
    dry_run: bool = False  # build on the meta device, print counts and bounds, time nothing
    hardware: str | None = None  # take roofline peaks from this GPU_PEAKS label instead of the device
    peak_tflops: float | None = None  # override the peak FLOP/s (TFLOP/s)
    peak_gbs: float | None = None  # override the memory bandwidth (GB/s)
    seed: int = 0  # random weights and prompt

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; use some of {list(POLICIES)}")
        for name in ("prompt_length", "block_length", "batch", "threads", "max_repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for G in self.gen_lengths:
            for p in self.policies:
                K = POLICIES[p].block_length or self.block_length
                if G <= 0 or G % K != 0:
                    raise ValueError(f"gen_length {G} is not a positive multiple of {p}'s block length {K}")
        if "blockbatch" in self.policies and self.batch != 1:
            raise ValueError("BlockBatch decodes one request per call (its batch rows are its branches): use --batch 1")
        if self.hardware is not None and not any(label == self.hardware for _, _, label, *_ in GPU_PEAKS):
            raise ValueError(f"unknown hardware {self.hardware!r}; use one of {[g[2] for g in GPU_PEAKS]}")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device_dtype(settings: ScaleSettings) -> tuple[torch.device, torch.dtype]:
    if settings.dry_run and settings.device is None:
        device = torch.device("meta")
    else:
        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if settings.dtype is not None and settings.dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {settings.dtype!r}; use one of {sorted(_DTYPES)}")
    default = torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32
    return device, _DTYPES.get(settings.dtype, default) if settings.dtype else default


def pick_hardware(settings: ScaleSettings, device: torch.device, dtype: torch.dtype) -> Hardware | None:
    """Roofline peaks: a named table entry, the CUDA device's datasheet, or CPU measurements;
    --peak-tflops / --peak-gbs override either figure."""
    hw = None
    if settings.hardware is not None:
        hw = published_peak(settings.hardware, dtype)
    elif device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw = published_peak(props.name, dtype, props.total_memory / 2 ** 30)
        if hw is None:
            print(f"no published figures for {props.name!r}; pass --peak-tflops and --peak-gbs", file=sys.stderr)
    elif device.type == "cpu" and not (settings.peak_tflops and settings.peak_gbs):
        hw = measure_cpu(dtype)
    if settings.peak_tflops or settings.peak_gbs:
        base = hw or Hardware(str(device), float("nan"), float("nan"), "")
        hw = Hardware(base.name, settings.peak_tflops * 1e12 if settings.peak_tflops else base.flops,
                      settings.peak_gbs * 1e9 if settings.peak_gbs else base.bandwidth,
                      (base.source + "; " if base.source else "") + "overridden on the command line")
    return hw


@dataclass
class KindRow:
    """One row of the table: one kind of forward of one policy at one G."""

    gen_length: int  # G
    policy: str  # cache policy
    kind: str  # kind of forward
    count: int  # forwards of this kind in one request
    q_mean: float  # mean query tokens per forward
    q_min: int  # smallest and largest query window of this kind
    q_max: int
    keys: int  # key positions each query attends over
    logits: int  # tokens the LM head runs over
    rows: float  # mean tokens each layer after the first recomputes (= Q but for feature-caching forwards)
    layers: int  # N, to turn rows into tokens computed per layer
    branches: int  # rows per request (BlockBatch: one per block size)
    flops: float  # mean FLOPs per forward (exact mean over the request's forwards)
    bytes: float  # mean bytes read per forward
    bound_s: float | None  # mean roofline bound of this kind's forwards, seconds
    bound_by: str | None  # 'compute', 'memory', or 'mixed (n memory)' when it differs between forwards
    timed_q: int  # query tokens of the forward actually timed (the mean Q when Q varies)
    seconds: float | None = None  # mean measured seconds per forward, eager (timing_clock: CPU time on 1 CPU thread)
    wall_seconds: float | None = None  # the same by the wall clock
    timed_calls: int = 0  # how many calls the mean is over
    peak_bytes: float | None = None  # peak memory while timing (CUDA: measured; CPU: estimate)
    peak_measured: bool = False  # whether peak_bytes was measured
    compiled_seconds: float | None = None  # mean seconds with torch.compile (cached steps, --compile)
    compile_seconds: float | None = None  # time spent compiling
    compile_error: str | None = None  # why compiling failed, if it did
    compile_max_diff: float | None = None  # largest |compiled - eager| logit


def plan(cfg: ModelConfig, settings: ScaleSettings, G: int, hw: Hardware | None, elem: int) -> list[tuple[KindRow, Forward]]:
    """For each policy and kind of forward at this G: the counted row and the forward to time."""
    P, B = settings.prompt_length, settings.batch
    L = P + G
    out = []
    for name in settings.policies:
        policy = POLICIES[name]
        K = policy.block_length or settings.block_length
        forwards = policy.schedule(P, G, K)
        by_kind: dict[str, list[Forward]] = {}
        for f in forwards:
            by_kind.setdefault(f.kind, []).append(f)
        for kind, fs in by_kind.items():
            flops = [forward_flops(cfg, f, L, B) for f in fs]
            nbytes = [forward_bytes(cfg, f, L, elem, B) for f in fs]
            bound, by = None, None
            if hw:
                # The bound is a max, not affine in Q: average the bounds of the real forwards
                # (a prefix step can be memory-bound early in a request and compute-bound late).
                bounds = [roofline(hw, fl, nb) for fl, nb in zip(flops, nbytes)]
                bound = sum(b for b, _ in bounds) / len(bounds)
                limits = Counter(limit for _, limit in bounds)
                by = next(iter(limits)) if len(limits) == 1 else f"mixed ({limits['memory']} memory)"
            flops, nbytes = sum(flops) / len(fs), sum(nbytes) / len(fs)
            rep = representative(fs)
            row = KindRow(G, name, kind, len(fs), sum(f.q for f in fs) / len(fs), min(f.q for f in fs),
                          max(f.q for f in fs), rep.keys(L), rep.logits, sum(f.rows for f in fs) / len(fs), cfg.n_layers, rep.branches,
                          flops, nbytes,
                          bound, by, rep.q)
            out.append((row, rep))
    return out


def measure(model, cfg: ModelConfig, settings: ScaleSettings, G: int, rows: list[tuple[KindRow, Forward]],
            device: torch.device, dtype: torch.dtype) -> None:
    """Time the representative forward of every row, sharing timings between identical shapes."""
    P, B = settings.prompt_length, settings.batch
    L = P + G
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.full((B, L), cfg.mask_token_id, dtype=torch.long)  # (B, L): prompt, then G masks
    x[:, :P] = torch.randint(0, cfg.mask_token_id, (B, P), generator=g)  # any ids below the mask id
    x = x.to(device)
    # Forwards without a cache first, so their peak memory holds no cache; then each runner's
    # cached kinds, one runner at a time (its cache is freed before the next one's is made).
    order = {runner: i for i, runner in enumerate(dict.fromkeys(POLICIES[r.policy].runner for r, _ in rows))}
    rows = sorted(rows, key=lambda r: (r[1].cached, order[POLICIES[r[0].policy].runner]))
    state, current, done = {}, None, {}
    for row, fwd in rows:
        policy = POLICIES[row.policy]
        # Everything the cost depends on: the same shape under the same runner is timed once.
        shape = (policy.runner, fwd.q, fwd.c0 - fwd.q0, fwd.logits, fwd.cached, fwd.rows, fwd.verify, fwd.branches)
        if shape in done:
            for key, value in done[shape].items():
                setattr(row, key, value)
            continue
        if policy.runner is not current:
            state, current = {}, policy.runner  # drop the previous runner's cache
        print(f"  [G={G}] timing {row.policy} / {row.kind} (Q={fwd.q}) ...", file=sys.stderr, flush=True)
        call = policy.runner(model, x, fwd, P, policy.block_length or settings.block_length, state)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, walls = time_forward(call, device, settings.time_budget, settings.max_repeats)
        if device.type == "cuda":
            peak, measured = torch.cuda.max_memory_allocated(device), True
        else:
            peak, measured = estimate_peak_bytes(cfg, fwd, L, elem, B, fwd.cached), False
        compiled = {}
        if settings.compile and _is_step(fwd, L) and policy.runner is kv_runner:
            compiled = compile_step(model, x, fwd, state.get("kv"), settings, device)
        done[shape] = dict(seconds=sum(times) / len(times), wall_seconds=sum(walls) / len(walls),
                           timed_calls=len(times), peak_bytes=peak, peak_measured=measured, **compiled)
        for key, value in done[shape].items():
            setattr(row, key, value)


def _is_step(fwd: Forward, L: int) -> bool:
    """A cached step: a cached forward over less than the whole canvas (what --compile captures)."""
    return fwd.cached and fwd.q < L


_COMPILED = {}


def compile_step(model, x, fwd: Forward, cache: KVCache, settings: ScaleSettings, device: torch.device) -> dict:
    """Time a cached step under torch.compile: static cache, static shapes, one graph per shape.

    Returns the compiled mean seconds, the compile time and the largest logit difference from
    eager, or the error that stopped compilation (e.g. no C++ compiler for inductor on CPU).
    """
    mode = settings.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    try:
        import torch._dynamo

        # One graph per (shape, cache) pair: raise the recompile limit above the few we make.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        if mode not in _COMPILED:
            _COMPILED[mode] = torch.compile(model, mode=mode, dynamic=False)
        compiled = _COMPILED[mode]
        with torch.no_grad():
            eager = run_forward(model, x, fwd, cache).float()
            _sync(device)
            start = time.perf_counter()
            out = run_forward(compiled, x, fwd, cache).float()  # the first call compiles
            _sync(device)
            compile_s = time.perf_counter() - start
            diff = float((out - eager).abs().max())
        times, _ = time_forward(lambda: run_forward(compiled, x, fwd, cache), device, settings.time_budget,
                                settings.max_repeats)
        return dict(compiled_seconds=sum(times) / len(times), compile_seconds=compile_s, compile_max_diff=diff)
    except Exception as err:  # report and go on with the eager figures
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return dict(compile_error=f"{type(err).__name__}: {first}")


# ---------------------------------------------------------------------------------------------
# Whole requests and the printed tables
# ---------------------------------------------------------------------------------------------


def request_summary(rows: list[KindRow], settings: ScaleSettings) -> list[dict]:
    """Per policy at one G: forwards, tokens pushed, FLOPs, bytes, and the request's time
    extrapolated from the timed forwards (count × mean seconds, summed over kinds)."""
    out = []
    for policy in dict.fromkeys(r.policy for r in rows):
        rs = [r for r in rows if r.policy == policy]
        K = POLICIES[policy].block_length or settings.block_length
        blocks = rs[0].gen_length // K
        if POLICIES[policy].block_label:  # blocks of its own (BlockBatch's branches)
            K, composition = POLICIES[policy].block_label, " + ".join(f"{r.count} {r.kind}" for r in rs)
        elif all(r.count % blocks == 0 for r in rs):  # the same forwards in every block
            composition = " + ".join(f"{r.count // blocks} {r.kind}" for r in rs) + f" (×{blocks} blocks)"
        else:  # a schedule of its own (dLLM-Cache counts forwards across blocks)
            composition = " + ".join(f"{r.count} {r.kind}" for r in rs) + f" ({blocks} blocks)"
        n_layers = rs[0].layers
        timed = all(r.seconds is not None for r in rs)
        bounded = all(r.bound_s is not None for r in rs)
        out.append(dict(
            gen_length=rs[0].gen_length, policy=policy, block_length=K, composition=composition,
            forwards=sum(r.count for r in rs),
            query_tokens=round(sum(r.count * r.branches * r.q_mean for r in rs)) * settings.batch,
            computed_tokens=round(sum(r.count * r.branches * (r.q_mean + (n_layers - 1) * r.rows) / n_layers
                                      for r in rs)) * settings.batch,
            flops=sum(r.count * r.flops for r in rs), bytes=sum(r.count * r.bytes for r in rs),
            seconds=sum(r.count * r.seconds for r in rs) if timed else None,
            wall_seconds=sum(r.count * r.wall_seconds for r in rs) if timed else None,
            compiled_seconds=(sum(r.count * (r.compiled_seconds or r.seconds) for r in rs)
                              if timed and any(r.compiled_seconds for r in rs) else None),
            bound_s=sum(r.count * r.bound_s for r in rs) if bounded else None))
    # Speedup over vanilla (no cache): of the extrapolated times, or of the bounds when nothing was timed.
    base = next((s for s in out if s["policy"] == "none"), None)
    for s in out:
        key = "seconds" if s["seconds"] is not None else "bound_s"
        s["speedup"] = base[key] / s[key] if base and base[key] and s[key] else None
    return out


def _num(x, unit: float = 1.0, digits: int = 3) -> str:
    """A number in `unit`s with `digits` significant digits, or '–'."""
    if x is None:
        return "–"
    v = x / unit
    if v == 0:
        return "0"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _ms(seconds) -> str:
    return _num(seconds, 1e-3)


def kinds_table(rows: list[KindRow], with_compile: bool, cpu_clock: bool = False) -> str:
    head = ["policy", "forward", "per request", "Q tokens", "keys", "GFLOP", "GB read", "FLOP/B", "bound by",
            "bound ms", "CPU ms" if cpu_clock else "measured ms", "× bound", "wall ms", "calls", "peak GB"]
    if not cpu_clock:
        head.remove("wall ms")
    if with_compile:
        head += ["compiled ms", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = f"{r.q_mean:.0f}" if r.q_min == r.q_max else f"{r.q_mean:.0f} ({r.q_min}–{r.q_max})"
        if r.rows != r.q_mean:
            q += f" ({r.rows:.0f} recomputed)"
        if r.branches > 1:
            q = f"{r.branches} × {q}"
        ratio = r.seconds / r.bound_s if r.seconds is not None and r.bound_s else None
        peak = "–" if r.peak_bytes is None else _num(r.peak_bytes, 1e9) + ("" if r.peak_measured else " est.")
        cells = [r.policy, r.kind, str(r.count), q, str(r.keys), _num(r.flops, 1e9), _num(r.bytes, 1e9),
                 _num(r.flops / r.bytes), r.bound_by or "–", _ms(r.bound_s), _ms(r.seconds),
                 _num(ratio)] + ([_ms(r.wall_seconds)] if cpu_clock else []) + [str(r.timed_calls or "–"), peak]
        if with_compile:
            if r.compile_error:
                cells += ["failed", "–"]
            else:
                cells += [_ms(r.compiled_seconds), _num(r.compile_seconds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(summary: list[dict], with_compile: bool, cpu_clock: bool = False) -> str:
    head = ["policy", "block", "forwards per request", "NFE", "query tokens", "tokens computed", "TFLOP",
            "GB read", "bound s", "request CPU s (extrapolated)" if cpu_clock else "request s (extrapolated)",
            "speedup"]
    if cpu_clock:
        head.insert(-1, "wall s")
    if with_compile:
        head.insert(-1, "compiled s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["policy"], str(s["block_length"]), s["composition"], str(s["forwards"]), f"{s['query_tokens']:,}",
                 f"{s['computed_tokens']:,}", _num(s["flops"], 1e12), _num(s["bytes"], 1e9), _num(s["bound_s"]), _num(s["seconds"]),
                 "–" if s["speedup"] is None else f"{s['speedup']:.1f}×"]
        if cpu_clock:
            cells.insert(-1, _num(s["wall_seconds"]))
        if with_compile:
            cells.insert(-1, _num(s["compiled_seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_fits(cfg: ModelConfig, elem: int, device: torch.device) -> None:
    """A clear error, before allocating, when the weights alone exceed the device's memory."""
    need = param_count(cfg) * elem
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if need > have:
        raise ValueError(f"the weights need {need / 1e9:.1f} GB but {device} has {have / 1e9:.1f} GB free; "
                         f"use a smaller preset or dtype, or --dry-run for the counts and bounds alone")


def run(settings: ScaleSettings, shape: dict | None = None) -> dict:
    """Build the model, plan, time and print every table; returns the rows (also for --json)."""
    cfg = preset_config(settings.preset, **(shape or {}))
    device, dtype = resolve_device_dtype(settings)
    elem = torch.finfo(dtype).bits // 8
    if device.type == "cpu":
        torch.set_num_threads(settings.threads)
    load_before = os.getloadavg()
    if not settings.dry_run:
        check_fits(cfg, elem, device)
    model = build_model(cfg, device="meta" if settings.dry_run else device, dtype=dtype, seed=settings.seed)
    n_params = sum(p.numel() for p in model.parameters())  # counted on the built module, meta or real
    hw = pick_hardware(settings, device, dtype)
    cpu_clock = not settings.dry_run and timing_clock(device) is time.process_time
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "meta (nothing timed)" if settings.dry_run else f"CPU, {torch.get_num_threads()} thread(s)"
    header = [f"model: {settings.preset} shape (random weights), {n_params / 1e6:,.1f}M parameters: C {cfg.d_model}, "
              f"N {cfg.n_layers}, H {cfg.n_heads}, Hkv {cfg.n_kv_heads}, M {cfg.mlp_hidden_size}, V {cfg.vocab_size}; "
              f"{_dtype_name(dtype)}, batch {settings.batch}",
              f"device: {device_name}; CPU load average before: {load_before[0]:.2f}"]
    if hw:
        header.append(f"roofline: {_num(hw.flops, 1e12)} TFLOP/s, {_num(hw.bandwidth, 1e9)} GB/s ({hw.source})")
    header.append(f"request: prompt {settings.prompt_length}, one token per step (G forwards), "
                  f"block {settings.block_length} unless the policy has its own")
    print("\n".join(header) + "\n", flush=True)
    result = {"header": header, "params": n_params, "kinds": [], "requests": []}
    for G in settings.gen_lengths:
        if settings.prompt_length + G > cfg.max_sequence_length:
            raise ValueError(f"prompt {settings.prompt_length} + G {G} exceeds max_sequence_length {cfg.max_sequence_length}")
        planned = plan(cfg, settings, G, hw, elem)
        if not settings.dry_run:
            measure(model, cfg, settings, G, planned, device, dtype)
        rows = [r for r, _ in planned]
        summary = request_summary(rows, settings)
        print(f"### G = {G} (L = P + G = {settings.prompt_length + G})\n")
        print(kinds_table(rows, settings.compile, cpu_clock) + "\n")
        print(summary_table(summary, settings.compile, cpu_clock) + "\n")
        varying = [r for r in rows if r.q_min != r.q_max]
        notes = []
        if not settings.dry_run:
            notes.append("Request times are extrapolated: forwards per request × mean measured seconds of a few "
                         "timed forwards of each kind; nothing ran a whole request.")
        if settings.dry_run:
            notes.append("Dry run: nothing was timed; the speedups are ratios of the roofline bounds.")
        if varying and not settings.dry_run:
            notes.append("Kinds whose Q varies over the request are timed at their mean Q (cost is affine in Q); "
                         "their FLOPs, bytes and bounds are exact means over the request's forwards.")
        if cpu_clock:
            notes.append("Times are this process's CPU time per forward (one torch thread), which leaves out the "
                         "time other jobs held the core; 'wall ms' is the wall clock. The roofline peaks were "
                         "measured the same way.")
        if not settings.dry_run and device.type != "cuda":
            notes.append("Peak memory on CPU is an estimate (weights + KV cache + largest activation set), not measured.")
        for r in rows:
            if r.compiled_seconds is not None:
                notes.append(f"torch.compile ({r.policy} / {r.kind}): {_num(r.compile_seconds)} s to compile, "
                             f"largest |compiled - eager| logit {r.compile_max_diff:.2g}.")
        errors = {r.compile_error for r in rows if r.compile_error}
        notes += [f"torch.compile failed: {e}" for e in errors]
        if notes:
            print("\n".join(notes) + "\n", flush=True)
        result["kinds"] += [asdict(r) for r in rows]
        result["requests"] += summary
    load_after = os.getloadavg()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    footer = f"CPU load average after: {load_after[0]:.2f}; process peak RSS {rss / 1e9:.2f} GB"
    print(footer)
    result["footer"] = footer
    return result


def main(argv=None, prog: str = "bench_scale.py"):
    """Parse flags, run, print. `prog` is the command echoed above the tables (bench.py's
    `--scale` mode passes its own name)."""
    defaults = ScaleSettings()
    ap = argparse.ArgumentParser(prog=f"python {prog}", description="Per-forward cost of each cache policy at model scale, "
                                             "against the roofline bound.")
    ap.add_argument("--preset", default=defaults.preset, choices=sorted(PRESETS), help="model shape")
    ap.add_argument("--d-model", type=int, help="override the preset's model width C")
    ap.add_argument("--layers", type=int, help="override the preset's layer count N")
    ap.add_argument("--heads", type=int, help="override the preset's query heads H")
    ap.add_argument("--kv-heads", type=int, help="override the preset's key/value heads Hkv")
    ap.add_argument("--mlp", type=int, help="override the preset's MLP hidden size M")
    ap.add_argument("--vocab", type=int, help="override the preset's vocabulary size V")
    ap.add_argument("--prompt-length", type=int, default=defaults.prompt_length, help="prompt tokens P")
    ap.add_argument("--lengths", type=int, nargs="+", default=defaults.gen_lengths, help="generation lengths G")
    ap.add_argument("--block-length", type=int, default=defaults.block_length, help="block length K")
    ap.add_argument("--policies", nargs="+", default=None, choices=list(POLICIES),
                    help="cache policies to measure (default: all; BlockBatch only at --batch 1)")
    ap.add_argument("--batch", type=int, default=defaults.batch, help="requests per forward B")
    ap.add_argument("--device", default=defaults.device, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=defaults.dtype, help="float32, bfloat16 or float16 "
                                                            "(default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    ap.add_argument("--time-budget", type=float, default=defaults.time_budget,
                    help="seconds of timed calls per kind of forward (at least one call)")
    ap.add_argument("--max-repeats", type=int, default=defaults.max_repeats, help="most timed calls per kind")
    ap.add_argument("--compile", action="store_true", help="also time the cached steps under torch.compile")
    ap.add_argument("--compile-mode", default=defaults.compile_mode,
                    help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build on the meta device and print FLOPs, bytes and bounds without timing")
    ap.add_argument("--hardware", default=defaults.hardware, choices=[g[2] for g in GPU_PEAKS],
                    help="roofline peaks from this datasheet entry (e.g. with --dry-run on a CPU machine)")
    ap.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops, help="override the peak TFLOP/s")
    ap.add_argument("--peak-gbs", type=float, default=defaults.peak_gbs, help="override the bandwidth, GB/s")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random weights and prompt")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:  # a user's mistake is one line on the command line, not a traceback
        settings = ScaleSettings(
            preset=args.preset, prompt_length=args.prompt_length, gen_lengths=args.lengths,
            block_length=args.block_length, batch=args.batch,
            policies=args.policies or [p for p in defaults.policies if p != "blockbatch" or args.batch == 1], device=args.device,
            dtype=args.dtype, threads=args.threads, time_budget=args.time_budget, max_repeats=args.max_repeats,
            compile=args.compile, compile_mode=args.compile_mode, dry_run=args.dry_run, hardware=args.hardware,
            peak_tflops=args.peak_tflops, peak_gbs=args.peak_gbs, seed=args.seed)
        shape = {SHAPE_FLAGS[k]: getattr(args, k) for k in SHAPE_FLAGS}
        print(f"`python {prog} {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`") + "\n")
        result = run(settings, shape)
    except ValueError as err:
        ap.error(str(err))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
