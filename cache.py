"""
An explicit key/value cache for diffusion decoding: preallocated buffers written by index.

A diffusion LM knows its total length L (prompt + generation) before decoding starts, so the cache
is two tensors allocated once per request, `(N, B, Hkv, S, D)` for keys and for values, on the
model's device and dtype; a forward writes its query tokens' keys/values at their positions and
attends over [0, length). Nothing grows with `torch.cat` (gpt-fast's static cache; `update(layer,
k, v, positions)` borrows HF's `Cache.update`). Keys are stored after RoPE: a position never
changes on the canvas, so rotating once at write time is exact (the originals re-rotate every
step; the numbers are the same).

With bidirectional attention a cache is an *approximation*: each commit changes every position's
keys/values a little, and a cached entry stays as it was last written (stale). What is recomputed
is decode.py's decision; Fast-dLLM's prefix cache and DualCache are ranges of these buffers, and
dLLM-Cache (`FeatureCache`) also keeps each layer's attention and MLP outputs per position. Rows
may query different positions, (B, Q); a row with fewer queries pads with `trash`, a spare slot
past `length` that attention never reads.

    cache = KVCache.for_model(model.config, batch=B, capacity=P + G, device=dev, dtype=dt)
    logits = model(x, positions=torch.arange(L), cache=cache)           # fills all positions
    logits = model(x[:, s:e], positions=torch.arange(s, e), cache=cache) # block vs. cached rest

Shape legend: N layers, B batch, Hkv key/value heads, S = capacity + 1 slots, D head dim,
Q query tokens, C model dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Static per-request K/V buffers, shape (N, B, Hkv, S, D), written at explicit positions."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device=None, dtype=torch.float32):
        if min(n_layers, batch, n_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(f"cache sizes must be positive: layers {n_layers}, batch {batch}, "
                             f"kv heads {n_kv_heads}, head dim {head_dim}, capacity {capacity}")
        shape = (n_layers, batch, n_kv_heads, capacity + 1, head_dim)  # one spare slot: `trash`
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, Hkv, S, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, Hkv, S, D)
        self.length = capacity  # attention reads positions [0, length): the whole canvas
        self.trash = capacity  # the spare slot padded queries write to; never read

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, device=None, dtype=torch.float32) -> "KVCache":
        """A cache shaped for a model config (model.ModelConfig) and a request of `capacity` tokens."""
        if capacity > config.max_sequence_length:
            raise ValueError(f"cache capacity {capacity} exceeds the model's max_sequence_length "
                             f"{config.max_sequence_length}")
        return cls(config.n_layers, batch, config.n_kv_heads, config.head_dim, capacity, device, dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write (B, Hkv, Q, D) keys/values at `positions`, (Q,) shared by all rows or (B, Q) per
        row; return the layer's (B, Hkv, length, D) views. Only the listed positions change."""
        if positions.dim() == 1:
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
        else:
            index = positions[:, None, :, None].expand_as(k)  # (B, Hkv, Q, D)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


class FeatureCache(KVCache):
    """dLLM-Cache's per-layer features: the K/V buffers plus, for every position, the attention
    sub-block's output (after the output projection, before the residual add) and the MLP's
    output (before the residual add), so a position that is not recomputed reuses both. What is
    recomputed when is the cache policy's decision (decode.DLLMCache)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int, d_model: int,
                 device=None, dtype=torch.float32):
        super().__init__(n_layers, batch, n_kv_heads, head_dim, capacity, device, dtype)
        shape = (n_layers, batch, capacity + 1, d_model)  # one spare slot: `trash`, as for K/V
        self.attn = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, S, C)
        self.mlp = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, S, C)

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, device=None, dtype=torch.float32) -> "FeatureCache":
        if capacity > config.max_sequence_length:
            raise ValueError(f"cache capacity {capacity} exceeds the model's max_sequence_length "
                             f"{config.max_sequence_length}")
        return cls(config.n_layers, batch, config.n_kv_heads, config.head_dim, capacity, config.d_model, device, dtype)

    def values(self, layer: int, start: int, end: int) -> torch.Tensor:
        """The cached values of positions [start, end) with heads concatenated, (B, end - start, Hkv*D):
        the layout `v_proj` produces, for comparing fresh values with cached ones."""
        v = self.v[layer, :, :, start:end]  # (B, Hkv, n, D)
        return v.transpose(1, 2).reshape(v.shape[0], end - start, -1)
