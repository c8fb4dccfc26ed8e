"""decode.py on Dream: token- and NFE-exact parity with Dream's own sampler, Fast-dLLM, dLLM-Cache
and AdaBlock on Dream (../shared/golden/dream_tiny), and batch = rows alone for every method.

A case's `kwargs` are the original call's keywords; they map onto DecodeConfig fields by name,
through the small alias table below for the few whose name differs (docs/parity.md, "Dream")."""

import dataclasses
import json
import os
import warnings

import pytest
import torch
from conftest import GOLDEN
from test_dllm_cache import first_choice_gap
from test_registry import ROWS_APART, random_dream, random_dream64  # noqa: F401 (the random Dream's fixtures)

import decode
from decode import DecodeConfig, Quirks, generate, left_pad

DREAM = os.path.join(GOLDEN, "dream_tiny")
needs_dream = pytest.mark.skipif(not os.path.isdir(os.path.join(DREAM, "ckpt")),
                                 reason=f"Dream golden outputs not found at {DREAM}")

# The original keyword -> our field, where the names differ (the rest map by name).
ALIASES = {"max_new_tokens": "gen_length", "alg": "remasking"}
# Keywords that choose the function rather than a setting: the cache follows from them.
ENTRY_KEYS = ("variant", "dual_cache")
# AdaBlock's Dream delimiters, hard-coded in its code (Qwen2 ids: "\n", "\n\n", ...); a case passes
# those inside the tiny model's vocabulary (ours refuses ids outside it).
QWEN_DELIMITERS = (198, 271, 280, 319, 340, 382, 401, 532, 624, 630, 692, 698, 921, 1248, 1837, 1939, 2219, 2533,
                   3276, 3876, 4894, 5267, 14750, 68327)


def dream_cases(prefixes, with_errors=False):
    """(case dict) params for every Dream golden case whose name starts with one of `prefixes`;
    the cases that record the original's failure only when asked."""
    if not os.path.isdir(DREAM):
        return []
    out = []
    for name in sorted(os.listdir(DREAM)):
        if name.endswith(".json") and name.startswith(tuple(prefixes)):
            with open(os.path.join(DREAM, name)) as f:
                case = json.load(f)
            if with_errors == any(run.get("error") for run in case["runs"]):
                out.append(pytest.param(case, id=name[:-5]))
    return out


def config_for_case(case, model, quirks=True):
    """Our DecodeConfig for a Dream golden case: the original's keywords by name (ALIASES for the
    rest), the cache its entry point implies, Dream's linspace schedule, and the quirks."""
    kw = {ALIASES.get(k, k): v for k, v in case["kwargs"].items() if k not in ENTRY_KEYS}
    function, G = case["function"], kw["gen_length"]
    if kw["remasking"] == "confidence_threshold":  # Fast-dLLM's mode: the proposal's probability vs a threshold
        kw["remasking"] = "maskgit_plus"
        kw.setdefault("threshold", 0.9)
    if "adablock" in function:  # AdaBlock: no cache or DualCache, delimiters from the (Qwen) tokenizer
        inside = tuple(i for i in QWEN_DELIMITERS if i < model.config.embedding_size)  # no other can be predicted
        kw.update(cache="dual" if case["kwargs"]["dual_cache"] else "none", delimiter_ids=inside,
                  delimiter_threshold=float(kw["delimiter_threshold"]))
    elif "block_length" in kw:  # Fast-dLLM's block sampler: always a cache
        kw["cache"] = "dual" if case["kwargs"]["dual_cache"] else "prefix"
    else:  # Dream's own sampler: one block of G, ranked over the whole generation
        kw.update(block_length=G, cache="dllm" if "prompt_interval_steps" in kw else "none")
    return DecodeConfig.for_model(model.config, mask_id=case["mask_id"], schedule="linspace",
                                  quirks=Quirks.original() if quirks else Quirks(), **kw)


@pytest.fixture(scope="module")
def dream():
    from model import load_model

    return load_model(os.path.join(DREAM, "ckpt"), device="cpu")


def run_case(model, case, run, cfg):
    """One golden run: seeded as the original was (the global generator), padded as it was."""
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    mask = torch.tensor(run["attention_mask"]).long() if "attention_mask" in run else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quirk that leaves masks warns about them
        return generate(model, torch.tensor(run["prompt"]), cfg, attention_mask=mask)


def check_run(out, run):
    assert out.ids.tolist() == run["output_ids"]
    assert out.nfe == run["forward_calls"]
    assert out.masks_left == run["masks_left"]


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["dream_"]))
def test_dream_sampler_parity(dream, case):
    """Dream's own sampler (maskgit_plus, topk_margin, entropy, origin; top_p, top_k, T > 0 seeded;
    left-padded batches): same tokens, same forwards."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        check_run(run_case(dream, case, run, cfg), run)


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["fdream_"]))
def test_fast_dllm_parity(dream, case):
    """Fast-dLLM on Dream: the no-cache threshold mode (its quota), and the block sampler with the
    prefix cache and DualCache (threshold, and the schedule that ranks by entropy whatever `alg`
    says); one batch of two rows. Same tokens, same forwards, same masks left (`_s4_edge` leaves 28)."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        check_run(run_case(dream, case, run, cfg), run)


def real_rows(run):
    """The prompts of a golden batch run, each without its left padding."""
    mask = run.get("attention_mask") or [[1] * len(row) for row in run["prompt"]]
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(run["prompt"], mask)]


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["fdream_", "dream_"], with_errors=True))
def test_where_the_original_fails_rows_equal_rows_alone(dream, case):
    """The batches the original cannot run (a batch under DualCache or the threshold mode, padding
    with a cache): ours runs them, and every row gets what it gets alone."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        out = run_case(dream, case, run, cfg)
        assert out.masks_left == 0
        for i, row in enumerate(real_rows(run)):
            alone = generate(dream, torch.tensor([row]), cfg)
            assert out.generated[i].tolist() == alone.generated[0].tolist()


# Each Dream quirk, and a golden case that the original's tokens or forwards need it for.
NEEDED_BY = {
    "dream_topk_ties": "dream_entropy_g32_s32_topp0.95",  # exact 0.0 ties of the negative entropy
    "dream_draws": "dream_origin_g32_s8_seed7",  # the uniforms of its random reveals
    "dream_threshold_quota": "fdream_nocache_thr0.7_g32_s4",
    "dream_block_start_commit": "fdream_prefix_thr0.9_g32b8",
    "dream_block_entropy_only": "fdream_prefix_maskgit_plus_g32b8_s32",
}


@needs_dream
@pytest.mark.parametrize("quirk, name", sorted(NEEDED_BY.items()))
def test_each_dream_quirk_is_needed(dream, quirk, name):
    """Without the one quirk (all others on), its case no longer matches the original."""
    with open(os.path.join(DREAM, name + ".json")) as f:
        case = json.load(f)
    cfg = config_for_case(case, dream)
    cfg = dataclasses.replace(cfg, quirks=dataclasses.replace(cfg.quirks, **{quirk: False}))
    outs = [run_case(dream, case, run, cfg) for run in case["runs"]]
    assert any(o.ids.tolist() != r["output_ids"] or o.nfe != r["forward_calls"] for o, r in zip(outs, case["runs"]))


def no_dream_quirk_applies(case) -> bool:
    """Dream's sampler at temperature 0 with no exact ties (no top_p): the papers' rules and the
    original's code agree."""
    return case["seed"] is None and not case["kwargs"].get("top_p") and case["case"].startswith("dream_")


@needs_dream
@pytest.mark.parametrize("case", [c for c in dream_cases(["dream_"]) if no_dream_quirk_applies(c.values[0])])
def test_dream_sampler_without_quirks_where_none_applies(dream, case):
    """With every quirk off, Dream's sampler still gives the original's tokens where no quirk
    touches it: the schedule, the measures, top_k and padding are the method, not quirks."""
    cfg = config_for_case(case, dream, quirks=False)
    for run in case["runs"]:
        check_run(run_case(dream, case, run, cfg), run)


@needs_dream
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(remasking="entropy", schedule="linspace")])
def test_default_window_reads_the_row_before_the_block(dream, cache, rule):
    """The papers' rule on Dream: every cached window starts at the row before its block and reads
    logits for the whole block; the opening full forward commits by the rule like any step (not
    the block's first position alone); a cache refreshed at every step is exactly no cache."""
    kw = dict(gen_length=32, block_length=8, steps=8, **rule)  # two steps per block: the opening one commits 3
    prompt = torch.tensor([[1009, 83, 954, 722, 999, 851]])
    seen = []
    cfg = DecodeConfig.for_model(dream.config, cache=cache, **kw)
    generate(dream, prompt, cfg, on_step=lambda s: seen.append((s.window, int(s.start), s.step, s.canvas.clone())))
    cached = [(w, start) for w, start, _, _ in seen if not w.full]
    assert cached and all(int(w.positions[0]) == start - 1 and w.logits_range == (1, 9) for w, start in cached)
    opening = [(canvas, start) for w, start, step, canvas in seen if w.full]
    assert any((canvas[0, start:start + 8] != cfg.mask_id).sum() != 1 for canvas, start in opening)
    plain = generate(dream, prompt, DecodeConfig.for_model(dream.config, cache="none", **kw))
    every = generate(dream, prompt, DecodeConfig.for_model(dream.config, cache=cache, refresh_interval=1, **kw))
    assert torch.equal(plain.ids, every.ids) and plain.nfe == every.nfe


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["dcdream_"]))
def test_dllm_cache_parity_with_recorded_selections(dream, case, monkeypatch):
    """dLLM-Cache on Dream's sampler: with V-verify's choices replayed from the recording (its
    cosines tie at 0.0 gaps, decided by the CPU's rounding), same tokens, same forwards, same
    response rows recomputed. The feature-cache forward ends in the model's shifted head."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        recorded = iter([layer["sel"] for step in run.get("cache_trace", []) for layer in step["layers"]
                         if "sel" in layer])
        monkeypatch.setattr(decode, "least_similar", lambda sim, n: torch.tensor([next(recorded)]))
        out = run_case(dream, case, run, cfg)
        check_run(out, run)
        if cfg.cache == "dllm":
            expected = sum(c["response_rows_recomputed"] for c in run["recompute_counts"].values())
            assert out.extras["recomputed_rows"]["response"] == expected


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["dcdream_"]))
def test_dllm_cache_parity_with_own_selections(dream, case, monkeypatch):
    """Without replay: the tokens match, or the first V-verify choice that differs from the
    recording was a float near-tie there (k-th/(k+1)-th cosine gap below 1e-6)."""
    cfg = config_for_case(case, dream)
    real, seen = decode.least_similar, []
    monkeypatch.setattr(decode, "least_similar", lambda sim, n: seen.append(sorted(real(sim, n)[0].tolist()))
                        or real(sim, n))
    for run in case["runs"]:
        seen.clear()
        out = run_case(dream, case, run, cfg)
        if out.ids.tolist() == run["output_ids"]:
            continue
        gap = first_choice_gap(seen, run)
        assert gap < 1e-6, f"V-verify chose differently at a clear margin ({gap})"


@needs_dream
@pytest.mark.parametrize("case", dream_cases(["adadream_"]))
def test_adablock_parity(dream, case):
    """AdaBlock on Dream, without cache and with DualCache (delimiters: the cases' hard-coded Qwen
    ids): same tokens, forwards, block lengths and forwards per block."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        out = run_case(dream, case, run, cfg)
        check_run(out, run)
        assert out.extras["block_lengths"] == [run["block_lengths"]]
        assert out.nfe_per_block == run["nfe_per_block"]


@needs_dream
def test_adablock_row0_length_quirk_gives_every_row_row0s_lengths(dream):
    """Under adablock_row0_length (the original's `logits[0, ...]`), every row of a batch takes
    the block lengths row 0 chooses; without it (the default), each row chooses its own, as alone."""
    with open(os.path.join(DREAM, "adadream_dual_b8_td0.3_g64.json")) as f:
        case = json.load(f)
    rows = [run["prompt"][0] for run in case["runs"]]
    ids, mask = left_pad(rows, dream.config.pad_token_id)
    cfg = config_for_case(case, dream)
    alone = [generate(dream, torch.tensor([r]), cfg).extras["block_lengths"][0] for r in rows]
    assert len({tuple(a) for a in alone}) > 1  # the rows alone choose differently
    quirky = generate(dream, ids, cfg, attention_mask=mask).extras["block_lengths"]
    assert all(lengths == quirky[0] for lengths in quirky)
    plain = dataclasses.replace(cfg, quirks=dataclasses.replace(cfg.quirks, adablock_row0_length=False))
    assert generate(dream, ids, plain, attention_mask=mask).extras["block_lengths"] == alone


# ---------------------------------------------------------------------------------------------
# Batch = rows alone on Dream, for every method (test_registry.py draws the combinations at
# random for both families; here every cache x rule x block rule x measure, with the quirks on
# and off, on the random Dream model in float64)
# ---------------------------------------------------------------------------------------------

RULES = {"topk": dict(), "threshold": dict(threshold=0.6), "factor": dict(factor=1.0)}
METHODS = [(blocks, cache, rule) for blocks in sorted(decode.BLOCK_RULES) for cache in sorted(decode.CACHE_POLICIES)
           for rule in RULES if not (blocks == "adablock" and rule == "topk")]  # AdaBlock needs a confidence rule


@pytest.mark.parametrize("quirks", [False, True])
@pytest.mark.parametrize("measure", ["low_confidence", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("blocks, cache, rule", METHODS)
def test_every_method_batch_equals_rows_alone(random_dream64, blocks, cache, rule, measure, quirks):
    """Left-padded rows of three lengths, decoded together, each get what they get alone (with
    every quirk but the one that lets row 0 choose AdaBlock's lengths for all)."""
    kw = dict(gen_length=12, block_length=4, steps=6, cache=cache, remasking=measure,
              quirks=ROWS_APART if quirks else Quirks(),
              schedule="linspace" if measure != "low_confidence" else "uniform", top_k=20, prompt_interval_steps=2,
              gen_interval_steps=3, **RULES[rule])
    if blocks == "adablock":
        kw.update(delimiter_ids=(16, 21, 30), delimiter_threshold=0.1)
    cfg = DecodeConfig.for_model(random_dream64.config, **kw)
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    ids, mask = left_pad(rows, random_dream64.config.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quirk's step cap may leave masks
        batched = generate(random_dream64, ids, cfg, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = generate(random_dream64, torch.tensor([row]), cfg)
            assert batched.generated[i].tolist() == alone.generated[0].tolist()


# ---------------------------------------------------------------------------------------------
# Dream's sampling pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G, steps, counts", [
    (32, 32, [0] + [1] * 30 + [2]), (32, 8, [3, 4, 4, 4, 4, 4, 4, 5]), (32, 16, [1] + [2] * 14 + [3]),
    (64, 16, [3] + [4] * 14 + [5]), (64, 64, [0] + [1] * 62 + [2])])
def test_linspace_schedule_counts(G, steps, counts):
    """Dream's counts int(n (1 - s/t)) on float32 linspace(1, 1e-3, steps + 1), the rest at the
    last step: the sequences the original commits (dream_* golden steps)."""
    got, left = [], torch.tensor([G])
    for step in range(steps):
        f = decode.reveal_fraction(steps, step, 1e-3)
        k = left if f is None else (left.to(torch.float32) * f).long()
        got.append(int(k))
        left = left - k
    assert got == counts and int(left) == 0


def test_top_p_keeps_the_crossing_token_and_top_k_keeps_ties():
    """top_p drops a token once the tokens before it reach top_p (the one that crosses stays);
    top_k drops only tokens strictly below the k-th; top_p runs first."""
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.1, 0.1]]]))
    cfg = DecodeConfig(gen_length=4, block_length=4, steps=4, mask_id=9, top_p=0.7)
    assert torch.isinf(decode.restrict(logits, cfg)).tolist() == [[[False, False, True, True]]]
    cfg = DecodeConfig(gen_length=4, block_length=4, steps=4, mask_id=9, top_k=3)
    assert torch.isinf(decode.restrict(logits, cfg)).tolist() == [[[False, False, False, False]]]  # a tie at k
    cfg = DecodeConfig(gen_length=4, block_length=4, steps=4, mask_id=9, top_p=0.85, top_k=1)
    assert torch.isinf(decode.restrict(logits, cfg)).tolist() == [[[False, True, True, True]]]


@needs_dream
def test_alg_temp_near_zero_is_the_top_k(dream):
    """alg_temp draws the k positions from softmax(confidence / alg_temp) by Gumbel-top-k: as
    alg_temp goes to 0 the draw is the k most confident; a real alg_temp draws differently, and a
    seeded generator makes it reproducible."""
    kw = dict(gen_length=32, block_length=32, steps=8, remasking="entropy", schedule="linspace")
    prompt = torch.tensor([[1009, 83, 954, 722, 999, 851]])
    plain = generate(dream, prompt, DecodeConfig.for_model(dream.config, **kw))
    cold = generate(dream, prompt, DecodeConfig.for_model(dream.config, alg_temp=1e-9, **kw),
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.ids, cold.ids)
    warm = [generate(dream, prompt, DecodeConfig.for_model(dream.config, alg_temp=5.0, **kw),
                     generator=torch.Generator().manual_seed(s)).ids for s in (0, 0, 1)]
    assert torch.equal(warm[0], warm[1]) and not torch.equal(warm[0], plain.ids) and warm[2].shape == warm[0].shape


@needs_dream
def test_origin_reveals_a_random_number_and_finishes(dream):
    """origin (the papers' rule, quirks off) reveals each mask with probability 1 - s/t: the
    counts vary with the seed, and the last step reveals the rest."""
    cfg = DecodeConfig.for_model(dream.config, gen_length=32, block_length=32, steps=8, remasking="origin",
                                 schedule="linspace")
    prompt = torch.tensor([[1009, 83, 954, 722, 999, 851]])
    counts = []
    for seed in (1, 2):
        history = []
        out = generate(dream, prompt, cfg, generator=torch.Generator().manual_seed(seed),
                       on_step=lambda s: history.append(int((s.canvas != cfg.mask_id).sum())))
        assert out.masks_left == 0 and out.nfe == 8
        counts.append([b - a for a, b in zip([prompt.shape[1]] + history, history)])
    assert counts[0] != counts[1]


@pytest.mark.parametrize("field, value, message", [
    ("top_p", 0.0, "top_p must be a finite number > 0 and <= 1, got 0.0"),
    ("top_p", 1.5, "top_p must be a finite number > 0 and <= 1, got 1.5"),
    ("top_k", 0, "top_k must be a positive integer or None, got 0"),
    ("top_k", 2.5, "top_k must be a positive integer or None, got 2.5"),
    ("alg_temp", -1.0, "alg_temp must be a finite number >= 0, got -1.0"),
    ("eps", 0.0, "eps must be a finite number > 0 and < 1, got 0.0"),
    ("eps", 1.0, "eps must be a finite number > 0 and < 1, got 1.0"),
    ("schedule", "cosine", "unknown schedule 'cosine'; use one of ('uniform', 'linspace')"),
])
def test_bad_dream_settings_are_one_clear_line(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        DecodeConfig(gen_length=8, block_length=8, steps=8, **{field: value})


def dream_sample_reference(model, prompt, G, steps, alg, temperature, top_p, alg_temp, eps=1e-3):
    """A plain rewrite of Dream's `_sample` (one row): its sample_tokens through
    torch.distributions.Categorical, its schedule and its torch.multinomial for alg_temp, all on
    torch's global generator. For the seeded streams no golden case records (alg_temp > 0)."""
    M = model.config.mask_token_id
    x = torch.nn.functional.pad(prompt, (0, G), value=M)
    ts = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask = x == M
        logits = model(x)[mask]  # (N, V): the per-position (shifted) logits at the masks
        if temperature > 0:
            logits = logits / temperature
        if top_p is not None:
            ordered, order = torch.sort(logits, descending=True)
            drop = torch.cumsum(torch.softmax(ordered, -1), -1) > top_p
            drop[..., 1:] = drop[..., :-1].clone()
            drop[..., 0] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, -1)
        if temperature > 0:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            conf = probs.gather(-1, x0[:, None]).squeeze(-1)
        else:
            conf, x0 = probs.max(-1)
        if alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        t, s = ts[i], ts[i + 1]
        n = mask.sum() / 1
        k = int(n * (1 - s / t)) if i < steps - 1 else int(n)
        full = torch.full(x.shape, -torch.inf)
        full[mask] = conf
        if k > 0:
            idx = (torch.multinomial(torch.softmax(full / alg_temp, -1), k) if alg_temp
                   else torch.topk(full, k).indices)[0]
            proposal = torch.full_like(x, M)
            proposal[mask] = x0
            x[0, idx] = proposal[0, idx]
    return x


@needs_dream
@pytest.mark.parametrize("alg, temperature, top_p, alg_temp, steps", [
    ("entropy", 0.2, 0.95, 0.5, 32), ("maskgit_plus", 0.0, None, 0.1, 8), ("maskgit_plus", 0.7, None, 2.0, 16)])
def test_seeded_alg_temp_reproduces_a_rewrite_of_the_original(dream, alg, temperature, top_p, alg_temp, steps):
    """Under dream_draws and dream_topk_ties, a seeded run (torch.manual_seed, generator=None)
    gives the tokens of a plain rewrite of Dream's sampler with the same seed: the sampling
    draws and alg_temp's multinomial are the original's."""
    prompt = torch.tensor([[1009, 83, 954, 722, 999, 851]])
    cfg = DecodeConfig.for_model(dream.config, gen_length=32, block_length=32, steps=steps, remasking=alg,
                                 schedule="linspace", temperature=temperature, top_p=top_p, alg_temp=alg_temp,
                                 quirks=True)
    torch.manual_seed(11)
    ours = generate(dream, prompt, cfg).ids
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = dream_sample_reference(dream, prompt, 32, steps, alg, temperature, top_p, alg_temp)
    assert ours.tolist() == theirs.tolist()
