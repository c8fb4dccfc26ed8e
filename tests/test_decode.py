"""decode.py: token- and NFE-exact parity with the original samplers, and the loop's invariants."""

import dataclasses
import warnings

import pytest
import torch
from conftest import golden_cases, needs_golden
from hypothesis import given
from hypothesis import strategies as st

from decode import (DecodeConfig, Noise, Proposals, Quirks, draw_noise, generate, propose,
                    select_threshold, select_topk, transfer_count)

# Which original function maps to which cache policy.
CACHE_OF = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}


def config_for_case(case, model):
    """Our DecodeConfig for a golden case: the original's kwargs, and the original code's quirks.
    Fast-dLLM's first release (`jun_*`) did not yet cap DualCache's forwards per block."""
    cache = CACHE_OF[case.get("function", "generate")]
    quirks = Quirks.original()
    if case["impl"] == "fdl_jun":
        quirks = dataclasses.replace(quirks, dual_cache_step_cap=False)
    return DecodeConfig.for_model(model.config, cache=cache, mask_id=case["mask_id"], quirks=quirks, **case["kwargs"])


def first_release_nfe(out, cfg):
    """Fast-dLLM's first release counted one more cached forward for every block its block-start
    forward already finished (its loop ran a forward before checking for masks): the same tokens,
    that many more forwards."""
    return out.nfe + (sum(n == 1 for n in out.nfe_per_block) if cfg.cache != "none" else 0)


@needs_golden
@pytest.mark.parametrize("case", golden_cases(["llada_", "fdl_", "jun_"]))
def test_golden_parity(tiny_model, case):
    """Every LLaDA and Fast-dLLM golden case: same tokens, same number of forwards, same masks left."""
    cfg = config_for_case(case, tiny_model)
    for run in case["runs"]:
        if case["seed"] is not None:
            torch.manual_seed(case["seed"])  # the seeded cases used torch's global generator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capped edge case warns about the masks it leaves
            out = generate(tiny_model, torch.tensor(run["prompt"]), cfg)
        assert out.ids.tolist() == run["output_ids"]
        assert (first_release_nfe(out, cfg) if case["impl"] == "fdl_jun" else out.nfe) == run["forward_calls"]
        assert out.masks_left == run["masks_left"]


def no_quirk_applies(case) -> bool:
    """Temperature 0, no factor rule and no DualCache cap in reach: the papers' rules and the code agree."""
    return case["seed"] is None and "factor" not in case["kwargs"] and not any(r["masks_left"] for r in case["runs"])


@needs_golden
@pytest.mark.parametrize("case", [c for c in golden_cases(["llada_", "fdl_"]) if no_quirk_applies(c.values[0])])
def test_golden_tokens_without_quirks_where_no_quirk_applies(tiny_model, case):
    """With the papers' rules (no quirk), every golden case that no quirk touches still gives the
    original's tokens."""
    cfg = dataclasses.replace(config_for_case(case, tiny_model), quirks=Quirks())
    for run in case["runs"]:
        assert generate(tiny_model, torch.tensor(run["prompt"]), cfg).ids.tolist() == run["output_ids"]


@needs_golden
def test_capped_mode_warns_when_masks_are_left(tiny_model):
    cfg = DecodeConfig.for_model(tiny_model.config, gen_length=32, block_length=8, steps=4, threshold=0.9,
                                 cache="dual", quirks=Quirks(dual_cache_step_cap=True))
    with pytest.warns(UserWarning, match="masks left"):
        out = generate(tiny_model, torch.tensor([[83, 954, 722, 999, 851]]), cfg)
    assert out.masks_left > 0
    # Uncapped (the papers' rule, the default), the same settings finish every block.
    out = generate(tiny_model, torch.tensor([[83, 954, 722, 999, 851]]), DecodeConfig.for_model(
        tiny_model.config, gen_length=32, block_length=8, steps=4, threshold=0.9, cache="dual"))
    assert out.masks_left == 0


# ---------------------------------------------------------------------------------------------
# Properties of the loop (hypothesis draws the sizes and settings)
# ---------------------------------------------------------------------------------------------

settings_strategy = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 6),
    "batch": st.integers(1, 3),
    "block_length": st.sampled_from([2, 4, 8]),
    "num_blocks": st.integers(1, 3),
    "rule": st.sampled_from(["topk", "threshold", "factor"]),
    "value": st.floats(0.05, 0.99),
    "cache": st.sampled_from(["none", "prefix", "dual"]),
    "seed": st.integers(0, 1000),
})


def build(model, s, **over):
    gen = s["block_length"] * s["num_blocks"]
    kw = dict(gen_length=gen, block_length=s["block_length"], steps=gen, cache=s["cache"])
    if s["rule"] == "threshold":
        kw["threshold"] = s["value"]
    elif s["rule"] == "factor":
        kw["factor"] = s["value"] * 3
    kw.update(over)
    prompt = torch.randint(0, 47, (s["batch"], s["prompt_len"]), generator=torch.Generator().manual_seed(s["seed"]))
    return DecodeConfig.for_model(model.config, **kw), prompt


@given(conf=st.lists(st.lists(st.one_of(st.floats(0.0, 0.999999), st.just(-float("inf"))), min_size=1, max_size=9),
                    min_size=1, max_size=4).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_unreached_threshold_is_one_token_per_step(conf):
    """A threshold no confidence reaches commits exactly the top-1 of each row: LLaDA's one token
    per step. (Confidences are probabilities, so the threshold 1.0 is unreached below certainty.)"""
    conf = torch.tensor(conf, dtype=torch.float64)
    one = torch.ones(conf.shape[0], dtype=torch.long)
    assert torch.equal(select_threshold(conf, 1.0), select_topk(conf, one))


@given(s=settings_strategy)
def test_loop_invariants(random_model, s):
    """Every step commits >= 1 token per unfinished row, committed tokens never change, the prompt
    is never modified, and no mask is left at the end."""
    cfg, prompt = build(random_model, s)
    mask_id, P = cfg.mask_id, prompt.shape[1]
    history = []
    out = generate(random_model, prompt, cfg, on_step=lambda state: history.append(state.canvas.clone()))
    assert out.nfe == len(history)
    prev = torch.cat([prompt, torch.full((prompt.shape[0], cfg.gen_length), mask_id)], dim=1)
    for x in history:
        assert torch.equal(x[:, :P], prompt)
        was_committed = prev != mask_id
        assert torch.equal(x[was_committed], prev[was_committed])  # committed tokens are final
        # Each step commits at least one token in every row whose current block still had masks
        # (the current block is the first one with a mask left in any row).
        gen_masked = (prev[:, P:] == mask_id).view(prev.shape[0], -1, cfg.block_length)  # (B, blocks, K)
        block = int(gen_masked.any(-1).any(0).nonzero()[0])
        unfinished = gen_masked[:, block].any(-1)  # (B,)
        newly = ((prev == mask_id) & (x != mask_id)).sum(1)  # (B,)
        assert (newly[unfinished] >= 1).all()
        prev = x
    assert out.masks_left == 0 and not (out.ids == mask_id).any()


@needs_golden
def test_drift_is_measured(tiny_model):
    """The cached approximation is reported: zero with per-step refresh, positive without."""
    prompt = torch.tensor([[83, 954, 722, 999, 851]])
    kw = dict(gen_length=32, block_length=8, steps=32, threshold=0.9, measure_drift=True)
    for cache in ("prefix", "dual"):
        out = generate(tiny_model, prompt, DecodeConfig.for_model(tiny_model.config, cache=cache, **kw))
        assert out.max_drift > 1e-4
    out = generate(tiny_model, prompt, DecodeConfig.for_model(tiny_model.config, cache="dual", refresh_interval=1, **kw))
    assert out.max_drift == 0.0


# ---------------------------------------------------------------------------------------------
# Commit rules and the schedule
# ---------------------------------------------------------------------------------------------


def test_schedule_spreads_remainder_to_first_steps():
    masked = torch.tensor([7, 8])
    assert [transfer_count(masked, 3, step).tolist() for step in range(4)] == [[3, 3], [2, 3], [2, 2], [1, 1]]


def test_threshold_always_commits_the_best():
    conf = torch.tensor([[0.5, 0.2, -torch.inf], [0.95, 0.91, 0.3]], dtype=torch.float64)
    assert select_threshold(conf, 0.9).tolist() == [[True, False, False], [True, True, False]]


def factor_commits(conf, factor, quirks=Quirks()):
    """The factor rule's choice for confidences (B, K), as generate picks it for these quirks."""
    from decode import Pieces

    cfg = DecodeConfig(gen_length=8, block_length=8, steps=8, factor=factor, quirks=quirks)
    p = Proposals(torch.zeros_like(conf, dtype=torch.long), None, conf > -torch.inf, conf)
    return Pieces.for_config(cfg).rule(p, cfg, None)


def test_factor_rule_and_its_off_by_one():
    # Sorted: 0.99, 0.3. Rank 2 needs >= 1 - 1/3; it fails, but it is the last rank: the original
    # commits both. The rule as stated commits one.
    conf = torch.tensor([[0.3, 0.99]], dtype=torch.float64)
    assert factor_commits(conf, 1.0, Quirks(factor_off_by_one=True)).tolist() == [[True, True]]
    assert factor_commits(conf, 1.0).tolist() == [[False, True]]
    # Three eligible, rank 2 fails: one committed either way.
    conf = torch.tensor([[0.99, 0.3, 0.2]], dtype=torch.float64)
    assert factor_commits(conf, 1.0).sum() == 1
    # Rows with nothing eligible commit nothing.
    assert not factor_commits(torch.full((1, 3), -torch.inf, dtype=torch.float64), 1.0).any()


def test_topk_respects_per_row_counts():
    conf = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], dtype=torch.float64)
    assert select_topk(conf, torch.tensor([2, 1])).tolist() == [[False, True, True], [False, False, True]]


@pytest.mark.parametrize("quirks", [False, True])
def test_eos_eot_confidence_flag(quirks):
    """The flag takes EOS and EOT out of the confidence. LLaDA's code (the quirk) does that at
    T = 0 but only for EOT at T > 0. propose leaves its input untouched."""
    from decode import Pieces

    eos, eot, mask_id = 1, 2, 3
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]]])  # proposals: EOS, EOT
    mask = torch.ones(1, 2, dtype=torch.bool)
    for temperature in (0.0, 0.5):
        cfg = DecodeConfig(gen_length=2, block_length=2, steps=2, mask_id=mask_id, eos_id=eos, eot_id=eot,
                           confidence_eos_eot_inf=True, temperature=temperature, quirks=quirks)
        noise = draw_noise(cfg, torch.Generator().manual_seed(0), (1, 2, 4), device="cpu")
        before = logits.clone()
        p = propose(logits, mask, cfg, noise, pieces=Pieces.for_config(cfg))
        assert torch.equal(logits, before)
        assert p.tokens.tolist() == [[eos, eot]]  # the proposals themselves are unchanged
        assert p.confidence[0, 1] == 0  # EOT: suppressed in both cases
        assert (p.confidence[0, 0] == 0) == (not quirks or temperature == 0)


def test_mask_token_is_never_proposed():
    logits = torch.tensor([[[0.0, 1.0, 0.0, 9.0]]])  # the mask token (3) has the top logit
    cfg = DecodeConfig(gen_length=1, block_length=1, steps=1, mask_id=3, eos_id=0)
    assert propose(logits, torch.ones(1, 1, dtype=torch.bool), cfg, Noise()).tokens.item() == 1


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=30, block_length=8, steps=30), "not divisible by block_length"),
    (dict(gen_length=32, block_length=8, steps=30), "not divisible by the number of blocks"),
    (dict(gen_length=0, block_length=8, steps=8), "gen_length must be a positive integer"),
    (dict(gen_length=8, block_length=8, steps=-8), "steps must be a positive integer"),
    (dict(gen_length=8, block_length=8, steps=8, remasking="top"), "unknown remasking"),
    (dict(gen_length=8, block_length=8, steps=8, cache="ring"), "unknown cache"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=0.9, factor=1.0), "set one commit rule, not threshold and factor"),
    (dict(gen_length=8, block_length=8, steps=16), r"steps must be in 1..gen_length \(8\), got 16"),
    (dict(gen_length=8, block_length=8, steps=8, mask_id=True), "mask_id must be an integer"),
    (dict(gen_length=8, block_length=8, steps=8, mask_id=76.0), "mask_id must be an integer"),
    (dict(gen_length=8, block_length=8, steps=8, mask_id="76"), "mask_id must be an integer"),
    (dict(gen_length=8, block_length=8, steps=8, stop_at_eos="no"), "stop_at_eos must be True or False"),
    (dict(gen_length=8, block_length=8, steps=8, quirks="yes"), "quirks must be True, False"),
    (dict(gen_length=8, block_length=8, steps=8, temperature=-1.0), "temperature"),
    (dict(gen_length=8, block_length=8, steps=8, temperature=float("nan")), "temperature"),
    (dict(gen_length=8, block_length=8, steps=8, cfg_scale=float("inf")), "cfg_scale"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=1.5), r"threshold must be a finite number > 0 and <= 1"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=0.0), "threshold"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=float("nan")), "threshold"),
    (dict(gen_length=8, block_length=8, steps=8, factor=float("inf")), "factor"),
    (dict(gen_length=8.0, block_length=8, steps=8), "gen_length must be a positive integer"),
    (dict(gen_length=8, block_length=True, steps=8), "block_length must be a positive integer"),
    (dict(gen_length=8, block_length=8, steps=8, refresh_interval=1.5), "refresh_interval"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_generate_errors(random_model):
    cfg = DecodeConfig.for_model(random_model.config, gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(random_model, torch.tensor([[1, 2]]), DecodeConfig(gen_length=8, block_length=8, steps=8, mask_id=500))
    with pytest.raises(ValueError, match="mask_id is not set"):
        generate(random_model, torch.tensor([[1, 2]]), DecodeConfig(gen_length=8, block_length=8, steps=8))
    with pytest.raises(ValueError, match="contains the mask token"):
        generate(random_model, torch.tensor([[1, 49]]), cfg)
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length"):
        generate(random_model, torch.tensor([[1] * 250]), cfg)
    with pytest.raises(ValueError, match=r"must be a \(B, P\) tensor"):
        generate(random_model, torch.tensor([1, 2]), cfg)
    with pytest.raises(ValueError, match="left padding"):
        generate(random_model, torch.tensor([[1, 2, 3]]), cfg, attention_mask=torch.tensor([[1, 0, 1]]))


# ---------------------------------------------------------------------------------------------
# Stop at EOS, and rows with blocks of their own
# ---------------------------------------------------------------------------------------------


@given(s=settings_strategy)
def test_stop_at_eos_keeps_the_answer_and_saves_forwards(random_model, s):
    """With stop_at_eos a row ends once it has committed EOS with nothing masked before it: the
    text up to that EOS is what the full run commits, the rest is EOS, and no forward is added."""
    cfg, prompt = build(random_model, s)
    eos = cfg.eos_id
    full = generate(random_model, prompt, cfg)
    stop = generate(random_model, prompt, build(random_model, s, stop_at_eos=True)[0])
    assert stop.nfe <= full.nfe and stop.masks_left == 0
    for a, b in zip(full.generated.tolist(), stop.generated.tolist()):
        if eos in b:
            cut = b.index(eos)
            assert b[:cut + 1] == a[:cut + 1] and set(b[cut:]) == {eos}
        else:
            assert a == b


def test_rows_with_blocks_of_their_own_decode_as_alone(random_model):
    """The loop's pieces take any block rule: here each row has its own fixed block length, so
    rows of one batch have different block bounds at every step, and each gets what it gets alone."""
    from decode import FixedBlocks, Pieces, decode_blocks, setup

    class RowBlocks(FixedBlocks):  # block_length per row
        def __init__(self, lengths):
            self.lengths = torch.tensor(lengths)

        def first_end(self, state):
            return torch.minimum(state.start + self.lengths, torch.tensor(state.L))

    def run(prompt, lengths, cache):
        cfg = DecodeConfig.for_model(random_model.config, gen_length=12, block_length=12, steps=12, cache=cache,
                                     threshold=0.7)
        pieces = dataclasses.replace(Pieces.for_config(cfg), blocks=RowBlocks(lengths))  # our own block rule
        state = setup(random_model, prompt, cfg, pieces=pieces)
        decode_blocks(random_model, state, cfg, None, pieces)  # generate's loop
        return state.canvas

    prompt = torch.randint(0, 47, (3, 4), generator=torch.Generator().manual_seed(0))
    lengths = [2, 3, 5]
    for cache in ("none", "prefix", "dual"):
        batched = run(prompt, lengths, cache)
        for i in range(3):
            assert torch.equal(batched[i], run(prompt[i:i + 1], lengths[i:i + 1], cache)[0])


class StubModel(torch.nn.Module):
    """A model whose logits are whatever a test wants: it checks the loop, not the network."""

    def __init__(self, config, logits_fn):
        super().__init__()
        self.config, self.logits_fn = config, logits_fn
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, input_ids, positions=None, cache=None, attention_mask=None, logits_range=None):
        a, b = logits_range
        return self.logits_fn(input_ids.shape[0], b - a, self.config.embedding_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise_instead_of_hanging(random_model, bad):
    model = StubModel(random_model.config, lambda B, K, V: torch.full((B, K, V), bad))
    cfg = DecodeConfig.for_model(random_model.config, gen_length=8, block_length=8, steps=8, threshold=0.9)
    with pytest.raises(FloatingPointError, match=r"non-finite logits at step 0 of the block starting at position 2"):
        generate(model, torch.tensor([[1, 2]]), cfg)


@given(s=settings_strategy, scale=st.sampled_from([0.0, 1.0, 1e3, 1e30]))
def test_the_loop_always_terminates(random_model, s, scale):
    """Whatever finite logits come back (all equal, huge, random), every block finishes: each step
    commits at least one token per unfinished row, so an uncapped block needs at most K forwards."""
    g = torch.Generator().manual_seed(s["seed"])
    model = StubModel(random_model.config, lambda B, K, V: torch.randn(B, K, V, generator=g) * scale)
    cfg, prompt = build(random_model, s)
    out = generate(model, prompt, cfg)
    assert out.masks_left == 0 and out.nfe <= cfg.gen_length
