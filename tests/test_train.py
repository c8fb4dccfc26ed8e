"""train.py: the diffusion objective, the data, crash-safe snapshots that resume exactly, bad settings."""

import json
import os

import pytest
import torch

from tools import task
from tools import train
from model import load_model

EOS = task.special_ids()["eos_token_id"]


def tiny_cfg(tmp_path, **over):
    kw = dict(out=str(tmp_path / "ckpt"), state_dir=str(tmp_path / "state"), init="", steps=12,
              batch_tokens=512, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, warmup=2,
              eval_every=12, eval_problems=4, save_every=4, threads=1, device="cpu", bf16="off",
              shots=0, eval_shots=0, overwrite=True)
    kw.update(over)
    return train.TrainConfig(**kw)


def batch(cfg, step=0):
    return train.make_batch(cfg, step, set(), EOS)


def prompts_of(ids, region):
    return [task.decode(row[~r].tolist()) for row, r in zip(ids, region)]


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def test_masking_never_touches_the_prompt(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = train.build_model(cfg, "cpu")
    ids, region = batch(cfg)
    for seed in range(5):
        _, d = train.diffusion_loss(model, ids, region, model.config.mask_token_id, cfg.eps,
                                    torch.Generator().manual_seed(seed))
        assert not (d["masked"] & ~region).any()
        assert torch.equal(d["noisy"][~region], ids[~region])  # prompt tokens are intact
        assert (d["noisy"][d["masked"]] == model.config.mask_token_id).all()


def test_loss_is_ce_weighted_by_inverse_t(tmp_path):
    """Recompute LLaDA's loss by hand: sum over masked tokens of CE / t / answer_len, over B."""
    cfg = tiny_cfg(tmp_path)
    model = train.build_model(cfg, "cpu")
    ids, region = batch(cfg)
    loss, d = train.diffusion_loss(model, ids, region, model.config.mask_token_id, cfg.eps,
                                   torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(d["noisy"])
    expected = 0.0
    for b in range(ids.shape[0]):
        m = d["masked"][b]
        ce = torch.nn.functional.cross_entropy(logits[b][m], ids[b][m], reduction="sum")
        expected += ce / d["t"][b] / region[b].sum()
    assert torch.allclose(loss, expected / ids.shape[0], rtol=1e-5)
    assert ((d["t"] >= cfg.eps) & (d["t"] <= 1)).all()


def test_one_step_lowers_the_loss(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = train.build_model(cfg, "cpu")
    ids, region = batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_at():
        return train.diffusion_loss(model, ids, region, model.config.mask_token_id, cfg.eps,
                                    torch.Generator().manual_seed(0))[0]

    before = loss_at()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss_at() < before


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------


def test_batches_are_deterministic_mix_families_and_fit_every_answer(tmp_path):
    cfg = tiny_cfg(tmp_path, batch_tokens=2048)
    a, _ = batch(cfg, 3)
    b, _ = batch(cfg, 3)
    assert torch.equal(a, b)
    seen = set()
    for step in range(20):
        ids, region = batch(cfg, step)
        for prompt, row in zip(prompts_of(ids, region), ids):
            seen.add("pair" if "?+?" in prompt else "long" if prompt.count("+") + prompt.count("-") >= 3 else "short")
            assert row[-1] == EOS  # the answer fit its window, with EOS padding after it
    assert seen == {"short", "long", "pair"}


def test_training_excludes_every_held_out_problem_whatever_eval_problems(tmp_path):
    """With --eval-problems 4, training still never draws any of the task.HELD_OUT problems per
    family that bench.py may score on, and the batches don't depend on eval_problems at all."""
    small, large = tiny_cfg(tmp_path, eval_problems=4), tiny_cfg(tmp_path, eval_problems=task.HELD_OUT)
    held = train.held_out_prompts(small)
    assert held == train.held_out_prompts(large)
    every_scored = {p.prompt for name in ("short", "long") for p in task.FAMILIES[name].test_set(task.HELD_OUT)}
    assert held == every_scored
    for step in range(40):
        ids, region = train.make_batch(small, step, held, EOS)
        assert not set(prompts_of(ids, region)) & every_scored
        assert torch.equal(ids, train.make_batch(large, step, held, EOS)[0])
    with pytest.raises(ValueError, match="eval_problems"):
        tiny_cfg(tmp_path, eval_problems=task.HELD_OUT + 1)


def test_a_single_family_mix_is_the_plain_task(tmp_path):
    ids, region = batch(tiny_cfg(tmp_path, mix="short"), 0)
    assert all(p.startswith("Q: ") and "?+?" not in p and p.count("+") + p.count("-") <= 2
               for p in prompts_of(ids, region))


# ---------------------------------------------------------------------------------------------
# Snapshots: exact resume, crash between the two writes, corrupt or mismatched state
# ---------------------------------------------------------------------------------------------


def snapshots(state):
    """What a state dir holds besides its lock file."""
    return sorted(name for name in os.listdir(state) if name != train.LOCK_FILE)


def assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 12-step run straight through (snapshots at 4, 8, 12), shared by the resume tests."""
    path = tmp_path_factory.mktemp("straight")
    return train.train(tiny_cfg(path)), path


def test_smoke_training_writes_a_loadable_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, straight):
    """A run killed at step 10 and resumed (from its step-8 snapshot) ends with the same weights as
    one run straight through; the checkpoint loads through load_model and AutoTokenizer."""
    from transformers import AutoTokenizer

    model, path = straight
    real_make_batch = train.make_batch

    def dies_at_step_10(cfg, step, *args):
        if step == 10:
            raise KeyboardInterrupt
        return real_make_batch(cfg, step, *args)

    monkeypatch.setattr(train, "make_batch", dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tmp_path))
    monkeypatch.setattr(train, "make_batch", real_make_batch)
    assert snapshots(tmp_path / "state") == ["step-00000004", "step-00000008"]
    assert_same_weights(model, train.train(tiny_cfg(tmp_path)))  # resumes at 8, runs to 12
    ckpt = str(path / "ckpt")
    loaded = load_model(ckpt, device="cpu")
    ids = torch.randint(0, 70, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.mask_token_id == loaded.config.mask_token_id
    assert tok.decode(tok("Q: ?+?=9\n").input_ids) == "Q: ?+?=9\n"
    with open(os.path.join(ckpt, "training_log.json")) as f:
        log = json.load(f)
    assert log["precision"] == "fp32" and set(log["log"][-1]["accuracy"]) == {"short", "long", "pair"}
    assert task.families_for(task.load_task(ckpt)) == task.FAMILIES


def test_a_crash_between_the_two_snapshot_writes_resumes_from_the_previous_one(tmp_path, monkeypatch, straight):
    """The tensors of step 8 are written, then the process dies before the JSON. The step-8
    snapshot must not exist; resuming from step 4 ends exactly where the straight run does."""
    real_dump = json.dump

    def dies_writing_step_8(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 8:
            raise KeyboardInterrupt
        return real_dump(obj, *args, **kwargs)

    monkeypatch.setattr(train.json, "dump", dies_writing_step_8)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tmp_path))
    monkeypatch.setattr(train.json, "dump", real_dump)
    state = tmp_path / "state"
    assert snapshots(state) == ["step-00000004", "step-00000008.tmp"]
    assert (state / "step-00000008.tmp" / "state.safetensors").is_file()  # the torn write
    assert train.latest_snapshot(tiny_cfg(tmp_path)).endswith("step-00000004")
    assert_same_weights(straight[0], train.train(tiny_cfg(tmp_path)))
    assert "step-00000008.tmp" not in os.listdir(state)  # cleaned up when step 8 was saved again


def test_snapshot_files_that_disagree_are_refused(tmp_path):
    """A hand-assembled snapshot: step 8's tensors beside step 4's JSON."""
    train.train(tiny_cfg(tmp_path, steps=8))
    state = tmp_path / "state"
    os.replace(state / "step-00000004" / "state.json", state / "step-00000008" / "state.json")
    with pytest.raises(ValueError, match="inconsistent"):
        train.train(tiny_cfg(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "delete_json", "garble_json"])
def test_corrupt_or_missing_snapshot_files_name_the_file_and_the_remedy(tmp_path, damage):
    train.train(tiny_cfg(tmp_path, steps=4))
    snap = tmp_path / "state" / "step-00000004"
    if damage == "truncate":
        file = snap / "state.safetensors"
        file.write_bytes(file.read_bytes()[:1000])
    elif damage == "delete_json":
        file = snap / "state.json"
        file.unlink()
    else:
        file = snap / "state.json"
        file.write_text("{not json")
    with pytest.raises(ValueError) as err:
        train.train(tiny_cfg(tmp_path))
    assert str(file) in str(err.value) and f"delete {snap}" in str(err.value)


def test_resume_refuses_settings_that_change_the_data(tmp_path):
    train.train(tiny_cfg(tmp_path, steps=4))
    for change in (dict(lr=0.5), dict(mix="short:1,pair:1"), dict(ops="+-*"), dict(max_operand=8),
                   dict(batch_tokens=256), dict(seed=1), dict(bf16="on")):
        with pytest.raises(ValueError, match="other settings"):
            train.train(tiny_cfg(tmp_path, **change))


def test_resume_accepts_settings_that_do_not_change_the_weights(tmp_path, monkeypatch, straight):
    real_save = train.save_state

    def dies_after_step_8(cfg, model, opt, step, *args):
        real_save(cfg, model, opt, step, *args)
        if step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_state", dies_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tmp_path))
    monkeypatch.setattr(train, "save_state", real_save)
    resumed = train.train(tiny_cfg(tmp_path, eval_problems=2, eval_every=3, save_every=6))
    assert_same_weights(straight[0], resumed)


# ---------------------------------------------------------------------------------------------
# Bad settings: clear errors before any training
# ---------------------------------------------------------------------------------------------


def test_unwritable_out_is_found_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out .* not a writable directory"):
        train.train(tiny_cfg(tmp_path, out=str(tmp_path / "a_file" / "ckpt")))
    assert not (tmp_path / "state").exists() or not os.listdir(tmp_path / "state")  # no step was run
    with pytest.raises(SystemExit, match="--out") as err:
        train.main(["--out", str(tmp_path / "a_file"), "--state-dir", str(tmp_path / "s"), "--init", "",
                    "--steps", "1", "--bf16", "off"])
    assert str(err.value).startswith("train.py: error:")  # sys.exit(message): exit status 1


@pytest.mark.parametrize("argv, message", [
    (["--bf16", "maybe"], "--bf16: expected auto, on or off, got 'maybe'"),
    (["--ops", "/"], "ops must be a non-empty string of operators from"),
    (["--max-operand", "0"], "max_operand must be in 1..99"),
    (["--mix", "short:0.5,prose:0.5"], "'prose' in 'short:0.5,prose:0.5' is not a family"),
    (["--mix", "short:x"], "is not a number"),
    (["--eval-problems", "0"], "eval_problems must be in"),
    (["--steps", "0"], "steps must be in 1.."),
])
def test_bad_flags_get_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_bf16_flag_spellings():
    assert [train.parse_bf16(s) for s in ("auto", "ON", "1", "true", "off", "0", "no")] == \
        ["auto", "on", "on", "on", "off", "off", "off"]


def test_init_with_another_shape_is_refused(tmp_path, straight):
    with pytest.raises(ValueError, match="another shape"):
        train.build_model(tiny_cfg(tmp_path, init=str(straight[1] / "ckpt"), d_model=64), "cpu")


def test_precision_probe_decides_and_says_so(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, bf16="auto", batch_tokens=256)
    model = train.build_model(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = train.choose_precision(cfg, model, batch(cfg), torch.device("cpu"), model.config.mask_token_id)
    assert choice in ("fp32", "bf16") and f"-> {choice}" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the probe trains nothing
    assert all(p.grad is None for p in model.parameters())
    assert train.choose_precision(tiny_cfg(tmp_path, bf16="off"), model, None, None, 0) == "fp32"
    assert train.choose_precision(tiny_cfg(tmp_path, bf16="on"), model, None, None, 0) == "bf16"


def test_precision_probe_falls_back_to_fp32_where_bf16_fails(tmp_path, capsys, monkeypatch):
    """Some CPU builds have no bf16 kernel for an op (a CPU without AVX-512 can raise 'pack_vnni2 is
    only supported when avx512 is supported'): `--bf16 auto` then trains in fp32 and says why."""
    cfg = tiny_cfg(tmp_path, bf16="auto", batch_tokens=256)
    model = train.build_model(cfg, torch.device("cpu"))
    real_loss = train.diffusion_loss

    def loss_without_bf16(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "diffusion_loss", loss_without_bf16)
    assert train.choose_precision(cfg, model, batch(cfg), torch.device("cpu"), model.config.mask_token_id) == "fp32"
    assert "bf16 autocast fails here (pack_vnni2 is only supported" in capsys.readouterr().out
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# What a careless run must not do: overwrite a checkpoint, train on after divergence, spin
# ---------------------------------------------------------------------------------------------


def test_an_existing_checkpoint_is_never_overwritten_without_the_flag(tmp_path):
    """The default --out is a run directory, never a shipped checkpoint; an existing checkpoint at
    --out is refused before any step unless --overwrite, which replaces it whole."""
    assert not train.TrainConfig().out.startswith("checkpoints")
    out = tmp_path / "ckpt"
    train.train(tiny_cfg(tmp_path, steps=4, overwrite=False))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"--out .* already exists; pass another --out, or --overwrite"):
        train.train(tiny_cfg(tmp_path, steps=8, overwrite=False))
    assert (out / "model.safetensors").read_bytes() == before
    train.train(tiny_cfg(tmp_path, steps=8, overwrite=True))
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "state"]  # no temporary or old copy left beside it


def test_the_final_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the checkpoint is written leaves the previous one whole."""
    train.train(tiny_cfg(tmp_path, steps=4, overwrite=False))
    before = {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")}

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.task, "save_task", dies)  # after the weights, before the task spec
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tmp_path, steps=8))
    assert {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")} == before


@pytest.mark.parametrize("over", [dict(lr=1.0, warmup=0, min_lr=1.0), dict(lr=1.0, warmup=0, min_lr=1.0, eps=0.5)])
def test_divergence_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch, over):
    """A loss that turns non-finite ends the run with one line naming the step; no snapshot with
    non-finite weights is ever written."""
    real = train.diffusion_loss
    calls = {"n": 0}

    def blows_up(*args, **kwargs):  # step 6's loss is inf, as a diverging run's would be
        calls["n"] += 1
        loss, details = real(*args, **kwargs)
        return (loss * float("inf") if calls["n"] == 6 else loss), details

    monkeypatch.setattr(train, "diffusion_loss", blows_up)
    with pytest.raises(train.Diverged, match=r"the loss is inf at step 6 .*lower --lr.*step-00000004"):
        train.train(tiny_cfg(tmp_path, **over))
    assert snapshots(tmp_path / "state") == ["step-00000004"]
    with pytest.raises(SystemExit, match="train.py: error: the loss is"):
        monkeypatch.setattr(train, "diffusion_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
        train.main(["--out", str(tmp_path / "o2"), "--state-dir", str(tmp_path / "s2"), "--init", "", "--steps", "2",
                    "--bf16", "off", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden-size", "64",
                    "--batch-tokens", "256", "--shots", "0"])


def test_non_finite_weights_are_never_snapshotted(tmp_path, monkeypatch):
    """Weights that turn non-finite (here: a NaN gradient at step 4, a snapshot step) stop the run
    before that snapshot is written; the newest snapshot on disk stays the last finite one."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisons_step_4(params, *args, **kwargs):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 4:
            params[0].grad.fill_(float("nan"))
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisons_step_4)
    with pytest.raises(train.Diverged, match=r"the weights are not finite after step 4; lower --lr. Newest snapshot: none"):
        train.train(tiny_cfg(tmp_path))
    assert not os.path.exists(tmp_path / "state" / "step-00000004")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e30"], "lr must be a finite number in (0, 1], got 1e+30"),
    (["--lr", "inf"], "lr must be a finite number in (0, 1], got inf"),
    (["--lr", "nan"], "lr must be a finite number in (0, 1], got nan"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number in [0, 1], got nan"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number in [0, 1], got inf"),
    (["--weight-decay", "-5"], "weight_decay must be a finite number in [0, 1], got -5.0"),
    (["--batch-tokens", "10000000000"], "batch_tokens must be in 1..1048576, got 10000000000"),
    (["--threads", "100000"], "threads must be in 1.."),
    (["--mix", "short:1,short:2"], "mix: 'short' appears twice in 'short:1,short:2'"),
    (["--windows", "32:1,9999:1"], "windows: '9999' in '32:1,9999:1' is not a length in 1..1984"),
    (["--shots", "9"], "shots must be in 0..8, got 9"),
])
def test_out_of_range_settings_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "make_batch", interrupted)
    with pytest.raises(SystemExit) as err:
        train.main(["--out", str(tmp_path / "o"), "--state-dir", str(tmp_path / "s"), "--init", "", "--steps", "2",
                    "--bf16", "off", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden-size", "64"])
    assert err.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["train.py: interrupted at step 0; the same command resumes from the start (no snapshot yet)"]


def test_shots_in_training_batches_are_the_decoding_format(tmp_path):
    """With --shots, a batch's prompts are task.with_shots's k-shot prompts of one k, and no shot
    or question is held out."""
    cfg = tiny_cfg(tmp_path, shots=8, zero_shot_share=0.0, batch_tokens=2048)
    held_out = train.held_out_prompts(cfg)
    for step in range(3):
        prompts = prompts_of(*train.make_batch(cfg, step, held_out, EOS))
        ks = {p.count("Q: ") - 1 for p in prompts}
        assert len(ks) == 1 and 1 <= ks.pop() <= 8
        for p in prompts:
            parts = p.split(task.SHOT_SEPARATOR)
            assert all(part.split("\n")[0] + "\n" not in held_out for part in parts)


# ---------------------------------------------------------------------------------------------
# Nothing a user has is deleted: --overwrite, the state dir, two runs, the final swap, a full disk
# ---------------------------------------------------------------------------------------------

FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words


def a_project(path):
    """A folder that is not a checkpoint: sources, a git directory, a checkpoints/ folder."""
    path.mkdir()
    (path / "model.py").write_text("print('mine')\n")
    (path / "README.md").write_text("# mine\n")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "config.json").write_text("{}")
    return path


def everything_in(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_train_did_not_write(tmp_path, monkeypatch):
    """`--out . --overwrite` from a project's root once deleted the project and exited 0. --overwrite
    now replaces only a checkpoint train.py wrote; anything else is refused before any step."""
    project = a_project(tmp_path / "project")
    before = everything_in(project)
    with pytest.raises(ValueError, match=r"--out .*project is not a checkpoint train.py wrote \(it holds \.git, "
                                         r"README\.md, checkpoints, model\.py, which train.py does not write\)"):
        train.train(tiny_cfg(tmp_path, out=str(project), steps=2))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match=r"train.py: error: --out \. is not a checkpoint train.py wrote"):
        train.main(["--out", ".", "--overwrite", "--state-dir", str(tmp_path / "s"), "--init", "", "--steps", "1",
                    "--bf16", "off", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                    "--mlp-hidden-size", "64", "--batch-tokens", "256", "--shots", "0", "--eval-shots", "0"])
    assert everything_in(project) == before
    assert not (tmp_path / "s").exists()  # refused before the state dir was made


@pytest.mark.parametrize("damage, why", [
    ("no_log", r"it has no training_log.json"),
    ("bad_log", r"its training_log.json is not the record train.py writes"),
    ("extra_file", r"it holds notes.txt, which train.py does not write"),
    ("sub_folder", r"it holds runs, which train.py does not write"),
    ("symlink", r"it is a symbolic link"),
])
def test_overwrite_refuses_what_only_looks_like_a_checkpoint(tmp_path, straight, damage, why):
    """The marker: config.json, model.safetensors and train.py's training_log.json, nothing else."""
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(straight[1] / "ckpt", out)
    assert train.not_our_checkpoint(str(out)) is None
    if damage == "no_log":
        (out / "training_log.json").unlink()  # e.g. a model downloaded from the Hub
    elif damage == "bad_log":
        (out / "training_log.json").write_text("[1, 2]")
    elif damage == "extra_file":
        (out / "notes.txt").write_text("mine")
    elif damage == "sub_folder":
        (out / "runs").mkdir()
    else:
        out.rename(tmp_path / "real")
        out.symlink_to(tmp_path / "real")
    before = everything_in(tmp_path / ("real" if damage == "symlink" else "ckpt"))
    with pytest.raises(ValueError, match=why):
        train.train(tiny_cfg(tmp_path, steps=2))
    assert everything_in(tmp_path / ("real" if damage == "symlink" else "ckpt")) == before


def test_the_shipped_checkpoints_are_checkpoints_train_wrote():
    """arith's log comes from an earlier train.py; all four pass the marker, and dream-fewshot is a
    Dream model whose log nests its AR start."""
    root = os.path.join(os.path.dirname(__file__), "..", "checkpoints")
    for name in ("arith", "mix", "fewshot", "dream-fewshot"):
        assert train.not_our_checkpoint(os.path.join(root, name)) is None, name
    dream = os.path.join(root, "dream-fewshot")
    assert load_model(dream, device="cpu").config.family == "dream"
    with open(os.path.join(dream, "training_log.json")) as f:
        log = json.load(f)
    assert log["config"]["family"] == "dream" and log["init_log"]["init_log"]["config"]["objective"] == "ar"


@pytest.mark.parametrize("layout", ["same", "state_inside_out", "out_inside_state", "through_a_symlink"])
def test_the_state_dir_and_out_must_be_apart(tmp_path, layout):
    """`--out X --state-dir X` (or the state dir inside X) once let the final write delete every
    snapshot. Refused before any step."""
    out = tmp_path / "ckpt"
    state = {"same": out, "state_inside_out": out / "state", "out_inside_state": tmp_path,
             "through_a_symlink": tmp_path / "link" / "state"}[layout]
    if layout == "through_a_symlink":
        out.mkdir()
        (tmp_path / "link").symlink_to(out)
    if layout == "out_inside_state":
        out = tmp_path / "state" / "ckpt"
        state = tmp_path / "state"
    with pytest.raises(ValueError, match=r"--out and --state-dir are the same folder|is inside --out|"
                                         r"is inside --state-dir") as err:
        train.train(tiny_cfg(tmp_path, out=str(out), state_dir=str(state), steps=4, save_every=2))
    assert "apart" in str(err.value)
    assert not any(tmp_path.rglob("step-*"))  # no step was run


def test_two_runs_sharing_a_state_dir_are_kept_apart(tmp_path):
    """A second run on a state dir in use stops with one line naming the holder's PID; once the
    holder ends (here: killed, so its lock file stays), the state dir is free again."""
    import signal
    import subprocess
    import sys

    cfg = tiny_cfg(tmp_path, steps=4)
    os.makedirs(cfg.state_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(120)",
         os.path.join(cfg.state_dir, train.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"--state-dir .*state is in use by another training run "
                                             rf"\(PID {holder.pid}\); wait for it to end, or pass another --state-dir"):
            train.train(cfg)
        with pytest.raises(SystemExit, match="train.py: error: --state-dir .* is in use"):
            train.main(["--out", cfg.out, "--state-dir", cfg.state_dir, "--init", "", "--steps", "1", "--bf16", "off"])
        assert snapshots(cfg.state_dir) == [] and not os.path.exists(cfg.out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.train(cfg)  # the dead holder's lock is gone with it
    assert snapshots(cfg.state_dir) == ["step-00000004"]
    with train.state_dir_lock(cfg):  # in one process too: a second open of the lock file is refused
        with pytest.raises(ValueError, match=rf"in use by another training run \(PID {os.getpid()}\)"):
            train.train(tiny_cfg(tmp_path, steps=4))


def test_a_kill_between_the_two_renames_is_repaired_at_the_next_start(tmp_path):
    """The final write steps the old checkpoint aside, then renames the new one in. A process
    killed between the two left no --out. The next start puts the old one back (one line), and
    the run then writes the new one; nothing is left beside --out."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train.train(tiny_cfg(tmp_path, steps=4))
    old = everything_in(tmp_path / "ckpt")
    script = ("import os, sys\nsys.path.insert(0, sys.argv[1])\nfrom tools import train\nreal = os.rename\n"
              "def rename(src, dst):\n    real(src, dst)\n"
              "    if '.old-' in dst:\n        os._exit(9)  # killed right after the old checkpoint stepped aside\n"
              "train.os.rename = rename\nimport json\n"
              "train.train(train.TrainConfig(**json.loads(sys.argv[2])))\n")
    kw = dict(vars(tiny_cfg(tmp_path, steps=8)))
    child = subprocess.Popen([sys.executable, "-c", script, root, json.dumps(kw)], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.wait() == 9, child.stderr.read()
    child.stderr.close()
    # No ckpt: only the two halves of the swap, named by the killed process's PID.
    assert sorted(os.listdir(tmp_path)) == [f"ckpt.old-{child.pid}", f"ckpt.tmp-{child.pid}", "state"]
    train.recover_output(tiny_cfg(tmp_path, steps=8))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "state"] and everything_in(tmp_path / "ckpt") == old
    train.train(tiny_cfg(tmp_path, steps=8))  # resumes at the step-8 snapshot and writes the checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "state"] and everything_in(tmp_path / "ckpt") != old


def test_a_failed_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """An error between the two renames (here: the second fails) leaves the old checkpoint at --out."""
    train.train(tiny_cfg(tmp_path, steps=4))
    old = everything_in(tmp_path / "ckpt")
    real = os.rename

    def second_rename_fails(src, dst):
        if ".tmp-" in str(src):
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(train.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*ckpt: Permission denied \(EACCES\)"):
        train.train(tiny_cfg(tmp_path, steps=8))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "state"] and everything_in(tmp_path / "ckpt") == old


def fills_the_disk(monkeypatch, file_name, step=None):
    """safetensors' save_file writing part of `file_name` and then failing as on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, path, metadata=None):
        if os.path.basename(path) == file_name and (step is None or (metadata or {}).get("step") == str(step)):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise SafetensorError(FULL_DISK)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_during_a_snapshot_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch, straight):
    """A snapshot that can't be written: one OSError naming ENOSPC and the snapshot; no half-written
    directory is left; the earlier snapshot resumes to the straight run's weights."""
    fills_the_disk(monkeypatch, "state.safetensors", step=8)
    with pytest.raises(OSError, match=r"\[Errno 28\] cannot write the snapshot .*step-00000008: No space left on "
                                      r"device \(ENOSPC\); nothing written before it was changed"):
        train.train(tiny_cfg(tmp_path))
    assert snapshots(tmp_path / "state") == ["step-00000004"]
    with pytest.raises(SystemExit) as err:
        train.main(["--out", str(tmp_path / "ckpt"), "--state-dir", str(tmp_path / "state"), "--init", "",
                    "--steps", "12", "--batch-tokens", "512", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                    "--mlp-hidden-size", "64", "--warmup", "2", "--eval-every", "12", "--eval-problems", "4",
                    "--save-every", "4", "--bf16", "off", "--shots", "0", "--eval-shots", "0", "--device", "cpu"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.py: error: [Errno 28] cannot write the snapshot")
    assert message.endswith("the same command resumes from " + str(tmp_path / "state" / "step-00000004"))
    monkeypatch.undo()
    assert_same_weights(straight[0], train.train(tiny_cfg(tmp_path)))


def test_a_full_disk_during_the_final_write_keeps_the_old_checkpoint_and_leaves_no_copy(tmp_path, monkeypatch):
    """The checkpoint's weights can't be written: one OSError naming ENOSPC; the old checkpoint is
    whole and no out.tmp-PID is left to keep the disk full."""
    train.train(tiny_cfg(tmp_path, steps=4))
    old = everything_in(tmp_path / "ckpt")
    fills_the_disk(monkeypatch, "model.safetensors")
    with pytest.raises(OSError, match=r"\[Errno 28\] cannot write the checkpoint .*ckpt: No space left on device"):
        train.train(tiny_cfg(tmp_path, steps=8))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "state"] and everything_in(tmp_path / "ckpt") == old


# ---------------------------------------------------------------------------------------------
# Settings no problem fits: refused up front, every draw loop bounded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--ops", "*", "--max-operand", "99", "--mix", "long:1"],
     "family 'long': of the chains of 4..6 operands from 1..99 with ops '*', only 1 in 3.8e+07 keeps every result"),
    (["--ops", "+", "--max-operand", "1", "--mix", "short"],
     "mix: family 'short' has only 2 distinct problems with --max-operand 1 --ops '+', and its 200 held-out ones"),
])
def test_settings_no_problem_fits_are_refused_before_training(argv, message, capsys):
    """`--ops '*' --max-operand 99 --mix long:1` once hung with no output."""
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_a_batch_of_only_held_out_problems_is_an_error_not_a_hang(tmp_path):
    import signal

    def hung(*args):
        raise TimeoutError("make_batch drew for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        every_pair = {f"Q: ?+?={n}\n" for n in range(4, 17)}
        with pytest.raises(ValueError, match=r"draws gave 0 of the \d+ problems of a batch: nearly every problem "
                                             r"of --mix pair is held out"):
            train.make_batch(tiny_cfg(tmp_path, mix="pair"), 0, every_pair, EOS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_recovery_touches_only_a_dead_runs_leftovers_of_our_files(tmp_path, capsys):
    """recover_output deletes a leftover copy only if its process is gone and it holds nothing but
    files train.py writes; it never restores over an existing --out."""
    import subprocess

    dead, dead_too = subprocess.Popen(["true"]), subprocess.Popen(["true"])
    dead.wait(), dead_too.wait()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    for name, files in [(f"ckpt.tmp-{dead.pid}", ["config.json"]),  # a dead run's copy: removed
                        (f"ckpt.old-{dead.pid}", ["model.safetensors"]),  # --out exists: removed, not restored
                        (f"ckpt.tmp-{os.getppid()}", ["config.json"]),  # a live process's write: left
                        (f"ckpt.old-{dead_too.pid}", ["thesis.tex"]),  # not ours: left, with a line
                        ("ckpt.tmp-x", ["config.json"])]:  # not the pattern: left
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")
    train.recover_output(tiny_cfg(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", f"ckpt.old-{dead_too.pid}", f"ckpt.tmp-{os.getppid()}",
                                                   "ckpt.tmp-x"])
    assert (tmp_path / "ckpt" / "config.json").read_text() == "{}"
    out = capsys.readouterr().out
    assert f"left {tmp_path / f'ckpt.old-{dead_too.pid}'} alone: it holds files train.py does not write" in out
    assert out.count("removed") == 2


# ---------------------------------------------------------------------------------------------
# The autoregressive start and the Dream format (--family dream, --objective ar, --init-from)
# ---------------------------------------------------------------------------------------------


def dream_cfg(tmp_path, **over):
    return tiny_cfg(tmp_path, **{"family": "dream", "objective": "ar", **over})


def test_ar_loss_is_next_token_ce_over_the_answer_by_hand(tmp_path):
    """Each scored token's CE recomputed from a forward that sees only the tokens before it: a
    1-layer model run bidirectionally on the prefix ids[:i] (no causal mask, the future cut off),
    whose last row (the shift) predicts token i. Mean per example over its answer (or, with
    prompt_loss, every token after the first), then over the batch."""
    for prompt_loss in (False, True):
        cfg = dream_cfg(tmp_path, prompt_loss=prompt_loss, windows="32:1")
        model = train.build_model(cfg, "cpu")
        ids, region = batch(cfg)
        ids, region = ids[:2], region[:2]  # two examples of different lengths are enough
        assert ids.shape[0] == 2
        loss, d = train.ar_loss(model, ids, region, prompt_loss)
        assert torch.equal(d["scored"][:, 1:], torch.ones_like(region[:, 1:]) if prompt_loss else region[:, 1:])
        expected = []
        with torch.no_grad():
            for b in range(2):
                ces = []
                for i in range(1, ids.shape[1]):
                    if d["scored"][b, i]:
                        logit = model(ids[b:b + 1, :i], logits_range=(i, i + 1))[0, 0]  # (V,)
                        ces.append(torch.nn.functional.cross_entropy(logit[None], ids[b, i:i + 1]))
                expected.append(torch.stack(ces).mean())
        assert torch.allclose(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_one_ar_step_lowers_the_ar_loss(tmp_path):
    cfg = dream_cfg(tmp_path, prompt_loss=True)
    model = train.build_model(cfg, "cpu")
    ids, region = batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = train.ar_loss(model, ids, region, True)[0]
    before.backward()
    opt.step()
    with torch.no_grad():
        assert train.ar_loss(model, ids, region, True)[0] < before


def test_greedy_ar_decoding_is_the_argmax_of_its_own_causal_forward(tmp_path):
    """ar_generate's tokens, read back with one causal forward over prompt + generation, are each
    the argmax of the row before them (up to each row's first EOS), and a left-padded batch gives
    each row's tokens alone."""
    from decode import left_pad

    model = train.build_model(dream_cfg(tmp_path, n_layers=2), "cpu").eval()
    prompts = [task.encode("Q: 3+4=?\n"), task.encode("Q: 5+1-2=?\n")]
    ids, mask = left_pad(prompts, EOS)
    out = train.ar_generate(model, ids, mask, 12)
    assert out.shape == (2, 12)
    for row, prompt in enumerate(prompts):
        alone = train.ar_generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 12)
        assert torch.equal(alone[0], out[row])
        full = torch.tensor([prompt + alone[0].tolist()])
        with torch.no_grad():
            best = model(full, causal=True)[0, len(prompt):].argmax(-1)  # (G,)
        stop = (alone[0] == EOS).nonzero()
        end = int(stop[0]) + 1 if len(stop) else 12
        assert torch.equal(best[:end], alone[0, :end])


def test_a_dream_run_writes_a_dream_directory_and_diffusion_starts_from_it(tmp_path):
    """The AR stage saves a real Dream directory (model_type Dream, Qwen2 names, Dream's token
    names at the config's ids); --init-from it starts diffusion with exactly its weights, and that
    run's checkpoint loads as a Dream model too."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    ar = train.train(dream_cfg(tmp_path, prompt_loss=True, steps=4))
    ckpt = str(tmp_path / "ckpt")
    loaded = load_model(ckpt, device="cpu")
    assert loaded.config.family == "dream" and loaded.logit_shift == 1
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "Dream" and config["hidden_size"] == 32 and config["num_hidden_layers"] == 1
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "lm_head.weight",
            "model.norm.weight"} <= keys
    ids = torch.randint(0, 70, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids, causal=True), ar(ids, causal=True))
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.mask_token) == \
        ("<|endoftext|>", "<|endoftext|>", "<|beginoftext|>", "<|mask|>")
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.mask_token_id) == \
        (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"], config["mask_token_id"])
    diffusion = dream_cfg(tmp_path, objective="diffusion", init=ckpt, out=str(tmp_path / "dlm"),
                          state_dir=str(tmp_path / "dlm-state"), steps=2)
    assert_same_weights(ar, train.build_model(diffusion, "cpu"))
    trained = train.train(diffusion)
    again = load_model(str(tmp_path / "dlm"), device="cpu")
    assert again.config.family == "dream"
    with torch.no_grad():
        assert torch.equal(again(ids), trained(ids))
    with open(tmp_path / "dlm" / "training_log.json") as f:
        assert json.load(f)["init_log"]["config"]["objective"] == "ar"


def test_an_ar_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight = train.train(dream_cfg(tmp_path / "a", prompt_loss=True, steps=8))
    real_make_batch = train.make_batch

    def dies_at_step_6(cfg, step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return real_make_batch(cfg, step, *args)

    monkeypatch.setattr(train, "make_batch", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.train(dream_cfg(tmp_path / "b", prompt_loss=True, steps=8))
    monkeypatch.setattr(train, "make_batch", real_make_batch)
    assert_same_weights(straight, train.train(dream_cfg(tmp_path / "b", prompt_loss=True, steps=8)))
    with pytest.raises(ValueError, match="other settings"):  # the objective decides the weights
        train.train(dream_cfg(tmp_path / "b", prompt_loss=False, steps=12))


def test_init_from_refuses_another_family_or_shape(tmp_path, straight):
    llada = str(straight[1] / "ckpt")
    with pytest.raises(ValueError, match=f"--init {llada} is a LLaDA checkpoint, but --family is 'dream'"):
        train.build_model(dream_cfg(tmp_path, objective="diffusion", init=llada), "cpu")
    train.train(dream_cfg(tmp_path, steps=1))
    dream = str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=f"--init {dream} is a Dream checkpoint, but --family is 'llada'"):
        train.build_model(tiny_cfg(tmp_path, init=dream), "cpu")
    with pytest.raises(ValueError, match="another shape"):
        train.build_model(dream_cfg(tmp_path, objective="diffusion", init=dream, n_heads=4), "cpu")
    assert train.parse_args(["--init-from", dream, "--family", "dream"]).init == dream


def test_a_snapshot_from_before_the_family_setting_resumes(tmp_path):
    """A state.json written before --family/--objective existed ran with their defaults."""
    train.train(tiny_cfg(tmp_path, steps=4))
    file = tmp_path / "state" / "step-00000004" / "state.json"
    meta = json.loads(file.read_text())
    for key in ("family", "objective", "prompt_loss"):
        del meta["config"][key]
    file.write_text(json.dumps(meta))
    assert train.load_state(tiny_cfg(tmp_path, steps=8), train.build_model(tiny_cfg(tmp_path), "cpu"),
                            torch.optim.AdamW(train.build_model(tiny_cfg(tmp_path), "cpu").parameters()))[0] == 4


@pytest.mark.parametrize("argv, message", [
    (["--objective", "ar"], "objective 'ar' needs a model whose row i-1 predicts token i (--family dream)"),
    (["--family", "dream", "--prompt-loss"], "prompt_loss scores the prompt's next tokens: it needs --objective ar"),
    (["--family", "qwen"], "family must be one of ('llada', 'dream'), got 'qwen'"),
    (["--objective", "mlm"], "objective must be one of ('diffusion', 'ar'), got 'mlm'"),
])
def test_bad_family_or_objective_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_an_ar_models_answer_ends_at_the_blank_line_before_a_next_shot(tmp_path, monkeypatch):
    """A model that learned k-shot prompts writes '\\n\\nQ: ...' after its answer: scored as the
    answer alone when decoding is causal (the few-shot stop sequence), and wrong otherwise."""
    problem = task.FAMILIES["pair"].test_set(1)[0]
    total = int(problem.prompt.split("=")[1].split("?")[0])
    text = f"1+{total - 1}\n\nQ: ?+?=4\n1+3"
    monkeypatch.setattr(train, "ar_generate", lambda model, ids, mask, G: torch.tensor([task.encode(text)]))
    model = train.build_model(dream_cfg(tmp_path), "cpu")
    assert train.evaluate(model, [problem], causal=True) == 1.0
    import decode
    monkeypatch.setattr(decode, "generate", lambda *a, **k: type("R", (), {"generated": torch.tensor([task.encode(text)])}))
    assert train.evaluate(model, [problem], causal=False) == 0.0
