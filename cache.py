"""
An explicit key/value cache for diffusion decoding: preallocated buffers written by index.

A diffusion LM knows its total length (prompt + generation) before decoding starts, so the cache
is two tensors allocated once per request, `(N, B, Hkv, S, D)` for keys and for values, on the
model's device and dtype. A forward writes the keys/values of its query tokens at their positions
with `index_copy_`, then attends over the first `length` positions. Nothing grows with `torch.cat`.
The pattern follows gpt-fast's static cache; the method names borrow HF's `Cache.update`.

Keys are stored *after* RoPE. In a diffusion LM a token's position never changes (the canvas
has a fixed length), so rotating a key once, when it is written, is exact and saves rotating the
whole cache again on every step. (The original LLaDA/Fast-dLLM code caches keys before RoPE and
re-rotates all of them in every forward; the numbers are the same.)

A cache is an *approximation* here. With bidirectional attention every position's keys/values
depend on every other token, so when a step commits tokens, the cached K/V of all other
positions go stale: they were computed from a canvas with more masks. Fast-dLLM (arXiv
2505.22618) accepts that staleness within one block and refreshes everything at the next block:
- prefix cache: positions before the current block are read from the cache; the block and the
  whole masked suffix are recomputed (and rewritten) each step;
- DualCache: only the current block is recomputed each step; the prefix *and* the masked suffix
  are read stale from the cache. Both are just ranges of these same buffers (see `prefix`, `span`).
dLLM-Cache's feature caches (per-layer attention/MLP outputs of prompt and response, refreshed at
different intervals) fit the same mould: more `(N, B, S, C)` buffers indexed by the same positions.

Usage:
    cache = KVCache.for_model(model.config, batch=B, capacity=P + G, device=dev, dtype=dt)
    logits = model(x, positions=torch.arange(L), cache=cache)           # fills all positions
    logits = model(x[:, s:e], positions=torch.arange(s, e), cache=cache) # block vs. cached rest

Shape legend: N layers, B batch, Hkv key/value heads, S capacity, D head dim, K query tokens.
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
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, Hkv, S, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, Hkv, S, D)
        self.capacity = capacity
        self.length = capacity  # attention reads positions [0, length)

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, device=None, dtype=torch.float32) -> "KVCache":
        """A cache shaped for a model config (model.ModelConfig) and a request of `capacity` tokens."""
        if capacity > config.max_sequence_length:
            raise ValueError(f"cache capacity {capacity} exceeds the model's max_sequence_length "
                             f"{config.max_sequence_length}")
        return cls(config.n_layers, batch, config.n_kv_heads, config.head_dim, capacity, device, dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write (B, Hkv, K, D) keys/values at `positions` (K,), return the layer's (B, Hkv, length, D) views.

        Only the K listed positions change; every other position keeps what it held.
        """
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    def prefix(self, layer: int, end: int):
        """Keys/values of positions [0, end): the prefix cache's fixed part."""
        return self.span(layer, 0, end)

    def span(self, layer: int, start: int, end: int):
        """Keys/values of positions [start, end), each (B, Hkv, end - start, D)."""
        return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]

    def get_seq_length(self) -> int:
        """How many positions attention reads (HF's name)."""
        return self.length

    def reset(self) -> None:
        """Zero the buffers in place (no reallocation), e.g. to reuse them for another request."""
        self.k.zero_()
        self.v.zero_()

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
