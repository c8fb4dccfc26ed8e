"""
The synthetic tasks the project's small model is trained and scored on, and its character tokenizer.

Real LLaDA weights can't be downloaded here, so the project trains its own small model (tools/train.py).
The tasks are chosen so that the decoding methods' trade-offs *show*: each family is a reason
why committing several tokens per forward can go wrong (Fast-dLLM, arXiv 2505.22618, Sec. 3.2).

    family  prompt            a right response (then EOS EOS ... to the end of the window)
    short   "Q: 7+5-3=?\n"    "7+5=12\n12-3=9\n#### 9"     2-3 operands, GSM8K-shaped worked answer
    long    "Q: 7+5-3+8+1=?\n" the same format, 4-6 lines  later lines need the committed earlier ones
    pair    "Q: ?+?=9\n"      "4+5" (or "1+8", "2+7", ...) several valid answers whose tokens depend
                                                           on each other: a mixed "4+7" is wrong

Chains are evaluated left to right, every intermediate result stays in [0, 99], and only the final
`#### N` line is scored (exact match). `pair` is scored as a valid answer, not by string match:
the response must be exactly `a+b` with digits a, b in 1..9 and a + b = N. A response is cut at
its first EOS/EOT before scoring (`decode`), as evaluation harnesses cut at the stop token.

Each family has a fixed held-out test set (the first `HELD_OUT` distinct draws of its own seeded
stream) that training never draws. `pair` has only 13 prompts (N = 4..16), so its "test set" is
those 13: it tests whether decoding keeps an answer consistent, not generalisation. A k-shot
prompt (`few_shot`) puts k solved examples of the question's family, from its training stream,
before the question, "\n\n" after each: GSM8K's 5- and 8-shot format, the regime the papers
measure, shared by training, the benchmark, run.py and the lm-eval tasks.

    for p in FAMILIES["short"].test_set(50):     # Problem: p.prompt, p.answer (a reference), p.family
        p8 = few_shot(p, 8)                      # the same problem as an 8-shot prompt
        ok = score(p8, decode(generated_ids))    # the response is cut at its first EOS
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
import reprlib
from dataclasses import dataclass, replace

# Special tokens, spelled as LLaDA spells them. EOS doubles as padding, as in LLaDA.
EOS_TOKEN = "<|endoftext|>"
EOT_TOKEN = "<|eot_id|>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, EOT_TOKEN, MASK_TOKEN)
# A Dream checkpoint's tokenizer spells them as Dream-v0's (Qwen2's EOS, which pads too; Dream's
# own BOS and mask). They take the same three ids, so the ids of every text are the family's alike:
# a Dream directory's 75 is BOS where a LLaDA one's is end-of-turn (`decode` stops at both).
DREAM_BOS_TOKEN = "<|beginoftext|>"
DREAM_MASK_TOKEN = "<|mask|>"
DREAM_SPECIAL_TOKENS = (EOS_TOKEN, DREAM_BOS_TOKEN, DREAM_MASK_TOKEN)
TOKENIZER_FAMILIES = ("llada", "dream")  # model.py's family names
# Every character any family can produce. Fixed, so the token ids never move.
CHARS = "0123456789+-*=?#:.,' \n" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

TEST_SEED = 20260101  # fixes the held-out test sets (each family offsets it by its own amount)
HELD_OUT = 200  # problems per family reserved for evaluation; training excludes all of them
OPS = "+-*"  # operators a chain may use ('+-' by default; '*' is harder to learn)
MAX_SHOTS = 8  # most solved examples a prompt may carry (GSM8K's evaluations use 5 and 8)
MAX_OPERANDS = 32  # longest chain a spec may ask for (one answer line per operand)
MIN_ACCEPTANCE = 1e-4  # a chain family whose sampler keeps fewer of its draws is refused (it would spin)
SAMPLE_TRIES = 1_000_000  # draws before `Chain.sample` gives up: never reached at MIN_ACCEPTANCE or more


@dataclass(frozen=True)
class Problem:
    """One problem of one family. `answer` is a right response (for `pair`, one of several)."""

    family: str  # name of the family that made and scores it
    prompt: str  # the text the model is given, ending in a newline
    answer: str  # a reference response, without EOS padding
    value: int  # chains: the final result; pair: the target sum N


# ---------------------------------------------------------------------------------------------
# Chains of arithmetic (the `short` and `long` families)
# ---------------------------------------------------------------------------------------------


def chain_steps(operands, ops) -> list[tuple[int, str, int, int]]:
    """(left, op, right, result) for each line of the worked answer, evaluated left to right."""
    lines, acc = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        res = acc + b if op == "+" else acc - b if op == "-" else acc * b
        lines.append((acc, op, b, res))
        acc = res
    return lines


def parse_answer(text: str) -> int | None:
    """The number on the final `#### N` line of a generated answer, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith("####"):
            try:
                return int(line[4:].strip())
            except ValueError:
                return None
    return None


@functools.lru_cache(maxsize=64)
def chain_counts(max_operand: int, ops: str, max_operands: int) -> tuple[int, ...]:
    """counts[n]: how many chains of n operands from 1..max_operand, each operator drawn from `ops`
    (a repeated operator counts as often as it appears, as the sampler draws it), keep every
    result in [0, 99]. Dynamic programming over the running result, so 32 operands take
    milliseconds, where counting by drawing would take forever for the rare settings."""
    ways = [0] * 100  # ways[r]: chains so far whose running result is r
    for a in range(1, max_operand + 1):
        ways[a] = 1
    counts = [0, sum(ways)]
    for _ in range(2, max_operands + 1):
        after = [0] * 100
        for acc, w in enumerate(ways):
            for op in ops if w else ():
                for b in range(1, max_operand + 1):
                    r = acc + b if op == "+" else acc - b if op == "-" else acc * b
                    if 0 <= r <= 99:
                        after[r] += w
        ways = after
        counts.append(sum(ways))
    return tuple(counts)


class Family:
    """A family of problems: how to draw one, its held-out test set, and how to score a response."""

    name: str = ""
    gen_length: int = 32  # a generation window that fits every answer with room for EOS
    offset: int = 0  # added to TEST_SEED, so every family has its own held-out stream
    size: int | None = None  # number of distinct prompts when small (pair), else None

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def score(self, problem: Problem, response: str) -> bool:
        raise NotImplementedError

    def test_set(self, n: int = HELD_OUT) -> list[Problem]:
        """The first n distinct draws of this family's held-out stream (fewer if it has fewer)."""
        if not 0 < n <= HELD_OUT:
            raise ValueError(f"a family's test set has 1..{HELD_OUT} problems (task.HELD_OUT, the "
                             f"problems training excludes), got {n}")
        return list(_test_set(self, min(n, self.size or n)))

    def held_out_prompts(self) -> frozenset[str]:
        """Every prompt any script may score on: training never draws these."""
        return _held_out(self)


@functools.lru_cache(maxsize=64)
def _held_out(family: Family) -> frozenset[str]:
    return frozenset(p.prompt for p in family.test_set(HELD_OUT)) if family.size is None else frozenset()


@functools.lru_cache(maxsize=64)
def _test_set(family: Family, n: int) -> tuple[Problem, ...]:
    distinct = getattr(family, "distinct", None)
    if distinct is not None and distinct < n:  # known at once: don't draw a million times to find out
        raise ValueError(f"family {family.name!r} has only {distinct} distinct problems, fewer than the {n} of "
                         f"its test set; widen it (max_operand, ops)")
    rng, seen, out = random.Random(TEST_SEED + family.offset), set(), []
    for _ in range(1000 * n):
        p = family.sample(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                return tuple(out)
    raise ValueError(f"family {family.name!r}: {1000 * n} draws gave fewer than {n} distinct problems; widen it")


@dataclass(frozen=True, eq=True)
class Chain(Family):
    """Left-to-right chains of + and - (or *), each line's result feeding the next."""

    name: str = "short"
    min_operands: int = 2  # shortest chain
    max_operands: int = 3  # longest chain
    max_operand: int = 9  # operands are 1..max_operand
    ops: str = "+-"  # operators drawn from
    style: str = "compact"  # 'compact' ("Q: 7+5=?") or 'word' (a short story about marbles)
    width: int = 0  # zero-pad every number to this many digits (0 = natural widths)
    gen_length: int = 32  # window for the answer: 22 characters at most for 3 operands
    offset: int = 0  # 0 keeps the original task's held-out set for `short`

    def __post_init__(self):
        check_chain(self)

    @property
    def distinct(self) -> int:
        """How many distinct problems (prompts) the family has."""
        counts = chain_counts(self.max_operand, "".join(sorted(set(self.ops))), self.max_operands)
        return sum(counts[self.min_operands:])

    def acceptance(self) -> float:
        """The share of `sample`'s draws it keeps (all results in [0, 99]). Operand count n is drawn
        with weight (max_operand * len(ops))^n, which is len(ops) times the number of its chains."""
        counts = chain_counts(self.max_operand, self.ops, self.max_operands)
        lengths = range(self.min_operands, self.max_operands + 1)
        return len(self.ops) * sum(counts[n] for n in lengths) / sum((self.max_operand * len(self.ops)) ** n
                                                                       for n in lengths)

    def num(self, n: int) -> str:
        return str(n).zfill(self.width) if self.width else str(n)

    def make(self, operands, ops) -> Problem:
        """The problem for one chain: its prompt, worked answer and final value."""
        steps = chain_steps(operands, ops)
        if self.style == "compact":
            expr = self.num(operands[0]) + "".join(f"{op}{self.num(b)}" for op, b in zip(ops, operands[1:]))
            prompt = f"Q: {expr}=?\n"
        else:  # the word style: the same chain, told as a story about one person's marbles
            words = {"+": "finds {} more", "-": "loses {}", "*": "makes it {} times as many"}
            story = f"Sam has {operands[0]} marbles. "
            story += " ".join(f"Then Sam {words[op].format(b)}." for op, b in zip(ops, operands[1:]))
            prompt = f"Q: {story} How many marbles now?\n"
        value = steps[-1][3]
        lines = [f"{self.num(a)}{op}{self.num(b)}={self.num(r)}" for a, op, b, r in steps]
        return Problem(self.name, prompt, "\n".join(lines) + f"\n#### {self.num(value)}", value)

    def sample(self, rng: random.Random) -> Problem:
        """A chain whose intermediate results all stay in [0, 99] (rejection sampling).

        The operand count n is weighted by how many chains of that length exist, (max_operand *
        len(ops))^n, so draws are close to uniform over problems: uniform n would spend most of a
        test set on the few short chains and leave training almost none of them.
        """
        counts = list(range(self.min_operands, self.max_operands + 1))
        weights = [(self.max_operand * len(self.ops)) ** n for n in counts]
        for _ in range(SAMPLE_TRIES):  # bounded: check_chain refused settings that are rarely kept
            n = rng.choices(counts, weights)[0]
            operands = tuple(rng.randint(1, self.max_operand) for _ in range(n))
            ops = tuple(rng.choice(self.ops) for _ in range(n - 1))
            if all(0 <= r <= 99 for *_, r in chain_steps(operands, ops)):
                return self.make(operands, ops)
        raise ValueError(f"family {self.name!r}: none of {SAMPLE_TRIES} draws of {self.describe()} kept every "
                         "result in 0..99; lower max_operand, shorten the chains or add '+' to ops")

    def describe(self) -> str:
        """The settings that decide which chains exist, for error messages."""
        return (f"chains of {self.min_operands}..{self.max_operands} operands from 1..{self.max_operand} "
                f"with ops {self.ops!r}")

    def score(self, problem: Problem, response: str) -> bool:
        """Exact match of the final `#### N` line (the worked lines are not checked)."""
        return parse_answer(response) == problem.value


# ---------------------------------------------------------------------------------------------
# Pairs: several right answers whose tokens must agree (the `pair` family)
# ---------------------------------------------------------------------------------------------

PAIR_RE = re.compile(r"([1-9])\+([1-9])")


@dataclass(frozen=True, eq=True)
class Pair(Family):
    """`Q: ?+?=N` -> any `a+b` with digits 1..9 summing to N. Every digit pair is equally likely in
    training, so the model's per-position marginals are spread over many answers: committing the
    two digits in one step from their separate marginals can produce a pair from two answers."""

    name: str = "pair"
    low: int = 4  # smallest target sum
    high: int = 16  # largest target sum (9 answers at N = 10, down to 3 at N = 4 and 16)
    gen_length: int = 32
    offset: int = 2

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def make(self, total: int, a: int) -> Problem:
        return Problem(self.name, f"Q: ?+?={total}\n", f"{a}+{total - a}", total)

    def sample(self, rng: random.Random) -> Problem:
        """A target N uniform in low..high, and a right answer uniform among its digit pairs."""
        total = rng.randint(self.low, self.high)
        return self.make(total, rng.randint(max(1, total - 9), min(9, total - 1)))

    def score(self, problem: Problem, response: str) -> bool:
        """Valid answer: the response (cut at EOS) is exactly `a+b`, digits 1..9, a + b = N."""
        m = PAIR_RE.fullmatch(response.strip())
        return m is not None and int(m[1]) + int(m[2]) == problem.value


# ---------------------------------------------------------------------------------------------
# Checks: a chain's settings and a task spec (here, before FAMILIES builds the first chains)
# ---------------------------------------------------------------------------------------------

_short_repr = reprlib.Repr()  # bounded depth and length: a hostile value can't flood the message
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother = 2, 40, 40


def brief(value) -> str:
    """A value as an error message shows it: its repr, cut short, and its JSON-ish type."""
    return f"{_short_repr.repr(value)} ({type(value).__name__})"


def check_spec(spec) -> None:
    """A task spec's shape: an object; `families` a non-empty list of known names, each once;
    `chain` (and the old one-chain form) only Chain's settings. Their values: check_chain."""
    if not isinstance(spec, dict):
        raise ValueError(f"a task spec is a JSON object, got {brief(spec)}")
    settings = {f.name for f in dataclasses.fields(Chain)} - {"name"}
    if "families" not in spec:  # the old form: one chain's settings
        chain = {k: v for k, v in spec.items() if k != "name"}
    else:
        names, chain = spec["families"], spec.get("chain", {})
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"families must be a non-empty list of family names, got {brief(names)}")
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
        if len(set(names)) < len(names):
            raise ValueError(f"families names a family twice: {names}")
        if not isinstance(chain, dict):
            raise ValueError(f"chain must be a JSON object of chain settings, got {brief(chain)}")
    unknown = sorted(map(str, set(chain) - settings))
    if unknown:
        raise ValueError(f"unknown chain settings {unknown}; known: {', '.join(sorted(settings))}")


def check_chain(chain: Chain) -> None:
    """A chain family's settings: their types and ranges, and a sampler that keeps at least
    MIN_ACCEPTANCE of its draws (rejection sampling would otherwise spin for hours or forever)."""
    for name in ("min_operands", "max_operands", "max_operand", "width", "gen_length", "offset"):
        value = getattr(chain, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {brief(value)}")
    for name in ("name", "ops", "style"):
        if not isinstance(getattr(chain, name), str):
            raise ValueError(f"{name} must be a string, got {brief(getattr(chain, name))}")
    if not 2 <= chain.min_operands <= chain.max_operands <= MAX_OPERANDS:
        raise ValueError(f"chains need 2 <= min_operands <= max_operands <= {MAX_OPERANDS}, got "
                         f"{chain.min_operands}, {chain.max_operands}")
    if not 1 <= chain.max_operand <= 99:
        raise ValueError(f"max_operand must be in 1..99 (results stay in 0..99), got {chain.max_operand}")
    if not chain.ops or any(op not in OPS for op in chain.ops):
        raise ValueError(f"ops must be a non-empty string of operators from {OPS!r}, got {chain.ops!r}")
    if chain.style not in ("compact", "word"):
        raise ValueError(f"style must be 'compact' or 'word', got {chain.style!r}")
    if not 0 <= chain.width <= 2:
        raise ValueError(f"width must be 0, 1 or 2 digits, got {chain.width}")
    if chain.gen_length < 1:
        raise ValueError(f"gen_length must be a positive integer, got {chain.gen_length}")
    kept = chain.acceptance()
    if kept < MIN_ACCEPTANCE:
        how_rare = "none" if kept == 0 else f"only 1 in {1 / kept:.2g}"
        raise ValueError(f"family {chain.name!r}: of the {chain.describe()}, {how_rare} keeps every result "
                         f"in 0..99 (drawing them needs at least 1 in {1 / MIN_ACCEPTANCE:.0f}); lower "
                         "max_operand, shorten the chains or add '+' to ops")


# The default families, by name. A checkpoint's task.json can build its own (families_for).
FAMILIES: dict[str, Family] = {
    "short": Chain(name="short", min_operands=2, max_operands=3, gen_length=32, offset=0),
    "long": Chain(name="long", min_operands=4, max_operands=6, gen_length=64, offset=1),
    "pair": Pair(),
}


def families_for(spec: dict) -> dict[str, Family]:
    """The families a checkpoint's task.json describes.

    New checkpoints record {"families": [names...], "chain": {max_operand, ops, style, width},
    "mix": {...}}; checkpoints from before the families (checkpoints/arith) record one chain's
    settings ({min_operands, max_operands, max_operand, ops, style, width}): that is the `short`
    family with those settings. A spec of any other shape is a ValueError saying what is wrong.
    """
    check_spec(spec)
    if "families" not in spec:
        return {"short": Chain(name="short", **{k: v for k, v in spec.items() if k != "name"})}
    chain = spec.get("chain", {})
    out = {}
    for name in spec["families"]:
        base = FAMILIES[name]
        out[name] = Chain(**{**base.__dict__, **chain}) if isinstance(base, Chain) else base
    return out


# ---------------------------------------------------------------------------------------------
# Few-shot prompts: k solved examples before the question, as GSM8K's 5- and 8-shot prompts
# ---------------------------------------------------------------------------------------------

SHOT_SEPARATOR = "\n\n"  # ends each solved example; the question follows the last one


def draw_shots(family: Family, rng: random.Random, k: int, exclude: set[str]) -> list[Problem]:
    """k solved examples of `family` with distinct prompts, none of them in `exclude` (the held-out
    prompts and the question's own), drawn from the family's training stream with `rng`."""
    shots, seen = [], set(exclude)
    for _ in range(1000 * max(k, 1)):
        if len(shots) == k:
            return shots
        p = family.sample(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            shots.append(p)
    raise ValueError(f"family {family.name!r} has fewer than {k} distinct prompts to use as shots")


def with_shots(problem: Problem, shots: list[Problem]) -> Problem:
    """The problem with its solved examples before the question; the answer and scoring stay."""
    context = "".join(s.prompt + s.answer + SHOT_SEPARATOR for s in shots)
    return replace(problem, prompt=context + problem.prompt)


def family_of(prompt: str, families: dict[str, Family] | None = None) -> str:
    """The family whose format a question (e.g. a user's, as run.py builds it) has: `pair` for
    'Q: ?+?=N', else the chain family whose operand counts fit (the first, if none does)."""
    families = families or FAMILIES
    expression = prompt.removeprefix("Q: ").split("=")[0]
    if "?" in expression:
        return next((name for name, f in families.items() if isinstance(f, Pair)), next(iter(families)))
    operands = len(re.findall(r"\d+", expression))
    chains = [name for name, f in families.items() if isinstance(f, Chain)]
    fits = [name for name in chains if families[name].min_operands <= operands <= families[name].max_operands]
    return (fits or chains or list(families))[0]


def few_shot(problem: Problem, k: int, seed: int = 0, families: dict[str, Family] | None = None) -> Problem:
    """`problem` as a k-shot prompt. The examples come from its family's training distribution,
    never from a held-out set, and depend only on (seed, problem): every script, batch size and
    process builds the same prompt. k = 0 returns the problem unchanged."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SHOTS:
        raise ValueError(f"shots must be an integer in 0..{MAX_SHOTS}, got {k!r}")
    if k == 0:
        return problem
    families = families or FAMILIES
    if problem.family not in families:
        raise ValueError(f"the problem's family {problem.family!r} is not one of the task's ({', '.join(families)})")
    family = families[problem.family]
    rng = random.Random(f"shots/{seed}/{problem.family}/{problem.prompt}")  # str seeds are stable
    exclude = family.held_out_prompts() | {problem.prompt}
    return with_shots(problem, draw_shots(family, rng, k, exclude))


def score(problem: Problem, response: str, families: dict[str, Family] | None = None) -> bool:
    """Score a response (text already cut at EOS) with its problem's family."""
    return (families or FAMILIES)[problem.family].score(problem, response)


def test_set(n: int = HELD_OUT, **spec) -> list[Problem]:
    """Held-out problems of a task spec (a checkpoint's task.json, see families_for; {} = `short`).

    With several families, n problems in turn from each (short, long, pair, short, ...), so
    the first problem is always the first family's first: what run.py shows.
    """
    fams = list(families_for(spec).values())
    sets = [f.test_set(n) for f in fams]
    mixed = [s[i] for i in range(n) for s in sets if i < len(s)]
    return mixed[:n]


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


def build_tokenizer(family: str = "llada"):
    """A `transformers` fast tokenizer (backed by a `tokenizers` WordLevel model over characters),
    its special tokens named as the model family's checkpoints name them (`family`: "llada" or "dream").

    Its `save_pretrained` names the class `PreTrainedTokenizerFast` in tokenizer_config.json, a
    name every transformers version requirements.txt allows can load. transformers 5 would write
    its own class name, TokenizersBackend, which transformers 4 does not have.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    class CharTokenizer(PreTrainedTokenizerFast):
        def save_pretrained(self, save_directory, **kwargs):
            files = super().save_pretrained(save_directory, **kwargs)
            config_file = next(f for f in files if str(f).endswith("tokenizer_config.json"))
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(config_file, "w", encoding="utf-8") as f:  # the layout transformers writes
                f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            return files

    specials = special_tokens(family)  # the family's names, at the ids vocabulary() gives them
    vocab = {name if i < len(CHARS) else specials[i - len(CHARS)]: i for name, i in vocabulary().items()}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")  # one piece per character
    tok.decoder = decoders.Fuse()  # decode by plain concatenation
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    named = {"bos_token": DREAM_BOS_TOKEN} if family == "dream" else {}
    # clean_up_tokenization_spaces defaults to True in transformers 4 and would decode " ?" as "?".
    return CharTokenizer(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, mask_token=specials[2],
                         padding_side="left", clean_up_tokenization_spaces=False, **named)


def special_tokens(family: str = "llada") -> tuple[str, str, str]:
    """The family's names for ids 74, 75, 76: (EOS = pad, end-of-turn or BOS, mask)."""
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(f"family must be one of {TOKENIZER_FAMILIES}, got {family!r}")
    return DREAM_SPECIAL_TOKENS if family == "dream" else SPECIAL_TOKENS


def special_ids(family: str = "llada") -> dict[str, int]:
    """The special ids as they go into config.json: LLaDA's end-of-turn id is Dream's BOS."""
    v = vocabulary()
    second = "bos_token_id" if special_tokens(family)[1] == DREAM_BOS_TOKEN else "eot_token_id"
    return {"eos_token_id": v[EOS_TOKEN], "pad_token_id": v[EOS_TOKEN], second: v[EOT_TOKEN],
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


def save_task(path: str, spec: dict) -> None:
    """Record the task spec next to a checkpoint, so bench.py and run.py evaluate the same task."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "task.json"), "w") as f:
        json.dump(spec, f, indent=2)


def load_task(path: str) -> dict:
    """The task spec a checkpoint was trained on ({} = the `short` family's defaults). A task.json
    that is not a readable spec is a ValueError naming the file and what is wrong with it."""
    file = os.path.join(path, "task.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            spec = json.load(f)
        families_for(spec)  # the whole spec is checked now, not when a script first uses a part of it
    except RecursionError:  # json recurses once per nesting level
        raise ValueError(f"{file} is not a task spec: it is nested too deeply") from None
    except (OSError, ValueError) as err:  # unreadable, not JSON (or not UTF-8), or not a spec
        raise ValueError(f"{file} is not a task spec: {err}") from None
    return spec
