"""task.py: the families, their held-out sets, their scorers, and the EOS cut before scoring."""

import random
import re
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools import task

EOS = task.special_ids()["eos_token_id"]


def pair(total):
    return task.FAMILIES["pair"].make(total, max(1, total - 9))


def test_reference_answers_score_right():
    for name, fam in task.FAMILIES.items():
        for p in fam.test_set(task.HELD_OUT):
            assert p.family == name and p.prompt.endswith("\n")
            assert fam.score(p, p.answer) and task.score(p, p.answer)
            assert len(task.encode(p.answer)) < fam.gen_length  # fits the window with room for EOS


def test_chains_are_ordinary_left_to_right_arithmetic():
    for name, n_ops in (("short", (2, 3)), ("long", (4, 6))):
        for p in task.FAMILIES[name].test_set(200):
            expr = p.prompt[3:-3]
            assert eval(expr) == p.value  # +/- left to right is ordinary evaluation
            assert n_ops[0] <= expr.count("+") + expr.count("-") + 1 <= n_ops[1]
            assert all(0 <= int(line.split("=")[1]) <= 99 for line in p.answer.splitlines()[:-1])
    assert task.parse_answer("1+2=3\n#### x") is None and task.parse_answer("no answer") is None


def test_chain_scorer_reads_the_final_line_only():
    p = task.FAMILIES["short"].make((7, 5, 3), ("+", "-"))
    assert p.prompt == "Q: 7+5-3=?\n" and p.answer == "7+5=12\n12-3=9\n#### 9"
    assert task.score(p, "7+5=12\n12-3=9\n#### 9")
    assert task.score(p, "#### 9")  # the worked lines are not checked
    assert not task.score(p, "7+5=12\n12-3=9\n#### 8")
    assert not task.score(p, "7+5=12\n12-3=9")


def test_pair_scorer_accepts_any_valid_pair_and_nothing_else():
    p10 = pair(10)
    assert p10.prompt == "Q: ?+?=10\n"
    for a in range(1, 10):
        assert task.score(p10, f"{a}+{10 - a}")
    # A mixed answer: two valid answers' digits (4+6 and 1+9) make 4+9, right only for N = 13.
    assert not task.score(p10, "4+9")
    assert task.score(pair(13), "4+9")
    for wrong in ("", "4+6+0", "46", "4-6", "0+10", "10+0", "4 + 6 extra", "4+6\n#### 10", "5+5x"):
        assert not task.score(p10, wrong), wrong
    assert task.score(p10, "4+6\n")  # surrounding whitespace is not part of the answer


@given(st.integers(4, 16), st.integers(0, 9), st.integers(0, 9))
def test_pair_scorer_is_the_sum_rule(total, a, b):
    assert task.score(pair(total), f"{a}+{b}") == (a >= 1 and b >= 1 and a + b == total)


def test_the_response_is_cut_at_the_first_eos_before_scoring():
    p = pair(10)
    ids = task.encode("4+6") + [EOS] + task.encode("+9") + [EOS] * 4
    assert task.decode(ids) == "4+6" and task.score(p, task.decode(ids))
    chain = task.FAMILIES["short"].make((2, 3), ("+",))
    ids = task.encode("2+3=5\n#### 5") + [EOS] + task.encode("\n#### 7")
    assert task.score(chain, task.decode(ids))


def test_held_out_sets_are_fixed_prefixes_and_bounded():
    for fam in task.FAMILIES.values():
        full = fam.test_set(task.HELD_OUT)
        assert fam.test_set(7) == full[:7]  # a smaller evaluation scores a subset of the larger one
        assert len({p.prompt for p in full}) == len(full)
        with pytest.raises(ValueError, match="HELD_OUT"):
            fam.test_set(task.HELD_OUT + 1)
        with pytest.raises(ValueError):
            fam.test_set(0)
    # The original task's held-out problems are the `short` family's (the shipped arith checkpoint
    # never trained on them).
    assert task.test_set(3) == task.FAMILIES["short"].test_set(3)
    assert task.FAMILIES["short"].test_set(1)[0].prompt == "Q: 5+1=?\n"


def test_pair_test_set_is_its_13_prompts():
    problems = task.FAMILIES["pair"].test_set(50)
    assert sorted(p.value for p in problems) == list(range(4, 17))
    assert all(p.prompt == f"Q: ?+?={p.value}\n" for p in problems)
    assert task.FAMILIES["pair"].held_out_prompts() == set()  # nothing to hold out: see the docstring


def test_held_out_sets_of_families_are_disjoint():
    short, long = (task.FAMILIES[n].held_out_prompts() for n in ("short", "long"))
    assert len(short) == len(long) == task.HELD_OUT and not short & long
    rng = random.Random(0)
    draws = {task.FAMILIES["short"].sample(rng).prompt for _ in range(2000)}
    assert draws & short  # the sampler itself draws them: training must filter them (test_train)


def test_pair_sampler_covers_every_valid_answer():
    rng = random.Random(1)
    seen = {task.FAMILIES["pair"].sample(rng).answer for _ in range(3000)}
    assert seen == {f"{a}+{b}" for a in range(1, 10) for b in range(1, 10) if 4 <= a + b <= 16}


def test_specs_old_and_new():
    old = task.families_for({"min_operands": 2, "max_operands": 3, "max_operand": 9, "ops": "+-",
                             "style": "compact", "width": 0})
    assert list(old) == ["short"] and old["short"] == task.FAMILIES["short"]
    new = task.families_for({"families": ["short", "long", "pair"], "chain": {"ops": "+-"}})
    assert new == task.FAMILIES
    mixed = task.test_set(6, families=["short", "long", "pair"])
    assert [p.family for p in mixed] == ["short", "long", "pair"] * 2
    with pytest.raises(ValueError, match="unknown family"):
        task.families_for({"families": ["short", "nope"]})


@pytest.mark.parametrize("bad, match", [(dict(ops="/"), "ops"), (dict(ops=""), "ops"),
                                         (dict(max_operand=0), "max_operand"), (dict(style="poem"), "style"),
                                         (dict(min_operands=1), "min_operands")])
def test_chain_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        task.Chain(**bad)


def test_tokenizer_round_trip():
    for fam in task.FAMILIES.values():
        p = fam.test_set(1)[0]
        assert task.decode(task.encode(p.prompt + p.answer)) == p.prompt + p.answer


# ---------------------------------------------------------------------------------------------
# Settings no problem fits, and task.json files that are not specs: one clear error, no hang
# ---------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.sampled_from(["+", "-", "*", "+-", "-*", "+-*", "++-"]), st.integers(2, 4),
       st.integers(0, 2))
def test_chain_counts_match_enumeration(max_operand, ops, max_operands, shorter):
    """chain_counts (dynamic programming) against every chain written out: the counts, the
    distinct problems, and the sampler's acceptance (its operand count weighted as it draws)."""
    import itertools

    def kept(n, operators):  # chains of n operands that keep every result in [0, 99], by enumeration
        return sum(all(0 <= r <= 99 for *_, r in task.chain_steps(a, o))
                   for a in itertools.product(range(1, max_operand + 1), repeat=n)
                   for o in itertools.product(operators, repeat=n - 1))

    lengths = range(max(2, max_operands - shorter), max_operands + 1)
    counts = task.chain_counts(max_operand, ops, max_operands)
    assert all(counts[n] == kept(n, ops) for n in lengths)
    # The settings alone (a Chain would refuse some of them as too rare to draw).
    fam = SimpleNamespace(min_operands=lengths[0], max_operands=max_operands, max_operand=max_operand, ops=ops)
    drawn = {n: max_operand ** n * len(ops) ** (n - 1) for n in lengths}
    weight = {n: (max_operand * len(ops)) ** n for n in lengths}
    expected = sum(weight[n] * counts[n] / drawn[n] for n in lengths) / sum(weight.values())
    assert abs(task.Chain.acceptance(fam) - expected) <= 1e-12 * max(1.0, expected)
    assert task.Chain.distinct.fget(fam) == sum(kept(n, sorted(set(ops))) for n in lengths)  # each problem once


def test_acceptance_is_the_samplers_share_of_kept_draws():
    """The default families' acceptance agrees with the sampler's own rejection rate."""
    for name in ("short", "long"):
        fam = task.FAMILIES[name]
        rng, kept, tries = random.Random(3), 0, 20000
        counts = list(range(fam.min_operands, fam.max_operands + 1))
        weights = [(fam.max_operand * len(fam.ops)) ** n for n in counts]
        for _ in range(tries):
            n = rng.choices(counts, weights)[0]
            operands = [rng.randint(1, fam.max_operand) for _ in range(n)]
            ops = [rng.choice(fam.ops) for _ in range(n - 1)]
            kept += all(0 <= r <= 99 for *_, r in task.chain_steps(operands, ops))
        p = fam.acceptance()
        assert abs(kept / tries - p) < 5 * (p * (1 - p) / tries) ** 0.5, name  # 5 standard errors


@pytest.mark.parametrize("chain, match", [
    (dict(ops="*", max_operand=99), r"family 'long': of the chains of 4\.\.6 operands from 1\.\.99 with ops '\*', "
                                    r"only 1 in 3\.8e\+07 keeps every result in 0\.\.99"),
    (dict(ops="-", max_operand=1), r"family 'long': .* none keeps every result"),
    (dict(max_operands=10**9), r"max_operands <= 32"),
])
def test_settings_no_problem_fits_are_refused_up_front(chain, match):
    """`--ops '*' --max-operand 99 --mix long:1` once drew forever: now the spec is refused when it
    is read, naming the family and its settings."""
    with pytest.raises(ValueError, match=match):
        task.families_for({"families": ["long"], "chain": chain})


def test_the_sampler_gives_up_after_a_bounded_number_of_draws(monkeypatch):
    """The bound behind the up-front check: a chain family that keeps none of its draws raises
    after SAMPLE_TRIES draws instead of spinning."""
    monkeypatch.setattr(task, "MIN_ACCEPTANCE", 0.0)  # let the hopeless settings through the check
    monkeypatch.setattr(task, "SAMPLE_TRIES", 2000)
    fam = task.Chain(name="long", min_operands=4, max_operands=6, ops="-", max_operand=1)
    with pytest.raises(ValueError, match="none of 2000 draws of chains of 4..6 operands"):
        fam.sample(random.Random(0))
    narrow = task.Chain(name="tiny", max_operand=1, ops="+")  # 2 distinct problems: 1+1, 1+1+1
    with pytest.raises(ValueError, match="has only 2 distinct problems, fewer than the 3 of its test set"):
        narrow.test_set(3)


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content, match", [
    ("{not json", "Expecting property name"),
    (b"\xff\xfe{}", "codec can't decode"),
    ("[1, 2]", r"a task spec is a JSON object, got \[1, 2\] \(list\)"),
    ('"short"', "a task spec is a JSON object"),
    ('{"families": ["short", "prose"]}', "unknown family 'prose'; known: short, long, pair"),
    ('{"families": "short"}', r"families must be a non-empty list of family names, got 'short' \(str\)"),
    ('{"families": []}', "families must be a non-empty list"),
    ('{"families": ["short", "short"]}', "names a family twice"),
    ('{"families": ["short"], "chain": [1]}', "chain must be a JSON object"),
    ('{"families": ["short"], "chain": {"max_operand": "9"}}', r"max_operand must be an integer, got '9' \(str\)"),
    ('{"families": ["short"], "chain": {"width": true}}', "width must be an integer, got True"),
    ('{"families": ["short"], "chain": {"colour": 1}}', r"unknown chain settings \['colour'\]"),
    ('{"max_operand": 9, "mix": {}}', r"unknown chain settings \['mix'\]"),
    ('{"families": ["long"], "chain": {"ops": "*", "max_operand": 99}}', "only 1 in 3.8e\\+07 keeps every result"),
    (NESTED, "nested too deeply"),
    ('{"families": ' + "[" * 500 + "]" * 500 + "}", r"families must be a non-empty list .*\[\[\[\.\.\.\]\]\]"),
], ids=lambda v: (v[:24] + "..." if len(v) > 27 else v) if isinstance(v, str) else None)
def test_a_task_json_that_is_not_a_spec_is_one_clear_error(tmp_path, content, match):
    """Wherever a task.json is read (run.py, bench.py, eval_harness.py): a ValueError naming the
    file and what is wrong, never a raw JSONDecodeError, TypeError, KeyError or RecursionError."""
    file = tmp_path / "task.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as err:
        task.load_task(str(tmp_path))
    assert str(err.value).startswith(f"{file} is not a task spec: ")
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)
    assert re.search(match, str(err.value)), str(err.value)


def test_few_shot_of_a_family_the_task_lacks_is_a_value_error():
    families = task.families_for({"families": ["pair"]})
    problem = task.FAMILIES["short"].test_set(1)[0]
    with pytest.raises(ValueError, match="family 'short' is not one of the task's \\(pair\\)"):
        task.few_shot(problem, 2, families=families)
