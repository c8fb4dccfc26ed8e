"""
Generate with a LLaDA-format checkpoint and watch the canvas denoise, mask by mask.

With no flags it loads the project's own small checkpoint (checkpoints/arith, trained by
train.py on the arithmetic task in task.py), asks it a held-out problem, and decodes with the
fastest setting that keeps accuracy (DualCache + threshold 0.9, see the README's benchmark).
Point --model at a real LLaDA-8B directory to use the same code on the real model.

Usage:
    python run.py                                   # the shipped checkpoint, a sample problem
    python run.py --prompt "8-3+7"                  # the arithmetic checkpoint takes an expression
    python run.py --model ~/LLaDA-8B-Instruct --prompt "What is 2+2?" --gen-length 128 \
                  --block-length 32 --steps 128 --cache none      # vanilla LLaDA sampling
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields

import torch

from decode import CACHES, REMASKING, DecodeConfig, generate

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "checkpoints", "arith")
# run.py's own defaults, where they differ from DecodeConfig's (vanilla) ones: a 32-token window
# (the task's answers are at most 22 characters) and Fast-dLLM's DualCache + threshold 0.9, the
# fastest setting that keeps the shipped checkpoint's accuracy at this window (README, Benchmark).
RUN_DEFAULTS = dict(gen_length=32, block_length=32, steps=32, cache="dual", threshold=0.9)


def build_prompt(tokenizer, text: str, model_dir: str) -> str:
    """The prompt string: our task's format for the arithmetic checkpoint, the chat template for
    an instruction-tuned LLaDA, the text as it is otherwise."""
    if os.path.isfile(os.path.join(model_dir, "task.json")):
        if text.startswith("Q:"):
            return text if text.endswith("\n") else text + "\n"
        return f"Q: {text.strip().rstrip('=?')}=?\n"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text


def show(tokenizer, ids, mask_id, eos_id) -> str:
    """The generated canvas as one line: masks as '_', newlines as '⏎', EOS padding dropped."""
    pieces = []
    for t in ids:
        if t == mask_id:
            pieces.append("_")
        elif t != eos_id:
            pieces.append(tokenizer.decode([t]))
    return "".join(pieces).replace("\n", "⏎")


def main(argv=None):
    d = DecodeConfig()
    default = {f.name: RUN_DEFAULTS.get(f.name, getattr(d, f.name)) for f in fields(DecodeConfig)}
    ap = argparse.ArgumentParser(description="Generate with a LLaDA-format checkpoint.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--prompt", default=None, help="prompt text (for the arithmetic checkpoint: an expression like '8-3+7'); "
                                                     "default: a held-out problem")
    ap.add_argument("--gen-length", type=int, default=default["gen_length"], help="tokens to generate")
    ap.add_argument("--block-length", type=int, default=default["block_length"], help="semi-autoregressive block length")
    ap.add_argument("--steps", type=int, default=default["steps"], help="total steps of the top-k schedule")
    ap.add_argument("--temperature", type=float, default=default["temperature"], help="0 = greedy; > 0 = Gumbel sampling")
    ap.add_argument("--remasking", choices=REMASKING, default=default["remasking"], help="confidence used to pick commits")
    ap.add_argument("--cfg-scale", type=float, default=default["cfg_scale"], help="classifier-free guidance scale (0 = off)")
    ap.add_argument("--cache", choices=CACHES, default=default["cache"], help="KV cache: none, prefix or dual (Fast-dLLM)")
    ap.add_argument("--threshold", type=float, default=default["threshold"],
                    help="commit every proposal with confidence >= this (Fast-dLLM); a negative value turns it off")
    ap.add_argument("--factor", type=float, default=default["factor"], help="Fast-dLLM factor rule (replaces --threshold)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for temperature > 0 or random remasking")
    ap.add_argument("--no-live", action="store_true", help="don't show the denoising live")
    args = ap.parse_args(argv)

    if not os.path.isdir(args.model):
        sys.exit(f"no checkpoint at {args.model}: train one with `python train.py`, or pass --model DIR "
                 f"(an HF-style LLaDA directory: config.json, *.safetensors, tokenizer files)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import task
    from model import load_model

    hf_logging.set_verbosity_error()  # AutoTokenizer warns that it doesn't know model_type 'llada'
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        sys.exit(f"{args.model} has no tokenizer files (tokenizer.json, tokenizer_config.json); "
                 "run.py needs them to turn the prompt into ids")
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (ValueError, OSError) as err:
        sys.exit(f"could not load {args.model}: {err}")
    threshold = args.threshold if args.threshold is not None and args.threshold >= 0 and args.factor is None else None
    # LLaDA's config.json has no end-of-turn id; its tokenizer knows '<|eot_id|>'.
    eot_id = model.config.eot_token_id
    if eot_id is None and "<|eot_id|>" in tokenizer.get_vocab():
        eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    try:
        cfg = DecodeConfig.for_model(model.config, eot_id=eot_id, gen_length=args.gen_length, block_length=args.block_length,
                                     steps=args.steps, temperature=args.temperature, remasking=args.remasking,
                                     cfg_scale=args.cfg_scale, cache=args.cache, threshold=threshold, factor=args.factor)
    except ValueError as err:
        sys.exit(f"bad settings: {err}")

    text = args.prompt if args.prompt is not None else task.test_set(1, **task.load_task(args.model))[0].prompt
    prompt = build_prompt(tokenizer, text, args.model)
    try:
        prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    except Exception as err:  # the character tokenizer rejects characters it has no id for
        sys.exit(f"could not tokenize the prompt {prompt!r}: {err}")
    print(prompt.rstrip("\n"))

    live = not args.no_live and sys.stdout.isatty()
    shown = [0.0]  # seconds spent drawing, excluded from the figures

    def on_step(x, nfe):
        t = time.perf_counter()
        line = show(tokenizer, x[0, prompt_ids.shape[1]:].tolist(), cfg.mask_id, cfg.eos_id)
        sys.stdout.write(f"\r\033[K[step {nfe:3d}] {line[:150]}")
        sys.stdout.flush()
        time.sleep(0.05)  # slow enough to watch
        shown[0] += time.perf_counter() - t

    if live:  # the canvas before the first step: all masks
        sys.stdout.write(f"[step   0] {'_' * min(cfg.gen_length, 150)}")
        sys.stdout.flush()
        time.sleep(0.3)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = generate(model, prompt_ids.to(model.device), cfg, generator=generator, on_step=on_step if live else None)
    except ValueError as err:
        sys.exit(f"\nbad input: {err}")
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start - shown[0]
    if live:
        sys.stdout.write("\r\033[K")
    answer = tokenizer.decode(out.generated[0].tolist(), skip_special_tokens=True)
    print(answer)
    method = f"cache={cfg.cache}" + (f", threshold={cfg.threshold}" if cfg.threshold is not None else "") + \
        (f", factor={cfg.factor}" if cfg.factor is not None else "")
    print(f"NFE {out.nfe} | {cfg.gen_length / seconds:.1f} tokens/s | {seconds:.2f} s | "
          f"{cfg.gen_length / out.nfe:.1f} tokens per forward | {method} | {model.device.type}")


if __name__ == "__main__":
    main()
