"""blockbatch.py: token- and NFE-exact parity with the original BlockBatch generators, and the
properties the method rests on (a degenerate case equals DualCache, merges keep committed tokens,
syncs bound the lag, the batched step equals each branch's forward alone)."""

import dataclasses
import os

import pytest
import torch
from conftest import golden_cases, needs_golden
from hypothesis import given, settings
from hypothesis import strategies as st

import blockbatch as bbm
from blockbatch import BlockBatchConfig, generate
from cache import KVCache
from decode import DecodeConfig, Quirks
from decode import generate as decode_generate

# The float32 padded cases, and the small cases that have no bf16 (varlen) twin.
PARITY = [c for c in golden_cases(["bb_"]) if c.id.endswith("_fp32pad") or c.id in
          ("bb_bulk_8_g32", "bb_bulk_8_g32_rb8", "bb_rms_8_g32")]

# One run decides an rms refresh on a float near-tie (see test_rms_near_tie): the original's
# float32 test reads max r^2 = 5.027e-05 against a bound of 5.043e-05 at its second step, where
# the exact values are 5.0272059e-05 and 5.0272379e-05 (a relative gap of 6e-6) and our float32
# rounding (keys stored after RoPE) gives a bound of 5.0217e-05, so we refresh and it does not.
NEAR_TIE = {("bb_rms_4-8-16_g32_fp32pad", 0)}


def config_for_case(case, model, **quirks_off):
    """The original's kwargs and its quirks, less the ones named (as quirk=False)."""
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "attn"}
    variant = "rms" if case["case"].startswith("bb_rms") else "bulk"
    quirks = dataclasses.replace(Quirks.original(), **quirks_off)
    return BlockBatchConfig.for_model(model.config, mask_id=case["mask_id"], generator_variant=variant,
                                      quirks=quirks, **kwargs)


def check_run(out, run, sizes):
    assert out.ids.tolist() == run["output_ids"]
    assert out.nfe == run["batched_forwards"]
    assert out.extras["winner_block_size"] == run["winner_block_size"]
    assert out.masks_left == run["masks_left"]
    for i, b in enumerate(sizes):  # every branch's final canvas, not only the winner's
        assert out.extras["branch_ids"][i].tolist() == run["branch_rows"][str(b)]
    events = run["events"]
    assert out.extras["syncs"] == sum(e["ev"] == "sync" for e in events)
    assert out.extras["merges"] == sum(e["ev"] == "merge" for e in events)
    assert out.extras["refreshes"] == sum(e["ev"] == "forward" and e["kind"] == "full" for e in events) - 1


@needs_golden
@pytest.mark.parametrize("case", PARITY)
def test_golden_parity(tiny_model, case):
    """Same tokens, same batched forwards, same winner, same branch rows, merges, syncs, refreshes."""
    cfg = config_for_case(case, tiny_model)
    for i, run in enumerate(case["runs"]):
        if (case["case"], i) in NEAR_TIE:
            continue
        check_run(generate(tiny_model, torch.tensor(run["prompt"]), cfg), run, cfg.block_sizes)


@needs_golden
def test_rms_near_tie(tiny_model):
    """The near-tie run: the float32 divergence test sits 6e-6 (relative) from its bound, so which
    branch float32 takes depends on the machine's rounding (on some CPUs it refreshes where the
    original did not; that is not asserted either way). Deciding the same test exactly (float64,
    no cancellation) takes the original's branch and matches it on any machine."""
    (case,) = [c.values[0] for c in PARITY if c.id == "bb_rms_4-8-16_g32_fp32pad"]
    run = case["runs"][0]
    cfg = config_for_case(case, tiny_model, blockbatch_float32_divergence=False)
    check_run(generate(tiny_model, torch.tensor(run["prompt"]), cfg), run, cfg.block_sizes)


# ---------------------------------------------------------------------------------------------
# Properties (random small model; hypothesis draws prompts, sizes and settings)
# ---------------------------------------------------------------------------------------------

prompts = st.lists(st.integers(0, 46), min_size=1, max_size=6)


@settings(max_examples=8)
@given(prompt=prompts, block=st.sampled_from([4, 8]), threshold=st.sampled_from([0.3, 0.7, 0.9]))
def test_single_branch_with_refresh_every_block_is_dualcache(random_model, prompt, block, threshold):
    """One branch refreshed at every block is Fast-dLLM DualCache + threshold at that block size
    (a full forward at each block start, then block-only forwards). An EOS exit stops earlier:
    then every token it returned is DualCache's."""
    G = 16
    cfg = BlockBatchConfig.for_model(random_model.config, gen_length=G, block_sizes=[block], threshold=threshold,
                                     refresh_block_size=block)
    ids = torch.tensor([prompt])
    out = generate(random_model, ids, cfg)
    ref = decode_generate(random_model, ids, DecodeConfig.for_model(
        random_model.config, gen_length=G, block_length=block, steps=G, threshold=threshold, cache="dual"))
    if out.extras["exit"] == "natural":
        assert torch.equal(out.ids, ref.ids) and out.nfe == ref.nfe
    else:  # stopped at an EOS: what it decided up to that EOS is DualCache's, in no more forwards
        gen = out.generated[0].tolist()
        cut = len(prompt) + gen.index(cfg.eos_id) + 1
        decided = out.ids[:, :cut] != cfg.mask_id
        assert torch.equal(out.ids[:, :cut][decided], ref.ids[:, :cut][decided]) and out.nfe <= ref.nfe
        assert set(gen[cut - len(prompt):]) <= {cfg.eos_id}  # after it, EOS (the original leaves masks)


@needs_golden
def test_single_branch_golden_case_is_dualcache(tiny_model):
    """The golden single-branch case refreshed every block is DualCache + threshold 0.9, block 8."""
    (case,) = [c.values[0] for c in PARITY if c.id == "bb_bulk_8_g32_rb8"]
    cfg = DecodeConfig.for_model(tiny_model.config, gen_length=32, block_length=8, steps=32, threshold=0.9,
                                 cache="dual", mask_id=case["mask_id"])
    for run in case["runs"]:
        out = decode_generate(tiny_model, torch.tensor(run["prompt"]), cfg)
        assert out.ids.tolist() == run["output_ids"] and out.nfe == run["batched_forwards"]


def traced(monkeypatch, name, check):
    """Wrap BlockBatch.<name> so that `check(bb, args, canvases before, result)` runs after each call."""
    original = getattr(bbm.BlockBatch, name)

    def wrapped(bb, *args):
        before = bb.canvas.clone()
        result = original(bb, *args)
        check(bb, args, before, result)
        return result

    monkeypatch.setattr(bbm.BlockBatch, name, wrapped)


def decode_checking_merges_and_syncs(model, prompt, sizes, sync, **settings):
    """BlockBatch on `prompt` (G = 32, threshold 0.7) with every merge and sync checked as it
    happens: a merge fills only masks of its destination branch and touches no other branch, and
    after a merge-and-sync no active branch trails the leader by more than sync_threshold."""
    mask = model.config.mask_token_id
    seen = {"merge": 0, "sync": 0}

    def merge_check(bb, args, before, filled):
        dst = args[0]
        committed = before[dst] != mask
        assert torch.equal(bb.canvas[dst][committed], before[dst][committed])  # never changes a token
        assert int(((before[dst] == mask) & (bb.canvas[dst] != mask)).sum()) == filled
        changed_rows = (bb.canvas != before).any(1)
        assert changed_rows.sum() <= 1 and (not changed_rows.any() or changed_rows[dst])
        seen["merge"] += 1

    def sync_check(bb, args, before, synced):
        leader = bb.leader()
        for i in bb.active():
            assert bb.decoded[leader] - bb.decoded[i] <= sync  # nobody trails by more than the threshold
        seen["sync"] += 1

    with pytest.MonkeyPatch.context() as mp:
        traced(mp, "merge_into", merge_check)
        traced(mp, "merge_and_sync", sync_check)
        cfg = BlockBatchConfig.for_model(model.config, gen_length=32, block_sizes=sizes, threshold=0.7,
                                         sync_threshold=sync, **settings)
        out = generate(model, torch.tensor([prompt]), cfg)
    assert seen["sync"] > 0
    assert out.ids.shape == (1, len(prompt) + 32)


@settings(max_examples=8)
@given(prompt=prompts, sizes=st.sampled_from([[4, 8, 16], [2, 4, 8, 16], [4, 16]]),
       variant=st.sampled_from(["bulk", "rms"]), sync=st.sampled_from([0, 2, 8]))
def test_merge_keeps_committed_tokens_and_sync_bounds_the_lag(random_model, prompt, sizes, variant, sync):
    decode_checking_merges_and_syncs(random_model, prompt, sizes, sync, generator_variant=variant)


def test_every_committed_token_carries_its_confidence():
    """Whether a branch committed a token itself, took it by a merge or copied it in a sync, the
    confidence the EOS exit reads for it is the one it was accepted with, never 0 or another
    token's. Checked after every merge-and-sync, on runs of the shipped `mix` checkpoint that
    merge and sync (two `long` problems, both variants)."""
    from conftest import ROOT
    from model import load_model
    from tools import task

    model = load_model(os.path.join(ROOT, "checkpoints", "mix"), device="cpu")
    mask = model.config.mask_token_id
    seen = {"merges": 0, "syncs": 0}

    def check(bb, args, before, result):
        for i in bb.everyone:
            committed = bb.canvas[i, bb.P:] != mask  # (G,)
            assert (bb.commit_conf[i, bb.P:][committed] > 0).all(), (i, bb.canvas[i, bb.P:], bb.commit_conf[i, bb.P:])

    with pytest.MonkeyPatch.context() as mp:
        traced(mp, "merge_and_sync", check)
        for problem in task.FAMILIES["long"].test_set(2):
            for variant in ("bulk", "rms"):
                cfg = BlockBatchConfig.for_model(model.config, gen_length=64, block_sizes=[4, 8, 16, 32, 64],
                                                 generator_variant=variant)
                out = generate(model, torch.tensor([task.encode(problem.prompt)]), cfg)
                seen["merges"] += out.extras["merges"]
                seen["syncs"] += out.extras["syncs"]
    assert seen["merges"] > 0 and seen["syncs"] > 0, seen  # both paths were taken


def branches_on_different_blocks(model, prompt, starts, quirks=False):
    """A BlockBatch after its init forward, its three branches moved to different blocks with
    different tokens before them."""
    cfg = BlockBatchConfig.for_model(model.config, gen_length=32, block_sizes=[2, 4, 8], threshold=0.5, quirks=quirks)
    bb = bbm.with_quirks(cfg, model.logit_shift)(model, torch.tensor([prompt]), cfg)
    with torch.no_grad():
        bb.full_forward([0, 1, 2], init=True)
    for i, s in enumerate(starts):
        b = bb.sizes[i]
        bb.start[i] = bb.P + (s * b) % 32
        bb.end[i] = bb.start[i] + b
        bb.canvas[i, bb.P:bb.start[i]] = 7 + i
    return bb


@settings(max_examples=6)
@given(prompt=prompts, starts=st.lists(st.integers(0, 7), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batched_block_step_equals_each_branch_alone(random_model, prompt, starts, dtype):
    """The padded batched forward (trash slot for padding) gives every branch the logits its own
    block forward gives alone, against its own cache row."""
    model = random_model.to(dtype)
    try:
        bb = branches_on_different_blocks(model, prompt, starts)
        alone = []
        for i in range(3):
            one = KVCache.for_model(model.config, batch=1, capacity=bb.L, dtype=dtype)
            one.k.copy_(bb.cache.k[:, i:i + 1])
            one.v.copy_(bb.cache.v[:, i:i + 1])
            s, e = bb.start[i], bb.end[i]
            with torch.no_grad():
                alone.append(model(bb.canvas[i:i + 1, s:e], positions=torch.arange(s, e), cache=one)[0])  # (K_i, V)
        queries, targets = bb.block_positions([0, 1, 2])  # (3, Q), (3, K)
        with torch.no_grad():
            batched = bb.forward([0, 1, 2], queries, (0, targets.shape[1]), real_tokens=14)  # (3, K, V)
        for i in range(3):
            ref = alone[i]
            tol = (1e-5 if dtype == torch.float32 else 1e-12) * max(1.0, float(ref.abs().max()))
            assert torch.allclose(batched[i, :ref.shape[0]], ref, atol=tol, rtol=0)
    finally:
        random_model.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Settings, errors and the quirk flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_sizes=[4, 6]), "not divisible by block size 6"),
    (dict(block_sizes=[]), "non-empty"),
    (dict(block_sizes=[4, 4]), "duplicates"),
    (dict(threshold=0.0), "threshold"),
    (dict(generator_variant="mean"), "generator_variant"),
    (dict(sync_threshold=-1), "sync_threshold"),
    (dict(refresh_block_size=0), "refresh_block_size"),
    (dict(remasking="top"), "remasking"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockBatchConfig(gen_length=32, **{"block_sizes": [4, 8], **kwargs})


def test_block_sizes_are_sorted():
    assert BlockBatchConfig(gen_length=32, block_sizes=[16, 4, 8]).block_sizes == (4, 8, 16)


def test_one_request_at_a_time(random_model):
    cfg = BlockBatchConfig.for_model(random_model.config, gen_length=16, block_sizes=[4, 8])
    with pytest.raises(ValueError, match="one request at a time"):
        generate(random_model, torch.tensor([[1, 2], [3, 4]]), cfg)


def test_left_padding_is_dropped(random_model):
    cfg = BlockBatchConfig.for_model(random_model.config, gen_length=16, block_sizes=[4, 8])
    plain = generate(random_model, torch.tensor([[5, 6, 7]]), cfg)
    padded = generate(random_model, torch.tensor([[48, 48, 5, 6, 7]]), cfg, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    assert torch.equal(plain.ids, padded.ids) and plain.nfe == padded.nfe


@needs_golden
def test_eos_exit_quirks(tiny_model):
    """The golden EOS exit returns masks after the EOS (the original's quirk); without it they
    become EOS, and the branch choice by commit confidence still returns a branch with a
    complete EOS block."""
    (case,) = [c.values[0] for c in PARITY if c.id == "bb_bulk_4-8-16_g64_fp32pad"]
    run = case["runs"][0]
    assert run["masks_left"] > 0
    out = generate(tiny_model, torch.tensor(run["prompt"]), config_for_case(case, tiny_model, blockbatch_masks_after_eos=False))
    assert out.masks_left == 0
    eos = case["runs"][0]["stats"]["final_eos_position"]
    assert out.ids[0, :eos + 1].tolist() == run["output_ids"][0][:eos + 1]
    assert (out.ids[0, eos:] == tiny_model.config.eos_token_id).all()
    alt = generate(tiny_model, torch.tensor(run["prompt"]),
                   config_for_case(case, tiny_model, blockbatch_eos_prob_last_forward=False))
    assert (alt.generated == tiny_model.config.eos_token_id).any()


def test_natural_exit_returns_the_leader(random_model):
    """A natural exit returns the branch that decoded most itself; the original (quirk) returns
    the smallest block size. eos_id 0 is never predicted here, so every run exits naturally."""
    for prompt in ([5, 6, 7], [1, 2], [9, 8, 7, 6]):
        for quirks in (False, True):
            cfg = BlockBatchConfig.for_model(random_model.config, gen_length=16, block_sizes=[2, 8], eos_id=0, quirks=quirks)
            with torch.no_grad():
                run = bbm.with_quirks(cfg)(random_model, torch.tensor([prompt]), cfg)
                winner, exit = bbm.bulk(run)
            assert exit == "natural"
            assert winner == (0 if quirks else run.leader())
