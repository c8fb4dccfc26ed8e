"""
A LLaDA-compatible masked-diffusion transformer and its checkpoint loader, self-contained.

LLaDA ("Large Language Diffusion Models", Nie et al., arXiv 2502.09992) is a Llama-shaped
transformer with no causal mask, trained to predict the tokens behind a mask token; decode.py
generates with it. This file reproduces the reference logits on the original checkpoints, read
under their own parameter names. Of the original `modeling_llada.py` (OLMo's code) it keeps the
one configuration LLaDA-8B uses (pre-RMSNorm, RoPE, SwiGLU, no biases) and refuses the others; it
adds explicit query positions, a KV cache (cache.py) and a key-padding mask for left padding.

Parameter names (LLaDA checkpoint -> usual name); LLaDA's `ff_out` is both MLP down projection and LM head:
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
Usage: model = load_model("path/to/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)
       logits = model(input_ids)  # (B, L, V), bidirectional
Shapes: B batch, L sequence, Q query tokens of a forward, S positions attention reads, H/Hkv heads,
D head dim, C model dim, M MLP hidden dim, V vocabulary, N layers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import reprlib
import stat
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _shown(value) -> str:
    """A wrong value as an error names it: its repr cut short (reprlib), however large or deeply
    nested it is, and its type."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


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

    # Field kinds, for the type checks below: a config.json written by hand or by another tool can
    # hold "4096" or 4096.0 where an int belongs, and Python would carry that deep into torch.
    _INTS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
             "max_sequence_length", "mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id")
    _FLOATS = ("rope_theta", "rms_norm_eps")
    _BOOLS = ("include_bias", "include_qkv_bias", "weight_tying")

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        # 1) Types: ints are ints (bool is an int in Python, and refused), floats are finite numbers.
        for name in self._INTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"config: {name} must be an integer, got {_shown(value)}")
        for name in self._FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"config: {name} must be a finite number, got {_shown(value)}")
        for name in self._BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"config: {name} must be true or false, got {_shown(value)}")
        # 2) Ranges: positive sizes, a positive RoPE base (theta <= 0 gives NaN angles), an epsilon
        #    that cannot make RMSNorm divide by a negative or zero mean square.
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                     "vocab_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.rope_theta <= 0:
            raise ValueError(f"config: rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps < 0:
            raise ValueError(f"config: rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        # 3) Shapes that must fit together.
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
        # 4) The mask is a token of its own: decoding unmasks every position that holds it, so a mask
        #    that is also EOS, padding or end of turn would turn those tokens into holes to fill.
        #    EOS may double as padding (LLaDA's own setup) and as end of turn: both only stop text.
        for name in ("eos_token_id", "pad_token_id", "eot_token_id"):
            if getattr(self, name) == self.mask_token_id:
                raise ValueError(f"config: mask_token_id {self.mask_token_id} is also {name}; "
                                 f"the mask must be a token of its own")

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
        if not isinstance(raw, dict):
            raise ValueError(f"config: expected a JSON object of settings, got a {type(raw).__name__}")
        for key, allowed in cls._REQUIRED.items():
            if key in raw and raw[key] not in allowed:
                raise ValueError(f"config: {key}={reprlib.repr(raw[key])} is not supported (LLaDA uses {allowed[0]!r})")
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

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_bias = config.include_bias or config.include_qkv_bias
        C, D = config.d_model, config.head_dim
        self.attn_norm = RMSNorm(C, config.rms_norm_eps)
        self.q_proj = nn.Linear(C, config.n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, config.n_kv_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, config.n_kv_heads * D, bias=qkv_bias)
        self.attn_out = nn.Linear(C, C, bias=config.include_bias)
        self.ff_norm = RMSNorm(C, config.rms_norm_eps)
        self.ff_proj = nn.Linear(C, config.mlp_hidden_size, bias=config.include_bias)  # gate, goes through SiLU
        self.up_proj = nn.Linear(C, config.mlp_hidden_size, bias=config.include_bias)  # linear branch
        self.ff_out = nn.Linear(config.mlp_hidden_size, C, bias=config.include_bias)  # down projection

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

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        transformer = nn.Module()
        transformer.wte = nn.Embedding(config.embedding_size, config.d_model)
        transformer.blocks = nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers))
        transformer.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            transformer.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=config.include_bias)
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

# The dtypes a model may be loaded in: the ones LLaDA is run in, and float64 for reference runs.
# float8 and friends are refused: they load, then fail at the first matmul on most devices.
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
# safetensors' header names for the same dtypes (the file headers are read before any tensor).
_HEADER_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _resolve_dtype(dtype) -> torch.dtype | None:
    """A supported torch dtype from a dtype or its name; None stays None (the checkpoint's own)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(set(map(str, _DTYPES.values())))}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _resolve_device(device) -> torch.device:
    """The device to load on, checked here so a typo or a missing GPU is one clear error, not an
    AssertionError from deep inside torch at the first copy."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this torch build sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _shard_path(path: str, name, index: str) -> str:
    """The file a shard name of the index stands for, refusing names that leave the checkpoint
    directory. The check is on the name as written (absolute, or with a '..' part), not on the
    resolved path: a Hugging Face cache directory holds symlinks into a blob store beside it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{index} names the shard {_shown(name)}, which is not a file name inside {path}; "
                         "refusing it")
    return os.path.join(path, name)


# What os.stat calls each kind of path, for the errors below.
_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe (FIFO)",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _check_path(path: str, kind: int) -> None:
    """Refuse `path` unless it is a readable `kind` (stat.S_IFREG or S_IFDIR), before anything opens it.

    Opening a FIFO blocks forever; safetensors reports a directory or /dev/null only as "No such
    device", and a broken symlink or an unreadable file as missing. Symlinks are followed: a
    Hugging Face cache directory is symlinks into a blob store, and that is fine.
    """
    label = "checkpoint directory " if kind == stat.S_IFDIR else ""
    link = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        raise ValueError(f"{label}{path}{link} does not exist") from None
    except PermissionError:  # a directory on the way that may not be searched
        raise ValueError(f"{label}{path} is not readable (permission denied)") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{label}{path} is a symlink loop (it never reaches a file)") from None
        raise ValueError(f"{label}{path}{link} cannot be opened: {err.strerror}") from None
    if stat.S_IFMT(mode) != kind:
        raise ValueError(f"{label}{path}{link} is {_KINDS.get(stat.S_IFMT(mode), 'of an unknown kind')}, "
                         f"not {_KINDS[kind]}")
    # A directory also needs x to reach its files. Root may read anything, and passes.
    if not os.access(path, os.R_OK | (os.X_OK if kind == stat.S_IFDIR else 0)):
        raise ValueError(f"{label}{path} is not readable (permission denied)")


def _read_json(file: str):
    """The parsed contents of one of the checkpoint's JSON files; every failure names the file."""
    _check_path(file, stat.S_IFREG)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"{file} is not readable JSON: {err.strerror}") from None
    except RecursionError:  # json.load recurses once per level of [ or {
        raise ValueError(f"{file} is not readable JSON: it is nested too deeply to parse") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ValueError(f"{file} is not readable JSON: it is not valid JSON ({err})") from None


def _safetensors_files(path: str) -> tuple[list[str], dict | None]:
    """The weight files of a checkpoint directory (the index's shards, or the single file), each
    checked to be a readable regular file, and the index's tensor -> file map when there is an
    index. A name that exists in any form, a broken symlink too, counts as present."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    weight_map = None
    if os.path.lexists(index):
        raw = _read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        weight_map = {tensor: _shard_path(path, name, index) for tensor, name in weight_map.items()}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.lexists(f)]
        if missing:
            raise ValueError(f"shards listed in {index} are missing: {missing}")
    elif os.path.lexists(single):
        files = [single]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no model.safetensors, model.safetensors.index.json or *.safetensors in {path}")
    for file in files:
        _check_path(file, stat.S_IFREG)
    return files, weight_map


def load_config(path: str) -> ModelConfig:
    """Read `config.json` from a checkpoint directory."""
    _check_path(path, stat.S_IFDIR)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_path):
        raise ValueError(f"{path} has no config.json")
    raw = _read_json(cfg_path)
    try:
        return ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as err:  # TypeError: a key the dataclass does not take in the form given
        raise ValueError(f"{cfg_path}: {err}") from None


def _read_headers(files: list[str], weight_map: dict | None, path: str) -> dict:
    """name -> (file, shape, header dtype) for every tensor, from the file headers alone.

    A tensor in two files is refused (which one should win?), as is a tensor the index places
    in one shard but found in another. A file safetensors cannot parse is named.
    """
    from safetensors import SafetensorError, safe_open

    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in found:
                        raise ValueError(f"checkpoint {path}: tensor {name} is in two files, "
                                         f"{found[name][0]} and {file}; keep it in one")
                    found[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if weight_map is not None:
        misplaced = sorted(n for n, (file, _, _) in found.items() if n in weight_map and weight_map[n] != file)
        if misplaced:
            raise ValueError(f"checkpoint {path}: the index places {misplaced[:3]} in other shards than the ones "
                             f"that hold them")
        ghosts = sorted(set(weight_map) - set(found))
        if ghosts:
            raise ValueError(f"checkpoint {path}: the index lists {ghosts[:3]}, which no shard holds")
    return found


def _checkpoint_dtype(found: dict, path: str) -> torch.dtype:
    """The one floating dtype the checkpoint's tensors share; used when no dtype is asked for.

    Integer tensors are refused (a weight is never an integer; a quantized checkpoint needs its
    own loader), and so are dtypes the model does not run in (float8, ...) unless a dtype to
    convert to is given. A checkpoint mixing float dtypes is refused too: silently taking the
    first tensor's would be an accident of file order; pass dtype= to say which one to use.
    """
    kinds = {}
    for name, (_, _, header_dtype) in sorted(found.items()):
        kinds.setdefault(header_dtype, name)
    if len(kinds) > 1:
        examples = ", ".join(f"{d} ({n})" for d, n in sorted(kinds.items()))
        raise ValueError(f"checkpoint {path} mixes tensor dtypes: {examples}; pass dtype= (--dtype) to choose one")
    (header_dtype, example), = kinds.items()
    if header_dtype not in _HEADER_DTYPES:
        raise ValueError(f"checkpoint {path} stores {example} as {header_dtype}, which this model does not run in; "
                         f"pass dtype= (--dtype) one of {sorted(_DTYPES)} to convert")
    return _HEADER_DTYPES[header_dtype]


def load_model(path: str, device=None, dtype=None) -> LLaDAModel:
    """Load a LLaDA checkpoint directory into an `LLaDAModel` in eval mode.

    device: where the weights go (default: CUDA when available, else CPU).
    dtype: torch dtype or name ('bfloat16', 'float32', ...); default: the checkpoint's own dtype,
        which must then be one float dtype for every tensor (see _checkpoint_dtype).
    Only safetensors are read; nothing is unpickled. Every mistake in the directory (config,
    index, shards, names, shapes, dtypes) is a ValueError naming the file or tensor.
    """
    from safetensors import SafetensorError, safe_open

    dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    config = load_config(path)
    # Build on the meta device (no memory, no random init), then fill from the files.
    with torch.device("meta"):
        model = LLaDAModel(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    files, weight_map = _safetensors_files(path)
    # 1) Check names, shapes and dtypes from the file headers alone, before reading any weights.
    found = _read_headers(files, weight_map, path)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing}; unexpected keys {unexpected}")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {found[name][1]}, expected {shape}")
    integer = sorted(n for n, (_, _, d) in found.items() if d == "BOOL" or d[0] in "IU")  # I8..I64, U8..U64
    if integer:
        raise ValueError(f"checkpoint {path}: {integer[:3]} hold integer or bool values ({found[integer[0]][2]}); "
                         f"weights must be floating point (a quantized checkpoint needs its own loader)")
    dtype = dtype or _checkpoint_dtype(found, path)
    # 2) Read tensor by tensor, converting and moving each one at once, so host memory holds
    #    one tensor at a time rather than the whole checkpoint (16 GB for LLaDA-8B in bf16).
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except SafetensorError as err:
            raise ValueError(f"{file} could not be read (truncated or corrupt?): {err}") from None
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
