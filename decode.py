"""
Decoding a masked-diffusion LM: LLaDA, Dream, Fast-dLLM, dLLM-Cache and AdaBlock, in one loop.

The answer starts as `gen_length` [MASK] tokens after the prompt: the *canvas*. Each step runs the
model over the canvas, proposes a token for every masked position of the current block and commits
("unmasks") the most confident; committed tokens never change. Blocks go left to right.
- LLaDA (Nie et al., arXiv 2502.09992): one full forward and a fixed number of commits per step.
- Dream (Ye et al., arXiv 2508.15487): the same loop with its own confidence measures (top
  probability, top-1 minus top-2, negative entropy, random reveals), top_p/top_k sampling and a
  linspace schedule; its shifted head is the model's business (model.logits), not the loop's.
- Fast-dLLM (Wu et al., arXiv 2505.22618): an approximate KV cache (prefix cache, DualCache) and
  commits by confidence (threshold, factor).
- dLLM-Cache (Liu et al., arXiv 2506.06295): reuses each layer's attention and MLP outputs and
  recomputes only the answer tokens whose values moved most.
- AdaBlock (Lu et al., arXiv 2509.26432): a block ends on a delimiter the model already predicts.
Each method is one piece of the loop, registered once by name: a confidence measure
(`CONFIDENCES`), a commit rule (`COMMIT_RULES`), a cache policy (`CACHE_POLICIES`) or a block rule
(`BLOCK_RULES`). The CLI, the benchmark and the property tests read these registries. The defaults
are the papers' rules; `quirks=True` swaps in the original code's deviations, all in the last
section but one. Changed from the originals: a finished block gets no more forwards; rows may be
left-padded and have blocks of their own; the LM head runs only where tokens may be committed.

    config = DecodeConfig.for_model(model.config, gen_length=256, block_length=32, steps=256,
                                    cache="dual", threshold=0.9)
    out = generate(model, prompt_ids, config)       # out.ids (B, P + G), out.nfe

Shape legend: B batch, P prompt, G generation, L = P + G (the canvas; index L is the trash slot),
K positions whose logits a step reads (the block), Q query tokens of a forward, V vocabulary,
C model dim, N layers.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from cache import FeatureCache, KVCache

# ---------------------------------------------------------------------------------------------
# Settings and result
# ---------------------------------------------------------------------------------------------


def option(default, group: str, help: str, **more):
    """A settings field: its default, the method it belongs to and the help the CLI prints. A
    commit rule's field also names the values the benchmark sweeps and the property tests draw
    (`sweep`) and the one its benchmark row runs (`bench`)."""
    return field(default=default, metadata=dict(group=group, help=help, **more))


@dataclass
class DecodeConfig:
    """Decoding settings, grouped by the method they belong to and named as the original samplers'
    keyword arguments. Each field's help is in its metadata (`fields(DecodeConfig)`)."""

    # -- Lengths and the top-k schedule (LLaDA's, Dream's)
    gen_length: int = option(128, "lengths", "tokens to generate (G)")
    block_length: int = option(128, "lengths", "tokens per block, left to right; gen_length must be a multiple "
                                               "(AdaBlock: the default block length)")
    steps: int = option(128, "lengths", "the top-k schedule's forwards over all blocks (a multiple of the number "
                                        "of blocks, at most gen_length); give no commit rule to use it")
    schedule: str = option("uniform", "lengths", "how many tokens each step of the top-k schedule commits: "
                                                 "'uniform' (LLaDA: the block's masks spread evenly over its steps) or "
                                                 "'linspace' (Dream: int(masks * (1 - s / t)) on t = linspace(1, eps, "
                                                 "steps + 1))")
    eps: float = option(1e-3, "lengths", "the linspace schedule's last time (Dream's eps)")
    alg_temp: float | None = option(None, "lengths", "top-k schedule: draw the k positions from "
                                                     "softmax(confidence / alg_temp) instead of taking the k most "
                                                     "confident (None or 0 = the k most confident)")
    # -- Sampling: the proposals and their confidence
    temperature: float = option(0.0, "sampling", "0 = the most likely token; above 0, sample from "
                                                 "softmax(logits / temperature)")
    top_p: float | None = option(None, "sampling", "sample from the smallest set of tokens whose probability "
                                                   "(after temperature) reaches top_p (None = all)")
    top_k: int | None = option(None, "sampling", "sample from the top_k most likely tokens, and any tied with the "
                                                 "k-th (None = all)")
    remasking: str = option("low_confidence", "sampling", "the confidence measure that orders the proposals: "
                                                          "'low_confidence' (the proposal's probability, LLaDA), "
                                                          "'random'; Dream's 'maskgit_plus' (the proposal's "
                                                          "probability after temperature, top_p and top_k), "
                                                          "'topk_margin' (top-1 minus top-2), 'entropy' (negative "
                                                          "entropy), 'origin' (each mask revealed at random with "
                                                          "the schedule's probability)")
    cfg_scale: float = option(0.0, "sampling", "classifier-free guidance strength (0 = off)")
    logits_eos_inf: bool = option(False, "sampling", "never propose the end-of-text token")
    confidence_eos_eot_inf: bool = option(False, "sampling", "give end-of-text and end-of-turn proposals no "
                                                             "confidence, so they are committed last")
    # -- Commit rule: at most one set (None = off); with none, the top-k schedule
    threshold: float | None = option(None, "commit rule", "Fast-dLLM: commit every proposal whose confidence "
                                                          "reaches this (and always the best one); 0.9 in the "
                                                          "paper", sweep=(0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99),
                                     bench=0.9)
    factor: float | None = option(None, "commit rule", "Fast-dLLM: commit the k-th most confident proposal "
                                                       "while its confidence is at least 1 - factor / (k + 1)",
                                  sweep=(0.5, 1.0, 2.0, 4.0), bench=1.0)
    # -- Cache policy
    cache: str = option("none", "cache", "'none' (a full forward every step), 'prefix' (Fast-dLLM's prefix "
                                         "cache), 'dual' (DualCache) or 'dllm' (dLLM-Cache)")
    refresh_interval: int = option(0, "cache", "prefix/dual: also refresh the whole cache every this many steps "
                                               "of a block (0 = only when a block starts; 1 = every step, "
                                               "which is no cache)")
    # -- dLLM-Cache
    prompt_interval_steps: int = option(50, "dLLM-Cache", "recompute the prompt's features every this many "
                                                          "steps (K_p)")
    gen_interval_steps: int = option(7, "dLLM-Cache", "recompute the whole answer's features every this many "
                                                      "steps (K_r)")
    transfer_ratio: float = option(0.25, "dLLM-Cache", "between those, recompute this fraction of the answer: "
                                                       "the tokens whose values changed most (rho; 0 = reuse "
                                                       "everything)")
    # -- AdaBlock
    delimiter_ids: tuple[int, ...] | None = option(None, "AdaBlock", "token ids a block may end on (e.g. the "
                                                                     "newline's); None = fixed blocks")
    delimiter_threshold: float = option(0.3, "AdaBlock", "end the block on a delimiter predicted with at least "
                                                         "this probability (inf = never); 0.3 in the paper")
    window_fraction: float = option(0.25, "AdaBlock", "look for delimiters in the next fraction x gen_length "
                                                      "positions")
    # -- Stopping
    stop_at_eos: bool = option(False, "stopping", "end a row once it has committed end-of-text with nothing "
                                                  "masked before it: the rest becomes end-of-text without more "
                                                  "forwards")
    # -- Special ids (default: the model config's)
    mask_id: int | None = option(None, "special ids", "the [MASK] token id")
    eos_id: int | None = option(None, "special ids", "the end-of-text id (stop_at_eos, left padding, the EOS flags)")
    eot_id: int | None = option(None, "special ids", "the end-of-turn id (confidence_eos_eot_inf); LLaDA's "
                                                     "config.json has none: pass the tokenizer's '<|eot_id|>'")
    # -- Measuring and reproducing
    measure_drift: bool = option(False, "measuring", "cached policies: also run an exact forward at every "
                                                     "cached step and report the largest logit difference "
                                                     "(slow)")
    quirks: bool | Quirks = option(False, "quirks", "reproduce the original code's deviations from its paper "
                                                    "(True = all, as the parity tests; or a decode.Quirks)")

    def __post_init__(self):
        check_config(self)  # (the checks stand in the last section)

    @property
    def rule(self) -> str:
        """The commit rule in use: the one of RULES that is set, else 'topk' (LLaDA's schedule)."""
        return next((name for name in RULES if getattr(self, name) is not None), "topk")

    @property
    def block_rule(self) -> str:
        return "fixed" if self.delimiter_ids is None else "adablock"

    @property
    def num_blocks(self) -> int:
        return -(-self.gen_length // self.block_length)  # a ragged last block counts (AdaBlock's B0)

    @property
    def steps_per_block(self) -> int:
        return max(1, self.steps // self.num_blocks)  # >= 1 also where AdaBlock ignores steps

    @classmethod
    def for_model(cls, model_config, **kwargs) -> "DecodeConfig":
        """Settings whose special ids default to the model config's (mask, EOS, EOT)."""
        kwargs.setdefault("mask_id", model_config.mask_token_id)
        kwargs.setdefault("eos_id", model_config.eos_token_id)
        kwargs.setdefault("eot_id", model_config.eot_token_id)
        return cls(**kwargs)


# The fields that choose a commit rule, each named as the rule it turns on.
RULES = tuple(f.name for f in fields(DecodeConfig) if f.metadata["group"] == "commit rule")


@dataclass
class DecodeResult:
    """What every decoding strategy returns."""

    ids: torch.Tensor  # (B, P + G) prompt and generation
    nfe: int  # model forward calls (a batched forward, CFG's doubled batch included, counts once)
    query_tokens: int  # tokens pushed through the model, summed over forwards (per row; BlockBatch:
    #   over its branch rows, padding included)
    masks_left: int  # masks left in the output (only a quirk can leave any: DualCache's step cap,
    #   BlockBatch's masks after an EOS exit)
    prompt_length: int  # P
    nfe_per_block: list[int] = field(default_factory=list)  # forwards spent on each block
    extras: dict = field(default_factory=dict)  # what a method measured: 'max_drift', ...

    @property
    def generated(self) -> torch.Tensor:
        """The generated part, (B, G)."""
        return self.ids[:, self.prompt_length:]

    @property
    def max_drift(self) -> float | None:
        """Largest |cached - exact| block logit over the run (measure_drift only)."""
        return self.extras.get("max_drift")


# ---------------------------------------------------------------------------------------------
# The registries: every method, listed once by the name its setting takes
# ---------------------------------------------------------------------------------------------

CONFIDENCES: dict[str, Callable] = {}  # remasking -> measure(proposals, noise) -> (B, K)
COMMIT_RULES: dict[str, Callable] = {}  # rule -> rule(proposals, config, k) -> (B, K) bool
CACHE_POLICIES: dict[str, type] = {}  # cache -> a cache policy class (NoCache or a subclass)
BLOCK_RULES: dict[str, type] = {}  # DecodeConfig.block_rule -> a block rule class
SCHEDULES: dict[str, Callable] = {}  # schedule -> count(state, config, proposals, noise) -> (B,)
CACHES, REMASKING = CACHE_POLICIES.keys(), CONFIDENCES.keys()  # live views of the names


def register(registry: dict, name: str):
    """Decorator: list a method in a registry under `name` (a fork adds its own the same way).
    A name already taken is an error: one name, one method."""
    def add(method):
        if name in registry:
            raise ValueError(f"{name!r} is already registered, to {registry[name].__qualname__}")
        registry[name] = method
        return method
    return add


def lookup(registry: dict, kind: str, name: str):
    """The method registered under `name`; a name with none is an error, never another method."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(registry)}")
    return registry[name]


# ---------------------------------------------------------------------------------------------
# Proposals: a token for every position, and the confidence measures that order them
# ---------------------------------------------------------------------------------------------


@dataclass
class Noise:
    """The random numbers one step uses: Gumbel noise for sampling, uniforms for random remasking,
    Gumbel noise for drawing the top-k positions (alg_temp)."""

    gumbel: torch.Tensor | None = None  # (B, K, V) float64, -log(u); None at temperature 0
    uniform: torch.Tensor | None = None  # (B, K) float64; None unless a measure needs them
    ranking: torch.Tensor | None = None  # (B, K) float64, -log(u); None unless alg_temp > 0
    exponential: torch.Tensor | None = None  # (B, K, V) Dream's own draws (dream_draws); else None
    generator: torch.Generator | None = None  # the step's generator, for a rule that draws itself (Dream's
    #   torch.multinomial for alg_temp, under dream_topk_ties: only at steps that commit)


def draw_noise(config: DecodeConfig, generator, shape, device) -> Noise:
    """The step's random numbers for logits of `shape` (B, K, V): float64, so that the sample's
    tail is not cut off by rounding. Only the positions the step reads are drawn."""
    noise = Noise(generator=generator)
    if config.temperature > 0:
        noise.gumbel = -torch.log(torch.rand(shape, generator=generator, device=device, dtype=torch.float64))
    if getattr(CONFIDENCES.get(config.remasking), "needs_uniforms", False):
        noise.uniform = torch.rand(shape[:2], generator=generator, device=device, dtype=torch.float64)
    if config.alg_temp:
        noise.ranking = -torch.log(torch.rand(shape[:2], generator=generator, device=device, dtype=torch.float64))
    return noise


def step_noise(config: DecodeConfig, generator, window: Window, logits: torch.Tensor, eligible: torch.Tensor) -> Noise:
    """The noise of one decoding step: over the logits it read, (B, K, V) (eligible (B, K): the
    positions it may commit, for draws that cover only those)."""
    return draw_noise(config, generator, logits.shape, logits.device)


def restrict(logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """The logits of the distribution proposals are drawn from, in the logits' dtype: divided by
    the temperature (when > 0), then nucleus (top_p) and top-k filtering, removed tokens at -inf.
    Dream's order: top_p before top_k; top_p keeps the token that crosses it, top_k every token
    tied with the k-th. (B, K, V) -> (B, K, V); the input is not changed."""
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_p is not None and config.top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # (B, K, V)
        before = F.softmax(ordered, dim=-1).cumsum(-1)  # (B, K, V) mass up to and including each rank
        drop = torch.zeros_like(before, dtype=torch.bool)
        drop[..., 1:] = before[..., :-1] > config.top_p  # a rank goes when the ranks before it reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    if config.top_k is not None:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, K, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return logits


def gumbel_max_scores(logits: torch.Tensor, temperature: float, gumbel: torch.Tensor) -> torch.Tensor:
    """logits + T * g, g = -log(-log u) standard Gumbel noise (gumbel holds -log u): their argmax
    is a sample of softmax(logits / T) (the Gumbel-max trick). Float64, (B, K, V)."""
    return logits.to(torch.float64) - temperature * gumbel.log()


def sample(logits: torch.Tensor, config: DecodeConfig, noise: Noise, scores=gumbel_max_scores) -> torch.Tensor:
    """The proposed token at every position, (B, K, V) -> (B, K): the argmax at temperature 0,
    otherwise a sample of softmax(logits / T) by the Gumbel-max trick. The input is not changed."""
    if config.logits_eos_inf:
        logits = logits.index_fill(-1, torch.tensor([config.eos_id], device=logits.device), -torch.inf)
    if config.temperature > 0:
        if config.top_p is not None or config.top_k is not None:  # (at temperature 0 the argmax survives both)
            logits = logits.masked_fill(restrict(logits, config) == -torch.inf, -torch.inf)
        logits = scores(logits, config.temperature, noise.gumbel)
    # The mask token is never a proposal: committing it would leave the position masked forever
    # (a trained LLaDA never predicts it, so this changes nothing there; the confidences still
    # use the full softmax, as the original's do).
    logits = logits.index_fill(-1, torch.tensor([config.mask_id], device=logits.device), -torch.inf)
    return logits.argmax(dim=-1)  # (B, K)


@dataclass
class Proposals:
    """One step's proposals over the K positions whose logits it read, and what a commit rule may
    need to decide: the confidence (by the config's measure; -inf where a position cannot be
    committed) and, computed when first asked, the distribution's probabilities, entropy and margin."""

    tokens: torch.Tensor  # (B, K) the proposed token ids
    logits: torch.Tensor  # (B, K, V) the logits the measures read (EOS/EOT hidden where asked)
    eligible: torch.Tensor  # (B, K) bool: masked positions of each row's block
    confidence: torch.Tensor | None = None  # (B, K) float64, -inf where not eligible
    config: DecodeConfig | None = None  # the settings the proposals were drawn under (temperature, top_p, top_k)
    noise: Noise | None = None  # the step's random numbers (alg_temp's ranking draws)
    query_span: tuple[int, int] | None = None  # (a, Q): the K positions are queries a.. of the forward's Q

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """softmax(logits) in float64, (B, K, V)."""
        return F.softmax(self.logits.to(torch.float64), dim=-1)

    @functools.cached_property
    def entropy(self) -> torch.Tensor:
        """Each position's predictive entropy in nats, (B, K)."""
        return -(self.probs * torch.log(self.probs.clamp(min=1e-300))).sum(-1)

    @functools.cached_property
    def margin(self) -> torch.Tensor:
        """Top-1 minus top-2 probability, (B, K)."""
        top = self.probs.topk(min(2, self.probs.shape[-1]), dim=-1).values  # (B, K, 2)
        return top[..., 0] - top[..., -1]

    @functools.cached_property
    def sampling_probs(self) -> torch.Tensor:
        """The distribution the proposals are drawn from: softmax of the logits after temperature,
        top_p and top_k (`restrict`), in the logits' dtype as Dream's sampler computes it (B, K, V)."""
        return F.softmax(restrict(self.logits, self.config), dim=-1)


# Dream's measures (Ye et al., "Dream 7B", arXiv 2508.15487) read the distribution the proposal
# was drawn from (after temperature, top_p and top_k), where LLaDA's reads the plain softmax.

@register(CONFIDENCES, "maskgit_plus")
def sampled_probability(p: Proposals, noise: Noise) -> torch.Tensor:
    """Dream's `maskgit_plus`: the probability of the proposed token (B, K)."""
    return p.sampling_probs.gather(-1, p.tokens[..., None]).squeeze(-1)


@register(CONFIDENCES, "topk_margin")
def sampled_margin(p: Proposals, noise: Noise) -> torch.Tensor:
    """Dream's `topk_margin`: top-1 minus top-2 probability, whichever token was proposed (B, K)."""
    top = p.sampling_probs.topk(min(2, p.sampling_probs.shape[-1]), dim=-1).values  # (B, K, 2)
    return top[..., 0] - top[..., -1]


@register(CONFIDENCES, "entropy")
def negative_entropy(p: Proposals, noise: Noise) -> torch.Tensor:
    """Dream's `entropy`: sum_v q_v log(q_v + 1e-10) <= 0, higher = surer (B, K). A distribution
    that top_p or top_k cut to one token scores exactly 0, so such positions tie."""
    q = p.sampling_probs
    return (q * torch.log(q + 1e-10)).sum(-1)


@register(CONFIDENCES, "origin")
def reveal_order(p: Proposals, noise: Noise) -> torch.Tensor:
    """Dream's `origin` (the masked-diffusion reverse step): each mask is revealed with the
    schedule's probability 1 - s/t, by its own uniform draw u. Ranking by -u and committing the
    masks with u below that probability (the linspace schedule counts them) is that step."""
    return -noise.uniform


reveal_order.needs_uniforms = True
reveal_order.draws_count = True  # the linspace schedule counts the draws below 1 - s/t instead of int(n(1 - s/t))


@register(CONFIDENCES, "low_confidence")
def proposal_probability(p: Proposals, noise: Noise) -> torch.Tensor:
    """LLaDA's low-confidence remasking: the probability of the proposed token (B, K)."""
    return p.probs.gather(-1, p.tokens[..., None]).squeeze(-1)


@register(CONFIDENCES, "random")
def random_confidence(p: Proposals, noise: Noise) -> torch.Tensor:
    """LLaDA's random remasking: a uniform draw per position (B, K)."""
    return noise.uniform


random_confidence.needs_uniforms = True  # draw_noise draws them for a measure that says so


def propose(logits: torch.Tensor, eligible: torch.Tensor, config: DecodeConfig, noise: Noise,
            tokens: torch.Tensor | None = None, pieces: Pieces | None = None) -> Proposals:
    """A proposal for every position of the logits (B, K, V) and its confidence, -inf where not
    `eligible` (B, K). `tokens`: the proposals if the step already sampled them. The input is not
    changed."""
    pieces = pieces or Pieces.for_config(config)
    # 1) Proposal: the argmax, or a sample at temperature > 0.
    tokens = pieces.sample(logits, config, noise) if tokens is None else tokens  # (B, K)
    # 2) confidence_eos_eot_inf: EOS and EOT get no probability in the confidence, so the
    #    threshold and top-k rules commit them last.
    if config.confidence_eos_eot_inf and pieces.hidden:
        logits = logits.index_fill(-1, torch.tensor(pieces.hidden, device=logits.device), -torch.inf)
    # 3) Confidence by the config's measure; only eligible positions can be committed.
    p = Proposals(tokens, logits, eligible, config=config, noise=noise)
    conf = pieces.confidence(p, noise)  # (B, K)
    p.confidence = torch.where(eligible, conf, torch.full_like(conf, -torch.inf))
    return p


# ---------------------------------------------------------------------------------------------
# Commit rules: which proposals become tokens
# ---------------------------------------------------------------------------------------------


def transfer_count(masked: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """LLaDA's schedule: how many tokens each row commits at `step` of a block whose rows had
    `masked` (B,) masks at its start. The count is spread evenly over `steps`; the remainder goes
    to the first steps. Past the schedule (a block longer than planned) one token per step."""
    if step >= steps:
        return torch.ones_like(masked)
    return masked // steps + (step < masked % steps).long()  # (B,)


@register(SCHEDULES, "uniform")
def uniform_count(state: DecodeState, config: DecodeConfig, p: Proposals, noise: Noise) -> torch.Tensor:
    """LLaDA's top-k schedule (transfer_count) at the block's current step, (B,)."""
    return transfer_count(state.to_commit, config.steps_per_block, state.step)


def reveal_fraction(steps: int, step: int, eps: float) -> torch.Tensor | None:
    """Dream's schedule: the fraction 1 - s/t of the masks that step `step` of `steps` reveals,
    with t, s consecutive times of float32 linspace(1, eps, steps + 1) (computed as Dream does,
    in float32); None at the last step and past it, which reveals every mask left."""
    if step >= steps - 1:
        return None
    t, s = torch.linspace(1, eps, steps + 1)[step:step + 2]
    return 1 - s / t  # () float32


@register(SCHEDULES, "linspace")
def linspace_count(state: DecodeState, config: DecodeConfig, p: Proposals, noise: Noise) -> torch.Tensor:
    """Dream's top-k schedule: int(n * (1 - s/t)) of each row's n masks, truncated (so the first
    of `steps` = G steps reveals none), and every mask left at the last step; (B,). `origin`
    reveals each mask whose own draw falls below 1 - s/t instead, so its count is random."""
    masks = p.eligible.sum(1)  # (B,)
    f = reveal_fraction(config.steps_per_block, state.step, config.eps)
    if f is None:
        return masks
    if getattr(CONFIDENCES.get(config.remasking), "draws_count", False):
        return ((noise.uniform < f.to(noise.uniform.device)) & p.eligible).sum(1)
    return (masks.to(torch.float32) * f.to(masks.device)).long()  # float32 as Dream's int(n * (1 - s / t))


def confidence_rank(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence, 0 = most confident: (B, K) -> (B, K)."""
    order = conf.argsort(dim=-1, descending=True, stable=True)  # (B, K)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return rank


def select_topk(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each row's k (B,) most confident eligible positions, (B, K) -> (B, K) bool."""
    return (confidence_rank(conf) < k[:, None]) & (conf > -torch.inf)


def ranking(p: Proposals, config: DecodeConfig) -> torch.Tensor:
    """What the top-k rule ranks, (B, K): the confidence, or with alg_temp > 0 (Dream) the
    confidence / alg_temp plus Gumbel noise, whose top k are k draws without replacement from
    softmax(confidence / alg_temp)."""
    if not config.alg_temp:
        return p.confidence
    return p.confidence / config.alg_temp - torch.log(p.noise.ranking)  # -log(-log u): Gumbel


@register(COMMIT_RULES, "topk")
def topk_rule(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """LLaDA and Dream: commit the k most confident proposals, k (B,) from the schedule."""
    return select_topk(ranking(p, config), k)


def select_threshold(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every eligible position with confidence >= threshold, and always the single most confident
    one, so every step makes progress. (B, K) -> (B, K) bool."""
    eligible = conf > -torch.inf
    return eligible & ((conf >= threshold) | (confidence_rank(conf) == 0))


@register(COMMIT_RULES, "threshold")
def threshold_rule(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's threshold rule (select_threshold)."""
    return select_threshold(p.confidence, config.threshold)


def factor_passes(conf: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's factor bound: sort eligible confidences descending; rank k (1-based) passes
    while c_k >= 1 - factor / (k + 1); rank 1 always. Returns (leading ranks that pass, eligible
    positions), both (B,)."""
    n_eligible = (conf > -torch.inf).sum(-1)  # (B,)
    sorted_conf = conf.sort(dim=-1, descending=True).values  # (B, K)
    k = torch.arange(1, conf.shape[1] + 1, device=conf.device)  # 1-based ranks (K,)
    passes = (sorted_conf >= 1 - factor / (k + 1)) | (k == 1)  # (B, K)
    return passes.long().cumprod(-1).sum(-1).clamp(max=n_eligible), n_eligible


@register(COMMIT_RULES, "factor")
def factor_rule(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule: commit the leading ranks that pass the bound (factor_passes)."""
    return select_topk(p.confidence, factor_passes(p.confidence, config.factor)[0])


# ---------------------------------------------------------------------------------------------
# The canvas and the block rules
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """Everything one request carries from step to step."""

    slots: torch.Tensor  # (B, L + 1) the canvas, then the trash slot where padded queries' commits go
    P: int  # prompt length (after left padding)
    start: torch.Tensor  # (B,) each row's current block is [start, end) on the canvas: the block bounds
    end: torch.Tensor  # (B,)
    bounds: tuple[list[int], list[int]] | None = None  # start and end on the host, read once per block
    #   (and once more where AdaBlock moves the end)
    busy: list[bool] | None = None  # per row, on the host: its block still had masks at the last wait
    to_commit: torch.Tensor | None = None  # (B,) masks in each row's block at its start (top-k schedule)
    key_mask: torch.Tensor | None = None  # (rows, L) 1 = real token; None when nothing is padded
    cache: KVCache | None = None  # the request's buffers (cached policies only)
    step: int = 0  # forwards spent on the current block
    nfe: int = 0  # forwards spent on the request
    query_tokens: int = 0  # tokens pushed through the model, summed over forwards
    window: Window | None = None  # what the last forward computed
    extras: dict = field(default_factory=dict)  # method-specific measurements, copied to the result

    @property
    def canvas(self) -> torch.Tensor:
        """(B, L) the canvas: prompt, then committed tokens and masks (a view of `slots`)."""
        return self.slots[:, :-1]

    @property
    def L(self) -> int:
        """The canvas length, P + G."""
        return self.slots.shape[1] - 1

    @property
    def trash(self) -> int:
        """The trash slot's index, L: one past the canvas, in `slots` and in every cache buffer."""
        return self.slots.shape[1] - 1


def setup(model, prompt_ids, config: DecodeConfig, attention_mask=None, pieces: Pieces | None = None) -> DecodeState:
    """The canvas (prompt + gen_length masks), the key-padding mask and the cache policy's buffers."""
    device = model.device
    B, P = prompt_ids.shape
    L = P + config.gen_length
    slots = torch.full((B, L + 1), config.mask_id, dtype=torch.long, device=device)  # (B, L + 1)
    prompt_ids = prompt_ids.to(device)
    key_mask = None
    if attention_mask is not None:
        # Padding never reaches the embedding with its raw ids (it may hold any value): it is
        # written as EOS, the usual pad token, and hidden from attention by the key mask.
        attention_mask = attention_mask.to(device)
        prompt_ids = prompt_ids.masked_fill(attention_mask == 0, config.eos_id if config.eos_id is not None else 0)
        # The key-padding mask covers the whole canvas: generated positions are always real.
        key_mask = torch.ones((B, L), dtype=torch.long, device=device)  # (B, L)
        key_mask[:, :P] = attention_mask
        if config.cfg_scale > 0:
            key_mask = key_mask.repeat(2, 1)  # (2B, L): guidance's unconditional copies
    slots[:, :P] = prompt_ids
    cache = (pieces or Pieces.for_config(config)).cache.new_cache(model, B, L)  # allocated once
    at_prompt_end = torch.full((B,), P, dtype=torch.long, device=device)
    return DecodeState(slots=slots, P=P, start=at_prompt_end, end=at_prompt_end.clone(), key_mask=key_mask,
                       cache=cache, busy=[True] * B)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and a (B, P) attention mask (1 = real token)."""
    if len(prompts) == 0:
        raise ValueError("left_pad needs at least one prompt, got none")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def masked_in_block(state: DecodeState, mask_id: int) -> torch.Tensor:
    """(B, L) True at the masked positions of each row's current block."""
    pos = torch.arange(state.L, device=state.slots.device)  # (L,)
    in_block = (pos >= state.start[:, None]) & (pos < state.end[:, None])  # (B, L)
    return in_block & (state.canvas == mask_id)


@register(BLOCK_RULES, "fixed")
class FixedBlocks:
    """The block rule of LLaDA and Fast-dLLM: blocks of block_length on a fixed grid."""

    def __init__(self, config: DecodeConfig):
        self.block_length = config.block_length

    def first_end(self, state: DecodeState) -> torch.Tensor:
        """Where the block ends, as far as is known before its first forward: (B,)."""
        return (state.start + self.block_length).clamp(max=state.L)

    def adapt(self, state: DecodeState, logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor):
        """After the block's first forward (logits and proposals at canvas positions (B, K)):
        nothing to change on a fixed grid."""


def next_block(state: DecodeState, blocks, config: DecodeConfig) -> bool:
    """Move every row to its next block, which starts where the last one ended and ends where
    the block rule says. False when every row has reached the end of the canvas."""
    state.start = state.end
    state.end = blocks.first_end(state)
    state.step = 0
    masked = masked_in_block(state, config.mask_id)  # (B, L)
    state.to_commit = masked.sum(1)  # (B,) for the top-k schedule
    B = state.start.shape[0]
    # One wait for the device per block: the bounds and which rows have masks, on the host.
    host = torch.cat([state.start, state.end, masked.any(1).long()]).tolist()
    state.bounds, state.busy = (host[:B], host[B:2 * B]), [bool(m) for m in host[2 * B:]]
    return any(s < state.L for s in state.bounds[0])


# ---------------------------------------------------------------------------------------------
# Cache policies: which canvas positions each step's forward computes
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What one forward computes: the query positions, the query indices that need logits, and
    whether it is a full forward (every canvas position is a query)."""

    positions: torch.Tensor  # (Q,) shared by every row, or (B, Q) padded with the trash slot L
    logits_range: tuple[int, int]  # [a, b): the query indices whose logits the step reads
    full: bool
    refresh: Refresh | None = None  # dLLM-Cache: what each row's layers recompute


def model_forward(model, tokens, window: Window, cache, key_mask) -> torch.Tensor:
    """Run the model on the query tokens (rows, Q) at the window's positions; logits of the
    window's logits range, (rows, K, V). The queries' K/V go into the cache (if any) and
    attention reads the rest from it."""
    return model(tokens, positions=window.positions, cache=cache, attention_mask=key_mask,
                 logits_range=window.logits_range)


@register(CACHE_POLICIES, "none")
class NoCache:
    """Vanilla LLaDA: every step is a full forward over the whole canvas.

    A policy answers four questions: the buffers a request needs (`new_cache`), what a step's
    forward computes (`window`), how it runs (`forward`), and how many forwards a block may take
    (`budget`). `lookback` is the model's logit shift: a shifted model (Dream) predicts position i
    from the row before it, so a window that does not start at 0 starts that many rows earlier.
    """

    every_step = {}  # the settings under which a policy recomputes everything at every step (= no cache)

    def __init__(self, config: DecodeConfig, lookback: int = 0):
        self.config, self.lookback = config, lookback

    def new_cache(self, model, batch: int, L: int):
        return None

    def budget(self) -> tuple[int, float]:
        """(fewest, most) forwards a block may take; it ends early only when it has no masks."""
        return 0, math.inf

    def window(self, state: DecodeState) -> Window:
        return self.full_window(state)

    def full_window(self, state: DecodeState) -> Window:
        """The whole canvas, with logits from the earliest block start to the latest block end."""
        starts, ends = state.bounds
        return Window(torch.arange(state.L, device=state.slots.device), (min(starts), max(ends)), True)

    def commit_range(self, state: DecodeState, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each: the positions [lo, hi) a commit may land on: the block."""
        return state.start, state.end

    def forward(self, model, tokens, window: Window, cache, key_mask) -> torch.Tensor:
        return model_forward(model, tokens, window, cache, key_mask)


@register(CACHE_POLICIES, "prefix")
class PrefixCache(NoCache):
    """Fast-dLLM's prefix cache: a full forward at the block's first step (refreshing every
    cached position), then the block plus everything after it; the prefix is read from the cache.
    With refresh_interval n > 0, every n-th step of a block is a full refresh as well."""

    every_step = {"refresh_interval": 1}

    def new_cache(self, model, batch: int, L: int):
        rows = 2 * batch if self.config.cfg_scale > 0 else batch  # guidance's copies have rows of their own
        return KVCache.for_model(model.config, batch=rows, capacity=L, device=model.device, dtype=model.dtype)

    def window(self, state: DecodeState) -> Window:
        n = self.config.refresh_interval
        if state.step == 0 or (n and state.step % n == 0):
            return self.full_window(state)
        return self.block_window(state, self.stops(state))

    def stops(self, state: DecodeState) -> list[int]:
        """Where each row's window ends: the canvas end (the block and everything after it)."""
        return [state.L] * len(state.bounds[0])

    def block_window(self, state: DecodeState, stops: list[int]) -> Window:
        """Each row's positions [start - lookback, stop), logits for its block. Sizes come from
        the host's block bounds: no wait for the device."""
        starts, ends, back = *state.bounds, self.lookback
        logits_range = (back, back + max(e - s for s, e in zip(starts, ends)))
        if len(set(starts)) == 1 and len(set(stops)) == 1:  # the common case: one window for the batch
            return Window(torch.arange(starts[0] - back, stops[0], device=state.slots.device), logits_range, False)
        # Rows with blocks of their own: each row's window, padded to the longest with the trash slot.
        Q = max(e - s for s, e in zip(starts, stops)) + back
        pos = state.start[:, None] - back + torch.arange(Q, device=state.slots.device)  # (B, Q)
        stop = torch.tensor(stops, device=state.slots.device)[:, None]  # (B, 1)
        return Window(torch.where(pos < stop, pos, state.trash), logits_range, False)


@register(CACHE_POLICIES, "dual")
class DualCache(PrefixCache):
    """Fast-dLLM's DualCache: a full forward at the block's first step, then the block alone;
    prefix and suffix are read from the cache (stale), the block's fresh K/V overwrite its own."""

    def stops(self, state: DecodeState) -> list[int]:
        """Where each row's window ends: its block's end."""
        return state.bounds[1]


# ---------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Pieces:
    """One decoding method, assembled from the registries by the config's names: the seams a new
    method plugs into. The originals' quirks swap whole pieces (`with_quirks`, near the end)."""

    sample: Callable  # (logits, config, noise) -> (B, K) proposals
    step_noise: Callable  # (config, generator, window, logits) -> Noise
    confidence: Callable  # (proposals, noise) -> (B, K), from CONFIDENCES
    rule: Callable  # (proposals, config, k) -> (B, K) bool, from COMMIT_RULES
    schedule: Callable  # (state, config, proposals, noise) -> k (B,), the top-k rule's count, from SCHEDULES
    blocks: object  # a block rule, from BLOCK_RULES
    cache: NoCache  # a cache policy, from CACHE_POLICIES
    forward: Callable  # (model, tokens, window, cache, key_mask) -> (rows, K, V)
    hidden: tuple[int, ...]  # the ids confidence_eos_eot_inf takes out of the confidence

    @classmethod
    def for_config(cls, config: DecodeConfig, lookback: int = 0) -> "Pieces":
        """The registered pieces the config names; lookback: the model's logit shift."""
        cache = lookup(CACHE_POLICIES, "cache", config.cache)(config, lookback)
        pieces = cls(sample=sample, step_noise=step_noise,
                     confidence=lookup(CONFIDENCES, "remasking", config.remasking),
                     rule=lookup(COMMIT_RULES, "commit rule", config.rule),
                     schedule=lookup(SCHEDULES, "schedule", config.schedule),
                     blocks=lookup(BLOCK_RULES, "block rule", config.block_rule)(config),
                     cache=cache, forward=cache.forward,
                     hidden=tuple(i for i in (config.eos_id, config.eot_id) if i is not None))
        return with_quirks(pieces, config, lookback)


def query_tokens(state: DecodeState, config: DecodeConfig, positions: torch.Tensor):
    """The tokens at `positions`, (B, Q); with classifier-free guidance, followed by the
    unconditional copy (prompt masked) as B more rows, so both ride in one batched forward."""
    canvas = state.canvas
    index = positions.clamp(max=state.L - 1).expand(canvas.shape[0], -1)  # (B, Q); trash reads any token
    tokens = canvas.gather(1, index)  # (B, Q)
    if config.cfg_scale > 0:
        uncond = torch.where(index < state.P, torch.full_like(tokens, config.mask_id), tokens)
        tokens = torch.cat([tokens, uncond], dim=0)  # (2B, Q)
        positions = positions if positions.dim() == 1 else positions.repeat(2, 1)
    return tokens, positions


def guided(logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """Combine the conditional and unconditional halves: un + (cfg + 1)(cond - un), (B, K, V)."""
    if config.cfg_scale == 0:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (config.cfg_scale + 1) * (cond - uncond)


def fill_after_eos(gen: torch.Tensor, eos_id: int, mask_id: int) -> torch.Tensor:
    """Rows of generated tokens (B, G) whose first EOS has nothing masked before it are finished:
    every position after that EOS becomes EOS (in place). Returns which rows are finished, (B,)."""
    is_eos, is_mask = gen == eos_id, gen == mask_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gen.shape[1])  # (B,)
    first_mask = torch.where(is_mask.any(1), is_mask.int().argmax(1), gen.shape[1])  # (B,)
    done = first_eos < first_mask  # (B,) EOS committed and fully decoded before it
    after = torch.arange(gen.shape[1], device=gen.device)[None, :] > first_eos[:, None]  # (B, G)
    gen.masked_fill_(done[:, None] & after, eos_id)
    return done


def decode_step(model, state: DecodeState, config: DecodeConfig, generator, pieces: Pieces) -> None:
    """One denoising step: run the model over the query window, propose, commit, then wait for
    the device once."""
    B = state.slots.shape[0]
    # 1) The cache policy picks the query window; the model runs over it.
    window = pieces.cache.window(state)
    tokens, positions = query_tokens(state, config, window.positions)  # (rows, Q)
    logits = pieces.forward(model, tokens, replace(window, positions=positions), state.cache, state.key_mask)
    logits = guided(logits, config)  # (B, K, V)
    state.nfe, state.query_tokens, state.window = state.nfe + 1, state.query_tokens + window.positions.shape[-1], window
    # 2) Propose a token for every position whose logits we have; at a block's first step the
    #    block rule may now fix where the block ends.
    a, b = window.logits_range
    block_pos = window.positions[..., a:b].expand(B, -1)  # (B, K) canvas positions
    masked = state.slots.gather(1, block_pos) == config.mask_id  # (B, K)
    noise = pieces.step_noise(config, generator, window, logits, masked)
    proposed = pieces.sample(logits, config, noise)  # (B, K)
    if state.step == 0:
        pieces.blocks.adapt(state, logits, block_pos, proposed)
    # 3) Their confidence, and the commit rule's choice: masked positions of each row's block only.
    lo, hi = pieces.cache.commit_range(state, window)  # (B,) each
    eligible = masked & (block_pos >= lo[:, None]) & (block_pos < hi[:, None])  # (B, K); trash is never inside
    proposals = propose(logits, eligible, config, noise, tokens=proposed, pieces=pieces)
    proposals.query_span = (a, window.positions.shape[-1])
    k = pieces.schedule(state, config, proposals, noise)  # (B,) the top-k rule's count
    commit = pieces.rule(proposals, config, k)  # (B, K)
    # 4) Commit: write the chosen proposals at their canvas positions (the rest go to the trash
    #    slot); committed tokens are final.
    state.slots.scatter_(1, torch.where(commit, block_pos, state.trash), proposed)
    if config.stop_at_eos:
        # A finished row's blocks end at the canvas end: from the next block on, its windows are trash.
        done = fill_after_eos(state.canvas[:, state.P:], config.eos_id, config.mask_id)  # (B,)
        state.start = torch.where(done, state.L, state.start)
        state.end = torch.where(done, state.L, state.end)
    state.step += 1
    wait_for_step(state, config, pieces, torch.isfinite(logits).all(), commit.any() | (k == 0).all())


def wait_for_step(state: DecodeState, config: DecodeConfig, pieces: Pieces, finite, committed) -> None:
    """The one place a step waits for the device: in one transfer, whether the logits were finite
    (finite, a () bool), whether the step committed anything (committed) and which rows still have
    masks in their block (state.busy). Non-finite logits, or a rule that committed nothing, would
    decode garbage or loop forever: both are errors here."""
    masked = masked_in_block(state, config.mask_id).any(1)  # (B,) bool
    finite, committed, *state.busy = torch.cat([torch.stack([finite, committed]), masked]).tolist()
    if not finite:
        raise FloatingPointError(
            f"non-finite logits at step {state.step - 1} of the block starting at position {min(state.bounds[0])} "
            f"(forward {state.nfe}): the model overflowed its float type (a float16 model, a huge cfg_scale: "
            f"{config.cfg_scale}), or its weights or config (e.g. rms_norm_eps) are bad")
    if not committed and any(state.busy) and pieces.cache.budget()[1] == math.inf:  # a new rule's usual bug
        raise RuntimeError(f"the commit rule {config.rule!r} committed nothing at step {state.step - 1} while "
                           f"masks remain in the block: it would never finish (a rule must commit at least one)")


def block_done(state: DecodeState, budget: tuple[int, float]) -> bool:
    """Whether the block is finished: no row has a mask left in it (as of the last wait), within
    the cache policy's forward budget (fewest, most)."""
    least, most = budget
    return state.step >= most or (state.step >= least and not any(state.busy))


def decode_blocks(model, state: DecodeState, config: DecodeConfig, generator, pieces: Pieces, on_step=None):
    """Blocks left to right; within a block, steps until no row has a mask in it. Returns the
    forwards each block took."""
    nfe_per_block = []
    while next_block(state, pieces.blocks, config):
        while not block_done(state, pieces.cache.budget()):
            decode_step(model, state, config, generator, pieces)
            if on_step is not None:
                on_step(state)
        nfe_per_block.append(state.step)
    return nfe_per_block


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, config: DecodeConfig, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, on_step=None) -> DecodeResult:
    """Generate `config.gen_length` tokens after each prompt row.

    prompt_ids: (B, P) token ids, left-padded when rows differ in length.
    generator: the random source for temperature > 0 and random remasking (default: torch's global one).
    attention_mask: (B, P), 1 for real tokens, 0 for left padding (the original has no such mask).
    on_step: optional callback(state) after every step, e.g. to show the denoising live.
    """
    config = replace(config)  # checked again: a field may have been changed since it was built
    check_inputs(model, prompt_ids, config, attention_mask, generator)
    pieces = Pieces.for_config(config, lookback=getattr(model, "logit_shift", 0))
    state = setup(model, prompt_ids, config, attention_mask, pieces)
    if config.measure_drift:
        pieces = replace(pieces, forward=measuring_drift(pieces.forward, state, config))
    nfe_per_block = decode_blocks(model, state, config, generator, pieces, on_step)
    masks_left = int((state.canvas[:, state.P:] == config.mask_id).sum())
    if masks_left:
        warnings.warn(f"{masks_left} masks left in the output: a quirk's step cap (DualCache's, or Dream's block "
                      f"sampler's) allows {config.steps_per_block} forwards per block, too few for these settings",
                      stacklevel=2)
    return DecodeResult(ids=state.canvas.contiguous(), nfe=state.nfe, query_tokens=state.query_tokens,
                        masks_left=masks_left, prompt_length=state.P, nfe_per_block=nfe_per_block, extras=state.extras)


# ---------------------------------------------------------------------------------------------
# dLLM-Cache: a cache policy that reuses each layer's features and recomputes a few tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class Refresh:
    """dLLM-Cache's plan for one forward, per row: what its layers recompute. A row whose block
    is finished while the batch waits for others recomputes nothing and keeps its step count, so
    every row follows the schedule it follows alone."""

    P: int  # the response starts here
    prompt: torch.Tensor  # (rows,) bool: recompute the prompt's features (every K_p-th step)
    response: torch.Tensor  # (rows,) bool: recompute the whole response (every K_r-th step)
    verify: torch.Tensor  # (rows,) bool: otherwise V-verify: refresh values, recompute n_verify tokens
    n_verify: int  # tokens V-verify recomputes per row, int(rho * G)
    first_layer: torch.Tensor | None = None  # (rows,) bool: rows whose layer 0 refreshes everything
    on_host: tuple | None = None  # the four above on the host, which the layers decide by without
    #   waiting for the device (copied from them when not given)

    def __post_init__(self):
        if self.on_host is None:
            self.on_host = tuple(None if t is None else t.cpu() for t in
                                 (self.prompt, self.response, self.verify, self.first_layer))

    def layer(self, i: int, on_host: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt, response, verify) for layer i, on the device or the host."""
        prompt, response, verify, first = self.on_host if on_host else \
            (self.prompt, self.response, self.verify, self.first_layer)
        if i == 0 and first is not None:
            return first, first, torch.zeros_like(verify)
        return prompt, response, verify


@register(CACHE_POLICIES, "dllm")
class DLLMCache(NoCache):
    """dLLM-Cache (Liu et al., "dLLM-Cache: Accelerating Diffusion Large Language Models with
    Adaptive Caching", arXiv 2506.06295). Every step is a full window, but each layer recomputes
    only what the step's refresh plan asks (`dllm_forward`). Each row counts its own steps t from
    1: the prompt refreshes when (t - 1) % K_p == 0, the response when (t - 1) % K_r == 0;
    otherwise V-verify recomputes int(rho * G) response tokens."""

    every_step = {"prompt_interval_steps": 1, "gen_interval_steps": 1}

    def new_cache(self, model, batch: int, L: int):
        rows = 2 * batch if self.config.cfg_scale > 0 else batch
        self.steps = torch.zeros(batch, dtype=torch.long)  # (B,) on the host: each row's forwards so far
        return FeatureCache.for_model(model.config, batch=rows, capacity=L, device=model.device, dtype=model.dtype)

    def window(self, state: DecodeState) -> Window:
        return replace(self.full_window(state), refresh=self.plan(state))

    def counting(self, busy: list[bool]) -> torch.Tensor:
        """Which rows this forward is a step of: those with masks in their block, (B,) bool."""
        return torch.tensor(busy)

    def first_layer(self, counted: torch.Tensor) -> torch.Tensor | None:
        """Rows whose layer 0 refreshes everything at this step: none (the paper's schedule)."""
        return None

    def plan(self, state: DecodeState) -> Refresh:
        """This forward's refresh plan, per row; rows waiting for the batch recompute nothing."""
        config = self.config
        counted = self.counting(state.busy)  # (B,) on the host
        self.steps += counted.long()  # this forward is step t of each counted row
        t = self.steps
        n_verify = int(config.transfer_ratio * config.gen_length)
        prompt = counted & ((t - 1) % config.prompt_interval_steps == 0)  # (B,)
        response = counted & ((t - 1) % config.gen_interval_steps == 0)  # (B,)
        verify = counted & ~response & (n_verify > 0)  # (B,)
        first = self.first_layer(counted)
        self.record(state, prompt, response, verify, first, n_verify)
        copies, device = 2 if config.cfg_scale > 0 else 1, state.slots.device  # guidance's copies follow their rows
        host = [None if r is None else r.repeat(copies) for r in (prompt, response, verify, first)]
        rows = [None if r is None else r.to(device) for r in host]
        return Refresh(state.P, *rows[:3], n_verify=n_verify, first_layer=rows[3], on_host=tuple(host))

    def record(self, state: DecodeState, prompt, response, verify, first, n_verify: int) -> None:
        """What the plan recomputes, in token-layer rows summed over rows, for the method's report
        (extras 'recomputed_rows' and 'recomputed_fraction')."""
        P, G, N = state.P, state.L - state.P, state.cache.n_layers
        later = N - 1 if first is not None else N  # layers that follow the schedule
        whole = int(first.sum()) if first is not None else 0
        done = state.extras.setdefault("recomputed_rows", {"prompt": 0, "response": 0})
        done["prompt"] += P * (later * int(prompt.sum()) + whole)
        done["response"] += later * (G * int(response.sum()) + n_verify * int(verify.sum())) + G * whole
        state.extras["recomputed_fraction"] = (done["prompt"] + done["response"]) / max(1, int(self.steps.sum()) * N * state.L)

    def forward(self, model, tokens, window: Window, cache, key_mask) -> torch.Tensor:
        return dllm_forward(model, tokens, window, cache, key_mask)


def least_similar(similarity: torch.Tensor, n: int) -> torch.Tensor:
    """V-verify's choice: the n response tokens whose fresh values are least similar to their
    cached ones, (B, G) -> (B, n) indices. Many similarities tie (unchanged tokens sit at 1.0 up
    to rounding), so which tied tokens win is torch.topk's order, as in the original."""
    return torch.topk(similarity, k=n, dim=-1, largest=False).indices


def v_verify(block, cache: FeatureCache, x, plan: Refresh, verify):
    """V-verify: fresh values of every response token, compared with the cached ones. Returns the
    n_verify least similar tokens as a part to recompute (normed inputs (rows, n, C), canvas
    positions (rows, n), rows) and every response token's fresh values (rows, Hkv, G, D)."""
    layer, P, L = block.layer_idx, plan.P, x.shape[1]
    h = block.attn_norm(x[:, P:])  # (rows, G, C)
    v_new = block.v_proj(h)  # (rows, G, Hkv*D)
    similarity = F.cosine_similarity(v_new, cache.values(layer, P, L), dim=-1)  # (rows, G)
    chosen = least_similar(similarity, plan.n_verify)  # (rows, n) response indices
    picked = h.gather(1, chosen[..., None].expand(-1, -1, h.shape[-1]))  # (rows, n, C)
    return (picked, chosen + P, verify), block.heads(v_new, block.n_kv_heads)


def write_kv(block, cache: FeatureCache, rope, h_normed, positions, keep):
    """Queries, keys and values of normed tokens (rows, n, C) at canvas positions (rows, n); the
    keys and values go into the cache, rows not in `keep` (rows,) writing to the trash slot.
    Returns the queries (rows, H, n, D) and where they sit (rows, n)."""
    c, s = (t.gather(2, positions[:, None, :, None].expand(-1, 1, -1, t.shape[-1])) for t in rope)
    q, k, v = block.project(h_normed, c, s)
    if keep is not None:  # None: every row keeps its part
        positions = torch.where(keep[:, None], positions, cache.trash)  # (rows, n)
    cache.update(block.layer_idx, k, v, positions)
    return q, positions


def dllm_layer(block, cache: FeatureCache, x, rope, key_mask, plan: Refresh):
    """One transformer block under dLLM-Cache: x (rows, L, C) is the block's input for the whole
    canvas (prompt [0, P), response [P, L)); the output is x + attention + MLP for every position,
    fresh for the tokens a row recomputes here and read from the cache for the rest. rope is the
    canvas's (cos, sin) tables.

    Per row, as the plan says for this layer (prompt, response, verify are (rows,) bools): the
    prompt and the whole response, when they refresh, get queries, keys, values, attention and
    MLP; with V-verify every response value is refreshed and the n_verify tokens whose values
    moved most get the rest. A part any row needs is computed for all; a row that does not need
    it writes to the cache's trash slot. The recomputed tokens' queries attend, in one call, over
    the keys/values as the cache holds them after this layer's writes (fresh or stale).
    """
    layer, L, P = block.layer_idx, x.shape[1], plan.P
    prompt, response, verify = plan.layer(layer)  # (rows,) bool each, on the device
    some, every = zip(*((bool(t.any()), bool(t.all())) for t in plan.layer(layer, on_host=True)))
    span = lambda a, b: torch.arange(a, b, device=x.device).expand(x.shape[0], -1)  # noqa: E731 (rows, b - a)
    fresh_values = None
    if every[0] and every[1]:
        parts = [(block.attn_norm(x), span(0, L), None)]  # every row, every token: an ordinary layer
    else:  # a part any row needs, for all rows; those that don't need it write to the trash slot
        parts = [(block.attn_norm(x[:, :P]), span(0, P), None if every[0] else prompt)] if some[0] else []
        parts += [(block.attn_norm(x[:, P:]), span(P, L), None if every[1] else response)] if some[1] else []
        if some[2]:
            part, fresh_values = v_verify(block, cache, x, plan, None if every[2] else verify)
            parts.append(part)
    written = [write_kv(block, cache, rope, *part) for part in parts]
    if fresh_values is not None:  # V-verify replaces every response value of its rows
        cache.v[layer, :, :, P:L] = fresh_values if every[2] else \
            torch.where(verify[:, None, None, None], fresh_values, cache.v[layer, :, :, P:L])
    attn_out, mlp_out = cache.attn[layer], cache.mlp[layer]  # (rows, L + 1, C): read, updated in place
    if written:
        # One attention call for every recomputed token, over all keys/values (prompt + response).
        positions = torch.cat([where for _, where in written], dim=1)  # (rows, R); trash where a row skipped
        k, v = cache.k[layer, :, :, :L], cache.v[layer, :, :, :L]  # (rows, Hkv, L, D)
        a = block.attend(torch.cat([q for q, _ in written], dim=2), k, v, key_mask)  # (rows, R, C)
        attn_out.scatter_(1, positions[..., None].expand_as(a), a)
    h = x + attn_out[:, :L]  # (rows, L, C): the residual stream stays fresh; attention fresh or reused
    if written:
        index = positions[..., None].expand(-1, -1, h.shape[-1])  # (rows, R, C)
        mlp_out.scatter_(1, index, block.mlp(block.ff_norm(h.gather(1, index.clamp(max=L - 1)))))
    return h + mlp_out[:, :L]


def dllm_forward(model, tokens, window: Window, cache: FeatureCache, key_mask) -> torch.Tensor:
    """The whole canvas goes in, but each layer recomputes only what the window's refresh plan
    asks (dllm_layer); logits of the logits range, (rows, K, V), through the model's head with its
    logit shift (a shifted head, Dream's, predicts position i from row i - 1: model.logits)."""
    cos, sin, key_mask = model.rope_and_mask(window.positions, key_mask, tokens.shape[0])
    x = model.embed(tokens)  # (rows, L, C)
    for block in model.blocks:
        x = dllm_layer(block, cache, x, (cos, sin), key_mask, window.refresh)
    return model.logits(x, window.logits_range, window.positions)  # (rows, K, V), with the family's logit shift


# ---------------------------------------------------------------------------------------------
# AdaBlock: a block rule that ends blocks on confidently predicted delimiters
# ---------------------------------------------------------------------------------------------


@register(BLOCK_RULES, "adablock")
class AdaBlock:
    """AdaBlock-dLLM (Lu et al., "AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via
    Adaptive Block Size", arXiv 2509.26432): a block ends where a line of reasoning does.

    The block's first forward (a full one: it also refreshes any cache) predicts every position
    of a look-ahead window, the next min(window_fraction * G, remaining) positions. Among those
    whose proposal (the argmax; a sample at temperature > 0) is a delimiter, take the most
    confident (the first on ties); if its probability reaches delimiter_threshold the block ends
    on it, inclusive, else the block has the default length min(block_length, remaining). No
    other clamp: a block may be one token long, or longer than block_length. Rows choose their
    own ends; the batch waits for its slowest row's block.
    """

    def __init__(self, config: DecodeConfig):
        self.config = config
        self.block_length = config.block_length
        self.window = int(config.window_fraction * config.gen_length)
        self.threshold = config.delimiter_threshold
        self.delimiters = torch.tensor(config.delimiter_ids)

    def first_end(self, state: DecodeState) -> torch.Tensor:
        # Provisional: the first forward's logits must cover the block and the look-ahead window.
        return (state.start + max(self.block_length, self.window)).clamp(max=state.L)

    def adapt(self, state: DecodeState, logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor):
        remaining = state.L - state.start  # (B,)
        window = remaining.clamp(max=self.window)  # (B,)
        offset = positions - state.start[:, None]  # (B, K) distance from each row's block start
        in_window = (offset >= 0) & (offset < window[:, None])  # (B, K)
        # 1) The most confident delimiter proposal of each row's window, by the plain softmax
        #    probability of the proposed token.
        p = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, K)
        is_delim = in_window & torch.isin(tokens, self.delimiters.to(tokens.device))  # (B, K)
        score = torch.where(is_delim, p, torch.full_like(p, -1.0))  # (B, K)
        best = score.argmax(dim=1)  # (B,) the first index among equal maxima
        best_p = score.gather(1, best[:, None]).squeeze(1)  # (B,)
        # 2) End on it (inclusive) when confident enough, else the default length.
        on_delimiter = positions.gather(1, best[:, None]).squeeze(1) + 1  # (B,)
        default = state.start + remaining.clamp(max=self.block_length)  # (B,)
        state.end = torch.where(best_p >= self.threshold, on_delimiter, default)
        state.end = torch.where(remaining > 0, state.end, state.start)  # finished rows stay empty
        # 3) Record each unfinished row's chosen length; the schedule counts the real block.
        state.bounds = (state.start.tolist(), state.end.tolist())  # the block's real ends, on the host
        state.to_commit = masked_in_block(state, self.config.mask_id).sum(1)
        lengths = state.extras.setdefault("block_lengths", [[] for _ in range(state.slots.shape[0])])
        for row, (s, e) in enumerate(zip(*state.bounds)):
            if s < state.L:
                lengths[row].append(e - s)


# ---------------------------------------------------------------------------------------------
# Measuring the cache's approximation (a wrapper around the forward; the loop does not know it)
# ---------------------------------------------------------------------------------------------


def measuring_drift(forward, state: DecodeState, config: DecodeConfig):
    """Wrap a forward so that every cached step also runs an exact full forward (no cache) and
    records the largest |cached - exact| block logit in state.extras['max_drift']."""

    def wrapped(model, tokens, window, cache, key_mask):
        logits = forward(model, tokens, window, cache, key_mask)  # (rows, K, V)
        drift = state.extras.setdefault("max_drift", 0.0)
        if window.refresh is not None or not window.full:  # a step that read stale features
            everything = Window(torch.arange(state.L, device=tokens.device), (0, state.L), True)
            exact = model_forward(model, query_tokens(state, config, everything.positions)[0], everything,
                                  None, key_mask)  # (rows, L, V)
            a, b = window.logits_range
            at = window.positions[..., a:b].clamp(max=state.L - 1).expand(exact.shape[0], -1)  # (rows, K)
            exact = exact.gather(1, at[..., None].expand(-1, -1, exact.shape[-1]))  # (rows, K, V)
            state.extras["max_drift"] = max(drift, float((exact - logits).abs().max()))
        return logits

    return wrapped


# ---------------------------------------------------------------------------------------------
# The originals' quirks: what their code does that their papers do not say
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quirks:
    """The original implementations' deviations from their papers, each reproduced behind one
    flag so that parity with their code stays exact. All off by default (the papers' rules);
    `DecodeConfig(quirks=True)` and `BlockBatchConfig(quirks=True)` turn on every one. Nothing in
    the loop or the methods reads them: `with_quirks` below swaps whole pieces, and blockbatch.py's
    own `with_quirks`, in its section of the original's quirks, does the same for its flags."""

    # Fast-dLLM (NVlabs/Fast-dLLM)
    factor_off_by_one: bool = False  # factor rule: when only the last rank fails its bound, all commit
    dual_cache_step_cap: bool = False  # DualCache: at most steps / num_blocks forwards per block (masks
    #   can remain; a later full forward makes them eligible again)
    prefix_cache_noise_twice: bool = False  # prefix cache: Gumbel noise is drawn twice per cached step
    # LLaDA (ML-GSAI/LLaDA) and every sampler built on its code
    noise_over_queries: bool = False  # random numbers are drawn for every query position x vocabulary
    #   of the forward, not only for the positions the step reads
    gumbel_exp_form: bool = False  # samples argmax(exp(logits) / g^T) in float64: the same law, other rounding
    eos_eot_aliasing: bool = False  # confidence_eos_eot_inf also hides EOS only at temperature 0 (the two
    #   -inf writes alias one tensor there, two at T > 0)
    # dLLM-Cache (maomaocun/dLLM-cache)
    dllm_fixed_steps: bool = False  # its sampler spends steps / num_blocks forwards on every block
    dllm_layer0_refresh: bool = False  # layer 0 recomputes prompt and response at every step
    # Dream's samplers (Dream-org/Dream's generation_utils.py, in Fast-dLLM and AdaBlock too); on a
    # shifted model only
    dream_draws: bool = False  # its random numbers: float32 exponentials (Categorical's draw) and uniforms
    #   over the masked positions only, in row-major order, from the generator (torch's global one)
    dream_topk_ties: bool = False  # top-k is torch.topk over the forward's whole query row (-inf off the
    #   block): on exact ties its choice depends on the row's length, not on the position
    dream_threshold_quota: bool = False  # Fast-dLLM's threshold without cache: a quota of masks / steps per
    #   step (the best always, the rest if >= threshold), rejected ones carried over, a step added when the last rejects
    dream_block_start_commit: bool = False  # Fast-dLLM's and AdaBlock's cached samplers: a block's opening full
    #   forward commits its first position alone, unconditionally; cached windows start at the block (no row
    #   before it); the top-k schedule then runs steps 1.. of the block's, and one step per block wastes a forward
    dream_block_entropy_only: bool = False  # Fast-dLLM's cached sampler ranks by negative entropy whatever `alg`
    #   says (outside its threshold mode)
    adablock_row0_length: bool = False  # AdaBlock's Dream code: batch row 0's logits choose every row's block length
    # BlockBatch (Laurence-Wu/BlockBatch)
    blockbatch_smallest_wins: bool = False  # a natural exit returns the smallest block size's branch
    #   (the original takes max(progress), and every branch has progress G), not the leader
    blockbatch_eos_prob_last_forward: bool = False  # the EOS exit compares P(EOS) read from the last
    #   forward (in bfloat16), not the confidence the EOS was committed with
    blockbatch_float32_divergence: bool = False  # rms refresh test in float32 with its cancellation
    blockbatch_masks_after_eos: bool = False  # an EOS exit returns masks after the EOS, not EOS
    # BlockBatch's generator for a shifted-head model (its Dream file); only where logit_shift > 0
    blockbatch_pred_window: bool = False  # a block step queries [s-1, e-1), not [s-1, e): the block's
    #   last position keeps stale K/V
    blockbatch_seed_first_mask: bool = False  # a full forward commits each branch's first masked
    #   position, whatever its confidence, and clears the stored probabilities (not the threshold rule)
    blockbatch_conf_without_mask: bool = False  # confidences leave the mask id out of the softmax
    blockbatch_prob_dict: bool = False  # stored probabilities: every token > 0.2, kept until a full
    #   forward clears them, copied by a sync (not this forward's tokens > 0.1)
    blockbatch_merge_own_block: bool = False  # a merge fills dst's own block (not the sources'),
    #   at stored probability >= 0.5 (not > 0.5)
    blockbatch_merged_count_as_decoded: bool = False  # bulk counts merged tokens as decoded (leader, sync)
    blockbatch_refresh_on_progress: bool = False  # refresh once the first mask has moved
    #   refresh_block_size positions (not blocks advanced x block size)
    blockbatch_first_complete_exit: bool = False  # stop at the first complete branch, the largest
    #   complete block size wins; no EOS exit
    blockbatch_greedy_only: bool = False  # temperature forced to 0

    @classmethod
    def original(cls) -> "Quirks":
        """Every quirk on: the original code's behaviour."""
        return cls(**{f.name: True for f in fields(cls)})


def with_quirks(pieces: Pieces, config: DecodeConfig, lookback: int = 0) -> Pieces:
    """The pieces with the config's quirks swapped in, each where its original applies (Dream's
    on a shifted model: lookback 1)."""
    q, swap = config.quirks, {}
    if q.gumbel_exp_form:
        swap["sample"] = functools.partial(sample, scores=exp_form_scores)
    if q.noise_over_queries:
        swap["step_noise"] = noise_over_queries
    if q.prefix_cache_noise_twice and config.cache == "prefix" and config.delimiter_ids is None:
        swap["step_noise"] = noise_twice_on_cached_steps  # (AdaBlock's prefix loop draws once)
    if q.eos_eot_aliasing and config.temperature > 0:
        swap["hidden"] = tuple(i for i in (config.eot_id,) if i is not None)
    if q.factor_off_by_one and config.rule == "factor":
        swap["rule"] = factor_rule_off_by_one
    if lookback:  # a shifted model: Dream's originals draw, sample and rank their own way, none of the above
        swap = dream_quirks(pieces, config)
    mixins = [mixin for wanted, mixin in (
        (q.dual_cache_step_cap and config.cache == "dual" and config.delimiter_ids is None and not lookback, StepCap),
        (q.dllm_fixed_steps and config.cache == "dllm" and config.rule == "topk", FixedSteps),
        (q.dllm_layer0_refresh and config.cache == "dllm", Layer0Refresh)) if wanted]
    if mixins:  # the original's policy: ours with the quirks' methods in front
        policy = type(pieces.cache)
        swap["cache"] = type(f"Original{policy.__name__}", (*mixins, policy), {})(config, pieces.cache.lookback)
        swap["forward"] = swap["cache"].forward
    return replace(pieces, **swap)


def exp_form_scores(logits: torch.Tensor, temperature: float, gumbel: torch.Tensor) -> torch.Tensor:
    """LLaDA's Gumbel-max form, exp(logits) / (-log u)^T in float64 (gumbel_exp_form). Past logits
    of 709 exp overflows, and the log form takes over."""
    scores = logits.to(torch.float64).exp() / gumbel ** temperature
    return gumbel_max_scores(logits, temperature, gumbel) if torch.isinf(scores).any() else scores


def noise_over_queries(config: DecodeConfig, generator, window: Window, logits: torch.Tensor, eligible=None) -> Noise:
    """The originals draw over every query position of the forward, (B, Q, V), and keep the
    logits range's slice (noise_over_queries)."""
    B, Q, V = logits.shape[0], window.positions.shape[-1], logits.shape[-1]
    a, b = window.logits_range
    noise = draw_noise(config, generator, (B, Q, V), logits.device)
    return Noise(*(None if t is None else t[:, a:b] for t in (noise.gumbel, noise.uniform, noise.ranking)))


def noise_twice_on_cached_steps(config: DecodeConfig, generator, window: Window, logits: torch.Tensor,
                                eligible=None) -> Noise:
    """Fast-dLLM's prefix cache draws its Gumbel noise twice on a cached step and uses the second
    (prefix_cache_noise_twice)."""
    if config.temperature > 0 and not window.full:
        B, Q, V = logits.shape[0], window.positions.shape[-1], logits.shape[-1]
        torch.rand((B, Q, V), generator=generator, device=logits.device, dtype=torch.float64)
    return noise_over_queries(config, generator, window, logits)


def factor_rule_off_by_one(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule as its code runs: when only the last rank fails, all commit."""
    n_accept, n_eligible = factor_passes(p.confidence, config.factor)
    return select_topk(p.confidence, torch.where(n_accept >= n_eligible - 1, n_eligible, n_accept))


def dream_quirks(pieces: Pieces, config: DecodeConfig) -> dict:
    """The pieces Dream's samplers swap in (with_quirks, on a shifted model)."""
    q, swap = config.quirks, {}
    if q.dream_draws:
        swap.update(step_noise=dream_noise, sample=exponential_race)
    if (q.dream_topk_ties or (q.dream_draws and config.alg_temp)) and config.rule == "topk":
        swap["rule"] = topk_as_torch
    fixed, cached = config.delimiter_ids is None, config.cache in ("prefix", "dual")
    if q.dream_threshold_quota and config.rule == "threshold" and config.cache == "none" and fixed:
        swap.update(rule=threshold_within_quota, schedule=quota_with_carry)
    if q.dream_block_entropy_only and config.rule == "topk" and cached and fixed:
        swap["confidence"] = negative_entropy
    if q.adablock_row0_length and not fixed:
        swap["blocks"] = Row0Length(config)
    if q.dream_block_start_commit and cached and (fixed or config.cache == "dual"):  # (AdaBlock: DualCache only)
        swap["schedule"] = functools.partial(opening_then, swap.get("schedule", pieces.schedule))
        swap["cache"] = type(f"Original{type(pieces.cache).__name__}", (BlockStartCommit, type(pieces.cache)), {})(
            config, pieces.cache.lookback)
        swap["forward"] = swap["cache"].forward
    return swap


def dream_noise(config: DecodeConfig, generator, window: Window, logits: torch.Tensor, eligible: torch.Tensor) -> Noise:
    """Dream's random numbers for one step (dream_draws): uniforms for `origin`, then float32
    exponentials for sampling, each over the masked positions alone in row-major order (N of
    them; Categorical(probs).sample() draws exactly these), scattered to (B, K[, V]). Seeded with
    torch.manual_seed and generator=None, the draws are the original's."""
    B, K, V = logits.shape
    N, device, noise = int(eligible.sum()), logits.device, Noise(generator=generator)
    if getattr(CONFIDENCES.get(config.remasking), "needs_uniforms", False):
        noise.uniform = torch.ones((B, K), device=device)  # (B, K) 1.0 where nothing was drawn
        noise.uniform[eligible] = torch.rand(N, generator=generator, device=device)
    if config.temperature > 0:
        noise.exponential = torch.ones((B, K, V), dtype=logits.dtype, device=device)  # (B, K, V)
        noise.exponential[eligible] = torch.empty((N, V), dtype=logits.dtype, device=device).exponential_(
            1, generator=generator)
    return noise  # (alg_temp's draws: topk_as_torch's torch.multinomial, at steps that commit)


def exponential_race(logits: torch.Tensor, config: DecodeConfig, noise: Noise) -> torch.Tensor:
    """Dream's sampler (dream_draws): argmax(q / E) with q the restricted distribution in the
    logits' dtype, normalised, and E the step's exponentials (the same law as Gumbel-max, the
    original's rounding); at temperature 0 the argmax. The mask token is never proposed."""
    if config.temperature == 0:
        return sample(logits, config, noise)
    if config.logits_eos_inf:
        logits = logits.index_fill(-1, torch.tensor([config.eos_id], device=logits.device), -torch.inf)
    q = F.softmax(restrict(logits, config), dim=-1)  # (B, K, V)
    q = (q / q.sum(-1, keepdim=True)).index_fill(-1, torch.tensor([config.mask_id], device=q.device), 0)
    return (q / noise.exponential).argmax(dim=-1)  # (B, K)


def topk_as_torch(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Dream's top-k (dream_topk_ties): torch.topk over the forward's whole query row, -inf off
    the block, as the original builds it; exact ties (e.g. negative entropies of 0.0 under top_p)
    then fall as they fall there. With alg_temp, the original's own call on that row,
    torch.multinomial(softmax(row / alg_temp), k), on the step's generator and only where k > 0.
    Rows with the same k share one call."""
    scores = p.confidence  # (B, K)
    (a, Q), (B, K) = p.query_span, scores.shape
    row = torch.full((B, Q), -torch.inf, dtype=scores.dtype, device=scores.device)  # (B, Q)
    row[:, a:a + K] = scores
    commit = torch.zeros((B, K), dtype=torch.bool, device=scores.device)
    for n in sorted(set(k.tolist()) - {0}):
        rows = k == n  # (B,) the rows that commit n (a row with nothing eligible never reaches multinomial)
        if config.alg_temp:
            picked = torch.multinomial(F.softmax(row[rows] / config.alg_temp, dim=-1), min(n, Q),
                                       generator=p.noise.generator)  # (rows, n)
        else:
            picked = torch.topk(row[rows], min(n, Q), dim=1).indices  # (rows, n)
        commit[rows] = torch.zeros_like(row[rows], dtype=torch.bool).scatter(1, picked, True)[:, a:a + K]
    return commit & (scores > -torch.inf)


def quota_with_carry(state: DecodeState, config: DecodeConfig, p: Proposals, noise: Noise) -> torch.Tensor:
    """Fast-dLLM's no-cache threshold quota (dream_threshold_quota): step i offers n = masks /
    steps plus every rejection so far, which comes to masks left - n * (steps - 1 - i); from the
    last planned step on (each rejection there adds a step), every mask left. (B,)"""
    n = state.to_commit // config.steps_per_block  # (B,) the per-step quota
    return p.eligible.sum(1) - n * max(0, config.steps_per_block - 1 - state.step)


def threshold_within_quota(p: Proposals, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """The threshold rule within the quota k (B,) (dream_threshold_quota): the best proposal, and
    the next k - 1 if they reach the threshold."""
    return select_threshold(p.confidence, config.threshold) & select_topk(p.confidence, k)


def opening_then(schedule, state: DecodeState, config: DecodeConfig, p: Proposals, noise: Noise) -> torch.Tensor:
    """The cached samplers' count (dream_block_start_commit): 1 at the opening forward (its one
    position), then the schedule's steps 1 .. steps - 1 (its first interval is never used), and 0
    past them: with one step per block, a cached forward that commits nothing."""
    if state.step == 0:
        return p.eligible.sum(1).clamp(max=1)
    if state.step >= config.steps_per_block:
        return torch.zeros_like(state.to_commit)
    return schedule(state, config, p, noise)


class Row0Length(AdaBlock):
    """AdaBlock on Dream as its code runs (adablock_row0_length): the delimiter search reads batch
    row 0's logits and proposals, and every row takes the length row 0 chose (rows start their
    blocks together there: one prompt length, one length per block)."""

    def adapt(self, state, logits, positions, tokens):
        first = lambda t: t[:1].expand_as(t)  # noqa: E731 row 0, for every row
        super().adapt(state, first(logits), first(positions), first(tokens))


class BlockStartCommit:
    """Fast-dLLM's (and AdaBlock's) Dream block sampler (dream_block_start_commit). The opening full
    forward commits the block's first position alone (its proposal, whatever its confidence); the
    cached windows then start at the block, whose first row predicts the position after it, so
    they read logits for the rest of the block only. The top-k schedule stops after steps / blocks
    forwards, or 2 when that is 1."""

    def __init__(self, config: DecodeConfig, lookback: int = 0):
        super().__init__(config, 0)  # no row before the block: the opening commit stands for it

    def budget(self):
        least, most = super().budget()
        return (least, max(2, self.config.steps_per_block)) if self.config.rule == "topk" else (least, most)

    def block_window(self, state, stops):
        window = super().block_window(state, stops)
        return replace(window, logits_range=(1, window.logits_range[1]))  # positions start + 1 ..

    def commit_range(self, state, window):
        lo, hi = super().commit_range(state, window)
        return lo, (torch.minimum(hi, lo + 1) if window.full and state.step == 0 else hi)


class StepCap:
    """Fast-dLLM's DualCache: at most steps / num_blocks forwards per block (dual_cache_step_cap).
    Masks can remain behind the block, so a full forward's commits may land from the prompt end on."""

    def budget(self):
        return 0, self.config.steps_per_block

    def full_window(self, state):
        window = super().full_window(state)
        return replace(window, logits_range=(state.P, window.logits_range[1]))

    def commit_range(self, state, window):
        return (torch.full_like(state.start, state.P) if window.full else state.start), state.end


class FixedSteps:
    """dLLM-Cache's sampler is LLaDA's fixed-step loop: steps / num_blocks forwards on every block,
    and every row counts each of them as a step (dllm_fixed_steps)."""

    def budget(self):
        return self.config.steps_per_block, self.config.steps_per_block

    def counting(self, busy):
        return torch.ones(len(busy), dtype=torch.bool)


class Layer0Refresh:
    """dLLM-Cache's layer 0 recomputes prompt and response at every step (dllm_layer0_refresh)."""

    def first_layer(self, counted):
        return counted


# ---------------------------------------------------------------------------------------------
# Checking settings and inputs: a user's mistake is one clear line, before any compute
# ---------------------------------------------------------------------------------------------


def check_finite(name, value, low=None, high=None, low_open=False):
    """A ValueError naming the valid range unless `value` is a finite number inside it."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be a finite number {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")


def check_int(name, value, low=None, optional=False):
    """A ValueError unless `value` is an integer (not a bool) >= low, or None where optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        what = "a positive integer" if low == 1 else "an integer" + (f" >= {low}" if low is not None else "")
        what += " or None" if optional else ""
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_config(config: DecodeConfig) -> None:
    """Every DecodeConfig setting, when it is built (and again when generate starts)."""
    for name in ("gen_length", "block_length", "steps", "prompt_interval_steps", "gen_interval_steps"):
        check_int(name, getattr(config, name), low=1)
    check_int("refresh_interval", config.refresh_interval, low=0)
    for name in ("mask_id", "eos_id", "eot_id"):
        check_int(name, getattr(config, name), low=0, optional=True)
    for name in ("eos_id", "eot_id"):  # a mask that is also EOS would read every committed EOS as a mask
        if config.mask_id is not None and getattr(config, name) == config.mask_id:
            raise ValueError(f"mask_id and {name} are both {config.mask_id}: the mask token must be its own id")
    for f in fields(config):  # flags are real booleans: a string like "no" would read as True
        if f.type == "bool" and not isinstance(getattr(config, f.name), bool):
            raise ValueError(f"{f.name} must be True or False, got {getattr(config, f.name)!r}")
    if isinstance(config.quirks, bool):
        config.quirks = Quirks.original() if config.quirks else Quirks()
    elif not isinstance(config.quirks, Quirks):
        raise ValueError(f"quirks must be True, False or a decode.Quirks, got {config.quirks!r}")
    for name, registry in (("remasking", CONFIDENCES), ("cache", CACHE_POLICIES), ("schedule", SCHEDULES)):
        if getattr(config, name) not in registry:
            raise ValueError(f"unknown {name} {getattr(config, name)!r}; use one of {tuple(registry)}")
    check_finite("temperature", config.temperature, low=0)
    check_finite("cfg_scale", config.cfg_scale, low=0)
    check_finite("transfer_ratio", config.transfer_ratio, low=0, high=1)
    check_sampling(config)
    check_rules(config)
    check_blocks(config)


def check_sampling(config: DecodeConfig) -> None:
    """Dream's sampling settings: top_p, top_k, alg_temp and the linspace schedule's eps."""
    if config.top_p is not None:
        check_finite("top_p", config.top_p, low=0, high=1, low_open=True)
    check_int("top_k", config.top_k, low=1, optional=True)
    if config.alg_temp is not None:
        check_finite("alg_temp", config.alg_temp, low=0)
    eps = config.eps  # the last time of linspace(1, eps, ...): 1 would reveal nothing before the last step
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be a finite number > 0 and < 1, got {eps!r}")


def check_rules(config: DecodeConfig) -> None:
    """At most one commit rule set, each with an implementation and a value in its range."""
    chosen = [name for name in RULES if getattr(config, name) is not None]
    if len(chosen) > 1:  # one rule decides; a silent precedence would hide the other
        raise ValueError(f"set one commit rule, not {' and '.join(chosen)}")
    for name in chosen:
        if name not in COMMIT_RULES:
            raise ValueError(f"commit rule {name!r} has no implementation: register one with "
                             f"@register(COMMIT_RULES, {name!r})")
    if config.threshold is not None:
        check_finite("threshold", config.threshold, low=0, high=1, low_open=True)
    if config.factor is not None:
        check_finite("factor", config.factor, low=0, low_open=True)


def check_blocks(config: DecodeConfig) -> None:
    """The block grid and LLaDA's schedule, or AdaBlock's settings."""
    # AdaBlock's own settings are checked even without delimiter_ids: a bad value is a mistake
    # whether or not it is used this time.
    t = config.delimiter_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
        raise ValueError(f"delimiter_threshold must be >= 0 (inf = never adapt), got {t!r}")
    check_finite("window_fraction", config.window_fraction, low=0, high=1, low_open=True)
    if config.delimiter_ids is not None:
        ids = config.delimiter_ids
        ids = list(ids) if not isinstance(ids, (int, str, bytes)) and hasattr(ids, "__iter__") else ids
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"delimiter_ids must be a non-empty list of token ids, got {config.delimiter_ids!r}")
        config.delimiter_ids = tuple(ids)
        if config.rule == "topk":
            raise ValueError("AdaBlock (delimiter_ids) decodes each block until it has no masks with a "
                             f"confidence rule: set threshold (0.9 in the paper) or {', '.join(RULES[1:])}")
        return
    if config.gen_length % config.block_length != 0:
        raise ValueError(f"gen_length {config.gen_length} is not divisible by block_length {config.block_length}")
    if config.steps % config.num_blocks != 0:
        raise ValueError(f"steps {config.steps} is not divisible by the number of blocks {config.num_blocks} "
                         f"(gen_length {config.gen_length} / block_length {config.block_length})")
    if config.steps > config.gen_length:  # a step past the last token commits nothing: wasted forwards
        raise ValueError(f"steps must be in 1..gen_length ({config.gen_length}), got {config.steps}")


def check_inputs(model, prompt_ids, config, attention_mask, generator=None):
    """Clear errors for a user's mistakes, before any compute."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None), got {generator!r}")
    model_config = model.config
    V = model_config.embedding_size
    if config.mask_id is None:
        raise ValueError("config.mask_id is not set; build the config with DecodeConfig.for_model(model.config, ...)")
    for name in ("mask_id", "eos_id", "eot_id"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < V:
            raise ValueError(f"{name} {value} is outside the vocabulary [0, {V})")
    bad = [i for i in config.delimiter_ids or () if not 0 <= i < V]
    if bad:
        raise ValueError(f"delimiter_ids {bad} are outside the vocabulary [0, {V})")
    if (config.logits_eos_inf or config.confidence_eos_eot_inf or config.stop_at_eos) and config.eos_id is None:
        raise ValueError("logits_eos_inf / confidence_eos_eot_inf / stop_at_eos need config.eos_id")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids must be a (B, P) tensor with B > 0 and P > 0, got "
                         f"{tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__}")
    for name, t in (("prompt_ids", prompt_ids), ("attention_mask", attention_mask)):
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no values: pass a CPU or GPU tensor")
    if prompt_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask shape {shape} != prompt shape {tuple(prompt_ids.shape)}")
        if ((attention_mask != 0) & (attention_mask != 1)).any():  # before any cast: 0.5 must not become 0
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        m = attention_mask.long()
        if (m[:, 1:] < m[:, :-1]).any():
            raise ValueError("attention_mask must be left padding: zeros, then ones")
        if (m.sum(1) == 0).any():
            raise ValueError("attention_mask has a row with no real token")
    real = prompt_ids if attention_mask is None else prompt_ids[attention_mask.bool()]
    if real.numel() and (real.min() < 0 or real.max() >= V):
        raise ValueError(f"prompt token ids must lie in [0, {V}), got values from {int(real.min())} to {int(real.max())}")
    if (real == config.mask_id).any():
        raise ValueError(f"the prompt contains the mask token {config.mask_id}")
    total = prompt_ids.shape[1] + config.gen_length
    if total > model_config.max_sequence_length:
        raise ValueError(f"prompt ({prompt_ids.shape[1]}) + gen_length ({config.gen_length}) = {total} "
                         f"exceeds the model's max_sequence_length {model_config.max_sequence_length}")
