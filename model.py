"""
A LLaDA-compatible masked-diffusion transformer, self-contained.

LLaDA ("Large Language Diffusion Models", Nie et al., arXiv 2502.09992) is a Llama-shaped
transformer whose attention has no causal mask: every position sees every other, and the model
is trained to predict the tokens hidden behind a special mask token. Generation starts from a
canvas of masks and unmasks it over several steps (see decode.py). This file is only the network
and its loader; it reproduces the reference model's logits on the original checkpoints, read
with the checkpoint's own parameter names.

Compared with the original `modeling_llada.py` (which is OLMo's code with many options), this
file keeps the one configuration LLaDA-8B uses (pre-RMSNorm, RoPE, SwiGLU, no biases) and
rejects the others with a clear error. Two things are added: explicit query positions and an
explicit KV cache (cache.py) for the fast decoders, and an optional key-padding mask. The
original model has no padding mask: it lets left-padded prompts attend to their padding.

Parameter names (LLaDA checkpoint -> usual name):
    model.transformer.wte.weight               token embedding          (V, C)
    model.transformer.blocks.{i}.attn_norm     RMSNorm before attention (C,)
    model.transformer.blocks.{i}.q_proj/k_proj/v_proj                   (H*D or Hkv*D, C)
    model.transformer.blocks.{i}.attn_out      attention output proj    (C, C)
    model.transformer.blocks.{i}.ff_norm       RMSNorm before the MLP   (C,)
    model.transformer.blocks.{i}.ff_proj       SwiGLU gate (SiLU side)  (M, C)
    model.transformer.blocks.{i}.up_proj       SwiGLU linear side       (M, C)
    model.transformer.blocks.{i}.ff_out        MLP down projection      (C, M)
    model.transformer.ln_f.weight              final RMSNorm            (C,)
    model.transformer.ff_out.weight            LM head (untied)         (V, C)
LLaDA's `ff_out` is both the per-block MLP down projection and, at the top level, the LM head.

Usage:
    model = load_model("path/to/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                    # (B, L, V), bidirectional
    block.project / block.attend / block.mlp     # the block's pieces, for feature caching

Shape legend: B batch, L sequence, Q query tokens of a forward, S positions attention reads,
H/Hkv heads, D head dim, C model dim, M MLP hidden dim, V vocabulary, N layers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model's shape, read from a checkpoint's `config.json` (LLaDA's field names)."""

    d_model: int = 4096  # C, residual stream width
    n_heads: int = 32  # H, query heads
    n_kv_heads: int | None = None  # Hkv, key/value heads (None = H; fewer = grouped-query attention)
    n_layers: int = 32  # N, transformer blocks
    mlp_hidden_size: int = 12288  # M, SwiGLU hidden width
    vocab_size: int = 126464  # tokens the tokenizer produces
    embedding_size: int | None = None  # rows of the embedding / LM head (>= vocab_size; None = vocab_size)
    rope_theta: float = 500000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    max_sequence_length: int = 4096  # longest prompt + generation the model is meant for
    mask_token_id: int = 126336  # the [MASK] token that diffusion decoding unmasks
    eos_token_id: int = 126081  # end of text; LLaDA-Instruct pads answers with it
    pad_token_id: int = 126081  # padding (equal to EOS in LLaDA)
    eot_token_id: int | None = None  # end of turn (126348 in LLaDA-Instruct); not in every config
    include_bias: bool = False  # biases on every linear layer
    include_qkv_bias: bool = False  # biases on q/k/v only
    weight_tying: bool = False  # LM head shares the embedding matrix

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                     "vocab_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"config: head dim {self.head_dim} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"config: embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.embedding_size:
                raise ValueError(f"config: {name} {value} is outside the vocabulary [0, {self.embedding_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # The original config has many OLMo options; these are the values LLaDA uses, and the only
    # ones this file implements. Anything else is refused rather than silently misread.
    _REQUIRED = {
        "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
        "rope": (True,), "alibi": (False,), "attention_layer_norm": (False,),
        "bias_for_layer_norm": (False, None), "input_emb_norm": (False,), "scale_logits": (False,),
        "multi_query_attention": (None, False), "layer_norm_with_affine": (True,),
    }

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from a LLaDA `config.json` dict, refusing options this model does not implement."""
        for key, allowed in cls._REQUIRED.items():
            if key in raw and raw[key] not in allowed:
                raise ValueError(f"config: {key}={raw[key]!r} is not supported (LLaDA uses {allowed[0]!r})")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        missing = [k for k in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size") if k not in kwargs]
        if missing:
            raise ValueError(f"config: missing required fields {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The fields above plus the fixed options, in the layout LLaDA's `config.json` uses."""
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        raw.update({k: v[0] for k, v in self._REQUIRED.items()})
        raw.update({"model_type": "llada", "architectures": ["LLaDAModelLM"], "rope_full_precision": True})
        return raw


# ---------------------------------------------------------------------------------------------
# Building blocks: RMSNorm, RoPE
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """LLaDA's RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The order matters in bf16: the original casts back *before* multiplying by the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for RoPE at explicit positions, in float32: (B, Q) -> two (B, 1, Q, D)."""
    # inv_freq_j = theta^(-2j/D); LLaDA computes this and the angles in float32.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, Q, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, Q, D): "rotate-half" layout, not interleaved
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, Q, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, Q, D) queries or keys; computed in float32 and cast back, as LLaDA does."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # two (B, H, Q, D/2) halves
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, H, Q, D)
    return (xf * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The transformer block
# ---------------------------------------------------------------------------------------------


class LLaDABlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + SwiGLU(norm(x)). Attention is bidirectional.

    The pieces are separate methods so that a feature-caching forward (decode.py's dLLM-Cache)
    can run them one by one on chosen tokens: `project` (q/k/v with RoPE), `attend` (attention
    core and output projection) and `mlp`. `forward` is the ordinary composition of the pieces.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        C, D = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(C, cfg.n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, cfg.n_kv_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, cfg.n_kv_heads * D, bias=qkv_bias)
        self.attn_out = nn.Linear(C, C, bias=cfg.include_bias)
        self.ff_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(C, cfg.mlp_hidden_size, bias=cfg.include_bias)  # gate, goes through SiLU
        self.up_proj = nn.Linear(C, cfg.mlp_hidden_size, bias=cfg.include_bias)  # linear branch
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, C, bias=cfg.include_bias)  # down projection

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Split the model dim into heads: (B, Q, n*D) -> (B, n, Q, D)."""
        B, Q, _ = t.shape
        return t.view(B, Q, n, self.head_dim).transpose(1, 2)

    def project(self, h, cos, sin):
        """Queries, keys and values of the normed hidden states h (B, Q, C), RoPE applied to q and k.
        Returns q (B, H, Q, D), k and v (B, Hkv, Q, D)."""
        q = apply_rope(self.heads(self.q_proj(h), self.n_heads), cos, sin)
        k = apply_rope(self.heads(self.k_proj(h), self.n_kv_heads), cos, sin)
        return q, k, self.heads(self.v_proj(h), self.n_kv_heads)

    def attend(self, q, k, v, key_mask=None):
        """Attention of queries q (B, H, Q, D) over keys/values (B, Hkv, S, D), then the output
        projection: (B, Q, C), the attention sub-block's output before the residual add."""
        B, _, Q, _ = q.shape
        # No causal mask: a diffusion LM attends in both directions. key_mask (B, 1, 1, S) hides
        # padding keys; None lets SDPA take its fastest unmasked path. With grouped-query attention
        # each key/value head serves n_heads / n_kv_heads query heads; enable_gqa does that inside
        # the kernel instead of copying the whole cache with repeat_interleave on every step.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, Q, D)
        return self.attn_out(y.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim))  # (B, Q, C)

    def mlp(self, h):
        """SwiGLU: down(silu(gate(h)) * up(h)), the MLP sub-block's output before the residual add."""
        return self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward(self, x, cos, sin, positions, cache=None, key_mask=None):
        q, k, v = self.project(self.attn_norm(x), cos, sin)
        if cache is not None:
            # Write the fresh keys/values at the query positions, then attend over everything the
            # cache holds: positions not in this forward contribute their cached (stale) K/V.
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, Hkv, S, D) each
        x = x + self.attend(q, k, v, key_mask)
        return x + self.mlp(self.ff_norm(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LLaDAModel(nn.Module):
    """LLaDA's network. Submodules sit under `model.transformer` so state-dict keys match the checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        transformer = nn.Module()
        transformer.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        transformer.blocks = nn.ModuleList(LLaDABlock(cfg, i) for i in range(cfg.n_layers))
        transformer.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            transformer.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=cfg.include_bias)
        self.model = nn.Module()
        self.model.transformer = transformer

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, (B, Q) -> (B, Q, C). LLaDA does not scale them."""
        return self.model.transformer.wte(input_ids)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and vocabulary projection: (B, Q, C) -> (B, Q, V)."""
        t = self.model.transformer
        h = t.ln_f(h)
        return F.linear(h, t.wte.weight) if self.config.weight_tying else t.ff_out(h)

    def rope_and_mask(self, positions: torch.Tensor, attention_mask: torch.Tensor | None, B: int):
        """RoPE tables for the query positions and the key-padding mask for attention.

        positions (Q,) or (B, Q). A left-padded row's RoPE positions start at its first real
        token, so it is computed as it would be alone. Returns cos, sin (B, 1, Q, D) and the key
        mask (B, 1, 1, S) or None.
        """
        rope_positions = positions.expand(B, positions.shape[-1])  # (B, Q)
        key_mask = None
        if attention_mask is not None:
            n_pad = attention_mask.int().argmax(dim=1, keepdim=True)  # (B, 1): index of the first real token
            rope_positions = (rope_positions - n_pad).clamp(min=0)  # (B, Q)
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): over heads and queries
        cos, sin = rope_cos_sin(rope_positions, self.config.head_dim, self.config.rope_theta)  # (B, 1, Q, D)
        return cos, sin, key_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits for the query tokens `input_ids` (B, Q).

        positions: (Q,), or (B, Q) when rows query different positions: the indices of the query
            tokens in the full sequence (default 0..Q-1). They are the cache slots the queries'
            keys/values are written to, and their RoPE positions.
        cache: a cache.KVCache. The queries' K/V are written at `positions`, and attention reads
            the cache's first `cache.length` positions. Without a cache the queries attend only to
            each other (the plain full-sequence forward).
        attention_mask: (B, S) with 1 for real tokens and 0 for left padding, over the positions
            attention reads (the cache's length, or Q without a cache). Padding keys are hidden
            and each row's RoPE positions start at its first real token. The original LLaDA takes
            no such mask: it attends to padding and does not shift positions.
        logits_range: (start, end) of the query tokens that need logits; the LM head is skipped
            for the others (it is the largest matmul of LLaDA-8B, V = 126464).
        """
        B, Q = input_ids.shape
        if positions is None:
            positions = torch.arange(Q, device=input_ids.device)
        cos, sin, key_mask = self.rope_and_mask(positions, attention_mask, B)
        x = self.embed(input_ids)  # (B, Q, C)
        for block in self.blocks:
            x = block(x, cos, sin, positions, cache, key_mask)
        if logits_range is not None:
            x = x[:, logits_range[0]:logits_range[1]]  # (B, Q', C)
        return self.lm_head(x)  # (B, Q', V)


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint directory (config.json + safetensors, sharded or not)
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory: the index's shards, or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"shards listed in {index} are missing: {missing}")
        return files
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or *.safetensors in {path}")


def load_config(path: str) -> ModelConfig:
    """Read `config.json` from a checkpoint directory."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json")
    with open(cfg_path) as f:
        return ModelConfig.from_dict(json.load(f))


def load_model(path: str, device=None, dtype=None) -> LLaDAModel:
    """Load a LLaDA checkpoint directory into an `LLaDAModel` in eval mode.

    device: where the weights go (default: CUDA when available, else CPU).
    dtype: torch dtype or name ('bfloat16', 'float32', ...); default: the checkpoint's own dtype.
    Only safetensors are read; nothing is unpickled.
    """
    from safetensors import safe_open

    dtype = _resolve_dtype(dtype)
    cfg = load_config(path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # Build on the meta device (no memory, no random init), then fill from the files.
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    files = _safetensors_files(path)
    # 1) Check names and shapes from the file headers alone, before reading any weights.
    found = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            found.update({name: (file, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing}; unexpected keys {unexpected}")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {found[name][1]}, expected {shape}")
    # 2) Read tensor by tensor, converting and moving each one at once, so host memory holds
    #    one tensor at a time rather than the whole checkpoint (16 GB for LLaDA-8B in bf16).
    state = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                dtype = dtype or tensor.dtype  # default: the checkpoint's own dtype
                state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_model(model: LLaDAModel, path: str) -> None:
    """Write `config.json` and `model.safetensors` in the layout `load_model` (and LLaDA) uses."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def init_weights(model: LLaDAModel, seed: int = 0) -> LLaDAModel:
    """Fresh random weights for training from scratch (normal(0, 0.02), down projections scaled)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("ln_f.weight"):
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        else:
            std = 0.02
            if name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
                std = 0.02 / math.sqrt(2 * model.config.n_layers)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
