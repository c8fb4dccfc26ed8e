"""model.py on Dream: parity with the original DreamModel's logits and K/V, the logit shift, the
checkpoint's own names and config keys, the real Dream-v0-7B shape, and Dream's config errors."""

import json
import os
import re

import pytest
import torch
from conftest import GOLDEN

from cache import KVCache
from model import DiffusionLM, ModelConfig, apply_rope, init_weights, load_model, rope_cos_sin, save_model

DREAM = os.path.join(GOLDEN, "dream_tiny")
DREAM_CKPT = os.path.join(DREAM, "ckpt")
needs_dream = pytest.mark.skipif(not os.path.isdir(DREAM_CKPT), reason=f"Dream golden outputs not found at {DREAM}")


def logit_tol(ref: torch.Tensor) -> float:
    """The project's float32 logit tolerance (test_model.py says why): 2e-5 of the largest logit."""
    return 2e-5 * max(1.0, float(ref.abs().max()))


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return ours.shape == ref.shape and float((ours - ref).abs().max()) <= logit_tol(ref)


def per_position(raw: torch.Tensor) -> torch.Tensor:
    """What Dream's samplers do with the raw logits: row i predicts i + 1, and position 0 keeps its own row."""
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


@pytest.fixture(scope="module")
def dream():
    if not os.path.isdir(DREAM_CKPT):
        pytest.skip("Dream golden checkpoint absent")
    return load_model(DREAM_CKPT, device="cpu")


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(os.path.join(DREAM, "forward.safetensors"))


def filled_cache(model, ids):
    """A KVCache holding the K/V of a full forward of `ids` (the block-opening refresh)."""
    cache = KVCache.for_model(model.config, batch=ids.shape[0], capacity=ids.shape[1])
    model(ids, positions=torch.arange(ids.shape[1]), cache=cache)
    return cache


# ---------------------------------------------------------------------------------------------
# Parity with the original DreamModel (float32)
# ---------------------------------------------------------------------------------------------


@needs_dream
def test_full_forward_raw_and_per_position(dream, golden):
    """model(ids) gives per-position logits (row i predicts token i); asking for query indices
    1..L gives the original's raw rows (row i predicts i + 1)."""
    L = golden["input_ids"].shape[1]
    with torch.no_grad():
        for ids, ref in ((golden["input_ids"], golden["logits_full"]), (golden["input_ids_step"], golden["logits_full_step"])):
            assert close(dream(ids), per_position(ref))
            assert close(dream(ids, logits_range=(1, L + 1)), ref)  # the last row predicts the position after L - 1
    assert dream.logit_shift == 1 and dream.config.family == "dream"


@needs_dream
def test_cached_forwards_match_reference(dream, golden):
    """Fast-dLLM's prefix cache and DualCache, and BlockBatch's predecessor window: each a window
    of query tokens against the K/V of a full forward of the canvas before the block's commits.
    The references are raw rows (row j predicts the position after query j): query indices 1..Q."""
    s, e = golden["block_start_end"].tolist()
    ids, step = golden["input_ids"], golden["input_ids_step"]
    L = ids.shape[1]
    with torch.no_grad():
        prefix = dream(step[:, s:], positions=torch.arange(s, L), cache=filled_cache(dream, ids), logits_range=(1, L - s + 1))
        assert close(prefix, golden["logits_prefix_step"])
        cache = filled_cache(dream, ids)
        dual = dream(step[:, s:e], positions=torch.arange(s, e), cache=cache, logits_range=(1, e - s + 1))
        assert close(dual, golden["logits_dual_step"])
        # BlockBatch feeds the window shifted left by one, [s-1, e-1): its rows predict s..e-1,
        # query indices 1..K of that window (the last row predicts e - 1, the position after it).
        predwin = dream(step[:, s - 1:e - 1], positions=torch.arange(s - 1, e - 1), cache=filled_cache(dream, ids),
                        logits_range=(1, e - s + 1))
        assert close(predwin, golden["logits_predwin_step"])
    # The approximation is real: the DualCache logits are not the exact ones.
    exact = golden["logits_full_step"][:, s - 1:e - 1]
    assert float((dual - exact).abs().max()) > 10 * logit_tol(exact)
    # The cache keeps post-RoPE keys in (B, Hkv, L, D); the reference keeps (B, L, Hkv*D) before RoPE.
    cfg = dream.config
    cos, sin = rope_cos_sin(torch.arange(L)[None], cfg.head_dim, cfg.rope_theta)
    as_cache = lambda t: t.view(1, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # noqa: E731
    ref_k = apply_rope(as_cache(golden["dual_k_layer0_after_replace"]), cos, sin)
    assert torch.allclose(cache.k[0, :, :, :L], ref_k, atol=logit_tol(ref_k), rtol=0)
    fresh = filled_cache(dream, ids)
    ref_k0, ref_v0 = apply_rope(as_cache(golden["k_layer0_preRoPE"]), cos, sin), as_cache(golden["v_layer0"])
    assert torch.allclose(fresh.k[0, :, :, :L], ref_k0, atol=logit_tol(ref_k0), rtol=0)
    assert torch.allclose(fresh.v[0, :, :, :L], ref_v0, atol=logit_tol(ref_v0), rtol=0)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_window_with_the_row_before_equals_the_full_forward(family, random_model, request):
    """How a decoding loop reads a cached block [s, e), the same code for both families: the
    window [s - shift, e) with logits_range (shift, shift + e - s). With a fresh cache that is
    exactly the full forward's logits of the block."""
    model = request.getfixturevalue("dream") if family == "dream" else random_model
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(4))
    shift = model.logit_shift
    assert shift == {"dream": 1, "llada": 0}[family]
    with torch.no_grad():
        full = model(ids)
        for s, e in ((0, 8), (8, 16), (25, 30)):
            start = max(s - shift, 0)  # canvas position 0 predicts itself: no row before it is needed
            window = model(ids[:, start:e], positions=torch.arange(start, e), cache=filled_cache(model, ids),
                           logits_range=(s - start, e - start))
            assert torch.allclose(window, full[:, s:e], atol=logit_tol(full), rtol=0), (s, e)


@needs_dream
def test_padded_batch_matches_reference(dream, golden):
    """The left-padded batch, against the original's per-position logits (as its sampler reads
    them). The original also hides padding queries, so the rows of padding differ, and with them
    the first real token, which a padding row predicts; every other position agrees."""
    mask = golden["batch_attention_mask"]  # (2, 16): one row padded by 4, one without padding
    with torch.no_grad():
        ours = dream(golden["batch_input_ids"], attention_mask=mask)
    ref = per_position(golden["logits_batch_pad"])
    predicted_from_a_real_row = mask.clone()
    predicted_from_a_real_row[:, 1:] &= mask[:, :-1]
    assert predicted_from_a_real_row.sum(1).tolist() == [11, 16]
    assert close(ours[predicted_from_a_real_row], ref[predicted_from_a_real_row])


@needs_dream
def test_window_without_the_row_before_is_refused(dream, golden):
    ids = golden["input_ids"]
    cache = filled_cache(dream, ids)
    message = (r"logits_range \(0, 8\) asks for the logits of query index 0, at canvas position 25, but a Dream model "
               r"\(logit_shift 1\) predicts each token from the hidden state of the position before it, which this "
               r"forward does not compute; start the window one position earlier \(at 24\) and ask for logits_range "
               r"\(1, 9\)")
    with pytest.raises(ValueError, match=message):
        dream(ids[:, 25:33], positions=torch.arange(25, 33), cache=cache)
    with pytest.raises(ValueError, match="at canvas position 3"):  # per-row positions: any row counts
        dream(ids[:, :2].repeat(2, 1), positions=torch.tensor([[0, 1], [3, 4]]), cache=cache)
    with pytest.raises(ValueError, match=r"logits_range must be two integers 0 <= a <= b <= 9 for 8 query tokens"):
        dream(ids[:, 24:32], positions=torch.arange(24, 32), cache=cache, logits_range=(1, 10))


@needs_dream
def test_the_head_alone_applies_the_shift(dream, golden):
    """`logits(x, logits_range)` on hidden states from the blocks run one by one (as decode.py's
    dLLM-Cache forward runs them) equals the forward's logits."""
    ids = golden["input_ids"]
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        cos, sin, _ = dream.rope_and_mask(positions, None, 1)
        x = dream.embed(ids)
        for block in dream.blocks:
            x = block(x, cos, sin, positions)
        for r in ((0, 49), (0, 1), (10, 20), (30, 50)):
            assert torch.equal(dream.logits(x, r, positions), dream(ids, logits_range=r))


# ---------------------------------------------------------------------------------------------
# Names, config keys, saving a real Dream directory
# ---------------------------------------------------------------------------------------------


@needs_dream
def test_loads_with_dream_names_and_keys(dream):
    from safetensors import safe_open

    with safe_open(os.path.join(DREAM_CKPT, "model.safetensors"), framework="pt") as f:
        assert set(dream.state_dict()) == set(f.keys())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.0.post_attention_layernorm.weight"):
        assert name in dream.state_dict()
    c = dream.config
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.mlp_hidden_size, c.vocab_size) == (112, 14, 2, 2, 224, 1024)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (1010, 1000, 1000, 1009)
    assert (c.rope_theta, c.rms_norm_eps, c.include_qkv_bias, c.weight_tying) == (10000.0, 1e-6, True, False)
    assert sum(p.numel() for p in dream.parameters()) == 438_096


@needs_dream
def test_save_writes_a_dream_directory(dream, tmp_path):
    """save_model writes Dream's own config keys and tensor names; it loads back to the same logits."""
    from safetensors import safe_open

    save_model(dream, str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(DREAM_CKPT, "config.json")).read())
    for key in ("model_type", "architectures", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings", "mask_token_id", "pad_token_id", "eos_token_id",
                "bos_token_id", "hidden_act", "rope_scaling", "use_sliding_window"):
        assert raw[key] == original[key], key
    assert not any(k in raw for k in ("d_model", "n_layers", "family"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f, \
            safe_open(os.path.join(DREAM_CKPT, "model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())
    again = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids), dream(ids))


def dream_config(**overrides) -> dict:
    """Dream-v0-7B's config.json (the keys this loader reads), with overrides."""
    raw = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "num_attention_heads": 28,
           "num_key_value_heads": 4, "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False,
           "mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643, "bos_token_id": 151665}
    raw.update(overrides)
    return raw


def test_dream_7b_shape_on_meta():
    """The real Dream-v0-7B config builds 339 tensors and 7,615,616,512 parameters under Dream's names."""
    cfg = ModelConfig.from_dict(dream_config())
    assert (cfg.family, cfg.logit_shift, cfg.head_dim, cfg.include_qkv_bias) == ("dream", 1, 128, True)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    state = model.state_dict()
    assert len(state) == 28 * 12 + 3
    assert sum(v.numel() for v in state.values()) == 7_615_616_512
    assert state["model.layers.27.self_attn.k_proj.bias"].shape == (512,)
    assert state["lm_head.weight"].shape == (152064, 3584)


def test_shrunk_dream_keeps_the_real_vocabulary_and_ids(tmp_path):
    """Two small layers with Dream-7B's vocabulary, special ids and head ratio: saved as a Dream
    directory, loaded back, and run; the logits cover the whole vocabulary."""
    raw = dream_config(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, num_hidden_layers=2,
                       intermediate_size=64)
    model = init_weights(DiffusionLM(ModelConfig.from_dict(raw)), seed=0).eval()
    save_model(model, str(tmp_path))
    again = load_model(str(tmp_path), device="cpu")
    c = again.config
    assert (c.vocab_size, c.mask_token_id, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (152064, 151666, 151643,
                                                                                                151643, 151665)
    ids = torch.tensor([[151665, 11, 22, 151666, 151666, 151643]])
    with torch.no_grad():
        logits = again(ids)
        assert logits.shape == (1, 6, 152064) and torch.equal(logits, model(ids))


# ---------------------------------------------------------------------------------------------
# Config errors name Dream's own keys; sizes are bounded
# ---------------------------------------------------------------------------------------------


def write_config(tmp_path, raw) -> str:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_hidden_layers=10**30), r"num_hidden_layers must be at most 4096, got 1000000000000000000000000000000 \(int\)"),
    (dict(hidden_size=10**30), r"hidden_size must be at most 131072, got 1000000000000000000000000000000 \(int\)"),
    (dict(vocab_size=10**30), r"vocab_size must be at most 4194304"),
    (dict(intermediate_size=0), r"intermediate_size must be positive, got 0"),
    (dict(max_position_embeddings=1e30), r"max_position_embeddings must be an integer, got 1e\+30 \(float\)"),
    (dict(rope_theta=1e30), r"rope_theta must be at most 1e\+12, got 1e\+30"),
    (dict(rms_norm_eps=2.0), r"rms_norm_eps must be at most 1, got 2.0"),
    (dict(num_attention_heads=5), r"hidden_size 3584 is not divisible by num_attention_heads 5"),
    (dict(num_key_value_heads=3), r"num_attention_heads 28 is not divisible by num_key_value_heads 3"),
    (dict(mask_token_id=152064), r"mask_token_id 152064 is outside the vocabulary \[0, 152064\)"),
    (dict(bos_token_id=151666), r"mask_token_id 151666 is also bos_token_id"),
    (dict(eos_token_id=[151643, 151645]), r"eos_token_id must be an integer, got \[151643, 151645\] \(list\)"),
    (dict(tie_word_embeddings="no"), r"tie_word_embeddings must be true or false"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling=\{.*\} is not supported \(Dream uses None\)"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported \(Dream uses 'silu'\)"),
    (dict(use_sliding_window=True), r"use_sliding_window=True is not supported"),
    (dict(hidden_size=None), r"missing required fields \['hidden_size'\]"),
    (dict(model_type="qwen2"), r"model_type 'qwen2' \(str\) is not a family this model runs; use one of \['llada', 'Dream'\]"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_dream_config_errors_name_dream_keys(tmp_path, overrides, message):
    """Every value is bounded (a layer count of 1e30 does not hang building modules, a width of
    1e30 does not overflow torch), and the error names the key as Dream's config.json spells it."""
    path = write_config(tmp_path, dream_config(**overrides))
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, "config.json")) + ": config: " + message):
        load_model(path, device="cpu")


def test_dream_layout_is_fixed():
    """Qwen2 has biases on q/k/v and nowhere else; a Dream config built in Python cannot say otherwise."""
    small = dict(family="dream", d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=20,
                 mask_token_id=19, eos_token_id=18, pad_token_id=18)
    assert ModelConfig(**small).include_qkv_bias is True
    for bad in (dict(include_qkv_bias=False), dict(include_bias=True)):
        with pytest.raises(ValueError, match="a Dream model has biases on q/k/v only"):
            ModelConfig(**small, **bad)
    with pytest.raises(ValueError, match=r"family must be one of \['dream', 'llada'\], got 'qwen' \(str\)"):
        ModelConfig(**{**small, "family": "qwen"})


def test_dream_layer_count_disagreeing_with_the_weights(tmp_path):
    """A config that says 300 layers over 2 layers of weights: one short line with the counts."""
    raw = dream_config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                       intermediate_size=32, vocab_size=32, mask_token_id=31, eos_token_id=30, pad_token_id=30,
                       bos_token_id=29)
    save_model(DiffusionLM(ModelConfig.from_dict(raw)), str(tmp_path))
    write_config(tmp_path, {**raw, "num_hidden_layers": 300})
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path), device="cpu")
    message = str(err.value)
    assert len(message) < 600 and "\n" not in message
    assert re.search(r"missing keys \['model.layers.10.input_layernorm.weight', .*, \.\.\.\] \(3576 in all\); "
                     r"unexpected keys \[\]; config.json says num_hidden_layers 300, the weights hold 2 layers$", message)


def test_shifted_model_needs_no_positions_for_the_canvas_start():
    """A full forward from position 0 needs no positions; explicit positions from 0 pass the check."""
    cfg = ModelConfig(family="dream", d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=20,
                      mask_token_id=19, eos_token_id=18, pad_token_id=18)
    model = init_weights(DiffusionLM(cfg), seed=1).eval()
    ids = torch.randint(0, 18, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, positions=torch.arange(7)))
        raw = model(ids, logits_range=(1, 8))
        assert torch.equal(model(ids), torch.cat([raw[:, :1], raw[:, :-1]], dim=1))
        assert model(ids, logits_range=(0, 0)).shape == (2, 0, 20)


def test_causal_shifted_model_is_a_next_token_predictor():
    """causal=True on a shifted model: the logits of position i come from tokens 0..i-1 only, so
    token i itself can be changed without changing them (the autoregressive start Dream was made from)."""
    cfg = ModelConfig(family="dream", d_model=16, n_heads=2, n_layers=2, mlp_hidden_size=32, vocab_size=20,
                      mask_token_id=19, eos_token_id=18, pad_token_id=18)
    model = init_weights(DiffusionLM(cfg), seed=2).eval()
    ids = torch.randint(0, 18, (1, 10), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 18
    with torch.no_grad():
        a, b = model(ids, causal=True), model(changed, causal=True)
    assert torch.equal(a[:, 1:7], b[:, 1:7]) and not torch.allclose(a[:, 7:], b[:, 7:])
