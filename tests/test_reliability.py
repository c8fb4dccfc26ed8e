"""Reliability: bad inputs get a clear error, and decoding always ends (issue 8).

Three groups, one per file they exercise:
- decode.py: a stub model returns adversarial logits (NaN, +-inf, huge, all equal, the mask
  token on top) and hypothesis draws the settings; generate must either raise a clear
  FloatingPointError or return with every mask committed, within a bounded number of forwards.
  dLLM-Cache calls the model's pieces (embed, blocks, lm_head), not its forward, so it runs on a
  real small random model whose final norm is zeroed (all logits equal), scaled up, or poisoned.
  A real model in float16 whose logits (or guided logits) pass 65504 must raise the same error;
  so must blockbatch.py, which checks the logits of its own forwards.
- decode.py's input checks: token ids outside the vocabulary, float/bool prompts, a mask of the
  wrong shape, special ids outside the vocabulary; and very high temperatures still sample.
- model.py's loader: every broken config value or checkpoint file is a ValueError naming it.
"""

import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decode import DecodeConfig, draw_noise, generate, propose
from model import LLaDAModel, ModelConfig, init_weights, load_model, save_model

V = 40  # the stub's and the small model's vocabulary
MASK, EOS, EOT, NEWLINE = 39, 38, 37, 5
SMALL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=V,
                    rope_theta=10000.0, max_sequence_length=256, mask_token_id=MASK, eos_token_id=EOS,
                    pad_token_id=EOS, eot_token_id=EOT)
PROMPT = torch.tensor([[1, 2, 3, 4], [7, 8, 9, 10]])


# ---------------------------------------------------------------------------------------------
# A stub model: the forward's signature, logits chosen by the test
# ---------------------------------------------------------------------------------------------


class StubModel:
    """Mimics `model(input_ids, positions=, cache=, attention_mask=, logits_range=)` and returns
    `make(rows, K, call)` as the logits. It never writes the cache: the stale entries it leaves
    are as adversarial as any. `limit` turns a loop that would run forever into a test failure."""

    def __init__(self, make, limit=10_000, dtype=torch.float32):
        self.config, self.make, self.limit, self.calls = SMALL, make, limit, 0
        self.device, self.dtype = torch.device("cpu"), dtype

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, logits_range=None):
        rows, Q = input_ids.shape
        a, b = logits_range if logits_range is not None else (0, Q)
        self.calls += 1
        assert self.calls <= self.limit, f"generate made {self.calls} forwards: it does not terminate"
        return self.make(rows, b - a, self.calls).to(self.dtype)  # (rows, K, V)


def filled(value):
    return lambda rows, K, call: torch.full((rows, K, V), value)


def one_nan(rows, K, call):
    logits = torch.randn((rows, K, V), generator=torch.Generator().manual_seed(call))
    logits[0, K // 2, 3] = float("nan")
    return logits


def adversarial(kind: str, seed: int):
    """Finite but hostile logits, different at every call."""

    def make(rows, K, call):
        g = torch.Generator().manual_seed(seed * 1000 + call)
        r = torch.randn((rows, K, V), generator=g)
        if kind == "equal":  # every token equally likely: confidence 1/V everywhere, ties everywhere
            return torch.zeros((rows, K, V))
        if kind == "huge":  # near float32's limit: exp overflows, softmax must not
            return r.sign() * 3e38
        if kind == "mask_on_top":  # the mask token is the argmax everywhere (it is never proposed)
            return r.index_fill(-1, torch.tensor([MASK]), 1e4)
        if kind == "eos_on_top":
            return r.index_fill(-1, torch.tensor([EOS]), 50.0)
        if kind == "spiky":  # one certain token at some positions, flat elsewhere
            out = torch.zeros((rows, K, V))
            out[r[..., 0] > 0, 0] = 1e4
            return out
        return r * 10  # "random": sharp, random predictions

    return make


# ---------------------------------------------------------------------------------------------
# Non-finite logits: a clear FloatingPointError, never a hang
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [filled(float("nan")), filled(float("inf")), filled(float("-inf")), one_nan],
                         ids=["nan", "+inf", "-inf", "one-nan"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_non_finite_logits_raise(make, cache):
    stub = StubModel(make)
    cfg = DecodeConfig.for_model(SMALL, gen_length=16, block_length=8, steps=16, cache=cache, threshold=0.9)
    with pytest.raises(FloatingPointError, match=r"non-finite logits at step 0 of the block starting at position 4"):
        generate(stub, PROMPT, cfg)
    assert stub.calls == 1  # raised at the first forward, not after a loop


def test_cfg_overflow_raises():
    """Guidance multiplies a logit difference: huge finite logits and a big cfg_scale overflow."""
    stub = StubModel(adversarial("huge", 0))
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cfg_scale=1e30)
    with pytest.raises(FloatingPointError, match="cfg_scale"):
        generate(stub, PROMPT, cfg)


@pytest.mark.parametrize("kind", ["equal", "huge", "mask_on_top", "eos_on_top", "spiky", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e6])
def test_finite_adversarial_logits_terminate(kind, temperature):
    stub = StubModel(adversarial(kind, 1))
    cfg = DecodeConfig.for_model(SMALL, gen_length=16, block_length=8, steps=16, cache="dual",
                                 threshold=0.9, temperature=temperature)
    out = generate(stub, PROMPT, cfg)
    gen = out.generated
    assert out.masks_left == 0 and not (gen == MASK).any() and out.nfe <= 16


def small_model(seed=3, scale=8.0):
    model = init_weights(LLaDAModel(copy.deepcopy(SMALL)), seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


@pytest.fixture(scope="module")
def real_models():
    """A small random model and its hostile variants: final norm zeroed (every logit equal),
    scaled by 1e20 (huge finite logits), and one NaN in ln_f.weight."""
    base = small_model()
    variants = {"normal": base}
    for name, edit in (("equal", lambda w: w.zero_()), ("huge", lambda w: w.mul_(1e20)),
                       ("nan", lambda w: w.__setitem__(0, float("nan")))):
        m = copy.deepcopy(base)
        with torch.no_grad():
            edit(m.model.transformer.ln_f.weight)
        variants[name] = m
    return variants


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dllm"])
def test_nan_weight_raises(real_models, cache):
    """One NaN in ln_f.weight of a real model: every cache policy stops with the step and block."""
    cfg = DecodeConfig.for_model(SMALL, gen_length=16, block_length=8, steps=16, cache=cache, threshold=0.9)
    with pytest.raises(FloatingPointError, match=r"non-finite logits at step 0 .* bad"):
        generate(real_models["nan"], PROMPT, cfg)


# float16 overflow: finite in float32, inf in float16 (largest finite value 65504)


def loud_head(model):
    """A copy of `model` whose logits are ~1e5 times larger (largest |logit| ~3e5 here): ln_f
    scaled by 100 and the LM head by 1000, so every weight stays well inside float16's range
    and only the logits overflow it."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.transformer.ln_f.weight.mul_(100.0)
        m.model.transformer.ff_out.weight.mul_(1000.0)
    return m


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dllm"])
def test_float16_logit_overflow_raises(real_models, cache):
    """A float16 model whose logits exceed 65504 (the same weights run fine in float32): the
    overflow is the clear FloatingPointError naming step and block, not a silent argmax over inf."""
    loud = loud_head(real_models["normal"])
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cache=cache)
    with torch.no_grad():
        assert torch.isfinite(loud(PROMPT)).all()  # float32: finite
    generate(loud, PROMPT, cfg)
    half = loud.half()  # .half() converts in place: `loud` is our own copy
    assert all(torch.isfinite(p).all() for p in half.parameters())  # the weights fit float16
    with pytest.raises(FloatingPointError, match=r"non-finite logits at step 0 of the block starting at position 4 "
                                                 r"\(forward 1\): the model overflowed its float type \(a float16 model"):
        generate(half, PROMPT, cfg)


def test_float16_cfg_overflow_raises(real_models):
    """Guidance in float16: un + (cfg + 1)(cond - un) passes 65504 at a cfg_scale float32 carries."""
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cfg_scale=1e6)
    out = generate(real_models["normal"], PROMPT, cfg)  # float32: finite
    assert out.masks_left == 0
    half = copy.deepcopy(real_models["normal"]).half()
    with pytest.raises(FloatingPointError, match=r"non-finite logits at step 0 of the block starting at position 4 "
                                                 r".*a huge cfg_scale: 1000000.0"):
        generate(half, PROMPT, cfg)


# blockbatch.py runs its own forwards (decode.model_forward, not decode.generate's loop), so it
# checks their logits itself.


@pytest.mark.parametrize("variant", ["nan", "float16-overflow"])
def test_blockbatch_non_finite_logits_raise(real_models, variant):
    """A NaN weight, or a float16 model whose logits overflow: BlockBatch stops at its first
    forward with a FloatingPointError naming the forward and the model's dtype."""
    import blockbatch

    model = real_models["nan"] if variant == "nan" else loud_head(real_models["normal"]).half()
    dtype = "torch.float32" if variant == "nan" else "torch.float16"
    config = blockbatch.BlockBatchConfig.for_model(SMALL, gen_length=8, block_sizes=(4, 8))
    with pytest.raises(FloatingPointError, match=rf"non-finite logits at forward 1: the model overflowed its dtype "
                                                 rf"\({dtype}\) or its weights are bad"):
        blockbatch.generate(model, PROMPT[:1], config)


@settings(max_examples=30)
@given(cache=st.sampled_from(["none", "prefix", "dual"]),
       rule=st.sampled_from(["topk", "threshold", "factor"]),
       threshold=st.floats(0.01, 1.0), factor=st.floats(0.01, 50.0),
       blocks=st.sampled_from([(8, 8), (16, 4), (16, 8), (12, 3), (24, 8)]),
       fewer_steps=st.booleans(),
       temperature=st.sampled_from([0.0, 0.7, 1e6]),
       remasking=st.sampled_from(["low_confidence", "random"]),
       kind=st.sampled_from(["equal", "huge", "mask_on_top", "eos_on_top", "spiky", "random"]),
       adablock=st.booleans(), stop_at_eos=st.booleans(), cfg=st.sampled_from([0.0, 1.5]),
       seed=st.integers(0, 1000))
def test_generate_always_terminates(cache, rule, threshold, factor, blocks, fewer_steps, temperature, remasking,
                                    kind, adablock, stop_at_eos, cfg, seed):
    """Whatever the settings and however hostile the (finite) logits, generate returns with no
    mask left and at most one forward per generated token plus one per block; huge logits under
    guidance may instead overflow, which must be the clear FloatingPointError."""
    G, block = blocks
    steps = (G // block) * max(1, block // 2) if fewer_steps else G  # top-k: 1 or 2 tokens per step
    if adablock and rule == "topk":
        rule = "threshold"  # AdaBlock decodes each block with the threshold or factor rule
    stub = StubModel(adversarial(kind, seed), limit=4 * G + 8)
    config = DecodeConfig.for_model(
        SMALL, gen_length=G, block_length=block, steps=steps, cache=cache, temperature=temperature,
        remasking=remasking, cfg_scale=cfg, stop_at_eos=stop_at_eos,
        threshold=threshold if rule == "threshold" else None, factor=factor if rule == "factor" else None,
        delimiter_ids=(NEWLINE,) if adablock else None)
    try:
        out = generate(stub, PROMPT, config, generator=torch.Generator().manual_seed(seed))
    except FloatingPointError as err:
        assert kind == "huge" and cfg > 0, err  # only guidance can turn finite logits into inf
        return
    assert out.masks_left == 0 and not (out.generated == MASK).any()
    assert out.nfe <= G + G // block  # top-k: the schedule; threshold/factor: >= 1 commit per step


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_rule_that_commits_nothing_is_an_error_not_a_hang(cache, monkeypatch):
    """A commit rule that commits nothing would loop forever (a block ends when its masks are
    gone): the loop names the rule instead, after the first such step."""
    import decode

    monkeypatch.setitem(decode.COMMIT_RULES, "threshold", lambda p, config, k: torch.zeros_like(p.eligible))
    stub = StubModel(adversarial("random", 0), limit=3)
    config = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cache=cache, threshold=0.9)
    with pytest.raises(RuntimeError, match="the commit rule 'threshold' committed nothing at step 0"):
        generate(stub, PROMPT, config)
    assert stub.calls == 1


def test_adablock_prefix_rows_differ():
    """AdaBlock with the prefix cache, rows choosing different block ends (row 0 ends on the
    delimiter after one token, row 1 takes the default 8): the shared query window must give
    logits to every row's block. It once took the range from row 0's block alone, and row 1
    then committed nothing, forever (found by the hypothesis test above)."""
    stub = StubModel(adversarial("random", 379), limit=100)
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cache="prefix", threshold=1.0,
                                 delimiter_ids=(NEWLINE,))
    out = generate(stub, PROMPT, cfg)
    assert out.masks_left == 0 and out.extras["block_lengths"] == [[1, 7], [8]]


@settings(max_examples=12)
@given(variant=st.sampled_from(["normal", "equal", "huge"]),
       rule=st.sampled_from(["topk", "threshold", "factor"]),
       blocks=st.sampled_from([(8, 8), (16, 8), (16, 4)]),
       intervals=st.tuples(st.integers(1, 4), st.integers(1, 4)), ratio=st.sampled_from([0.0, 0.25, 1.0]),
       temperature=st.sampled_from([0.0, 1e6]))
def test_dllm_cache_always_terminates(real_models, variant, rule, blocks, intervals, ratio, temperature):
    """dLLM-Cache runs the model's pieces, so hostile logits come from a real model's weights."""
    G, block = blocks
    config = DecodeConfig.for_model(
        SMALL, gen_length=G, block_length=block, steps=G, cache="dllm", temperature=temperature,
        prompt_interval_steps=intervals[0], gen_interval_steps=intervals[1], transfer_ratio=ratio,
        threshold=0.9 if rule == "threshold" else None, factor=1.0 if rule == "factor" else None)
    out = generate(real_models[variant], PROMPT, config, generator=torch.Generator().manual_seed(0))
    assert out.masks_left == 0 and out.nfe <= 2 * G
    assert 0 < out.extras["recomputed_fraction"] <= 1


# ---------------------------------------------------------------------------------------------
# Very high temperatures still sample every token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quirks", [False, True])
def test_huge_temperature_samples_every_token(quirks):
    """At T = 1e6 the sample must be uniform (softmax(logits / T) is flat), not an argmax that
    takes the lowest ids: in the log form, and in LLaDA's exp(logits) / g^T form (the quirk),
    which overflows to inf or 0 there and falls back to the log form."""
    K = 4000
    config = DecodeConfig(gen_length=8, block_length=8, steps=8, temperature=1e6, mask_id=MASK, quirks=quirks)
    logits = torch.randn((1, K, V), generator=torch.Generator().manual_seed(0)) * 5  # any logits: T flattens them
    noise = draw_noise(config, torch.Generator().manual_seed(1), (1, K, V), device="cpu")
    p = propose(logits, torch.ones((1, K), dtype=torch.bool), config, noise)
    x0, conf = p.tokens, p.confidence
    counts = torch.bincount(x0.flatten(), minlength=V)
    expected = K / (V - 1)  # every id but the mask token
    assert counts[MASK] == 0
    others = torch.cat([counts[:MASK], counts[MASK + 1:]]).float()
    assert others.min() > 0.5 * expected and others.max() < 1.5 * expected, counts.tolist()
    assert torch.isfinite(conf).all()


def test_huge_temperature_generate_spreads():
    stub = StubModel(lambda rows, K, call: torch.zeros((rows, K, V)))
    cfg = DecodeConfig.for_model(SMALL, gen_length=64, block_length=64, steps=64, temperature=1e6)
    out = generate(stub, PROMPT, cfg, generator=torch.Generator().manual_seed(0))
    ids = out.generated.flatten()
    assert len(set(ids.tolist())) >= 25 and ids.float().mean() > 10  # spread, not the lowest ids


# ---------------------------------------------------------------------------------------------
# generate's input checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, mask, overrides, message", [
    (torch.tensor([[1, 2, 40]]), None, {}, r"prompt token ids must lie in \[0, 40\), got values from 1 to 40"),
    (torch.tensor([[-1, 2, 3]]), None, {}, r"must lie in \[0, 40\)"),
    (torch.tensor([[1.0, 2.0]]), None, {}, "must hold integer token ids, got dtype torch.float32"),
    (torch.tensor([[True, False]]), None, {}, "must hold integer token ids, got dtype torch.bool"),
    (torch.tensor([[1, 2, 3]]), torch.ones((1, 2)), {}, r"attention_mask shape \(1, 2\) != prompt shape \(1, 3\)"),
    (torch.tensor([[1, 2, 3]]), torch.ones(3), {}, r"attention_mask shape \(3,\) != prompt shape \(1, 3\)"),
    (torch.tensor([[1, 2, 3]]), [[1, 1, 1]], {}, r"attention_mask shape list != prompt shape"),
    (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 1]]), {}, "only 0 .padding. and 1"),
    (torch.tensor([[1, 2, 3]]), None, {"eos_id": 40}, r"eos_id 40 is outside the vocabulary \[0, 40\)"),
    (torch.tensor([[1, 2, 3]]), None, {"eot_id": 41}, r"eot_id 41 is outside the vocabulary"),
    (torch.tensor([[1, 2, 3]]), None, {"delimiter_ids": (99,), "threshold": 0.9}, r"delimiter_ids \[99\]"),
])
def test_generate_input_errors(prompt, mask, overrides, message):
    stub = StubModel(adversarial("random", 0))
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, **overrides)
    with pytest.raises(ValueError, match=message):
        generate(stub, prompt, cfg, attention_mask=mask)
    assert stub.calls == 0  # refused before any compute


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=float("nan")), "threshold must be a finite number > 0 and <= 1, got nan"),
    (dict(threshold=0.0), "threshold must be a finite number > 0"),
    (dict(threshold=1.01), "threshold"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number >= 0, got inf"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(factor=float("nan")), "factor"),
    (dict(factor=0.0), "factor"),
    (dict(transfer_ratio=1.5), "transfer_ratio"),
    (dict(gen_interval_steps=0), "gen_interval_steps must be a positive integer"),
    (dict(gen_length=8.0), "gen_length must be a positive integer"),
    (dict(steps=True), "steps must be a positive integer"),
])
def test_decode_config_errors(kwargs, message):
    base = dict(gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------
# The loader: config values and checkpoint files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    """A small checkpoint directory written by save_model."""
    path = tmp_path / "ckpt"
    save_model(small_model(scale=1.0), str(path))
    return path


def edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("changes, message", [
    (dict(rms_norm_eps=-1), "rms_norm_eps must be >= 0, got -1"),
    (dict(rope_theta=0), "rope_theta must be > 0, got 0"),
    (dict(rope_theta=-10000.0), "rope_theta must be > 0"),
    (dict(rope_theta="10000"), r"rope_theta must be a finite number, got '10000' \(str\)"),
    (dict(rope_theta=True), r"rope_theta must be a finite number, got True \(bool\)"),
    (dict(d_model="32"), r"d_model must be an integer, got '32' \(str\)"),
    (dict(n_layers=2.0), r"n_layers must be an integer, got 2.0 \(float\)"),
    (dict(n_heads=True), r"n_heads must be an integer, got True \(bool\)"),
    (dict(vocab_size=[40]), r"vocab_size must be an integer, got \[40\] \(list\)"),
    (dict(mask_token_id="39"), "mask_token_id must be an integer"),
    (dict(weight_tying="false"), r"weight_tying must be true or false, got 'false' \(str\)"),
    (dict(include_bias=0), "include_bias must be true or false"),
])
def test_config_value_errors(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=r"config.json: config: " + message):
        load_model(str(ckpt), device="cpu")


@pytest.mark.parametrize("text, message", [
    ("[1, 2, 3]", "expected a JSON object of settings, got a list"),
    ('"d_model"', "expected a JSON object of settings, got a str"),
    ('{"d_model": 32,', "is not valid JSON"),
])
def test_config_file_errors(ckpt, text, message):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_model(str(ckpt), device="cpu")


def test_rms_norm_eps_negative_in_model_config():
    with pytest.raises(ValueError, match="rms_norm_eps must be >= 0"):
        ModelConfig(**{**SMALL.__dict__, "rms_norm_eps": -1.0})


def resave(path, edit, name="model.safetensors"):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / name))


def test_mixed_dtype_checkpoint_needs_a_dtype(ckpt):
    resave(ckpt, lambda s: s.update({"model.transformer.ln_f.weight": s["model.transformer.ln_f.weight"].bfloat16()}))
    with pytest.raises(ValueError, match=r"mixes tensor dtypes: BF16 \(model.transformer.ln_f.weight\), F32 .*pass dtype="):
        load_model(str(ckpt), device="cpu")
    model = load_model(str(ckpt), device="cpu", dtype="float32")  # an explicit dtype decides
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_integer_tensor_refused(ckpt):
    name = "model.transformer.ln_f.weight"
    resave(ckpt, lambda s: s.update({name: s[name].to(torch.int64)}))
    with pytest.raises(ValueError, match=r"ln_f.weight'\] hold integer or bool values \(I64\)"):
        load_model(str(ckpt), device="cpu", dtype="float32")  # even with a dtype: not a weight


def test_float8_checkpoint_refused_unless_converted(ckpt):
    def to_float8(state):
        for k in state:
            state[k] = state[k].to(torch.float8_e4m3fn)

    resave(ckpt, to_float8)
    with pytest.raises(ValueError, match="as F8_E4M3, which this model does not run in; pass dtype="):
        load_model(str(ckpt), device="cpu")
    assert load_model(str(ckpt), device="cpu", dtype="float32").dtype == torch.float32


def test_unsupported_dtype_argument(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype torch.float8_e4m3fn"):
        load_model(str(ckpt), device="cpu", dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(str(ckpt), device="cpu", dtype="float8")


def shard(ckpt, weight_map_edit=None, duplicate=None):
    """Split the checkpoint into two shards with an index; optionally copy one tensor into both."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    names = sorted(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    if duplicate:  # the first tensor of shard a, copied into shard b as well
        halves["b.safetensors"] = halves["b.safetensors"] + names[:1]
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: state[n] for n in part}, str(ckpt / fname))
        weight_map.update({n: fname for n in part if n not in weight_map})
    if weight_map_edit:
        weight_map_edit(weight_map)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_loads(ckpt):
    reference = load_model(str(ckpt), device="cpu")
    shard(ckpt)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(load_model(str(ckpt), device="cpu")(ids), reference(ids))


def test_tensor_in_two_shards_refused(ckpt):
    shard(ckpt, duplicate=True)
    with pytest.raises(ValueError, match=r"tensor model.transformer.blocks.0.attn_norm.weight is in two files, .*a.safetensors and "
                                         r".*b.safetensors; keep it in one"):
        load_model(str(ckpt), device="cpu")


def test_index_disagreeing_with_shards_refused(ckpt):
    def swap(wm):
        name = next(n for n, f in wm.items() if f == "a.safetensors")
        wm[name] = "b.safetensors"

    shard(ckpt, swap)
    with pytest.raises(ValueError, match="the index places .* in other shards"):
        load_model(str(ckpt), device="cpu")


@pytest.mark.parametrize("bad_name", ["../outside.safetensors", "sub/../../x.safetensors", "/etc/passwd", "", 7])
def test_shard_outside_directory_refused(ckpt, bad_name):
    def point_outside(wm):
        wm[next(iter(wm))] = bad_name

    shard(ckpt, point_outside)
    (ckpt.parent / "outside.safetensors").write_bytes(b"")  # exists, and must not be opened
    with pytest.raises(ValueError, match="which is not a file name inside .*; refusing it"):
        load_model(str(ckpt), device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_named(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"not a safetensors file", "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"):
        load_model(str(ckpt), device="cpu")


def test_corrupt_index_named(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not readable JSON"):
        load_model(str(ckpt), device="cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu' \\(use cpu, cuda or cuda:N\\)"),
    ("cuda:-x", "unknown device"),
])
def test_bad_device_named(ckpt, device, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(ckpt), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_named(ckpt):
    with pytest.raises(ValueError, match="this torch build sees no CUDA device"):
        load_model(str(ckpt), device="cuda")


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dllm"])
def test_padded_positions_never_reach_the_embedding(cache):
    """Left padding may hold any id (here -1, outside the vocabulary): the padded positions are
    hidden by the mask and never embedded with their raw ids, so the row decodes as it does alone."""
    stub_free = LLaDAModel(SMALL)
    init_weights(stub_free, 0)
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=4, steps=8, cache=cache)
    prompt = [5, 6, 7]
    padded = generate(stub_free, torch.tensor([[-1, -1, -1] + prompt]), cfg,
                      attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    alone = generate(stub_free, torch.tensor([prompt]), cfg)
    assert padded.generated.tolist() == alone.generated.tolist()


def test_attention_mask_values_are_not_truncated():
    """0.5 is neither padding nor a real token: refused, not truncated to 0 by a cast."""
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8)
    for bad in (0.5, 1.5):
        with pytest.raises(ValueError, match="only 0 .padding. and 1"):
            generate(StubModel(adversarial("random", 0)), torch.tensor([[1, 2, 3]]), cfg,
                     attention_mask=torch.tensor([[bad, 1.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# The API's edges: settings changed after construction, odd containers, empty or data-less input
# ---------------------------------------------------------------------------------------------


def test_mask_id_equal_to_eos_is_refused():
    """A mask id that is also EOS (or EOT) would make every committed EOS read as a mask."""
    for other in ("eos_id", "eot_id"):
        with pytest.raises(ValueError, match=f"mask_id and {other} are both 5"):
            DecodeConfig(gen_length=8, block_length=8, steps=8, mask_id=5, **{other: 5})


@pytest.mark.parametrize("field, value, message", [
    ("cache", "dualx", "unknown cache 'dualx'"),
    ("threshold", 7.0, "threshold must be a finite number > 0 and <= 1, got 7.0"),
    ("eos_id", MASK, f"mask_id and eos_id are both {MASK}"),
    ("steps", 3, "steps 3 is not divisible"),
])
def test_a_field_changed_after_construction_is_checked_again(field, value, message):
    """generate checks the settings again: a field set on a built config (here an unknown cache,
    which once ran DualCache under that name) is refused before any forward."""
    stub = StubModel(adversarial("random", 0))
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=4, steps=8)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=message):
        generate(stub, PROMPT, cfg)
    assert stub.calls == 0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dllm"])
def test_an_empty_batch_is_one_clear_error_with_every_cache(cache):
    stub = StubModel(adversarial("random", 0))
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8, cache=cache)
    with pytest.raises(ValueError, match=r"prompt_ids must be a \(B, P\) tensor with B > 0 and P > 0, got \(0, 3\)"):
        generate(stub, torch.zeros((0, 3), dtype=torch.long), cfg)


def test_api_edges_are_one_line_errors():
    from decode import left_pad

    with pytest.raises(ValueError, match="left_pad needs at least one prompt, got none"):
        left_pad([], pad_id=EOS)
    cfg = DecodeConfig.for_model(SMALL, gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="generator must be a torch.Generator .or None., got 42"):
        generate(StubModel(adversarial("random", 0)), PROMPT, cfg, generator=42)
    with pytest.raises(ValueError, match="prompt_ids is on the meta device"):
        generate(StubModel(adversarial("random", 0)), PROMPT.to("meta"), cfg)


def test_iterables_of_ids_are_read_once():
    """block_sizes and delimiter_ids given as generators: read once, not emptied by a check."""
    from blockbatch import BlockBatchConfig

    cfg = BlockBatchConfig(gen_length=16, block_sizes=(b for b in (8, 4)), mask_id=MASK, eos_id=EOS)
    assert cfg.block_sizes == (4, 8)
    cfg = DecodeConfig(gen_length=8, block_length=4, steps=8, threshold=0.9, delimiter_ids=(i for i in (NEWLINE,)))
    assert cfg.delimiter_ids == (NEWLINE,)
