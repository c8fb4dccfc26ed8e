"""
BlockBatch: the block size as a branch dimension, every branch advanced by one batched forward.

No single block size is best for every answer. BlockBatch ("BlockBatch", arXiv 2605.29233;
original code Laurence-Wu/BlockBatch, the `bulk` and `refresh_dominent_RMS` generators) runs one
request as rows of a batch, one branch per block size (4 ... 128). Each step is ONE batched
forward in which every branch feeds its current block, at its own positions, against its own
KV-cache row, and commits by the threshold rule. Between forwards a branch takes tokens other
branches committed when its own stored probabilities agree (confidence-gated merge); a branch
more than `sync_threshold` tokens behind the leader is overwritten by it (sync); stale cache rows
are re-anchored by a batched full forward, periodically (`bulk`) or when the rows' K/V drift
apart (`rms`). NFE counts batched forwards. The step pieces are decode.py's (`model_forward`,
`draw_noise`, `propose`, `select_threshold`, `fill_after_eos`); the loop is its own, since
branches, merges, syncs and an exit chosen among branches are not a rule of one sequence.

Either model family runs here without a branch on it: a model whose head is shifted (Dream: the
row before a token predicts it, `model.logit_shift`) feeds each block together with the row
before it, so every position of the block is predicted by the step's forward (`query_span`).

Changed from the original: no monkey-patching or flash-attn; ragged blocks are padded with the
cache's trash slot (`block_positions` weighs padding against packing); one request per call; one
generator for both families (the original has a Dream copy with its own rules). The paper's
rules are the default; `quirks=True` (decode.Quirks lists them) swaps in the original's methods,
its LLaDA or its Dream generator's by the model's logit shift, subclass mixins in the last
section but one.

    config = BlockBatchConfig.for_model(model.config, gen_length=256, generator_variant="bulk")
    out = generate(model, prompt_ids, config)   # out.ids (1, P + G), out.nfe, out.extras["winner_block_size"]

Shape legend: Br branches (one cache row each), R rows of one forward (Br or fewer), P prompt,
G generation, L = P + G (a canvas; index L is the trash slot), Q query tokens of a forward, K
positions whose logits a step reads (a block), J top tokens stored per position, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import decode
from cache import KVCache
from decode import Quirks

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
    quirks: bool | Quirks = False  # reproduce the original code (True, or a decode.Quirks to choose)

    def __post_init__(self):
        check_config(self)  # (the checks stand in the last section)

    @classmethod
    def for_model(cls, model_config, **kwargs) -> "BlockBatchConfig":
        """Settings whose special ids default to the model config's (mask, EOS)."""
        kwargs.setdefault("mask_id", model_config.mask_token_id)
        kwargs.setdefault("eos_id", model_config.eos_token_id)
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# One run: the branches, their cache rows, windows and counters, and the model they share
# ---------------------------------------------------------------------------------------------


class BlockBatch:
    """One request's branches. Row i of the canvases and of the cache belongs to branch i (block
    size sizes[i]); rows change hands only through merge (tokens) and sync (tokens and K/V). The
    policy state is Python lists: the original's policy is sequential (merges go branch by branch
    in a fixed order), there are a handful of branches, and forwards and commits stay batched."""

    def __init__(self, model, prompt: torch.Tensor, config: BlockBatchConfig, generator=None):
        Br, P, device = len(config.block_sizes), prompt.shape[1], model.device
        L = P + config.gen_length
        self.model, self.config, self.generator = model, config, generator
        self.pieces = decode.Pieces.for_config(config.step_config)  # decode.py's sampler and confidence
        self.rms = config.generator_variant == "rms"
        self.shift = getattr(model, "logit_shift", 0)  # rows before a token that predict it (Dream: 1)
        self.canvas = torch.full((Br, L), config.mask_id, dtype=torch.long, device=device)  # (Br, L) the canvases
        self.canvas[:, :P] = prompt.to(device)
        self.cache = KVCache.for_model(model.config, batch=Br, capacity=L, device=device, dtype=model.dtype)
        self.P, self.sizes = P, list(config.block_sizes)
        self.start = [P] * Br  # each branch's current block [start, end), on its own grid
        self.end = [P + b for b in self.sizes]
        self.done = [False] * Br  # no mask left
        self.decoded = [0] * Br  # tokens committed (+ merged, rms; = the leader's after a sync)
        J = min(TOP_K, model.config.embedding_size)
        self.top_tok = torch.zeros((Br, L + 1, J), dtype=torch.long, device=device)  # (Br, L + 1, J); L: trash
        self.top_p = torch.zeros((Br, L + 1, J), dtype=torch.float32, device=device)  # 0 where <= 0.1
        self.commit_conf = torch.zeros((Br, L), dtype=torch.float64, device=device)  # each commit's confidence
        self.hit_eos = [False] * Br  # a complete block held an EOS
        self.eos_prob = [0.0] * Br  # its probability (see eos_probability)
        self.advanced = [0] * Br  # bulk: blocks advanced since the last refresh
        self.needs_refresh = [False] * Br  # bulk: this branch asks for a refresh
        self.counts = {"merges": 0, "merged_tokens": 0, "syncs": 0, "refreshes": 0}
        self.nfe = 0  # batched forwards
        self.query_tokens = 0  # tokens the forwards computed, padding included (what a CPU pays)
        self.packed_tokens = 0  # real query tokens only (what a variable-length kernel computes)
        self.forwards = []  # (rows R, query tokens Q per row, logits K per row) of every forward, in order

    @property
    def L(self) -> int:
        return self.canvas.shape[1]

    @property
    def everyone(self) -> list[int]:
        return list(range(len(self.sizes)))

    def active(self) -> list[int]:
        return [i for i in self.everyone if not self.done[i]]

    def block_has_mask(self, i: int) -> bool:
        return bool((self.canvas[i, self.start[i]:self.end[i]] == self.config.mask_id).any())

    def leader(self) -> int:
        """The branch that decoded the most tokens (the first on ties, done branches included)."""
        return max(self.everyone, key=lambda i: self.decoded[i])

    def snap_window(self, i: int) -> None:
        """Move branch i to the block, on its own grid, holding its first remaining mask (the
        original's update_block_window); with no mask left the branch is done."""
        masks = (self.canvas[i, self.P:] == self.config.mask_id).nonzero()
        if len(masks) == 0:
            self.done[i], self.start[i], self.end[i] = True, self.L, self.L
            return
        b = self.sizes[i]
        self.start[i] = self.P + int(masks[0]) // b * b
        self.end[i] = min(self.start[i] + b, self.L)

    # -- Forwards: one batched call over some branch rows, counted in one place -----------------

    def query_span(self, i: int) -> tuple[int, int]:
        """Branch i's block-step queries [first, stop): its block, and for a shifted model the rows
        before it (the hidden state at s - 1 predicts the token at s), so that every position of the
        block gets a prediction from this forward. A done branch queries nothing (only trash)."""
        return (self.L, self.L) if self.done[i] else (self.start[i] - self.shift, self.end[i])

    def block_positions(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's query span and its block, as canvas positions padded with the trash slot:
        (queries (R, Q), targets (R, K)), where the step's logit k of a row predicts targets[:, k].

        Padding vs. packing: the original packs the ragged blocks (4 + 8 + ... + 128 = 252 tokens)
        and runs a variable-length attention kernel, so it computes only real tokens. Plain PyTorch
        attention needs a rectangle, so we pad every row to the longest block (6 x 128 = 768 query
        tokens with the default sizes): up to 3x the projection/MLP work, all of it thrown away, but
        one ordinary batched forward. Padded queries write their K/V to the cache's trash slot, which
        attention never reads, so they change nothing. On a GPU the padded rectangle is often nearly
        free, on a CPU it is paid in full. A done row (rms sends every row, as the original does)
        queries only trash.
        """
        device = self.canvas.device

        def padded(spans):  # [(first, stop)] -> (R, longest) positions, trash after each stop
            n = max(max(b - a for a, b in spans), 1)
            pos = torch.tensor([a for a, _ in spans], device=device)[:, None] + torch.arange(n, device=device)
            stop = torch.tensor([b for _, b in spans], device=device)[:, None]  # (R, 1)
            return torch.where(pos < stop, pos, self.cache.trash)

        queries = padded([self.query_span(i) for i in rows])  # (R, Q)
        targets = padded([(self.start[i], self.end[i]) for i in rows])  # (R, K)
        return queries, targets

    def forward(self, rows: list[int], positions: torch.Tensor, logits_range, real_tokens: int) -> torch.Tensor:
        """One batched forward of the rows' canvases at `positions` ((Q,) shared or (R, Q)), each
        against its own cache row; the logits that predict the tokens at the query indices
        logits_range (model.forward's rule, either family), (R, K, V)."""
        sub = self.sub_cache(rows, copy_in=positions.dim() == 2)  # a full forward rewrites every slot
        x = self.canvas[torch.tensor(rows, device=self.canvas.device)]  # (R, L)
        tokens = x if positions.dim() == 1 else x.gather(1, positions.clamp(max=self.L - 1))  # (R, Q)
        window = decode.Window(positions, logits_range, positions.dim() == 1)
        logits = decode.model_forward(self.model, tokens, window, sub, None)  # (R, K, V)
        self.put_back(rows, sub)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(f"non-finite logits at forward {self.nfe + 1}: the model overflowed its "
                                     f"dtype ({self.model.dtype}) or its weights are bad")
        self.nfe += 1
        self.forwards.append((len(rows), positions.shape[-1], logits.shape[1]))
        self.query_tokens += len(rows) * positions.shape[-1]
        self.packed_tokens += real_tokens
        return logits

    def sub_cache(self, rows: list[int], copy_in: bool) -> KVCache:
        """The cache for a forward over some branch rows: the branch cache itself when every row
        takes part, else one with those rows (copied in unless the forward rewrites every slot)."""
        if rows == self.everyone:
            return self.cache
        c = self.cache
        sub = KVCache(c.n_layers, len(rows), c.k.shape[2], c.k.shape[4], c.length, device=c.k.device, dtype=c.k.dtype)
        if copy_in:
            index = torch.tensor(rows, device=self.canvas.device)
            sub.k.copy_(c.k.index_select(1, index))
            sub.v.copy_(c.v.index_select(1, index))
        return sub

    def put_back(self, rows: list[int], sub: KVCache) -> None:
        """Write a sub-cache's rows home, each to its own branch row."""
        if sub is not self.cache:
            index = torch.tensor(rows, device=self.canvas.device)
            self.cache.k.index_copy_(1, index, sub.k)
            self.cache.v.index_copy_(1, index, sub.v)

    # -- After a forward: stored probabilities, threshold commits, EOS ---------------------------

    def store_probs(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor) -> None:
        """Overwrite the stored probabilities at the forward's positions (R, K) with this forward's:
        each position keeps its tokens above 0.1 (float32 softmax, as the original's dicts)."""
        probs = F.softmax(logits.float(), dim=-1)  # (R, K, V)
        p, tok = probs.topk(self.top_tok.shape[-1], dim=-1)  # (R, K, J) each
        index = torch.tensor(rows, device=self.canvas.device)[:, None].expand_as(positions)  # (R, K)
        self.top_tok[index, positions] = tok
        self.top_p[index, positions] = torch.where(p > PROB_FLOOR, p, torch.zeros_like(p))

    def noise(self, lengths: list[int], offsets: list[int], Q: int, V: int) -> decode.Noise:
        """Random numbers for the rows' commits, drawn per branch over its block only (the original
        calls its sampler once per branch), placed at each row's offset in the (R, Q) layout."""
        step, noise = self.config.step_config, decode.Noise()
        if step.temperature == 0 and step.remasking != "random":
            return noise
        R, device = len(lengths), self.canvas.device
        if step.temperature > 0:
            noise.gumbel = torch.ones((R, Q, V), dtype=torch.float64, device=device)  # (R, Q, V)
        if step.remasking == "random":
            noise.uniform = torch.zeros((R, Q), dtype=torch.float64, device=device)  # (R, Q)
        for r, (k, o) in enumerate(zip(lengths, offsets)):
            one = decode.draw_noise(step, self.generator, (1, k, V), device)
            if one.gumbel is not None:
                noise.gumbel[r, o:o + k] = one.gumbel[0]
            if one.uniform is not None:
                noise.uniform[r, o:o + k] = one.uniform[0]
        return noise

    def commit(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor, select=None) -> None:
        """Threshold commits inside each row's current block (at least one token where any is
        masked), vectorized over the rows. logits (R, K, V) predict canvas positions (R, K).
        select: another rule, confidences (R, K) -> chosen (R, K) bool."""
        device = self.canvas.device
        start = torch.tensor([self.start[i] for i in rows], device=device)[:, None]  # (R, 1)
        end = torch.tensor([self.end[i] for i in rows], device=device)[:, None]  # (R, 1)
        index = torch.tensor(rows, device=device)
        in_block = (positions >= start) & (positions < end)  # (R, K); trash is never inside
        eligible = in_block & (self.canvas[index].gather(1, positions.clamp(max=self.L - 1)) == self.config.mask_id)
        # Where each row's block starts in the logits, and its length, for per-branch noise.
        noise = self.noise([self.end[i] - self.start[i] for i in rows], in_block.int().argmax(1).tolist(),
                           positions.shape[1], logits.shape[-1])
        p = decode.propose(self.confidence_logits(logits), eligible, self.config.step_config, noise, pieces=self.pieces)
        x0, conf = p.tokens, p.confidence  # (R, K) each
        chosen = (select or self.threshold_rule)(conf)  # (R, K)
        r, c = chosen.nonzero(as_tuple=True)
        self.canvas[index[r], positions[r, c]] = x0[r, c]
        self.commit_conf[index[r], positions[r, c]] = conf[r, c]
        for j, n in zip(rows, chosen.sum(1).tolist()):
            self.decoded[j] += n

    def threshold_rule(self, conf: torch.Tensor) -> torch.Tensor:
        """The paper's commit rule (decode.select_threshold), (R, K) -> (R, K) bool."""
        return decode.select_threshold(conf, self.config.threshold)

    def confidence_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits proposals and their confidences are read from (the forward's)."""
        return logits

    def check_eos(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor) -> None:
        """A branch whose current block is complete and holds an EOS has hit EOS; remember the
        probability the EOS exit compares branches by."""
        for r, i in enumerate(rows):
            s, e = self.start[i], self.end[i]
            block = self.canvas[i, s:e]
            if e <= s or bool((block == self.config.mask_id).any()) or not bool((block == self.config.eos_id).any()):
                continue
            at = s + int((block == self.config.eos_id).int().argmax())
            self.hit_eos[i] = True
            self.eos_prob[i] = self.eos_probability(i, at, logits[r], positions[r])

    # -- The steps: full forward (init, refresh) and the batched block step ---------------------

    def full_forward(self, rows: list[int], init: bool) -> None:
        """A full forward re-anchors the rows' caches: the whole canvas goes in, every position's
        K/V is rewritten. At init it is one row (branch 0's canvas, identical for all) whose K/V
        go to every branch's cache row; every branch then commits in its first block from the
        shared logits. At a refresh every listed row runs its own canvas and commits in its
        current block. The stored probabilities of the whole generation are replaced; rms checks
        EOS here too."""
        L, P = self.L, self.P
        positions = torch.arange(L, device=self.canvas.device)  # (L,)
        if init:
            logits = self.forward([0], positions, (P, L), real_tokens=L)  # (1, G, V): cache row 0
            self.cache.k.copy_(self.cache.k[:, :1].expand_as(self.cache.k))  # the same K/V in every row
            self.cache.v.copy_(self.cache.v[:, :1].expand_as(self.cache.v))
            logits = logits.expand(len(rows), -1, -1)  # (Br, G, V) shared
        else:
            logits = self.forward(rows, positions, (P, L), real_tokens=len(rows) * L)  # (R, G, V)
            self.counts["refreshes"] += 1
        gen = torch.arange(P, L, device=self.canvas.device).expand(len(rows), -1)  # (R, G)
        self.full_forward_commits(rows, logits, gen)
        if self.rms:
            self.check_eos(rows, logits, gen)
        for i in rows:
            self.advanced[i], self.needs_refresh[i] = 0, False

    def full_forward_commits(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor) -> None:
        """What a full forward's logits over the generation (R, G, V) do: every position's
        probabilities are stored, and each row commits in its block by the threshold rule."""
        self.store_probs(rows, logits, positions)
        self.commit(rows, logits, positions)

    def block_step(self, rows: list[int]) -> None:
        """The step of the method: ONE batched forward in which each listed branch feeds only its
        current block (and the row before it on a shifted model, `query_span`) at its own
        positions, against its own cache row (which keeps the fresh K/V); then per branch: store
        probabilities, threshold commits, EOS check."""
        queries, positions = self.block_positions(rows)  # (R, Q), (R, K)
        real = sum(b - a for a, b in map(self.query_span, rows))
        K = positions.shape[1]
        logits = self.forward(rows, queries, (self.shift, self.shift + K), real)  # (R, K, V): predicts positions
        keep = [r for r, i in enumerate(rows) if not self.done[i]]  # done rows (rms) only padded the batch
        if keep:
            rows, logits, positions = [rows[r] for r in keep], logits[keep], positions[keep]
            self.store_probs(rows, logits, positions)
            self.commit(rows, logits, positions)
            self.check_eos(rows, logits, positions)

    def advance_all(self) -> None:
        """Every active branch whose block is complete moves to the block holding its first mask."""
        for i in self.active():
            if not self.block_has_mask(i):
                self.advance(i)

    def advance(self, i: int) -> None:
        """Branch i to its next block; bulk counts the advance and asks for a refresh once advanced
        blocks x size reach refresh_block_size (a jump over several blocks counts once, as in the
        original)."""
        self.snap_window(i)
        if not self.rms and not self.done[i]:
            self.advanced[i] += 1
            self.needs_refresh[i] |= self.advanced[i] * self.sizes[i] >= self.config.refresh_block_size

    # -- The policy: confidence-gated merge, leader sync ----------------------------------------

    def compatible(self, dst: int, srcs: list[int]) -> list[int]:
        """The sources that agree with dst wherever both have committed a token."""
        mask_id, gd = self.config.mask_id, self.canvas[dst, self.P:]  # (G,)
        out = []
        for s in srcs:
            gs = self.canvas[s, self.P:]  # (G,)
            both = (gd != mask_id) & (gs != mask_id)
            if bool((gd[both] == gs[both]).all()):
                out.append(s)
        return out

    def merge_into(self, dst: int, srcs: list[int]) -> int:
        """Fill dst's masks with tokens its sources committed, where dst's OWN stored probability of
        that token exceeds conf_threshold; among several offered tokens the most probable one (the
        first source on ties). A committed token is never changed: only masks are filled. The
        region scanned: bulk, the union of the sources' current blocks; rms, the whole generation
        up to the furthest source block end. Returns the tokens filled."""
        mask_id = self.config.mask_id
        region = self.merge_region(dst, srcs)  # (L,)
        src_tok = self.canvas[srcs]  # (Ns, L), Ns sources
        prob = self.stored_prob(dst, src_tok)  # (Ns, L)
        prob = torch.where(src_tok == mask_id, torch.zeros_like(prob), prob)
        best_p, best_s = prob.max(dim=0)  # (L,) each; the first source on ties
        best_tok = src_tok.gather(0, best_s[None]).squeeze(0)  # (L,)
        fill = region & (self.canvas[dst] == mask_id) & self.passes_gate(best_p)  # (L,)
        self.canvas[dst] = torch.where(fill, best_tok, self.canvas[dst])
        # A merged token's confidence is dst's own probability of it, the one the fill was judged by.
        self.commit_conf[dst] = torch.where(fill, best_p.to(self.commit_conf.dtype), self.commit_conf[dst])
        return int(fill.sum())

    def merge_region(self, dst: int, srcs: list[int]) -> torch.Tensor:
        """(L,) bool, the positions a merge into dst may fill (see merge_into)."""
        pos = torch.arange(self.L, device=self.canvas.device)  # (L,)
        if self.rms:
            return (pos >= self.P) & (pos < min(self.L, max(self.end[s] for s in srcs)))
        region = torch.zeros(self.L, dtype=torch.bool, device=self.canvas.device)
        for s in srcs:
            region |= (pos >= self.start[s]) & (pos < self.end[s])
        return region

    def forget_probs(self, rows: list[int]) -> None:
        """Drop the rows' stored probabilities."""
        self.top_p[rows] = 0

    def stored_prob(self, dst: int, tokens: torch.Tensor) -> torch.Tensor:
        """dst's stored probability of each of the tokens (Ns, L) at its position: the matching
        top slot, or 0. (Ns, L)."""
        L = self.L
        match = self.top_tok[dst, :L][None] == tokens[..., None]  # (Ns, L, J)
        return (match * self.top_p[dst, :L][None]).sum(-1)  # (Ns, L)

    def passes_gate(self, prob: torch.Tensor) -> torch.Tensor:
        """Whether a merge may fill with a token of this stored probability (elementwise)."""
        return prob > self.config.conf_threshold

    def sync_to(self, dst: int, leader: int) -> None:
        """Overwrite branch dst with the leader: canvas, cache row and decoded count; dst then
        moves to the block of its own grid holding its first mask. rms also takes the leader's
        EOS state."""
        self.canvas[dst] = self.canvas[leader]
        self.commit_conf[dst] = self.commit_conf[leader]  # the tokens come with their confidences
        self.cache.k[:, dst] = self.cache.k[:, leader]
        self.cache.v[:, dst] = self.cache.v[:, leader]
        self.done[dst] = self.done[leader]
        self.snap_window(dst)
        self.decoded[dst] = self.decoded[leader]
        if self.rms:
            self.hit_eos[dst], self.eos_prob[dst] = self.hit_eos[leader], self.eos_prob[leader]
        self.counts["syncs"] += 1

    def merge_and_sync(self) -> int:
        """The original's policy after every step. Merge: branches by block end, furthest first;
        each takes from the branches behind it that agree with it. Sync: every active branch more
        than sync_threshold decoded tokens behind the leader is overwritten by it. Returns syncs."""
        if self.decoded[self.leader()] == 0:
            return 0
        order = sorted(self.active(), key=lambda i: self.end[i], reverse=True)  # stable: ties keep size order
        for rank, dst in enumerate(order):
            srcs = self.compatible(dst, order[rank + 1:])
            n = self.merge_into(dst, srcs) if srcs else 0
            if n:
                self.counts["merges"] += 1
                self.counts["merged_tokens"] += n
                if self.rms:
                    self.decoded[dst] += n  # rms counts merged tokens as decoded; bulk does not
                if not self.done[dst] and not self.block_has_mask(dst):
                    self.advance(dst)
        leader, synced = self.leader(), 0
        for i in self.everyone:
            if i != leader and not self.done[i] and self.decoded[leader] - self.decoded[i] > self.config.sync_threshold:
                self.sync_to(i, leader)
                synced += 1
        return synced

    def sync_all(self) -> None:
        """rms, after init only: every other active branch copies the leader (the first branch on
        ties), whatever the gap, so all rows start the loop from one canvas and one cache."""
        leader = self.leader()
        if self.decoded[leader] > 0:
            for i in self.everyone:
                if i != leader and not self.done[i]:
                    self.sync_to(i, leader)

    def divergence(self, rows: list[int], exact: bool) -> tuple[float, float]:
        """The original's "RMS chord shell" test on the rows' caches. For every layer's K and V,
        each row is flattened and normalized to a unit vector z_i; with mean mu, r_i^2 = |z_i - mu|^2
        and rho^2 = 1 - |mu|^2, both averaged over all K/V tensors. The rows are refreshed when
        max_i r_i^2 > bound = 2 rho^2: one row has drifted twice as far as average. Returns
        (max r^2, bound).

        `exact` decides it in float64 with the identity mean_i r_i^2 = rho^2 (unit vectors): no
        cancellation, the decision the formula means. Otherwise as the original computes it, in
        float32, where `1 - |mu|^2` cancels badly (|mu|^2 is within 1e-5 of 1 early on), and right
        after a sync the test sits at a tie by construction, so rounding decides some steps. Our
        keys are stored after RoPE, the original's before: the same rotation for every row at a
        position, so r^2 and rho^2 are equal up to that rounding."""
        index = torch.tensor(rows, device=self.canvas.device)
        n, L = len(rows), self.L
        dtype = torch.float64 if exact else torch.float32
        r2 = torch.zeros(n, dtype=dtype, device=self.canvas.device)  # (n,)
        rho2 = torch.zeros((), dtype=dtype, device=self.canvas.device)
        count = 0
        for layer in range(self.cache.n_layers):
            for buf in (self.cache.k, self.cache.v):
                rows_kv = buf[layer, :, :, :L].index_select(0, index)  # (n, Hkv, L, D)
                z = F.normalize(rows_kv.to(dtype).reshape(n, -1), p=2, dim=1)  # (n, Hkv*L*D)
                mu = z.mean(dim=0)  # (Hkv*L*D,)
                r2 += (z - mu).square().sum(dim=1)
                rho2 += torch.clamp(1.0 - mu.square().sum(), min=0.0)
                count += 1
        r2 = r2 / count
        rho2 = r2.mean() if exact else rho2 / count
        return float(r2.max()), 2.0 * float(rho2)

    def eos_ready(self) -> int | None:
        """The branch an EOS exit returns: among branches that hit EOS and whose current block is
        complete (done branches included), the highest EOS probability, first on ties; else None."""
        ready = [i for i in self.everyone if self.hit_eos[i] and not self.block_has_mask(i)]
        return max(ready, key=lambda i: self.eos_prob[i]) if ready else None

    def eos_probability(self, i: int, at: int, logits: torch.Tensor, positions: torch.Tensor) -> float:
        """The EOS probability the exit compares branches by: the confidence the EOS at `at` was
        committed with (by a forward, a merge or a sync)."""
        return float(self.commit_conf[i, at])

    def finished(self) -> bool:
        """Whether the run stops without an EOS: when every branch is done."""
        return all(self.done)

    def natural_winner(self) -> int:
        """The branch a natural exit (every branch complete) returns: the leader, the branch with
        the most decoded tokens."""
        return self.leader()

    def refresh_due(self, rows: list[int]) -> bool:
        """rms: whether the rows' caches have drifted apart (`divergence`, decided exactly)."""
        rmax2, bound = self.divergence(rows, exact=True)
        return rmax2 > bound

    def finish(self, ids: torch.Tensor) -> None:
        """The returned canvas (1, L): after an EOS exit, EOS (not masks) after the first EOS."""
        decode.fill_after_eos(ids[:, self.P:], self.config.eos_id, self.config.mask_id)

    def result(self, winner: int, exit: str) -> decode.DecodeResult:
        ids = self.canvas[winner:winner + 1].clone()  # (1, L)
        self.finish(ids)
        extras = dict(winner_block_size=self.sizes[winner], exit=exit, **self.counts, forwards=self.forwards,
                      packed_query_tokens=self.packed_tokens, branch_ids=self.canvas.clone())
        return decode.DecodeResult(ids=ids, nfe=self.nfe, query_tokens=self.query_tokens,
                                   masks_left=int((ids[:, self.P:] == self.config.mask_id).sum()),
                                   prompt_length=self.P, extras=extras)


# ---------------------------------------------------------------------------------------------
# The two generators: each a short loop over the pieces above
# ---------------------------------------------------------------------------------------------


def bulk(run: BlockBatch) -> tuple[int, str]:
    """`bulk`: after init, steps until the run is finished (every branch done; `finished`). Each
    step forwards the branches whose block still has a mask; a branch that has advanced
    refresh_block_size tokens asks for a refresh, and then every active row gets one batched full
    forward. Returns (winner, exit)."""
    def policy():
        run.advance_all()
        run.merge_and_sync()

    def refresh_if_asked():
        if any(run.needs_refresh[i] for i in run.active()):
            run.full_forward(run.active(), init=False)

    run.full_forward(run.everyone, init=True)  # every branch commits in its first block
    policy()
    refresh_if_asked()
    while not run.finished():
        rows = [i for i in run.active() if run.block_has_mask(i)]
        if rows:
            run.block_step(rows)
        winner = run.eos_ready()
        if winner is not None:
            return winner, "eos"
        for phase in (policy, refresh_if_asked):  # the run may finish after any of them
            if not run.finished():
                phase()
    return run.natural_winner(), "natural"


def rms(run: BlockBatch) -> tuple[int, str]:
    """`rms` (the original's refresh_dominent_RMS): after init every branch copies the leader.
    Each step is either the block step of every row or, when the active rows' caches have drifted
    apart (`divergence`), a full refresh of them instead; never a refresh right after a sync,
    which just copied a row. Returns (winner, exit)."""
    run.full_forward(run.everyone, init=True)
    run.sync_all()
    run.advance_all()
    just_synced = run.merge_and_sync() > 0
    while not all(run.done):
        active = run.active()
        if not just_synced and len(active) >= 2 and run.refresh_due(active):
            run.full_forward(active, init=False)
        else:
            run.block_step(run.everyone)
        winner = run.eos_ready()
        if winner is not None:
            return winner, "eos"
        run.advance_all()
        just_synced = run.merge_and_sync() > 0
    return run.natural_winner(), "natural"


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, config: BlockBatchConfig, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> decode.DecodeResult:
    """Generate config.gen_length tokens after one prompt with BlockBatch.

    prompt_ids: (1, P). attention_mask: (1, P) or None; left padding is dropped (one row needs none).
    Returns a decode.DecodeResult: ids (1, P + G) of the returned branch, nfe = batched forwards,
    query_tokens = tokens computed (padding included), extras: winner_block_size, exit ('eos' or
    'natural'), merges, merged_tokens, syncs, refreshes, packed_query_tokens, branch_ids (Br, L),
    forwards (rows, query tokens per row, logits per row) of each batched forward.
    """
    if config.mask_id is None or config.eos_id is None:
        raise ValueError("config.mask_id / eos_id are not set; build the config with "
                         "BlockBatchConfig.for_model(model.config, ...)")
    config = replace(config)  # checked again: a field may have been changed since it was built
    decode.check_inputs(model, prompt_ids, config.step_config, attention_mask, generator)
    if prompt_ids.shape[0] != 1:
        # Branches of different requests would need their own merges, syncs, refreshes and exits
        # in one batch: an EOS exit of one request must not end the others, a refresh of one
        # must not cost the others a full forward. That is a scheduler, not this teaching file.
        raise ValueError(f"BlockBatch decodes one request at a time (its branches are the batch); got "
                         f"{prompt_ids.shape[0]} prompts: call generate once per prompt")
    if attention_mask is not None:
        prompt_ids = prompt_ids[:, attention_mask[0].bool()]  # (1, P') the real tokens
    run = with_quirks(config, getattr(model, "logit_shift", 0))(model, prompt_ids, config, generator)
    winner, exit = (rms if run.rms else bulk)(run)
    return run.result(winner, exit)


# ---------------------------------------------------------------------------------------------
# The original's quirks (decode.Quirks names them): BlockBatch's methods, swapped
# ---------------------------------------------------------------------------------------------


class SmallestWins:
    """A natural exit returns max(progress), which every branch has at G: the smallest block
    size's branch (blockbatch_smallest_wins)."""

    def natural_winner(self) -> int:
        return 0


class EOSProbabilityFromLastForward:
    """The EOS exit reads P(EOS) from this forward's logits (K, V) at the EOS, in bfloat16, though
    the EOS may have been decoded long before (blockbatch_eos_prob_last_forward)."""

    def eos_probability(self, i: int, at: int, logits: torch.Tensor, positions: torch.Tensor) -> float:
        q = int((positions == at).int().argmax())
        return float(F.softmax(logits[q].to(torch.bfloat16), dim=-1)[self.config.eos_id])


class Float32Divergence:
    """rms decides a refresh in float32, with the cancellation of `1 - |mu|^2`
    (blockbatch_float32_divergence)."""

    def refresh_due(self, rows: list[int]) -> bool:
        rmax2, bound = self.divergence(rows, exact=False)
        return rmax2 > bound


class MasksAfterEOS:
    """An EOS exit returns the masks after the EOS as they are (blockbatch_masks_after_eos)."""

    def finish(self, ids: torch.Tensor) -> None:
        pass


# The original's Dream generator (on a shifted-head model): a copy of its LLaDA one that differs
# in the window, the full forward's commits, the stored probabilities, merges, refreshes and exit.
# `with_quirks`, after these, picks the LLaDA generator's quirks or these by the model's shift.


class PredecessorWindow:
    """A block step queries as many positions as the block, shifted left by the logit shift:
    [s-1, e-1) on Dream, so the block's last position keeps stale K/V (blockbatch_pred_window)."""

    def query_span(self, i: int) -> tuple[int, int]:
        first, stop = super().query_span(i)
        return first, max(first, stop - self.shift)


class SeedFirstMask:
    """A full forward (init or refresh) commits one token per branch, at the first masked position
    of its block, whatever its confidence, and the stored probabilities are cleared: Fast-dLLM's
    unconditional block-start commit, copied (blockbatch_seed_first_mask)."""

    def full_forward_commits(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor) -> None:
        self.forget_probs(rows)
        self.commit(rows, logits, positions, select=first_eligible)
        for i in rows:  # a block the seed completed moves on at once
            if not self.done[i] and not self.block_has_mask(i):
                self.advance(i)


def first_eligible(conf: torch.Tensor) -> torch.Tensor:
    """Each row's first position that may be committed, (R, K) -> (R, K) bool."""
    eligible = conf > -torch.inf
    return eligible & (eligible.cumsum(dim=-1) == 1)


class ConfidenceWithoutMask:
    """The mask id's logit is set to -1e4 before every proposal and its confidence
    (blockbatch_conf_without_mask); the stored probabilities keep it."""

    def confidence_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, torch.tensor([self.config.mask_id], device=logits.device), -1e4)


class CumulativeProbDict:
    """Stored probabilities as the Dream generator's per-branch dict: every (position, token) whose
    float32 probability exceeds 0.2, added or overwritten by each block step and never removed,
    cleared by a full forward's seed, copied with the canvas by a sync (blockbatch_prob_dict)."""

    floor = 0.2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prob_dict = [{} for _ in self.sizes]  # per branch: {position: {token: probability}}

    def store_probs(self, rows: list[int], logits: torch.Tensor, positions: torch.Tensor) -> None:
        probs = F.softmax(logits.float(), dim=-1)  # (R, K, V)
        r, k, tok = (probs > self.floor).nonzero(as_tuple=True)
        for r, pos, t, p in zip(r.tolist(), positions[r, k].tolist(), tok.tolist(), probs[r, k, tok].tolist()):
            if pos < self.L:  # not a padding query's
                self.prob_dict[rows[r]].setdefault(pos, {})[t] = p

    def forget_probs(self, rows: list[int]) -> None:
        for i in rows:
            self.prob_dict[i] = {}

    def stored_prob(self, dst: int, tokens: torch.Tensor) -> torch.Tensor:
        prob = torch.zeros(tokens.shape, dtype=torch.float64)  # (Ns, L)
        rows = tokens.tolist()
        for pos, table in self.prob_dict[dst].items():
            for s, row in enumerate(rows):
                prob[s, pos] = table.get(row[pos], 0.0)
        return prob.to(tokens.device)

    def sync_to(self, dst: int, leader: int) -> None:
        super().sync_to(dst, leader)
        self.prob_dict[dst] = {pos: dict(table) for pos, table in self.prob_dict[leader].items()}


class MergeOwnBlock:
    """A merge fills only dst's own current block, where its stored probability is at least
    conf_threshold (not above it) (blockbatch_merge_own_block)."""

    def merge_region(self, dst: int, srcs: list[int]) -> torch.Tensor:
        pos = torch.arange(self.L, device=self.canvas.device)  # (L,)
        return (pos >= self.start[dst]) & (pos < self.end[dst])

    def passes_gate(self, prob: torch.Tensor) -> torch.Tensor:
        return prob >= self.config.conf_threshold


class MergedTokensCount:
    """Merged tokens count as decoded, for the leader and the sync gap: the Dream generator counts
    the tokens on each canvas (blockbatch_merged_count_as_decoded)."""

    def merge_into(self, dst: int, srcs: list[int]) -> int:
        n = super().merge_into(dst, srcs)
        if not self.rms:  # (rms counts them already)
            self.decoded[dst] += n
        return n


class RefreshOnProgress:
    """bulk refreshes once some branch's first mask has moved refresh_block_size positions since
    its last full forward (a sync copies the leader's count), not blocks advanced x block size
    (blockbatch_refresh_on_progress)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frontier = [0] * len(self.sizes)  # first mask, relative to the prompt (G: none)
        self.moved = [0] * len(self.sizes)  # how far it moved since the last full forward

    def first_mask(self, i: int) -> int:
        masks = (self.canvas[i, self.P:] == self.config.mask_id).nonzero()
        return int(masks[0]) if len(masks) else self.L - self.P

    def note_progress(self, i: int) -> None:
        new = self.first_mask(i)
        self.moved[i] += max(new - self.frontier[i], 0)
        self.frontier[i] = new
        self.needs_refresh[i] = self.moved[i] >= self.config.refresh_block_size

    def advance(self, i: int) -> None:
        self.snap_window(i)

    def commit(self, rows: list[int], *args, **kwargs) -> None:
        super().commit(rows, *args, **kwargs)
        for i in rows:
            self.note_progress(i)

    def merge_into(self, dst: int, srcs: list[int]) -> int:
        n = super().merge_into(dst, srcs)
        if n:
            self.note_progress(dst)
        return n

    def sync_to(self, dst: int, leader: int) -> None:
        super().sync_to(dst, leader)
        self.frontier[dst], self.moved[dst] = self.first_mask(dst), self.moved[leader]
        self.needs_refresh[dst] = self.needs_refresh[leader]

    def full_forward(self, rows: list[int], init: bool) -> None:
        super().full_forward(rows, init)
        for i in rows:
            self.frontier[i], self.moved[i], self.needs_refresh[i] = self.first_mask(i), 0, False


class FirstCompleteExit:
    """The run stops as soon as one branch has no mask left, and of the complete branches the
    largest block size wins; EOS plays no part, neither as an exit nor in the returned tokens
    (blockbatch_first_complete_exit)."""

    def finished(self) -> bool:
        return bool((self.canvas[:, self.P:] != self.config.mask_id).all(1).any())

    def natural_winner(self) -> int:
        complete = (self.canvas[:, self.P:] != self.config.mask_id).all(1)  # (Br,)
        return int(complete.nonzero()[-1])  # sizes ascend: the last is the largest

    def eos_ready(self) -> int | None:
        return None

    def finish(self, ids: torch.Tensor) -> None:
        pass


class GreedyOnly:
    """Temperature 0 whatever the config says: the generator sets temperature 0, top_p None and
    top_k 1 on entry (blockbatch_greedy_only)."""

    def __init__(self, model, prompt, config, generator=None):
        super().__init__(model, prompt, replace(config, temperature=0.0), generator)


def with_quirks(config: BlockBatchConfig, logit_shift: int = 0) -> type:
    """BlockBatch, or the original's: ours with the quirks' methods in front. The original has one
    generator per model family; on a shifted-head model (logit_shift > 0) its Dream generator's
    quirks apply and stand first, so they override the others' exits. That generator is a `bulk`
    one: `rms` on Dream takes the LLaDA generator's quirks."""
    q, shifted = config.quirks, logit_shift > 0 and config.generator_variant == "bulk"
    mixins = [mixin for wanted, mixin in (
        (shifted and q.blockbatch_pred_window, PredecessorWindow),
        (shifted and q.blockbatch_seed_first_mask, SeedFirstMask),
        (shifted and q.blockbatch_conf_without_mask, ConfidenceWithoutMask),
        (shifted and q.blockbatch_prob_dict, CumulativeProbDict),
        (shifted and q.blockbatch_merge_own_block, MergeOwnBlock),
        (shifted and q.blockbatch_merged_count_as_decoded, MergedTokensCount),
        (shifted and q.blockbatch_refresh_on_progress, RefreshOnProgress),
        (shifted and q.blockbatch_first_complete_exit, FirstCompleteExit),
        (shifted and q.blockbatch_greedy_only, GreedyOnly),
        (q.blockbatch_smallest_wins, SmallestWins),
        (q.blockbatch_eos_prob_last_forward, EOSProbabilityFromLastForward),
        (q.blockbatch_float32_divergence, Float32Divergence),
        (q.blockbatch_masks_after_eos, MasksAfterEOS)) if wanted]
    return type("OriginalBlockBatch", (*mixins, BlockBatch), {}) if mixins else BlockBatch


# ---------------------------------------------------------------------------------------------
# Checking settings: a user's mistake is one clear line, before any compute
# ---------------------------------------------------------------------------------------------


def check_config(config: BlockBatchConfig) -> None:
    """Every BlockBatchConfig setting, when it is built (and again when generate starts)."""
    decode.check_int("gen_length", config.gen_length, low=1)
    if not isinstance(config.block_sizes, (int, str, bytes)) and hasattr(config.block_sizes, "__iter__"):
        config.block_sizes = tuple(config.block_sizes)  # a generator is read once, here
    if not isinstance(config.block_sizes, tuple) or not config.block_sizes:
        raise ValueError(f"block_sizes must be a non-empty list of integers, got {config.block_sizes!r}")
    for b in config.block_sizes:
        decode.check_int("every block size", b, low=1)
        if config.gen_length % b != 0:
            raise ValueError(f"gen_length {config.gen_length} is not divisible by block size {b}")
    if len(set(config.block_sizes)) != len(config.block_sizes):
        raise ValueError(f"block_sizes has duplicates (two identical branches): {list(config.block_sizes)}")
    config.block_sizes = tuple(sorted(config.block_sizes))  # the original sorts ascending
    decode.check_finite("threshold", config.threshold, low=0, high=1, low_open=True)
    decode.check_finite("temperature", config.temperature, low=0)
    decode.check_finite("conf_threshold", config.conf_threshold, low=0, high=1)
    if config.remasking not in decode.REMASKING:
        raise ValueError(f"unknown remasking {config.remasking!r}; use one of {tuple(decode.REMASKING)}")
    decode.check_int("refresh_block_size", config.refresh_block_size, low=1)
    decode.check_int("sync_threshold", config.sync_threshold, low=0)
    if config.generator_variant not in GENERATORS:
        raise ValueError(f"unknown generator_variant {config.generator_variant!r}; use one of {GENERATORS}")
    config.step_config = decode.DecodeConfig(  # the per-step settings in decode.py's terms (also checks quirks)
        gen_length=config.gen_length, block_length=config.gen_length, steps=config.gen_length,
        temperature=config.temperature, remasking=config.remasking, mask_id=config.mask_id, eos_id=config.eos_id,
        threshold=config.threshold, quirks=config.quirks)
    config.quirks = config.step_config.quirks
