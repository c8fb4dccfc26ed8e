"""
What one forward of a LLaDA- or Dream-shaped model costs, counted from the shapes, and the hardware's floor.

A forward's time is bounded below by two numbers: the FLOPs of the tokens it computes at the chip's
peak rate, and the bytes it must read (every weight once, plus cached keys/values and features) at
its memory bandwidth. The roofline bound is max(FLOPs / peak, bytes / bandwidth) (Williams,
Waterman and Patterson, "Roofline: An Insightful Visual Performance Model for Multicore
Architectures", CACM 2009); the term that wins names what limits the forward. A `Forward` here
describes a forward in numbers that do not depend on the model's width (rows, query tokens, keys,
logits, and what dLLM-Cache's layers recompute), so one recorded on a small model is costed at
LLaDA-8B's shape (Nie et al., "Large Language Diffusion Models", arXiv 2502.09992) or Dream-7B's
(Ye et al., "Dream 7B", arXiv 2508.15487: grouped-query attention and biases on q/k/v). Nothing
here runs a model: tools/bench_scale.py records the forwards and times them.

Simplifications: FLOPs count matrix multiplies (projections, attention scores and values, MLP,
LM head) and the bias additions of a model that has biases (Dream's q/k/v: one add per output);
norms, RoPE, softmax and V-verify's cosine are a few percent at these sizes and left out. Bytes
count reads only: each weight matrix a forward uses, once (the embedding only for the rows it
gathers), and the keys/values and cached features attention reads; activations are assumed to
stay on chip. GPU peaks are datasheet figures, not measurements.

    cfg = preset_config("llada-8b")
    step = Forward("dual step", rows=1, q=32, keys=768, logits=32, cached=True)
    bound, by = roofline(published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16),
                         forward_flops(cfg, step), forward_bytes(cfg, step, elem=2))   # 4.6 ms, memory

Shape legend: R rows of a forward, Q query tokens per row, S keys each query attends over, K
logits per row, L = P + G canvas, C model dim, M MLP hidden dim, V vocabulary, N layers, H/Hkv
heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decode import check_finite
from model import ModelConfig

# ---------------------------------------------------------------------------------------------
# Model shapes: the released LLaDA-8B and Dream-7B, and smaller presets of LLaDA's architecture
# ---------------------------------------------------------------------------------------------

# The released LLaDA-8B and Dream-v0-7B config.json files (Dream's keys under ModelConfig's
# names: hidden_size = d_model, ...; its family gives it biases on q/k/v and the shifted head).
# The small presets keep LLaDA-8B's head dim (128), MLP ratio
# (M = 3C) and RoPE base, and shrink the vocabulary with the model so the LM head keeps a share
# of the weights close to the 8B's 6.5% (with LLaDA's 126k vocabulary a 100M model would be
# mostly embedding table). Their special ids sit at the end of their vocabulary.
PRESETS = {
    "llada-8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                     vocab_size=126464, rope_theta=500000.0, max_sequence_length=4096,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "dream-7b": dict(family="dream", d_model=3584, n_heads=28, n_kv_heads=4, n_layers=28, mlp_hidden_size=18944,
                     vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6, max_sequence_length=131072,
                     mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, bos_token_id=151665),
    "llada-1b": dict(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, mlp_hidden_size=6144,
                     vocab_size=32768, rope_theta=500000.0, max_sequence_length=4096),
    "llada-100m": dict(d_model=768, n_heads=6, n_kv_heads=6, n_layers=10, mlp_hidden_size=2304,
                       vocab_size=16384, rope_theta=500000.0, max_sequence_length=4096),
    # For the tests and a quick look: grouped-query attention, seconds on any CPU.
    "tiny": dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=192, vocab_size=512,
                 rope_theta=500000.0, max_sequence_length=4096),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with any shape field overridden (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    raw = dict(PRESETS[name], **overrides)
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        raw["n_kv_heads"] = raw["n_heads"]  # a new head count without a kv count means plain MHA
    V = raw["vocab_size"]
    # Special ids: the preset's own when they fit, else the last ids of the vocabulary.
    for field_, fallback in (("mask_token_id", V - 1), ("eos_token_id", V - 2), ("pad_token_id", V - 2)):
        if raw.get(field_) is None or raw[field_] >= V:
            raw[field_] = fallback
    if raw.get("bos_token_id") is not None and raw["bos_token_id"] >= V:  # Dream's BOS, where it has one
        raw["bos_token_id"] = V - 3
    return ModelConfig(**raw)


def qkv_bias(cfg: ModelConfig) -> bool:
    """Whether q, k and v have biases: Dream's family default, or every layer's (include_bias)."""
    return bool(cfg.include_bias or cfg.include_qkv_bias)


def bias_size(cfg: ModelConfig) -> int:
    """Bias entries of one layer, which are also its bias additions per token: q, k, v (Dream, or
    include_bias), and with include_bias the output projection and SwiGLU's three matrices."""
    C, M, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.n_kv_heads * cfg.head_dim
    return (C + 2 * kv if qkv_bias(cfg) else 0) + (C + 2 * M + C if cfg.include_bias else 0)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one block: q, k, v, out, SwiGLU's three matrices, two norms, biases."""
    C, M, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.n_kv_heads * cfg.head_dim
    return C * C + 2 * C * kv + C * C + 3 * C * M + 2 * C + bias_size(cfg)


def head_params(cfg: ModelConfig) -> int:
    """Parameters of the untied LM head (0 when it is the embedding table)."""
    return 0 if cfg.weight_tying else cfg.embedding_size * (cfg.d_model + (1 if cfg.include_bias else 0))


def param_count(cfg: ModelConfig) -> int:
    """Parameters of DiffusionLM(cfg), from the shapes: embedding, blocks, final norm, LM head."""
    return cfg.embedding_size * cfg.d_model + cfg.n_layers * layer_params(cfg) + cfg.d_model + head_params(cfg)


# ---------------------------------------------------------------------------------------------
# One forward, as numbers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """What one forward computes, independent of the model's width and depth.

    An ordinary forward (LLaDA, Fast-dLLM's caches, BlockBatch) runs all Q query tokens of each
    row through every layer. A dLLM-Cache forward takes the whole canvas but each layer recomputes
    only some tokens and reuses cached attention and MLP outputs for the rest; its plan is the
    same for every layer but possibly the first (decode.Refresh.layer), so two numbers describe
    all N layers: layer 0's and every later layer's.
    """

    kind: str  # the table row it is counted under ("full", "refresh", "dual step", ...)
    rows: int  # R, batch rows (requests; BlockBatch: its branches)
    q: int  # Q, query tokens per row (all of them are embedded)
    keys: int  # S, key positions each query attends over: the cache's L, or Q without a cache
    logits: int  # K, tokens per row the LM head runs over (decode's logits_range)
    cached: bool  # attention reads (and the forward writes) a KV cache
    recompute: tuple[int, int] | None = None  # dLLM-Cache: tokens layer 0 and each later layer
    #   recompute (q/k/v, attention, MLP); None = an ordinary forward, all Q in every layer
    verify: tuple[int, int] = (0, 0)  # dLLM-Cache's V-verify: tokens layer 0 / each later layer
    #   only projects to values, to compare them with the cached ones

    def __post_init__(self):
        if min(self.rows, self.q, self.keys) < 1 or self.logits < 0 or self.logits > self.q:
            raise ValueError(f"a forward needs rows, q, keys >= 1 and 0 <= logits <= q, got {self}")

    @property
    def features(self) -> bool:
        """Whether every layer reads cached attention and MLP outputs (dLLM-Cache)."""
        return self.recompute is not None

    def layer(self, i: int) -> tuple[int, int]:
        """(tokens recomputed, tokens only projected to values) per row in layer i."""
        if self.recompute is None:
            return self.q, 0
        j = 0 if i == 0 else 1
        return self.recompute[j], self.verify[j]

    def computed(self, n_layers: int) -> float:
        """Token-layer rows over all rows, divided by N: the tokens this forward really computes."""
        return self.rows * (self.layer(0)[0] + (n_layers - 1) * self.layer(1)[0]) / n_layers


def over_layers(cfg: ModelConfig, fwd: Forward, per_layer) -> int:
    """Sum of per_layer(recomputed, verified) over the N layers (layer 0, then N - 1 alike)."""
    return per_layer(*fwd.layer(0)) + (cfg.n_layers - 1) * per_layer(*fwd.layer(1))


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes of one forward
# ---------------------------------------------------------------------------------------------


def layer_flops(cfg: ModelConfig, Q: int, S: int, verify: int = 0) -> int:
    """FLOPs of one layer for one row: Q query tokens over S keys (a multiply-add counts 2), plus
    `verify` tokens projected to values only; with the bias additions, one per bias and token."""
    C, M, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.n_kv_heads * cfg.head_dim
    proj = 2 * Q * C * (C + 2 * kv + C)  # q, k, v and output projections
    attn = 2 * 2 * Q * S * cfg.n_heads * cfg.head_dim  # scores q·k and the weighted sum of values, every head
    mlp = 3 * 2 * Q * C * M  # SwiGLU: gate, up, down
    biases = Q * bias_size(cfg) + (verify * kv if qkv_bias(cfg) else 0)  # Dream: q/k/v's, and v_proj's for V-verify
    return proj + attn + mlp + 2 * verify * C * kv + biases


def forward_flops(cfg: ModelConfig, fwd: Forward) -> int:
    """FLOPs of one forward: its layers, then the LM head over the logits only."""
    layers = over_layers(cfg, fwd, lambda r, v: layer_flops(cfg, r, fwd.keys, v))
    head = 2 * fwd.logits * cfg.d_model * cfg.embedding_size
    if cfg.include_bias and not cfg.weight_tying:
        head += fwd.logits * cfg.embedding_size  # the untied head's bias
    return fwd.rows * (layers + head)


def weight_bytes_read(cfg: ModelConfig, fwd: Forward, elem: int) -> int:
    """Bytes of weights one forward reads: each layer's matrices once if it computes anything
    (V-verify reads v_proj twice: over the response, then inside the chosen tokens' q/k/v), the
    final norm and LM head, and the embedding rows it gathers (R·Q rows, or the whole table)."""
    C, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    v_proj = C * kv + (kv if qkv_bias(cfg) else 0)  # v_proj's weight and bias
    layers = over_layers(cfg, fwd, lambda r, v: (layer_params(cfg) if r or v else 0) + (v_proj if v else 0))
    gathered = min(fwd.rows * fwd.q, cfg.embedding_size) * C  # rows of the embedding lookup
    table = cfg.embedding_size * C if cfg.weight_tying else gathered + head_params(cfg)  # a tied head reads it all
    return (layers + C + table) * elem


def kv_bytes_read(cfg: ModelConfig, fwd: Forward, elem: int) -> int:
    """Bytes of keys and values attention reads, all layers: S positions per layer that has
    queries (a dLLM-Cache layer that recomputes nothing runs no attention), plus the cached values
    V-verify compares."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return fwd.rows * over_layers(cfg, fwd, lambda r, v: (2 * fwd.keys if r else 0) * kv + v * kv) * elem


def feature_bytes_read(cfg: ModelConfig, fwd: Forward, elem: int) -> int:
    """Bytes of cached attention and MLP outputs a dLLM-Cache forward reads: every layer adds both
    to the residual stream of all Q positions."""
    return 2 * cfg.n_layers * fwd.rows * fwd.q * cfg.d_model * elem if fwd.features else 0


def forward_bytes(cfg: ModelConfig, fwd: Forward, elem: int) -> int:
    """Weights + keys/values (+ cached features) read by one forward (reads only)."""
    return weight_bytes_read(cfg, fwd, elem) + kv_bytes_read(cfg, fwd, elem) + feature_bytes_read(cfg, fwd, elem)


def cache_bytes(cfg: ModelConfig, L: int, elem: int, rows: int = 1, features: bool = False) -> int:
    """Size of a KVCache of capacity L: keys and values, (N, R, Hkv, L, D) each; a FeatureCache
    adds attention and MLP outputs, (N, R, L, C) each."""
    kv = 2 * cfg.n_layers * rows * cfg.n_kv_heads * L * cfg.head_dim * elem
    return kv + (2 * cfg.n_layers * rows * L * cfg.d_model * elem if features else 0)


def estimate_peak_bytes(cfg: ModelConfig, fwd: Forward, elem: int) -> int:
    """CPU stand-in for a measured peak: weights + the forward's cache + its largest activation set,
    either the MLP's (residual, normed input and three (Q, M) tensors: gate after SiLU, up, their
    product) or the LM head's (residual and the (K, V) logits)."""
    C, M, V = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    mlp = fwd.rows * fwd.q * (2 * C + 3 * M)
    head = fwd.rows * (fwd.q * C + fwd.logits * V)
    cache = cache_bytes(cfg, fwd.keys, elem, fwd.rows, fwd.features) if fwd.cached else 0
    return param_count(cfg) * elem + cache + max(mlp, head) * elem


# ---------------------------------------------------------------------------------------------
# The hardware limit: published peaks and the roofline bound
# ---------------------------------------------------------------------------------------------


@dataclass
class Hardware:
    """Peak rates the roofline bound is computed from."""

    name: str  # device, as reported
    flops: float  # peak FLOP/s in the benchmark's dtype (dense, no sparsity)
    bandwidth: float  # memory bandwidth, bytes/s
    source: str  # where the figures come from

    def __post_init__(self):
        # A zero, negative or NaN peak would turn every bound into inf or nan, silently.
        check_finite(f"{self.name}'s peak FLOP/s", self.flops, low=0, low_open=True)
        check_finite(f"{self.name}'s bandwidth (bytes/s)", self.bandwidth, low=0, low_open=True)

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a forward is compute-bound: peak FLOP/s / bandwidth."""
        return self.flops / self.bandwidth


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
HARDWARE = [label for _, _, label, *_ in GPU_PEAKS]  # the labels --hardware accepts


def published_peak(name: str, dtype: torch.dtype, memory_gib: float | None = None) -> Hardware | None:
    """The datasheet figures for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') or a table
    label (e.g. 'H100 SXM'), or None."""
    upper = name.upper()
    if "A100" in upper and memory_gib is not None and memory_gib > 50 and "80GB" not in upper:
        upper += " 80GB"  # some A100 80GB report no size in their name
    for needles, excluded, label, tensor, fp32, tbs in GPU_PEAKS:
        if all(n in upper for n in needles) and not any(x in upper for x in excluded):
            flops = (fp32 if dtype == torch.float32 else tensor) * 1e12
            kind = "fp32" if dtype == torch.float32 else "bf16/fp16 dense tensor-core"
            return Hardware(name, flops, tbs * 1e12, f"published {label} figures ({kind}, HBM/GDDR bandwidth)")
    return None


def roofline(hw: Hardware, flops: float, nbytes: float) -> tuple[float, str]:
    """Lower bound on a forward's seconds, and which limit sets it ('compute' or 'memory')."""
    compute, memory = flops / hw.flops, nbytes / hw.bandwidth
    return max(compute, memory), ("compute" if compute >= memory else "memory")
