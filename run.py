"""
Generate with a LLaDA-format checkpoint and watch the canvas denoise, mask by mask.

With no flags it loads the project's own small checkpoint (checkpoints/arith, trained by
tools/train.py on the toy task's arithmetic chains; checkpoints/README.md has the others), asks
it a held-out problem, and decodes with DualCache + threshold 0.9, ending at the first EOS.
Point --model at a real LLaDA-8B directory to use the same code on the real model.

Every DecodeConfig field is a flag, read from the dataclass with its comment as help: the cache
policy (--cache none/prefix/dual/dllm), the commit rule (--threshold, --factor, or LLaDA's top-k
schedule), the block rule (--adablock), --stop-at-eos, --quirks. --shots K puts K solved examples
before the question. --cache-map draws, under the canvas, which positions each forward recomputed
and which it read from the cache. A user's mistake ends the run with one line on stderr and a
non-zero exit; Ctrl-C exits with 130.

Usage:
    python run.py                                   # the shipped checkpoint, a sample problem
    python run.py --prompt "8-3+7" --cache-map      # watch DualCache: '#' recomputed, '.' cached
    python run.py --cache dllm --no-live            # dLLM-Cache, result and figures only
    python run.py --model ~/LLaDA-8B-Instruct --prompt "What is 2+2?" --gen-length 128 \
                  --cache none --threshold none   # vanilla LLaDA (blocks of 32, one token per step)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

import torch

from decode import CACHES, REMASKING, RULES, DecodeConfig, generate
from tools.cli import add_dataclass_flags, flag_names
from tools.task import MAX_SHOTS

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "checkpoints", "arith")
# run.py's own defaults, where they differ from DecodeConfig's (vanilla) ones: a 64-token window in
# two blocks (room for a worked answer and its EOS tail), Fast-dLLM's DualCache + threshold 0.9,
# which keeps the arith checkpoint's accuracy (98.5% at G = 64) at a few forwards per answer, and
# no forwards spent on the EOS padding once the answer has ended.
RUN_DEFAULTS = dict(gen_length=64, block_length=32, cache="dual", threshold=0.9, stop_at_eos=True)

# ---------------------------------------------------------------------------------------------
# Helpers: flags, the prompt, the delimiter, drawing the canvas and the cache map
# ---------------------------------------------------------------------------------------------


def build_prompt(tokenizer, text: str, model_dir: str) -> str:
    """The prompt string: our task's format for the arithmetic checkpoint, the chat template for
    an instruction-tuned LLaDA, the text as it is otherwise."""
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


def cells(tokenizer, ids, mask_id, eos_id, keep_eos: bool) -> list[str]:
    """One printable cell per canvas position: masks '_', newlines '⏎', EOS '␄' when kept (the
    cache map needs a cell for every position), else dropped as padding."""
    out = []
    for t in ids:
        if t == mask_id:
            out.append("_")
        elif t == eos_id:
            out.append("␄" if keep_eos else "")
        else:
            out.append(tokenizer.decode([t]).replace("\n", "⏎") or "?")
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
        self.width = max(20, shutil.get_terminal_size((160, 24)).columns - 12)  # keep lines from wrapping
        self.drawn = False  # whether a frame is on screen (to redraw over it, or end its line)
        self.seconds = 0.0  # time spent drawing, excluded from the figures

    def frame(self, label: str, gen_ids: list[int], marks: list[str] | None) -> list[str]:
        """The canvas line and, under it, the map line with each mark under its token's cell."""
        cs = cells(self.tokenizer, gen_ids, self.config.mask_id, self.config.eos_id, keep_eos=self.show_map)
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


def fail(message, display: Display | None = None):
    """A user's mistake: one line on stderr and exit status 1."""
    if display is not None:
        display.end_line()
    sys.exit(" ".join(str(message).split("\n")))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


# DecodeConfig fields that are not flags: the special ids come from the model, AdaBlock's
# delimiters from the tokenizer (--adablock), and the drift probe belongs to the benchmark.
NOT_FLAGS = ("mask_id", "eos_id", "eot_id", "delimiter_ids", "measure_drift")
class Unset:
    """The default of a flag whose value depends on the others (shown as its rule in --help)."""

    def __init__(self, rule: str):
        self.rule = rule

    def __str__(self):
        return self.rule


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(description="Generate with a LLaDA-format checkpoint.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--prompt", default=None, help="prompt text (for the arithmetic checkpoints: a chain like '8-3+7', "
                                                     "or '?+?=10' for any two digits with that sum); default: a held-out problem")
    ap.add_argument("--shots", type=int, default=0, help="solved examples of the task before the question "
                                                          f"(0..{MAX_SHOTS}; the arithmetic checkpoints only)")
    # Every decoding setting is a flag, read from DecodeConfig: its comment is the help, its
    # default the default unless run.py's own (RUN_DEFAULTS) differs.
    # Unset unless given: a rule given replaces run.py's default one, and the block length and the
    # steps follow --gen-length (blocks of at most 32, one token per step).
    unset = {name: Unset("none") for name in RULES}
    unset["threshold"] = Unset(f"{RUN_DEFAULTS['threshold']} if no other rule is given")
    unset.update(block_length=Unset(f"gen length, at most {RUN_DEFAULTS['block_length']}"),
                 steps=Unset("gen length: one token per step"))
    add_dataclass_flags(ap, DecodeConfig, skip=NOT_FLAGS, defaults={**RUN_DEFAULTS, **unset},
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
    ap.add_argument("--seed", type=int, default=0, help=f"random seed for temperature > 0 or random remasking (0..{2**63 - 1})")
    ap.add_argument("--no-live", action="store_true", help="don't show the denoising live")
    args = ap.parse_args(argv)
    # A commit rule given on the command line replaces run.py's default one; two given are an error
    # (DecodeConfig says so).
    given = [name for name in RULES if not isinstance(getattr(args, name), Unset)]
    for name in RULES:
        if isinstance(getattr(args, name), Unset):
            setattr(args, name, RUN_DEFAULTS.get(name) if not given else None)
    if isinstance(args.block_length, Unset):
        args.block_length = min(RUN_DEFAULTS["block_length"], args.gen_length)
    if isinstance(args.steps, Unset):
        args.steps = args.gen_length
    if not 0 <= args.shots <= MAX_SHOTS:
        ap.error(f"--shots must be in 0..{MAX_SHOTS}, got {args.shots}")
    if not 0 <= args.seed < 2 ** 63:
        ap.error(f"--seed must be in 0..{2 ** 63 - 1}, got {args.seed}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    return args


def choice(options):
    """A flag parser that accepts one of `options`."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(options)})")
        return text
    return parse


def settings(args) -> dict:
    """DecodeConfig's keyword arguments from the flags (the special ids come from the model)."""
    return {name: getattr(args, name) for name in flag_names(DecodeConfig, skip=NOT_FLAGS)}


def run(argv=None) -> None:
    args = parse_args(argv)
    # Check the settings before loading anything, so a bad value is refused at once. (AdaBlock's
    # own checks wait for the tokenizer's delimiter, below.)
    if not args.adablock:
        try:
            DecodeConfig(**settings(args))
        except ValueError as err:
            fail(f"bad settings: {err}")
    if not os.path.isdir(args.model):
        fail(f"no checkpoint at {args.model}: train one with `python -m tools.train`, or pass --model DIR "
             f"(an HF-style LLaDA directory: config.json, *.safetensors, tokenizer files)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tools import task
    from model import load_model

    hf_logging.set_verbosity_error()  # AutoTokenizer warns that it doesn't know model_type 'llada'
    # 1) The model and its tokenizer: load_model turns every problem with the directory (an
    #    unreadable one included), the device or the dtype into a ValueError naming it.
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as err:
        fail(f"could not load {args.model}: {err}")
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        fail(f"{args.model} has no tokenizer files (tokenizer.json, tokenizer_config.json); "
             "run.py needs them to turn the prompt into ids")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer file
        fail(f"could not load the tokenizer of {args.model}: {type(err).__name__}: {err}")

    # 2) The decoding settings. LLaDA's config.json has no end-of-turn id; its tokenizer knows '<|eot_id|>'.
    eot_id = model.config.eot_token_id
    if eot_id is None and "<|eot_id|>" in tokenizer.get_vocab():
        eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    try:
        delimiter_ids = (newline_id(tokenizer),) if args.adablock else None
        config = DecodeConfig.for_model(model.config, eot_id=eot_id, delimiter_ids=delimiter_ids, **settings(args))
    except ValueError as err:
        fail(f"bad settings: {err}")

    # 3) The prompt: the user's, or the checkpoint task's first held-out problem; with --shots,
    #    after that many solved examples of its family (task.few_shot, as the benchmark builds them).
    is_task = os.path.isfile(os.path.join(args.model, "task.json"))
    try:
        text = args.prompt if args.prompt is not None else task.test_set(1, **task.load_task(args.model))[0].prompt
    except (ValueError, TypeError) as err:
        fail(f"could not make a sample prompt from {args.model}/task.json ({err}); pass --prompt")
    prompt = build_prompt(tokenizer, text, args.model)
    if args.shots:
        if not is_task:
            fail(f"--shots builds solved examples of this project's task; {args.model} has no task.json")
        families = task.families_for(task.load_task(args.model))
        question = task.Problem(task.family_of(prompt, families), prompt, "", 0)
        prompt = task.few_shot(question, args.shots, families=families).prompt
    try:
        prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    except Exception as err:  # the character tokenizer rejects characters it has no id for
        fail(f"could not tokenize the prompt {prompt!r}: {err}")
    print(prompt.rstrip("\n"))

    # 4) Generate, drawing the canvas after every step.
    live = not args.no_live and sys.stdout.isatty()
    display = Display(tokenizer, config, live, args.cache_map)
    display.start(config.gen_length)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = generate(model, prompt_ids.to(model.device), config, generator=generator,
                       on_step=display.on_step if live or args.cache_map else None)
    except ValueError as err:
        fail(f"bad input: {err}", display)
    except FloatingPointError as err:  # non-finite logits: decode.py names the step and likely causes
        fail(f"decoding stopped: {err}", display)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start - display.seconds
    display.clear()

    # 5) The answer (cut at its first EOS/EOT, as a scorer reads it: what follows is padding),
    #    what the method chose or measured, and one line of figures.
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
          f"{config.gen_length / out.nfe:.1f} tokens per forward | {method} | {model.device.type}")


def main(argv=None):
    """Run; Ctrl-C ends it with one line and exit status 130 (128 + SIGINT), not a traceback."""
    try:
        run(argv)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
