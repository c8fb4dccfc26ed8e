"""The device-independent tests, on every device torch sees: CUDA when present (skipped cleanly
without it) and the CPU, where the same checks keep the GPU ones honest on a CPU-only CI.

What changes on a GPU is the arithmetic, not the algorithm: other kernels (cuBLAS, SDPA's fused
paths), other reduction orders, bf16 tensor cores. So logits are compared with tolerances scaled
to the dtype and to the logits' size, tokens exactly where the golden cases' confidence margins
allow it (they are recorded with the cases: the smallest top-1/top-2 gap is 8e-5, far above
float32 rounding), and the bf16 cached-vs-exact drift is measured and reported, not bounded.
`pytest -rP tests/test_cuda.py` shows the reported figures.
"""

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import CKPT, TINY, needs_golden
from hypothesis import given, settings
from hypothesis import strategies as st

from cache import KVCache
from decode import DecodeConfig, generate
from model import load_model

# Golden cases that run without a seed (a seeded case drew its noise from the CPU generator,
# which a CUDA run cannot reproduce), chosen to cover every policy, CFG, batching, the factor
# rule and the capped DualCache that leaves masks.
DEVICE_CASES = ["llada_topk_s32", "llada_cfg1.0_s32", "fdl_vanilla_thr0.9", "fdl_prefix_thr0.9", "fdl_dual_thr0.9",
                "fdl_dual_factor1.0", "fdl_batch2_dual_thr0.9", "fdl_dual_thr0.9_steps4_edge", "jun_dual_thr0.9"]


# Fewer hypothesis examples than the per-file tests draw: these repeat those properties on another
# device, where a device-specific mistake shows in the first few draws.
few_examples = settings(max_examples=5)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tensors are tiny: one CPU thread is fastest, and on a busy shared CPU a second one
    spin-waits (a 40x slowdown measured here)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 means float32: no TF32 in cuBLAS or cuDNN while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def atol(device: torch.device, scale: float) -> float:
    """Absolute float32 logit tolerance for logits of magnitude up to `scale`: a few float32
    roundings on the CPU, looser for GPU kernels' other reduction orders."""
    return (3e-6 if device.type == "cpu" else 2e-5) * scale


def on(model, device):
    return copy.deepcopy(model).to(device)


def golden_forward():
    from safetensors.torch import load_file

    return load_file(os.path.join(TINY, "forward.safetensors"))


# ---------------------------------------------------------------------------------------------
# Parity with the golden reference, on the device
# ---------------------------------------------------------------------------------------------


@needs_golden
def test_golden_logits_on_device(device):
    """Full, prefix-cache and DualCache forwards of the golden checkpoint match the reference."""
    g = {k: v.to(device) for k, v in golden_forward().items()}
    model = load_model(CKPT, device=device)
    s, e = g["block_start_end"].tolist()
    L = g["input_ids"].shape[1]
    tol = atol(device, scale=float(g["logits_full"].abs().max()))
    with torch.no_grad():
        assert (model(g["input_ids"]) - g["logits_full"]).abs().max() <= tol
        for stop, name in ((L, "logits_prefix_step"), (e, "logits_dual_step")):
            cache = KVCache.for_model(model.config, batch=1, capacity=L, device=device)
            model(g["input_ids"], positions=torch.arange(L, device=device), cache=cache)
            step = model(g["input_ids_step"][:, s:stop], positions=torch.arange(s, stop, device=device), cache=cache)
            assert (step - g[name]).abs().max() <= tol, name


def device_cases():
    if not os.path.isdir(TINY):
        return []
    out = []
    for name in DEVICE_CASES:
        with open(os.path.join(TINY, name + ".json")) as f:
            out.append(pytest.param(json.load(f), id=name))
    return out


@needs_golden
@pytest.mark.parametrize("case", device_cases())
def test_golden_tokens_on_device(device, case):
    """Deterministic golden cases decode to the same tokens and forward counts on the device."""
    from test_decode import config_for_case

    model = load_model(CKPT, device=device)
    cfg = config_for_case(case, model)
    for run in case["runs"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capped edge case warns about the masks it leaves
            out = generate(model, torch.tensor(run["prompt"], device=device), cfg)
        assert out.ids.device.type == device.type
        assert out.ids.tolist() == run["output_ids"]
        assert out.nfe == run["forward_calls"] and out.masks_left == run["masks_left"]


# ---------------------------------------------------------------------------------------------
# Properties, on the device
# ---------------------------------------------------------------------------------------------


@few_examples
@given(data=st.data())
def test_cached_block_equals_full_forward_on_device(random_model, device, data):
    """With the cache filled from the same tokens, a cached forward of a block (DualCache-shaped)
    or of a block and everything after it (prefix-shaped) equals that slice of the full forward."""
    model = on(random_model, device)
    L = data.draw(st.integers(4, 40), label="L")
    B = data.draw(st.integers(1, 3), label="B")
    s = data.draw(st.integers(0, L - 1), label="s")
    e = data.draw(st.integers(s + 1, L), label="e")
    ids = torch.randint(0, 47, (B, L), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999)))).to(device)
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        cache = KVCache.for_model(model.config, batch=B, capacity=L, device=device)
        model(ids, positions=torch.arange(L, device=device), cache=cache)
        block = model(ids[:, s:e], positions=torch.arange(s, e, device=device), cache=cache)
        suffix = model(ids[:, s:], positions=torch.arange(s, L, device=device), cache=cache)
    tol = atol(device, scale=float(full.abs().max()))
    assert (block - full[:, s:e]).abs().max() <= tol
    assert (suffix - full[:, s:]).abs().max() <= tol


def test_device_logits_equal_cpu_logits(random_model, device):
    ids = torch.randint(0, 47, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = random_model(ids)
        out = on(random_model, device)(ids.to(device)).cpu()
    assert (out - ref).abs().max() <= atol(device, scale=float(ref.abs().max()))


decode_settings = st.fixed_dictionaries({
    "cache": st.sampled_from(["none", "prefix", "dual"]),
    "rule": st.sampled_from([dict(), dict(threshold=0.9), dict(factor=1.0)]),
    "block_length": st.sampled_from([4, 8]),
    "num_blocks": st.integers(1, 3),
    "seed": st.integers(0, 999),
})


def build(model, s, batch=1, **over):
    G = s["block_length"] * s["num_blocks"]
    cfg = DecodeConfig.for_model(model.config, gen_length=G, block_length=s["block_length"], steps=G,
                                 cache=s["cache"], **{**s["rule"], **over})
    prompt = torch.randint(0, 47, (batch, 5), generator=torch.Generator().manual_seed(s["seed"]))
    return cfg, prompt.to(model.device)


@few_examples
@given(s=decode_settings)
def test_device_tokens_equal_cpu_tokens(random_model, device, s):
    """The confident random model decodes to the same tokens and NFE on the device as on the CPU."""
    model = on(random_model, device)
    cfg, prompt = build(model, s, batch=2)
    ref = generate(random_model, prompt.cpu(), cfg)
    out = generate(model, prompt, cfg)
    assert out.ids.cpu().tolist() == ref.ids.tolist() and out.nfe == ref.nfe


@few_examples
@given(s=decode_settings)
def test_refresh_every_step_equals_no_cache_on_device(random_model, device, s):
    model = on(random_model, device)
    cfg, prompt = build(model, s, refresh_interval=1)
    ref = generate(model, prompt, build(model, dict(s, cache="none"))[0])
    out = generate(model, prompt, cfg)
    assert torch.equal(out.ids, ref.ids) and out.nfe == ref.nfe


@few_examples
@given(s=decode_settings)
def test_batch_equals_rows_alone_on_device(random_model, device, s):
    model = on(random_model, device)
    cfg, prompt = build(model, s, batch=3)
    batched = generate(model, prompt, cfg)
    for i in range(3):
        assert torch.equal(batched.ids[i], generate(model, prompt[i:i + 1], cfg).ids[0])


# ---------------------------------------------------------------------------------------------
# Everything on the device; bf16; host syncs
# ---------------------------------------------------------------------------------------------


def test_everything_stays_on_the_device(random_model, device):
    """Inputs, positions and the cache of every forward live on the device, and sampling with a
    device generator is reproducible."""
    model = on(random_model, device)
    seen = []

    def hook(module, args, kwargs):
        tensors = [args[0], kwargs["positions"]] + ([kwargs["cache"].k, kwargs["cache"].v] if kwargs["cache"] else [])
        seen.extend(t.device.type for t in tensors)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = DecodeConfig.for_model(model.config, gen_length=16, block_length=8, steps=16, cache="dual",
                                     temperature=0.7, threshold=0.9)
        prompt = torch.randint(0, 47, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
        runs = [generate(model, prompt, cfg, generator=torch.Generator(device=device).manual_seed(7)) for _ in range(2)]
    finally:
        handle.remove()
    assert seen and set(seen) == {device.type}
    assert runs[0].ids.device.type == device.type and torch.equal(runs[0].ids, runs[1].ids)


def finite_logits_hook(module, args, kwargs, output):
    assert torch.isfinite(output.float()).all(), "non-finite logits"


@needs_golden
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bf16_is_finite_and_its_drift_is_reported(device, cache, record_property):
    """bf16 on the device: every forward's logits are finite, the generation completes, and the
    largest |cached - exact| block logit is reported next to float32's (`pytest -rP` shows it)."""
    prompt = torch.tensor([[83, 954, 722, 999, 851]], device=device)
    drift = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(CKPT, device=device, dtype=dtype)
        handle = model.register_forward_hook(finite_logits_hook, with_kwargs=True)
        try:
            cfg = DecodeConfig.for_model(model.config, gen_length=32, block_length=8, steps=32, cache=cache,
                                         threshold=0.9, measure_drift=True)
            out = generate(model, prompt, cfg)
        finally:
            handle.remove()
        assert out.masks_left == 0 and out.ids.device.type == device.type
        drift[dtype] = out.max_drift
    name = f"max_drift_{cache}_{device.type}"
    record_property(name + "_fp32", drift[torch.float32])
    record_property(name + "_bf16", drift[torch.bfloat16])
    print(f"{cache} cache on {device.type}: largest |cached - exact| block logit "
          f"{drift[torch.float32]:.3g} in float32, {drift[torch.bfloat16]:.3g} in bfloat16")
    # The approximation is real in both dtypes, and bf16's rounding adds little to it: the
    # cache's staleness, not the dtype, is what moves the logits.
    assert 0 < drift[torch.float32] and 0 < drift[torch.bfloat16] <= 2 * drift[torch.float32] + 1


def test_no_host_sync_inside_a_step(random_model, device):
    """The decoding loop may wait for the GPU once per step (to learn whether the block is
    finished) and a few times per block and per request; no more. Counted with CUDA's sync
    debug mode; the failure names the lines that synchronised."""
    if device.type != "cuda":
        pytest.skip("host/device synchronisation exists only on CUDA")
    model = on(random_model, device)
    cfg = DecodeConfig.for_model(model.config, gen_length=32, block_length=8, steps=32, cache="dual", threshold=0.9)
    prompt = torch.randint(0, 47, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    generate(model, prompt, cfg)  # warm-up: lazy CUDA initialisation syncs once, outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = generate(model, prompt, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    where = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})
    print(f"{len(syncs)} host syncs in {out.nfe} forwards over {cfg.num_blocks} blocks, at {where}")
    assert len(syncs) <= out.nfe + 2 * cfg.num_blocks + 4, f"{len(syncs)} syncs for {out.nfe} steps at {where}"


def test_scale_bench_on_device(device):
    """The scale benchmark records each method's forwards on the CPU and replays every kind on the
    device in its default dtype (dLLM-Cache's refresh plans moved there too); peak memory is measured."""
    if device.type != "cuda":
        pytest.skip("the CPU run is tests/test_bench_scale.py")
    from tools import bench_scale

    result = bench_scale.main(["--preset", "tiny", "--prompt-length", "16", "--lengths", "16", "--block-length", "8",
                               "--device", "cuda", "--time-budget", "0.01", "--max-repeats", "3"])
    assert {r["policy"] for r in result["requests"]} == set(bench_scale.POLICIES)
    assert all(k["seconds"] > 0 and k["peak_measured"] and k["peak_bytes"] > 0 for k in result["kinds"])
