"""run.py: the demo works with no flags, every method is a flag, and a user's mistake ends the run
with one line on stderr and a non-zero exit (130 for Ctrl-C), never a traceback or a hang.

Most tests call run.main(argv) in this process (importing transformers once); one runs the real
command line, to show `--cfg-scale inf` exits at once.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import run
from conftest import ROOT, SHIPPED

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")),
                                reason="the shipped checkpoint is absent")


def main(argv, capsys, pinned=True):
    """Run run.py's main; return (exit code, stdout, stderr). `pinned` runs the arith checkpoint
    (conftest.SHIPPED) in a 32-token window, so the tests below do not move when run.py's default
    checkpoint or window does; pinned=False runs run.py's own defaults."""
    code = 0
    if pinned and "--model" not in argv:
        argv = ["--model", SHIPPED, *argv]
    if pinned and "--gen-length" not in argv:
        argv = ["--gen-length", "32", "--steps", "32", *argv]
    try:
        run.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(str(e.code) + "\n")  # what the interpreter prints for sys.exit("...")
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, argv, message, code=1):
    got, out, err = main(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (out, err)
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# It works: no flags, and every method flag
# ---------------------------------------------------------------------------------------------


def test_default_run(capsys):
    code, out, err = main(["--no-live"], capsys, pinned=False)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Q: ") and "####" in out
    assert lines[-1].startswith("NFE ") and "cache=dual, threshold=0.9" in lines[-1]


def test_cache_map_dual(capsys):
    """Under --no-live, --cache-map prints every step: the canvas, then '#' where the forward
    recomputed a position and '.' where it read the cache. DualCache: the block alone after the
    block's first (full) forward."""
    code, out, err = main(["--no-live", "--cache-map", "--prompt", "8-3+7", "--threshold", "none",
                           "--block-length", "8", "--steps", "16", "--no-stop-at-eos"], capsys)
    assert code == 0, err
    maps = [line[len("[cache   ] "):] for line in out.splitlines() if line.startswith("[cache   ]")]
    canvases = [line for line in out.splitlines() if line.startswith("[step")]
    assert len(maps) == len(canvases) == 16
    assert maps[0] == "#" * 32  # the first forward computes everything
    assert maps[1] == "#" * 8 + "." * 24  # then the first block; prefix and suffix from the cache
    assert maps[5] == "." * 8 + "#" * 8 + "." * 16  # the second block's cached steps
    assert "8-3=5" in canvases[-1] and "_" not in canvases[-1]


def test_cache_map_prefix_and_dllm(capsys):
    code, out, _ = main(["--no-live", "--cache-map", "--cache", "prefix", "--threshold", "none",
                         "--block-length", "8", "--steps", "16"], capsys)
    maps = [line[11:] for line in out.splitlines() if line.startswith("[cache   ]")]
    assert code == 0 and maps[5] == "." * 8 + "#" * 24  # the prefix cache recomputes the block and all after it
    code, out, _ = main(["--no-live", "--cache-map", "--cache", "dllm", "--threshold", "none",
                         "--block-length", "8", "--steps", "32", "--gen-interval-steps", "4"], capsys)
    maps = [line[11:] for line in out.splitlines() if line.startswith("[cache   ]")]
    assert code == 0 and maps[0] == "#" * 32 and maps[1] == "d" * 32 and maps[4] == "#" * 32
    assert "dLLM-Cache recomputed" in out


def test_adablock_and_stop_at_eos(capsys):
    code, out, err = main(["--no-live", "--adablock", "--stop-at-eos"], capsys)
    assert code == 0, err
    assert "AdaBlock block lengths: [" in out and "adablock, stop-at-eos" in out


@pytest.mark.parametrize("text, prompt", [
    ("8-3+7", "Q: 8-3+7=?\n"),          # a chain asks for its value
    ("8-3+7=?", "Q: 8-3+7=?\n"),
    (" 8-3+7= ", "Q: 8-3+7=?\n"),
    ("?+?=10", "Q: ?+?=10\n"),          # the pair family is already a question
    ("Q: ?+?=7", "Q: ?+?=7\n"),
])
def test_task_prompts(text, prompt):
    assert run.build_prompt(None, text, SHIPPED) == prompt


def test_newline_id_from_the_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert run.newline_id(tok) == tok.get_vocab()["\n"]

    class NoNewline:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            raise ValueError("unknown character")

        def get_vocab(self):
            return {"a": 1}

    with pytest.raises(ValueError, match="no newline token"):
        run.newline_id(NoNewline())


def test_live_view_draws_the_state(capsys, monkeypatch):
    """The live path (a TTY) draws from on_step(state): the canvas and the map are redrawn in place."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    code, out, err = main(["--cache-map", "--threshold", "none", "--block-length", "8", "--steps", "16",
                           "--no-stop-at-eos"], capsys)
    assert code == 0, err
    assert out.count("[step ") == 17 and out.count("[cache   ]") == 17  # the all-mask frame and 16 steps
    assert "\033[1A" in out and out.splitlines()[-1].startswith("NFE 16 ")


# ---------------------------------------------------------------------------------------------
# A user's mistake: one line on stderr, a non-zero exit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "mps", "meta", "cuda:x"])
def test_device_names(capsys, device):
    one_line_error(capsys, ["--device", device], f"--device must be cpu, cuda or cuda:N, got '{device}'", code=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_on_cpu_build(capsys):
    one_line_error(capsys, ["--device", "cuda"], "this torch build sees no CUDA device")


@pytest.fixture
def ckpt_copy(tmp_path):
    dst = tmp_path / "arith"
    shutil.copytree(SHIPPED, dst)
    return dst


def test_truncated_safetensors(capsys, ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    one_line_error(capsys, ["--model", str(ckpt_copy)], "model.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("edit, message", [
    (lambda raw: [raw], "expected a JSON object of settings, got a list"),
    (lambda raw: {**raw, "d_model": "128"}, "d_model must be an integer, got '128' (str)"),
    (lambda raw: {**raw, "n_layers": 4.0}, "n_layers must be an integer, got 4.0 (float)"),
    (lambda raw: {**raw, "rms_norm_eps": -1}, "rms_norm_eps must be >= 0"),
])
def test_bad_config_json(capsys, ckpt_copy, edit, message):
    raw = json.loads((ckpt_copy / "config.json").read_text())
    (ckpt_copy / "config.json").write_text(json.dumps(edit(raw)))
    one_line_error(capsys, ["--model", str(ckpt_copy)], message)


def test_ctrl_c(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "generate", interrupted)
    one_line_error(capsys, ["--no-live"], "interrupted", code=130)


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "nan"], "argument --threshold: nan is not a valid value"),
    (["--temperature", "nan"], "argument --temperature: nan is not a valid value"),
    (["--threshold", "high"], "argument --threshold: expected a number, got 'high'"),
    (["--cache", "ring"], "invalid choice 'ring' (choose from none, prefix, dual, dllm)"),
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--seed", "99999999999999999999"], "--seed must be in 0..9223372036854775807, got 99999999999999999999"),
    (["--shots", "9"], "--shots must be in 0..8, got 9"),
])
def test_bad_flags(capsys, argv, message):
    """A flag argparse refuses: one line (not argparse's usage block) and exit status 2."""
    one_line_error(capsys, argv, message, code=2)


@pytest.mark.parametrize("value", ["none", "off"])
def test_threshold_can_be_turned_off(capsys, value):
    code, out, _ = main(["--no-live", "--threshold", value], capsys)
    assert code == 0 and out.splitlines()[-1].split(" | ")[4] == "cache=dual, stop-at-eos"  # LLaDA's top-k schedule


def test_a_rule_flag_replaces_the_default_threshold(capsys):
    """run.py's default rule is threshold 0.9; --factor replaces it (two rules would be an error)."""
    code, out, _ = main(["--no-live", "--factor", "1.0"], capsys)
    assert code == 0 and "cache=dual, factor=1.0" in out.splitlines()[-1]
    one_line_error(capsys, ["--no-live", "--factor", "1.0", "--threshold", "0.9"],
                   "bad settings: set one commit rule, not threshold and factor")


@pytest.mark.parametrize("argv", [[], ["--no-stop-at-eos"], ["--no-stop-at-eos", "--cache", "none", "--threshold", "none"]])
def test_the_answer_ends_at_the_first_eos(capsys, argv):
    """What run.py prints is the response cut at its first EOS, as a scorer reads it: nothing a
    model committed into the EOS padding after it (without stop-at-eos, the originals' way, it
    may write digits there)."""
    code, out, err = main(["--no-live", "--prompt", "2+2", *argv], capsys, pinned=False)
    assert code == 0, err
    answer = out.split("\n", 1)[1].rsplit("\nNFE ", 1)[0]
    assert answer.splitlines()[-1] == "#### 4"


def test_shots_put_solved_examples_before_the_question(capsys):
    from tools import task

    code, out, err = main(["--no-live", "--shots", "2", "--prompt", "3+4"], capsys)
    assert code == 0, err
    expected = task.few_shot(task.Problem("short", "Q: 3+4=?\n", "", 0), 2).prompt
    assert out.startswith(expected) and expected.count("Q: ") == 3


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "1.5"], "bad settings: threshold must be a finite number > 0 and <= 1, got 1.5"),
    (["--threshold", "inf"], "bad settings: threshold must be a finite number"),
    (["--cfg-scale", "inf"], "bad settings: cfg_scale must be a finite number >= 0, got inf"),
    (["--threshold", "-1"], "bad settings: threshold must be a finite number > 0 and <= 1, got -1.0"),
    (["--window-fraction", "0"], "bad settings: window_fraction must be a finite number > 0"),
    (["--transfer-ratio", "2"], "bad settings: transfer_ratio"),
    (["--adablock", "--threshold", "none"], "bad settings: AdaBlock"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_bad_settings(capsys, argv, message):
    one_line_error(capsys, ["--no-live", *argv], message)


def test_overflowing_logits(capsys):
    """A huge --cfg-scale is a finite setting, but the guided logits overflow float32: decode.py's
    FloatingPointError (step, block, likely causes) becomes one line."""
    one_line_error(capsys, ["--no-live", "--cfg-scale", "1e300"],
                   "decoding stopped: non-finite logits at step 0 of the block starting at position")


def test_cfg_scale_inf_exits_at_once():
    """The issue's command, as a user types it: exits with one line instead of hanging."""
    proc = subprocess.run([sys.executable, "run.py", "--no-live", "--cfg-scale", "inf"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "bad settings: cfg_scale must be a finite number >= 0, got inf"
