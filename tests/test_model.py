"""model.py: parity with the reference logits, the loader's contract, padding, dtypes."""

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest
import torch
from conftest import CKPT, TINY, needs_golden

from cache import KVCache
from model import LLaDAModel, ModelConfig, apply_rope, load_model, rope_cos_sin, save_model


def logit_tol(ref: torch.Tensor) -> float:
    """How far two correct float32 forwards of the same model may differ: a few hundred float32
    ulps of the largest logit. Kernels differ between CPUs and GPUs in summation order; an fp32
    forward differs from an fp64 one of the same model by about 7e-6 of the largest logit here,
    so 2e-5 of it holds on any machine while a wrong computation (a missing norm, a wrong RoPE
    position, stale keys) is off by orders of magnitude more."""
    return 2e-5 * max(1.0, float(ref.abs().max()))


def golden_forward():
    from safetensors.torch import load_file

    return load_file(os.path.join(TINY, "forward.safetensors"))


# ---------------------------------------------------------------------------------------------
# Parity with the original model's logits (fp32)
# ---------------------------------------------------------------------------------------------


@needs_golden
def test_full_forward_matches_reference(tiny_model):
    g = golden_forward()
    with torch.no_grad():
        logits = tiny_model(g["input_ids"])
    assert logits.shape == g["logits_full"].shape
    assert (logits - g["logits_full"]).abs().max() <= logit_tol(g["logits_full"])
    with torch.no_grad():
        logits_step = tiny_model(g["input_ids_step"])
    assert (logits_step - g["logits_full_step"]).abs().max() <= logit_tol(g["logits_full_step"])


@needs_golden
def test_cached_forwards_match_reference(tiny_model):
    """Prefix cache and DualCache logits after in-block commits, against the original's."""
    g = golden_forward()
    s, e = g["block_start_end"].tolist()
    L = g["input_ids"].shape[1]
    with torch.no_grad():
        # Prefix cache: K/V from the canvas before the commits, then the block + suffix re-run.
        cache = KVCache.for_model(tiny_model.config, batch=1, capacity=L)
        tiny_model(g["input_ids"], positions=torch.arange(L), cache=cache)
        prefix = tiny_model(g["input_ids_step"][:, s:], positions=torch.arange(s, L), cache=cache)
        assert (prefix - g["logits_prefix_step"]).abs().max() <= logit_tol(g["logits_prefix_step"])
        # DualCache: the same refresh, then only the block re-run against everything cached.
        cache = KVCache.for_model(tiny_model.config, batch=1, capacity=L)
        tiny_model(g["input_ids"], positions=torch.arange(L), cache=cache)
        dual = tiny_model(g["input_ids_step"][:, s:e], positions=torch.arange(s, e), cache=cache)
        assert (dual - g["logits_dual_step"]).abs().max() <= logit_tol(g["logits_dual_step"])
    # The cache keeps post-RoPE keys; rotating the reference's pre-RoPE keys gives the same.
    cos, sin = rope_cos_sin(torch.arange(L)[None], tiny_model.config.head_dim, tiny_model.config.rope_theta)
    ref_k = apply_rope(g["dual_k_layer0_after_replace"], cos, sin)
    assert torch.allclose(cache.k[0, :, :, :L], ref_k, atol=logit_tol(ref_k), rtol=0)
    # The approximation is real: the cached logits are not the exact ones.
    exact_block = g["logits_full_step"][:, s:e]
    assert (dual - exact_block).abs().max() > 10 * logit_tol(exact_block)


@needs_golden
def test_loads_with_checkpoint_names_and_counts(tiny_model):
    names = set(tiny_model.state_dict())
    assert "model.transformer.wte.weight" in names
    assert "model.transformer.ff_out.weight" in names
    for part in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
        assert f"model.transformer.blocks.1.{part}.weight" in names
    assert tiny_model.config.mask_token_id == 1000 and tiny_model.config.eos_token_id == 1001


def test_llada_8b_config_shape():
    """The real LLaDA-8B config builds the advertised 291 tensors and 8,015,581,184 parameters."""
    cfg = ModelConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464, rope_theta=500000.0)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    state = model.state_dict()
    assert len(state) == 291
    assert sum(v.numel() for v in state.values()) == 8_015_581_184


# ---------------------------------------------------------------------------------------------
# The loader: sharded checkpoints, dtypes, and clear errors
# ---------------------------------------------------------------------------------------------


@needs_golden
def test_sharded_checkpoint_with_index(tmp_path, tiny_model):
    """Split the golden checkpoint into two shards with an index file; it loads identically."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(CKPT, "model.safetensors"))
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(os.path.join(CKPT, "config.json"), tmp_path / "config.json")
    sharded = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, 999, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sharded(ids), tiny_model(ids))


@needs_golden
def test_bf16_load_runs():
    model = load_model(CKPT, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.randint(0, 999, (1, 12)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    # A DualCache + threshold generation in bf16: the cache takes the model's dtype, no mask is left.
    from decode import DecodeConfig, generate

    cfg = DecodeConfig.for_model(model.config, gen_length=16, block_length=8, steps=16, cache="dual", threshold=0.9)
    out = generate(model, torch.tensor([[83, 954, 722, 999, 851]]), cfg)
    assert out.masks_left == 0 and out.ids.shape == (1, 21)


@pytest.fixture
def ckpt_copy(tmp_path):
    if not os.path.isdir(CKPT):
        pytest.skip("golden checkpoint absent")
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    return dst


def test_error_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_error_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_error_missing_weights(ckpt_copy):
    os.remove(ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(str(ckpt_copy))


def test_error_missing_shard(ckpt_copy):
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing"):
        load_model(str(ckpt_copy))


def test_error_missing_and_unexpected_keys(ckpt_copy):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt_copy / "model.safetensors"))
    state["model.transformer.extra.weight"] = torch.zeros(2)
    del state["model.transformer.ln_f.weight"]
    save_file(state, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['model.transformer.ln_f.weight'\].*unexpected keys \['model.transformer.extra.weight'\]"):
        load_model(str(ckpt_copy))


def test_error_shape_mismatch(ckpt_copy):
    raw = json.loads((ckpt_copy / "config.json").read_text())
    raw["mlp_hidden_size"] = 96
    (ckpt_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"ff_proj.weight has shape \(128, 64\), expected \(96, 64\)"):
        load_model(str(ckpt_copy))


def test_error_unknown_dtype(ckpt_copy):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(ckpt_copy), dtype="float8")


def test_error_unsupported_option(ckpt_copy):
    raw = json.loads((ckpt_copy / "config.json").read_text())
    raw["alibi"] = True
    (ckpt_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="alibi"):
        load_model(str(ckpt_copy))


def test_error_bad_config_values():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4, n_layers=1, mlp_hidden_size=8, vocab_size=10)
    with pytest.raises(ValueError, match="mask_token_id 99 is outside"):
        ModelConfig(d_model=8, n_heads=2, n_layers=1, mlp_hidden_size=8, vocab_size=10, mask_token_id=99,
                    eos_token_id=1, pad_token_id=1)


# ---------------------------------------------------------------------------------------------
# The loader: paths that are not what they seem, broken indexes, special ids that collide
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_ckpt(tmp_path):
    """A tiny random checkpoint written by save_model: these tests need no golden files."""
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=20,
                      mask_token_id=19, eos_token_id=18, pad_token_id=18)
    save_model(LLaDAModel(cfg), str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


@contextmanager
def other_end(fifo):
    """A process that opens the FIFO's writing end whenever a reader waits on it, so that a loader
    that opens the FIFO reads end-of-file and fails at once instead of blocking the test run
    forever. A process, not a thread: safetensors blocks in open() holding the GIL."""
    poke = ("import os, sys, time\n"
            "while True:\n"
            "    try: os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))\n"
            "    except OSError: pass  # ENXIO: no reader yet\n"
            "    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", poke, str(fifo)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


MAKE = {"fifo": os.mkfifo, "dev-null": lambda path: os.symlink(os.devnull, path), "directory": os.mkdir}


@pytest.mark.parametrize("name, kind, message", [
    ("model.safetensors", "fifo", "is a named pipe (FIFO), not a regular file"),
    ("model.safetensors", "dev-null", "(a symlink to /dev/null) is a character device, not a regular file"),
    ("model.safetensors", "directory", "is a directory, not a regular file"),
    ("config.json", "fifo", "is a named pipe (FIFO), not a regular file"),
], ids=["weights-fifo", "weights-dev-null", "weights-directory", "config-fifo"])
def test_path_that_is_not_a_regular_file_refused(small_ckpt, name, kind, message):
    path = small_ckpt / name
    os.remove(path)
    MAKE[kind](path)
    with other_end(path) if kind == "fifo" else nullcontext():
        with pytest.raises(ValueError, match=re.escape(f"{name} {message}")):
            load_model(str(small_ckpt), device="cpu")


@pytest.mark.parametrize("target, message", [
    ("gone.safetensors", r"model.safetensors \(a symlink to .*gone.safetensors\) does not exist"),
    ("model.safetensors", r"model.safetensors is a symlink loop"),
], ids=["dangling", "loop"])
def test_broken_symlink_refused(small_ckpt, target, message):
    os.remove(small_ckpt / "model.safetensors")
    os.symlink(small_ckpt / target, small_ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_model(str(small_ckpt), device="cpu")


def test_symlinks_to_regular_files_load(small_ckpt, tmp_path):
    """A Hugging Face cache directory: every file is a symlink into a blob store beside it."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.move(small_ckpt, blobs)
    snapshot.mkdir()
    for name in os.listdir(blobs):
        os.symlink(blobs / name, snapshot / name)
    os.symlink(snapshot, tmp_path / "link-to-snapshot")
    model = load_model(str(tmp_path / "link-to-snapshot"), device="cpu")
    assert model.config.vocab_size == 20


@pytest.mark.parametrize("which", ["model.safetensors", "config.json", "."])
def test_unreadable_path_named(small_ckpt, which):
    path = small_ckpt / which
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user reads files whatever their mode (root): chmod 000 stops nothing to test")
        message = f"{os.path.normpath(path)} is not readable (permission denied)"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_model(str(small_ckpt), device="cpu")
    finally:
        os.chmod(path, 0o755)


def test_deeply_nested_config_named(small_ckpt):
    """json.load recurses once per level; past Python's recursion limit that is a RecursionError."""
    (small_ckpt / "config.json").write_text('{"d_model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="config.json is not readable JSON: it is nested too deeply"):
        load_model(str(small_ckpt), device="cpu")


def test_long_config_value_cut_in_the_error(small_ckpt):
    """An error names the value, in one short line, however large the value is."""
    raw = json.loads((small_ckpt / "config.json").read_text())
    raw["d_model"] = [[[[[[[[1] * 10_000]]]]]]]
    (small_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=re.escape("d_model must be an integer, got [[[[[[[...]]]]]]] (list)") + "$"):
        load_model(str(small_ckpt), device="cpu")


def test_index_entry_no_shard_holds_refused(small_ckpt):
    from safetensors import safe_open

    os.rename(small_ckpt / "model.safetensors", small_ckpt / "only.safetensors")
    with safe_open(str(small_ckpt / "only.safetensors"), framework="pt") as f:
        weight_map = {name: "only.safetensors" for name in f.keys()}
    weight_map["model.transformer.ghost.weight"] = "only.safetensors"
    (small_ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"index lists \['model.transformer.ghost.weight'\], which no shard holds"):
        load_model(str(small_ckpt), device="cpu")


@pytest.mark.parametrize("other", ["eos_token_id", "pad_token_id", "eot_token_id"])
def test_mask_id_shared_with_another_special_id_refused(other):
    ids = dict(mask_token_id=19, eos_token_id=18, pad_token_id=18, eot_token_id=17)
    ids[other] = 19
    with pytest.raises(ValueError, match=rf"mask_token_id 19 is also {other}; the mask must be a token of its own"):
        ModelConfig(d_model=8, n_heads=2, n_layers=1, mlp_hidden_size=8, vocab_size=20, **ids)


def test_eos_may_double_as_padding_and_end_of_turn():
    """LLaDA pads with EOS; a config whose end of turn is EOS as well stops at the same token."""
    cfg = ModelConfig(d_model=8, n_heads=2, n_layers=1, mlp_hidden_size=8, vocab_size=20,
                      mask_token_id=19, eos_token_id=18, pad_token_id=18, eot_token_id=18)
    assert cfg.pad_token_id == cfg.eos_token_id == cfg.eot_token_id


def test_save_and_load_roundtrip(tmp_path, random_model):
    save_model(random_model, str(tmp_path))
    again = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, 47, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), random_model(ids))


def test_weight_tying(tmp_path):
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=20, weight_tying=True,
                      mask_token_id=19, eos_token_id=18, pad_token_id=18)
    model = LLaDAModel(cfg)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    h = torch.randn(1, 3, 16)
    expected = torch.nn.functional.linear(model.model.transformer.ln_f(h), model.model.transformer.wte.weight)
    assert torch.allclose(model.lm_head(h), expected)


# ---------------------------------------------------------------------------------------------
# Padding: a left-padded row is computed as it would be alone
# ---------------------------------------------------------------------------------------------


def test_padding_mask_matches_unpadded_row(random_model):
    short = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[48, 48, 48, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = random_model(short)
        batched = random_model(padded, attention_mask=mask)
        unmasked = random_model(padded)
    assert torch.allclose(batched[:, 3:], alone, atol=logit_tol(alone), rtol=0)
    # Without the mask (the original's behaviour) the padding changes the result.
    assert not torch.allclose(unmasked[:, 3:], alone, atol=100 * logit_tol(alone), rtol=0)


# ---------------------------------------------------------------------------------------------
# Bounded config values; a layer count that disagrees with the weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 10**30, r"n_layers must be at most 4096, got 1000000000000000000000000000000 \(int\)"),
    ("d_model", 10**30, r"d_model must be at most 131072, got 1000000000000000000000000000000 \(int\)"),
    ("mlp_hidden_size", 10**30, r"mlp_hidden_size must be at most 1048576"),
    ("embedding_size", 10**30, r"embedding_size must be at most 4194304"),
    ("max_sequence_length", 2**62, r"max_sequence_length must be at most 16777216"),
    ("rope_theta", 1e300, r"rope_theta must be at most 1e\+12, got 1e\+300"),
])
def test_huge_config_values_refused_at_once(small_ckpt, field, value, message):
    """n_layers 1e30 used to hang building modules and d_model 1e30 to overflow inside torch: every
    size is bounded, far above any published model."""
    raw = json.loads((small_ckpt / "config.json").read_text())
    raw[field] = value
    (small_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config.json: config: " + message):
        load_model(str(small_ckpt), device="cpu")


def test_layer_count_disagreeing_with_the_weights_is_one_short_line(small_ckpt):
    """3000 layers in config.json over 1 layer of weights: the count and the first few keys, not all 26,991."""
    raw = json.loads((small_ckpt / "config.json").read_text())
    raw["n_layers"] = 3000
    (small_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        load_model(str(small_ckpt), device="cpu")
    message = str(err.value)
    assert len(message) < 600 and "\n" not in message
    assert re.search(r"missing keys \['model.transformer.blocks.1.attn_norm.weight', .*, \.\.\.\] \(26991 in all\); "
                     r"unexpected keys \[\]; config.json says n_layers 3000, the weights hold 1 layer$", message)


# ---------------------------------------------------------------------------------------------
# The logits range, and the causal mode (an autoregressive start for training)
# ---------------------------------------------------------------------------------------------


def test_llada_has_no_shift(random_model):
    """Shift 0: the head of row j is the logits of query j; `logits` is lm_head on the range."""
    ids = torch.randint(0, 47, (2, 9), generator=torch.Generator().manual_seed(0))
    assert random_model.logit_shift == 0
    with torch.no_grad():
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
        assert torch.equal(random_model.logits(x, (2, 5)), random_model.lm_head(x[:, 2:5]))
        assert torch.equal(random_model(ids, logits_range=(3, 9)), random_model(ids)[:, 3:])
    for bad in [(0, 10), (-1, 3), (5, 4), (1.0, 3), "ab", (1, 2, 3)]:
        with pytest.raises(ValueError, match=r"logits_range must be two integers 0 <= a <= b <= 9 for 9 query tokens, got"):
            random_model(ids, logits_range=bad)


def test_causal_logits_ignore_later_tokens(random_model):
    """causal=True: the logits of position i depend on tokens 0..i only; bidirectional ones do not."""
    ids = torch.randint(0, 47, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 47
    with torch.no_grad():
        a, b = random_model(ids, causal=True), random_model(changed, causal=True)
        assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])
        assert not torch.allclose(random_model(ids)[:, :8], random_model(changed)[:, :8])


def test_causal_cached_and_padded_equal_the_plain_causal_forward(random_model):
    """A causal forward of a block against a cache of the earlier positions equals that slice of
    the full causal forward; a left-padded causal row equals the row alone and stays finite."""
    ids = torch.randint(0, 47, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = random_model(ids, causal=True)
        cache = KVCache.for_model(random_model.config, batch=2, capacity=14)
        random_model(ids, positions=torch.arange(14), cache=cache, causal=True)
        block = random_model(ids[:, 5:9], positions=torch.arange(5, 9), cache=cache, causal=True)
        assert torch.allclose(block, full[:, 5:9], atol=logit_tol(full), rtol=0)
        padded = torch.cat([torch.full((1, 3), 48), ids[:1]], dim=1)
        mask = torch.tensor([[0] * 3 + [1] * 14])
        out = random_model(padded, attention_mask=mask, causal=True)
        assert torch.isfinite(out).all()
        assert torch.allclose(out[:, 3:], full[:1], atol=logit_tol(full), rtol=0)
