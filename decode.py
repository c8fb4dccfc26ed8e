"""
Decoding a masked-diffusion LM: LLaDA, Fast-dLLM, dLLM-Cache and AdaBlock, in one loop.

The answer starts as `gen_length` [MASK] tokens after the prompt: the *canvas*. Each step runs the
model over the canvas, proposes a token for every masked position of the current block and commits
("unmasks") the most confident; committed tokens never change. Blocks go left to right.
- LLaDA (Nie et al., arXiv 2502.09992): one full forward and a fixed number of commits per step.
- Fast-dLLM (Wu et al., arXiv 2505.22618): an approximate KV cache (prefix cache, DualCache) and
  commits by confidence (threshold, factor).
- dLLM-Cache (Liu et al., arXiv 2506.06295): reuses each layer's attention and MLP outputs and
  recomputes only the answer tokens whose values moved most (`dllm_forward`).
- AdaBlock (Lu et al., arXiv 2509.26432): a block ends on a delimiter the model already predicts.
Each method changes one piece of `generate`: the cache policy (`query_window`), the commit rule
(`commit_rule`), the block rule (`FixedBlocks`, `AdaBlock`) or the forward. The defaults are the
papers' rules; `quirks=True` reproduces the original code's deviations, listed in `Quirks` at the
end. Changed from the originals: a finished block gets no more forwards; rows may be left-padded
and have blocks of their own; the LM head runs only where tokens may be committed.

    config = DecodeConfig.for_model(model.config, gen_length=256, block_length=32, steps=256,
                                    cache="dual", threshold=0.9)
    out = generate(model, prompt_ids, config)       # out.ids (B, P + G), out.nfe

Shape legend: B batch, P prompt, G generation, L = P + G, K current block, Q query tokens of a
forward, V vocabulary, C model dim, N layers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from cache import FeatureCache, KVCache

# ---------------------------------------------------------------------------------------------
# Settings and result
# ---------------------------------------------------------------------------------------------

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual", "dllm")
# The commit rules a config can turn on, each by its own field (None = off). At most one may be
# set; with none, LLaDA's top-k schedule commits a fixed count per step. `commit_rule` holds the
# one branch per rule.
RULES = ("threshold", "factor")


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


@dataclass
class DecodeConfig:
    """Decoding settings, named as the original samplers' keyword arguments."""

    gen_length: int = 128  # G, tokens to generate
    block_length: int = 128  # tokens per semi-autoregressive block (G must be a multiple; AdaBlock's B0)
    steps: int = 128  # top-k schedule: total steps over all blocks (a multiple of the block count, <= G)
    temperature: float = 0.0  # 0 = argmax; > 0 = Gumbel-max sampling in float64
    remasking: str = "low_confidence"  # confidence = prob. of the proposal, or 'random' (uniform)
    cfg_scale: float = 0.0  # classifier-free guidance; 0 = off
    mask_id: int | None = None  # [MASK] id (default: the model config's mask_token_id)
    eos_id: int | None = None  # end-of-text id: the two flags below, stop_at_eos, left padding
    #   (default: from the model)
    eot_id: int | None = None  # end-of-turn id, for confidence_eos_eot_inf (default: from the model;
    #   LLaDA's config.json has none, so pass the tokenizer's id of '<|eot_id|>')
    logits_eos_inf: bool = False  # never propose EOS
    confidence_eos_eot_inf: bool = False  # never prefer committing EOS or EOT (see propose())
    threshold: float | None = None  # Fast-dLLM: commit every proposal with confidence >= threshold
    factor: float | None = None  # Fast-dLLM: commit rank k while confidence >= 1 - factor/(k+1)
    cache: str = "none"  # 'none', 'prefix' (Fast-dLLM prefix cache), 'dual' (DualCache) or 'dllm' (dLLM-Cache)
    refresh_interval: int = 0  # prefix/dual: also refresh the whole cache every this many steps
    #   of a block (0 = only at block start; 1 = every step, which equals no cache)
    prompt_interval_steps: int = 50  # dLLM-Cache K_p: recompute the prompt's features every K_p steps
    gen_interval_steps: int = 7  # dLLM-Cache K_r: recompute the whole response every K_r steps
    transfer_ratio: float = 0.25  # dLLM-Cache rho: between those, recompute the int(rho * G)
    #   response tokens whose values changed most (0 = reuse everything); defaults: LLaDA GSM8K's
    delimiter_ids: tuple[int, ...] | None = None  # AdaBlock: tokens a block may end on (take the
    #   newline's id from the tokenizer); None = fixed blocks of block_length
    delimiter_threshold: float = 0.3  # AdaBlock: end the block on a delimiter predicted with at
    #   least this probability (inf = never, which is fixed-size Fast-dLLM); 0.3 in the paper
    window_fraction: float = 0.25  # AdaBlock: look for delimiters in the next fraction * gen_length
    stop_at_eos: bool = False  # end a row once it has committed EOS with nothing masked before it:
    #   the rest of its window becomes EOS without more forwards (the originals spend them)
    measure_drift: bool = False  # cached modes: also run an exact full forward at every cached
    #   step and record the largest |logit difference| on the block (slow; measures the approximation)
    quirks: bool | Quirks = False  # reproduce the original code's deviations from its paper: True
    #   = all of them (the parity tests), or a Quirks to choose; False = the papers' rules

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps", "prompt_interval_steps", "gen_interval_steps"):
            check_int(name, getattr(self, name), low=1)
        check_int("refresh_interval", self.refresh_interval, low=0)
        for name in ("mask_id", "eos_id", "eot_id"):
            check_int(name, getattr(self, name), low=0, optional=True)
        for name in ("eos_id", "eot_id"):  # a mask that is also EOS would be committed as a proposal
            if self.mask_id is not None and getattr(self, name) == self.mask_id:
                raise ValueError(f"mask_id and {name} are both {self.mask_id}: the mask token must be its own id")
        for f in fields(self):  # flags are real booleans: a string like "no" would read as True
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        if isinstance(self.quirks, bool):
            self.quirks = Quirks.original() if self.quirks else Quirks()
        elif not isinstance(self.quirks, Quirks):
            raise ValueError(f"quirks must be True, False or a decode.Quirks, got {self.quirks!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {REMASKING}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; use one of {CACHES}")
        check_finite("temperature", self.temperature, low=0)
        check_finite("cfg_scale", self.cfg_scale, low=0)
        check_finite("transfer_ratio", self.transfer_ratio, low=0, high=1)
        chosen = [name for name in RULES if getattr(self, name) is not None]
        if len(chosen) > 1:  # one rule decides; a silent precedence would hide the other
            raise ValueError(f"set one commit rule, not {' and '.join(chosen)}")
        if self.threshold is not None:
            check_finite("threshold", self.threshold, low=0, high=1, low_open=True)
        if self.factor is not None:
            check_finite("factor", self.factor, low=0, low_open=True)
        # AdaBlock's own settings are checked even without delimiter_ids: a bad value is a mistake
        # whether or not it is used this time.
        if isinstance(self.delimiter_threshold, bool) or not isinstance(self.delimiter_threshold, (int, float)) \
                or math.isnan(self.delimiter_threshold) or self.delimiter_threshold < 0:
            raise ValueError(f"delimiter_threshold must be >= 0 (inf = never adapt), got {self.delimiter_threshold!r}")
        check_finite("window_fraction", self.window_fraction, low=0, high=1, low_open=True)
        if self.delimiter_ids is not None:
            self._check_adablock()
        else:  # fixed blocks: the grid and LLaDA's top-k schedule need whole blocks and steps
            if self.gen_length % self.block_length != 0:
                raise ValueError(f"gen_length {self.gen_length} is not divisible by block_length {self.block_length}")
            if self.steps % self.num_blocks != 0:
                raise ValueError(f"steps {self.steps} is not divisible by the number of blocks {self.num_blocks} "
                                 f"(gen_length {self.gen_length} / block_length {self.block_length})")
            if self.steps > self.gen_length:  # a step past the last token commits nothing: wasted forwards
                raise ValueError(f"steps must be in 1..gen_length ({self.gen_length}), got {self.steps}")

    def _check_adablock(self):
        ids = self.delimiter_ids
        ids = list(ids) if not isinstance(ids, (int, str, bytes)) and hasattr(ids, "__iter__") else ids
        if isinstance(ids, (int, str, bytes)) or not hasattr(ids, "__iter__") or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or not ids:
            raise ValueError(f"delimiter_ids must be a non-empty list of token ids, got {ids!r}")
        self.delimiter_ids = tuple(ids)
        if self.rule == "topk":
            raise ValueError("AdaBlock (delimiter_ids) decodes each block until it has no masks with a "
                             f"confidence rule: set threshold (0.9 in the paper) or {', '.join(RULES[1:])}")

    @property
    def rule(self) -> str:
        """The commit rule in use: the one of RULES that is set, else 'topk' (LLaDA's schedule)."""
        return next((name for name in RULES if getattr(self, name) is not None), "topk")

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
# Shared helpers: the schedule, proposals and commit rules
# ---------------------------------------------------------------------------------------------


def transfer_count(masked: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """LLaDA's schedule: how many tokens each row commits at `step` of a block whose rows had
    `masked` (B,) masks at its start. The count is spread evenly over `steps`; the remainder goes
    to the first steps. Past the schedule (a block longer than planned) one token per step."""
    if step >= steps:
        return torch.ones_like(masked)
    return masked // steps + (step < masked % steps).long()  # (B,)


@dataclass
class Noise:
    """The random numbers one step uses: Gumbel noise for sampling, uniforms for random remasking."""

    gumbel: torch.Tensor | None = None  # (B, K, V) float64, -log(u); None at temperature 0
    uniform: torch.Tensor | None = None  # (B, K) float64; None for low-confidence remasking


def draw_noise(config: DecodeConfig, generator, shape, logits_range: tuple[int, int], device, draws: int = 1) -> Noise:
    """Draw one step's random numbers exactly as the originals do, so seeded runs match them.

    The originals draw noise over every query token of the forward, shape (B, Q, V), not only
    over the block; we draw the same tensors and keep the block's slice `logits_range` = [a, b).
    `draws` > 1 discards draws first (a quirk of Fast-dLLM's prefix cache).
    """
    a, b = logits_range
    noise = Noise()
    if config.temperature > 0:
        for _ in range(draws - 1):
            torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        noise.gumbel = -torch.log(torch.rand(shape, generator=generator, device=device, dtype=torch.float64))[:, a:b]
    if config.remasking == "random":
        noise.uniform = torch.rand(shape[:2], generator=generator, device=device, dtype=torch.float64)[:, a:b]
    return noise


def sample(logits: torch.Tensor, config: DecodeConfig, noise: Noise) -> torch.Tensor:
    """The proposed token at every position, (B, K, V) -> (B, K): the argmax at temperature 0,
    otherwise a sample of softmax(logits / T) by the Gumbel-max trick: the argmax of
    logits + T * g with g = -log(-log u) standard Gumbel noise (Noise holds -log u).
    The input is not changed."""
    if config.logits_eos_inf:
        logits = logits.index_fill(-1, torch.tensor([config.eos_id], device=logits.device), -torch.inf)
    if config.temperature > 0:
        scores = config.quirks.gumbel_scores(logits, config.temperature, noise.gumbel)
    else:
        scores = logits
    # The mask token is never a proposal: committing it would leave the position masked forever
    # (a trained LLaDA never predicts it, so this changes nothing there; the confidences in
    # propose still use the full softmax, as the original's do).
    scores = scores.index_fill(-1, torch.tensor([config.mask_id], device=scores.device), -torch.inf)
    return scores.argmax(dim=-1)  # (B, K)


def propose(logits: torch.Tensor, eligible: torch.Tensor, config: DecodeConfig, noise: Noise):
    """A proposal x0 for every position and its confidence, -inf where not `eligible`.

    logits (B, K, V) are the block's; eligible (B, K) marks masked positions of the block.
    Returns x0 (B, K) and confidence (B, K) in float64. The input is not changed.
    """
    # 1) Proposal: the argmax, or a sample at temperature > 0.
    x0 = sample(logits, config, noise)  # (B, K)
    # 2) confidence_eos_eot_inf: EOS and EOT get no probability in the confidence, so the
    #    threshold and top-k rules commit them last.
    if config.confidence_eos_eot_inf:
        hidden = [i for i in config.quirks.confidence_hidden(config) if i is not None]
        logits = logits.index_fill(-1, torch.tensor(hidden, device=logits.device), -torch.inf)
    # 3) Confidence: the proposal's probability, or a uniform draw for 'random' remasking.
    if config.remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)  # (B, K, V)
        conf = p.gather(-1, x0[..., None]).squeeze(-1)  # (B, K)
    else:
        conf = noise.uniform  # (B, K)
    # 4) Only eligible positions can be committed.
    return x0, torch.where(eligible, conf, torch.full_like(conf, -torch.inf))


def confidence_rank(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence, 0 = most confident: (B, K) -> (B, K)."""
    order = conf.argsort(dim=-1, descending=True, stable=True)  # (B, K)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return rank


def select_topk(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """LLaDA's rule: commit each row's k most confident eligible positions. k (B,) -> (B, K) bool."""
    return (confidence_rank(conf) < k[:, None]) & (conf > -torch.inf)


def select_threshold(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM: commit every eligible position with confidence >= threshold, and always the
    single most confident one, so every step makes progress. (B, K) -> (B, K) bool."""
    eligible = conf > -torch.inf
    return eligible & ((conf >= threshold) | (confidence_rank(conf) == 0))


def select_factor(conf: torch.Tensor, factor: float, quirks: Quirks | None = None) -> torch.Tensor:
    """Fast-dLLM's factor rule: sort eligible confidences descending; rank k (1-based) is accepted
    while c_k >= 1 - factor / (k + 1); rank 1 always. (B, K) -> (B, K) bool."""
    eligible = conf > -torch.inf
    n_eligible = eligible.sum(-1)  # (B,)
    sorted_conf = conf.sort(dim=-1, descending=True).values  # (B, K)
    k = torch.arange(1, conf.shape[1] + 1, device=conf.device)  # 1-based ranks (K,)
    bound = 1 - factor / (k + 1)  # (K,)
    passes = (sorted_conf >= bound) | (k == 1)  # (B, K)
    n_accept = passes.long().cumprod(-1).sum(-1).clamp(max=n_eligible)  # leading ranks that pass (B,)
    n_accept = (quirks or Quirks()).factor_count(n_accept, n_eligible)
    return select_topk(conf, n_accept)


def commit_rule(conf: torch.Tensor, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Which proposals to commit, by the config's one rule: (B, K) -> (B, K) bool. k (B,) is the
    top-k schedule's count for this step. A new rule is a field, its name in RULES, and a branch."""
    if config.rule == "threshold":
        return select_threshold(conf, config.threshold)
    if config.rule == "factor":
        return select_factor(conf, config.factor, config.quirks)
    if config.rule == "topk":
        return select_topk(conf, k)
    raise ValueError(f"commit rule {config.rule!r} has no branch in commit_rule")


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


# ---------------------------------------------------------------------------------------------
# The decoding state and the loop's pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """Everything one request carries from step to step."""

    slots: torch.Tensor  # (B, L + 1) the canvas plus one trash slot, where padded queries' commits go
    P: int  # prompt length (after left padding)
    start: torch.Tensor  # (B,) each row's current block is [start, end) on the canvas
    end: torch.Tensor  # (B,)
    bounds: tuple[list[int], list[int]] | None = None  # start and end on the host, read once per block
    #   (and once more where AdaBlock moves the end)
    to_commit: torch.Tensor | None = None  # (B,) masks in each row's block at its start (top-k schedule)
    key_mask: torch.Tensor | None = None  # (rows, L) 1 = real token; None when nothing is padded
    cache: KVCache | None = None  # the request's K/V buffers (cached policies only)
    step: int = 0  # forwards spent on the current block
    nfe: int = 0  # forwards spent on the request
    query_tokens: int = 0  # tokens pushed through the model, summed over forwards
    window: Window | None = None  # what the last forward computed
    busy: list[bool] | None = None  # per row, on the host: its block still had masks at the last check
    finite: torch.Tensor | None = None  # () bool on the device: the last step's logits were all finite
    committed: torch.Tensor | None = None  # () bool on the device: the last step committed a token
    extras: dict = field(default_factory=dict)  # method-specific measurements, copied to the result

    @property
    def canvas(self) -> torch.Tensor:
        """(B, L) the canvas: prompt, then committed tokens and masks (a view of `slots`)."""
        return self.slots[:, :-1]

    @property
    def L(self) -> int:
        return self.slots.shape[1] - 1


def setup(model, prompt_ids, config: DecodeConfig, attention_mask=None) -> DecodeState:
    """The canvas (prompt + gen_length masks), the key-padding mask and, for cached policies,
    the request's preallocated cache."""
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
    slots[:, :P] = prompt_ids
    # Classifier-free guidance runs a second, unconditional copy of every row (prompt masked) in
    # the same batched forward: 2B rows, one NFE.
    rows = 2 * B if config.cfg_scale > 0 else B
    if key_mask is not None and rows != B:
        key_mask = key_mask.repeat(2, 1)  # (2B, L)
    # One cache per request, allocated once; every cached step writes into it by position.
    cache = None
    if config.cache != "none":
        kind = FeatureCache if config.cache == "dllm" else KVCache
        cache = kind.for_model(model.config, batch=rows, capacity=L, device=device, dtype=model.dtype)
    at_prompt_end = torch.full((B,), P, dtype=torch.long, device=device)
    return DecodeState(slots=slots, P=P, start=at_prompt_end, end=at_prompt_end.clone(), key_mask=key_mask,
                       cache=cache, busy=[True] * B)


class FixedBlocks:
    """The block rule of LLaDA and Fast-dLLM: blocks of block_length on a fixed grid."""

    def __init__(self, config: DecodeConfig):
        self.block_length = config.block_length

    def first_end(self, state: DecodeState) -> torch.Tensor:
        """Where the block ends, as far as is known before its first forward: (B,)."""
        return (state.start + self.block_length).clamp(max=state.L)

    def adapt(self, state: DecodeState, logits: torch.Tensor, positions: torch.Tensor, noise: Noise) -> None:
        """After the block's first forward: nothing to change on a fixed grid."""


def masked_in_block(state: DecodeState, mask_id: int) -> torch.Tensor:
    """(B, L) True at the masked positions of each row's current block."""
    pos = torch.arange(state.L, device=state.slots.device)  # (L,)
    in_block = (pos >= state.start[:, None]) & (pos < state.end[:, None])  # (B, L)
    return in_block & (state.canvas == mask_id)


def next_block(state: DecodeState, rule, config: DecodeConfig) -> bool:
    """Move every row to its next block, which starts where the last one ended and ends where
    the block rule says. False when every row has reached the end of the canvas."""
    state.start = state.end
    state.end = rule.first_end(state)
    state.step = 0
    state.to_commit = masked_in_block(state, config.mask_id).sum(1)  # (B,) for the top-k schedule
    state.bounds = (state.start.tolist(), state.end.tolist())  # one wait for the device per block
    return any(s < state.L for s in state.bounds[0])


def block_done(state: DecodeState, config: DecodeConfig) -> bool:
    """A block is done when no row has a mask left in it (within the forward budget that
    `Quirks.forward_budget` gives: none, unless an original's quirk caps or fixes it).

    This is where the loop waits for the device, once per step: it reads which rows still have
    masks, whether the last step's logits were finite and whether it committed anything, in one
    transfer.
    """
    masked = masked_in_block(state, config.mask_id).any(1)  # (B,) bool, on the device
    if state.finite is None:  # before a block's first step: nothing to check yet
        flags = torch.ones(2, dtype=torch.bool, device=masked.device)  # (2,) finite, committed
    else:  # decode_step sets both flags together
        flags = torch.stack([state.finite, state.committed])
    finite, committed, *state.busy = torch.cat([flags, masked]).tolist()
    state.finite = state.committed = None
    if not finite:
        raise FloatingPointError(
            f"non-finite logits at step {state.step - 1} of the block starting at position {min(state.bounds[0])} "
            f"(forward {state.nfe}): the model overflowed its float type (a float16 model, a huge cfg_scale: "
            f"{config.cfg_scale}), or its weights or config (e.g. rms_norm_eps) are bad")
    least, most = config.quirks.forward_budget(config)
    if state.step >= most:
        return True
    if not committed and any(state.busy) and most == math.inf:  # a new commit rule's usual bug
        raise RuntimeError(f"the commit rule {config.rule!r} committed nothing at step {state.step - 1} while "
                           f"masks remain in the block: it would never finish (a rule must commit at least one)")
    return state.step >= least and not any(state.busy)


@dataclass
class Window:
    """What one forward computes: the query positions, the query indices that need logits, and
    whether it is a full forward (every canvas position is a query)."""

    positions: torch.Tensor  # (Q,) shared by every row, or (B, Q) padded with the trash slot L
    logits_range: tuple[int, int]  # [a, b): the query indices whose logits the step reads
    full: bool
    refresh: Refresh | None = None  # dLLM-Cache: what each row's layers recompute (dllm_refresh)


def query_window(state: DecodeState, config: DecodeConfig) -> Window:
    """The cache policy: which canvas positions this step's forward computes.

    - 'none': always the whole canvas (vanilla LLaDA); so does 'dllm', whose forward chooses
      per layer which of those tokens it really recomputes (`dllm_refresh`, `dllm_forward`).
    - 'prefix': the whole canvas at the block's first step (refreshing every cached position),
      then the block plus everything after it; the prefix is read from the cache.
    - 'dual': the whole canvas at the first step, then the block alone; prefix and suffix are
      read from the cache (stale), the block's fresh K/V are written over its cached ones.
    With refresh_interval n > 0, every n-th step of the block is a full refresh as well.
    Sizes come from the block bounds on the host: no wait for the device.
    """
    L, device = state.L, state.slots.device
    starts, ends = state.bounds
    step, n = state.step, config.refresh_interval
    if config.cache in ("none", "dllm") or step == 0 or (n and step % n == 0):
        lo = state.P if config.quirks.masks_behind(config) else min(starts)  # where commits may land
        refresh = dllm_refresh(state, config) if config.cache == "dllm" else None
        return Window(torch.arange(L, device=device), (lo, max(ends)), True, refresh)
    stops = [L] * len(ends) if config.cache == "prefix" else ends
    logits_range = (0, max(e - s for s, e in zip(starts, ends)))
    if len(set(starts)) == 1 and len(set(stops)) == 1:  # the common case: one window for the batch
        return Window(torch.arange(starts[0], stops[0], device=device), logits_range, False)
    # Rows with blocks of their own: each row's window, padded to the longest with the trash slot.
    Q = max(e - s for s, e in zip(starts, stops))
    pos = state.start[:, None] + torch.arange(Q, device=device)  # (B, Q)
    stop = torch.tensor(stops, device=device)[:, None]  # (B, 1)
    return Window(torch.where(pos < stop, pos, L), logits_range, False)


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


def model_forward(model, tokens, window: Window, cache, key_mask) -> torch.Tensor:
    """Run the model on the query tokens (rows, Q) at the window's positions; logits of the
    window's logits range, (rows, K, V). The queries' K/V go into the cache (if any) and
    attention reads the rest from it."""
    return model(tokens, positions=window.positions, cache=cache, attention_mask=key_mask,
                 logits_range=window.logits_range)


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


# ---------------------------------------------------------------------------------------------
# The decoding loop (vanilla LLaDA, Fast-dLLM caches and parallel commit rules)
# ---------------------------------------------------------------------------------------------


def decode_step(model, state: DecodeState, config: DecodeConfig, generator, rule, forward=model_forward):
    """One denoising step: run the model over the query window, propose, commit."""
    # 1) Pick the query window by cache policy and run the model over it.
    window = query_window(state, config)
    tokens, positions = query_tokens(state, config, window.positions)  # (rows, Q)
    logits = forward(model, tokens, replace(window, positions=positions), state.cache, state.key_mask)
    logits = guided(logits, config)  # (B, K, V)
    state.nfe += 1
    state.query_tokens += window.positions.shape[-1]
    state.window = window
    state.finite = torch.isfinite(logits).all()  # checked by block_done, with the masks left
    # 2) Propose a token and a confidence for every masked position of each row's block.
    a, b = window.logits_range
    block_pos = window.positions[..., a:b].expand(state.slots.shape[0], -1)  # (B, K) canvas positions
    noise = draw_noise(config, generator, (state.slots.shape[0], window.positions.shape[-1], logits.shape[-1]),
                       window.logits_range, logits.device, draws=config.quirks.noise_draws(config, window.full))
    if state.step == 0:
        rule.adapt(state, logits, block_pos, noise)  # the block rule may now fix where the block ends
    lo = torch.full_like(state.start, state.P) if window.full and config.quirks.masks_behind(config) else state.start
    in_block = (block_pos >= lo[:, None]) & (block_pos < state.end[:, None])  # (B, K); trash is never inside
    eligible = in_block & (state.slots.gather(1, block_pos) == config.mask_id)  # (B, K)
    x0, conf = propose(logits, eligible, config, noise)
    # 3) Choose which proposals to commit: a fixed count (LLaDA's schedule), a threshold or a
    #    factor bound, by the config's one rule.
    k = transfer_count(state.to_commit, config.steps_per_block, state.step)  # (B,)
    commit = commit_rule(conf, config, k)  # (B, K)
    # 4) Commit: write the chosen proposals at their canvas positions (the rest go to the trash
    #    slot); committed tokens are final.
    state.slots.scatter_(1, torch.where(commit, block_pos, state.L), x0)
    state.committed = commit.any()  # checked by block_done
    if config.stop_at_eos:
        # A finished row's blocks end at the canvas end: from the next block on, its windows are trash.
        done = fill_after_eos(state.canvas[:, state.P:], config.eos_id, config.mask_id)  # (B,)
        state.start = torch.where(done, state.L, state.start)
        state.end = torch.where(done, state.L, state.end)
    state.step += 1


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
    state = setup(model, prompt_ids, config, attention_mask)
    forward = dllm_forward if config.cache == "dllm" else model_forward
    forward = measuring_drift(forward, state, config) if config.measure_drift else forward
    rule = AdaBlock(config) if config.delimiter_ids is not None else FixedBlocks(config)
    nfe_per_block = []
    # Blocks left to right; within a block, steps until no row has a mask in it.
    while next_block(state, rule, config):
        while not block_done(state, config):
            decode_step(model, state, config, generator, rule, forward)
            if on_step is not None:
                on_step(state)
        nfe_per_block.append(state.step)

    masks_left = int((state.canvas[:, state.P:] == config.mask_id).sum())
    if masks_left:
        warnings.warn(f"{masks_left} masks left in the output: the DualCache step cap (quirks) allows "
                      f"{config.steps_per_block} forwards per block, too few for these settings", stacklevel=2)
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
    first_layer: torch.Tensor | None = None  # (rows,) bool: rows whose layer 0 refreshes everything (quirk)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt, response, verify) for layer i."""
        if i == 0 and self.first_layer is not None:
            return self.first_layer, self.first_layer, torch.zeros_like(self.verify)
        return self.prompt, self.response, self.verify


def dllm_refresh(state: DecodeState, config: DecodeConfig) -> Refresh:
    """The refresh schedule, per row: a row's step counter t counts its own forwards from 1; the
    prompt refreshes when (t - 1) % K_p == 0, the response when (t - 1) % K_r == 0; otherwise
    V-verify recomputes int(rho * G) response tokens. Rows with nothing left to commit in their
    block (waiting for the batch) recompute nothing."""
    cache, n_layers = state.cache, state.cache.n_layers
    busy = torch.tensor(config.quirks.dllm_busy(state.busy, config))  # (B,) on the host
    rows = 2 if config.cfg_scale > 0 else 1  # classifier-free guidance's copies follow their rows
    cache.steps += busy.long().repeat(rows)  # this forward is step t of each busy row
    t = cache.steps[:len(busy)]
    n_verify = int(config.transfer_ratio * config.gen_length)
    prompt = busy & ((t - 1) % config.prompt_interval_steps == 0)  # (B,)
    response = busy & ((t - 1) % config.gen_interval_steps == 0)  # (B,)
    verify = busy & ~response & (n_verify > 0)  # (B,)
    first = busy if config.quirks.dllm_layer0_refresh else None
    # What the plan recomputes, in token-layer rows (the rows' sum), for the method's own report.
    P, G = state.P, state.L - state.P
    later = n_layers - 1 if first is not None else n_layers  # layers that follow the schedule
    done = state.extras.setdefault("recomputed_rows", {"prompt": 0, "response": 0})
    done["prompt"] += P * (later * int(prompt.sum()) + (int(first.sum()) if first is not None else 0))
    done["response"] += (later * (G * int(response.sum()) + n_verify * int(verify.sum()))
                         + (G * int(first.sum()) if first is not None else 0))
    state.extras["recomputed_fraction"] = (done["prompt"] + done["response"]) / max(1, int(t.sum()) * n_layers * state.L)
    device = state.slots.device
    return Refresh(P=P, prompt=prompt.repeat(rows).to(device), response=response.repeat(rows).to(device),
                   verify=verify.repeat(rows).to(device), n_verify=n_verify,
                   first_layer=None if first is None else first.repeat(rows).to(device))


def least_similar(similarity: torch.Tensor, n: int) -> torch.Tensor:
    """V-verify's choice: the n response tokens whose fresh values are least similar to their
    cached ones, (B, G) -> (B, n) indices. Many similarities tie (unchanged tokens sit at 1.0 up
    to rounding), so which tied tokens win is torch.topk's order, as in the original."""
    return torch.topk(similarity, k=n, dim=-1, largest=False).indices


def dllm_layer(block, cache: FeatureCache, x, rope, key_mask, plan: Refresh):
    """One transformer block under dLLM-Cache: x (rows, L, C) is the block's input for the whole
    canvas (prompt [0, P), response [P, L)); the output is x + attention + MLP for every position,
    fresh for the tokens a row recomputes here and read from the cache for the rest. rope is the
    canvas's (cos, sin) tables.

    Per row, as the plan says for this layer (prompt, response, verify are (rows,) bools):
    - the prompt, when it refreshes: queries, keys and values, attention and MLP;
    - the whole response, when it refreshes: the same;
    - with verify (V-verify): fresh values for every response token, and the n_verify tokens
      whose values moved most (lowest cosine with the cached values) get queries, keys,
      attention and MLP. All response values are replaced, only those tokens' keys.
    Rows are batched: a part any row needs is computed for all, and a row that does not need it
    writes it to the cache's trash slot. The recomputed tokens' queries attend, in one call, over
    the keys/values as the cache holds them after this layer's writes (fresh or stale).
    """
    layer, L, P, n_verify = block.layer_idx, x.shape[1], plan.P, plan.n_verify
    prompt, response, verify = plan.layer(layer)
    rows, device, trash = x.shape[0], x.device, cache.trash
    queries, where = [], []  # fresh queries (rows, H, n, D) and their canvas positions (rows, n)

    def recompute(h_normed, positions, keep):  # q/k/v of normed tokens at canvas positions (rows, n)
        c, s = (t.gather(2, positions[:, None, :, None].expand(-1, 1, -1, t.shape[-1])) for t in rope)
        q, k, v = block.project(h_normed, c, s)
        if keep is not None and not bool(keep.all()):  # rows that skip this part write to the trash
            positions = torch.where(keep[:, None], positions, trash)  # (rows, n)
        cache.update(layer, k, v, positions)
        queries.append(q)
        where.append(positions)

    def span(a, b):  # canvas positions [a, b) for every row, (rows, b - a)
        return torch.arange(a, b, device=device).expand(rows, -1)

    if bool(prompt.all() and response.all()):
        recompute(block.attn_norm(x), span(0, L), None)  # every row, every token: an ordinary layer
    else:
        if prompt.any():
            recompute(block.attn_norm(x[:, :P]), span(0, P), prompt)
        if response.any():
            recompute(block.attn_norm(x[:, P:]), span(P, L), response)
        if verify.any():
            # V-verify: fresh values of every response token, compared with the cached ones.
            h = block.attn_norm(x[:, P:])  # (rows, G, C)
            v_new = block.v_proj(h)  # (rows, G, Hkv*D)
            similarity = F.cosine_similarity(v_new, cache.values(layer, P, L), dim=-1)  # (rows, G)
            chosen = least_similar(similarity, n_verify)  # (rows, n) response indices
            picked = h.gather(1, chosen[..., None].expand(-1, -1, h.shape[-1]))  # (rows, n, C)
            recompute(picked, chosen + P, verify)  # the chosen tokens get fresh queries and keys
            fresh = block.heads(v_new, block.n_kv_heads)  # (rows, Hkv, G, D): every token's fresh values
            if not bool(verify.all()):
                fresh = torch.where(verify[:, None, None, None], fresh, cache.v[layer, :, :, P:L])
            cache.v[layer, :, :, P:L] = fresh
    attn_out, mlp_out = cache.attn[layer], cache.mlp[layer]  # (rows, L + 1, C): read, updated in place
    if queries:
        # One attention call for every recomputed token, over all keys/values (prompt + response).
        positions = torch.cat(where, dim=1)  # (rows, R); the trash slot where a row skipped a part
        k, v = cache.k[layer, :, :, :L], cache.v[layer, :, :, :L]  # (rows, Hkv, L, D)
        a = block.attend(torch.cat(queries, dim=2), k, v, key_mask)  # (rows, R, C)
        attn_out.scatter_(1, positions[..., None].expand_as(a), a)
    h = x + attn_out[:, :L]  # (rows, L, C): the residual stream stays fresh; attention fresh or reused
    if queries:
        index = positions[..., None].expand(-1, -1, h.shape[-1])  # (rows, R, C)
        mlp_out.scatter_(1, index, block.mlp(block.ff_norm(h.gather(1, index.clamp(max=L - 1)))))
    return h + mlp_out[:, :L]


def dllm_forward(model, tokens, window: Window, cache: FeatureCache, key_mask) -> torch.Tensor:
    """dLLM-Cache (Liu et al., "dLLM-Cache: Accelerating Diffusion Large Language Models with
    Adaptive Caching", arXiv 2506.06295): the whole canvas goes in, but each layer recomputes
    only what the window's refresh plan asks (dllm_layer); logits of the logits range."""
    cos, sin, key_mask = model.rope_and_mask(window.positions, key_mask, tokens.shape[0])
    x = model.embed(tokens)  # (rows, L, C)
    for block in model.blocks:
        x = dllm_layer(block, cache, x, (cos, sin), key_mask, window.refresh)
    a, b = window.logits_range
    return model.lm_head(x[:, a:b])  # (rows, K, V)


# ---------------------------------------------------------------------------------------------
# AdaBlock: a block rule that ends blocks on confidently predicted delimiters
# ---------------------------------------------------------------------------------------------


class AdaBlock:
    """AdaBlock-dLLM (Lu et al., "AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via
    Adaptive Block Size", arXiv 2509.26432): a block ends where a line of reasoning does.

    The block's first forward (a full one: it also refreshes any cache) predicts every position
    of a look-ahead window, the next min(window_fraction * G, remaining) positions. Among those
    whose prediction (the argmax; a sample at temperature > 0, as the step's proposals) is a
    delimiter, take the most confident (the first on ties); if its probability reaches
    delimiter_threshold the block ends on it, inclusive, else the block has the default length
    min(block_length, remaining). No other clamp: a block may be one token long, or longer than
    block_length. Rows choose their own ends; the batch waits for its slowest row's block (see
    query_window for how rows with different blocks share a forward).
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

    def adapt(self, state: DecodeState, logits: torch.Tensor, positions: torch.Tensor, noise: Noise) -> None:
        remaining = state.L - state.start  # (B,)
        window = remaining.clamp(max=self.window)  # (B,)
        offset = positions - state.start[:, None]  # (B, K) distance from each row's block start
        in_window = (offset >= 0) & (offset < window[:, None])  # (B, K)
        # 1) The most confident delimiter prediction of each row's window. The predictions are the
        #    step's proposals (samples at temperature > 0, with the step's noise, as the original
        #    does), their confidence the plain softmax probability of the predicted token.
        pred = sample(logits, self.config, noise)  # (B, K)
        p = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, pred[..., None]).squeeze(-1)  # (B, K)
        is_delim = in_window & torch.isin(pred, self.delimiters.to(pred.device))  # (B, K)
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
# Measuring the cache's approximation
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
    `DecodeConfig(quirks=True)` and `BlockBatchConfig(quirks=True)` turn on every one. The loop
    asks the methods below; dLLM-Cache's layer reads dllm_layer0_refresh, and blockbatch.py reads
    the blockbatch_* flags in its quirk functions (at its end) and in `result`."""

    # Fast-dLLM (NVlabs/Fast-dLLM)
    factor_off_by_one: bool = False  # factor rule: when only the last rank fails its bound, all commit
    dual_cache_step_cap: bool = False  # DualCache: at most steps / num_blocks forwards per block (masks
    #   can remain; a later full forward makes them eligible again)
    prefix_cache_noise_twice: bool = False  # prefix cache: Gumbel noise is drawn twice per cached step
    # LLaDA (ML-GSAI/LLaDA)
    gumbel_exp_form: bool = False  # samples argmax(exp(logits) / g^T) in float64: the same law, other rounding
    eos_eot_aliasing: bool = False  # confidence_eos_eot_inf also hides EOS only at temperature 0 (the two
    #   -inf writes alias one tensor there, two at T > 0)
    # dLLM-Cache (maomaocun/dLLM-cache)
    dllm_fixed_steps: bool = False  # its sampler spends steps / num_blocks forwards on every block
    dllm_layer0_refresh: bool = False  # layer 0 recomputes prompt and response at every step
    # BlockBatch (Laurence-Wu/BlockBatch)
    blockbatch_smallest_wins: bool = False  # a natural exit returns the smallest block size's branch
    #   (the original takes max(progress), and every branch has progress G), not the leader
    blockbatch_eos_prob_last_forward: bool = False  # the EOS exit compares P(EOS) read from the last
    #   forward (in bfloat16), not the confidence the EOS was committed with
    blockbatch_float32_divergence: bool = False  # rms refresh test in float32 with its cancellation
    blockbatch_masks_after_eos: bool = False  # an EOS exit returns masks after the EOS, not EOS

    @classmethod
    def original(cls) -> "Quirks":
        """Every quirk on: the original code's behaviour."""
        return cls(**{f.name: True for f in fields(cls)})

    # -- What the loop asks (decode.py) ---------------------------------------------------------

    def forward_budget(self, config: DecodeConfig) -> tuple[int, float]:
        """(fewest, most) forwards a block may take; a block stops early only when it has no masks."""
        if self.dllm_fixed_steps and config.cache == "dllm" and config.rule == "topk":
            return config.steps_per_block, config.steps_per_block
        if self.dual_cache_step_cap and config.cache == "dual" and config.delimiter_ids is None:
            return 0, config.steps_per_block  # (AdaBlock's own DualCache loop has no cap)
        return 0, math.inf

    def masks_behind(self, config: DecodeConfig) -> bool:
        """Whether masks can remain behind the current block (then every full forward makes the
        positions from the prompt end on eligible, as the capped original does)."""
        return self.forward_budget(config)[1] < math.inf

    def noise_draws(self, config: DecodeConfig, full: bool) -> int:
        """How many noise draws a step makes (the last is used)."""
        twice = self.prefix_cache_noise_twice and config.cache == "prefix" and not full
        return 2 if twice and config.delimiter_ids is None else 1  # (AdaBlock's prefix loop draws once)

    def gumbel_scores(self, logits: torch.Tensor, temperature: float, gumbel: torch.Tensor) -> torch.Tensor:
        """The Gumbel-max scores whose argmax is the sample; gumbel holds -log u (B, K, V) float64."""
        if self.gumbel_exp_form:
            scores = logits.to(torch.float64).exp() / gumbel ** temperature
            if not torch.isinf(scores).any():  # exp overflows past logits of 709: then the log form
                return scores
        # logits + T * G with G = -log g standard Gumbel noise: argmax samples softmax(logits / T).
        return logits.to(torch.float64) - temperature * gumbel.log()

    def confidence_hidden(self, config: DecodeConfig) -> tuple:
        """The token ids confidence_eos_eot_inf takes out of the confidence."""
        if self.eos_eot_aliasing and config.temperature > 0:
            return (config.eot_id,)
        return (config.eos_id, config.eot_id)

    def factor_count(self, n_accept: torch.Tensor, n_eligible: torch.Tensor) -> torch.Tensor:
        """How many ranks the factor rule commits, (B,)."""
        if self.factor_off_by_one:
            return torch.where(n_accept >= n_eligible - 1, n_eligible, n_accept)
        return n_accept

    def dllm_busy(self, busy: list[bool], config: DecodeConfig) -> list[bool]:
        """Which rows a dLLM-Cache forward counts as a step of theirs: those with masks in their
        block (with fixed steps, every row: each block takes the same forwards in every row, so
        the batch moves in lockstep, as each row alone does; only the top-k schedule fixes them)."""
        return [True] * len(busy) if self.forward_budget(config)[0] > 0 else busy
