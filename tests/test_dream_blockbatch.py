"""blockbatch.py on Dream, a model whose head is shifted (the row before a token predicts it).

With the quirks on, token- and NFE-exact parity with the original's Dream generator (the 8
`bbdream_*` golden cases), each of its deviations needed. With the papers' rules (quirks off) the
method is the one LLaDA runs, with a window that starts at the row before the block: one branch
refreshed at every block is DualCache + threshold, the padded batched step equals each branch
alone, and every position of the block is predicted from fresh keys and values."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st

import blockbatch as bbm
from blockbatch import BlockBatchConfig, generate
from cache import KVCache
from decode import DecodeConfig, Quirks
from decode import generate as decode_generate
from model import DiffusionLM, ModelConfig, init_weights, load_model
from test_blockbatch import branches_on_different_blocks, check_run, decode_checking_merges_and_syncs

DREAM = os.path.join(GOLDEN, "dream_tiny")
DREAM_CKPT = os.path.join(DREAM, "ckpt")
needs_dream = pytest.mark.skipif(not os.path.isdir(DREAM_CKPT), reason=f"Dream golden outputs not found at {DREAM}")

# The original's keyword arguments are BlockBatchConfig fields of the same name (gen_length,
# block_sizes, threshold, temperature, refresh_block_size, sync_threshold); the ones with no field
# are listed here with why, and any other keyword is refused, so a new one cannot pass unread.
NO_FIELD = {
    "attn": "the LLaDA harness's attention kernel (varlen or padded), not a decoding setting",
    "top_p": "the Dream generator forces it off (blockbatch_greedy_only)",
    "top_k": "the Dream generator forces top-1 (blockbatch_greedy_only)",
    "debug": "the original's logging",
}

# One run per quirk that it decides (found by turning each off in turn; most decide many more).
NEEDED = {
    "blockbatch_pred_window": ("bbdream_8_g32", 0),
    "blockbatch_seed_first_mask": ("bbdream_8_g32", 0),
    "blockbatch_prob_dict": ("bbdream_4-8-16_g32", 1),
    "blockbatch_merge_own_block": ("bbdream_4-8-16_g64", 1),
    "blockbatch_merged_count_as_decoded": ("bbdream_4-8-16_g32", 1),
    "blockbatch_refresh_on_progress": ("bbdream_8_g32_rb8", 0),
    "blockbatch_first_complete_exit": ("bbdream_4-8-16_g32", 0),
}


def dream_cases():
    if not os.path.isdir(DREAM):
        return []
    names = sorted(n for n in os.listdir(DREAM) if n.startswith("bbdream_") and n.endswith(".json"))
    return [pytest.param(json.load(open(os.path.join(DREAM, n))), id=n[:-5]) for n in names]


def load_case(name):
    with open(os.path.join(DREAM, name + ".json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dream():
    return load_model(DREAM_CKPT, device="cpu")


@pytest.fixture(scope="module")
def random_dream():
    """A small random Dream-family model (shifted head, q/k/v biases), sharpened like random_model."""
    return make_dream(n_layers=2)


def make_dream(n_layers, dtype=torch.float32):
    cfg = ModelConfig(family="dream", d_model=32, n_heads=4, n_kv_heads=2, n_layers=n_layers, mlp_hidden_size=64,
                      vocab_size=50, rope_theta=10000.0, max_sequence_length=256, mask_token_id=49,
                      eos_token_id=48, pad_token_id=48)
    model = init_weights(DiffusionLM(cfg), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.to(dtype)


def config_for_case(case, model, **quirks_off):
    """The original's kwargs by name (NO_FIELD dropped), and every quirk but the ones named."""
    fields = {f.name for f in dataclasses.fields(BlockBatchConfig)}
    unknown = set(case["kwargs"]) - fields - set(NO_FIELD)
    assert not unknown, f"keywords with neither a field nor a NO_FIELD entry: {unknown}"
    kwargs = {k: v for k, v in case["kwargs"].items() if k in fields}
    quirks = dataclasses.replace(Quirks.original(), **quirks_off)
    return BlockBatchConfig.for_model(model.config, mask_id=case["mask_id"], quirks=quirks, **kwargs)


def matches(out, run) -> bool:
    return (out.ids.tolist() == run["output_ids"] and out.nfe == run["nfe_returned"]
            and out.extras["winner_block_size"] == run["winner_block_size"])


# ---------------------------------------------------------------------------------------------
# Parity with the original's Dream generator (quirks on)
# ---------------------------------------------------------------------------------------------


@needs_dream
@pytest.mark.parametrize("case", dream_cases())
def test_golden_parity(dream, case):
    """Same tokens, batched forwards and winner; every branch's canvas at the exit; as many
    merges, syncs and refreshes as the original logged."""
    cfg = config_for_case(case, dream)
    for run in case["runs"]:
        out = generate(dream, torch.tensor(run["prompt"]), cfg)
        assert matches(out, run)
        check_run(out, run, cfg.block_sizes)  # forwards, masks left, every branch, merges, syncs, refreshes


@needs_dream
@pytest.mark.parametrize("flag", sorted(NEEDED))
def test_each_quirk_is_needed(dream, flag):
    """Without the quirk, a run it decides no longer matches the original."""
    name, i = NEEDED[flag]
    case = load_case(name)
    run = case["runs"][i]
    assert matches(generate(dream, torch.tensor(run["prompt"]), config_for_case(case, dream)), run)
    assert not matches(generate(dream, torch.tensor(run["prompt"]), config_for_case(case, dream, **{flag: False})), run)


def test_confidence_leaves_out_the_mask(random_dream):
    """blockbatch_conf_without_mask (no golden run turns on it: the tiny model's mask row of the
    LM head is zero): the confidences are the softmax over every token but the mask."""
    cfg = BlockBatchConfig.for_model(random_dream.config, gen_length=8, block_sizes=[4],
                                     quirks=Quirks(blockbatch_conf_without_mask=True))
    run = bbm.with_quirks(cfg, logit_shift=1)(random_dream, torch.tensor([[1, 2]]), cfg)
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(run.confidence_logits(logits).double(), dim=-1)
    mask = random_dream.config.mask_token_id
    assert (probs[..., mask] == 0).all()
    assert torch.allclose(probs[..., :mask], torch.softmax(logits[..., :mask].double(), dim=-1), atol=1e-12, rtol=0)
    assert torch.equal(logits, run.confidence_logits(logits).index_copy(-1, torch.tensor([mask]), logits[..., mask:]))


def test_greedy_only(random_dream):
    """The Dream generator ignores the temperature (blockbatch_greedy_only); with the papers'
    rules a temperature samples."""
    def run(prompt, quirks, temperature):
        cfg = BlockBatchConfig.for_model(random_dream.config, gen_length=16, block_sizes=[4, 8], quirks=quirks,
                                         temperature=temperature)
        return generate(random_dream, torch.tensor([prompt]), cfg, generator=torch.Generator().manual_seed(1)).ids

    prompts = ([5, 6, 7], [1, 2], [9, 8, 7, 6])
    assert all(torch.equal(run(p, True, 1.0), run(p, True, 0.0)) for p in prompts)
    assert any(not torch.equal(run(p, False, 1.0), run(p, False, 0.0)) for p in prompts)


def test_dream_quirks_only_where_the_original_has_them():
    """The original's Dream generator is a bulk one for Dream: on an unshifted model (LLaDA), and
    for rms, every quirk on swaps in only the LLaDA generator's methods."""
    cfg = BlockBatchConfig(gen_length=8, block_sizes=[4], mask_id=9, eos_id=8, quirks=True)
    rms = dataclasses.replace(cfg, generator_variant="rms")
    dream_only = (bbm.PredecessorWindow, bbm.SeedFirstMask, bbm.ConfidenceWithoutMask, bbm.CumulativeProbDict,
                  bbm.MergeOwnBlock, bbm.MergedTokensCount, bbm.RefreshOnProgress, bbm.FirstCompleteExit, bbm.GreedyOnly)
    assert not issubclass(bbm.with_quirks(cfg, logit_shift=0), dream_only)
    assert not issubclass(bbm.with_quirks(rms, logit_shift=1), dream_only)
    assert all(issubclass(bbm.with_quirks(cfg, logit_shift=1), m) for m in dream_only)
    assert issubclass(bbm.with_quirks(rms, logit_shift=1), bbm.Float32Divergence)


# ---------------------------------------------------------------------------------------------
# The papers' rules on Dream (quirks off)
# ---------------------------------------------------------------------------------------------

prompts = st.lists(st.integers(0, 47), min_size=1, max_size=6)


def assert_dualcache(out, ref, prompt_len, eos_id, mask_id):
    """out (BlockBatch, one branch) equals ref (DualCache); after an EOS exit, what it decided up
    to the EOS is DualCache's, in no more forwards, and EOS follows."""
    if out.extras["exit"] == "natural":
        assert torch.equal(out.ids, ref.ids) and out.nfe == ref.nfe
        return
    gen = out.generated[0].tolist()
    cut = prompt_len + gen.index(eos_id) + 1
    decided = out.ids[:, :cut] != mask_id
    assert torch.equal(out.ids[:, :cut][decided], ref.ids[:, :cut][decided]) and out.nfe <= ref.nfe
    assert set(gen[cut - prompt_len:]) <= {eos_id}


@settings(max_examples=8)
@given(prompt=prompts, block=st.sampled_from([4, 8]), threshold=st.sampled_from([0.3, 0.7, 0.9]))
def test_single_branch_with_refresh_every_block_is_dualcache(random_dream, prompt, block, threshold):
    """One branch refreshed at every block is DualCache + threshold at that block size, both with
    the window that starts at the row before the block."""
    G, ids = 16, torch.tensor([prompt])
    cfg = BlockBatchConfig.for_model(random_dream.config, gen_length=G, block_sizes=[block], threshold=threshold,
                                     refresh_block_size=block)
    ref = decode_generate(random_dream, ids, DecodeConfig.for_model(
        random_dream.config, gen_length=G, block_length=block, steps=G, threshold=threshold, cache="dual"))
    assert_dualcache(generate(random_dream, ids, cfg), ref, len(prompt), cfg.eos_id, cfg.mask_id)


@needs_dream
def test_single_branch_is_dualcache_on_the_golden_checkpoint(dream):
    case = load_case("bbdream_8_g32_rb8")
    cfg = dataclasses.replace(config_for_case(case, dream), quirks=False)
    dual = DecodeConfig.for_model(dream.config, gen_length=32, block_length=8, steps=32, threshold=0.9, cache="dual",
                                  mask_id=case["mask_id"])
    for run in case["runs"]:
        ids = torch.tensor(run["prompt"])
        assert_dualcache(generate(dream, ids, cfg), decode_generate(dream, ids, dual), ids.shape[1], cfg.eos_id,
                         cfg.mask_id)


@pytest.mark.parametrize("quirks", [False, True])
@settings(max_examples=6)
@given(prompt=prompts, sizes=st.sampled_from([[4, 8, 16], [2, 4, 8, 16], [4, 16]]), sync=st.sampled_from([0, 2, 8]))
def test_merge_keeps_committed_tokens_and_sync_bounds_the_lag(random_dream, quirks, prompt, sizes, sync):
    """On Dream, with either generator's rules: a merge fills only masks of its destination, and
    after a merge-and-sync no active branch trails the leader by more than sync_threshold."""
    decode_checking_merges_and_syncs(random_dream, prompt, sizes, sync, quirks=quirks)


@pytest.mark.parametrize("quirks", [False, True])
@settings(max_examples=4)
@given(prompt=prompts, starts=st.lists(st.integers(0, 7), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batched_block_step_equals_each_branch_alone(prompt, starts, dtype, quirks):
    """The padded batched forward gives every branch the logits of its block that its own window
    gives alone, against its own cache row: [s-1, e) by default, [s-1, e-1) under the quirk."""
    model = make_dream(2, dtype)
    bb = branches_on_different_blocks(model, prompt, starts, quirks)
    alone = []
    for i in range(3):
        one = KVCache.for_model(model.config, batch=1, capacity=bb.L, dtype=dtype)
        one.k.copy_(bb.cache.k[:, i:i + 1])
        one.v.copy_(bb.cache.v[:, i:i + 1])
        s, e = bb.start[i], bb.end[i]
        stop = e - 1 if quirks else e
        with torch.no_grad():
            alone.append(model(bb.canvas[i:i + 1, s - 1:stop], positions=torch.arange(s - 1, stop), cache=one,
                               logits_range=(1, e - s + 1))[0])  # (K_i, V)
    queries, targets = bb.block_positions([0, 1, 2])  # (3, Q), (3, K)
    with torch.no_grad():
        batched = bb.forward([0, 1, 2], queries, (1, 1 + targets.shape[1]), real_tokens=14)  # (3, K, V)
    for i in range(3):
        ref = alone[i]
        tol = (1e-5 if dtype == torch.float32 else 1e-12) * max(1.0, float(ref.abs().max()))
        assert torch.allclose(batched[i, :ref.shape[0]], ref, atol=tol, rtol=0)
        assert targets[i, :ref.shape[0]].tolist() == list(range(bb.start[i], bb.end[i]))


@pytest.mark.parametrize("quirks", [False, True])
def test_every_block_position_is_predicted_from_fresh_keys(quirks):
    """One layer, so every cached key and value depends only on its own token: a block step is
    then exact wherever the cache holds each position's current token. The default window [s-1, e)
    recomputes the whole block, so after commits anywhere in it (the last position included) its
    logits equal a full forward's. The original's [s-1, e-1) leaves the last position's keys from
    the mask that stood there, and its logits differ."""
    model = make_dream(1, torch.float64)
    bb = branches_on_different_blocks(model, [3, 4, 5], [1, 1, 1], quirks)
    with torch.no_grad():
        bb.full_forward([0, 1, 2], init=False)  # each cache row holds its own moved canvas
    i, s, e = 2, bb.start[2], bb.end[2]  # the block of 8
    bb.canvas[i, s + 2] = 11
    bb.canvas[i, e - 1] = 12
    queries, targets = bb.block_positions([i])
    with torch.no_grad():
        step = bb.forward([i], queries, (1, 1 + targets.shape[1]), real_tokens=e - s)[0]  # (K, V)
        full = model(bb.canvas[i:i + 1])[0, s:e]  # (K, V)
    assert torch.allclose(step, full, atol=1e-9, rtol=0) != quirks
