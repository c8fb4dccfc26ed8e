"""
Train the project's small LLaDA-format checkpoint on the synthetic arithmetic task (task.py).

This is LLaDA's supervised fine-tuning objective (Nie et al., "Large Language Diffusion Models",
arXiv 2502.09992, Algorithm 2), used here from scratch: for each example draw a masking ratio
t ~ U(eps, 1), hide every answer token (the worked answer and its EOS padding) independently with
probability t, never hide the prompt, and minimise the cross-entropy on the hidden tokens
weighted by 1/t, normalised by the answer length. The model is model.py's own class and the
checkpoint is written in the layout `load_model` reads (config.json, model.safetensors,
tokenizer files), so it loads exactly as a real LLaDA checkpoint does.

Differences from the paper: no pre-training stage (the task is all there is); generation windows
of several lengths in one run (mostly short ones, sometimes up to 1024 tokens) so the model has
seen the long EOS tails that the benchmark decodes; batches sized in tokens, not sequences.

Resumable: every --save-every steps the weights, the optimizer moments and the step go to
--state-dir (safetensors + JSON, nothing pickled). Each step's batch and masks are drawn from
generators seeded by (seed, step), so a resumed run continues exactly where it stopped.

Usage:
    python train.py                          # reproduces checkpoints/arith (CPU, one thread)
    python train.py --steps 50 --out /tmp/x  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import task
from model import LLaDAModel, ModelConfig, init_weights, save_model

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that decides the trained weights. The CLI reads its defaults from here."""

    out: str = "checkpoints/arith"  # where the final checkpoint is written
    state_dir: str = "runs/arith"  # resumable training state (weights, optimizer, log)
    steps: int = 6000  # optimizer steps
    batch_tokens: int = 4096  # tokens per batch (the number of sequences follows from the window)
    lr: float = 2e-3  # peak learning rate (AdamW), after a linear warmup
    min_lr: float = 1e-4  # end of the cosine decay
    warmup: int = 200  # warmup steps
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    d_model: int = 128  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_hidden_size: int = 512  # SwiGLU width
    eps: float = 1e-3  # smallest masking ratio t
    seed: int = 0  # seeds the weights, the batches and the masks
    eval_every: int = 500  # held-out accuracy every this many steps
    eval_problems: int = 200  # held-out problems per evaluation
    save_every: int = 250  # training-state snapshot every this many steps
    threads: int = 1  # torch CPU threads (more than the free cores makes it slower, not faster)
    bf16: bool = True  # bf16 autocast for the forward (2x faster on CPUs with bf16 units; weights stay fp32)
    device: str = "auto"  # 'auto' (CUDA when available), 'cpu' or 'cuda'
    min_operands: int = 2  # task: shortest chain
    max_operands: int = 3  # task: longest chain
    max_operand: int = 9  # task: operands are 1..max_operand
    ops: str = "+-"  # task: operators
    style: str = "compact"  # task: 'compact' or 'word'
    width: int = 0  # task: zero-pad numbers to this many digits (0 = natural widths)

    def __post_init__(self):
        for name in ("steps", "batch_tokens", "d_model", "n_layers", "n_heads", "mlp_hidden_size",
                     "eval_every", "save_every", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.style not in ("compact", "word"):
            raise ValueError(f"style must be 'compact' or 'word', got {self.style!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    @property
    def task(self) -> dict:
        return dict(min_operands=self.min_operands, max_operands=self.max_operands,
                    max_operand=self.max_operand, ops=self.ops, style=self.style, width=self.width)


# Generation windows seen in training, with their probabilities. Most batches are short (the
# task's answers are < 30 tokens); the long ones teach the EOS tail at the benchmark's lengths.
WINDOWS = ((32, 0.6), (64, 0.15), (256, 0.15), (1024, 0.1))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Data: a batch is prompts + worked answers + EOS padding, all the same length
# ---------------------------------------------------------------------------------------------


def make_batch(cfg: TrainConfig, step: int, held_out: set[str], eos_id: int):
    """The batch of step `step`: ids (B, L) and the answer-region mask (B, L). Deterministic."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    window = rng.choices([w for w, _ in WINDOWS], [p for _, p in WINDOWS])[0]
    problems = []
    while len(problems) < max(1, cfg.batch_tokens // (window + 16)):
        p = task.sample_problem(rng, **cfg.task)
        if p.prompt not in held_out:  # the held-out test set never appears in training
            problems.append(p)
    prompts = [task.encode(p.prompt) for p in problems]
    answers = [task.encode(p.answer) for p in problems]
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


# ---------------------------------------------------------------------------------------------
# Evaluation: exact match of the final answer with the vanilla sampler
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, problems, gen_length=32, block_length=32, batch_size=200) -> float:
    """Held-out exact-match accuracy with the vanilla sampler (one token per step, temperature 0)."""
    from decode import DecodeConfig, generate, left_pad

    cfg = DecodeConfig.for_model(model.config, gen_length=gen_length, block_length=block_length,
                                 steps=gen_length)
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids, mask = left_pad([task.encode(p.prompt) for p in chunk], model.config.pad_token_id)
        out = generate(model, ids.to(model.device), cfg, attention_mask=mask.to(model.device))
        for p, row in zip(chunk, out.ids[:, ids.shape[1]:].tolist()):
            correct += task.parse_answer(task.decode(row)) == p.answer_value
    return correct / len(problems)


# ---------------------------------------------------------------------------------------------
# Resumable state: safetensors for tensors, JSON for the rest
# ---------------------------------------------------------------------------------------------


def save_state(cfg: TrainConfig, model, opt, step: int, log: list) -> None:
    from safetensors.torch import save_file

    os.makedirs(cfg.state_dir, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            tensors[f"opt.{names[p]}.{key}"] = s[key].detach().cpu().reshape(-1) if key == "step" else s[key].detach().cpu().contiguous()
    tmp = os.path.join(cfg.state_dir, "state.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(cfg.state_dir, "state.safetensors"))  # atomic: a crash keeps the old one
    with open(os.path.join(cfg.state_dir, "state.json.tmp"), "w") as f:
        json.dump({"step": step, "config": asdict(cfg), "log": log}, f, indent=1)
    os.replace(os.path.join(cfg.state_dir, "state.json.tmp"), os.path.join(cfg.state_dir, "state.json"))


def load_state(cfg: TrainConfig, model, opt) -> tuple[int, list]:
    """Restore a snapshot from --state-dir if there is one; returns (next step, log)."""
    from safetensors.torch import load_file

    meta_path = os.path.join(cfg.state_dir, "state.json")
    if not os.path.isfile(meta_path):
        return 0, []
    with open(meta_path) as f:
        meta = json.load(f)
    saved = {k: v for k, v in meta["config"].items() if k not in ("steps", "eval_every", "save_every", "threads", "device", "out", "state_dir", "eval_problems")}
    mine = {k: v for k, v in asdict(cfg).items() if k in saved}
    if saved != mine:
        diff = {k: (saved[k], mine[k]) for k in saved if saved[k] != mine[k]}
        raise ValueError(f"{cfg.state_dir} holds a run with other settings (saved, now): {diff}; "
                         "use another --state-dir or the same settings")
    tensors = load_file(os.path.join(cfg.state_dir, "state.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in model.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{name}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p.device)}
    return meta["step"], meta["log"]


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, device) -> LLaDAModel:
    ids = task.special_ids()
    mcfg = ModelConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                       mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=len(task.vocabulary()),
                       rope_theta=10000.0, max_sequence_length=2048, **ids)
    return init_weights(LLaDAModel(mcfg), cfg.seed).to(device)


def write_checkpoint(cfg: TrainConfig, model, log: list) -> None:
    """The shipped artefact: model + tokenizer + task settings + training curve."""
    save_model(model, cfg.out)
    task.build_tokenizer().save_pretrained(cfg.out)
    task.save_task(cfg.out, **cfg.task)
    with open(os.path.join(cfg.out, "training_log.json"), "w") as f:
        json.dump({"config": asdict(cfg), "log": log}, f, indent=1)


def train(cfg: TrainConfig) -> LLaDAModel:
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model = build_model(cfg, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, log = load_state(cfg, model, opt)
    if start:
        print(f"resuming {cfg.state_dir} at step {start}")
    held_out = task.test_set(cfg.eval_problems, **cfg.task)
    held_out_prompts = {p.prompt for p in held_out}
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    elapsed0 = log[-1]["seconds"] if log else 0.0  # training time of earlier sessions
    t0, ema = time.time(), None
    for step in range(start, cfg.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        ids, region = make_batch(cfg, step, held_out_prompts, eos_id)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, _ = diffusion_loss(model, ids, region, mask_id, cfg.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        seconds = elapsed0 + time.time() - t0
        done = step + 1
        # A one-line progress bar: step, loss, speed, time left.
        rate = (done - start) / max(1e-9, time.time() - t0)
        bar = "#" * int(30 * done / cfg.steps)
        sys.stdout.write(f"\r[{bar:<30}] {done}/{cfg.steps} loss {ema:.4f} lr {lr_at(cfg, step):.2e} "
                         f"{rate:.2f} it/s, {(cfg.steps - done) / max(rate, 1e-9) / 60:.0f} min left ")
        sys.stdout.flush()
        entry = {"step": done, "loss": round(ema, 5), "seconds": round(seconds, 1)}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            entry["accuracy"] = evaluate(model, held_out)
            print(f"\nstep {done}: held-out exact match {entry['accuracy']:.3f} ({seconds / 60:.1f} min)")
        if done % 50 == 0 or "accuracy" in entry:
            log.append(entry)
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_state(cfg, model, opt, done, log)
    model.eval()
    write_checkpoint(cfg, model, log)
    print(f"\nwrote {cfg.out}")
    return model


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    help_text = {
        "out": "checkpoint directory to write", "state_dir": "directory for resumable training state",
        "steps": "optimizer steps", "batch_tokens": "tokens per batch", "lr": "peak learning rate",
        "min_lr": "final learning rate", "warmup": "warmup steps", "weight_decay": "AdamW weight decay",
        "d_model": "model width", "n_layers": "transformer blocks", "n_heads": "attention heads",
        "mlp_hidden_size": "SwiGLU hidden width", "eps": "smallest masking ratio", "seed": "random seed",
        "eval_every": "evaluate every N steps", "eval_problems": "held-out problems per evaluation",
        "save_every": "snapshot every N steps", "threads": "CPU threads for torch",
        "device": "auto, cpu or cuda", "bf16": "bf16 autocast (1 or 0)", "min_operands": "task: shortest chain",
        "max_operands": "task: longest chain", "max_operand": "task: largest operand",
        "ops": "task: operators, e.g. '+-' or '+-*'", "style": "task: 'compact' or 'word'",
        "width": "task: zero-pad numbers to this many digits (0 = natural)",
    }
    for name, value in asdict(defaults).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                        help=f"{help_text[name]} (default: {value})")
    return TrainConfig(**vars(ap.parse_args(argv)))


if __name__ == "__main__":
    train(parse_args())
