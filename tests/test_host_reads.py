"""At most one host read per decode step (issue 10): a TorchFunctionMode counts every call that
waits for the device (`item`, `tolist`, `__bool__`, `__int__`, `__float__`, `__index__`,
`nonzero`) during a decode, through the native modules, so a new sync cannot slip in."""
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import importlib

from prophet import DecodeConfig, decode

decode_mod = importlib.import_module("prophet.decode")  # the module (prophet.decode is also the function)
from prophet.models import load_model

SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


class HostReads(TorchFunctionMode):
    """Records the name of every host-reading tensor call made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,cfg", [
    ("tiny-llada", dict(block_length=8, rule="prophet", temperature=0.7, remasking="random")),
    ("tiny-llada", dict(block_length=8, rule="confidence_threshold", cache="dual", cfg_scale=0.5)),
    ("tiny-dream", dict(rule="gap_parallel", temperature=0.5, alg="entropy", alg_temp=0.3, cache="prefix",
                        block_length=8)),
])
def test_a_decode_reads_the_host_once_per_step(name, cfg, monkeypatch):
    model = load_model(CHECKPOINTS / name)
    steps = []
    real_step = decode_mod._step
    monkeypatch.setattr(decode_mod, "_step", lambda m, b: steps.append(1) or real_step(m, b))
    prompts = [model.encode(p) for p in ("1 2 3 4", "5 6", "7 8 9 1 2 3", "4", "5 6 7")]  # padded rows
    config = DecodeConfig(host=model.default_host, gen_length=16, steps=16, batch_size=2, **cfg)
    with HostReads() as reads:
        res = decode(model, prompts, config)
    assert res.steps_used.sum() > 0 and len(steps) >= 8
    # one tolist per step (its [finished, candidates, masks, block, step] rows), one for the plan
    assert reads.calls.count("tolist") <= len(steps) + 1, reads.calls
    assert len(reads.calls) <= len(steps) + 1, sorted(set(reads.calls))
