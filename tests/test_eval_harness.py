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
