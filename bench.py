"""
Benchmark every decoding method on the project's trained checkpoint: accuracy and speed.

For each generation length and each method it decodes the same held-out problems (task.py) and
reports exact-match accuracy, agreement with vanilla's exact response (a method's damage shows
here even where accuracy is modest), mean NFE, tokens per forward, query tokens pushed through
the model per problem, wall seconds, tokens/s (generated-window tokens, EOS padding included, as
Fast-dLLM counts throughput) and the speedup over vanilla, a ratio of wall times measured in this
same run. The cached rows also report the largest logit difference between the cached forward
and an exact recompute (measured on one extra, untimed decode).

The table goes to stdout, and the same rows to bench_results/bench.json and bench.md.

Usage:
    python bench.py                         # ~15 min on 2 CPU cores (4 problems per row at G=1024)
    python bench.py --problems-long 8       # the README's table (~25 min)
    python bench.py --lengths 256 --problems 20 --methods vanilla dual+thr0.9
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import task
from cache import KVCache
from decode import DecodeConfig, generate, left_pad, propose
from model import load_model

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> DecodeConfig overrides. "1 tok/step" rows use the top-k schedule with steps = gen_length.
METHODS = {
    "vanilla": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "thr0.9": dict(cache="none", threshold=0.9),
    "prefix+thr0.9": dict(cache="prefix", threshold=0.9),
    "dual+thr0.9": dict(cache="dual", threshold=0.9),
    "dual+thr0.99": dict(cache="dual", threshold=0.99),
    "dual+thr0.999": dict(cache="dual", threshold=0.999),
    "factor1.0": dict(cache="none", factor=1.0),
    "prefix+factor1.0": dict(cache="prefix", factor=1.0),
    "dual+factor1.0": dict(cache="dual", factor=1.0),
}


def decode_all(model, problems, cfg, batch_size):
    """Decode `problems` in batches; returns (generated id lists, total NFE, query tokens, seconds)."""
    outputs, nfe, query, seconds = [], 0, 0, 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids, mask = left_pad([task.encode(p.prompt) for p in chunk], model.config.pad_token_id)
        mask = mask if len(chunk) > 1 else None  # a single row needs no padding mask
        start = time.perf_counter()
        out = generate(model, ids.to(model.device), cfg, attention_mask=None if mask is None else mask.to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        outputs += out.generated.tolist()
        nfe += out.nfe * len(chunk)
        query += out.query_tokens * len(chunk)
    return outputs, nfe, query, seconds


def bench(args):
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    spec = task.load_task(args.model)
    rows = []
    for G in args.lengths:
        n = args.problems if G <= 256 else args.problems_long
        problems = task.test_set(n, **spec)
        # Warm-up (allocator, kernels) so the first timed row is not penalised.
        decode_all(model, problems[:1], DecodeConfig.for_model(model.config, gen_length=args.block_length,
                                                               block_length=args.block_length,
                                                               steps=args.block_length), 1)
        reference, vanilla_seconds = None, None
        for name in args.methods:
            cfg = DecodeConfig.for_model(model.config, gen_length=G, block_length=args.block_length, steps=G,
                                         **METHODS[name])
            print(f"[G={G}] {name}: {n} problems ...", file=sys.stderr, flush=True)
            outputs, nfe, query, seconds = decode_all(model, problems, cfg, args.batch_size)
            correct = sum(task.parse_answer(task.decode(o)) == p.answer_value for o, p in zip(outputs, problems))
            if name == "vanilla":
                reference, vanilla_seconds = outputs, seconds
            drift = None
            if cfg.cache != "none":
                probe = problems[0]
                drift_cfg = DecodeConfig.for_model(model.config, gen_length=G, block_length=args.block_length,
                                                   steps=G, measure_drift=True, **METHODS[name])
                drift = generate(model, torch.tensor([task.encode(probe.prompt)], device=model.device), drift_cfg).max_drift
            row = {
                "gen_length": G, "method": name, "problems": n, "batch_size": args.batch_size,
                "accuracy": correct / n,
                "agreement": None if reference is None else sum(a == b for a, b in zip(outputs, reference)) / n,
                "nfe": nfe / n, "tokens_per_forward": G * n / nfe, "query_tokens": query / n,
                "seconds": seconds, "tokens_per_s": G * n / seconds,
                "speedup": None if vanilla_seconds is None else vanilla_seconds / seconds,
                "max_logit_drift": drift,
            }
            rows.append(row)
            print("  " + format_row(row), file=sys.stderr, flush=True)
    return rows


def profile_dual_step(model, gen_length: int, block_length: int, repeats: int = 50) -> str:
    """torch.profiler table of one DualCache decoding step (the block against the cached rest)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = task.encode(task.test_set(1)[0].prompt)
    P, L = len(prompt), len(prompt) + gen_length
    x = torch.full((1, L), model.config.mask_token_id, dtype=torch.long, device=model.device)
    x[0, :P] = torch.tensor(prompt)
    cache = KVCache.for_model(model.config, batch=1, capacity=L, device=model.device, dtype=model.dtype)
    s, e = P, P + block_length
    cfg = DecodeConfig.for_model(model.config, gen_length=gen_length, block_length=block_length, steps=gen_length)

    def step():
        logits = model(x[:, s:e], positions=torch.arange(s, e, device=model.device), cache=cache)
        return propose(logits, x[:, s:e] == cfg.mask_id, cfg, None, logits.shape, 0)

    with torch.no_grad():
        model(x, positions=torch.arange(L, device=model.device), cache=cache)  # block-start refresh
        for _ in range(5):
            step()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


COLUMNS = ("gen_length", "method", "problems", "accuracy", "agreement", "nfe", "tokens_per_forward",
           "query_tokens", "seconds", "tokens_per_s", "speedup", "max_logit_drift")
HEADERS = ("G", "method", "n", "accuracy", "agree w/ vanilla", "NFE", "tok/fwd", "query tok", "wall s",
           "tok/s", "speedup", "max Δlogit")


def fmt(key, value) -> str:
    if value is None:
        return "–"
    if key in ("accuracy", "agreement"):
        return f"{100 * value:.1f}%"
    if key == "speedup":
        return f"{value:.1f}×"
    if key == "max_logit_drift":
        return f"{value:.2g}"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def format_row(row) -> str:
    return " | ".join(f"{h} {fmt(k, row[k])}" for k, h in zip(COLUMNS, HEADERS))


def markdown(rows, header_note: str) -> str:
    lines = [header_note, "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark decoding methods on the trained checkpoint.")
    ap.add_argument("--model", default=os.path.join(HERE, "checkpoints", "arith"), help="checkpoint directory")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="generation lengths")
    ap.add_argument("--problems", type=int, default=50, help="held-out problems per row at lengths <= 256")
    ap.add_argument("--problems-long", type=int, default=4, help="held-out problems per row at lengths > 256")
    ap.add_argument("--batch-size", type=int, default=1, help="problems decoded together (left-padded)")
    ap.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to run (vanilla first: speedups and agreement are relative to it)")
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()), help="torch CPU threads")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    ap.add_argument("--out", default=os.path.join(HERE, "bench_results"), help="where bench.json/bench.md go")
    ap.add_argument("--profile", action="store_true", help="print a profile of one DualCache step and exit")
    args = ap.parse_args(argv)
    if args.profile:
        torch.set_num_threads(args.threads)
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        print(profile_dual_step(model, args.lengths[0], args.block_length))
        return
    if "vanilla" in args.methods:
        args.methods = ["vanilla"] + [m for m in args.methods if m != "vanilla"]
    rows = bench(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU, {args.threads} threads"
    note = (f"`python bench.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}`".replace("` ", "`").strip()
            + f" — {device}, block length {args.block_length}, batch size {args.batch_size}, temperature 0")
    table = markdown(rows, note)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"command": note, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
