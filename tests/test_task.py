"""task.py: the families, their held-out sets, their scorers, and the EOS cut before scoring."""

import random

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
