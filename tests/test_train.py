"""train.py and task.py: the diffusion objective, the data, a smoke training run that resumes exactly."""

import os

import pytest
import torch

import task
import train
from model import load_model


def tiny_cfg(tmp_path, **over):
    kw = dict(out=str(tmp_path / "ckpt"), state_dir=str(tmp_path / "state"), steps=12, batch_tokens=512,
              d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, warmup=2, eval_every=12, eval_problems=8,
              save_every=4, threads=1, device="cpu", bf16=False)
    kw.update(over)
    return train.TrainConfig(**kw)


def batch(cfg, step=0):
    return train.make_batch(cfg, step, set(), task.special_ids()["eos_token_id"])


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


def test_batches_are_deterministic_and_exclude_the_test_set(tmp_path):
    cfg = tiny_cfg(tmp_path)
    held = {p.prompt for p in task.test_set(50)}
    eos = task.special_ids()["eos_token_id"]
    a, _ = train.make_batch(cfg, 3, held, eos)
    b, _ = train.make_batch(cfg, 3, held, eos)
    assert torch.equal(a, b)
    for step in range(20):
        ids, region = train.make_batch(cfg, step, held, eos)
        for row, r in zip(ids, region):
            prompt = task.decode(row[~r].tolist())
            assert prompt not in held


def test_task_answers_are_right():
    for p in task.test_set(200):
        assert task.parse_answer(p.answer) == p.answer_value
        assert all(0 <= r <= 99 for *_, r in p.steps())
        assert eval(p.prompt[3:-3]) == p.answer_value  # left-to-right +/- is ordinary evaluation
    assert len({p.prompt for p in task.test_set(200)}) == 200
    assert task.parse_answer("1+2=3\n#### x") is None and task.parse_answer("no answer") is None


def test_smoke_training_writes_a_loadable_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    """A short run writes a checkpoint that load_model/AutoTokenizer read; a run killed at step 10
    and resumed (from its step-8 snapshot) ends with the same weights as one run straight through."""
    from transformers import AutoTokenizer

    straight = train.train(tiny_cfg(tmp_path / "a"))
    real_make_batch = train.make_batch

    def dies_at_step_10(cfg, step, *args):
        if step == 10:
            raise KeyboardInterrupt
        return real_make_batch(cfg, step, *args)

    monkeypatch.setattr(train, "make_batch", dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tmp_path / "b"))
    monkeypatch.setattr(train, "make_batch", real_make_batch)
    resumed = train.train(tiny_cfg(tmp_path / "b"))  # picks the state up at step 8, runs to 12
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    ckpt = str(tmp_path / "a" / "ckpt")
    loaded = load_model(ckpt, device="cpu")
    ids = torch.randint(0, 70, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), straight(ids))
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.mask_token_id == loaded.config.mask_token_id
    assert tok.decode(tok("Q: 1+2=?\n").input_ids) == "Q: 1+2=?\n"
    assert os.path.isfile(os.path.join(ckpt, "training_log.json"))


def test_resume_refuses_other_settings(tmp_path):
    train.train(tiny_cfg(tmp_path, steps=4))
    with pytest.raises(ValueError, match="other settings"):
        train.train(tiny_cfg(tmp_path, lr=0.5))
