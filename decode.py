"""
Decoding a masked-diffusion LM: LLaDA, Fast-dLLM, dLLM-Cache and AdaBlock, in one loop.

The answer starts as `gen_length` [MASK] tokens after the prompt (the *canvas*). Each step runs the
model over the canvas, proposes a token for every masked position of the current block and commits
("unmasks") the most confident; committed tokens never change. Blocks go left to right.
- LLaDA (Nie et al., arXiv 2502.09992): one full forward and a fixed number of commits per step.
- Fast-dLLM (Wu et al., arXiv 2505.22618): an approximate KV cache (prefix cache, DualCache) and
  commits by confidence (threshold, factor).
- dLLM-Cache (Liu et al., arXiv 2506.06295): reuses each layer's attention and MLP outputs and
  recomputes only the answer tokens whose values moved most (`dllm_forward`).
- AdaBlock (Lu et al., arXiv 2509.26432): a block ends on a delimiter the model already predicts.
Each method changes one piece of the loop in `generate`: the cache policy (`query_window`), the
commit rule (`commit_rule`), the block rule (`FixedBlocks`, `AdaBlock`) or the forward;
`block_done` holds the originals' stop conditions. BlockBatch (blockbatch.py) drives the same
pieces with branches. Differences from the originals, documented where they happen: a finished
block gets no more forwards; rows may be left-padded and have blocks of their own; the LM head
runs only where tokens may be committed.

    cfg = DecodeConfig.for_model(model.config, gen_length=256, block_length=32, steps=256,
                                 cache="dual", threshold=0.9)
    out = generate(model, prompt_ids, cfg)       # out.ids (B, P + G), out.nfe

Shape legend: B batch, P prompt, G generation, L = P + G, K current block, Q query tokens of a
forward, V vocabulary.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cache import FeatureCache, KVCache

# ---------------------------------------------------------------------------------------------
# Settings and result
# ---------------------------------------------------------------------------------------------

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual", "dllm")


def check_finite(name, value, low=None, high=None, low_open=False):
    """A ValueError naming the valid range unless `value` is a finite number inside it."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be a finite number {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")


@dataclass
class DecodeConfig:
    """Decoding settings, named as the original samplers' keyword arguments."""

    gen_length: int = 128  # G, tokens to generate
    block_length: int = 128  # tokens per semi-autoregressive block (G must be a multiple; AdaBlock's B0)
    steps: int = 128  # top-k schedule: total steps over all blocks (a multiple of the block count)
    temperature: float = 0.0  # 0 = argmax; > 0 = Gumbel-max sampling in float64
    remasking: str = "low_confidence"  # confidence = prob. of the proposal, or 'random' (uniform)
    cfg_scale: float = 0.0  # classifier-free guidance; 0 = off
    mask_id: int | None = None  # [MASK] id (default: the model config's mask_token_id)
    eos_id: int | None = None  # end-of-text id, for the two flags below (default: from the model)
    eot_id: int | None = None  # end-of-turn id, for confidence_eos_eot_inf (default: from the model;
    #   LLaDA's config.json has none, so pass the tokenizer's id of '<|eot_id|>')
    logits_eos_inf: bool = False  # never propose EOS
    confidence_eos_eot_inf: bool = False  # never prefer committing EOS/EOT (see propose())
    threshold: float | None = None  # Fast-dLLM: commit every proposal with confidence >= threshold
    factor: float | None = None  # Fast-dLLM: commit rank k while confidence >= 1 - factor/(k+1)
    factor_off_by_one: bool = True  # reproduce the original factor rule's off-by-one (see select_factor)
    cache: str = "none"  # 'none', 'prefix' (Fast-dLLM prefix cache), 'dual' (DualCache) or 'dllm' (dLLM-Cache)
    cap_steps_per_block: bool = False  # at most steps/num_blocks forwards per block, as Fast-dLLM's
    #   DualCache does; with threshold/factor that can leave masks (a warning says so)
    first_release_nfe: bool = False  # cached modes: spend one cached forward on a block the
    #   block-start forward already finished, as Fast-dLLM's first release did (NFE only)
    refresh_interval: int = 0  # cached modes: also refresh the whole cache every this many steps
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

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.delimiter_ids is not None:
            self._check_adablock()
        else:  # fixed blocks: the grid and LLaDA's top-k schedule need whole blocks and steps
            if self.gen_length % self.block_length != 0:
                raise ValueError(f"gen_length {self.gen_length} is not divisible by block_length {self.block_length}")
            if self.steps % self.num_blocks != 0:
                raise ValueError(f"steps {self.steps} is not divisible by the number of blocks {self.num_blocks} "
                                 f"(gen_length {self.gen_length} / block_length {self.block_length})")
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {REMASKING}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; use one of {CACHES}")
        check_finite("temperature", self.temperature, low=0)
        check_finite("cfg_scale", self.cfg_scale, low=0)
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.threshold is not None:
            check_finite("threshold", self.threshold, low=0, high=1, low_open=True)
        if self.factor is not None:
            check_finite("factor", self.factor, low=0, low_open=True)
        for name in ("prompt_interval_steps", "gen_interval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_finite("transfer_ratio", self.transfer_ratio, low=0, high=1)
        if isinstance(self.refresh_interval, bool) or not isinstance(self.refresh_interval, int) \
                or self.refresh_interval < 0:
            raise ValueError(f"refresh_interval must be an integer >= 0, got {self.refresh_interval!r}")

    def _check_adablock(self):
        ids = self.delimiter_ids
        if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or not ids:
            raise ValueError(f"delimiter_ids must be a non-empty list of token ids, got {ids!r}")
        self.delimiter_ids = tuple(ids)
        if isinstance(self.delimiter_threshold, bool) or not isinstance(self.delimiter_threshold, (int, float)) \
                or math.isnan(self.delimiter_threshold) or self.delimiter_threshold < 0:
            raise ValueError(f"delimiter_threshold must be >= 0 (inf = never adapt), got {self.delimiter_threshold!r}")
        check_finite("window_fraction", self.window_fraction, low=0, high=1, low_open=True)
        if self.threshold is None and self.factor is None:
            raise ValueError("AdaBlock (delimiter_ids) decodes each block until it has no masks with the "
                             "threshold or factor rule: set threshold (0.9 in the paper) or factor")
        if self.cap_steps_per_block:
            raise ValueError("AdaBlock decodes each block until it has no masks: cap_steps_per_block does not apply")

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
    query_tokens: int  # tokens pushed through the model, summed over forwards (per row)
    masks_left: int  # masks left in the output (only the capped mode can leave any)
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


def num_transfer_tokens(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: how many tokens each row commits at each step, (B, K) -> (B, steps).

    A row's masked count is spread evenly over the steps; the remainder goes to the first steps.
    """
    count = block_masks.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = count // steps, count % steps  # (B, 1) each
    step_idx = torch.arange(steps, device=block_masks.device)  # (steps,)
    return base + (step_idx[None, :] < remainder).long()  # (B, steps)


@dataclass
class Noise:
    """The random numbers one step uses: Gumbel noise for sampling, uniforms for random remasking."""

    gumbel: torch.Tensor | None = None  # (B, K, V) float64, -log(u); None at temperature 0
    uniform: torch.Tensor | None = None  # (B, K) float64; None for low-confidence remasking


def draw_noise(config: DecodeConfig, generator, shape, head: tuple[int, int], extra_draw: bool, device) -> Noise:
    """Draw one step's random numbers exactly as the originals do, so seeded runs match them.

    The originals draw noise over every query token of the forward, shape (B, Q, V), not only
    over the block; we draw the same tensors and keep the block's slice `head` = [a, b).
    Fast-dLLM's prefix cache calls its noise function twice per cached step (`extra_draw`).
    """
    a, b = head
    noise = Noise()
    if config.temperature > 0:
        if extra_draw:  # drawn and discarded, as the original does
            torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        noise.gumbel = -torch.log(torch.rand(shape, generator=generator, device=device, dtype=torch.float64))[:, a:b]
    if config.remasking == "random":
        noise.uniform = torch.rand(shape[:2], generator=generator, device=device, dtype=torch.float64)[:, a:b]
    return noise


def sample(logits: torch.Tensor, config: DecodeConfig, noise: Noise) -> torch.Tensor:
    """The proposed token at every position, (B, K, V) -> (B, K): the argmax at temperature 0,
    otherwise a sample by the Gumbel-max trick in the original's exponential form,
    argmax(exp(logits) / g^T) with g = -log(u), which samples softmax(logits / T)."""
    if config.logits_eos_inf:
        logits[:, :, config.eos_id] = -torch.inf  # EOS can never be proposed (edits `logits`)
    if config.temperature > 0:
        noisy = logits.to(torch.float64).exp() / noise.gumbel ** config.temperature
        if torch.isinf(noisy).any():
            # exp overflows (logits > 709) or g^T underflows (T in the tens and above): the same
            # argmax in log space, logits - T log g, stays finite where the original's form is not.
            noisy = logits.to(torch.float64) - config.temperature * noise.gumbel.log()
    else:
        noisy = logits
    # The mask token is never a proposal: committing it would leave the position masked forever
    # (a trained LLaDA never predicts it, so this changes nothing there; the confidences in
    # propose still use the full softmax, as the original's do).
    no_mask = noisy.clone()
    no_mask[..., config.mask_id] = -torch.inf
    return no_mask.argmax(dim=-1)  # (B, K)


def propose(logits: torch.Tensor, eligible: torch.Tensor, config: DecodeConfig, noise: Noise):
    """A proposal x0 for every position and its confidence, -inf where not `eligible`.

    logits (B, K, V) are the block's; eligible (B, K) marks masked positions of the block.
    Returns x0 (B, K) and confidence (B, K) in float64. The EOS/EOT flags edit `logits` in place.
    """
    # 1) Proposal: the argmax, or a sample at temperature > 0.
    x0 = sample(logits, config, noise)  # (B, K)
    # 2) The original LLaDA's EOS/EOT flag writes `noisy[..., eos] = logits[..., eot] = -inf`. At
    #    temperature 0 `noisy` *is* `logits`, so both EOS and EOT lose their confidence; at T > 0
    #    they are two tensors and only EOT's confidence is suppressed. Reproduced as it behaves.
    if config.confidence_eos_eot_inf:
        if config.eot_id is not None:
            logits[:, :, config.eot_id] = -torch.inf
        if config.temperature == 0:
            logits[:, :, config.eos_id] = -torch.inf
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


def select_factor(conf: torch.Tensor, factor: float, off_by_one: bool = True) -> torch.Tensor:
    """Fast-dLLM's factor rule: sort eligible confidences descending; rank k (1-based) is accepted
    while c_k >= 1 - factor / (k + 1); rank 1 always. (B, K) -> (B, K) bool.

    The original stops at the first failing rank but then adds one when that rank is the last:
    so when only the last rank fails, all are committed (with exactly 2 eligible, both always
    are). `off_by_one=True` reproduces it (the default, for parity); False is the rule as stated.
    """
    eligible = conf > -torch.inf
    n_eligible = eligible.sum(-1)  # (B,)
    sorted_conf = conf.sort(dim=-1, descending=True).values  # (B, K)
    k = torch.arange(1, conf.shape[1] + 1, device=conf.device)  # 1-based ranks (K,)
    bound = 1 - factor / (k + 1)  # (K,)
    passes = (sorted_conf >= bound) | (k == 1)  # (B, K)
    n_accept = passes.long().cumprod(-1).sum(-1).clamp(max=n_eligible)  # leading ranks that pass (B,)
    if off_by_one:
        n_accept = torch.where(n_accept >= n_eligible - 1, n_eligible, n_accept)
    return select_topk(conf, n_accept)


def commit_rule(conf: torch.Tensor, config: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
    """Which proposals to commit: a threshold, a factor bound, or the schedule's k per row."""
    if config.threshold is not None:
        return select_threshold(conf, config.threshold)
    if config.factor is not None:
        return select_factor(conf, config.factor, config.factor_off_by_one)
    return select_topk(conf, k)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and a (B, P) attention mask (1 = real token)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def check_inputs(model, prompt_ids, config, attention_mask):
    """Clear errors for a user's mistakes, before any compute."""
    mcfg = model.config
    V = mcfg.embedding_size
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
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a (B, P) tensor with P > 0, got "
                         f"{tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__}")
    if prompt_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != prompt_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask shape {shape} != prompt shape {tuple(prompt_ids.shape)}")
    real = prompt_ids if attention_mask is None else prompt_ids[attention_mask.bool()]
    if real.numel() and (real.min() < 0 or real.max() >= V):
        raise ValueError(f"prompt token ids must lie in [0, {V}), got values from {int(real.min())} to {int(real.max())}")
    if (real == config.mask_id).any():
        raise ValueError(f"the prompt contains the mask token {config.mask_id}")
    total = prompt_ids.shape[1] + config.gen_length
    if total > mcfg.max_sequence_length:
        raise ValueError(f"prompt ({prompt_ids.shape[1]}) + gen_length ({config.gen_length}) = {total} "
                         f"exceeds the model's max_sequence_length {mcfg.max_sequence_length}")
    if attention_mask is not None:
        m = attention_mask.long()
        if ((m != 0) & (m != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        if (m[:, 1:] < m[:, :-1]).any():
            raise ValueError("attention_mask must be left padding: zeros, then ones")
        if (m.sum(1) == 0).any():
            raise ValueError("attention_mask has a row with no real token")


# ---------------------------------------------------------------------------------------------
# The decoding state and the loop's pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """Everything one request carries from step to step."""

    x: torch.Tensor  # (B, L) the canvas: prompt, then committed tokens and masks
    P: int  # prompt length (after left padding)
    start: torch.Tensor  # (B,) each row's current block is [start, end) on the canvas
    end: torch.Tensor  # (B,)
    canvas: torch.Tensor | None = None  # (B, L + 1): x plus a trash column that padded queries write to
    bounds: tuple[list[int], list[int]] | None = None  # start and end on the host, read once per block
    key_mask: torch.Tensor | None = None  # (rows, L) 1 = real token; None when nothing is padded
    cache: KVCache | None = None  # the request's K/V buffers (cached policies only)
    step: int = 0  # forwards spent on the current block
    nfe: int = 0  # forwards spent on the request
    query_tokens: int = 0  # tokens pushed through the model, summed over forwards
    window: torch.Tensor | None = None  # (B, Q) or (Q,) canvas positions the last forward computed
    full: bool = True  # whether the last forward was over the whole canvas
    finite: torch.Tensor | None = None  # () bool on the device: the last step's logits were all finite
    extras: dict = field(default_factory=dict)  # method-specific measurements, copied to the result

    @property
    def L(self) -> int:
        return self.x.shape[1]


def setup(model, prompt_ids, config: DecodeConfig, attention_mask=None) -> DecodeState:
    """The canvas (prompt + gen_length masks), the key-padding mask and, for cached policies,
    the request's preallocated cache."""
    device = model.device
    B, P = prompt_ids.shape
    L = P + config.gen_length
    canvas = torch.full((B, L + 1), config.mask_id, dtype=torch.long, device=device)  # (B, L + 1)
    canvas[:, :P] = prompt_ids.to(device)
    x = canvas[:, :L]  # (B, L) the canvas proper; column L is the trash that padded queries write to
    # The key-padding mask covers the whole canvas: generated positions are always real.
    key_mask = None
    if attention_mask is not None:
        key_mask = torch.ones((B, L), dtype=torch.long, device=device)  # (B, L)
        key_mask[:, :P] = attention_mask.to(device)
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
    return DecodeState(x=x, P=P, start=at_prompt_end, end=at_prompt_end.clone(), canvas=canvas,
                       key_mask=key_mask, cache=cache)


class FixedBlocks:
    """The block rule of LLaDA and Fast-dLLM: blocks of block_length on a fixed grid."""

    def __init__(self, config: DecodeConfig):
        self.block_length = config.block_length

    def first_end(self, state: DecodeState) -> torch.Tensor:
        """Where the block ends, as far as is known before its first forward: (B,)."""
        return (state.start + self.block_length).clamp(max=state.L)

    def adapt(self, state: DecodeState, logits: torch.Tensor, lpos: torch.Tensor, noise: Noise) -> None:
        """After the block's first forward: nothing to change on a fixed grid."""


def next_block(state: DecodeState, rule) -> bool:
    """Move every row to its next block, which starts where the last one ended and ends where
    the block rule says. False when every row has reached the end of the canvas."""
    state.start = state.end
    state.end = rule.first_end(state)
    state.step = 0
    state.bounds = (state.start.tolist(), state.end.tolist())  # one wait for the device per block
    return any(s < state.L for s in state.bounds[0])


def masked_in_block(state: DecodeState, mask_id: int) -> torch.Tensor:
    """(B, L) True at the masked positions of each row's current block."""
    pos = torch.arange(state.L, device=state.x.device)  # (L,)
    in_block = (pos >= state.start[:, None]) & (pos < state.end[:, None])  # (B, L)
    return in_block & (state.x == mask_id)


def block_done(state: DecodeState, config: DecodeConfig) -> bool:
    """The stop condition of a block, with the originals' variants.

    Normally a block is done when no row has a mask left in it. Fast-dLLM's DualCache caps the
    forwards per block at steps / num_blocks (`cap_steps_per_block`), which can leave masks; its
    first release spent one cached forward even on a block the block-start forward finished.
    dLLM-Cache's sampler runs exactly steps / num_blocks steps per block with the top-k schedule
    (its step counter, and so its refresh pattern, counts every one of them).

    This is where the loop waits for the device, once per step: it reads whether masks are left
    and whether the last step's logits were finite in one transfer.
    """
    masked = masked_in_block(state, config.mask_id).any()  # () bool, on the device
    if state.finite is not None:
        finite, masked = torch.stack([state.finite, masked]).tolist()
        state.finite = None
        if not finite:
            raise FloatingPointError(
                f"non-finite logits at step {state.step - 1} of the block starting at position {min(state.bounds[0])} "
                f"(forward {state.nfe}): the model overflowed its float type (a float16 model, a huge cfg_scale: "
                f"{config.cfg_scale}), or its weights or config (e.g. rms_norm_eps) are bad")
    if config.cap_steps_per_block and state.step >= config.steps_per_block:
        return True
    if config.cache == "dllm" and config.threshold is None and config.factor is None:
        return state.step >= config.steps_per_block  # dLLM-Cache's sampler: LLaDA's fixed-step loop
    if config.first_release_nfe and state.cache is not None and state.step == 1:
        return False
    return not bool(masked)


def query_window(state: DecodeState, config: DecodeConfig) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """The cache policy: which canvas positions this step's forward computes.

    - 'none': always the whole canvas (vanilla LLaDA); so does 'dllm', whose forward chooses
      per layer which of those tokens it really recomputes (dllm_forward).
    - 'prefix': the whole canvas at the block's first step (refreshing every cached position),
      then the block plus everything after it; the prefix is read from the cache.
    - 'dual': the whole canvas at the first step, then the block alone; prefix and suffix are
      read from the cache (stale), the block's fresh K/V are written over its cached ones.
    With refresh_interval n > 0, every n-th step of the block is a full refresh as well.

    Returns the positions, (Q,) when every row queries the same ones, else (B, Q) padded with
    the trash slot; `head` = [a, b), the query indices that need logits; and whether the window
    is the whole canvas. Sizes come from the block bounds on the host: no wait for the device.
    """
    L, device = state.L, state.x.device
    starts, ends = state.bounds
    step, n = state.step, config.refresh_interval
    if config.cache in ("none", "dllm") or step == 0 or (n and step % n == 0):
        # Commits land in [lo, end); only the capped mode can leave masks before the block, and
        # the original makes those eligible again at a full forward, so lo widens to P there.
        lo = state.P if config.cap_steps_per_block else min(starts)
        return torch.arange(L, device=device), (lo, max(ends)), True
    stops = [L] * len(ends) if config.cache == "prefix" else ends
    head = (0, max(e - s for s, e in zip(starts, ends)))
    if len(set(starts)) == 1 and len(set(stops)) == 1:  # the common case: one window for the batch
        return torch.arange(starts[0], stops[0], device=device), head, False
    # Rows with blocks of their own: each row's window, padded to the longest with the trash slot.
    Q = max(e - s for s, e in zip(starts, stops))
    pos = state.start[:, None] + torch.arange(Q, device=device)  # (B, Q)
    stop = torch.tensor(stops, device=device)[:, None]  # (B, 1)
    return torch.where(pos < stop, pos, L), head, False


def query_inputs(state: DecodeState, config: DecodeConfig, positions: torch.Tensor):
    """The tokens at `positions`, (B, Q); with classifier-free guidance, followed by the
    unconditional copy (prompt masked) as B more rows, so both ride in one batched forward."""
    x = state.x
    index = positions.clamp(max=state.L - 1).expand(x.shape[0], -1)  # (B, Q); trash reads any token
    inp = x.gather(1, index)  # (B, Q)
    if config.cfg_scale > 0:
        uncond = torch.where(index < state.P, torch.full_like(inp, config.mask_id), inp)
        inp = torch.cat([inp, uncond], dim=0)  # (2B, Q)
        positions = positions if positions.dim() == 1 else positions.repeat(2, 1)
    return inp, positions


def guided(logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """Combine the conditional and unconditional halves: un + (cfg + 1)(cond - un), (B, K, V)."""
    if config.cfg_scale == 0:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (config.cfg_scale + 1) * (cond - uncond)


def model_forward(model, state: DecodeState, config: DecodeConfig, positions, head) -> torch.Tensor:
    """Run the model over the canvas at `positions`; logits of the query indices `head`, (B, K, V).
    The queries' K/V go into the cache (if any) and attention reads the rest from it."""
    inp, positions = query_inputs(state, config, positions)  # (rows, Q)
    logits = model(inp, positions=positions, cache=state.cache, attention_mask=state.key_mask,
                   logits_range=head)  # (rows, K, V): the LM head runs on the block only
    return guided(logits, config)


def finish_at_eos(state: DecodeState, config: DecodeConfig) -> None:
    """stop_at_eos: a row whose first EOS has nothing masked before it is finished. The rest of
    its window is filled with EOS, its block ends, and it costs no more forwards."""
    gen = state.x[:, state.P:]  # (B, G) a view
    is_eos, is_mask = gen == config.eos_id, gen == config.mask_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gen.shape[1])  # (B,)
    first_mask = torch.where(is_mask.any(1), is_mask.int().argmax(1), gen.shape[1])  # (B,)
    done = first_eos < first_mask  # (B,) EOS committed and fully decoded before it
    after = torch.arange(gen.shape[1], device=gen.device)[None, :] > first_eos[:, None]  # (B, G)
    gen.masked_fill_(done[:, None] & after, config.eos_id)
    # A finished row's blocks end at the canvas end: from the next block on, its windows are trash.
    if state.start is not None:  # (blockbatch.py borrows this function for states without blocks)
        state.start = torch.where(done, state.L, state.start)
        state.end = torch.where(done, state.L, state.end)


# ---------------------------------------------------------------------------------------------
# The decoding loop (vanilla LLaDA, Fast-dLLM caches and parallel commit rules)
# ---------------------------------------------------------------------------------------------


def decode_step(model, state: DecodeState, config: DecodeConfig, generator, schedule, rule, forward=model_forward):
    """One denoising step: run the model over the query window, propose, commit."""
    # 1) Pick the query window by cache policy and run the model over it.
    positions, head, state.full = query_window(state, config)
    logits = forward(model, state, config, positions, head)  # (B, K, V)
    state.nfe += 1
    state.query_tokens += positions.shape[-1]
    state.window = positions
    state.finite = torch.isfinite(logits).all()  # checked by block_done, with the masks left
    # 2) Propose a token and a confidence for every masked position of each row's block. Only
    #    the capped mode can leave masks before the block, and the original makes those eligible
    #    again at a full forward, so the eligible range starts at P there.
    lpos = positions[..., head[0]:head[1]].expand(state.x.shape[0], -1)  # (B, K) canvas positions
    # Fast-dLLM's prefix cache draws its sampling noise twice per cached step, AdaBlock's once.
    extra_draw = config.cache == "prefix" and not state.full and config.delimiter_ids is None
    noise = draw_noise(config, generator, (state.x.shape[0], positions.shape[-1], logits.shape[-1]), head,
                       extra_draw=extra_draw, device=logits.device)
    if state.step == 0:
        rule.adapt(state, logits, lpos, noise)  # the block rule may now fix where the block ends
    lo = torch.full_like(state.start, state.P) if config.cap_steps_per_block and state.full else state.start
    in_block = (lpos >= lo[:, None]) & (lpos < state.end[:, None])  # (B, K); the trash is never inside
    eligible = in_block & (state.canvas.gather(1, lpos) == config.mask_id)  # (B, K)
    x0, conf = propose(logits, eligible, config, noise)
    # 3) Choose which proposals to commit: a fixed count, a threshold or a factor bound. Past the
    #    end of the schedule (only the uncapped top-k rule gets there), one per step.
    k = schedule[:, state.step] if state.step < schedule.shape[1] else torch.ones_like(schedule[:, 0])
    commit = commit_rule(conf, config, k)  # (B, K)
    # 4) Commit: write the chosen proposals at their canvas positions (the rest go to the trash
    #    column); committed tokens are final.
    state.canvas.scatter_(1, torch.where(commit, lpos, state.L), x0)
    if config.stop_at_eos:
        finish_at_eos(state, config)
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
    check_inputs(model, prompt_ids, config, attention_mask)
    state = setup(model, prompt_ids, config, attention_mask)
    forward = dllm_forward if config.cache == "dllm" else model_forward
    forward = measuring_drift(forward) if config.measure_drift else forward
    rule = AdaBlock(config) if config.delimiter_ids is not None else FixedBlocks(config)
    nfe_per_block = []
    # Blocks left to right; within a block, steps until it has no masks (or a cap is reached).
    while next_block(state, rule):
        # The top-k schedule of this block: (B, steps_per_block) commits per step (LLaDA's rule).
        schedule = num_transfer_tokens(masked_in_block(state, config.mask_id), config.steps_per_block)
        while not block_done(state, config):
            decode_step(model, state, config, generator, schedule, rule, forward)
            if on_step is not None:
                on_step(state)
        nfe_per_block.append(state.step)

    masks_left = int((state.x[:, state.P:] == config.mask_id).sum())
    if masks_left:
        warnings.warn(f"{masks_left} masks left in the output: cap_steps_per_block allows "
                      f"{config.steps_per_block} forwards per block, too few for these settings", stacklevel=2)
    return DecodeResult(ids=state.x.contiguous(), nfe=state.nfe, query_tokens=state.query_tokens, masks_left=masks_left,
                        prompt_length=state.P, nfe_per_block=nfe_per_block, extras=state.extras)


# ---------------------------------------------------------------------------------------------
# dLLM-Cache: a cache policy that reuses each layer's features and recomputes a few tokens
# ---------------------------------------------------------------------------------------------


def least_similar(similarity: torch.Tensor, n: int) -> torch.Tensor:
    """V-verify's choice: the n response tokens whose fresh values are least similar to their
    cached ones, (B, G) -> (B, n) indices. Many similarities tie (unchanged tokens sit at 1.0 up
    to rounding), so which tied tokens win is torch.topk's order, as in the original."""
    return torch.topk(similarity, k=n, dim=-1, largest=False).indices


def dllm_layer(block, fc: FeatureCache, x, cos, sin, key_mask, P: int, refresh_prompt: bool,
               refresh_response: bool, n_verify: int, rows: dict):
    """One transformer block under dLLM-Cache: x (B, L, C) is the block's input for the whole
    canvas (prompt [0, P), response [P, L)); the output is x + A + M for every position, with A
    (attention) and M (MLP) fresh for the tokens recomputed here and read from `fc` for the rest.

    Which tokens are recomputed:
    - the prompt, when it refreshes: queries, keys and values, attention and MLP;
    - the whole response, when it refreshes: the same;
    - otherwise, if n_verify > 0 (V-verify): fresh values for every response token, and the
      n_verify tokens whose values moved most (lowest cosine with the cached values) get queries,
      keys, attention and MLP. All response values are replaced, only those tokens' keys.
    The recomputed tokens' queries attend, in one call, over the prompt and response keys/values
    as the cache holds them after this layer's writes (fresh where recomputed, stale elsewhere).
    """
    layer, L = block.layer_idx, x.shape[1]
    B, G, device = x.shape[0], L - P, x.device
    A, M = fc.attn[layer], fc.mlp[layer]  # (B, L, C) cached sub-block outputs, updated in place
    queries, where = [], []  # fresh queries (B, H, n, D) and their canvas positions (B, n)

    def recompute(h_normed, positions):  # q/k/v of normed rows at canvas positions (B, n)
        c, s = cos.gather(2, positions[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])), \
            sin.gather(2, positions[:, None, :, None].expand(-1, 1, -1, sin.shape[-1]))
        q, k, v = block.project(h_normed, c, s)
        fc.update(layer, k, v, positions)
        queries.append(q)
        where.append(positions)

    def span(a, b):  # canvas positions [a, b) for every row, (B, b - a)
        return torch.arange(a, b, device=device).expand(B, -1)

    if refresh_prompt and refresh_response:
        recompute(block.attn_norm(x), span(0, L))  # everything: an ordinary full layer
        rows["prompt"], rows["response"] = rows["prompt"] + P, rows["response"] + G
    else:
        if refresh_prompt:
            recompute(block.attn_norm(x[:, :P]), span(0, P))
            rows["prompt"] += P
        if refresh_response:
            recompute(block.attn_norm(x[:, P:]), span(P, L))
            rows["response"] += G
        elif n_verify > 0:
            # V-verify: fresh values of every response token, compared with the cached ones.
            h = block.attn_norm(x[:, P:])  # (B, G, C)
            v_new = block.v_proj(h)  # (B, G, Hkv*D)
            similarity = F.cosine_similarity(v_new, fc.values(layer, P, L), dim=-1)  # (B, G)
            chosen = least_similar(similarity, n_verify)  # (B, n) response indices
            picked = h.gather(1, chosen[..., None].expand(-1, -1, h.shape[-1]))  # (B, n, C)
            recompute(picked, chosen + P)  # the chosen tokens get fresh queries and keys
            fc.v[layer, :, :, P:L] = block.heads(v_new, block.n_kv_heads)  # and every token fresh values
            rows["response"] += n_verify
    if queries:
        # One attention call for every recomputed token, over all keys/values (prompt + response).
        positions = torch.cat(where, dim=1)  # (B, R)
        k, v = fc.k[layer, :, :, :L], fc.v[layer, :, :, :L]  # (B, Hkv, L, D)
        a = block.attend(torch.cat(queries, dim=2), k, v, key_mask)  # (B, R, C)
        A.scatter_(1, positions[..., None].expand_as(a), a)
    h = x + A  # (B, L, C): the residual stream stays fresh; A is fresh or reused per token
    if queries:
        index = positions[..., None].expand(-1, -1, h.shape[-1])  # (B, R, C)
        M.scatter_(1, index, block.mlp(block.ff_norm(h.gather(1, index))))
    return h + M


def dllm_forward(model, state: DecodeState, config: DecodeConfig, positions, head) -> torch.Tensor:
    """dLLM-Cache (Liu et al., "dLLM-Cache: Accelerating Diffusion Large Language Models with
    Adaptive Caching", arXiv 2506.06295): the whole canvas goes in, but each layer recomputes
    only what its refresh schedule asks (dllm_layer). The step counter t counts every forward of
    the request, from 1: the prompt refreshes when (t - 1) % K_p == 0, the response when
    (t - 1) % K_r == 0. Layer 0 always refreshes both: a later fix in the original code that the
    paper does not describe, kept here because it changes the tokens.
    """
    inp, positions = query_inputs(state, config, positions)  # (rows, L)
    fc, t, P = state.cache, state.nfe + 1, state.P
    cos, sin, key_mask = model.rope_and_mask(positions, state.key_mask, inp.shape[0])
    n_verify = int(config.transfer_ratio * config.gen_length)
    rows = state.extras.setdefault("recomputed_rows", {"prompt": 0, "response": 0})
    x = model.embed(inp)  # (rows, L, C)
    for i, block in enumerate(model.blocks):
        refresh_prompt = (t - 1) % config.prompt_interval_steps == 0 or i == 0
        refresh_response = (t - 1) % config.gen_interval_steps == 0 or i == 0
        x = dllm_layer(block, fc, x, cos, sin, key_mask, P, refresh_prompt, refresh_response, n_verify, rows)
    # The fraction of a full forward's token-layer rows that were recomputed so far.
    state.extras["recomputed_fraction"] = (rows["prompt"] + rows["response"]) / (t * len(model.blocks) * state.L)
    return guided(model.lm_head(x[:, head[0]:head[1]]), config)  # (B, K, V)


# ---------------------------------------------------------------------------------------------
# AdaBlock: a block rule that ends blocks on confidently predicted delimiters
# ---------------------------------------------------------------------------------------------


class AdaBlock:
    """AdaBlock-dLLM (Lu et al., "AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via
    Adaptive Block Size", arXiv 2509.26432): a block ends where a line of reasoning does.

    The block's first forward (a full one: it also refreshes any cache) predicts every position
    of a look-ahead window, the next min(window_fraction * G, remaining) positions. Among those
    whose prediction (the argmax; a sample at temperature > 0, as the step's proposals) is a
    delimiter, take the most confident (the first on ties); if its
    probability reaches delimiter_threshold the block ends on it, inclusive, else the block has
    the default length min(block_length, remaining). No other clamp: a block may be one token
    long, or longer than block_length. Rows choose their own ends; the batch waits for its
    slowest row's block (see query_window for how rows with different blocks share a forward).
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

    def adapt(self, state: DecodeState, logits: torch.Tensor, lpos: torch.Tensor, noise: Noise) -> None:
        remaining = state.L - state.start  # (B,)
        window = remaining.clamp(max=self.window)  # (B,)
        offset = lpos - state.start[:, None]  # (B, K) distance from each row's block start
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
        on_delimiter = lpos.gather(1, best[:, None]).squeeze(1) + 1  # (B,)
        default = state.start + remaining.clamp(max=self.block_length)  # (B,)
        state.end = torch.where(best_p >= self.threshold, on_delimiter, default)
        state.end = torch.where(remaining > 0, state.end, state.start)  # finished rows stay empty
        # 3) Record each unfinished row's chosen length.
        state.bounds = (state.start.tolist(), state.end.tolist())  # the block's real ends, on the host
        lengths = state.extras.setdefault("block_lengths", [[] for _ in range(state.x.shape[0])])
        for row, (s, e) in enumerate(zip(*state.bounds)):
            if s < state.L:
                lengths[row].append(e - s)


# ---------------------------------------------------------------------------------------------
# Measuring the cache's approximation
# ---------------------------------------------------------------------------------------------


def measuring_drift(forward):
    """Wrap a forward so that every cached step also runs an exact full forward (no cache) and
    records the largest |cached - exact| block logit in state.extras['max_drift']."""

    def wrapped(model, state, config, positions, head):
        logits = forward(model, state, config, positions, head)  # (B, K, V)
        drift = state.extras.setdefault("max_drift", 0.0)
        if config.cache == "dllm" or not state.full:  # a step that reads stale features
            exact_state = DecodeState(x=state.x, P=state.P, start=state.start, end=state.end, key_mask=state.key_mask)
            exact = model_forward(model, exact_state, config, torch.arange(state.L, device=state.x.device), (0, state.L))
            lpos = positions[..., head[0]:head[1]].clamp(max=state.L - 1).expand(exact.shape[0], -1)  # (B, K)
            exact = exact.gather(1, lpos[..., None].expand(-1, -1, exact.shape[-1]))  # (B, K, V)
            state.extras["max_drift"] = max(drift, float((exact - logits).abs().max()))
        return logits

    return wrapped
