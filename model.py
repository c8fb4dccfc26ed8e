"""
One masked-diffusion transformer for two model families, LLaDA and Dream, and its checkpoint loader.

LLaDA ("Large Language Diffusion Models", Nie et al., arXiv 2502.09992) and Dream ("Dream 7B:
Diffusion Large Language Models", Ye et al., arXiv 2508.15487) are Llama-shaped transformers
without a causal mask, trained to predict the tokens behind a mask token; decode.py generates with
them. They differ in names, not in the network. Dream started as an autoregressive model
(Qwen2.5-7B), so its checkpoint uses Qwen2's parameter names and config keys, has biases on q/k/v,
and keeps the autoregressive head: the hidden state at position i-1 predicts the token at i (the
*logit shift*). One `DiffusionLM` runs both; a `Family` (after the model) holds what differs, chosen
by config.json's `model_type`. `model(ids)` returns logits whose row i predicts the token at i for
either family, so nothing outside this file asks which family it runs.

Of the originals (OLMo's `modeling_llada.py`, Dream's `modeling_dream.py`) it keeps the one
configuration each model uses (pre-RMSNorm, RoPE, SwiGLU) and refuses the others; it adds explicit
query positions, a KV cache (cache.py), a key-padding mask for left padding, and a causal mode to
train a small autoregressive model before adapting it to diffusion, as Dream was made.

Parameter names: the modules carry LLaDA's names; state_dict(), load_state_dict(), load_model and
save_model speak each checkpoint's own keys. LLaDA's `ff_out` is both MLP down projection and LM head.
    module = LLaDA key                 Dream (Qwen2) key                      shape
    model.transformer.wte              model.embed_tokens                     (V, C)    token embedding
    model.transformer.blocks.{i}.      model.layers.{i}.
        attn_norm                          input_layernorm                    (C,)      RMSNorm before attention
        q_proj, k_proj, v_proj             self_attn.{q,k,v}_proj (+ .bias)   (H*D or Hkv*D, C)
        attn_out                           self_attn.o_proj                   (C, C)    attention output
        ff_norm                            post_attention_layernorm           (C,)      RMSNorm before the MLP
        ff_proj, up_proj                   mlp.gate_proj, mlp.up_proj         (M, C)    SwiGLU gate (SiLU), linear side
        ff_out                             mlp.down_proj                      (C, M)    MLP down projection
    model.transformer.ln_f             model.norm                             (C,)      final RMSNorm
    model.transformer.ff_out           lm_head                                (V, C)    LM head (absent when tied)
Usage: model = load_model("path/to/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)  # or a Dream directory
       logits = model(input_ids)  # (B, L, V), bidirectional
Shapes: B batch, L canvas (prompt + generation), Q query tokens of a forward, S positions attention
reads, H/Hkv heads, D head dim, C model dim, M MLP hidden dim, V vocabulary, N layers.
"""

from __future__ import annotations

import errno
import json
import math
import operator
import os
import re
import reprlib
import stat
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model's shape, read from a checkpoint's `config.json`. The field names are LLaDA's; a
    Dream config's keys map onto them (Family.config_keys), and errors name the config's own keys."""

    family: str = "llada"  # "llada" or "dream" (FAMILIES): checkpoint names, q/k/v biases, the logit shift
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
    pad_token_id: int = 126081  # padding (equal to EOS in LLaDA and in Dream)
    eot_token_id: int | None = None  # end of turn (126348 in LLaDA-Instruct); not in every config
    bos_token_id: int | None = None  # beginning of text (Dream's prompts start with it); not in every config
    include_bias: bool = False  # biases on every linear layer
    include_qkv_bias: bool | None = None  # biases on q/k/v only (None = the family's: LLaDA no, Dream yes)
    weight_tying: bool = False  # LM head shares the embedding matrix

    def __post_init__(self):
        check_config(self)  # types, ranges and shapes; the checks stand at the end of the file

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def logit_shift(self) -> int:
        """0: the hidden state at position i predicts the token at i (LLaDA). 1: the one at i-1 does
        (Dream, which kept its autoregressive head)."""
        return FAMILIES[self.family].logit_shift

    def key(self, name: str) -> str:
        """The family's config.json key for a field (`num_hidden_layers` for Dream's n_layers)."""
        return FAMILIES[self.family].key_of.get(name, name) if self.family in FAMILIES else name

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from a `config.json` dict of either family, refusing options this model does not implement."""
        return config_from_dict(raw)

    def to_dict(self) -> dict:
        """The settings in the layout the family's own `config.json` uses."""
        return config_to_dict(self)


# ---------------------------------------------------------------------------------------------
# Building blocks: RMSNorm, RoPE
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm as LLaDA and Qwen2 write it: normalise in float32, cast back to the input dtype, then scale."""

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
    # inv_freq_j = theta^(-2j/D); both families compute this and the angles in float32.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, Q, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, Q, D): "rotate-half" layout, not interleaved
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, Q, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, Q, D) queries or keys; computed in float32 and cast back, as LLaDA does (Dream
    rotates in the model's dtype: the same in float32, a rounding apart in bf16)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # two (B, H, Q, D/2) halves
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, H, Q, D)
    return (xf * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The transformer block
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + SwiGLU(norm(x)). Attention is bidirectional
    unless the model passes a causal mask.

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
        # padding keys, (B, 1, Q, S) also future ones (causal mode); None lets SDPA take its
        # fastest unmasked path. With grouped-query attention each key/value head serves
        # n_heads / n_kv_heads query heads; enable_gqa does that inside the kernel instead of
        # copying the whole cache with repeat_interleave on every step.
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


class DiffusionLM(nn.Module):
    """The network of both families. Submodules sit under `model.transformer` (LLaDA's names); the
    state dict speaks the checkpoint's own names (Family.checkpoint_key), so a Dream model's
    state_dict() is a Dream checkpoint's and a LLaDA model's is LLaDA's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        transformer = nn.Module()
        transformer.wte = nn.Embedding(config.embedding_size, config.d_model)
        transformer.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        transformer.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            transformer.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=config.include_bias)
        self.model = nn.Module()
        self.model.transformer = transformer
        # Module names <-> checkpoint names, at the state-dict boundary (the identity for LLaDA).
        self.register_state_dict_post_hook(_to_checkpoint_names)
        self.register_load_state_dict_pre_hook(_to_module_names)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def logit_shift(self) -> int:
        """0 (LLaDA) or 1 (Dream): how many positions before a token sits the row that predicts it."""
        return self.config.logit_shift

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, (B, Q) -> (B, Q, C). Neither family scales them."""
        return self.model.transformer.wte(input_ids)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and vocabulary projection, row by row and without the shift: (B, Q, C) -> (B, Q, V)."""
        t = self.model.transformer
        h = t.ln_f(h)
        return F.linear(h, t.wte.weight) if self.config.weight_tying else t.ff_out(h)

    def logits(self, x: torch.Tensor, logits_range: tuple[int, int] | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head with the family's logit shift: from the last block's hidden states x (B, Q, C)
        of Q query tokens, the logits (B, b - a, V) that predict the tokens AT query indices [a, b).

        Shift 0 (LLaDA): row j predicts query j, so they are the head of rows [a, b).
        Shift 1 (Dream): row j-1 predicts query j, so they come from rows [a-1, b-1). Query index 0
            has no row before it: when it is canvas position 0 it predicts itself (Dream's samplers
            do `cat([l[:, :1], l[:, :-1]], 1)`); any other first query is a window whose row before
            it was not computed, a ValueError: start the window one position earlier and ask for
            (a+1, b+1). The last row predicts the position after the window, so b may be Q + 1.
        So a loop that needs the logits of block [s, e) runs the window [start, e) with start =
        max(s - shift, 0) and asks for (s - start, e - start): the same code for both families.
        positions: the query positions, (Q,) or (B, Q), read only for that check (None = 0..Q-1;
            on a GPU the check is one host read, made only when a = 0 on a shifted model).
        decode.py's dLLM-Cache forward, which runs the blocks itself, ends with this call.
        """
        a, b = check_logits_range(self, x.shape[1], logits_range, positions)
        s = self.logit_shift
        if s and a == 0 and b > 0:  # canvas position 0 has no row before it: it predicts itself
            h = torch.cat([x[:, :1], x[:, :b - 1]], dim=1)  # (B, b, C)
        else:
            h = x[:, a - s:b - s]  # (B, b - a, C)
        return self.lm_head(h)  # (B, b - a, V)

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

    def causal_mask(self, positions: torch.Tensor, key_mask: torch.Tensor | None, cache, B: int) -> torch.Tensor:
        """An autoregressive model's attention: the query at canvas position p reads the keys at
        positions <= p (and not padding), (B, 1, Q, S). Every query also reads itself, so a padding
        query never has an empty row, whose softmax would be NaN and would spread through its keys."""
        query_pos = positions.expand(B, positions.shape[-1])  # (B, Q)
        key_pos = query_pos if cache is None else torch.arange(cache.length, device=positions.device).expand(B, -1)
        earlier = key_pos[:, None, None, :] <= query_pos[:, None, :, None]  # (B, 1, Q, S)
        allowed = earlier if key_mask is None else earlier & key_mask  # (B, 1, Q, S)
        return allowed | (key_pos[:, None, None, :] == query_pos[:, None, :, None])

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Logits for the query tokens `input_ids` (B, Q): row j predicts the token at query j,
        whichever the family (the logit shift is applied here, see `logits`).

        positions: (Q,), or (B, Q) when rows query different positions: the indices of the query
            tokens in the canvas (default 0..Q-1). They are the cache slots the queries'
            keys/values are written to, and their RoPE positions.
        cache: a cache.KVCache. The queries' K/V are written at `positions`, and attention reads
            the cache's first `cache.length` positions. Without a cache the queries attend only to
            each other (the plain full-sequence forward).
        attention_mask: (B, S) with 1 for real tokens and 0 for left padding, over the positions
            attention reads (the cache's length, or Q without a cache). Padding keys are hidden
            and each row's RoPE positions start at its first real token. The originals take no
            such mask for the model (LLaDA), or also hide padding queries (Dream; only padding
            rows differ).
        logits_range: (a, b), the query indices whose tokens need logits (default all), with
            0 <= a <= b <= Q, or Q + 1 for a shifted model (its last row predicts the position after
            the window); the LM head is skipped for the others (it is the largest matmul of
            LLaDA-8B, V = 126464). A shifted model's query 0 needs its row before: see `logits`.
        causal: attend only to earlier positions and itself, as an autoregressive model. With a
            shifted model, `model(ids, causal=True)[:, 1:]` predicts `ids[:, 1:]` from the tokens
            before each: the next-token loss of an AR start (row 0 sees its own token; leave it out).
        """
        B, Q = input_ids.shape
        a, b = check_logits_range(self, Q, logits_range, positions)  # before any work: a wrong window fails at once
        if positions is None:
            positions = torch.arange(Q, device=input_ids.device)
        cos, sin, key_mask = self.rope_and_mask(positions, attention_mask, B)
        if causal:
            key_mask = self.causal_mask(positions, key_mask, cache, B)  # (B, 1, Q, S)
        x = self.embed(input_ids)  # (B, Q, C)
        for block in self.blocks:
            x = block(x, cos, sin, positions, cache, key_mask)
        return self.logits(x, (a, b))  # (B, b - a, V); positions already checked


LLaDAModel = DiffusionLM  # the name the tools and older code import


# ---------------------------------------------------------------------------------------------
# The two families: what differs is names, config keys, q/k/v biases and the logit shift
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One model family's conventions. The network is the same; these are read at the edges."""

    name: str  # ModelConfig.family
    label: str  # the family's name in messages
    model_type: str  # config.json's `model_type`
    architectures: list  # config.json's `architectures`, for the family's own code
    logit_shift: int  # 0: row i predicts token i; 1: row i-1 predicts token i (an AR model's head, kept)
    qkv_bias: bool  # biases on q/k/v (Qwen2 has them; Llama and LLaDA do not)
    config_keys: dict  # config.json key -> ModelConfig field
    required: tuple  # config.json keys that must be present
    fixed: dict  # config.json options, with the only values implemented here
    defaults: dict = field(default_factory=dict)  # field values the family's code assumes when a key is absent
    blocks: tuple = ("model.transformer.blocks", "model.transformer.blocks")  # (module, checkpoint) prefix
    top: dict = field(default_factory=dict)  # module name -> checkpoint name, outside the blocks
    parts: dict = field(default_factory=dict)  # module name -> checkpoint name, inside a block

    @property
    def key_of(self) -> dict:
        """ModelConfig field -> config.json key."""
        return {f: k for k, f in self.config_keys.items()}

    def checkpoint_key(self, key: str) -> str:
        """A module's state-dict key as this family's checkpoint spells it."""
        return _rename(key, self.blocks, self.top, self.parts)

    def module_key(self, key: str) -> str:
        """A checkpoint key as the module spells it; keys that are not ours stay as they are."""
        flip = lambda names: {new: old for old, new in names.items()}  # noqa: E731
        return _rename(key, self.blocks[::-1], flip(self.top), flip(self.parts))


def _rename(key: str, blocks: tuple, top: dict, parts: dict) -> str:
    """Rename a state-dict key by prefix: blocks[0] -> blocks[1] (then the part inside the block),
    or one of `top`."""
    if key.startswith(blocks[0] + "."):
        layer, _, rest = key[len(blocks[0]) + 1:].partition(".")
        part = next((p for p in parts if rest.startswith(p + ".")), None)
        return f"{blocks[1]}.{layer}.{parts[part] + rest[len(part):] if part else rest}"
    old = next((o for o in top if key.startswith(o + ".")), None)
    return top[old] + key[len(old):] if old else key


_LLADA_FIXED = {  # OLMo options; these are the values LLaDA uses
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
    "rope": (True,), "alibi": (False,), "attention_layer_norm": (False,),
    "bias_for_layer_norm": (False, None), "input_emb_norm": (False,), "scale_logits": (False,),
    "multi_query_attention": (None, False), "layer_norm_with_affine": (True,),
}

FAMILIES = {
    "llada": Family(
        name="llada", label="LLaDA", model_type="llada", architectures=["LLaDAModelLM"], logit_shift=0, qkv_bias=False,
        config_keys={k: k for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size",
                                    "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length",
                                    "mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id",
                                    "bos_token_id", "include_bias", "include_qkv_bias", "weight_tying")},
        required=("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size"),
        fixed=_LLADA_FIXED,
    ),
    "dream": Family(
        name="dream", label="Dream", model_type="Dream", architectures=["DreamModel"], logit_shift=1, qkv_bias=True,
        config_keys={"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                     "num_hidden_layers": "n_layers", "intermediate_size": "mlp_hidden_size",
                     "vocab_size": "vocab_size", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
                     "max_position_embeddings": "max_sequence_length", "mask_token_id": "mask_token_id",
                     "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
                     "tie_word_embeddings": "weight_tying"},
        required=("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                  "eos_token_id"),
        fixed={"hidden_act": ("silu",), "rope_scaling": (None,), "use_sliding_window": (False, None)},
        # DreamConfig's own defaults (Qwen2's, and Dream's special ids).
        defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_sequence_length": 32768,
                  "mask_token_id": 151666, "pad_token_id": 151643},
        blocks=("model.transformer.blocks", "model.layers"),
        top={"model.transformer.wte": "model.embed_tokens", "model.transformer.ln_f": "model.norm",
             "model.transformer.ff_out": "lm_head"},
        parts={"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
               "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
               "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"},
    ),
}


def _rename_keys(state: dict, prefix: str, rename) -> None:
    """Rename, in place and in order, the keys of `state` under `prefix`."""
    items = list(state.items())
    state.clear()
    for k, v in items:
        state[prefix + rename(k[len(prefix):]) if k.startswith(prefix) else k] = v


def _to_checkpoint_names(module, state, prefix, local_metadata) -> None:
    """state_dict() hook: the keys as the family's checkpoint spells them."""
    _rename_keys(state, prefix, FAMILIES[module.config.family].checkpoint_key)


def _to_module_names(module, state, prefix, *_) -> None:
    """load_state_dict() hook: checkpoint keys back to module names."""
    _rename_keys(state, prefix, FAMILIES[module.config.family].module_key)


def config_from_dict(raw: dict) -> ModelConfig:
    """A ModelConfig from a `config.json` dict; `model_type` picks the family (absent = LLaDA)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a JSON object of settings, got a {type(raw).__name__}")
    family = family_of(raw)
    for key, allowed in family.fixed.items():
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"config: {key}={reprlib.repr(raw[key])} is not supported "
                             f"({family.label} uses {allowed[0]!r})")
    missing = [k for k in family.required if raw.get(k) is None]
    if missing:
        raise ValueError(f"config: missing required fields {missing}")
    kwargs = dict(family.defaults)
    kwargs.update({f: raw[k] for k, f in family.config_keys.items() if raw.get(k) is not None})
    return ModelConfig(family=family.name, **kwargs)


def config_to_dict(config: ModelConfig) -> dict:
    """The settings under the family's own config.json keys, with its fixed options."""
    family = FAMILIES[config.family]
    raw = {k: getattr(config, f) for k, f in family.config_keys.items()}
    raw.update({k: v[0] for k, v in family.fixed.items()})
    raw.update({"model_type": family.model_type, "architectures": family.architectures})
    if family.name == "llada":
        raw["rope_full_precision"] = True
    else:  # what DreamConfig also reads; a directory the original DreamModel loads
        raw.update({"attention_dropout": 0.0, "initializer_range": 0.02, "sliding_window": None,
                    "max_window_layers": config.n_layers, "use_cache": False})
    return raw


# ---------------------------------------------------------------------------------------------
# Loading and saving a checkpoint directory (config.json + safetensors, sharded or not)
# ---------------------------------------------------------------------------------------------


def load_config(path: str) -> ModelConfig:
    """Read `config.json` from a checkpoint directory of either family."""
    _check_path(path, stat.S_IFDIR)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_path):
        raise ValueError(f"{path} has no config.json")
    raw = _read_json(cfg_path)
    try:
        return ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as err:  # TypeError: a key the dataclass does not take in the form given
        raise ValueError(f"{cfg_path}: {err}") from None


def load_model(path: str, device=None, dtype=None) -> DiffusionLM:
    """Load a LLaDA or Dream checkpoint directory into a `DiffusionLM` in eval mode.

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
        model = DiffusionLM(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}  # the checkpoint's names
    files, weight_map = _safetensors_files(path)
    # 1) Check names, shapes and dtypes from the file headers alone, before reading any weights.
    found = _read_headers(files, weight_map, path)
    _check_tensors(expected, found, config, path)
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


def save_model(model: DiffusionLM, path: str) -> None:
    """Write `config.json` and `model.safetensors` in the family's own layout: a LLaDA directory
    for LLaDA, a Dream directory (Qwen2 names and keys) for Dream, each loadable by its original."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def init_weights(model: DiffusionLM, seed: int = 0) -> DiffusionLM:
    """Fresh random weights for training from scratch (normal(0, 0.02), down projections scaled)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # module names (LLaDA's) for either family
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


# =============================================================================================
# Validation and loading hardening: every check a config, a call or a checkpoint directory
# passes before the model runs. Each failure is one ValueError that names the value or file.
# =============================================================================================


def _shown(value) -> str:
    """A wrong value as an error names it: its repr cut short (reprlib), however large or deeply
    nested it is, and its type."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _few(names: list, most: int = 3) -> str:
    """A list of names in an error: all of it when short, else the first few and the count."""
    return repr(names) if len(names) <= most else f"{repr(names[:most])[:-1]}, ...] ({len(names)} in all)"


# Field kinds, for the type checks: a config.json written by hand or by another tool can hold
# "4096" or 4096.0 where an int belongs, and Python would carry that deep into torch.
_INTS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
         "max_sequence_length", "mask_token_id", "eos_token_id", "pad_token_id")
_OPTIONAL_INTS = ("eot_token_id", "bos_token_id")
_FLOATS = ("rope_theta", "rms_norm_eps")
_BOOLS = ("include_bias", "include_qkv_bias", "weight_tying")
# The largest value each size may take: far above any published model (LLaDA-8B and Dream-7B have
# C 4096 / 3584, N 32 / 28, V 126464 / 152064), far below what would hang building the modules
# (n_layers 1e30) or overflow torch's sizes (d_model 1e30).
_MOST = {"d_model": 1 << 17, "n_heads": 1 << 16, "n_kv_heads": 1 << 16, "n_layers": 4096,
         "mlp_hidden_size": 1 << 20, "vocab_size": 1 << 22, "embedding_size": 1 << 22,
         "max_sequence_length": 1 << 24}
_MOST_FLOAT = {"rope_theta": 1e12, "rms_norm_eps": 1.0}


def _check_kinds(c: ModelConfig, key) -> None:
    """1) Types: ints are ints (bool is an int in Python, and refused), floats are finite numbers."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    kinds = [(_INTS, is_int, "an integer"),
             (_OPTIONAL_INTS, lambda v: v is None or is_int(v), "an integer"),
             (_FLOATS, lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v),
              "a finite number"),
             (_BOOLS, lambda v: isinstance(v, bool), "true or false")]
    for names, ok, kind in kinds:
        for name in names:
            if not ok(getattr(c, name)):
                raise ValueError(f"config: {key(name)} must be {kind}, got {_shown(getattr(c, name))}")


def _check_ranges(c: ModelConfig, key) -> None:
    """2) Ranges: positive, bounded sizes; a positive RoPE base (theta <= 0 gives NaN angles); an
    epsilon that cannot make RMSNorm divide by a negative or zero mean square."""
    for name, most in _MOST.items():
        value = getattr(c, name)
        if value <= 0:
            raise ValueError(f"config: {key(name)} must be positive, got {value}")
        if value > most:
            raise ValueError(f"config: {key(name)} must be at most {most}, got {_shown(value)}")
    if c.rope_theta <= 0:
        raise ValueError(f"config: rope_theta must be > 0, got {c.rope_theta}")
    if c.rms_norm_eps < 0:
        raise ValueError(f"config: rms_norm_eps must be >= 0, got {c.rms_norm_eps}")
    for name, most in _MOST_FLOAT.items():
        if getattr(c, name) > most:
            raise ValueError(f"config: {name} must be at most {most:g}, got {getattr(c, name)!r}")


def check_config(c: ModelConfig) -> None:
    """ModelConfig's checks (its __post_init__), with the family's defaults filled in first.
    Messages name the family's own config.json keys."""
    if not isinstance(c.family, str) or c.family not in FAMILIES:
        raise ValueError(f"config: family must be one of {sorted(FAMILIES)}, got {_shown(c.family)}")
    family, key = FAMILIES[c.family], c.key
    if c.n_kv_heads is None:
        c.n_kv_heads = c.n_heads
    if c.embedding_size is None:
        c.embedding_size = c.vocab_size
    if c.include_qkv_bias is None:
        c.include_qkv_bias = family.qkv_bias
    _check_kinds(c, key)
    _check_ranges(c, key)
    # 3) Shapes that must fit together, and the family's fixed layout.
    if c.d_model % c.n_heads != 0:
        raise ValueError(f"config: {key('d_model')} {c.d_model} is not divisible by {key('n_heads')} {c.n_heads}")
    if c.n_heads % c.n_kv_heads != 0:
        raise ValueError(f"config: {key('n_heads')} {c.n_heads} is not divisible by {key('n_kv_heads')} {c.n_kv_heads}")
    if c.head_dim % 2 != 0:
        raise ValueError(f"config: head dim {c.head_dim} must be even for RoPE")
    if c.embedding_size < c.vocab_size:
        raise ValueError(f"config: embedding_size {c.embedding_size} < vocab_size {c.vocab_size}")
    if family.qkv_bias and (c.include_bias or not c.include_qkv_bias):
        raise ValueError(f"config: a {family.label} model has biases on q/k/v only (Qwen2's layout); "
                         f"got include_bias={c.include_bias}, include_qkv_bias={c.include_qkv_bias}")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id", "bos_token_id"):
        value = getattr(c, name)
        if value is not None and not 0 <= value < c.embedding_size:
            raise ValueError(f"config: {key(name)} {value} is outside the vocabulary [0, {c.embedding_size})")
    # 4) The mask is a token of its own: decoding unmasks every position that holds it, so a mask
    #    that is also EOS, padding, end of turn or BOS would turn those tokens into holes to fill.
    #    EOS may double as padding (LLaDA's and Dream's setup) and as end of turn: both only stop text.
    for name in ("eos_token_id", "pad_token_id", "eot_token_id", "bos_token_id"):
        if getattr(c, name) == c.mask_token_id:
            raise ValueError(f"config: {key('mask_token_id')} {c.mask_token_id} is also {key(name)}; "
                             f"the mask must be a token of its own")


def family_of(raw: dict) -> Family:
    """The family a config.json describes, from its `model_type` (absent: LLaDA, as older files)."""
    model_type = raw.get("model_type")
    if model_type is None:
        return FAMILIES["llada"]
    for family in FAMILIES.values():
        if isinstance(model_type, str) and model_type.lower() == family.model_type.lower():
            return family
    raise ValueError(f"config: model_type {_shown(model_type)} is not a family this model runs; "
                     f"use one of {[f.model_type for f in FAMILIES.values()]}")


def check_logits_range(model: DiffusionLM, Q: int, logits_range, positions) -> tuple[int, int]:
    """(a, b) for a forward of Q queries: integers with 0 <= a <= b <= Q + shift, and, for a
    shifted model asked for query 0, a first query at canvas position 0. That check reads
    `positions` on the host once, and only then: a == 0 on a shifted model with explicit positions."""
    s = model.logit_shift
    try:
        a, b = (0, Q) if logits_range is None else (operator.index(v) for v in logits_range)
        ok = not isinstance(a, bool) and not isinstance(b, bool) and 0 <= a <= b <= Q + s
    except (TypeError, ValueError):  # not a pair, or not integers
        ok = False
    if not ok:
        after = f"; the last of the {Q} rows also predicts the position after them" if s else ""
        raise ValueError(f"logits_range must be two integers 0 <= a <= b <= {Q + s} for {Q} query tokens{after}, "
                         f"got {reprlib.repr(logits_range)}")
    if s and a == 0 and b > 0 and positions is not None:
        first = positions[..., 0].reshape(-1)  # (B,) or (1,): each row's first query position
        if bool((first != 0).any()):
            p = int(first[first != 0][0])
            raise ValueError(
                f"logits_range ({a}, {b}) asks for the logits of query index 0, at canvas position {p}, but a "
                f"{FAMILIES[model.config.family].label} model (logit_shift {s}) predicts each token from the "
                f"hidden state of the position before it, which this forward does not compute; start the window "
                f"one position earlier (at {p - 1}) and ask for logits_range ({a + 1}, {b + 1})")
    return a, b


# The dtypes a model may be loaded in: the ones LLaDA and Dream are run in, and float64 for
# reference runs. float8 and friends are refused: they load, then fail at the first matmul on most devices.
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
            raise ValueError(f"shards listed in {index} are missing: {_few(missing)}")
    elif os.path.lexists(single):
        files = [single]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no model.safetensors, model.safetensors.index.json or *.safetensors in {path}")
    for file in files:
        _check_path(file, stat.S_IFREG)
    return files, weight_map


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
            raise ValueError(f"checkpoint {path}: the index places {_few(misplaced)} in other shards than the ones "
                             f"that hold them")
        ghosts = sorted(set(weight_map) - set(found))
        if ghosts:
            raise ValueError(f"checkpoint {path}: the index lists {_few(ghosts)}, which no shard holds")
    return found


def _check_tensors(expected: dict, found: dict, config: ModelConfig, path: str) -> None:
    """The checkpoint holds exactly the tensors the config's model has, in its shapes, as floats."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        # A config whose layer count disagrees with the weights is the usual cause: say so.
        blocks = re.compile(re.escape(FAMILIES[config.family].blocks[1]) + r"\.(\d+)\.")
        layers = {m[1] for name in found if (m := blocks.match(name))}
        hint = (f"; config.json says {config.key('n_layers')} {config.n_layers}, the weights hold {len(layers)} "
                f"layer{'s' * (len(layers) != 1)}" if len(layers) != config.n_layers else "")
        raise ValueError(f"checkpoint {path}: missing keys {_few(missing)}; unexpected keys {_few(unexpected)}{hint}")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {found[name][1]}, expected {shape}")
    integer = sorted(n for n, (_, _, d) in found.items() if d == "BOOL" or d[0] in "IU")  # I8..I64, U8..U64
    if integer:
        raise ValueError(f"checkpoint {path}: {_few(integer)} hold integer or bool values ({found[integer[0]][2]}); "
                         f"weights must be floating point (a quantized checkpoint needs its own loader)")


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
