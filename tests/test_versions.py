"""Versions: the shipped checkpoints and the tokenizer files train.py writes load with every
transformers, tokenizers and safetensors that requirements.txt allows.

It tests whatever is installed; .ci/run runs it a second time, with test_model.py, in a virtual
environment holding the oldest versions requirements.txt allows. transformers 5 calls its fast
tokenizer class TokenizersBackend, a name transformers 4 cannot load, so every tokenizer_config.json
here names the class by its older name, PreTrainedTokenizerFast, which both versions load.
"""

import json
import os

import pytest
from conftest import ROOT

from model import load_config, load_model
from tools import task

CHECKPOINTS = sorted(path for d in os.listdir(os.path.join(ROOT, "checkpoints"))  # every shipped checkpoint directory
                     if os.path.isfile(os.path.join(path := os.path.join(ROOT, "checkpoints", d), "config.json")))


def check_tokenizer(tok, ids: dict):
    """The tokenizer encodes and decodes like task.py's own character tables, with the special ids
    of `ids` (config.json's names) and left padding."""
    # A problem of each family, and the spaces transformers 4's clean-up of decoded text removes.
    texts = [p.prompt + p.answer for fam in task.FAMILIES.values() for p in fam.test_set(1)]
    for text in texts + ["a . b , c ? d ' e n't f 'm g 's h 've i 're"]:
        assert tok(text).input_ids == task.encode(text)
        assert tok.decode(task.encode(text)) == text
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ids["mask_token_id"], ids["eos_token_id"], ids["pad_token_id"])
    assert tok.padding_side == "left"
    batch = tok(["1", "123"], padding=True).input_ids
    assert batch == [[ids["pad_token_id"]] * 2 + task.encode("1"), task.encode("123")]


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=os.path.basename)
def test_shipped_tokenizer_names_a_class_every_version_has(ckpt):
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=os.path.basename)
def test_shipped_tokenizer_loads(ckpt):
    from transformers import AutoTokenizer

    check_tokenizer(AutoTokenizer.from_pretrained(ckpt), vars(load_config(ckpt)))


def test_built_tokenizer_writes_loadable_files(tmp_path):
    """What train.py writes next to a new checkpoint: build_tokenizer().save_pretrained(out)."""
    from transformers import AutoTokenizer

    task.build_tokenizer().save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    check_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path)), task.special_ids())


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=os.path.basename)
def test_shipped_checkpoint_loads(ckpt):
    """safetensors reads the shipped weights, and a forward over a prompt and a masked answer
    window gives finite logits over the whole vocabulary."""
    import torch

    model = load_model(ckpt, device="cpu")
    prompt = task.encode(task.FAMILIES["short"].test_set(1)[0].prompt)
    ids = torch.tensor([prompt + [model.config.mask_token_id] * 8])  # (1, L)
    with torch.no_grad():
        logits = model(ids)  # (1, L, V)
    assert logits.shape == (1, len(prompt) + 8, model.config.embedding_size) and torch.isfinite(logits).all()
