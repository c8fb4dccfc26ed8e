"""The README's "Add your own method" recipe, read from the README itself and applied to a copy of
decode.py: the EB-sampler commit rule (a field and a registered function) and a cache policy (a
registered class). They then reach every cache policy, batches, run.py's flags and the registries
the benchmark and the property tests read; without its registration the rule fails loudly instead
of falling back to another one."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()
RECIPE = README[README.index("## Add your own method"):README.index("## Benchmark")]
FIELD, RULE, POLICY = re.findall(r"```\n(.*?)```", RECIPE, flags=re.S)
ANCHOR = "    # -- Cache policy\n"  # the field goes at the end of DecodeConfig's commit-rule group


def patched_decode(tmp_path, register_rule=True):
    """decode.py with the recipe's edits, written to tmp_path and imported as its own module (a
    checkout that already has them, a fork that followed the recipe, is taken as it is)."""
    source = open(os.path.join(ROOT, "decode.py")).read()
    assert source.count(ANCHOR) == 1
    if FIELD.strip() not in source:
        source = source.replace(ANCHOR, FIELD + ANCHOR)
    source = source.replace(RULE.strip(), "")  # the rule goes at the end, or nowhere
    source += "\n\n" + (RULE if register_rule else "")
    if POLICY.strip() not in source:
        source += "\n\n" + POLICY
    path = tmp_path / "decode.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"decode_recipe_{register_rule}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_recipe_is_what_the_readme_shows():
    assert "entropy_bound: float | None" in FIELD and '@register(COMMIT_RULES, "entropy_bound")' in RULE
    assert '@register(CACHE_POLICIES, "dual+8")' in POLICY


@pytest.mark.parametrize("cache", ["none", "dual", "dllm", "dual+8"])
def test_the_new_rule_decodes_with_every_cache(tmp_path, random_model, cache):
    decode = patched_decode(tmp_path)
    assert "entropy_bound" in decode.RULES and "dual+8" in decode.CACHES
    prompt = torch.randint(0, 47, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=16, block_length=8, steps=16, cache=cache)
    eb = decode.generate(random_model, prompt, decode.DecodeConfig.for_model(random_model.config, entropy_bound=10.0, **kw))
    topk = decode.generate(random_model, prompt, decode.DecodeConfig.for_model(random_model.config, **kw))
    assert eb.masks_left == 0 and topk.nfe == 16
    assert eb.nfe < topk.nfe  # several commits per step: the rule is in use, dLLM-Cache's stop included
    one = decode.generate(random_model, prompt, decode.DecodeConfig.for_model(random_model.config, entropy_bound=0.0, **kw))
    assert one.nfe == 16  # a zero bound commits exactly one proposal per step
    with pytest.raises(ValueError, match="set one commit rule, not threshold and entropy_bound"):
        decode.DecodeConfig.for_model(random_model.config, threshold=0.9, entropy_bound=0.5, **kw)


def test_the_rule_is_the_entropy_bound(tmp_path):
    """By hand: confidences 0.9 > 0.8 > 0.7 with entropies 0.5, 0.2, 0.4: the cost of the first
    k is sum - max = 0, 0.2, 0.6; a bound of 0.3 commits the first two."""
    decode = patched_decode(tmp_path)
    conf = torch.tensor([[0.8, 0.9, 0.7]], dtype=torch.float64)
    p = decode.Proposals(torch.zeros((1, 3), dtype=torch.long), None, torch.ones((1, 3), dtype=torch.bool), conf)
    p.__dict__["entropy"] = torch.tensor([[0.2, 0.5, 0.4]], dtype=torch.float64)  # the cached property's slot
    config = decode.DecodeConfig(gen_length=4, block_length=4, steps=4, entropy_bound=0.3)
    assert decode.COMMIT_RULES["entropy_bound"](p, config, None).tolist() == [[True, True, False]]


def test_without_its_registration_the_rule_fails_loudly(tmp_path, random_model):
    decode = patched_decode(tmp_path, register_rule=False)
    with pytest.raises(ValueError, match="commit rule 'entropy_bound' has no implementation"):
        decode.DecodeConfig.for_model(random_model.config, gen_length=8, block_length=8, steps=8, entropy_bound=0.5)


def test_the_new_field_and_policy_reach_run_py(tmp_path):
    """run.py builds its flags from DecodeConfig's fields and the cache registry: --entropy-bound
    appears and replaces run.py's default threshold rule, and --cache dual+8 is a choice."""
    patched_decode(tmp_path)
    code = ("import run; a = run.parse_args(['--entropy-bound', '0.5', '--cache', 'dual+8']); "
            "print(a.entropy_bound, a.threshold, a.cache)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "0.5 None dual+8"
