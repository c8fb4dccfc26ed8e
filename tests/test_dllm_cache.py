"""dLLM-Cache (decode.py's 'dllm' cache policy): parity with the original, and its properties."""

import pytest
import torch
from conftest import golden_cases, needs_golden
from hypothesis import given
from hypothesis import strategies as st

import decode
from decode import DecodeConfig, generate, left_pad


def config_for_case(case, model):
    kw = dict(case["kwargs"])
    cache = "none" if case["case"].startswith("dcache_baseline") else "dllm"
    return DecodeConfig.for_model(model.config, mask_id=case["mask_id"], cache=cache, **kw)


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
            recorded = [(sorted(layer["sel"]), layer["cos_kth_gap"]) for step in run["cache_trace"]
                        for layer in step["layers"] if "sel" in layer]
            first = next(i for i, (mine, (theirs, _)) in enumerate(zip(seen, recorded)) if mine != theirs)
            assert recorded[first][1] < 1e-6, f"V-verify chose differently at a clear margin ({recorded[first][1]})"
    finally:
        decode.least_similar = real
