"""roofline.py and bench_scale.py: FLOP and byte counts against hand-computed numbers and torch's
FLOP counter, the recorded forwards against what generate ran, the published peaks, the flags
that are refused, and a whole run on a tiny preset."""

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import blockbatch
import decode
from model import DiffusionLM, ModelConfig, init_weights
from tools import bench_scale
from tools.bench_scale import POLICIES, NeverEOS, ScaleSettings, build_model, recorder_config, replay, representative
from tools.roofline import (Forward, Hardware, bias_size, forward_bytes, forward_flops, kv_bytes_read, param_count,
                            preset_config, published_peak, roofline, weight_bytes_read)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny tensors: one CPU thread is fastest, and on a busy shared CPU a second one spin-waits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def recorder():
    """The benchmark's own recorder: one layer, width 8."""
    return build_model(recorder_config(4096))


# A config small enough to count by hand: C 8, H 2, Hkv 1 (D 4), N 2, M 12, V 20.
HAND = ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, n_layers=2, mlp_hidden_size=12, vocab_size=20,
                   max_sequence_length=64, mask_token_id=19, eos_token_id=18, pad_token_id=18)


# The same shape as a Dream model: biases on q, k and v (8 + 4 + 4 per layer) and the shifted head.
HAND_DREAM = ModelConfig(**{**HAND.__dict__, "family": "dream", "include_qkv_bias": None})


@pytest.fixture(scope="module")
def dream_recorder():
    """The recorder for a Dream-shaped target: the same, with Dream's shifted head."""
    return build_model(recorder_config(4096, "dream"))


@pytest.fixture(scope="module")
def dream_model():
    """A sharp random Dream model (q/k/v biases, logit shift 1) of the random_model's shape."""
    cfg = ModelConfig(family="dream", d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=50, rope_theta=10000.0, max_sequence_length=256, mask_token_id=49,
                      eos_token_id=48, pad_token_id=48, bos_token_id=47)
    model = init_weights(DiffusionLM(cfg), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def prompt_of(P, B=1, high=40):
    return torch.randint(0, high, (B, P), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Counting parameters, FLOPs and bytes (roofline.py)
# ---------------------------------------------------------------------------------------------


def test_llada_8b_preset_is_the_released_config():
    cfg = preset_config("llada-8b")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size) == (4096, 32, 32, 32, 12288)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.max_sequence_length, cfg.mask_token_id) == (126464, 500000.0, 4096, 126336)
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)  # no memory, works on any machine
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert param_count(cfg) == 8_015_581_184


def test_dream_7b_preset_is_the_released_config():
    """Dream-v0-7B: 28 layers, hidden 3584, 28 query / 4 KV heads, MLP 18944, vocabulary 152064,
    RoPE base 1e6, untied head, q/k/v biases, Dream's special ids."""
    cfg = preset_config("dream-7b")
    assert (cfg.family, cfg.logit_shift, cfg.include_qkv_bias, cfg.weight_tying) == ("dream", 1, True, False)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size) == (3584, 28, 4, 28, 18944)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (152064, 1e6, 1e-6)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (151666, 151643, 151643, 151665)
    # By hand: embedding and head 2·152064·3584; per layer q and o 2·3584², k and v 2·3584·512,
    # SwiGLU 3·3584·18944, two norms 2·3584, biases 3584 + 2·512; the final norm 3584.
    layer = 2 * 3584 ** 2 + 2 * 3584 * 512 + 3 * 3584 * 18944 + 2 * 3584 + 3584 + 2 * 512
    assert 2 * 152064 * 3584 + 28 * layer + 3584 == 7_615_616_512
    assert param_count(cfg) == 7_615_616_512
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512


def test_a_shrunk_dream_preset_keeps_its_ids_in_the_vocabulary():
    cfg = preset_config("dream-7b", vocab_size=1000, n_layers=1)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (999, 998, 998, 997)
    assert preset_config("llada-8b", vocab_size=1000).bos_token_id is None  # LLaDA's preset has no BOS


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
    """Q 5 query tokens against a cache of 10 positions, LM head over a block of 3."""
    fwd = Forward("dual step", rows=1, q=5, keys=10, logits=3, cached=True)
    # Per layer: q and output projections 2·5·8·8 each, k and v 2·5·8·4 each   -> 1280 + 640 = 1920
    #            scores and values 2·(2·5·10·(2·4))                           -> 1600
    #            SwiGLU 3·(2·5·8·12)                                          -> 2880
    # Two layers: 2·6400 = 12800; LM head over 3 tokens: 2·3·8·20 = 960.
    assert forward_flops(HAND, fwd) == 13760
    # Without a cache the queries attend only to themselves: scores and values 2·(2·5·5·8) = 800.
    alone = Forward("full", rows=1, q=5, keys=5, logits=3, cached=False)
    assert forward_flops(HAND, alone) == 2 * (1920 + 800 + 2880) + 960
    assert forward_flops(HAND, Forward("dual step", 3, 5, 10, 3, True)) == 3 * 13760  # three rows


def test_dream_flops_and_bytes_by_hand():
    """HAND with Dream's q/k/v biases: 16 more parameters per layer, one add per bias and token."""
    assert bias_size(HAND_DREAM) == 8 + 4 + 4 and bias_size(HAND) == 0
    assert param_count(HAND_DREAM) == 1320 + 2 * 16
    fwd = Forward("dual step", rows=1, q=5, keys=10, logits=3, cached=True)
    # test_flops_by_hand's 13760, plus 5 tokens · 16 bias adds in each of the 2 layers.
    assert forward_flops(HAND_DREAM, fwd) == 13760 + 2 * 5 * 16
    assert weight_bytes_read(HAND_DREAM, fwd, elem=4) == (1200 + 2 * 16) * 4
    assert kv_bytes_read(HAND_DREAM, fwd, elem=2) == 160 * 2  # biases change no cache
    # dLLM-Cache's V-verify step: layer 0 recomputes 10 tokens, layer 1 2 tokens and projects 6 to
    # values (each with v_proj's 4 biases); v_proj is read twice, its bias too.
    verify = Forward("V-verify step", 1, q=10, keys=10, logits=3, cached=True, recompute=(10, 2), verify=(0, 6))
    assert forward_flops(HAND_DREAM, verify) == 12800 + 2944 + 960 + 10 * 16 + 2 * 16 + 6 * 4
    assert forward_bytes(HAND_DREAM, verify, elem=1) == (1240 + 32 + 2 * 16 + 4) + (160 + 24) + 320


def test_bytes_by_hand():
    fwd = Forward("dual step", rows=1, q=5, keys=10, logits=3, cached=True)
    # Parameters: embedding 20·8 = 160; per layer q 64, k 32, v 32, out 64, SwiGLU 3·96, norms 16
    # = 496, two layers 992; final norm 8; LM head 160. Total 1320.
    assert param_count(HAND) == 1320
    # A forward reads every weight but the embedding table, of which only its 5 rows: 1320 - 160 + 40.
    assert weight_bytes_read(HAND, fwd, elem=4) == 1200 * 4
    # Keys and values: 2 (k, v) · 2 layers · 1 kv head · head dim 4 · 10 positions, 2 bytes in bf16.
    assert kv_bytes_read(HAND, fwd, elem=2) == 160 * 2
    assert forward_bytes(HAND, fwd, elem=2) == 1200 * 2 + 160 * 2


def test_feature_caching_forward_by_hand():
    """A dLLM-Cache forward over a canvas of 10 whose layer 0 recomputes all 10 tokens (the
    original's quirk) and whose layer 1 recomputes 2 and projects 6 response tokens to values."""
    fwd = Forward("V-verify step", 1, q=10, keys=10, logits=3, cached=True, recompute=(10, 2), verify=(0, 6))
    # Layer 0 (10 tokens over 10 keys): projections 2·10·8·(8+4+4+8) = 3840, attention
    # 4·10·10·8 = 3200, SwiGLU 6·10·8·12 = 5760 -> 12800. Layer 1 (2 tokens): 768 + 640 + 1152,
    # plus values of 6 tokens 2·6·8·4 = 384 -> 2944. LM head: 960.
    assert forward_flops(HAND, fwd) == 12800 + 2944 + 960
    # Bytes at 1 byte each: weights 1320 - 160 + 10 embedding rows of 8, and layer 1's v_proj (8·4)
    # once more; K/V of 10 positions in both layers (2·2·4·10) and 6 cached values (6·4); cached
    # attention and MLP outputs of all 10 positions in both layers (2·2·10·8).
    assert forward_bytes(HAND, fwd, elem=1) == (1240 + 32) + (160 + 24) + 320


def test_a_dllm_layer_that_recomputes_nothing_reads_no_weights():
    """rho = 0 between refreshes: no layer computes anything; the forward reads the embedding rows,
    the final norm, the LM head and every layer's cached features, and no K/V."""
    fwd = Forward("reuse step", 1, q=10, keys=10, logits=3, cached=True, recompute=(0, 0), verify=(0, 0))
    assert forward_flops(HAND, fwd) == 960  # the LM head alone
    assert forward_bytes(HAND, fwd, elem=1) == (80 + 8 + 160) + 0 + 320


def test_weight_tied_head_reads_the_whole_table():
    cfg = ModelConfig(**{**HAND.__dict__, "weight_tying": True})
    fwd = Forward("full", 1, q=5, keys=5, logits=5, cached=False)
    assert weight_bytes_read(cfg, fwd, elem=1) == param_count(cfg) == 1320 - 160


@pytest.mark.parametrize("policy", list(POLICIES))
def test_flops_match_torch_counter(recorder, policy):
    """torch's FlopCounterMode counts the matrix multiplies of the replayed forwards (not the SDPA
    kernel on CPU): they equal our count without the attention term, for every kind."""
    cfg = preset_config("tiny")
    model = build_model(cfg)
    P, G, K = 12, 16, 8
    recorded = POLICIES[policy].record(recorder, prompt_of(P, high=14), G, POLICIES[policy].block_length or K)
    canvas, caches, kinds = torch.randint(0, cfg.mask_token_id, (8, P + G)), {}, {}
    for rec in recorded:
        kinds.setdefault(rec.forward.kind, rec)
    for kind, rec in kinds.items():
        fwd, call = rec.forward, replay(model, rec, canvas, caches)  # the call the benchmark times
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call(model)
        queries = fwd.layer(0)[0] + (cfg.n_layers - 1) * fwd.layer(1)[0]
        attention = 4 * fwd.rows * queries * fwd.keys * cfg.n_heads * cfg.head_dim
        assert counter.get_total_flops() == forward_flops(cfg, fwd) - attention, kind


@pytest.mark.parametrize("policy", list(POLICIES))
def test_dream_flops_match_torch_counter(dream_recorder, policy):
    """The same on a Dream-shaped model, recorded by the Dream recorder: torch counts a biased
    projection's matmul (addmm) as 2·m·n·k, so ours equals it less attention and the bias adds."""
    cfg = preset_config("tiny", family="dream", bos_token_id=509)
    model = build_model(cfg)
    P, G, K = 12, 16, 8
    recorded = POLICIES[policy].record(dream_recorder, prompt_of(P, high=14), G, POLICIES[policy].block_length or K)
    canvas, caches, kinds = torch.randint(0, cfg.mask_token_id - 3, (8, P + G)), {}, {}
    for rec in recorded:
        kinds.setdefault(rec.forward.kind, rec)
    for kind, rec in kinds.items():
        fwd, call = rec.forward, replay(model, rec, canvas, caches)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call(model)
        queries = fwd.layer(0)[0] + (cfg.n_layers - 1) * fwd.layer(1)[0]
        verified = fwd.layer(0)[1] + (cfg.n_layers - 1) * fwd.layer(1)[1]
        attention = 4 * fwd.rows * queries * fwd.keys * cfg.n_heads * cfg.head_dim
        biases = fwd.rows * (queries * bias_size(cfg) + verified * cfg.n_kv_heads * cfg.head_dim)
        assert counter.get_total_flops() == forward_flops(cfg, fwd) - attention - biases, kind


# ---------------------------------------------------------------------------------------------
# The recorded forwards are the ones generate ran (bench_scale.py)
# ---------------------------------------------------------------------------------------------


class Trace:
    """What the model really computed, forward by forward, read by module hooks: the embedding's
    input (rows, Q), per layer the tokens through the MLP (recomputed) and through v_proj
    (recomputed + only projected to values), and the LM head's input (logits per row)."""

    def __init__(self, model):
        self.calls, self.handles = [], []
        t = model.model.transformer
        self.hook(t.wte, lambda x: self.calls.append(dict(rows=x.shape[0], q=x.shape[1], mlp=[], v=[0] * len(t.blocks))))
        for i, block in enumerate(t.blocks):
            self.hook(block.ff_proj, lambda x: self.calls[-1]["mlp"].append(x.shape[1]))
            self.hook(block.v_proj, lambda x, i=i: self.calls[-1]["v"].__setitem__(i, self.calls[-1]["v"][i] + x.shape[1]))
        self.hook(t.ff_out, lambda x: self.calls[-1].__setitem__("logits", x.shape[1]))

    def hook(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: fn(args[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def expected(fwd: Forward, n_layers: int) -> dict:
    layers = [fwd.layer(i) for i in range(n_layers)]
    return dict(rows=fwd.rows, q=fwd.q, mlp=[r for r, _ in layers if r], v=[r + v for r, v in layers],
                logits=fwd.logits)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_recorded_forwards_are_what_generate_ran(random_model, policy):
    """Every model call of the recorded run, as the hooks saw it, equals the recorded forward list,
    in order: rows, query tokens, per-layer work (dLLM-Cache's refresh plan included), logits.
    The dLLM-Cache run crosses a prompt refresh (step 51), response refreshes and V-verify steps;
    this sharp random model's BlockBatch run commits several tokens per forward, merges and syncs."""
    P, G = 5, 64
    K = POLICIES[policy].block_length or 16
    with Trace(random_model) as trace:
        recorded = POLICIES[policy].record(random_model, prompt_of(P), G, K)
    assert trace.calls == [expected(r.forward, random_model.config.n_layers) for r in recorded]
    if policy == "dllm":
        assert {r.forward.kind for r in recorded} == {"full refresh", "prompt refresh", "response refresh",
                                                      "V-verify step"}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_recorded_dream_forwards_are_what_generate_ran(dream_model, policy):
    """The same on a shifted-head (Dream) model: every model call, as the hooks saw it, is the
    recorded forward (a cached window one row longer than its block's logits)."""
    P, G = 5, 64
    K = POLICIES[policy].block_length or 16
    with Trace(dream_model) as trace:
        recorded = POLICIES[policy].record(dream_model, prompt_of(P), G, K)
    assert trace.calls == [expected(r.forward, dream_model.config.n_layers) for r in recorded]


def test_a_dream_dual_step_window_holds_the_row_before_its_block(dream_recorder):
    """A shifted head predicts a block's first token from the row before it, so each cached step
    runs that row too: K + 1 queries from the block's start - 1, logits for the K block tokens."""
    P, G, K = 5, 16, 4
    recorded = POLICIES["dual"].record(dream_recorder, prompt_of(P, high=14), G, K)
    steps = [r for r in recorded if r.forward.kind == "dual step"]
    assert len(steps) == G - G // K and all((r.forward.q, r.forward.logits) == (K + 1, K) for r in steps)
    assert steps[K - 1].window.positions.tolist() == list(range(P + K - 1, P + 2 * K))  # block 1's first cached step
    assert steps[K - 1].window.logits_range == (1, K + 1)
    prefix = [r for r in POLICIES["prefix"].record(dream_recorder, prompt_of(P, high=14), G, K)
              if r.forward.kind == "prefix step"]
    assert prefix[0].window.positions.tolist() == list(range(P - 1, P + G))  # the prompt's last row, then all after
    rep = representative(prefix, shift=1)  # the mean-Q window is cut inside the canvas: logits never at row 0
    assert rep.window.logits_range[0] >= 1 and rep.forward.q == round(sum(r.forward.q for r in prefix) / len(prefix))


@pytest.mark.parametrize("policy", ["none", "prefix", "dual"])
def test_recorded_windows_are_the_model_calls(random_model, policy):
    """The windows themselves: positions, logits range and cache use of every model call."""
    calls = []

    def hook(module, args, kwargs):
        pos = kwargs["positions"]
        calls.append((pos.tolist(), tuple(kwargs["logits_range"]), kwargs["cache"] is not None))

    handle = random_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        recorded = POLICIES[policy].record(random_model, prompt_of(5), 16, 4)
    finally:
        handle.remove()
    assert calls == [(r.window.positions.tolist(), r.window.logits_range, r.forward.cached) for r in recorded]
    assert len(recorded) == 16  # one token per step


@pytest.mark.parametrize("policy", ["none", "prefix", "dual", "dllm"])
def test_top_k_windows_do_not_depend_on_the_model(recorder, random_model, policy):
    """Under LLaDA's top-k schedule the recorder (1 layer, width 8, random) and a sharper 2-layer
    model with another vocabulary make the very same forwards: the schedule is the settings'."""
    P, G = 7, 64
    K = POLICIES[policy].block_length or 16
    runs = [POLICIES[policy].record(m, prompt_of(P, B=2, high=14), G, K) for m in (recorder, random_model)]
    assert [r.forward for r in runs[0]] == [r.forward for r in runs[1]]


@pytest.mark.parametrize("policy", ["none", "prefix", "dual", "dllm"])
def test_dream_top_k_windows_do_not_depend_on_the_model(dream_recorder, dream_model, policy):
    """The same for the Dream recorder and a sharper 2-layer Dream model: its windows are exact too."""
    P, G = 7, 64
    K = POLICIES[policy].block_length or 16
    runs = [POLICIES[policy].record(m, prompt_of(P, B=2, high=14), G, K) for m in (dream_recorder, dream_model)]
    assert [r.forward for r in runs[0]] == [r.forward for r in runs[1]]


def test_the_random_recorder_runs_blockbatch_one_token_per_forward(recorder, random_model):
    """BlockBatch's schedule follows its commits: the recorder's confidences never reach 0.9, so each
    forward commits one token per branch (G forwards: 1 init, block steps, refreshes every 32 tokens)
    with no merge or sync; a model sure of every proposal commits many per forward and records far fewer."""
    G = 64
    recorded = POLICIES["blockbatch"].record(recorder, prompt_of(8, high=14), G, 0)
    kinds = [r.forward.kind for r in recorded]
    assert len(recorded) == G and kinds.count("batched refresh") == G // 32 - 1 and kinds[0] == "init forward"
    config = blockbatch.BlockBatchConfig.for_model(recorder.config, gen_length=G, block_sizes=(4, 8, 16, 32, 64))
    out = blockbatch.generate(NeverEOS(recorder), prompt_of(8, high=14), config)  # the run the recording made
    assert out.extras["merges"] == out.extras["syncs"] == 0 and out.extras["exit"] == "natural"
    sure = copy.deepcopy(recorder)  # the same model with its logits scaled up: every proposal is certain
    with torch.no_grad():
        sure.model.transformer.ff_out.weight.mul_(1e3)
    assert len(POLICIES["blockbatch"].record(sure, prompt_of(8, high=14), G, 0)) < G // 4


def test_representative_has_the_mean_cost(recorder):
    """The prefix step's Q shrinks block by block; the timed forward has the mean Q, and since
    the cost is affine in Q its FLOPs equal the mean FLOPs over the request."""
    cfg = preset_config("tiny")
    P, G, K = 16, 64, 8
    recorded = POLICIES["prefix"].record(recorder, prompt_of(P, high=14), G, K)
    steps = [r for r in recorded if r.forward.kind == "prefix step"]
    rep = representative(steps)
    assert rep.forward.q == (G + K) // 2 == rep.window.positions.shape[-1]
    assert rep.window.positions[-1] == P + G - 1 and rep.forward.logits == K and rep.forward.cached
    mean = sum(forward_flops(cfg, r.forward) for r in steps) / len(steps)
    assert forward_flops(cfg, rep.forward) == mean
    dual = [r for r in POLICIES["dual"].record(recorder, prompt_of(P, high=14), G, K)
            if r.forward.kind == "dual step"]
    assert any(representative(dual) is r for r in dual)  # constant shape: one of the real forwards


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
    """A DualCache step of LLaDA-8B in bf16 (32 query tokens against 512 + 256 cached positions)
    reads 15.4 GB and is bounded by bandwidth at 4.60 ms on an H100 SXM."""
    cfg = preset_config("llada-8b")
    step = Forward("dual step", 1, q=32, keys=768, logits=32, cached=True)
    nbytes = forward_bytes(cfg, step, elem=2)
    # Every weight but the embedding table (8,015,581,184 - 126464·4096) plus 32 of its rows, and
    # keys/values 2·32 layers·4096·768 positions, all at 2 bytes.
    assert nbytes == (8_015_581_184 - 126464 * 4096 + 32 * 4096) * 2 + 2 * 32 * 4096 * 768 * 2
    h100 = published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)
    bound, by = roofline(h100, forward_flops(cfg, step), nbytes)
    assert by == "memory" and 4.59e-3 < bound < 4.61e-3
    # The full refresh of the same request (768 tokens) is bounded by compute instead.
    refresh = Forward("refresh", 1, q=768, keys=768, logits=32, cached=True)
    assert roofline(h100, forward_flops(cfg, refresh), forward_bytes(cfg, refresh, elem=2))[1] == "compute"
    assert h100.ridge == pytest.approx(989.4 / 3.35)


def test_dream_7b_dual_step_bound_on_h100():
    """A DualCache step of Dream-7B in bf16 (the block's 32 tokens and the row before it, against
    512 + 256 cached positions) reads 14.2 GB, bounded by bandwidth at 4.23 ms on an H100 SXM:
    fewer weights than LLaDA-8B and 8× fewer K/V bytes (4 KV heads, not 32)."""
    cfg = preset_config("dream-7b")
    step = Forward("dual step", 1, q=33, keys=768, logits=32, cached=True)
    nbytes = forward_bytes(cfg, step, elem=2)
    # Every weight but the embedding table plus 33 of its rows; K/V 2·28 layers·512·768 positions.
    assert nbytes == (7_615_616_512 - 152064 * 3584 + 33 * 3584) * 2 + 2 * 28 * 512 * 768 * 2
    layer = 2 * 33 * 3584 * (2 * 3584 + 2 * 512) + 4 * 33 * 768 * 3584 + 6 * 33 * 3584 * 18944 + 33 * (3584 + 2 * 512)
    assert forward_flops(cfg, step) == 28 * layer + 2 * 32 * 3584 * 152064
    h100 = published_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)
    bound, by = roofline(h100, forward_flops(cfg, step), nbytes)
    assert by == "memory" and bound == pytest.approx(nbytes / 3.35e12) and 4.23e-3 < bound < 4.24e-3


def test_measure_cpu_gives_positive_rates():
    hw = bench_scale.measure_cpu(torch.float32, n=64, copy_mib=1, repeats=1)
    assert hw.flops > 0 and hw.bandwidth > 0 and "measured" in hw.source


# ---------------------------------------------------------------------------------------------
# Refused before anything runs
# ---------------------------------------------------------------------------------------------

QUICK = ["--preset", "tiny", "--prompt-length", "16", "--lengths", "16", "32", "--block-length", "8", "--device", "cpu",
         "--time-budget", "0.005", "--max-repeats", "2"]
PEAKS = ["--peak-tflops", "1", "--peak-gbs", "10"]


def refused(argv, capsys) -> str:
    """The one-line error main() exits with; nothing ran (no table was printed)."""
    with pytest.raises(SystemExit) as exit_:
        bench_scale.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "### G" not in out
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("peaks, field", [
    (["--peak-tflops", "0", "--peak-gbs", "10"], "peak_tflops"),
    (["--peak-tflops", "nan", "--peak-gbs", "10"], "peak_tflops"),
    (["--peak-tflops", "1", "--peak-gbs", "-1"], "peak_gbs"),
    (["--peak-tflops", "1", "--peak-gbs", "inf"], "peak_gbs"),
])
def test_peaks_that_are_not_positive_numbers_are_refused(peaks, field, capsys):
    """A peak of 0, nan, a negative one or inf would print tables of nan or zeros."""
    assert f"{field} must be a finite number > 0, got" in refused(QUICK + peaks, capsys)


def test_a_peak_without_its_partner_and_nothing_to_take_it_from_is_refused(capsys):
    argv = ["--preset", "tiny", "--dry-run", "--peak-tflops", "100", "--lengths", "8", "--prompt-length", "8",
            "--block-length", "8"]
    assert "pass both --peak-tflops and --peak-gbs" in refused(argv, capsys)


def test_hardware_refuses_a_zero_peak():
    with pytest.raises(ValueError, match="peak FLOP/s must be a finite number > 0"):
        Hardware("X", 0.0, 1e12, "")


@pytest.mark.parametrize("where, why", [("missing/out.json", "does not exist"), (".", "is a directory")])
def test_an_unwritable_json_path_is_refused_before_the_run(tmp_path, capsys, where, why):
    line = refused(QUICK + PEAKS + ["--json", str(tmp_path / where)], capsys)
    assert "cannot write --json" in line and why in line


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="gpt-5"), "unknown preset"),
    (dict(gen_lengths=[100]), "not a positive multiple"),
    (dict(gen_lengths=[6], policies=["blockbatch"]), "divisible by none of BlockBatch's block sizes"),
    (dict(policies=["quantum"]), "unknown policies"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(hardware="TPU"), "unknown hardware"),
    (dict(time_budget=float("nan")), "time_budget must be a finite number > 0"),
    (dict(dtype="float8"), "unknown dtype"),
])
def test_settings_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleSettings(**kwargs)


def test_a_model_larger_than_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match="use a smaller preset or dtype, or --dry-run"):
        bench_scale.check_fits(preset_config("llada-8b", n_layers=4000), elem=4, device=torch.device("cpu"))


def test_blockbatch_is_one_request_per_call():
    with pytest.raises(ValueError, match="BlockBatch decodes one request per call"):
        ScaleSettings(policies=["blockbatch"], batch=2)
    # Without --policies, a batched run leaves BlockBatch out instead of failing.
    result = bench_scale.main(["--preset", "llada-8b", "--dry-run", "--hardware", "H100 SXM", "--lengths", "32",
                               "--prompt-length", "32", "--batch", "8"])
    assert "blockbatch" not in {r["policy"] for r in result["requests"]}
    assert all(k["rows"] == 8 for k in result["kinds"])


def test_request_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        bench_scale.run(ScaleSettings(preset="tiny", prompt_length=4000, gen_lengths=[256], device="cpu",
                                      peak_tflops=1, peak_gbs=1))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_runs_end_to_end_on_a_tiny_preset(tmp_path, capsys):
    out = tmp_path / "scale.json"
    result = bench_scale.main(QUICK + PEAKS + ["--json", str(out)])
    text = capsys.readouterr().out
    assert "### G = 16" in text and "### G = 32" in text and "extrapolated" in text
    assert "CPU ms" in text and "wall ms" in text  # one CPU thread: timed by this process's CPU time
    assert len(result["requests"]) == 2 * len(POLICIES)
    assert all(k["seconds"] > 0 and k["wall_seconds"] > 0 and k["bound_s"] > 0 for k in result["kinds"])
    for req in result["requests"]:
        kinds = [k for k in result["kinds"] if k["policy"] == req["policy"] and k["gen_length"] == req["gen_length"]]
        assert req["forwards"] == sum(k["count"] for k in kinds) == req["gen_length"]  # one token per forward
        assert req["seconds"] == pytest.approx(sum(k["count"] * k["seconds"] for k in kinds))
    dual = [k for k in result["kinds"] if k["policy"] == "dual" and k["gen_length"] == 32]
    assert [(k["kind"], k["count"]) for k in dual] == [("refresh", 4), ("dual step", 28)]
    assert json.loads(out.read_text())["params"] == param_count(preset_config("tiny"))


def test_bench_py_scale_mode_echoes_its_own_command(capsys):
    """tools.bench --scale hands its other flags to bench_scale.main with its own name."""
    bench_scale.main(QUICK + PEAKS + ["--lengths", "8", "--policies", "dual"], prog="-m tools.bench --scale")
    assert capsys.readouterr().out.startswith("`python -m tools.bench --scale --preset tiny")


def test_shape_flags_override_the_preset(capsys):
    result = bench_scale.main(QUICK + PEAKS + ["--d-model", "32", "--layers", "1", "--heads", "2", "--mlp", "40",
                                               "--vocab", "100", "--lengths", "8", "--policies", "dual"])
    cfg = preset_config("tiny", d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=40, vocab_size=100)
    assert cfg.n_kv_heads == 2 and cfg.mask_token_id == 99  # MHA for a new head count; ids in range
    assert result["params"] == param_count(cfg)


def test_dry_run_of_llada_8b_allocates_nothing(capsys):
    """The 8B preset on the meta device: counts and H100 bounds on any machine, in a blink."""
    result = bench_scale.main(["--preset", "llada-8b", "--dry-run", "--hardware", "H100 SXM", "--lengths", "64",
                               "--prompt-length", "64"])
    assert result["params"] == 8_015_581_184
    dual = next(k for k in result["kinds"] if k["kind"] == "dual step")
    assert dual["bound_by"] == "memory" and dual["seconds"] is None
    assert "Dry run" in capsys.readouterr().out


def test_dry_run_of_dream_7b(capsys):
    """The Dream preset end to end on the meta device: its parameters, its family in the header,
    and its cached steps one row longer than LLaDA's (the row before the block)."""
    argv = ["--dry-run", "--hardware", "H100 SXM", "--lengths", "64", "--prompt-length", "64"]
    dream = bench_scale.main(["--preset", "dream-7b", *argv])
    assert dream["params"] == 7_615_616_512 and "Dream family (q/k/v biases: yes, logit shift 1)" in dream["header"][0]
    llada = bench_scale.main(["--preset", "llada-8b", *argv])
    assert "LLaDA family (q/k/v biases: no, logit shift 0)" in llada["header"][0]
    for kind in ("prefix step", "dual step", "batched block step"):
        d, l = (next(k for k in r["kinds"] if k["kind"] == kind) for r in (dream, llada))
        assert (d["count"], d["q_mean"], d["logits"]) == (l["count"], l["q_mean"] + 1, l["logits"]), kind
    assert next(k for k in dream["kinds"] if k["kind"] == "dual step")["bound_by"] == "memory"
    full = next(k for k in dream["kinds"] if k["kind"] == "full")
    assert full["q_mean"] == 128 and full["logits"] == 32  # no cache: the canvas, no extra row


def test_a_shrunk_dream_preset_is_timed_end_to_end(capsys):
    """Every kind of forward replayed on a small random Dream model (its windows start one row before
    the block, its logits after it): each is timed, and DualCache's step is the block plus one row."""
    shrink = ["--d-model", "56", "--heads", "7", "--kv-heads", "1", "--layers", "1", "--mlp", "96", "--vocab", "300"]
    result = bench_scale.main(["--preset", "dream-7b", *shrink, *QUICK[2:], *PEAKS, "--lengths", "32"])
    assert all(k["seconds"] > 0 and k["bound_s"] > 0 for k in result["kinds"])
    assert {r["policy"] for r in result["requests"]} == set(POLICIES)
    dual = next(k for k in result["kinds"] if k["kind"] == "dual step")
    assert (dual["q_mean"], dual["logits"]) == (9, 8)  # blocks of 8, and the row before


def test_compile_failure_is_reported_cleanly(monkeypatch, capsys):
    """Without a working compiler torch.compile raises; the run goes on and says why."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(bench_scale, "_COMPILED", {})
    result = bench_scale.main(QUICK + PEAKS + ["--lengths", "8", "--compile"])
    cached = {f"{name} step" for name, policy in decode.CACHE_POLICIES.items() if issubclass(policy, decode.PrefixCache)}
    steps = [k for k in result["kinds"] if k["kind"] in cached | {"batched block step"}]  # the cached steps
    assert len(steps) == len(cached) + 1
    assert all(k["compile_error"] == "RuntimeError: no C++ compiler found" for k in steps)
    assert all(k["compile_error"] is None for k in result["kinds"] if k not in steps)
    assert "torch.compile failed" in capsys.readouterr().out
