"""
Evaluate this project's model with lm-evaluation-harness, on one process or many.

lm-evaluation-harness (EleutherAI, `lm-eval`) owns the benchmarks: prompts, few-shot examples,
scoring. This file is the model side: it registers the project's model as `dllm` (a LLaDA- or
Dream-format checkpoint, whichever config.json names; nothing here asks which), decodes with
`decode.generate` (every DecodeConfig field is a `--model_args` key) and estimates log-likelihoods
as LLaDA's evaluation does (Nie et al., "Large Language Diffusion Models", arXiv 2502.09992): a
Monte-Carlo estimate of the masked-diffusion bound on log p(continuation | context). Run as a
module it is the `lm_eval` command, adding `--model dllm --include_path tools/eval_tasks` unless
given; under `accelerate launch -m` or `torchrun -m` each process takes a share of the documents.

Compared with LLaDA's and Fast-dLLM's `eval_llada.py`: prompts are left-padded with an attention
mask; a task's `max_gen_toks` sets the generation length unless `gen_length` is given; the chat
template is applied only under `--apply_chat_template`; Monte-Carlo masks and sampled responses
are seeded per request, so a score does not depend on how requests are split across ranks or
batches. The toy tasks (tools/eval_tasks/,
rebuilt by `--write-toy-tasks`) are task.py's held-out problems; `--num_fewshot K` gives each the
K-shot prompt of task.few_shot (seed 0). Needs `pip install -r tools/requirements-eval.txt`.

    python -m tools.eval_harness --tasks toy_short --limit 50 --num_fewshot 2 \\
        --model_args block_length=32,cache=dual,threshold=0.9
    accelerate launch -m tools.eval_harness --tasks gsm8k --num_fewshot 5 --model_args pretrained=DIR,...

Shape legend: B batch (requests, or Monte-Carlo samples of one request), P prompt (context),
G continuation (the generated part), L = P + G, V vocabulary.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import typing
import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tools import bench, task
from decode import DecodeConfig, generate, left_pad

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models lazily, so --model hf still works)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.config.evaluate_config import EvaluatorConfig
except ImportError as err:  # the optional install is missing: say how to get it
    raise ImportError("tools/eval_harness.py needs lm-eval and accelerate: "
                      "pip install -r tools/requirements-eval.txt") from err

HERE = os.path.dirname(os.path.abspath(__file__))  # tools/
ROOT = os.path.dirname(HERE)  # the repository
DEFAULT_CHECKPOINT = os.path.join(ROOT, "checkpoints", "arith")
TASK_DIR = os.path.join(HERE, "eval_tasks")
# lm-eval's command line passes this --device when the user gives none: a default, not a request.
LM_EVAL_DEFAULT_DEVICE = next(f.default for f in dataclasses.fields(EvaluatorConfig) if f.name == "device")

log = logging.getLogger("lm_eval.dllm")  # under lm-eval's logger: its CLI sets the level and format

# ---------------------------------------------------------------------------------------------
# Settings: the adapter's own, and every DecodeConfig field, all by name in --model_args
# ---------------------------------------------------------------------------------------------


@dataclass
class HarnessConfig:
    """The adapter's settings; every DecodeConfig field is a model_args key as well."""

    pretrained: str = DEFAULT_CHECKPOINT  # checkpoint directory (config.json, *.safetensors, tokenizer)
    dtype: str | None = None  # 'bfloat16', 'float32', ... (default: the checkpoint's own)
    device: str | None = None  # default: CUDA when available; under a launcher, the process's device
    batch_size: int = 1  # generation: requests decoded together; loglikelihood: Monte-Carlo samples per forward
    mc_num: int = 128  # Monte-Carlo samples per log-likelihood (LLaDA's evaluation uses 128)
    seed: int = 1234  # seeds the Monte-Carlo masks and temperature > 0 sampling, per request
    check_greedy: bool = True  # loglikelihood's is_greedy: decode the continuation greedily (one
    #   token per step) and compare; costs G forwards per request. False answers False, faster.
    max_batch_size: int | None = None  # accepted for lm-eval's --max_batch_size; unused

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be >= 1, got {self.mc_num}")


def _settings() -> dict[str, tuple[type, typing.Any]]:
    """name -> (owning dataclass, resolved type hint) for every valid model_args key."""
    out = {}
    for cls in (HarnessConfig, DecodeConfig):
        hints = typing.get_type_hints(cls)  # the annotations are strings; resolve them
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise RuntimeError(f"setting {f.name!r} is in both HarnessConfig and DecodeConfig")
            out[f.name] = (cls, hints[f.name])
    return out


def _coerce(name: str, value, hint):
    """`value` (a string, or what lm-eval already parsed it into) as the field's type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in args if a is not type(None)) if is_union else hint  # 'int | None' -> int
    if value is None or (optional and isinstance(value, str) and value.strip().lower() == "none"):
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed (expected {base.__name__})")
    text = str(value).strip()
    if base is bool:
        if isinstance(value, bool):
            return value
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}={value!r}: expected a bool (true/false, yes/no, 1/0)")
    elif base is int and not isinstance(value, bool):
        try:
            number = float(text)
            if number.is_integer():
                return int(number)
        except ValueError:
            pass
    elif base is float and not isinstance(value, bool):
        try:
            return float(text)
        except ValueError:
            pass
    elif base is str:
        return text
    elif typing.get_origin(base) in (tuple, list):  # e.g. delimiter_ids=[21,74] ('tuple[int, ...]')
        items = value
        if isinstance(value, str):
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
        items = [items] if isinstance(items, (int, float)) and not isinstance(items, bool) else items
        if isinstance(items, (list, tuple)):
            element = typing.get_args(base)[0]
            parsed = [_coerce(f"{name}[{i}]", v, element) for i, v in enumerate(items)]
            return tuple(parsed) if typing.get_origin(base) is tuple else parsed
    else:
        return value
    raise ValueError(f"{name}={value!r}: expected {getattr(base, '__name__', base)}")


def parse_arg_string(text: str) -> dict[str, str]:
    """'key=value,key=value' -> {key: value}, the values as written. Commas inside brackets or
    quotes stay in their value (delimiter_ids=[21,74]), and a key given twice is an error: lm-eval's
    simple_parse_args_string splits on every comma and lets the last of two keys win."""
    items, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text + ","):  # the appended comma ends the last item
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    out = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"model_args: expected key=value, got {item!r}")
        if key in out:
            raise ValueError(f"model_args {key} given twice: {out[key]}, then {value.strip()}")
        out[key] = value.strip()
    return out


def parse_model_args(model_args: dict) -> tuple[HarnessConfig, dict]:
    """Split and type-check model_args: (HarnessConfig, DecodeConfig keyword arguments).

    Keys are read from the two dataclasses' fields, so a field added to DecodeConfig later is a
    valid key with no change here. An explicit None (or 'none') is kept: eos_id=none means no EOS
    id, not the model's. When `gen_length` is given without `block_length` or `steps`, those
    follow it (one block, one token per step), as DecodeConfig's defaults do.
    """
    valid = _settings()
    unknown = sorted(set(model_args) - set(valid))
    if unknown:
        raise ValueError(f"unknown model_args {unknown}; valid keys: {', '.join(sorted(valid))}")
    if str(model_args.get("batch_size", "1")).startswith("auto"):
        raise ValueError("batch_size 'auto' is not supported by dllm; give a number")
    try:
        typed = {k: _coerce(k, v, valid[k][1]) for k, v in model_args.items()}
    except ValueError as err:
        raise ValueError(f"model_args {err}") from None
    harness = HarnessConfig(**{k: v for k, v in typed.items() if valid[k][0] is HarnessConfig})
    decode_kwargs = {k: v for k, v in typed.items() if valid[k][0] is DecodeConfig}
    if "gen_length" in decode_kwargs:
        decode_kwargs.setdefault("block_length", decode_kwargs["gen_length"])
        decode_kwargs.setdefault("steps", decode_kwargs["gen_length"])
    return harness, decode_kwargs


def fit_to_max_gen_toks(config: DecodeConfig, max_gen_toks, max_length: int) -> DecodeConfig:
    """The config with gen_length = max_gen_toks rounded up to whole blocks.

    The block length stays; `steps` keeps its steps per block, so steps per token is unchanged
    (e.g. 256/32/256 and max_gen_toks=100 -> gen_length 128, 4 blocks, 128 steps). The window
    must leave at least one of the model's `max_length` positions to the prompt.
    """
    limit = (max_length - 1) // config.block_length * config.block_length
    try:
        tokens = _coerce("max_gen_toks", max_gen_toks, int)
    except ValueError:
        tokens = None
    if tokens is None or not 1 <= tokens <= limit:
        raise ValueError(f"max_gen_toks={max_gen_toks!r}: expected an integer in 1..{limit} (whole blocks of "
                         f"{config.block_length} that leave the prompt room in the model's {max_length} positions)")
    blocks = math.ceil(tokens / config.block_length)
    return dataclasses.replace(config, gen_length=blocks * config.block_length,
                               steps=blocks * config.steps_per_block)


def cut_at_stop(text: str, until: list[str]) -> str:
    """The response up to the first occurrence of any stop string (earliest position wins)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def request_seed(seed: int, *parts) -> int:
    """A per-request seed from the run's seed and the request's content (stable across ranks and runs)."""
    return (seed * 1_000_003 + zlib.crc32(json.dumps(parts).encode())) % (2 ** 63)


# ---------------------------------------------------------------------------------------------
# The likelihood: LLaDA's Monte-Carlo estimate of the masked-diffusion bound
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def mc_loglikelihood(model, context: list[int], continuation: list[int], mask_id: int, mc_num: int,
                     batch_size: int, generator: torch.Generator, cfg_scale: float = 0.0) -> float:
    """Estimate log p(continuation | context) from below, as LLaDA's evaluation does.

    The masked-diffusion bound: draw a masking level t, hide each continuation token with
    probability t, and score the hidden ones; -E_t[(1/t) * sum CE(masked)] <= log p. LLaDA
    evaluates the lower-variance equivalent with a masked *count*: draw k uniformly from 1..G,
    mask exactly k of the G continuation positions at random, and weight the summed cross-entropy
    by G / k. The context is never masked. The estimate averages `mc_num` such samples, run
    `batch_size` at a time; `generator` (CPU) makes it reproducible. Either family: a Dream
    model's logits for the continuation come from the rows before it (model.logits).
    """
    device = model.device
    P, G = len(context), len(continuation)
    seq = torch.tensor(context + continuation, dtype=torch.long)  # (L,)
    target = seq[P:].to(device)  # (G,)
    total = 0.0
    for start in range(0, mc_num, batch_size):
        B = min(batch_size, mc_num - start)
        # 1) How many continuation tokens each sample hides: k ~ U{1..G}.
        k = torch.randint(1, G + 1, (B,), generator=generator)  # (B,)
        # 2) Which ones: the k positions with the smallest uniform keys (a random k-subset).
        keys = torch.rand(B, G, generator=generator)  # (B, G)
        hidden = keys.argsort(dim=1).argsort(dim=1) < k[:, None]  # (B, G) rank < k
        x = seq.repeat(B, 1)  # (B, L)
        x[:, P:] = x[:, P:].masked_fill(hidden, mask_id)
        x, hidden, k = x.to(device), hidden.to(device), k.to(device)
        # 3) One bidirectional forward; the LM head runs on the continuation only.
        if cfg_scale > 0:
            # Classifier-free guidance, as LLaDA's evaluation applies it: an unconditional copy
            # (context masked) rides in the same forward.
            uncond = x.clone()
            uncond[:, :P] = mask_id
            cond_logits, uncond_logits = model(torch.cat([x, uncond]), logits_range=(P, P + G)).chunk(2)
            logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)  # (B, G, V)
        else:
            logits = model(x, logits_range=(P, P + G))  # (B, G, V)
        # 4) Cross-entropy of the hidden tokens, summed per sample and weighted by G / k.
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.repeat(B), reduction="none").view(B, G)  # (B, G)
        total += float(((ce * hidden).sum(dim=1) * G / k).sum())
    return -total / mc_num


# ---------------------------------------------------------------------------------------------
# The lm-eval model
# ---------------------------------------------------------------------------------------------

@register_model("dllm")
class DiffusionLM(LM):
    """This project's masked-diffusion model behind lm-eval's three request types."""

    def __init__(self, **model_args):
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from model import load_model

        self.config, decode_kwargs = parse_model_args(model_args)
        config = self.config
        # 1) Data parallelism. Accelerator() reads what `accelerate launch` / `torchrun` set and
        #    joins the process group (NCCL on GPUs; gloo on CPUs, which accelerate only picks
        #    when told the run is on CPU). One process: rank 0 of 1, nothing to join.
        if config.device and config.device.split(":")[0] == "cuda" and not torch.cuda.is_available():
            # Checked here, not only by load_model: under a launcher the process's device replaces it.
            raise ValueError(f"device={config.device!r} asked for, but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use device=cpu, or leave it out (CUDA when available)")
        on_cpu = config.device == "cpu" or not torch.cuda.is_available()
        accelerator = Accelerator(cpu=on_cpu)
        self.accelerator = accelerator if accelerator.num_processes > 1 else None
        if self.accelerator is not None:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            device = accelerator.device  # one device per process
            if config.device not in (None, "cpu", str(device)):
                log.info("device=%s ignored: under a launcher each process uses %s", config.device, device)
        else:
            device = config.device
        # 2) The model and its tokenizer.
        if not os.path.isdir(config.pretrained):
            raise ValueError(f"pretrained={config.pretrained!r} is not a checkpoint directory")
        self.model = load_model(config.pretrained, device=device, dtype=config.dtype)
        self._device = self.model.device
        hf_logging.set_verbosity_error()  # AutoTokenizer warns that it doesn't know model_type 'llada'
        with warnings.catch_warnings():  # nor that a Dream config's `rope_scaling` key is deprecated
            warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
            self.tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
        # 3) Decoding settings. LLaDA's config.json has no end-of-turn id; its tokenizer knows '<|eot_id|>'.
        #    (Dream has none in either.)
        model_config = self.model.config
        eot_id = model_config.eot_token_id
        if eot_id is None and "<|eot_id|>" in self.tokenizer.get_vocab():
            eot_id = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        decode_kwargs.setdefault("eot_id", eot_id)
        self.explicit_gen_length = "gen_length" in decode_kwargs
        try:
            self.decode_config = DecodeConfig.for_model(model_config, **decode_kwargs)
        except ValueError as err:
            raise ValueError(f"bad decoding model_args: {err}") from None
        if self.decode_config.gen_length >= model_config.max_sequence_length:
            raise ValueError(f"gen_length {self.decode_config.gen_length} leaves no room for a prompt: it must be "
                             f"below the model's max_sequence_length {model_config.max_sequence_length}")
        # A response ends at the first EOS or EOT token: what follows is padding.
        self.stop_ids = {i for i in (self.decode_config.eos_id, self.decode_config.eot_id) if i is not None}
        self.pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
        self._ignored_warned = False

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "DiffusionLM":
        """lm-eval passes its own --batch_size, --max_batch_size and --device next to model_args, None
        where unset; a key given in model_args wins instead of colliding with them. The command
        line's default device (cuda:0 when --device is not given) counts as unset, so a machine
        without CUDA runs on its CPU; a device the user asks for must exist."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict
                 and not (k == "device" and v == LM_EVAL_DEFAULT_DEVICE)}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "DiffusionLM":
        return cls.create_from_arg_obj(parse_arg_string(arg_string), additional_config)

    # -- What lm-eval's evaluator needs for data parallelism -----------------------------------

    @property
    def device(self):
        return self._device

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results['config'], so a score says how it was decoded."""
        return {"pretrained": self.config.pretrained, "device": str(self.device), "dtype": str(self.model.dtype),
                "decode_config": dataclasses.asdict(self.decode_config),
                "gen_length_from": "model_args" if self.explicit_gen_length else
                "the task's max_gen_toks, rounded up to whole blocks (steps per block kept)",
                "dllm_batch_size": self.config.batch_size, "mc_num": self.config.mc_num, "seed": self.config.seed}

    # -- Chat template --------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return os.path.abspath(self.config.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as one prompt string, with the checkpoint's own template (lm-eval calls this
        under --apply_chat_template). A checkpoint without one (the toy ones) is an error rather
        than a silent pass-through, so a score never mixes up the two prompt formats."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"--apply_chat_template: the tokenizer in {self.config.pretrained} has no chat "
                             "template; run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- Tokenization ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. The tokenizer's special tokens (LLaDA's BOS) are added unless the
        text already starts with BOS, as a chat-templated prompt does."""
        bos = self.tokenizer.bos_token
        try:
            return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids
        except Exception:  # `tokenizers` raises a bare Exception for a character it has no token for
            unknown = "".join(c for c in dict.fromkeys(text) if not self.can_encode(c))
            if not unknown:
                raise
            codes = ", ".join(f"U+{ord(c):04X}" for c in unknown)
            raise ValueError(f"the tokenizer in {self.config.pretrained} cannot encode {unknown!r} ({codes}) in "
                             f"the prompt {text[-60:]!r}: its vocabulary has no token for it and no <unk>") from None

    def can_encode(self, char: str) -> bool:
        """Whether the tokenizer has a token for `char` (the toy one has none for an emoji, and no <unk>)."""
        try:
            self.tokenizer(char, add_special_tokens=False)
            return True
        except Exception:
            return False

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) that together are the tokens of context + continuation.

        When the context's own tokens are a prefix of the whole text's, the split is there (always
        so for the character tokenizer). Otherwise a token merges across the boundary (BPE's
        " 42"), and the context's trailing whitespace moves to the continuation, lm-eval's
        convention. Not always: a model is never trained with its prompt masked, and scoring the
        toy prompt's final newline as part of the continuation cost a right answer ~17 nats.
        """
        whole, ctx = self.encode(context + continuation), self.encode(context)
        if whole[:len(ctx)] != ctx:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def response_text(self, ids: list[int]) -> str:
        """Generated ids -> text: up to the first EOS/EOT, special tokens (masks) dropped."""
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True)

    # -- generate_until -------------------------------------------------------------------------

    def config_for(self, gen_kwargs: dict) -> DecodeConfig:
        """The decoding settings of one request: the model_args', with gen_length set by the
        task's max_gen_toks (rounded up to whole blocks) unless gen_length was given."""
        ignored = sorted(k for k in gen_kwargs if k not in ("until", "max_gen_toks", "do_sample", "temperature"))
        sampled = gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0
        if (ignored or sampled) and not self._ignored_warned:
            log.warning("dllm decodes with its model_args; the task's generation settings %s are not used",
                        {k: gen_kwargs[k] for k in ignored + (["temperature"] if sampled else [])})
            self._ignored_warned = True
        max_gen_toks = gen_kwargs.get("max_gen_toks")
        if max_gen_toks is None or self.explicit_gen_length:
            return self.decode_config
        return fit_to_max_gen_toks(self.decode_config, max_gen_toks, self.model.config.max_sequence_length)

    def generate_until(self, requests) -> list[str]:
        """Decode every request with decode.generate; cut each response at its first stop string.

        Consecutive requests with the same settings are batched (left padding plus an attention
        mask); a prompt longer than the model allows keeps its last tokens. Where decoding draws
        random numbers (temperature > 0, or random remasking), each request is decoded alone with
        a generator seeded by `seed` and the request (its prompt, and which repeat of it this is):
        decode.generate draws one (B, L, V) noise tensor per step for the whole batch, so a row's
        draws would depend on its neighbours and on the padding. A sampled response is thus the
        same at any batch_size or rank; the cost is that sampled requests are never batched.
        """
        from tqdm import tqdm

        prepared = []  # (prompt ids, stop strings, DecodeConfig) per request, in request order
        for req in requests:
            context, gen_kwargs = req.args
            config = self.config_for(gen_kwargs)
            ids = self.encode(context)
            room = self.model.config.max_sequence_length - config.gen_length
            if len(ids) > room:
                log.warning("prompt of %d tokens cut to its last %d (max_sequence_length %d - gen_length %d)",
                            len(ids), room, self.model.config.max_sequence_length, config.gen_length)
                ids = ids[-room:]
            until = gen_kwargs.get("until") or []
            prepared.append((ids, [until] if isinstance(until, str) else list(until), config))

        # Each request's seed: the run's seed, its prompt, and how many identical requests came
        # before it (lm-eval's `repeats` asks for several samples of one prompt).
        seen, seeds = {}, []
        for ids, _, _ in prepared:
            key = json.dumps(ids)
            seen[key] = repeat = seen.get(key, -1) + 1
            seeds.append(request_seed(self.config.seed, ids, repeat))

        # Batches: runs of consecutive requests that share settings, at most batch_size long;
        # one request each where decoding draws random numbers.
        batches, start = [], 0
        while start < len(prepared):
            config = prepared[start][2]
            size = 1 if config.temperature > 0 or config.remasking == "random" else self.config.batch_size
            end = start + 1
            while end < len(prepared) and end - start < size and prepared[end][2] == config:
                end += 1
            batches.append((start, end))
            start = end

        responses, nfe, seconds = [], 0, 0.0
        for start, end in tqdm(batches, desc="dllm generate_until", disable=self.rank != 0):
            prompts = [p[0] for p in prepared[start:end]]
            config = prepared[start][2]
            ids, mask = left_pad(prompts, self.pad_id)  # (B, P) each
            # Rows of one length need no mask: the unmasked forward is then the same as bench.py's.
            mask = None if all(len(p) == len(prompts[0]) for p in prompts) else mask.to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(seeds[start])  # (a batch of one where it draws)
            t0 = time.perf_counter()
            out = generate(self.model, ids.to(self.device), config, generator=generator, attention_mask=mask)
            seconds += time.perf_counter() - t0
            nfe += out.nfe * (end - start)
            for row, req, (_, until, _) in zip(out.generated.tolist(), requests[start:end], prepared[start:end]):
                text = cut_at_stop(self.response_text(row), until)
                responses.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
        if requests:
            log.info("rank %d: %d generations, %.1f NFE each, %.1f s decoding", self.rank, len(requests),
                     nfe / len(requests), seconds)
        return responses

    # -- loglikelihood ----------------------------------------------------------------------------

    @torch.no_grad()
    def is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Would greedy decoding produce the continuation? LLaDA's check: mask all G positions,
        commit the single most confident argmax per step; here that is decode.generate with one
        block of G tokens, G steps, temperature 0."""
        G = len(continuation)
        # Fresh (vanilla) settings, whatever method the model_args select for generation.
        config = DecodeConfig.for_model(self.model.config, gen_length=G, block_length=G, steps=G,
                                     cfg_scale=self.decode_config.cfg_scale, eot_id=self.decode_config.eot_id)
        out = generate(self.model, torch.tensor([context], device=self.device), config)
        return out.generated[0].tolist() == continuation

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        config, model_config = self.config, self.model.config
        results = []
        for req in tqdm(requests, desc="dllm loglikelihood", disable=self.rank != 0):
            context, continuation = self.encode_pair(*req.args)
            if not continuation:
                raise ValueError(f"empty continuation for context {req.args[0][-80:]!r}")
            if len(context) + len(continuation) > model_config.max_sequence_length:
                context = context[len(context) + len(continuation) - model_config.max_sequence_length:]
            # Seeded by the request, so it gets the same estimate on any rank. By the context and the
            # continuation's length only: the choices of one question that are equally long share
            # their random masks (common random numbers), so comparing them is less noisy.
            generator = torch.Generator().manual_seed(request_seed(config.seed, context, len(continuation)))
            ll = mc_loglikelihood(self.model, context, continuation, self.decode_config.mask_id, config.mc_num,
                                  config.batch_size, generator, self.decode_config.cfg_scale)
            greedy = config.check_greedy and bool(context) and self.is_greedy(context, continuation)
            results.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (ll, greedy))
        return results

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "dllm does not support loglikelihood_rolling (perplexity tasks such as wikitext): a masked-"
            "diffusion model gives no left-to-right token probabilities, and LLaDA's evaluation has no "
            "rolling estimate. Use generation or multiple-choice tasks.")


# ---------------------------------------------------------------------------------------------
# The toy tasks: task.py's held-out problems as lm-eval task files
# ---------------------------------------------------------------------------------------------

TOY_PROBLEMS = task.HELD_OUT  # problems per family in the task files (--limit takes a prefix)

# Few-shot, the same in every toy task: --num_fewshot K puts task.few_shot's K solved examples
# (seed 0) before the question, each written as prompt + answer + task.SHOT_SEPARATOR.
FEW_SHOT_YAML = """\
target_delimiter: ""
fewshot_delimiter: {separator}
fewshot_split: test  # only then does lm-eval show the sampler the question; the shots are not test problems
fewshot_config:
  sampler: !function utils.TaskShots
"""

GENERATE_YAML = """\
# Written by `python -m tools.eval_harness --write-toy-tasks` from {checkpoint}'s task spec: the
# first held-out '{family}' problems of task.py, scored by task.py's own scorer for the family;
# --num_fewshot K gives each task.few_shot's K-shot prompt.
task: toy_{family}
tag: toy
custom_dataset: !function utils.load_jsonl
dataset_kwargs:
  data_file: toy_{family}.jsonl
output_type: generate_until
test_split: test
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
{few_shot}process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until: []
  max_gen_toks: {gen_length}
metadata:
  version: 1.0
"""

MC_YAML = """\
# Written by `python -m tools.eval_harness --write-toy-tasks` from {checkpoint}'s task spec: the
# '{family}' problems as multiple choice, the worked answer against chains whose last result is
# off by 1 or 2 (scored by log-likelihood); --num_fewshot K as in toy_{family}.
task: toy_{family}_mc
tag: toy_mc
custom_dataset: !function utils.load_jsonl
dataset_kwargs:
  data_file: toy_{family}_mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: gold
{few_shot}  doc_to_target: answer  # a shot shows its worked answer: shots have no choices
  doc_to_choice: null
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def distractors(family, problem, count: int = 3) -> list[str]:
    """Wrong worked answers for a chain: the same lines with the last result (and the #### line)
    off by 1 or 2, kept in [0, 99]. Every line but the last is right, so telling them apart takes
    the last step's arithmetic."""
    lines = problem.answer.split("\n")  # steps ..., '#### v'
    wrong = [v for v in (problem.value + 1, problem.value - 1, problem.value + 2, problem.value - 2) if 0 <= v <= 99]
    out = []
    for v in wrong[:count]:
        last = lines[-2][:lines[-2].rindex("=") + 1] + family.num(v)
        out.append("\n".join(lines[:-2] + [last, f"#### {family.num(v)}"]))
    return out


MANIFEST = "toy_manifest.json"  # beside the task files: each file the writer wrote there, with its sha256


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def owned_files(out_dir: str) -> dict[str, str]:
    """{name: sha256} of the files in out_dir that --write-toy-tasks wrote (its manifest says so)
    and nobody changed since (the file still has the recorded hash): the only ones it may
    replace or remove. A missing or unreadable manifest owns nothing."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {}
    owned = {}
    for name, digest in (manifest.items() if isinstance(manifest, dict) else ()):
        if not (isinstance(name, str) and name == os.path.basename(name) and name.startswith("toy_")):
            continue  # only plain toy_* names in out_dir itself, whatever the manifest says
        try:
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                if sha256(f.read()) == digest:
                    owned[name] = digest
        except (OSError, UnicodeDecodeError):
            pass
    return owned


def toy_task_files(checkpoint: str, n: int) -> dict[str, str]:
    """{file name: text} of the toy tasks for every family of the checkpoint's task spec."""
    spec = task.load_task(checkpoint)
    name = os.path.relpath(checkpoint, ROOT) if os.path.abspath(checkpoint).startswith(ROOT) else checkpoint
    few_shot = FEW_SHOT_YAML.format(separator=json.dumps(task.SHOT_SEPARATOR))

    def jsonl(rows):
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    files = {"toy_spec.json": json.dumps(spec, indent=2, sort_keys=True) + "\n"}
    for family, fam in task.families_for(spec).items():
        problems = fam.test_set(n)  # pair has only 13 distinct problems
        files[f"toy_{family}.jsonl"] = jsonl(dataclasses.asdict(p) for p in problems)
        files[f"toy_{family}.yaml"] = GENERATE_YAML.format(family=family, checkpoint=name, gen_length=fam.gen_length,
                                                           few_shot=few_shot)
        if not isinstance(fam, task.Chain):
            continue  # pair has several right answers: no single multiple-choice key
        rows = []
        for i, p in enumerate(problems):
            choices = [p.answer] + distractors(fam, p)
            random.Random(i).shuffle(choices)  # the right answer's position varies, reproducibly
            rows.append(dict(dataclasses.asdict(p), choices=choices, gold=choices.index(p.answer)))
        files[f"toy_{family}_mc.jsonl"] = jsonl(rows)
        files[f"toy_{family}_mc.yaml"] = MC_YAML.format(family=family, checkpoint=name, few_shot=few_shot)
    return files


def write_toy_tasks(out_dir: str = TASK_DIR, checkpoint: str = DEFAULT_CHECKPOINT, n: int = TOY_PROBLEMS) -> list[str]:
    """Write the toy task files for every family of the checkpoint's task spec; returns their paths.

    Per family: toy_<family>.yaml/.jsonl (generation, the family's own window as max_gen_toks);
    for chain families also toy_<family>_mc.yaml/.jsonl (multiple choice). toy_spec.json keeps
    the spec, so eval_tasks/utils.py scores and draws shots with the same families.

    Nothing the writer does not own is replaced or removed, as git will not clobber a file it
    does not track: toy_manifest.json lists what it wrote, with hashes. A file of the same name
    that it did not write (or that was edited since) stops the run before anything is written,
    unless it already holds the new text; the writer's own files that the new spec no longer has
    (another checkpoint's families) are removed, all others kept. The files are written all or
    none (bench.write_files). A checkpoint directory that does not exist, or that holds neither
    task.json nor config.json (a typo, a parent folder), is a ValueError: it would otherwise
    read as the default spec.
    """
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint directory")
    if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in ("task.json", "config.json")):
        raise ValueError(f"--checkpoint {checkpoint} is not a checkpoint: it holds neither task.json nor config.json")
    files = toy_task_files(checkpoint, n)
    os.makedirs(out_dir, exist_ok=True)
    owned = owned_files(out_dir)
    foreign = []  # same-named files the writer did not write and would change
    for name, text in files.items():
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and name not in owned:
            try:
                with open(path, encoding="utf-8") as f:
                    same = f.read() == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                foreign.append(name)
    if foreign:
        raise ValueError(f"{out_dir} holds {', '.join(foreign)}, not written by --write-toy-tasks (or changed "
                         f"since): move {'them' if len(foreign) > 1 else 'it'} away or give another --out")
    stale = sorted(set(owned) - set(files))  # the writer's own files of families the spec no longer has
    files[MANIFEST] = json.dumps({name: sha256(text) for name, text in files.items()}, indent=1, sort_keys=True) + "\n"
    written = bench.write_files(out_dir, files)
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    others = sorted(f for f in os.listdir(out_dir) if f.startswith("toy_") and f.endswith((".yaml", ".jsonl"))
                    and f not in files)
    if others:  # e.g. an earlier writer's files, or a user's: kept, but lm-eval still sees the .yaml ones
        print(f"kept {', '.join(others)} in {out_dir}: not written by --write-toy-tasks, or changed since",
              file=sys.stderr)
    return written


# ---------------------------------------------------------------------------------------------
# main: lm-eval's own command line, with dllm registered
# ---------------------------------------------------------------------------------------------


def with_defaults(argv: list[str]) -> list[str]:
    """lm-eval's arguments, plus `--model dllm` and `--include_path tools/eval_tasks` when not given."""
    argv = list(argv)
    subcommands = ("run", "ls", "validate")
    if argv and argv[0] in subcommands[1:] or any(a in ("-h", "--help") for a in argv[:1]):
        return argv
    flags = {a.split("=", 1)[0] for a in argv}
    if "--model" not in flags and "-M" not in flags:
        argv += ["--model", "dllm"]
    if "--include_path" not in flags:
        argv += ["--include_path", TASK_DIR]
    return argv


def check_model_args(argv: list[str]) -> None:
    """Refuse a key given twice in --model_args (lm-eval would warn and keep the last one)."""
    words = []
    for i, arg in enumerate(argv):
        if arg in ("--model_args", "-a"):  # one or more 'k=v,k=v' words, up to the next flag
            words += itertools.takewhile(lambda w: not w.startswith("-"), argv[i + 1:])
        elif arg.startswith("--model_args="):
            words.append(arg.split("=", 1)[1])
    words = [w for w in words if not w.lstrip().startswith("{")]  # a JSON object has unique keys already
    if words:
        parse_arg_string(",".join(words))


def output_folder(output_path: str) -> str:
    """The folder lm-eval writes into for --output_path: a .json path's folder, else the path itself."""
    return (os.path.dirname(output_path) or ".") if output_path.endswith(".json") else output_path


def stage_output(output_path: str) -> tuple[str, str]:
    """Check that --output_path can be written, before the run; returns (a new empty staging
    folder inside its folder, the output path to give lm-eval instead). lm-eval writes its result
    files into the staging folder, and `publish_output` renames them into place when it is done,
    so a result file is never seen half-written. lm-eval alone would evaluate for hours, then
    warn that it could not save and exit 0."""
    folder = output_folder(output_path)
    try:
        os.makedirs(folder, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".dllm-staging-", dir=folder)
    except OSError as err:
        raise ValueError(f"--output_path {output_path}: cannot write there ({err.strerror or err})") from None
    staged = os.path.join(staging, os.path.basename(output_path)) if output_path.endswith(".json") else staging
    return staging, staged


def publish_output(output_path: str, staging: str) -> None:
    """Move lm-eval's finished result files from `staging` to their place under --output_path,
    each fsynced and renamed (bench.publish). On the process that gathers the results (rank 0),
    no results file means lm-eval could not save them: an error, not a warning and exit 0."""
    folder = output_folder(output_path)
    staged = []
    for here, _, names in os.walk(staging):
        for name in names:
            tmp = os.path.join(here, name)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = os.path.join(folder, os.path.relpath(tmp, staging))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            staged.append((tmp, final))
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    if rank == 0 and not any(not os.path.basename(f).startswith("samples_") for f, _ in staged):
        raise ValueError(f"lm-eval could not save the results to --output_path {output_path} (its warning above "
                         "says why)")
    bench.publish(staged)
    for _, final in staged:
        log.info("saved %s", final)


def close_process_group() -> None:
    """Leave the launcher's process group cleanly (torch warns at exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves while another still gathers
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--write-toy-tasks":
        import argparse

        ap = argparse.ArgumentParser(prog="python -m tools.eval_harness --write-toy-tasks",
                                     description="Write the toy lm-eval task files from task.py's held-out problems.")
        ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint whose task.json fixes the task")
        ap.add_argument("--problems", type=int, default=TOY_PROBLEMS, help="problems per family")
        ap.add_argument("--out", default=TASK_DIR, help="where the task files go (files it did not write are kept)")
        args = ap.parse_args(argv[1:])
        if not 1 <= args.problems <= task.HELD_OUT:
            ap.error(f"--problems must be in 1..{task.HELD_OUT} (each family's held-out set), got {args.problems}")
        try:
            paths = write_toy_tasks(args.out, args.checkpoint, args.problems)
        except ValueError as err:
            ap.error(str(err))
        except OSError as err:
            ap.exit(1, f"{ap.prog}: error: could not write the task files to {args.out} ({err.strerror or err})\n")
        except KeyboardInterrupt:
            ap.exit(130, f"\n{ap.prog}: interrupted; the files in {args.out} are unchanged\n")
        print("\n".join(paths))
        return

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    sys.argv = [sys.argv[0]] + with_defaults(argv)
    output, staging = None, None
    try:
        check_model_args(argv)
        # lm-eval's own command line (lm_eval.__main__.cli_evaluate), with its output path
        # checked before the run and its result files staged and renamed into place after it.
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        output = getattr(args, "output_path", None)
        if output:
            staging, args.output_path = stage_output(output)
        cli.execute(args)
        if staging:
            publish_output(output, staging)
    except KeyboardInterrupt:
        sys.stdout.flush()
        saved = f"; nothing was saved to {output} (lm-eval saves its results at the end)" if output else ""
        sys.stderr.write(f"\npython -m tools.eval_harness: interrupted{saved}\n")
        sys.exit(130)
    except (ValueError, NotImplementedError) as err:
        sys.exit(f"python -m tools.eval_harness: error: {err}")
    except (RuntimeError, MemoryError) as err:
        if not bench.out_of_memory(err):
            raise
        sys.exit("python -m tools.eval_harness: error: out of memory: use a smaller batch_size in --model_args "
                 "(requests decoded together; Monte-Carlo samples per forward), or a shorter gen_length")
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        close_process_group()


if __name__ == "__main__":
    main()
