"""
Decoding a masked-diffusion LM: vanilla LLaDA sampling and Fast-dLLM, in one loop.

A diffusion LM generates by unmasking. The answer starts as `gen_length` [MASK] tokens after the
prompt; each step runs the model over the canvas, proposes a token for every masked position,
and commits ("unmasks") the most confident proposals. Committed tokens never change.
Semi-autoregressive blocks split the answer into `block_length` chunks decoded left to right.

- Vanilla LLaDA (Nie et al., "Large Language Diffusion Models", arXiv 2502.09992): one full
  forward per step, a fixed number of commits per step (low-confidence remasking).
- Fast-dLLM (Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV
  Cache and Parallel Decoding", arXiv 2505.22618): a block-wise approximate KV cache (prefix
  cache, or DualCache which also caches the masked suffix) and confidence-aware parallel decoding
  (commit every proposal above a threshold, or as many as a factor bound allows).

Each method is a small change to the one loop in `generate`: the cache policy picks which tokens
go through the model (`query_window`), the commit rule picks which proposals are kept
(`select_topk`, `select_threshold`, `select_factor`). They compose freely.

Differences from the original code, all deliberate and documented where they happen: a block
that is already finished gets no more forwards (the originals sometimes spend one); batch rows
may use a left-padding mask; the LM head runs only over the current block.

Usage:
    cfg = DecodeConfig.for_model(model.config, gen_length=256, block_length=32, steps=256,
                                 cache="dual", threshold=0.9)
    out = generate(model, prompt_ids, cfg)       # out.ids (B, P + G), out.nfe

Shape legend: B batch, P prompt, G generation, L = P + G, K current block, Q query tokens of a
forward, V vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cache import KVCache

# ---------------------------------------------------------------------------------------------
# Settings and result
# ---------------------------------------------------------------------------------------------

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")


@dataclass
class DecodeConfig:
    """Decoding settings, named as the original samplers' keyword arguments."""

    gen_length: int = 128  # G, tokens to generate
    block_length: int = 128  # tokens per semi-autoregressive block (G must be a multiple)
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
    cache: str = "none"  # 'none', 'prefix' (Fast-dLLM prefix cache) or 'dual' (DualCache)
    cap_steps_per_block: bool = False  # at most steps/num_blocks forwards per block, as Fast-dLLM's
    #   DualCache does; with threshold/factor that can leave masks (a warning says so)
    first_release_nfe: bool = False  # cached modes: spend one cached forward on a block the
    #   block-start forward already finished, as Fast-dLLM's first release did (NFE only)
    refresh_interval: int = 0  # cached modes: also refresh the whole cache every this many steps
    #   of a block (0 = only at block start; 1 = every step, which equals no cache)
    measure_drift: bool = False  # cached modes: also run an exact full forward at every cached
    #   step and record the largest |logit difference| on the block (slow; measures the approximation)

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.gen_length % self.block_length != 0:
            raise ValueError(f"gen_length {self.gen_length} is not divisible by block_length {self.block_length}")
        if self.steps % self.num_blocks != 0:
            raise ValueError(f"steps {self.steps} is not divisible by the number of blocks {self.num_blocks} "
                             f"(gen_length {self.gen_length} / block_length {self.block_length})")
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {REMASKING}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; use one of {CACHES}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")
        if self.refresh_interval < 0:
            raise ValueError(f"refresh_interval must be >= 0, got {self.refresh_interval}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

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
    max_drift: float | None = None  # largest |cached - exact| block logit (measure_drift only)

    @property
    def generated(self) -> torch.Tensor:
        """The generated part, (B, G)."""
        return self.ids[:, self.prompt_length:]


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


def gumbel_noise(shape, generator, device) -> torch.Tensor:
    """-log(u), u ~ U(0, 1), in float64. argmax(exp(logits) / noise^T) = argmax(logits/T + Gumbel)
    is a sample from softmax(logits / T): the Gumbel-max trick in the original's exponential form."""
    return -torch.log(torch.rand(shape, generator=generator, device=device, dtype=torch.float64))


def propose(logits, mask, config: DecodeConfig, generator, noise_shape, noise_offset, extra_noise=False):
    """Proposals x0 and their confidence for the current block.

    logits (B, K, V) are the block's; mask (B, K) marks its masked positions.
    The originals draw the sampling noise over every query token of the forward, not just the
    block; to reproduce a seeded run we draw the same (B, Q, ...) tensors and slice out the block
    at `noise_offset`. `extra_noise` draws one unused Gumbel tensor first: Fast-dLLM's prefix cache
    calls its noise function twice per cached step (it only matters when temperature > 0).
    Returns x0 (B, K) and confidence (B, K) in float64, -inf where a position is not eligible.
    The EOS/EOT flags edit `logits` in place.
    """
    B, K, _ = logits.shape
    block = slice(noise_offset, noise_offset + K)
    if config.logits_eos_inf:
        logits[:, :, config.eos_id] = -torch.inf  # EOS can never be proposed
    # 1) Proposal: argmax at temperature 0, otherwise Gumbel-max in float64.
    if config.temperature > 0:
        if extra_noise:
            gumbel_noise(noise_shape, generator, logits.device)  # drawn and discarded, as the original
        noise = gumbel_noise(noise_shape, generator, logits.device)[:, block]  # (B, K, V)
        noisy = logits.to(torch.float64).exp() / noise ** config.temperature
    else:
        noisy = logits
    # The mask token is never a proposal: committing it would leave the position masked forever
    # (a trained LLaDA never predicts it, so this changes nothing there; the confidences below
    # still use the full softmax, as the original's do).
    x0 = noisy.index_fill(-1, torch.tensor([config.mask_id], device=noisy.device), -torch.inf).argmax(dim=-1)  # (B, K)
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
        conf = torch.rand(noise_shape[:2], generator=generator, device=logits.device, dtype=torch.float64)[:, block]  # (B, K)
    # 4) Only masked positions of the block are eligible.
    return x0, torch.where(mask, conf, torch.full_like(conf, -torch.inf))


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


# ---------------------------------------------------------------------------------------------
# The cache policy: which tokens go through the model at each step
# ---------------------------------------------------------------------------------------------


def query_window(cache: str, step: int, block: tuple[int, int], length: int, refresh_interval: int = 0) -> tuple[int, int]:
    """The [start, end) of the canvas fed to the model at `step` of the block [s, e).

    - 'none': always the whole canvas (vanilla LLaDA).
    - 'prefix': the whole canvas at the block's first step (refreshing every cached position),
      then the block plus the masked suffix; the prefix is read from the cache.
    - 'dual': the whole canvas at the first step, then the block alone; prefix and suffix are
      read from the cache (stale), the block's fresh K/V are written over its cached ones.
    With refresh_interval n > 0, every n-th step of the block is a full refresh as well.
    """
    s, e = block
    if cache == "none" or step == 0 or (refresh_interval and step % refresh_interval == 0):
        return 0, length
    return (s, length) if cache == "prefix" else (s, e)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, P) ids and a (B, P) attention mask (1 = real token)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def _check_inputs(model, prompt_ids, config, attention_mask):
    """Clear errors for a user's mistakes, before any compute."""
    mcfg = model.config
    if config.mask_id is None:
        raise ValueError("config.mask_id is not set; build the config with DecodeConfig.for_model(model.config, ...)")
    if not 0 <= config.mask_id < mcfg.embedding_size:
        raise ValueError(f"mask_id {config.mask_id} is outside the vocabulary [0, {mcfg.embedding_size})")
    if (config.logits_eos_inf or config.confidence_eos_eot_inf) and config.eos_id is None:
        raise ValueError("logits_eos_inf / confidence_eos_eot_inf need config.eos_id")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (B, P) with P > 0, got shape {tuple(prompt_ids.shape)}")
    real = prompt_ids if attention_mask is None else prompt_ids[attention_mask.bool()]
    if (real == config.mask_id).any():
        raise ValueError(f"the prompt contains the mask token {config.mask_id}")
    total = prompt_ids.shape[1] + config.gen_length
    if total > mcfg.max_sequence_length:
        raise ValueError(f"prompt ({prompt_ids.shape[1]}) + gen_length ({config.gen_length}) = {total} "
                         f"exceeds the model's max_sequence_length {mcfg.max_sequence_length}")
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt_ids.shape)}")
        m = attention_mask.long()
        if (m[:, 1:] < m[:, :-1]).any():
            raise ValueError("attention_mask must be left padding: zeros, then ones")
        if (m.sum(1) == 0).any():
            raise ValueError("attention_mask has a row with no real token")


def forward_block(model, x, window, block, prompt_index, key_mask, config, cache=None):
    """Run the model over x[:, window] and return the logits of the block positions, (B, K, V).

    With classifier-free guidance the unconditional copy (prompt masked) rides in the same
    batched forward, and the two are combined as un + (cfg + 1)(cond - un).
    """
    (q0, q1), (c0, e) = window, block
    inp = x[:, q0:q1]  # (B, Q)
    if config.cfg_scale > 0:
        uncond = torch.where(prompt_index[:, q0:q1], torch.full_like(inp, config.mask_id), inp)
        inp = torch.cat([inp, uncond], dim=0)  # (2B, Q)
    positions = torch.arange(q0, q1, device=x.device)  # (Q,)
    logits = model(inp, positions=positions, cache=cache, attention_mask=key_mask,
                   logits_range=(c0 - q0, e - q0))  # (rows, K, V): the LM head runs on the block only
    if config.cfg_scale > 0:
        cond, uncond = logits.chunk(2, dim=0)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)  # (B, K, V)
    return logits


# ---------------------------------------------------------------------------------------------
# The decoding loop (vanilla LLaDA, Fast-dLLM caches and parallel commit rules)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, config: DecodeConfig, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, on_step=None) -> DecodeResult:
    """Generate `config.gen_length` tokens after each prompt row.

    prompt_ids: (B, P) token ids, left-padded when rows differ in length.
    generator: the random source for temperature > 0 and random remasking (default: torch's global one).
    attention_mask: (B, P), 1 for real tokens, 0 for left padding (the original has no such mask).
    on_step: optional callback(x (B, L), nfe) after every step, e.g. to show the denoising live.
    """
    _check_inputs(model, prompt_ids, config, attention_mask)
    device = model.device
    B, P = prompt_ids.shape
    L = P + config.gen_length
    mask_id = config.mask_id
    # The canvas: the prompt followed by gen_length masks.
    x = torch.full((B, L), mask_id, dtype=torch.long, device=device)  # (B, L)
    x[:, :P] = prompt_ids.to(device)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = True
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
        cache = KVCache.for_model(model.config, batch=rows, capacity=L, device=device, dtype=model.dtype)

    nfe, query_tokens, nfe_per_block, max_drift = 0, 0, [], 0.0
    steps_per_block = config.steps_per_block
    for b in range(config.num_blocks):
        s, e = P + b * config.block_length, P + (b + 1) * config.block_length
        # The top-k schedule of this block: (B, steps_per_block) commits per step.
        schedule = num_transfer_tokens(x[:, s:e] == mask_id, steps_per_block)
        step = 0
        # Decode the block until it has no masks. The capped mode stops after steps_per_block
        # forwards (Fast-dLLM's DualCache); the first-release mode spends one cached forward even
        # on a block its first forward already finished.
        while ((x[:, s:e] == mask_id).any() or (config.first_release_nfe and cache is not None and step == 1)) \
                and not (config.cap_steps_per_block and step >= steps_per_block):
            # 1) Pick the query window by cache policy and run the model over it. Commits land in
            #    the block [c0, e); only the capped mode can leave masks before the block, and the
            #    original makes those eligible again at a full forward, so c0 widens to P there.
            q0, q1 = query_window(config.cache, step, (s, e), L, config.refresh_interval)
            c0 = P if config.cap_steps_per_block and q0 == 0 else s
            logits = forward_block(model, x, (q0, q1), (c0, e), prompt_index, key_mask, config, cache)
            nfe += 1
            query_tokens += q1 - q0
            if config.measure_drift and q0 > 0:
                exact = forward_block(model, x, (0, L), (c0, e), prompt_index, key_mask, config)  # no cache
                max_drift = max(max_drift, float((exact - logits).abs().max()))
            # 2) Propose a token and a confidence for every masked position of the block.
            block_mask = x[:, c0:e] == mask_id  # (B, K)
            x0, conf = propose(logits, block_mask, config, generator, noise_shape=(B, q1 - q0, logits.shape[-1]),
                               noise_offset=c0 - q0, extra_noise=config.cache == "prefix" and q0 > 0)
            # 3) Choose which proposals to commit: a fixed count, a threshold or a factor bound.
            if config.threshold is not None:
                commit = select_threshold(conf, config.threshold)
            elif config.factor is not None:
                commit = select_factor(conf, config.factor, config.factor_off_by_one)
            else:
                k = schedule[:, step] if step < steps_per_block else torch.zeros(B, dtype=torch.long, device=device)
                commit = select_topk(conf, k)
            # 4) Commit: committed tokens are final.
            x[:, c0:e] = torch.where(commit, x0, x[:, c0:e])
            step += 1
            if on_step is not None:
                on_step(x, nfe)
        nfe_per_block.append(step)

    masks_left = int((x[:, P:] == mask_id).sum())
    if masks_left:
        warnings.warn(f"{masks_left} masks left in the output: cap_steps_per_block allows "
                      f"{steps_per_block} forwards per block, too few for these settings", stacklevel=2)
    return DecodeResult(ids=x, nfe=nfe, query_tokens=query_tokens, masks_left=masks_left,
                        prompt_length=P, nfe_per_block=nfe_per_block,
                        max_drift=max_drift if config.measure_drift else None)
