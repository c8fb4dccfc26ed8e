"""tools/bench.py: the intervals its accuracy figures carry, and few-shot problems that stay paired."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools import bench, task


def test_wilson_against_a_hand_computation():
    # 8 of 10 at 95%: centre (0.8 + z²/20) / (1 + z²/10), half-width z / (1 + z²/10) * sqrt(0.016 + z²/400).
    z = bench.Z95
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.016 + z * z / 400)
    assert bench.wilson(8, 10) == pytest.approx((centre - half, centre + half))
    assert bench.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = bench.wilson(0, 13)  # 0 of 13 (the pair family): the interval still has width
    assert low == 0.0 and high == pytest.approx(0.2281, abs=1e-4)
    assert bench.wilson(13, 13)[1] == pytest.approx(1.0)


@given(right=st.integers(0, 300), extra=st.integers(0, 300))
def test_wilson_contains_the_estimate(right, extra):
    n = right + extra
    if n:
        low, high = bench.wilson(right, n)
        assert 0 <= low <= right / n <= high <= 1


outcomes = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200)


@given(pairs=outcomes)
def test_paired_difference_contains_the_estimate_and_is_antisymmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    d, low, high = bench.paired_difference(a, b)
    assert d == pytest.approx((sum(a) - sum(b)) / len(a))
    assert -1 <= low <= d + 1e-12 and d - 1e-12 <= high <= 1
    d2, low2, high2 = bench.paired_difference(b, a)
    assert (d2, low2, high2) == pytest.approx((-d, -high, -low))


def test_paired_difference_is_narrower_than_the_independent_one():
    """Two methods that agree on most problems: pairing narrows the interval (Newcombe's point)."""
    a = [True] * 80 + [False] * 20
    b = [True] * 78 + [False] * 2 + [True] * 1 + [False] * 19  # differ on 3 problems of 100
    d, low, high = bench.paired_difference(a, b)
    (l1, u1), (l2, u2) = bench.wilson(80, 100), bench.wilson(79, 100)
    independent = math.sqrt((0.80 - l1) ** 2 + (u2 - 0.79) ** 2) + math.sqrt((u1 - 0.80) ** 2 + (0.79 - l2) ** 2)
    assert d == pytest.approx(0.01) and high - low < independent / 2


def test_few_shot_problems_keep_their_family_and_answer():
    families = task.FAMILIES
    plain = bench.problems_for(families, 64, 5)
    shot = bench.problems_for(families, 64, 5, shots=8)
    assert [(p.family, p.answer, p.value) for p in plain] == [(p.family, p.answer, p.value) for p in shot]
    assert all(s.prompt.endswith(p.prompt) and s.prompt.count("Q: ") == 9 for p, s in zip(plain, shot))


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "4096"], "--lengths 4096: the longest prompt (17 tokens at --shots 0) + 4096 exceeds the model's "
                            "max_sequence_length 2048"),
    (["--lengths", "2048", "--shots", "8"], "exceeds the model's max_sequence_length 2048"),
    (["--out", "UNWRITABLE"], "is not a writable directory"),
    (["--sweep", "--out", "UNWRITABLE"], "is not a writable directory"),
    (["--shots", "-1"], "--shots must be in 0..8, got -1"),
])
def test_bad_runs_are_refused_before_decoding(argv, message, capsys, tmp_path):
    """A run that cannot fit the model, or whose results could not be written, is refused at once
    (one line, exit status 2), not after an hour of decoding."""
    (tmp_path / "a_file").write_text("")  # a directory under a file cannot be created, on any OS
    argv = [str(tmp_path / "a_file" / "out") if a == "UNWRITABLE" else a for a in argv]
    argv = ["--out", str(tmp_path), *argv] if "--out" not in argv else argv
    with pytest.raises(SystemExit) as err:
        bench.main(["--block-length", "32", "--methods", "vanilla", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_summary_prints_the_short_table_of_earlier_runs(tmp_path, capsys):
    row = {"method": "dual+thr0.9", "block": 32, "accuracy": 0.9, "accuracy_ci": [0.8, 0.95], "acc_short": 1.0,
           "acc_short_ci": [0.9, 1.0], "acc_pair": 0.5, "acc_pair_ci": None, "vs_vanilla": [-0.01, -0.05, 0.03],
           "nfe": 14.5, "seconds": 8.12, "speedup": 25.3}
    (tmp_path / "bench.json").write_text(json.dumps({"command": "`python -m tools.bench ...`", "rows": [row]}))
    bench.main(["--summary", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "`python -m tools.bench ...`"
    assert out[-1] == "| dual+thr0.9 | 32 | 90.0% [80–95] | 100.0% [90–100] | 50.0% | -1.0 [-5.0, +3.0] | 14.5 | 8.12 | 25.3× |"
