"""
What each decoding method's forwards cost at real model scale, timed, next to the roofline bound.

The methods differ in which tokens each forward computes: vanilla LLaDA the whole canvas, Fast-dLLM's
prefix cache (arXiv 2505.22618) the block and the masked suffix, DualCache the block alone,
dLLM-Cache (arXiv 2506.06295) the whole canvas with few tokens recomputed per layer, BlockBatch
(arXiv 2605.29233) one block per branch. This file RECORDS a request's forwards by running it
(decode.generate's on_step; blockbatch.generate's extras["forwards"]), costs them at a target shape
(tools/roofline.py), replays one of each kind on a random model of that shape and prints its time
next to the bound. A request's time is extrapolated: count x mean time of each kind.

The recorder is a random model, one layer of width 8 (`recorder_config`), of the target's family:
a Dream-shaped target (its shifted head: the row before a token predicts it) makes its cached
windows start one row before the block, and the recorder, shifted too, records them so. Under the
top-k schedule (one token per step, G forwards) the windows are the settings', the same for any model;
dLLM-Cache's plan is the same in every layer after the first. BlockBatch commits by threshold, so
its windows follow the model: the recorder, never 0.9 confident, commits one token per branch and
forward, with no merges or syncs; a trained model commits more. Its EOS is its mask id, never
committed, so no stray EOS ends a request.

    python -m tools.bench_scale                                          # llada-100m, CPU
    python -m tools.bench_scale --preset llada-8b --dry-run --hardware "H100 SXM"
    python -m tools.bench_scale --preset dream-7b --dry-run --hardware "H100 SXM"
    python -m tools.bench_scale --preset llada-8b --device cuda --dtype bfloat16 --compile

Shape legend: B batch, R rows of a forward, P prompt, G generation, L = P + G canvas (= cache
capacity), K block, Q query tokens of a forward, C model dim, V vocabulary, N layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch

import blockbatch
import decode
from cache import FeatureCache, KVCache
from model import FAMILIES, DiffusionLM, ModelConfig, _resolve_dtype
from tools.roofline import (HARDWARE, PRESETS, Forward, Hardware, estimate_peak_bytes, forward_bytes,
                            forward_flops, param_count, preset_config, published_peak, roofline)

# ---------------------------------------------------------------------------------------------
# A random model of a shape
# ---------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> DiffusionLM:
    """A randomly initialised DiffusionLM of cfg's family, built straight on `device` in `dtype`.

    The module is made on the meta device (no memory, no init), cast, then materialised once on
    the target device, so an 8B model never passes through host memory or float32. On "meta" it
    stays there: enough to count parameters. Matrices get normal(0, 0.02), norms ones: a forward's
    cost does not depend on the values.
    """
    with torch.device("meta"):
        model = DiffusionLM(cfg).to(dtype)
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


# ---------------------------------------------------------------------------------------------
# Recording a request's forwards: what generate really ran
# ---------------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """One forward of a recorded request: its cost in shape-free numbers, and the window it ran
    (on the CPU), which `replay` runs again on the target model."""

    forward: Forward
    window: decode.Window


def recorder_config(max_sequence_length: int, family: str = "llada") -> ModelConfig:
    """The random recorder's shape: one layer, width 8, 16 tokens, of the target's family (its
    logit shift decides where a cached window starts). It takes any request the target model
    takes. (BlockBatch's recording hides its EOS, `NeverEOS`: a random model proposes any token,
    and a committed EOS would end a request at a random point.)"""
    return ModelConfig(family=family, d_model=8, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=16,
                       vocab_size=16, rope_theta=500000.0, max_sequence_length=max_sequence_length,
                       mask_token_id=15, eos_token_id=14, pad_token_id=14)


def dllm_work(parts, P: int, L: int, n_verify: int) -> tuple[int, int]:
    """(tokens recomputed, tokens projected to values) per row of one dLLM-Cache layer whose plan
    is parts = (prompt, response, verify) (rows,) bools: a part any row needs is computed for all
    rows (decode.dllm_layer), so the batched forward costs what its busiest row asks."""
    prompt, response, verify = parts
    if bool(prompt.all() and response.all()):
        return L, 0  # an ordinary layer over the whole canvas
    p, r, v = (bool(t.any()) for t in parts)
    return P * p + (L - P) * r + n_verify * v, (L - P) * v


def describe_step(cache: str, state: decode.DecodeState) -> Recorded:
    """The forward decode_step just ran (state.window), as a Recorded."""
    window, rows, L = state.window, state.slots.shape[0], state.L
    q, (a, b) = window.positions.shape[-1], window.logits_range
    if window.refresh is not None:  # dLLM-Cache: named by what its later layers recompute
        plan = window.refresh
        (r0, v0), (r1, v1) = (dllm_work(plan.layer(i), plan.P, L, plan.n_verify) for i in (0, 1))
        prompt, response, verify = (bool(t.any()) for t in plan.layer(1))
        kind = {(True, True): "full refresh", (True, False): "prompt refresh",
                (False, True): "response refresh"}.get((prompt, response), "V-verify step" if verify else "reuse step")
        return Recorded(Forward(kind, rows, q, L, b - a, True, (r0, r1), (v0, v1)), window)
    if cache == "none":  # no cache: the queries attend to each other only
        return Recorded(Forward("full", rows, q, q, b - a, False), window)
    return Recorded(Forward("refresh" if window.full else f"{cache} step", rows, q, L, b - a, True), window)


def decode_policy(cache: str) -> Callable:
    """The recording of decode.generate under one cache policy: every step's window, by on_step."""

    def record(recorder, prompt: torch.Tensor, G: int, K: int) -> list[Recorded]:
        config = decode.DecodeConfig.for_model(recorder.config, gen_length=G, block_length=K, steps=G, cache=cache)
        seen = []
        decode.generate(recorder, prompt, config, on_step=lambda state: seen.append(describe_step(cache, state)))
        return seen

    return record


def blockbatch_sizes(G: int) -> tuple[int, ...]:
    """BlockBatch's default block sizes that divide G: one branch each."""
    sizes = tuple(b for b in blockbatch.BlockBatchConfig.block_sizes if G % b == 0)
    if not sizes:
        raise ValueError(f"gen_length {G} is divisible by none of BlockBatch's block sizes "
                         f"{blockbatch.BlockBatchConfig.block_sizes}")
    return sizes


class NeverEOS(torch.nn.Module):
    """A model whose EOS logit is always -1e4 (finite: BlockBatch refuses non-finite logits), so
    EOS is never proposed and no request ends early."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def logit_shift(self):  # the family's, which BlockBatch's windows follow
        return self.model.logit_shift

    def forward(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)  # (rows, K, V)
        return logits.index_fill(-1, torch.tensor([self.config.eos_token_id], device=logits.device), -1e4)


def record_blockbatch(recorder, prompt: torch.Tensor, G: int, K: int) -> list[Recorded]:
    """BlockBatch's forwards, from blockbatch.generate's extras["forwards"]: (rows R, query tokens
    Q, logits K) of each batched forward. A full forward (Q = L) is replayed over the whole canvas;
    a block step as R rows of Q positions (its padded tokens cost as much as real ones), whose
    logits start after the recorder's logit shift (a shifted model's window holds the row before
    its block). The block length K is unused: each branch has its own (the default sizes that divide G)."""
    config = blockbatch.BlockBatchConfig.for_model(recorder.config, gen_length=G, block_sizes=blockbatch_sizes(G))
    out = blockbatch.generate(NeverEOS(recorder), prompt, config)
    P, shift = prompt.shape[1], recorder.logit_shift
    L = P + G
    seen = []
    for n, (R, Q, k) in enumerate(out.extras["forwards"]):
        if Q == L:  # init (one row, shared by every branch) or a batched refresh
            window = decode.Window(torch.arange(L), (L - k, L), True)
            kind = "init forward" if n == 0 else "batched refresh"
        else:
            start = P + (G - Q) // 2  # any Q positions inside the answer cost the same
            window = decode.Window((start + torch.arange(Q)).expand(R, -1), (shift, shift + k), False)  # (R, Q)
            kind = "batched block step"
        seen.append(Recorded(Forward(kind, R, Q, L, k, True), window))
    return seen


@dataclass(frozen=True)
class Policy:
    """A decoding method as the benchmark sees it: how to record a request's forwards."""

    record: Callable  # (recorder, prompt (B, P), G, K) -> the request's forwards, in order
    block_length: int | None = None  # its own block length (None = --block-length)


# One entry per cache policy registered in decode.py (a new one is recorded by running it), and
# BlockBatch, whose branches have block sizes of their own.
OWN_BLOCK_LENGTH = {"dllm": 8}  # 8-token blocks, dLLM-Cache's LLaDA setting
POLICIES = {name: Policy(decode_policy(name), OWN_BLOCK_LENGTH.get(name)) for name in decode.CACHE_POLICIES}
POLICIES["blockbatch"] = Policy(record_blockbatch)


def representative(forwards: list[Recorded], shift: int = 0) -> Recorded:
    """The forward to time for a kind: one of them if all have one shape, else one of the mean Q.

    A forward's cost is affine in Q at fixed rows, keys and logits (linear layers are
    proportional to Q, attention to Q·S), so the mean cost of a kind whose Q varies (the prefix
    step: block + a shrinking suffix; BlockBatch's step, as long branches finish) is the cost of
    one forward of the mean Q: the longest one's window cut to its last Q positions, with the
    mean number of logits. `shift` is the model's logit shift: a shifted model's logits may end one
    row after the window (its last row predicts the next position), and never start at a cut
    window's first row, which has no row before it.
    """
    qs = [r.forward.q for r in forwards]
    if min(qs) == max(qs):
        return forwards[len(forwards) // 2]
    longest = max(forwards, key=lambda r: r.forward.q)
    q = round(sum(qs) / len(qs))
    k = round(sum(r.forward.logits for r in forwards) / len(forwards))
    a = min(longest.window.logits_range[0], q - k + shift)
    window = replace(longest.window, positions=longest.window.positions[..., -q:], logits_range=(a, a + k))
    fwd = longest.forward
    return Recorded(replace(fwd, q=q, logits=k, keys=fwd.keys if fwd.cached else q), window)


# ---------------------------------------------------------------------------------------------
# Timing forwards
# ---------------------------------------------------------------------------------------------


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
    what = "CPU time" if clock is time.process_time else "wall time"
    return Hardware(f"CPU, {torch.get_num_threads()} thread(s)", flops, bandwidth,
                    f"measured ({what}): {n}x{n} {str(dtype).removeprefix('torch.')} matmul, {copy_mib} MiB copy")


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


@torch.no_grad()
def filled_cache(model, canvas: torch.Tensor, plan: decode.Refresh | None) -> KVCache:
    """A request's cache at the target shape, filled by one full forward over the (R, L) canvas,
    as a block's first step fills it: K/V, and for dLLM-Cache (plan given) the features too."""
    R, L = canvas.shape
    everything = torch.arange(L, device=canvas.device)  # (L,)
    if plan is None:
        cache = KVCache.for_model(model.config, batch=R, capacity=L, device=canvas.device, dtype=model.dtype)
        decode.model_forward(model, canvas, decode.Window(everything, (L - 1, L), True), cache, None)
        return cache
    cache = FeatureCache.for_model(model.config, batch=R, capacity=L, device=canvas.device, dtype=model.dtype)
    yes = torch.ones(R, dtype=torch.bool, device=canvas.device)  # (R,)
    full = decode.Refresh(plan.P, yes, yes, ~yes, plan.n_verify)
    decode.dllm_forward(model, canvas, decode.Window(everything, (L - 1, L), True, full), cache, None)
    return cache


def on_device(window: decode.Window, device: torch.device) -> decode.Window:
    """The recorded window (positions, and dLLM-Cache's plan) on the target device."""
    plan = window.refresh
    if plan is not None:
        plan = replace(plan, **{name: getattr(plan, name).to(device) for name in ("prompt", "response", "verify")},
                       first_layer=None if plan.first_layer is None else plan.first_layer.to(device))
    return replace(window, positions=window.positions.to(device), refresh=plan)


def replay(model, rec: Recorded, canvas: torch.Tensor, caches: dict) -> Callable:
    """A function m -> logits that runs the recorded forward on m (the target model, or its
    compiled form) exactly as decode.py made it: the window's tokens of the (R, L) canvas, its
    positions and logits range, against a cache filled once per (kind, rows) in `caches`."""
    fwd, window = rec.forward, on_device(rec.window, canvas.device)
    canvas = canvas[:fwd.rows]  # (R, L)
    L = canvas.shape[1]
    tokens = canvas.gather(1, window.positions.clamp(max=L - 1).expand(fwd.rows, -1))  # (R, Q); trash reads any
    cache = None
    if fwd.cached:
        key = (fwd.features, fwd.rows)
        if key not in caches:
            caches[key] = filled_cache(model, canvas, window.refresh)
        cache = caches[key]
    forward = decode.dllm_forward if fwd.features else decode.model_forward
    return lambda m: forward(m, tokens, window, cache, None)


_COMPILED = {}


def compile_step(model, run: Callable, settings: ScaleSettings, device: torch.device) -> dict:
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
            eager = run(model).float()
            _sync(device)
            start = time.perf_counter()
            out = run(compiled).float()  # the first call compiles
            _sync(device)
            compile_s = time.perf_counter() - start
            diff = float((out - eager).abs().max())
        times, _ = time_forward(lambda: run(compiled), device, settings.time_budget, settings.max_repeats)
        return dict(compiled_seconds=sum(times) / len(times), compile_seconds=compile_s, compile_max_diff=diff)
    except Exception as err:  # report and go on with the eager figures
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return dict(compile_error=f"{type(err).__name__}: {first}")


# ---------------------------------------------------------------------------------------------
# Settings and the hardware's peaks
# ---------------------------------------------------------------------------------------------


@dataclass
class ScaleSettings:
    """Settings of a scale benchmark run; the CLI reads its defaults from here."""

    preset: str = "llada-100m"  # model shape (roofline.PRESETS); the shape flags override its fields
    prompt_length: int = 512  # P, a few-shot GSM8K-like prompt
    gen_lengths: list[int] = field(default_factory=lambda: [256, 1024])  # G values, one table each
    block_length: int = 32  # K, for policies without their own
    policies: list[str] = field(default_factory=lambda: list(POLICIES))  # which methods
    batch: int = 1  # B, requests decoded together
    device: str | None = None  # cpu or cuda (default: cuda when available)
    dtype: str | None = None  # float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)
    threads: int = 1  # torch CPU threads (1 by default: the machine is shared)
    time_budget: float = 2.0  # seconds of timing per forward kind (at least one timed call)
    max_repeats: int = 20  # most timed calls per kind
    compile: bool = False  # also time the cached steps captured with torch.compile
    compile_mode: str | None = None  # torch.compile mode (default: reduce-overhead on CUDA, default on CPU)
    dry_run: bool = False  # build on the meta device, print counts and bounds, time nothing
    hardware: str | None = None  # take roofline peaks from this roofline.GPU_PEAKS label instead of the device
    peak_tflops: float | None = None  # override the peak FLOP/s (TFLOP/s)
    peak_gbs: float | None = None  # override the memory bandwidth (GB/s)
    seed: int = 0  # random weights and prompt

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"unknown policies {unknown}; use some of {list(POLICIES)}")
        for name in ("prompt_length", "block_length", "batch", "threads", "max_repeats"):
            decode.check_int(name, getattr(self, name), low=1)
        decode.check_finite("time_budget", self.time_budget, low=0, low_open=True)
        for name in ("peak_tflops", "peak_gbs"):  # 0 or nan would print tables of nan
            if getattr(self, name) is not None:
                decode.check_finite(name, getattr(self, name), low=0, low_open=True)
        if not self.gen_lengths:
            raise ValueError("gen_lengths is empty: give at least one generation length")
        for G in self.gen_lengths:
            decode.check_int("every gen_length", G, low=1)
            for p in self.policies:
                K = POLICIES[p].block_length or self.block_length
                if p == "blockbatch":
                    blockbatch_sizes(G)
                elif G % K != 0:
                    raise ValueError(f"gen_length {G} is not a positive multiple of {p}'s block length {K}")
        if "blockbatch" in self.policies and self.batch != 1:
            raise ValueError("BlockBatch decodes one request per call (its batch rows are its branches): use --batch 1")
        if self.hardware is not None and self.hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {self.hardware!r}; use one of {HARDWARE}")
        _resolve_dtype(self.dtype)  # an unknown name is model.py's one-line error, before anything runs


def resolve_device_dtype(settings: ScaleSettings) -> tuple[torch.device, torch.dtype]:
    """The device (meta for a dry run without one) and dtype (bfloat16 on CUDA and meta, else float32)."""
    if settings.dry_run and settings.device is None:
        device = torch.device("meta")
    else:
        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    default = torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32
    return device, _resolve_dtype(settings.dtype) or default


def pick_hardware(settings: ScaleSettings, device: torch.device, dtype: torch.dtype) -> Hardware | None:
    """Roofline peaks: a named table entry, the CUDA device's datasheet, or CPU measurements;
    --peak-tflops / --peak-gbs override either figure. None: no bounds (a dry run without
    --hardware, or a GPU the table does not know)."""
    both = settings.peak_tflops is not None and settings.peak_gbs is not None
    hw = None
    if settings.hardware is not None:
        hw = published_peak(settings.hardware, dtype)
    elif device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw = published_peak(props.name, dtype, props.total_memory / 2 ** 30)
        if hw is None and not both:
            print(f"no published figures for {props.name!r}; pass --peak-tflops and --peak-gbs", file=sys.stderr)
    elif device.type == "cpu" and not both:
        hw = measure_cpu(dtype)
    if settings.peak_tflops is None and settings.peak_gbs is None:
        return hw
    if hw is None and not both:
        raise ValueError(f"no peak figures for {device} to take the other one from: pass both --peak-tflops and "
                         f"--peak-gbs (or --hardware)")
    flops = settings.peak_tflops * 1e12 if settings.peak_tflops is not None else hw.flops
    bandwidth = settings.peak_gbs * 1e9 if settings.peak_gbs is not None else hw.bandwidth
    source = (hw.source + "; " if hw else "") + "overridden on the command line"
    return Hardware(hw.name if hw else str(device), flops, bandwidth, source)


# ---------------------------------------------------------------------------------------------
# The benchmark: record, cost, time, extrapolate
# ---------------------------------------------------------------------------------------------


@dataclass
class KindRow:
    """One row of the table: one kind of forward (at one row count) of one policy at one G."""

    gen_length: int  # G
    policy: str  # decoding method
    kind: str  # kind of forward
    rows: int  # R, batch rows of these forwards
    count: int  # forwards of this kind in one request
    q_mean: float  # mean query tokens per row
    q_min: int  # smallest and largest query window of this kind
    q_max: int
    keys: int  # key positions each query attends over
    logits: float  # mean tokens per row the LM head runs over
    recomputed: float | None  # dLLM-Cache: mean tokens each later layer recomputes (None: all Q)
    computed: float  # mean tokens computed per forward (token-layer rows / N, all rows)
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


def record_all(recorder, settings: ScaleSettings, G: int) -> dict[str, list[Recorded]]:
    """Each policy's forwards for one request of P + G tokens (B rows of random ids below the
    recorder's special ids), recorded by running it."""
    g = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, recorder.config.pad_token_id, (settings.batch, settings.prompt_length), generator=g)
    out = {}
    for name in settings.policies:
        print(f"  [G={G}] recording {name} ...", file=sys.stderr, flush=True)
        policy = POLICIES[name]
        out[name] = policy.record(recorder, prompt, G, policy.block_length or settings.block_length)
    return out


def plan(cfg: ModelConfig, G: int, recordings: dict[str, list[Recorded]], hw: Hardware | None,
         elem: int) -> list[tuple[KindRow, Recorded]]:
    """For each policy and kind of forward: the row, costed at the target shape, and the forward to time."""
    out = []
    for name, recorded in recordings.items():
        groups: dict[tuple[str, int], list[Recorded]] = {}
        for r in recorded:
            groups.setdefault((r.forward.kind, r.forward.rows), []).append(r)
        for (kind, rows), rs in groups.items():
            fs = [r.forward for r in rs]
            flops = [forward_flops(cfg, f) for f in fs]
            nbytes = [forward_bytes(cfg, f, elem) for f in fs]
            bound, by = None, None
            if hw:
                # The bound is a max, not affine in Q: average the bounds of the real forwards
                # (a prefix step can be memory-bound early in a request and compute-bound late).
                bounds = [roofline(hw, fl, nb) for fl, nb in zip(flops, nbytes)]
                bound = sum(b for b, _ in bounds) / len(bounds)
                limits = Counter(limit for _, limit in bounds)
                by = next(iter(limits)) if len(limits) == 1 else f"mixed ({limits['memory']} memory)"
            rep = representative(rs, cfg.logit_shift)
            n = len(fs)
            row = KindRow(G, name, kind, rows, n, sum(f.q for f in fs) / n, min(f.q for f in fs), max(f.q for f in fs),
                          rep.forward.keys, sum(f.logits for f in fs) / n,
                          sum(f.layer(1)[0] for f in fs) / n if fs[0].features else None,
                          sum(f.computed(cfg.n_layers) for f in fs) / n, sum(flops) / n, sum(nbytes) / n,
                          bound, by, rep.forward.q)
            out.append((row, rep))
    return out


def measure(model, cfg: ModelConfig, settings: ScaleSettings, G: int, planned: list[tuple[KindRow, Recorded]],
            device: torch.device, done: dict) -> None:
    """Time the representative forward of every row. A shape already timed (`done`, e.g. the
    prefix and dual refresh) is not timed again; each policy's caches are freed before the next's."""
    P, L, elem = settings.prompt_length, settings.prompt_length + G, torch.finfo(model.dtype).bits // 8
    g = torch.Generator().manual_seed(settings.seed)
    rows = max(row.rows for row, _ in planned)
    canvas = torch.full((rows, L), cfg.mask_token_id, dtype=torch.long)  # (R, L): prompt, then G masks
    canvas[:, :P] = torch.randint(0, min(cfg.mask_token_id, cfg.eos_token_id), (rows, P), generator=g)
    canvas = canvas.to(device)
    caches, current = {}, None
    for row, rec in planned:
        fwd = rec.forward
        shape = (replace(fwd, kind=""), rec.window.positions.dim())  # all the cost depends on
        if row.policy != current:
            caches, current = {}, row.policy  # drop the previous policy's caches
        if shape not in done:
            print(f"  [G={G}] timing {row.policy} / {row.kind} (R={fwd.rows}, Q={fwd.q}) ...", file=sys.stderr,
                  flush=True)
            run = replay(model, rec, canvas, caches)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, walls = time_forward(lambda: run(model), device, settings.time_budget, settings.max_repeats)
            if device.type == "cuda":
                peak, measured = torch.cuda.max_memory_allocated(device), True
            else:
                peak, measured = estimate_peak_bytes(cfg, fwd, elem), False
            compiled = {}
            if settings.compile and fwd.cached and not fwd.features and not rec.window.full:  # a cached step
                compiled = compile_step(model, run, settings, device)
            done[shape] = dict(seconds=sum(times) / len(times), wall_seconds=sum(walls) / len(walls),
                               timed_calls=len(times), peak_bytes=peak, peak_measured=measured, **compiled)
        for key, value in done[shape].items():
            setattr(row, key, value)


def request_summary(rows: list[KindRow], settings: ScaleSettings) -> list[dict]:
    """Per policy at one G: forwards, tokens pushed and computed, FLOPs, bytes, and the request's
    time extrapolated from the timed forwards (count × mean seconds, summed over kinds)."""
    out = []
    for policy in dict.fromkeys(r.policy for r in rows):
        rs = [r for r in rows if r.policy == policy]
        G = rs[0].gen_length
        if policy == "blockbatch":
            sizes = blockbatch_sizes(G)
            block = f"{sizes[0]}–{sizes[-1]} (branches)"
            composition = " + ".join(f"{r.count} {r.kind}" + (f" ({r.rows} rows)" if r.rows > 1 else "") for r in rs)
        else:
            block = POLICIES[policy].block_length or settings.block_length
            blocks = G // block
            if all(r.count % blocks == 0 for r in rs):  # the same forwards in every block
                composition = " + ".join(f"{r.count // blocks} {r.kind}" for r in rs) + f" (×{blocks} blocks)"
            else:  # a schedule of its own (dLLM-Cache counts its steps across blocks)
                composition = " + ".join(f"{r.count} {r.kind}" for r in rs) + f" ({blocks} blocks)"
        timed = all(r.seconds is not None for r in rs)
        bounded = all(r.bound_s is not None for r in rs)

        def total(key):  # over the request: count × the kind's mean, summed over kinds
            return sum(r.count * getattr(r, key) for r in rs)

        out.append(dict(
            gen_length=G, policy=policy, block_length=block, composition=composition,
            forwards=sum(r.count for r in rs),
            query_tokens=round(sum(r.count * r.rows * r.q_mean for r in rs)), computed_tokens=round(total("computed")),
            flops=total("flops"), bytes=total("bytes"),
            seconds=total("seconds") if timed else None, wall_seconds=total("wall_seconds") if timed else None,
            compiled_seconds=(sum(r.count * (r.compiled_seconds or r.seconds) for r in rs)
                              if timed and any(r.compiled_seconds for r in rs) else None),
            bound_s=total("bound_s") if bounded else None))
    # Speedup over vanilla (no cache): of the extrapolated times, or of the bounds when nothing was timed.
    base = next((s for s in out if s["policy"] == "none"), None)
    for s in out:
        key = "seconds" if s["seconds"] is not None else "bound_s"
        s["speedup"] = base[key] / s[key] if base and base[key] and s[key] else None
    return out


# ---------------------------------------------------------------------------------------------
# The printed tables
# ---------------------------------------------------------------------------------------------


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
        if r.recomputed is not None and r.recomputed != r.q_mean:
            q += f" ({r.recomputed:.0f} recomputed)"
        if r.rows > 1:
            q = f"{r.rows} × {q}"
        ratio = r.seconds / r.bound_s if r.seconds is not None and r.bound_s else None
        peak = "–" if r.peak_bytes is None else _num(r.peak_bytes, 1e9) + ("" if r.peak_measured else " est.")
        cells = [r.policy, r.kind, str(r.count), q, str(r.keys), _num(r.flops, 1e9), _num(r.bytes, 1e9),
                 _num(r.flops / r.bytes), r.bound_by or "–", _ms(r.bound_s), _ms(r.seconds),
                 _num(ratio)] + ([_ms(r.wall_seconds)] if cpu_clock else []) + [str(r.timed_calls or "–"), peak]
        if with_compile:
            cells += ["failed", "–"] if r.compile_error else [_ms(r.compiled_seconds), _num(r.compile_seconds)]
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
                 f"{s['computed_tokens']:,}", _num(s["flops"], 1e12), _num(s["bytes"], 1e9), _num(s["bound_s"]),
                 _num(s["seconds"]), "–" if s["speedup"] is None else f"{s['speedup']:.1f}×"]
        if cpu_clock:
            cells.insert(-1, _num(s["wall_seconds"]))
        if with_compile:
            cells.insert(-1, _num(s["compiled_seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[KindRow], settings: ScaleSettings, device: torch.device, cpu_clock: bool) -> list[str]:
    """What the reader of one G's tables must know about how they were made."""
    out = []
    if settings.dry_run:
        out.append("Dry run: nothing was timed; the speedups are ratios of the roofline bounds.")
    else:
        out.append("Request times are extrapolated: forwards per request × mean measured seconds of a few "
                   "timed forwards of each kind; nothing ran a whole request at this shape.")
        if any(r.q_min != r.q_max for r in rows):
            out.append("Kinds whose Q varies over the request are timed at their mean Q (cost is affine in Q); "
                       "their FLOPs, bytes and bounds are exact means over the request's forwards.")
    if cpu_clock:
        out.append("Times are this process's CPU time per forward (one torch thread), which leaves out the "
                   "time other jobs held the core; 'wall ms' is the wall clock. The roofline peaks were "
                   "measured the same way.")
    if not settings.dry_run and device.type != "cuda":
        out.append("Peak memory on CPU is an estimate (weights + cache + largest activation set), not measured.")
    for r in rows:
        if r.compiled_seconds is not None:
            out.append(f"torch.compile ({r.policy} / {r.kind}): {_num(r.compile_seconds)} s to compile, "
                       f"largest |compiled - eager| logit {r.compile_max_diff:.2g}.")
    out += [f"torch.compile failed: {e}" for e in dict.fromkeys(r.compile_error for r in rows if r.compile_error)]
    return out


def run(settings: ScaleSettings, shape: dict | None = None) -> dict:
    """Record, cost, time and print every table; returns the rows (also for --json)."""
    cfg = preset_config(settings.preset, **(shape or {}))
    device, dtype = resolve_device_dtype(settings)
    elem = torch.finfo(dtype).bits // 8
    too_long = [G for G in settings.gen_lengths if settings.prompt_length + G > cfg.max_sequence_length]
    if too_long:
        raise ValueError(f"prompt {settings.prompt_length} + G {too_long[0]} exceeds max_sequence_length "
                         f"{cfg.max_sequence_length}")
    if not settings.dry_run:
        check_fits(cfg, elem, device)
    torch.set_num_threads(settings.threads)
    load_before = os.getloadavg()
    recorder = build_model(recorder_config(cfg.max_sequence_length, cfg.family), seed=settings.seed)
    recordings = {G: record_all(recorder, settings, G) for G in settings.gen_lengths}  # fails before any timing
    model = build_model(cfg, device="meta" if settings.dry_run else device, dtype=dtype, seed=settings.seed)
    n_params = sum(p.numel() for p in model.parameters())  # counted on the built module, meta or real
    hw = pick_hardware(settings, device, dtype)
    cpu_clock = not settings.dry_run and timing_clock(device) is time.process_time
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "meta (nothing timed)" if settings.dry_run else f"CPU, {torch.get_num_threads()} thread(s)"
    family = FAMILIES[cfg.family]
    header = [f"model: {settings.preset} shape (random weights), {n_params / 1e6:,.1f}M parameters: C {cfg.d_model}, "
              f"N {cfg.n_layers}, H {cfg.n_heads}, Hkv {cfg.n_kv_heads}, M {cfg.mlp_hidden_size}, V {cfg.vocab_size}; "
              f"{family.label} family (q/k/v biases: {'yes' if cfg.include_bias or cfg.include_qkv_bias else 'no'}, "
              f"logit shift {cfg.logit_shift}); {str(dtype).removeprefix('torch.')}, batch {settings.batch}",
              f"device: {device_name}; CPU load average before: {load_before[0]:.2f}"]
    if hw:
        header.append(f"roofline: {_num(hw.flops, 1e12)} TFLOP/s, {_num(hw.bandwidth, 1e9)} GB/s ({hw.source})")
    header.append(f"request: prompt {settings.prompt_length}, one token per step (top-k, steps = G), block "
                  f"{settings.block_length} unless the policy has its own; BlockBatch: threshold "
                  f"{blockbatch.BlockBatchConfig.threshold}")
    header.append(f"forwards recorded by running each method with a random 1-layer, width-8 {family.label} model "
                  f"(exact for top-k; BlockBatch: one token per branch and forward)")
    print("\n".join(header) + "\n", flush=True)
    result = {"header": header, "params": n_params, "kinds": [], "requests": []}
    timed = {}  # shape -> timings, shared across G and policies
    for G in settings.gen_lengths:
        planned = plan(cfg, G, recordings[G], hw, elem)
        if not settings.dry_run:
            measure(model, cfg, settings, G, planned, device, timed)
        rows = [r for r, _ in planned]
        summary = request_summary(rows, settings)
        print(f"### G = {G} (L = P + G = {settings.prompt_length + G})\n")
        print(kinds_table(rows, settings.compile, cpu_clock) + "\n")
        print(summary_table(summary, settings.compile, cpu_clock) + "\n")
        print("\n".join(notes(rows, settings, device, cpu_clock)) + "\n", flush=True)
        result["kinds"] += [asdict(r) for r in rows]
        result["requests"] += summary
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    footer = f"CPU load average after: {os.getloadavg()[0]:.2f}; process peak RSS {rss / 1e9:.2f} GB"
    print(footer)
    result["footer"] = footer
    return result


def check_writable(path: str) -> None:
    """A ValueError now, not after a long run, when `path` cannot be written as a file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        why = "is a directory" if os.path.isdir(path) else f"folder {folder} does not exist or is not writable"
        raise ValueError(f"cannot write --json {path}: {why}")


# Flag name -> ModelConfig field, for the explicit --d-model/--layers/... form.
SHAPE_FLAGS = {"d_model": "d_model", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
               "mlp": "mlp_hidden_size", "vocab": "vocab_size"}


def main(argv=None, prog: str = "-m tools.bench_scale"):
    """Parse flags, run, print. `prog` is the command echoed above the tables (bench.py's
    `--scale` mode passes its own name)."""
    defaults = ScaleSettings()
    ap = argparse.ArgumentParser(prog=f"python {prog}", description="Per-forward cost of each decoding method at "
                                                                    "model scale, against the roofline bound.")
    ap.add_argument("--preset", default=defaults.preset, choices=sorted(PRESETS), help="model shape")
    ap.add_argument("--d-model", type=int, help="override the preset's model width C")
    ap.add_argument("--layers", type=int, help="override the preset's layer count N")
    ap.add_argument("--heads", type=int, help="override the preset's query heads H")
    ap.add_argument("--kv-heads", type=int, help="override the preset's key/value heads Hkv")
    ap.add_argument("--mlp", type=int, help="override the preset's MLP hidden size M")
    ap.add_argument("--vocab", type=int, help="override the preset's vocabulary size V")
    ap.add_argument("--prompt-length", type=int, default=defaults.prompt_length, help="prompt tokens P")
    ap.add_argument("--lengths", dest="gen_lengths", type=int, nargs="+", default=defaults.gen_lengths,
                    help="generation lengths G")
    ap.add_argument("--block-length", type=int, default=defaults.block_length, help="block length K")
    ap.add_argument("--policies", nargs="+", default=None, choices=list(POLICIES),
                    help="methods to measure (default: all; BlockBatch only at --batch 1)")
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
    ap.add_argument("--hardware", default=defaults.hardware, choices=HARDWARE,
                    help="roofline peaks from this datasheet entry (e.g. with --dry-run on a CPU machine)")
    ap.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops, help="override the peak TFLOP/s (> 0)")
    ap.add_argument("--peak-gbs", type=float, default=defaults.peak_gbs, help="override the bandwidth, GB/s (> 0)")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random weights and prompt")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:  # a user's mistake is one line on the command line, not a traceback
        if args.policies is None:  # by default every method that takes this batch
            args.policies = [p for p in defaults.policies if p != "blockbatch" or args.batch == 1]
        settings = ScaleSettings(**{f.name: getattr(args, f.name) for f in fields(ScaleSettings)})  # flag = field
        if args.json:
            check_writable(args.json)
        shape = {SHAPE_FLAGS[k]: getattr(args, k) for k in SHAPE_FLAGS}
        print(f"`python {prog} {shlex.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`") + "\n")
        result = run(settings, shape)
    except ValueError as err:
        ap.error(str(err))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
