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
    untouched = torch.ones(S + 1, dtype=torch.bool)  # every slot, the trash slot included
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
    assert cache.k.data_ptr() == ptr and cache.k.shape == (2, 2, 2, 16 + 1, 8)  # + the trash slot
    assert cache.length == 16 and cache.trash == 16
    assert cache.nbytes() == 2 * 2 * 2 * 2 * 17 * 8 * 4


def test_per_row_positions_write_each_row_and_hide_the_trash():
    """(B, Q) positions write each row at its own positions; padding goes to the trash slot,
    which the returned views (what attention reads) never include."""
    cache = KVCache(n_layers=1, batch=2, n_kv_heads=1, head_dim=2, capacity=6)
    k = torch.arange(1, 13, dtype=torch.float32).view(2, 1, 3, 2)  # (B, Hkv, Q, D)
    positions = torch.tensor([[1, 2, 3], [4, cache.trash, cache.trash]])  # row 1 has one real query
    k_view, v_view = cache.update(0, k, k.clone(), positions)
    assert k_view.shape == (2, 1, 6, 2)
    assert torch.equal(k_view[0, 0, 1:4], k[0, 0]) and k_view[0, 0, [0, 4, 5]].eq(0).all()
    assert torch.equal(k_view[1, 0, 4], k[1, 0, 0]) and k_view[1, 0, :4].eq(0).all()


@given(data=st.data())
def test_per_row_cached_block_equals_full_forward(random_model, data):
    """Rows querying different blocks in one forward ((B, Q) positions, trash-padded) get the
    slices of the full forward, as with one shared block."""
    L = data.draw(st.integers(6, 30), label="L")
    starts = [data.draw(st.integers(0, L - 2), label="s0"), data.draw(st.integers(0, L - 2), label="s1")]
    lengths = [data.draw(st.integers(1, L - s), label=f"n{i}") for i, s in enumerate(starts)]
    ids = torch.randint(0, 47, (2, L), generator=torch.Generator().manual_seed(L))
    Q = max(lengths)
    with torch.no_grad():
        full = random_model(ids)
        cache = KVCache.for_model(random_model.config, batch=2, capacity=L)
        random_model(ids, positions=torch.arange(L), cache=cache)
        pos = torch.tensor([[s + i if i < n else cache.trash for i in range(Q)] for s, n in zip(starts, lengths)])
        out = random_model(ids.gather(1, pos.clamp(max=L - 1)), positions=pos, cache=cache)
    for r in range(2):
        s, n = starts[r], lengths[r]
        tol = 1e-5 * max(1.0, float(full.abs().max()))
        assert torch.allclose(out[r, :n], full[r, s:s + n], atol=tol, rtol=1e-5)


def test_cache_errors(random_model):
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length"):
        KVCache.for_model(random_model.config, batch=1, capacity=10_000)
    with pytest.raises(ValueError, match="must be positive"):
        KVCache(n_layers=1, batch=0, n_kv_heads=1, head_dim=2, capacity=4)
