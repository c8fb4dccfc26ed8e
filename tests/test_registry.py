"""Every registered method gets the loop's invariants, drawn from decode.py's registries (not from a
hand-written list): a method added to a registry is covered here at once.

- batch = rows alone, over every cache policy x commit rule x block rule x confidence measure x
  schedule x stop_at_eos x guidance x quirks x model family (LLaDA, and Dream's shifted head)
  (float64: near-ties take no part);
- every step commits at least one token in each row whose block still has masks, committed tokens
  never change, and nothing is left masked;
- a cache policy under its `every_step` settings (recompute everything at every step) is no cache;
- a name with no implementation fails loudly, wherever it is used.
"""

import dataclasses
import warnings
from dataclasses import fields

import pytest
import torch
from conftest import random_prompts
from hypothesis import assume, given
from hypothesis import strategies as st

import decode
from decode import (BLOCK_RULES, CACHE_POLICIES, COMMIT_RULES, CONFIDENCES, SCHEDULES, DecodeConfig, Quirks, generate,
                    left_pad)

DELIMITERS = (16, 21, 30)  # AdaBlock's delimiters on the random model: ids it proposes
# The originals' quirks, but the one that ties a batch's rows together on purpose (AdaBlock's Dream
# code lets row 0 choose every row's block length): with these, rows still decode as alone.
ROWS_APART = dataclasses.replace(Quirks.original(), adablock_row0_length=False)


def rule_values(rule: str) -> list:
    """Values a rule field takes in these tests: its `sweep` metadata (what the benchmark sweeps)."""
    return list(next(f for f in fields(DecodeConfig) if f.name == rule).metadata["sweep"])


# Every registered method, drawn by name. Confidence measures that read random numbers are left
# out of batch = alone (a batch draws its noise in one tensor), not out of the other properties.
methods = st.fixed_dictionaries({
    "cache": st.sampled_from(sorted(CACHE_POLICIES)),
    "rule": st.sampled_from(sorted(COMMIT_RULES)),
    "blocks": st.sampled_from(sorted(BLOCK_RULES)),
    "remasking": st.sampled_from(sorted(CONFIDENCES)),
    "schedule": st.sampled_from(sorted(SCHEDULES)),
    "family": st.sampled_from(["llada", "dream"]),
    "value_index": st.integers(0, 100),
    "stop_at_eos": st.booleans(),
    "cfg_scale": st.sampled_from([0.0, 1.0]),
    "quirks": st.booleans(),
    "block_length": st.sampled_from([2, 4]),
    "num_blocks": st.integers(1, 3),
    "prompt_len": st.integers(1, 5),
    "seed": st.integers(0, 1000),
})


def config_of(model, m, **over) -> DecodeConfig:
    """The DecodeConfig of a drawn method (AdaBlock needs a confidence rule: top-k is assumed away)."""
    assume(not (m["blocks"] == "adablock" and m["rule"] == "topk"))
    G = m["block_length"] * m["num_blocks"]
    kw = dict(gen_length=G, block_length=m["block_length"], steps=G, cache=m["cache"], remasking=m["remasking"],
              schedule=m["schedule"],
              stop_at_eos=m["stop_at_eos"], cfg_scale=m["cfg_scale"], quirks=ROWS_APART if m["quirks"] else Quirks(),
              prompt_interval_steps=2, gen_interval_steps=3)
    if m["rule"] != "topk":
        values = rule_values(m["rule"])
        kw[m["rule"]] = values[m["value_index"] % len(values)]
    if m["blocks"] == "adablock":
        kw.update(delimiter_ids=DELIMITERS, delimiter_threshold=0.1)
    kw.update(over)
    config = DecodeConfig.for_model(model.config, **kw)
    assert config.block_rule == m["blocks"] and config.rule == m["rule"]  # every registered name is reachable
    return config


@pytest.fixture(scope="session")
def random_dream(random_model):
    """The random model's Dream twin: the same sizes and special ids, q/k/v biases and the shifted
    head (row i - 1 predicts position i), so every method also runs on the second family."""
    from model import DiffusionLM, ModelConfig, init_weights

    c = random_model.config
    cfg = ModelConfig(family="dream", d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                      n_layers=c.n_layers, mlp_hidden_size=c.mlp_hidden_size, vocab_size=c.vocab_size,
                      rope_theta=c.rope_theta, max_sequence_length=c.max_sequence_length,
                      mask_token_id=c.mask_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                      eot_token_id=c.eot_token_id)
    model = init_weights(DiffusionLM(cfg), seed=3).eval()
    with torch.no_grad():  # sharper predictions, as the random model's
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def random_dream64(random_dream):
    import copy

    return copy.deepcopy(random_dream).to(torch.float64)


def quietly(*args, **kwargs):
    """generate, without the warning of a quirk that leaves masks (DualCache's step cap)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generate(*args, **kwargs)


@given(m=methods)
def test_batch_equals_rows_alone(random_model64, random_dream64, m):
    """Left-padded rows of different lengths, decoded in one batch, get the tokens each gets alone
    (either family)."""
    assume(not getattr(CONFIDENCES[m["remasking"]], "needs_uniforms", False))
    random_model64 = random_dream64 if m["family"] == "dream" else random_model64
    cfg = config_of(random_model64, m)
    rows = random_prompts(m, 3)
    ids, mask = left_pad(rows, random_model64.config.pad_token_id)
    batched = quietly(random_model64, ids, cfg, attention_mask=mask)
    for i, p in enumerate(rows):
        alone = quietly(random_model64, torch.tensor([p]), cfg)
        assert batched.generated[i].tolist() == alone.generated[0].tolist()


@given(m=methods)
def test_every_step_commits_and_commits_are_final(random_model, random_dream, m):
    """Each step commits at least one token (but where Dream's linspace schedule plans none);
    committed tokens and the prompt never change (but stop_at_eos ends a row at its first EOS);
    nothing is left masked (the papers' rules: no cap)."""
    random_model = random_dream if m["family"] == "dream" else random_model
    cfg = config_of(random_model, m, quirks=False)
    prompt = torch.tensor([random_prompts(m, 1)[0]] * 2)
    history = []

    def seen(state):
        history.append((state.canvas.clone(), state.window))

    out = generate(random_model, prompt, cfg, generator=torch.Generator().manual_seed(m["seed"]), on_step=seen)
    prev = torch.cat([prompt, torch.full((2, cfg.gen_length), cfg.mask_id)], dim=1)
    for canvas, _ in history:
        committed = prev != cfg.mask_id
        if cfg.stop_at_eos:  # a finished row's tokens after its first EOS become EOS: the answer ends there
            is_eos = canvas == cfg.eos_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1), canvas.shape[1])  # (B,)
            committed &= torch.arange(canvas.shape[1])[None, :] <= first[:, None]
        assert torch.equal(canvas[committed], prev[committed])
        planned_none = cfg.rule == "topk" and cfg.schedule == "linspace"  # int(n (1 - s/t)) can be 0
        assert planned_none or ((prev == cfg.mask_id) & (canvas != cfg.mask_id)).any(1).any()  # a commit per step
        prev = canvas
    assert out.masks_left == 0 and out.nfe == len(history)


@given(m=methods)
def test_a_policy_recomputing_everything_is_no_cache(random_model, random_dream, m):
    """Each cache policy under its `every_step` settings gives no cache's tokens and forwards
    (either family)."""
    assume(not m["stop_at_eos"])
    random_model = random_dream if m["family"] == "dream" else random_model
    policy = CACHE_POLICIES[m["cache"]]
    prompt = torch.tensor(random_prompts(m, 2)[:1])
    cached = config_of(random_model, m, quirks=False, **policy.every_step)
    plain = dataclasses.replace(cached, cache="none")
    a = generate(random_model, prompt, cached, generator=torch.Generator().manual_seed(0))
    b = generate(random_model, prompt, plain, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.ids, b.ids) and a.nfe == b.nfe


@pytest.mark.parametrize("kind, registry, field, name", [
    ("cache", CACHE_POLICIES, "cache", "ring"),
    ("remasking", CONFIDENCES, "remasking", "entropy_typo"),
])
def test_an_unregistered_name_fails_loudly(random_model, kind, registry, field, name):
    """Refused when the config is built, and again when generate starts (a field set later)."""
    with pytest.raises(ValueError, match=f"unknown {kind} {name!r}"):
        DecodeConfig.for_model(random_model.config, gen_length=4, block_length=4, steps=4, **{field: name})
    cfg = DecodeConfig.for_model(random_model.config, gen_length=4, block_length=4, steps=4)
    setattr(cfg, field, name)
    with pytest.raises(ValueError, match=f"unknown {kind} {name!r}"):
        generate(random_model, torch.tensor([[1, 2]]), cfg)


def test_a_rule_field_without_an_implementation_fails_loudly(random_model, monkeypatch):
    """A commit rule chosen by its field but removed from COMMIT_RULES (or never registered) is an
    error naming how to register it, never another rule."""
    monkeypatch.delitem(COMMIT_RULES, "factor")
    with pytest.raises(ValueError, match=r"commit rule 'factor' has no implementation: register one with "
                                         r"@register\(COMMIT_RULES, 'factor'\)"):
        DecodeConfig.for_model(random_model.config, gen_length=4, block_length=4, steps=4, factor=1.0)
    with pytest.raises(ValueError, match="unknown block rule 'spiral'"):
        decode.lookup(BLOCK_RULES, "block rule", "spiral")


def test_the_quirks_are_swapped_pieces_not_branches():
    """With quirks off the pieces are the registered ones; with quirks on, only the pieces a
    quirk names are replaced, and the registries themselves never change."""
    before = {name: dict(r) for name, r in (("rules", COMMIT_RULES), ("caches", CACHE_POLICIES))}
    plain = decode.Pieces.for_config(DecodeConfig(gen_length=8, block_length=4, steps=8, cache="dual", factor=1.0))
    assert plain.rule is COMMIT_RULES["factor"] and type(plain.cache) is CACHE_POLICIES["dual"]
    original = decode.Pieces.for_config(DecodeConfig(gen_length=8, block_length=4, steps=8, cache="dual", factor=1.0,
                                                     quirks=Quirks.original()))
    assert original.rule is not COMMIT_RULES["factor"] and isinstance(original.cache, CACHE_POLICIES["dual"])
    assert original.cache.budget() == (0, 4)  # the step cap: steps / num_blocks
    assert {"rules": dict(COMMIT_RULES), "caches": dict(CACHE_POLICIES)} == before


def test_noise_covers_only_the_logits_a_step_reads(random_model, monkeypatch):
    """At temperature > 0 the float64 noise is drawn for the positions whose logits the step reads
    (the block), not for every query position x vocabulary; the originals' full draw is a quirk."""
    shapes = []
    real = torch.rand

    def spy(*size, **kwargs):
        shapes.append(tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size)
        return real(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for quirks, widest in ((Quirks(), 4), (Quirks(noise_over_queries=True), 6 + 16)):
        shapes.clear()
        cfg = DecodeConfig.for_model(random_model.config, gen_length=16, block_length=4, steps=16, temperature=0.7,
                                     quirks=quirks)
        generate(random_model, prompt, cfg, generator=torch.Generator().manual_seed(0))
        assert max(s[1] for s in shapes) == widest, shapes[:3]


class Shifted(torch.nn.Module):
    """A model with a shifted head, as Dream's: the logits for query index i come from the hidden
    row i - 1 (`logit_shift` = 1). Built from the random model by asking it for the rows before."""

    logit_shift = 1

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.seen = model, model.config, []

    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)
    blocks = property(lambda self: self.inner.blocks)  # the pieces dLLM-Cache runs itself

    def embed(self, tokens):
        return self.inner.embed(tokens)

    def lm_head(self, h):
        return self.inner.lm_head(h)

    def logits(self, x, logits_range, positions=None):  # the head with this model's shift
        a, b = logits_range
        assert a >= 1, "a shifted model has no row before query 0"
        return self.inner.logits(x, (a - 1, b - 1))

    def rope_and_mask(self, *args):
        return self.inner.rope_and_mask(*args)

    def forward(self, tokens, positions=None, cache=None, attention_mask=None, logits_range=None):
        a, b = logits_range
        assert a >= 1, "a shifted model has no row before query 0"
        self.seen.append((positions, (a, b)))
        return self.inner(tokens, positions=positions, cache=cache, attention_mask=attention_mask,
                          logits_range=(a - 1, b - 1))


@pytest.mark.parametrize("cache", sorted(set(CACHE_POLICIES) - {"dllm"}))  # dLLM-Cache runs the model's pieces
def test_a_shifted_model_reads_the_row_before_each_cached_window(random_model64, cache):
    """For a model whose logit for position i comes from the row before it, every cached window
    starts model.logit_shift rows before its block, and its logits range skips them; rows of a
    left-padded batch still get what they get alone."""
    model = Shifted(random_model64)
    cfg = DecodeConfig.for_model(model.config, gen_length=12, block_length=4, steps=12, cache=cache, threshold=0.5)
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids, mask = left_pad(rows, model.config.pad_token_id)
    batched = generate(model, ids, cfg, attention_mask=mask)
    P = ids.shape[1]
    cached = [(positions, a) for positions, (a, b) in model.seen if positions.shape[-1] < P + cfg.gen_length]
    for positions, a in cached:  # a cached step: the block and the row before it
        assert a == 1 and int(positions.reshape(-1)[0]) in (P - 1, P + 3, P + 7)
    assert len(cached) > 0 if cache != "none" else not cached
    for i, p in enumerate(rows):
        assert batched.generated[i].tolist() == generate(model, torch.tensor([p]), cfg).generated[0].tolist()


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'dual' is already registered, to DualCache"):
        decode.register(CACHE_POLICIES, "dual")(type("Other", (decode.DualCache,), {}))
    assert CACHE_POLICIES["dual"] is decode.DualCache


@pytest.mark.parametrize("cache", sorted(CACHE_POLICIES))
def test_a_shifted_model_under_every_step_settings_is_no_cache(random_model64, cache):
    """Each policy recomputing everything gives no cache's tokens on a shifted-head model too:
    dLLM-Cache, which runs the model's pieces itself, takes its logits from the rows before."""
    model = Shifted(random_model64)
    kw = dict(gen_length=8, block_length=4, steps=8, threshold=0.5)
    cached = DecodeConfig.for_model(model.config, cache=cache, **kw, **CACHE_POLICIES[cache].every_step)
    plain = DecodeConfig.for_model(model.config, cache="none", **kw)
    prompt = torch.tensor([[5, 6, 7]])
    assert generate(model, prompt, cached).ids.tolist() == generate(model, prompt, plain).ids.tolist()
