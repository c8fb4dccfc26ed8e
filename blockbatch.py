"""
BlockBatch: the block size as a branch dimension, every branch advanced by one batched forward.

No single block size is best for every answer. BlockBatch ("BlockBatch", arXiv 2605.29233;
original code Laurence-Wu/BlockBatch, the `bulk` and `refresh_dominent_RMS` generators) runs one
request as N rows of a batch, one per block size (4 ... 128). Each step is ONE batched forward in
which every branch feeds its current block, at its own positions, against its own KV-cache row,
and commits by the threshold rule. Between forwards a branch takes tokens other branches
committed when its own stored probabilities agree (confidence-gated merge); a branch more than
`sync_threshold` tokens behind the leader is overwritten by it (sync); stale cache rows are
re-anchored by a batched full forward, periodically (`bulk`) or when the rows' K/V drift apart
(`rms`). NFE counts batched forwards. This is the one method outside decode.py's loop (branches,
merges, syncs and an exit chosen among branches are not a rule of one sequence); every step piece
is decode.py's (`model_forward`, `draw_noise`, `propose`, `select_threshold`, `finish_at_eos`).

Changed from the original: no monkey-patching or flash-attn; ragged blocks are padded with the
cache's trash slot (`block_positions` weighs padding against packing); one request per call. Its
quirks are reproduced by default, the sensible behaviour behind flags (`BlockBatchConfig`).

    cfg = BlockBatchConfig.for_model(model.config, gen_length=256, generator_variant="bulk")
    out = generate(model, prompt_ids, cfg)   # out.ids (1, P + G), out.nfe, out.extras["winner_block_size"]

Shape legend: N branches (cache rows), R rows of one forward, P prompt, G generation, L = P + G,
Q query tokens of a forward, K a block, J top tokens stored per position, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import decode
from cache import KVCache

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

GENERATORS = ("bulk", "rms")
PROB_FLOOR = 0.1  # the original stores, per position, only tokens with probability above this
TOP_K = 9  # at most 9 tokens can each have probability > 0.1, so 9 slots store them all


@dataclass
class BlockBatchConfig:
    """BlockBatch settings, named as the original generator's keyword arguments."""

    gen_length: int = 256  # G, tokens to generate
    block_sizes: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # one branch per size; each divides G
    threshold: float = 0.9  # commit every proposal with confidence >= threshold (and the best one)
    temperature: float = 0.0  # 0 = argmax; > 0 = Gumbel-max sampling (decode.propose)
    remasking: str = "low_confidence"  # confidence = prob. of the proposal, or 'random' (uniform)
    refresh_block_size: int = 32  # bulk: refresh every active row once a branch has advanced this
    #   many tokens (counted as blocks advanced x block size); unused by 'rms', as in the original
    sync_threshold: int = 8  # a branch more than this many decoded tokens behind the leader copies it
    conf_threshold: float = 0.5  # merge: take another branch's token where our own stored
    #   probability of that token exceeds this
    generator_variant: str = "bulk"  # 'bulk' (periodic refresh) or 'rms' (divergence-triggered)
    mask_id: int | None = None  # [MASK] id (default: the model config's mask_token_id)
    eos_id: int | None = None  # end-of-text id, for the EOS exit (default: the model config's)
    # The original's quirks, reproduced by default (True / False as marked), each with the
    # sensible behaviour on the other side:
    smallest_wins_natural_exit: bool = True  # a natural exit returns the smallest block size
    #   (the original takes max(progress), and every branch has progress G); False = the branch
    #   that decoded the most tokens itself (the leader)
    eos_prob_from_last_forward: bool = True  # the EOS exit compares branches by P(EOS) read from
    #   the last forward at the EOS position, often already decoded there (in bfloat16); False =
    #   the confidence with which the EOS was committed
    exact_divergence: bool = False  # rms: decide the refresh test in float64 without the
    #   original's float32 cancellation (see `divergence`; near ties can then decide differently)
    fill_after_eos: bool = False  # after an EOS exit the original returns the masks after it;
    #   True = positions after the first EOS become EOS

    def __post_init__(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("gen_length", self.gen_length)
        if isinstance(self.block_sizes, int) or not self.block_sizes:
            raise ValueError(f"block_sizes must be a non-empty list of integers, got {self.block_sizes!r}")
        for b in self.block_sizes:
            positive_int("every block size", b)
            if self.gen_length % b != 0:
                raise ValueError(f"gen_length {self.gen_length} is not divisible by block size {b}")
        if len(set(self.block_sizes)) != len(self.block_sizes):
            raise ValueError(f"block_sizes has duplicates (two identical branches): {list(self.block_sizes)}")
        self.block_sizes = tuple(sorted(self.block_sizes))  # the original sorts ascending
        decode.check_finite("threshold", self.threshold, low=0, high=1, low_open=True)
        decode.check_finite("temperature", self.temperature, low=0)
        decode.check_finite("conf_threshold", self.conf_threshold, low=0, high=1)
        if self.remasking not in decode.REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {decode.REMASKING}")
        positive_int("refresh_block_size", self.refresh_block_size)
        if isinstance(self.sync_threshold, bool) or not isinstance(self.sync_threshold, int) or self.sync_threshold < 0:
            raise ValueError(f"sync_threshold must be an integer >= 0, got {self.sync_threshold!r}")
        if self.generator_variant not in GENERATORS:
            raise ValueError(f"unknown generator_variant {self.generator_variant!r}; use one of {GENERATORS}")

    @classmethod
    def for_model(cls, model_config, **kwargs) -> "BlockBatchConfig":
        """Settings whose special ids default to the model config's (mask, EOS)."""
        kwargs.setdefault("mask_id", model_config.mask_token_id)
        kwargs.setdefault("eos_id", model_config.eos_token_id)
        return cls(**kwargs)

    def decode_config(self) -> decode.DecodeConfig:
        """The per-step settings in decode.py's terms (one block of G: the block grid is ours)."""
        return decode.DecodeConfig(gen_length=self.gen_length, block_length=self.gen_length, steps=self.gen_length,
                                   temperature=self.temperature, remasking=self.remasking, mask_id=self.mask_id,
                                   eos_id=self.eos_id, threshold=self.threshold)


# ---------------------------------------------------------------------------------------------
# The branch set: per-branch canvases, cache rows, windows and counters
# ---------------------------------------------------------------------------------------------


@dataclass
class Branches:
    """N branches of one request. Rows of `x` and of the cache belong to one branch each, and move
    between branches only through merge (tokens) and sync (tokens and K/V). The policy state is
    Python lists: the original's policy is sequential (merges go branch by branch in a fixed
    order), N is at most a handful, and the forward and commits stay batched tensors."""

    x: torch.Tensor  # (N, L) one canvas per branch
    cache: KVCache  # (Nl, N, Hkv, S, D) one K/V row per branch
    P: int  # prompt length
    sizes: list[int]  # block size of each branch, ascending
    start: list[int]  # current block [start, end) on the branch's own grid
    end: list[int]
    done: list[bool]  # no mask left
    decoded: list[int]  # tokens this branch committed (+ merged, rms; = leader's after a sync)
    top_tok: torch.Tensor  # (N, L + 1, J) stored top tokens per position (slot L: trash)
    top_p: torch.Tensor  # (N, L + 1, J) their probabilities, 0 where <= 0.1
    commit_conf: torch.Tensor  # (N, L) the confidence each committed token had
    hit_eos: list[bool] = field(default_factory=list)  # a complete block held an EOS
    eos_prob: list[float] = field(default_factory=list)  # its probability (see the config flag)
    advanced: list[int] = field(default_factory=list)  # bulk: blocks advanced since the last refresh
    needs_refresh: list[bool] = field(default_factory=list)  # bulk: this branch asks for a refresh
    counts: dict = field(default_factory=lambda: {"merges": 0, "merged_tokens": 0, "syncs": 0, "refreshes": 0})

    @property
    def N(self) -> int:
        return self.x.shape[0]

    @property
    def L(self) -> int:
        return self.x.shape[1]

    def active(self) -> list[int]:
        return [i for i in range(self.N) if not self.done[i]]

    def block_has_mask(self, i: int, mask_id: int) -> bool:
        return bool((self.x[i, self.start[i]:self.end[i]] == mask_id).any())

    def snap_window(self, i: int, mask_id: int) -> None:
        """Move branch i to the block, on its own grid, holding its first remaining mask (the
        original's update_block_window); with no mask left the branch is done."""
        masks = (self.x[i, self.P:] == mask_id).nonzero()
        if len(masks) == 0:
            self.done[i], self.start[i], self.end[i] = True, self.L, self.L
            return
        b = self.sizes[i]
        self.start[i] = self.P + int(masks[0]) // b * b
        self.end[i] = min(self.start[i] + b, self.L)

    def leader(self) -> int:
        """The branch that decoded the most tokens (the first on ties, done branches included)."""
        return max(range(self.N), key=lambda i: self.decoded[i])


def init_branches(model, prompt: torch.Tensor, config: BlockBatchConfig) -> Branches:
    """The canvases (prompt + G masks per branch), the N-row cache and empty probability stores."""
    N, P, device = len(config.block_sizes), prompt.shape[1], model.device
    L = P + config.gen_length
    x = torch.full((N, L), config.mask_id, dtype=torch.long, device=device)  # (N, L)
    x[:, :P] = prompt.to(device)
    cache = KVCache.for_model(model.config, batch=N, capacity=L, device=device, dtype=model.dtype)
    J = min(TOP_K, model.config.embedding_size)
    return Branches(
        x=x, cache=cache, P=P, sizes=list(config.block_sizes),
        start=[P] * N, end=[P + b for b in config.block_sizes], done=[False] * N, decoded=[0] * N,
        top_tok=torch.zeros((N, L + 1, J), dtype=torch.long, device=device),  # (N, L + 1, J)
        top_p=torch.zeros((N, L + 1, J), dtype=torch.float32, device=device),  # (N, L + 1, J)
        commit_conf=torch.zeros((N, L), dtype=torch.float64, device=device),  # (N, L)
        hit_eos=[False] * N, eos_prob=[0.0] * N, advanced=[0] * N, needs_refresh=[False] * N)


# ---------------------------------------------------------------------------------------------
# Forwards: one batched call over a set of branch rows, counted in one place
# ---------------------------------------------------------------------------------------------


class Counter:
    """NFE (one batched forward = one) and the tokens pushed through the model."""

    def __init__(self):
        self.nfe = 0
        self.query_tokens = 0  # tokens the forwards computed, padding included (what a CPU pays)
        self.packed_tokens = 0  # real query tokens only (what a variable-length kernel computes)


def block_positions(bb: Branches, rows: list[int]) -> torch.Tensor:
    """Each row's current block as query positions, padded to the longest with the trash slot.

    Padding vs. packing: the original packs the ragged blocks (4 + 8 + ... + 128 = 252 tokens)
    and runs a variable-length attention kernel, so it computes only real tokens. Plain PyTorch
    attention needs a rectangle, so we pad every row to the longest block (6 x 128 = 768 query
    tokens with the default sizes): up to 3x the projection/MLP work, all of it thrown away, but
    one ordinary batched forward. Padded queries write their K/V to the cache's trash slot, which
    attention never reads, so they change nothing. Packing the linear layers alone (only attention
    needs the rows) would remove most of the waste at the price of gather/scatter code in the
    model; on a GPU the padded rectangle is often nearly free, on a CPU it is paid in full.
    A done row (rms sends every row, as the original does) queries only trash.
    """
    lengths = [bb.end[i] - bb.start[i] for i in rows]
    Q = max(max(lengths), 1)
    offsets = torch.arange(Q, device=bb.x.device)  # (Q,)
    pos = torch.tensor([bb.start[i] for i in rows], device=bb.x.device)[:, None] + offsets  # (R, Q)
    stop = torch.tensor([bb.end[i] for i in rows], device=bb.x.device)[:, None]  # (R, 1)
    return torch.where(pos < stop, pos, bb.cache.trash)  # (R, Q)


def run_forward(model, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, head, dcfg, counter: Counter,
                real_tokens: int) -> torch.Tensor:
    """One batched forward of canvases x (R, L) at `positions` ((Q,) shared or (R, Q) per row),
    writing K/V into `cache` (one row per canvas); logits of the query indices `head`, (R, Q', V).
    NFE and tokens are counted here and nowhere else."""
    state = decode.DecodeState(x=x, P=0, start=None, end=None, cache=cache)
    logits = decode.model_forward(model, state, dcfg, positions, head)  # (R, Q', V)
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"non-finite logits at forward {counter.nfe + 1}: the model overflowed its "
                                 f"dtype ({model.dtype}) or its weights are bad")
    counter.nfe += 1
    counter.query_tokens += x.shape[0] * positions.shape[-1]
    counter.packed_tokens += real_tokens
    return logits


def sub_cache(bb: Branches, rows: list[int], copy_in: bool) -> KVCache:
    """A cache for a forward over some of the branch rows: the branch cache itself when every row
    takes part, else one with those rows (copied in unless the forward rewrites every position;
    `put_back` writes them home afterwards)."""
    if rows == list(range(bb.N)):
        return bb.cache
    c = bb.cache
    sub = KVCache(c.k.shape[0], len(rows), c.k.shape[2], c.k.shape[4], c.length, device=c.k.device, dtype=c.k.dtype)
    if copy_in:
        index = torch.tensor(rows, device=bb.x.device)
        sub.k.copy_(c.k.index_select(1, index))
        sub.v.copy_(c.v.index_select(1, index))
    return sub


def put_back(bb: Branches, rows: list[int], sub: KVCache) -> None:
    """Write a sub-cache's rows back, each to its own branch row (nothing to do for the branch cache)."""
    if sub is not bb.cache:
        index = torch.tensor(rows, device=bb.x.device)
        bb.cache.k.index_copy_(1, index, sub.k)
        bb.cache.v.index_copy_(1, index, sub.v)


# ---------------------------------------------------------------------------------------------
# Per-branch updates after a forward: stored probabilities, threshold commits, EOS
# ---------------------------------------------------------------------------------------------


def store_probs(bb: Branches, rows: list[int], logits: torch.Tensor, lpos: torch.Tensor) -> None:
    """Overwrite the stored probabilities at the forward's positions with this forward's: each
    position keeps its tokens above 0.1 (float32 softmax, as the original's dicts). The merge
    reads them. lpos (R, Q) canvas positions of the logits, trash for padding."""
    probs = F.softmax(logits.float(), dim=-1)  # (R, Q, V)
    p, tok = probs.topk(bb.top_tok.shape[-1], dim=-1)  # (R, Q, J) each
    p = torch.where(p > PROB_FLOOR, p, torch.zeros_like(p))
    index = torch.tensor(rows, device=bb.x.device)[:, None].expand_as(lpos)  # (R, Q)
    bb.top_tok[index, lpos] = tok
    bb.top_p[index, lpos] = p


def block_noise(config: BlockBatchConfig, dcfg, generator, lengths: list[int], offsets: list[int], Q: int, V: int,
                device) -> decode.Noise:
    """Random numbers for the rows' commits, drawn per branch over its block only (the original
    calls its sampler once per branch), placed at each row's offset in the (R, Q) layout."""
    noise = decode.Noise()
    if config.temperature == 0 and config.remasking != "random":
        return noise
    R = len(lengths)
    if config.temperature > 0:
        noise.gumbel = torch.ones((R, Q, V), dtype=torch.float64, device=device)  # (R, Q, V)
    if config.remasking == "random":
        noise.uniform = torch.zeros((R, Q), dtype=torch.float64, device=device)  # (R, Q)
    for r, (k, o) in enumerate(zip(lengths, offsets)):
        one = decode.draw_noise(dcfg, generator, (1, k, V), (0, k), extra_draw=False, device=device)
        if one.gumbel is not None:
            noise.gumbel[r, o:o + k] = one.gumbel[0]
        if one.uniform is not None:
            noise.uniform[r, o:o + k] = one.uniform[0]
    return noise


def commit_blocks(bb: Branches, rows: list[int], logits: torch.Tensor, lpos: torch.Tensor, config, dcfg,
                  generator) -> torch.Tensor:
    """Threshold commits inside each row's current block (at least one token where any is
    masked), vectorized over the rows. logits (R, Q, V) at canvas positions lpos (R, Q)."""
    start = torch.tensor([bb.start[i] for i in rows], device=bb.x.device)[:, None]  # (R, 1)
    end = torch.tensor([bb.end[i] for i in rows], device=bb.x.device)[:, None]  # (R, 1)
    index = torch.tensor(rows, device=bb.x.device)
    x = bb.x[index]  # (R, L)
    in_block = (lpos >= start) & (lpos < end)  # (R, Q); trash is never inside
    eligible = in_block & (x.gather(1, lpos.clamp(max=bb.L - 1)) == config.mask_id)  # (R, Q)
    # Where each row's block starts in the logits, and its length, for per-branch noise.
    offsets = in_block.int().argmax(1).tolist()
    lengths = [bb.end[i] - bb.start[i] for i in rows]
    noise = block_noise(config, dcfg, generator, lengths, offsets, lpos.shape[1], logits.shape[-1], bb.x.device)
    x0, conf = decode.propose(logits, eligible, dcfg, noise)  # (R, Q) each
    commit = decode.select_threshold(conf, config.threshold)  # (R, Q)
    r, c = commit.nonzero(as_tuple=True)
    bb.x[index[r], lpos[r, c]] = x0[r, c]
    bb.commit_conf[index[r], lpos[r, c]] = conf[r, c]
    for j, n in zip(rows, commit.sum(1).tolist()):
        bb.decoded[j] += n
    return commit


def check_eos(bb: Branches, rows: list[int], logits: torch.Tensor, lpos: torch.Tensor, config) -> None:
    """A branch whose current block is complete and holds an EOS has hit EOS; remember the EOS
    probability the exit compares branches by (the original reads it from this forward's
    logits, in bfloat16, at the first EOS of the block, which may have been decoded long ago)."""
    for r, i in enumerate(rows):
        s, e = bb.start[i], bb.end[i]
        block = bb.x[i, s:e]
        if e <= s or bool((block == config.mask_id).any()) or not bool((block == config.eos_id).any()):
            continue
        at = s + int((block == config.eos_id).int().argmax())
        bb.hit_eos[i] = True
        if config.eos_prob_from_last_forward:
            q = int((lpos[r] == at).int().argmax())
            bb.eos_prob[i] = float(F.softmax(logits[r, q].to(torch.bfloat16), dim=-1)[config.eos_id])
        else:
            bb.eos_prob[i] = float(bb.commit_conf[i, at])


# ---------------------------------------------------------------------------------------------
# The steps: init, batched block step, full refresh
# ---------------------------------------------------------------------------------------------


def full_forward(model, bb: Branches, rows: list[int], config, dcfg, generator, counter, init: bool) -> None:
    """A full forward re-anchors the rows' caches: the whole canvas goes in, every position's K/V
    is rewritten. At init it is one row (branch 0's canvas, identical for all) whose K/V go to
    every branch's cache row; every branch then commits in its first block from the shared
    logits. At a refresh every listed row runs its own canvas and commits in its current block.
    The stored probabilities of the whole generation are replaced. `rms` checks EOS here too."""
    L, P = bb.L, bb.P
    positions = torch.arange(L, device=bb.x.device)  # (L,)
    if init:
        one = sub_cache(bb, [0], copy_in=False)  # the branch cache itself when N = 1
        logits = run_forward(model, bb.x[:1], one, positions, (P, L), dcfg, counter, real_tokens=L)  # (1, G, V)
        if one is not bb.cache:
            bb.cache.k.copy_(one.k.expand_as(bb.cache.k))  # the same K/V in every branch row
            bb.cache.v.copy_(one.v.expand_as(bb.cache.v))
        logits = logits.expand(len(rows), -1, -1)  # (N, G, V) shared
    else:
        sub = sub_cache(bb, rows, copy_in=False)
        index = torch.tensor(rows, device=bb.x.device)
        logits = run_forward(model, bb.x[index], sub, positions, (P, L), dcfg, counter,
                             real_tokens=len(rows) * L)  # (R, G, V)
        put_back(bb, rows, sub)
        bb.counts["refreshes"] += 1
    lpos = torch.arange(P, L, device=bb.x.device).expand(len(rows), -1)  # (R, G)
    store_probs(bb, rows, logits, lpos)
    commit_blocks(bb, rows, logits.clone(), lpos, config, dcfg, generator)
    if config.generator_variant == "rms":
        check_eos(bb, rows, logits, lpos, config)
    for i in rows:
        bb.advanced[i], bb.needs_refresh[i] = 0, False


def block_step(model, bb: Branches, rows: list[int], config, dcfg, generator, counter) -> None:
    """The step of the method: ONE batched forward in which each listed branch feeds only its
    current block at its own positions, against its own cache row (which keeps the block's fresh
    K/V); then per branch: store probabilities, threshold commits, EOS check."""
    positions = block_positions(bb, rows)  # (R, Q)
    sub = sub_cache(bb, rows, copy_in=True)
    real = sum(bb.end[i] - bb.start[i] for i in rows)
    index = torch.tensor(rows, device=bb.x.device)
    logits = run_forward(model, bb.x[index], sub, positions, (0, positions.shape[1]), dcfg, counter, real)  # (R, Q, V)
    put_back(bb, rows, sub)
    act = [r for r, i in enumerate(rows) if not bb.done[i]]  # done rows (rms) only padded the batch
    if not act:
        return
    arows = [rows[r] for r in act]
    logits, lpos = logits[act], positions[act]  # (R', Q, V), (R', Q)
    store_probs(bb, arows, logits, lpos)
    commit_blocks(bb, arows, logits.clone(), lpos, config, dcfg, generator)
    check_eos(bb, arows, logits, lpos, config)


def advance_all(bb: Branches, config) -> None:
    """Every active branch whose block is complete moves to the block holding its first mask.
    bulk counts the advance and asks for a refresh once advanced blocks x size reach
    refresh_block_size (a jump over several blocks counts once, as in the original)."""
    for i in bb.active():
        if not bb.block_has_mask(i, config.mask_id):
            advance_one(bb, i, config)


def advance_one(bb: Branches, i: int, config) -> None:
    bb.snap_window(i, config.mask_id)
    if config.generator_variant == "bulk" and not bb.done[i]:
        bb.advanced[i] += 1
        if bb.advanced[i] * bb.sizes[i] >= config.refresh_block_size:
            bb.needs_refresh[i] = True


# ---------------------------------------------------------------------------------------------
# The policy: confidence-gated merge, leader sync
# ---------------------------------------------------------------------------------------------


def compatible(bb: Branches, dst: int, srcs: list[int], mask_id: int) -> list[int]:
    """The sources that agree with dst wherever both have committed a token."""
    gd = bb.x[dst, bb.P:]  # (G,)
    out = []
    for s in srcs:
        gs = bb.x[s, bb.P:]  # (G,)
        both = (gd != mask_id) & (gs != mask_id)
        if bool((gd[both] == gs[both]).all()):
            out.append(s)
    return out


def merge_into(bb: Branches, dst: int, srcs: list[int], config) -> int:
    """Fill dst's masks with tokens its sources committed, where dst's OWN stored probability of
    that token exceeds conf_threshold; among several offered tokens the most probable one (the
    first source on ties). A committed token is never changed: only masks are filled. The
    region scanned: bulk, the union of the sources' current blocks; rms, the whole generation
    up to the furthest source block end. Returns the tokens filled."""
    L, P, mask_id = bb.L, bb.P, config.mask_id
    pos = torch.arange(L, device=bb.x.device)  # (L,)
    if config.generator_variant == "bulk":
        region = torch.zeros(L, dtype=torch.bool, device=bb.x.device)
        for s in srcs:
            region |= (pos >= bb.start[s]) & (pos < bb.end[s])
    else:
        region = (pos >= P) & (pos < min(L, max(bb.end[s] for s in srcs)))
    src_tok = bb.x[srcs]  # (Ns, L)
    # dst's stored probability of each source's token: the matching top slot, or 0.
    match = bb.top_tok[dst, :L][None] == src_tok[..., None]  # (Ns, L, J), Ns sources
    prob = (match * bb.top_p[dst, :L][None]).sum(-1)  # (Ns, L)
    prob = torch.where(src_tok == mask_id, torch.zeros_like(prob), prob)
    best_p, best_s = prob.max(dim=0)  # (L,) each; the first source on ties
    best_tok = src_tok.gather(0, best_s[None]).squeeze(0)  # (L,)
    fill = region & (bb.x[dst] == mask_id) & (best_p > config.conf_threshold)  # (L,)
    n = int(fill.sum())
    bb.x[dst] = torch.where(fill, best_tok, bb.x[dst])
    return n


def sync_to(bb: Branches, dst: int, leader: int, config) -> None:
    """Overwrite branch dst with the leader: canvas, cache row and decoded count; dst then moves
    to the block of its own grid holding its first mask. rms also takes the leader's EOS state."""
    bb.x[dst] = bb.x[leader]
    bb.cache.k[:, dst] = bb.cache.k[:, leader]
    bb.cache.v[:, dst] = bb.cache.v[:, leader]
    bb.done[dst] = bb.done[leader]
    bb.snap_window(dst, config.mask_id)
    bb.decoded[dst] = bb.decoded[leader]
    if config.generator_variant == "rms":
        bb.hit_eos[dst], bb.eos_prob[dst] = bb.hit_eos[leader], bb.eos_prob[leader]
    bb.counts["syncs"] += 1


def merge_and_sync(bb: Branches, config) -> int:
    """The original's policy after every step. Merge: branches by block end, furthest first;
    each takes from the branches behind it that agree with it. Sync: every active branch more
    than sync_threshold decoded tokens behind the leader is overwritten by it. Returns syncs."""
    if bb.decoded[bb.leader()] == 0:
        return 0
    order = sorted(bb.active(), key=lambda i: bb.end[i], reverse=True)  # stable: ties keep size order
    if not all(bb.end[i] <= bb.P for i in order):
        for rank, dst in enumerate(order):
            srcs = compatible(bb, dst, order[rank + 1:], config.mask_id)
            if not srcs:
                continue
            n = merge_into(bb, dst, srcs, config)
            if n:
                bb.counts["merges"] += 1
                bb.counts["merged_tokens"] += n
                if config.generator_variant == "rms":
                    bb.decoded[dst] += n  # rms counts merged tokens as decoded; bulk does not
                if not bb.done[dst] and not bb.block_has_mask(dst, config.mask_id):
                    advance_one(bb, dst, config)
    leader, synced = bb.leader(), 0
    for i in range(bb.N):
        if i != leader and not bb.done[i] and bb.decoded[leader] - bb.decoded[i] > config.sync_threshold:
            sync_to(bb, i, leader, config)
            synced += 1
    return synced


def hard_sync_all(bb: Branches, config) -> None:
    """rms, after init only: every other active branch copies the leader (the first branch on
    ties), whatever the gap, so all rows start the loop from one canvas and one cache."""
    leader = bb.leader()
    if bb.decoded[leader] == 0:
        return
    for i in range(bb.N):
        if i != leader and not bb.done[i]:
            sync_to(bb, i, leader, config)


# ---------------------------------------------------------------------------------------------
# rms: refresh when the cache rows drift apart
# ---------------------------------------------------------------------------------------------


def divergence(bb: Branches, rows: list[int], exact: bool = False) -> tuple[float, float]:
    """The original's "RMS chord shell" test on the active rows' caches. For every layer's K and
    V, each row is flattened and normalized to a unit vector z_i; with mean mu, r_i^2 =
    |z_i - mu|^2 and rho^2 = 1 - |mu|^2, both averaged over all K/V tensors. The rows are
    refreshed when max_i r_i^2 > bound = 2 rho^2: one row has drifted twice as far as average.
    Returns (max r^2, bound).

    By default as the original computes it, in float32. Its `1 - |mu|^2` cancels badly (|mu|^2
    is within 1e-5 of 1 early on, where the test is decided), and right after a sync the test
    sits at a tie by construction (two equal rows and one other give max r^2 = 2 rho^2
    exactly), so rounding decides some steps. Our keys are stored after RoPE, the original's
    before: the same rotation for every row at a position, so the dot products, hence r^2 and
    rho^2, are equal up to that rounding. `exact` uses the identity mean_i r_i^2 = rho^2 (unit
    vectors) in float64 instead: no cancellation, the decision the formula means."""
    index = torch.tensor(rows, device=bb.x.device)
    n, L = len(rows), bb.L
    dtype = torch.float64 if exact else torch.float32
    r2 = torch.zeros(n, dtype=dtype, device=bb.x.device)  # (n,)
    rho2 = torch.zeros((), dtype=dtype, device=bb.x.device)
    count = 0
    for layer in range(bb.cache.k.shape[0]):
        for buf in (bb.cache.k, bb.cache.v):
            rows_kv = buf[layer, :, :, :L].index_select(0, index)  # (n, Hkv, L, D)
            z = F.normalize(rows_kv.to(dtype).reshape(n, -1), p=2, dim=1)  # (n, Hkv*L*D)
            mu = z.mean(dim=0)  # (Hkv*L*D,)
            r2 += (z - mu).square().sum(dim=1)
            rho2 += torch.clamp(1.0 - mu.square().sum(), min=0.0)
            count += 1
    r2 = r2 / count
    rho2 = r2.mean() if exact else rho2 / count
    return float(r2.max()), 2.0 * float(rho2)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def eos_ready(bb: Branches, config) -> int | None:
    """The branch an EOS exit returns: among branches that hit EOS and whose current block is
    complete (done branches included), the highest EOS probability, first on ties; else None."""
    ready = [i for i in range(bb.N) if bb.hit_eos[i] and not bb.block_has_mask(i, config.mask_id)]
    return max(ready, key=lambda i: bb.eos_prob[i]) if ready else None


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, config: BlockBatchConfig, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> decode.DecodeResult:
    """Generate config.gen_length tokens after one prompt with BlockBatch.

    prompt_ids: (1, P). attention_mask: (1, P) or None; left padding is dropped (one row needs none).
    Returns a decode.DecodeResult: ids (1, P + G) of the returned branch, nfe = batched forwards,
    query_tokens = tokens computed (padding included), extras: winner_block_size, exit ('eos' or
    'natural'), merges,
    merged_tokens, syncs, refreshes, packed_query_tokens, branch_ids (N, L).
    """
    if config.mask_id is None or config.eos_id is None:
        raise ValueError("config.mask_id / eos_id are not set; build the config with "
                         "BlockBatchConfig.for_model(model.config, ...)")
    dcfg = config.decode_config()
    decode.check_inputs(model, prompt_ids, dcfg, attention_mask)
    if prompt_ids.shape[0] != 1:
        # Branches of different requests would need their own merges, syncs, refreshes and exits
        # in one batch: an EOS exit of one request must not end the others, a refresh of one
        # must not cost the others a full forward. That is a scheduler, not this teaching file.
        raise ValueError(f"BlockBatch decodes one request at a time (its N branches are the batch); got "
                         f"{prompt_ids.shape[0]} prompts: call generate once per prompt")
    if attention_mask is not None:
        prompt_ids = prompt_ids[:, attention_mask[0].bool()]  # (1, P') the real tokens
    bulk = config.generator_variant == "bulk"
    bb = init_branches(model, prompt_ids, config)
    counter = Counter()
    everyone = list(range(bb.N))

    def result(winner: int, exit: str) -> decode.DecodeResult:
        ids = bb.x[winner:winner + 1].clone()  # (1, L)
        if config.fill_after_eos:
            state = decode.DecodeState(x=ids, P=bb.P, start=None, end=None)
            decode.finish_at_eos(state, dcfg)
        extras = dict(winner_block_size=bb.sizes[winner], exit=exit, **bb.counts, packed_query_tokens=counter.packed_tokens,
                      branch_ids=bb.x.clone())
        return decode.DecodeResult(ids=ids, nfe=counter.nfe, query_tokens=counter.query_tokens,
                                   masks_left=int((ids[:, bb.P:] == config.mask_id).sum()),
                                   prompt_length=bb.P, extras=extras)

    def refresh_if_asked():  # bulk: one batched full forward over every active row
        if any(bb.needs_refresh[i] for i in bb.active()):
            full_forward(model, bb, bb.active(), config, dcfg, generator, counter, init=False)

    # 1) Init: one full forward over prompt + masks; every branch commits in its first block.
    full_forward(model, bb, everyone, config, dcfg, generator, counter, init=True)
    if not bulk:
        hard_sync_all(bb, config)
    advance_all(bb, config)
    synced = merge_and_sync(bb, config)
    if bulk:
        refresh_if_asked()
    # 2) Steps until every branch is done (or an EOS exit).
    force_block_step = not bulk and synced > 0
    while not all(bb.done):
        if bulk:
            # Only branches whose block still has a mask run (none: no forward this step).
            rows = [i for i in bb.active() if bb.block_has_mask(i, config.mask_id)]
            if rows:
                block_step(model, bb, rows, config, dcfg, generator, counter)
        else:
            # rms: a full refresh of the active rows instead of the block step when their caches
            # have drifted apart (never right after a sync, which just copied a row).
            active = bb.active()
            refresh = False
            if not force_block_step and len(active) >= 2:
                rmax2, bound = divergence(bb, active, config.exact_divergence)
                refresh = rmax2 > bound
            force_block_step = False
            if refresh:
                full_forward(model, bb, active, config, dcfg, generator, counter, init=False)
            else:
                block_step(model, bb, everyone, config, dcfg, generator, counter)
        # 3) EOS exit, advance, policy, (bulk) periodic refresh.
        winner = eos_ready(bb, config)
        if winner is not None:
            return result(winner, "eos")
        advance_all(bb, config)
        synced = merge_and_sync(bb, config)
        if bulk:
            refresh_if_asked()
        else:
            force_block_step = synced > 0
    # Natural exit: every branch is complete.
    return result(0 if config.smallest_wins_natural_exit else bb.leader(), "natural")
