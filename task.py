"""
A synthetic arithmetic task shaped like GSM8K, and the character tokenizer the trained model uses.

LLaDA-8B's fast-decoding results are reported on GSM8K: a word problem, several lines of
step-by-step arithmetic, a final `#### <answer>` line, then EOS padding to the end of the
generation window. Real weights can't be downloaded here, so this project trains its own small
model (train.py) on a task with the same shape:

    prompt:   "Q: 7+5-3=?\n"
    answer:   "7+5=12\n12-3=9\n#### 9" + EOS EOS EOS ...   (until the window is full)

Operations are evaluated left to right, each line's result feeds the next, and only the final
line is scored (exact match), so every step has to be right. Newlines are natural semantic
delimiters (what AdaBlock looks for) and the long EOS tail is where parallel decoding wins
(what Fast-dLLM exploits). `style="word"` phrases the same chain as a short word problem.

Numbers are written naturally by default. `width=2` zero-pads every number so the answer's layout
follows from the prompt; with the same model and budget that variant learned far more slowly
(12% held-out at step 3000 against 60%), so it is an option, not the default.

The held-out test set is fixed by a seed, and training never draws one of its problems.

Usage:
    problems = test_set(200)                       # [Problem(...)], fixed forever by TEST_SEED
    tok = build_tokenizer(); tok.save_pretrained(ckpt_dir)
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass

# Special tokens, spelled as LLaDA spells them. EOS doubles as padding, as in LLaDA.
EOS_TOKEN = "<|endoftext|>"
EOT_TOKEN = "<|eot_id|>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, EOT_TOKEN, MASK_TOKEN)
# Every character either style can produce. Fixed, so the token ids never move.
CHARS = "0123456789+-*=?#:.,' \n" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

TEST_SEED = 20260101  # fixes the held-out test set
OPS = "+-"  # the default task adds and subtracts (multiplication is an option: harder to learn)


@dataclass(frozen=True)
class Problem:
    """One problem: the operands and operators of a left-to-right chain."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    style: str = "compact"
    width: int = 0  # numbers are zero-padded to this many digits (0 = written naturally)

    def num(self, n: int) -> str:
        return str(n).zfill(self.width) if self.width else str(n)

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for each line of the worked answer."""
        lines, acc = [], self.operands[0]
        for op, b in zip(self.ops, self.operands[1:]):
            res = acc + b if op == "+" else acc - b if op == "-" else acc * b
            lines.append((acc, op, b, res))
            acc = res
        return lines

    @property
    def answer_value(self) -> int:
        return self.steps()[-1][3]

    @property
    def prompt(self) -> str:
        if self.style == "compact":
            expr = self.num(self.operands[0]) + "".join(f"{op}{self.num(b)}" for op, b in zip(self.ops, self.operands[1:]))
            return f"Q: {expr}=?\n"
        # The word style: the same chain, told as a story about one person's marbles.
        words = {"+": "finds {} more", "-": "loses {}", "*": "makes it {} times as many"}
        story = f"Sam has {self.operands[0]} marbles. "
        story += " ".join(f"Then Sam {words[op].format(b)}." for op, b in zip(self.ops, self.operands[1:]))
        return f"Q: {story} How many marbles now?\n"

    @property
    def answer(self) -> str:
        """The worked answer (without EOS padding)."""
        lines = [f"{self.num(a)}{op}{self.num(b)}={self.num(r)}" for a, op, b, r in self.steps()]
        return "\n".join(lines) + f"\n#### {self.num(self.answer_value)}"


def sample_problem(rng: random.Random, min_operands=2, max_operands=3, max_operand=9, ops=OPS,
                   style="compact", width=0) -> Problem:
    """Draw a problem whose intermediate results all stay in [0, 99] (rejection sampling).

    The operand count n is weighted by how many chains of that length exist, (max_operand *
    len(ops))^n, so draws are close to uniform over problems: uniform n would spend most of a
    test set on the few short chains and leave training almost none of them.
    """
    counts = list(range(min_operands, max_operands + 1))
    weights = [(max_operand * len(ops)) ** n for n in counts]
    while True:
        n = rng.choices(counts, weights)[0]
        p = Problem(tuple(rng.randint(1, max_operand) for _ in range(n)),
                    tuple(rng.choice(ops) for _ in range(n - 1)), style, width)
        if all(0 <= r <= 99 for *_, r in p.steps()):
            return p


def test_set(n: int = 200, **task) -> list[Problem]:
    """The held-out problems: the first n distinct draws of the TEST_SEED stream."""
    rng, seen, out = random.Random(TEST_SEED), set(), []
    for _ in range(100 * n):
        p = sample_problem(rng, **task)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"the task has fewer than {n} distinct problems; widen it")


def parse_answer(text: str) -> int | None:
    """The number on the final `#### N` line of a generated answer, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith("####"):
            try:
                return int(line[4:].strip())
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# The character-level tokenizer, saved as a standard tokenizer.json
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def vocabulary() -> dict[str, int]:
    """token -> id: one id per character, then the special tokens."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    return vocab


def build_tokenizer():
    """A `transformers` fast tokenizer (backed by a `tokenizers` WordLevel model over characters)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")  # one piece per character
    tok.decoder = decoders.Fuse()  # decode by plain concatenation
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   mask_token=MASK_TOKEN, padding_side="left")


def special_ids() -> dict[str, int]:
    """The special ids as they go into config.json."""
    v = vocabulary()
    return {"eos_token_id": v[EOS_TOKEN], "pad_token_id": v[EOS_TOKEN], "eot_token_id": v[EOT_TOKEN],
            "mask_token_id": v[MASK_TOKEN]}


def encode(text: str) -> list[int]:
    """Character ids without loading `transformers` (training's hot path)."""
    v = vocabulary()
    return [v[c] for c in text]


def decode(ids) -> str:
    """The response text of generated ids, without loading `transformers`.

    The response ends at the first EOS or EOT, as evaluation harnesses cut a generation at its stop
    token: whatever a model writes into the padding after it is not part of the answer. Masks (only
    the capped decoding mode leaves any) are dropped.
    """
    v = vocabulary()
    text = []
    for t in ids:
        if t in (v[EOS_TOKEN], v[EOT_TOKEN]):
            break
        if t < len(CHARS):
            text.append(CHARS[t])
    return "".join(text)


def save_task(path: str, **task) -> None:
    """Record the task settings next to a checkpoint, so bench.py evaluates the same task."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "task.json"), "w") as f:
        json.dump(task, f, indent=2)


def load_task(path: str) -> dict:
    """The task settings a checkpoint was trained on ({} = the defaults)."""
    file = os.path.join(path, "task.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
