"""
Generate with a LLaDA- or Dream-format checkpoint and watch the canvas denoise, mask by mask.

With no flags it loads the project's own small checkpoint (checkpoints/arith, trained by
tools/train.py on the toy task's arithmetic chains; checkpoints/README.md has the others), asks
it a held-out problem, and decodes with DualCache + threshold 0.9, ending at the first EOS.
Point --model at a real LLaDA-8B or Dream-v0-7B directory to use the same code on the real model:
config.json's model_type says which family it is (model.load_model), and nothing here asks again.

Every DecodeConfig field is a flag, read from the dataclass with its help and default: the cache
policy (--cache none/prefix/dual/dllm), the commit rule (--threshold, --factor, or LLaDA's top-k
schedule with --threshold none), the block rule (--adablock), --stop-at-eos, --quirks. The demo's
own settings, where they differ from DecodeConfig's, are the one dict DEMO below. --shots K puts K
solved examples before the question. --cache-map draws, under the canvas, which positions each
forward recomputed and which it read from the cache (on Dream, whose shifted head predicts a token
from the row before it, a cached window recomputes that row too). A user's mistake ends the run
with one line on stderr and a non-zero exit; Ctrl-C exits with 130, a closed pipe (`| head`)
quietly with 141.

Usage:
    python run.py                                   # the shipped checkpoint, a sample problem
    python run.py --prompt "8-3+7" --cache-map      # watch DualCache: '#' recomputed, '.' cached
    python run.py --cache dllm --no-live            # dLLM-Cache, result and figures only
    python run.py --model checkpoints/dream-fewshot # a Dream-format checkpoint: the same demo, no flag
    python run.py --model ~/LLaDA-8B-Instruct --prompt "What is 2+2?" --gen-length 128 \
                  --cache none --threshold none   # vanilla LLaDA (blocks of 32, one token per step)
    python run.py --model ~/Dream-v0-Instruct-7B --prompt "What is 2+2?" --dtype bfloat16   # the same, on Dream
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import sys
import time
import warnings

import torch

from decode import CACHES, REMASKING, RULES, DecodeConfig, generate
from tools.cli import add_dataclass_flags, flag_names
from tools.task import MAX_SHOTS

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "checkpoints", "arith")
# The demo's settings where they differ from DecodeConfig's (LLaDA's vanilla sampler, the defaults
# every other tool uses): a 64-token window in blocks of 32 (room for a worked answer and its EOS
# tail), Fast-dLLM's DualCache + threshold 0.9, which keeps the arith checkpoint's accuracy (98.5%
# at G = 64) at a few forwards per answer, and no forwards spent on the EOS padding once the answer
# has ended. A flag given replaces its entry, and any commit-rule flag replaces the threshold.
# Unless given, the blocks shrink to --gen-length when it is shorter, and steps = --gen-length.
DEMO = dict(gen_length=64, block_length=32, cache="dual", threshold=0.9, stop_at_eos=True)
# DecodeConfig fields that are not flags: the special ids come from the model, AdaBlock's
# delimiters from the tokenizer (--adablock), and the drift probe belongs to the benchmark.
NOT_FLAGS = ("mask_id", "eos_id", "eot_id", "delimiter_ids", "measure_drift")
FLAGS = flag_names(DecodeConfig, skip=NOT_FLAGS)
# AdaBlock's own settings: typed without --adablock they would be silently ignored, so they are refused.
ADABLOCK_ONLY = ("delimiter_threshold", "window_fraction")

# ---------------------------------------------------------------------------------------------
# Flags: every DecodeConfig field, the demo's settings, the checks argparse cannot make
# ---------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def choice(options):
    """A flag parser that accepts one of `options`."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(options)})")
        return text
    return parse


def int_in(ap, flag: str, text: str, low: int, high: int, why: str = "") -> int:
    """An integer flag's value, or one line naming the flag and its range (argparse's own message
    for `--seed 2**62` would name neither the range nor, for a range error, the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        ap.error(f"{flag} must be in {low}..{high}{why}, got {text}")
    return value


def resolve(given: dict) -> dict:
    """Every DecodeConfig flag's value: the user's where given, else the demo's (DEMO, with the
    block length and steps following --gen-length), else DecodeConfig's own default."""
    demo = dict(DEMO)
    if any(rule in given for rule in RULES):  # a rule typed replaces the demo's; two typed are an error
        demo = {name: value for name, value in demo.items() if name not in RULES}
    gen_length = given.get("gen_length", demo["gen_length"])
    demo.update(block_length=min(demo["block_length"], gen_length), steps=gen_length)  # one token per step
    own = {f.name: f.default for f in dataclasses.fields(DecodeConfig) if f.name in FLAGS}
    return {**own, **demo, **given}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every decoding setting resolved (resolve); `args.given` holds the names of the
    decoding flags the user typed."""
    ap = Parser(description="Generate with a LLaDA- or Dream-format checkpoint.",
                epilog="Methods: --cache picks the KV cache (Fast-dLLM's prefix/dual, dLLM-Cache's dllm); "
                       "the commit rule is --threshold (the default, 0.9) or --factor; --threshold none gives "
                       "LLaDA's own top-k schedule (--steps steps over the window, the same number of tokens each); "
                       "--adablock ends blocks on a newline. Vanilla LLaDA: --cache none --threshold none.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--prompt", default=None,
                    help="the question; default: the checkpoint's first held-out problem. The shipped arithmetic "
                         "checkpoints know operands 1..9 joined by + and - with every partial result in 0..99: "
                         "a chain of 2-3 operands like '8-3+7' (all three), 4-6 operands (mix, fewshot), or "
                         "'?+?=N' for two digits with sum N in 4..16 (mix, fewshot)")
    ap.add_argument("--shots", default="0", help="solved examples of the task before the question "
                                                 f"(0..{MAX_SHOTS}; the arithmetic checkpoints only)")
    shown = {**DEMO, "block_length": f"{DEMO['block_length']}, or --gen-length if shorter",
             "steps": "--gen-length: one token per step",
             "threshold": f"{DEMO['threshold']} unless another rule is given; none = LLaDA's top-k schedule"}
    add_dataclass_flags(ap, DecodeConfig, skip=NOT_FLAGS, defaults=shown, given_only=True,
                        kinds={"cache": choice(CACHES), "remasking": choice(REMASKING)})
    ap.add_argument("--adablock", action="store_true",
                    help="AdaBlock: end each block on a confidently predicted newline instead of every --block-length "
                         "tokens (needs --threshold or another confidence rule)")
    ap.add_argument("--cache-map", action="store_true",
                    help="draw a second line under the canvas: '#' = the step's forward recomputed that position, "
                         "'.' = read from the cache (prefix/dual); with --cache dllm every position goes through "
                         "the model and 'd' marks a step whose layers reused most features. With --no-live, "
                         "every step's two lines are printed")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    ap.add_argument("--threads", default=None, help=f"CPU threads for torch (1..{os.cpu_count() or 1}, this "
                                                    "machine's CPUs; default: torch's choice)")
    ap.add_argument("--seed", default="0", help=f"random seed for temperature > 0 or random remasking (0..{2**63 - 1})")
    ap.add_argument("--no-live", action="store_true", help="don't show the denoising live")
    args = ap.parse_args(argv)
    args.given = {name for name in FLAGS if hasattr(args, name)}
    for name, value in resolve({name: getattr(args, name) for name in args.given}).items():
        setattr(args, name, value)
    args.shots = int_in(ap, "--shots", args.shots, 0, MAX_SHOTS)
    args.seed = int_in(ap, "--seed", args.seed, 0, 2 ** 63 - 1)
    if args.threads is not None:
        args.threads = int_in(ap, "--threads", args.threads, 1, os.cpu_count() or 1, " (this machine's CPUs)")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    typed = [name for name in ADABLOCK_ONLY if name in args.given]
    if typed and not args.adablock:
        ap.error(f"--{typed[0].replace('_', '-')} is an AdaBlock setting; add --adablock to use it")
    return args


def settings(args) -> dict:
    """DecodeConfig's keyword arguments from the flags (the special ids come from the model)."""
    return {name: getattr(args, name) for name in FLAGS}


def check_settings(args) -> None:
    """DecodeConfig's checks before anything loads, so a bad value is refused at once. AdaBlock's
    delimiter comes from the tokenizer later; a stand-in id lets its checks run now."""
    try:
        DecodeConfig(**settings(args), delimiter_ids=(0,) if args.adablock else None)
    except ValueError as err:
        fail(f"bad settings: {err}")


# ---------------------------------------------------------------------------------------------
# Loading: the checkpoint, its tokenizer, and the special ids they must agree on
# ---------------------------------------------------------------------------------------------


def load(args):
    """The model and its tokenizer. Every problem with the directory, the device, the dtype or the
    memory is one line, and the tokenizer never runs, or stops to ask about, a checkpoint's code."""
    if not os.path.isdir(args.model):
        fail(f"no checkpoint at {args.model}: train one with `python -m tools.train`, or pass --model DIR "
             f"(an HF-style LLaDA or Dream directory: config.json, *.safetensors, tokenizer files)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from model import load_model

    hf_logging.set_verbosity_error()  # AutoTokenizer warns that it doesn't know model_type 'llada' or 'Dream'
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as err:  # load_model names the file, tensor, device or dtype
        fail(f"could not load {args.model}: {err}")
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        fail(f"out of memory loading {args.model} onto {args.device or 'the default device'}: "
             "pass --dtype bfloat16 (half of float32's memory) or --device cpu")
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        fail(f"{args.model} has no tokenizer files (tokenizer.json, tokenizer_config.json); "
             "run.py needs them to turn the prompt into ids")
    try:
        # A real LLaDA or Dream config.json names its own modeling code (auto_map). The tokenizer needs
        # none of it, and without trust_remote_code=False transformers stops to ask on the terminal.
        # It also reads config.json with its own config class, which warns that a Dream config's
        # `rope_scaling` key is deprecated: not the tokenizer's business, nor the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer file
        fail(f"could not load the tokenizer of {args.model}: {type(err).__name__}: {err}")
    check_special_ids(args.model, model.config, tokenizer)
    return model, tokenizer


# The special tokens' names where a tokenizer does not name them itself: LLaDA's mask and end of
# turn, Dream's mask (Dream's EOS and padding are both '<|endoftext|>', its BOS '<|beginoftext|>').
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")
EOT_TOKEN = "<|eot_id|>"


def tokenizer_ids(tokenizer) -> dict:
    """The tokenizer's mask and end-of-turn ids (None where it has none), named or looked up."""
    vocab = tokenizer.get_vocab()
    mask = tokenizer.mask_token_id
    if mask is None:
        mask = next((vocab[t] for t in MASK_TOKENS if t in vocab), None)
    return {"mask": mask, "end-of-turn": vocab.get(EOT_TOKEN)}


def check_special_ids(model_dir: str, model_config, tokenizer) -> None:
    """Refuse a checkpoint whose config.json and tokenizer disagree on the mask, EOS or end-of-turn
    token, where both name one: decoding reads the config's ids, the prompt and the printed answer
    the tokenizer's, so a config EOS of 21 (the toy tokenizer's newline) would silently cut every
    answer at its first line. LLaDA-8B agrees on all three (mask 126336 is its vocabulary's
    '<|mdm_mask|>', which its tokenizer does not name as the mask; EOS 126081; no EOT in its config).
    Dream-v0 names its mask '<|mask|>' (151666) and its EOS '<|endoftext|>' (151643, the padding
    too); its config has no end-of-turn id, so a tokenizer's end of turn that is the config's BOS
    (a LLaDA tokenizer beside a Dream config: both use id 75 in this project's task) is refused.
    Padding and BOS only warn: run.py decodes one unpadded row and never reads the config's."""
    with open(os.path.join(model_dir, "config.json")) as f:
        written = json.load(f)  # load_model has read it: a JSON object
    ids = tokenizer_ids(tokenizer)
    pairs = [  # (config.json key, the id decoding uses, the tokenizer's name for it, its id, fatal)
        ("mask_token_id", model_config.mask_token_id, "mask", ids["mask"], True),
        ("eos_token_id", model_config.eos_token_id, "EOS", tokenizer.eos_token_id, True),
        ("eot_token_id", model_config.eot_token_id, "end-of-turn", ids["end-of-turn"], True),
        ("pad_token_id", model_config.pad_token_id, "padding", tokenizer.pad_token_id, False),
        ("bos_token_id", written.get("bos_token_id"), "BOS", tokenizer.bos_token_id, False),
    ]
    for key, ours, name, theirs, fatal in pairs:
        if ours is None or theirs is None or ours == theirs:
            continue
        source = f"config.json's {key}" if key in written else f"the default {key} (config.json has none)"
        message = (f"{model_dir}: {source} is {ours}, but the tokenizer's {name} token "
                   f"{tokenizer.convert_ids_to_tokens(theirs)!r} is {theirs}")
        if fatal:
            fail(f"{message}; decoding would use the wrong token: make config.json and the tokenizer agree")
        print(f"warning: {message} (run.py does not use it)", file=sys.stderr)
    # Without an end of turn in the config, the tokenizer's becomes one (decode_config): never the BOS.
    bos = model_config.bos_token_id
    if model_config.eot_token_id is None and bos is not None and ids["end-of-turn"] == bos:
        fail(f"{model_dir}: the tokenizer's end-of-turn token {EOT_TOKEN!r} is {bos}, config.json's bos_token_id; "
             f"decoding would stop at the BOS: use the tokenizer written for this checkpoint")


# ---------------------------------------------------------------------------------------------
# The prompt and the delimiter
# ---------------------------------------------------------------------------------------------


def build_prompt(tokenizer, text: str, model_dir: str) -> str:
    """The prompt string: our task's format for the arithmetic checkpoint, the chat template for
    an instruction-tuned model (LLaDA- or Dream-Instruct), the text as it is otherwise."""
    if os.path.isfile(os.path.join(model_dir, "task.json")):
        if text.startswith("Q:"):
            return text if text.endswith("\n") else text + "\n"
        text = text.strip()
        if "=" in text.rstrip("=?"):       # already a question, e.g. the pair family's "?+?=10"
            return f"Q: {text}\n"
        return f"Q: {text.rstrip('=?')}=?\n"  # a chain "8-3+7" (or "8-3+7=?") asks for its value
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text


def make_prompt(args, tokenizer) -> str:
    """The user's question, or the checkpoint task's first held-out problem; with --shots, after
    that many solved examples of its family (task.few_shot, as the benchmark builds them). A
    task.json tools/task.py cannot use (not JSON, not a spec, an unknown family, nested too
    deeply) is one line naming the file, whatever task.py raises."""
    from tools import task

    if args.prompt is not None and not args.shots:
        return build_prompt(tokenizer, args.prompt, args.model)
    if args.shots and not os.path.isfile(os.path.join(args.model, "task.json")):
        fail(f"--shots builds solved examples of this project's task; {args.model} has no task.json")
    where = os.path.join(args.model, "task.json")
    try:
        families = task.families_for(task.load_task(args.model))  # the `short` family without a task.json
        text = args.prompt if args.prompt is not None else next(iter(families.values())).test_set(1)[0].prompt
        prompt = build_prompt(tokenizer, text, args.model)
        if args.shots:
            question = task.Problem(task.family_of(prompt, families), prompt, "", 0)
            prompt = task.few_shot(question, args.shots, families=families).prompt
    except RecursionError:
        fail(f"{where} is nested too deeply to be a task spec")
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # today's task.py and a stricter one
        message = str(err) if where in str(err) else f"could not use the task in {where}: {err}"  # named once
        fail(message + ("" if args.prompt is not None else "; pass --prompt"))
    return prompt


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    """(1, P) prompt ids; a character the tokenizer has no id for is one line."""
    try:
        return torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    except Exception as err:  # the character tokenizer rejects characters it has no id for
        fail(f"could not tokenize the prompt {prompt!r}: {err}")


def newline_id(tokenizer) -> int:
    """The tokenizer's id of a newline, AdaBlock's delimiter. A byte-level BPE (LLaDA) encodes
    '\\n' as one token spelled 'Ċ'; SentencePiece vocabularies spell it '<0x0A>'."""
    try:
        ids = tokenizer("\n", add_special_tokens=False).input_ids
    except Exception:  # a character tokenizer without a newline refuses the text
        ids = []
    if len(ids) == 1 and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    vocab = tokenizer.get_vocab()
    for token in ("\n", "Ċ", "<0x0A>"):
        if token in vocab:
            return int(vocab[token])
    raise ValueError("--adablock ends blocks on newlines, but this tokenizer has no newline token")


def decode_config(args, model_config, tokenizer) -> DecodeConfig:
    """The flags' settings with the model's special ids and, for --adablock, the newline."""
    eot_id = model_config.eot_token_id  # LLaDA's config.json has none; its tokenizer knows '<|eot_id|>'
    if eot_id is None:  # (Dream's has none either, nor its tokenizer)
        eot_id = tokenizer_ids(tokenizer)["end-of-turn"]
    try:
        delimiter_ids = (newline_id(tokenizer),) if args.adablock else None
        return DecodeConfig.for_model(model_config, eot_id=eot_id, delimiter_ids=delimiter_ids, **settings(args))
    except ValueError as err:
        fail(f"bad settings: {err}")


# ---------------------------------------------------------------------------------------------
# Drawing the canvas and the cache map
# ---------------------------------------------------------------------------------------------


def glyphs(stream) -> tuple[str, str]:
    """The cells of a newline and of EOS: '⏎' and '␄', or '|' and '$' where the output cannot
    encode those (PYTHONIOENCODING=ascii, a Latin-1 terminal)."""
    try:
        "⏎␄".encode(getattr(stream, "encoding", None) or "utf-8")
        return "⏎", "␄"
    except (UnicodeEncodeError, LookupError):
        return "|", "$"


def cells(tokenizer, ids, mask_id, eos_id, keep_eos: bool, marks=("⏎", "␄")) -> list[str]:
    """One printable cell per canvas position: masks '_', newlines marks[0], EOS marks[1] when kept
    (the cache map needs a cell for every position), else dropped as padding."""
    out = []
    for t in ids:
        if t == mask_id:
            out.append("_")
        elif t == eos_id:
            out.append(marks[1] if keep_eos else "")
        else:
            out.append(tokenizer.decode([t]).replace("\n", marks[0]) or "?")
    return out


def cache_map(state, config) -> list[str]:
    """One character per generated position: what the step's forward did with it.

    '#' the forward recomputed it (its tokens were queries: fresh keys/values written to the
    cache); '.' the forward read it from the cache (stale keys/values, not recomputed).
    dLLM-Cache feeds every position through the model but each layer reuses cached attention
    and MLP features for most of them: a step that refreshed the whole response in every layer
    is '#', any other step 'd' (layer 0 and V-verify's picks are recomputed, the rest reused).
    """
    P, L = state.P, state.L
    if config.cache == "dllm":
        fresh = bool(state.window.refresh.response[0])  # row 0 recomputed its whole response, every layer
        return ["#" if fresh else "d"] * (L - P)
    window = state.window.positions
    window = window if window.dim() == 1 else window[0]  # row 0's positions
    computed = torch.zeros(L + 1, dtype=torch.bool)  # one spare slot: the cache's trash index L
    computed[window.cpu()] = True
    return ["#" if c else "." for c in computed[P:L].tolist()]


class Display:
    """The live view: the canvas (and the cache map) redrawn in place after every step; or, with
    --no-live and --cache-map, every step's lines printed one after another."""

    def __init__(self, tokenizer, config, live: bool, show_map: bool):
        self.tokenizer, self.config = tokenizer, config
        self.live, self.show_map = live, show_map
        self.marks = glyphs(sys.stdout)
        self.width = max(20, shutil.get_terminal_size((160, 24)).columns - 12)  # keep lines from wrapping
        self.drawn = False  # whether a frame is on screen (to redraw over it, or end its line)
        self.seconds = 0.0  # time spent drawing, excluded from the figures

    def frame(self, label: str, gen_ids: list[int], marks: list[str] | None) -> list[str]:
        """The canvas line and, under it, the map line with each mark under its token's cell."""
        cs = cells(self.tokenizer, gen_ids, self.config.mask_id, self.config.eos_id, self.show_map, self.marks)
        canvas, below, used = [], [], 0
        for i, c in enumerate(cs):
            if used + len(c) > self.width:
                break
            canvas.append(c)
            if marks is not None:
                below.append(marks[i] * len(c))  # one mark under every character of the cell
            used += len(c)
        lines = [f"[{label}] {''.join(canvas)}"]
        if marks is not None:
            lines.append(f"[cache   ] {''.join(below)}")
        return lines

    def draw(self, lines: list[str], pause: float) -> None:
        if not self.live:
            print("\n".join(lines))
            return
        if self.drawn:  # back to the first line of the previous frame
            sys.stdout.write("\r" + "\033[1A" * (len(lines) - 1))
        sys.stdout.write("\n".join("\r\033[K" + line for line in lines))
        sys.stdout.flush()
        self.drawn = True
        time.sleep(pause)  # slow enough to watch

    def start(self, G: int) -> None:
        """The canvas before the first step: all masks."""
        if self.live:
            marks = ["." for _ in range(G)] if self.show_map else None
            self.draw(self.frame("step   0", [self.config.mask_id] * G, marks), 0.3)

    def on_step(self, state) -> None:
        """decode.generate's callback, after every step: state.canvas is the canvas, state.window
        what the step's forward computed."""
        t = time.perf_counter()
        marks = cache_map(state, self.config) if self.show_map else None
        self.draw(self.frame(f"step {state.nfe:3d}", state.canvas[0, state.P:].tolist(), marks), 0.05)
        self.seconds += time.perf_counter() - t

    def clear(self) -> None:
        """Erase the frame, so the answer prints where the canvas was."""
        if self.live and self.drawn:
            n = 1 + self.show_map
            sys.stdout.write("\r\033[K" + "\033[1A\r\033[K" * (n - 1))
            sys.stdout.flush()
            self.drawn = False

    def end_line(self) -> None:
        """Before an error message: end the half-drawn line so the message starts on its own."""
        if self.live and self.drawn:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.drawn = False


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def fail(message, display: Display | None = None):
    """A user's mistake: one line on stderr and exit status 1."""
    if display is not None:
        display.end_line()
    sys.exit(" ".join(str(message).split("\n")))


def out_of_memory(err: BaseException) -> bool:
    """Whether torch (the CUDA allocator or the CPU's) or Python ran out of memory."""
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def decode(args, model, tokenizer, config, prompt_ids):
    """Generate, drawing the canvas after every step: the result and the seconds it took, the
    drawing excluded."""
    live = not args.no_live and sys.stdout.isatty()
    display = Display(tokenizer, config, live, args.cache_map)
    display.start(config.gen_length)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = generate(model, prompt_ids.to(model.device), config, generator=generator,
                       on_step=display.on_step if live or args.cache_map else None)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    except ValueError as err:
        fail(f"bad input: {err}", display)
    except FloatingPointError as err:  # non-finite logits: decode.py names the step and likely causes
        fail(f"decoding stopped: {err}", display)
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        fail(f"out of memory decoding {config.gen_length} tokens after a {prompt_ids.shape[1]}-token prompt on "
             f"{model.device}: reduce --gen-length or --shots, or pass --dtype bfloat16", display)
    seconds = time.perf_counter() - start - display.seconds
    display.clear()
    return out, seconds


def report(args, tokenizer, config, out, seconds: float, device) -> None:
    """The answer (cut at its first EOS/EOT, as a scorer reads it: what follows is padding), what
    the method chose or measured, and one line of figures."""
    generated = out.generated[0].tolist()
    stops = {i for i in (config.eos_id, config.eot_id) if i is not None}
    end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    print(tokenizer.decode(generated[:end], skip_special_tokens=True))
    if "block_lengths" in out.extras:
        print(f"AdaBlock block lengths: {out.extras['block_lengths'][0]}")
    if "recomputed_fraction" in out.extras:
        print(f"dLLM-Cache recomputed {out.extras['recomputed_fraction']:.1%} of the token-layer rows "
              f"full forwards would have")
    method = f"cache={config.cache}" + ("" if config.rule == "topk" else f", {config.rule}={getattr(config, config.rule)}") + \
        (", adablock" if args.adablock else "") + (", stop-at-eos" if config.stop_at_eos else "") + \
        (", quirks" if args.quirks else "")
    print(f"NFE {out.nfe} | {config.gen_length / seconds:.1f} tokens/s | {seconds:.2f} s | "
          f"{config.gen_length / out.nfe:.1f} tokens per forward | {method} | {device.type}")


def run(argv=None) -> None:
    """The demo in its steps; each ends the run with one line where something is wrong."""
    args = parse_args(argv)  # 1) the flags, every setting resolved, and checked before anything loads
    check_settings(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)  # 2) the checkpoint, its tokenizer, their special ids compared
    config = decode_config(args, model.config, tokenizer)  # 3) the settings with the model's ids
    prompt = make_prompt(args, tokenizer)  # 4) the question, after --shots solved examples
    prompt_ids = tokenize(tokenizer, prompt)
    print(prompt.rstrip("\n"))
    out, seconds = decode(args, model, tokenizer, config, prompt_ids)  # 5) generate, drawn live
    report(args, tokenizer, config, out, seconds, model.device)  # 6) the answer and the figures


def drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered does not
    fail a second time (the pattern Python's documentation gives for SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stream without a file descriptor (a test's capture)
        pass


def main(argv=None):
    """Run, ending as a command-line tool does, never with a traceback: Ctrl-C with one line and
    exit status 130 (128 + SIGINT); a reader that went away (`run.py | head -c1`) quietly with 141
    (128 + SIGPIPE); an output that cannot be written (a full disk, /dev/full) with one line.
    Characters the output's encoding lacks are replaced, not an error."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    try:
        run(argv)
        sys.stdout.flush()  # a full disk or a closed pipe raises here, not at exit
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        drop_stdout()
        sys.exit(141)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        drop_stdout()
        fail(f"could not write the output: {os.strerror(err.errno)}")


if __name__ == "__main__":
    main()
