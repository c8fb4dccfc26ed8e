"""
Benchmark the decoding methods on the project's trained checkpoint: accuracy per task family and speed.
Either family (a LLaDA- or Dream-format checkpoint: config.json says which) runs the same way.

For each generation length and each method it decodes the same held-out problems of every task
family (task.py: `short` and `long` arithmetic chains, `pair`), as k-shot prompts with --shots k
(GSM8K's 5- and 8-shot regime, where the prompt is long and caching it pays), and reports the mean
prompt length, accuracy per family and over all problems with 95% Wilson intervals, the accuracy
difference from vanilla on the same problems with its 95% interval (Newcombe's score interval for
paired proportions), agreement with vanilla's exact response, mean NFE, tokens per forward, query
tokens per problem, wall seconds, tokens/s (generated-window tokens, EOS padding included, as
Fast-dLLM counts throughput) and the speedup over vanilla, a ratio of wall times measured in this
same run. Cached rows also report the largest logit difference between the cached forward and an
exact recompute (on one extra, untimed decode). A family whose answers do not fit a window
(`long` needs 64 tokens) is left out of that window's rows.

`--sweep` traces accuracy against NFE instead (Fast-dLLM, arXiv 2505.22618, Fig. 3 and Sec. 3.2):
confidence thresholds 0.1 ... 0.99, a fixed k tokens per step (1, 2, 4, 8) and the factor rule,
each per family, without a cache so that only the commit rule differs. It writes sweep.json,
sweep.md and sweep.svg, a plot drawn by hand as SVG so the bench needs no plotting library.

Methods are `METHODS`: name -> DecodeConfig overrides; `decode_all` decodes a list of problems
with one config. A new method is one more entry there.

Usage:
    python -m tools.bench --lengths 64 --problems 20     # every method, per-family accuracy
    python -m tools.bench --lengths 256 --shots 8 --problems 100 --batch-size 50 --methods vanilla dual+thr0.9
    python -m tools.bench --sweep --problems 30          # accuracy vs NFE curves -> sweep.svg
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import torch

import blockbatch
from cache import KVCache
from decode import CACHES, RULES, DecodeConfig, Noise, generate, left_pad, propose
from model import FAMILIES, load_model
from tools import bench_scale, task

HERE = os.path.dirname(os.path.abspath(__file__))  # tools/
ROOT = os.path.dirname(HERE)  # the repository
DEFAULT_MODEL = os.path.join(ROOT, "checkpoints", "fewshot")  # trained on k-shot prompts, as the papers measure

# name -> DecodeConfig overrides. "1 tok/step" rows use the top-k schedule with steps = gen_length.
# NEWLINE stands for the tokenizer's newline id (AdaBlock's delimiter); `blockbatch` selects
# blockbatch.generate with that generator instead of decode.generate.
NEWLINE = "newline"
FIELDS = {f.name: f for f in dataclasses.fields(DecodeConfig)}
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
    # stop at EOS: the same decoding, without the forwards spent on the EOS tail
    "dual+thr0.9+eos": dict(cache="dual", threshold=0.9, stop_at_eos=True),
    # dLLM-Cache at its paper's GSM8K setting (blocks of 8, K_p 50, K_r 7, rho 0.25), against
    # vanilla and DualCache at the same blocks; and with the threshold rule
    "vanilla-b8": dict(cache="none", block_length=8),
    "dual-b8": dict(cache="dual", block_length=8),
    "dllm-b8": dict(cache="dllm", block_length=8),
    "dllm+thr0.9": dict(cache="dllm", threshold=0.9),
    # AdaBlock (B0 = block_length, the newline as delimiter, tau_D 0.3) with DualCache + threshold,
    # next to fixed blocks of the same B0
    "dual+thr0.9-b16": dict(cache="dual", threshold=0.9, block_length=16),
    "ada-b16": dict(cache="dual", threshold=0.9, block_length=16, delimiter_ids=NEWLINE, delimiter_threshold=0.3),
    "ada-b32": dict(cache="dual", threshold=0.9, block_length=32, delimiter_ids=NEWLINE, delimiter_threshold=0.3),
    "dual+thr0.9-b64": dict(cache="dual", threshold=0.9, block_length=64),
    "ada-b64": dict(cache="dual", threshold=0.9, block_length=64, delimiter_ids=NEWLINE, delimiter_threshold=0.3),
    # BlockBatch (blockbatch.py): branches of block sizes 4..128 (those dividing G), threshold 0.9
    "bb-bulk": dict(blockbatch="bulk"),
    "bb-rms": dict(blockbatch="rms"),
}
# Every registered method has a row, so a fork's new one is measured without editing the list
# above: a commit rule no row uses runs with DualCache at its field's `bench` value, a cache
# policy no row uses with the threshold rule.
for _rule in RULES:
    if not any(_rule in kw for kw in METHODS.values()):
        _value = FIELDS[_rule].metadata["bench"]
        METHODS[f"dual+{_rule}{_value:g}"] = dict(cache="dual", **{_rule: _value})
for _cache in CACHES:
    if not any(kw.get("cache") == _cache for kw in METHODS.values()):
        METHODS[f"{_cache}+thr0.9"] = dict(cache=_cache, threshold=0.9)

# The sweep: series name -> values. A fixed k per step is the top-k schedule with steps = G / k;
# every registered commit rule is a series over the values its field lists (`sweep` metadata).
SWEEP = {"k per step": (1, 2, 4, 8), **{rule: FIELDS[rule].metadata["sweep"] for rule in RULES}}


def sweep_overrides(series: str, value, gen_length: int) -> dict:
    """DecodeConfig overrides for one point of a sweep series."""
    if series in RULES:
        return {series: value}
    return dict(steps=gen_length // value)  # k per step: G / k steps, k commits each


# ---------------------------------------------------------------------------------------------
# Decoding a list of problems with one config, and scoring it per family
# ---------------------------------------------------------------------------------------------


def method_config(model, name: str, gen_length: int, block_length: int, quirks: bool = False):
    """The settings of METHODS[name] at one generation length: a DecodeConfig, or a
    blockbatch.BlockBatchConfig for the BlockBatch rows. quirks: the original code's."""
    kw = dict(gen_length=gen_length, block_length=block_length, steps=gen_length, quirks=quirks)
    kw.update(METHODS[name])
    if "blockbatch" in kw:
        sizes = [b for b in (4, 8, 16, 32, 64, 128) if gen_length % b == 0]
        return blockbatch.BlockBatchConfig.for_model(model.config, gen_length=gen_length, block_sizes=sizes,
                                                     threshold=0.9, generator_variant=kw["blockbatch"], quirks=quirks)
    if kw.get("delimiter_ids") == NEWLINE:
        kw["delimiter_ids"] = task.encode("\n")
    return DecodeConfig.for_model(model.config, **kw)


def decode_all(model, problems, config, batch_size, extras=None):
    """Decode `problems` in batches; returns (generated id lists, total NFE, query tokens, seconds).

    NFE is counted per problem: a batch's forwards count once for each of its rows (a batch runs
    until its slowest row is done, so batch size 1 gives each problem's own NFE).
    """
    outputs, nfe, query, seconds = [], 0, 0, 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids, mask = left_pad([task.encode(p.prompt) for p in chunk], model.config.pad_token_id)
        mask = mask if len(chunk) > 1 else None  # a single row needs no padding mask
        start = time.perf_counter()
        if isinstance(config, blockbatch.BlockBatchConfig):  # one request per call: its branches are the batch
            outs = [blockbatch.generate(model, ids[r:r + 1, ids.shape[1] - len(task.encode(p.prompt)):].to(model.device), config)
                    for r, p in enumerate(chunk)]
        else:
            outs = [generate(model, ids.to(model.device), config,
                             attention_mask=None if mask is None else mask.to(model.device))]
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        for out in outs:
            if extras is not None:
                extras.append(out.extras)
            outputs += out.generated.tolist()
            nfe += out.nfe * (len(chunk) if len(outs) == 1 else 1)
            query += out.query_tokens * (len(chunk) if len(outs) == 1 else 1)
    return outputs, nfe, query, seconds


def correct(problems, outputs, families) -> list[bool]:
    """Whether each generated id list is right (cut at its first EOS, then scored by its family)."""
    return [families[p.family].score(p, task.decode(o)) for p, o in zip(problems, outputs)]


def score_by_family(problems, outputs, families) -> dict[str, float]:
    """{family: accuracy} of generated id lists."""
    right, total = {}, {}
    for p, ok in zip(problems, correct(problems, outputs, families)):
        total[p.family] = total.get(p.family, 0) + 1
        right[p.family] = right.get(p.family, 0) + ok
    return {name: right[name] / total[name] for name in total}


def problems_for(families, gen_length: int, n: int, shots: int = 0) -> list:
    """Each family's first n held-out problems (pair has 13) as k-shot prompts, for the families
    whose answers fit the window."""
    return [task.few_shot(p, shots, families=families)
            for fam in families.values() if fam.gen_length <= gen_length for p in fam.test_set(n)]


# ---------------------------------------------------------------------------------------------
# Intervals: how far an accuracy over n problems can be trusted
# ---------------------------------------------------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion right / n (Wilson, 1927): unlike p +- z*se it
    stays inside [0, 1] and keeps its coverage at 0% and 100%, where the benchmark often is."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[bool], b: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """The accuracy difference mean(a) - mean(b) of two methods on the same problems, with the
    95% interval of Newcombe's method for paired proportions ("Improved confidence intervals for
    the difference between binomial proportions based on paired data", 1998, method 10): the
    two Wilson intervals, combined with the correlation of the paired outcomes."""
    n = len(a)
    both = sum(x and y for x, y in zip(a, b))
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson(both + only_a, n, z), wilson(both + only_b, n, z)
    spread = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    phi = (both * neither - only_a * only_b) / math.sqrt(spread) if spread else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return d, max(-1.0, low), min(1.0, high)


# ---------------------------------------------------------------------------------------------
# The method table
# ---------------------------------------------------------------------------------------------


def problem_sets(args, families) -> dict[int, list]:
    """The problems of each generation length, checked to fit the model before any decoding."""
    sets = {}
    for G in args.lengths:
        n = args.problems if G <= 256 else args.problems_long
        problems = problems_for(families, G, n, args.shots)
        if not problems:
            raise ValueError(f"no family's answers fit a {G}-token window (need >= "
                             f"{min(f.gen_length for f in families.values())})")
        longest = max(len(p.prompt) for p in problems)  # one token per character
        if longest + G > args.max_sequence_length:
            raise ValueError(f"--lengths {G}: the longest prompt ({longest} tokens at --shots {args.shots}) + {G} "
                             f"exceeds the model's max_sequence_length {args.max_sequence_length}")
        sets[G] = problems
    return sets


def plan_rows(args, model, problem_sets) -> list[tuple[int, str, object]]:
    """Every (G, method, config) of the run, built before anything is decoded. A method whose
    settings do not fit a length (blocks of 64 in a 96-token window) is left out with one line
    saying why, so a run never dies halfway with its finished rows unwritten."""
    plan = []
    for G in problem_sets:
        for name in args.methods:
            try:
                plan.append((G, name, method_config(model, name, G, args.block_length, args.quirks)))
            except ValueError as err:
                print(f"bench.py: skipped {name} at --lengths {G}: {err}", file=sys.stderr)
    return plan


def bench(args, model, families, problem_sets, plan, rows: list, progress: dict) -> list[dict]:
    """One row per entry of `plan`, appended to `rows` as it finishes; `progress` names the row
    being decoded (what an interrupted run reports)."""
    for G, problems in problem_sets.items():
        if not any(length == G for length, _, _ in plan):
            continue  # every method was skipped at this length
        # Warm-up (allocator, kernels) so the first timed row is not penalised.
        progress["at"] = f"the warm-up at --lengths {G}"
        decode_all(model, problems[:1], DecodeConfig.for_model(model.config, gen_length=args.block_length,
                                                               block_length=args.block_length,
                                                               steps=args.block_length), 1)
        vanillas = {}  # block length -> (outputs, seconds, right) of the vanilla row at that block length
        for name, config in [(name, config) for length, name, config in plan if length == G]:
            progress["at"] = f"{name} at --lengths {G}"
            print(f"[G={G}] {name}: {len(problems)} problems ...", file=sys.stderr, flush=True)
            extras = []
            outputs, nfe, query, seconds = decode_all(model, problems, config, args.batch_size, extras)
            right = correct(problems, outputs, families)
            # Each method is compared with vanilla at its own block length when the run has that
            # row (dLLM-Cache's blocks of 8 with vanilla-b8), else with vanilla at --block-length.
            block = getattr(config, "block_length", args.block_length)
            if name.startswith("vanilla"):
                vanillas.setdefault(block, (outputs, seconds, right))
            reference, vanilla_seconds, vanilla_right = vanillas.get(block) or vanillas.get(
                args.block_length) or (None, None, None)
            drift = None  # measured on the row's first problem only (docs/benchmark.md says so)
            if isinstance(config, DecodeConfig) and config.cache != "none":
                drift_cfg = dataclasses.replace(config, measure_drift=True)
                probe = torch.tensor([task.encode(problems[0].prompt)], device=model.device)
                drift = generate(model, probe, drift_cfg).max_drift
            k = len(problems)
            row = {"gen_length": G, "method": name, "block": block, "problems": k, "batch_size": args.batch_size, "shots": args.shots,
                   "prompt_tokens": sum(len(p.prompt) for p in problems) / k,
                   "accuracy": sum(right) / k, "accuracy_ci": wilson(sum(right), k)}  # pooled over all problems
            for fam in families:
                mine = [ok for p, ok in zip(problems, right) if p.family == fam]
                row[f"acc_{fam}"] = sum(mine) / len(mine) if mine else None
                row[f"acc_{fam}_ci"] = wilson(sum(mine), len(mine)) if mine else None
            row.update({
                "vs_vanilla": None if vanilla_right is None or vanilla_right is right  # (a reference row: itself)
                else paired_difference(right, vanilla_right),
                "agreement": None if reference is None else sum(a == b for a, b in zip(outputs, reference)) / k,
                "nfe": nfe / k, "tokens_per_forward": G * k / nfe, "query_tokens": query / k,
                "seconds": seconds, "tokens_per_s": G * k / seconds,
                "speedup": None if vanilla_seconds is None else vanilla_seconds / seconds,
                "max_logit_drift": drift, "method_note": method_note(extras),
            })
            rows.append(row)
            print("  " + format_row(row, families), file=sys.stderr, flush=True)
    return rows


def method_note(extras: list[dict]) -> str | None:
    """What a method measured about itself, averaged over the problems: the share of a full
    forward's token-layer rows dLLM-Cache recomputed, AdaBlock's mean block length, the block
    sizes BlockBatch returned."""
    if extras and "recomputed_fraction" in extras[0]:
        return f"recomputed {100 * sum(e['recomputed_fraction'] for e in extras) / len(extras):.0f}%"
    if extras and "block_lengths" in extras[0]:
        lengths = [n for e in extras for row in e["block_lengths"] for n in row]
        return f"mean block {sum(lengths) / len(lengths):.1f}"
    if extras and "winner_block_size" in extras[0]:
        sizes = sorted({e["winner_block_size"] for e in extras})
        return "returned block " + "/".join(map(str, sizes))
    return None


def columns(families):
    """(row key, header) of the table, with one accuracy column per family."""
    return ([("gen_length", "G"), ("method", "method"), ("block", "block"), ("problems", "n"),
             ("prompt_tokens", "prompt tok"),
             ("accuracy", "accuracy [95% CI]")]
            + [(f"acc_{f}", f) for f in families]
            + [("vs_vanilla", "Δ vs vanilla [95% CI]"), ("agreement", "agree w/ vanilla"), ("nfe", "NFE"),
               ("tokens_per_forward", "tok/fwd"), ("query_tokens", "query tok"), ("seconds", "wall s"),
               ("tokens_per_s", "tok/s"), ("speedup", "speedup"), ("max_logit_drift", "max Δlogit"),
               ("method_note", "method's own")])


def cell(row, key) -> str:
    """A table cell: an accuracy with its interval where the row has one."""
    text = fmt(key, row[key])
    interval = row.get(f"{key}_ci")
    if interval is not None:
        text += f" [{100 * interval[0]:.0f}–{100 * interval[1]:.0f}]"
    return text


def fmt(key, value) -> str:
    if value is None:
        return "–"
    if key == "vs_vanilla":  # points, with the paired interval
        d, low, high = (100 * v for v in value)
        return f"{d:+.1f} [{low:+.1f}, {high:+.1f}]"
    if key in ("accuracy", "agreement") or key.startswith("acc_"):
        return f"{100 * value:.1f}%"
    if key == "speedup":
        return f"{value:.1f}×"
    if key == "max_logit_drift":
        return f"{value:.2g}"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def format_row(row, families) -> str:
    return " | ".join(f"{h} {cell(row, k)}" for k, h in columns(families))


SUMMARY = [("method", "method"), ("block", "block"), ("accuracy", "accuracy [95% CI]"), ("acc_short", "short"),
           ("acc_pair", "pair"), ("vs_vanilla", "Δ vs vanilla, points [95% CI]"), ("nfe", "NFE"),
           ("seconds", "wall s"), ("speedup", "speedup")]


def summary(files: list[str]) -> str:
    """The README's short table from bench.json files: one row per method, its run's command above.
    A file that is missing, not JSON or not a bench.json is a ValueError naming it."""
    if not files:
        raise ValueError("give one or more bench.json files: --summary RUN/bench.json ...")
    lines = ["| " + " | ".join(h for _, h in SUMMARY) + " |", "|" + "---|" * len(SUMMARY)]
    commands = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                run = json.load(f)
        except OSError as err:
            raise ValueError(f"{file}: cannot read it ({err.strerror or err})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:  # (JSONDecodeError is a ValueError)
            raise ValueError(f"{file}: not a JSON file ({err})") from None
        rows = run.get("rows") if isinstance(run, dict) else None
        if not (isinstance(run, dict) and isinstance(run.get("command"), str) and isinstance(rows, list)
                and all(isinstance(r, dict) and "method" in r for r in rows)):
            raise ValueError(f"{file}: not a bench.json (expected a 'command' string and 'rows', each with a "
                             f"'method'; a sweep.json has no summary)")
        commands.append(run["command"])
        for i, r in enumerate(rows):
            try:
                lines.append("| " + " | ".join(cell(r, k) if k in r else "–" for k, _ in SUMMARY) + " |")
            except (TypeError, ValueError, IndexError) as err:  # a value of the wrong kind, e.g. "accuracy": "high"
                raise ValueError(f"{file}: row {i} ({r['method']!r}) has a value of the wrong type ({err})") from None
    return "\n".join(commands) + "\n\n" + "\n".join(lines)


def markdown(rows, header_note: str, families) -> str:
    cols = columns(families)
    lines = [header_note, "", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The sweep: accuracy against NFE for each commit rule, per family
# ---------------------------------------------------------------------------------------------


def sweep_plan(args, model) -> list[tuple[str, float, DecodeConfig]]:
    """Every (series, value, config) of the sweep, built before anything is decoded; a point whose
    settings do not fit (8 tokens per step in blocks of 4) is left out with one line saying why."""
    G, plan = args.lengths[0], []
    settings = dict(gen_length=G, block_length=args.block_length, steps=G, cache=args.sweep_cache, quirks=args.quirks)
    for series, values in SWEEP.items():
        for value in values:
            try:
                plan.append((series, value, DecodeConfig.for_model(model.config, **{**settings,
                                                                                   **sweep_overrides(series, value, G)})))
            except ValueError as err:
                print(f"bench.py: skipped the sweep's {series} {value:g}: {err}", file=sys.stderr)
    return plan


def sweep(args, model, families, plan, rows: list, progress: dict) -> list[dict]:
    """One row per (series, value, family), appended to `rows`: accuracy and mean NFE per problem."""
    G = args.lengths[0]
    problems = problems_for(families, G, args.problems, args.shots)
    for series, value, config in plan:
        progress["at"] = f"the sweep's {series} {value:g}"
        print(f"[G={G}] {series} {value}: {len(problems)} problems ...", file=sys.stderr, flush=True)
        for name in dict.fromkeys(p.family for p in problems):
            group = [p for p in problems if p.family == name]
            outputs, nfe, _, seconds = decode_all(model, group, config, args.batch_size)
            rows.append({"series": series, "value": value, "family": name, "problems": len(group),
                         "accuracy": score_by_family(group, outputs, families)[name],
                         "nfe": nfe / len(group), "seconds": seconds,
                         "example": task.decode(outputs[0])})
            print(f"  {name}: {100 * rows[-1]['accuracy']:.1f}% at NFE {rows[-1]['nfe']:.1f}", file=sys.stderr)
    return rows


def sweep_markdown(rows, header_note: str) -> str:
    """Rows = settings, columns = families, cells 'accuracy (NFE)'."""
    fams = list(dict.fromkeys(r["family"] for r in rows))
    cell = {(r["series"], r["value"], r["family"]): r for r in rows}
    lines = [header_note, "", "| rule | value | " + " | ".join(f"{f} acc (NFE)" for f in fams) + " |",
             "|---|---|" + "---|" * len(fams)]
    for series, value in dict.fromkeys((r["series"], r["value"]) for r in rows):
        cells = [f"{100 * c['accuracy']:.0f}% ({c['nfe']:.1f})" if (c := cell.get((series, value, f))) else "–"
                 for f in fams]  # (a family a stopped run never reached: –)
        lines.append(f"| {series} | {value:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLORS = dict(zip(SWEEP, ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")))


def sweep_svg(rows, gen_length: int, title: str) -> str:
    """Accuracy (y) against NFE (x, log scale), one panel per family, one line per commit rule.
    Hand-written SVG: GitHub renders it inline, and the bench needs no plotting library."""
    fams = list(dict.fromkeys(r["family"] for r in rows))
    W, H, left, top, pw, ph, gap = 300, 230, 50, 40, 230, 150, 20  # panel size and margins (pixels)
    x_max = math.log2(gen_length)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(fams) * W + gap}" height="{H + 30}" '
           f'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="16" font-size="13">{title}</text>']
    for i, fam in enumerate(fams):
        ox, oy = left + i * W, top  # the panel's plot-area corner
        X = lambda nfe: ox + pw * math.log2(max(nfe, 1)) / x_max  # noqa: E731
        Y = lambda acc: oy + ph * (1 - acc)  # noqa: E731
        out.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        out.append(f'<text x="{ox + pw / 2}" y="{oy - 6}" text-anchor="middle" font-weight="bold">{fam}</text>')
        for acc in (0, 0.25, 0.5, 0.75, 1):  # y grid
            out.append(f'<line x1="{ox}" x2="{ox + pw}" y1="{Y(acc)}" y2="{Y(acc)}" stroke="#eee"/>')
            out.append(f'<text x="{ox - 4}" y="{Y(acc) + 4}" text-anchor="end">{100 * acc:.0f}%</text>')
        for e in range(int(x_max) + 1):  # x ticks at powers of two
            out.append(f'<text x="{X(2 ** e)}" y="{oy + ph + 14}" text-anchor="middle">{2 ** e}</text>')
        out.append(f'<text x="{ox + pw / 2}" y="{oy + ph + 30}" text-anchor="middle">NFE (forwards per problem)</text>')
        for series, color in COLORS.items():
            pts = sorted((r["nfe"], r["accuracy"], r["value"]) for r in rows if r["family"] == fam and r["series"] == series)
            if not pts:
                continue
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                       + " ".join(f"{X(n):.1f},{Y(a):.1f}" for n, a, _ in pts) + '"/>')
            out += [f'<circle cx="{X(n):.1f}" cy="{Y(a):.1f}" r="3" fill="{color}"><title>{series} {v:g}: '
                    f'{100 * a:.0f}% at NFE {n:.1f}</title></circle>' for n, a, v in pts]
    for j, (series, color) in enumerate(COLORS.items()):  # legend, top right
        x = len(fams) * W - 330 + 110 * j
        out.append(f'<circle cx="{x}" cy="12" r="4" fill="{color}"/><text x="{x + 8}" y="16">{series}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Profile of one DualCache step
# ---------------------------------------------------------------------------------------------


def profile_dual_step(model, gen_length: int, block_length: int, repeats: int = 50) -> str:
    """torch.profiler table of one DualCache decoding step (the block against the cached rest)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = task.encode(task.FAMILIES["short"].test_set(1)[0].prompt)
    P, L, shift = len(prompt), len(prompt) + gen_length, model.logit_shift
    x = torch.full((1, L), model.config.mask_token_id, dtype=torch.long, device=model.device)
    x[0, :P] = torch.tensor(prompt)
    cache = KVCache.for_model(model.config, batch=1, capacity=L, device=model.device, dtype=model.dtype)
    s, e = P, P + block_length  # the block; a shifted head (Dream) also runs the row before it
    config = DecodeConfig.for_model(model.config, gen_length=gen_length, block_length=block_length, steps=gen_length)

    def step():
        logits = model(x[:, s - shift:e], positions=torch.arange(s - shift, e, device=model.device), cache=cache,
                       logits_range=(shift, shift + e - s))  # (1, K, V)
        return propose(logits, x[:, s:e] == config.mask_id, config, Noise())  # temperature 0: no noise

    with torch.no_grad():
        model(x, positions=torch.arange(L, device=model.device), cache=cache)  # block-start refresh
        for _ in range(5):
            step()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ---------------------------------------------------------------------------------------------
# Result files: written whole or not at all
# ---------------------------------------------------------------------------------------------


def publish(staged: list[tuple[str, str]]) -> None:
    """Rename each complete, fsynced (temporary, final) path pair into place with os.replace,
    atomic on POSIX and Windows: a reader sees the old file or the new one, never a part. Then
    sync the folders, so the renames survive a power cut too."""
    for tmp, path in staged:
        os.replace(tmp, path)
    if os.name == "posix":  # (Windows has no folder handle to sync)
        for folder in dict.fromkeys(os.path.dirname(path) or "." for _, path in staged):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_files(folder: str, files: dict[str, str]) -> list[str]:
    """Write `files` (name -> text, UTF-8) into `folder`: all of them, each whole, or none.

    Each text goes to a temporary file beside its target and is flushed to the disk (fsync);
    only when every one is written are they renamed into place (`publish`). A full disk or a
    crash while writing leaves the earlier files whole and matching each other, never a truncated
    bench.json beside a newer bench.md (git writes its index the same way: a lock file, then a
    rename). Only a crash between two of the renames, which need no space, could leave a new file
    beside an old one. Returns the paths written.
    """
    staged = []
    try:
        for name, text in files.items():
            tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
            staged.append((tmp, os.path.join(folder, name)))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        publish(staged)
    finally:
        for tmp, _ in staged:  # what was not renamed (a failed write) leaves nothing behind
            if os.path.exists(tmp):
                os.remove(tmp)
    return [path for _, path in staged]


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The processor's model name where the OS says it (Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: torch's OutOfMemoryError (CUDA), Python's MemoryError,
    or the RuntimeError torch's CPU allocator raises ("can't allocate memory")."""
    return (isinstance(err, (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError))
            or isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def partial_name(name: str) -> str:
    """Where a stopped run's finished rows go, beside the complete results: bench.json -> bench.partial.json."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.partial{ext}"


def main(argv=None):
    """Run the benchmark. A stopped run ends with one line: Ctrl-C with exit status 130 (128 +
    SIGINT), out of memory with 1 and what to reduce. Either way the rows it finished are written
    beside the earlier results (bench.partial.json, bench.partial.md), never over them."""
    rows, progress = [], {}
    try:
        run(argv, rows, progress)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write(f"\nbench.py: interrupted at {progress.get('at', 'the start')}{kept(rows, progress)}\n")
        sys.exit(130)
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        batch = f" (now {progress['batch_size']})" if "batch_size" in progress else ""
        sys.exit(f"bench.py: error: out of memory at {progress.get('at', 'the start')}: use a smaller --batch-size"
                 f"{batch}, shorter --lengths or fewer --shots{kept(rows, progress)}")


def kept(rows: list, progress: dict) -> str:
    """Write a stopped run's finished rows as *.partial.* files; what to tell the user about them."""
    if not rows:
        return "; no row had finished, nothing was written"
    if "files" not in progress:  # stopped while writing the complete results: all or none of them
        return "; the result files are whole (the earlier ones or this run's)"
    rows = list(rows)
    finished = f"{len(rows)} finished row{'s' * (len(rows) != 1)}"
    try:
        files = progress["files"](rows)
        paths = write_files(progress["out"], {partial_name(n): t for n, t in files.items()})
    except OSError as err:
        return f"; the {finished} could not be written ({err.strerror or err})"
    return f"; {finished} written to {', '.join(paths)} (the earlier results are unchanged)"


def run(argv, rows: list, progress: dict):
    """The benchmark's command line; appends each finished result row to `rows`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summary"]:  # the short table of earlier runs: --summary RUN/bench.json ...
        try:
            return print(summary(argv[1:]))
        except ValueError as err:
            sys.exit(f"bench.py --summary: error: {err}")
    if "--scale" in argv:  # per-forward cost at model scale: bench_scale.py, with flags of its own
        return bench_scale.main([a for a in argv if a != "--scale"], prog="-m tools.bench --scale")
    ap = argparse.ArgumentParser(description="Benchmark decoding methods on a trained LLaDA- or Dream-format "
                                             "checkpoint.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (either family)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="generation lengths (default: 64 256 1024; the sweep uses the first, default 64)")
    ap.add_argument("--shots", type=int, default=0,
                    help=f"solved examples before each question (0..{task.MAX_SHOTS}; GSM8K's evaluations use 5 and 8)")
    ap.add_argument("--problems", type=int, default=30,
                    help=f"held-out problems per family per row at lengths <= 256 (1..{task.HELD_OUT}; pair has 13)")
    ap.add_argument("--problems-long", type=int, default=4, help="held-out problems per family per row at lengths > 256")
    ap.add_argument("--batch-size", type=int, default=1, help="problems decoded together (left-padded)")
    ap.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to run; speedups and differences are relative to the vanilla row of the same "
                         "block length (vanilla-b8 for the -b8 rows), else to vanilla")
    ap.add_argument("--quirks", action="store_true", help="reproduce the original code's quirks (decode.Quirks) "
                                                          "instead of the papers' rules")
    ap.add_argument("--sweep", action="store_true",
                    help="trace accuracy against NFE for thresholds, k per step and factors (writes sweep.svg)")
    ap.add_argument("--sweep-cache", default="none", choices=("none", "prefix", "dual"), help="cache used by the sweep")
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()), help="torch CPU threads")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    ap.add_argument("--out", default=os.path.join(HERE, "bench_results"), help="where the result files go")
    ap.add_argument("--profile", action="store_true", help="print a profile of one DualCache step and exit")
    args = ap.parse_args(argv)
    for flag in ("problems", "problems_long"):
        if not 1 <= getattr(args, flag) <= task.HELD_OUT:
            ap.error(f"--{flag.replace('_', '-')} must be between 1 and {task.HELD_OUT} (each family's held-out "
                     f"set), got {getattr(args, flag)}")
    for flag in ("batch_size", "block_length", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    cpus = os.cpu_count() or 1
    if args.threads > cpus:  # (as train.py: more threads than CPUs only contend, and 10^5 crash torch)
        ap.error(f"--threads must be in 1..{cpus} (this machine's CPUs), got {args.threads}")
    if not 0 <= args.shots <= task.MAX_SHOTS:
        ap.error(f"--shots must be in 0..{task.MAX_SHOTS}, got {args.shots}")
    args.lengths = args.lengths or ([64] if args.sweep else [64, 256, 1024])
    bad = [G for G in args.lengths if G < 1 or G % args.block_length]
    if bad:
        ap.error(f"--lengths {bad}: each must be a positive multiple of --block-length {args.block_length}")
    try:  # an unwritable --out is found now, not after an hour of decoding
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(args.out, f".write-test-{os.getpid()}"))
    except OSError as err:
        ap.error(f"--out {args.out} is not a writable directory ({err.strerror or err})")
    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        families = task.families_for(task.load_task(args.model))
    except (ValueError, OSError) as err:
        sys.exit(f"bench.py: error: could not load {args.model}: {err}")
    if args.profile:
        print(profile_dual_step(model, args.lengths[0], args.block_length))
        return
    args.max_sequence_length = model.config.max_sequence_length
    try:
        sets = problem_sets(args, families)
    except ValueError as err:
        ap.error(str(err))
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else \
        f"CPU ({cpu_name()}), {args.threads} thread{'s' * (args.threads > 1)}"
    given = any(a.split("=")[0] == "--model" for a in argv)
    model_flag = [] if given else ["--model", os.path.relpath(args.model, ROOT)]
    command = "python -m tools.bench " + " ".join(model_flag + list(argv))  # reruns as it ran
    family = FAMILIES[model.config.family].label
    note = (f"`{command}` — checkpoint {os.path.relpath(args.model, ROOT)} ({family}), {args.shots}-shot, "
            f"block length {args.block_length}, batch size {args.batch_size}, temperature 0, "
            f"{'the original code (quirks on)' if args.quirks else 'the papers' + chr(39) + ' rules (quirks off)'}, {device}")
    # Every row's settings, built before anything is decoded (vanilla rows first: the others'
    # speedups and differences are relative to them).
    if args.sweep:
        plan = sweep_plan(args, model)
    else:
        args.methods = sorted(dict.fromkeys(args.methods), key=lambda m: not m.startswith("vanilla"))
        plan = plan_rows(args, model, sets)
    if not plan:
        ap.error("no row of this run fits its settings (each one's reason is above)")
    started = time.perf_counter()

    def result_files(rows) -> dict[str, str]:
        """The result files of `rows` (name -> text)."""
        if args.sweep:
            table = sweep_markdown(rows, note + f", G = {args.lengths[0]}, cache {args.sweep_cache}")
            return {"sweep.json": json.dumps({"command": note, "rows": rows}, indent=1), "sweep.md": table,
                    "sweep.svg": sweep_svg(rows, args.lengths[0], f"Accuracy vs NFE, G = {args.lengths[0]}, block "
                                           f"{args.block_length}, {args.shots}-shot, cache {args.sweep_cache}")}
        took = note + f"; the run took {(time.perf_counter() - started) / 60:.1f} min"
        return {"bench.json": json.dumps({"command": took, "rows": rows}, indent=1),
                "bench.md": markdown(rows, took, families)}

    progress.update(out=args.out, files=result_files, batch_size=args.batch_size)
    if args.sweep:
        sweep(args, model, families, plan, rows, progress)
    else:
        bench(args, model, families, sets, plan, rows, progress)
    progress.pop("files")  # done: nothing partial to write from here on
    files = result_files(rows)
    print(files["sweep.md" if args.sweep else "bench.md"])
    try:  # all or none, each file whole: a full disk leaves the earlier results as they were
        write_files(args.out, files)
    except OSError as err:
        sys.exit(f"bench.py: error: could not write the results to {args.out} ({err.strerror or err}); "
                 f"the files there are unchanged")


if __name__ == "__main__":
    main()
