"""AdaBlock (decode.py's AdaBlock block rule): parity with the original, and its properties."""

import pytest
import torch
from conftest import golden_cases, needs_golden
from hypothesis import given
from hypothesis import strategies as st

from decode import DecodeConfig, generate, left_pad


def config_for_case(case, model):
    """Our DecodeConfig for an `ada_*` golden case (the original's keyword names mapped to ours)."""
    kw = dict(case["kwargs"])
    return DecodeConfig.for_model(
        model.config, mask_id=case["mask_id"], cache=kw.pop("variant"), block_length=kw.pop("init_block_length"),
        delimiter_threshold=float(kw.pop("delimiter_threshold")), delimiter_ids=tuple(kw.pop("delimiter_ids")), **kw)


@needs_golden
@pytest.mark.parametrize("case", golden_cases(["ada_"]))
def test_golden_parity(tiny_model, case):
    """Every AdaBlock golden case: same tokens, forwards, block lengths and forwards per block."""
    cfg = config_for_case(case, tiny_model)
    for run in case["runs"]:
        out = generate(tiny_model, torch.tensor(run["prompt"]), cfg)
        assert out.ids.tolist() == run["output_ids"]
        assert out.nfe == run["forward_calls"]
        assert out.extras["block_lengths"] == [run["block_lengths"]]
        assert out.nfe_per_block == run["nfe_per_block"]
