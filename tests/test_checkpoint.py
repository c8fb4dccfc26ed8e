"""The shipped checkpoint (checkpoints/arith): it loads like a real LLaDA checkpoint and it works."""

import json
import os

from conftest import SHIPPED

import run
import task
from decode import DecodeConfig
from model import load_model
from train import evaluate


def test_loads_through_load_model_and_autotokenizer():
    from transformers import AutoTokenizer

    model = load_model(SHIPPED, device="cpu")
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    with open(os.path.join(SHIPPED, "config.json")) as f:
        raw = json.load(f)
    # Special ids live in config.json, as LLaDA's do, and agree with the tokenizer's.
    assert tok.mask_token_id == raw["mask_token_id"] == model.config.mask_token_id
    assert tok.eos_token_id == raw["eos_token_id"] == model.config.eos_token_id
    assert tok.pad_token_id == raw["pad_token_id"]
    problem = task.test_set(1)[0]
    ids = tok(problem.prompt).input_ids
    assert ids == task.encode(problem.prompt) and tok.decode(ids) == problem.prompt
    assert os.path.getsize(os.path.join(SHIPPED, "model.safetensors")) < 20 * 2**20


def test_vanilla_accuracy_on_held_out_sample():
    """20 held-out problems with the vanilla sampler: a broken model or sampler scores ~0."""
    model = load_model(SHIPPED, device="cpu")
    assert evaluate(model, task.test_set(20, **task.load_task(SHIPPED))) >= 0.7


def test_dual_cache_threshold_accuracy_on_held_out_sample():
    """The same sample through DualCache + threshold 0.9. At G = 32 the checkpoint loses nothing to
    parallel decoding (100/100 measured); longer windows lose accuracy (README, Benchmark)."""
    model = load_model(SHIPPED, device="cpu")
    problems = task.test_set(20, **task.load_task(SHIPPED))
    from decode import generate, left_pad

    ids, mask = left_pad([task.encode(p.prompt) for p in problems], model.config.pad_token_id)
    cfg = DecodeConfig.for_model(model.config, gen_length=32, block_length=32, steps=32, cache="dual",
                                 threshold=0.9)
    out = generate(model, ids, cfg, attention_mask=mask)
    text = [task.decode(row) for row in out.generated.tolist()]
    correct = sum(task.parse_answer(t) == p.answer_value for t, p in zip(text, problems))
    assert correct >= 17
    assert out.nfe < 32 // 4  # parallel decoding: far fewer forwards than tokens


def test_run_py_with_no_flags(capsys):
    run.main(["--no-live"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Q: ")
    assert printed[-1].startswith("NFE ") and "tokens/s" in printed[-1]
    assert any(line.startswith("####") for line in printed)


def test_bench_smoke(tmp_path, capsys):
    """bench.py end to end on two problems: every column is filled and the files are written."""
    import bench

    bench.main(["--model", SHIPPED, "--lengths", "64", "--problems", "2", "--methods", "vanilla", "dual+thr0.9",
                "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "bench.json") as f:
        rows = json.load(f)["rows"]
    assert [r["method"] for r in rows] == ["vanilla", "dual+thr0.9"]
    vanilla, fast = rows
    assert vanilla["speedup"] == 1.0 and vanilla["agreement"] == 1.0 and vanilla["nfe"] == 64
    assert fast["nfe"] < vanilla["nfe"] and fast["max_logit_drift"] is not None
    assert "| 64 | dual+thr0.9 | 2 | 100.0% | 100.0% |" in capsys.readouterr().out
    assert (tmp_path / "bench.md").is_file()
