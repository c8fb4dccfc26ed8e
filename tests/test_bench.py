"""tools/bench.py: the intervals its accuracy figures carry, few-shot problems that stay paired,
and a run that keeps what it measured and never damages earlier results (a full disk, Ctrl-C,
out of memory, settings that do not fit a length)."""

import errno
import json
import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import torch

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
    (["--threads", "100000"], f"--threads must be in 1..{os.cpu_count()} (this machine's CPUs), got 100000"),
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


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it (No such file or directory)"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a bench.json"),
    ('{"rows": []}', "not a bench.json"),  # no command
    ('{"command": "x", "rows": [{"series": "threshold"}]}', "a sweep.json has no summary"),
    ('{"command": "x", "rows": [{"method": "vanilla", "accuracy": "high"}]}', "row 0 ('vanilla') has a value of the "
                                                                              "wrong type"),
])
def test_summary_of_a_bad_file_is_one_line(content, message, tmp_path, capsys):
    file = tmp_path / "bench.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(SystemExit) as err:
        bench.main(["--summary", str(file)])
    assert err.value.code == f"bench.py --summary: error: {file}: " + err.value.code.split(f"{file}: ", 1)[1]
    assert message in err.value.code and "\n" not in err.value.code


# ---------------------------------------------------------------------------------------------
# A run keeps what it measured and never damages earlier results
# ---------------------------------------------------------------------------------------------

TINY_RUN = ["--lengths", "32", "--problems", "1", "--threads", "1"]  # 2 problems (short, pair), ~1 s a row
EARLIER = {"bench.json": '{"command": "an earlier run", "rows": []}\n', "bench.md": "an earlier run\n"}


def earlier_results(folder):
    """An earlier run's result files in `folder`."""
    for name, text in EARLIER.items():
        (folder / name).write_text(text)


def test_a_full_disk_leaves_the_earlier_results_whole(tmp_path, monkeypatch):
    """Out of space halfway through a file: the earlier bench.json and bench.md stay as they were
    (not a truncated bench.json beside a newer bench.md), and no temporary file is left."""
    earlier_results(tmp_path)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def filling_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and str(tmp_path) in str(file) else f

    monkeypatch.setattr(bench, "open", filling_open, raising=False)  # bench.py's own open(), not pytest's
    with pytest.raises(SystemExit) as err:
        bench.main([*TINY_RUN, "--methods", "vanilla", "--out", str(tmp_path)])
    assert "could not write the results to" in str(err.value.code) and "No space left" in str(err.value.code)
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == EARLIER


def test_settings_that_do_not_fit_a_length_are_skipped_up_front(tmp_path, capsys):
    """Blocks of 64 in a 32-token window: that row is left out with one line before anything is
    decoded, and the run writes the rows that fit (it used to die after decoding them)."""
    bench.main([*TINY_RUN, "--methods", "vanilla", "dual+thr0.9-b64", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "bench.py: skipped dual+thr0.9-b64 at --lengths 32: gen_length 32 is not divisible by block_length 64" in err
    assert err.index("skipped") < err.index("[G=32] vanilla")
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["vanilla"]
    with pytest.raises(SystemExit) as exc:  # nothing fits: refused at once
        bench.main([*TINY_RUN, "--methods", "dual+thr0.9-b64", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "no row of this run fits its settings" in capsys.readouterr().err


def test_sweep_points_that_do_not_fit_are_skipped_up_front(tmp_path, capsys, monkeypatch):
    """8 tokens per step in blocks of 4 (4 steps for 8 blocks): that point is skipped with one
    line, the others are measured and written."""
    monkeypatch.setattr(bench, "SWEEP", {"k per step": (4, 8)})
    bench.main([*TINY_RUN, "--sweep", "--block-length", "4", "--out", str(tmp_path)])
    assert ("bench.py: skipped the sweep's k per step 8: steps 4 is not divisible by the number of blocks 8"
            in capsys.readouterr().err)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {(r["series"], r["value"]) for r in rows} == {("k per step", 4)}


def stop_at_second_row(monkeypatch, error):
    """Make decode_all raise `error` once the first row (vanilla) is done: its calls are the
    warm-up, then one per row."""
    real, calls = bench.decode_all, []

    def decode_all(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "decode_all", decode_all)


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, "bench.py: interrupted at dual at --lengths 32"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1,
     "bench.py: error: out of memory at dual at --lengths 32: use a smaller --batch-size (now 1), shorter --lengths"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"), 1,
     "bench.py: error: out of memory at dual at --lengths 32"),
])
def test_a_stopped_run_keeps_its_finished_rows_beside_the_earlier_results(error, code, message, tmp_path, capsys,
                                                                          monkeypatch):
    """Ctrl-C (exit 130) or out of memory (exit 1, naming what to reduce) mid-run: one line, no
    traceback; the finished rows go to bench.partial.json/.md and the earlier results stay."""
    earlier_results(tmp_path)
    stop_at_second_row(monkeypatch, error)
    try:
        bench.main([*TINY_RUN, "--methods", "vanilla", "dual", "--out", str(tmp_path)])
    except SystemExit as exit:
        # sys.exit("message") prints the message and exits with status 1
        status = 1 if isinstance(exit.code, str) else exit.code
        text = exit.code if isinstance(exit.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    except BaseException as raw:  # noqa: B036 (a raw KeyboardInterrupt would otherwise stop pytest itself)
        pytest.fail(f"raw {type(raw).__name__} instead of one line")
    assert status == code and text.startswith(message) and "\n" not in text
    assert f"1 finished row written to {tmp_path / 'bench.partial.json'}" in text
    assert [r["method"] for r in json.loads((tmp_path / "bench.partial.json").read_text())["rows"]] == ["vanilla"]
    assert "| 32 | vanilla |" in (tmp_path / "bench.partial.md").read_text()
    assert all((tmp_path / name).read_text() == t for name, t in EARLIER.items())


# ---------------------------------------------------------------------------------------------
# Either family: a Dream-format checkpoint runs the same benchmark
# ---------------------------------------------------------------------------------------------


def dream_checkpoint(path):
    """A tiny random Dream-format directory (Qwen2 names, q/k/v biases, the shifted head) with the
    shipped checkpoint's task.json: the benchmark reads nothing else."""
    import shutil

    from model import DiffusionLM, ModelConfig, init_weights, save_model

    cfg = ModelConfig(family="dream", d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=len(task.vocabulary()), rope_theta=10000.0, max_sequence_length=2048,
                      **task.special_ids("dream"))
    save_model(init_weights(DiffusionLM(cfg), seed=0), str(path))
    shutil.copy(os.path.join(bench.DEFAULT_MODEL, "task.json"), path)
    return path


def test_a_dream_checkpoint_runs_one_problem(tmp_path, capsys):
    """One problem per family at G = 32: the header names the family, and the forwards are Dream's:
    vanilla runs the whole canvas 32 times; a DualCache step runs the 32-token block and the row
    before it (the shifted head predicts the block's first token from there), 33 tokens."""
    ckpt = dream_checkpoint(tmp_path / "dream")
    bench.main(["--model", str(ckpt), "--lengths", "32", "--problems", "1", "--threads", "1", "--methods", "vanilla",
                "dual", "--out", str(tmp_path / "out")])
    run = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert f"checkpoint {os.path.relpath(ckpt, bench.ROOT)} (Dream), 0-shot" in run["command"]
    assert [r["method"] for r in run["rows"]] == ["vanilla", "dual"]
    vanilla, dual = run["rows"]
    L = vanilla["prompt_tokens"] + 32  # the mean canvas over the problems (one per family that fits)
    assert vanilla["nfe"] == dual["nfe"] == 32  # one token per step
    assert vanilla["query_tokens"] == 32 * L and dual["query_tokens"] == L + 31 * 33
    assert dual["max_logit_drift"] > 0  # the cache is stale, measured on the shifted model too


def test_profile_of_a_dream_dual_step(tmp_path, capsys):
    """--profile runs one DualCache step by hand: on a shifted model, from the row before the block."""
    bench.main(["--model", str(dream_checkpoint(tmp_path / "dream")), "--lengths", "32", "--threads", "1",
                "--profile"])
    assert "Self CPU time total" in capsys.readouterr().out
