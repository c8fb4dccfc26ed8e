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
# Either family, without a flag: a Dream-format checkpoint
# ---------------------------------------------------------------------------------------------

DREAM_FEWSHOT = os.path.join(ROOT, "checkpoints", "dream-fewshot")


def make_dream_checkpoint(path):
    """A tiny random Dream-format directory (Qwen2 names, q/k/v biases, the shifted head) with the
    toy task's tokenizer under Dream's token names and the arith checkpoint's task.json."""
    from model import DiffusionLM, ModelConfig, init_weights, save_model
    from tools import task

    cfg = ModelConfig(family="dream", d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=len(task.vocabulary()), rope_theta=10000.0, max_sequence_length=2048,
                      **task.special_ids("dream"))
    save_model(init_weights(DiffusionLM(cfg), seed=0), str(path))
    task.build_tokenizer("dream").save_pretrained(str(path))
    shutil.copy(os.path.join(SHIPPED, "task.json"), path)
    return path


@pytest.fixture(scope="module")
def dream_ckpt(tmp_path_factory):
    return make_dream_checkpoint(tmp_path_factory.mktemp("dream") / "ckpt")


@pytest.fixture
def dream_copy(dream_ckpt, tmp_path):
    return shutil.copytree(dream_ckpt, tmp_path / "dream")


def cache_lines(out):
    return [line[len("[cache   ] "):] for line in out.splitlines() if line.startswith("[cache   ]")]


def test_a_dream_checkpoint_runs_without_a_flag(capsys, recwarn, dream_ckpt):
    """config.json's model_type says Dream: the same command decodes, silently (no warning from
    transformers reading a Dream config), with the prompt, the answer and the figures."""
    code, out, err = main(["--model", str(dream_ckpt), "--no-live"], capsys)
    assert code == 0 and err == "", err
    assert not [w for w in recwarn if "rope_scaling" in str(w.message)]
    lines = out.splitlines()
    assert lines[0].startswith("Q: ") and lines[-1].startswith("NFE ") and "cache=dual, threshold=0.9" in lines[-1]


@pytest.mark.parametrize("cache, fifth", [("dual", "." * 7 + "#" * 9 + "." * 16), ("prefix", "." * 7 + "#" * 25)])
def test_dream_cache_map_shows_the_row_before_the_block(capsys, dream_ckpt, cache, fifth):
    """Dream's shifted head predicts a block's first token from the row before it, so a cached step
    recomputes that row: in block 2 (positions 8..15) the map marks position 7 '#'. In block 1 the
    row before is the prompt's last, off the map."""
    code, out, err = main(["--model", str(dream_ckpt), "--no-live", "--cache-map", "--cache", cache,
                           "--threshold", "none", "--block-length", "8", "--steps", "16", "--no-stop-at-eos"], capsys)
    maps = cache_lines(out)
    assert code == 0 and len(maps) == 16, err
    assert maps[0] == maps[4] == "#" * 32  # each block's first forward computes everything
    assert maps[1] == "#" * (8 if cache == "dual" else 32) + "." * (24 if cache == "dual" else 0)
    assert maps[5] == fifth


def test_dream_live_view_draws_the_state(capsys, monkeypatch, dream_ckpt):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    code, out, err = main(["--model", str(dream_ckpt), "--cache-map", "--threshold", "none", "--block-length", "8",
                           "--steps", "16", "--no-stop-at-eos"], capsys)
    assert code == 0, err
    assert out.count("[step ") == 17 and out.count("[cache   ]") == 17 and "\033[1A" in out
    assert "." * 7 + "#" * 9 in out  # a cached step of block 2, with the row before it


@pytest.mark.parametrize("edit, message", [
    (dict(mask_token_id=73), "config.json's mask_token_id is 73, but the tokenizer's mask token '<|mask|>' is 76"),
    (dict(eos_token_id=21), "config.json's eos_token_id is 21, but the tokenizer's EOS token '<|endoftext|>' is 74"),
])
def test_a_dream_config_and_its_tokenizer_must_agree(capsys, dream_copy, edit, message):
    edit_config(dream_copy, **edit)
    one_line_error(capsys, ["--model", str(dream_copy), "--no-live"], message)


def test_a_tokenizer_that_does_not_name_its_mask_is_looked_up_by_dreams_name(capsys, dream_copy):
    """Without mask_token in tokenizer_config.json, Dream's '<|mask|>' is found in the vocabulary."""
    tokenizer_config = json.loads((dream_copy / "tokenizer_config.json").read_text())
    del tokenizer_config["mask_token"]
    (dream_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    edit_config(dream_copy, mask_token_id=73)
    one_line_error(capsys, ["--model", str(dream_copy), "--no-live"], "the tokenizer's mask token '<|mask|>' is 76")


def test_a_dream_bos_disagreement_only_warns(capsys, dream_copy):
    edit_config(dream_copy, bos_token_id=5)
    code, out, err = main(["--model", str(dream_copy), "--no-live"], capsys)
    assert code == 0 and err.splitlines() == [
        f"warning: {dream_copy}: config.json's bos_token_id is 5, but the tokenizer's BOS token '<|beginoftext|>' "
        f"is 75 (run.py does not use it)"]


def test_a_llada_tokenizer_beside_a_dream_config_is_refused(capsys, dream_copy):
    """Dream's config has no end-of-turn id; a LLaDA tokenizer's '<|eot_id|>' would become one, and
    in the toy task it is id 75, the Dream config's BOS: decoding would stop at the BOS."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SHIPPED, name), dream_copy / name)
    one_line_error(capsys, ["--model", str(dream_copy), "--no-live"],
                   "the tokenizer's end-of-turn token '<|eot_id|>' is 75, config.json's bos_token_id")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DREAM_FEWSHOT, "model.safetensors")),
                    reason="checkpoints/dream-fewshot is absent")
def test_the_shipped_dream_checkpoint_decodes(capsys):
    """`python run.py --model checkpoints/dream-fewshot`: the task's first held-out problem,
    answered right (task.py's scorer), with the demo's settings."""
    from tools import task

    code, out, err = main(["--model", DREAM_FEWSHOT, "--no-live"], capsys, pinned=False)
    assert code == 0 and err == "", err
    lines = out.splitlines()
    family = next(iter(task.families_for(task.load_task(DREAM_FEWSHOT)).values()))
    problem = family.test_set(1)[0]
    assert lines[0] == problem.prompt.rstrip("\n") and lines[-1].startswith("NFE ")
    assert family.score(problem, "\n".join(lines[1:-1])) == 1


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
    (["--cache", "ring"], "invalid choice 'ring' (choose from none, prefix, dual, dllm"),
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
    (["--adablock", "--window-fraction", "0"], "bad settings: window_fraction must be a finite number > 0"),
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


# ---------------------------------------------------------------------------------------------
# The checkpoint's special ids, its task.json, a real LLaDA directory's auto_map
# ---------------------------------------------------------------------------------------------


def edit_config(ckpt, **changes):
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, **changes}))


@pytest.mark.parametrize("key, value, message", [
    # 21 is the toy tokenizer's newline: as EOS it cut every answer at its first line, silently
    ("eos_token_id", 21, "config.json's eos_token_id is 21, but the tokenizer's EOS token '<|endoftext|>' is 74"),
    ("mask_token_id", 73, "config.json's mask_token_id is 73, but the tokenizer's mask token '<|mdm_mask|>' is 76"),
    ("eot_token_id", 21, "config.json's eot_token_id is 21, but the tokenizer's end-of-turn token '<|eot_id|>' is 75"),
])
def test_config_and_tokenizer_must_agree_on_special_ids(capsys, ckpt_copy, key, value, message):
    edit_config(ckpt_copy, **{key: value})
    one_line_error(capsys, ["--model", str(ckpt_copy), "--no-live"], message)


def test_padding_and_bos_disagreements_only_warn(capsys, ckpt_copy):
    """run.py never reads the config's padding or BOS id (one unpadded row; the tokenizer writes the
    prompt): a disagreement is a warning line each, and the answer is whole."""
    edit_config(ckpt_copy, pad_token_id=21, bos_token_id=5)
    tokenizer_config = json.loads((ckpt_copy / "tokenizer_config.json").read_text())
    (ckpt_copy / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "bos_token": "<|eot_id|>"}))
    code, out, err = main(["--model", str(ckpt_copy), "--no-live", "--prompt", "2+2"], capsys)
    assert code == 0, err
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings), err
    assert "pad_token_id is 21, but the tokenizer's padding token '<|endoftext|>' is 74" in warnings[0]
    assert "bos_token_id is 5, but the tokenizer's BOS token '<|eot_id|>' is 75" in warnings[1]
    assert "#### 4" in out


def test_a_config_without_eot_takes_the_tokenizers(capsys, ckpt_copy):
    """LLaDA-8B's config.json has no eot_token_id: nothing to compare, and the tokenizer's is used."""
    raw = json.loads((ckpt_copy / "config.json").read_text())
    del raw["eot_token_id"]
    (ckpt_copy / "config.json").write_text(json.dumps(raw))
    code, out, err = main(["--model", str(ckpt_copy), "--no-live", "--prompt", "2+2"], capsys)
    assert code == 0 and err == "" and "#### 4" in out


def test_auto_map_never_asks_to_run_remote_code(capsys, ckpt_copy, monkeypatch):
    """A real LLaDA config.json has an auto_map naming its modeling code; transformers would stop
    at 'Do you wish to run the custom code? [y/N]' (15 s on a terminal). The tokenizer is loaded
    with trust_remote_code=False, so nothing is asked."""
    edit_config(ckpt_copy, auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                                     "AutoModel": "modeling_llada.LLaDAModelLM"})
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "n")
    code, out, err = main(["--model", str(ckpt_copy), "--no-live", "--prompt", "2+2"], capsys)
    assert code == 0, err
    assert asked == [] and "#### 4" in out


@pytest.mark.parametrize("text", [
    "{not json",                                     # garbage
    "[1, 2]",                                        # list-shaped
    json.dumps({"families": ["short", "cube"]}),     # an unknown family
    "[" * 100_000 + "]" * 100_000,                   # nested past the JSON parser's recursion limit
], ids=["garbage", "list", "unknown-family", "deep"])
@pytest.mark.parametrize("argv", [[], ["--shots", "2", "--prompt", "3+4"]], ids=["sample", "shots"])
def test_broken_task_json(capsys, ckpt_copy, text, argv):
    """task.json is read for the sample problem and for --shots: whatever tools/task.py raises on a
    file it cannot use (ValueError, TypeError, RecursionError, ...) is one line naming the file."""
    (ckpt_copy / "task.json").write_text(text)
    one_line_error(capsys, ["--model", str(ckpt_copy), "--no-live", *argv], f"{ckpt_copy}/task.json")


# ---------------------------------------------------------------------------------------------
# The output's edges: a closed pipe, a full disk, an ASCII terminal; out of memory
# ---------------------------------------------------------------------------------------------


def run_py(*argv, stdout, env=None):
    return subprocess.run([sys.executable, "run.py", "--no-live", "--gen-length", "32", *argv], cwd=ROOT,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_closed_pipe_exits_quietly():
    """`run.py | head -c1`: the reader is gone before run.py writes. Like a Unix tool, it stops with
    128 + SIGPIPE and says nothing (no BrokenPipeError traceback, no 'Exception ignored' at exit)."""
    read, write = os.pipe()
    os.close(read)  # the reader went away: every write gets EPIPE
    try:
        proc = run_py(stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        proc = run_py(stdout=full)
    assert proc.returncode == 1
    assert proc.stderr == "could not write the output: No space left on device\n", proc.stderr


def test_ascii_output_draws_ascii_glyphs():
    """PYTHONIOENCODING=ascii (or a Latin-1 terminal) has no '⏎' or '␄': the canvas uses '|' and
    '$' instead of ending the run as 'bad input'."""
    proc = run_py("--cache-map", "--prompt", "8-3+7", "--threshold", "none", stdout=subprocess.PIPE,
                  env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    last = [line for line in proc.stdout.splitlines() if line.startswith("[step")][-1]
    assert last.startswith("[step  32] 8-3=5|5+7=12|#### 12$"), last
    assert proc.stdout.isascii()


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_out_of_memory_names_what_to_reduce(capsys, monkeypatch, error):
    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(run, "generate", no_memory)
    one_line_error(capsys, ["--no-live", "--prompt", "2+2"], "out of memory decoding 32 tokens after a 9-token "
                   "prompt on cpu: reduce --gen-length or --shots, or pass --dtype bfloat16")
    import model

    monkeypatch.setattr(model, "load_model", no_memory)
    one_line_error(capsys, ["--no-live"], "out of memory loading")
    one_line_error(capsys, ["--no-live"], "pass --dtype bfloat16 (half of float32's memory) or --device cpu")


def test_other_runtime_errors_are_not_called_out_of_memory(monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(run, "generate", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run.main(["--no-live", "--model", SHIPPED, "--gen-length", "32"])


# ---------------------------------------------------------------------------------------------
# Small frictions: integer flags name their range, --threads, AdaBlock's settings, --help
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--seed", "2**62"], "--seed must be in 0..9223372036854775807, got 2**62"),
    (["--seed", "-1"], "--seed must be in 0..9223372036854775807, got -1"),
    (["--shots", "two"], "--shots must be in 0..8, got two"),
    (["--threads", "0"], f"--threads must be in 1..{os.cpu_count()} (this machine's CPUs), got 0"),
    (["--threads", "100000"], f"--threads must be in 1..{os.cpu_count()} (this machine's CPUs), got 100000"),
    (["--window-fraction", "0.5"], "--window-fraction is an AdaBlock setting; add --adablock to use it"),
    (["--delimiter-threshold", "0.5"], "--delimiter-threshold is an AdaBlock setting; add --adablock to use it"),
])
def test_flags_name_their_range(capsys, argv, message):
    one_line_error(capsys, argv, message, code=2)


def test_threads(capsys):
    before = torch.get_num_threads()
    try:
        code, out, err = main(["--no-live", "--threads", "1"], capsys)
        assert code == 0 and torch.get_num_threads() == 1, err
    finally:
        torch.set_num_threads(before)


def test_adablock_settings_with_adablock(capsys):
    code, out, err = main(["--no-live", "--adablock", "--window-fraction", "0.5", "--delimiter-threshold", "0.2"],
                          capsys)
    assert code == 0 and "adablock" in out.splitlines()[-1], err


def test_help_says_how_to_get_topk_and_the_operand_range(capsys):
    code, out, _ = main(["--help"], capsys, pinned=False)
    text = " ".join(out.split())  # argparse wraps lines
    assert code == 0
    assert "--threshold none gives LLaDA's own top-k schedule" in text
    assert "operands 1..9" in text and "'?+?=N' for two digits with sum N in 4..16" in text


def test_defaults_live_in_decodeconfig_and_demo():
    """With no flags, every decoding setting is DecodeConfig's default except the demo's own (DEMO,
    and the block length and steps that follow the window); run() reads as its steps."""
    import dataclasses
    import inspect

    args = run.parse_args([])
    own = {f.name: f.default for f in dataclasses.fields(run.DecodeConfig) if f.name in run.FLAGS}
    expected = {**own, **run.DEMO, "steps": run.DEMO["gen_length"]}
    assert {name: getattr(args, name) for name in run.FLAGS} == expected and args.given == set()
    short = run.parse_args(["--gen-length", "16", "--factor", "1"])
    assert (short.block_length, short.steps, short.threshold, short.factor) == (16, 16, None, 1.0)
    assert len(inspect.getsource(run.run).splitlines()) <= 25
