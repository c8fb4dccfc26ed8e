"""cache.py: cached forwards equal the full forward where the cache is exact; writes stay in place."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cache import KVCache


@given(data=st.data())
def test_cached_block_equals_full_forward(random_model, data):
    """Fill the cache from a full forward of the same tokens; a cached forward of any block [s, e)
    (or of the block plus everything after it) equals that slice of the full forward."""
    L = data.draw(st.integers(4, 40), label="L")
    B = data.draw(st.integers(1, 3), label="B")
    s = data.draw(st.integers(0, L - 1), label="s")
    e = data.draw(st.integers(s + 1, L), label="e")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ids = torch.randint(0, 47, (B, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = random_model(ids)  # (B, L, V)
        cache = KVCache.for_model(random_model.config, batch=B, capacity=L)
        random_model(ids, positions=torch.arange(L), cache=cache)
        block = random_model(ids[:, s:e], positions=torch.arange(s, e), cache=cache)  # DualCache-shaped
        suffix = random_model(ids[:, s:], positions=torch.arange(s, L), cache=cache)  # prefix-cache-shaped
    assert torch.allclose(block, full[:, s:e], atol=1e-5, rtol=1e-5)
    assert torch.allclose(suffix, full[:, s:], atol=1e-5, rtol=1e-5)


@given(data=st.data())
def test_writes_touch_only_their_positions(data):
    S = data.draw(st.integers(2, 30), label="S")
    positions = data.draw(st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True), label="pos")
    layer = data.draw(st.integers(0, 2), label="layer")
    cache = KVCache(n_layers=3, batch=2, n_kv_heads=2, head_dim=4, capacity=S)
    cache.k.normal_()
    cache.v.normal_()
    k_before, v_before = cache.k.clone(), cache.v.clone()
    pos = torch.tensor(positions)
    k_new = torch.randn(2, 2, len(positions), 4)
    v_new = torch.randn(2, 2, len(positions), 4)
    k_view, v_view = cache.update(layer, k_new, v_new, pos)
    assert torch.equal(k_view[:, :, pos], k_new) and torch.equal(v_view[:, :, pos], v_new)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(cache.k[layer][:, :, untouched], k_before[layer][:, :, untouched])
    assert torch.equal(cache.v[layer][:, :, untouched], v_before[layer][:, :, untouched])
    others = [i for i in range(3) if i != layer]
    assert torch.equal(cache.k[others], k_before[others]) and torch.equal(cache.v[others], v_before[others])


def test_buffers_are_preallocated_and_reused(random_model):
    """Forwards write into the same storage; nothing is reallocated or grown."""
    cache = KVCache.for_model(random_model.config, batch=2, capacity=16)
    ptr = cache.k.data_ptr()
    ids = torch.randint(0, 47, (2, 16))
    with torch.no_grad():
        random_model(ids, positions=torch.arange(16), cache=cache)
        random_model(ids[:, 4:8], positions=torch.arange(4, 8), cache=cache)
    assert cache.k.data_ptr() == ptr and cache.k.shape == (2, 2, 2, 16, 8)
    assert cache.get_seq_length() == 16
    assert cache.nbytes() == 2 * 2 * 2 * 2 * 16 * 8 * 4


def test_ranges_are_views_of_the_same_buffer():
    cache = KVCache(n_layers=1, batch=1, n_kv_heads=1, head_dim=2, capacity=8)
    k, _ = cache.prefix(0, 3)
    k.fill_(1.0)
    assert cache.k[0, 0, 0, :3].eq(1).all() and cache.k[0, 0, 0, 3:].eq(0).all()
    k2, _ = cache.span(0, 2, 5)
    assert k2.shape == (1, 1, 3, 2)
    cache.reset()
    assert cache.k.eq(0).all()


def test_cache_errors(random_model):
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length"):
        KVCache.for_model(random_model.config, batch=1, capacity=10_000)
    with pytest.raises(ValueError, match="must be positive"):
        KVCache(n_layers=1, batch=0, n_kv_heads=1, head_dim=2, capacity=4)
