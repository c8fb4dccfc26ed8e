"""AdaBlock (decode.py's AdaBlock block rule): parity with the original, and its properties."""

import pytest
import torch
from conftest import golden_cases, needs_golden, random_prompts
from hypothesis import given
from hypothesis import strategies as st

from decode import DecodeConfig, Quirks, generate, left_pad


def config_for_case(case, model):
    """Our DecodeConfig for an `ada_*` golden case (the original's keyword names mapped to ours)."""
    kw = dict(case["kwargs"])
    return DecodeConfig.for_model(
        model.config, mask_id=case["mask_id"], cache=kw.pop("variant"), block_length=kw.pop("init_block_length"),
        delimiter_threshold=float(kw.pop("delimiter_threshold")), delimiter_ids=tuple(kw.pop("delimiter_ids")), **kw)


@needs_golden
@pytest.mark.parametrize("case", golden_cases(["ada_"]))
def test_golden_parity(tiny_model, case):
    """Every AdaBlock golden case: same tokens, forwards, block lengths and forwards per block."""
    cfg = config_for_case(case, tiny_model)
    for run in case["runs"]:
        out = generate(tiny_model, torch.tensor(run["prompt"]), cfg)
        assert out.ids.tolist() == run["output_ids"]
        assert out.nfe == run["forward_calls"]
        assert out.extras["block_lengths"] == [run["block_lengths"]]
        assert out.nfe_per_block == run["nfe_per_block"]


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis draws the sizes and settings)
# ---------------------------------------------------------------------------------------------

ada_settings = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 6),
    "block_length": st.sampled_from([2, 3, 4, 8]),
    "gen_length": st.integers(4, 24),
    "cache": st.sampled_from(["none", "prefix", "dual"]),
    "threshold": st.floats(0.3, 0.99),
    "delimiter_threshold": st.floats(0.0, 0.9),
    "delimiters": st.sampled_from([(16,), (21,), (16, 21, 47), (20, 22)]),
    "seed": st.integers(0, 1000),
})


def ada_config(model, s, **over):
    kw = dict(gen_length=s["gen_length"], block_length=s["block_length"], steps=s["gen_length"], cache=s["cache"],
              threshold=s["threshold"], delimiter_ids=s["delimiters"], delimiter_threshold=s["delimiter_threshold"])
    kw.update(over)
    return DecodeConfig.for_model(model.config, **kw)


@given(s=ada_settings)
def test_infinite_delimiter_threshold_is_fixed_blocks(random_model, s):
    """tau_D = inf never adapts: exactly Fast-dLLM with fixed blocks of B0 (same cache, same rule)."""
    G = s["block_length"] * max(1, s["gen_length"] // s["block_length"])  # the fixed grid needs whole blocks
    prompt = torch.tensor(random_prompts(s, 1))
    ada = generate(random_model, prompt, ada_config(random_model, s, gen_length=G, steps=G, delimiter_threshold=float("inf")))
    fixed = generate(random_model, prompt, ada_config(random_model, s, gen_length=G, steps=G, delimiter_ids=None))
    assert torch.equal(ada.ids, fixed.ids) and ada.nfe == fixed.nfe and ada.nfe_per_block == fixed.nfe_per_block
    assert ada.extras["block_lengths"] == [[s["block_length"]] * (G // s["block_length"])]


@given(s=ada_settings)
def test_every_block_ends_on_a_delimiter_or_has_the_default_length(random_model, s):
    cfg = ada_config(random_model, s)
    out = generate(random_model, torch.tensor(random_prompts(s, 1)), cfg)
    generated, start = out.generated[0].tolist(), 0
    lengths = out.extras["block_lengths"][0]
    assert sum(lengths) == cfg.gen_length and out.masks_left == 0
    for n in lengths:
        default = min(cfg.block_length, cfg.gen_length - start)
        assert n == default or generated[start + n - 1] in cfg.delimiter_ids
        assert 1 <= n <= max(default, int(cfg.window_fraction * cfg.gen_length))
        start += n


@given(s=ada_settings)
def test_rows_with_their_own_blocks_decode_as_alone(random_model, s):
    """Left-padded rows choose different block lengths; in one batch each row still gets exactly
    the tokens and block lengths it gets alone (per-row blocks, trash-padded windows)."""
    cfg = ada_config(random_model, s)
    rows = random_prompts(s, 3)
    ids, mask = left_pad(rows, random_model.config.pad_token_id)
    batched = generate(random_model, ids, cfg, attention_mask=mask)
    for i, p in enumerate(rows):
        alone = generate(random_model, torch.tensor([p]), cfg)
        assert batched.generated[i].tolist() == alone.generated[0].tolist()
        assert batched.extras["block_lengths"][i] == alone.extras["block_lengths"][0]


def original_adablock(model, prompt, cfg):
    """The original's no-cache AdaBlock loop for one row, written out plainly: every forward is a
    full one, its Gumbel noise drawn from torch's global generator over the whole canvas, and the
    look-ahead reads the *sampled* predictions. (As in decode.py, the mask token is never proposed.)"""
    mask, T, L = cfg.mask_id, cfg.temperature, prompt.shape[1] + cfg.gen_length
    x = torch.cat([prompt, torch.full((1, cfg.gen_length), mask)], dim=1)
    start, lengths = prompt.shape[1], []
    while start < L:
        first, end = True, L
        while first or (x[0, start:end] == mask).any():
            logits = model(x, positions=torch.arange(L))[0].double()  # (L, V)
            g = -torch.log(torch.rand(logits.shape, dtype=torch.float64))
            noisy = logits.exp() / g ** T
            noisy[:, mask] = -torch.inf
            pred = noisy.argmax(-1)  # (L,)
            p = logits.softmax(-1).gather(-1, pred[:, None])[:, 0]  # (L,)
            if first:  # the block's length, from the delimiters predicted in the look-ahead window
                window = range(start, start + min(int(cfg.window_fraction * cfg.gen_length), L - start))
                found = [i for i in window if int(pred[i]) in cfg.delimiter_ids]
                best = max(found, key=lambda i: (p[i], -i)) if found else None
                default = start + min(cfg.block_length, L - start)
                end = best + 1 if best is not None and p[best] >= cfg.delimiter_threshold else default
                lengths.append(end - start)
                first = False
            masked = [i for i in range(start, end) if x[0, i] == mask]
            top = max(masked, key=lambda i: (p[i], -i))
            for i in masked:
                if p[i] >= cfg.threshold or i == top:
                    x[0, i] = pred[i]
        start = end
    return x, lengths


@given(s=ada_settings, temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_sampling_matches_the_original_loop(random_model, s, temperature):
    """At temperature > 0 the block ends where the *sampled* predictions put a delimiter, and the
    random stream is the original's (drawn over the whole canvas, in LLaDA's exp form: two quirks):
    a seeded run gives the original loop's tokens and lengths."""
    cfg = ada_config(random_model, s, cache="none", temperature=temperature,
                     quirks=Quirks(noise_over_queries=True, gumbel_exp_form=True))
    prompt = torch.tensor(random_prompts(s, 1))
    torch.manual_seed(s["seed"])
    ref_ids, ref_lengths = original_adablock(random_model, prompt, cfg)
    torch.manual_seed(s["seed"])
    out = generate(random_model, prompt, cfg)
    assert out.ids.tolist() == ref_ids.tolist()
    assert out.extras["block_lengths"] == [ref_lengths]


def test_adablock_settings_errors():
    base = dict(gen_length=32, block_length=8, steps=32, mask_id=1, threshold=0.9)
    with pytest.raises(ValueError, match="delimiter_ids must be a non-empty list"):
        DecodeConfig(delimiter_ids=[], **base)
    with pytest.raises(ValueError, match="set threshold"):
        DecodeConfig(delimiter_ids=[5], **dict(base, threshold=None))
    with pytest.raises(ValueError, match="delimiter_threshold"):
        DecodeConfig(delimiter_ids=[5], delimiter_threshold=float("nan"), **base)
    with pytest.raises(ValueError, match="window_fraction"):
        DecodeConfig(delimiter_ids=[5], window_fraction=0.0, **base)
    # Checked without delimiter_ids too: a bad AdaBlock setting is never silently ignored.
    with pytest.raises(ValueError, match="delimiter_threshold"):
        DecodeConfig(delimiter_threshold=float("nan"), **base)
    with pytest.raises(ValueError, match="window_fraction"):
        DecodeConfig(window_fraction=0.0, **base)
    # B0 need not divide gen_length: AdaBlock's blocks do not follow a grid.
    assert DecodeConfig(delimiter_ids=[5], **dict(base, gen_length=30)).gen_length == 30
