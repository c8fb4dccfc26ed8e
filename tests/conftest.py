"""Shared fixtures: the golden reference outputs, the tiny golden checkpoint, hypothesis settings."""

import json
import os
import sys

import pytest
import torch
from hypothesis import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The parity target lives beside the checkout (../shared/golden); tests that need it skip when absent.
GOLDEN = os.environ.get("GOLDEN_DIR", os.path.join(ROOT, "..", "shared", "golden"))
TINY = os.path.join(GOLDEN, "tiny")
CKPT = os.path.join(TINY, "ckpt")
SHIPPED = os.path.join(ROOT, "checkpoints", "arith")

# Bounded, deadline-free hypothesis runs keep CI fast and free of timing flakes.
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("ci")

# One thread: the models here are tiny, and on a shared or busy machine two OpenMP threads per
# process spin against other jobs and can make a test ten times slower.
torch.set_num_threads(1)

needs_golden = pytest.mark.skipif(not os.path.isdir(CKPT), reason=f"golden outputs not found at {GOLDEN}")


def golden_cases(prefixes):
    """(name, case dict) for every golden JSON file whose name starts with one of `prefixes`."""
    if not os.path.isdir(TINY):
        return []
    out = []
    for name in sorted(os.listdir(TINY)):
        if name.endswith(".json") and name.startswith(tuple(prefixes)):
            with open(os.path.join(TINY, name)) as f:
                out.append(pytest.param(json.load(f), id=name[:-5]))
    return out


@pytest.fixture(scope="session")
def tiny_model():
    from model import load_model

    return load_model(CKPT, device="cpu")


@pytest.fixture(scope="session")
def random_model():
    """A small random model with grouped-query attention, built in the test (no files needed)."""
    from model import LLaDAModel, ModelConfig, init_weights

    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=50,
                      rope_theta=10000.0, max_sequence_length=256, mask_token_id=49, eos_token_id=48,
                      pad_token_id=48, eot_token_id=47)
    model = init_weights(LLaDAModel(cfg), seed=3).eval()
    with torch.no_grad():  # larger weights: sharper, more confident predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def random_model64(random_model):
    """The random model in float64, for exact comparisons where float32 rounding could flip a near-tie."""
    import copy

    return copy.deepcopy(random_model).to(torch.float64)


# Device-independent tests take the `device` fixture: they run on the CPU, and on CUDA when torch
# sees a GPU (marked `cuda`, skipped cleanly otherwise). `pytest -m cuda` runs only the GPU ones.
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device; skipped where torch sees none")


@pytest.fixture(scope="session", params=[
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")]),
])
def device(request):
    return torch.device(request.param)


def random_prompts(s, n):
    """n prompts of 1..s['prompt_len'] random ids below the random model's special tokens,
    reproducible from s['seed'] (s: a hypothesis-drawn settings dict)."""
    g = torch.Generator().manual_seed(s["seed"])
    return [torch.randint(0, 47, (int(torch.randint(1, s["prompt_len"] + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
