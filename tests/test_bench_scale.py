"""bench_scale.py: FLOP and byte counts against hand-computed numbers, the forwards against
decode.py's own model calls, the published peaks, and a whole run on a tiny preset."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from tools import bench_scale
from tools.bench_scale import (POLICIES, Forward, ScaleSettings, build_model, forward_bytes, forward_flops,
                         kv_bytes_read, param_count, preset_config, published_peak, representative, roofline,
                         weight_bytes_read)
from decode import DecodeConfig, generate
from model import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny tensors: one CPU thread is fastest, and on a busy shared CPU a second one spin-waits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# A config small enough to count by hand: C 8, H 2, Hkv 1 (D 4), N 2, M 12, V 20.
HAND = ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, n_layers=2, mlp_hidden_size=12, vocab_size=20,
                   max_sequence_length=64, mask_token_id=19, eos_token_id=18, pad_token_id=18)


# ---------------------------------------------------------------------------------------------
# Counting parameters, FLOPs and bytes
# ---------------------------------------------------------------------------------------------


def test_llada_8b_preset_is_the_released_config():
    cfg = preset_config("llada-8b")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size) == (4096, 32, 32, 32, 12288)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.max_sequence_length, cfg.mask_token_id) == (126464, 500000.0, 4096, 126336)
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)  # no memory, works on any machine
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert param_count(cfg) == 8_015_581_184


@pytest.mark.parametrize("name", ["llada-1b", "llada-100m", "tiny"])
def test_presets_count_their_parameters(name):
    cfg = preset_config(name)
    assert param_count(cfg) == sum(p.numel() for p in build_model(cfg, device="meta").parameters())


@given(C=st.sampled_from([8, 16, 32]), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), N=st.integers(1, 3),
       M=st.integers(1, 40), V=st.integers(8, 50), tying=st.booleans(), bias=st.booleans())
def test_param_count_matches_the_module(C, heads, N, M, V, tying, bias):
    cfg = ModelConfig(d_model=C, n_heads=heads[0], n_kv_heads=heads[1], n_layers=N, mlp_hidden_size=M,
                      vocab_size=V, weight_tying=tying, include_bias=bias, mask_token_id=V - 1, eos_token_id=0,
                      pad_token_id=0)
    assert param_count(cfg) == sum(p.numel() for p in build_model(cfg, device="meta").parameters())


def test_flops_by_hand():
    """Q 5 query tokens against a cache of L 10 positions, LM head over a block of 3."""
    fwd = Forward("dual step", 3, 8, 4, 7, cached=True)
    # Per layer: q and output projections 2·5·8·8 each, k and v 2·5·8·4 each   -> 1280 + 640 = 1920
    #            scores and values 2·(2·5·10·(2·4))                           -> 1600
    #            SwiGLU 3·(2·5·8·12)                                          -> 2880
    # Two layers: 2·6400 = 12800; LM head over 3 tokens: 2·3·8·20 = 960.
    assert forward_flops(HAND, fwd, L=10) == 13760
    # Without a cache the queries attend only to themselves: scores and values 2·(2·5·5·8) = 800.
    alone = Forward("full", 3, 8, 4, 7, cached=False)
    assert forward_flops(HAND, alone, L=10) == 2 * (1920 + 800 + 2880) + 960
    assert forward_flops(HAND, fwd, L=10, batch=3) == 3 * 13760


def test_bytes_by_hand():
    fwd = Forward("dual step", 3, 8, 4, 7, cached=True)
    # Parameters: embedding 20·8 = 160; per layer q 64, k 32, v 32, out 64, SwiGLU 3·96, norms 16
    # = 496, two layers 992; final norm 8; LM head 160. Total 1320.
    assert param_count(HAND) == 1320
    # A forward reads every weight but the embedding table, of which only its 5 rows: 1320 - 160 + 40.
    assert weight_bytes_read(HAND, fwd, elem=4) == 1200 * 4
    # Keys and values: 2 (k, v) · 2 layers · 1 kv head · head dim 4 · 10 positions, 2 bytes in bf16.
    assert kv_bytes_read(HAND, fwd, L=10, elem=2) == 160 * 2
    assert forward_bytes(HAND, fwd, L=10, elem=2) == 1200 * 2 + 160 * 2


def test_feature_caching_forward_by_hand():
    """A dLLM-Cache V-verify forward over a canvas of 10: layer 0 recomputes all 10 tokens, layer 1
    recomputes 2 and projects 6 response tokens to values; the LM head covers a block of 3."""
    fwd = Forward("V-verify step", 0, 10, 4, 7, cached=True, recompute=2, verify=6, features=True)
    # Layer 0 (10 tokens over 10 keys): projections 2·10·8·(8+4+4+8) = 3840, attention
    # 4·10·10·8 = 3200, SwiGLU 6·10·8·12 = 5760 -> 12800. Layer 1 (2 tokens): 768 + 640 + 1152,
    # plus values of 6 tokens 2·6·8·4 = 384 -> 2944. LM head: 960.
    assert forward_flops(HAND, fwd, L=10) == 12800 + 2944 + 960
    # Bytes at 1 byte each: weights 1320 - 160 + 10 embedding rows of 8, and layer 1's v_proj (8·4)
    # once more; K/V of 10 positions in both layers (2·2·4·10) and 6 cached values (6·4); cached
    # attention and MLP outputs of all 10 positions in both layers (2·2·10·8).
    assert forward_bytes(HAND, fwd, L=10, elem=1) == (1240 + 32) + (160 + 24) + 320


def test_weight_tied_head_reads_the_whole_table():
    cfg = ModelConfig(**{**HAND.__dict__, "weight_tying": True})
    fwd = Forward("full", 0, 5, 0, 5, cached=False)
    assert weight_bytes_read(cfg, fwd, elem=1) == param_count(cfg) == 1320 - 160


@pytest.mark.parametrize("policy", list(POLICIES))
def test_flops_match_torch_counter(policy):
    """torch's FlopCounterMode counts the matrix multiplies of the real forwards (not the SDPA
    kernel on CPU): they equal our count without the attention term, for every kind."""
    cfg = preset_config("tiny")
    model = build_model(cfg, device="cpu")
    P, G, K = 12, 16, 8
    L = P + G
    x = torch.randint(0, cfg.mask_token_id, (1, L))
    state, seen = {}, set()
    for fwd in POLICIES[policy].schedule(P, G, K):
        if fwd.kind in seen:
            continue
        seen.add(fwd.kind)
        call = POLICIES[policy].runner(model, x, fwd, P, K, state)  # the call the benchmark times
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        attention = 4 * (fwd.q + (cfg.n_layers - 1) * fwd.rows) * fwd.keys(L) * cfg.n_heads * cfg.head_dim * fwd.branches
        assert counter.get_total_flops() == forward_flops(cfg, fwd, L) - attention, fwd.kind


# ---------------------------------------------------------------------------------------------
# The forwards are decode.py's forwards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["none", "prefix", "dual"])
@pytest.mark.parametrize("P, G, K", [(5, 16, 4), (3, 8, 8)])
def test_schedule_is_what_generate_calls(random_model, policy, P, G, K):
    """Record every model call of decode.generate at one token per step: the query windows,
    logits ranges and cache use are exactly the benchmark's forwards, in order."""
    calls = []

    def hook(module, args, kwargs):
        pos = kwargs["positions"].reshape(-1)  # (Q,) today; a (B, Q) form holds the same at B = 1
        calls.append((int(pos[0]), int(pos[-1]) + 1, tuple(kwargs["logits_range"]), kwargs["cache"] is not None))

    handle = random_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = DecodeConfig.for_model(random_model.config, gen_length=G, block_length=K, steps=G, cache=policy)
        out = generate(random_model, torch.randint(0, 40, (1, P), generator=torch.Generator().manual_seed(0)), cfg)
    finally:
        handle.remove()
    forwards = POLICIES[policy].schedule(P, G, K)
    assert calls == [(f.q0, f.q1, (f.c0 - f.q0, f.e - f.q0), f.cached) for f in forwards]
    assert out.nfe == len(forwards) == G
    assert out.query_tokens == sum(f.q for f in forwards)


@pytest.mark.skipif("dllm" not in POLICIES, reason="decode.py has no dLLM-Cache")
def test_dllm_schedule_is_what_generate_recomputes(random_model):
    """dLLM-Cache's forwards: one per step, and per layer the very rows decode.py recomputes
    (it counts them), across a prompt refresh (t = 50), response refreshes and V-verify steps."""
    P, G, K = 5, 64, 8
    cfg = DecodeConfig.for_model(random_model.config, gen_length=G, block_length=K, steps=G, cache="dllm")
    out = generate(random_model, torch.randint(0, 40, (1, P), generator=torch.Generator().manual_seed(0)), cfg)
    forwards = POLICIES["dllm"].schedule(P, G, K)
    assert out.nfe == len(forwards) == G
    assert {f.kind for f in forwards} == {"full refresh", "prompt refresh", "response refresh", "V-verify step"}
    rows = out.extras["recomputed_rows"]
    N = random_model.config.n_layers
    assert rows["prompt"] + rows["response"] == sum(f.q + (N - 1) * f.rows for f in forwards)


def test_representative_has_the_mean_cost():
    """The prefix step's Q shrinks block by block; the timed forward has the mean Q, and since
    the cost is affine in Q its FLOPs equal the mean FLOPs over the request."""
    cfg = preset_config("tiny")
    P, G, K = 16, 64, 8
    steps = [f for f in POLICIES["prefix"].schedule(P, G, K) if f.kind == "prefix step"]
    rep = representative(steps)
    assert rep.q == (G + K) // 2 and rep.q1 == P + G and rep.logits == K and rep.cached
    mean = sum(forward_flops(cfg, f, P + G) for f in steps) / len(steps)
    assert forward_flops(cfg, rep, P + G) == mean
    dual = [f for f in POLICIES["dual"].schedule(P, G, K) if f.kind == "dual step"]
    assert representative(dual) in dual  # constant shape: one of the real forwards


# ---------------------------------------------------------------------------------------------
# The hardware limit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"),
])
def test_published_peaks_by_device_name(name, label):
    hw = published_peak(name, torch.bfloat16)
    assert hw is not None and label in hw.source


def test_published_peak_figures():
    h100 = published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert (h100.flops, h100.bandwidth) == pytest.approx((989.4e12, 3.35e12))
    assert published_peak("NVIDIA H100 80GB HBM3", torch.float32).flops == pytest.approx(66.9e12)
    assert published_peak("NVIDIA A100-SXM4", torch.bfloat16, memory_gib=79.2).bandwidth == pytest.approx(2.039e12)
    assert published_peak("Some Future GPU", torch.bfloat16) is None


def test_llada_8b_dual_step_bound_on_h100():
    """The bound the README quotes: a DualCache step of LLaDA-8B in bf16 (32 query tokens against
    512 + 256 cached positions) reads 15.4 GB and is bounded by bandwidth at 4.60 ms on an H100 SXM."""
    cfg = preset_config("llada-8b")
    L = 512 + 256
    step = Forward("dual step", 512, 544, 512, 544, cached=True)
    nbytes = forward_bytes(cfg, step, L, elem=2)
    # Every weight but the embedding table (8,015,581,184 - 126464·4096) plus 32 of its rows, and
    # keys/values 2·32 layers·4096·768 positions, all at 2 bytes.
    assert nbytes == (8_015_581_184 - 126464 * 4096 + 32 * 4096) * 2 + 2 * 32 * 4096 * 768 * 2
    bound, by = roofline(published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16), forward_flops(cfg, step, L), nbytes)
    assert by == "memory" and 4.59e-3 < bound < 4.61e-3
    # The full refresh of the same request (768 tokens) is bounded by compute instead.
    refresh = Forward("refresh", 0, L, 512, 544, cached=True)
    assert roofline(published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16), forward_flops(cfg, refresh, L),
                    forward_bytes(cfg, refresh, L, elem=2))[1] == "compute"


def test_measure_cpu_gives_positive_rates():
    hw = bench_scale.measure_cpu(torch.float32, n=64, copy_mib=1, repeats=1)
    assert hw.flops > 0 and hw.bandwidth > 0 and "measured" in hw.source


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

QUICK = ["--preset", "tiny", "--prompt-length", "16", "--lengths", "16", "32", "--block-length", "8", "--device", "cpu",
         "--time-budget", "0.005", "--max-repeats", "2", "--peak-tflops", "1", "--peak-gbs", "10"]


def test_runs_end_to_end_on_a_tiny_preset(tmp_path, capsys):
    out = tmp_path / "scale.json"
    result = bench_scale.main(QUICK + ["--json", str(out)])
    text = capsys.readouterr().out
    assert "### G = 16" in text and "### G = 32" in text and "extrapolated" in text
    # Per G: one row per kind of each policy (none: full; prefix and dual: refresh + step; ...).
    kinds = {G: {(p, f.kind) for p, pol in POLICIES.items()
                 for f in pol.schedule(16, G, pol.block_length or 8)} for G in (16, 32)}
    assert len(result["kinds"]) == sum(len(k) for k in kinds.values())
    assert len(result["requests"]) == 2 * len(POLICIES)
    assert all(k["seconds"] > 0 and k["wall_seconds"] > 0 and k["bound_s"] > 0 for k in result["kinds"])
    assert "CPU ms" in text and "wall ms" in text  # one CPU thread: timed by this process's CPU time
    for req in result["requests"]:
        policy = POLICIES[req["policy"]]
        forwards = policy.schedule(16, req["gen_length"], policy.block_length or 8)
        assert req["forwards"] == len(forwards)
        if req["policy"] != "blockbatch":
            assert req["forwards"] == req["gen_length"]  # one token per step
        kinds = [k for k in result["kinds"] if k["policy"] == req["policy"] and k["gen_length"] == req["gen_length"]]
        assert req["seconds"] == pytest.approx(sum(k["count"] * k["seconds"] for k in kinds))
    assert json.loads(out.read_text())["params"] == param_count(preset_config("tiny"))


def test_bench_py_scale_mode_echoes_its_own_command(capsys):
    """bench.py --scale hands its other flags to bench_scale.main with its own name."""
    bench_scale.main(QUICK + ["--lengths", "8", "--policies", "dual"], prog="bench.py --scale")
    assert capsys.readouterr().out.startswith("`python bench.py --scale --preset tiny")


def test_shape_flags_override_the_preset(capsys):
    result = bench_scale.main(QUICK + ["--d-model", "32", "--layers", "1", "--heads", "2", "--mlp", "40",
                                       "--vocab", "100", "--lengths", "8", "--policies", "dual"])
    cfg = preset_config("tiny", d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=40, vocab_size=100)
    assert cfg.n_kv_heads == 2 and cfg.mask_token_id == 99  # MHA for a new head count; ids in range
    assert result["params"] == param_count(cfg)


def test_dry_run_of_llada_8b_allocates_nothing(capsys):
    """The 8B preset on the meta device: counts and H100 bounds on any machine, in a blink."""
    result = bench_scale.main(["--preset", "llada-8b", "--dry-run", "--hardware", "H100 SXM", "--lengths", "256"])
    assert result["params"] == 8_015_581_184
    dual = next(k for k in result["kinds"] if k["kind"] == "dual step")
    assert dual["bound_by"] == "memory" and dual["seconds"] is None
    assert "Dry run" in capsys.readouterr().out


def test_compile_failure_is_reported_cleanly(monkeypatch, capsys):
    """Without a working compiler torch.compile raises; the run goes on and says why."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(bench_scale, "_COMPILED", {})
    result = bench_scale.main(QUICK + ["--lengths", "8", "--compile"])
    steps = [k for k in result["kinds"] if k["kind"] in ("prefix step", "dual step")]
    assert len(steps) == 2 and all(k["compile_error"] == "RuntimeError: no C++ compiler found" for k in steps)
    assert all(k["compile_error"] is None for k in result["kinds"] if k not in steps)
    assert "torch.compile failed" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="gpt-5"), "unknown preset"),
    (dict(gen_lengths=[100]), "not a positive multiple"),
    (dict(policies=["quantum"]), "unknown policies"),
    (dict(batch=0), "batch must be positive"),
    (dict(hardware="TPU"), "unknown hardware"),
])
def test_settings_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleSettings(**kwargs)


def test_a_model_larger_than_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match="use a smaller preset or dtype, or --dry-run"):
        bench_scale.check_fits(preset_config("llada-8b", n_layers=4000), elem=4, device=torch.device("cpu"))


@pytest.mark.skipif("blockbatch" not in POLICIES, reason="no blockbatch.py")
def test_blockbatch_is_one_request_per_call(capsys):
    with pytest.raises(ValueError, match="BlockBatch decodes one request per call"):
        ScaleSettings(policies=["blockbatch"], batch=2)
    # Without --policies, a batched run leaves BlockBatch out instead of failing.
    result = bench_scale.main(["--preset", "llada-8b", "--dry-run", "--hardware", "H100 SXM", "--lengths", "256",
                               "--batch", "8"])
    assert "blockbatch" not in {r["policy"] for r in result["requests"]}


def test_request_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        bench_scale.run(ScaleSettings(preset="tiny", prompt_length=4000, gen_lengths=[256], device="cpu",
                                      peak_tflops=1, peak_gbs=1))
