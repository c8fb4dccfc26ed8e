"""
Train the project's small LLaDA-format checkpoint on the synthetic task families (task.py).

This is LLaDA's supervised fine-tuning objective (Nie et al., "Large Language Diffusion Models",
arXiv 2502.09992, Algorithm 2): for each example draw a masking ratio t ~ U(eps, 1), hide every
answer token (the response and its EOS padding) independently with probability t, never hide the
prompt, and minimise the cross-entropy on the hidden tokens weighted by 1/t, normalised by the
answer length. The model is model.py's own class and the checkpoint is written in the layout
`load_model` reads (config.json, model.safetensors, tokenizer files), so it loads exactly as a
real LLaDA checkpoint does.

Dream (Ye et al., "Dream 7B", arXiv 2508.15487) was made differently: an autoregressive model
(Qwen2.5) adapted to masked diffusion, keeping its head (row i-1 predicts token i). `--family dream`
writes a Dream directory (Qwen2 names and config keys, model.py's save_model); `--objective ar`
trains it as an AR model (causal attention, next-token loss, `ar_loss`); `--init-from` that
checkpoint then trains the same weights with the diffusion loss, attention now bidirectional.
Dream's context-adaptive noise rescheduling is left out (one masking ratio per example).

Differences from the paper: no pre-training stage (the task families are all there is);
generation windows of several lengths in one run (--windows, up to 1024 tokens) so the model sees
the long EOS tails the benchmark decodes; k-shot prompts (--shots, task.few_shot's format) in a
share of the batches; batches sized in tokens, prompts included. Each example's family is drawn
from --mix; training never draws a held-out problem, as question or as shot.

Resumable and crash-safe: every --save-every steps the weights, the optimizer moments and the log
go to --state-dir/step-NNNNNNNN/ (safetensors + JSON, nothing pickled), written in a temporary
directory that is renamed into place only when both files are complete, so a crash mid-write
leaves the previous snapshot as the newest. Each step's batch and masks are drawn from generators
seeded by (seed, step), so a resumed run ends with the same weights as one run straight through.
A snapshot can be exported: rerun with the same flags and --steps at that snapshot's step.
Nothing else is ever deleted: one run at a time holds a --state-dir (a lock), which may not overlap
--out, and --overwrite replaces only a checkpoint this script wrote.

bf16 autocast is used only where it is faster: `--bf16 auto` (the default) times a few fp32 and
bf16 training steps at the start and keeps the faster (on CPUs without bf16 units bf16 is many
times slower); the choice is printed and kept on resume.

Usage:
    python -m tools.train                    # checkpoints/fewshot's last stage, into runs/model
    python -m tools.train --steps 50 --init '' --out /tmp/x --state-dir /tmp/x-state   # a smoke run
    python -m tools.train --family dream --objective ar --init '' --out /tmp/ar --state-dir /tmp/ar-state
    python -m tools.train --family dream --init-from /tmp/ar --out /tmp/dlm --state-dir /tmp/dlm-state
(checkpoints/README.md has every shipped checkpoint's stages, with their commands.)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

try:
    import fcntl  # the --state-dir lock; absent on Windows, where two runs are not kept apart
except ImportError:
    fcntl = None

from tools import task
from model import FAMILIES, LLaDAModel, ModelConfig, init_weights, load_model, save_model

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

BF16_CHOICES = ("auto", "on", "off")
OBJECTIVES = ("diffusion", "ar")


@dataclass
class TrainConfig:
    """Everything that decides the trained weights. The CLI reads its defaults from here."""

    out: str = "runs/model"  # where the final checkpoint is written (an existing one needs overwrite)
    state_dir: str = "runs/state"  # resumable training state (one directory per snapshot)
    init: str = "checkpoints/mix"  # checkpoint whose weights training starts from ('' = random init)
    family: str = "llada"  # checkpoint format, model.FAMILIES: 'llada', or 'dream' (Qwen2 names, shifted head);
    #   with --init it must be that checkpoint's
    objective: str = "diffusion"  # 'diffusion' (masked tokens, bidirectional) or 'ar' (next token, causal)
    prompt_loss: bool = False  # ar: score the prompt's tokens too, not only the answer's
    overwrite: bool = False  # allow replacing an existing checkpoint directory at `out`
    steps: int = 3000  # optimizer steps
    batch_tokens: int = 8192  # tokens per batch, prompts included (sequences follow from the lengths)
    lr: float = 6e-4  # peak learning rate (AdamW), after a linear warmup (1e-3 erased --init's
    #   arithmetic within the warmup: keep it low when continuing a trained checkpoint)
    min_lr: float = 2e-5  # end of the cosine decay
    warmup: int = 50  # warmup steps
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    d_model: int = 128  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_hidden_size: int = 512  # SwiGLU width
    eps: float = 1e-3  # smallest masking ratio t
    seed: int = 0  # seeds the weights (without --init), the batches and the masks
    eval_every: int = 300  # held-out accuracy every this many steps
    eval_problems: int = 100  # held-out problems per family per evaluation (at most task.HELD_OUT)
    save_every: int = 150  # training-state snapshot every this many steps
    threads: int = 1  # torch CPU threads (more than the free cores makes it slower, not faster)
    bf16: str = "auto"  # bf16 autocast: 'auto' (time both, keep the faster), 'on' or 'off'
    device: str = "auto"  # 'auto' (CUDA when available), 'cpu' or 'cuda'
    mix: str = "short:0.45,long:0.2,pair:0.35"  # task families and their share of the examples
    windows: str = "32:0.2,64:0.2,256:0.45,1024:0.15"  # generation windows and their share of the
    #   batches (the answers are < 50 tokens; long windows teach the EOS tail the benchmark decodes)
    shots: int = 8  # most solved examples before a question (task.few_shot's format); 0 = none
    zero_shot_share: float = 0.25  # share of batches without shots; the rest draw k in 1..shots
    eval_shots: int = 8  # also evaluate k-shot prompts (0 = only the plain ones)
    max_operand: int = 9  # chains: operands are 1..max_operand
    ops: str = "+-"  # chains: operators, from '+-*'
    style: str = "compact"  # chains: 'compact' or 'word'
    width: int = 0  # chains: zero-pad numbers to this many digits (0 = natural widths)

    def __post_init__(self):
        cpus = os.cpu_count() or 1
        for name, high in (("steps", 10**9), ("batch_tokens", MAX_BATCH_TOKENS), ("d_model", 8192),
                           ("n_layers", 256), ("n_heads", 256), ("mlp_hidden_size", 65536),
                           ("eval_every", 10**9), ("save_every", 10**9), ("threads", cpus)):
            value = getattr(self, name)
            if not 1 <= value <= high:
                why = " (this machine's CPUs)" if name == "threads" else ""
                raise ValueError(f"{name} must be in 1..{high}{why}, got {value}")
        if not 0 < self.eval_problems <= task.HELD_OUT:
            raise ValueError(f"eval_problems must be in 1..{task.HELD_OUT} (the held-out set), got {self.eval_problems}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"lr must be a finite number in (0, 1], got {self.lr}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must be a finite number in [0, lr = {self.lr}], got {self.min_lr}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 1):
            raise ValueError(f"weight_decay must be a finite number in [0, 1], got {self.weight_decay}")
        if not 0 <= self.warmup <= 10**9:
            raise ValueError(f"warmup must be in 0..{10**9}, got {self.warmup}")
        for name in ("shots", "eval_shots"):
            if not 0 <= getattr(self, name) <= task.MAX_SHOTS:
                raise ValueError(f"{name} must be in 0..{task.MAX_SHOTS}, got {getattr(self, name)}")
        if not (math.isfinite(self.zero_shot_share) and 0 <= self.zero_shot_share <= 1):
            raise ValueError(f"zero_shot_share must be a number in [0, 1], got {self.zero_shot_share}")
        if self.bf16 not in BF16_CHOICES:
            raise ValueError(f"bf16 must be one of {BF16_CHOICES}, got {self.bf16!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "ar" and FAMILIES[self.family].logit_shift != 1:
            raise ValueError(f"objective 'ar' needs a model whose row i-1 predicts token i (--family dream); "
                             f"a {FAMILIES[self.family].label} model's row i predicts token i itself")
        if self.prompt_loss and self.objective != "ar":
            raise ValueError("prompt_loss scores the prompt's next tokens: it needs --objective ar")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.weights()  # parses --mix, raising on a bad one
        self.window_shares()  # and --windows
        for name, family in task.families_for(self.task).items():  # the chain settings, checked by task
            if getattr(family, "distinct", task.HELD_OUT + 1) <= task.HELD_OUT:  # nothing left to train on
                raise ValueError(f"mix: family {name!r} has only {family.distinct} distinct problems with "
                                 f"--max-operand {self.max_operand} --ops {self.ops!r}, and its "
                                 f"{task.HELD_OUT} held-out ones are never trained on; widen it")

    def weights(self) -> dict[str, float]:
        """--mix as {family: share}."""
        return parse_shares("mix", self.mix, lambda name: name if name in task.FAMILIES else None,
                            f"a family ({', '.join(task.FAMILIES)})", "short:0.3,pair:0.7")

    def window_shares(self) -> dict[int, float]:
        """--windows as {generation length: share}."""
        def length(text):
            return int(text) if text.isdigit() and 1 <= int(text) <= 2048 - 64 else None
        return parse_shares("windows", self.windows, length, "a length in 1..1984", "32:0.5,256:0.5")

    @property
    def task(self) -> dict:
        """The task spec written to the checkpoint's task.json (see task.families_for)."""
        return {"families": list(self.weights()), "mix": self.weights(),
                "chain": dict(max_operand=self.max_operand, ops=self.ops, style=self.style, width=self.width)}


# Settings that cannot change the trained weights, so a resume may change them. `steps` is here
# so that a run can be extended or a snapshot exported; extending changes the cosine schedule
# from the resume point on.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_problems", "eval_shots", "save_every", "threads", "device",
                     "out", "state_dir", "overwrite")
MAX_BATCH_TOKENS = 1 << 20  # a million tokens per batch is far past what fits a CPU step
SHOT_TOKENS = 32  # a solved example's typical length (short 31, long 65, pair 13), to size batches


def parse_shares(flag: str, text: str, key, what: str, example: str) -> dict:
    """'a:0.3,b:0.7' as {key(a): 0.3, key(b): 0.7}; a missing share is 1. Each key once."""
    out = {}
    for part in text.split(","):
        name, _, share = part.partition(":")
        name = name.strip()
        k = key(name)
        if k is None:
            raise ValueError(f"{flag}: {name!r} in {text!r} is not {what}")
        if k in out:
            raise ValueError(f"{flag}: {name!r} appears twice in {text!r}")
        try:
            out[k] = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"{flag}: share {share!r} of {name!r} is not a number; write e.g. {example!r}") from None
        if not (math.isfinite(out[k]) and out[k] > 0):
            raise ValueError(f"{flag}: share of {name!r} must be a positive number, got {share}")
    return out


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Data: a batch is prompts + responses + EOS padding, all the same length
# ---------------------------------------------------------------------------------------------


def held_out_prompts(config: TrainConfig) -> set[str]:
    """Every prompt any script may score on (task.HELD_OUT per family), whatever eval_problems is."""
    return set().union(*(f.held_out_prompts() for f in task.families_for(config.task).values()))


def make_batch(config: TrainConfig, step: int, held_out: set[str], eos_id: int):
    """The batch of step `step`: ids (B, L) and the answer-region mask (B, L). Deterministic.

    One window and one shot count k per batch; each example's k solved examples come from its
    own family's training stream (task.with_shots, the format decoding uses), never held out.
    """
    rng = random.Random(config.seed * 1_000_003 + step)
    windows = config.window_shares()
    window = rng.choices(list(windows), list(windows.values()))[0]
    k = 0  # no draw without shots, so a zero-shot run's stream is the plain task's
    if config.shots and rng.random() >= config.zero_shot_share:
        k = rng.randint(1, config.shots)
    families, weights = task.families_for(config.task), config.weights()
    names, shares = list(weights), list(weights.values())
    problems, need = [], max(1, config.batch_tokens // (window + 16 + k * SHOT_TOKENS))
    for _ in range(1000 * need):  # bounded: a family whose problems are nearly all held out ends below
        if len(problems) == need:
            break
        # One family per example (no draw with a single family, so the stream is the plain task's).
        name = names[0] if len(names) == 1 else rng.choices(names, shares)[0]
        p = families[name].sample(rng)
        if p.prompt not in held_out:  # held-out problems never appear in training
            if k:
                p = task.with_shots(p, task.draw_shots(families[name], rng, k, held_out | {p.prompt}))
            problems.append(p)
    if len(problems) < need:
        raise ValueError(f"{1000 * need} draws gave {len(problems)} of the {need} problems of a batch: nearly "
                         f"every problem of --mix {config.mix} is held out for evaluation; widen the chains")
    prompts = [task.encode(p.prompt) for p in problems]
    answers = [task.encode(p.answer) for p in problems]
    # A window too short for a long chain's answer grows to fit it (and at least one EOS).
    window = max(window, 1 + max(len(a) for a in answers))
    length = max(len(q) for q in prompts) + window
    ids = torch.full((len(problems), length), eos_id, dtype=torch.long)  # (B, L), EOS-padded
    answer_region = torch.ones_like(ids, dtype=torch.bool)  # (B, L)
    for i, (q, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(q) + len(a)] = torch.tensor(q + a)
        answer_region[i, :len(q)] = False  # the prompt is never masked
    return ids, answer_region


def diffusion_loss(model, ids, answer_region, mask_id: int, eps: float, generator: torch.Generator):
    """LLaDA's SFT loss: mask answer tokens with prob t, CE on the masked ones weighted by 1/t.

    Returns (loss, details) where details has the masks and ratios, so tests can check them.
    A shifted model (Dream) needs nothing else: its forward already returns row i-1's head as the
    logits of position i (model.DiffusionLM.logits), so `logits[masked]` scores each masked token
    from the hidden state before it, as Dream's training does.
    """
    B, L = ids.shape
    # 1) One masking ratio per example, t ~ U(eps, 1) (LLaDA: p = (1 - eps) * u + eps).
    t = (1 - eps) * torch.rand(B, generator=generator) + eps  # (B,)
    # 2) Mask each answer token independently with probability t; prompt tokens never.
    masked = (torch.rand(B, L, generator=generator) < t[:, None]) & answer_region  # (B, L)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)  # (B, L)
    # 3) Predict every position at once; score only the masked ones.
    logits = model(noisy.to(model.device))  # (B, L, V)
    ce = F.cross_entropy(logits[masked.to(logits.device)].float(), ids[masked].to(logits.device),
                         reduction="none")  # (n_masked,)
    # 4) Weight by 1/t and normalise by each example's answer length, then average over the batch.
    answer_len = answer_region.sum(1, keepdim=True).expand(B, L)[masked].to(ce.device)  # (n_masked,)
    weight = (1.0 / t[:, None]).expand(B, L)[masked].to(ce.device)  # (n_masked,)
    loss = (ce * weight / answer_len).sum() / B
    return loss, {"t": t, "masked": masked, "noisy": noisy}


def ar_loss(model, ids, answer_region, prompt_loss: bool = False):
    """An autoregressive model's loss, the stage Dream starts from (it adapted Qwen2.5): causal
    attention, each token predicted from the tokens before it, cross-entropy averaged over each
    example's scored tokens (its answer and EOS padding; with prompt_loss every token after the
    first), then over the batch. Returns (loss, {"scored": (B, L) bool}).
    """
    # 1) Causal forward. A shifted model's row i is the head of hidden state i-1, which has read
    #    ids[:, :i] only: the logit shift is the AR head, so row i predicts token i (row 0 has no
    #    token before it and is never scored).
    logits = model(ids.to(model.device), causal=True)  # (B, L, V)
    scored = torch.ones_like(answer_region) if prompt_loss else answer_region.clone()  # (B, L)
    scored[:, 0] = False
    # 2) Next-token cross-entropy on the scored positions, a mean per example, then over the batch.
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids.to(logits.device), reduction="none")  # (B, L)
    per_example = (ce * scored.to(ce.device)).sum(1) / scored.sum(1).clamp(min=1).to(ce.device)  # (B,)
    return per_example.mean(), {"scored": scored}


def training_loss(config: TrainConfig, model, ids, answer_region, mask_id: int, generator: torch.Generator):
    """The configured objective's loss on one batch (the generator draws diffusion's masks)."""
    if config.objective == "ar":
        return ar_loss(model, ids, answer_region, config.prompt_loss)
    return diffusion_loss(model, ids, answer_region, mask_id, config.eps, generator)


# ---------------------------------------------------------------------------------------------
# Evaluation: each family's scorer on its held-out problems, vanilla sampler
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def ar_generate(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, gen_length: int) -> torch.Tensor:
    """Greedy autoregressive decoding of a causally trained shifted model (the AR stage): one
    token per forward, left to right, without a cache. The forward runs the canvas up to the
    token to write; a shifted model's last row predicts the position after it (logits_range
    (Q, Q + 1)). Stops once every row has written EOS and pads the rest with it. Returns (B, G)."""
    B, P = prompt_ids.shape
    eos = model.config.eos_token_id
    x = torch.cat([prompt_ids, torch.full((B, gen_length), eos, dtype=prompt_ids.dtype,
                                          device=prompt_ids.device)], dim=1)  # (B, P + G)
    keys = torch.cat([attention_mask, torch.ones_like(x[:, P:])], dim=1)  # (B, P + G)
    for j in range(gen_length):
        Q = P + j  # the tokens written so far; the next one is at position Q
        logits = model(x[:, :Q], attention_mask=keys[:, :Q], causal=True, logits_range=(Q, Q + 1))  # (B, 1, V)
        x[:, Q] = logits[:, 0].argmax(dim=-1)
        if (x[:, P:Q + 1] == eos).any(dim=1).all():  # every row has ended: the rest stays EOS
            break
    return x[:, P:]  # (B, G)


@torch.no_grad()
def evaluate(model, problems, families=None, block_length=32, batch_size=200, gen_length=None,
             causal: bool = False) -> float:
    """Held-out accuracy with the vanilla sampler (one token per step, temperature 0), or with
    greedy autoregressive decoding (ar_generate) when `causal` (a model trained with --objective ar).

    Each problem is scored by its family (task.score); each family decodes at its own window
    (family.gen_length) unless gen_length is given. An AR model trained with --prompt-loss has
    read k-shot prompts, where an answer is followed by a blank line and the next shot more often
    than by EOS: its response is also cut at the first blank line, the stop sequence lm-eval's
    few-shot tasks use. A Dream model decodes with the same sampler:
    its forward returns per-position logits (the shift is inside model.py).
    """
    from decode import DecodeConfig, generate, left_pad

    families = families or task.FAMILIES
    correct = 0
    for name in dict.fromkeys(p.family for p in problems):  # families in order of appearance
        group = [p for p in problems if p.family == name]
        G = gen_length or families[name].gen_length
        config = DecodeConfig.for_model(model.config, gen_length=G, block_length=min(block_length, G), steps=G)
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            ids, mask = left_pad([task.encode(p.prompt) for p in chunk], model.config.pad_token_id)
            ids, mask = ids.to(model.device), mask.to(model.device)
            if causal:
                generated = ar_generate(model, ids, mask, G)
            else:
                generated = generate(model, ids, config, attention_mask=mask).generated
            for p, row in zip(chunk, generated.tolist()):
                text = task.decode(row)
                if causal:  # a model that also learned the prompts writes the next shot after its answer
                    text = text.split(task.SHOT_SEPARATOR)[0]
                correct += families[name].score(p, text)
    return correct / len(problems)


def evaluate_families(model, families, n: int, shots: int = 0, causal: bool = False) -> dict[str, float]:
    """{family: vanilla (or, causal, greedy AR) accuracy on its first n held-out problems}, as
    k-shot prompts if shots > 0."""
    return {name: round(evaluate(model, [task.few_shot(p, shots, families=families) for p in fam.test_set(n)],
                                 families, causal=causal), 4) for name, fam in families.items()}


# ---------------------------------------------------------------------------------------------
# Resumable state: one directory per snapshot, safetensors for tensors, JSON for the rest
# ---------------------------------------------------------------------------------------------

SNAPSHOT = re.compile(r"step-(\d{8})")


def snapshot_dir(config: TrainConfig, step: int) -> str:
    return os.path.join(config.state_dir, f"step-{step:08d}")


def save_state(config: TrainConfig, model, opt, step: int, log: list, precision: str) -> str:
    """Write the snapshot of `step` atomically: both files into a temporary directory, then one
    rename. A crash at any point leaves either the complete snapshot or none of it; a failed write
    (a full disk) removes the temporary directory and raises write_error's one-line OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    final = snapshot_dir(config, step)
    tmp = final + ".tmp"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        tensors[f"opt.{names[p]}.exp_avg"] = s["exp_avg"].detach().cpu().contiguous()
        tensors[f"opt.{names[p]}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu().contiguous()
        tensors[f"opt.{names[p]}.step"] = s["step"].detach().cpu().reshape(1)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash
        os.makedirs(tmp)
        # The step is stamped in both files too, so even a hand-assembled directory is checked.
        save_file(tensors, os.path.join(tmp, "state.safetensors"), metadata={"step": str(step)})
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "precision": precision, "config": asdict(config), "log": log}, f, indent=1)
        if os.path.isdir(final):  # re-saving a step (an export run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written snapshot would only keep the disk full
        raise write_error(err, f"the snapshot {final}") from None
    return final


def latest_snapshot(config: TrainConfig) -> str | None:
    """The newest complete snapshot at or before config.steps (temporary directories are ignored)."""
    if not os.path.isdir(config.state_dir):
        return None
    steps = [int(m[1]) for name in os.listdir(config.state_dir) if (m := SNAPSHOT.fullmatch(name))]
    steps = [s for s in steps if s <= config.steps]
    return snapshot_dir(config, max(steps)) if steps else None


def load_state(config: TrainConfig, model, opt) -> tuple[int, list, str | None]:
    """Restore the newest snapshot in --state-dir; returns (next step, log, saved precision)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = latest_snapshot(config)
    if path is None:
        return 0, [], None
    remedy = (f"delete {path} to resume from the snapshot before it, or pass another --state-dir "
              "to start afresh")
    meta_file, tensor_file = os.path.join(path, "state.json"), os.path.join(path, "state.safetensors")
    for file in (meta_file, tensor_file):
        if not os.path.isfile(file):
            raise ValueError(f"snapshot file {file} is missing; {remedy}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        step, saved_cfg = int(meta["step"]), meta["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"snapshot file {meta_file} is unreadable ({err}); {remedy}") from None
    try:
        with safe_open(tensor_file, framework="pt") as f:
            stamped = (f.metadata() or {}).get("step")
        tensors = load_file(tensor_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"snapshot file {tensor_file} is unreadable ({err}); {remedy}") from None
    if not step == int(SNAPSHOT.fullmatch(os.path.basename(path))[1]) == int(stamped or -1):
        raise ValueError(f"snapshot {path} is inconsistent: directory, {meta_file} (step {step}) and "
                         f"{tensor_file} (step {stamped}) disagree; {remedy}")
    # Every setting that changes the data or the weights must match, or the run would silently drift.
    # A snapshot older than a setting ran with its default.
    saved_cfg = {**{k: getattr(TrainConfig, k) for k in ("family", "objective", "prompt_loss")}, **saved_cfg}
    saved = {k: v for k, v in saved_cfg.items() if k not in RESUMABLE_CHANGES}
    mine = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    if saved != mine:
        diff = {k: (saved.get(k), mine.get(k)) for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k)}
        raise ValueError(f"{config.state_dir} holds a run with other settings (saved, now): {diff}; "
                         "use another --state-dir or the same settings")
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        raise ValueError(f"snapshot file {tensor_file} does not fit this model ({err}); {remedy}") from None
    for name, p in model.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{name}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p.device)}
    return step, meta["log"], meta.get("precision")


# ---------------------------------------------------------------------------------------------
# Setup: the model, the output check, the precision probe
# ---------------------------------------------------------------------------------------------


def build_model(config: TrainConfig, device) -> LLaDAModel:
    """A fresh model of config's shape, with --init's weights when given."""
    ids = task.special_ids(config.family)
    model_config = ModelConfig(family=config.family, d_model=config.d_model, n_heads=config.n_heads,
                               n_layers=config.n_layers, mlp_hidden_size=config.mlp_hidden_size,
                               vocab_size=len(task.vocabulary()), rope_theta=10000.0,
                               rms_norm_eps=1e-6 if config.family == "dream" else 1e-5,  # Qwen2's, LLaDA's
                               max_sequence_length=2048, **ids)
    model = init_weights(LLaDAModel(model_config), config.seed).to(device)
    if config.init:
        try:
            start = load_model(config.init, device=device, dtype=torch.float32)
        except (ValueError, OSError) as err:
            raise ValueError(f"--init {config.init}: cannot load it ({err}); pass --init '' to train from scratch") from None
        if start.config.family != config.family:  # the format (names, q/k/v biases, shift) is the weights'
            raise ValueError(f"--init {config.init} is a {FAMILIES[start.config.family].label} checkpoint, but "
                             f"--family is {config.family!r}; pass --family {start.config.family} to continue it")
        theirs = {k: getattr(start.config, k) for k in ("d_model", "n_heads", "n_layers", "mlp_hidden_size",
                                                          "vocab_size", *ids)}
        mine = {k: getattr(model_config, k) for k in theirs}
        if theirs != mine:
            raise ValueError(f"--init {config.init} has another shape or other token ids than these settings "
                             f"(theirs, mine): { {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]} }")
        model.load_state_dict(start.state_dict())
    return model


def check_writable(path: str, flag: str, what: str = "") -> None:
    """Fail now, not after hours of training, if the directory `path` can't be created or written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{flag} {what or path} is not a writable directory ({err.strerror or err}); "
                         f"pass another {flag}") from None


def choose_precision(config: TrainConfig, model, opt_free_batch, device, mask_id: int) -> str:
    """'bf16' or 'fp32': --bf16 on/off as given; 'auto' times two training steps of each (after a
    warm-up step) on this machine and keeps bf16 only if it is at least 10% faster."""
    if config.bf16 != "auto":
        return "bf16" if config.bf16 == "on" else "fp32"
    ids, region = opt_free_batch

    def seconds(enabled: bool, give_up_after: float = math.inf) -> float:
        """Best of two timed forward+backward passes after a warm-up one (the first pays for
        allocation and kernel selection)."""
        times = []
        for i in range(3):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                loss, _ = training_loss(config, model, ids, region, mask_id, torch.Generator().manual_seed(i))
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if times[-1] > give_up_after:  # already hopeless (emulated bf16 is ~10x slower): stop early
                break
        model.zero_grad(set_to_none=True)  # the probe changes no weight and leaves no gradient
        return min(times[1:] or times)

    fp32 = seconds(False)
    try:
        bf16 = seconds(True, give_up_after=3 * fp32)
    except RuntimeError as err:  # some CPU builds have no bf16 kernel for an op: then fp32 it is
        model.zero_grad(set_to_none=True)
        print(f"precision probe: fp32 {fp32 * 1000:.0f} ms/step, bf16 autocast fails here "
              f"({str(err).splitlines()[0]}) -> fp32")
        return "fp32"
    choice = "bf16" if bf16 < 0.9 * fp32 else "fp32"
    print(f"precision probe: fp32 {fp32 * 1000:.0f} ms/step, bf16 autocast {bf16 * 1000:.0f} ms/step -> {choice}")
    return choice


# What write_checkpoint puts in --out (transformers 4 adds special_tokens_map.json). --overwrite
# replaces a folder only if it holds these files and nothing else, training_log.json among them.
CHECKPOINT_FILES = frozenset({"config.json", "model.safetensors", "task.json", "training_log.json",
                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
LOCK_FILE = "train.lock"  # in --state-dir: held (flock) by the run using it, holds that run's PID


def not_our_checkpoint(path: str) -> str | None:
    """Why the folder `path` is not a checkpoint train.py wrote, or None if it is one: it has
    config.json, model.safetensors and a training_log.json as train.py writes it (the marker), and
    nothing that write_checkpoint does not write (a project, a home folder, a dataset never pass)."""
    if os.path.islink(path):
        return "it is a symbolic link"
    names = os.listdir(path)
    others = sorted(n for n in names if n not in CHECKPOINT_FILES or not os.path.isfile(os.path.join(path, n)))
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        return f"it holds {', '.join(others[:5])}{more}, which train.py does not write"
    missing = [n for n in ("config.json", "model.safetensors", "training_log.json") if n not in names]
    if missing:
        return f"it has no {' or '.join(missing)}"
    try:
        with open(os.path.join(path, "training_log.json")) as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        record = None
    if not (isinstance(record, dict) and "config" in record and "log" in record):
        return "its training_log.json is not the record train.py writes"
    return None


def check_output(config: TrainConfig) -> None:
    """--out must be new, or replaced on purpose: a shipped checkpoint is never overwritten by a
    run that forgot to name its own output, and --overwrite replaces nothing but a checkpoint this
    script wrote (never `--out .`, a project or a home folder). Checked before the first step, and
    again just before the final write."""
    out = os.path.abspath(config.out)
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out)):
        if not os.path.isdir(out):
            raise ValueError(f"--out {config.out} exists and is not a directory; pass another --out")
        if not config.overwrite:
            raise ValueError(f"--out {config.out} already exists; pass another --out, or --overwrite to replace it")
        why = not_our_checkpoint(out)
        if why:
            raise ValueError(f"--out {config.out} is not a checkpoint train.py wrote ({why}); --overwrite "
                             "replaces only such a folder: pass another --out")
    check_writable(os.path.dirname(out), "--out", f"{config.out}: its folder")


def check_apart(config: TrainConfig) -> None:
    """The final write replaces --out whole, so a state dir inside it would lose every snapshot; the
    state dir may not hold the checkpoint either, nor be the same folder."""
    out, state = os.path.realpath(config.out), os.path.realpath(config.state_dir)
    beside = f"e.g. --state-dir {config.out.rstrip('/' + os.sep) or config.out}-state"
    if out == state:
        raise ValueError(f"--out and --state-dir are the same folder ({config.out}): the final write replaces "
                         f"--out whole and would delete every snapshot; keep them apart, {beside}")
    if os.path.commonpath([out, state]) == out:
        raise ValueError(f"--state-dir {config.state_dir} is inside --out {config.out}: the final write replaces "
                         f"--out whole and would delete every snapshot; keep them apart, {beside}")
    if os.path.commonpath([out, state]) == state:
        raise ValueError(f"--out {config.out} is inside --state-dir {config.state_dir}; keep the checkpoint and "
                         f"the training state apart, {beside}")


def alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts: it can't be signalled, but exists)."""
    if pid == os.getpid():  # our own leftovers can only be an earlier process's, with a reused PID
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def recover_output(config: TrainConfig) -> None:
    """Finish what a run killed inside write_checkpoint left. Its two renames (the old checkpoint
    aside to out.old-PID, then out.tmp-PID in) leave, if killed between them, no --out: the old
    checkpoint is renamed back. A leftover out.tmp-PID (a killed or failed write) or out.old-PID
    (killed while deleting it) of a process that no longer runs is deleted, if it holds only files
    train.py writes. Each step prints one line."""
    out = os.path.abspath(config.out)
    folder, name = os.path.split(out)
    leftover = re.compile(re.escape(name) + r"\.(old|tmp)-(\d+)")
    try:
        entries = sorted(os.listdir(folder))  # old before tmp: the old checkpoint is restored first
    except OSError:
        return  # no folder yet (check_output says so if it can't be made)
    for entry in entries:
        m = leftover.fullmatch(entry)
        path = os.path.join(folder, entry)
        if not m or not os.path.isdir(path) or os.path.islink(path) or alive(int(m[2])):
            continue  # not ours, or another run's write in progress
        if any(n not in CHECKPOINT_FILES for n in os.listdir(path)):
            print(f"train.py: left {path} alone: it holds files train.py does not write")
        elif m[1] == "old" and not os.path.lexists(out) and not not_our_checkpoint(path):
            os.rename(path, out)
            print(f"train.py: restored {config.out} from {entry} (a run was stopped while replacing it)")
        else:
            shutil.rmtree(path)
            print(f"train.py: removed {path}, left by a run stopped while writing {config.out}")


@contextlib.contextmanager
def state_dir_lock(config: TrainConfig):
    """Keep --state-dir to this run alone: two runs sharing it would write each other's snapshots.
    flock(2) on state_dir/train.lock; the kernel drops it when the process ends, however it ends,
    so a killed run leaves no stale lock. The file holds the holder's PID for the message."""
    if fcntl is None:
        yield
        return
    path = os.path.join(config.state_dir, LOCK_FILE)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(f"--state-dir {config.state_dir} is in use by another training run (PID {holder}); "
                             "wait for it to end, or pass another --state-dir") from None
        except OSError as err:  # a file system without locks (some network mounts): say so, go on
            print(f"train.py: cannot lock {path} ({err.strerror or err}); nothing keeps a second run out of it")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # closing the file releases the lock


def write_error(err: Exception, what: str) -> OSError:
    """A failed write (a full disk, a lost mount) as one OSError naming what was being written and
    why. safetensors reports its I/O errors as SafetensorError('... (os error 28)'): the errno is
    read from the message."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)|code: (\d+)", str(err))
        code = int(found[1] or found[2]) if found else errno.EIO
    reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return OSError(code, f"cannot write {what}: {reason}; nothing written before it was changed")


def write_checkpoint(config: TrainConfig, model, log: list, precision: str) -> None:
    """The shipped artefact: model + tokenizer + task spec + training curve, written into a
    temporary sibling of --out and renamed into place, so a crash leaves the old one or the new.
    Any failure (a full disk, Ctrl-C) puts the old one back and removes the temporary copy; a kill
    between the two renames is repaired by recover_output when train.py next starts."""
    from safetensors import SafetensorError

    out = os.path.abspath(config.out)
    tmp, old = f"{out}.tmp-{os.getpid()}", f"{out}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        task.build_tokenizer(config.family).save_pretrained(tmp)
        task.save_task(tmp, config.task)
        record = {"config": asdict(config), "precision": precision, "log": log}
        earlier = os.path.join(config.init, "training_log.json") if config.init else ""
        if os.path.isfile(earlier):  # the history of the weights training started from, nested
            with open(earlier) as f:
                record["init_log"] = json.load(f)
        with open(os.path.join(tmp, "training_log.json"), "w") as f:
            json.dump(record, f, indent=1)
        check_output(config)  # what --out holds now: something may have appeared there during training
        if os.path.lexists(out):  # --overwrite (checked at the start): the old one steps aside last
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException as err:
        if os.path.lexists(old) and not os.path.lexists(out):
            os.rename(old, out)  # the old checkpoint back in place
        shutil.rmtree(tmp, ignore_errors=True)  # on a full disk, a temporary copy would keep it full
        if isinstance(err, (OSError, SafetensorError)):
            raise write_error(err, f"the checkpoint {config.out}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


class Diverged(ValueError):
    """Training produced a non-finite loss or weights; nothing non-finite was saved."""


def train(config: TrainConfig, state: dict | None = None) -> LLaDAModel:
    """Train (or resume) per config and write the checkpoint. `state` gets the step reached and the
    newest snapshot as training goes, for the caller's report on an interrupt."""
    state = {} if state is None else state
    torch.set_num_threads(config.threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch build or machine has no CUDA device; use --device cpu")
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    check_apart(config)
    recover_output(config)  # a run killed while replacing --out: the old checkpoint back first
    check_output(config)  # before any step, so a typo costs seconds, not the run
    check_writable(config.state_dir, "--state-dir")
    with state_dir_lock(config):
        return train_locked(config, state, device)


def train_locked(config: TrainConfig, state: dict, device) -> LLaDAModel:
    """train() once its checks passed and it holds --state-dir."""
    model = build_model(config, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    start, log, precision = load_state(config, model, opt)
    state.update(step=start, snapshot=latest_snapshot(config))
    if start:
        print(f"resuming {snapshot_dir(config, start)} at step {start}")
    families = task.families_for(config.task)
    held_out = held_out_prompts(config)
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    if precision is None:  # a new run decides once; a resumed one keeps its choice (same numerics)
        precision = choose_precision(config, model, make_batch(config, 0, held_out, eos_id), device, mask_id)
    else:
        print(f"precision: {precision} (kept from the snapshot)")
    elapsed0 = log[-1]["seconds"] if log else 0.0  # training time of earlier sessions
    t0, ema = time.time(), (log[-1]["loss"] if log else None)
    for step in range(start, config.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(config, step)
        ids, region = make_batch(config, step, held_out, eos_id)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 7)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = training_loss(config, model, ids, region, mask_id, gen)
        value = loss.item()
        if not math.isfinite(value):  # diverged: stop before it reaches the weights or a snapshot
            raise Diverged(f"the loss is {value} at step {step + 1} (lr {lr_at(config, step):.3g}); lower --lr. "
                           f"Newest snapshot: {state['snapshot'] or 'none'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] = step + 1
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        seconds = elapsed0 + time.time() - t0
        done = step + 1
        # A one-line progress report: step, loss, speed, time left.
        rate = (done - start) / max(1e-9, time.time() - t0)
        if done % 10 == 0 or done == config.steps:
            print(f"step {done}/{config.steps} loss {ema:.4f} lr {lr_at(config, step):.2e} {rate:.2f} it/s, "
                  f"{(config.steps - done) / max(rate, 1e-9) / 60:.0f} min left", flush=True)
        entry = {"step": done, "loss": round(ema, 5), "seconds": round(seconds, 1)}
        if done % config.eval_every == 0 or done == config.steps:
            model.eval()
            causal = config.objective == "ar"
            entry["accuracy"] = evaluate_families(model, families, config.eval_problems, causal=causal)
            print(f"step {done}: held-out {'greedy AR' if causal else 'vanilla'} accuracy {entry['accuracy']} ({seconds / 60:.1f} min)", flush=True)
            if config.eval_shots:
                entry["accuracy_shots"] = evaluate_families(model, families, config.eval_problems, config.eval_shots,
                                                            causal=causal)
                print(f"step {done}: {config.eval_shots}-shot {entry['accuracy_shots']}", flush=True)
        if done % 50 == 0 or "accuracy" in entry:
            log.append(entry)
        if done % config.save_every == 0 or done == config.steps:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise Diverged(f"the weights are not finite after step {done}; lower --lr. "
                               f"Newest snapshot: {state['snapshot'] or 'none'}")
            state["snapshot"] = save_state(config, model, opt, done, log, precision)
    model.eval()
    write_checkpoint(config, model, log, precision)
    print(f"wrote {config.out}")
    return model


def parse_bf16(text: str) -> str:
    """--bf16: auto/on/off (1/0, true/false, yes/no also read as on/off); anything else is an error."""
    value = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(text.lower(), text.lower())
    if value not in BF16_CHOICES:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return value


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    help_text = {
        "out": "checkpoint directory to write", "state_dir": "directory for resumable training state",
        "init": "checkpoint to start from ('' = random weights); --init-from is the same flag",
        "family": f"format of the model: {' or '.join(FAMILIES)} (with --init, that checkpoint's)",
        "objective": "diffusion (masked tokens, bidirectional) or ar (next token, causal; needs --family dream)",
        "prompt_loss": "ar: score the prompt's tokens too",
        "overwrite": "replace an existing checkpoint at --out",
        "steps": "optimizer steps (rerun with the step of a snapshot to export it)",
        "batch_tokens": "tokens per batch", "lr": "peak learning rate",
        "min_lr": "final learning rate", "warmup": "warmup steps", "weight_decay": "AdamW weight decay",
        "d_model": "model width", "n_layers": "transformer blocks", "n_heads": "attention heads",
        "mlp_hidden_size": "SwiGLU hidden width", "eps": "smallest masking ratio", "seed": "random seed",
        "eval_every": "evaluate every N steps", "eval_problems": "held-out problems per family per evaluation",
        "save_every": "snapshot every N steps (about 10 MB each, all kept)", "threads": "CPU threads for torch",
        "device": "auto, cpu or cuda", "bf16": "bf16 autocast: auto (time both), on or off",
        "mix": "families and shares, e.g. 'short:0.3,long:0.4,pair:0.3'",
        "windows": "generation windows and their shares of the batches, e.g. '32:0.5,256:0.5'",
        "shots": "most solved examples before a question (0 = none)",
        "zero_shot_share": "share of batches without shots", "eval_shots": "also evaluate k-shot prompts (0 = no)",
        "max_operand": "chains: largest operand (1..99)", "ops": "chains: operators from '+-*'",
        "style": "chains: 'compact' or 'word'", "width": "chains: zero-pad numbers to this many digits (0 = natural)",
    }
    for name, value in asdict(defaults).items():
        if isinstance(value, bool):
            ap.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=value,
                            help=help_text[name])
            continue
        kind = parse_bf16 if name == "bf16" else type(value)
        flags = ["--init", "--init-from"] if name == "init" else ["--" + name.replace("_", "-")]
        ap.add_argument(*flags, dest=name, type=kind, default=value,
                        help=f"{help_text[name]} (default: {value!r})")
    args = ap.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ValueError as err:
        ap.error(str(err))


def main(argv=None) -> None:
    config = parse_args(argv)
    progress = {}
    try:
        train(config, progress)
    except ValueError as err:  # a user's mistake (paths, snapshots, settings) or divergence: one line
        sys.exit(f"train.py: error: {err}")
    except OSError as err:  # a write failed (a full disk): one line; the snapshots written stay whole
        sys.exit(f"train.py: error: {err}; the same command resumes from "
                 f"{progress.get('snapshot') or 'the start (no snapshot yet)'}")
    except KeyboardInterrupt:  # Ctrl-C: one line; the same command resumes from the newest snapshot
        print(f"\ntrain.py: interrupted at step {progress.get('step', 0)}; the same command resumes from "
              f"{progress.get('snapshot') or 'the start (no snapshot yet)'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
