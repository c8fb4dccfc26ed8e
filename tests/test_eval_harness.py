"""tools/eval_harness.py: the lm-eval adapter gives bench.py's scores, alone or data-parallel, offline.

The equivalences: lm-eval + dllm on a toy task == decode.generate + task.py's scorer on the same
problems (bench.py's own decoding loop), per response, zero-shot and few-shot (lm-eval's
--num_fewshot context == task.few_shot's prompt); two torchrun CPU processes == one process;
the Monte-Carlo log-likelihood picks the right worked answer and tightens with more samples.
Everything runs on the CPU from local files (the Hub is switched off).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -r tools/requirements-eval.txt")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install -r tools/requirements-eval.txt")

import torch  # noqa: E402
from conftest import ROOT  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tools import bench  # noqa: E402
from tools import eval_harness as eh  # noqa: E402
from tools import task  # noqa: E402
from decode import DecodeConfig, generate  # noqa: E402
from model import load_model  # noqa: E402

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # everything must come from disk

# The checkpoint the toy task files were written from (test_toy_task_files_are_up_to_date).
SHIPPED = eh.DEFAULT_CHECKPOINT
LIMIT = 24
# A lossy setting (4 tokens committed per step, DualCache): it gets some problems wrong, so
# agreeing with bench.py on every response is a real check, not 100% == 100%.
DECODE = dict(gen_length=32, block_length=32, steps=8, cache="dual")
MODEL_ARGS = dict(pretrained=SHIPPED, **DECODE)


def task_manager():
    """lm-eval's task index of our task files only (fast: none of lm-eval's built-in folders)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=eh.TASK_DIR, include_defaults=False)


def evaluate(tasks, limit, num_fewshot=None, **model_args):
    """lm-eval's simple_evaluate with dllm on our task files."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model="dllm", model_args=model_args, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                           log_samples=True, task_manager=task_manager())


def bench_responses(problems, batch_size):
    """bench.py's decoding loop on the problems: response texts cut at EOS, as bench scores them."""
    model = load_model(SHIPPED, device="cpu")
    cfg = DecodeConfig.for_model(model.config, **DECODE)
    outputs, *_ = bench.decode_all(model, problems, cfg, batch_size)
    return [task.decode(o) for o in outputs]


def shipped_families():
    return task.families_for(task.load_task(SHIPPED))


def short_family():
    return shipped_families()["short"]


@pytest.fixture(scope="module")
def single_run():
    return evaluate(["toy_short"], LIMIT, **MODEL_ARGS)


# ---------------------------------------------------------------------------------------------
# Generation: the harness's score is bench.py's
# ---------------------------------------------------------------------------------------------


def test_toy_task_score_equals_bench(single_run):
    fam = short_family()
    problems = fam.test_set(LIMIT)
    expected = bench_responses(problems, batch_size=1)
    samples = sorted(single_run["samples"]["toy_short"], key=lambda s: s["doc_id"])
    # The same problems, in order, and the same response text for every one of them.
    assert [s["doc"]["prompt"] for s in samples] == [p.prompt for p in problems]
    assert [s["resps"][0][0] for s in samples] == expected
    bench_score = sum(fam.score(p, r) for p, r in zip(problems, expected)) / LIMIT
    assert 0 < bench_score < 1, "the setting should get some problems wrong, or the check is weak"
    assert single_run["results"]["toy_short"]["exact_match,none"] == pytest.approx(bench_score)


def test_batched_generation_equals_bench_batches():
    """batch_size 4: left padding with an attention mask, the same batches bench.py forms."""
    from lm_eval.api.instance import Instance

    problems = short_family().test_set(8)
    assert len({len(p.prompt) for p in problems[:4]}) > 1, "the first batch should need padding"
    lm = eh.DiffusionLM(**MODEL_ARGS, batch_size=4)
    requests = [Instance("generate_until", {}, (p.prompt, {"until": [], "max_gen_toks": 32}), i)
                for i, p in enumerate(problems)]
    assert lm.generate_until(requests) == bench_responses(problems, batch_size=4)


# ---------------------------------------------------------------------------------------------
# Few-shot: lm-eval's --num_fewshot context is task.few_shot's prompt
# ---------------------------------------------------------------------------------------------


def lm_eval_requests(name, num_fewshot, limit):
    """The requests lm-eval builds for a toy task at num_fewshot shots (contexts only, no model)."""
    task_obj = task_manager().load([name])["tasks"][name]
    task_obj.set_config(key="num_fewshot", value=num_fewshot)
    task_obj.set_fewshot_seed(seed=1234)  # lm-eval's default few-shot seed: the toy shots must not depend on it
    task_obj.build_all_requests(limit=limit)
    return task_obj.instances


@pytest.mark.parametrize("num_fewshot", [0, 1, 8])
def test_few_shot_context_is_task_few_shot(num_fewshot):
    """Every document's context, generation and multiple choice, is task.few_shot(problem, K).prompt."""
    problems = short_family().test_set(6)
    expected = [task.few_shot(p, num_fewshot, families=shipped_families()).prompt for p in problems]
    generation = sorted(lm_eval_requests("toy_short", num_fewshot, len(problems)), key=lambda r: r.doc_id)
    assert [r.args[0] for r in generation] == expected
    choices = lm_eval_requests("toy_short_mc", num_fewshot, len(problems))
    for p, context in zip(problems, expected):
        mine = [r.args for r in choices if r.doc["prompt"] == p.prompt]
        assert {ctx for ctx, _ in mine} == {context}  # the same context before every choice
        assert p.answer in {continuation for _, continuation in mine}  # the choices themselves unchanged


def test_too_many_shots_is_a_clear_error():
    with pytest.raises(ValueError, match=rf"--num_fewshot 9: the toy tasks take 0..{task.MAX_SHOTS} shots"):
        lm_eval_requests("toy_short", 9, 1)


def test_few_shot_score_equals_bench():
    """--num_fewshot 1: lm-eval's score and responses are bench.py's decoding of task.few_shot's prompts.
    (The shipped checkpoint was trained without shots: most responses are empty, some are not.)"""
    n, k = 8, 1
    res = evaluate(["toy_short"], n, num_fewshot=k, **MODEL_ARGS)
    problems = [task.few_shot(p, k, families=shipped_families()) for p in short_family().test_set(n)]
    expected = bench_responses(problems, batch_size=1)
    samples = sorted(res["samples"]["toy_short"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [p.prompt for p in problems]
    assert [s["resps"][0][0] for s in samples] == expected
    assert any(expected), "every response empty: the comparison would be weak"
    score = sum(short_family().score(p, r) for p, r in zip(problems, expected)) / n
    assert res["results"]["toy_short"]["exact_match,none"] == pytest.approx(score)
    assert res["n-shot"]["toy_short"] == k


# Run under torchrun: what `python -m tools.eval_harness --tasks toy_short ...` runs, minus the CLI's
# index of lm-eval's ~200 built-in task folders (30+ s per process on a busy 2-core machine).
DRIVER = """
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
from tools import eval_harness; import test_eval_harness as t
res = t.evaluate(["toy_short"], int(sys.argv[1]), **t.MODEL_ARGS)
if res is not None:  # rank 0 alone gets the gathered results
    json.dump({"score": res["results"]["toy_short"]["exact_match,none"],
               "docs": sorted(s["doc_id"] for s in res["samples"]["toy_short"])}, open(sys.argv[2], "w"))
eval_harness.close_process_group()
"""


def test_two_processes_score_as_one(single_run, tmp_path):
    """torchrun, 2 CPU processes (gloo): each takes half of the documents, lm-eval gathers them."""
    n, out, driver = 12, tmp_path / "rank0.json", tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(n), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "destroy_process_group" not in proc.stderr  # torch warns when a group is left open
    result = json.loads(out.read_text())
    assert result["docs"] == list(range(n))  # both ranks' halves, gathered on rank 0
    one = [s["exact_match"] for s in single_run["samples"]["toy_short"] if s["doc_id"] < n]
    assert result["score"] == pytest.approx(sum(one) / n)


# ---------------------------------------------------------------------------------------------
# Log-likelihood: LLaDA's Monte-Carlo estimate
# ---------------------------------------------------------------------------------------------


def test_multiple_choice_ranks_the_right_answer_first():
    res = evaluate(["toy_short_mc"], 16, pretrained=SHIPPED, mc_num=16, batch_size=16, check_greedy=False)
    assert res["results"]["toy_short_mc"]["acc,none"] >= 0.75


def test_estimate_tightens_with_more_samples():
    model = load_model(SHIPPED, device="cpu")
    p = short_family().test_set(2)[1]
    context, continuation = task.encode(p.prompt), task.encode(p.answer)

    def spread(mc_num):
        estimates = [eh.mc_loglikelihood(model, context, continuation, model.config.mask_token_id, mc_num, 64,
                                         torch.Generator().manual_seed(seed)) for seed in range(8)]
        return statistics.pstdev(estimates), estimates

    small, large = spread(2), spread(64)
    assert large[0] < 0.5 * small[0]  # 32x the samples: ~1/5.7 of the spread in expectation
    assert all(e <= 0 for e in large[1])  # a bound on a log-probability
    # Seeded: the same generator seed gives the same estimate.
    again = eh.mc_loglikelihood(model, context, continuation, model.config.mask_token_id, 64, 64,
                                torch.Generator().manual_seed(0))
    assert again == large[1][0]


def test_greedy_check_and_rolling_error():
    """is_greedy is LLaDA's check: mask the N continuation tokens and unmask one argmax per step."""
    from lm_eval.api.instance import Instance

    lm = eh.DiffusionLM(pretrained=SHIPPED, mc_num=4, batch_size=4)
    p = short_family().test_set(1)[0]
    N = len(task.encode(p.answer))
    cfg = DecodeConfig.for_model(lm.model.config, gen_length=N, block_length=N, steps=N)
    greedy_text = task.decode(generate(lm.model, torch.tensor([task.encode(p.prompt)]), cfg).generated[0].tolist())
    wrong = greedy_text[:-1] + ("1" if greedy_text[-1] != "1" else "2")
    requests = [Instance("loglikelihood", {}, (p.prompt, c), i) for i, c in enumerate((greedy_text, wrong))]
    results = lm.loglikelihood(requests)
    assert [greedy for _, greedy in results] == [True, False]
    assert all(ll < 0 for ll, _ in results)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


# ---------------------------------------------------------------------------------------------
# model_args, max_gen_toks, stop strings, chat template, task files
# ---------------------------------------------------------------------------------------------


def test_every_decode_config_field_is_a_model_arg():
    """Read from the dataclass: a field added to DecodeConfig later needs no change here."""
    for f in dataclasses.fields(DecodeConfig):
        value = f.default  # as declared (quirks=False becomes a Quirks() only inside DecodeConfig)
        if value is None:
            continue
        _, kwargs = eh.parse_model_args({f.name: str(value)})  # as typed on the command line
        assert kwargs[f.name] == value and type(kwargs[f.name]) is type(value), f.name
    # Sequence-valued fields (AdaBlock's delimiter_ids) from lm-eval's parsed list or from a string.
    for name, (_, hint) in eh._settings().items():
        if "tuple[int" in str(hint):
            assert eh.parse_model_args({name: "[21, 74]"})[1][name] == (21, 74)
            assert eh.parse_model_args({name: [21]})[1][name] == (21,)
    from decode import Quirks

    assert DecodeConfig(**eh.parse_model_args({"quirks": "true"})[1]).quirks == Quirks.original()  # the one switch
    harness, kwargs = eh.parse_model_args({"threshold": "0.9", "cache": "dual", "gen_length": 256, "mc_num": "8",
                                           "factor": "None", "check_greedy": "false"})
    assert kwargs == dict(threshold=0.9, cache="dual", gen_length=256, block_length=256, steps=256, factor=None)
    assert harness.mc_num == 8 and harness.check_greedy is False


def test_model_args_win_over_lm_eval_flags():
    """lm-eval always passes --batch_size (default 1) beside model_args: batch_size=4 must not collide."""
    lm = eh.DiffusionLM.create_from_arg_obj(dict(pretrained=SHIPPED, batch_size=4), {"batch_size": 1, "device": None})
    assert lm.config.batch_size == 4
    lm = eh.DiffusionLM.create_from_arg_string(f"pretrained={SHIPPED},threshold=0.9", {"batch_size": "2"})
    assert lm.config.batch_size == 2 and lm.decode_config.threshold == 0.9


def test_bad_model_args_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model_args \['thresh'\].*threshold"):
        eh.parse_model_args({"thresh": 0.9})
    with pytest.raises(ValueError, match="threshold='high': expected float"):
        eh.parse_model_args({"threshold": "high"})
    with pytest.raises(ValueError, match="steps=2.5: expected int"):
        eh.parse_model_args({"steps": 2.5})
    with pytest.raises(ValueError, match="not divisible"):
        eh.DiffusionLM(pretrained=SHIPPED, gen_length=48, block_length=32)


@pytest.mark.parametrize("text, value", [("true", True), ("Yes", True), ("1", True), (1, True), (True, True),
                                         ("FALSE", False), ("no", False), ("No", False), ("0", False), (0, False)])
def test_bool_model_args(text, value):
    assert eh.parse_model_args({"stop_at_eos": text})[1]["stop_at_eos"] is value


@pytest.mark.parametrize("text", ["nope", "2", 2, "", "on", 1.5])
def test_bool_model_args_refuse_anything_else(text):
    with pytest.raises(ValueError, match=r"stop_at_eos=.*: expected a bool \(true/false, yes/no, 1/0\)"):
        eh.parse_model_args({"stop_at_eos": text})


def test_arg_string_parses_brackets_and_refuses_duplicates():
    """lm-eval's simple_parse_args_string splits on every comma and lets the last key win."""
    lm = eh.DiffusionLM.create_from_arg_string(f"pretrained={SHIPPED},delimiter_ids=[21,74],threshold=0.9")
    assert lm.decode_config.delimiter_ids == (21, 74) and lm.decode_config.threshold == 0.9
    assert eh.parse_arg_string(" a=[1, 2], b='x,y' ,c=(3,4)") == {"a": "[1, 2]", "b": "'x,y'", "c": "(3,4)"}
    with pytest.raises(ValueError, match="model_args threshold given twice: 0.9, then 0.5"):
        eh.DiffusionLM.create_from_arg_string("threshold=0.9,threshold=0.5")
    with pytest.raises(ValueError, match="model_args: expected key=value, got 'threshold'"):
        eh.parse_arg_string("threshold,cache=dual")
    # The command line: lm-eval merges repeated keys with a warning; the adapter refuses them first.
    with pytest.raises(SystemExit, match="threshold given twice"):
        eh.main(["--tasks", "toy_short", "--model_args", "cache=dual,threshold=0.9", "threshold=0.5"])


def test_explicit_none_is_kept():
    """eos_id=none means no EOS id, from a string or from lm-eval's parsed None; it is not dropped."""
    assert eh.DiffusionLM.create_from_arg_string(f"pretrained={SHIPPED},eos_id=none").decode_config.eos_id is None
    lm = eh.DiffusionLM(pretrained=SHIPPED, eos_id=None)
    assert lm.decode_config.eos_id is None and lm.stop_ids == {lm.decode_config.eot_id}
    with pytest.raises(ValueError, match="cache: None is not allowed"):
        eh.parse_model_args({"cache": None})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda():
    """An asked-for CUDA device is an error; lm-eval's own default --device (cuda:0) is not a request."""
    for model_args, extra in (({"device": "cuda"}, {}), ({}, {"device": "cuda"}), ({"device": "cuda:0"}, {})):
        with pytest.raises(ValueError, match="device='cuda.*' asked for, but .* no CUDA device"):
            eh.DiffusionLM.create_from_arg_obj(dict(pretrained=SHIPPED, **model_args), extra)
    lm = eh.DiffusionLM.create_from_arg_obj({"pretrained": SHIPPED}, {"device": eh.LM_EVAL_DEFAULT_DEVICE})
    assert lm.device.type == "cpu" and lm.get_model_info()["device"] == "cpu"


def test_max_gen_toks_and_prompts_are_checked():
    from lm_eval.api.instance import Instance

    lm = eh.DiffusionLM(pretrained=SHIPPED, block_length=32)
    limit = (lm.model.config.max_sequence_length - 1) // 32 * 32  # whole blocks, room for one prompt token
    assert lm.config_for({"max_gen_toks": str(limit)}).gen_length == limit
    for bad in (10 ** 6, limit + 1, 0, "abc", 2.5):
        with pytest.raises(ValueError, match=rf"max_gen_toks={bad!r}: expected an integer in 1..{limit} "):
            lm.config_for({"max_gen_toks": bad})
    with pytest.raises(ValueError, match=r"gen_length 2048 leaves no room for a prompt: it must be below .* 2048"):
        eh.DiffusionLM(pretrained=SHIPPED, gen_length=2048)
    emoji = Instance("generate_until", {}, ("Q: 1+1=?\U0001F600\n", {"until": [], "max_gen_toks": 32}), 0)
    with pytest.raises(ValueError, match="cannot encode '\U0001F600' \\(U\\+1F600\\)"):
        lm.generate_until([emoji])


@given(st.sampled_from([8, 16, 32, 64]), st.integers(1, 8), st.integers(1, 4), st.integers(1, 600))
def test_max_gen_toks_rounds_up_to_whole_blocks(block, blocks, steps_per_block, max_gen_toks):
    base = DecodeConfig(gen_length=block * blocks, block_length=block, steps=steps_per_block * blocks)
    cfg = eh.fit_to_max_gen_toks(base, max_gen_toks, max_length=4096)
    assert cfg.block_length == block and cfg.gen_length % block == 0
    assert max_gen_toks <= cfg.gen_length < max_gen_toks + block
    assert cfg.steps * base.gen_length == base.steps * cfg.gen_length  # steps per token kept


def test_stop_strings_cut_at_the_first_one():
    assert eh.cut_at_stop("12\n\nQuestion: 3", ["Question:", "\n\n"]) == "12"
    assert eh.cut_at_stop("a</s>b", []) == "a</s>b"


def test_chat_template_missing_is_an_error():
    lm = eh.DiffusionLM(pretrained=SHIPPED)
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "Q: 1+1=?"}])


def test_toy_task_files_are_up_to_date(tmp_path):
    """The committed task files are what --write-toy-tasks writes from task.py today."""
    for path in eh.write_toy_tasks(str(tmp_path)):
        name = os.path.basename(path)
        with open(path) as new, open(os.path.join(eh.TASK_DIR, name)) as old:
            assert new.read() == old.read(), \
                f"tools/eval_tasks/{name} is stale: run python -m tools.eval_harness --write-toy-tasks"


def test_toy_tasks_cover_every_family(tmp_path):
    """A checkpoint with several families (task.py's task.json format) gets a task per family,
    scored by the family's own rule: for `pair` any valid pair is right."""
    import importlib.util

    ckpt, out = tmp_path / "ckpt", tmp_path / "tasks"
    ckpt.mkdir(), out.mkdir()
    (ckpt / "task.json").write_text(json.dumps({"families": ["short", "long", "pair"]}))
    names = {os.path.basename(p) for p in eh.write_toy_tasks(str(out), str(ckpt))}
    assert {"toy_short.yaml", "toy_long.yaml", "toy_pair.yaml", "toy_short_mc.yaml", "toy_long_mc.yaml"} <= names
    assert "toy_pair_mc.yaml" not in names  # several right answers: no single multiple-choice key
    # eval_tasks/utils.py, run against these files (it reads toy_spec.json beside itself).
    (out / "utils.py").write_text(open(os.path.join(eh.TASK_DIR, "utils.py")).read())
    spec = importlib.util.spec_from_file_location("toy_utils_under_test", out / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = json.loads((out / "toy_pair.jsonl").read_text().splitlines()[0])
    n = doc["value"]
    a = max(1, n - 9)
    assert utils.is_correct(doc, f"{a}+{n - a}") and utils.is_correct(doc, f"{n - a}+{a}")
    assert not utils.is_correct(doc, f"{a}+{n - a + 1}")
    long_doc = json.loads((out / "toy_long.jsonl").read_text().splitlines()[0])
    assert utils.is_correct(long_doc, long_doc["answer"]) and not utils.is_correct(long_doc, "#### 100")
    assert "max_gen_toks: 64" in (out / "toy_long.yaml").read_text()  # the family's own window


def test_cli_defaults():
    assert eh.with_defaults(["--tasks", "toy_short"]) == ["--tasks", "toy_short", "--model", "dllm",
                                                         "--include_path", eh.TASK_DIR]
    assert eh.with_defaults(["--model", "hf", "--include_path", "x"]) == ["--model", "hf", "--include_path", "x"]
    assert eh.with_defaults(["ls", "tasks"]) == ["ls", "tasks"]


# ---------------------------------------------------------------------------------------------
# Reliability: the task writer keeps what it did not write; sampling, results, Ctrl-C, memory
# ---------------------------------------------------------------------------------------------


def write_toy_tasks_cli(*args):
    """`python -m tools.eval_harness --write-toy-tasks ARGS`: its exit status (0 when it returns)."""
    try:
        eh.main(["--write-toy-tasks", *map(str, args)])
    except SystemExit as exit:
        return exit.code
    return 0


def folder(path):
    return {f.name: f.read_text() for f in path.iterdir()}


def test_task_writer_refuses_a_checkpoint_that_is_not_there(tmp_path, capsys):
    """A typo (checkpoints/mx) used to read as the default spec: exit 0, and the task files of
    the families it lacks deleted. Now one line and nothing touched."""
    out = tmp_path / "tasks"
    assert write_toy_tasks_cli("--checkpoint", os.path.join(ROOT, "checkpoints", "mix"), "--out", out) == 0
    before = folder(out)
    assert "toy_long.yaml" in before and "toy_pair.jsonl" in before
    assert write_toy_tasks_cli("--checkpoint", tmp_path / "mx", "--out", out) == 2
    assert f"--checkpoint {tmp_path / 'mx'}: no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a folder that is no checkpoint (a parent folder, say)
    assert write_toy_tasks_cli("--checkpoint", tmp_path / "empty", "--out", out) == 2
    assert "is not a checkpoint: it holds neither task.json nor config.json" in capsys.readouterr().err
    assert folder(out) == before


def test_task_writer_writes_beside_files_it_does_not_own(tmp_path, capsys):
    """Only files the writer wrote itself (its manifest, with hashes) are replaced or removed:
    a same-named file of the user's (or one edited since) stops the run before anything is
    written; other files stay; its own files of families the new spec lacks go."""
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "toy_short.yaml").write_text("# my own task\n")
    assert write_toy_tasks_cli("--out", out) == 2
    assert "toy_short.yaml, not written by --write-toy-tasks" in capsys.readouterr().err
    assert folder(out) == {"toy_short.yaml": "# my own task\n"}

    (out / "toy_short.yaml").unlink()
    (out / "toy_mine.yaml").write_text("task: toy_mine\n")  # a task of the user's, beside the toy ones
    assert write_toy_tasks_cli("--checkpoint", os.path.join(ROOT, "checkpoints", "mix"), "--out", out) == 0
    (out / "toy_pair.yaml").write_text((out / "toy_pair.yaml").read_text() + "# edited\n")  # the user's now
    assert write_toy_tasks_cli("--out", out) == 0  # the shipped checkpoint: the short family only
    names = set(folder(out))
    assert {"toy_short.yaml", "toy_mine.yaml", "toy_pair.yaml"} <= names  # its own, the user's, an edited one
    assert not names & {"toy_long.yaml", "toy_long.jsonl", "toy_long_mc.yaml", "toy_pair.jsonl"}  # its stale ones
    assert "kept toy_mine.yaml, toy_pair.yaml in" in capsys.readouterr().err
    assert json.loads((out / eh.MANIFEST).read_text()).keys() == {
        "toy_spec.json", "toy_short.jsonl", "toy_short.yaml", "toy_short_mc.jsonl", "toy_short_mc.yaml"}


def sampled_responses(batch_size, prompts):
    """generate_until at temperature 5, where the toy model's samples vary (one prompt asked twice,
    as lm-eval's `repeats` asks)."""
    from lm_eval.api.instance import Instance

    lm = eh.DiffusionLM(**MODEL_ARGS, temperature=5.0, batch_size=batch_size)
    requests = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 32}), i)
                for i, p in enumerate(prompts)]
    return lm.generate_until(requests)


def test_sampled_responses_do_not_depend_on_batch_size():
    """The seed is per request: at temperature > 0 a response is the same at batch_size 1, 2 or
    4 (decode.generate draws one noise tensor for the whole batch, so sampled requests are decoded
    one at a time). Each response is decode.generate on its prompt alone with the request's seed."""
    problems = short_family().test_set(3)
    prompts = [problems[0].prompt, problems[1].prompt, problems[0].prompt, problems[2].prompt]
    alone = sampled_responses(1, prompts)
    assert sampled_responses(2, prompts) == alone and sampled_responses(4, prompts) == alone
    model = load_model(SHIPPED, device="cpu")
    cfg = DecodeConfig.for_model(model.config, **DECODE, temperature=5.0)
    greedy = bench_responses(problems, batch_size=1)
    expected = []
    for i, p in enumerate(prompts):
        ids = task.encode(p)
        generator = torch.Generator().manual_seed(eh.request_seed(1234, ids, prompts[:i].count(p)))
        out = generate(model, torch.tensor([ids]), cfg, generator=generator).generated[0].tolist()
        expected.append(task.decode(out))
    assert alone == expected
    assert alone[:2] + alone[3:] != greedy, "temperature 5 should sample something else than the argmax somewhere"
    assert alone[0] != alone[2], "a repeated request should get a sample of its own"


def run_cli(monkeypatch, *args):
    """`python -m tools.eval_harness --tasks toy_short --limit 2 ARGS` in this process: its exit
    status (0 when it returns) and stderr's last line."""
    import lm_eval.tasks

    class OurTasksOnly(lm_eval.tasks.TaskManager):  # without the index of lm-eval's ~200 task folders (slow)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OurTasksOnly)
    monkeypatch.setattr(sys, "argv", ["eval_harness"])
    argv = ["--tasks", "toy_short", "--limit", "2", "--model_args", "gen_length=32,steps=8", *map(str, args)]
    try:
        eh.main(argv)
    except SystemExit as exit:
        return (1 if isinstance(exit.code, str) else exit.code), exit.code
    except BaseException as raw:  # noqa: B036 (a raw KeyboardInterrupt would otherwise stop pytest itself)
        pytest.fail(f"raw {type(raw).__name__}: {raw}")
    return 0, None


def test_an_unwritable_output_path_fails_before_the_run(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    status, message = run_cli(monkeypatch, "--output_path", tmp_path / "a_file" / "out")
    assert status == 1
    assert message == f"python -m tools.eval_harness: error: --output_path {tmp_path / 'a_file' / 'out'}: cannot " \
                      f"write there (Not a directory)"


def test_results_are_renamed_into_place_or_the_run_fails(tmp_path, monkeypatch):
    """lm-eval writes into a staging folder beside the output and the files are renamed into
    place when complete; where lm-eval could not save them (it warns and exits 0 alone), the
    run fails."""
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    out = tmp_path / "results"
    assert run_cli(monkeypatch, "--output_path", out / "run.json", "--log_samples") == (0, None)
    names = sorted(f.name for f in out.iterdir())
    assert len(names) == 2 and names[0].startswith("run_") and names[1].startswith("samples_toy_short_")
    assert json.loads((out / names[0]).read_text())["results"]["toy_short"]["alias"] == "toy_short"
    monkeypatch.setattr(EvaluationTracker, "save_results_aggregated", lambda self, *a, **k: None)  # saves nothing
    status, message = run_cli(monkeypatch, "--output_path", out / "again.json")
    assert status == 1 and "lm-eval could not save the results to --output_path" in message
    assert sorted(f.name for f in out.iterdir()) == names  # no staging folder left behind


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, None),
    (torch.OutOfMemoryError("CUDA out of memory"), 1, "python -m tools.eval_harness: error: out of memory: use a "
                                                      "smaller batch_size in --model_args"),
    (MemoryError(), 1, "python -m tools.eval_harness: error: out of memory"),
])
def test_ctrl_c_and_out_of_memory_are_one_line(error, code, message, tmp_path, monkeypatch, capsys):
    def stop(self, requests):
        raise error

    monkeypatch.setattr(eh.DiffusionLM, "generate_until", stop)
    status, text = run_cli(monkeypatch, "--output_path", tmp_path / "out")
    assert status == code
    if code == 130:
        text = capsys.readouterr().err.strip().splitlines()[-1]
        assert text == f"python -m tools.eval_harness: interrupted; nothing was saved to {tmp_path / 'out'} (lm-eval " \
                       "saves its results at the end)"
    else:
        assert text.startswith(message) and "\n" not in text
    assert list((tmp_path / "out").iterdir()) == []  # no staging folder left behind


# ---------------------------------------------------------------------------------------------
# Either family: a Dream-format checkpoint behind the same adapter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dream_ckpt(tmp_path_factory):
    """A tiny random Dream-format directory (Qwen2 names, q/k/v biases, the shifted head) with the
    toy tokenizer under Dream's token names (<|mask|>, <|beginoftext|>)."""
    import shutil

    from model import DiffusionLM, ModelConfig, init_weights, save_model

    path = tmp_path_factory.mktemp("dream") / "ckpt"
    cfg = ModelConfig(family="dream", d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=len(task.vocabulary()), rope_theta=10000.0, max_sequence_length=2048,
                      **task.special_ids("dream"))
    save_model(init_weights(DiffusionLM(cfg), seed=0), str(path))
    task.build_tokenizer("dream").save_pretrained(str(path))
    shutil.copy(os.path.join(SHIPPED, "task.json"), path)
    return str(path)


def test_a_dream_checkpoint_generates_as_bench(dream_ckpt, recwarn):
    """One toy-task run through lm-eval on a Dream checkpoint: every response is the text bench.py's
    loop decodes from the same model, and transformers says nothing about the Dream config."""
    res = evaluate(["toy_short"], 6, pretrained=dream_ckpt, **DECODE)
    problems = short_family().test_set(6)
    model = load_model(dream_ckpt, device="cpu")
    outputs, *_ = bench.decode_all(model, problems, DecodeConfig.for_model(model.config, **DECODE), 1)
    samples = sorted(res["samples"]["toy_short"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [task.decode(o) for o in outputs]
    assert not [w for w in recwarn if "rope_scaling" in str(w.message)]


def test_a_dream_loglikelihood_is_the_estimate_by_hand(dream_ckpt):
    """The Monte-Carlo estimate on a shifted head, by hand for one sample: mask k continuation
    tokens, run the whole sequence, and score the hidden ones with the full forward's logits (whose
    row i the model computes from hidden state i - 1); the adapter asks only for the continuation's."""
    import torch.nn.functional as F

    lm = eh.DiffusionLM(pretrained=dream_ckpt, mc_num=1, batch_size=1)
    p = short_family().test_set(1)[0]
    context, continuation = task.encode(p.prompt), task.encode(p.answer)
    P, G = len(context), len(continuation)
    estimate = eh.mc_loglikelihood(lm.model, context, continuation, lm.decode_config.mask_id, 1, 1,
                                   torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    k = int(torch.randint(1, G + 1, (1,), generator=g))
    hidden = torch.rand(1, G, generator=g).argsort(dim=1).argsort(dim=1)[0] < k  # (G,)
    x = torch.tensor(context + continuation)
    x[P:][hidden] = lm.decode_config.mask_id
    with torch.no_grad():
        full = lm.model(x[None])[0]  # (L, V): row i predicts token i (model.logits applies Dream's shift)
    assert lm.model.logit_shift == 1
    ce = F.cross_entropy(full[P:P + G].float(), torch.tensor(continuation), reduction="none")
    assert estimate == pytest.approx(-float(ce[hidden].sum()) * G / k, rel=1e-5)
