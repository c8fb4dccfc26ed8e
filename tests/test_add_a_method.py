"""The README's "Add your own method" recipe, applied to a copy of decode.py: a commit rule is one
field, its name in RULES and one branch in commit_rule; it then reaches every cache policy and
run.py's flags, and the copy without the branch fails loudly instead of falling back to top-k."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# The three edits, as the README shows them.
FIELD = '''    relative: float | None = None  # commit every proposal within this fraction of its row's best confidence
'''
RULES = '''RULES = ("threshold", "factor", "relative")'''
BRANCH = '''    if config.rule == "relative":
        best = conf.max(dim=-1, keepdim=True).values  # (B, 1) each row's most confident proposal
        return (conf >= config.relative * best) & (conf > -torch.inf)
'''


def patched_decode(tmp_path, with_branch=True):
    """decode.py with the recipe's edits, written to tmp_path and imported as its own module."""
    source = open(os.path.join(ROOT, "decode.py")).read()
    anchor_field = "    cache: str = \"none\""
    anchor_branch = "    if config.rule == \"topk\":\n        return select_topk(conf, k)"
    assert anchor_field in source and anchor_branch in source and 'RULES = ("threshold", "factor")' in source
    source = source.replace(anchor_field, FIELD + anchor_field, 1)
    source = source.replace('RULES = ("threshold", "factor")', RULES, 1)
    if with_branch:
        source = source.replace(anchor_branch, BRANCH + anchor_branch, 1)
    path = tmp_path / "decode.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"decode_recipe_{with_branch}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_these_edits():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for snippet in (FIELD, RULES, BRANCH):
        assert snippet.strip() in readme


@pytest.mark.parametrize("cache", ["none", "dual", "dllm"])
def test_the_new_rule_decodes_with_every_cache(tmp_path, random_model, cache):
    decode = patched_decode(tmp_path)
    prompt = torch.randint(0, 47, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=16, block_length=8, steps=16, cache=cache)
    relative = decode.generate(random_model, prompt, decode.DecodeConfig.for_model(random_model.config, relative=0.5, **kw))
    topk = decode.generate(random_model, prompt, decode.DecodeConfig.for_model(random_model.config, **kw))
    assert relative.masks_left == 0 and topk.nfe == 16
    assert relative.nfe < topk.nfe  # several commits per step: the rule is in use, dLLM-Cache's stop included
    with pytest.raises(ValueError, match="set one commit rule, not threshold and relative"):
        decode.DecodeConfig.for_model(random_model.config, threshold=0.9, relative=0.5, **kw)


def test_without_its_branch_the_rule_fails_loudly(tmp_path, random_model):
    decode = patched_decode(tmp_path, with_branch=False)
    config = decode.DecodeConfig.for_model(random_model.config, gen_length=8, block_length=8, steps=8, relative=0.5)
    with pytest.raises(ValueError, match="commit rule 'relative' has no branch in commit_rule"):
        decode.generate(random_model, torch.tensor([[1, 2, 3]]), config)


def test_the_new_field_is_a_run_py_flag(tmp_path):
    """run.py builds its flags from DecodeConfig's fields: --relative appears, and replaces run.py's
    default threshold rule when given."""
    patched_decode(tmp_path)
    code = "import run; a = run.parse_args(['--relative', '0.5']); print(a.relative, a.threshold)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "0.5 None"
