"""dLLM-Cache (decode.py's 'dllm' cache policy): parity with the original, and its properties."""

import os

import pytest
import torch
from conftest import golden_cases, needs_golden, random_prompts
from hypothesis import given
from hypothesis import strategies as st

import decode
from decode import DecodeConfig, generate


def first_choice_gap(seen: list, run: dict) -> float:
    """The recorded k-th/(k+1)-th similarity gap at the first V-verify choice that differs from
    the original's (`seen`: our choices in order, sorted per layer)."""
    recorded = [(sorted(layer["sel"]), layer["cos_kth_gap"]) for step in run["cache_trace"]
                for layer in step["layers"] if "sel" in layer]
    return next(gap for mine, (theirs, gap) in zip(seen, recorded) if mine != theirs)


def config_for_case(case, model):
    kw = dict(case["kwargs"])
    cache = "none" if case["case"].startswith("dcache_baseline") else "dllm"
    return DecodeConfig.for_model(model.config, mask_id=case["mask_id"], cache=cache, quirks=True, **kw)


@needs_golden
@pytest.mark.parametrize("case", golden_cases(["dcache_"]))
def test_golden_parity_with_recorded_selections(tiny_model, case, monkeypatch):
    """Every dLLM-Cache golden case, with V-verify's choices replayed from the recording: same
    tokens, same forwards, same response rows recomputed per layer. V-verify picks the least
    similar values, and most similarities sit at 1.0 within a few float32 ulps, so which of them
    win is decided by rounding that differs between CPUs; replaying isolates everything else."""
    cfg = config_for_case(case, tiny_model)
    for run in case["runs"]:
        recorded = iter([layer["sel"] for step in run.get("cache_trace", []) for layer in step["layers"]
                         if "sel" in layer])
        monkeypatch.setattr(decode, "least_similar", lambda sim, n: torch.tensor([next(recorded)]))
        out = generate(tiny_model, torch.tensor(run["prompt"]), cfg)
        assert out.ids.tolist() == run["output_ids"]
        assert out.nfe == run["forward_calls"]
        if cfg.cache == "dllm":
            expected = sum(c["response_rows_recomputed"] for c in run["recompute_counts"].values())
            assert out.extras["recomputed_rows"]["response"] == expected


@needs_golden
@pytest.mark.parametrize("case", golden_cases(["dcache_"]))
def test_golden_parity_with_own_selections(tiny_model, case):
    """Without replay: the tokens match, or the first V-verify choice that differs from the
    recording was a float near-tie there (its k-th/(k+1)-th similarity gap below 1e-6)."""
    cfg = config_for_case(case, tiny_model)
    seen = []
    real = decode.least_similar

    def spy(sim, n):
        chosen = real(sim, n)
        seen.append(sorted(chosen[0].tolist()))
        return chosen

    decode.least_similar = spy
    try:
        for run in case["runs"]:
            seen.clear()
            out = generate(tiny_model, torch.tensor(run["prompt"]), cfg)
            if out.ids.tolist() == run["output_ids"]:
                continue
            gap = first_choice_gap(seen, run)
            assert gap < 1e-6, f"V-verify chose differently at a clear margin ({gap})"
    finally:
        decode.least_similar = real


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis draws the sizes and settings)
# ---------------------------------------------------------------------------------------------

dllm_settings = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 6),
    "block_length": st.sampled_from([2, 4, 8]),
    "num_blocks": st.integers(1, 3),
    "K_p": st.integers(1, 6),
    "K_r": st.integers(1, 4),
    "rho": st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    "rule": st.sampled_from(["topk", "threshold", "factor"]),
    "value": st.floats(0.3, 0.99),
    "seed": st.integers(0, 1000),
})


def dllm_config(model, s, **over):
    G = s["block_length"] * s["num_blocks"]
    kw = dict(gen_length=G, block_length=s["block_length"], steps=G, cache="dllm", prompt_interval_steps=s["K_p"],
              gen_interval_steps=s["K_r"], transfer_ratio=s["rho"])
    if s["rule"] == "threshold":
        kw["threshold"] = s["value"]
    elif s["rule"] == "factor":
        kw["factor"] = s["value"] * 3
    kw.update(over)
    return DecodeConfig.for_model(model.config, **kw)


@given(s=dllm_settings)
def test_refresh_every_step_equals_no_cache(random_model, s):
    """K_p = K_r = 1 recomputes everything at every step: the no-cache sampler, token for token
    (grouped-query attention included: the random model has 4 query heads over 2 K/V heads)."""
    prompt = torch.tensor(random_prompts(s, 1))
    cached = generate(random_model, prompt, dllm_config(random_model, s, prompt_interval_steps=1, gen_interval_steps=1))
    plain = generate(random_model, prompt, dllm_config(random_model, s, cache="none"))
    assert torch.equal(cached.ids, plain.ids) and cached.nfe == plain.nfe
    assert cached.extras["recomputed_fraction"] == 1.0


@given(s=dllm_settings, quirks=st.booleans())
def test_recomputed_rows_follow_the_schedule(random_model, s, quirks):
    """Per step and layer: refresh steps recompute their whole region (and layer 0 always, with
    the original's quirk); between response refreshes V-verify recomputes int(rho * G) response
    rows (rho = 1: all of them)."""
    cfg = dllm_config(random_model, s, quirks=quirks)
    prompt = torch.tensor(random_prompts(s, 1))
    out = generate(random_model, prompt, cfg)
    P, G, N = prompt.shape[1], cfg.gen_length, random_model.config.n_layers
    expect = {"prompt": 0, "response": 0}
    for t in range(1, out.nfe + 1):
        for layer in range(N):
            refresh_p = (t - 1) % cfg.prompt_interval_steps == 0 or (quirks and layer == 0)
            refresh_r = (t - 1) % cfg.gen_interval_steps == 0 or (quirks and layer == 0)
            expect["prompt"] += P if refresh_p else 0
            expect["response"] += G if refresh_r else int(cfg.transfer_ratio * G)
    assert out.extras["recomputed_rows"] == expect
    assert out.masks_left == 0 and not (out.ids == cfg.mask_id).any()  # composes with every commit rule


@given(s=dllm_settings)
def test_features_after_a_refresh_equal_a_fresh_computation(random_model, s):
    """After the first forward (t = 1 refreshes everything) the cached K/V, attention and MLP
    outputs of every layer equal the model's own pieces run on the same canvas."""
    from decode import Pieces, dllm_forward, setup

    cfg = dllm_config(random_model, s)
    prompt = torch.tensor(random_prompts(s, 2)[0:1])
    with torch.no_grad():
        pieces = Pieces.for_config(cfg)
        state = setup(random_model, prompt, cfg, pieces=pieces)
        L = state.L
        state.bounds = ([state.P], [state.P + cfg.block_length])
        dllm_forward(random_model, state.canvas, pieces.cache.window(state), state.cache, None)
        fc = state.cache
        cos, sin, _ = random_model.rope_and_mask(torch.arange(L), None, 1)
        x = random_model.embed(state.canvas)
        for i, block in enumerate(random_model.blocks):
            q, k, v = block.project(block.attn_norm(x), cos, sin)
            a = block.attend(q, k, v)
            m = block.mlp(block.ff_norm(x + a))
            for cached, fresh in ((fc.k[i, :, :, :L], k), (fc.v[i, :, :, :L], v), (fc.attn[i, :, :L], a),
                                  (fc.mlp[i, :, :L], m)):
                assert torch.allclose(cached, fresh, atol=2e-5 * max(1.0, float(fresh.abs().max())), rtol=0)
            x = x + a + m


def test_same_length_batch_with_v_verify_equals_rows_alone(random_model):
    """With V-verify on, rows of equal length in one batch decode as they do alone."""
    cfg = DecodeConfig.for_model(random_model.config, gen_length=16, block_length=4, steps=16, cache="dllm",
                                 prompt_interval_steps=5, gen_interval_steps=3, transfer_ratio=0.25)
    prompt = torch.randint(0, 47, (3, 5), generator=torch.Generator().manual_seed(1))
    batched = generate(random_model, prompt, cfg)
    for i in range(3):
        assert batched.ids[i].tolist() == generate(random_model, prompt[i:i + 1], cfg).ids[0].tolist()


def test_dllm_settings_errors():
    base = dict(gen_length=8, block_length=8, steps=8, cache="dllm")
    with pytest.raises(ValueError, match="prompt_interval_steps must be a positive integer"):
        DecodeConfig(prompt_interval_steps=0, **base)
    with pytest.raises(ValueError, match="gen_interval_steps"):
        DecodeConfig(gen_interval_steps=2.5, **base)
    with pytest.raises(ValueError, match="transfer_ratio"):
        DecodeConfig(transfer_ratio=1.5, **base)


@pytest.mark.parametrize("adablock", [False, True], ids=["fixed-blocks", "adablock"])
def test_threshold_batch_rows_follow_their_own_schedule(adablock):
    """A row whose block is finished waits for the batch without stepping its own refresh
    schedule or touching its features, so with the threshold rule (rows finish blocks at
    different steps) every row of a batch gets the tokens it gets alone: here 8 same-length
    prompts of the shipped `mix` checkpoint's long family, with fixed blocks and with AdaBlock
    (rows whose blocks end at different newlines)."""
    from conftest import ROOT
    from model import load_model
    from tools import task

    # float64: a batched matmul may round differently from a one-row one on some CPUs, and a
    # near-tie then flips a token; the property is the schedule's, so rounding is taken out.
    model = load_model(os.path.join(ROOT, "checkpoints", "mix"), device="cpu").to(torch.float64)
    problems = task.FAMILIES["long"].test_set(60)
    length = max({len(p.prompt) for p in problems}, key=[len(p.prompt) for p in problems].count)
    prompts = torch.tensor([task.encode(p.prompt) for p in problems if len(p.prompt) == length][:8])
    assert len(prompts) == 8
    cfg = DecodeConfig.for_model(model.config, gen_length=64, block_length=32, steps=64, cache="dllm", threshold=0.9,
                                 prompt_interval_steps=3, gen_interval_steps=5,
                                 delimiter_ids=tuple(task.encode("\n")) if adablock else None)
    batched = generate(model, prompts, cfg)
    alone = [generate(model, prompts[i:i + 1], cfg) for i in range(8)]
    assert [row.tolist() for row in batched.ids] == [a.ids[0].tolist() for a in alone]
    assert len({a.nfe for a in alone}) > 1  # the rows do finish their blocks at different steps


@pytest.mark.parametrize("quirks", [False, True])
@pytest.mark.parametrize("rule", [dict(threshold=0.1), dict(factor=8.0), dict()], ids=["threshold", "factor", "topk"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_rows_alone_with_quirks_and_guidance(random_model64, quirks, rule, cfg_scale):
    """Every row of a batch gets the tokens it gets alone, with the original's quirks (whose
    lockstep steps belong to the top-k schedule only) and with classifier-free guidance (whose
    unconditional copies follow their rows' step counters). Float64: near-ties take no part."""
    cfg = DecodeConfig.for_model(random_model64.config, gen_length=16, block_length=8, steps=16, cache="dllm",
                                 prompt_interval_steps=3, gen_interval_steps=2, transfer_ratio=0.25,
                                 quirks=quirks, cfg_scale=cfg_scale, **rule)
    prompt = torch.randint(0, 47, (4, 5), generator=torch.Generator().manual_seed(0))
    batched = generate(random_model64, prompt, cfg)
    alone = [generate(random_model64, prompt[i:i + 1], cfg) for i in range(4)]
    assert batched.ids.tolist() == [a.ids[0].tolist() for a in alone]
    if "threshold" in rule:
        assert len({a.nfe for a in alone}) > 1  # rows finish their blocks at different steps
